"""Streaming log lines to the log service, or to local files when there is none.

Three pieces, one idea each:

- ``HTTPClient`` speaks the log service's protocol (open, write, close, upload)
  and retries failed calls within a deadline; ``FileStore`` offers the same
  calls on a local folder.
- ``LiveWriter`` takes one key's lines from any thread, batches them to the
  service about once a second, keeps a capped history, and at close uploads
  that history and closes the stream.
- ``LogConfig`` and ``Deadlines`` are the settings both of them read.

Everything this module logs goes to the ``logstream`` logger, which the
streaming handler never streams back (see hooks.py).
"""

import collections
import contextlib
import dataclasses
import http.client
import itertools
import json
import logging
import functools
import os
import ssl
import threading
import time
import urllib.parse

log = logging.getLogger("logstream")

HISTORY_LIMIT = 5 * 1024 * 1024
LINE_LIMIT = 70 * 1024
TRUNCATED = "... (log line truncated)"
BATCH_LIMIT = 1024 * 1024

# What the JSON envelope (level, pos, time, args) adds to a line's text, at
# least: pending lines are counted with it before they are encoded, then
# measured exactly once they are.
LINE_OVERHEAD = 80


_machinery = threading.local()


def in_machinery():
    """True while this thread is flushing, uploading or closing a writer.

    The streaming handler drops records logged then, so nothing the
    machinery says can be streamed back into a writer.
    """
    return getattr(_machinery, "active", False)


@contextlib.contextmanager
def _machinery_at_work():
    outer = in_machinery()
    _machinery.active = True
    try:
        yield
    finally:
        _machinery.active = outer


# ---------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Where one key's lines go and how, as the runner's ``log_config`` says.

    An empty ``url`` means there is no log service: lines go to local files.
    """

    url: str = ""
    account_id: str = ""
    token: str = ""
    indirect_upload: bool = False
    trim_new_line_suffix: bool = False
    skip_opening_stream: bool = False
    skip_closing_stream: bool = False

    @classmethod
    def from_json(cls, obj, name="log_config"):
        """Read a decoded JSON object; ``None`` gives the defaults.

        Raises ``ValueError`` naming the field when a field has the wrong
        type. Unknown fields are ignored.
        """
        if obj is None:
            return cls()
        if not isinstance(obj, dict):
            raise ValueError("%s must be an object" % name)
        values = {}
        for field in dataclasses.fields(cls):
            value = obj.get(field.name)
            if value is None:
                continue
            if not isinstance(value, field.type):
                kind = "a string" if field.type is str else "a boolean"
                raise ValueError("%s.%s must be %s" % (name, field.name, kind))
            values[field.name] = value
        url = values.get("url", "").rstrip("/")
        if url and urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ValueError("%s.url must be an http or https URL" % name)
        values["url"] = url
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class Deadlines:
    """How many seconds each kind of log-service call may take, retries included."""

    open: float = 5.0
    write: float = 5.0
    upload: float = 15.0
    close: float = 5.0

    @classmethod
    def from_env(cls, environ):
        """Read ``LE_OPEN_TIMEOUT`` and its siblings; absent ones keep defaults.

        Raises ``ValueError`` naming the variable when a value is not a
        positive number.
        """
        values = {}
        for field in dataclasses.fields(cls):
            name = "LE_%s_TIMEOUT" % field.name.upper()
            text = environ.get(name, "").strip()
            if not text:
                continue
            try:
                seconds = float(text)
            except ValueError:
                seconds = -1.0
            if not 0 < seconds < 86400:
                raise ValueError("%s must be a positive number of seconds" % name)
            values[field.name] = seconds
        return cls(**values)


# ------------------------------------------------------------ retry policy


@dataclasses.dataclass(frozen=True)
class Retry:
    """When one call gives up, and how long it waits before trying again.

    Each failed try asks for ``next()``, a new policy with the wait doubled,
    or ``None`` when the deadline leaves no room for another try.
    """

    deadline: float
    wait: float = 0.1
    max_wait: float = 2.0

    @classmethod
    def within(cls, seconds):
        """A policy whose deadline is ``seconds`` from now."""
        return cls(deadline=time.monotonic() + seconds)

    def remaining(self):
        """Seconds left before the deadline, never below zero."""
        return max(0.0, self.deadline - time.monotonic())

    def next(self):
        """The policy for the following try, or ``None`` to give up."""
        if self.remaining() <= self.wait:
            return None
        return dataclasses.replace(self, wait=min(self.wait * 2, self.max_wait))


class LogServiceError(Exception):
    """A log-service call failed for good.

    ``status`` is the HTTP status when there was an answer, else ``None``.
    ``retryable`` is false for answers that trying again cannot fix (4xx).
    """

    def __init__(self, message, status=None, retryable=True):
        super().__init__(message)
        self.status = status
        self.retryable = retryable


# ------------------------------------------------------------------ lines


_quote = json.encoder.encode_basestring_ascii
_clock = (None, "")


def rfc3339(created):
    """Format a Unix time as RFC 3339 in UTC with microseconds."""
    global _clock
    second = int(created)
    cached, prefix = _clock
    if cached != second:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _clock = (second, prefix)
    return "%s.%06dZ" % (prefix, int((created - second) * 1e6))


def encode_line(pos, level, out, created):
    """One Line as compact ASCII JSON, the unit both the stream and uploads use."""
    return '{"level":"%s","pos":%d,"out":%s,"time":"%s","args":null}' % (
        level,
        pos,
        _quote(out),
        rfc3339(created),
    )


def truncate(out, limit=LINE_LIMIT):
    """Cut ``out`` to ``limit`` UTF-8 bytes, marked, keeping its newline.

    Returns the text unchanged when it fits.
    """
    if len(out) * 4 <= limit:
        return out
    data = out.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return out
    newline = "\n" if out.endswith("\n") else ""
    keep = limit - len(TRUNCATED.encode()) - len(newline)
    head = data[:keep].decode("utf-8", "ignore")
    return head + TRUNCATED + newline


# ---------------------------------------------------------------- clients


def new_client(config, store_dir, deadlines):
    """The client ``config`` asks for: HTTP to its URL, else the local store."""
    if config.url:
        return HTTPClient(config, deadlines)
    return FileStore(store_dir)


@functools.lru_cache(maxsize=None)
def _tls_context():
    """A client context that verifies servers against certifi's bundle."""
    import certifi

    context = ssl.create_default_context()
    context.load_verify_locations(cadata=certifi.contents())
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class HTTPClient:
    """Calls one log service, keeping a single connection alive between calls.

    Every call has its own deadline (``Deadlines``); 5xx answers and
    connection errors are retried inside it with exponential backoff, 4xx
    answers are not. A call that fails for good raises ``LogServiceError``.
    ``retries`` counts the tries beyond the first, for the writer's figures.

    Locking: ``_lock`` guards the connection and is held for a whole call,
    network included, so calls from several threads go one at a time.
    """

    def __init__(self, config, deadlines):
        parts = urllib.parse.urlsplit(config.url)
        self._scheme = parts.scheme
        self._netloc = parts.netloc
        self._prefix = parts.path.rstrip("/")
        self._config = config
        self._deadlines = deadlines
        self._tls = _tls_context() if parts.scheme == "https" else None
        self._conn = None
        self._lock = threading.Lock()
        self.retries = 0

    def open(self, key):
        """Open the stream for ``key``."""
        self._call("POST", "/stream", key, None, self._deadlines.open)

    def write(self, key, lines):
        """Append encoded lines to the open stream for ``key``."""
        body = ("[" + ",".join(lines) + "]").encode("ascii")
        self._call("PUT", "/stream", key, body, self._deadlines.write)

    def close(self, key, snapshot=False):
        """Close the stream for ``key``; ``snapshot`` as the protocol says."""
        extra = {"snapshot": "true"} if snapshot else None
        self._call("DELETE", "/stream", key, None, self._deadlines.close, extra)

    def upload(self, key, lines):
        """Upload encoded lines as NDJSON, through the service or by a link."""
        body = "".join(line + "\n" for line in lines).encode("ascii")
        retry = Retry.within(self._deadlines.upload)
        if not self._config.indirect_upload:
            self._call("POST", "/blob", key, body, retry)
            return
        answer = self._call("POST", "/blob/link/upload", key, None, retry)
        try:
            link = json.loads(answer)["link"]
            parts = urllib.parse.urlsplit(link)
            if parts.scheme not in ("http", "https"):
                raise ValueError(link)
        except (ValueError, KeyError, TypeError) as exc:
            raise LogServiceError("upload link answer unusable", retryable=False) from exc
        # The link is a signed URL, often on another host: it gets the bytes
        # but never the token.
        target = parts.path + ("?" + parts.query if parts.query else "")
        with self._lock:
            self._with_retry(
                lambda timeout: _one_shot(parts, target, body, self._tls, timeout),
                retry,
                "upload by link",
            )

    def disconnect(self):
        """Close the kept connection; the next call opens a new one."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _call(self, method, path, key, body, deadline, extra=None):
        """One protocol call, retried; returns the answer's body."""
        query = {"accountID": self._config.account_id, "key": key}
        query.update(extra or {})
        target = self._prefix + path + "?" + urllib.parse.urlencode(query)
        headers = {"X-Harness-Token": self._config.token}
        if body is not None:
            headers["Content-Type"] = "application/json"
        retry = deadline if isinstance(deadline, Retry) else Retry.within(deadline)
        with self._lock:
            return self._with_retry(
                lambda timeout: self._send(method, target, body, headers, timeout),
                retry,
                "%s %s" % (method, path),
            )

    def _with_retry(self, send, retry, what):
        """Run ``send(timeout)`` until it answers below 500 or ``retry`` gives up."""
        while True:
            try:
                status, data = send(max(retry.remaining(), 0.05))
                if status < 300:
                    return data
                error = LogServiceError(
                    "%s answered %d" % (what, status),
                    status=status,
                    retryable=status >= 500,
                )
            except (OSError, http.client.HTTPException) as exc:
                error = LogServiceError("%s failed: %s" % (what, _describe(exc)))
            following = retry.next() if error.retryable else None
            if following is None:
                raise error
            self.retries += 1
            log.debug("log service call retried", extra={"fields": {"call": what}})
            time.sleep(retry.wait)
            retry = following

    def _send(self, method, target, body, headers, timeout):
        """One request on the kept connection; drops the connection on error."""
        if self._conn is None:
            self._conn = _connection(self._scheme, self._netloc, self._tls, timeout)
        conn = self._conn
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        try:
            conn.request(method, target, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except BaseException:
            conn.close()
            self._conn = None
            raise
        if response.will_close:
            conn.close()
            self._conn = None
        return response.status, data


def _connection(scheme, netloc, tls, timeout):
    if scheme == "https":
        return http.client.HTTPSConnection(netloc, timeout=timeout, context=tls)
    return http.client.HTTPConnection(netloc, timeout=timeout)


def _one_shot(parts, target, body, tls, timeout):
    """PUT ``body`` on a connection of its own, closed afterwards."""
    conn = _connection(parts.scheme, parts.netloc, tls, timeout)
    try:
        conn.request("PUT", target, body=body)
        response = conn.getresponse()
        response.read()
        return response.status, b""
    finally:
        conn.close()


def _describe(exc):
    """A short, secret-free description of a network error."""
    return type(exc).__name__ + (": %s" % exc if str(exc) else "")


class FileStore:
    """The log service's calls on a local folder: one NDJSON file per key.

    Live writes append to ``<folder>/<key>.ndjson`` so the file can be
    followed while it grows; the upload replaces it with the whole history.
    A key that would leave the folder is refused with a ``LogServiceError``
    that is not retryable.
    """

    def __init__(self, folder):
        self.folder = os.path.realpath(folder)
        self.retries = 0

    def path_for(self, key):
        """The file for ``key``, or ``LogServiceError`` if it would leave the folder."""
        reason = _bad_key(key)
        if reason is None:
            path = os.path.join(self.folder, key + ".ndjson")
            parent = os.path.realpath(os.path.dirname(path))
            if parent != self.folder and not parent.startswith(self.folder + os.sep):
                reason = "it leads outside the log folder"
        if reason is not None:
            raise LogServiceError("log key refused: %s" % reason, retryable=False)
        return path

    def open(self, key):
        """Start an empty file for ``key``."""
        self._write(key, "", "w")

    def write(self, key, lines):
        """Append encoded lines to the file for ``key``."""
        self._write(key, "".join(line + "\n" for line in lines), "a")

    def close(self, key, snapshot=False):
        """Nothing to close for a file."""

    def disconnect(self):
        """Nothing is kept open between calls."""

    def upload(self, key, lines):
        """Replace the file for ``key`` with ``lines``, atomically."""
        path = self.path_for(key)
        temporary = path + ".part"
        try:
            self._write(key, "".join(line + "\n" for line in lines), "w", temporary)
            os.replace(temporary, path)
        except OSError as exc:
            raise LogServiceError("log file not replaced: %s" % _describe(exc))

    def _write(self, key, text, mode, path=None):
        path = path or self.path_for(key)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, mode, encoding="ascii") as file:
                file.write(text)
        except OSError as exc:
            raise LogServiceError("log file not written: %s" % _describe(exc))


def _bad_key(key):
    """Why ``key`` cannot name a file in the store, or ``None`` if it can."""
    if not key:
        return "it is empty"
    if any(ord(char) < 32 or ord(char) == 127 for char in key):
        return "it holds control characters"
    if key.startswith(("/", "\\")) or os.path.isabs(key):
        return "it is an absolute path"
    parts = key.replace("\\", "/").split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "it holds an empty, '.' or '..' part"
    if any(len(part.encode("utf-8", "surrogatepass")) > 200 for part in parts):
        return "a part of it is longer than 200 bytes"
    return None


# ----------------------------------------------------------------- writer


class LiveWriter:
    """Streams one key's lines live and uploads their history at close.

    ``append`` may be called from any thread, including from inside a
    logging handler: it never touches the network and never raises. About
    once a second (``interval``) a ``threading.Timer`` flushes what is
    pending in one write; a write that fails is sent again, in order, by a
    later flush. ``close`` flushes, uploads the history and closes the
    stream, each call bounded by its deadline and each attempted even when
    the one before failed.

    The history keeps the newest lines up to ``limit`` bytes of encoded
    NDJSON and drops the oldest first; each line's text is capped at 70 KiB.
    Lines are given their ``pos`` when they are encoded, so dropped lines
    leave no gap.

    Locking: ``_lock`` guards the pending lines, the history, the counters
    and the timer. It is a leaf: while it is held nothing logs, touches the
    network, or takes another lock, so a thread that logs can never wait on
    the service or deadlock against a flush. ``_send_lock`` keeps one flush,
    upload or close at a time; it may be held while logging, because logging
    only ever reaches ``append``, which never takes it.
    """

    def __init__(self, client, key, config, interval=1.0, limit=HISTORY_LIMIT):
        self.key = key
        self._client = client
        self._config = config
        self._interval = interval
        self._limit = limit
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._pending = collections.deque()
        self._pending_size = 0
        self._history = collections.deque()
        self._history_size = 0
        self._first_pos = 0
        self._next_pos = 0
        self._live_pos = 0
        self._unsent_since = None
        self._timer = None
        self._closed = False
        self._opened = config.skip_opening_stream
        self._live = True
        self._failing = False
        self._counts = dict.fromkeys(
            (
                "lines",
                "sent",
                "bytes_sent",
                "flushes",
                "failed_flushes",
                "dropped",
                "truncated",
                "uploads",
                "failed_uploads",
            ),
            0,
        )

    # -- any thread

    def append(self, out, level="info", created=None):
        """Queue one line; returns at once and never raises."""
        if created is None:
            created = time.time()
        cut = truncate(out)
        if self._config.trim_new_line_suffix and cut.endswith("\n"):
            cut = cut[:-1]
        with self._lock:
            if self._closed:
                return
            self._pending.append((level, cut, created))
            self._pending_size += len(cut) + LINE_OVERHEAD
            self._counts["lines"] += 1
            if self._unsent_since is None:
                self._unsent_since = created
            if cut is not out:
                self._counts["truncated"] += 1
            if self._pending_size + self._history_size > self._limit:
                self._shed()
            if self._timer is None:
                self._arm(self._interval)

    def stats(self):
        """The writer's counters, plus the age in seconds of the oldest unsent line."""
        with self._lock:
            figures = dict(self._counts)
            figures["retries"] = self._client.retries
            oldest = self._unsent_since
        figures["oldest_unsent_age"] = 0.0 if oldest is None else time.time() - oldest
        return figures

    @property
    def failing(self):
        """True while the last flush or open failed."""
        return self._failing

    # -- network side

    def open(self):
        """Open the stream unless someone else did; a failure is only a warning."""
        if self._config.skip_opening_stream:
            return
        with self._send_lock, _machinery_at_work():
            self._open()

    def close(self):
        """Flush, upload, close the stream; never raises. Returns ``stats()``.

        A second call does nothing more.
        """
        with self._lock:
            already_closed, self._closed = self._closed, True
            timer, self._timer = self._timer, None
        if already_closed:
            return self.stats()
        if timer is not None:
            timer.cancel()
        with self._send_lock, _machinery_at_work():
            self._flush()
            if not self._config.skip_closing_stream:
                if not self._config.skip_opening_stream:
                    self._upload()
                self._close_stream()
            self._client.disconnect()
        return self.stats()

    def _arm(self, delay):
        timer = threading.Timer(delay, self._tick)
        timer.daemon = True
        self._timer = timer
        timer.start()

    def _tick(self):
        with self._send_lock, _machinery_at_work():
            with self._lock:
                self._timer = None
                if self._closed:
                    return
            self._flush()
            with self._lock:
                behind = self._pending or self._live_pos < self._next_pos
                if behind and self._live and not self._closed and self._timer is None:
                    self._arm(self._interval)

    def _open(self):
        try:
            self._client.open(self.key)
        except LogServiceError as exc:
            self._failing = True
            if not exc.retryable:
                self._live = False
            log.warning(
                "log stream not opened",
                extra={"fields": {"key": self.key, "error": str(exc)}},
            )
            return
        self._opened = True

    def _flush(self):
        """Encode what is pending, then send every line not yet acknowledged."""
        self._encode_pending()
        if not self._live:
            return
        if not self._opened:
            self._open()
            if not self._opened:
                self._count("failed_flushes")
                return
        while True:
            with self._lock:
                start = max(self._live_pos, self._first_pos)
                batch = _take(self._history, start - self._first_pos, BATCH_LIMIT)
            if not batch:
                return
            self._count("flushes")
            try:
                self._client.write(self.key, batch)
            except LogServiceError as exc:
                self._flush_failed(exc)
                return
            with self._lock:
                self._live_pos = start + len(batch)
                self._counts["sent"] += len(batch)
                self._counts["bytes_sent"] += sum(len(line) + 1 for line in batch) + 1
                if not self._pending and self._live_pos == self._next_pos:
                    self._unsent_since = None
            if self._failing:
                self._failing = False
                log.info("log stream recovered", extra={"fields": {"key": self.key}})

    def _flush_failed(self, exc):
        self._count("failed_flushes")
        self._failing = True
        if exc.retryable:
            log.warning(
                "log stream flush failed",
                extra={"fields": {"key": self.key, "error": str(exc)}},
            )
            return
        self._live = False
        log.warning(
            "log stream refused lines, live writes stopped until close",
            extra={"fields": {"key": self.key, "error": str(exc)}},
        )

    def _encode_pending(self):
        """Give pending lines their ``pos`` and move them into the history."""
        with self._lock:
            pending, self._pending = self._pending, collections.deque()
            self._pending_size = 0
            first = self._next_pos
            self._next_pos += len(pending)
        encoded = [
            encode_line(pos, level, out, created)
            for pos, (level, out, created) in enumerate(pending, first)
        ]
        with self._lock:
            self._history.extend(encoded)
            self._history_size += sum(len(line) + 1 for line in encoded)
            if self._pending_size + self._history_size > self._limit:
                self._shed()

    def _shed(self):
        """Drop the oldest lines until the history fits. Caller holds ``_lock``."""
        while self._history and self._pending_size + self._history_size > self._limit:
            self._history_size -= len(self._history.popleft()) + 1
            self._first_pos += 1
            self._counts["dropped"] += 1
        while self._pending and self._pending_size > self._limit:
            self._pending_size -= len(self._pending.popleft()[1]) + LINE_OVERHEAD
            self._counts["dropped"] += 1

    def _upload(self):
        with self._lock:
            lines = list(self._history)
        try:
            self._client.upload(self.key, lines)
        except LogServiceError as exc:
            self._count("failed_uploads")
            log.warning(
                "log upload failed",
                extra={"fields": {"key": self.key, "error": str(exc)}},
            )
            return
        self._count("uploads")

    def _close_stream(self):
        try:
            self._client.close(self.key, snapshot=self._config.skip_opening_stream)
        except LogServiceError as exc:
            log.warning(
                "log stream not closed",
                extra={"fields": {"key": self.key, "error": str(exc)}},
            )

    def _count(self, name):
        with self._lock:
            self._counts[name] += 1


def _take(history, start, limit):
    """Up to ``limit`` bytes of lines from ``history``, beginning at index ``start``."""
    batch = []
    size = 2
    for line in itertools.islice(history, start, None):
        size += len(line) + 1
        if batch and size > limit:
            break
        batch.append(line)
    return batch


# ---------------------------------------------------------------- figures


class StreamMetrics:
    """Writers' counters summed by kind of stream, for scraping.

    A writer is registered when it is made and retired with its final
    counters when it is closed; totals only ever go up, across any number of
    stages. Locking: ``_lock`` guards the totals and the set of open writers
    and is held only to copy or add numbers; a writer's ``stats()`` is read
    after it is released.
    """

    COUNTERS = (
        "lines",
        "sent",
        "bytes_sent",
        "flushes",
        "failed_flushes",
        "retries",
        "dropped",
        "truncated",
        "uploads",
        "failed_uploads",
    )

    def __init__(self, kinds=("engine", "step")):
        self._lock = threading.Lock()
        self._totals = {kind: dict.fromkeys(self.COUNTERS, 0) for kind in kinds}
        self._open = {kind: set() for kind in kinds}

    def opened(self, kind, writer):
        """Count ``writer`` among the open streams of ``kind``."""
        with self._lock:
            self._open[kind].add(writer)

    def closed(self, kind, writer, figures):
        """Retire ``writer``, adding its final ``figures`` to the totals."""
        with self._lock:
            if writer not in self._open[kind]:
                return
            self._open[kind].discard(writer)
            totals = self._totals[kind]
            for name in self.COUNTERS:
                totals[name] += figures.get(name, 0)

    def snapshot(self):
        """Per kind: the counters, ``open`` streams and ``oldest_unsent_age``."""
        with self._lock:
            totals = {kind: dict(counts) for kind, counts in self._totals.items()}
            writers = {kind: list(found) for kind, found in self._open.items()}
        for kind, found in writers.items():
            figures = totals[kind]
            figures["open"] = len(found)
            figures["oldest_unsent_age"] = 0.0
            for writer in found:
                live = writer.stats()
                for name in self.COUNTERS:
                    figures[name] += live[name]
                age = max(figures["oldest_unsent_age"], live["oldest_unsent_age"])
                figures["oldest_unsent_age"] = age
        return totals
