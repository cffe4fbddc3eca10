"""A fixed-seed corpus of malformed requests to the engine's HTTP API, for tests.

``api_corpus()`` builds well over a thousand requests that reach the engine's
own code: bodies that are not JSON, not objects, not UTF-8 or nested 10,000
deep; every field of every endpoint with a wrong type, a null where one is
not allowed, or a value out of range; missing bodies, wrong methods, unknown
paths, declared bodies over the 10 MiB limit and garbage headers. Each case
breaks at least one thing the engine must refuse, so every answer should be
a 4xx JSON error; harmless noise (unknown fields, nulls where allowed, 1 MB
strings) is layered on top to widen what the parser sees.

``framing_corpus()`` holds requests broken at the HTTP level (request line,
header syntax, transfer codings), which the HTTP server answers before the
engine's code runs.

No ``/start_step`` case is ever valid, and even its base body could run
nothing: the entrypoint names a file that does not exist and the only
"command" is a shell comment. Nothing here needs more than the standard
library; the same seed always gives the same corpus.
"""

import dataclasses
import json
import random

SEED = 1234
LIMIT = 10 * 1024 * 1024
HUGE = 1024 * 1024
DEEP = 10000

JSON_ENDPOINTS = ("/setup", "/destroy", "/start_step", "/poll_step", "/stream_output")
GET_ENDPOINTS = ("/healthz", "/metrics")
KNOWN_PATHS = frozenset(JSON_ENDPOINTS + GET_ENDPOINTS)

NEVER_RUNS = "/nonexistent/liteengine-corpus-never-runs"

# Values of the wrong JSON type for each kind of field. None is left out on
# purpose: null means "not given" for every optional field.
NOT_STR = (0, 1, -7, 3.5, True, False, [], ["x"], {}, {"a": "b"})
NOT_BOOL = (0, 1, 2.5, "true", "false", "", [], {}, ["true"])
NOT_DICT = ([], ["a"], "x", "", 0, 1, 2.5, True, False)
NOT_LIST = ({}, {"a": 1}, "x", "", 0, 1, True, False)
BAD_STR_LISTS = ([1], [None], [["x"]], [{"a": "b"}], ["ok", 2], [True], [1.5])
BAD_STR_MAPS = (
    {"A": 1},
    {"A": None},
    {"A": ["x"]},
    {"A": {"b": "c"}},
    {"A": True},
    {"A\x00B": "x"},
    {"A": "x\x00y"},
)
BAD_TIMEOUTS = (
    "1",
    "",
    [],
    {},
    True,
    False,
    -1,
    -0.5,
    1e9,
    1e12,
    1e300,
    float("nan"),
    float("inf"),
    float("-inf"),
)
BAD_OFFSETS = ("1", "0", -1, -100, 1.5, True, [0], {"a": 1}, 1e3)
BAD_URLS = (
    "ftp://example.invalid/logs",
    "file:///etc/passwd",
    "gopher://127.0.0.1:70",
    "javascript:alert(1)",
    "mailto:ops@example.invalid",
    "data:text/plain,x",
    "  x",
    "127.0.0.1:9",
)
BAD_LEVELS = ("verbose", "trace", "INFO2", "panic", "0", 1, True, ["debug"], {"a": 1})

LOG_CONFIG_STRINGS = ("account_id", "token")
LOG_CONFIG_FLAGS = (
    "indirect_upload",
    "trim_new_line_suffix",
    "skip_opening_stream",
    "skip_closing_stream",
)
WRONG_METHODS = ("GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD")
ODD_METHODS = ("BREW", "PROPFIND", "MKCOL", "TRACE", "X-CORPUS", "LINK", "PURGE")

# Headers whose value changes how the request is framed or answered; garbage
# headers never use these names.
_FRAMING_HEADERS = frozenset(
    ("content-length", "transfer-encoding", "connection", "expect", "host", "te")
)
_TOKEN = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_!#$%&'*+.^`|~"
_PATH_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@"


@dataclasses.dataclass
class Case:
    """One request: what it breaks, and the bytes that go on the wire.

    ``headers`` are raw ``(name, value)`` byte pairs sent as given, after a
    ``Host`` header; ``Content-Length`` is added for the body unless
    ``length`` says otherwise (``None``: add none; an int or bytes: send that).
    """

    category: str
    method: str
    target: str
    body: bytes = b""
    headers: list = dataclasses.field(default_factory=list)
    length: object = "auto"
    note: str = ""
    wire: bytes = None

    def raw(self):
        """The request as bytes: ``wire`` when set, else built, HTTP/1.1."""
        if self.wire is not None:
            return self.wire
        lines = [b"%s %s HTTP/1.1" % (self.method.encode(), self.target.encode())]
        lines.append(b"Host: 127.0.0.1")
        lines.extend(name + b": " + value for name, value in self.headers)
        if self.length == "auto":
            if self.body or self.method not in ("GET", "HEAD", "OPTIONS"):
                lines.append(b"Content-Length: %d" % len(self.body))
        elif self.length is not None:
            value = self.length
            if isinstance(value, int):
                value = str(value).encode()
            lines.append(b"Content-Length: " + value)
        return b"\r\n".join(lines) + b"\r\n\r\n" + self.body

    def describe(self):
        """A short line naming the case, for failure messages."""
        body = (self.body if self.wire is None else self.wire)[:60]
        return "%s %s %s body=%r%s" % (
            self.category,
            self.method,
            self.target[:60],
            body,
            " (%s)" % self.note if self.note else "",
        )


# ------------------------------------------------------------- valid bases


def base_setup(rng):
    """A valid /setup body; never sent without a breaking mutation."""
    return {
        "le_log_key": "corpus/le-%d" % rng.randrange(10**6),
        "log_config": {"url": "", "account_id": "acct", "token": "corpus-token"},
        "secrets": ["corpus-secret"],
        "envs": {"CORPUS": "1"},
        "network": {},
        "volumes": [],
        "files": [],
    }


def base_step(rng):
    """A /start_step body that could run nothing even if it were accepted."""
    number = rng.randrange(10**6)
    return {
        "id": "corpus-%d" % number,
        "name": "corpus",
        "log_key": "corpus/step-%d" % number,
        "environment": {"CORPUS": "1"},
        "secrets": [],
        "working_dir": "",
        "timeout": 1,
        "run": {"commands": ["# corpus case, never run"], "entrypoint": [NEVER_RUNS]},
        "output_vars": [],
    }


def base_poll(rng):
    """A /poll_step or /stream_output body for a step that does not exist."""
    return {"id": "corpus-missing-%d" % rng.randrange(10**6)}


# ------------------------------------------------------ breaking mutations


def _log_config_breaks(rng, name):
    """A wrong ``log_config`` (or ``le_log_config``) value and what it breaks."""
    choice = rng.randrange(6)
    config = {"url": "", "account_id": "acct", "token": "t"}
    if choice == 0:
        return rng.choice(NOT_DICT), name + " not an object"
    if choice == 1:
        config["url"] = rng.choice(NOT_STR)
        return config, name + ".url wrong type"
    if choice == 2:
        config["url"] = rng.choice(BAD_URLS)
        return config, name + ".url not http"
    if choice == 3:
        config[rng.choice(LOG_CONFIG_STRINGS)] = rng.choice(NOT_STR)
        return config, name + " string field wrong type"
    if choice == 4 and name == "log_config":
        config["le_log_level"] = rng.choice(BAD_LEVELS)
        return config, name + ".le_log_level bad"
    config[rng.choice(LOG_CONFIG_FLAGS)] = rng.choice(NOT_BOOL)
    return config, name + " flag wrong type"


def break_setup(rng, body):
    """Make one /setup field wrong; returns what was broken."""
    field = rng.choice(
        (
            "le_log_key",
            "envs",
            "secrets",
            "network",
            "volumes",
            "files",
            "log_config",
            "le_log_config",
        )
    )
    if field == "le_log_key":
        body[field] = rng.choice(NOT_STR)
    elif field == "envs":
        body[field] = rng.choice(NOT_DICT + BAD_STR_MAPS)
    elif field == "secrets":
        body[field] = rng.choice(NOT_LIST + BAD_STR_LISTS)
    elif field == "network":
        body[field] = rng.choice(NOT_DICT)
    elif field in ("volumes", "files"):
        body[field] = rng.choice(NOT_LIST)
    else:
        body[field], what = _log_config_breaks(rng, field)
        return what
    return field + " wrong"


def break_step(rng, body):
    """Make one /start_step field wrong; returns what was broken."""
    field = rng.choice(
        (
            "id",
            "id",
            "name",
            "log_key",
            "working_dir",
            "environment",
            "secrets",
            "output_vars",
            "timeout",
            "run",
            "run.commands",
            "run.entrypoint",
            "log_config",
        )
    )
    if field == "id":
        choice = rng.randrange(4)
        if choice == 0:
            body.pop("id")
        elif choice == 1:
            body["id"] = None
        elif choice == 2:
            body["id"] = ""
        else:
            body["id"] = rng.choice(NOT_STR)
    elif field in ("name", "log_key", "working_dir"):
        body[field] = rng.choice(NOT_STR)
    elif field == "environment":
        body[field] = rng.choice(NOT_DICT + BAD_STR_MAPS)
    elif field in ("secrets", "output_vars"):
        body[field] = rng.choice(NOT_LIST + BAD_STR_LISTS)
    elif field == "timeout":
        body[field] = rng.choice(BAD_TIMEOUTS)
    elif field == "run":
        body[field] = rng.choice(NOT_DICT)
    elif field.startswith("run."):
        run = body["run"] if isinstance(body.get("run"), dict) else {}
        run[field[4:]] = rng.choice(NOT_LIST + BAD_STR_LISTS)
        run.setdefault("entrypoint", [NEVER_RUNS])
        body["run"] = run
    else:
        body[field], what = _log_config_breaks(rng, field)
        return what
    return field + " wrong"


def break_poll(rng, body, path):
    """Make a /poll_step or /stream_output body wrong, or name an unknown step."""
    choice = rng.randrange(6 if path == "/stream_output" else 5)
    if choice == 0:
        body.pop("id")
        return "id missing"
    if choice == 1:
        body["id"] = None
        return "id null"
    if choice == 2:
        body["id"] = rng.choice(("",) + NOT_STR)
        return "id wrong"
    if choice == 5:
        body["offset"] = rng.choice(BAD_OFFSETS)
        return "offset wrong"
    if path == "/stream_output" and rng.random() < 0.3:
        body["offset"] = rng.choice((None, 0, 5))
    return "unknown step"


def break_destroy(rng, body):
    """The only field /destroy reads, with a wrong type."""
    body["stage_runtime_id"] = rng.choice(NOT_STR)
    return "stage_runtime_id wrong type"


# ------------------------------------------------------------------ noise


def _random_text(rng, size):
    alphabet = 'abcXYZ019 _-/.:"\\\t\n\u00e9\u4e2d\U0001f600\u202e\ufeff'
    return "".join(rng.choice(alphabet) for _ in range(size))


def random_json(rng, depth=0):
    """A small random JSON value, sometimes odd (unicode, escapes, nesting)."""
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice((True, False))
    if kind == 2:
        return rng.choice((0, -1, 2**63, -(2**70), 1e308, 5e-324))
    if kind == 3:
        return _random_text(rng, rng.randrange(0, 40))
    if kind == 4:
        return "\ud800" + _random_text(rng, 3)
    if kind == 5:
        return rng.random()
    if kind in (6, 7):
        return {
            _random_text(rng, rng.randrange(1, 8)): random_json(rng, depth + 1)
            for _ in range(rng.randrange(0, 4))
        }
    return [random_json(rng, depth + 1) for _ in range(rng.randrange(0, 4))]


def add_noise(rng, body, optional, strings):
    """Layer on harmless oddities: unknown fields, allowed nulls, huge strings.

    ``optional`` are fields where null means "not given"; ``strings`` are
    string fields that may hold anything. Returns a note, or "".
    """
    notes = []
    for _ in range(rng.randrange(0, 3)):
        body["x_" + _random_text(rng, 5)] = random_json(rng)
        notes.append("unknown field")
    if optional and rng.random() < 0.3:
        body[rng.choice(optional)] = None
        notes.append("null")
    if strings and rng.random() < 0.015:
        body[rng.choice(strings)] = "h" * HUGE
        notes.append("1 MB string")
    elif rng.random() < 0.01:
        body["x_huge"] = "\u00e9" * (HUGE // 2)
        notes.append("1 MB unknown field")
    if rng.random() < 0.05:
        body["x_nested"] = _nested_list(rng.randrange(50, 300))
        notes.append("nested")
    return ", ".join(notes)


def _nested_list(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


def garbage_headers(rng):
    """A few header lines with odd but well-formed names and odd values."""
    headers = []
    for _ in range(rng.randrange(1, 6)):
        name = "".join(rng.choice(_TOKEN) for _ in range(rng.randrange(1, 20)))
        if name.lower() in _FRAMING_HEADERS:
            name = "X-" + name
        value = bytes(
            rng.choice(list(range(0x20, 0x7F)) + [0x09] + list(range(0x80, 0x100)))
            for _ in range(rng.randrange(0, 60))
        ).strip()
        headers.append((name.encode(), value))
    if rng.random() < 0.2:
        headers.append(
            (b"Content-Type", rng.choice((b"text/html", b"\xff\xfe", b";;")))
        )
    if rng.random() < 0.1:
        headers.extend((b"X-Many-%d" % n, b"v") for n in range(300))
    return headers


# ------------------------------------------------------------ body framing


def not_json(rng, good):
    """Bytes that are not JSON at all, or JSON with something broken."""
    choice = rng.randrange(8)
    if choice == 0:
        return good[: rng.randrange(1, len(good))]
    if choice == 1:
        return good + b" trailing"
    if choice == 2:
        return good.replace(b'"', b"'")
    if choice == 3:
        return b"/* comment */" + good
    if choice == 4:
        return b"<xml>" + good + b"</xml>"
    if choice == 5:
        return b"{" + bytes(rng.randrange(0x21, 0x7F) for _ in range(30))
    if choice == 6:
        return b'{"id": "x",}'
    return b"x" + bytes(rng.randrange(0, 0x80) for _ in range(rng.randrange(1, 200)))


NOT_OBJECTS = (b"[]", b"[{}]", b'"text"', b"1", b"-2.5", b"true", b"false", b"NaN")


def invalid_utf8(rng, good):
    """``good`` with bytes that are not UTF-8 inside a string or outside."""
    bad = rng.choice(
        (b"\xff", b"\xfe\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\x80\x80")
    )
    if b'"' in good and rng.random() < 0.8:
        first = good.index(b'"')
        return good[: first + 1] + bad + good[first + 1 :]
    return bad + good


def deeply_nested(rng, good):
    """A body nested 10,000 levels deep, whole or inside one field."""
    if rng.random() < 0.5:
        inner = b"[" * DEEP + b"]" * DEEP
    else:
        inner = b'{"a":' * DEEP + b"1" + b"}" * DEEP
    if rng.random() < 0.5 or good[:1] != b"{":
        return inner
    return b'{"x_deep": ' + inner + b", " + good[1:]


# ----------------------------------------------------------------- corpus


def _dump(body):
    return json.dumps(body).encode("utf-8")


def _refused_as_json(data):
    """True when the engine's JSON reader must refuse ``data``."""
    try:
        value = json.loads(data.decode("utf-8"))
    except ValueError:
        return True
    return not isinstance(value, dict) and value is not None


def _json_case(rng, path):
    """One malformed request to a JSON endpoint."""
    if path == "/setup":
        body = base_setup(rng)
        optional = ["envs", "secrets", "network", "volumes", "files", "log_config"]
        strings = ["le_log_key"]
    elif path == "/start_step":
        body = base_step(rng)
        optional = ["name", "log_key", "environment", "secrets", "working_dir"]
        optional += ["timeout", "output_vars", "log_config"]
        strings = ["name", "log_key", "working_dir"]
    elif path == "/destroy":
        body, optional, strings = {}, [], []
    else:
        body, optional, strings = base_poll(rng), [], ["id"]
    noise = add_noise(rng, body, optional, strings)

    kind = rng.choices(
        ("field", "not_json", "not_object", "utf8", "deep", "no_body"),
        weights=(60, 10, 6, 8, 6, 10 if path not in ("/setup", "/destroy") else 0),
    )[0]
    if kind == "field":
        if path == "/setup":
            what = break_setup(rng, body)
        elif path == "/start_step":
            what = break_step(rng, body)
        elif path == "/destroy":
            what = break_destroy(rng, body)
        else:
            what = break_poll(rng, body, path)
        data = _dump(body)
    elif kind == "not_json":
        data, what = not_json(rng, _dump(body)), "not JSON"
        if not _refused_as_json(data):
            data = b"{"
    elif kind == "not_object":
        data, what = rng.choice(NOT_OBJECTS), "not an object"
    elif kind == "utf8":
        data, what = invalid_utf8(rng, _dump(body)), "invalid UTF-8"
    elif kind == "deep":
        data, what = deeply_nested(rng, _dump(body)), "nested 10,000 deep"
    else:
        case = _missing_body(rng, path)
        case.note = noise
        return case
    headers = garbage_headers(rng) if rng.random() < 0.15 else []
    if headers:
        kind += "+headers"
    return Case(kind, "POST", path, data, headers, note=", ".join((what, noise)))


def _missing_body(rng, path):
    """A body-less (or empty) request to an endpoint that needs an ``id``."""
    choice = rng.randrange(5)
    if choice == 0:
        return Case("no_body", "POST", path, b"", length=None, note="no length")
    if choice == 1:
        return Case("no_body", "POST", path, b"", length=0)
    if choice == 2:
        return Case("no_body", "POST", path, b" \r\n\t ")
    if choice == 3:
        return Case("no_body", "POST", path, b"null")
    return Case("no_body", "POST", path, b"{}")


def _wrong_method_case(rng):
    path = rng.choice(JSON_ENDPOINTS + GET_ENDPOINTS)
    if path in GET_ENDPOINTS:
        method = rng.choice(("POST", "PUT", "DELETE", "PATCH", "OPTIONS") + ODD_METHODS)
    else:
        method = rng.choice(WRONG_METHODS + ODD_METHODS)
    body = b""
    if method != "HEAD" and rng.random() < 0.5:
        body = _dump(random_json(rng))
    headers = garbage_headers(rng) if rng.random() < 0.2 else []
    return Case("wrong_method", method, path, body, headers)


def _unknown_path_case(rng):
    choice = rng.randrange(6)
    if choice == 0:
        path = rng.choice(sorted(KNOWN_PATHS)) + rng.choice(("/", "/x", "/..", "x"))
    elif choice == 1:
        path = rng.choice(sorted(KNOWN_PATHS)).upper()
    elif choice == 2:
        path = "/" + "/".join(
            "".join(rng.choice(_PATH_CHARS) for _ in range(rng.randrange(1, 12)))
            for _ in range(rng.randrange(1, 5))
        )
    elif choice == 3:
        path = "/" + "".join("%%%02X" % rng.randrange(256) for _ in range(8))
    elif choice == 4:
        path = rng.choice(("/", "/setup//", "/./setup", "/api/setup", "/%00", "/%ff"))
    else:
        path = "/" + "p" * rng.choice((1000, 8000, HUGE))
    if path.upper() in KNOWN_PATHS and path in KNOWN_PATHS:
        path += "/nope"
    method = rng.choice(("GET", "POST", "PUT", "DELETE"))
    body = _dump(random_json(rng)) if method != "GET" else b""
    return Case("unknown_path", method, path, body)


def _oversized_case(rng):
    """A POST declaring a body over the limit and sending none of it."""
    path = rng.choice(JSON_ENDPOINTS)
    size = rng.choice((LIMIT + 1, LIMIT * 2, 2**31, 2**40, 10**18))
    return Case("oversized", "POST", path, b"", length=size, note="declared %d" % size)


def api_corpus(seed=SEED):
    """The requests that reach the engine's code; at least 1,000 of them."""
    rng = random.Random(seed)
    cases = []
    for _ in range(900):
        cases.append(_json_case(rng, rng.choice(JSON_ENDPOINTS)))
    for _ in range(140):
        cases.append(_wrong_method_case(rng))
    for _ in range(110):
        cases.append(_unknown_path_case(rng))
    for _ in range(25):
        cases.append(_oversized_case(rng))
    for _ in range(15):
        path = rng.choice(JSON_ENDPOINTS)
        cases.append(
            Case(
                "negative_length",
                "POST",
                path,
                b"",
                length=b"-%d" % rng.randrange(1, 9),
            )
        )
    rng.shuffle(cases)
    return cases


def framing_corpus(seed=SEED):
    """Requests broken at the HTTP level, each sent on a connection of its own."""
    rng = random.Random(seed + 1)
    templates = (
        ("lowercase method", b"post %(p)s HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("no version", b"POST %(p)s\r\nHost: x\r\n\r\n"),
        ("version 1.2", b"POST %(p)s HTTP/1.2\r\nHost: x\r\nContent-Length: 0\r\n\r\n"),
        ("version 2.0", b"POST %(p)s HTTP/2.0\r\nHost: x\r\n\r\n"),
        ("version 0.9", b"GET %(p)s HTTP/0.9\r\n\r\n"),
        ("bad protocol", b"POST %(p)s FTP/1.1\r\nHost: x\r\n\r\n"),
        ("bad version", b"POST %(p)s HTTP/x.y\r\nHost: x\r\n\r\n"),
        ("target without slash", b"POST %(r)s HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("absolute target", b"POST http://127.0.0.1%(p)s HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("double slash target", b"POST /%(p)s HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("fragment", b"POST %(p)s#frag HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("tabs", b"POST\t%(p)s\tHTTP/1.1\r\nHost: x\r\n\r\n"),
        ("header without colon", b"POST %(p)s HTTP/1.1\r\nHost: x\r\nnocolon\r\n\r\n"),
        ("folded first header", b"POST %(p)s HTTP/1.1\r\n folded\r\nHost: x\r\n\r\n"),
        ("LF only", b"POST %(p)s HTTP/1.1\nHost: x\n\n"),
        (
            "bad length",
            b"POST %(p)s HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        ),
        (
            "gzip coding",
            b"POST %(p)s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        ),
        (
            "chunked then gzip",
            b"POST %(p)s HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked, gzip\r\n\r\n",
        ),
        ("binary line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"),
    )
    cases = []
    for note, template in templates:
        for path in JSON_ENDPOINTS + GET_ENDPOINTS:
            data = template % {b"p": path.encode(), b"r": path[1:].encode()}
            cases.append(Case("framing: " + note, "POST", path, note=note, wire=data))
    rng.shuffle(cases)
    return cases
