"""Secure mode of the engine process, over real TLS on loopback.

Certificates are made by the engine's own ``certs`` command (so a missing
``openssl`` skips these tests), and the engine runs as a real server
process. Nothing here imports the engine's modules, so CI runs this module
against the zipapp too. The in-process log-service client tests, which use
the certificates made here, are in ``tests/test_tls.py``.
"""

import base64
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import unittest
import urllib.parse

from tests.engine_proc import EngineProcess, engine_command

OPENSSL = shutil.which("openssl")
needs_openssl = unittest.skipIf(
    OPENSSL is None,
    "the openssl command line tool is not installed; the certs command needs it",
)

KEY = "stage-1/le"
CERT_FILES = (
    "ca.pem",
    "ca-key.pem",
    "server.pem",
    "server-key.pem",
    "client.pem",
    "client-key.pem",
)
_folder = None


def run_engine(*args, cwd=None, env=None):
    """Run the engine under test with ``args``; returns the finished process."""
    with tempfile.TemporaryDirectory(prefix="liteengine-cwd-") as empty:
        return subprocess.run(
            engine_command(*args),
            cwd=cwd or empty,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )


def cert_folder():
    """A folder with two certificate sets from the ``certs`` command.

    ``certs/`` is for localhost, 127.0.0.1 and logs.test; ``other/`` comes
    from another CA. The folder is made once for the test module that asks
    first and removed when that module is done; the next module to ask gets a
    new one.
    """
    global _folder
    if _folder is None:
        folder = tempfile.mkdtemp(prefix="liteengine-tls-")
        unittest.addModuleCleanup(_forget_folder, folder)
        hosts = ("--host", "localhost", "--host", "127.0.0.1", "--host", "logs.test")
        for name in ("certs", "other"):
            made = run_engine("certs", "--dir", os.path.join(folder, name), *hosts)
            if made.returncode != 0:
                raise RuntimeError("certs failed: " + made.stderr)
        _folder = folder
    return _folder


def _forget_folder(folder):
    global _folder
    _folder = None
    shutil.rmtree(folder, True)


def cert(name, set_name="certs"):
    """The path of ``name`` (``ca.pem``, ``client-key.pem`` ...) in a set."""
    return os.path.join(cert_folder(), set_name, name)


def client_context(ca_set="certs", cert_set=None):
    """A client context trusting ``ca_set``'s CA, showing ``cert_set``'s client."""
    context = ssl.create_default_context(cafile=cert("ca.pem", ca_set))
    if cert_set is not None:
        context.load_cert_chain(
            cert("client.pem", cert_set), cert("client-key.pem", cert_set)
        )
    return context


def get_health(url, context=None):
    """``GET /healthz`` over HTTPS, or HTTP without a context; ``(status, json)``."""
    netloc = urllib.parse.urlsplit(url).netloc
    if context is None:
        connection = http.client.HTTPConnection(netloc, timeout=5)
    else:
        connection = http.client.HTTPSConnection(netloc, timeout=5, context=context)
    try:
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        return response.status, json.loads(response.read().decode("utf-8"))
    finally:
        connection.close()


def secure_env(**overrides):
    """EngineProcess overrides for secure mode with the ``certs`` set."""
    env = {
        "SERVER_INSECURE": None,
        "SERVER_CERT_FILE": cert("server.pem"),
        "SERVER_KEY_FILE": cert("server-key.pem"),
        "CLIENT_CERT_FILE": cert("ca.pem"),
    }
    env.update(overrides)
    return env


def b64(path):
    """The file at ``path`` in base64, as the runner sends PEM files."""
    with open(path, "rb") as file:
        return base64.b64encode(file.read()).decode("ascii")


# ------------------------------------------------------------------ certs


@needs_openssl
class CertsCommandTest(unittest.TestCase):
    """``liteengine.py certs`` writes a usable set, keys private."""

    def test_writes_the_set_with_private_keys(self):
        for name in CERT_FILES:
            path = cert(name)
            mode = os.stat(path).st_mode & 0o777
            expected = 0o600 if name.endswith("-key.pem") else 0o644
            self.assertEqual(mode, expected, name)
        text = subprocess.run(
            [OPENSSL, "x509", "-in", cert("server.pem"), "-noout", "-text"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for name in ("DNS:localhost", "IP Address:127.0.0.1", "DNS:logs.test"):
            self.assertIn(name, text)
        self.assertIn("TLS Web Server Authentication", text)

    def test_defaults_and_refusal_to_overwrite(self):
        with tempfile.TemporaryDirectory() as cwd:
            first = run_engine("certs", "--days", "2", cwd=cwd)
            self.assertEqual(first.returncode, 0, first.stderr)
            written = sorted(os.listdir(os.path.join(cwd, "certs")))
            self.assertEqual(written, sorted(CERT_FILES))
            self.assertIn("client health", first.stdout)
            again = run_engine("certs", cwd=cwd)
            self.assertEqual(again.returncode, 1)
            self.assertIn("--force", again.stderr)
            forced = run_engine("certs", "--force", cwd=cwd)
            self.assertEqual(forced.returncode, 0, forced.stderr)

    def test_bad_host_is_a_usage_error(self):
        result = run_engine("certs", "--host", "a,b", "--dir", "x")
        self.assertEqual(result.returncode, 2)
        self.assertIn("--host", result.stderr)


class CertsWithoutOpensslTest(unittest.TestCase):
    """Without openssl the certs command says so and stops."""

    def test_missing_openssl_is_one_clear_line(self):
        with tempfile.TemporaryDirectory() as empty:
            env = dict(os.environ, PATH=empty)
            result = run_engine("certs", "--dir", os.path.join(empty, "c"), env=env)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertIn("openssl", result.stderr)


# ----------------------------------------------------------------- server


@needs_openssl
class SecureServerTest(unittest.TestCase):
    """A default start with certificates: only trusted client certificates in."""

    @classmethod
    def setUpClass(cls):
        cls.engine = EngineProcess(secure_env())
        cls.addClassCleanup(cls.engine.cleanup)
        cls.engine.start()

    def assertServing(self):
        """A good caller still gets an answer; nothing was logged as an error."""
        status, body = get_health(self.engine.url, client_context(cert_set="certs"))
        self.assertEqual((status, body["ok"]), (200, True))
        stderr = "".join(self.engine.stderr_lines())
        self.assertNotIn("level=error", stderr)
        self.assertNotIn("Traceback", stderr)

    def test_serves_https(self):
        self.assertTrue(self.engine.url.startswith("https://127.0.0.1:"))
        self.assertServing()

    def test_client_command_with_certificate_options(self):
        result = run_engine(
            "client",
            "--addr",
            self.engine.url,
            "--ca",
            cert("ca.pem"),
            "--cert",
            cert("client.pem"),
            "--key",
            cert("client-key.pem"),
            "health",
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout), {"version": "0.1.0", "ok": True})

    def test_client_command_defaults_to_the_certs_folder(self):
        addr = ("--addr", self.engine.url)
        result = run_engine("client", *addr, "health", cwd=cert_folder())
        self.assertEqual(result.returncode, 0, result.stderr)
        missing = run_engine("client", *addr, "health")
        self.assertEqual(missing.returncode, 1)
        self.assertIn("--ca", missing.stderr)

    def test_client_command_verifies_the_server(self):
        result = run_engine(
            "client",
            "--addr",
            self.engine.url,
            "--ca",
            cert("ca.pem", "other"),
            "--cert",
            cert("client.pem"),
            "--key",
            cert("client-key.pem"),
            "health",
        )
        self.assertEqual(result.returncode, 1)
        self.assertIn("CERTIFICATE_VERIFY_FAILED", result.stderr)

    def test_caller_without_certificate_is_refused(self):
        with self.assertRaises((OSError, http.client.HTTPException)):
            get_health(self.engine.url, client_context())
        self.assertIsNotNone(self.engine.wait_for_stderr("PEER_DID_NOT_RETURN"))
        self.assertServing()

    def test_certificate_from_another_ca_is_refused(self):
        with self.assertRaises((OSError, http.client.HTTPException)):
            get_health(self.engine.url, client_context(cert_set="other"))
        self.assertIsNotNone(self.engine.wait_for_stderr("CERTIFICATE_VERIFY_FAILED"))
        self.assertServing()

    def test_plain_http_is_refused_with_json_400(self):
        status, body = get_health(self.engine.url)
        self.assertEqual(status, 400)
        self.assertIn("HTTPS", body["error_msg"])
        self.assertServing()

    def test_silent_caller_does_not_hold_others_back(self):
        address = urllib.parse.urlsplit(self.engine.url)
        with socket.create_connection((address.hostname, address.port)):
            started = time.monotonic()
            self.assertServing()
            self.assertLess(time.monotonic() - started, 3)


@needs_openssl
class StartupTest(unittest.TestCase):
    """Missing or unusable files stop the start with exit 2, naming them."""

    def start(self, **overrides):
        """Run ``server`` in secure mode with ``overrides``; expects it to stop."""
        env = dict(os.environ, HTTPS_BIND="127.0.0.1:0")
        env.pop("SERVER_INSECURE", None)
        env.update(
            (name, value)
            for name, value in secure_env(**overrides).items()
            if value is not None
        )
        with tempfile.TemporaryDirectory() as workdir:
            env["HARNESS_WORKDIR"] = workdir
            return run_engine("server", env=env)

    def test_missing_files_name_the_variable_and_file(self):
        for name in ("SERVER_CERT_FILE", "SERVER_KEY_FILE", "CLIENT_CERT_FILE"):
            with self.subTest(name=name):
                result = self.start(**{name: "/nonexistent/file.pem"})
                self.assertEqual(result.returncode, 2)
                self.assertIn("%s=/nonexistent/file.pem" % name, result.stderr)
                self.assertNotIn("Traceback", result.stderr)

    def test_key_of_another_certificate(self):
        result = self.start(SERVER_KEY_FILE=cert("client-key.pem"))
        self.assertEqual(result.returncode, 2)
        self.assertIn("SERVER_KEY_FILE", result.stderr)

    def test_client_ca_file_without_certificate(self):
        result = self.start(CLIENT_CERT_FILE=cert("ca-key.pem"))
        self.assertEqual(result.returncode, 2)
        self.assertIn("CLIENT_CERT_FILE", result.stderr)

    def test_log_service_settings_are_checked(self):
        bad = {"LE_LOG_CA_FILE": "/nonexistent/ca.pem", "LE_LOG_SKIP_VERIFY": "maybe"}
        for name, value in bad.items():
            with self.subTest(name=name):
                result = self.start(**{name: value})
                self.assertEqual(result.returncode, 2)
                self.assertIn(name, result.stderr)


@needs_openssl
class BadClientCertConfigTest(unittest.TestCase):
    """A ``log_config.mtls_config`` that cannot be used is a 400 naming it."""

    def test_setup_answers_400_naming_the_field(self):
        pem, key = b64(cert("client.pem")), b64(cert("server-key.pem"))
        hello = base64.b64encode(b"hello").decode()
        cases = (
            ({"client_cert": "%%%", "client_cert_key": key}, "cert is not base64"),
            ({"client_cert": pem}, "client_cert_key is missing"),
            ({"client_cert": hello, "client_cert_key": key}, "not base64 of a PEM"),
            ({"client_cert": pem, "client_cert_key": key}, "and its unencrypted key"),
        )
        with EngineProcess() as engine:
            netloc = urllib.parse.urlsplit(engine.url).netloc
            for mtls, words in cases:
                body = {
                    "le_log_key": KEY,
                    "log_config": {
                        "url": "https://127.0.0.1:9",
                        "account_id": "acct",
                        "token": "tok",
                        "mtls_config": mtls,
                    },
                }
                with self.subTest(words=words):
                    connection = http.client.HTTPConnection(netloc, timeout=5)
                    connection.request("POST", "/setup", body=json.dumps(body))
                    response = connection.getresponse()
                    answer = json.loads(response.read())
                    connection.close()
                    self.assertEqual(response.status, 400, answer)
                    self.assertIn("log_config.mtls_config", answer["error_msg"])
                    self.assertIn(words, answer["error_msg"])


if __name__ == "__main__":
    unittest.main()
