"""Measure how fast the engine starts and how much memory it holds when idle.

Usage: python tools/startup.py [--runs N] [--pyz PATH] [--source] [--json FILE]

Each target is started as a fresh process from an empty folder, on a free
loopback port, and polled over HTTP until it first answers 200: the engine's
zipapp (``python -S -E liteengine.pyz server``, plain HTTP through
SERVER_INSECURE=true) on ``/healthz``, and a stdlib-only baseline started the
same way (``python -S -E -m http.server``) on ``/``. With ``--source`` the
source tree's ``liteengine.py`` is measured too; it needs the dependencies
importable by ``--python``.

For every run the script records the time from just before the process is
spawned to the first 200, and the process's resident memory (VmRSS in
/proc/PID/status, Linux only) read right after that answer. Runs of the
targets are interleaved so a slow moment of the machine hits all of them.
The table gives the median and the best run of each.

Only 127.0.0.1 is contacted. Exit codes: 0 measured, 1 a target failed.

tools/bench.py imports the helpers of the first section (a free port, /proc
readings, polling for the first 200, stopping a child), so that both tools
start, time and read their servers the same way.
"""

import argparse
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


class StartupError(Exception):
    """A target did not start or did not answer; the message says why."""


class Target:
    """One way to start a server: its command, its probe path and extra env."""

    def __init__(self, name, command, probe, env=None):
        self.name = name
        self.command = command
        self.probe = probe
        self.env = env or {}

    def argv(self, port, workdir):
        """Return the command line with ``{port}`` and ``{workdir}`` filled in."""
        return [part.format(port=port, workdir=workdir) for part in self.command]

    def environ(self, port, workdir):
        """Return the child's environment: ours, plus this target's settings."""
        env = dict(os.environ)
        for name, value in self.env.items():
            env[name] = value.format(port=port, workdir=workdir)
        return env


def engine_target(name, command):
    """Return a Target for the engine server started by ``command``."""
    return Target(
        name,
        command + ["server"],
        "/healthz",
        {
            "SERVER_INSECURE": "true",
            "HTTPS_BIND": HOST + ":{port}",
            "HARNESS_WORKDIR": "{workdir}",
        },
    )


def baseline_target(python):
    """Return the stdlib ``http.server`` Target, started with ``-S -E``."""
    return Target(
        "http.server",
        [python, "-S", "-E", "-m", "http.server", "--bind", HOST, "{port}"],
        "/",
    )


# ---------------------------------------------------------------------------
# Helpers, shared with tools/bench.py


def free_port():
    """Return a loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def proc_kib(path, field):
    """Return ``field`` of a /proc file in KiB, or None where the file does not tell.

    ``path`` is one of the files that list ``Name:  1234 kB`` lines, such as
    /proc/PID/status (``VmRSS``, ``VmHWM``) or /proc/meminfo (``MemTotal``).
    """
    try:
        with open(path, encoding="ascii") as lines:
            for line in lines:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def status_kib(pid, field="VmRSS"):
    """Return ``field`` of /proc/PID/status in KiB (VmRSS: resident), or None."""
    return proc_kib("/proc/%d/status" % pid, field)


def answers_200(port, path, timeout):
    """Return whether one GET of ``path`` answers 200; False if not listening."""
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status == 200
    except OSError:
        return False
    finally:
        connection.close()


class NoAnswer(Exception):
    """A polled server exited, or was still silent when its time ran out.

    ``returncode`` is the exit code of a server that exited, None otherwise.
    """

    def __init__(self, returncode):
        super().__init__(returncode)
        self.returncode = returncode


def first_200(port, path, process, give_up_at, interval=0.002):
    """Poll ``path`` until it answers 200; return the ``perf_counter`` then.

    Each GET may take up to a second. Raises NoAnswer once ``process`` has
    exited, or once ``time.perf_counter()`` is past ``give_up_at``.
    """
    while True:
        if answers_200(port, path, timeout=1.0):
            return time.perf_counter()
        if process.poll() is not None:
            raise NoAnswer(process.returncode)
        if time.perf_counter() > give_up_at:
            raise NoAnswer(None)
        time.sleep(interval)


def stop_process(process, timeout=5.0):
    """SIGTERM ``process``, then kill it if it has not exited in ``timeout``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def cpu_model(fallback):
    """Return the CPU's model name from /proc/cpuinfo, or ``fallback``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return fallback


# ---------------------------------------------------------------------------
# One run


def measure(target, deadline=15.0, poll_interval=0.002):
    """Start ``target`` once; return ``(seconds to first 200, RSS in KiB)``.

    Raises StartupError with the tail of the process's output if it exits or
    has not answered within ``deadline`` seconds.
    """
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="startup-") as scratch:
        workdir = os.path.join(scratch, "work")
        empty = os.path.join(scratch, "cwd")
        os.mkdir(workdir)
        os.mkdir(empty)
        output_path = os.path.join(scratch, "output.txt")
        with open(output_path, "wb") as output:
            started = time.perf_counter()
            process = subprocess.Popen(
                target.argv(port, workdir),
                cwd=empty,
                env=target.environ(port, workdir),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
            give_up_at = started + deadline
            try:
                answered = first_200(
                    port, target.probe, process, give_up_at, poll_interval
                )
                return answered - started, status_kib(process.pid)
            except NoAnswer as exc:
                if exc.returncode is None:
                    problem = "did not answer within %.0f s" % deadline
                else:
                    problem = "exited with code %d" % exc.returncode
            finally:
                stop_process(process)
        with open(output_path, "rb") as output:
            tail = output.read().decode("utf-8", "replace").splitlines()[-10:]
    raise StartupError(
        "%s %s:\n  %s" % (target.name, problem, "\n  ".join(tail) or "(no output)")
    )


# ---------------------------------------------------------------------------
# Report


def machine():
    """Return the facts a reader needs to compare numbers with their own."""
    cpu = cpu_model(platform.processor() or platform.machine())
    return {"cpu": cpu, "cores": os.cpu_count(), "system": platform.platform()}


def python_version(python):
    """Return ``python``'s version as "3.11.7"."""
    return subprocess.run(
        [python, "-S", "-E", "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def summary(target, times, rss):
    """Return the JSON-ready result of one target's runs."""
    known = [kib for kib in rss if kib is not None]
    return {
        "name": target.name,
        "command": target.command,
        "probe": target.probe,
        "ready_ms": [round(seconds * 1000, 1) for seconds in times],
        "ready_ms_median": round(statistics.median(times) * 1000, 1),
        "ready_ms_best": round(min(times) * 1000, 1),
        "rss_kib": rss,
        "rss_mib_median": round(statistics.median(known) / 1024, 1) if known else None,
        "rss_mib_best": round(min(known) / 1024, 1) if known else None,
    }


def table(results):
    """Return the results as a Markdown table."""
    rows = [
        "| target | ready, median | ready, best | idle RSS, median | idle RSS, best |",
        "|---|---:|---:|---:|---:|",
    ]

    def mib(value):
        return "n/a" if value is None else "%.1f MiB" % value

    for result in results:
        rows.append(
            "| %s | %.0f ms | %.0f ms | %s | %s |"
            % (
                result["name"],
                result["ready_ms_median"],
                result["ready_ms_best"],
                mib(result["rss_mib_median"]),
                mib(result["rss_mib_best"]),
            )
        )
    return "\n".join(rows)


def main(argv=None):
    """Command-line entry: measure, print the table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="timed runs per target")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed runs per target first"
    )
    parser.add_argument(
        "--pyz",
        type=Path,
        default=ROOT / "dist" / "liteengine.pyz",
        help="the zipapp to measure (default: dist/liteengine.pyz)",
    )
    parser.add_argument(
        "--source", action="store_true", help="also measure liteengine.py"
    )
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter for every target"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    python = shutil.which(args.python) or args.python
    if not args.pyz.is_file():
        parser.error("no zipapp at %s; run: python build.py" % args.pyz)

    targets = [
        baseline_target(python),
        engine_target("liteengine.pyz", [python, "-S", "-E", str(args.pyz.resolve())]),
    ]
    if args.source:
        script = str(ROOT / "liteengine.py")
        targets.append(engine_target("liteengine.py", [python, script]))

    times = {target.name: [] for target in targets}
    rss = {target.name: [] for target in targets}
    try:
        for round_number in range(args.warmup + args.runs):
            for target in targets:
                seconds, kib = measure(target)
                if round_number >= args.warmup:
                    times[target.name].append(seconds)
                    rss[target.name].append(kib)
    except StartupError as exc:
        print("startup.py: %s" % exc, file=sys.stderr)
        return 1

    results = [summary(t, times[t.name], rss[t.name]) for t in targets]
    facts = dict(machine(), python=python_version(python), runs=args.runs)
    facts["pyz_bytes"] = args.pyz.stat().st_size
    print(
        "%(cpu)s, %(cores)s cores, Python %(python)s, %(runs)d runs, "
        "pyz %(pyz_bytes)d bytes" % facts
    )
    print(table(results))
    if args.json:
        report = {"machine": facts, "results": results}
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
