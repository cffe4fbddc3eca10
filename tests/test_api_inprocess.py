"""The HTTP API in this process, for failures no request from outside can cause.

Kept apart from ``test_api``, whose tests run against a real server process
and also against the built zipapp, so they must not import the engine.
"""

import json
import sys
import unittest
import wsgiref.util
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import liteengine  # noqa: E402


class BrokenEngine:
    """An engine whose every call fails, as a bug of ours would."""

    def setup(self, request):
        """Fail."""
        raise RuntimeError("engine bug")

    def destroy(self):
        """Fail."""
        raise RuntimeError("engine bug")


class InternalErrorTest(unittest.TestCase):
    """Our own failures answer 500 "internal error"; details stay in the log."""

    def test_engine_failure_is_json_500(self):
        app = liteengine.Api(BrokenEngine()).app
        environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/destroy"}
        wsgiref.util.setup_testing_defaults(environ)
        started = []
        with self.assertLogs("liteengine", "ERROR") as logs:
            body = b"".join(app(environ, lambda *args: started.append(args)))
        self.assertEqual(started[0][0], "500 Internal Server Error")
        self.assertEqual(json.loads(body), {"error_msg": "internal error"})
        self.assertIn("engine bug", "\n".join(logs.output))


if __name__ == "__main__":
    unittest.main()
