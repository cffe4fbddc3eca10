"""The engine's HTTP API and command line, against the real server process.

No log service is involved: ``/setup`` without a ``log_config.url`` streams
to the local file store, whose contents are tested elsewhere. Every engine
here is started through ``tests.engine_proc``, so LE_ENGINE switches all of
them to the built zipapp; nothing imports the engine's modules.
"""

import http.client
import json
import os
import socket
import subprocess
import tempfile
import time
import unittest
import urllib.parse

from tests.engine_proc import EngineProcess, SharedEngineCase, engine_command

LIMIT = 10 * 1024 * 1024
TOKEN = "tok-never-logged-7f3a"


def request(url, method, path, body=None, headers=None):
    """One HTTP request; returns ``(status, content_type, decoded_json)``."""
    parts = urllib.parse.urlsplit(url)
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode("utf-8")
    connection = http.client.HTTPConnection(parts.netloc, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        raw = response.read()
        content_type = response.getheader("Content-Type", "")
    finally:
        connection.close()
    return response.status, content_type, json.loads(raw.decode("utf-8"))


def raw_exchange(url, data):
    """Send ``data`` as is on a fresh connection; returns ``(status, json)``."""
    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(data)
        received = []
        while True:
            part = sock.recv(65536)
            if not part:
                break
            received.append(part)
    head, _, body = b"".join(received).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body.decode("utf-8"))


def run_cli(*args, env=None):
    """Run the engine under test with ``args`` from an empty folder.

    Returns the finished process.
    """
    with tempfile.TemporaryDirectory(prefix="liteengine-cwd-") as empty:
        return subprocess.run(
            engine_command(*args),
            cwd=empty,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )


def closed_port():
    """A loopback port nobody listens on (just released by us)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ApiTest(SharedEngineCase):
    """Good and bad requests to one running server."""

    def call(self, method, path, body=None, headers=None):
        """One request to the server under test."""
        return request(self.engine.url, method, path, body, headers)

    def answer(self, method, path, body=None):
        """One request; returns ``(status, decoded_json)``."""
        status, _, decoded = self.call(method, path, body)
        return status, decoded

    def assertError(self, answer, status, *words):
        """``answer`` is a JSON error with ``status`` naming ``words``."""
        code, content_type, body = answer
        self.assertEqual(code, status, body)
        self.assertEqual(content_type, "application/json")
        self.assertEqual(list(body), ["error_msg"])
        for word in words:
            self.assertIn(word, body["error_msg"])

    def assertHealthy(self):
        """The server still answers and has logged no error."""
        self.assertEqual(self.call("GET", "/healthz")[0], 200)
        errors = [line for line in self.engine.stderr_lines() if "level=error" in line]
        self.assertEqual(errors, [])

    def test_healthz(self):
        status, content_type, body = self.call("GET", "/healthz")
        self.assertEqual(status, 200)
        self.assertEqual(content_type, "application/json")
        self.assertEqual(body, {"version": "0.1.0", "ok": True})

    def test_setup_and_destroy_with_local_store(self):
        setup = {
            "le_log_key": "stage-1/le",
            "log_config": {"url": "", "account_id": "acct", "token": TOKEN},
            "secrets": ["hunter22"],
            "envs": {"CI": "true"},
            "network": {"id": "n1"},
            "volumes": [],
            "files": [],
            "some_future_field": {"ignored": True},
        }
        self.assertEqual(self.answer("POST", "/setup", setup), (200, {}))
        self.assertEqual(self.answer("POST", "/setup", setup), (200, {}))
        self.assertEqual(self.answer("POST", "/destroy", {}), (200, {}))
        self.assertEqual(self.answer("POST", "/destroy"), (200, {}))
        self.assertIsNotNone(self.engine.wait_for_stderr('msg="setup done"'))
        self.assertIsNotNone(self.engine.wait_for_stderr('msg="destroy done"'))
        self.assertNotIn(TOKEN, "".join(self.engine.stderr_lines()))
        self.assertHealthy()

    def test_destroy_without_setup_and_with_runtime_id(self):
        self.assertEqual(self.answer("POST", "/destroy"), (200, {}))
        body = {"stage_runtime_id": "abc"}
        self.assertEqual(self.answer("POST", "/destroy", body), (200, {}))

    def test_setup_without_key_and_null_fields(self):
        self.assertEqual(self.answer("POST", "/setup"), (200, {}))
        nulls = dict.fromkeys(
            ("envs", "secrets", "le_log_key", "log_config", "network", "volumes")
        )
        self.assertEqual(self.answer("POST", "/setup", nulls), (200, {}))

    def test_bodies_that_are_not_json_objects(self):
        bodies = {
            b"{not json": "not valid JSON",
            b"[1, 2]": "JSON object",
            b'"text"': "JSON object",
            b'{"le_log_key": "\xff"}': "UTF-8",
            b"[" * 100000 + b"]" * 100000: "not valid JSON",
        }
        for path in ("/setup", "/destroy"):
            for body, words in bodies.items():
                with self.subTest(path=path, body=body[:20]):
                    self.assertError(self.call("POST", path, body), 400, words)
        self.assertHealthy()

    def test_fields_of_the_wrong_type(self):
        cases = {
            "envs": [["A=1"], {"A": 1}, "A=1"],
            "secrets": ["s3cret", [1], {"a": "b"}],
            "le_log_key": [5, True, ["k"]],
            "log_config": ["http://x", [1]],
            "network": [[], "bridge"],
            "volumes": [{}, "v"],
            "files": [{}, "f"],
        }
        for field, values in cases.items():
            for value in values:
                with self.subTest(field=field, value=value):
                    answer = self.call("POST", "/setup", {field: value})
                    self.assertError(answer, 400, field)
        answer = self.call("POST", "/setup", {"log_config": {"url": 5}})
        self.assertError(answer, 400, "log_config.url")
        answer = self.call("POST", "/setup", {"log_config": {"token": ["t"]}})
        self.assertError(answer, 400, "log_config.token")
        self.assertHealthy()

    def test_unknown_path_is_json_404(self):
        for method, path in (("GET", "/nope"), ("POST", "/start"), ("GET", "/")):
            with self.subTest(method=method, path=path):
                self.assertError(self.call(method, path), 404, path)
        self.assertHealthy()

    def test_wrong_method_is_json_405(self):
        for method, path in (
            ("POST", "/healthz"),
            ("GET", "/setup"),
            ("GET", "/destroy"),
            ("DELETE", "/setup"),
            ("PUT", "/destroy"),
        ):
            with self.subTest(method=method, path=path):
                self.assertError(self.call(method, path), 405, method)
        self.assertHealthy()

    def test_declared_body_over_limit_is_413_before_reading(self):
        head = (
            "POST /setup HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: %d\r\n\r\n" % (LIMIT + 1)
        )
        status, body = raw_exchange(self.engine.url, head.encode("ascii"))
        self.assertEqual(status, 413)
        self.assertIn("larger than", body["error_msg"])
        self.assertHealthy()

    def test_body_at_limit_is_accepted(self):
        body = b'{"x": "' + b"a" * (LIMIT - 9) + b'"}'
        self.assertEqual(len(body), LIMIT)
        self.assertEqual(self.answer("POST", "/destroy", body), (200, {}))

    def test_chunked_bodies(self):
        head = (
            b"POST /destroy HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        small = head + b"2\r\n{}\r\n0\r\n\r\n"
        self.assertEqual(raw_exchange(self.engine.url, small), (200, {}))

        piece = b"10000\r\n" + b" " * 0x10000 + b"\r\n"
        over = head + piece * (LIMIT // 0x10000) + b"1\r\n \r\n"
        status, body = raw_exchange(self.engine.url, over)
        self.assertEqual(status, 413)
        self.assertIn("larger than", body["error_msg"])

        huge_chunk = head + b"40000000\r\n" + b" " * 100
        status, body = raw_exchange(self.engine.url, huge_chunk)
        self.assertEqual(status, 413)
        self.assertHealthy()


class ClientCommandTest(SharedEngineCase):
    """The ``client`` command against a running server."""

    def client(self, *args):
        """Run ``client`` against the server under test."""
        return run_cli("client", "--addr", self.engine.url, *args)

    def test_health_setup_destroy(self):
        health = self.client("health")
        self.assertEqual(health.returncode, 0, health.stderr)
        self.assertEqual(json.loads(health.stdout), {"version": "0.1.0", "ok": True})

        setup = self.client(
            "setup",
            "--le-log-key",
            "stage-2/le",
            "--account-id",
            "acct",
            "--token",
            TOKEN,
            "--secret",
            "hunter22",
        )
        self.assertEqual((setup.returncode, setup.stdout.strip()), (0, "{}"))
        destroy = self.client("destroy")
        self.assertEqual((destroy.returncode, destroy.stdout.strip()), (0, "{}"))
        self.assertIsNotNone(self.engine.wait_for_stderr("key=stage-2/le"))
        self.assertNotIn(TOKEN, "".join(self.engine.stderr_lines()))

    def test_error_answer_exits_1_with_error_msg(self):
        setup = self.client("setup", "--log-url", "ftp://example.invalid")
        self.assertEqual(setup.returncode, 1)
        self.assertIn("log_config.url", setup.stderr)

    def test_unreachable_engine_is_one_line(self):
        addr = "http://127.0.0.1:%d" % closed_port()
        health = run_cli("client", "--addr", addr, "health")
        self.assertEqual(health.returncode, 1)
        self.assertEqual(len(health.stderr.splitlines()), 1, health.stderr)
        self.assertIn("cannot reach the engine", health.stderr)


class ProcessTest(unittest.TestCase):
    """Starting, refusing to start, stopping, and the version."""

    def test_refuses_to_start_without_certificates_or_server_insecure(self):
        # Secure mode itself is tested in test_tls_e2e.
        env = dict(os.environ, HTTPS_BIND="127.0.0.1:0")
        for name in (
            "SERVER_INSECURE",
            "SERVER_CERT_FILE",
            "SERVER_KEY_FILE",
            "CLIENT_CERT_FILE",
        ):
            env.pop(name, None)
        with tempfile.TemporaryDirectory() as workdir:
            env["HARNESS_WORKDIR"] = workdir
            result = run_cli("server", env=env)
        self.assertEqual(result.returncode, 2)
        for name in (
            "SERVER_CERT_FILE",
            "SERVER_KEY_FILE",
            "CLIENT_CERT_FILE",
            "SERVER_INSECURE=true",
        ):
            self.assertIn(name, result.stderr)

    def test_sigterm_stops_cleanly(self):
        engine = EngineProcess()
        self.addCleanup(engine.cleanup)
        engine.start()
        body = {"le_log_key": "stage-3/le"}
        self.assertEqual(request(engine.url, "POST", "/setup", body)[0], 200)
        started = time.monotonic()
        self.assertEqual(engine.stop(), 0)
        self.assertLess(time.monotonic() - started, 5)
        stderr = "".join(engine.stderr_lines())
        self.assertIn('msg="destroy done"', stderr)
        self.assertIn('msg="server stopped"', stderr)

    def test_env_file_is_read_and_environment_wins(self):
        with tempfile.NamedTemporaryFile("w", suffix=".env", delete=False) as file:
            file.write("# engine settings\nSERVER_INSECURE='true'\n")
            file.write('HTTPS_BIND="not a bind address"\n\nexport DEBUG=true\n')
        self.addCleanup(os.unlink, file.name)
        engine = EngineProcess({"SERVER_INSECURE": None}, ["--env-file", file.name])
        self.addCleanup(engine.cleanup)
        engine.start()
        self.assertEqual(request(engine.url, "GET", "/healthz")[0], 200)
        self.assertEqual(engine.stop(), 0)

    def test_version(self):
        result = run_cli("--version")
        self.assertEqual(result.returncode, 0, result.stderr)
        # A build from a tree with uncommitted changes says "<commit>-dirty".
        commit = r"([0-9a-f]{7,40}(-dirty)?|unknown)"
        self.assertRegex(result.stdout, r"^liteengine 0\.1\.0 \(%s\)\n$" % commit)


if __name__ == "__main__":
    unittest.main()
