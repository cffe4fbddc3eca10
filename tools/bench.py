"""What log streaming costs the engine, each figure against a plain baseline.

Usage: python tools/bench.py [--quick] [--json FILE] [--only NAMES] [--pyz PATH]
                             [--profile] [--python EXE]

Run it with the interpreter that has the engine's dependencies: the engine
itself is started as a child process (``liteengine.py server``, plain HTTP
on a free loopback port), while the streaming pieces (``logstream``,
``hooks``) are imported from the source tree and measured in this process.
The log service is a loopback stand-in started here (``FakeService``): it
answers every call at once, or, when stalled, accepts requests and leaves
them unanswered. Nothing but 127.0.0.1 is ever contacted.

Every figure is measured together with its baseline in the same run, the
two alternated so that a slow moment of the machine hits both:

- caller cost: per-call time of ``logger.info("msg", extra=fields(...))``
  with a console handler writing to /dev/null, with and without the
  streaming handler, the service healthy and then stalled; and, as an extra
  row the issue does not ask for, the same with calls spaced out;
- delivery: lines logged by four threads until the service acknowledged the
  last, against the same lines through ``logging.FileHandler``;
- final upload: closing a writer that holds a full 5 MiB history, until the
  upload is acknowledged, against one ``http.client`` POST of those bytes;
- API: ``/healthz`` requests per second from 8 keep-alive client threads,
  against the same JSON from the standard library's ``ThreadingHTTPServer``;
- memory: the engine's resident memory after (and at the peak of) a step
  printing a million lines, against the idle engine after ``/setup``;
- start-up: process start to the first 200 from ``/healthz``, against
  ``python -m http.server`` started the same way.

A figure whose run did not do all its work (lines that never reached the
service) is marked as missing its target whatever its ratio. The machine's
load average is printed at the start and the end: on a shared machine the
ratios move with it, so compare runs made on a quiet one.

The table is printed and, with ``--json``, written as JSON. ``--quick`` uses
smaller counts and shorter runs (under 30 seconds in all) and still prints
every figure. ``--pyz`` measures a built zipapp instead of the source tree.
The exit code is 0 when every figure was measured, whether or not its
target was met, and 1 when one could not be measured.
"""

import argparse
import collections
import cProfile
import gc
import http.client
import http.server
import json
import logging
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "liteengine.py"
HOST = "127.0.0.1"
MIB = 1024 * 1024
STOP_SECONDS = 20.0

# The engine's modules come from the source tree and the process helpers from
# tools/startup.py, whatever folder this script is started from.
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

import hooks  # noqa: E402
import logstream  # noqa: E402
from startup import (  # noqa: E402
    NoAnswer,
    cpu_model,
    first_200,
    free_port,
    proc_kib,
    status_kib,
    stop_process,
)

ACCOUNT = "bench-account"
TOKEN = "bench-token"
END_MARK = "bench-end-of-run"
FIGURES = ("caller", "delivery", "upload", "api", "memory", "startup")


# ----------------------------------------------------------------- settings


FULL = {
    "caller_calls": 200_000,
    "caller_pairs": 4,
    "caller_phase_seconds": 2.0,
    "sparse_seconds": 10.0,
    "delivery_lines": 200_000,
    "delivery_runs": 3,
    "upload_runs": 5,
    "api_seconds": 3.0,
    "api_pairs": 2,
    "memory_lines": 1_000_000,
    "startup_runs": 5,
}

QUICK = {
    "caller_calls": 20_000,
    "caller_pairs": 1,
    "caller_phase_seconds": 1.2,
    "sparse_seconds": 2.0,
    "delivery_lines": 40_000,
    "delivery_runs": 1,
    "upload_runs": 2,
    "api_seconds": 1.0,
    "api_pairs": 1,
    "memory_lines": 200_000,
    "startup_runs": 2,
}


# ------------------------------------------------------- fake log service


class FakeService:
    """A fast, lenient log service on a loopback port.

    Every call is answered at once: 204 for the stream calls and for
    ``POST /blob``. It counts the lines each key's writes carried, notes when
    a write holding ``END_MARK`` was answered, and keeps the last upload's
    body and the time it was answered. While ``stall(True)`` is in force,
    new requests are read and left unanswered until ``stall(False)``.
    Times are ``time.perf_counter()`` values of this process. ``cpu_seconds``
    adds up the CPU time its handlers spent on requests, which the figures
    measured in this process share the interpreter with.

    Locking: ``_cond`` guards every counter and the stall flag; handler
    threads wait on it while stalled and waiters wait on it for news.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._lines = collections.Counter()
        self._marked = {}
        self._uploads = {}
        self._stalled = False
        self.cpu_seconds = 0.0
        self._server = _FakeServer((HOST, 0), _FakeHandler)
        self._server.service = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fake-service", daemon=True
        )

    @property
    def url(self):
        """The service's base URL."""
        return "http://%s:%d" % self._server.server_address[:2]

    @property
    def port(self):
        """The service's port."""
        return self._server.server_address[1]

    def start(self):
        """Start answering; returns the service."""
        self._thread.start()
        return self

    def stop(self):
        """Release stalled requests and stop answering."""
        self.stall(False)
        self._server.shutdown()
        self._server.server_close()

    def stall(self, on):
        """Leave new requests unanswered (``True``), or answer them all again."""
        with self._cond:
            self._stalled = on
            self._cond.notify_all()

    def lines(self, key):
        """How many lines the writes for ``key`` carried."""
        with self._cond:
            return self._lines[key]

    def wait_lines(self, key, count, timeout):
        """Wait until ``key`` has ``count`` lines; returns whether it has."""
        with self._cond:
            return self._cond.wait_for(lambda: self._lines[key] >= count, timeout)

    def wait_mark(self, key, timeout):
        """When the write holding ``END_MARK`` for ``key`` was answered, or None."""
        with self._cond:
            self._cond.wait_for(lambda: key in self._marked, timeout)
            return self._marked.get(key)

    def upload(self, key):
        """``(body, answered at)`` of the last upload for ``key``, or None."""
        with self._cond:
            return self._uploads.get(key)

    def serve(self, handler):
        """Answer one request on ``handler``'s connection."""
        cpu = time.thread_time()
        parts = urllib.parse.urlsplit(handler.path)
        key = urllib.parse.parse_qs(parts.query).get("key", [""])[0]
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        with self._cond:
            self._cond.wait_for(lambda: not self._stalled)
            self.cpu_seconds += time.thread_time() - cpu
        cpu = time.thread_time()
        handler.send_response(204)
        handler.end_headers()
        answered = time.perf_counter()
        count = body.count(b'{"level"') if handler.command == "PUT" else 0
        marked = count and END_MARK.encode() in body
        with self._cond:
            if handler.command == "PUT" and parts.path == "/stream":
                self._lines[key] += count
                if marked:
                    self._marked[key] = answered
            elif handler.command == "POST" and parts.path == "/blob":
                self._uploads = {key: (body, answered)}
            self.cpu_seconds += time.thread_time() - cpu
            self._cond.notify_all()


class _FakeServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        pass


class _FakeHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_POST(self):
        self.server.service.serve(self)

    do_PUT = do_DELETE = do_POST

    def log_message(self, format, *args):
        pass


# ------------------------------------------------------------ small tools


def request(port, method, path, body=None, timeout=60.0):
    """One call to a local server; returns ``(status, decoded JSON or None)``."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(raw) if raw else None
    except ValueError:
        return response.status, None


def wait_for_200(port, path, process, timeout=20.0):
    """Poll ``path`` until it answers 200; returns the ``perf_counter`` then.

    Raises ``RuntimeError`` when ``process`` exits or ``timeout`` passes.
    """
    try:
        return first_200(port, path, process, time.perf_counter() + timeout)
    except NoAnswer as exc:
        if exc.returncode is None:
            raise RuntimeError("server gave no 200 within %gs" % timeout) from None
        raise RuntimeError("server exited with %s" % exc.returncode) from None


def engine_command(python, pyz=None):
    """The command that starts the engine: the source tree's, or a built zipapp.

    A zipapp runs with ``-S -E`` (no site-packages, no PYTHON* variables), as
    it is shipped; the baselines are then started with the same flags.
    """
    if pyz:
        return [python, "-S", "-E", os.path.abspath(pyz)]
    return [python, str(ENGINE)]


class Engine:
    """The engine as a child process on a free loopback port, in a temp folder."""

    def __init__(self, command, workdir):
        self.port = free_port()
        # Only loopback is contacted: no proxy may be asked to carry a call.
        env = {
            name: value
            for name, value in os.environ.items()
            if not name.lower().endswith("_proxy")
        }
        env.update(
            SERVER_INSECURE="true",
            HTTPS_BIND="%s:%d" % (HOST, self.port),
            HARNESS_WORKDIR=workdir,
        )
        self.stderr_path = os.path.join(workdir, "engine.stderr")
        with open(self.stderr_path, "wb") as stderr:
            self.started = time.perf_counter()
            self.process = subprocess.Popen(
                command + ["server"],
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )

    def ready(self):
        """Wait for the first 200 from ``/healthz``; returns seconds since start."""
        return wait_for_200(self.port, "/healthz", self.process) - self.started

    def stop(self):
        """Stop the engine the way the runner does, with SIGTERM."""
        stop_process(self.process, STOP_SECONDS)


def start_baseline_server(command, workdir, module):
    """A stdlib server child on a free port: ``(process, port, started at)``.

    ``command`` is the interpreter with its flags. ``module`` is
    ``"http.server"`` (``python -m http.server``) or ``"json"`` (this
    script's keep-alive JSON server, see ``serve_json``).
    """
    port = free_port()
    if module == "http.server":
        argv = command + ["-m", "http.server", "--bind", HOST, str(port)]
    else:
        argv = command + [str(Path(__file__).resolve()), "_serve_json", str(port)]
    started = time.perf_counter()
    process = subprocess.Popen(
        argv,
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return process, port, started


def _engine_version():
    """The version ``liteengine.py`` declares, read without importing it."""
    try:
        source = ENGINE.read_text(encoding="utf-8")
    except OSError:
        return "unknown"
    for line in source.splitlines():
        if line.startswith("__version__"):
            return line.partition("=")[2].strip().strip("\"'")
    return "unknown"


def serve_json(port):
    """Serve the ``/healthz`` answer from ``ThreadingHTTPServer`` until killed.

    HTTP/1.1 with keep-alive, and TCP_NODELAY so that headers and body,
    written apart, are not held back by Nagle's algorithm.
    """
    body = json.dumps({"version": _engine_version(), "ok": True}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):
            pass

    server = http.server.ThreadingHTTPServer((HOST, port), Handler)
    server.daemon_threads = True
    server.serve_forever()


def load(port, path, threads, seconds, warmup=0.3):
    """GET ``path`` from ``threads`` keep-alive connections for ``seconds``.

    Returns ``{"requests": n, "seconds": s, "errors": e}`` for the measured
    span only, which starts after ``warmup`` seconds.
    """
    counts = [0] * threads
    errors = [0] * threads
    stop = threading.Event()

    def hammer(index):
        conn = http.client.HTTPConnection(HOST, port, timeout=10)
        while not stop.is_set():
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                errors[index] += 1
                conn.close()
                continue
            if response.status == 200:
                counts[index] += 1
            else:
                errors[index] += 1
        conn.close()

    workers = [threading.Thread(target=hammer, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    time.sleep(warmup)
    first, failed, began = sum(counts), sum(errors), time.perf_counter()
    time.sleep(seconds)
    last, failed_last, ended = sum(counts), sum(errors), time.perf_counter()
    stop.set()
    for worker in workers:
        worker.join()
    return {
        "requests": last - first,
        "seconds": ended - began,
        "errors": failed_last - failed,
    }


def run_load(python, port, seconds, threads=8):
    """Run ``load`` in a child process, so the client never shares our GIL."""
    argv = [
        python,
        str(Path(__file__).resolve()),
        "_load",
        str(port),
        str(seconds),
        str(threads),
    ]
    result = subprocess.run(
        argv, capture_output=True, check=True, timeout=seconds + 60, text=True
    )
    return json.loads(result.stdout)


def new_writer(service, key, interval=1.0):
    """A ``LiveWriter`` streaming ``key`` to ``service``, as the engine makes it."""
    # indirect_upload: the final upload is a POST /blob to the service, the
    # same request the upload figure's baseline makes.
    config = logstream.LogConfig(
        url=service.url, account_id=ACCOUNT, token=TOKEN, indirect_upload=True
    )
    client = logstream.HTTPClient(config, logstream.Deadlines())
    return logstream.LiveWriter(client, key, config, interval)


def wait_drained(writer, timeout=60.0):
    """Wait until ``writer`` has nothing unsent; returns whether it got there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if writer.stats()["oldest_unsent_age"] == 0.0:
            return True
        time.sleep(0.01)
    return False


def summary(nanoseconds):
    """Count, mean and percentiles of call times, in microseconds."""
    values = sorted(nanoseconds)
    return {
        "calls": len(values),
        "mean": statistics.fmean(values) / 1000,
        "p50": percentile(values, 0.50) / 1000,
        "p99": percentile(values, 0.99) / 1000,
        "p999": percentile(values, 0.999) / 1000,
        "max": values[-1] / 1000,
    }


def percentile(sorted_values, fraction):
    """The value below which ``fraction`` of ``sorted_values`` lie."""
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return sorted_values[index]


# ----------------------------------------------------------------- figures


class Row:
    """One line of the table: a measured figure, its baseline and its target.

    ``higher_is_better`` flips the comparison (requests per second);
    ``limit_delta`` makes the target ``measured <= baseline + limit_delta``
    instead of a ratio. ``complete=False`` says the run did not do all its
    work (lines never reached the service): the target then counts as missed
    whatever the figure, since it was bought by doing less.
    """

    def __init__(self, figure, measured, baseline, unit, target, **kind):
        self.figure = figure
        self.measured = measured
        self.baseline = baseline
        self.unit = unit
        self.target = target
        self.higher_is_better = kind.get("higher_is_better", False)
        self.limit_delta = kind.get("limit_delta")
        self.note = kind.get("note", "")
        self.complete = kind.get("complete", True)

    @property
    def ratio(self):
        """Measured over baseline."""
        return self.measured / self.baseline if self.baseline else float("inf")

    @property
    def met(self):
        """Whether the target is met."""
        if not self.complete:
            return False
        if self.limit_delta is not None:
            return self.measured <= self.baseline + self.limit_delta
        if self.higher_is_better:
            return self.ratio >= self.target
        return self.ratio <= self.target

    def target_text(self):
        """The target as the table shows it."""
        if self.limit_delta is not None:
            return "<= base + %g %s" % (self.limit_delta, self.unit)
        return "%s %gx" % (">=" if self.higher_is_better else "<=", self.target)

    def as_json(self):
        """The row as a JSON object."""
        return {
            "figure": self.figure,
            "measured": self.measured,
            "baseline": self.baseline,
            "unit": self.unit,
            "ratio": round(self.ratio, 3),
            "target": self.target_text(),
            "met": self.met,
            "complete": self.complete,
            "note": self.note,
        }


def median_ms_row(figure, measured, baseline, target, note):
    """A Row of the medians of two lists of seconds, shown in milliseconds."""
    return Row(
        figure,
        statistics.median(measured) * 1000,
        statistics.median(baseline) * 1000,
        "ms",
        target,
        note=note,
    )


def milliseconds(seconds):
    """The list ``seconds``, each value in milliseconds."""
    return [value * 1000 for value in seconds]


def caller_cost(settings, service, profile=None):
    """Per-call time of one ``logger.info`` with fields, streaming and not.

    The logger always has a console handler (LogrusFormatter to /dev/null);
    measured phases add a streaming handler on a fresh writer, which is
    closed (outside the timing) before the next baseline phase, so baseline
    phases never share the machine with a writer's flush. Phases alternate
    ABBA and each lasts long enough for the writer's once-a-second flush to
    happen inside it. The garbage collector stays on, as in a real program;
    it is run before each phase.
    """
    devnull = open(os.devnull, "w")
    console = logging.StreamHandler(devnull)
    console.setFormatter(hooks.LogrusFormatter())
    logger = logging.getLogger("bench.caller")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.handlers[:] = [console]
    rows, details = [], {}
    try:
        for stalled in (False, True):
            samples = _caller_phases(settings, service, logger, stalled, profile)
            name = "caller cost, service stalled" if stalled else "caller cost"
            for stat, target in (("mean", 1.5), ("p99", 2.0)):
                measured, baseline = samples["stream"][stat], samples["base"][stat]
                rows.append(
                    Row(
                        "%s %s" % (name, stat),
                        measured,
                        baseline,
                        "us",
                        target,
                        note="%d calls streaming, %d not"
                        % (samples["stream"]["calls"], samples["base"]["calls"]),
                    )
                )
            details[name] = samples
        sparse = _caller_sparse(settings, service, logger)
        for stat, target in (("mean", 1.5), ("p99", 2.0)):
            rows.append(
                Row(
                    "caller cost, sparse %s (extra)" % stat,
                    sparse["stream"][stat],
                    sparse["base"][stat],
                    "us",
                    target,
                    note="%d calls each, %d a second; not in the issue's table"
                    % (sparse["stream"]["calls"], SPARSE_RATE),
                )
            )
        details["caller cost, sparse"] = sparse
    finally:
        logger.handlers[:] = []
        devnull.close()
    return rows, details


SPARSE_RATE = 40


def _caller_sparse(settings, service, logger):
    """Calls spaced out (``SPARSE_RATE`` a second), as a server logs in real life.

    Each slot times one call without the streaming handler, then one with it
    (a second logger sharing the console handler), so both sides see the same
    moments of the machine. At this pace the writer's flush finds nothing
    left after each tick, so about once a second a call is the first one
    after a flush. A call after a pause runs on cold caches, so both sides
    are much slower than back to back, and more at the mercy of other
    processes; the ratio is what to read.
    """
    streaming = logging.getLogger("bench.sparse")
    streaming.propagate = False
    streaming.setLevel(logging.DEBUG)
    writer = new_writer(service, "bench/sparse")
    writer.open()
    handler = hooks.StreamHandler(writer, hooks.LogrusFormatter())
    streaming.handlers[:] = list(logger.handlers) + [handler]
    samples = {"base": [], "stream": []}
    clock = time.perf_counter_ns
    gap = 1.0 / SPARSE_RATE
    try:
        slots = int(settings["sparse_seconds"] * SPARSE_RATE)
        for _ in range(slots):
            for kind, target in (("base", logger), ("stream", streaming)):
                start = clock()
                target.info("msg", extra=hooks.fields(a=1, b="two"))
                samples[kind].append(clock() - start)
                time.sleep(gap / 2)
    finally:
        streaming.handlers[:] = []
        writer.close()
    return {kind: summary(values) for kind, values in samples.items()}


def _caller_phases(settings, service, logger, stalled, profile):
    pairs = settings["caller_pairs"]
    min_calls = settings["caller_calls"] // pairs
    seconds = settings["caller_phase_seconds"]
    order = ("base", "stream", "stream", "base") * ((pairs + 1) // 2)
    order = order[: 2 * pairs]
    samples = {"base": [], "stream": []}
    _caller_phase(logger, service, "stream", stalled, 0.3, 1000, [], {})
    _caller_phase(logger, service, "base", stalled, 0.3, 1000, [], {})
    extra = {"dropped": 0, "phase means": []}
    for kind in order:
        first = len(samples[kind])
        _caller_phase(
            logger, service, kind, stalled, seconds, min_calls, samples[kind], extra
        )
        phase = samples[kind][first:]
        extra["phase means"].append((kind, round(statistics.fmean(phase) / 1000, 2)))
    if profile is not None and not stalled:
        # A phase of its own: the profiler's overhead must not reach the figures.
        _caller_phase(logger, service, "stream", False, seconds, 0, [], {}, profile)
    result = {kind: summary(values) for kind, values in samples.items()}
    result["writer"] = extra
    return result


def _caller_phase(
    logger, service, kind, stalled, seconds, min_calls, samples, extra, profile=None
):
    """One phase: time calls until both ``seconds`` and ``min_calls`` are reached."""
    writer = handler = None
    if kind == "stream":
        writer = new_writer(service, "bench/caller/%d" % time.monotonic_ns())
        writer.open()
        if stalled:
            service.stall(True)
        handler = hooks.StreamHandler(writer, hooks.LogrusFormatter())
        logger.addHandler(handler)
    gc.collect()
    clock = time.perf_counter_ns
    info = logger.info
    fields = hooks.fields
    append = samples.append
    deadline = clock() + int(seconds * 1e9)
    done = 0
    if profile is not None:
        profile.enable()
    while done < min_calls or clock() < deadline:
        for _ in range(1000):
            start = clock()
            info("msg", extra=fields(a=1, b="two"))
            append(clock() - start)
        done += 1000
    if profile is not None:
        profile.disable()
    if writer is not None:
        logger.removeHandler(handler)
        service.stall(False)
        counters = writer.close()
        extra["dropped"] = extra.get("dropped", 0) + counters["dropped"]


def delivery(settings, service, workdir):
    """Lines from 4 threads until the service acknowledged the last one.

    The streaming run's clock stops when the service answered the write
    holding the end mark, a line logged once the 4 threads are done. The
    baseline's stops when every call returned and the ``FileHandler`` was
    closed. Runs alternate, streaming first; medians are reported.
    """
    total = settings["delivery_lines"]
    per_thread = total // 4
    logger = logging.getLogger("bench.delivery")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    stream_times, file_times, runs = [], [], []
    for run in range(settings["delivery_runs"]):
        key = "bench/delivery/%d" % run
        writer = new_writer(service, key)
        writer.open()
        handler = hooks.StreamHandler(writer, hooks.LogrusFormatter())
        logger.handlers[:] = [handler]
        gc.collect()
        began = _log_from_threads(logger, 4, per_thread)
        logger.info(END_MARK)
        answered = service.wait_mark(key, timeout=120)
        logger.handlers[:] = []
        counters = writer.close()
        if answered is None:
            raise RuntimeError("the end mark was never acknowledged")
        stream_times.append(answered - began)
        runs.append(
            {
                "seconds": answered - began,
                "acknowledged": service.lines(key),
                "logged": 4 * per_thread + 1,
                "dropped": counters["dropped"],
                "flushes": counters["flushes"],
            }
        )

        path = os.path.join(workdir, "delivery-%d.log" % run)
        file_handler = logging.FileHandler(path, encoding="utf-8")
        file_handler.setFormatter(hooks.LogrusFormatter())
        logger.handlers[:] = [file_handler]
        gc.collect()
        began = _log_from_threads(logger, 4, per_thread)
        logger.info(END_MARK)
        file_handler.close()
        file_times.append(time.perf_counter() - began)
        logger.handlers[:] = []
        os.unlink(path)
    measured, baseline = statistics.median(stream_times), statistics.median(file_times)
    lost = statistics.median(run["logged"] - run["acknowledged"] for run in runs)
    note = "%d lines, 4 threads, median of %d" % (4 * per_thread, len(runs))
    if lost:
        note += "; %d lines a run never reached the service" % lost
    row = Row("delivery", measured, baseline, "s", 1.5, note=note, complete=not lost)
    return [row], {"streaming runs": runs, "file seconds": file_times}


def _log_from_threads(logger, threads, per_thread):
    """Log ``per_thread`` lines from each of ``threads`` threads started together.

    Returns the ``perf_counter`` at which they were let go, once all are done.
    """
    go = threading.Event()

    def work(number):
        go.wait()
        info = logger.info
        for line in range(per_thread):
            info("delivery line", extra=hooks.fields(thread=number, line=line))

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    began = time.perf_counter()
    go.set()
    for worker in workers:
        worker.join()
    return began


def final_upload(settings, service):
    """Close a writer holding a full 5 MiB history, until the upload is answered.

    The writer is filled by appending lines, flushed live every 50 ms, until
    it starts dropping its oldest lines; once nothing is left unsent the
    clock starts and ``close()`` is called. It stops when the service
    answered the upload (the stream close that follows is not counted). The
    baseline POSTs the very bytes the service received, on a connection
    opened beforehand, and stops when the answer is read.
    """
    measured, baseline, sizes = [], [], []
    text = "bench upload line %s\n" % ("x" * 80)
    for run in range(settings["upload_runs"]):
        key = "bench/upload/%d" % run
        writer = new_writer(service, key, interval=0.05)
        writer.open()
        while writer.stats()["dropped"] == 0:
            for _ in range(1000):
                writer.append(text)
        if not wait_drained(writer):
            raise RuntimeError("the writer never sent its lines")
        gc.collect()
        began = time.perf_counter()
        writer.close()
        upload = service.upload(key)
        if upload is None:
            raise RuntimeError("no upload arrived")
        body, answered = upload
        measured.append(answered - began)
        sizes.append(len(body))

        conn = http.client.HTTPConnection(HOST, service.port, timeout=60)
        conn.connect()
        query = urllib.parse.urlencode({"accountID": ACCOUNT, "key": key + "/b"})
        headers = {"X-Harness-Token": TOKEN, "Content-Type": "application/json"}
        gc.collect()
        began = time.perf_counter()
        conn.request("POST", "/blob?" + query, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        baseline.append(time.perf_counter() - began)
        conn.close()
    note = "%.2f MiB NDJSON" % (statistics.median(sizes) / MIB)
    row = median_ms_row("final upload", measured, baseline, 1.5, note)
    details = {
        "upload ms": milliseconds(measured),
        "post ms": milliseconds(baseline),
        "bytes": sizes,
    }
    return [row], details


def api(settings, python, command, workdir):
    """``/healthz`` requests per second, engine against ``ThreadingHTTPServer``.

    The 8 client threads run in a child process of their own; runs alternate
    ABBA and the requests and seconds of each side are summed.
    """
    engine = Engine(command, workdir)
    server, port, _ = start_baseline_server([python], workdir, "json")
    try:
        engine.ready()
        wait_for_200(port, "/healthz", server)
        seconds = settings["api_seconds"]
        totals = {"engine": [0, 0.0, 0], "stdlib": [0, 0.0, 0]}
        order = ("engine", "stdlib", "stdlib", "engine") * settings["api_pairs"]
        order = order[: 2 * settings["api_pairs"]]
        for side in order:
            target = engine.port if side == "engine" else port
            result = run_load(python, target, seconds)
            totals[side][0] += result["requests"]
            totals[side][1] += result["seconds"]
            totals[side][2] += result["errors"]
    finally:
        engine.stop()
        stop_process(server, STOP_SECONDS)
    rates = {side: count / spent for side, (count, spent, _) in totals.items()}
    errors = totals["engine"][2] + totals["stdlib"][2]
    note = "8 keep-alive threads"
    if errors:
        note += "; %d failed requests" % errors
    row = Row(
        "API /healthz",
        rates["engine"],
        rates["stdlib"],
        "req/s",
        1.0,
        higher_is_better=True,
        note=note,
    )
    return [row], {"totals": totals}


def memory(settings, command, workdir, service):
    """The engine's resident memory: idle after ``/setup``, then with a big step.

    The step prints ``memory_lines`` lines (``seq``), which its writer
    streams to the service. Resident memory is sampled every 20 ms while the
    step runs; the peak reported is the larger of those samples and the
    kernel's high-water mark (VmHWM) read after the step.
    """
    lines = settings["memory_lines"]
    engine = Engine(command, workdir)
    pid = engine.process.pid
    try:
        engine.ready()
        log_config = {
            "url": service.url,
            "account_id": ACCOUNT,
            "token": TOKEN,
            "indirect_upload": True,
        }
        setup = {"le_log_key": "bench/engine", "log_config": log_config}
        status, answer = request(engine.port, "POST", "/setup", setup)
        if status != 200:
            raise RuntimeError("/setup answered %s %s" % (status, answer))
        time.sleep(1.5)
        idle = status_kib(pid, "VmRSS")

        step = {
            "id": "bench-step",
            "name": "seq",
            "log_key": "bench/step",
            "timeout": 600,
            "run": {"commands": ["seq 1 %d" % lines]},
        }
        samples = []
        running = threading.Event()
        running.set()

        def sample():
            while running.is_set():
                value = status_kib(pid, "VmRSS")
                if value is not None:
                    samples.append(value)
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        began = time.perf_counter()
        status, answer = request(engine.port, "POST", "/start_step", step)
        if status != 200:
            raise RuntimeError("/start_step answered %s %s" % (status, answer))
        status, answer = request(
            engine.port, "POST", "/poll_step", {"id": "bench-step"}, timeout=600
        )
        step_seconds = time.perf_counter() - began
        running.clear()
        sampler.join()
        if status != 200 or answer.get("exit_code") != 0:
            raise RuntimeError("the step failed: %s %s" % (status, answer))
        time.sleep(1.0)
        after = status_kib(pid, "VmRSS")
        peak = max(samples + [status_kib(pid, "VmHWM") or 0])
        streamed = service.lines("bench/step")
        request(engine.port, "POST", "/destroy", {})
        time.sleep(0.5)
        destroyed = status_kib(pid, "VmRSS")
    finally:
        engine.stop()
    note = "%d lines, %d acknowledged, step %.1fs" % (lines, streamed, step_seconds)
    complete = streamed >= lines
    rows = [
        Row(
            "memory after the lines",
            after / 1024,
            idle / 1024,
            "MiB",
            None,
            limit_delta=12,
            note=note,
            complete=complete,
        ),
        Row(
            "memory peak during",
            peak / 1024,
            idle / 1024,
            "MiB",
            None,
            limit_delta=12,
            note="VmHWM and 20 ms samples",
            complete=complete,
        ),
    ]
    details = {
        "idle_kib": idle,
        "after_kib": after,
        "peak_kib": peak,
        "after_destroy_kib": destroyed,
        "lines": lines,
        "acknowledged": streamed,
        "step_seconds": step_seconds,
    }
    return rows, details


def startup(settings, python, command, workdir):
    """Process start to the first 200: the engine against ``python -m http.server``.

    Both are started with the same interpreter and flags from a Popen call
    timed just before it, and polled every 2 ms; runs alternate and medians
    are reported.
    """
    flags = command[1:-1]
    engine_times, stdlib_times = [], []
    for run in range(settings["startup_runs"]):
        for side in ("engine", "stdlib") if run % 2 == 0 else ("stdlib", "engine"):
            folder = tempfile.mkdtemp(dir=workdir)
            if side == "engine":
                engine = Engine(command, folder)
                try:
                    engine_times.append(engine.ready())
                finally:
                    engine.stop()
            else:
                server, port, started = start_baseline_server(
                    [python] + flags, folder, "http.server"
                )
                try:
                    stdlib_times.append(wait_for_200(port, "/", server) - started)
                finally:
                    stop_process(server, STOP_SECONDS)
    note = "median of %d" % len(engine_times)
    row = median_ms_row("start-up", engine_times, stdlib_times, 2.0, note)
    details = {
        "engine ms": milliseconds(engine_times),
        "stdlib ms": milliseconds(stdlib_times),
    }
    return [row], details


# ------------------------------------------------------------------ report


def machine():
    """The machine the figures come from."""
    memory_kib = proc_kib("/proc/meminfo", "MemTotal")
    return {
        "cpu": cpu_model("unknown"),
        "cores": os.cpu_count(),
        "usable cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "memory": "%.1f GiB" % (memory_kib / MIB) if memory_kib else "unknown",
        "python": "%s (%s)" % (platform.python_version(), sys.executable),
        "system": platform.platform(),
        "load average": load_average(),
    }


def load_average():
    """The 1, 5 and 15 minute load averages, as /proc/loadavg gives them."""
    try:
        with open("/proc/loadavg", encoding="ascii") as loadavg:
            return " ".join(loadavg.read().split()[:3])
    except OSError:
        return "unknown"


def table(rows):
    """The rows as a Markdown table."""
    header = ("figure", "measured", "baseline", "ratio", "target", "met?")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if isinstance(row, str):
            lines.append("| %s | error | | | | no |" % row)
            continue
        lines.append(
            "| %s | %s | %s | %.2fx | %s | %s |"
            % (
                row.figure,
                _amount(row.measured, row.unit),
                _amount(row.baseline, row.unit),
                row.ratio,
                row.target_text(),
                "yes" if row.met else "NO" if row.complete else "NO, lines lost",
            )
        )
    return "\n".join(lines)


def _amount(value, unit):
    if value >= 100:
        return "%.0f %s" % (value, unit)
    return "%.3g %s" % (value, unit)


def run(args):
    """Measure the figures ``args`` asks for; returns the exit code."""
    settings = QUICK if args.quick else FULL
    wanted = args.only.split(",") if args.only else list(FIGURES)
    unknown = set(wanted) - set(FIGURES)
    if unknown:
        names = ", ".join(sorted(unknown))
        print("bench: unknown figures: %s" % names, file=sys.stderr)
        return 2
    quiet = logging.getLogger("logstream")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False

    info = machine()
    print("liteengine bench, %s mode" % ("quick" if args.quick else "full"))
    for name, value in info.items():
        print("  %-13s %s" % (name + ":", value))
    print(flush=True)

    python = args.python
    command = engine_command(python, args.pyz)
    print("engine: %s" % " ".join(command + ["server"]), flush=True)
    profile = cProfile.Profile() if args.profile else None
    workdir = tempfile.mkdtemp(prefix="le-bench-")
    service = FakeService().start()
    rows, details, failed = [], {}, False
    steps = {
        "caller": lambda: caller_cost(settings, service, profile),
        "delivery": lambda: delivery(settings, service, workdir),
        "upload": lambda: final_upload(settings, service),
        "api": lambda: api(settings, python, command, workdir),
        "memory": lambda: memory(settings, command, workdir, service),
        "startup": lambda: startup(settings, python, command, workdir),
    }
    try:
        for name in FIGURES:
            if name not in wanted:
                continue
            began, cpu = time.perf_counter(), service.cpu_seconds
            try:
                new_rows, new_details = steps[name]()
            except Exception as exc:
                failed = True
                rows.append(name)
                details[name] = {"error": "%s: %s" % (type(exc).__name__, exc)}
                print("bench: %s not measured: %s" % (name, exc), file=sys.stderr)
                continue
            rows.extend(new_rows)
            details[name] = new_details
            details[name]["bench seconds"] = round(time.perf_counter() - began, 2)
            details[name]["fake service cpu seconds"] = round(
                service.cpu_seconds - cpu, 3
            )
    finally:
        service.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    print(table(rows))
    print("  load average at the end: %s" % load_average())
    for row in rows:
        if not isinstance(row, str) and row.note:
            print("  %s: %s" % (row.figure, row.note))
    if profile is not None:
        print("\nprofile of the calling thread, caller cost with a healthy service:")
        pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(25)
    if args.json:
        document = {
            "mode": "quick" if args.quick else "full",
            "machine": info,
            "engine": command + ["server"],
            "figures": [
                row.as_json() if not isinstance(row, str) else {"figure": row}
                for row in rows
            ],
            "details": details,
            "load average at the end": load_average(),
        }
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(document, out, indent=2, default=str)
            out.write("\n")
    return 1 if failed else 0


def main(argv=None):
    """Parse the command line and run; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_serve_json"]:
        serve_json(int(argv[1]))
        return 0
    if argv[:1] == ["_load"]:
        port, seconds, threads = int(argv[1]), float(argv[2]), int(argv[3])
        print(json.dumps(load(port, "/healthz", threads, seconds)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, < 30 s")
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    parser.add_argument(
        "--only", metavar="NAMES", help="comma-separated: " + ",".join(FIGURES)
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile the caller-cost calls with a healthy service",
    )
    parser.add_argument(
        "--pyz",
        metavar="PATH",
        help="measure this built zipapp (python -S -E PATH) instead of the source",
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter for the engine and the baselines (default: this one)",
    )
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
