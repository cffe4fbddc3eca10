"""The live writer and its clients, against the strict fake log service."""

import http.client
import json
import os
import tempfile
import time
import unittest
import urllib.parse

import logstream
from tests.fakelog import FakeLogService

KEY = "stage-1/le"
FAST = logstream.Deadlines(open=2.0, write=2.0, upload=2.0, close=2.0)
# A write deadline too short for a second try: a failed write waits for
# the next flush instead of being retried inside the same one.
NO_RETRY = logstream.Deadlines(open=2.0, write=0.05, upload=2.0, close=2.0)


def open_by_hand(service, key):
    """Open a stream the way another party would, outside the writer."""
    parts = urllib.parse.urlsplit(service.url)
    conn = http.client.HTTPConnection(parts.netloc, timeout=5)
    query = urllib.parse.urlencode({"accountID": "acct", "key": key})
    conn.request("POST", "/stream?" + query, headers={"X-Harness-Token": "tok"})
    status = conn.getresponse().status
    conn.close()
    return status


class WriterTest(unittest.TestCase):
    def setUp(self):
        self.service = FakeLogService().start()
        self.addCleanup(self.service.stop)

    def writer(self, deadlines=FAST, limit=logstream.HISTORY_LIMIT, **options):
        config = logstream.LogConfig(
            url=self.service.url, account_id="acct", token="tok", **options
        )
        client = logstream.new_client(config, "/nonexistent", deadlines)
        writer = logstream.LiveWriter(client, KEY, config, interval=0.05, limit=limit)
        self.addCleanup(writer.close)
        return writer

    def assertNoViolations(self):
        self.assertEqual(self.service.violations(), [])

    def test_lines_stream_live_then_upload_and_close(self):
        writer = self.writer()
        writer.open()
        for number in range(10):
            writer.append("line %d\n" % number)
        arrived = self.service.wait_for(lambda s: len(s.lines(KEY)) == 10)
        self.assertTrue(arrived, self.service.lines(KEY))

        figures = writer.close()

        live = self.service.lines(KEY)
        self.assertEqual([line["pos"] for line in live], list(range(10)))
        self.assertEqual(live[3]["out"], "line 3\n")
        self.assertEqual(live[3]["level"], "info")
        [upload] = self.service.uploads(KEY)
        self.assertEqual(upload, live)
        self.assertEqual(self.service.closes(KEY), [{"snapshot": False}])
        self.assertEqual(figures["sent"], 10)
        self.assertEqual(figures["uploads"], 1)
        self.assertNoViolations()

    def test_lines_are_batched_not_sent_one_by_one(self):
        writer = self.writer()
        writer.open()
        for number in range(500):
            writer.append("line %d\n" % number)
        self.service.wait_for(lambda s: len(s.lines(KEY)) == 500)
        writes = [r for r in self.service.requests() if r["method"] == "PUT"]
        self.assertLessEqual(len(writes), 3)
        self.assertNoViolations()

    def test_failed_batch_is_sent_again_in_order(self):
        writer = self.writer(deadlines=NO_RETRY)
        writer.open()
        self.service.inject("write", "status", count=2, status=503)
        with self.assertLogs("logstream", "WARNING") as logged:
            for number in range(5):
                writer.append("first %d\n" % number)
            self.service.wait_for(lambda s: len(s.lines(KEY)) >= 5)
            for number in range(5):
                writer.append("second %d\n" % number)
            self.service.wait_for(lambda s: len(s.lines(KEY)) >= 10)
            figures = writer.close()
        self.assertIn("log stream flush failed", logged.output[0])

        live = self.service.lines(KEY)
        self.assertEqual([line["pos"] for line in live], list(range(10)))
        self.assertEqual(live[0]["out"], "first 0\n")
        self.assertEqual(live[9]["out"], "second 4\n")
        self.assertEqual(figures["failed_flushes"], 2)
        self.assertEqual(self.service.uploads(KEY), [live])
        self.assertNoViolations()

    def test_reset_connection_is_retried_within_the_deadline(self):
        writer = self.writer()
        writer.open()
        self.service.inject("write", "reset", count=1)
        writer.append("survives a reset\n")
        self.assertTrue(self.service.wait_for(lambda s: len(s.lines(KEY)) >= 1))
        figures = writer.close()
        self.assertGreaterEqual(figures["retries"], 1)
        self.assertEqual(self.service.lines(KEY)[-1]["out"], "survives a reset\n")
        self.assertNoViolations()

    def test_an_answer_dripping_in_is_cut_at_the_deadline(self):
        quick = logstream.Deadlines(open=0.5, write=0.5, upload=0.5, close=0.5)
        writer = self.writer(deadlines=quick)
        for op in ("open", "write", "link", "close"):
            self.service.inject(op, "drip", count=None)
        started = time.monotonic()
        with self.assertLogs("logstream", "WARNING"):
            writer.open()
            writer.append("kept\n")
            figures = writer.close()
        # Open at setup, then at close: open again, upload, close; each cut
        # at 0.5 s where the dripped answer alone takes 4.7 s.
        self.assertLess(time.monotonic() - started, 4.0)
        self.assertEqual(figures["failed_uploads"], 1)

    def test_refused_writes_stop_live_but_upload_once(self):
        writer = self.writer()
        writer.open()
        self.service.inject("write", "status", count=None, status=400)
        with self.assertLogs("logstream", "WARNING") as logged:
            writer.append("kept\n")
            self.service.wait_for(
                lambda s: any(r["method"] == "PUT" for r in s.requests())
            )
            writer.append("kept too\n")
            figures = writer.close()
        writes = [
            r
            for r in self.service.requests()
            if (r["method"], r["path"]) == ("PUT", "/stream")
        ]
        self.assertEqual(len(writes), 1)
        self.assertIn("live writes stopped", "\n".join(logged.output))
        [upload] = self.service.uploads(KEY)
        self.assertEqual([line["out"] for line in upload], ["kept\n", "kept too\n"])
        self.assertEqual(figures["uploads"], 1)
        self.assertEqual(len(self.service.closes(KEY)), 1)

    def test_history_is_capped_dropping_the_oldest(self):
        writer = self.writer(limit=4000)
        writer.open()
        for number in range(200):
            writer.append("line %03d %s\n" % (number, "x" * 40))

        figures = writer.close()

        [upload] = self.service.uploads(KEY)
        size = sum(len(json.dumps(line, separators=(",", ":"))) + 1 for line in upload)
        self.assertLessEqual(size, 4000)
        self.assertTrue(upload[-1]["out"].startswith("line 199 "))
        positions = [line["pos"] for line in upload]
        self.assertEqual(
            positions, list(range(positions[0], positions[0] + len(upload)))
        )
        self.assertEqual(figures["dropped"], figures["lines"] - len(upload))
        self.assertGreater(figures["dropped"], 100)
        self.assertNoViolations()

    def test_default_cap_is_five_mebibytes_of_ndjson(self):
        writer = self.writer()
        for number in range(60000):
            writer.append("%06d %s\n" % (number, "y" * 90))
        writer.close()
        body = self.service.upload_bodies(KEY)[-1]
        self.assertLessEqual(len(body), 5 * 1024 * 1024)
        self.assertGreater(len(body), 5 * 1024 * 1024 - 400)
        self.assertTrue(body.endswith(b'"args":null}\n'))
        lines = [json.loads(line) for line in body.splitlines()]
        self.assertTrue(lines[-1]["out"].startswith("059999 "))
        # Lines dropped before they were encoded never got a pos: no gaps.
        positions = [line["pos"] for line in lines]
        self.assertEqual(positions, list(range(positions[0], positions[-1] + 1)))

    def test_long_line_is_truncated_with_marker(self):
        writer = self.writer()
        writer.append("a" * 100000 + "\n")
        writer.append("é" * 60000 + "\n")
        figures = writer.close()
        [upload] = self.service.uploads(KEY)
        for line in upload:
            self.assertLessEqual(len(line["out"].encode()), 70 * 1024)
            self.assertTrue(line["out"].endswith(logstream.TRUNCATED + "\n"))
        self.assertTrue(upload[1]["out"].startswith("éé"))
        self.assertEqual(figures["truncated"], 2)

    def test_trim_new_line_suffix(self):
        writer = self.writer(trim_new_line_suffix=True)
        writer.open()
        writer.append("no newline kept\n")
        writer.close()
        [upload] = self.service.uploads(KEY)
        self.assertEqual(upload[0]["out"], "no newline kept")

    def test_skip_opening_stream_closes_as_snapshot_without_upload(self):
        self.assertEqual(open_by_hand(self.service, KEY), 204)
        writer = self.writer(skip_opening_stream=True)
        writer.open()
        writer.append("hello\n")
        writer.close()
        self.assertEqual(self.service.opened(KEY), 1)
        self.assertEqual([line["out"] for line in self.service.lines(KEY)], ["hello\n"])
        self.assertEqual(self.service.uploads(KEY), [])
        self.assertEqual(self.service.closes(KEY), [{"snapshot": True}])

    def test_skip_closing_stream_only_flushes(self):
        writer = self.writer(skip_closing_stream=True)
        writer.open()
        writer.append("hello\n")
        writer.close()
        self.assertEqual([line["out"] for line in self.service.lines(KEY)], ["hello\n"])
        self.assertEqual(self.service.uploads(KEY), [])
        self.assertEqual(self.service.closes(KEY), [])
        self.assertTrue(self.service.is_open(KEY))

    def test_upload_through_the_service(self):
        writer = self.writer(indirect_upload=True)
        writer.append("through the service\n")
        writer.close()
        [upload] = self.service.uploads(KEY)
        self.assertEqual(upload[0]["out"], "through the service\n")
        paths = [r["path"] for r in self.service.requests()]
        self.assertIn("/blob", paths)
        self.assertNotIn("/blob/link/upload", paths)
        self.assertNoViolations()

    def test_upload_by_link(self):
        writer = self.writer(indirect_upload=False)
        writer.open()
        writer.append("through a link\n")
        writer.close()
        [upload] = self.service.uploads(KEY)
        self.assertEqual(upload[0]["out"], "through a link\n")
        paths = [r["path"] for r in self.service.requests()]
        self.assertIn("/blob/link/upload", paths)
        self.assertNotIn("/blob", paths)
        signed = [
            r for r in self.service.requests() if r["path"].startswith("/_signed")
        ]
        self.assertEqual([r["has_token"] for r in signed], [False])
        self.assertNoViolations()

    def test_unreachable_service_keeps_lines_and_close_is_bounded(self):
        self.service.stop()
        writer = self.writer(deadlines=logstream.Deadlines(0.3, 0.3, 0.3, 0.3))
        with self.assertLogs("logstream", "WARNING"):
            writer.open()
            writer.append("kept\n")
            figures = writer.close()
        self.assertEqual(figures["lines"], 1)
        self.assertEqual(figures["failed_uploads"], 1)
        self.assertEqual(figures["dropped"], 0)

    def test_append_after_close_is_ignored(self):
        writer = self.writer()
        writer.close()
        writer.append("late\n")
        self.assertEqual(writer.close()["lines"], 0)


class FileStoreTest(unittest.TestCase):
    def setUp(self):
        self.top = tempfile.mkdtemp()
        self.folder = os.path.join(self.top, "engine")
        self.store = logstream.FileStore(self.folder)

    def test_live_lines_then_history_replace_the_file(self):
        config = logstream.LogConfig()
        writer = logstream.LiveWriter(self.store, KEY, config, interval=0.05)
        writer.open()
        writer.append("one\n")
        writer.append("two\n")
        writer.close()
        with open(os.path.join(self.folder, KEY + ".ndjson"), "rb") as file:
            lines = [json.loads(line) for line in file]
        self.assertEqual([line["out"] for line in lines], ["one\n", "two\n"])
        self.assertEqual([line["pos"] for line in lines], [0, 1])

    def test_keys_that_leave_the_folder_are_refused(self):
        for key in (
            "../escape",
            "/etc/escape",
            "a/../../escape",
            "a\x00b",
            "a\nb",
            "",
            "x" * 4096,
            "a//b",
            "./a",
        ):
            with self.subTest(key=key):
                with self.assertRaises(logstream.LogServiceError) as caught:
                    self.store.open(key)
                self.assertFalse(caught.exception.retryable)
        self.assertEqual(sorted(os.listdir(self.top)), [])

    def test_symlink_out_of_the_folder_is_refused(self):
        os.makedirs(self.folder)
        outside = tempfile.mkdtemp()
        os.symlink(outside, os.path.join(self.folder, "link"))
        with self.assertRaises(logstream.LogServiceError):
            self.store.write("link/key", [b'{"x":1}\n'])
        self.assertEqual(os.listdir(outside), [])

    def test_refused_key_stops_the_writer_quietly(self):
        writer = logstream.LiveWriter(
            self.store, "../escape", logstream.LogConfig(), interval=0.05
        )
        with self.assertLogs("logstream", "WARNING") as logged:
            writer.open()
            writer.append("nowhere\n")
            writer.close()
        errors = [record.fields["error"] for record in logged.records]
        self.assertIn("log key refused", errors[0])
        self.assertFalse(os.path.exists(os.path.join(self.top, "escape.ndjson")))


class SettingsTest(unittest.TestCase):
    def test_log_config_types_are_checked_by_name(self):
        with self.assertRaisesRegex(ValueError, "log_config.token must be a string"):
            logstream.LogConfig.from_json({"token": 5})
        with self.assertRaisesRegex(ValueError, "indirect_upload must be a boolean"):
            logstream.LogConfig.from_json({"indirect_upload": "yes"})
        with self.assertRaisesRegex(ValueError, "http or https"):
            logstream.LogConfig.from_json({"url": "file:///etc/passwd"})
        config = logstream.LogConfig.from_json({"url": "http://h/x/", "other": 1})
        self.assertEqual(config.url, "http://h/x")

    def test_deadlines_from_environment(self):
        deadlines = logstream.Deadlines.from_env({"LE_UPLOAD_TIMEOUT": "2.5"})
        self.assertEqual(deadlines.upload, 2.5)
        with self.assertRaisesRegex(ValueError, "LE_CLOSE_TIMEOUT"):
            logstream.Deadlines.from_env({"LE_CLOSE_TIMEOUT": "soon"})

    def test_retry_backs_off_and_gives_up_at_the_deadline(self):
        retry = logstream.Retry.within(1.0)
        waits = []
        while retry is not None:
            waits.append(retry.wait)
            retry = retry.next()
        # The last policy waits longer than the time left, so it gives up.
        self.assertEqual(waits, [0.1, 0.2, 0.4, 0.8, 1.6])

    def test_encoded_line_is_the_protocol_line(self):
        line = json.loads(logstream.encode_line(3, "warning", 'a "q"\n', 0.5))
        self.assertEqual(
            line,
            {
                "level": "warning",
                "pos": 3,
                "out": 'a "q"\n',
                "time": "1970-01-01T00:00:00.500000Z",
                "args": None,
            },
        )


if __name__ == "__main__":
    unittest.main()
