"""Tests for build.py: the zipapp is reproducible and runs with nothing installed."""

import importlib.util
import subprocess
import sys
import tempfile
import unittest
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import build  # noqa: E402

PIP_FAILED = 3


def run_build(out):
    """Run build.py into ``out`` and return the finished process."""
    return subprocess.run(
        [sys.executable, str(ROOT / "build.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )


class ArchiveTest(unittest.TestCase):
    """Build twice, then check the two archives and run one of them."""

    @classmethod
    def setUpClass(cls):
        cls.scratch = tempfile.TemporaryDirectory(prefix="liteengine-test-build-")
        folder = Path(cls.scratch.name)
        cls.first, cls.second = folder / "first.pyz", folder / "second.pyz"

        for out in (cls.first, cls.second):
            result = run_build(out)
            if result.returncode == PIP_FAILED:
                cls.scratch.cleanup()
                raise unittest.SkipTest(
                    "pip could not install requirements.txt (no network or no "
                    "package index?): " + result.stderr.strip().splitlines()[-1]
                )
            if result.returncode != 0:
                cls.scratch.cleanup()
                raise AssertionError(f"build.py failed:\n{result.stderr}")

    @classmethod
    def tearDownClass(cls):
        cls.scratch.cleanup()

    def test_two_builds_are_byte_identical(self):
        self.assertEqual(self.first.read_bytes(), self.second.read_bytes())

    def test_archive_starts_with_shebang_and_is_executable(self):
        self.assertTrue(self.first.read_bytes().startswith(b"#!/usr/bin/env python3\n"))
        self.assertTrue(self.first.stat().st_mode & 0o111)

    def test_archive_holds_no_bytecode_or_installer_files(self):
        with zipfile.ZipFile(self.first) as archive:
            names = archive.namelist()
        for name in names:
            self.assertNotIn("__pycache__", name)
            self.assertFalse(name.startswith("bin/"), name)
            self.assertFalse(name.endswith(("RECORD", "INSTALLER", ".so")), name)

    def test_every_module_carries_unchecked_bytecode_of_this_python(self):
        with zipfile.ZipFile(self.first) as archive:
            names = set(archive.namelist())
            sources = sorted(name for name in names if name.endswith(".py"))
            self.assertIn("bottle.py", sources)
            for name in sources:
                with self.subTest(name=name):
                    header = archive.read(name + "c")[:8]
                    self.assertEqual(header[:4], importlib.util.MAGIC_NUMBER)
                    # Flags 0b01: hash-based, never checked against the source.
                    self.assertEqual(int.from_bytes(header[4:], "little"), 0b01)

    def test_version_runs_from_empty_folder_without_site(self):
        version = build.read_version()
        with zipfile.ZipFile(self.first) as archive:
            info = archive.read("_buildinfo.py").decode()
        facts = {}
        exec(info, facts)
        self.assertEqual(facts["VERSION"], version)

        with tempfile.TemporaryDirectory() as empty:
            result = subprocess.run(
                [sys.executable, "-S", "-E", str(self.first), "--version"],
                cwd=empty,
                capture_output=True,
                text=True,
                timeout=60,
            )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(
            result.stdout.strip(), f"liteengine {version} ({facts['COMMIT']})"
        )


class PartsTest(unittest.TestCase):
    """The pieces of build.py that need neither pip nor the engine modules."""

    def test_write_archive_ignores_insertion_order(self):
        files = {"b.py": b"b = 1\n", "pkg/a.py": b"a = 1\n", "__main__.py": b""}
        stamp = (1980, 1, 1, 0, 0, 0)
        reordered = dict(reversed(list(files.items())))
        self.assertEqual(
            build.write_archive(files, stamp), build.write_archive(reordered, stamp)
        )

    def test_keep_drops_what_varies_between_installs(self):
        self.assertFalse(build.keep("bin/cheroot"))
        self.assertFalse(build.keep("cheroot/__pycache__/server.cpython-311.pyc"))
        self.assertFalse(build.keep("cheroot-11.1.2.dist-info/RECORD"))
        self.assertFalse(build.keep("cheroot-11.1.2.dist-info/direct_url.json"))
        self.assertTrue(build.keep("cheroot-11.1.2.dist-info/METADATA"))
        self.assertTrue(build.keep("certifi-1.dist-info/licenses/LICENSE"))
        self.assertTrue(build.keep("certifi/cacert.pem"))

    def test_native_code_fails_the_build(self):
        with tempfile.TemporaryDirectory() as folder:
            native = Path(folder, "fast", "_speedups.abi3.so")
            native.parent.mkdir()
            native.write_bytes(b"\x7fELF")
            with self.assertRaisesRegex(build.BuildError, "pure Python"):
                build.check_pure_python(Path(folder))


if __name__ == "__main__":
    unittest.main()
