"""Faults and bad input at the engine process: it never hangs, never loses
a kept line, never falls.

Each test class is one failure the engine must survive, with the real
server process (``tests.engine_proc``) against the fake log service and
deadlines cut short through the environment. Nothing here imports the
engine's modules, so CI runs this module against the zipapp too; the
in-process fault tests are in ``tests/test_faults.py``.

The figures the README quotes (lines lost, time to destroy) are printed
with a ``[faults]`` prefix.
"""

import http.client
import json
import os
import re
import socket
import tempfile
import threading
import time
import unittest
import urllib.parse

from tests import badinput_corpus
from tests.engine_proc import EngineProcess, SharedEngineCase, short_deadlines
from tests.fakelog import FakeLogService, SilentListener
from tests.faults_common import KEY, MARGIN, figure, log_config, outs

# Short deadlines for the engine process, the same for every kind of call.
DEADLINE = 1.0
SHORT = dict(short_deadlines(DEADLINE), LE_FLUSH_INTERVAL="0.2")


def call(url, method, path, body=None, timeout=30.0):
    """One request to the engine; returns ``(status, answer, seconds)``.

    ``answer`` is the decoded JSON body, or the raw bytes when it is not JSON.
    """
    parts = urllib.parse.urlsplit(url)
    data = json.dumps(body).encode("utf-8") if body is not None else None
    started = time.monotonic()
    connection = http.client.HTTPConnection(parts.netloc, timeout=timeout)
    try:
        connection.request(method, path, body=data)
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    elapsed = time.monotonic() - started
    try:
        answer = json.loads(raw.decode("utf-8"))
    except ValueError:
        answer = raw
    return response.status, answer, elapsed


_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def fields_of(line):
    """The ``key=value`` fields of one logrus-style line, as strings."""
    found = {}
    for name, value in _FIELD.findall(line):
        found[name] = json.loads(value) if value.startswith('"') else value
    return found


def by_pos(lines):
    """Live lines with repeats removed: the first line seen for each ``pos``."""
    seen = {}
    order = []
    for line in lines:
        if line["pos"] not in seen:
            seen[line["pos"]] = line
            order.append(line["pos"])
    return order, seen


def files_under(top):
    """Every file below ``top``, as absolute paths."""
    return [
        os.path.join(folder, name)
        for folder, _, names in os.walk(top)
        for name in names
    ]


# ------------------------------------------------------------------ item 1


class UnreachableServiceTest(unittest.TestCase):
    """The log service cannot be reached at all when the stage is set up."""

    def check_unreachable(self, url, label):
        engine = EngineProcess(SHORT).start()
        self.addCleanup(engine.cleanup)
        body = {"le_log_key": KEY, "log_config": {"url": url, "account_id": "a"}}
        body["log_config"]["token"] = "t"

        answers = {}
        setup = threading.Thread(
            target=lambda: answers.update(
                setup=call(engine.url, "POST", "/setup", body)
            )
        )
        setup.start()
        time.sleep(0.2)
        health = call(engine.url, "GET", "/healthz", timeout=5)
        setup.join(30)
        status, answer, setup_time = answers["setup"]
        self.assertEqual((status, answer), (200, {}))
        self.assertLess(setup_time, DEADLINE + MARGIN)
        self.assertEqual(health[0], 200)
        self.assertLess(health[2], 0.5, "healthz waited for the stuck setup")

        for _ in range(3):
            # Each logs "setup done" on the stream without touching the writer.
            self.assertEqual(call(engine.url, "POST", "/setup", {})[0], 200)
        status, answer, destroy_time = call(engine.url, "POST", "/destroy", {})
        self.assertEqual((status, answer), (200, {}))
        # A flush in flight (open) may hold the writer when destroy comes;
        # then close runs flush (open again), upload and stream close.
        bound = 2 * DEADLINE + DEADLINE + DEADLINE + MARGIN
        self.assertLess(destroy_time, bound)

        done = engine.wait_for_stderr('msg="destroy done"')
        self.assertIsNotNone(done)
        counters = fields_of(done)
        self.assertGreaterEqual(int(counters["lines"]), 5, done)
        self.assertEqual(counters["dropped"], "0", done)
        self.assertEqual(counters["uploads"], "0", done)
        self.assertEqual(counters["failed_uploads"], "1", done)
        self.assertIsNotNone(engine.wait_for_stderr('msg="log stream not opened"'))
        self.assertIsNotNone(engine.wait_for_stderr('msg="log upload failed"'))
        figure(
            "item 1 (%s, every deadline %.0fs): setup %.2fs, destroy %.2fs (bound "
            "%.1fs); lines kept %s, dropped %s, uploaded %s (the upload failed)",
            label,
            DEADLINE,
            setup_time,
            destroy_time,
            bound,
            counters["lines"],
            counters["dropped"],
            counters["uploads"],
        )

    def test_connection_refused(self):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.check_unreachable("http://127.0.0.1:%d" % port, "connection refused")

    def test_port_accepts_but_never_answers(self):
        with SilentListener() as silent:
            self.check_unreachable(silent.url, "accepts, never answers")


# ------------------------------------------------------------------ item 2


STEP_LINES = 400
BURSTY_STEP = (
    'i=0; while [ $i -lt %d ]; do echo "line $i"; i=$((i+1)); '
    "if [ $((i %% 40)) -eq 0 ]; then sleep 0.15; fi; done" % STEP_LINES
)


class ServerErrorsThenRecoveryTest(unittest.TestCase):
    """5xx answers and resets on some writes, then the service recovers."""

    def test_every_line_live_at_least_once_and_uploaded_once(self):
        service = FakeLogService().start()
        self.addCleanup(service.stop)
        env = dict(SHORT, LE_WRITE_TIMEOUT="0.5", LE_FLUSH_INTERVAL="0.1")
        engine = EngineProcess(env).start()
        self.addCleanup(engine.cleanup)

        body = {"le_log_key": KEY, "log_config": log_config(service)}
        self.assertEqual(call(engine.url, "POST", "/setup", body)[:2], (200, {}))
        # Three failures in a row outlast a 0.5 s write deadline (tries at 0,
        # 0.1 and 0.3 s), so some flushes fail for good and a later flush
        # must send their lines again; single failures are retried inside
        # the same write.
        for fault, status in (
            ("status", 500),
            ("status", 502),
            ("status", 503),
            ("reset", None),
            ("status", 503),
            ("status", 503),
            ("status", 503),
            ("status", 502),
            ("reset", None),
            ("status", 500),
            ("reset", None),
        ):
            service.inject("write", fault, status=status)
        service.inject("upload", "status", status=503)
        service.inject("close", "reset")

        step_key = "stage/bursty"
        step = {"id": "bursty", "log_key": step_key, "run": {"commands": [BURSTY_STEP]}}
        self.assertEqual(call(engine.url, "POST", "/start_step", step)[:2], (200, {}))
        status, answer, _ = call(engine.url, "POST", "/poll_step", {"id": "bursty"})
        self.assertEqual((status, answer["exit_code"]), (200, 0), answer)
        self.assertEqual(call(engine.url, "POST", "/destroy", {})[:2], (200, {}))

        expected = ["line %d\n" % number for number in range(STEP_LINES)]
        lost = {}
        for key in (step_key, KEY):
            with self.subTest(key=key):
                [upload] = service.uploads(key)
                self.assertEqual(
                    [line["pos"] for line in upload], list(range(len(upload)))
                )
                order, first = by_pos(service.lines(key))
                self.assertEqual(
                    order, list(range(len(upload))), "live pos not in order"
                )
                for line in service.lines(key):
                    self.assertEqual(line, first[line["pos"]], "one pos, two lines")
                self.assertEqual([first[pos]["out"] for pos in order], outs(upload))
                lost[key] = len(upload) - len(order)
        self.assertEqual(outs(service.uploads(step_key)[0]), expected)
        self.assertEqual(service.violations(), [])
        stderr = "".join(engine.stderr_lines())
        self.assertIn('msg="log stream flush failed"', stderr)
        self.assertIn('msg="log stream recovered"', stderr)
        failed = stderr.count('msg="log stream flush failed"')
        figure(
            "item 2: %d flushes failed for good and were sent again; lines lost: "
            "step %d of %d, engine %d",
            failed,
            lost[step_key],
            STEP_LINES,
            lost[KEY],
        )


# ------------------------------------------------------------------ item 4


class RefusedTest(unittest.TestCase):
    """4xx answers are final: nothing is retried, the history is kept."""

    def requests_for(self, service, key):
        """``(method, path, status)`` of each request the service got for ``key``."""
        return [
            (entry["method"], entry["path"], entry["status"])
            for entry in service.requests()
            if entry["query"].get("key") == key
        ]

    def check_wrong_credentials(self, account, token, label):
        service = FakeLogService(account_id="acct", token="right-token").start()
        self.addCleanup(service.stop)
        engine = EngineProcess(dict(SHORT, LE_FLUSH_INTERVAL="0.1")).start()
        self.addCleanup(engine.cleanup)
        config = {"url": service.url, "account_id": account, "token": token}
        body = {"le_log_key": KEY, "log_config": config}
        self.assertEqual(call(engine.url, "POST", "/setup", body)[:2], (200, {}))
        for _ in range(3):
            call(engine.url, "POST", "/setup", {})
            time.sleep(0.15)
        status, _, destroy_time = call(engine.url, "POST", "/destroy", {})
        self.assertEqual(status, 200)

        calls = self.requests_for(service, KEY)
        self.assertEqual(
            calls,
            [
                ("POST", "/stream", 400),
                ("POST", "/blob/link/upload", 400),
                ("DELETE", "/stream", 400),
            ],
        )
        warning = engine.wait_for_stderr('msg="log stream not opened"')
        self.assertIn("400", warning)
        self.assertNotIn(token, "".join(engine.stderr_lines()))
        counters = fields_of(engine.wait_for_stderr('msg="destroy done"'))
        self.assertGreaterEqual(int(counters["lines"]), 5)
        self.assertEqual(counters["dropped"], "0")
        self.assertEqual(counters["retries"], "0")
        figure(
            "item 4 (%s): one open, one upload, one close, all 400; no retry; "
            "%s lines kept, destroy %.2fs",
            label,
            counters["lines"],
            destroy_time,
        )

    def test_wrong_token(self):
        self.check_wrong_credentials("acct", "wrong-token", "wrong token")

    def test_unknown_account(self):
        self.check_wrong_credentials("nobody", "right-token", "unknown account")

    def test_refused_writes_stop_live_lines_and_upload_once(self):
        service = FakeLogService().start()
        self.addCleanup(service.stop)
        engine = EngineProcess(dict(SHORT, LE_FLUSH_INTERVAL="0.1")).start()
        self.addCleanup(engine.cleanup)
        service.inject("write", "status", count=None, status=400)
        body = {"le_log_key": KEY, "log_config": log_config(service)}
        self.assertEqual(call(engine.url, "POST", "/setup", body)[:2], (200, {}))

        step_key = "stage/refused"
        script = "echo one; sleep 0.4; echo two; sleep 0.4; echo three"
        step = {"id": "refused", "log_key": step_key, "run": {"commands": [script]}}
        self.assertEqual(call(engine.url, "POST", "/start_step", step)[:2], (200, {}))
        status, answer, _ = call(engine.url, "POST", "/poll_step", {"id": "refused"})
        self.assertEqual((status, answer["exit_code"]), (200, 0))
        self.assertEqual(call(engine.url, "POST", "/destroy", {})[:2], (200, {}))

        for key in (step_key, KEY):
            with self.subTest(key=key):
                calls = self.requests_for(service, key)
                writes = [entry for entry in calls if entry[:2] == ("PUT", "/stream")]
                self.assertEqual(writes, [("PUT", "/stream", 400)], calls)
                links = [e for e in calls if e[1] == "/blob/link/upload"]
                self.assertEqual(links, [("POST", "/blob/link/upload", 200)], calls)
                [upload] = service.uploads(key)
                self.assertEqual(
                    [line["pos"] for line in upload], list(range(len(upload)))
                )
                self.assertEqual(service.closes(key), [{"snapshot": False}])
        self.assertEqual(
            outs(service.uploads(step_key)[0]), ["one\n", "two\n", "three\n"]
        )
        warnings = [
            line
            for line in engine.stderr_lines()
            if 'msg="log stream refused lines, live writes stopped until close"' in line
        ]
        self.assertEqual(len(warnings), 2, warnings)
        figure(
            "item 4 (writes refused): one PUT per key answered 400, then none; "
            "one upload per key with every line (step %d, engine %d)",
            len(service.uploads(step_key)[0]),
            len(service.uploads(KEY)[0]),
        )


# ------------------------------------------------------------------ item 6


class RawConnection:
    """A keep-alive connection that sends requests as raw bytes.

    The server may close it after an answer (``Connection: close``); the next
    request then opens a new one. A request whose connection was found dead
    before any answer is sent once more on a fresh connection.
    """

    def __init__(self, url, timeout=30.0):
        parts = urllib.parse.urlsplit(url)
        self._address = (parts.hostname, parts.port)
        self._timeout = timeout
        self._sock = None

    def exchange(self, data, method):
        """Send ``data``; returns ``(status, content_type, body)``."""
        for attempt in (1, 2):
            fresh = self._sock is None
            if fresh:
                self._sock = socket.create_connection(self._address, self._timeout)
            try:
                self._sock.sendall(data)
                response = http.client.HTTPResponse(self._sock, method=method)
                response.begin()
                body = response.read()
            except (ConnectionError, http.client.RemoteDisconnected):
                self.close()
                if fresh or attempt == 2:
                    raise
                continue
            if response.will_close:
                self.close()
            return response.status, response.getheader("Content-Type", ""), body
        raise AssertionError("unreachable")

    def close(self):
        """Close the socket; the next exchange opens a new one."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def refusal_problem(status, content_type, body, method):
    """What is wrong with an answer to a malformed request, or ``None``."""
    if not 400 <= status < 500:
        return "status %d" % status
    if not content_type.startswith("application/json"):
        return "status %d with Content-Type %r" % (status, content_type)
    if method == "HEAD":
        return None
    try:
        answer = json.loads(body.decode("utf-8"))
    except ValueError:
        return "status %d with a body that is not JSON" % status
    if not isinstance(answer, dict) or not isinstance(answer.get("error_msg"), str):
        return "status %d without error_msg" % status
    return None


class BadInputTest(SharedEngineCase):
    """A fixed-seed corpus of malformed requests against every endpoint."""

    def run_corpus(self, cases, fresh_connection=False):
        """Send every case; returns ``(failures, statuses)``."""
        connection = RawConnection(self.engine.url)
        failures = {}
        statuses = {}
        try:
            for case in cases:
                if fresh_connection:
                    connection.close()
                try:
                    status, content_type, body = connection.exchange(
                        case.raw(), case.method
                    )
                except (OSError, http.client.HTTPException) as exc:
                    problem = "no answer: %s" % type(exc).__name__
                else:
                    statuses[status] = statuses.get(status, 0) + 1
                    problem = refusal_problem(status, content_type, body, case.method)
                if problem is not None:
                    group = failures.setdefault((case.category, problem), [])
                    group.append(case.describe())
        finally:
            connection.close()
        return failures, statuses

    def assertStillServing(self):
        status, answer, _ = call(self.engine.url, "GET", "/healthz", timeout=5)
        self.assertEqual(status, 200)
        self.assertTrue(answer["ok"])

    def report(self, failures):
        lines = []
        for (category, problem), cases in sorted(failures.items()):
            lines.append(
                "%d x [%s] %s, e.g. %s" % (len(cases), category, problem, cases[0])
            )
        return "\n".join(lines)

    def test_api_corpus_is_refused_with_json_4xx(self):
        cases = badinput_corpus.api_corpus()
        self.assertGreaterEqual(len(cases), 1000)
        mark = len(self.engine.stderr_lines())
        started = time.monotonic()
        failures, statuses = self.run_corpus(cases)
        took = time.monotonic() - started
        self.assertStillServing()
        figure(
            "item 6: %d malformed requests in %.1fs, answers %s, %d broke the rule",
            len(cases),
            took,
            dict(sorted(statuses.items())),
            sum(len(found) for found in failures.values()),
        )
        self.assertEqual(failures, {}, "\n" + self.report(failures))
        stderr = "".join(self.engine.stderr_lines()[mark:])
        self.assertNotIn('msg="step started"', stderr)
        self.assertNotIn("level=error", stderr)
        self.assertEqual(files_under(self.engine.workdir), [])

    def test_http_framing_corpus_is_refused_with_json_4xx(self):
        cases = badinput_corpus.framing_corpus()
        failures, statuses = self.run_corpus(cases, fresh_connection=True)
        self.assertStillServing()
        figure(
            "item 6 (HTTP framing): %d requests, answers %s, %d broke the rule",
            len(cases),
            dict(sorted(statuses.items())),
            sum(len(found) for found in failures.values()),
        )
        self.assertEqual(failures, {}, "\n" + self.report(failures))

    def test_real_body_over_the_limit(self):
        data = b'{"le_log_key": "' + b"a" * badinput_corpus.LIMIT + b'"}'
        head = b"POST /setup HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(
            data
        )
        parts = urllib.parse.urlsplit(self.engine.url)
        with socket.create_connection((parts.hostname, parts.port), 30) as sock:
            sender = threading.Thread(
                target=_send_ignoring_reset, args=(sock, head + data)
            )
            sender.start()
            response = http.client.HTTPResponse(sock, method="POST")
            response.begin()
            body = response.read()
            sender.join(30)
        problem = refusal_problem(
            response.status, response.getheader("Content-Type", ""), body, "POST"
        )
        self.assertIsNone(problem)
        self.assertEqual(response.status, 413)
        self.assertStillServing()


def _send_ignoring_reset(sock, data):
    try:
        sock.sendall(data)
    except OSError:
        pass


# ------------------------------------------------------------------ item 7


def odd_keys(outside):
    """Log keys that must neither leave the shared folder nor bend a URL."""
    return [
        "../escape",
        "../../../../../../../../%s/dotdot" % outside.lstrip("/"),
        os.path.join(outside, "absolute"),
        "a/../../b",
        "nul\x00byte",
        "new\nline",
        "carriage\rreturn",
        "k" * 4096,
        "a/" * 2048,
        "x&accountID=evil&snapshot=true",
        "spaces and+plus%20#frag?q=1",
        "./dot",
        "a//b",
        "..",
        "\\..\\..\\backslash",
        "stage/deep/" + "d/" * 100 + "ok",
    ]


class KeysAndPathsTest(unittest.TestCase):
    """Odd ``le_log_key`` and step ``log_key`` values, to files and to a service."""

    def setUp(self):
        self.outside = tempfile.mkdtemp(prefix="liteengine-outside-")
        self.addCleanup(_remove_tree, self.outside)

    def drive(self, engine, config, keys):
        """Set up with each key, then run a step logging under each; destroy.

        The two passes never have two writers open on one key at a time.
        """
        extra = {"log_config": config} if config else {}
        for key in keys:
            body = dict(extra, le_log_key=key)
            status, answer, _ = call(engine.url, "POST", "/setup", body, timeout=20)
            self.assertEqual(status, 200, (key[:40], answer))
        self.assertEqual(call(engine.url, "POST", "/destroy", {}, timeout=30)[0], 200)

        body = dict(extra, le_log_key="stage/plain")
        self.assertEqual(call(engine.url, "POST", "/setup", body)[0], 200)
        for number, key in enumerate(keys):
            step = {
                "id": "odd-%d" % number,
                "log_key": key,
                "run": {"commands": ["echo step %d" % number]},
            }
            status, answer, _ = call(
                engine.url, "POST", "/start_step", step, timeout=20
            )
            self.assertEqual(status, 200, (key[:40], answer))
            status, answer, _ = call(
                engine.url, "POST", "/poll_step", {"id": step["id"]}, timeout=20
            )
            self.assertEqual((status, answer.get("exit_code")), (200, 0), key[:40])
        self.assertEqual(call(engine.url, "POST", "/destroy", {}, timeout=30)[0], 200)

    def assertNothingOutside(self, engine):
        shared = os.path.realpath(engine.shared_dir) + os.sep
        stray = [
            path
            for path in files_under(engine.workdir)
            if not os.path.realpath(path).startswith(shared)
        ]
        self.assertEqual(stray, [])
        self.assertEqual(files_under(self.outside), [])
        self.assertEqual(files_under(engine.cwd), [])

    def test_file_store_never_writes_outside_the_shared_folder(self):
        engine = EngineProcess(dict(SHORT)).start()
        self.addCleanup(engine.cleanup)
        keys = odd_keys(self.outside)
        self.drive(engine, None, keys)
        self.assertNothingOutside(engine)
        refused = [line for line in engine.stderr_lines() if "log key refused" in line]
        self.assertTrue(refused)
        written = files_under(engine.shared_dir)
        figure(
            "item 7 (file store): %d odd keys, %d refusal warnings, %d files written, "
            "all inside the shared folder",
            len(keys),
            len(refused),
            len(written),
        )

    def test_service_gets_each_key_exactly_as_sent(self):
        service = FakeLogService().start()
        self.addCleanup(service.stop)
        engine = EngineProcess(dict(SHORT)).start()
        self.addCleanup(engine.cleanup)
        keys = odd_keys(self.outside)
        # Uploads through the service, so that every call carries the key.
        self.drive(engine, log_config(service, indirect_upload=True), keys)
        self.assertNothingOutside(engine)

        arrived = set()
        keys = list(keys)
        for entry in service.requests():
            self.assertIn(entry["path"], ("/stream", "/blob"), entry["path"][:80])
            self.assertLessEqual(set(entry["query"]), {"accountID", "key", "snapshot"})
            self.assertEqual(entry["query"]["accountID"], "acct")
            self.assertIn(entry["query"]["key"], keys + ["stage/plain"])
            arrived.add(entry["query"]["key"])
        stderr = "".join(engine.stderr_lines())
        for key in keys:
            with self.subTest(key=key[:40]):
                if key not in arrived:
                    self.assertIn("refused", stderr)
                else:
                    self.assertEqual(len(service.uploads(key)), 2)
        self.assertEqual(service.violations(), [])
        figure(
            "item 7 (log service): %d of %d odd keys arrived exactly as sent, "
            "the rest refused with a warning",
            len(arrived & set(keys)),
            len(keys),
        )

    def test_keys_that_are_not_unicode(self):
        """A JSON string may hold a lone surrogate; it must not crash anything."""
        service = FakeLogService().start()
        self.addCleanup(service.stop)
        engine = EngineProcess(dict(SHORT)).start()
        self.addCleanup(engine.cleanup)
        steps = 0
        for label, config in (
            ("file store", None),
            ("log service", log_config(service)),
        ):
            extra = {"log_config": config} if config else {}
            for key in ("\ud800", "stage/\udc80x"):
                with self.subTest(store=label, key=ascii(key), call="setup"):
                    body = dict(extra, le_log_key=key)
                    status, answer, _ = call(engine.url, "POST", "/setup", body)
                    self.assertIn(status, (200, 400), answer)
                if key != "\ud800":
                    continue
                with self.subTest(store=label, key=ascii(key), call="step"):
                    steps += 1
                    step = dict(extra, id="surrogate-%d" % steps, log_key=key)
                    step["run"] = {"commands": ["echo hi"]}
                    status, answer, _ = call(engine.url, "POST", "/start_step", step)
                    self.assertIn(status, (200, 400), answer)
                    if status == 200:
                        try:
                            status, answer, _ = call(
                                engine.url, "POST", "/poll_step", {"id": step["id"]}, 3
                            )
                        except OSError as exc:
                            self.fail("poll_step never answered: %s" % exc)
                        self.assertEqual(status, 200, answer)
        # No /destroy: it would wait its full grace time for each stuck step.
        errors = [line[:300] for line in engine.stderr_lines() if "level=error" in line]
        self.assertEqual(errors, [])
        self.assertEqual(service.violations(), [])

    def test_log_config_values_that_cannot_go_on_the_wire(self):
        """A token or host that no HTTP request can carry is a warning, not a crash."""
        service = FakeLogService().start()
        self.addCleanup(service.stop)
        engine = EngineProcess(dict(SHORT)).start()
        self.addCleanup(engine.cleanup)
        odd = {
            "token outside Latin-1": {"token": "\u4e2d\u6587-token"},
            "token with CR LF": {"token": "tok\r\nX-Injected: 1"},
            "host with an empty label": {"url": "http://a..b"},
            "host label over 63": {"url": "http://%s.example" % ("a" * 300)},
        }
        polls = {}
        for number, (label, change) in enumerate(odd.items()):
            config = dict(log_config(service), **change)
            with self.subTest(case=label, call="setup"):
                body = {"le_log_key": "stage/odd-%d" % number, "log_config": config}
                status, answer, _ = call(engine.url, "POST", "/setup", body)
                self.assertIn(status, (200, 400), answer)
            step = {
                "id": "odd-config-%d" % number,
                "log_key": "stage/odd-step-%d" % number,
                "log_config": config,
                "run": {"commands": ["echo hi"]},
            }
            status, answer, _ = call(engine.url, "POST", "/start_step", step)
            with self.subTest(case=label, call="start_step"):
                self.assertIn(status, (200, 400), answer)
            if status == 200:
                polls[label] = _poll_in_background(engine.url, step["id"], 4)
        for label, (thread, result) in polls.items():
            thread.join(10)
            with self.subTest(case=label, call="poll_step"):
                self.assertEqual(result.get("status"), 200, result)
        errors = [line[:300] for line in engine.stderr_lines() if "level=error" in line]
        self.assertEqual(errors, [])
        self.assertNotIn("X-Injected", json.dumps(service.requests()))


def _poll_in_background(url, step_id, timeout):
    """Start a ``/poll_step`` on a thread; returns ``(thread, result dict)``."""
    result = {}

    def poll():
        try:
            status, answer, _ = call(
                url, "POST", "/poll_step", {"id": step_id}, timeout
            )
            result.update(status=status, answer=answer)
        except OSError as exc:
            result.update(error="no answer in %ss: %s" % (timeout, exc))

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    return thread, result


def _remove_tree(path):
    for folder, names, files in os.walk(path, topdown=False):
        for name in files:
            os.unlink(os.path.join(folder, name))
        for name in names:
            os.rmdir(os.path.join(folder, name))
    os.rmdir(path)


# ------------------------------------------------------------------ item 8


FOREVER_STEP = (
    'echo $$ > "%s"; i=0; while true; do echo "tick $i"; i=$((i+1)); sleep 0.01; done'
)


class SigtermWhileStreamingTest(unittest.TestCase):
    """SIGTERM with a step streaming: every open writer is flushed and closed."""

    def test_sigterm_flushes_uploads_and_closes(self):
        service = FakeLogService().start()
        self.addCleanup(service.stop)
        engine = EngineProcess(dict(SHORT)).start()
        self.addCleanup(engine.cleanup)
        body = {"le_log_key": KEY, "log_config": log_config(service)}
        self.assertEqual(call(engine.url, "POST", "/setup", body)[:2], (200, {}))
        pid_file = os.path.join(engine.workdir, "step.pid")
        step_key = "stage/forever"
        step = {
            "id": "forever",
            "log_key": step_key,
            "run": {"commands": [FOREVER_STEP % pid_file]},
        }
        self.assertEqual(call(engine.url, "POST", "/start_step", step)[:2], (200, {}))
        self.assertTrue(service.wait_for(lambda s: len(s.lines(step_key)) >= 20, 10))

        started = time.monotonic()
        code = engine.stop(timeout=30)
        took = time.monotonic() - started
        self.assertEqual(code, 0)
        self.assertLess(took, 5.0)

        for key in (step_key, KEY):
            with self.subTest(key=key):
                [upload] = service.uploads(key)
                self.assertEqual(
                    [line["pos"] for line in upload], list(range(len(upload)))
                )
                order, first = by_pos(service.lines(key))
                self.assertEqual([first[pos] for pos in order], upload[: len(order)])
                self.assertEqual(service.closes(key), [{"snapshot": False}])
                self.assertFalse(service.is_open(key))
        step_lines = outs(service.uploads(step_key)[0])
        self.assertEqual(step_lines, ["tick %d\n" % n for n in range(len(step_lines))])
        own = " ".join(outs(service.uploads(KEY)[0]))
        self.assertIn('msg="server stopping"', own)
        self.assertIn('msg="destroy started"', own)
        self.assertEqual(service.violations(), [])
        stderr = "".join(engine.stderr_lines())
        self.assertIn('msg="server stopped"', stderr)
        with open(pid_file) as file:
            pid = int(file.read())
        self.assertTrue(_gone(pid, 3.0), "the step's shell outlived the engine")
        figure(
            "item 8: SIGTERM with a step streaming; exit 0 after %.2fs; step upload "
            "%d lines (%d were live), engine upload %d lines; nothing lost",
            took,
            len(step_lines),
            len(by_pos(service.lines(step_key))[0]),
            len(service.uploads(KEY)[0]),
        )


def _gone(pid, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


if __name__ == "__main__":
    unittest.main()
