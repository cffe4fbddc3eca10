"""liteengine: a small CI engine that a runner drives over HTTP on a build VM.

The command line has four uses:

- ``server`` serves the engine's HTTP API: ``/setup`` and ``/destroy`` for
  the stage, ``/start_step``, ``/poll_step`` and ``/stream_output`` for the
  steps it runs on the host, ``/healthz`` and ``/metrics``. Once a
  ``/setup`` names a log key, it streams every line it logs about itself to
  the log service under that key, as it streams each step's output.
- ``client`` drives a running engine, so nobody needs curl.
- ``certs`` makes a CA, a server and a client certificate for trying
  secure mode.
- ``--version`` prints the version ``/healthz`` reports, and the commit.

This module holds the configuration, the engine's state, the HTTP API and
the command line; ``logstream`` does the streaming and ``hooks`` turns log
records into lines.
"""

import argparse
import dataclasses
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

import bottle
import cheroot.errors
import cheroot.server
import cheroot.ssl.builtin
import cheroot.wsgi

import hooks
import logstream

__version__ = "0.1.0"

log = logging.getLogger("liteengine")

BODY_LIMIT = 10 * 1024 * 1024
SERVER_THREADS = 64
# How long a worker waits for a keep-alive caller's next request before
# handing the connection back to the selector.
KEEP_ALIVE_LINGER = 0.002
DEFAULT_BIND = ":9079"
DEFAULT_ADDR = "https://127.0.0.1:9079"
DEFAULT_ENTRYPOINT = ("sh", "-c")
# The longest a step's output waits for a busy writer, per read.
OUTPUT_WAIT = 1.0


# ----------------------------------------------------------- configuration


def read_env_file(path):
    """Read ``KEY=VALUE`` lines from ``path`` into a dict.

    Blank lines and lines starting with ``#`` are skipped, an ``export``
    prefix is allowed, and one pair of matching quotes around a value is
    removed. Raises ``ValueError`` naming the line that cannot be read, and
    ``OSError`` when the file cannot be opened.
    """
    values = {}
    with open(path, encoding="utf-8") as file:
        for number, raw in enumerate(file, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("export "):
                line = line[len("export ") :].lstrip()
            name, equals, value = line.partition("=")
            name, value = name.strip(), value.strip()
            if not equals or not name:
                raise ValueError("%s:%d: expected KEY=VALUE" % (path, number))
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            values[name] = value
    return values


def _level(environ, name, default):
    """Read a protocol level name (debug ... fatal), ``default`` when unset."""
    value = environ.get(name, "").strip().lower() or default
    try:
        hooks.parse_level(value)
    except ValueError as exc:
        raise ValueError("%s: %s" % (name, exc)) from None
    return value


def parse_bind(text):
    """Split ``HOST:PORT`` into ``(host, port)``; ``:PORT`` means all interfaces.

    ``[::1]:9079`` names an IPv6 host. Port 0 asks for any free port.
    """
    host, colon, port = text.strip().rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise ValueError("HTTPS_BIND must look like HOST:PORT or :PORT, not %r" % text)
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


@dataclasses.dataclass(frozen=True)
class Config:
    """The server's settings, read once at start and never changed."""

    bind: tuple = ("0.0.0.0", 9079)
    insecure: bool = False
    cert_file: str = ""
    key_file: str = ""
    client_cert_file: str = ""
    debug: bool = False
    trace: bool = False
    shared_dir: str = "/tmp/engine"
    flush_interval: float = 1.0
    deadlines: logstream.Deadlines = logstream.Deadlines()
    transport: logstream.Transport = logstream.Transport()
    stream_level: str = "debug"
    quiet: bool = False

    @classmethod
    def from_env(cls, environ):
        """Build the settings from an environment mapping.

        Raises ``ValueError`` with a message naming the variable at fault.
        """
        return cls(
            bind=parse_bind(environ.get("HTTPS_BIND") or DEFAULT_BIND),
            insecure=logstream.flag_setting(environ, "SERVER_INSECURE"),
            cert_file=environ.get("SERVER_CERT_FILE", ""),
            key_file=environ.get("SERVER_KEY_FILE", ""),
            client_cert_file=environ.get("CLIENT_CERT_FILE", ""),
            debug=logstream.flag_setting(environ, "DEBUG"),
            trace=logstream.flag_setting(environ, "TRACE"),
            shared_dir=shared_folder(environ),
            flush_interval=logstream.seconds_setting(environ, "LE_FLUSH_INTERVAL", 1.0),
            deadlines=logstream.Deadlines.from_env(environ),
            transport=logstream.Transport.from_env(environ),
            stream_level=_level(environ, "LE_LOG_LEVEL", "debug"),
            quiet=not logstream.flag_setting(environ, "LE_LOG_STDOUT", default=True),
        )


def shared_folder(environ):
    """The shared folder: ``$HARNESS_WORKDIR/tmp/engine``, else ``/tmp/engine``."""
    workdir = environ.get("HARNESS_WORKDIR", "")
    return os.path.join(workdir, "tmp", "engine") if workdir else "/tmp/engine"


def load_environment(env_file=None, environ=None):
    """The process environment merged over the optional env file's values.

    Like the runner's other engines, the file is read first and a variable
    already set in the real environment wins over the file's value.
    """
    merged = read_env_file(env_file) if env_file else {}
    merged.update(os.environ if environ is None else environ)
    return merged


def configure_logging(config, masker):
    """Send every record to stderr in logrus' text format, masked by ``masker``.

    The root logger passes every level, so a streaming handler attached
    later sees debug records too; the console handler keeps its own level
    (info, or debug with DEBUG or TRACE).
    """
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(hooks.LogrusFormatter(masker))
    console.setLevel(logging.DEBUG if config.debug or config.trace else logging.INFO)
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    root.addHandler(console)
    return console


def _latency(started):
    """Milliseconds since ``started`` (a ``time.monotonic`` value), as ``12ms``."""
    return "%dms" % round((time.monotonic() - started) * 1000)


# ---------------------------------------------------------------- requests


class ApiError(Exception):
    """A request the engine answers with ``status`` and ``{"error_msg": ...}``."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


def read_json_object(environ, limit=BODY_LIMIT):
    """Read a request body as a JSON object; an empty body is ``{}``.

    Raises ``ApiError`` with 413 for a body over ``limit`` bytes and 400 for
    one that is not UTF-8, not JSON or not an object. A JSON ``null`` body
    counts as empty, as it does for the runner's Go decoder.
    """
    raw = _read_body(environ, limit)
    if not raw.strip():
        return {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "body is not valid UTF-8") from None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise ApiError(400, "body is not valid JSON") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(400, "body must be a JSON object")
    return value


def _read_body(environ, limit):
    """The raw body, refused with 413 before it grows past ``limit`` bytes."""
    stream = environ["wsgi.input"]
    too_large = ApiError(413, "body is larger than %d bytes" % limit)
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return _read_chunked(stream, limit, too_large)
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise ApiError(400, "Content-Length is not a number") from None
    if length < 0:
        raise ApiError(400, "Content-Length is negative")
    if length > limit:
        raise too_large
    parts = []
    while length > 0:
        part = stream.read(min(length, 64 * 1024))
        if not part:
            raise ApiError(400, "body ended before Content-Length bytes")
        parts.append(part)
        length -= len(part)
    return b"".join(parts)


def _read_chunked(stream, limit, too_large):
    """Read a chunked body, at most ``limit`` + 1 bytes of it."""
    # cheroot reads each chunk whole, so a client declaring one huge chunk
    # would be buffered in full before we could refuse it. Capping the wire
    # bytes (data plus framing, with room for chunks as small as 64 bytes)
    # makes cheroot refuse such a chunk before reading it.
    if isinstance(stream, cheroot.server.ChunkedRFile):
        stream.maxlen = limit + limit // 8
    parts, size = [], 0
    try:
        while size <= limit:
            part = stream.read(min(limit + 1 - size, 64 * 1024))
            if not part:
                return b"".join(parts)
            parts.append(part)
            size += len(part)
    except cheroot.errors.MaxSizeExceeded:
        raise too_large from None
    except ValueError:
        raise ApiError(400, "body is not valid chunked encoding") from None
    except OSError as exc:
        # cheroot refuses an oversized chunk with a bare OSError (no errno);
        # real socket failures always carry one.
        if type(exc) is OSError and exc.errno is None:
            raise too_large from None
        raise
    raise too_large


def _optional(obj, name, kind, kind_name):
    """``obj[name]`` checked to be ``kind``; ``None`` when absent or null."""
    value = obj.get(name)
    if value is not None and not isinstance(value, kind):
        raise ValueError("%s must be %s" % (name, kind_name))
    return value


def _string_map(obj, name):
    value = _optional(obj, name, dict, "an object of strings") or {}
    if not all(isinstance(item, str) for item in value.values()):
        raise ValueError("%s must be an object of strings" % name)
    for pair in value.items():
        _check_text(pair, name)
    return dict(value)


def _string_list(obj, field, name=None):
    value = obj.get(field)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise ValueError("%s must be a list of strings" % (name or field))
    _check_text(value, name or field)
    return value


def _checked(text, name):
    _check_text((text,), name)
    return text


def _check_text(texts, name):
    """Refuse what no process argument, variable or path can carry."""
    for text in texts:
        if "\x00" in text:
            raise ValueError("%s must not hold NUL characters" % name)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("%s must be valid Unicode text" % name) from None


@dataclasses.dataclass(frozen=True)
class SetupRequest:
    """The parts of the runner's ``/setup`` body the engine uses.

    ``network``, ``volumes`` and ``files`` are checked for their JSON type
    but not used. ``le_log_config``, when given, replaces ``log_config`` for
    the engine's own stream only; ``le_log_level`` (from ``log_config``) is
    the lowest level that stream carries, empty for the server's default.
    """

    envs: dict = dataclasses.field(default_factory=dict)
    secrets: tuple = ()
    le_log_key: str = ""
    log_config: logstream.LogConfig = logstream.LogConfig()
    le_log_config: logstream.LogConfig = None
    le_log_level: str = ""

    @classmethod
    def from_json(cls, obj):
        """Read a decoded JSON object; raises ``ValueError`` naming a bad field."""
        key = _optional(obj, "le_log_key", str, "a string") or ""
        _optional(obj, "network", dict, "an object")
        _optional(obj, "volumes", list, "a list")
        _optional(obj, "files", list, "a list")
        log_config = logstream.LogConfig.from_json(obj.get("log_config"))
        level = (obj.get("log_config") or {}).get("le_log_level") or ""
        if not isinstance(level, str):
            raise ValueError("log_config.le_log_level must be a string")
        if level:
            try:
                hooks.parse_level(level)
            except ValueError as exc:
                raise ValueError("log_config.le_log_level: %s" % exc) from None
        own = obj.get("le_log_config")
        return cls(
            envs=_string_map(obj, "envs"),
            secrets=tuple(_string_list(obj, "secrets")),
            le_log_key=key,
            log_config=log_config,
            le_log_config=logstream.LogConfig.from_json(own, "le_log_config")
            if own is not None
            else None,
            le_log_level=level,
        )


# ------------------------------------------------------------------- steps


@dataclasses.dataclass(frozen=True)
class StepRequest:
    """The parts of the runner's ``/start_step`` body the engine uses."""

    id: str
    name: str = ""
    log_key: str = ""
    environment: dict = dataclasses.field(default_factory=dict)
    secrets: tuple = ()
    working_dir: str = ""
    timeout: float = 0.0
    commands: tuple = ()
    entrypoint: tuple = ()
    output_vars: tuple = ()
    log_config: logstream.LogConfig = None

    @classmethod
    def from_json(cls, obj):
        """Read a decoded JSON object; raises ``ValueError`` naming a bad field."""
        step_id = _optional(obj, "id", str, "a string")
        if not step_id:
            raise ValueError("id must be a non-empty string")
        environment = _string_map(obj, "environment")
        run = _optional(obj, "run", dict, "an object") or {}
        commands = _string_list(run, "commands", "run.commands")
        entrypoint = _string_list(run, "entrypoint", "run.entrypoint")
        timeout = obj.get("timeout")
        if timeout is None:
            timeout = 0
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise ValueError("timeout must be a number of seconds")
        if not 0 <= timeout < 10**9:
            raise ValueError("timeout must be between 0 and 1e9 seconds")
        config = obj.get("log_config")
        return cls(
            id=step_id,
            name=_optional(obj, "name", str, "a string") or "",
            log_key=_optional(obj, "log_key", str, "a string") or "",
            environment=environment,
            secrets=tuple(_string_list(obj, "secrets")),
            working_dir=_checked(
                _optional(obj, "working_dir", str, "a string") or "", "working_dir"
            ),
            timeout=float(timeout),
            commands=tuple(commands),
            entrypoint=tuple(entrypoint),
            output_vars=tuple(_string_list(obj, "output_vars")),
            log_config=None
            if config is None
            else logstream.LogConfig.from_json(config),
        )


def read_exports(path):
    """``NAME=value`` lines from a file a step wrote; a missing file is empty."""
    found = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            for line in file:
                name, equals, value = line.rstrip("\r\n").partition("=")
                name = name.strip()
                if name.startswith("export "):
                    name = name[len("export ") :].strip()
                if equals and name:
                    found[name] = value
    except OSError:
        pass
    return found


class Step:
    """One step: its process, its output on a live writer, and its result.

    ``run`` is the whole life of the step and runs on a thread of its own:
    start the process, feed its output to the writer line by line, wait,
    collect the exports, close the writer, then set ``done``. Nothing else
    touches the process except ``kill``, which may come from any thread.
    """

    def __init__(self, request, env, folder, writer, masker, metrics):
        self.request = request
        self.done = threading.Event()
        self.exit_code = None
        self.error = ""
        self.outputs = {}
        self.envs = {}
        self.key = writer.key
        self.masker = masker
        self._env = env
        self._writer = writer
        self._metrics = metrics
        self._process = None
        self._stopped_because = None
        self._lock = threading.Lock()
        self.output_path = os.path.join(folder, "output.log")
        self.output_grew = threading.Condition()
        open(self.output_path, "wb").close()

    def answer(self):
        """The ``/poll_step`` answer; call once ``done`` is set."""
        return {
            "exited": True,
            "exit_code": self.exit_code,
            "error": self.error,
            "outputs": self.outputs,
            "envs": self.envs,
        }

    def kill(self, reason, exit_code=137):
        """Kill the step's whole process group, unless the step is over.

        The step is over once its output has ended and its result is
        settled: a shell that has exited while a background child still
        holds the output is not, and the child is killed with the group.
        ``reason`` becomes the step's error and ``exit_code`` its exit code.
        """
        with self._lock:
            if self.exit_code is not None:
                return
            process = self._process
            if self._stopped_because is None:
                self._stopped_because = (exit_code, reason)
        if process is not None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except OSError:
                pass

    def run(self):
        """The step's whole life; never raises."""
        started = time.monotonic()
        try:
            self._writer.open()
            self._execute()
        except Exception as exc:
            log.exception("step failed to run", extra=hooks.fields(id=self.request.id))
            self.exit_code, self.error = 255, "step failed to run: %s" % exc
        finally:
            counters = self._writer.close()
            self._metrics.closed("step", self._writer, counters)
            log.info(
                "step finished",
                extra=hooks.fields(
                    id=self.request.id,
                    exit_code=self.exit_code,
                    latency=_latency(started),
                    lines=counters.get("lines"),
                ),
            )
            with self.output_grew:
                self.done.set()
                self.output_grew.notify_all()

    def _execute(self):
        request = self.request
        workdir = request.working_dir or None
        if workdir and not os.path.isdir(workdir):
            self._not_started("working_dir %s does not exist" % workdir)
            return
        argv = list(request.entrypoint or DEFAULT_ENTRYPOINT)
        argv.append("\n".join(request.commands))
        with open(self.output_path, "ab", buffering=0) as spool:
            feed = hooks.OutputFeed(self._writer, self.masker, self._echo(spool))
            with self._lock:
                if self._stopped_because is not None:
                    self.exit_code, self.error = self._stopped_because
                    return
                try:
                    self._process = subprocess.Popen(
                        argv,
                        cwd=workdir,
                        env=self._env,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                except OSError as exc:
                    self._not_started("step not started: %s" % exc.strerror)
                    return
            timer = None
            if request.timeout > 0:
                message = "step timed out after %gs" % request.timeout
                timer = threading.Timer(request.timeout, self.kill, (message, 124))
                timer.daemon = True
                timer.start()
            try:
                self._pump(feed)
            finally:
                if timer is not None:
                    timer.cancel()
        self._settle()

    def _not_started(self, error):
        self.exit_code, self.error = 255, error
        log.warning(
            "step not started", extra=hooks.fields(id=self.request.id, error=error)
        )

    def _pump(self, feed):
        stream = self._process.stdout
        while True:
            data = stream.read1(64 * 1024)
            if not data:
                break
            # A step printing faster than a healthy service takes its lines
            # is slowed down rather than losing them; see README "Steps".
            self._writer.wait_for_room(OUTPUT_WAIT)
            feed.feed(data)
        feed.finish()
        stream.close()
        self._process.wait()

    def _echo(self, spool):
        def echo(data):
            spool.write(data)
            with self.output_grew:
                self.output_grew.notify_all()

        return echo

    def _settle(self):
        code = self._process.returncode
        with self._lock:
            if self._stopped_because is not None:
                self.exit_code, self.error = self._stopped_because
            else:
                self.exit_code = code if code >= 0 else 128 - code
                if code != 0:
                    self.error = "exit status %d" % self.exit_code
        self.outputs = {
            name: value
            for name, value in read_exports(self._env["DRONE_OUTPUT"]).items()
            if name in self.request.output_vars
        }
        self.envs = read_exports(self._env["DRONE_ENV"])

    def stream(self, offset):
        """Yield the step's masked output from byte ``offset`` until it exits."""
        with open(self.output_path, "rb") as spool:
            spool.seek(offset)
            while True:
                data = spool.read(64 * 1024)
                if data:
                    yield data
                    continue
                with self.output_grew:
                    if self.done.is_set():
                        rest = spool.read()
                        if rest:
                            yield rest
                        return
                    self.output_grew.wait(1.0)


# ------------------------------------------------------------------ engine


class EngineClosed(Exception):
    """Raised by ``Engine.setup`` once the engine has shut down."""


class Engine:
    """The stage's state: the writer carrying the engine's own logs, and steps.

    Every method may be called from any request thread. Locking:
    ``_stage_lock`` guards ``_writer``, ``_handler`` and ``_closed`` and
    makes setup and destroy run one at a time. It is held while a writer
    opens or closes, which calls the log service, each call bounded by its
    deadline; so ``/healthz`` and the step calls never take it. Logging
    while it is held is safe: the streaming handler only queues the line and
    never waits. ``_steps_lock`` guards the steps, the stage settings they
    start from and the secrets to mask; it is only held for quick updates.
    """

    def __init__(
        self,
        masker,
        shared_dir,
        deadlines,
        flush_interval=1.0,
        stream_level="debug",
        transport=None,
    ):
        self._masker = masker
        self._stream_level = stream_level
        self._transport = transport or logstream.Transport()
        self.console_filter = hooks.QuietWhileStreaming()
        self._shared_dir = shared_dir
        self._deadlines = deadlines
        self._flush_interval = flush_interval
        self._stage_lock = threading.Lock()
        self._writer = None
        self._handler = None
        self._closed = False
        self._steps_lock = threading.Lock()
        self._steps = {}
        self._stage = SetupRequest()
        self._stage_secrets = frozenset()
        self._step_secrets = set()
        self._refuse_steps = False
        self.metrics = logstream.StreamMetrics()

    def setup(self, request):
        """Mask the stage's secrets and, given a log key, stream our logs to it.

        A previous writer is closed first, so at most one streaming handler
        is ever attached. Opening the stream may fail; that is a warning,
        not an error, and the setup still succeeds.
        """
        started = time.monotonic()
        tokens = [request.log_config.token]
        if request.le_log_config is not None:
            tokens.append(request.le_log_config.token)
        transport = self._transport.with_envs(request.envs)
        proxies = transport.secrets()
        for problem in transport.problems():
            log.warning("proxy setting unusable", extra=hooks.fields(error=problem))
        with self._steps_lock:
            self._stage = request
            self._stage_secrets = frozenset(request.secrets + tuple(tokens) + proxies)
            self._masker.update(self._stage_secrets | self._step_secrets)
        with self._stage_lock:
            if self._closed:
                raise EngineClosed("the engine is shutting down")
            if request.le_log_key:
                self._stop_streaming()
                config = request.le_log_config or request.log_config
                level = request.le_log_level or self._stream_level
                self._start_streaming(request.le_log_key, config, level, transport)
            log.info(
                "setup done",
                extra=hooks.fields(latency=_latency(started), key=request.le_log_key),
            )

    def destroy(self):
        """Stop streaming: flush, upload and close the writer; harmless to repeat."""
        started = time.monotonic()
        with self._stage_lock:
            log.info("destroy started")
            self._stop_steps()
            counters = self._stop_streaming()
            with self._steps_lock:
                # Nothing of this stage outlives it: not its settings for a
                # step started without a new /setup, not its secrets.
                self._stage = SetupRequest()
                self._stage_secrets = frozenset()
                self._step_secrets.clear()
                self._masker.update(())
            log.info(
                "destroy done",
                extra=hooks.fields(**dict(counters, latency=_latency(started))),
            )

    def shutdown(self):
        """Close the writer for process exit; later setups are refused."""
        with self._stage_lock:
            self._closed = True
        with self._steps_lock:
            self._refuse_steps = True
        self.destroy()

    def start_step(self, request):
        """Start a step on a thread of its own and return at once.

        Raises ``ValueError`` when a step with the same id was started
        before, and ``EngineClosed`` once the engine is shutting down.
        """
        with self._steps_lock:
            if self._refuse_steps:
                raise EngineClosed("the engine is shutting down")
            if request.id in self._steps:
                raise ValueError("step %s was already started" % _short(request.id))
            step = self._new_step(request, self._stage, self._stage_secrets)
            self._steps[request.id] = step
            self._step_secrets.update(step.masker.secrets)
            self._masker.update(self._stage_secrets | self._step_secrets)
        log.info(
            "step started",
            extra=hooks.fields(id=request.id, name=request.name, key=step.key),
        )
        threading.Thread(target=step.run, name="step", daemon=True).start()

    def poll_step(self, step_id):
        """Wait until the step has exited; returns the ``/poll_step`` answer.

        Raises ``KeyError`` for an id no step was started with.
        """
        step = self._find(step_id)
        log.debug("step poll waiting", extra=hooks.fields(id=step_id))
        step.done.wait()
        return step.answer()

    def stream_output(self, step_id, offset):
        """The step's masked output from byte ``offset``, as it is printed.

        Raises ``KeyError`` for an id no step was started with.
        """
        return self._find(step_id).stream(offset)

    def running(self):
        """How many steps have started and not yet finished."""
        with self._steps_lock:
            return sum(not step.done.is_set() for step in self._steps.values())

    def _find(self, step_id):
        with self._steps_lock:
            return self._steps[step_id]

    def _new_step(self, request, stage, stage_secrets):
        digest = hashlib.sha256(request.id.encode("utf-8", "surrogatepass"))
        folder = os.path.join(self._shared_dir, "steps", digest.hexdigest()[:16])
        os.makedirs(folder, exist_ok=True)
        env = dict(os.environ)
        env.update(stage.envs)
        env.update(request.environment)
        for name, file_name in (("DRONE_OUTPUT", "output.env"), ("DRONE_ENV", "env")):
            env[name] = os.path.join(folder, file_name)
            open(env[name], "w").close()
        config = request.log_config or stage.log_config
        transport = self._transport.with_envs(stage.envs)
        client = logstream.new_client(
            config, self._shared_dir, self._deadlines, transport
        )
        key = request.log_key or request.id
        writer = logstream.LiveWriter(client, key, config, self._flush_interval)
        own = request.secrets + (config.token,)
        proxies = self._transport.with_envs(request.environment).secrets()
        masker = hooks.Masker(stage_secrets.union(own, proxies))
        self.metrics.opened("step", writer)
        return Step(request, env, folder, writer, masker, self.metrics)

    def _stop_steps(self):
        """Kill the steps still running, wait for their writers, forget them."""
        with self._steps_lock:
            steps, self._steps = list(self._steps.values()), {}
        for step in steps:
            step.kill("step killed: stage destroyed")
        deadlines = self._deadlines
        wait = deadlines.open + deadlines.write + deadlines.upload + deadlines.close
        for step in steps:
            if not step.done.wait(wait + 5):
                log.warning(
                    "step did not finish", extra=hooks.fields(id=step.request.id)
                )
        shutil.rmtree(os.path.join(self._shared_dir, "steps"), ignore_errors=True)

    def _start_streaming(self, key, config, level, transport):
        try:
            client = logstream.new_client(
                config, self._shared_dir, self._deadlines, transport
            )
            writer = logstream.LiveWriter(client, key, config, self._flush_interval)
        except Exception as exc:
            log.warning(
                "log stream not started", extra=hooks.fields(key=key, error=str(exc))
            )
            return
        writer.open()
        handler = hooks.StreamHandler(
            writer, hooks.LogrusFormatter(self._masker), hooks.parse_level(level)
        )
        self.metrics.opened("engine", writer)
        logging.getLogger().addHandler(handler)
        self.console_filter.handler = handler
        self._writer, self._handler = writer, handler

    def _stop_streaming(self):
        """Detach the handler, then close the writer; returns its counters."""
        handler, self._handler = self._handler, None
        writer, self._writer = self._writer, None
        self.console_filter.handler = None
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
        if writer is None:
            return {}
        # close() never raises: every failure inside it is a warning.
        counters = writer.close()
        self.metrics.closed("engine", writer, counters)
        return counters


# ---------------------------------------------------------------- HTTP API


# Each writer counter as a Prometheus counter: name and help text.
METRICS = (
    ("lines", "lines_total", "Lines handed to stream writers."),
    ("sent", "lines_sent_total", "Lines the log service acknowledged live."),
    ("bytes_sent", "bytes_sent_total", "Bytes of live writes acknowledged."),
    ("flushes", "flushes_total", "Live writes attempted."),
    ("failed_flushes", "flushes_failed_total", "Flushes that failed."),
    ("retries", "retries_total", "Log-service calls retried."),
    ("dropped", "lines_dropped_total", "Lines dropped by the history cap."),
    ("truncated", "lines_truncated_total", "Lines cut at the line cap."),
    ("uploads", "uploads_total", "Final uploads acknowledged."),
    ("failed_uploads", "uploads_failed_total", "Final uploads that failed."),
)


def render_metrics(snapshot, running_steps):
    """The figures as Prometheus text exposition, labelled by kind of stream."""
    out = []

    def family(name, kind, text, values):
        out.append("# HELP liteengine_%s %s" % (name, text))
        out.append("# TYPE liteengine_%s %s" % (name, kind))
        for stream, value in values:
            out.append('liteengine_%s{stream="%s"} %s' % (name, stream, value))

    for key, name, text in METRICS:
        counts = [(stream, figures[key]) for stream, figures in snapshot.items()]
        family("stream_" + name, "counter", text, counts)
    ages = [
        (stream, "%.3f" % figures["oldest_unsent_age"])
        for stream, figures in snapshot.items()
    ]
    family(
        "stream_oldest_unsent_seconds", "gauge", "Age of the oldest unsent line.", ages
    )
    opened = [(stream, figures["open"]) for stream, figures in snapshot.items()]
    family("streams_open", "gauge", "Stream writers open now.", opened)
    out.append("# HELP liteengine_steps_running Steps started and not finished.")
    out.append("# TYPE liteengine_steps_running gauge")
    out.append("liteengine_steps_running %d" % running_steps)
    return "\n".join(out) + "\n"


def _short(text, limit=100):
    """``text`` cut for an error message: a request cannot make answers huge."""
    return text if len(text) <= limit else text[:limit] + "..."


def _step_id(body):
    step_id = body.get("id")
    if not isinstance(step_id, str) or not step_id:
        raise ApiError(400, "id must be a non-empty string")
    return step_id


def _json_answer(status, obj):
    return bottle.HTTPResponse(
        body=json.dumps(obj),
        status=status,
        headers={"Content-Type": "application/json"},
    )


class Api:
    """The engine's HTTP API as a WSGI app; every answer is a JSON object.

    Errors answer ``{"error_msg": ...}``: 400 for a wrong request, 404 for
    an unknown path, 405 for a wrong method, 413 for a body over 10 MiB,
    500 for our own failures (whose details are only logged locally).
    """

    def __init__(self, engine):
        self._engine = engine
        self.app = bottle.Bottle(catchall=True)
        self.app.default_error_handler = self._error_page
        self.app.route("/healthz", "GET", self._endpoint(self.healthz))
        self.app.route("/metrics", "GET", self._endpoint(self.metrics))
        self.app.route("/setup", "POST", self._endpoint(self.setup))
        self.app.route("/destroy", "POST", self._endpoint(self.destroy))
        self.app.route("/start_step", "POST", self._endpoint(self.start_step))
        self.app.route("/poll_step", "POST", self._endpoint(self.poll_step))
        self.app.route("/stream_output", "POST", self._endpoint(self.stream_output))

    def healthz(self):
        """Report that the engine is up, and its version."""
        return {"version": __version__, "ok": True}

    def metrics(self):
        """The streaming figures in Prometheus' text format."""
        text = render_metrics(self._engine.metrics.snapshot(), self._engine.running())
        return bottle.HTTPResponse(
            text, 200, headers={"Content-Type": "text/plain; version=0.0.4"}
        )

    def setup(self):
        """Prepare the stage; see ``Engine.setup``."""
        body = read_json_object(bottle.request.environ)
        try:
            request = SetupRequest.from_json(body)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        try:
            self._engine.setup(request)
        except EngineClosed as exc:
            raise ApiError(500, str(exc)) from None
        return {}

    def destroy(self):
        """End the stage; the body is read only to refuse a malformed one."""
        body = read_json_object(bottle.request.environ)
        try:
            _optional(body, "stage_runtime_id", str, "a string")
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        self._engine.destroy()
        return {}

    def start_step(self):
        """Start a step; see ``Engine.start_step``."""
        body = read_json_object(bottle.request.environ)
        try:
            request = StepRequest.from_json(body)
            self._engine.start_step(request)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        except EngineClosed as exc:
            raise ApiError(500, str(exc)) from None
        return {}

    def poll_step(self):
        """Answer once the step has exited; see ``Engine.poll_step``."""
        step_id = _step_id(read_json_object(bottle.request.environ))
        try:
            return self._engine.poll_step(step_id)
        except KeyError:
            raise ApiError(404, "unknown step %s" % _short(step_id)) from None

    def stream_output(self):
        """Stream the step's output from ``offset`` until it exits."""
        body = read_json_object(bottle.request.environ)
        step_id = _step_id(body)
        offset = body.get("offset") or 0
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ApiError(400, "offset must be a whole number of bytes, 0 or more")
        try:
            chunks = self._engine.stream_output(step_id, offset)
        except KeyError:
            raise ApiError(404, "unknown step %s" % _short(step_id)) from None
        return bottle.HTTPResponse(
            chunks, 200, headers={"Content-Type": "text/plain; charset=utf-8"}
        )

    def _endpoint(self, handler):
        """Wrap ``handler`` so that whatever happens, the answer is JSON."""

        def answer():
            try:
                answer = handler()
                if isinstance(answer, bottle.HTTPResponse):
                    return answer
                return _json_answer(200, answer)
            except ApiError as exc:
                return _json_answer(exc.status, {"error_msg": exc.message})
            except Exception:
                log.exception(
                    "request failed",
                    extra=hooks.fields(
                        method=bottle.request.method, path=bottle.request.path
                    ),
                )
                return _json_answer(500, {"error_msg": "internal error"})

        return answer

    def _error_page(self, error):
        """Bottle's own errors (unknown path, wrong method, a crash) as JSON."""
        request = bottle.request
        if error.status_code == 404:
            message = "unknown path %s" % _short(request.path)
        elif error.status_code == 405:
            message = "method %s not allowed on %s" % (
                _short(request.method),
                _short(request.path),
            )
        elif error.status_code >= 500:
            log.error("request failed", extra=hooks.fields(path=request.path))
            message = "internal error"
        else:
            message = error.status_line
        bottle.response.content_type = "application/json"
        return json.dumps({"error_msg": message})


# ------------------------------------------------------------------ server


def server_tls_context(config):
    """The TLS context for serving with ``config``: mutual TLS, 1.2 at least.

    The server shows SERVER_CERT_FILE and SERVER_KEY_FILE and accepts only
    callers whose certificate chains to a CA in CLIENT_CERT_FILE. Raises
    ``ValueError`` naming the variable and the file at fault.
    """
    files = (
        ("SERVER_CERT_FILE", config.cert_file),
        ("SERVER_KEY_FILE", config.key_file),
        ("CLIENT_CERT_FILE", config.client_cert_file),
    )
    unset = [name for name, path in files if not path]
    if unset:
        raise ValueError(
            "%s not set: serving HTTPS takes SERVER_CERT_FILE, SERVER_KEY_FILE "
            "and CLIENT_CERT_FILE (`liteengine.py certs` makes a set); "
            "SERVER_INSECURE=true serves plain HTTP, for local trials only"
            % " and ".join(unset)
        )
    for name, path in files:
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            reason = "%s=%s cannot be read: %s" % (name, path, exc.strerror or exc)
            raise ValueError(reason) from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_cert_chain(config.cert_file, config.key_file, _no_password)
    except (ssl.SSLError, ValueError) as exc:
        raise ValueError(
            "SERVER_CERT_FILE=%s and SERVER_KEY_FILE=%s are not a PEM certificate "
            "and its unencrypted key: %s"
            % (config.cert_file, config.key_file, _tls_reason(exc))
        ) from None
    try:
        context.load_verify_locations(cafile=config.client_cert_file)
    except ssl.SSLError as exc:
        raise ValueError(
            "CLIENT_CERT_FILE=%s holds no PEM CA certificate: %s"
            % (config.client_cert_file, _tls_reason(exc))
        ) from None
    return context


def _no_password():
    # Called by ssl only for an encrypted key, instead of a terminal prompt.
    raise ValueError("encrypted keys are not supported")


def _tls_reason(exc):
    """A short reason for an ``ssl`` failure, without the C source location."""
    reason = getattr(exc, "reason", None)
    detail = getattr(exc, "verify_message", None)
    if reason and detail:
        return "%s: %s" % (reason, detail)
    return reason or str(exc) or type(exc).__name__


_PLAIN_HTTP_ANSWER = json.dumps(
    {"error_msg": "this port speaks HTTPS only, with a client certificate"}
).encode("ascii")


class _JsonErrorRequest(cheroot.server.HTTPRequest):
    """cheroot's request, answering in JSON the errors it finds by itself.

    A request cheroot cannot read (request line, headers, transfer coding)
    is the caller's fault, so such answers are 400 even where cheroot would
    say 5xx.
    """

    def simple_response(self, status, msg=""):
        """Answer ``status`` with ``{"error_msg": msg}`` and close."""
        status = str(status)
        if not self.ready and status.startswith("5"):
            status = "400 Bad Request"
        body = json.dumps({"error_msg": msg or status[4:]}).encode("utf-8")
        self.close_connection = True
        head = (
            "%s %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            "Connection: close\r\n\r\n" % (self.server.protocol, status, len(body))
        )
        try:
            self.conn.wfile.write(head.encode("ISO-8859-1") + body)
        except OSError as exc:
            if exc.args[0] not in cheroot.errors.socket_errors_to_ignore:
                raise


class _Connection(cheroot.server.HTTPConnection):
    """One caller's connection; over TLS it shakes hands on its first turn.

    The handshake runs on the worker thread serving the connection, never on
    the thread accepting connections (see ``_TlsAdapter``). A handshake that
    fails (no client certificate, one from another CA, a caller that goes
    quiet) is one ``tls handshake failed`` line and a closed connection; a
    caller speaking plain HTTP is also answered 400 in plain HTTP.
    """

    RequestHandlerClass = _JsonErrorRequest
    _handshake_done = False

    def communicate(self):
        """Shake hands if that is still to do, then serve requests.

        A caller that sends its next request at once on the same connection
        is served by this worker again, instead of the connection going
        back to cheroot's selector and to another thread in between.
        """
        if not self._handshake_done and isinstance(self.socket, ssl.SSLSocket):
            if not self._handshake():
                return False
            self._handshake_done = True
        keep = super().communicate()
        while keep and self._next_request_ready():
            keep = super().communicate()
        return keep

    def _next_request_ready(self):
        if self.rfile.has_data():
            return True
        try:
            ready, _, _ = select.select([self.socket], [], [], KEEP_ALIVE_LINGER)
        except (OSError, ValueError):
            return False
        return bool(ready)

    def _handshake(self):
        try:
            self.socket.do_handshake()
            return True
        except OSError as exc:
            reason = _tls_reason(exc)
        remote = _join_host_port(self.remote_addr or "", self.remote_port or 0)
        details = hooks.fields(remote=remote, error=reason)
        log.info("tls handshake failed", extra=details)
        if reason == "HTTP_REQUEST":
            head = (
                "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                "Content-Length: %d\r\nConnection: close\r\n\r\n"
                % len(_PLAIN_HTTP_ANSWER)
            )
            try:
                # No TLS session was made, so the answer goes out in the clear,
                # on the socket under the TLS layer.
                socket.socket.sendall(self.socket, head.encode() + _PLAIN_HTTP_ANSWER)
            except OSError:
                pass
        return False


class _TlsAdapter(cheroot.ssl.builtin.BuiltinSSLAdapter):
    """cheroot's TLS adapter, with the handshake moved off the accepting thread.

    cheroot shakes hands right after ``accept``, on the one thread that
    accepts every connection, so a caller that connects and stays silent
    would hold every other caller back until its socket timed out. Here
    ``wrap`` only wraps the socket; ``_Connection`` shakes hands on a worker.
    """

    def __init__(self, context):
        # Not the base class's: it would load the files again and shake hands
        # with itself to fill WSGI variables the engine does not use.
        self.certificate = self.private_key = self.certificate_chain = None
        self.ciphers = self.private_key_password = None
        self.context = context
        self._server_env = {}

    def wrap(self, sock):
        """Wrap ``sock`` for TLS without shaking hands yet."""
        try:
            tls = self.context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
        except OSError as exc:
            raise cheroot.errors.FatalSSLAlert(str(exc)) from exc
        return tls, {"wsgi.url_scheme": "https", "HTTPS": "on"}


class _HttpServer(cheroot.wsgi.Server):
    """cheroot's WSGI server, reporting its own troubles through logging."""

    ConnectionClass = _Connection

    def error_log(self, msg="", level=logging.INFO, traceback=False):
        """Log cheroot's message as one line on the ``liteengine`` logger."""
        details = hooks.fields(error=msg)
        log.log(level, "http server error", exc_info=traceback, extra=details)


def serve(config, tls=None):
    """Run the server until SIGTERM or SIGINT; returns the exit code.

    ``tls`` is the context from ``server_tls_context``; ``None`` serves
    plain HTTP. On a signal the engine's writer is closed first (flush,
    upload, close), then the HTTP server stops.
    """
    masker = hooks.Masker()
    console = configure_logging(config, masker)
    engine = Engine(
        masker,
        config.shared_dir,
        config.deadlines,
        config.flush_interval,
        stream_level=config.stream_level,
        transport=config.transport,
    )
    if config.quiet:
        console.addFilter(engine.console_filter)
    server = _HttpServer(
        config.bind,
        Api(engine).app,
        numthreads=SERVER_THREADS,
        server_name="liteengine",
    )
    if tls is not None:
        server.ssl_adapter = _TlsAdapter(tls)
    else:
        log.warning(
            "serving plain HTTP without client certificates",
            extra=hooks.fields(setting="SERVER_INSECURE"),
        )
    try:
        server.prepare()
    except OSError as exc:
        log.error("server not started", extra=hooks.fields(error=str(exc)))
        return 1
    host, port = server.socket.getsockname()[:2]
    log.info(
        "server listening",
        extra=hooks.fields(
            address=_join_host_port(host, port),
            scheme="https" if tls is not None else "http",
            version=__version__,
        ),
    )
    # The signal handlers stay quiet until the end: a second SIGTERM cannot
    # cut the final upload short, which is bounded by its deadlines anyway.
    with _Wakeup() as wakeup:
        thread = threading.Thread(
            target=_serve_until_stopped, args=(server, wakeup), name="http-server"
        )
        thread.start()
        reason = wakeup.wait()
        log.info("server stopping", extra=hooks.fields(reason=reason))
        engine.shutdown()
        server.stop()
        thread.join()
    log.info("server stopped")
    return 0 if reason != "server failed" else 1


def _serve_until_stopped(server, wakeup):
    try:
        server.serve()
    except Exception:
        log.exception("server failed")
        wakeup.wake(b"F")


def _join_host_port(host, port):
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


class _Wakeup:
    """Wakes the main thread on SIGTERM, SIGINT, or a failed server thread.

    The signal handlers do nothing: Python's C-level handler writes the
    signal number to a socket (``signal.set_wakeup_fd``) and the main thread
    is blocked reading the other end. So no lock, logging or I/O of ours
    ever runs inside a signal handler.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self):
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)
        self._old_fd = signal.set_wakeup_fd(
            self._writer.fileno(), warn_on_full_buffer=False
        )
        self._old_handlers = [
            (number, signal.signal(number, _ignore_signal)) for number in self.SIGNALS
        ]
        return self

    def wait(self):
        """Block until woken; returns why (the signal name, or "server failed")."""
        data = self._reader.recv(1)
        if data == b"F":
            return "server failed"
        try:
            return signal.Signals(data[0]).name
        except (IndexError, ValueError):
            return "unknown"

    def wake(self, byte):
        """Wake the main thread from any thread."""
        try:
            self._writer.send(byte)
        except OSError:
            pass

    def __exit__(self, *exc_info):
        for number, handler in self._old_handlers:
            signal.signal(number, handler)
        signal.set_wakeup_fd(self._old_fd)
        self._reader.close()
        self._writer.close()


def _ignore_signal(number, frame):
    """Do nothing: the wakeup socket already told the main thread."""


# ------------------------------------------------------------------ client


class ClientError(Exception):
    """The engine could not be reached or gave an unreadable answer."""


def client_tls_context(ca_file, cert_file, key_file):
    """A context that trusts only ``ca_file`` and presents ``cert_file``.

    Raises ``ClientError`` naming the option and the file that cannot be used.
    """
    options = (("--ca", ca_file), ("--cert", cert_file), ("--key", key_file))
    for option, path in options:
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ClientError(
                "%s %s cannot be read: %s (`liteengine.py certs` makes a set)"
                % (option, path, exc.strerror or exc)
            ) from None
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except ssl.SSLError as exc:
        raise ClientError(
            "--ca %s holds no PEM certificate: %s" % (ca_file, _tls_reason(exc))
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file, _no_password)
    except (ssl.SSLError, ValueError) as exc:
        raise ClientError(
            "--cert %s and --key %s are not a PEM certificate and its unencrypted "
            "key: %s" % (cert_file, key_file, _tls_reason(exc))
        ) from None
    return context


# Hints for the TLS failures a user of the client command meets first.
_TLS_HINTS = {
    "WRONG_VERSION_NUMBER": "is the engine serving plain HTTP? then use http://",
    "CERTIFICATE_VERIFY_FAILED": "--ca must be the CA that signed the engine's "
    "certificate, which must name the --addr host",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the engine wants a client certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "the engine does not trust the CA of --cert",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the engine refused --cert",
}


def call(addr, method, path, body=None, timeout=60.0, tls=None):
    """Send one request to the engine at ``addr``; returns ``(status, answer)``.

    ``addr`` is an ``https://`` URL, with ``tls`` the context to use (see
    ``client_tls_context``), or an ``http://`` one for an insecure engine.
    ``answer`` is the decoded JSON body. Raises ``ClientError`` with a
    one-line reason when the engine cannot be reached or answers non-JSON.
    """
    parts = urllib.parse.urlsplit(addr)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ClientError("--addr must be an https:// or http:// URL, not %r" % addr)
    data = None if body is None else json.dumps(body).encode("utf-8")
    headers = {"Content-Type": "application/json"} if data is not None else {}
    target = parts.path.rstrip("/") + path
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(
            parts.netloc, timeout=timeout, context=tls
        )
    else:
        connection = http.client.HTTPConnection(parts.netloc, timeout=timeout)
    try:
        connection.request(method, target, body=data, headers=headers)
        response = connection.getresponse()
        raw = response.read()
    except ssl.SSLError as exc:
        reason = _tls_reason(exc)
        hint = _TLS_HINTS.get(getattr(exc, "reason", None))
        if isinstance(exc, ssl.SSLEOFError):
            hint = "the engine hung up; does it trust the CA of --cert?"
        reason += " (%s)" % hint if hint else ""
        message = "TLS with the engine at %s failed: %s" % (addr, reason)
        raise ClientError(message) from None
    except (OSError, http.client.HTTPException) as exc:
        raise ClientError("cannot reach the engine at %s: %s" % (addr, exc)) from None
    finally:
        connection.close()
    try:
        return response.status, json.loads(raw.decode("utf-8"))
    except ValueError:
        raise ClientError(
            "the engine at %s answered %d with a body that is not JSON"
            % (addr, response.status)
        ) from None


def _setup_body(args):
    log_config = {
        "url": args.log_url,
        "account_id": args.account_id,
        "token": args.token,
        "indirect_upload": args.indirect_upload,
    }
    return {
        "le_log_key": args.le_log_key,
        "log_config": log_config,
        "secrets": args.secret,
    }


def tail(path, out, follow=True, interval=0.2):
    """Print the text of each line of a file-store log, as ``tail -f`` would.

    Lines are printed once each, by ``pos``, also across the final upload
    that replaces the file. Without ``follow`` it stops at the end of the
    file; with it, it waits for the file to appear and to grow until
    interrupted.
    """
    printed = -1
    file, identity, partial = None, None, b""
    try:
        while True:
            if file is None:
                try:
                    file = open(path, "rb")
                except FileNotFoundError:
                    if not follow:
                        return
                    time.sleep(interval)
                    continue
                identity, partial = os.fstat(file.fileno()).st_ino, b""
            chunk = file.readline()
            if chunk.endswith(b"\n"):
                printed = _print_line(partial + chunk, printed, out)
                partial = b""
                continue
            partial += chunk
            if _replaced(path, identity):
                file.close()
                file = None
            elif not follow:
                return
            else:
                time.sleep(interval)
    finally:
        if file is not None:
            file.close()


def _replaced(path, identity):
    try:
        return os.stat(path).st_ino != identity
    except OSError:
        return False


def _print_line(raw, printed, out):
    """Print one NDJSON line's text unless its ``pos`` was already printed.

    Returns the last ``pos`` printed.
    """
    try:
        line = json.loads(raw)
        pos, text = line["pos"], line["out"]
    except (ValueError, KeyError, TypeError):
        return printed
    if pos <= printed:
        return printed
    out.write(text if text.endswith("\n") else text + "\n")
    out.flush()
    return pos


def run_tail(args):
    """``client tail KEY``: follow a key's lines in the local file store."""
    folder = args.dir or shared_folder(os.environ)
    try:
        path = logstream.FileStore(folder).path_for(args.key)
    except logstream.LogServiceError as exc:
        print("liteengine: %s" % exc, file=sys.stderr)
        return 2
    try:
        tail(path, sys.stdout, follow=not args.no_follow)
    except KeyboardInterrupt:
        pass
    return 0


def run_client(args):
    """Run one ``client`` subcommand; prints the answer, returns the exit code."""
    if args.action == "tail":
        return run_tail(args)
    if args.action == "health":
        method, path, body = "GET", "/healthz", None
    elif args.action == "setup":
        method, path, body = "POST", "/setup", _setup_body(args)
    else:
        method, path, body = "POST", "/destroy", {}
    try:
        tls = None
        if urllib.parse.urlsplit(args.addr).scheme == "https":
            tls = client_tls_context(
                args.ca or os.path.join(DEFAULT_CERTS_DIR, "ca.pem"),
                args.cert or os.path.join(DEFAULT_CERTS_DIR, "client.pem"),
                args.key or os.path.join(DEFAULT_CERTS_DIR, "client-key.pem"),
            )
        status, answer = call(args.addr, method, path, body, args.timeout, tls)
    except ClientError as exc:
        print("liteengine: %s" % exc, file=sys.stderr)
        return 1
    print(json.dumps(answer))
    if 200 <= status < 300:
        return 0
    message = answer.get("error_msg") if isinstance(answer, dict) else None
    message = message or "no error_msg"
    print("liteengine: HTTP %d: %s" % (status, message), file=sys.stderr)
    return 1


# ------------------------------------------------------------ certificates


DEFAULT_CERTS_DIR = "certs"
CERT_FILES = (
    "ca.pem",
    "ca-key.pem",
    "server.pem",
    "server-key.pem",
    "client.pem",
    "client-key.pem",
)

# The extensions each certificate gets. Python's ssl (3.13 and later) insists
# on a critical basicConstraints in the CA and key identifiers in the others.
_OPENSSL_CONFIG = """\
[req]
distinguished_name = name
[name]
[ca_ext]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = %s
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""

_LABEL = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


class CertsError(Exception):
    """Certificates could not be made; the message says why."""


def subject_alt_name(host):
    """``host`` as a subjectAltName entry, ``IP:...`` or ``DNS:...``.

    Raises ``ValueError`` when it is neither an IP address nor a DNS name.
    """
    try:
        return "IP:%s" % ipaddress.ip_address(host)
    except ValueError:
        pass
    labels = host.lower().split(".")
    if 0 < len(host) <= 253 and all(
        0 < len(label) <= 63 and label.strip("-") == label and set(label) <= _LABEL
        for label in labels
    ):
        return "DNS:" + host.lower()
    raise ValueError("%r is neither an IP address nor a DNS name" % host)


def default_hosts():
    """``localhost``, ``127.0.0.1`` and this machine's name, when it is valid."""
    hosts = ["localhost", "127.0.0.1"]
    name = socket.gethostname()
    try:
        subject_alt_name(name)
    except ValueError:
        return hosts
    return hosts if name.lower() in hosts else hosts + [name]


def make_certs(folder, hosts, days=365, force=False):
    """Write a new CA, a server and a client certificate, with keys, to ``folder``.

    The server certificate names ``hosts``; both chain to the CA. Keys are
    EC P-256 and only their owner may read them. Everything is made in a
    scratch folder inside ``folder`` and moved in at the end, so a failure
    leaves ``folder`` as it was. Returns the paths written. Raises
    ``CertsError`` when openssl is missing or fails, or when files exist
    and ``force`` is false.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise CertsError(
            "the certs command runs the openssl command line tool, which is not "
            "on PATH; install it (usually the package openssl) and try again"
        )
    names = ", ".join(subject_alt_name(host) for host in hosts)
    targets = [os.path.join(folder, name) for name in CERT_FILES]
    existing = [path for path in targets if os.path.lexists(path)]
    if existing and not force:
        raise CertsError(
            "%s already exist; --force replaces them (and the engine and its "
            "clients must then use the new ones)" % ", ".join(existing)
        )
    os.makedirs(folder, mode=0o700, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".certs-", dir=folder)
    try:
        with open(os.path.join(scratch, "openssl.cnf"), "w", encoding="ascii") as file:
            file.write(_OPENSSL_CONFIG % names)
        _make_certs_in(openssl, scratch, hosts[0], str(days))
        for name in CERT_FILES:
            path = os.path.join(scratch, name)
            os.chmod(path, 0o600 if name.endswith("-key.pem") else 0o644)
            os.replace(path, os.path.join(folder, name))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return targets


def _make_certs_in(openssl, folder, server_name, days):
    """Run the openssl commands that fill ``folder`` (see ``make_certs``)."""

    def run(*args):
        try:
            result = subprocess.run(
                [openssl, *args],
                cwd=folder,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise CertsError("openssl %s failed: %s" % (args[0], exc)) from None
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines()[:3]
            reason = "; ".join(lines) or "exit code %d" % result.returncode
            raise CertsError("openssl %s failed: %s" % (args[0], reason))

    for role in ("ca", "server", "client"):
        run(
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-pkeyopt",
            "ec_param_enc:named_curve",
            "-out",
            role + "-key.pem",
        )
    run(
        "req",
        "-new",
        "-x509",
        "-config",
        "openssl.cnf",
        "-extensions",
        "ca_ext",
        "-key",
        "ca-key.pem",
        "-subj",
        "/CN=liteengine CA",
        "-days",
        days,
        "-sha256",
        "-out",
        "ca.pem",
    )
    for role, subject in (("server", server_name), ("client", "liteengine client")):
        run(
            "req",
            "-new",
            "-config",
            "openssl.cnf",
            "-key",
            role + "-key.pem",
            "-subj",
            "/CN=" + subject,
            "-out",
            role + ".csr",
        )
        run(
            "x509",
            "-req",
            "-in",
            role + ".csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-set_serial",
            "0x" + os.urandom(16).hex(),
            "-days",
            days,
            "-sha256",
            "-extfile",
            "openssl.cnf",
            "-extensions",
            role + "_ext",
            "-out",
            role + ".pem",
        )


def run_certs(args, parser):
    """Run the ``certs`` command; prints what to do next, returns the exit code."""
    hosts = args.host or default_hosts()
    for host in hosts:
        try:
            subject_alt_name(host)
        except ValueError as exc:
            parser.error("--host: %s" % exc)
    if not 1 <= args.days <= 36500:
        parser.error("--days must be between 1 and 36500")
    try:
        make_certs(args.dir, hosts, args.days, args.force)
    except (CertsError, OSError) as exc:
        print("liteengine: error: %s" % exc, file=sys.stderr)
        return 1
    folder = os.path.abspath(args.dir)
    program = os.path.basename(sys.argv[0]) or "liteengine.py"
    client = program + " client"
    if folder != os.path.abspath(DEFAULT_CERTS_DIR):
        client += " --ca %s --cert %s --key %s" % tuple(
            os.path.join(args.dir, name)
            for name in ("ca.pem", "client.pem", "client-key.pem")
        )
    print(
        "Wrote a CA, a server certificate for %s and a client certificate to %s,"
        " valid %d days; only you can read the keys."
        % (", ".join(hosts), folder, args.days)
    )
    print("Serve HTTPS with them:")
    print("  export SERVER_CERT_FILE=%s" % os.path.join(folder, "server.pem"))
    print("  export SERVER_KEY_FILE=%s" % os.path.join(folder, "server-key.pem"))
    print("  export CLIENT_CERT_FILE=%s" % os.path.join(folder, "ca.pem"))
    print("  %s server" % program)
    print("Then, from this folder:")
    print("  %s health" % client)
    return 0


# ------------------------------------------------------------ command line


def version_text():
    """``liteengine <version> (<commit>)``, the commit from the build or git."""
    try:
        import _buildinfo

        commit = _buildinfo.COMMIT
    except ImportError:
        commit = _git_commit()
    return "liteengine %s (%s)" % (__version__, commit or "unknown")


def _git_commit():
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def build_parser():
    """The command-line parser for ``server``, ``client``, ``certs``, ``--version``."""
    parser = argparse.ArgumentParser(
        prog="liteengine", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--version", action="store_true", help="print the version")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    server = commands.add_parser(
        "server",
        help="serve the engine's HTTP API",
        description="Serve HTTPS that only answers callers with a client "
        "certificate from the CA in CLIENT_CERT_FILE; the server's own are "
        "SERVER_CERT_FILE and SERVER_KEY_FILE. SERVER_INSECURE=true serves "
        "plain HTTP to anyone instead, for local trials only.",
    )
    server.add_argument(
        "--env-file",
        help="KEY=VALUE lines read before the environment (which wins)",
    )

    certs = commands.add_parser(
        "certs",
        help="make certificates for trying secure mode",
        description="Write a new CA (ca.pem, ca-key.pem), a server certificate "
        "(server.pem, server-key.pem) and a client certificate (client.pem, "
        "client-key.pem) with the openssl command line tool. Keys are readable "
        "by their owner only.",
    )
    certs.add_argument(
        "--dir",
        default=DEFAULT_CERTS_DIR,
        help="folder to write to, made if missing (default: ./%(default)s)",
    )
    certs.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="a DNS name or IP address the server certificate is for (repeatable;"
        " default: localhost, 127.0.0.1 and this machine's host name)",
    )
    certs.add_argument(
        "--days", type=int, default=365, help="validity (default: %(default)s)"
    )
    certs.add_argument(
        "--force", action="store_true", help="replace certificates already there"
    )

    client = commands.add_parser("client", help="drive a running engine")
    client.add_argument(
        "--addr",
        default=DEFAULT_ADDR,
        help="engine URL (default: %(default)s; http:// for an engine with "
        "SERVER_INSECURE=true)",
    )
    client.add_argument("--timeout", type=float, default=60.0, help="seconds")
    for option, name, what in (
        ("--ca", "ca.pem", "CA that signed the engine's certificate"),
        ("--cert", "client.pem", "client certificate"),
        ("--key", "client-key.pem", "key of the client certificate"),
    ):
        client.add_argument(
            option,
            metavar="FILE",
            help="%s, for https:// (default: ./%s)"
            % (what, os.path.join(DEFAULT_CERTS_DIR, name)),
        )
    actions = client.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("health", help="GET /healthz")
    actions.add_parser("destroy", help="POST /destroy")
    tail_parser = actions.add_parser(
        "tail", help="print a key's lines from the local file store as they come"
    )
    tail_parser.add_argument("key", help="the log key, e.g. stage-1/step-1")
    tail_parser.add_argument(
        "--dir", help="the file store (default: the shared folder, as the server)"
    )
    tail_parser.add_argument(
        "--no-follow", action="store_true", help="stop at the end of the file"
    )
    setup = actions.add_parser("setup", help="POST /setup")
    setup.add_argument("--le-log-key", default="", help="stream engine logs to KEY")
    setup.add_argument("--log-url", default="", help="log service URL (empty: files)")
    setup.add_argument("--account-id", default="", help="log service account")
    setup.add_argument(
        "--token",
        default="",
        help="log service token (other local users can see command lines)",
    )
    setup.add_argument("--indirect-upload", action="store_true")
    setup.add_argument(
        "--secret", action="append", default=[], help="a secret to mask (repeatable)"
    )
    return parser


def main(argv=None):
    """Run the command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(version_text())
        return 0
    if args.command == "client":
        return run_client(args)
    if args.command == "certs":
        return run_certs(args, parser)
    if args.command != "server":
        parser.print_usage(sys.stderr)
        return 2
    try:
        config = Config.from_env(load_environment(args.env_file))
        tls = None if config.insecure else server_tls_context(config)
    except (OSError, ValueError) as exc:
        print("liteengine: error: %s" % exc, file=sys.stderr)
        return 2
    try:
        os.makedirs(config.shared_dir, exist_ok=True)
    except OSError as exc:
        print("liteengine: error: shared folder not created: %s" % exc, file=sys.stderr)
        return 2
    return serve(config, tls)


if __name__ == "__main__":
    sys.exit(main())
