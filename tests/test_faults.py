"""Faults inside one process: logging never waits on the log service, and
nothing stops making progress under load.

Two tests whose subject lives inside one process, so they run the writer,
the streaming handler and ``liteengine.Engine`` here rather than a server:
how long a single logging call takes while the service hangs, and whether
anything stops making progress while every flush fails (a watchdog
thread). The process-level fault tests are in ``tests/test_faults_e2e.py``.

The figures the README quotes (slowest logging call during a hang, lines
lost, time to destroy) are printed with a ``[faults]`` prefix.

The two load tests run as long as the issue asks: 10 seconds with a hung
service, 30 seconds with every flush failing. ``LE_SOAK_SECONDS`` overrides
both, for a quicker run by hand.
"""

import logging
import os
import sys
import tempfile
import threading
import time
import traceback
import unittest
from unittest import mock

import hooks
import liteengine
import logstream
from tests.fakelog import FakeLogService
from tests.faults_common import KEY, MARGIN, figure, log_config, outs

HANG_SECONDS = float(os.environ.get("LE_SOAK_SECONDS", "10"))
FAILING_SECONDS = float(os.environ.get("LE_SOAK_SECONDS", "30"))


# ------------------------------------------------------------------ item 3


def resident_bytes():
    """This process's resident memory in bytes, or ``None`` off Linux."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _Tally(logging.Handler):
    """Counts the records that reach the root logger, by logger and message."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.counts = {}
        self._guard = threading.Lock()

    def emit(self, record):
        key = (record.name, record.msg)
        with self._guard:
            self.counts[key] = self.counts.get(key, 0) + 1


class _TimedStreamHandler(hooks.StreamHandler):
    """The streaming handler, noting the longest ``emit`` (format and queue)."""

    slowest = 0.0

    def emit(self, record):
        started = time.perf_counter()
        super().emit(record)
        took = time.perf_counter() - started
        if took > self.slowest:
            self.slowest = took


class HangWhileLoggingTest(unittest.TestCase):
    """The service hangs mid-stream while 8 threads log as fast as they can.

    In-process: the writer and the streaming handler on a logger of their
    own. The threads log 2 s against a healthy service, then every write
    hangs for ``HANG_SECONDS``. Measured: the slowest whole logging call in
    each phase, the slowest time inside the streaming handler, memory, and
    how long ``close`` takes.

    A whole call also waits for the GIL and for ``logging.Handler``'s own
    lock, which CPython hands over unfairly between threads in a tight loop:
    that wait is the same with or without a hang (up to about 0.7 s on two
    cores), which is why it is compared with the healthy phase. A call that
    waited on the network would take the whole write deadline (5 s).
    """

    THREADS = 8
    HEALTHY = 2.0

    def test_logging_never_waits_on_the_network(self):
        service = FakeLogService().start()
        self.addCleanup(service.stop)
        deadlines = logstream.Deadlines(open=2.0, write=5.0, upload=5.0, close=2.0)
        config = logstream.LogConfig.from_json(log_config(service))
        writer = logstream.LiveWriter(
            logstream.HTTPClient(config, deadlines), KEY, config, interval=0.2
        )
        writer.open()
        handler = _TimedStreamHandler(
            writer, hooks.LogrusFormatter(hooks.Masker(["hunter2-secret"]))
        )
        logger = logging.getLogger("faults.hang")
        logger.propagate = False
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
        self.addCleanup(logger.removeHandler, handler)
        tally = _Tally()
        machinery = logging.getLogger("logstream")
        machinery.addHandler(tally)
        self.addCleanup(machinery.removeHandler, tally)

        stop = threading.Event()
        hanging = threading.Event()
        slowest = {"healthy": [0.0] * self.THREADS, "hang": [0.0] * self.THREADS}
        counts = [0] * self.THREADS

        def work(number):
            clock = time.perf_counter
            count = 0
            worst = {"healthy": 0.0, "hang": 0.0}
            while not stop.is_set():
                phase = "hang" if hanging.is_set() else "healthy"
                started = clock()
                logger.info(
                    "thread %d line %d with hunter2-secret",
                    number,
                    count,
                    extra=hooks.fields(thread=number, n=count),
                )
                took = clock() - started
                if took > worst[phase]:
                    worst[phase] = took
                count += 1
                counts[number] = count
            for phase, took in worst.items():
                slowest[phase][number] = took

        peak = [0]

        def sample():
            while not stop.wait(0.1):
                peak[0] = max(peak[0], resident_bytes() or 0)

        threads = [
            threading.Thread(target=work, args=(n,)) for n in range(self.THREADS)
        ]
        threads.append(threading.Thread(target=sample))
        for thread in threads:
            thread.start()
        time.sleep(self.HEALTHY)
        self.assertTrue(service.lines(KEY), "nothing streamed before the hang")
        healthy_emit, handler.slowest = handler.slowest, 0.0
        # Memory is measured from here: the fake keeps every line it took
        # while healthy, and takes none once writes hang.
        baseline = resident_bytes()
        peak[0] = baseline or 0
        service.inject("write", "hang", count=None)
        hanging.set()
        before_hang = sum(counts)
        time.sleep(HANG_SECONDS)
        stop.set()
        for thread in threads:
            thread.join(30)
        logged = sum(counts)
        during_hang = logged - before_hang
        hang_emit = handler.slowest

        closing = time.monotonic()
        stats = writer.close()
        close_time = time.monotonic() - closing
        worst_healthy = max(slowest["healthy"])
        worst_hang = max(slowest["hang"])
        [upload] = service.uploads(KEY)
        [body] = service.upload_bodies(KEY)
        growth = (peak[0] - baseline) / 2**20 if baseline else float("nan")
        figure(
            "item 3: %d threads logged %d lines (%.0fs healthy, then %d lines in "
            "%.0fs with every write hung); slowest logging call %.3fs during the "
            "hang (%.3fs while healthy; write deadline %.0fs); slowest "
            "streaming-handler emit %.4fs "
            "during the hang (%.4fs healthy); dropped by the 5 MiB history cap %d "
            "(lines lost, the oldest); upload %d lines, %.2f MiB; peak RSS growth "
            "during the hang %.1f MiB; close took %.2fs",
            self.THREADS,
            logged,
            self.HEALTHY,
            during_hang,
            HANG_SECONDS,
            worst_hang,
            worst_healthy,
            deadlines.write,
            hang_emit,
            healthy_emit,
            stats["dropped"],
            len(upload),
            len(body) / 2**20,
            growth,
            close_time,
        )

        self.assertGreater(
            tally.counts.get(("logstream", "log stream flush failed"), 0), 0
        )
        # A call waiting on the hung write would take the whole 5 s write
        # deadline; what remains is threads taking turns for the interpreter
        # and the writer's short lock, about as much as while healthy.
        self.assertLess(worst_hang, deadlines.write / 5, "a logging call waited")
        self.assertEqual(stats["lines"], logged)
        self.assertGreater(stats["dropped"], 0)
        self.assertLessEqual(len(body), logstream.HISTORY_LIMIT)
        # Every kept line is in the upload once, newest last, nothing else lost.
        self.assertEqual(len(upload) + stats["dropped"], logged)
        first = upload[0]["pos"]
        self.assertEqual(
            [line["pos"] for line in upload], list(range(first, first + len(upload)))
        )
        self.assertNotIn("hunter2-secret", body.decode())
        if baseline:
            self.assertLess(growth, 64, "memory grew past the history cap")
        # A hung write in flight, the closing flush's write, upload, close.
        bound = 2 * deadlines.write + deadlines.upload + deadlines.close + MARGIN
        self.assertLess(close_time, bound)


# ------------------------------------------------------------------ item 5


MACHINERY_MESSAGES = (
    "log stream flush failed",
    "log stream not opened",
    "log upload failed",
    "log stream not closed",
    "log service call retried",
    "log stream recovered",
    "log stream refused lines",
)


def thread_stacks():
    """Every thread's current stack, as text, for a watchdog's report."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        parts.append("--- thread %s" % names.get(ident, ident))
        parts.append("".join(traceback.format_stack(frame)))
    return "\n".join(parts)


class NoDeadlockTest(unittest.TestCase):
    """16 threads log while every flush fails and setup/destroy cycle.

    In-process, with ``liteengine.Engine`` itself: its streaming handler sits
    on the root logger, as in the server. A watchdog fails the test when a
    logging thread or the setup/destroy loop stops making progress for 5 s,
    and prints every thread's stack.
    """

    THREADS = 16
    STALL = 5.0

    def setUp(self):
        root = logging.getLogger()
        self.addCleanup(root.setLevel, root.level)
        root.setLevel(logging.DEBUG)
        self.tally = _Tally()
        root.addHandler(self.tally)
        self.addCleanup(root.removeHandler, self.tally)
        self.service = FakeLogService().start()
        self.addCleanup(self.service.stop)
        shared = tempfile.mkdtemp(prefix="liteengine-faults-")
        deadlines = logstream.Deadlines(open=0.3, write=0.3, upload=0.3, close=0.3)
        self.engine = liteengine.Engine(hooks.Masker(), shared, deadlines, 0.05)
        self.addCleanup(self.engine.shutdown)

    def setup_request(self, key):
        """A setup streaming to the fake; uploads go by link, cheap to refuse."""
        body = {
            "le_log_key": key,
            "log_config": log_config(self.service, indirect_upload=False),
        }
        return liteengine.SetupRequest.from_json(body)

    def test_progress_under_failing_flushes(self):
        service = self.service
        service.inject("write", "status", count=None, status=503)
        service.inject("link", "status", count=None, status=503)
        handle_errors = []
        patch = mock.patch.object(
            logging.Handler,
            "handleError",
            lambda handler, record: handle_errors.append(record),
        )
        patch.start()
        self.addCleanup(patch.stop)
        # Every line any writer is handed is checked for the machinery's
        # own messages: one of them there would be a loop back.
        looped = []
        append = logstream.LiveWriter.append

        def watched_append(writer, out, *args, **kwargs):
            if 'msg="log ' in out and any(m in out for m in MACHINERY_MESSAGES):
                looped.append(out)
            return append(writer, out, *args, **kwargs)

        spy = mock.patch.object(logstream.LiveWriter, "append", watched_append)
        spy.start()
        self.addCleanup(spy.stop)

        stop_logging = threading.Event()
        stop_cycling = threading.Event()
        counters = [0] * self.THREADS
        cycles = [0]
        crashes = []
        loud = logging.getLogger("faults.load")

        def log_lines(number):
            try:
                while not stop_logging.is_set():
                    count = counters[number]
                    if count % 500 == 499:
                        try:
                            raise ValueError("boom %d" % count)
                        except ValueError:
                            loud.exception("thread %d failed on purpose", number)
                    elif count % 100 == 99:
                        loud.warning("thread %d warns", number)
                    else:
                        loud.info("thread %d line %d", number, count)
                    counters[number] = count + 1
            except BaseException as exc:
                crashes.append(exc)

        def cycle():
            try:
                while not stop_cycling.is_set():
                    self.engine.setup(self.setup_request("stage/cycle-%d" % cycles[0]))
                    time.sleep(0.1)
                    self.engine.destroy()
                    cycles[0] += 1
            except BaseException as exc:
                crashes.append(exc)

        stalls = []

        def watch():
            last = list(counters) + cycles
            moved = [time.monotonic()] * len(last)
            while not stop_logging.wait(0.2):
                now = time.monotonic()
                current = list(counters) + cycles
                for index, value in enumerate(current):
                    if value != last[index]:
                        last[index], moved[index] = value, now
                    elif now - moved[index] > self.STALL and not (
                        index == len(current) - 1 and stop_cycling.is_set()
                    ):
                        stalls.append(index)
                if stalls:
                    stalls.append(thread_stacks())
                    stop_cycling.set()
                    stop_logging.set()
                    return

        loggers = [
            threading.Thread(target=log_lines, args=(n,), daemon=True)
            for n in range(self.THREADS)
        ]
        cycler = threading.Thread(target=cycle, daemon=True)
        watchdog = threading.Thread(target=watch, daemon=True)
        for thread in loggers + [cycler, watchdog]:
            thread.start()
        stop_cycling.wait(FAILING_SECONDS)
        stop_cycling.set()
        cycler.join(10)
        self.assertFalse(cycler.is_alive(), "setup/destroy never finished")

        stop_logging.set()
        for thread in loggers:
            thread.join(10)
        watchdog.join(10)
        self.assertEqual(stalls, [], "progress stopped (thread indexes, then stacks)")
        self.assertEqual(crashes, [])
        self.assertEqual(handle_errors, [], "a logging handler failed")
        self.assertEqual(looped, [], "the machinery's own lines reached a writer")
        failed_flushes = self.tally.counts.get(
            ("logstream", "log stream flush failed"), 0
        )
        self.assertGreaterEqual(failed_flushes, cycles[0])

        # The engine still works once the service recovers.
        service.clear_faults()
        final = "stage/final"
        self.engine.setup(self.setup_request(final))
        for number in range(100):
            loud.info("after the storm %d", number)
        closing = time.monotonic()
        self.engine.destroy()
        destroy_time = time.monotonic() - closing
        [upload] = service.uploads(final)
        self.assertEqual([line["pos"] for line in upload], list(range(len(upload))))
        storm = [text for text in outs(upload) if "after the storm" in text]
        self.assertEqual(len(storm), 100)
        for number, text in enumerate(storm):
            self.assertIn('msg="after the storm %d"' % number, text)
        figure(
            "item 5: %d threads logged %d records in %.0fs (slowest thread %d) while "
            "every flush failed (%d warnings); %d setup/destroy cycles; no stall over "
            "%.0fs, no handler error, no line looped back; last destroy %.2fs",
            self.THREADS,
            sum(counters),
            FAILING_SECONDS,
            min(counters),
            failed_flushes,
            cycles[0],
            self.STALL,
            destroy_time,
        )


if __name__ == "__main__":
    unittest.main()
