"""The logging handler and formatter: text of each line, levels, no loops."""

import logging
import re
import threading
import time
import unittest

import hooks
import logstream
from tests.fakelog import FakeLogService

KEY = "stage-1/le"


class RecordingWriter:
    """Stands in for a LiveWriter: remembers what was appended."""

    def __init__(self):
        self.lines = []

    def append(self, out, level="info", created=None):
        self.lines.append((level, out))


def make_logger(name, handler):
    logger = logging.getLogger(name)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(handler)
    return logger


class FormatterTest(unittest.TestCase):
    def render(self, msg, *args, level=logging.INFO, **fields):
        record = logging.LogRecord("liteengine", level, __file__, 1, msg, args, None)
        record.created = 1796380200.5
        record.fields = fields
        return hooks.LogrusFormatter(hooks.Masker(["s3cret-value"])).format(record)

    def test_logrus_text(self):
        self.assertEqual(
            self.render("setup done", latency="12ms"),
            'time="2026-12-04T10:30:00Z" level=info msg="setup done" latency=12ms',
        )

    def test_levels_are_spelled_as_the_protocol_says(self):
        spelled = {
            logging.DEBUG: "debug",
            logging.INFO: "info",
            logging.WARNING: "warning",
            logging.ERROR: "error",
            logging.CRITICAL: "fatal",
        }
        for level, name in spelled.items():
            self.assertIn(" level=%s " % name, self.render("x", level=level))

    def test_fields_are_quoted_only_when_needed(self):
        text = self.render(
            "plain", a="b c", q='say "hi"', e="k=v", n=3, path="x/y.z", empty=""
        )
        self.assertIn(
            'msg=plain a="b c" q="say \\"hi\\"" e="k=v" n=3 path=x/y.z empty=""',
            text,
        )

    def test_newlines_stay_on_one_line(self):
        self.assertNotIn("\n", self.render("two\nlines", detail="a\nb"))

    def test_secrets_are_masked_in_message_and_fields(self):
        text = self.render("token %s", "s3cret-value", extra="xs3cret-valuex")
        self.assertNotIn("s3cret-value", text)
        self.assertEqual(text.count(hooks.MASK), 2)

    def test_overlapping_secrets_leave_nothing_showing(self):
        masker = hooks.Masker(["abcdef", "cdefgh"])
        self.assertEqual(masker.mask("xabcdefghx"), "x" + hooks.MASK + "x")

    def test_short_secrets_are_not_masked(self):
        masker = hooks.Masker(["ab", "", "abc"])
        self.assertEqual(masker.mask("ab abc"), "ab " + hooks.MASK)

    def test_multiline_secret_is_masked_line_by_line(self):
        masker = hooks.Masker(
            ["-----BEGIN KEY-----\nMIIEvQIBADANBg\n-----END KEY-----"]
        )
        self.assertNotIn("MIIEvQIBADANBg", masker.mask("key line: MIIEvQIBADANBg"))


class HandlerTest(unittest.TestCase):
    def test_every_level_reaches_the_writer(self):
        writer = RecordingWriter()
        handler = hooks.StreamHandler(writer, hooks.LogrusFormatter())
        logger = make_logger("test.levels", handler)
        logger.debug("d")
        logger.info("i")
        logger.warning("w")
        logger.error("e")
        logger.critical("c")
        levels = [level for level, _ in writer.lines]
        self.assertEqual(levels, ["debug", "info", "warning", "error", "fatal"])
        self.assertTrue(all(out.endswith("\n") for _, out in writer.lines))

    def test_machinery_records_are_not_streamed(self):
        writer = RecordingWriter()
        handler = hooks.StreamHandler(writer, hooks.LogrusFormatter())
        for name in ("logstream", "test.app"):
            record = logging.LogRecord(
                name, logging.INFO, __file__, 1, "kept", (), None
            )
            handler.handle(record)
        self.assertEqual(len(writer.lines), 1)
        self.assertIn("msg=kept", writer.lines[0][1])

    def test_a_broken_writer_never_raises_into_the_caller(self):
        class Broken:
            def append(self, *args):
                raise RuntimeError("boom")

        handler = hooks.StreamHandler(Broken(), hooks.LogrusFormatter())
        handler.handleError = lambda record: None
        make_logger("test.broken", handler).info("still fine")

    def test_no_loop_no_deadlock_while_every_flush_fails(self):
        service = FakeLogService().start()
        self.addCleanup(service.stop)
        service.inject("write", "status", count=None, status=500)
        config = logstream.LogConfig(url=service.url, account_id="acct", token="tok")
        deadlines = logstream.Deadlines(open=1.0, write=0.05, upload=1.0, close=1.0)
        client = logstream.new_client(config, "/nonexistent", deadlines)
        writer = logstream.LiveWriter(client, KEY, config, interval=0.01)
        writer.open()
        handler = hooks.StreamHandler(writer, hooks.LogrusFormatter())
        # The machinery's warnings reach the same root logger that streams.
        warnings = RecordingWriter()
        seen = hooks.StreamHandler(warnings, hooks.LogrusFormatter())
        seen.emit = lambda record: (
            record.name == "logstream" and warnings.append(record.getMessage())
        )
        root = logging.getLogger()
        for each in (handler, seen):
            root.addHandler(each)
            self.addCleanup(root.removeHandler, each)

        counts = [0] * 4
        stop = threading.Event()

        def busy(index):
            log = logging.getLogger("test.busy.%d" % index)
            log.setLevel(logging.DEBUG)
            while not stop.is_set():
                log.info("line", extra=hooks.fields(n=counts[index]))
                counts[index] += 1

        threads = [threading.Thread(target=busy, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        failed = service.wait_for(
            lambda s: sum(r["method"] == "PUT" for r in s.requests()) >= 5, timeout=10
        )
        before = list(counts)
        progressed = service.wait_for(
            lambda s: all(now > then + 100 for now, then in zip(counts, before)),
            timeout=10,
        )
        stop.set()
        for thread in threads:
            thread.join(10)
        self.assertTrue(failed)
        self.assertIn("log stream flush failed", warnings.lines[0][1])
        self.assertTrue(progressed, "logging threads stalled")
        self.assertFalse(any(thread.is_alive() for thread in threads))

        root.removeHandler(handler)
        started = time.monotonic()
        figures = writer.close()
        self.assertLess(time.monotonic() - started, 5)
        self.assertGreaterEqual(figures["failed_flushes"], 5)
        [upload] = service.uploads(KEY)
        self.assertTrue(upload)
        for line in upload:
            self.assertRegex(line["out"], r'^time="[^"]+" level=info msg=line n=\d+\n$')
        self.assertFalse(any(re.search("flush failed", l["out"]) for l in upload))


class OutputFeedTest(unittest.TestCase):
    def feed(self, pieces, secrets=("hunter2-secret",), limit=70 * 1024):
        writer = RecordingWriter()
        echoed = []
        feed = hooks.OutputFeed(writer, hooks.Masker(secrets), echoed.append, limit)
        for piece in pieces:
            feed.feed(piece)
        before_finish = [out for _, out in writer.lines]
        feed.finish()
        self.assertEqual(b"".join(echoed).decode(), "".join(o for _, o in writer.lines))
        return before_finish, [out for _, out in writer.lines]

    def test_lines_are_split_on_newlines(self):
        _, lines = self.feed([b"one\ntw", b"o\nthree\n"])
        self.assertEqual(lines, ["one\n", "two\n", "three\n"])

    def test_secret_split_across_two_reads_is_masked(self):
        _, lines = self.feed([b"token=hunter2-se", b"cret end\n"])
        self.assertEqual(lines, ["token=" + hooks.MASK + " end\n"])

    def test_secret_at_line_end_and_inside_a_word(self):
        _, lines = self.feed([b"xxhunter2-secretyy\nlast hunter2-secret"])
        self.assertEqual(lines, ["xx" + hooks.MASK + "yy\n", "last " + hooks.MASK])

    def test_multibyte_character_split_across_reads(self):
        data = "grüße ✓\n".encode()
        _, lines = self.feed([data[:3], data[3:9], data[9:]])
        self.assertEqual(lines, ["grüße ✓\n"])

    def test_invalid_utf8_is_replaced_not_fatal(self):
        _, lines = self.feed([b"bad \xff\xfe bytes\n"])
        self.assertEqual(lines, ["bad \ufffd\ufffd bytes\n"])

    def test_partial_line_is_held_until_newline_or_finish(self):
        before, lines = self.feed([b"10%", b"...50%", b"...100%"])
        self.assertEqual(before, [])
        self.assertEqual(lines, ["10%...50%...100%"])

    def test_endless_line_is_handed_over_at_the_cap(self):
        before, lines = self.feed([b"x" * 30, b"y" * 30], limit=40)
        self.assertEqual(before, ["x" * 30 + "y" * 30])
        self.assertEqual(lines, before)


if __name__ == "__main__":
    unittest.main()
