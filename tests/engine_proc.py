"""Start the real engine server as a child process for tests.

The engine under test is the source tree's ``liteengine.py`` unless the
environment variable LE_ENGINE names a built zipapp; then that file runs with
``-S -E`` (no site-packages, no PYTHON* variables), so the same tests check
the shipped artifact. Either way the child starts in an empty folder of its
own. ``engine_command`` builds the command line for every such child.

``EngineProcess`` runs the server on a free loopback port with its shared
folder in a fresh temporary directory, reads the port from the ``server
listening`` line, and keeps every stderr line so tests can wait for one.
The temporary directory outlives ``stop()`` so a test can read the shared
folder afterwards; ``cleanup()`` removes it.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "liteengine.py"

# The zipapp under test, or None for the source tree. Resolved once, against
# the folder the tests were started from.
PYZ = os.path.abspath(os.environ["LE_ENGINE"]) if os.environ.get("LE_ENGINE") else None


def engine_command(*args):
    """Return the command line that runs the engine under test with ``args``.

    The interpreter is this one. With LE_ENGINE set, the zipapp it names runs
    with ``-S -E``; otherwise ``liteengine.py`` from the source tree. Raises
    ``FileNotFoundError`` if LE_ENGINE names no file, so a missing build fails
    every test that needs it instead of testing the source by mistake.
    """
    if PYZ is None:
        return [sys.executable, str(SCRIPT), *args]
    if not os.path.isfile(PYZ):
        raise FileNotFoundError("LE_ENGINE names no file: %s" % PYZ)
    return [sys.executable, "-S", "-E", PYZ, *args]


def short_deadlines(seconds):
    """Overrides that give every kind of log-service call ``seconds`` at most."""
    names = ("LE_OPEN_TIMEOUT", "LE_WRITE_TIMEOUT", "LE_UPLOAD_TIMEOUT")
    return {name: str(seconds) for name in names + ("LE_CLOSE_TIMEOUT",)}


_ADDRESS = re.compile(r'msg="server listening".*\baddress="?([^"\s]+)"?')
_SCHEME = re.compile(r'msg="server listening".*\bscheme=(https?)\b')


class EngineProcess:
    """One engine server process, plain HTTP on ``127.0.0.1``.

    ``env_overrides`` is applied over the test's environment and the
    defaults (SERVER_INSECURE=true, HTTPS_BIND=127.0.0.1:0, HARNESS_WORKDIR
    in a temporary directory); a value of ``None`` removes that variable.
    Overrides that remove SERVER_INSECURE and name the certificate files
    make it serve HTTPS; ``url`` then starts with ``https://``.
    """

    def __init__(self, env_overrides=None, args=()):
        self.workdir = tempfile.mkdtemp(prefix="liteengine-test-")
        # Kept apart from workdir, whose contents some tests list.
        self.cwd = tempfile.mkdtemp(prefix="liteengine-cwd-")
        self.env = dict(os.environ)
        self.env.update(
            SERVER_INSECURE="true",
            HTTPS_BIND="127.0.0.1:0",
            HARNESS_WORKDIR=self.workdir,
            PYTHONUNBUFFERED="1",
        )
        for name, value in (env_overrides or {}).items():
            if value is None:
                self.env.pop(name, None)
            else:
                self.env[name] = value
        self.args = list(args)
        self.url = None
        self.process = None
        self._lines = []
        self._changed = threading.Condition()
        self._reader = None

    @property
    def shared_dir(self):
        """The engine's shared folder, ``$HARNESS_WORKDIR/tmp/engine``."""
        return os.path.join(self.workdir, "tmp", "engine")

    def start(self, timeout=10.0):
        """Start the server and wait for its address; returns ``self``.

        Raises ``RuntimeError`` with the server's stderr if it exits or stays
        silent for ``timeout`` seconds.
        """
        self.process = subprocess.Popen(
            engine_command("server", *self.args),
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        line = self.wait_for_stderr('msg="server listening"', timeout)
        if line is None:
            self.kill()
            lines = "".join(self.stderr_lines())
            raise RuntimeError("engine did not start:\n" + lines)
        scheme = _SCHEME.search(line)
        address = _ADDRESS.search(line).group(1)
        self.url = "%s://%s" % (scheme.group(1) if scheme else "http", address)
        return self

    def stderr_lines(self):
        """Every stderr line so far, newline included."""
        with self._changed:
            return list(self._lines)

    def wait_for_stderr(self, text, timeout=5.0):
        """Wait for a stderr line containing ``text``; returns it, or ``None``.

        Returns early with ``None`` once the process has closed stderr.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            seen = 0
            while True:
                for line in self._lines[seen:]:
                    if text in line:
                        return line
                seen = len(self._lines)
                left = deadline - time.monotonic()
                if left <= 0 or self._reader is None or not self._reader.is_alive():
                    return None
                self._changed.wait(left)

    def stop(self, timeout=10.0):
        """Send SIGTERM and wait for the exit; returns the exit code.

        A process still running after ``timeout`` seconds is killed and
        ``None`` is returned.
        """
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            code = None
        self._finish()
        return code

    def kill(self):
        """Kill the process at once, if it is still running."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._finish()

    def cleanup(self):
        """Stop the process if needed and remove its temporary directories.

        SIGTERM first, so the engine kills the steps it started (they run in
        process groups of their own and would outlive a killed engine).
        """
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
        shutil.rmtree(self.cwd, ignore_errors=True)

    def _finish(self):
        if self._reader is not None:
            self._reader.join(5)
        if self.process is not None and self.process.stderr:
            self.process.stderr.close()

    def _drain(self):
        for raw in self.process.stderr:
            with self._changed:
                self._lines.append(raw.decode("utf-8", "replace"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()
        self.cleanup()


class SharedEngineCase(unittest.TestCase):
    """Tests that share one running engine, started once as ``cls.engine``."""

    @classmethod
    def setUpClass(cls):
        cls.engine = EngineProcess()
        cls.addClassCleanup(cls.engine.cleanup)
        cls.engine.start()
