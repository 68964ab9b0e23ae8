"""The `jetscribe` commands as a user runs them (subprocesses) against a real stack: ingest, a null-model
transcriber and the persister in this process, on their own nats-server and a fresh PostgreSQL database.

What is checked is what the user sees: one line and an exit code for an expected failure, a header and summary from
`stream`, Ctrl-C ending (or keeping) the session, empty transcripts told apart from missing sessions."""

import asyncio
import json
import os
import signal
import sys
import uuid
from dataclasses import dataclass

import nats
import numpy as np
import pytest
import soundfile as sf

from jetscribe.cli import main as cli
from jetscribe.devstack.servers import NatsServer
from jetscribe.services.ingest.app import run as run_ingest
from jetscribe.services.persister.app import run as run_persister
from jetscribe.services.persister.migrate import revisions, upgrade
from jetscribe.services.persister.store import find_session, open_engine, wait_until_ended
from jetscribe.services.transcriber.app import run as run_transcriber
from jetscribe.services.transcriber.null_model import NullModel
from jetscribe.shared import subjects
from jetscribe.shared.config import IngestConfig, PersisterConfig, StreamSettings, TranscriberConfig
from jetscribe.shared.natsauth import env_connect_options
from jetscribe.shared.wire import AudioChunk, AudioMessage, decode
from tests.integration.running import wait_all_ready

pytestmark = pytest.mark.timeout(120)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEAD = revisions()[-1]


@dataclass
class Stack:
    nats_url: str
    database_url: str
    home: str  # JETSCRIBE_HOME with no stack.json: the URLs come from the environment only

    def env(self, **changes: str | None) -> dict[str, str]:
        env = {
            **os.environ,
            "NATS_URL": self.nats_url,
            "DATABASE_URL": self.database_url,
            "JETSCRIBE_HOME": self.home,
            "PYTHONPATH": ROOT,
        }
        for name, value in changes.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return env


@pytest.fixture(scope="module")
def cli_nats(tmp_path_factory):
    """Its own NATS server: no other test's gateway may answer these bots."""
    with NatsServer(tmp_path_factory.mktemp("cli-nats")) as server:
        yield server


@pytest.fixture(scope="module")
async def stack(cli_nats, postgres_server, tmp_path_factory):
    name = f"cli_{uuid.uuid4().hex[:8]}"
    postgres_server.create_database(name)
    database_url = postgres_server.url(name)
    await asyncio.to_thread(upgrade, database_url)
    settings = StreamSettings(nats_url=cli_nats.url)
    stop = asyncio.Event()
    worker = TranscriberConfig(model="null", worker_id="cli-w1", heartbeat_s=0.5, lease_ttl_s=2)
    tasks = [
        asyncio.create_task(run_ingest(settings, IngestConfig(), stop)),
        asyncio.create_task(run_persister(settings, PersisterConfig(database_url=database_url), stop)),
        asyncio.create_task(run_transcriber(settings, worker, stop, model=NullModel())),
    ]
    nc = await nats.connect(cli_nats.url, **env_connect_options(cli_nats.url))
    try:
        await wait_all_ready(nc, tasks)
    finally:
        await nc.close()
    yield Stack(cli_nats.url, database_url, str(tmp_path_factory.mktemp("home")))
    stop.set()
    await asyncio.gather(*tasks)


@pytest.fixture(scope="module")
def silence(tmp_path_factory) -> str:
    """3 s of 16 kHz silence: a session that ends with no finals."""
    path = tmp_path_factory.mktemp("audio") / "silence.wav"
    sf.write(path, np.zeros(48_000, dtype=np.int16), 16_000)
    return str(path)


@pytest.fixture(scope="module")
def long_silence(tmp_path_factory) -> str:
    """60 s of silence: streamed in real time, it is still sending when the test presses Ctrl-C."""
    path = tmp_path_factory.mktemp("audio") / "long.wav"
    sf.write(path, np.zeros(16_000 * 60, dtype=np.int16), 16_000)
    return str(path)


@dataclass
class Ran:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return self.err.splitlines()


async def jetscribe(env: dict[str, str], *args: str, timeout: float = 60) -> Ran:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jetscribe.cli.main",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


def in_process(capsys):
    """`jetscribe ...` run by its entry function in this process (a thread: it runs its own event loop)."""

    async def run(*args: str) -> Ran:
        try:
            code = await asyncio.to_thread(cli.main, list(args))
        except SystemExit as exit_:
            code = int(exit_.code or 0)
        captured = capsys.readouterr()
        return Ran(code, captured.out, captured.err)

    return run


def one_line_failure(ran: Ran, code: int, *words: str) -> None:
    """The way every expected failure must look: exit `code`, one line on stderr naming what to do, no traceback."""
    assert ran.code == code, (ran.code, ran.err)
    assert len(ran.err_lines) == 1 and "Traceback" not in ran.err, ran.err
    for word in words:
        assert word in ran.err, ran.err


def new_session() -> str:
    return f"s{uuid.uuid4().hex[:10]}"


async def audio_stored(nats_url: str, tenant: str, session: str) -> None:
    """Until the AUDIO stream holds an audio chunk of the session: the bot is sending.

    The session's `start` is stored on the same subject, first: a count of stored messages says nothing about
    audio (a Ctrl-C right after the start ends a session that never had a chunk), so the last one is decoded.
    """
    nc = await nats.connect(nats_url, **env_connect_options(nats_url))
    try:
        js = nc.jetstream()
        for _ in range(600):
            info = await js.stream_info(subjects.AUDIO_STREAM, subjects_filter=f"audio.{tenant}.{session}.*")
            for subject in info.state.subjects or {}:
                last = await js.get_last_msg(subjects.AUDIO_STREAM, subject)
                if isinstance(decode(last.data, AudioMessage), AudioChunk):
                    return
            await asyncio.sleep(0.05)
        raise AssertionError("no audio stored for the session")
    finally:
        await nc.close()


async def stored_session(database_url: str, tenant: str, session: str, ended: bool = True):
    """The session's row once the persister stored its end (`ended`), or once it stored the session at all."""
    engine = open_engine(database_url)
    try:
        if ended:
            return await wait_until_ended(engine, tenant, session, timeout_s=30)
        for _ in range(600):
            row = await find_session(engine, tenant, session)
            if row is not None:
                return row
            await asyncio.sleep(0.05)
        raise AssertionError(f"session {tenant}/{session} not stored")
    finally:
        await engine.dispose()


async def interrupt_stream(stack: Stack, path: str, session: str, *extra: str) -> Ran:
    """`jetscribe stream` in real time, Ctrl-C once its audio is being stored."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jetscribe.cli.main",
        "stream",
        path,
        "--session",
        session,
        "--tenant",
        "cli",
        *extra,
        env=stack.env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    await audio_stored(stack.nats_url, "cli", session)
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


async def test_stream_says_where_it_goes_and_what_it_did_and_an_ended_id_is_refused_in_one_line(stack, silence):
    session = new_session()
    ran = await jetscribe(stack.env(), "stream", silence, "--session", session, "--tenant", "cli", "--speed", "0")
    assert ran.code == 0, ran.err
    header, summary = ran.err_lines[0], ran.err_lines[-1]
    assert f"as session {session} of tenant cli to NATS {stack.nats_url}" in header and "3.0 s" in header
    assert "sent 3.0 s of audio in 30 chunks" in summary and "0 finals heard" in summary
    assert "session ended: 3.0 s of audio, 0 finals" in summary
    again = await jetscribe(stack.env(), "stream", silence, "--session", session, "--tenant", "cli", "--speed", "0")
    # the header, then the refusal: one line that says what to do
    assert again.err_lines[0].startswith("streaming")
    one_line_failure(Ran(again.code, again.out, "\n".join(again.err_lines[1:])), 1, "session_ended", "new --session")


async def test_ctrl_c_in_stream_ends_the_session_and_prints_the_summary(stack, long_silence):
    session = new_session()
    ran = await interrupt_stream(stack, long_silence, session)
    assert ran.code == 130, ran.err
    assert "Traceback" not in ran.err and "KeyboardInterrupt" not in ran.err
    assert ran.err_lines[-2].startswith("sent ") and "session ended:" in ran.err_lines[-2]
    assert ran.err_lines[-1] == "stopped; the session is ended"
    row = await stored_session(stack.database_url, "cli", session)
    assert row.status == "ended" and 0 < row.audio_seconds < 60


async def test_ctrl_c_with_keep_open_leaves_the_session_to_resume(stack, long_silence):
    session = new_session()
    ran = await interrupt_stream(stack, long_silence, session, "--keep-open")
    assert ran.code == 130, ran.err
    assert f"--session {session} --tenant cli" in ran.err_lines[-1] and "still open" in ran.err_lines[-1]
    assert (await stored_session(stack.database_url, "cli", session, ended=False)).status == "active"
    resumed = await jetscribe(
        stack.env(), "stream", long_silence, "--session", session, "--tenant", "cli", "--speed", "0"
    )
    assert resumed.code == 0, resumed.err
    assert resumed.err_lines[1].startswith("resuming session: the gateway already has chunks 0-"), resumed.err
    row = await stored_session(stack.database_url, "cli", session)
    assert row.status == "ended" and row.audio_seconds == pytest.approx(60, abs=0.05)


async def test_an_ended_session_without_finals_is_an_empty_transcript_not_a_missing_one(
    stack, silence, monkeypatch, capsys
):
    session = new_session()
    ran = await jetscribe(stack.env(), "stream", silence, "--session", session, "--tenant", "cli", "--speed", "0")
    assert ran.code == 0, ran.err
    await stored_session(stack.database_url, "cli", session)
    monkeypatch.setenv("DATABASE_URL", stack.database_url)
    jetscribe_here = in_process(capsys)
    expected = {"json": "[]\n", "vtt": "WEBVTT\n\n\n", "srt": "", "text": ""}
    for fmt, out in expected.items():
        got = await jetscribe_here("transcript", session, "--tenant", "cli", "--format", fmt)
        assert (got.code, got.out, got.err) == (0, out, ""), fmt
    missing = await jetscribe(stack.env(), "transcript", "nosuchsession", "--tenant", "cli", "--format", "json")
    one_line_failure(missing, 1, "no session nosuchsession of tenant cli", "jetscribe sessions")
    assert missing.out == ""


async def test_sessions_columns_fit_long_ids_and_json_has_every_session(stack, silence):
    tenant = f"t{uuid.uuid4().hex[:6]}"
    long_id = "a-session-id-well-over-twenty-eight-characters-" + uuid.uuid4().hex[:8]
    for session in (long_id, "short"):
        ran = await jetscribe(stack.env(), "stream", silence, "--session", session, "--tenant", tenant, "--speed", "0")
        assert ran.code == 0, ran.err
        await stored_session(stack.database_url, tenant, session)
    table = await jetscribe(stack.env(), "sessions", "--tenant", tenant)
    assert table.code == 0, table.err
    lines = table.out.splitlines()
    assert len(lines) == 3
    status_column = lines[0].index("status")
    assert all(line[status_column:].startswith("ended") for line in lines[1:]), table.out
    assert {line.split()[1] for line in lines[1:]} == {long_id, "short"}
    listed = await jetscribe(stack.env(), "sessions", "--tenant", tenant, "--format", "json")
    rows = json.loads(listed.out)
    assert {(r["session_id"], r["status"], r["audio_seconds"]) for r in rows} == {
        (long_id, "ended", 3.0),
        ("short", "ended", 3.0),
    }


async def test_follow_tells_an_unknown_session_and_says_what_it_waits_for(stack, silence):
    unknown = await jetscribe(stack.env(), "follow", "nosuchsession", "--tenant", "cli", "--from-start")
    one_line_failure(unknown, 1, "no session nosuchsession of tenant cli", "--wait", "PostgreSQL has no such session")
    session = new_session()
    ran = await jetscribe(stack.env(), "stream", silence, "--session", session, "--tenant", "cli", "--speed", "0")
    assert ran.code == 0, ran.err
    replay = await jetscribe(stack.env(), "follow", session, "--tenant", "cli", "--from-start", "--format", "json")
    assert replay.code == 0, replay.err
    assert replay.err_lines[0].startswith(f"following session {session} of tenant cli from its start")
    last = json.loads(replay.out.splitlines()[-1])
    assert last["event"] == "ended"
    past = last["stream_seq"] + 1
    after_end = await jetscribe(stack.env(), "follow", session, "--tenant", "cli", "--from-seq", str(past))
    assert after_end.code == 0 and "already ended" in after_end.err and "--from-start" in after_end.err
    from_now = await jetscribe(stack.env(), "follow", session, "--tenant", "cli")
    assert from_now.code == 0 and "already ended" in from_now.err


# A shell without job control starts a background command with SIGINT ignored, and the command inherits that.
IGNORING_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); os.execv(sys.argv[1], sys.argv[1:])"
)


@pytest.mark.parametrize("sigint", ["default", "inherited ignored"])
async def test_follow_keep_past_the_end_says_so_and_stops_on_ctrl_c(stack, silence, sigint):
    """Ctrl-C stops it however it was started: a suite run in the background (`make test &` from a script) starts
    every command with SIGINT ignored, which `follow` (asyncio.run's handler) used to keep, so it never stopped."""
    session = new_session()
    ran = await jetscribe(stack.env(), "stream", silence, "--session", session, "--tenant", "cli", "--speed", "0")
    assert ran.code == 0, ran.err
    replay = await jetscribe(stack.env(), "follow", session, "--tenant", "cli", "--from-start", "--format", "json")
    past = json.loads(replay.out.splitlines()[-1])["stream_seq"] + 1
    # Still following an ended session with --keep from past the stream's end: it says nothing will show yet.
    started_as = ("-c", IGNORING_SIGINT, sys.executable) if sigint != "default" else ()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *started_as,
        *("-m", "jetscribe.cli.main", "follow", session, "--tenant", "cli", "--keep", "--from-seq", str(past + 1000)),
        env=stack.env(),
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
    proc.send_signal(signal.SIGINT)
    await asyncio.wait_for(proc.wait(), 30)
    assert f"--from-seq {past + 1000} is past the end of TRANSCRIPTS" in line, line
    assert proc.returncode == 130


async def test_usage_errors_are_one_line_and_exit_2(stack, tmp_path):
    missing = await jetscribe(stack.env(), "stream", str(tmp_path / "nope.wav"), "--session", "x")
    one_line_failure(missing, 2, "no audio file")
    (tmp_path / "text.wav").write_text("not audio")
    unreadable = await jetscribe(stack.env(), "stream", str(tmp_path / "text.wav"), "--session", "x")
    one_line_failure(unreadable, 2, "cannot read", "WAV, FLAC, OGG or MP3")
    klingon = await jetscribe(stack.env(), "stream", str(tmp_path / "nope.wav"), "--session", "x", "--language", "tlh")
    one_line_failure(klingon, 2, "'tlh' is not a Whisper language code")
    debug = await jetscribe(stack.env(), "--debug", "stream", str(tmp_path / "nope.wav"), "--session", "x")
    assert debug.code == 2 and "Traceback" in debug.err and debug.err_lines[-1].startswith("jetscribe stream: no audio")
    version = await jetscribe(stack.env(), "--version")
    assert version.code == 0 and version.out.startswith("jetscribe ")


async def test_without_a_stack_or_urls_commands_say_so_instead_of_trying_default_ports(stack, tmp_path):
    env = stack.env(NATS_URL=None, DATABASE_URL=None, JETSCRIBE_HOME=str(tmp_path))
    for args in (("db", "upgrade"), ("db", "downgrade", "0001"), ("sessions",), ("follow", "s1"), ("status",)):
        ran = await jetscribe(env, *args)
        variable = "NATS_URL" if args[0] in ("follow", "status") else "DATABASE_URL"
        one_line_failure(ran, 1, "no jetscribe stack is running", f"set {variable}", "jetscribe up")


async def test_db_commands_say_what_they_did_and_readers_name_an_old_schema(database_url, monkeypatch, capsys):
    """In this process (the command's own function, as the entry point calls it): a dozen interpreters starting
    alembic would take a minute on a loaded machine."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    jetscribe_here = in_process(capsys)
    first = revisions()[0]
    steps = [
        (("db", "current"), f"at no revision (an empty database); the newest is {HEAD}: run `jetscribe db upgrade`"),
        (("db", "upgrade"), f"upgraded an empty database -> {HEAD}"),
        (("db", "upgrade"), f"already at {HEAD} (the newest)"),
        (("db", "downgrade", first), f"downgraded {HEAD} -> {first}"),
        (("db", "current"), f"at {first}; the newest is {HEAD}: run `jetscribe db upgrade`"),
        (("db", "upgrade"), f"upgraded {first} -> {HEAD}"),
        (("db", "current"), f"at {HEAD}, the newest revision"),
    ]
    for args, said in steps:
        ran = await jetscribe_here(*args)
        assert (ran.code, ran.out.strip(), ran.err) == (0, said, ""), args
    as_json = await jetscribe_here("db", "current", "--format", "json")
    assert json.loads(as_json.out) == {"current": HEAD, "head": HEAD, "up_to_date": True}
    one_line_failure(await jetscribe_here("db", "downgrade", "9999"), 2, "no revision '9999'")
    await jetscribe_here("db", "downgrade", first)
    for reader in (("sessions",), ("transcript", "s1")):
        one_line_failure(
            await jetscribe_here(*reader), 1, f"schema is at {first}", f"reads {HEAD}", "run `jetscribe db upgrade`"
        )
