"""The bridge from Python's logging to a live writer.

``LogrusFormatter`` renders a record as one logrus-style text line, with
secrets masked; the console and the stream both use it. ``StreamHandler``
formats each record and hands the line to a ``logstream.LiveWriter``, which
queues it and returns at once: logging never waits on the network.
"""

import codecs
import json
import logging
import threading
import time

import logstream

MASK = "**************"
MIN_SECRET = 3

_SAFE = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._/@^+"
)


def fields(**values):
    """Structured fields for a record: ``log.info("done", extra=fields(n=1))``."""
    return {"fields": values}


def level_name(levelno):
    """The protocol's spelling of a logging level: debug ... fatal."""
    if levelno >= logging.CRITICAL:
        return "fatal"
    if levelno >= logging.ERROR:
        return "error"
    if levelno >= logging.WARNING:
        return "warning"
    if levelno >= logging.INFO:
        return "info"
    return "debug"


LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
}


def parse_level(name):
    """The logging level for a protocol level name; ``ValueError`` if unknown."""
    try:
        return LEVELS[name.strip().lower()]
    except KeyError:
        raise ValueError(
            "unknown level %r (use debug, info, warning, error, fatal)" % name
        )


class Masker:
    """A set of secrets to hide, safe to read and update from any thread.

    Secrets shorter than three characters are ignored: they would mask
    everything. A secret spanning several lines is also masked line by line.
    """

    def __init__(self, secrets=()):
        self._secrets = ()
        self.update(secrets)

    def update(self, secrets):
        """Replace the set of secrets."""
        found = set()
        for secret in secrets:
            found.add(secret)
            found.update(secret.splitlines())
        kept = (secret.strip("\r") for secret in found)
        # Longest first, so a secret inside another is not masked half-way.
        self._secrets = tuple(
            sorted((s for s in kept if len(s) >= MIN_SECRET), key=len, reverse=True)
        )

    @property
    def secrets(self):
        """The secrets being masked, longest first."""
        return self._secrets

    def mask(self, text):
        """``text`` with every secret replaced by the mask.

        Where secrets overlap, the mask covers all of them, so no part of
        one is left showing beside another.
        """
        spans = []
        for secret in self._secrets:
            start = text.find(secret)
            while start != -1:
                spans.append((start, start + len(secret)))
                start = text.find(secret, start + 1)
        if not spans:
            return text
        spans.sort()
        parts, shown = [], 0
        for start, end in spans:
            if start > shown:
                parts.append(text[shown:start])
            if start >= shown:
                parts.append(MASK)
            shown = max(shown, end)
        parts.append(text[shown:])
        return "".join(parts)


def quote(value):
    """A value as logrus writes it: bare when plain, else quoted and escaped."""
    text = value if isinstance(value, str) else str(value)
    if text and all(char in _SAFE for char in text):
        return text
    return json.dumps(text, ensure_ascii=False)


class LogrusFormatter(logging.Formatter):
    """Renders ``time="..." level=info msg="..." key=value`` with secrets masked.

    Structured fields come from the record's ``fields`` attribute (see
    ``fields``); an exception's traceback becomes the ``error`` field, kept on
    one line.
    """

    def __init__(self, masker=None):
        super().__init__()
        self._masker = masker
        self._clock = (None, "")

    def format(self, record):
        """The record as one line of text, without a trailing newline.

        The text is kept on the record, so the console and the stream,
        formatting the same record with the same masker, pay for it once.
        """
        kept = record.__dict__.get("_logrus")
        if kept is not None and kept[0] is self._masker:
            return kept[1]
        parts = [
            'time="%s"' % self._time(record.created),
            "level=" + level_name(record.levelno),
            "msg=" + quote(record.getMessage()),
        ]
        for key, value in (getattr(record, "fields", None) or {}).items():
            parts.append("%s=%s" % (key, quote(value)))
        if record.exc_info:
            parts.append("error=" + quote(self.formatException(record.exc_info)))
        text = " ".join(parts)
        if self._masker is not None:
            text = self._masker.mask(text)
        record._logrus = (self._masker, text)
        return text

    def _time(self, created):
        # One tuple, swapped whole, so threads never pair a second with
        # another second's text.
        second = int(created)
        cached, stamp = self._clock
        if cached != second:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
            self._clock = (second, stamp)
        return stamp


_inside = threading.local()


class StreamHandler(logging.Handler):
    """Hands every record, formatted, to a live writer; never blocks or raises.

    Records from the streaming machinery itself (the ``logstream`` logger, or
    any thread while it flushes or closes a writer) are skipped, and so is a
    record logged while this handler is already emitting on the same thread:
    nothing can loop back into the writer.
    """

    def __init__(self, writer, formatter, level=logging.NOTSET):
        super().__init__(level)
        self.writer = writer
        self.setFormatter(formatter)

    def handle(self, record):
        """Filter and emit, without ``logging.Handler``'s handler-wide lock.

        ``emit`` is safe from any thread by itself (the writer has its own
        short lock), so busy threads do not queue on a lock they need not
        share.
        """
        kept = self.filter(record)
        if isinstance(kept, logging.LogRecord):
            record = kept
        if kept:
            self.emit(record)
        return kept

    def carries(self, record):
        """Whether ``record`` would be streamed (its level, not the machinery's)."""
        return (
            record.levelno >= self.level
            and not record.name.startswith("logstream")
            and not logstream.in_machinery()
        )

    def emit(self, record):
        """Format ``record`` and queue it on the writer."""
        if not self.carries(record) or getattr(_inside, "active", False):
            return
        _inside.active = True
        try:
            line = self.format(record) + "\n"
            self.writer.append(line, level_name(record.levelno), record.created)
        except Exception:
            self.handleError(record)
        finally:
            _inside.active = False


class QuietWhileStreaming(logging.Filter):
    """A console filter that leaves to the stream what the stream carries.

    A record is still printed when no stream is attached (``handler`` is
    ``None``), while the stream is failing, or when the stream would not
    carry it: nothing is seen nowhere.
    """

    def __init__(self):
        super().__init__()
        self.handler = None

    def filter(self, record):
        """True to print ``record`` on the console."""
        handler = self.handler
        if handler is None or handler.writer.failing:
            return True
        return not handler.carries(record)


class OutputFeed:
    """Turns a process's output bytes into masked lines on a live writer.

    Bytes may arrive in any pieces: a multi-byte character or a secret split
    across two reads is put back together before masking, because masking
    and handing over happen only on whole lines. A line still without its
    newline is held until the newline comes, ``finish`` is called, or it
    reaches the line cap. Every masked line is also given to ``echo``, if
    set, as UTF-8 bytes.
    """

    def __init__(self, writer, masker, echo=None, limit=logstream.LINE_LIMIT):
        self._writer = writer
        self._masker = masker
        self._echo = echo
        self._limit = limit
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""

    def feed(self, data):
        """Take the next piece of output."""
        text = self._held + self._decoder.decode(data)
        lines = text.split("\n")
        self._held = lines.pop()
        whole = [line + "\n" for line in lines]
        if len(self._held) > self._limit:
            # A secret cut here can show in part; see README "Limits".
            whole.append(self._held)
            self._held = ""
        self._hand_over(whole)

    def finish(self):
        """Hand over whatever is held; call once the process has exited."""
        rest = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        if rest:
            self._hand_over([rest])

    def _hand_over(self, lines):
        masked = [self._masker.mask(line) for line in lines]
        for line in masked:
            self._writer.append(line)
        if self._echo is not None and masked:
            self._echo("".join(masked).encode("utf-8", "replace"))
