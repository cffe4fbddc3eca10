"""liteengine: a small CI engine that a runner drives over HTTP on a build VM.

The command line has three uses:

- ``server`` serves the engine's HTTP API (``/healthz``, ``/setup``,
  ``/destroy``) and, once a ``/setup`` names a log key, streams every line it
  logs about itself to the log service under that key.
- ``client`` drives a running engine, so nobody needs curl.
- ``--version`` prints the version ``/healthz`` reports, and the commit.

This module holds the configuration, the engine's state, the HTTP API and
the command line; ``logstream`` does the streaming and ``hooks`` turns log
records into lines.
"""

import argparse
import dataclasses
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import bottle
import cheroot.errors
import cheroot.server
import cheroot.wsgi

import hooks
import logstream

__version__ = "0.1.0"

log = logging.getLogger("liteengine")

BODY_LIMIT = 10 * 1024 * 1024
SERVER_THREADS = 32
DEFAULT_BIND = ":9079"
DEFAULT_ADDR = "http://127.0.0.1:9079"


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


def _flag(environ, name):
    """Read a boolean the way Go's strconv.ParseBool does; unset is false."""
    value = environ.get(name, "").strip().lower()
    if value in ("", "0", "f", "false"):
        return False
    if value in ("1", "t", "true"):
        return True
    raise ValueError("%s must be true or false, not %r" % (name, value))


def _seconds(environ, name, default):
    """Read a positive number of seconds, or ``default`` when unset."""
    value = environ.get(name, "").strip()
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise ValueError("%s must be a positive number of seconds" % name)
    return seconds


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

    @classmethod
    def from_env(cls, environ):
        """Build the settings from an environment mapping.

        Raises ``ValueError`` with a message naming the variable at fault.
        """
        workdir = environ.get("HARNESS_WORKDIR", "")
        if workdir:
            shared_dir = os.path.join(workdir, "tmp", "engine")
        else:
            shared_dir = "/tmp/engine"
        return cls(
            bind=parse_bind(environ.get("HTTPS_BIND") or DEFAULT_BIND),
            insecure=_flag(environ, "SERVER_INSECURE"),
            cert_file=environ.get("SERVER_CERT_FILE", ""),
            key_file=environ.get("SERVER_KEY_FILE", ""),
            client_cert_file=environ.get("CLIENT_CERT_FILE", ""),
            debug=_flag(environ, "DEBUG"),
            trace=_flag(environ, "TRACE"),
            shared_dir=shared_dir,
            flush_interval=_seconds(environ, "LE_FLUSH_INTERVAL", 1.0),
            deadlines=logstream.Deadlines.from_env(environ),
        )


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


@dataclasses.dataclass(frozen=True)
class SetupRequest:
    """The parts of the runner's ``/setup`` body the engine uses so far.

    ``network``, ``volumes`` and ``files`` are checked for their JSON type
    but not used yet.
    """

    envs: dict = dataclasses.field(default_factory=dict)
    secrets: tuple = ()
    le_log_key: str = ""
    log_config: logstream.LogConfig = logstream.LogConfig()

    @classmethod
    def from_json(cls, obj):
        """Read a decoded JSON object; raises ``ValueError`` naming a bad field."""
        envs = _optional(obj, "envs", dict, "an object of strings") or {}
        if not all(isinstance(value, str) for value in envs.values()):
            raise ValueError("envs must be an object of strings")
        secrets = _optional(obj, "secrets", list, "a list of strings") or []
        if not all(isinstance(secret, str) for secret in secrets):
            raise ValueError("secrets must be a list of strings")
        key = _optional(obj, "le_log_key", str, "a string") or ""
        _optional(obj, "network", dict, "an object")
        _optional(obj, "volumes", list, "a list")
        _optional(obj, "files", list, "a list")
        return cls(
            envs=dict(envs),
            secrets=tuple(secrets),
            le_log_key=key,
            log_config=logstream.LogConfig.from_json(obj.get("log_config")),
        )


# ------------------------------------------------------------------ engine


class EngineClosed(Exception):
    """Raised by ``Engine.setup`` once the engine has shut down."""


class Engine:
    """The stage's state: which live writer carries the engine's own logs.

    ``setup`` and ``destroy`` may come from any request thread. Locking:
    ``_stage_lock`` guards ``_writer``, ``_handler`` and ``_closed`` and
    makes setup and destroy run one at a time. It is held while a writer
    opens or closes, which calls the log service, each call bounded by its
    deadline; so ``/healthz`` and every other quick path never take it.
    Logging while it is held is safe: the streaming handler only queues the
    line and never waits.
    """

    def __init__(self, masker, shared_dir, deadlines, flush_interval=1.0):
        self._masker = masker
        self._shared_dir = shared_dir
        self._deadlines = deadlines
        self._flush_interval = flush_interval
        self._stage_lock = threading.Lock()
        self._writer = None
        self._handler = None
        self._closed = False

    def setup(self, request):
        """Mask the stage's secrets and, given a log key, stream our logs to it.

        A previous writer is closed first, so at most one streaming handler
        is ever attached. Opening the stream may fail; that is a warning,
        not an error, and the setup still succeeds.
        """
        started = time.monotonic()
        config = request.log_config
        self._masker.update(list(request.secrets) + [config.token])
        with self._stage_lock:
            if self._closed:
                raise EngineClosed("the engine is shutting down")
            if request.le_log_key:
                self._stop_streaming()
                self._start_streaming(request.le_log_key, config)
            log.info(
                "setup done",
                extra=hooks.fields(latency=_latency(started), key=request.le_log_key),
            )

    def destroy(self):
        """Stop streaming: flush, upload and close the writer; harmless to repeat."""
        started = time.monotonic()
        with self._stage_lock:
            log.info("destroy started")
            counters = self._stop_streaming()
            log.info(
                "destroy done",
                extra=hooks.fields(**dict(counters, latency=_latency(started))),
            )

    def shutdown(self):
        """Close the writer for process exit; later setups are refused."""
        with self._stage_lock:
            self._closed = True
        self.destroy()

    def _start_streaming(self, key, config):
        try:
            client = logstream.new_client(config, self._shared_dir, self._deadlines)
            writer = logstream.LiveWriter(client, key, config, self._flush_interval)
        except Exception as exc:
            log.warning(
                "log stream not started", extra=hooks.fields(key=key, error=str(exc))
            )
            return
        writer.open()
        handler = hooks.StreamHandler(writer, hooks.LogrusFormatter(self._masker))
        logging.getLogger().addHandler(handler)
        self._writer, self._handler = writer, handler

    def _stop_streaming(self):
        """Detach the handler, then close the writer; returns its counters."""
        handler, self._handler = self._handler, None
        writer, self._writer = self._writer, None
        counters = {}
        if handler is not None:
            try:
                logging.getLogger().removeHandler(handler)
                handler.close()
            except Exception:
                log.exception("log handler not detached")
        if writer is not None:
            try:
                result = writer.close()
                counters = dict(result) if isinstance(result, dict) else {}
            except Exception:
                log.exception("log writer not closed")
        return counters


# ---------------------------------------------------------------- HTTP API


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
        self.app.route("/setup", "POST", self._endpoint(self.setup))
        self.app.route("/destroy", "POST", self._endpoint(self.destroy))

    def healthz(self):
        """Report that the engine is up, and its version."""
        return {"version": __version__, "ok": True}

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
        read_json_object(bottle.request.environ)
        self._engine.destroy()
        return {}

    def _endpoint(self, handler):
        """Wrap ``handler`` so that whatever happens, the answer is JSON."""

        def answer():
            try:
                return _json_answer(200, handler())
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
            message = "unknown path %s" % request.path
        elif error.status_code == 405:
            message = "method %s not allowed on %s" % (request.method, request.path)
        elif error.status_code >= 500:
            log.error("request failed", extra=hooks.fields(path=request.path))
            message = "internal error"
        else:
            message = error.status_line
        bottle.response.content_type = "application/json"
        return json.dumps({"error_msg": message})


# ------------------------------------------------------------------ server


class _HttpServer(cheroot.wsgi.Server):
    """cheroot's WSGI server, reporting its own troubles through logging."""

    def error_log(self, msg="", level=logging.INFO, traceback=False):
        """Log cheroot's message as one line on the ``liteengine`` logger."""
        details = hooks.fields(error=msg)
        log.log(level, "http server error", exc_info=traceback, extra=details)


def refuse_insecure(config):
    """Why the server must not start with ``config``, or ``None`` if it may."""
    if config.insecure:
        return None
    return (
        "TLS is not supported yet, so SERVER_CERT_FILE, SERVER_KEY_FILE and "
        "CLIENT_CERT_FILE cannot be used; set SERVER_INSECURE=true to serve "
        "plain HTTP"
    )


def serve(config):
    """Run the server until SIGTERM or SIGINT; returns the exit code.

    On a signal the engine's writer is closed first (flush, upload, close),
    then the HTTP server stops.
    """
    masker = hooks.Masker()
    configure_logging(config, masker)
    engine = Engine(masker, config.shared_dir, config.deadlines, config.flush_interval)
    server = _HttpServer(
        config.bind,
        Api(engine).app,
        numthreads=SERVER_THREADS,
        server_name="liteengine",
    )
    try:
        server.prepare()
    except OSError as exc:
        log.error("server not started", extra=hooks.fields(error=str(exc)))
        return 1
    host, port = server.socket.getsockname()[:2]
    log.info(
        "server listening",
        extra=hooks.fields(address=_join_host_port(host, port), version=__version__),
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


def call(addr, method, path, body=None, timeout=60.0):
    """Send one request to the engine at ``addr``; returns ``(status, answer)``.

    ``answer`` is the decoded JSON body. Raises ``ClientError`` with a
    one-line reason when the engine cannot be reached or answers non-JSON.
    """
    parts = urllib.parse.urlsplit(addr)
    if parts.scheme != "http" or not parts.netloc:
        raise ClientError("--addr must be an http:// URL (TLS is not supported yet)")
    data = None if body is None else json.dumps(body).encode("utf-8")
    headers = {"Content-Type": "application/json"} if data is not None else {}
    target = parts.path.rstrip("/") + path
    connection = http.client.HTTPConnection(parts.netloc, timeout=timeout)
    try:
        connection.request(method, target, body=data, headers=headers)
        response = connection.getresponse()
        raw = response.read()
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


def run_client(args):
    """Run one ``client`` subcommand; prints the answer, returns the exit code."""
    if args.action == "health":
        method, path, body = "GET", "/healthz", None
    elif args.action == "setup":
        method, path, body = "POST", "/setup", _setup_body(args)
    else:
        method, path, body = "POST", "/destroy", {}
    try:
        status, answer = call(args.addr, method, path, body, args.timeout)
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
    """The command-line parser for ``server``, ``client`` and ``--version``."""
    parser = argparse.ArgumentParser(
        prog="liteengine", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--version", action="store_true", help="print the version")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    server = commands.add_parser("server", help="serve the engine's HTTP API")
    server.add_argument(
        "--env-file",
        help="KEY=VALUE lines read before the environment (which wins)",
    )

    client = commands.add_parser("client", help="drive a running engine")
    client.add_argument("--addr", default=DEFAULT_ADDR, help="engine URL")
    client.add_argument("--timeout", type=float, default=60.0, help="seconds")
    actions = client.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("health", help="GET /healthz")
    actions.add_parser("destroy", help="POST /destroy")
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
    if args.command != "server":
        parser.print_usage(sys.stderr)
        return 2
    try:
        config = Config.from_env(load_environment(args.env_file))
    except (OSError, ValueError) as exc:
        print("liteengine: error: %s" % exc, file=sys.stderr)
        return 2
    refusal = refuse_insecure(config)
    if refusal:
        print("liteengine: error: %s" % refusal, file=sys.stderr)
        return 2
    try:
        os.makedirs(config.shared_dir, exist_ok=True)
    except OSError as exc:
        print("liteengine: error: shared folder not created: %s" % exc, file=sys.stderr)
        return 2
    return serve(config)


if __name__ == "__main__":
    sys.exit(main())
