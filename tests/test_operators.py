"""What operators get beyond streaming: metrics, level filter, own settings."""

import http.client
import re
import urllib.parse
import unittest

from tests.engine_proc import EngineProcess
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
        self.post("/start_step", {"id": "s", "log_key": "stage/s", "run": {"commands": [command]}})
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
                levels = {re.search(r" level=\w+", o).group(0)[1:] for o in outs(upload)}
                self.assertEqual(levels, set(expected), outs(upload))
        # Local printing is not filtered.
        self.assertIsNotNone(self.engine.wait_for_stderr('level=info msg="setup done"'))

    def test_unknown_level_is_a_bad_request(self):
        body = {"le_log_key": ENGINE_KEY, "log_config": dict(self.config, le_log_level="loud")}
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
        self.assertEqual(outs(self.service.uploads("stage/s")[0]), ["1\n", "2\n", "3\n"])
        self.assertEqual(other.uploads("stage/s"), [])
        self.assertEqual(other.violations() + self.service.violations(), [])


if __name__ == "__main__":
    unittest.main()
