"""Every service exits at once, with 0, on SIGTERM or SIGINT, even while it cannot reach NATS or Postgres."""

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jetscribe.devstack.servers import free_port

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).parents[2]
SERVICES = ["jetscribe.services.ingest", "jetscribe.services.transcriber", "jetscribe.services.persister"]


def _start(module: str, **env: str) -> subprocess.Popen:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("JETSCRIBE_", "PYTEST_"))},
        "PYTHONUNBUFFERED": "1",
        "JETSCRIBE_MODEL": "tiny.en",
        "JETSCRIBE_CPU_THREADS": "1",
        # Not what these tests are about, and the transcriber's slowest start step: importing torch and checking the
        # voice model's ONNX export took 3.5 s of its 4.5 s to its first NATS error on a host at load 3 (1.0 s
        # without), and over 20 s on a host loaded harder, against the 30 s these tests wait for that line.
        "JETSCRIBE_SPEAKERS_AUDIO": "off",
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", module], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def _wait_for(proc: subprocess.Popen, marker: str, timeout: float = 30.0) -> str:
    """Read stderr until it holds `marker`: the service is then past its imports and start, with its signal
    handlers set (a fixed sleep raced a slow import on a loaded machine). Returns what was read. Reads the pipe's
    file descriptor itself: select() on the buffered text stream would miss lines already in its buffer (several
    lines often arrive in one read)."""
    assert proc.stderr is not None
    fd, read = proc.stderr.fileno(), b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            pytest.fail(f"{proc.args} exited before saying {marker!r}:\n{read.decode(errors='replace')}")
        read += chunk
        if marker.encode() in read:
            return read.decode(errors="replace")
    proc.kill()
    pytest.fail(f"{proc.args} did not say {marker!r} within {timeout:g} s:\n{read.decode(errors='replace')}")


def _stop(proc: subprocess.Popen, signum: int) -> tuple[float, str]:
    """Send signum; return how long the process took to exit, and its stderr."""
    proc.send_signal(signum)
    sent = time.monotonic()
    try:
        _, stderr = proc.communicate(timeout=3)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
        pytest.fail(f"{proc.args} still running 3 s after {signal.Signals(signum).name}:\n{stderr}")
    return time.monotonic() - sent, stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("module", SERVICES)
def test_a_service_that_cannot_reach_nats_stops_on_a_signal(module, signum):
    closed = free_port()  # nothing listens there
    proc = _start(
        module,
        NATS_URL=f"nats://127.0.0.1:{closed}",
        DATABASE_URL=f"postgresql+psycopg://postgres@127.0.0.1:{closed}/jetscribe",
    )
    _wait_for(proc, "NATS error")  # it is trying, and retrying, to connect
    _, stderr = _stop(proc, signum)
    assert proc.returncode == 0, stderr
    assert "stopped before connecting to NATS" in stderr


def test_a_persister_that_cannot_reach_postgres_stops_on_sigterm(nats_url):
    proc = _start(
        "jetscribe.services.persister",
        NATS_URL=nats_url,
        DATABASE_URL=f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/jetscribe",
    )
    _wait_for(proc, "persisting TRANSCRIPTS")  # running, with nothing it can write to
    _, stderr = _stop(proc, signal.SIGTERM)
    assert proc.returncode == 0, stderr
    assert "stopped" in stderr
