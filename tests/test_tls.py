"""The log-service client over real TLS on loopback, in this process.

The client runs in this process against the fake log service and a tiny
proxy, both on 127.0.0.1, with certificates from the engine's ``certs``
command (made by ``tests/test_tls_e2e.py``, which also tests the engine's
own secure server; a missing ``openssl`` skips these tests). Nothing here
leaves the loopback interface: the proxy tests map every ``*.test`` name to
127.0.0.1 and refuse any other name.
"""

import base64
import logging
import os
import socket
import socketserver
import ssl
import tempfile
import threading
import time
import unittest
import urllib.parse
from unittest import mock

import hooks
import logstream
from tests.fakelog import FakeLogService
from tests.test_tls_e2e import KEY, b64, cert, needs_openssl

FAST = logstream.Deadlines(open=2.0, write=2.0, upload=2.0, close=2.0)
PROXY_PASSWORD = "pr0xy-secret-9d2c"


# ------------------------------------------------------------ log service


def fake_service_context(require_client_cert=False):
    """The fake log service's TLS context, with the ``certs`` server certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert("server.pem"), cert("server-key.pem"))
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cert("ca.pem"))
    return context


class _Records(logging.Handler):
    """Keeps every record of the ``logstream`` logger, formatted."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.setFormatter(hooks.LogrusFormatter())
        self.lines = []

    def emit(self, record):
        self.lines.append(self.format(record))


class LogServiceCase(unittest.TestCase):
    """Runs writers in this process against a fake log service over TLS."""

    require_client_cert = False

    def setUp(self):
        self.service = FakeLogService(
            ssl_context=fake_service_context(self.require_client_cert)
        ).start()
        self.addCleanup(self.service.stop)
        self.records = _Records()
        logger = logging.getLogger("logstream")
        logger.addHandler(self.records)
        old_level = logger.level
        logger.setLevel(logging.DEBUG)
        self.addCleanup(logger.setLevel, old_level)
        self.addCleanup(logger.removeHandler, self.records)

    def write_lines(self, url, transport, **options):
        """Open, write three lines, close; returns the writer's figures."""
        config = logstream.LogConfig.from_json(
            dict({"url": url, "account_id": "acct", "token": "tok"}, **options)
        )
        client = logstream.new_client(config, "/nonexistent", FAST, transport)
        writer = logstream.LiveWriter(client, KEY, config, interval=0.05)
        writer.open()
        for number in range(3):
            writer.append("line %d\n" % number)
        return writer.close()

    def assertDelivered(self, figures):
        """The lines arrived and were uploaded, by the protocol's rules."""
        self.assertEqual(figures["uploads"], 1, self.records.lines)
        uploaded = [line["out"] for line in self.service.uploads(KEY)[-1]]
        self.assertEqual(uploaded, ["line 0\n", "line 1\n", "line 2\n"])
        self.assertEqual(self.service.violations(), [])


@needs_openssl
class LogServiceTlsTest(LogServiceCase):
    """The log-service client verifies the service, and says so when it cannot."""

    def test_service_verified_with_the_test_ca(self):
        transport = logstream.Transport(ca_file=cert("ca.pem"))
        self.assertDelivered(self.write_lines(self.service.url, transport))

    def test_service_that_cannot_be_verified_is_refused_at_once(self):
        started = time.monotonic()
        figures = self.write_lines(self.service.url, logstream.Transport())
        self.assertLess(time.monotonic() - started, 1.5, "a bad certificate is retried")
        self.assertEqual(figures["uploads"], 0)
        self.assertEqual(self.service.requests(), [])
        self.assertIn("CERTIFICATE_VERIFY_FAILED", "\n".join(self.records.lines))

    def test_wrong_ca_file_is_refused(self):
        transport = logstream.Transport(ca_file=cert("ca.pem", "other"))
        self.assertEqual(self.write_lines(self.service.url, transport)["uploads"], 0)
        self.assertEqual(self.service.requests(), [])

    def test_skip_verify_warns_every_time_a_client_is_made(self):
        transport = logstream.Transport.from_env({"LE_LOG_SKIP_VERIFY": "true"})
        self.assertDelivered(self.write_lines(self.service.url, transport))
        self.write_lines(self.service.url, transport)
        warnings = [line for line in self.records.lines if "not verified" in line]
        self.assertEqual(len(warnings), 2, self.records.lines)
        self.assertIn("LE_LOG_SKIP_VERIFY", warnings[0])


@needs_openssl
class LogServiceClientCertTest(LogServiceCase):
    """``mtls_config`` presents a client certificate to a service asking for one."""

    require_client_cert = True

    def test_client_certificate_is_presented(self):
        made = []
        real_mkstemp = tempfile.mkstemp

        def mkstemp(*args, **kwargs):
            made.append(real_mkstemp(*args, **kwargs))
            return made[-1]

        mtls = {
            "client_cert": b64(cert("client.pem")),
            "client_cert_key": b64(cert("client-key.pem")),
        }
        transport = logstream.Transport(ca_file=cert("ca.pem"))
        with mock.patch.object(logstream.tempfile, "mkstemp", mkstemp):
            figures = self.write_lines(self.service.url, transport, mtls_config=mtls)
        self.assertDelivered(figures)
        self.assertTrue(made)
        self.assertFalse([path for _, path in made if os.path.exists(path)])
        with open(cert("client-key.pem")) as file:
            key_text = file.read().splitlines()[1]
        self.assertNotIn(key_text, "\n".join(self.records.lines))

    def test_without_client_certificate_the_service_refuses(self):
        transport = logstream.Transport(ca_file=cert("ca.pem"))
        self.assertEqual(self.write_lines(self.service.url, transport)["uploads"], 0)
        self.assertEqual(self.service.requests(), [])


# ------------------------------------------------------------------ proxy


def loopback(host):
    """127.0.0.1 for the test names (``*.test``, localhost); refuse the rest."""
    if host in ("127.0.0.1", "localhost") or host.endswith(".test"):
        return "127.0.0.1"
    raise ConnectionRefusedError("the tests only reach loopback, not %s" % host)


_create_connection = socket.create_connection


def _loopback_connection(address, *args, **kwargs):
    return _create_connection((loopback(address[0]), address[1]), *args, **kwargs)


class TunnelProxy:
    """A tiny HTTP proxy on 127.0.0.1 that writes down what it is asked.

    CONNECT requests are tunnelled to loopback; any other request is
    answered 204 by the proxy itself. ``heads`` holds each request line
    with its headers (names in lower case).
    """

    def __init__(self):
        self.heads = []
        self._lock = threading.Lock()
        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _ProxyHandler)
        server.daemon_threads = True
        server.proxy = self
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()

    def note(self, line, headers):
        """Remember one request head."""
        with self._lock:
            self.heads.append((line, headers))

    def seen(self):
        """The request heads so far."""
        with self._lock:
            return list(self.heads)

    def stop(self):
        """Close the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class _ProxyHandler(socketserver.StreamRequestHandler):
    def handle(self):
        line = self.rfile.readline(65536).decode("latin-1").rstrip("\r\n")
        headers = {}
        while True:
            raw = self.rfile.readline(65536)
            if raw in (b"", b"\r\n", b"\n"):
                break
            name, _, value = raw.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        self.server.proxy.note(line, headers)
        method, target = line.split(" ")[:2]
        if method != "CONNECT":
            self.rfile.read(int(headers.get("content-length", 0)))
            self.wfile.write(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
            return
        host, _, port = target.rpartition(":")
        try:
            upstream = _create_connection((loopback(host), int(port)), timeout=5)
        except OSError:
            self.wfile.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        with upstream:
            self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            back = threading.Thread(
                target=_pump, args=(upstream.recv, self.connection), daemon=True
            )
            back.start()
            _pump(self.rfile.read1, upstream)
            back.join(5)


def _pump(read, destination):
    try:
        while True:
            data = read(65536)
            if not data:
                break
            destination.sendall(data)
    except OSError:
        pass
    try:
        destination.shutdown(socket.SHUT_WR)
    except OSError:
        pass


@needs_openssl
class ProxyTest(LogServiceCase):
    """HTTPS_PROXY, HTTP_PROXY and NO_PROXY for log-service calls."""

    def setUp(self):
        super().setUp()
        self.proxy = TunnelProxy()
        self.addCleanup(self.proxy.stop)
        patcher = mock.patch("socket.create_connection", _loopback_connection)
        patcher.start()
        self.addCleanup(patcher.stop)
        self.proxy_url = "http://user:%s@127.0.0.1:%d" % (
            urllib.parse.quote(PROXY_PASSWORD),
            self.proxy.port,
        )
        self.port = urllib.parse.urlsplit(self.service.url).port
        self.named_url = "https://logs.test:%d" % self.port

    def transport(self, **envs):
        """The engine's transport with the setup ``envs`` laid over."""
        # The engine's own proxy (nobody listens there) loses to the setup's.
        engine_env = {
            "LE_LOG_CA_FILE": cert("ca.pem"),
            "HTTPS_PROXY": "http://127.0.0.1:9",
        }
        return logstream.Transport.from_env(engine_env).with_envs(envs)

    def assertNoPassword(self):
        """The proxy password is in no line ``logstream`` logged."""
        self.assertNotIn(PROXY_PASSWORD, "\n".join(self.records.lines))

    def test_https_goes_through_a_connect_tunnel(self):
        transport = self.transport(HTTPS_PROXY=self.proxy_url)
        self.assertDelivered(self.write_lines(self.named_url, transport))
        heads = self.proxy.seen()
        self.assertTrue(heads)
        for line, headers in heads:
            self.assertRegex(line, r"^CONNECT logs\.test:%d HTTP/1\.[01]$" % self.port)
            pair = base64.b64decode(headers["proxy-authorization"].split()[1])
            self.assertEqual(pair.decode(), "user:" + PROXY_PASSWORD)
        self.assertNoPassword()

    def test_plain_http_goes_as_an_absolute_url(self):
        transport = self.transport(http_proxy=self.proxy_url)
        config = logstream.LogConfig(
            url="http://logs.test:8080", account_id="a", token="t"
        )
        client = logstream.new_client(config, "/nonexistent", FAST, transport)
        client.open(KEY)
        [(line, headers)] = self.proxy.seen()
        self.assertTrue(
            line.startswith("POST http://logs.test:8080/stream?accountID=a&key="), line
        )
        self.assertIn("proxy-authorization", headers)
        self.assertEqual(headers["x-harness-token"], "t")
        self.assertNoPassword()

    def test_no_proxy_goes_direct(self):
        for no_proxy in ("logs.test", ".test", "*", "logs.test:%d" % self.port):
            with self.subTest(no_proxy=no_proxy):
                transport = self.transport(
                    HTTPS_PROXY=self.proxy_url, no_proxy=no_proxy
                )
                self.assertDelivered(self.write_lines(self.named_url, transport))
        self.assertEqual(self.proxy.seen(), [])

    def test_loopback_targets_go_direct(self):
        transport = self.transport(HTTPS_PROXY=self.proxy_url)
        self.assertDelivered(self.write_lines(self.service.url, transport))
        self.assertEqual(self.proxy.seen(), [])

    def test_unsupported_proxy_fails_naming_the_variable_only(self):
        socks = "socks5://user:%s@127.0.0.1:1" % PROXY_PASSWORD
        transport = self.transport(HTTPS_PROXY=socks)
        self.assertEqual(self.write_lines(self.named_url, transport)["uploads"], 0)
        text = "\n".join(self.records.lines)
        self.assertIn("HTTPS_PROXY names a socks5 proxy", text)
        self.assertNoPassword()


class ProxyChoiceTest(unittest.TestCase):
    """Which proxy a target gets, the way the runner's Go engines choose."""

    def test_choices(self):
        envs = {
            "HTTPS_PROXY": "http://upper:3128",
            "https_proxy": "http://lower:3128",
            "http_proxy": "proxy.example:8080",
            "NO_PROXY": "example.com, .internal,10.0.0.0/8,1.2.3.4,[::2]:443,svc:8443",
        }
        transport = logstream.Transport().with_envs(envs)
        cases = {
            ("https", "logs.example.org", 443): ("upper", 3128),
            ("http", "logs.example.org", 80): ("proxy.example", 8080),
            ("https", "example.com", 443): None,
            ("https", "a.example.com", 443): None,
            ("https", "notexample.com", 443): ("upper", 3128),
            ("https", "internal", 443): ("upper", 3128),
            ("https", "x.internal", 443): None,
            ("https", "10.9.8.7", 443): None,
            ("https", "1.2.3.4", 443): None,
            ("https", "::2", 443): None,
            ("https", "::2", 8443): ("upper", 3128),
            ("https", "svc", 8443): None,
            ("https", "svc", 443): ("upper", 3128),
            ("https", "localhost", 443): None,
            ("https", "127.0.0.5", 443): None,
            ("https", "::1", 443): None,
        }
        for (scheme, host, port), expected in cases.items():
            with self.subTest(host=host, port=port):
                proxy = transport.proxy_for(scheme, host, port)
                got = None if proxy is None else (proxy.host, proxy.port)
                self.assertEqual(got, expected)

    def test_setup_envs_win_and_nothing_secret_in_repr(self):
        engine = logstream.Transport.from_env({"HTTPS_PROXY": "http://a:s3cret@one:1"})
        stage = engine.with_envs({"HTTPS_PROXY": "http://two:2", "PATH": "/bin"})
        self.assertEqual(stage.proxy_for("https", "x.org", 443).host, "two")
        self.assertEqual(engine.proxy_for("https", "x.org", 443).host, "one")
        proxy = engine.proxy_for("https", "x.org", 443)
        self.assertNotIn("s3cret", repr(engine) + repr(proxy))

    def test_proxy_passwords_are_offered_for_masking(self):
        transport = logstream.Transport().with_envs(
            {"https_proxy": "u:p%40ss@proxy:1", "HTTP_PROXY": "http://proxy:2"}
        )
        self.assertEqual(transport.secrets(), ("p%40ss", "p@ss"))


if __name__ == "__main__":
    unittest.main()
