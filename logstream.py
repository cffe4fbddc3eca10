"""Streaming log lines to the log service, or to local files when there is none.

Three pieces, one idea each:

- ``HTTPClient`` speaks the log service's protocol (open, write, close, upload)
  and retries failed calls within a deadline; ``FileStore`` offers the same
  calls on a local folder.
- ``LiveWriter`` takes one key's lines from any thread, batches them to the
  service about once a second, keeps a capped history, and at close uploads
  that history and closes the stream.
- ``LogConfig``, ``Deadlines`` and ``Transport`` are the settings they read.

Everything this module logs goes to the ``logstream`` logger, which the
streaming handler never streams back (see hooks.py).
"""

import base64
import binascii
import collections
import contextlib
import dataclasses
import http.client
import ipaddress
import json
import functools
import logging
import os
import socket
import ssl
import tempfile
import threading
import time
import urllib.parse

log = logging.getLogger("logstream")

HISTORY_LIMIT = 5 * 1024 * 1024
LINE_LIMIT = 70 * 1024
TRUNCATED = "... (log line truncated)"
BATCH_LIMIT = 1024 * 1024
# What a writer counts, as stats() reports it and StreamMetrics sums it.
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
# Pending lines past this many bytes are flushed at once, not at the tick;
# a producer that can wait (a step's output) waits past twice as many.
HURRY_SIZE = 256 * 1024
# Encoded lines are kept as NDJSON bytes, this many lines to a slab.
SLAB_LINES = 512

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
    ``mtls_config`` is the client certificate to present, or ``None``.
    """

    url: str = ""
    account_id: str = ""
    token: str = dataclasses.field(default="", repr=False)
    indirect_upload: bool = False
    trim_new_line_suffix: bool = False
    skip_opening_stream: bool = False
    skip_closing_stream: bool = False
    mtls_config: "ClientCert" = dataclasses.field(default=None, repr=False)

    @classmethod
    def from_json(cls, obj, name="log_config"):
        """Read a decoded JSON object; ``None`` gives the defaults.

        Raises ``ValueError`` naming the field when a field has the wrong
        type, or when ``mtls_config`` cannot be used (see ``ClientCert``).
        Unknown fields are ignored.
        """
        if obj is None:
            return cls()
        if not isinstance(obj, dict):
            raise ValueError("%s must be an object" % name)
        values = {}
        for field in dataclasses.fields(cls):
            value = obj.get(field.name)
            if value is None or field.type not in (str, bool):
                continue
            if not isinstance(value, field.type):
                kind = "a string" if field.type is str else "a boolean"
                raise ValueError("%s.%s must be %s" % (name, field.name, kind))
            values[field.name] = value
        url = values.get("url", "").rstrip("/")
        if url and not _is_http_url(url):
            raise ValueError("%s.url must be an http or https URL" % name)
        values["url"] = url
        if any(ord(char) < 32 or ord(char) == 127 for char in values.get("token", "")):
            raise ValueError("%s.token must not hold control characters" % name)
        values["mtls_config"] = ClientCert.from_json(
            obj.get("mtls_config"), name + ".mtls_config"
        )
        return cls(**values)


def _is_http_url(url):
    """True for an http or https URL with a host and a valid port, if any."""
    parts = urllib.parse.urlsplit(url)
    try:
        parts.port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _no_password():
    # Called by ssl only for an encrypted key; without it OpenSSL would
    # prompt on the terminal.
    raise ValueError("encrypted keys are not supported")


@dataclasses.dataclass(frozen=True)
class ClientCert:
    """A client certificate and its key, PEM, to present to a log service.

    The runner sends both base64-encoded in ``log_config.mtls_config``.
    Neither shows in a repr or in any message. Equal certificates compare
    equal, so TLS contexts can be cached per certificate.
    """

    cert_pem: bytes = dataclasses.field(repr=False)
    key_pem: bytes = dataclasses.field(repr=False)

    @classmethod
    def from_json(cls, obj, name="mtls_config"):
        """Read ``{"client_cert": ..., "client_cert_key": ...}``.

        Returns ``None`` when the object is absent or both fields are empty.
        Raises ``ValueError`` naming the field that is missing, not base64
        or not PEM, or saying that the two do not belong together.
        """
        if obj is None:
            return None
        if not isinstance(obj, dict):
            raise ValueError("%s must be an object" % name)
        fields = (
            ("client_cert", "CERTIFICATE-----"),
            ("client_cert_key", "PRIVATE KEY-----"),
        )
        texts = {}
        for field, _ in fields:
            value = obj.get(field)
            if value is not None and not isinstance(value, str):
                raise ValueError("%s.%s must be a string" % (name, field))
            texts[field] = "".join((value or "").split())
        if not any(texts.values()):
            return None
        pems = {}
        for field, marker in fields:
            where = "%s.%s" % (name, field)
            if not texts[field]:
                raise ValueError("%s is missing" % where)
            try:
                pem = base64.b64decode(texts[field], validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("%s is not base64" % where) from None
            if b"-----BEGIN " not in pem or marker.encode() not in pem:
                raise ValueError("%s is not base64 of a PEM %s" % (where, marker[:-5]))
            pems[field] = pem
        cert = cls(pems["client_cert"], pems["client_cert_key"])
        try:
            cert.load_into(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
        except (ssl.SSLError, ValueError) as exc:
            raise ValueError(
                "%s: client_cert and client_cert_key are not a certificate and its "
                "unencrypted key (%s)" % (name, getattr(exc, "reason", None) or exc)
            ) from None
        return cert

    def load_into(self, context):
        """Make ``context`` present this certificate.

        ``ssl`` reads certificates only from files, so both go to a temporary
        file that only this user can read, deleted as soon as it is loaded.
        """
        handle, path = tempfile.mkstemp(prefix="liteengine-", suffix=".pem")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(self.cert_pem.rstrip(b"\n") + b"\n" + self.key_pem)
            context.load_cert_chain(path, password=_no_password)
        finally:
            os.unlink(path)


def flag_setting(environ, name, default=False):
    """Read a boolean the way Go's strconv.ParseBool does; unset is ``default``.

    Raises ``ValueError`` naming the variable for anything else.
    """
    value = environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("0", "f", "false"):
        return False
    if value in ("1", "t", "true"):
        return True
    raise ValueError("%s must be true or false, not %r" % (name, value))


def seconds_setting(environ, name, default, upper=float("inf")):
    """Read a positive number of seconds below ``upper``; unset is ``default``.

    Raises ``ValueError`` naming the variable for anything else.
    """
    value = environ.get(name, "").strip()
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < upper:
        raise ValueError("%s must be a positive number of seconds" % name)
    return seconds


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
        values = {
            field.name: seconds_setting(
                environ, "LE_%s_TIMEOUT" % field.name.upper(), field.default, 86400
            )
            for field in dataclasses.fields(cls)
        }
        return cls(**values)


PROXY_VARIABLES = (
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "NO_PROXY",
    "no_proxy",
)


@dataclasses.dataclass(frozen=True)
class Transport:
    """How connections to log services are made: whom to trust, which proxy.

    Servers are verified against certifi's bundle plus the CAs in
    ``ca_file``; ``skip_verify`` turns verification off and is warned about
    every time a client is made with it. ``proxy_env`` holds
    the proxy variables as ``(name, value)`` pairs; it stays out of the
    repr, since a proxy URL may carry a password.
    """

    ca_file: str = ""
    skip_verify: bool = False
    proxy_env: tuple = dataclasses.field(default=(), repr=False)

    @classmethod
    def from_env(cls, environ):
        """Read LE_LOG_CA_FILE, LE_LOG_SKIP_VERIFY and the proxy variables.

        Raises ``ValueError`` naming the variable when LE_LOG_CA_FILE holds
        no readable PEM certificate or LE_LOG_SKIP_VERIFY is not a boolean.
        """
        ca_file = environ.get("LE_LOG_CA_FILE", "").strip()
        if ca_file:
            try:
                ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(
                    "LE_LOG_CA_FILE=%s holds no readable PEM certificate: %s"
                    % (ca_file, getattr(exc, "strerror", None) or exc)
                ) from None
        return cls(
            ca_file=ca_file,
            skip_verify=flag_setting(environ, "LE_LOG_SKIP_VERIFY"),
            proxy_env=_proxy_pairs(environ),
        )

    def with_envs(self, envs):
        """This transport with the proxy variables in ``envs`` laid over.

        ``envs`` is a stage's setup ``envs``; its variables win over the
        engine's own, as they do in the runner's other engines.
        """
        merged = dict(self.proxy_env)
        merged.update(_proxy_pairs(envs or {}))
        return dataclasses.replace(self, proxy_env=tuple(sorted(merged.items())))

    def secrets(self):
        """The passwords in the proxy variables, as written and decoded.

        Steps see these variables too, so they belong in the masker.
        """
        found = set()
        for name, value in self.proxy_env:
            if name.lower() == "no_proxy":
                continue
            text = value if "://" in value else "http://" + value
            try:
                password = urllib.parse.urlsplit(text).password
            except ValueError:
                # Unreadable, so its password cannot be told apart: hide it all.
                found.add(value)
                continue
            if password:
                found.update((password, urllib.parse.unquote(password)))
        return tuple(sorted(found))

    def problems(self):
        """A message for each proxy variable that cannot be used, naming it."""
        found = []
        for name, value in self.proxy_env:
            if name.lower() == "no_proxy" or not value.strip():
                continue
            try:
                _Proxy.parse(name, value.strip())
            except LogServiceError as exc:
                found.append(str(exc))
            except ValueError:
                found.append("%s is not a proxy URL like http://host:port" % name)
        return found

    def tls_context(self, client_cert=None):
        """The client TLS context to use, presenting ``client_cert`` if given."""
        return _tls_context(self.ca_file, self.skip_verify, client_cert)

    def proxy_for(self, scheme, host, port):
        """The proxy that reaches ``host:port``, or ``None`` to go direct.

        HTTPS targets use HTTPS_PROXY, plain ones HTTP_PROXY; the upper-case
        name wins when both are set. ``localhost``, loopback addresses and
        the targets NO_PROXY names go direct. Raises ``LogServiceError``, not
        retryable, when the proxy setting cannot be used.
        """
        env = dict(self.proxy_env)
        if scheme == "https":
            name, value = _first_set(env, "HTTPS_PROXY", "https_proxy")
        else:
            name, value = _first_set(env, "HTTP_PROXY", "http_proxy")
        if not value:
            return None
        if _bypasses_proxy(host, port, _first_set(env, "NO_PROXY", "no_proxy")[1]):
            return None
        return _Proxy.parse(name, value)


def _proxy_pairs(environ):
    return tuple(
        sorted((name, environ[name]) for name in PROXY_VARIABLES if name in environ)
    )


def _first_set(env, *names):
    """The first of ``names`` set to something in ``env``, with its value."""
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return name, value
    return None, ""


@dataclasses.dataclass(frozen=True)
class _Proxy:
    """An HTTP proxy: where it listens, and the Proxy-Authorization it wants."""

    host: str
    port: int
    authorization: str = dataclasses.field(default="", repr=False)

    @classmethod
    def parse(cls, name, value):
        """Read the proxy URL in variable ``name``; a bare ``host:port`` is HTTP.

        Messages name the variable, never its value, which may hold a password.
        """
        parts = urllib.parse.urlsplit(value if "://" in value else "http://" + value)
        try:
            port = parts.port or 80
        except ValueError:
            port = None
        if parts.scheme.lower() != "http":
            raise LogServiceError(
                "%s names a %s proxy; only http:// proxies are supported"
                % (name, parts.scheme),
                retryable=False,
            )
        if not parts.hostname or port is None:
            raise LogServiceError(
                "%s is not a proxy URL like http://host:port" % name, retryable=False
            )
        authorization = ""
        if parts.username is not None:
            pair = "%s:%s" % (
                urllib.parse.unquote(parts.username),
                urllib.parse.unquote(parts.password or ""),
            )
            authorization = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        return cls(parts.hostname, port, authorization)


def _bypasses_proxy(host, port, no_proxy):
    """True when ``host:port`` is reached directly rather than via a proxy.

    Like Go's net/http: loopback targets always go direct, and NO_PROXY is
    a comma-separated list of ``*`` (everything), IP addresses, CIDR
    ranges, and domains (``example.com`` covers its subdomains too,
    ``.example.com`` and ``*.example.com`` only the subdomains), each
    optionally with ``:port``.
    """
    host = host.lower()
    address = _ip(host)
    if host == "localhost" or (address is not None and address.is_loopback):
        return True
    for entry in no_proxy.lower().split(","):
        entry = entry.strip()
        if entry == "*":
            return True
        if "/" in entry:
            try:
                network = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                continue
            if address is not None and address in network:
                return True
            continue
        name, entry_port = _split_no_proxy_entry(entry)
        if not name or (entry_port and entry_port != str(port)):
            continue
        if _ip(name) is not None:
            if _ip(name) == address:
                return True
            continue
        if name.startswith("*."):
            name = name[1:]
        if name.startswith("."):
            if host.endswith(name):
                return True
        elif host == name or host.endswith("." + name):
            return True
    return False


def _split_no_proxy_entry(entry):
    """``(host, port)`` of a NO_PROXY entry; the port is ``""`` when absent."""
    if entry.startswith("["):
        name, _, rest = entry[1:].partition("]")
        return name, rest[1:] if rest.startswith(":") else ""
    if entry.count(":") == 1:
        name, _, port = entry.partition(":")
        return name, port
    return entry, ""


def _ip(text):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


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
_LINE = '{"level":"%s","pos":%d,"out":%s,"time":"%s.%06dZ","args":null}'


def encode_lines(first, lines):
    """Encode ``(level, out, created)`` triples as Lines, ``pos`` from ``first``.

    Each Line is compact ASCII JSON, the unit both the stream and uploads
    use; ``time`` is RFC 3339 in UTC with microseconds.
    """
    encoded = []
    quote, template = _quote, _LINE
    last_second, stamp = None, ""
    for pos, (level, out, created) in enumerate(lines, first):
        second = int(created)
        if second != last_second:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            last_second = second
        micros = int((created - second) * 1e6)
        encoded.append(template % (level, pos, quote(out), stamp, micros))
    return encoded


def encode_line(pos, level, out, created):
    """One Line as compact ASCII JSON; see ``encode_lines``."""
    return encode_lines(pos, [(level, out, created)])[0]


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


def new_client(config, store_dir, deadlines, transport=None):
    """The client ``config`` asks for: HTTP to its URL, else the local store.

    ``transport`` says whom to trust and which proxy to use; by default
    certifi's bundle and no proxy.
    """
    if config.url:
        return HTTPClient(config, deadlines, transport)
    return FileStore(store_dir)


@functools.lru_cache(maxsize=32)
def _tls_context(ca_file="", skip_verify=False, client_cert=None):
    """A client context that verifies servers, one per distinct setting.

    Trusted: certifi's bundle (the one carried with the engine, also inside
    the single-file build) and the CAs in ``ca_file``; never the host's own
    store, so what is trusted does not depend on the VM.
    """
    import certifi

    context = ssl.create_default_context(cadata=certifi.contents())
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if client_cert is not None:
        client_cert.load_into(context)
    return context


class HTTPClient:
    """Calls one log service, keeping a single connection alive between calls.

    Every call has its own deadline (``Deadlines``); 5xx answers and
    connection errors are retried inside it with exponential backoff, 4xx
    answers are not. A call that fails for good raises ``LogServiceError``.
    ``retries`` counts the tries beyond the first, for the writer's figures.
    Whom it trusts and which proxy it goes through come from ``transport``.

    Locking: ``_lock`` guards the connection and is held for a whole call,
    network included, so calls from several threads go one at a time.
    """

    def __init__(self, config, deadlines, transport=None):
        parts = urllib.parse.urlsplit(config.url)
        self._scheme = parts.scheme
        self._netloc = parts.netloc
        self._prefix = parts.path.rstrip("/")
        self._config = config
        self._deadlines = deadlines
        self._transport = transport or Transport()
        self._tls = None
        if parts.scheme == "https":
            self._tls = self._transport.tls_context(config.mtls_config)
            if self._transport.skip_verify:
                fields = {"host": parts.hostname, "setting": "LE_LOG_SKIP_VERIFY"}
                log.warning(
                    "log service certificate not verified", extra={"fields": fields}
                )
        self._conn = None
        self._route = ("", {})
        self._lock = threading.Lock()
        self.retries = 0

    def open(self, key):
        """Open the stream for ``key``."""
        self._call("POST", "/stream", key, None, self._deadlines.open)

    def write(self, key, slabs):
        """Append NDJSON slabs of encoded lines to the open stream for ``key``."""
        # An encoded line never holds a raw newline, so turning the newlines
        # between lines into commas makes the JSON array the service wants.
        items = b",".join(slab[:-1].replace(b"\n", b",") for slab in slabs)
        self._call("PUT", "/stream", key, b"[" + items + b"]", self._deadlines.write)

    def close(self, key, snapshot=False):
        """Close the stream for ``key``; ``snapshot`` as the protocol says."""
        extra = {"snapshot": "true"} if snapshot else None
        self._call("DELETE", "/stream", key, None, self._deadlines.close, extra)

    def upload(self, key, slabs):
        """Upload NDJSON slabs as one body, through the service or by a link."""
        body = list(slabs)
        retry = Retry.within(self._deadlines.upload)
        if self._config.indirect_upload:
            self._call("POST", "/blob", key, body, retry)
            return
        answer = self._call("POST", "/blob/link/upload", key, None, retry)
        try:
            link = json.loads(answer)["link"]
            parts = urllib.parse.urlsplit(link)
            if parts.scheme not in ("http", "https"):
                raise ValueError(link)
        except (ValueError, KeyError, TypeError) as exc:
            raise LogServiceError(
                "upload link answer unusable", retryable=False
            ) from exc
        # The link is a signed URL, often on another host: it gets the bytes
        # but never the token.
        target = parts.path + ("?" + parts.query if parts.query else "")
        with self._lock:
            self._with_retry(
                lambda timeout: _one_shot(
                    parts, target, body, self._tls, self._transport, timeout
                ),
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
        """One protocol call, retried; returns the answer's body.

        ``body`` is bytes, a list of byte slabs, or ``None``.
        """
        query = {"accountID": self._config.account_id, "key": key}
        query.update(extra or {})
        try:
            target = self._prefix + path + "?" + urllib.parse.urlencode(query)
        except UnicodeEncodeError:
            raise LogServiceError(
                "%s %s refused: the key or account is not valid Unicode"
                % (method, path),
                retryable=False,
            ) from None
        headers = {"X-Harness-Token": self._config.token}
        if body is not None:
            headers["Content-Type"] = "application/json"
            headers["Content-Length"] = str(_length(body))
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
                message = "%s failed: %s" % (what, _describe(exc))
                error = LogServiceError(message, retryable=not _tls_refused(exc))
            except ValueError as exc:
                # A token, key or host no request can carry. The message may
                # quote the token, so only the kind of error is kept.
                error = LogServiceError(
                    "%s refused: the token, key or address cannot be sent (%s)"
                    % (what, type(exc).__name__),
                    retryable=False,
                )
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
            self._conn, prefix, proxy_headers = _connection(
                self._scheme, self._netloc, self._tls, self._transport, timeout
            )
            self._route = (prefix, proxy_headers)
        conn = self._conn
        prefix, proxy_headers = self._route
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        try:
            with _cut_at(conn, timeout):
                conn.request(
                    method,
                    prefix + target,
                    body=body,
                    headers={**headers, **proxy_headers},
                )
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


@contextlib.contextmanager
def _cut_at(conn, seconds):
    """Shut ``conn``'s socket down if the block is still running after ``seconds``.

    A socket timeout bounds each read, not a whole answer: a service that
    sends a byte now and then would hold a call far past its deadline. The
    shutdown ends the blocked read at once, and the call fails as any broken
    connection does.
    """

    def cut():
        sock = conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(seconds, cut)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _length(body):
    return len(body) if isinstance(body, bytes) else sum(map(len, body))


class _NoDelay:
    """Sends every request at once, never held back by Nagle's algorithm.

    http.client writes the headers and a slabbed body in separate sends;
    without this, the body can wait for the server's delayed ACK.
    """

    def connect(self):
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _HTTPConnection(_NoDelay, http.client.HTTPConnection):
    """A plain HTTP connection to the log service."""


class _HTTPSConnection(_NoDelay, http.client.HTTPSConnection):
    """A TLS connection to the log service."""


def _connection(scheme, netloc, tls, transport, timeout):
    """A connection to ``netloc``, through a proxy when ``transport`` says so.

    Returns ``(connection, prefix, headers)``: each request on it goes to
    ``prefix + target`` with ``headers`` added. Both are empty except for
    plain HTTP through a proxy, which takes the absolute URL and the proxy's
    credentials on every request. HTTPS goes through a CONNECT tunnel that
    carries the credentials, and the certificate is checked against the
    target's name, never the proxy's.
    """
    parts = urllib.parse.urlsplit("//" + netloc)
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise LogServiceError("bad port in %s" % netloc, retryable=False) from None
    proxy = transport.proxy_for(scheme, parts.hostname or "", port)
    if proxy is None:
        if scheme == "https":
            conn = _HTTPSConnection(netloc, timeout=timeout, context=tls)
        else:
            conn = _HTTPConnection(netloc, timeout=timeout)
        return conn, "", {}
    credentials = {}
    if proxy.authorization:
        credentials["Proxy-Authorization"] = proxy.authorization
    if scheme == "https":
        conn = _HTTPSConnection(proxy.host, proxy.port, timeout=timeout, context=tls)
        conn.set_tunnel(parts.hostname, port, headers=credentials)
        return conn, "", {}
    conn = _HTTPConnection(proxy.host, proxy.port, timeout=timeout)
    return conn, "http://" + netloc, credentials


def _one_shot(parts, target, body, tls, transport, timeout):
    """PUT ``body`` on a connection of its own, closed afterwards."""
    conn, prefix, headers = _connection(
        parts.scheme, parts.netloc, tls, transport, timeout
    )
    try:
        headers = dict(headers, **{"Content-Length": str(_length(body))})
        with _cut_at(conn, timeout):
            conn.request("PUT", prefix + target, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
        return response.status, b""
    finally:
        conn.close()


def _tls_refused(exc):
    """True for a TLS failure that no retry can fix.

    Either the service's certificate does not verify, or the service sent an
    alert refusing ours (none, or one it does not trust).
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return True
    return isinstance(exc, ssl.SSLError) and "ALERT" in (exc.reason or "")


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
        self._write(key, [], "wb")

    def write(self, key, slabs):
        """Append NDJSON slabs to the file for ``key``."""
        self._write(key, slabs, "ab")

    def close(self, key, snapshot=False):
        """Nothing to close for a file."""

    def disconnect(self):
        """Nothing is kept open between calls."""

    def upload(self, key, slabs):
        """Replace the file for ``key`` with the NDJSON ``slabs``, atomically."""
        path = self.path_for(key)
        temporary = path + ".part"
        try:
            self._write(key, slabs, "wb", temporary)
            os.replace(temporary, path)
        except OSError as exc:
            raise LogServiceError("log file not replaced: %s" % _describe(exc))

    def _write(self, key, slabs, mode, path=None):
        path = path or self.path_for(key)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, mode) as file:
                file.writelines(slabs)
        except OSError as exc:
            raise LogServiceError("log file not written: %s" % _describe(exc))


def _bad_key(key):
    """Why ``key`` cannot name a file in the store, or ``None`` if it can."""
    if not key:
        return "it is empty"
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return "it is not valid Unicode"
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
    pending in one write, and arms the next one; 256 KiB of pending lines
    are flushed at once instead of waiting. A write that fails is sent
    again, in order, by a later flush. ``close`` flushes, uploads the
    history and closes the stream, each call bounded by its deadline and
    each attempted even when the one before failed.

    The history keeps the newest lines up to ``limit`` bytes of encoded
    NDJSON and drops the oldest first; each line's text is capped at 70 KiB.
    Lines are given their ``pos`` when they are encoded, so dropped lines
    leave no gap.

    Locking: ``_lock`` guards the pending lines, the history, the counters
    and the timer. It is a leaf: while it is held nothing logs, touches the
    network, or takes another lock, so a thread that logs can never wait on
    the service or deadlock against a flush. ``_room`` is a condition on
    that same lock, for ``wait_for_room`` alone; ``append`` never waits on
    it. ``_send_lock`` keeps one flush, upload or close at a time; it may be
    held while logging, because logging only ever reaches ``append``, which
    never takes it.
    """

    def __init__(self, client, key, config, interval=1.0, limit=HISTORY_LIMIT):
        self.key = key
        self._client = client
        self._config = config
        self._interval = interval
        self._limit = limit
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._send_lock = threading.Lock()
        self._pending = collections.deque()
        self._pending_size = 0
        self._history = collections.deque()
        self._history_size = 0
        self._next_pos = 0
        self._live_pos = 0
        self._unsent_since = None
        self._timer = None
        self._hurried = False
        self._closed = False
        self._opened = config.skip_opening_stream
        self._live = True
        self._failing = False
        # The client keeps the count of retries; stats() adds it.
        self._counts = dict.fromkeys(
            (name for name in COUNTERS if name != "retries"), 0
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
                timer = self._timer = self._new_timer(self._interval)
            elif self._pending_size >= HURRY_SIZE and not self._hurried:
                # Enough is waiting: flush now rather than at the tick,
                # so a fast producer is not cut by the cap while the service
                # keeps up.
                self._hurried = True
                self._timer.cancel()
                timer = self._timer = self._new_timer(0)
            else:
                return
        # Started outside the lock: a thread start is slow, and a close that
        # cancels the timer first only makes it finish at once.
        timer.start()

    def stats(self):
        """The writer's counters, plus the age in seconds of the oldest unsent line."""
        with self._lock:
            figures = dict(self._counts)
            figures["retries"] = self._client.retries
            oldest = self._unsent_since
        age = 0.0 if oldest is None else time.time() - oldest
        figures["oldest_unsent_age"] = round(age, 3)
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
            self._room.notify_all()
        if already_closed:
            return self.stats()
        if timer is not None:
            timer.cancel()
        with self._send_lock, _machinery_at_work():
            try:
                self._flush()
                if not self._config.skip_closing_stream:
                    if not self._config.skip_opening_stream:
                        self._upload()
                    self._close_stream()
                self._client.disconnect()
                with self._lock:
                    # Nothing reads the lines any more; only the counters stay.
                    self._history.clear()
                    self._history_size = 0
            except Exception:
                # The clients turn every failure into LogServiceError; this
                # only keeps a bug of ours from reaching the caller.
                log.exception(
                    "log writer not closed", extra={"fields": {"key": self.key}}
                )
        return self.stats()

    def _new_timer(self, delay):
        timer = threading.Timer(delay, self._tick)
        timer.daemon = True
        return timer

    def _tick(self):
        """Flush, then arm the next tick: one chain of timers while open."""
        with self._send_lock, _machinery_at_work():
            with self._lock:
                self._timer = None
                self._hurried = False
                if self._closed:
                    return
            try:
                self._flush()
            except Exception:
                self._failing = True
                log.exception(
                    "log stream flush failed", extra={"fields": {"key": self.key}}
                )
            with self._lock:
                if self._closed or self._timer is not None:
                    return
                timer = self._timer = self._new_timer(self._interval)
        timer.start()

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
            with self._lock:
                waiting = bool(_unsent(self._history, self._live_pos, 1))
            if not waiting:
                return
            self._open()
            if not self._opened:
                self._count("flushes")
                self._count("failed_flushes")
                return
        while True:
            with self._lock:
                batch = _unsent(self._history, self._live_pos, BATCH_LIMIT)
            if not batch:
                return
            self._count("flushes")
            try:
                self._client.write(self.key, [data for _, _, data in batch])
            except LogServiceError as exc:
                self._flush_failed(exc)
                return
            first, _, _ = batch[0]
            last, count, _ = batch[-1]
            lines = last + count - first
            size = sum(len(data) for _, _, data in batch) + 1
            with self._lock:
                self._live_pos = last + count
                self._counts["sent"] += lines
                self._counts["bytes_sent"] += size
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
            pending, self._pending = list(self._pending), collections.deque()
            self._pending_size = 0
            first = self._next_pos
            self._next_pos += len(pending)
            self._room.notify_all()
        slabs = []
        for start in range(0, len(pending), SLAB_LINES):
            chunk = encode_lines(first + start, pending[start : start + SLAB_LINES])
            data = ("\n".join(chunk) + "\n").encode("ascii")
            slabs.append((first + start, len(chunk), data))
        with self._lock:
            self._history.extend(slabs)
            self._history_size += sum(len(data) for _, _, data in slabs)
            self._trim(exact=True)

    def _shed(self):
        """Make room for a new line. Caller holds ``_lock``.

        On the caller's side only whole slabs go, which is quick; the flush
        trims to the exact line later.
        """
        self._trim(exact=False)
        while self._pending and self._pending_size > self._limit:
            self._pending_size -= len(self._pending.popleft()[1]) + LINE_OVERHEAD
            self._counts["dropped"] += 1

    def _trim(self, exact):
        """Drop the oldest lines while over the limit. Caller holds ``_lock``."""
        while self._history and self._pending_size + self._history_size > self._limit:
            excess = self._pending_size + self._history_size - self._limit
            first, count, data = self._history[0]
            if excess >= len(data) or not exact:
                self._history.popleft()
                cut, gone = len(data), count
            else:
                cut = data.index(b"\n", excess - 1) + 1
                gone = data.count(b"\n", 0, cut)
                self._history[0] = (first + gone, count - gone, data[cut:])
            self._history_size -= cut
            self._counts["dropped"] += gone

    def wait_for_room(self, timeout):
        """Wait, at most ``timeout`` seconds, while a flush is due to drain.

        For producers that can be slowed down (a step's output pipe), not for
        logging calls. It returns at once while the stream is failing or
        closed, so a dead service never holds a build up.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while (
                self._pending_size >= 2 * HURRY_SIZE
                and not self._failing
                and not self._closed
            ):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._room.wait(left)

    def _upload(self):
        with self._lock:
            slabs = [data for _, _, data in self._history]
        try:
            self._client.upload(self.key, slabs)
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


def _unsent(history, live_pos, limit):
    """The slabs from ``live_pos`` on, up to about ``limit`` bytes (one at least).

    A slab is sent whole or not at all, so none straddles ``live_pos``.
    """
    batch = []
    for slab in reversed(history):
        if slab[0] < live_pos:
            break
        batch.append(slab)
    batch.reverse()
    size = 0
    for index, (_, _, data) in enumerate(batch):
        size += len(data)
        if index and size > limit:
            return batch[:index]
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

    def __init__(self, kinds=("engine", "step")):
        self._lock = threading.Lock()
        self._totals = {kind: dict.fromkeys(COUNTERS, 0) for kind in kinds}
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
            for name in COUNTERS:
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
                for name in COUNTERS:
                    figures[name] += live[name]
                age = max(figures["oldest_unsent_age"], live["oldest_unsent_age"])
                figures["oldest_unsent_age"] = age
        return totals
