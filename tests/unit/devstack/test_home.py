"""One stack per home (jetscribe/devstack/stack.py): the lock, the refusal line, what stack.json records, the
readiness summary, and stopping what a dead `jetscribe up` left running (real processes: `sleep`)."""

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest

from jetscribe.devstack.stack import (
    HomeLock,
    NoStack,
    Recorded,
    StackRunning,
    not_ready,
    not_ready_message,
    read_stack_file,
    recorded_processes,
    stack_file,
    stop_leftovers,
    stop_processes,
    stop_stack,
)


def test_only_one_holder_of_a_home_and_the_lock_names_it(tmp_path):
    first, second = HomeLock(tmp_path / "home"), HomeLock(tmp_path / "home")
    assert first.acquire()
    assert not second.acquire()  # another open of the file: refused, as another process would be
    assert second.holder() == first.holder() and isinstance(first.holder(), int)
    first.release()
    assert second.acquire()
    second.release()


def test_the_refusal_is_one_line_with_the_pid_and_the_urls(tmp_path):
    info = {"pid": 42, "nats_url": "nats://127.0.0.1:4", "database_url": "postgresql+psycopg://p@h:5/j"}
    line = str(StackRunning(tmp_path, 42, info))
    assert line == (
        f"a stack is already running in {tmp_path} (pid 42): NATS nats://127.0.0.1:4, PostgreSQL "
        "postgresql+psycopg://p@h:5/j; stop it with `jetscribe down`"
    )
    # the holder has not written its stack.json yet (or an old one of another pid is there)
    assert "(pid 43) (still starting)" in str(StackRunning(tmp_path, 43, info))
    assert "\n" not in line


def test_not_ready_names_each_service_with_its_failing_checks():
    names = {10: "ingest", 11: "transcriber h-t0", 12: "persister"}
    reports = {
        10: {"ready": True, "checks": {"streams": "ok"}},
        11: {"ready": False, "checks": {"model": "starting", "streams": "ok", "consumer_group": "starting"}},
    }
    waiting = not_ready(names, reports)
    assert waiting == {
        "transcriber h-t0": "consumer_group: starting, model: starting",
        "persister": "not answering on NATS yet",
    }
    assert not_ready(names, {pid: {"ready": True} for pid in names}) == {}
    assert not_ready_message(120, waiting, {"h-t0": (0, 16)}) == (
        "not ready after 120 s: transcriber h-t0 (consumer_group: starting, model: starting); persister (not "
        "answering on NATS yet); transcriber h-t0 holds 0 of its 16 partitions"
    )


def test_stack_file_rows_that_do_not_parse_are_skipped(tmp_path):
    good = {"name": "ingest", "pid": 5, "created": 1.5, "stop_signal": 15, "role": "service"}
    info = {"processes": [good, {"name": "x"}, "junk"]}
    assert recorded_processes(info) == [Recorded("ingest", 5, 1.5, 15, "service")]
    assert recorded_processes({}) == []
    stack_file(tmp_path).write_text("{half")
    assert read_stack_file(tmp_path) == {}


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "300"], process_group=0)


# A fake server: handlers of its own for the signals named (as nats-server and postgres install theirs, whatever
# they inherited), the name of the one it gets written to the record, then exit.
FAKE_SERVER = """
import signal, sys, time
record, names = sys.argv[1], sys.argv[2:]
def got(signum, frame):
    with open(record, "w") as file:
        file.write(signal.Signals(signum).name.removeprefix("SIG"))
    sys.exit(0)
for name in names:
    signal.signal(signal.Signals["SIG" + name], got)
with open(record, "w") as file:
    file.write("set")
while True:
    time.sleep(1)
"""


def _trapping(signals: str, record) -> subprocess.Popen:
    """A server that writes the name of the signal it got to `record` and exits. Not a shell's `trap`: a shell cannot
    trap a signal it started with ignored, as a suite run in the background starts with SIGINT."""
    proc = subprocess.Popen([sys.executable, "-c", FAKE_SERVER, str(record), *signals.split()], process_group=0)
    while not (record.exists() and record.read_text().strip() == "set"):  # its handlers are set
        assert proc.poll() is None, f"the fake server exited with {proc.returncode}"
        time.sleep(0.01)
    return proc


def test_leftovers_of_a_dead_up_are_stopped_and_its_stack_json_removed(tmp_path):
    service, stranger = _sleeper(), _sleeper()
    server = _trapping("INT TERM", tmp_path / "server-got")
    try:
        rows = [
            Recorded.of("ingest", service.pid),
            Recorded.of("nats-server", server.pid, signal.SIGINT, role="server"),
            # a pid that was reused: same pid, another start time -> not ours, left alone
            Recorded("postgres", stranger.pid, psutil.Process(stranger.pid).create_time() - 100, 2, "server"),
        ]
        gone = subprocess.Popen(["true"])
        gone.wait()
        dead = gone.pid  # the `up` that wrote the file is dead
        stack_file(tmp_path).write_text(json.dumps({"pid": dead, "processes": [r.__dict__ for r in rows if r]}))
        pid, stopped = stop_leftovers(tmp_path)
        assert (pid, stopped) == (dead, ["ingest", "nats-server"])
        assert rows[0].alive() is None and rows[1].alive() is None
        assert (tmp_path / "server-got").read_text().strip() == "INT"  # each is sent its own stop signal
        assert stranger.poll() is None
        assert not stack_file(tmp_path).exists()
        assert stop_leftovers(tmp_path) == (None, [])  # nothing left: nothing to do
    finally:
        for proc in (service, server, stranger):
            proc.kill()
            proc.wait()


def test_a_leftover_that_ignores_its_signal_is_killed(tmp_path):
    record = tmp_path / "traps"
    stubborn = subprocess.Popen(
        ["sh", "-c", f"trap '' TERM; echo set > {record}; while :; do sleep 0.05; done"], process_group=0
    )
    try:
        while not (record.exists() and record.read_text().strip() == "set"):  # TERM is ignored from here on
            time.sleep(0.01)
        row = Recorded.of("ingest", stubborn.pid)
        started = time.monotonic()
        assert stop_processes([row], timeout_s=0.5) == ["ingest"]
        assert 0.5 <= time.monotonic() - started < 5
        assert row.alive() is None  # killed (and reaped)
    finally:
        stubborn.kill()
        stubborn.wait()


def test_down_without_a_stack_says_so_and_makes_nothing(tmp_path):
    home = tmp_path / "never-up"
    with pytest.raises(NoStack, match=f"^no stack is running in {home}$"):
        stop_stack(home)
    assert not home.exists()
    ended = HomeLock(home)  # an `up` ran here once and ended: its lock file stays, and is free
    assert ended.acquire()
    ended.release()
    with pytest.raises(NoStack, match=f"^no stack is running in {home}$"):
        stop_stack(home)
