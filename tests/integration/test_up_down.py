"""`jetscribe up` and `jetscribe down` as a user runs them: under a pseudo-terminal, Ctrl-C (the terminal's
interrupt character, so the whole foreground process group gets SIGINT) stops the stack in order, quickly and
quietly, and leaves no process behind; a second `up` in the same home is refused in one line; a bad model fails
in one line; `up -d` returns once ready and `down` stops it. Real nats-server, PostgreSQL and service processes,
JETSCRIBE_MODEL=null (the model does not matter here)."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nats
import pexpect
import psutil
import pytest

from jetscribe.devstack.servers import NatsServer
from jetscribe.devstack.stack import _health_by_pid, not_ready
from jetscribe.shared.discovery import register
from jetscribe.shared.health import Readiness

pytestmark = pytest.mark.timeout(240)

READY_TIMEOUT_S = 180  # a start on a loaded 2-core machine (other test runs beside this one)
STOP_BOUND_S = 5.0  # the bound for a clean stop after Ctrl-C


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "DATABASE_URL", "JETSCRIBE_LOG_LEVEL")}
    return {**env, "JETSCRIBE_HOME": str(home), "PYTHONUNBUFFERED": "1"}


def _jetscribe(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jetscribe.cli.main", *args],
        cwd=home.parent,
        env=_env(home),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _still_running(procs: list[psutil.Process]) -> list[str]:
    """Those that still run (a zombie holds nothing and is only waiting for its reaper)."""
    left = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{proc.pid} {' '.join(proc.cmdline())[:80]}")
        except psutil.NoSuchProcess:
            pass
    return left


def _stop_or_kill(up: pexpect.spawn, children: list[psutil.Process]) -> None:
    """After a failure: let `up` stop what it started (SIGTERM), else kill it all, so nothing outlives the test.
    (A test that waited for `up` itself leaves pexpect unable to tell: that one is over anyway.)"""
    with contextlib.suppress(pexpect.ExceptionPexpect):
        if up.isalive():
            up.kill(signal.SIGTERM)
            up.expect(pexpect.EOF, timeout=30)
    for proc in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    with contextlib.suppress(pexpect.ExceptionPexpect, OSError):
        up.close(force=True)


def _recorded_pids(home: Path) -> set[int]:
    return {row["pid"] for row in json.loads((home / "stack.json").read_text())["processes"]}


def test_ctrl_c_in_the_terminal_stops_everything_in_order_quickly_and_quietly(tmp_path):
    home = tmp_path / "home"
    up = _spawn_up(tmp_path, home)
    try:
        up.expect("jetscribe is up")
        up.expect_exact("stops everything)")
        started_output = up.before
        children = _descendants(up.pid)
        # nats-server, postgres (and its backends), ingest, a transcriber, the persister
        names = " ".join(" ".join(p.cmdline()) for p in children)
        for part in ("nats-server", "postgres", "services.ingest", "services.transcriber", "services.persister"):
            assert part in names, names
        assert _recorded_pids(home) <= {p.pid for p in children}
        # none in up's process group: the terminal's Ctrl-C reaches only up
        assert os.getpgid(up.pid) not in {os.getpgid(p.pid) for p in children}

        up.sendintr()
        sent = time.monotonic()
        up.expect(pexpect.EOF, timeout=30)
        took = time.monotonic() - sent
        after = up.before
        up.close()
    finally:
        _stop_or_kill(up, children if "children" in locals() else [])
    lines = [line for line in after.splitlines() if line.strip()]
    assert took < STOP_BOUND_S, f"took {took:.1f} s:\n{after}"
    assert up.exitstatus == 0, after
    assert "Traceback" not in started_output + after
    assert "Connect call failed" not in after and "NATS error" not in after
    # At the default level the services say at INFO how they stop; nothing worse, and up itself says two lines:
    # ^Cstopping..., stopped in ...: what.
    assert not [line for line in lines if re.search(r" (WARNING|ERROR|CRITICAL) ", line)], after
    assert len([line for line in lines if " INFO " not in line]) <= 3, after
    assert lines[-1].startswith("stopped in ") and "nats-server" in lines[-1] and "postgres" in lines[-1], after
    assert _still_running(children) == []
    assert not (home / "stack.json").exists()


def test_up_detached_refuses_a_second_up_keeps_serving_and_down_stops_it(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    # a stack.json left by an `up` that died: cleared, and the start goes on
    (home / "stack.json").write_text(json.dumps({"pid": gone.pid, "nats_url": "nats://127.0.0.1:1"}))

    started = _jetscribe(home, "up", "-d", "--model", "null", "--transcribers", "1", timeout=READY_TIMEOUT_S)
    assert started.returncode == 0, started.stdout + started.stderr
    assert started.stdout.startswith("jetscribe is up: NATS nats://127.0.0.1:"), started.stdout
    assert "running in the background as pid" in started.stdout and "jetscribe down" in started.stdout
    ws_url = json.loads((home / "stack.json").read_text())["ws_url"]  # the gateway's WebSocket listener, said
    assert ws_url.startswith("ws://127.0.0.1:") and f"WebSocket: {ws_url}/v1/listen" in started.stdout
    info_text = (home / "stack.json").read_text()
    info = json.loads(info_text)
    up_pid = info["pid"]
    assert info["nats_url"] != "nats://127.0.0.1:1"
    children = _descendants(up_pid)
    try:
        assert os.getsid(up_pid) == up_pid  # a session of its own: no terminal's signals reach it
        assert _recorded_pids(home) <= {p.pid for p in children}

        second = _jetscribe(home, "up", "--model", "null", "--transcribers", "1")
        assert second.returncode == 1, second.stdout + second.stderr
        assert second.stderr.splitlines() == [
            f"jetscribe up: a stack is already running in {home} (pid {up_pid}): NATS {info['nats_url']}, "
            f"PostgreSQL {info['database_url']}; stop it with `jetscribe down`"
        ]
        assert second.stdout == ""
        assert (home / "stack.json").read_text() == info_text  # untouched

        sessions = _jetscribe(home, "sessions")  # finds the running stack through stack.json
        assert sessions.returncode == 0, sessions.stderr
        assert sessions.stdout.startswith("tenant")
        # the captions page: its URL printed, its page served, streaming to the gateway's WebSocket
        assert f"captions page and session browser: {info['web_url']}" in started.stdout
        assert f"WebSocket: {info['ws_url']}/v1/listen (Deepgram-compatible)" in started.stdout
        with urllib.request.urlopen(f"{info['web_url']}config.json", timeout=10) as page_config:
            assert json.load(page_config)["gateway_url"] == info["ws_url"]
        assert psutil.pid_exists(up_pid) and _still_running(children)

        down = _jetscribe(home, "down")
        assert down.returncode == 0, down.stderr
        assert down.stdout.startswith(f"stopped the stack in {home} (pid {up_pid}) in ")
        for name in ("ingest", "transcriber", "persister", "web", "nats-server", "postgres"):
            assert name in down.stdout
        assert _still_running([psutil.Process(up_pid), *children]) == []
        assert not (home / "stack.json").exists()
        log = (home / "up.log").read_text()
        assert "Traceback" not in log and "stopped in " in log

        again = _jetscribe(home, "down")
        assert again.returncode == 1
        assert again.stderr.splitlines() == [f"jetscribe down: no stack is running in {home}"]
    finally:
        for proc in [*children, *([psutil.Process(up_pid)] if psutil.pid_exists(up_pid) else [])]:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


def test_up_with_a_bad_model_fails_fast_in_one_line_and_leaves_nothing_running(tmp_path):
    home = tmp_path / "home"
    started = time.monotonic()
    done = _jetscribe(home, "up", "--model", "small", "--transcribers", "1", timeout=120)
    took = time.monotonic() - started
    assert done.returncode == 2, done.stdout + done.stderr
    assert "is up" not in done.stdout + done.stderr
    assert done.stderr.splitlines() == [
        f"jetscribe up: transcriber {os.uname().nodename}-t0 exited with code 2: jetscribe-transcriber: unknown "
        "model 'small': use one of base, tiny.en or a local model folder"
    ], done.stderr
    assert took < 60, took
    assert not (home / "stack.json").exists()
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if str(home) in " ".join(p.info["cmdline"] or [])]
    assert _still_running(leftovers) == []


async def test_up_reads_each_of_its_services_readiness_by_pid_from_srv_stats(tmp_path):
    """How `up` knows a service is ready: its `$SRV.STATS` answer (health endpoint data) found by the pid in its
    micro-service metadata; a pid that is not ours, or not registered, is not in the answer. Its own NATS: no
    other test's service (in this process, so with this pid) may answer."""
    with NatsServer(tmp_path / "nats", auth=False) as server:
        await _read_readiness(server.url)


async def _read_readiness(url: str) -> None:
    nc = await nats.connect(url)
    readiness = Readiness("persister").need("database")
    registration = await register(nc, "persister", description="test", readiness=readiness, stats=dict)
    try:
        reports = await _health_by_pid(nc, {os.getpid(), 1})
        assert reports == {os.getpid(): {"service": "persister", "ready": False, "checks": {"database": "starting"}}}
        assert not_ready({os.getpid(): "persister"}, reports) == {"persister": "database: starting"}
        readiness.up("database")
        reports = await _health_by_pid(nc, {os.getpid()})
        assert not_ready({os.getpid(): "persister"}, reports) == {}
    finally:
        await registration.stop()
        await nc.close()


# A shell without job control starts a background command with SIGINT ignored, and the command inherits that.
IGNORING_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); os.execv(sys.argv[1], sys.argv[1:])"
)


def _spawn_up(tmp_path: Path, home: Path, *, sigint_ignored: bool = False) -> pexpect.spawn:
    started_as = ["-c", IGNORING_SIGINT, sys.executable] if sigint_ignored else []
    return pexpect.spawn(
        sys.executable,
        [*started_as, "-m", "jetscribe.cli.main", "up", "--model", "null", "--transcribers", "1"],
        cwd=str(tmp_path),
        env=_env(home),
        encoding="utf-8",
        codec_errors="replace",
        timeout=READY_TIMEOUT_S,
    )


def test_ctrl_c_while_starting_and_a_closed_terminal_leave_nothing_running(tmp_path):
    """Started with SIGINT ignored (as by a suite run in the background): `up` used to keep ignoring Ctrl-C while
    starting, and took it only once up; the Ctrl-C once up is
    test_ctrl_c_in_the_terminal_stops_everything_in_order_quickly_and_quietly's."""
    home = tmp_path / "home"
    up = _spawn_up(tmp_path, home, sigint_ignored=True)
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not (home / "stack.json").exists():  # the servers run (they are on record) and the services start
            assert up.isalive() and time.monotonic() < deadline, up.read_nonblocking(10_000, timeout=0)
            time.sleep(0.05)
        children = _descendants(up.pid)
        up.sendintr()
        up.expect(pexpect.EOF, timeout=60)
        up.close()
        assert up.exitstatus == 130, up.before
        assert up.before.strip().splitlines()[-1].endswith("jetscribe up: interrupted while starting"), up.before
        assert "Traceback" not in up.before
        assert children and _still_running(children) == []
    finally:
        _stop_or_kill(up, children)

    up = _spawn_up(tmp_path, home)
    children = []
    try:
        up.expect_exact("stops everything)")
        children = _descendants(up.pid)
        process = psutil.Process(up.pid)
        os.close(up.child_fd)  # the terminal goes away: up gets SIGHUP, and can no longer write to it
        process.wait(60)
        assert _still_running(children) == []
        assert not (home / "stack.json").exists()
    finally:
        _stop_or_kill(up, children)
