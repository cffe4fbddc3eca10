"""An in-process stand-in for the remote log service, for tests.

The engine streams step output to a log service it does not control
(PROTOCOL.md section 2). A test starts ``FakeLogService`` on a loopback port,
points the engine at ``service.url`` and afterwards reads back what arrived:
opens, closes, live lines, uploads and every request with the answer it got.

The fake is stricter than the real service. Whatever bends the protocol is
answered with an error and also written to ``violations()``, so a test only
has to assert that this list stays empty. Faults (an error status, a dropped
connection, a request left without an answer) can be injected per operation
to drive the client's retries and deadlines.
"""

import copy
import datetime
import http.server
import json
import os
import re
import secrets
import socket
import socketserver
import ssl
import subprocess
import threading
import time
import urllib.parse

OPERATIONS = ("open", "write", "close", "upload", "link", "link_put")
FAULTS = ("status", "reset", "hang", "drip")
# A dripped answer comes a byte at a time, this many seconds apart.
DRIP_INTERVAL = 0.1
LEVELS = frozenset(("debug", "info", "warning", "error", "fatal", "trace"))
LINE_FIELDS = frozenset(("level", "pos", "out", "time", "args"))

_ROUTES = {
    ("POST", "/stream"): "open",
    ("PUT", "/stream"): "write",
    ("DELETE", "/stream"): "close",
    ("POST", "/blob"): "upload",
    ("POST", "/blob/link/upload"): "link",
}
_SIGNED_PREFIX = "/_signed/"
_LINK_LIFETIME_NS = 3600 * 10**9
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}"
    r"(\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})"
)


# ---------------------------------------------------------------------------
# Body checks: each raises ValueError naming the first thing that is wrong.
# ---------------------------------------------------------------------------


def parse_batch(body):
    """Parse a ``PUT /stream`` body: a JSON array of Lines, pos consecutive."""
    lines = _loads(body.decode("utf-8"))
    if not isinstance(lines, list):
        raise ValueError("body is not a JSON array")
    _check_lines(lines)
    return lines


def parse_ndjson(body):
    """Parse an upload body: one Line per row, every row ended by a newline."""
    text = body.decode("utf-8")
    if text and not text.endswith("\n"):
        raise ValueError("NDJSON body does not end with a newline")
    lines = []
    for number, row in enumerate(text.split("\n")[:-1]):
        if not row or row != row.strip():
            raise ValueError(f"NDJSON row {number} is blank or padded")
        lines.append(_loads(row))
    _check_lines(lines)
    return lines


def line_problem(line):
    """Return what is wrong with one decoded Line, or None when it is valid."""
    if not isinstance(line, dict):
        return "not a JSON object"
    if set(line) != LINE_FIELDS:
        return f"fields are {sorted(line)}, want {sorted(LINE_FIELDS)}"
    if not isinstance(line["level"], str) or line["level"] not in LEVELS:
        return f"level {line['level']!r} is not one of {sorted(LEVELS)}"
    if type(line["pos"]) is not int or line["pos"] < 0:
        return f"pos {line['pos']!r} is not an integer >= 0"
    if not isinstance(line["out"], str):
        return f"out {line['out']!r} is not a string"
    if not is_rfc3339(line["time"]):
        return f"time {line['time']!r} is not RFC 3339"
    if line["args"] is not None and not isinstance(line["args"], dict):
        return f"args {line['args']!r} is neither null nor an object"
    return None


def is_rfc3339(value):
    """Tell whether value is an RFC 3339 timestamp with a real date and time."""
    if not isinstance(value, str):
        return False
    match = _RFC3339.fullmatch(value)
    if match is None:
        return False
    try:
        datetime.datetime.strptime(value[:19], "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return False
    offset = match.group(2)
    return offset == "Z" or (int(offset[1:3]) < 24 and int(offset[4:6]) < 60)


def _check_lines(lines):
    previous = None
    for index, line in enumerate(lines):
        problem = line_problem(line)
        if problem is not None:
            raise ValueError(f"line {index}: {problem}")
        if previous is not None and line["pos"] != previous + 1:
            raise ValueError(f"line {index}: pos {line['pos']} follows {previous}")
        previous = line["pos"]


def _loads(text):
    return json.loads(
        text, parse_constant=_reject_constant, object_pairs_hook=_unique_object
    )


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _unique_object(pairs):
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("JSON object repeats a field")
    return result


def _parse_query(text):
    """Return (single-valued query dict, problem or None)."""
    try:
        values = urllib.parse.parse_qs(text, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        return {}, "query is not UTF-8"
    query = {name: found[0] for name, found in values.items()}
    repeated = sorted(name for name, found in values.items() if len(found) > 1)
    if repeated:
        return query, f"query repeats {repeated}"
    return query, None


# ---------------------------------------------------------------------------
# The service
# ---------------------------------------------------------------------------


class FakeLogService:
    """A log service on 127.0.0.1 that checks every request and remembers it.

    Use ``start()`` (or ``with``), point the client at ``url``, then read the
    record through the accessor methods; they return copies. A request with
    wrong credentials is answered 400 but is not a violation: only requests a
    correct client would never send are.

    Fault rules apply to the next requests routed to their operation, whatever
    those requests contain; the body is still checked for violations, and the
    faulted request changes no state (a signed link stays usable).

    Locking: one re-entrant Condition guards every recorded fact, the fault
    rules, the link table and the set of open connections. Handler threads
    hold it only for bookkeeping, never while reading or writing a socket, so
    one slow client cannot stall another; hung requests wait on it, which
    releases it. Every change notifies all waiters, which is what
    ``wait_for`` sleeps on.
    """

    def __init__(self, account_id="acct", token="tok", ssl_context=None):
        self.account_id = account_id
        self.token = token
        self.ssl_context = ssl_context
        self.url = ""
        self._cond = threading.Condition(threading.RLock())
        self._opened = {}
        self._open = set()
        self._closes = {}
        self._lines = {}
        self._uploads = {}
        self._upload_bodies = {}
        self._requests = []
        self._violations = []
        self._faults = {op: [] for op in OPERATIONS}
        self._links = {}
        self._hang_epoch = 0
        self._connections = set()
        self._stopped = False
        self._server = None
        self._thread = None

    # -- lifecycle ---------------------------------------------------------

    def start(self):
        """Bind a free loopback port and serve in daemon threads; returns self."""
        if self._server is not None or self._stopped:
            raise RuntimeError("a FakeLogService can be started only once")
        server = _Server(("127.0.0.1", 0), _Handler)
        server.service = self
        scheme = "http"
        if self.ssl_context is not None:
            server.socket = self.ssl_context.wrap_socket(
                server.socket, server_side=True, do_handshake_on_connect=False
            )
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{server.server_address[1]}"
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.01},
            name="fakelog",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self):
        """Drop hung and idle connections and close the port; safe to repeat."""
        with self._cond:
            if self._stopped:
                return
            self._stopped = True
            self._hang_epoch += 1
            self._cond.notify_all()
        if self._server is not None:
            # Returns within serve_forever's poll interval, kept short for tests.
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
        with self._cond:
            connections = list(self._connections)
        for connection in connections:
            _drop(connection)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    # -- what arrived --------------------------------------------------------

    def opened(self, key):
        """How many times key was opened successfully."""
        with self._cond:
            return self._opened.get(key, 0)

    def is_open(self, key):
        """Whether the stream for key is open now."""
        with self._cond:
            return key in self._open

    def closes(self, key):
        """One ``{"snapshot": bool}`` per successful close of key."""
        with self._cond:
            return copy.deepcopy(self._closes.get(key, []))

    def lines(self, key):
        """Every Line accepted by live writes to key, in arrival order."""
        with self._cond:
            return copy.deepcopy(self._lines.get(key, []))

    def uploads(self, key):
        """One list of Lines per successful upload of key, by either path."""
        with self._cond:
            return copy.deepcopy(self._uploads.get(key, []))

    def upload_bodies(self, key):
        """The raw NDJSON bytes of each successful upload of key."""
        with self._cond:
            return list(self._upload_bodies.get(key, []))

    def requests(self):
        """Every request seen, with the status answered (None: none was)."""
        with self._cond:
            return copy.deepcopy(self._requests)

    def violations(self):
        """A sentence for every protocol violation seen, oldest first."""
        with self._cond:
            return list(self._violations)

    def wait_for(self, predicate, timeout=5.0):
        """Wait until predicate(self) holds or timeout passes; return its value."""
        with self._cond:
            return bool(self._cond.wait_for(lambda: predicate(self), timeout))

    # -- faults ---------------------------------------------------------------

    def inject(self, op, fault, count=1, status=None):
        """Make the next count requests for op fail; count=None means forever.

        fault is "status" (answer status), "reset" (close the connection
        without an answer), "hang" (answer nothing until ``release_hangs``
        or ``stop``) or "drip" (answer 204 a byte every ``DRIP_INTERVAL``
        seconds). Rules for one op are used up in the order given.
        """
        if op not in OPERATIONS:
            raise ValueError(f"op must be one of {OPERATIONS}, not {op!r}")
        if fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}, not {fault!r}")
        if fault == "status" and not isinstance(status, int):
            raise ValueError("a status fault needs the status to answer")
        if count is not None and count < 1:
            raise ValueError("count must be at least 1, or None")
        with self._cond:
            self._faults[op].append([fault, count, status])

    def clear_faults(self):
        """Forget every fault rule not used up yet."""
        with self._cond:
            for rules in self._faults.values():
                rules.clear()

    def release_hangs(self):
        """Drop the connections of hung requests; fault rules stay as they are."""
        with self._cond:
            self._hang_epoch += 1
            self._cond.notify_all()

    # -- serving (called from handler threads) ---------------------------------

    def _serve(self, method, target, headers, body):
        """Record one request and decide it; returns (status, payload).

        status None means: close the connection without answering. body None
        means the request's framing was broken.
        """
        path, _, query_text = target.partition("?")
        query, query_problem = _parse_query(query_text)
        entry = {
            "method": method,
            "path": path,
            "query": query,
            "status": None,
            "has_token": headers.get("X-Harness-Token") is not None,
        }
        with self._cond:
            self._requests.append(entry)
            self._cond.notify_all()

        where = f"{method} {path}"
        if query.get("key"):
            where += f" key={query['key']!r}"
        if body is None:
            status, payload = self._reject(where, "body framing is broken", True)
        else:
            status, payload = self._decide(
                method, path, query, query_problem, headers, body, where
            )
        with self._cond:
            entry["status"] = status
            self._cond.notify_all()
        return status, payload

    def _decide(self, method, path, query, query_problem, headers, body, where):
        op = _ROUTES.get((method, path))
        if op is None and method == "PUT" and path.startswith(_SIGNED_PREFIX):
            op = "link_put"
        if op is None:
            return self._reject(where, "unknown path or method", True, status=404)

        error = self._check_call(op, query, query_problem, headers, where)
        lines = None
        if op in ("write", "upload", "link_put"):
            parse = parse_batch if op == "write" else parse_ndjson
            try:
                lines = parse(body)
            except ValueError as exc:
                body_error = self._reject(where, str(exc), True)
                error = error or body_error

        fault = self._take_fault(op)
        if fault is not None:
            return self._apply_fault(*fault)
        if error is not None:
            return error
        return self._commit(op, query, lines, path, body)

    def _check_call(self, op, query, query_problem, headers, where):
        """Check query and headers; return an error answer or None."""
        if query_problem is not None:
            return self._reject(where, query_problem, True)
        token = headers.get("X-Harness-Token")
        if op == "link_put":
            if token is not None:
                self._violation(where, "harness token sent to the signed link")
            if query:
                return self._reject(where, "signed link called with a query", True)
            return None

        allowed = {"accountID", "key"} | ({"snapshot"} if op == "close" else set())
        unknown = sorted(set(query) - allowed)
        if unknown:
            return self._reject(where, f"unknown query parameters {unknown}", True)
        if not query.get("accountID"):
            return self._reject(where, "accountID is missing", True)
        if not query.get("key"):
            return self._reject(where, "key is missing", True)
        if not token:
            return self._reject(where, "X-Harness-Token is missing", True)
        if query.get("snapshot", "true") != "true":
            return self._reject(where, "snapshot is not 'true'", True)
        if query["accountID"] != self.account_id:
            return self._reject(where, "wrong accountID", False)
        if token != self.token:
            return self._reject(where, "wrong token", False)
        return None

    def _take_fault(self, op):
        with self._cond:
            rules = self._faults[op]
            if not rules:
                return None
            fault, count, status = rules[0]
            if count == 1:
                rules.pop(0)
            elif count is not None:
                rules[0][1] = count - 1
            return fault, status

    def _apply_fault(self, fault, status):
        if fault == "status":
            return status, {"error_msg": f"injected fault: status {status}"}
        if fault == "drip":
            return "drip", None
        if fault == "hang":
            with self._cond:
                epoch = self._hang_epoch
                self._cond.wait_for(lambda: self._stopped or self._hang_epoch != epoch)
        return None, None

    def _commit(self, op, query, lines, path, body=b""):
        """Apply a valid request to the recorded state; returns the answer."""
        key = query.get("key")
        with self._cond:
            if op == "open":
                self._open.add(key)
                self._opened[key] = self._opened.get(key, 0) + 1
                return 204, None
            if op == "write":
                if key not in self._open:
                    return 500, {"error_msg": "stream not found"}
                self._lines.setdefault(key, []).extend(lines)
                return 204, None
            if op == "close":
                if key not in self._open:
                    return 500, {"error_msg": "stream not found"}
                self._open.discard(key)
                snapshot = query.get("snapshot") == "true"
                self._closes.setdefault(key, []).append({"snapshot": snapshot})
                return 204, None
            if op == "upload":
                self._uploads.setdefault(key, []).append(lines)
                self._upload_bodies.setdefault(key, []).append(body)
                return 204, None
            if op == "link":
                link_id = secrets.token_urlsafe(16)
                self._links[link_id] = key
                link = f"{self.url}{_SIGNED_PREFIX}{link_id}"
                expires = time.time_ns() + _LINK_LIFETIME_NS
                return 200, {"link": link, "expires": expires}
            key = self._links.pop(path[len(_SIGNED_PREFIX) :], None)
            if key is None:
                return 403, {"error_msg": "unknown or used signed link"}
            self._uploads.setdefault(key, []).append(lines)
            self._upload_bodies.setdefault(key, []).append(body)
            return 200, None

    def _reject(self, where, problem, violation, status=400):
        """Note the problem when it is a violation; return the error answer."""
        if violation:
            self._violation(where, problem)
        return status, {"error_msg": problem}

    def _violation(self, where, problem):
        with self._cond:
            self._violations.append(f"{where}: {problem}")
            self._cond.notify_all()

    def _track(self, connection):
        with self._cond:
            if self._stopped:
                return False
            self._connections.add(connection)
            return True

    def _untrack(self, connection):
        with self._cond:
            self._connections.discard(connection)


def _drop(connection):
    # The plain socket's shutdown, even for TLS: it wakes a thread blocked in a
    # read without touching the TLS state that thread is still using.
    try:
        socket.socket.shutdown(connection, socket.SHUT_RDWR)
    except OSError:
        pass


# ---------------------------------------------------------------------------
# HTTP plumbing
# ---------------------------------------------------------------------------


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self):
        # Skip HTTPServer's reverse DNS lookup of the host name; it can be slow.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        """Stay quiet: clients in tests drop connections on purpose."""


class _Handler(http.server.BaseHTTPRequestHandler):
    """Reads each request in full, lets the service decide, then answers."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def setup(self):
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(5.0)
            self.request.do_handshake()
            self.request.settimeout(None)
        super().setup()

    def handle(self):
        service = self.server.service
        if not service._track(self.request):
            return
        try:
            super().handle()
        finally:
            service._untrack(self.request)

    def _dispatch(self):
        body = self._read_body()
        # The request line as sent: self.path has "//" collapsed by http.server,
        # which would hide a client joining URLs badly.
        target = self.requestline.split()[1]
        status, payload = self.server.service._serve(
            self.command, target, self.headers, body
        )
        if status is None or body is None:
            self.close_connection = True
        if status == "drip":
            self._drip()
        elif status is not None:
            self._answer(status, payload)

    def _drip(self):
        """Answer 204, but a byte at a time, until done or the service stops."""
        service = self.server.service
        self.close_connection = True
        for byte in b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n":
            with service._cond:
                if service._cond.wait_for(lambda: service._stopped, DRIP_INTERVAL):
                    return
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:
                return

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch
    do_OPTIONS = _dispatch

    def _read_body(self):
        """Return the whole body, or None when its framing cannot be trusted."""
        encoding = self.headers.get("Transfer-Encoding")
        length = self.headers.get("Content-Length")
        if encoding is not None:
            if encoding.strip().lower() != "chunked" or length is not None:
                return None
            return self._read_chunked()
        if length is None:
            return b""
        if not (length.isascii() and length.isdigit()):
            return None
        body = self.rfile.read(int(length))
        return body if len(body) == int(length) else None

    def _read_chunked(self):
        parts = []
        while True:
            size_line = self.rfile.readline(1024)
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError:
                return None
            if size == 0:
                break
            parts.append(self.rfile.read(size))
            if self.rfile.readline(1024) not in (b"\r\n", b"\n"):
                return None
        while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
            pass
        return b"".join(parts)

    def _answer(self, status, payload):
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format, *args):
        """Stay quiet; the test reads ``requests()`` instead."""


# ---------------------------------------------------------------------------
# A port that takes connections and never answers
# ---------------------------------------------------------------------------


class SilentListener:
    """A loopback port whose kernel completes connections nobody ever serves.

    The socket listens but is never accepted from or read, so a client's
    connect succeeds and its request then waits for an answer that never
    comes: the "accepts but never answers" service. ``url`` is its address;
    ``close()`` (or ``with``) frees the port.
    """

    def __init__(self, backlog=64):
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(backlog)
        self.url = "http://127.0.0.1:%d" % self._socket.getsockname()[1]

    def close(self):
        """Stop listening; waiting clients see their connection reset."""
        self._socket.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def self_signed_certificate(folder, common_name="127.0.0.1"):
    """Write a one-day self-signed certificate for 127.0.0.1 with openssl.

    Returns ``(cert_path, key_path)``; the caller checks openssl is there.
    """
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=" + common_name,
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            key,
            "-out",
            cert,
        ],
        check=True,
        capture_output=True,
    )
    return cert, key
