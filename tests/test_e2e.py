"""The runner's sequence against the real server and the fake log service."""

import json
import os
import time
import unittest

from tests.engine_proc import EngineProcess, short_deadlines
from tests.fakelog import FakeLogService
from tests.test_api import request

KEY = "acct/stage-1/le"


def setup_body(service, **extra):
    body = {
        "le_log_key": KEY,
        "log_config": {
            "url": service.url,
            "account_id": "acct",
            "token": "tok",
        },
        "secrets": ["s3cr3t-value"],
        "envs": {"A": "b"},
        "network": {},
        "volumes": [],
        "files": [],
        "unknown_field_the_runner_sends": {"x": 1},
    }
    body.update(extra)
    return body


def outs(lines):
    return [line["out"] for line in lines]


class EngineLogStreamTest(unittest.TestCase):
    def setUp(self):
        self.service = FakeLogService().start()
        self.addCleanup(self.service.stop)
        self.engine = EngineProcess({"LE_FLUSH_INTERVAL": "0.2"}).start()
        self.addCleanup(self.engine.cleanup)

    def post(self, path, body):
        status, _, answer = request(self.engine.url, "POST", path, body)
        return status, answer

    def test_setup_lines_stream_live_and_destroy_uploads_them(self):
        started = time.monotonic()
        self.assertEqual(self.post("/setup", setup_body(self.service)), (200, {}))

        live = self.service.wait_for(
            lambda s: any('msg="setup done"' in o for o in outs(s.lines(KEY))), 2.0
        )
        self.assertTrue(live, self.service.requests())
        self.assertLess(time.monotonic() - started, 2.5)
        self.assertEqual(self.service.opened(KEY), 1)

        self.assertEqual(self.post("/destroy", {}), (200, {}))

        [upload] = self.service.uploads(KEY)
        texts = outs(upload)
        self.assertTrue(any('msg="setup done"' in text for text in texts), texts)
        self.assertTrue(any('msg="destroy started"' in text for text in texts))
        self.assertEqual([line["pos"] for line in upload], list(range(len(upload))))
        for text in texts:
            self.assertRegex(text, r'^time="[0-9TZ:-]+" level=\w+ msg=')
        self.assertEqual(self.service.closes(KEY), [{"snapshot": False}])
        self.assertFalse(self.service.is_open(KEY))
        self.assertEqual(self.service.violations(), [])
        everything = json.dumps(self.service.lines(KEY) + upload)
        self.assertNotIn('tok"', everything)

        # Local printing went on while streaming.
        self.assertIsNotNone(self.engine.wait_for_stderr('msg="destroy done"'))

    def test_second_setup_closes_the_first_writer(self):
        self.post("/setup", setup_body(self.service))
        self.post("/setup", setup_body(self.service, le_log_key="acct/stage-2/le"))
        self.assertEqual(len(self.service.uploads(KEY)), 1)
        self.assertEqual(self.service.closes(KEY), [{"snapshot": False}])
        self.post("/destroy", {})
        second = self.service.uploads("acct/stage-2/le")
        self.assertEqual(len(second), 1)
        # The first writer's handler was detached: no line of the second
        # stage reached the first key after its upload.
        after_close = [o for o in outs(self.service.lines(KEY)) if "stage-2" in o]
        self.assertEqual(after_close, [])
        self.assertEqual(self.service.violations(), [])

    def test_destroy_twice_is_harmless(self):
        self.post("/setup", setup_body(self.service))
        self.assertEqual(self.post("/destroy", {}), (200, {}))
        self.assertEqual(self.post("/destroy", {}), (200, {}))
        self.assertEqual(len(self.service.uploads(KEY)), 1)
        self.assertEqual(len(self.service.closes(KEY)), 1)

    def test_indirect_upload_and_trimmed_lines(self):
        # indirect_upload: the upload goes through the service, not a link.
        config = {
            "url": self.service.url,
            "account_id": "acct",
            "token": "tok",
            "indirect_upload": True,
            "trim_new_line_suffix": True,
        }
        self.post("/setup", setup_body(self.service, log_config=config))
        self.post("/destroy", {})
        [upload] = self.service.uploads(KEY)
        self.assertTrue(upload)
        self.assertFalse(any(o.endswith("\n") for o in outs(upload)))
        paths = {r["path"] for r in self.service.requests()}
        self.assertIn("/blob", paths)
        self.assertNotIn("/blob/link/upload", paths)

    def test_by_default_the_upload_goes_by_signed_link(self):
        self.post("/setup", setup_body(self.service))
        self.post("/destroy", {})
        self.assertEqual(len(self.service.uploads(KEY)), 1)
        paths = [r["path"] for r in self.service.requests()]
        self.assertIn("/blob/link/upload", paths)
        self.assertNotIn("/blob", paths)

    def test_token_and_secrets_never_in_any_line(self):
        service = FakeLogService(token="very-secret-token-123").start()
        self.addCleanup(service.stop)
        body = setup_body(service)
        body["log_config"]["token"] = "very-secret-token-123"
        self.post("/setup", body)
        self.post("/destroy", {})
        streamed = json.dumps(service.lines(KEY) + service.uploads(KEY))
        local = "".join(self.engine.stderr_lines())
        for text in (streamed, local):
            self.assertNotIn("very-secret-token-123", text)
            self.assertNotIn("s3cr3t-value", text)
        self.assertTrue(service.uploads(KEY))

    def test_unreachable_service_still_answers_setup_and_destroy(self):
        self.service.stop()
        engine = EngineProcess(short_deadlines(0.5)).start()
        self.addCleanup(engine.cleanup)
        body = setup_body(self.service)
        started = time.monotonic()
        status, _, _ = request(engine.url, "POST", "/setup", body)
        self.assertEqual(status, 200)
        self.assertLess(time.monotonic() - started, 2.0)
        status, _, _ = request(engine.url, "POST", "/destroy", {})
        self.assertEqual(status, 200)
        self.assertIsNotNone(engine.wait_for_stderr('msg="log stream not opened"'))
        self.assertIsNotNone(engine.wait_for_stderr('msg="log upload failed"'))


class LocalStoreTest(unittest.TestCase):
    def test_without_a_url_lines_go_to_the_shared_folder(self):
        with EngineProcess() as engine:
            status, _, _ = request(
                engine.url, "POST", "/setup", {"le_log_key": "stage-1/le"}
            )
            self.assertEqual(status, 200)
            status, _, _ = request(engine.url, "POST", "/destroy", {})
            self.assertEqual(status, 200)
            path = os.path.join(engine.shared_dir, "stage-1", "le.ndjson")
            with open(path, "rb") as file:
                lines = [json.loads(line) for line in file]
        self.assertTrue(any('msg="setup done"' in o for o in outs(lines)))
        self.assertEqual([line["pos"] for line in lines], list(range(len(lines))))

    def test_key_leaving_the_folder_is_refused_and_nothing_written(self):
        with EngineProcess() as engine:
            status, _, _ = request(
                engine.url, "POST", "/setup", {"le_log_key": "../../escape"}
            )
            self.assertEqual(status, 200)
            request(engine.url, "POST", "/destroy", {})
            self.assertIsNotNone(engine.wait_for_stderr("log key refused"))
            found = [
                os.path.join(top, name)
                for top, _, names in os.walk(engine.workdir)
                for name in names
            ]
        self.assertEqual(found, [])


if __name__ == "__main__":
    unittest.main()
