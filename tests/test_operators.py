"""What operators get beyond streaming: metrics, level filter, own settings."""

import http.client
import os
import re
import subprocess
import threading
import unittest
import urllib.parse

from tests.engine_proc import EngineProcess, engine_command
from tests.fakelog import FakeLogService
from tests.test_api import request

ENGINE_KEY = "stage/le"


def outs(lines):
    return [line["out"] for line in lines]


def scrape(url):
    """GET /metrics; returns ``(content_type, {(name, labels): value})``."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.netloc, timeout=10)
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        found = re.fullmatch(r"(\w+)(?:\{(.*)\})? ([0-9.e+-]+)", line)
        assert found, line
        samples[(found.group(1), found.group(2) or "")] = float(found.group(3))
    return response.getheader("Content-Type"), samples


class OperatorTest(unittest.TestCase):
    def setUp(self):
        self.service = FakeLogService().start()
        self.addCleanup(self.service.stop)
        self.engine = EngineProcess({"LE_FLUSH_INTERVAL": "0.2"}).start()
        self.addCleanup(self.engine.cleanup)
        self.config = {"url": self.service.url, "account_id": "acct", "token": "tok"}

    def post(self, path, body):
        status, _, answer = request(self.engine.url, "POST", path, body)
        self.assertEqual(status, 200, answer)
        return answer

    def run_stage(self, step_lines=3, **setup):
        body = {"le_log_key": ENGINE_KEY, "log_config": self.config}
        body.update(setup)
        self.post("/setup", body)
        command = "seq 1 %d" % step_lines
        self.post(
            "/start_step",
            {"id": "s", "log_key": "stage/s", "run": {"commands": [command]}},
        )
        self.post("/poll_step", {"id": "s"})
        self.post("/destroy", {})

    def test_metrics_match_what_the_service_received(self):
        self.run_stage(step_lines=7)
        content_type, samples = scrape(self.engine.url)
        self.assertTrue(content_type.startswith("text/plain"))

        def value(name, stream):
            return samples[("liteengine_stream_" + name, 'stream="%s"' % stream)]

        [engine_upload] = self.service.uploads(ENGINE_KEY)
        self.assertEqual(value("lines_total", "engine"), len(engine_upload))
        self.assertEqual(
            value("lines_sent_total", "engine"), len(self.service.lines(ENGINE_KEY))
        )
        self.assertEqual(value("lines_total", "step"), 7)
        self.assertEqual(value("lines_sent_total", "step"), 7)
        self.assertEqual(value("uploads_total", "step"), 1)
        self.assertEqual(value("uploads_total", "engine"), 1)
        self.assertEqual(value("lines_dropped_total", "step"), 0)
        self.assertEqual(value("flushes_failed_total", "engine"), 0)
        self.assertGreater(value("bytes_sent_total", "step"), 7 * 60)
        self.assertEqual(samples[("liteengine_steps_running", "")], 0)
        self.assertEqual(samples[("liteengine_streams_open", 'stream="engine"')], 0)

        # Counters only go up across stages.
        self.run_stage(step_lines=2)
        _, again = scrape(self.engine.url)
        for key, number in samples.items():
            if key[0].endswith("_total"):
                self.assertGreaterEqual(again[key], number, key)
        self.assertEqual(again[("liteengine_stream_lines_total", 'stream="step"')], 9)

        summary = self.engine.wait_for_stderr('msg="destroy done"')
        for field in ("lines=", "sent=", "dropped=", "failed_flushes="):
            self.assertIn(field, summary)

    def test_failed_flushes_are_counted(self):
        self.service.inject("write", "status", count=None, status=400)
        self.run_stage()
        _, samples = scrape(self.engine.url)
        failed = samples[("liteengine_stream_flushes_failed_total", 'stream="step"')]
        self.assertGreaterEqual(failed, 1)
        self.assertEqual(
            samples[("liteengine_stream_lines_sent_total", 'stream="step"')], 0
        )

    def test_level_filter_for_the_engine_stream(self):
        cases = {
            "debug": ("level=debug", "level=info", "level=warning"),
            "info": ("level=info", "level=warning"),
            "warning": ("level=warning",),
            "error": (),
        }
        for level, expected in cases.items():
            with self.subTest(level=level):
                key = "stage/le-" + level
                config = dict(self.config, le_log_level=level)
                self.post("/setup", {"le_log_key": key, "log_config": config})
                # A step that cannot start makes the engine warn.
                step = {"id": level, "working_dir": "/nonexistent", "run": {}}
                self.post("/start_step", step)
                self.post("/poll_step", {"id": level})
                self.post("/destroy", {})
                [upload] = self.service.uploads(key)
                levels = {
                    re.search(r" level=\w+", o).group(0)[1:] for o in outs(upload)
                }
                self.assertEqual(levels, set(expected), outs(upload))
        # Local printing is not filtered.
        self.assertIsNotNone(self.engine.wait_for_stderr('level=info msg="setup done"'))

    def test_unknown_level_is_a_bad_request(self):
        body = {
            "le_log_key": ENGINE_KEY,
            "log_config": dict(self.config, le_log_level="loud"),
        }
        status, _, answer = request(self.engine.url, "POST", "/setup", body)
        self.assertEqual(status, 400)
        self.assertIn("le_log_level", answer["error_msg"])

    def test_engine_stream_has_its_own_settings(self):
        other = FakeLogService(token="other-token").start()
        self.addCleanup(other.stop)
        own = {"url": other.url, "account_id": "acct", "token": "other-token"}
        self.run_stage(le_log_config=own)
        self.assertTrue(other.uploads(ENGINE_KEY))
        self.assertEqual(self.service.uploads(ENGINE_KEY), [])
        self.assertEqual(
            outs(self.service.uploads("stage/s")[0]), ["1\n", "2\n", "3\n"]
        )
        self.assertEqual(other.uploads("stage/s"), [])
        self.assertEqual(other.violations() + self.service.violations(), [])


class EnvironmentSettingsTest(unittest.TestCase):
    def setUp(self):
        self.service = FakeLogService().start()
        self.addCleanup(self.service.stop)
        self.config = {"url": self.service.url, "account_id": "acct", "token": "tok"}

    def engine(self, **env):
        engine = EngineProcess(dict({"LE_FLUSH_INTERVAL": "0.1"}, **env)).start()
        self.addCleanup(engine.cleanup)
        return engine

    def post(self, engine, path, body):
        status, _, answer = request(engine.url, "POST", path, body)
        self.assertEqual(status, 200, answer)

    def test_default_level_from_the_environment(self):
        engine = self.engine(LE_LOG_LEVEL="warning")
        self.post(
            engine, "/setup", {"le_log_key": ENGINE_KEY, "log_config": self.config}
        )
        self.post(engine, "/start_step", {"id": "x", "working_dir": "/nonexistent"})
        self.post(engine, "/poll_step", {"id": "x"})
        self.post(engine, "/destroy", {})
        [upload] = self.service.uploads(ENGINE_KEY)
        self.assertEqual(len(upload), 1)
        self.assertIn('level=warning msg="step not started"', upload[0]["out"])

    def test_unknown_level_in_the_environment_stops_the_start(self):
        result = subprocess.run(
            engine_command("server"),
            env=dict(os.environ, SERVER_INSECURE="true", LE_LOG_LEVEL="loud"),
            capture_output=True,
            text=True,
            timeout=30,
        )
        self.assertEqual(result.returncode, 2)
        self.assertIn("LE_LOG_LEVEL", result.stderr)

    def test_quiet_console_while_healthy_loud_while_failing(self):
        engine = self.engine(LE_LOG_STDOUT="false", LE_WRITE_TIMEOUT="0.3")
        self.post(
            engine, "/setup", {"le_log_key": ENGINE_KEY, "log_config": self.config}
        )

        def step(step_id):
            self.post(
                engine, "/start_step", {"id": step_id, "run": {"commands": ["true"]}}
            )
            self.post(engine, "/poll_step", {"id": step_id})
            marker = "id=%s " % step_id
            self.service.wait_for(
                lambda s: any(marker in o for o in outs(s.lines(ENGINE_KEY)))
            )
            return any(marker in line for line in engine.stderr_lines())

        self.assertFalse(step("healthy"), "printed while the stream was healthy")
        self.assertFalse(any("setup done" in l for l in engine.stderr_lines()))

        self.service.inject("write", "status", count=None, status=503)
        # The next record is quiet too, until its own flush fails.
        self.post(
            engine, "/start_step", {"id": "trigger", "run": {"commands": ["true"]}}
        )
        self.assertIsNotNone(engine.wait_for_stderr('msg="log stream flush failed"'))
        self.post(
            engine, "/start_step", {"id": "failing", "run": {"commands": ["true"]}}
        )
        self.assertIsNotNone(engine.wait_for_stderr('msg="step started" id=failing'))

        self.service.clear_faults()
        self.assertIsNotNone(engine.wait_for_stderr('msg="log stream recovered"'))
        self.assertFalse(step("recovered"), "printed after the stream recovered")
        self.post(engine, "/destroy", {})


class TailTest(unittest.TestCase):
    def test_tail_shows_lines_written_after_it_started(self):
        engine = EngineProcess().start()
        self.addCleanup(engine.cleanup)
        command = engine_command(
            "client", "tail", "stage/t", "--dir", engine.shared_dir
        )
        tail = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for cleanup in (tail.stderr.close, tail.stdout.close, tail.wait, tail.kill):
            self.addCleanup(cleanup)
        gate = os.path.join(engine.workdir, "gate")
        body = {
            "id": "t",
            "log_key": "stage/t",
            "run": {
                "commands": [
                    "echo first",
                    "while [ ! -e %s ]; do sleep 0.05; done" % gate,
                    "echo second",
                ]
            },
        }
        status, _, _ = request(engine.url, "POST", "/start_step", body)
        self.assertEqual(status, 200)
        seen = []
        reader = threading.Thread(
            target=lambda: seen.extend(tail.stdout.readline() for _ in range(2))
        )
        reader.start()
        reader.join(0.0)
        open(gate, "w").close()
        request(engine.url, "POST", "/poll_step", {"id": "t"})
        reader.join(10)
        self.assertEqual(seen, ["first\n", "second\n"])

    def test_tail_refuses_a_key_outside_the_store(self):
        result = subprocess.run(
            engine_command("client", "tail", "../x", "--dir", "/tmp", "--no-follow"),
            capture_output=True,
            text=True,
            timeout=30,
        )
        self.assertEqual(result.returncode, 2)
        self.assertIn("log key refused", result.stderr)


if __name__ == "__main__":
    unittest.main()
