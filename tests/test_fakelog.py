"""Checks of the fake log service itself, spoken to with plain http.client."""

import http.client
import json
import shutil
import ssl
import tempfile
import threading
import time
import unittest
import urllib.parse

from tests.fakelog import FakeLogService, self_signed_certificate


def make_line(pos, out="hello\n", level="info", stamp="2026-12-04T10:30:00.123456Z"):
    """A valid Line with the given fields."""
    return {"level": level, "pos": pos, "out": out, "time": stamp, "args": None}


def ndjson(lines):
    """Encode Lines the way an upload carries them."""
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


class FakeLogServiceTest(unittest.TestCase):
    """The fake enforces the protocol, records what arrived and injects faults."""

    def setUp(self):
        self.service = FakeLogService().start()
        self.addCleanup(self.service.stop)
        self.port = urllib.parse.urlsplit(self.service.url).port
        self.conn = self.connect()

    def connect(self, timeout=2.0):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        self.addCleanup(conn.close)
        return conn

    def call(self, method, path, body=None, key="k", conn=None, **overrides):
        """Send one request; overrides set query values or token (None: omit)."""
        token = overrides.pop("token", "tok")
        query = {"accountID": "acct", "key": key, **overrides}
        query = {name: value for name, value in query.items() if value is not None}
        quote = urllib.parse.quote
        target = path + "?" + urllib.parse.urlencode(query, quote_via=quote)
        headers = {} if token is None else {"X-Harness-Token": token}
        if isinstance(body, list):
            body = json.dumps(body).encode()
        conn = conn or self.conn
        conn.request(method, target, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()

    def put_link(self, link, body):
        parts = urllib.parse.urlsplit(link)
        self.conn.request("PUT", parts.path, body=body)
        response = self.conn.getresponse()
        return response.status, response.read()

    def test_stream_round_trip_on_one_connection(self):
        self.assertEqual(self.call("POST", "/stream")[0], 204)
        self.assertEqual(self.call("POST", "/stream")[0], 204)
        sock = self.conn.sock
        batch = [make_line(0), make_line(1)]
        self.assertEqual(self.call("PUT", "/stream", batch), (204, b""))
        self.assertEqual(self.call("PUT", "/stream", [make_line(2)])[0], 204)
        self.assertEqual(self.call("DELETE", "/stream", snapshot="true")[0], 204)

        self.assertIs(self.conn.sock, sock)
        self.assertEqual(self.service.opened("k"), 2)
        self.assertFalse(self.service.is_open("k"))
        self.assertEqual(self.service.lines("k"), [make_line(n) for n in range(3)])
        self.assertEqual(self.service.closes("k"), [{"snapshot": True}])
        self.assertEqual([r["status"] for r in self.service.requests()], [204] * 5)
        first = self.service.requests()[0]
        self.assertEqual(first["query"], {"accountID": "acct", "key": "k"})
        self.assertTrue(first["has_token"])
        self.assertEqual(self.service.violations(), [])

    def test_upload_through_the_service(self):
        lines = [make_line(n) for n in range(5, 8)]
        self.assertEqual(self.call("POST", "/blob", ndjson(lines))[0], 204)
        self.assertEqual(self.call("POST", "/blob", b"")[0], 204)
        self.assertEqual(self.service.uploads("k"), [lines, []])
        self.assertEqual(self.service.violations(), [])

    def test_upload_by_signed_link(self):
        status, body = self.call("POST", "/blob/link/upload")
        self.assertEqual(status, 200)
        answer = json.loads(body)
        self.assertTrue(answer["link"].startswith(self.service.url + "/_signed/"))
        self.assertGreater(answer["expires"], time.time_ns())

        lines = [make_line(0), make_line(1)]
        self.assertEqual(self.put_link(answer["link"], ndjson(lines))[0], 200)
        self.assertEqual(self.put_link(answer["link"], ndjson(lines))[0], 403)
        self.assertEqual(self.service.uploads("k"), [lines])
        self.assertFalse(self.service.requests()[1]["has_token"])
        self.assertEqual(self.service.violations(), [])

    def test_credentials_are_checked(self):
        self.assertEqual(self.call("POST", "/stream", token="nope")[0], 400)
        status, body = self.call("POST", "/stream", accountID="other")
        self.assertEqual(status, 400)
        self.assertIn("error_msg", json.loads(body))
        self.assertEqual(self.service.violations(), [])

        self.assertEqual(self.call("POST", "/stream", key=None)[0], 400)
        self.assertEqual(self.call("POST", "/stream", token=None)[0], 400)
        self.assertEqual(self.call("POST", "/stream", accountID=None)[0], 400)
        self.assertEqual(len(self.service.violations()), 3)
        self.assertEqual(self.service.opened("k"), 0)

    def test_unopened_stream_answers_500(self):
        self.assertEqual(self.call("PUT", "/stream", [make_line(0)])[0], 500)
        self.assertEqual(self.call("DELETE", "/stream")[0], 500)
        self.call("POST", "/stream")
        self.call("DELETE", "/stream")
        self.assertEqual(self.call("DELETE", "/stream")[0], 500)
        self.assertEqual(self.service.closes("k"), [{"snapshot": False}])
        self.assertEqual(self.service.lines("k"), [])
        self.assertEqual(self.service.violations(), [])

    def test_bad_bodies_are_violations(self):
        self.call("POST", "/stream")
        extra = dict(make_line(0), extra=1)
        bad_batches = {
            "gap": [make_line(0), make_line(2)],
            "repeat": [make_line(3), make_line(3)],
            "bool pos": [make_line(True)],
            "negative pos": [make_line(-1)],
            "extra field": [extra],
            "level": [make_line(0, level="warn")],
            "out": [make_line(0, out=None)],
            "naive time": [make_line(0, stamp="2026-12-04T10:30:00")],
            "bad date": [make_line(0, stamp="2026-02-30T10:30:00Z")],
            "space": [make_line(0, stamp="2026-12-04 10:30:00Z")],
            "digits": [make_line(0, stamp="2026-12-04T10:30:00.\u0661Z")],
            "not an array": make_line(0),
        }
        for name, batch in bad_batches.items():
            with self.subTest(name):
                before = len(self.service.violations())
                self.assertEqual(self.call("PUT", "/stream", json.dumps(batch))[0], 400)
                self.assertEqual(len(self.service.violations()), before + 1)
        bad_uploads = {
            "no final newline": ndjson([make_line(0)])[:-1],
            "blank row": b"\n",
            "gap": ndjson([make_line(0), make_line(2)]),
            "not JSON": b"{nope}\n",
            "NaN": b'{"level": "info", "pos": NaN}\n',
        }
        for name, body in bad_uploads.items():
            with self.subTest(name):
                before = len(self.service.violations())
                self.assertEqual(self.call("POST", "/blob", body)[0], 400)
                self.assertEqual(len(self.service.violations()), before + 1)
        self.assertEqual(self.service.lines("k"), [])
        self.assertEqual(self.service.uploads("k"), [])

    def test_time_formats_accepted(self):
        self.call("POST", "/stream")
        stamps = ["2026-12-04T10:30:00Z", "2026-12-04T10:30:00.123456789+00:00"]
        stamps.append("2026-12-04T10:30:00.5-07:30")
        batch = [make_line(n, stamp=stamp) for n, stamp in enumerate(stamps)]
        self.assertEqual(self.call("PUT", "/stream", batch)[0], 204)
        self.assertEqual(self.service.violations(), [])

    def test_unusual_keys_round_trip(self):
        key = "stage 1/step+x/\u00fcn\u00ef&=?"
        self.assertEqual(self.call("POST", "/stream", key=key)[0], 204)
        self.assertEqual(self.call("PUT", "/stream", [make_line(0)], key=key)[0], 204)
        self.assertEqual(self.service.lines(key), [make_line(0)])
        self.assertEqual(self.service.violations(), [])

    def test_unknown_paths_and_queries_are_violations(self):
        self.assertEqual(self.call("GET", "/stream")[0], 404)
        self.assertEqual(self.call("POST", "//stream")[0], 404)
        self.assertEqual(self.call("POST", "/stream", snapshot="true")[0], 400)
        self.assertEqual(self.call("POST", "/stream", extra="1")[0], 400)
        self.call("POST", "/stream")
        self.assertEqual(self.call("DELETE", "/stream", snapshot="yes")[0], 400)
        self.assertEqual(len(self.service.violations()), 5)
        self.assertTrue(self.service.is_open("k"))

    def test_chunked_body(self):
        self.call("POST", "/stream")
        body = json.dumps([make_line(0), make_line(1)]).encode()
        chunks = iter([body[:10], body[10:]])
        target = "/stream?accountID=acct&key=k"
        headers = {"X-Harness-Token": "tok"}
        self.conn.request("PUT", target, body=chunks, headers=headers)
        response = self.conn.getresponse()
        self.assertEqual((response.status, response.read()), (204, b""))
        self.assertEqual(self.service.lines("k"), [make_line(0), make_line(1)])
        self.assertEqual(self.call("DELETE", "/stream")[0], 204)

    def test_status_fault_is_used_up_in_order(self):
        self.call("POST", "/stream")
        self.service.inject("write", "status", count=2, status=503)
        self.service.inject("write", "status", status=400)
        statuses = [self.call("PUT", "/stream", [make_line(n)])[0] for n in range(4)]
        self.assertEqual(statuses, [503, 503, 400, 204])
        self.assertEqual(self.service.lines("k"), [make_line(3)])

        self.service.inject("open", "status", count=None, status=502)
        self.assertEqual(self.call("POST", "/stream")[0], 502)
        self.assertEqual(self.call("POST", "/stream")[0], 502)
        self.service.clear_faults()
        self.assertEqual(self.call("POST", "/stream")[0], 204)
        self.assertEqual(self.service.violations(), [])

    def test_reset_fault_drops_the_connection(self):
        self.service.inject("open", "reset")
        with self.assertRaises((http.client.HTTPException, ConnectionError)):
            self.call("POST", "/stream")
        self.assertIsNone(self.service.requests()[0]["status"])
        self.assertEqual(self.service.opened("k"), 0)
        self.assertEqual(self.call("POST", "/stream", conn=self.connect())[0], 204)

    def test_hang_until_released(self):
        self.service.inject("link", "hang")
        errors = []
        client = threading.Thread(target=self._expect_drop, args=(errors,))
        client.start()
        self.assertTrue(self.service.wait_for(lambda s: len(s.requests()) == 1))

        self.assertEqual(self.call("POST", "/stream")[0], 204)
        self.service.release_hangs()
        client.join(2.0)
        self.assertFalse(client.is_alive())
        self.assertEqual(len(errors), 1)
        self.assertEqual(self.call("POST", "/blob/link/upload")[0], 200)

    def test_stop_releases_hangs_and_idle_connections(self):
        self.service.inject("close", "hang", count=None)
        self.assertEqual(self.call("POST", "/stream")[0], 204)
        errors = []
        client = threading.Thread(target=self._expect_drop, args=(errors, "DELETE"))
        client.start()
        self.assertTrue(self.service.wait_for(lambda s: len(s.requests()) == 2))

        started = time.monotonic()
        self.service.stop()
        self.service.stop()
        self.assertLess(time.monotonic() - started, 1.0)
        client.join(2.0)
        self.assertEqual(len(errors), 1)
        with self.assertRaises((http.client.HTTPException, OSError)):
            self.call("POST", "/stream")

    def _expect_drop(self, errors, method="POST"):
        path = "/stream" if method == "DELETE" else "/blob/link/upload"
        try:
            self.call(method, path, conn=self.connect(timeout=3.0))
        except (http.client.HTTPException, OSError) as exc:
            errors.append(exc)

    def test_wait_for_times_out(self):
        started = time.monotonic()
        self.assertFalse(self.service.wait_for(lambda s: False, timeout=0.05))
        self.assertLess(time.monotonic() - started, 0.5)

    def test_inject_rejects_unknown_names(self):
        with self.assertRaises(ValueError):
            self.service.inject("flush", "status", status=500)
        with self.assertRaises(ValueError):
            self.service.inject("open", "status")


@unittest.skipUnless(shutil.which("openssl"), "needs the openssl command")
class FakeLogServiceTlsTest(unittest.TestCase):
    """With an ssl_context the fake serves HTTPS on the same loopback port."""

    def test_https(self):
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        cert, key = self_signed_certificate(folder)
        server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_context.load_cert_chain(cert, key)
        service = FakeLogService(ssl_context=server_context).start()
        self.addCleanup(service.stop)
        self.assertTrue(service.url.startswith("https://127.0.0.1:"))

        client_context = ssl.create_default_context(cafile=cert)
        port = urllib.parse.urlsplit(service.url).port
        conn = http.client.HTTPSConnection(
            "127.0.0.1", port, context=client_context, timeout=2.0
        )
        self.addCleanup(conn.close)
        headers = {"X-Harness-Token": "tok"}
        conn.request("POST", "/stream?accountID=acct&key=k", headers=headers)
        self.assertEqual(conn.getresponse().status, 204)
        self.assertEqual(service.opened("k"), 1)


if __name__ == "__main__":
    unittest.main()
