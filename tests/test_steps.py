"""Steps end to end: the real server runs them, the fake service gets their lines."""

import http.client
import json
import os
import tempfile
import threading
import time
import unittest
import urllib.parse

from tests.engine_proc import EngineProcess
from tests.fakelog import FakeLogService
from tests.test_api import request

TOKEN = "step-test-token"


def outs(lines):
    return [line["out"] for line in lines]


class StepTest(unittest.TestCase):
    def setUp(self):
        self.service = FakeLogService(token=TOKEN).start()
        self.addCleanup(self.service.stop)
        self.engine = EngineProcess({"LE_FLUSH_INTERVAL": "0.2", "DEBUG": "true"})
        self.engine.start()
        self.addCleanup(self.engine.cleanup)
        self.log_config = {
            "url": self.service.url,
            "account_id": "acct",
            "token": TOKEN,
        }
        body = {"le_log_key": "stage/le", "log_config": self.log_config}
        body["secrets"] = ["stage-secret-1"]
        body["envs"] = {"FROM_SETUP": "setup-env"}
        self.assertEqual(self.post("/setup", body), (200, {}))

    def post(self, path, body):
        status, _, answer = request(self.engine.url, "POST", path, body)
        return status, answer

    def start(self, step_id, *commands, **fields):
        body = {
            "id": step_id,
            "log_key": "stage/" + step_id,
            "run": {"commands": commands},
        }
        body.update(fields)
        self.assertEqual(self.post("/start_step", body), (200, {}))

    def poll(self, step_id):
        status, answer = self.post("/poll_step", {"id": step_id})
        self.assertEqual(status, 200, answer)
        return answer

    def test_lines_and_exit_code(self):
        self.start("s1", "echo one", "echo two >&2", "echo three", "exit 3")
        answer = self.poll("s1")
        self.assertEqual(answer["exited"], True)
        self.assertEqual(answer["exit_code"], 3)
        self.assertIn("3", answer["error"])
        [upload] = self.service.uploads("stage/s1")
        self.assertEqual(outs(upload), ["one\n", "two\n", "three\n"])
        self.assertEqual(outs(self.service.lines("stage/s1")), outs(upload))
        self.assertEqual(self.service.closes("stage/s1"), [{"snapshot": False}])
        self.assertEqual(self.service.violations(), [])

    def test_lines_are_live_while_the_step_runs(self):
        marker = os.path.join(self.engine.workdir, "go")
        self.start(
            "live",
            "echo early",
            "while [ ! -e %s ]; do sleep 0.05; done" % marker,
            "echo late",
        )
        live = self.service.wait_for(lambda s: "early\n" in outs(s.lines("stage/live")))
        open(marker, "w").close()
        self.assertTrue(live)
        self.assertEqual(self.poll("live")["exit_code"], 0)
        self.assertEqual(
            outs(self.service.uploads("stage/live")[0]), ["early\n", "late\n"]
        )

    def test_timeout_kills_the_process_group(self):
        pid_file = os.path.join(self.engine.workdir, "child.pid")
        self.start("slow", "sleep 30 & echo $! > %s" % pid_file, "wait", timeout=1)
        answer = self.poll("slow")
        self.assertEqual(answer["exit_code"], 124)
        self.assertIn("timed out", answer["error"])
        with open(pid_file) as file:
            child = int(file.read())
        self.assertFalse(process_alive(child))
        self.assertEqual(len(self.service.uploads("stage/slow")), 1)

    def test_timeout_kills_a_background_child_holding_the_output(self):
        pid_file = os.path.join(self.engine.workdir, "orphan.pid")
        self.start(
            "orphan",
            "(sleep 30; echo late) & echo $! > %s" % pid_file,
            "echo started",
            timeout=1,
        )
        answer = self.poll("orphan")
        self.assertEqual(answer["exit_code"], 124)
        with open(pid_file) as file:
            self.assertFalse(process_alive(int(file.read())))
        self.assertEqual(outs(self.service.uploads("stage/orphan")[0]), ["started\n"])

    def test_outputs_and_envs(self):
        self.start(
            "out",
            'echo "VERSION=1.2.3" >> "$DRONE_OUTPUT"',
            'echo "IGNORED=x" >> "$DRONE_OUTPUT"',
            'echo "NEXT=yes" >> "$DRONE_ENV"',
            "echo $FROM_SETUP $FROM_STEP",
            output_vars=["VERSION", "MISSING"],
            environment={"FROM_STEP": "step-env"},
        )
        answer = self.poll("out")
        self.assertEqual(answer["outputs"], {"VERSION": "1.2.3"})
        self.assertEqual(answer["envs"], {"NEXT": "yes"})
        self.assertEqual(
            outs(self.service.uploads("stage/out")[0]), ["setup-env step-env\n"]
        )

    def test_two_steps_at_once_do_not_mix(self):
        gate = os.path.join(self.engine.workdir, "gate")
        wait_gate = "while [ ! -e %s ]; do sleep 0.05; done" % gate
        self.start("a", wait_gate, "echo from-a", "exit 1", secrets=["only-a-secret"])
        self.start("b", wait_gate, "echo from-b only-a-secret")
        open(gate, "w").close()
        self.assertEqual(self.poll("a")["exit_code"], 1)
        self.assertEqual(self.poll("b")["exit_code"], 0)
        self.assertEqual(outs(self.service.uploads("stage/a")[0]), ["from-a\n"])
        # Each step has its own masking: a's secret means nothing to b.
        self.assertEqual(
            outs(self.service.uploads("stage/b")[0]), ["from-b only-a-secret\n"]
        )

    def test_secrets_masked_even_split_across_writes(self):
        self.start(
            "sec",
            "printf 'token=hun'; sleep 0.2; printf 'ter-22 in-a-wordhunter-22x\\n'",
            "echo stage-secret-1 and tok",
            "echo sh",
            secrets=["hunter-22", "sh"],
        )
        self.poll("sec")
        upload = outs(self.service.uploads("stage/sec")[0])
        self.assertEqual(
            upload,
            [
                "token=************** in-a-word**************x\n",
                "************** and tok\n",
                "sh\n",
            ],
        )
        everything = json.dumps(self.service.lines("stage/sec")) + self.read_output(
            "sec"
        )
        self.assertNotIn("hunter-22", everything)
        self.assertNotIn("stage-secret-1", everything)
        self.assertNotIn("hunter-22", "".join(self.engine.stderr_lines()))

    def test_stage_token_and_proxy_password_masked_in_own_config_steps(self):
        other = FakeLogService(token="other-token-2").start()
        self.addCleanup(other.stop)
        envs = {"HTTPS_PROXY": "http://user:proxy-pass-77@127.0.0.1:9"}
        body = {"le_log_key": "stage/le", "log_config": self.log_config, "envs": envs}
        self.assertEqual(self.post("/setup", body), (200, {}))
        config = {"url": other.url, "account_id": "acct", "token": "other-token-2"}
        self.start(
            "own",
            "echo %s other-token-2 $HTTPS_PROXY" % TOKEN,
            log_config=config,
        )
        self.poll("own")
        [line] = outs(other.uploads("stage/own")[0])
        for secret in (TOKEN, "other-token-2", "proxy-pass-77"):
            self.assertNotIn(secret, line)
        self.assertNotIn("proxy-pass-77", "".join(self.engine.stderr_lines()))

    def test_secrets_are_forgotten_with_their_stage(self):
        self.start("first", "true", secrets=["done"])
        self.poll("first")
        self.post("/destroy", {})
        self.post("/setup", {"le_log_key": "stage/le2", "log_config": self.log_config})
        self.post("/destroy", {})
        [upload] = self.service.uploads("stage/le2")
        self.assertTrue(any('msg="setup done"' in o for o in outs(upload)))

    def test_unusable_proxy_setting_is_a_warning(self):
        body = {"le_log_key": "stage/le", "envs": {"HTTPS_PROXY": "http://[bad"}}
        self.assertEqual(self.post("/setup", body), (200, {}))
        self.assertIsNotNone(
            self.engine.wait_for_stderr('msg="proxy setting unusable"')
        )

    def test_destroy_kills_running_steps(self):
        self.start("forever", "echo started", "sleep 60")
        self.service.wait_for(lambda s: "started\n" in outs(s.lines("stage/forever")))
        result = {}
        poller = threading.Thread(target=lambda: result.update(self.poll("forever")))
        poller.start()
        waiting = 'msg="step poll waiting" id=forever'
        self.assertIsNotNone(self.engine.wait_for_stderr(waiting))
        started = time.monotonic()
        self.assertEqual(self.post("/destroy", {}), (200, {}))
        self.assertLess(time.monotonic() - started, 10)
        poller.join(10)
        self.assertEqual(result["exit_code"], 137)
        self.assertIn("destroyed", result["error"])
        self.assertEqual(outs(self.service.uploads("stage/forever")[0]), ["started\n"])
        self.assertEqual(self.post("/poll_step", {"id": "forever"})[0], 404)

    def test_missing_working_dir_fails_the_step_not_the_engine(self):
        self.start("wd", "pwd", working_dir="/nonexistent/folder")
        answer = self.poll("wd")
        self.assertNotEqual(answer["exit_code"], 0)
        self.assertIn("/nonexistent/folder", answer["error"])
        folder = tempfile.mkdtemp()
        self.start("wd2", "pwd", working_dir=folder)
        self.assertEqual(self.poll("wd2")["exit_code"], 0)
        self.assertEqual(outs(self.service.uploads("stage/wd2")[0]), [folder + "\n"])

    def test_entrypoint(self):
        body = {
            "id": "py",
            "log_key": "stage/py",
            "run": {"commands": ["print(6 * 7)"], "entrypoint": ["python3", "-c"]},
        }
        self.assertEqual(self.post("/start_step", body), (200, {}))
        self.assertEqual(self.poll("py")["exit_code"], 0)
        self.assertEqual(outs(self.service.uploads("stage/py")[0]), ["42\n"])

    def test_same_id_twice_and_unknown_ids(self):
        self.start("dup", "echo once")
        status, answer = self.post(
            "/start_step", {"id": "dup", "run": {"commands": ["echo twice"]}}
        )
        self.assertEqual(status, 400)
        self.assertIn("already started", answer["error_msg"])
        self.poll("dup")
        self.assertEqual(outs(self.service.uploads("stage/dup")[0]), ["once\n"])
        for path in ("/poll_step", "/stream_output"):
            status, answer = self.post(path, {"id": "nobody"})
            self.assertEqual(status, 404)
            self.assertIn("unknown step", answer["error_msg"])
        # An error message never repeats a huge request back.
        status, answer = self.post("/poll_step", {"id": "n" * 100000})
        self.assertEqual(status, 404)
        self.assertLess(len(answer["error_msg"]), 200)

    def test_bad_step_requests(self):
        cases = [
            ({}, "id"),
            ({"id": 5}, "id"),
            ({"id": "x", "run": {"commands": "echo"}}, "run.commands"),
            ({"id": "x", "run": []}, "run"),
            ({"id": "x", "timeout": "10"}, "timeout"),
            ({"id": "x", "timeout": -1}, "timeout"),
            ({"id": "x", "environment": {"A": 1}}, "environment"),
            ({"id": "x", "output_vars": [1]}, "output_vars"),
            ({"id": "x", "log_config": {"url": 3}}, "log_config.url"),
            ({"id": "x", "run": {"commands": ["echo a\x00b"]}}, "run.commands"),
            ({"id": "x", "run": {"entrypoint": ["sh\ud800"]}}, "run.entrypoint"),
            ({"id": "x", "environment": {"A": "\udc00"}}, "environment"),
            ({"id": "x", "working_dir": "/tmp\x00"}, "working_dir"),
            ({"id": "x", "log_config": {"token": "a\r\nb"}}, "log_config.token"),
        ]
        for body, field in cases:
            with self.subTest(body=body):
                status, answer = self.post("/start_step", body)
                self.assertEqual(status, 400)
                self.assertIn(field, answer["error_msg"])
        status, answer = self.post("/stream_output", {"id": "x", "offset": -3})
        self.assertEqual(status, 400)

    def test_step_log_config_overrides_the_setup_one(self):
        other = FakeLogService(token=TOKEN).start()
        self.addCleanup(other.stop)
        config = {"url": other.url, "account_id": "acct", "token": TOKEN}
        self.start("own", "echo elsewhere", log_config=config)
        self.poll("own")
        self.assertEqual(outs(other.uploads("stage/own")[0]), ["elsewhere\n"])
        self.assertEqual(self.service.uploads("stage/own"), [])

    def test_stream_output_follows_the_step(self):
        gate = os.path.join(self.engine.workdir, "gate2")
        self.start(
            "follow",
            "echo first",
            "while [ ! -e %s ]; do sleep 0.05; done" % gate,
            "echo second",
        )
        parts = urllib.parse.urlsplit(self.engine.url)
        conn = http.client.HTTPConnection(parts.netloc, timeout=10)
        conn.request(
            "POST", "/stream_output", json.dumps({"id": "follow", "offset": 0})
        )
        response = conn.getresponse()
        self.assertEqual(response.status, 200)
        first = response.read1(100)
        self.assertEqual(first, b"first\n")
        open(gate, "w").close()
        self.assertEqual(response.read(), b"second\n")
        conn.close()
        self.assertEqual(self.read_output("follow", offset=6), "second\n")

    def read_output(self, step_id, offset=0):
        parts = urllib.parse.urlsplit(self.engine.url)
        conn = http.client.HTTPConnection(parts.netloc, timeout=10)
        body = json.dumps({"id": step_id, "offset": offset})
        conn.request("POST", "/stream_output", body)
        data = conn.getresponse().read().decode()
        conn.close()
        return data


class BigStepTest(unittest.TestCase):
    def test_hundred_thousand_lines_capped_and_engine_responsive(self):
        service = FakeLogService().start()
        self.addCleanup(service.stop)
        engine = EngineProcess().start()
        self.addCleanup(engine.cleanup)
        config = {"url": service.url, "account_id": "acct", "token": "tok"}
        request(engine.url, "POST", "/setup", {"log_config": config})
        body = {
            "id": "big",
            "log_key": "big",
            "run": {"commands": ["seq 1 100000 | sed 's/^/line /'"]},
        }
        request(engine.url, "POST", "/start_step", body)
        answer = {}
        poller = threading.Thread(
            target=lambda: answer.update(
                request(engine.url, "POST", "/poll_step", {"id": "big"})[2]
            )
        )
        poller.start()
        health_checks = 0
        while poller.is_alive():
            status, _, _ = request(engine.url, "GET", "/healthz")
            self.assertEqual(status, 200)
            health_checks += 1
        poller.join()
        self.assertEqual(answer["exit_code"], 0)
        self.assertGreater(health_checks, 0)

        body = service.upload_bodies("big")[0]
        self.assertLessEqual(len(body), 5 * 1024 * 1024)
        lines = [json.loads(line) for line in body.splitlines()]
        self.assertEqual(lines[-1]["out"], "line 100000\n")
        first = int(lines[0]["out"].split()[1])
        # Everything from the first kept line on is there, in order.
        self.assertEqual(outs(lines), ["line %d\n" % n for n in range(first, 100001)])
        self.assertGreater(first, 1)
        self.assertEqual(service.violations(), [])


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open("/proc/%d/stat" % pid) as file:
        return file.read().split()[2] != "Z"


if __name__ == "__main__":
    unittest.main()
