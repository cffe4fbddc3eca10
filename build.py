"""Build dist/liteengine.pyz, a single-file zipapp of the engine and its dependencies.

Usage: python build.py [--out PATH] [--pyc-python EXE | --no-pyc]

The archive holds the engine's modules, the pinned dependencies from
requirements.txt (installed by pip into a scratch folder), a generated
``_buildinfo.py`` and a ``__main__.py``. It runs with nothing installed:
``python3 -S -E liteengine.pyz ...``.

Next to every ``.py`` file the archive carries its bytecode, compiled by the
interpreter running the build (or ``--pyc-python``). Python cannot cache
bytecode inside a zip, so without it every start compiles bottle, cheroot and
the rest again, which more than doubles the start-up time. Other Python
versions see the version stamp in the ``.pyc`` files, skip them and compile
from source as before: the archive works everywhere, fastest on the version
that built it.

Two builds of the same commit give byte-identical archives: entries are sorted,
every entry carries the same timestamp and permissions, and nothing that pip
writes per install (RECORD, INSTALLER, direct_url.json, bytecode) is kept. The
bytecode is compiled with a fixed hash seed and stamped with source hashes that
are never checked, not with times. The timestamp is 1980-01-01 00:00:00 unless
SOURCE_DATE_EPOCH is set. Deflate output comes from the local zlib and the
bytecode from the local Python, so identity is promised for builds on the same
machine image, not across zlib or Python versions.

Exit codes: 0 built, 1 bad project state, dependency or bytecode, 3 pip install
failed.
"""

import argparse
import hashlib
import importlib.machinery
import io
import os
import re
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
MODULES = ("liteengine.py", "logstream.py", "hooks.py")
DEFAULT_OUT = ROOT / "dist" / "liteengine.pyz"
SHEBANG = b"#!/usr/bin/env python3\n"

# Paths (relative to the pip target) that only the dependencies' own test
# suites use; cheroot/testing.py imports cheroot.test, so both go.
TEST_ONLY = ("certifi/tests/", "cheroot/test/", "cheroot/testing.py")

# Of each *.dist-info folder only the parts that never vary are kept: METADATA,
# because cheroot reads its own version through importlib.metadata, and the
# license texts, which must travel with the code.
KEPT_DIST_INFO = re.compile(r"^(METADATA|LICEN[CS]E[^/]*|licenses/.+)$")

NATIVE_SUFFIXES = tuple(
    sorted(set(importlib.machinery.EXTENSION_SUFFIXES) | {".so", ".pyd", ".dylib"})
)

MAIN_PY = '''\
"""Start liteengine from the zipapp."""

import sys

import liteengine

sys.exit(liteengine.main())
'''

# Run by the interpreter that compiles: argv[1] is a folder; every .py file in
# it gets an unchecked-hash .pyc beside it whose code names the file by its
# path in the archive. Unchecked, because the zip's sources never change.
COMPILE_PY = """\
import pathlib, py_compile, sys
folder = pathlib.Path(sys.argv[1])
for source in sorted(folder.rglob("*.py")):
    py_compile.compile(
        str(source),
        cfile=str(source) + "c",
        dfile=source.relative_to(folder).as_posix(),
        doraise=True,
        optimize=0,
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
    )
"""

VERSION_LINE = re.compile(r"""^__version__\s*=\s*["']([^"'\\\s]+)["']""", re.M)


class BuildError(Exception):
    """A build step failed; the message says which and why."""

    def __init__(self, message, exit_code=1):
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------------------
# Build facts


def read_version(root=ROOT):
    """Return ``__version__`` from liteengine.py, read as text, never imported."""
    path = root / "liteengine.py"
    match = VERSION_LINE.search(path.read_text(encoding="utf-8"))
    if match is None:
        raise BuildError(f'no __version__ = "..." line in {path}')
    return match.group(1)


def read_commit(root=ROOT):
    """Return the HEAD commit, with "-dirty" if tracked files changed.

    Returns "unknown" when git is missing or the root is not a git checkout.
    """

    def git(*args):
        return subprocess.run(
            ["git", "-C", str(root), *args],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changes = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + "-dirty" if changes else commit


def render_buildinfo(version, commit):
    """Return the source of ``_buildinfo.py`` for the given version and commit."""
    return (
        '"""Facts about this build, written by build.py."""\n'
        "\n"
        f'VERSION = "{version}"\n'
        f'COMMIT = "{commit}"\n'
    )


def zip_timestamp():
    """Return the entry timestamp: SOURCE_DATE_EPOCH in UTC, else 1980-01-01."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if not epoch:
        return (1980, 1, 1, 0, 0, 0)
    try:
        stamp = time.gmtime(int(epoch))
    except (ValueError, OverflowError) as exc:
        raise BuildError(f"SOURCE_DATE_EPOCH={epoch!r} is not a Unix time") from exc
    # Zip cannot store dates before 1980.
    if stamp.tm_year < 1980:
        return (1980, 1, 1, 0, 0, 0)
    return tuple(stamp[:6])


# ---------------------------------------------------------------------------
# Dependencies


def install_dependencies(target, requirements):
    """Install the pinned wheels into ``target`` with pip; raise on failure."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-compile",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--quiet",
        "--target",
        str(target),
        "-r",
        str(requirements),
    ]
    result = subprocess.run(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if result.returncode != 0:
        lines = result.stdout.strip().splitlines()
        # pip warns once per index for every package; the errors say more.
        errors = [line for line in lines if not line.startswith("WARNING:")]
        tail = "\n".join((errors or lines)[-15:])
        raise BuildError(
            f"pip install failed (exit {result.returncode}):\n{tail}", exit_code=3
        )


def check_pure_python(target):
    """Raise if any installed distribution is not pure Python.

    Reads each wheel's WHEEL file and scans for native extension files, since
    either alone can miss a case.
    """
    problems = []
    for wheel in sorted(target.glob("*.dist-info/WHEEL")):
        text = wheel.read_text(encoding="utf-8")
        if not re.search(r"^Root-Is-Purelib:\s*true\s*$", text, re.M | re.I):
            problems.append(f"{wheel.parent.name} is not a purelib wheel")
        for tag in re.findall(r"^Tag:\s*(\S+)", text, re.M):
            if not tag.endswith("-none-any"):
                problems.append(f"{wheel.parent.name} has platform tag {tag}")
    for path in sorted(target.rglob("*")):
        if path.is_file() and path.name.endswith(NATIVE_SUFFIXES):
            problems.append(f"native code: {path.relative_to(target).as_posix()}")
    if problems:
        raise BuildError(
            "the archive must hold pure Python only; pin pure-Python releases:\n  "
            + "\n  ".join(problems)
        )


def keep(name):
    """Return whether the pip-installed file at posix path ``name`` is shipped."""
    top, _, rest = name.partition("/")
    if top == "bin" or "__pycache__/" in name or name.endswith(".pyc"):
        return False
    if name.startswith(TEST_ONLY) or name.endswith((".pyi", "/py.typed")):
        return False
    if top.endswith(".dist-info"):
        return KEPT_DIST_INFO.match(rest) is not None
    return True


def collect_dependencies(target):
    """Return ``{archive name: bytes}`` for the shipped files under ``target``."""
    files = {}
    for path in target.rglob("*"):
        name = path.relative_to(target).as_posix()
        if path.is_file() and keep(name):
            files[name] = path.read_bytes()
    return files


# ---------------------------------------------------------------------------
# Bytecode


def compile_bytecode(files, python=sys.executable):
    """Return ``{"x.pyc": bytes}`` for every ``x.py`` in ``files``.

    ``python`` compiles them in a child process whose hash seed is fixed, so
    set and frozenset constants come out in the same order every time.
    """
    sources = sorted(name for name in files if name.endswith(".py"))
    # Not -E: the seed must get through, so the other PYTHON* settings are
    # left out here instead.
    env = {key: value for key, value in os.environ.items() if "PYTHON" not in key}
    env["PYTHONHASHSEED"] = "0"
    with tempfile.TemporaryDirectory(prefix="liteengine-pyc-") as scratch:
        folder = Path(scratch)
        for name in sources:
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(files[name])
        try:
            result = subprocess.run(
                [python, "-S", "-c", COMPILE_PY, scratch],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        except OSError as exc:
            raise BuildError(f"cannot run {python} to compile bytecode: {exc}") from exc
        if result.returncode != 0:
            tail = "\n".join(result.stdout.strip().splitlines()[-10:])
            raise BuildError(
                f"compiling bytecode with {python} failed (--no-pyc skips it):\n" + tail
            )
        return {name + "c": (folder / (name + "c")).read_bytes() for name in sources}


# ---------------------------------------------------------------------------
# Archive


def directories_of(names):
    """Return every parent folder of ``names`` as "a/", "a/b/", ... entries.

    Folder entries let zipimport find namespace packages such as ``jaraco``
    on Python versions that do not infer folders from file names.
    """
    folders = set()
    for name in names:
        parts = name.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            folders.add("/".join(parts[:depth]) + "/")
    return folders


def write_archive(files, date_time):
    """Return the bytes of the zipapp holding ``files``, shebang first.

    The result depends only on ``files`` and ``date_time``.
    """
    buffer = io.BytesIO()
    buffer.write(SHEBANG)
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in sorted(set(files) | directories_of(files)):
            info = zipfile.ZipInfo(name, date_time)
            info.create_system = 3
            if name.endswith("/"):
                info.external_attr = (stat.S_IFDIR | 0o755) << 16 | 0x10
                archive.writestr(info, b"")
                continue
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, files[name], compresslevel=9)
    return buffer.getvalue()


def gather(root=ROOT, pyc_python=sys.executable):
    """Return ``{archive name: bytes}`` for everything the archive carries.

    ``pyc_python`` is the interpreter that compiles the bytecode, or None to
    ship sources only.
    """
    missing = [name for name in MODULES if not (root / name).is_file()]
    if missing:
        raise BuildError(f"missing engine module(s) in {root}: {', '.join(missing)}")

    with tempfile.TemporaryDirectory(prefix="liteengine-build-") as scratch:
        target = Path(scratch)
        install_dependencies(target, root / "requirements.txt")
        check_pure_python(target)
        files = collect_dependencies(target)

    ours = {name: (root / name).read_bytes() for name in MODULES}
    ours["__main__.py"] = MAIN_PY.encode()
    ours["_buildinfo.py"] = render_buildinfo(
        read_version(root), read_commit(root)
    ).encode()
    clash = sorted(set(ours) & set(files))
    if clash:
        raise BuildError(f"a dependency ships a file we own: {', '.join(clash)}")
    files.update(ours)
    if pyc_python is not None:
        files.update(compile_bytecode(files, pyc_python))
    return files


def build(out, root=ROOT, pyc_python=sys.executable):
    """Build the zipapp at ``out`` and return its bytes.

    The file is replaced atomically and made executable. ``pyc_python`` is
    as for ``gather``.
    """
    data = write_archive(gather(root, pyc_python), zip_timestamp())
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_bytes(data)
    partial.chmod(0o755)
    os.replace(partial, out)
    return data


def main(argv=None):
    """Command-line entry: build, then print path, size and sha256."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="where to write the archive (default: dist/liteengine.pyz)",
    )
    bytecode = parser.add_mutually_exclusive_group()
    bytecode.add_argument(
        "--pyc-python",
        default=sys.executable,
        metavar="EXE",
        help="interpreter whose bytecode the archive carries (default: this one)",
    )
    bytecode.add_argument(
        "--no-pyc",
        dest="pyc_python",
        action="store_const",
        const=None,
        help="ship sources only (every start then compiles them)",
    )
    args = parser.parse_args(argv)

    try:
        data = build(args.out, pyc_python=args.pyc_python)
    except BuildError as exc:
        print(f"build.py: {exc}", file=sys.stderr)
        return exc.exit_code

    digest = hashlib.sha256(data).hexdigest()
    print(f"{args.out}  {len(data)} bytes  sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
