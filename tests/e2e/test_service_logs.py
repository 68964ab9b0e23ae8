"""What a person reads in the services' log: `jetscribe up --model null` as a user runs it (processes, its stderr
to a file, JETSCRIBE_LOG_FORMAT=json), one session streamed through it. The transcriber says once that the session
started and once that it ended, with the session's totals; partitions are summarised in one line per change, not
one per partition; no library chatter at INFO."""

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest

from jetscribe.client.bot import Audio, stream_audio
from jetscribe.evaluation.speech import sample_speech
from jetscribe.shared.natsauth import env_connect_options
from jetscribe.shared.telemetry import CHATTY_LIBRARIES

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

REPO = Path(__file__).parents[2]


def start_up(home: Path, log: Path, **env: str) -> subprocess.Popen:
    """`jetscribe up` in the background, its stderr (the services' log) into `log`."""
    environ = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "DATABASE_URL", "JETSCRIBE_LOG_LEVEL")}
    environ.update(JETSCRIBE_HOME=str(home), PYTHONUNBUFFERED="1", **env)
    return subprocess.Popen(
        [sys.executable, "-m", "jetscribe.cli.main", "up", "--model", "null", "--transcribers", "1"],
        cwd=REPO,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )


def wait_until_up(proc: subprocess.Popen, log: Path, timeout_s: float = 120.0) -> None:
    """Until `jetscribe up` prints that it is up (every worker holds its partitions)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    for line in proc.stdout:  # it prints three lines once up, then nothing until it stops
        if line.startswith("jetscribe is up"):
            return
        assert time.monotonic() < deadline, f"not up in {timeout_s:g} s:\n{log.read_text()}"
    pytest.fail(f"jetscribe up exited with {proc.wait()}:\n{log.read_text()}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_one_start_and_one_end_line_per_session_with_its_totals(tmp_path):
    log = tmp_path / "services.log"
    proc = start_up(tmp_path / "home", log, JETSCRIBE_LOG_FORMAT="json")
    try:
        wait_until_up(proc, log)
        url = json.loads((tmp_path / "home" / "stack.json").read_text())["nats_url"]
        result = asyncio.run(stream_sample(url))
    finally:
        stop(proc)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert lines, log.read_text()
    transcriber = [e for e in lines if e["service"] == "transcriber"]

    started = [e for e in transcriber if e["message"].startswith("session logs/s1 started")]
    ended = [e for e in transcriber if e["message"].startswith("session logs/s1 ended")]
    assert len(started) == 1 and len(ended) == 1, [e["message"] for e in transcriber]
    event, worker = result.ended, result.ended.worker_id
    start = re.fullmatch(
        rf"session logs/s1 started on worker {worker}, partition (\d+): language auto, model null",
        started[0]["message"],
    )
    assert start, started[0]["message"]
    finals = result.final_segments()  # what the bot received; the line counts what the worker published
    words = sum(len(s.words) for s in finals)
    assert finals and words and event.chunks_received >= len(result.sent_at) and event.audio_seconds > 25
    assert ended[0]["message"] == (
        f"session logs/s1 ended (the bot ended it) on worker {worker}, partition {start[1]}: "
        f"{event.audio_seconds:.1f} s of audio, {event.chunks_received} chunks, {len(finals)} finals, "
        f"{words} words, 0 words dropped by the guards, 0 empty finals, "
        "Silero VAD on 0% of the frames"  # the default (hybrid) VAD: clean speech never wakes Silero
    )
    for entry in (started[0], ended[0]):  # the JSON fields name the session
        assert (entry["tenant"], entry["session"], entry["level"]) == ("logs", "s1", "INFO")

    # Partitions: one line per change of what a member holds, none per partition.
    assert not [e for e in lines if re.search(r"(acquired|released) partition \d", e["message"])]
    holds = [e["message"] for e in transcriber if "holds partitions" in e["message"]]
    assert holds == [f"{worker}: holds partitions 0-15 (+0-15); 1 in the group"], holds
    # Libraries stay quiet at INFO; nothing but the services' own loggers speaks.
    assert not [e for e in lines if e["logger"].split(".")[0] in CHATTY_LIBRARIES]


async def stream_sample(url: str):
    speech = sample_speech()
    nc = await nats.connect(url, **env_connect_options(url))
    try:
        return await stream_audio(
            nc, Audio(speech.audio, speech.sample_rate), tenant="logs", session_id="s1", speed=0, wait_s=120
        )
    finally:
        await nc.close()
