"""The `jetscribe` command: run the local stack, stream audio as a bot, read transcripts."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from datetime import UTC, datetime

from jetscribe.cli import servers
from jetscribe.cli.errors import CliError, NotFound, Unreachable, UsageError, as_cli_error
from jetscribe.cli.formats import FORMATS, meeting_rows, render, show_live
from jetscribe.devstack import stack
from jetscribe.devstack.servers import ServerFailed
from jetscribe.shared.config import ConfigError, PostgresClient, nats_servers
from jetscribe.shared.telemetry import quiet_libraries
from jetscribe.shared.wire import WHISPER_LANGUAGES

CREDS_HELP = "nkey seed file to connect to NATS with (default $NATS_CREDS, else the operator key of a stack here)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("follow", "transcript") and (args.session is None) == (args.meeting is None):
        parser.error(f"{args.command}: give a session id or --meeting M (one of them)")
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `up --detach` starts `up` again with them
    logging.basicConfig(level=os.environ.get("JETSCRIBE_LOG_LEVEL", "WARNING"), format="%(levelname)s %(message)s")
    quiet_libraries(os.environ.get("JETSCRIBE_LOG_LEVEL", "WARNING"))  # alembic's steps, nats' chatter
    take_ctrl_c()
    command = {
        "up": cmd_up,
        "down": cmd_down,
        "stream": cmd_stream,
        "follow": cmd_follow,
        "transcript": cmd_transcript,
        "sessions": cmd_sessions,
        "demo": cmd_demo,
        "status": cmd_status,
        "tenant": cmd_tenant,
        "nats-config": cmd_nats_config,
        "nats-users": cmd_nats_users,
        "db": cmd_db,
        "schema": cmd_schema,
        "web": cmd_web,
    }[args.command]
    return run_command(command, args)


def take_ctrl_c() -> None:
    """Ctrl-C (SIGINT) stops every command however it was started. A shell without job control (a script's
    `jetscribe up &`, a test suite run in the background) starts its background commands with SIGINT ignored: then
    `follow` and `status` (asyncio.run) and `up` while starting ignored it, while `stream`, a running `up` and the
    services took it."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def build_parser() -> argparse.ArgumentParser:
    """Every command and option, each with its help."""
    parser = OneLineParser(prog="jetscribe", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure, not only its line")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start NATS, PostgreSQL and the three services; Ctrl-C stops all")
    up.add_argument(
        "--model", help="Whisper model: base, tiny.en, a model folder or null (default $JETSCRIBE_MODEL or base)"
    )
    up.add_argument(
        "--transcribers",
        type=transcriber_count,
        default=None,
        metavar="N|auto",
        help="transcriber worker processes, each with its own model and an equal share of the cores "
        "(auto, the default: one per core on a CPU host, one per GPU on a GPU host)",
    )
    up.add_argument(
        "--gateways", type=_at_least_one, default=1, help="ingest gateway processes; they share the sessions (1)"
    )
    up.add_argument(
        "--nats-cluster",
        type=_at_least_one,
        default=1,
        metavar="N",
        help="nats-server processes joined in a cluster, the streams and KV buckets kept in min(3, N) copies (1)",
    )
    up.add_argument(
        "-d",
        "--detach",
        action="store_true",
        help="run in the background: return once the stack is ready (its output goes to $JETSCRIBE_HOME/up.log); "
        "`jetscribe down` stops it",
    )

    down = sub.add_parser("down", help="stop the stack `jetscribe up` runs in this folder (detached or not)")
    down.add_argument("--timeout", type=float, default=60.0, metavar="S", help="how long to wait for it to stop (60)")

    stream = sub.add_parser("stream", help="publish an audio file as a bot would and show the live transcript")
    stream.add_argument("file", help="a WAV, FLAC, OGG or MP3 file, at any rate and channel count")
    stream.add_argument(
        "--session", required=True, help="session id; the same id again resumes an open session where it stopped"
    )
    stream.add_argument("--tenant", default="default", help="tenant the session belongs to (default)")
    stream.add_argument("--speed", type=float, default=1.0, help="1 = real time, 0 = as fast as possible")
    stream.add_argument(
        "--language", type=language, default="auto", help="a Whisper language code (en, de, fr, ...) or auto"
    )
    stream.add_argument(
        "--keep-open",
        action="store_true",
        help="on Ctrl-C leave the session open to resume with the same --session (default: end it)",
    )
    stream.add_argument("--speaker", metavar="NAME", help="the participant this session is the track of")
    stream.add_argument("--meeting", metavar="M", help="the meeting this session is a track of (its tracks merge)")
    stream.add_argument(
        "--track-start", type=float, metavar="T", help="wall time (epoch s) of the file's first sample (default: now)"
    )
    stream.add_argument(
        "--turns",
        type=speaker_turns,
        metavar="S=NAME,...",
        help="who talks from when, seconds into the file, e.g. 0=Ann,4.2=Bob (as a platform's speaker events say)",
    )
    stream.add_argument(
        "--channel-speakers",
        type=names,
        metavar="A,B,...",
        help="one participant per channel of the file: each channel is transcribed as track SESSION-chN of "
        "meeting SESSION",
    )
    stream.add_argument(
        "--creds",
        metavar="FILE",
        help=CREDS_HELP,
    )

    follow = sub.add_parser(
        "follow",
        help="print a session's transcript from the TRANSCRIPTS stream as it comes; exits after the session ends",
    )
    follow.add_argument("session", nargs="?", help="session id (or --meeting)")
    follow.add_argument("--meeting", metavar="M", help="every track of meeting M, merged in spoken order")
    follow.add_argument("--tenant", default="default", help="tenant the session belongs to (default)")
    start = follow.add_mutually_exclusive_group()
    start.add_argument("--from-start", action="store_true", help="replay everything the stream holds of it first")
    start.add_argument("--since", metavar="T", help="replay from a time: 90s, 5m, 2h, 1d ago, or an ISO time")
    start.add_argument("--from-seq", type=int, metavar="N", help="replay from TRANSCRIPTS stream sequence N")
    follow.add_argument(
        "--format",
        choices=("text", "json"),
        default="text",
        help="text: final lines (interims rewrite the line on a terminal); json: every segment "
        "and event, one object per line",
    )
    follow.add_argument("--keep", action="store_true", help="keep following after the session's end")
    follow.add_argument(
        "--wait", action="store_true", help="wait for a session the stream does not hold yet (default: exit 1)"
    )
    follow.add_argument(
        "--creds",
        metavar="FILE",
        help=CREDS_HELP,
    )

    transcript = sub.add_parser("transcript", help="print a session's final transcript from PostgreSQL")
    transcript.add_argument("session", nargs="?", help="session id (or --meeting)")
    transcript.add_argument("--meeting", metavar="M", help="every track of meeting M, merged in spoken order")
    transcript.add_argument("--tenant", default="default", help="tenant the session belongs to (default)")
    transcript.add_argument("--format", choices=FORMATS, default="text", help="output format (text)")
    transcript.add_argument(
        "--creds",
        metavar="FILE",
        help="a tenant's nkey seed file: read the session from TRANSCRIPTS through the gateways' history (what the "
        "stream still keeps) instead of PostgreSQL",
    )

    sessions = sub.add_parser("sessions", help="list sessions stored in PostgreSQL")
    sessions.add_argument("--tenant", help="only this tenant's sessions (default: all)")
    sessions.add_argument(
        "--format", choices=("text", "json"), default="text", help="text: a table; json: one object per session"
    )

    demo = sub.add_parser("demo", help="up + stream a file fast + print its transcript + stop")
    demo.add_argument("file", nargs="?", help="audio file (default: a speech sample made on first run)")
    demo.add_argument("--format", choices=FORMATS, default="text", help="format of the transcript printed (text)")
    demo.add_argument("--model", help="Whisper model (default $JETSCRIBE_MODEL or base)")
    demo.add_argument("--speed", type=float, default=0.0, help="0 = the whole file as fast as possible, 1 = real time")
    demo.add_argument(
        "--transcribers", type=transcriber_count, default=1, metavar="N|auto", help="as for up (default 1)"
    )

    status = sub.add_parser(
        "status", help="live view of the running services, workers, sessions, lag and latency, from NATS alone"
    )
    status.add_argument("--once", action="store_true", help="print one snapshot and exit")
    status.add_argument(
        "--format", choices=("text", "json"), default="text", help="json: one snapshot for scripts (implies --once)"
    )
    status.add_argument("--every", type=float, default=2.0, metavar="S", help="live view: seconds between updates")
    status.add_argument(
        "--wait", type=float, default=1.0, metavar="S", help="how long to collect the services' answers"
    )

    status.add_argument(
        "--creds",
        metavar="FILE",
        help=CREDS_HELP,
    )

    tenant = sub.add_parser("tenant", help="NATS users of tenants: add (prints its credentials), list, revoke")
    tenant_sub = tenant.add_subparsers(dest="action", required=True)
    tenant_add = tenant_sub.add_parser("add", help="make tenant T's NATS user and print its seed file")
    tenant_add.add_argument("tenant", help="tenant name: letters, digits, '_' or '-'")
    tenant_sub.add_parser("list", help="tenants and whether they are revoked")
    tenant_revoke = tenant_sub.add_parser(
        "revoke", help="remove tenant T's user; a running stack reloads NATS at once and disconnects it"
    )
    tenant_revoke.add_argument("tenant", help="tenant name")
    tenant_reader = tenant_sub.add_parser(
        "reader",
        help="a durable PULL consumer on TRANSCRIPTS for tenant T (reader_T_NAME), the only kind its user may read "
        "(tenants create no consumers); the running NATS reloads so T may pull from it and ack",
    )
    tenant_reader.add_argument("tenant")
    tenant_reader.add_argument("name")
    tenant_reader.add_argument(
        "--reads", choices=["transcripts", "events", "all"], default="transcripts", help="its filter (transcripts)"
    )
    tenant_reader.add_argument("--ack-wait", type=float, default=30.0, metavar="S", help="redelivery after (30)")
    tenant_reader.add_argument(
        "--in-order",
        action="store_true",
        help="one message unacked at a time (max_ack_pending 1): a redelivery keeps order",
    )
    tenant_reader.add_argument("--remove", action="store_true", help="delete the consumer and T's right to it")

    web = sub.add_parser(
        "web",
        help="serve the live captions page and the session browser (read-only over PostgreSQL); "
        "`jetscribe up` runs it too",
    )
    web.add_argument("--host", default=None, help="address to listen on ($JETSCRIBE_WEB_HOST, else 127.0.0.1)")
    web.add_argument("--port", type=int, default=None, help="port ($JETSCRIBE_WEB_PORT, else 8000)")
    web.add_argument(
        "--gateway", metavar="URL", help="the gateway's WebSocket the page streams to ($JETSCRIBE_WEB_GATEWAY_URL)"
    )

    config = sub.add_parser(
        "nats-config", help="print a nats-server config holding the stack's users (for a NATS you run yourself)"
    )
    config.add_argument("--listen", default="0.0.0.0:4222", metavar="HOST:PORT", help="client address (0.0.0.0:4222)")
    config.add_argument(
        "--store-dir", default="/data/jetstream", metavar="DIR", help="JetStream store (/data/jetstream)"
    )
    config.add_argument("--server-name", default="", help="this node's name (needed in a cluster)")
    config.add_argument("--cluster-listen", metavar="HOST:PORT", help="where this node listens for routes")
    config.add_argument("--route", action="append", default=[], metavar="URL", help="nats-route://host:port, each node")
    nats_users = sub.add_parser(
        "nats-users",
        help="write the NATS users file a cluster's nodes include (compose's nats-auth): the services', the "
        "operator's and the tenants' nkey users with their permissions, from $JETSCRIBE_NATS_KEYS",
    )
    nats_users.add_argument("--out", required=True, metavar="FILE", help="where to write it (e.g. /auth/users.conf)")

    db = sub.add_parser("db", help="database schema: upgrade, downgrade, or say where it is")
    db.add_argument(
        "action",
        choices=["upgrade", "downgrade", "current"],
        help="upgrade (to the newest, or REV), downgrade (one revision back, or to REV), current",
    )
    db.add_argument("revision", nargs="?", metavar="REV", help="a revision (0001, 0002, ...; base: no tables)")
    db.add_argument("--format", choices=("text", "json"), default="text", help="current: text or one JSON object")

    schema = sub.add_parser(
        "schema", help="write the JSON Schemas of the transcript.* and session.* messages (the downstream contract)"
    )
    schema.add_argument("--out", default="docs/schema", metavar="DIR", help="folder to write them to (docs/schema)")
    schema.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if the files in DIR differ from the models"
    )

    return parser


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong, and where the help is), exit 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(UsageError.exit_code, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def run_command(command, args) -> int:
    """The one place an expected failure becomes one line on stderr and an exit code (the traceback with --debug);
    an unexpected one keeps its traceback."""
    try:
        return command(args)
    except (KeyboardInterrupt, asyncio.CancelledError):
        if args.debug:
            traceback.print_exc()
        print(f"jetscribe {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        error = as_cli_error(exc)
        if error is None:
            raise
        if args.debug:
            traceback.print_exc()
        print(f"jetscribe {args.command}: {error}", file=sys.stderr, flush=True)
        return error.exit_code


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jetscribe")
    except PackageNotFoundError:
        return "(not installed)"


def language(text: str) -> str:
    """--language: auto or a code Whisper knows."""
    if text != "auto" and text not in WHISPER_LANGUAGES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a Whisper language code (en, de, fr, zh, yue, ...) or auto")
    return text


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def transcriber_count(text: str) -> int | None:
    """--transcribers: a count of at least 1, or auto (None: `jetscribe.devstack.sizing` chooses)."""
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of workers (1 or more) or auto")
    return int(text)


UP_NOTIFY_FD = "JETSCRIBE_UP_NOTIFY_FD"  # set by `up --detach` for the background `up`: where to say ready or not


def cmd_up(args) -> int:
    if args.detach:
        return _up_detached(args)
    notify = _UpNotice.from_env()
    local = stack.LocalStack(
        stack.home_dir(),
        model=args.model,
        transcribers=args.transcribers,
        gateways=args.gateways,
        hold_output=True,
        nats_nodes=args.nats_cluster,
    )
    stopping: list[bool] = []

    # SIGHUP too: the terminal went away, and the children (in process groups of their own) would outlive us.
    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def stop_later() -> None:  # once up (and while stopping), a signal only asks the loop below to stop
        for signum in stop_signals:
            signal.signal(signum, lambda *_: stopping.append(True))

    for signum in stop_signals[1:]:  # while starting, they interrupt as Ctrl-C does
        signal.signal(signum, signal.default_int_handler)
    started = False
    try:
        try:
            local.start()
        except stack.StackRunning as exc:
            return notify.failed(f"jetscribe up: {exc}", 1)
        except (stack.StackError, ConfigError, ServerFailed) as exc:  # one line: which part, and why
            return notify.failed(f"jetscribe up: {getattr(exc, 'line', exc)}", 2)
        started = True
        stop_later()
        lines = [f"jetscribe is up: NATS {local.nats_url}  PostgreSQL {local.database_url}", _workers_line(local)]
        if local.nats is not None and local.nats.keyring is not None:
            lines.append(f"NATS users (nkey seeds) in {local.nats.keyring.folder}; a tenant's: jetscribe tenant add T")
        if local.database_roles:
            from pathlib import Path

            from jetscribe.devstack.pgroles import ROLE_NAMES

            folder = Path(local.database_roles["owner"].password_file).parent
            lines.append(f"PostgreSQL roles {', '.join(ROLE_NAMES.values())}, their passwords in {folder}")
        if local.ws_url:
            lines.append(
                f"WebSocket: {local.ws_url}/v1/listen (Deepgram-compatible) and {local.ws_url}/v1/sessions/ID; "
                "a tenant's API key: jetscribe tenant add T"
            )
        lines.append(f"captions page and session browser: {local.web_url}")
        # last: a detached `up` leaves this line out (`-d` prints the others)
        lines.append("stream with: jetscribe stream FILE --session ID    (Ctrl-C or `jetscribe down` stops everything)")
        notify.ready(lines)
        while not stopping:
            local.check()
            time.sleep(0.1)  # a signal only sets `stopping`: this is how soon we act on it
    except KeyboardInterrupt:
        if not started:
            notify.failed("jetscribe up: interrupted while starting", 130)
    finally:
        stop_later()
        if started:
            _say("stopping...")
        began = time.monotonic()
        stopped = local.stop()
        if started:
            _say(f"stopped in {time.monotonic() - began:.1f} s: {', '.join(stopped) or 'nothing was running'}")
    return 0 if started else 130


def _say(line: str) -> None:
    """Print, unless the terminal is gone (a hangup): stopping the stack matters more than saying so."""
    with contextlib.suppress(OSError):
        print(line, flush=True)


class _UpNotice:
    """How `up` says it is ready, or why it is not: on stdout/stderr, and to a detaching `up --detach` waiting on
    the other end of a pipe (then closed, so that one returns)."""

    def __init__(self, fd: int | None):
        self.fd = fd

    @classmethod
    def from_env(cls) -> _UpNotice:
        fd = os.environ.pop(UP_NOTIFY_FD, "")
        return cls(int(fd) if fd.isdigit() else None)

    def ready(self, lines: list[str]) -> None:
        for line in lines:
            print(line, flush=True)
        self._send("ready", lines)

    def failed(self, line: str, code: int) -> int:
        print(line, file=sys.stderr, flush=True)
        self._send("failed", [line])
        return code

    def _send(self, status: str, lines: list[str]) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError), os.fdopen(self.fd, "w") as pipe:
            pipe.write("\n".join([status, *lines]) + "\n")
        self.fd = None


def _up_detached(args) -> int:
    """`up --detach`: run `up` in a session of its own, its output to up.log, and return once it says it is ready
    (its lines, exit 0) or why it is not (that line, its exit code)."""
    home = stack.home_dir()
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "up.log"
    argv = [a for a in args.argv if a not in ("-d", "--detach")]
    read_fd, write_fd = os.pipe()
    env = {**os.environ, "JETSCRIBE_HOME": str(home), UP_NOTIFY_FD: str(write_fd)}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jetscribe.cli.main", *argv],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=(write_fd,),
            start_new_session=True,  # no terminal: neither its Ctrl-C nor its hangup reaches the stack
        )
    os.close(write_fd)
    try:
        with os.fdopen(read_fd) as pipe:
            status, *lines = pipe.read().splitlines() or [""]  # until it is ready, or gave up (or died)
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        print("jetscribe up: interrupted; the background stack is stopped", file=sys.stderr)
        return 130
    if status == "ready":
        for line in lines[:-1]:
            print(line)
        print(f"running in the background as pid {proc.pid}, its log in {log_path}; stop it with: jetscribe down")
        return 0
    code = proc.wait()
    print(
        lines[0] if lines else f"jetscribe up: exited with code {code} while starting; see {log_path}", file=sys.stderr
    )
    return code or 2


def cmd_down(args) -> int:
    try:
        print(stack.stop_stack(stack.home_dir(), timeout_s=args.timeout))
    except stack.NoStack as exc:
        print(f"jetscribe down: {exc}", file=sys.stderr)
        return 1
    return 0


def _workers_line(local: stack.LocalStack) -> str:
    """What runs the transcription: the plan, and the partitions each worker took."""
    assert local.plan is not None
    held = ", ".join(f"{w} {len(local.partitions_held.get(w, []))}" for w in local.transcriber_ids)
    return f"{local.plan.describe(stack.cores_available())}; partitions held: {held}"


def cmd_stream(args) -> int:
    from jetscribe.cli import stream

    audio = stream.read_audio_file(args.file)  # a bad file is a usage error, whatever the servers
    channel_speakers = args.channel_speakers or []
    if channel_speakers and len(channel_speakers) != audio.channels:
        raise UsageError(
            f"--channel-speakers names {len(channel_speakers)} but {args.file} has {audio.channels} channel(s)"
        )
    if channel_speakers and (args.speaker or args.turns):
        raise UsageError("--channel-speakers names the speakers; leave out --speaker and --turns")
    speakers = {
        "speaker": args.speaker,
        "meeting_id": args.meeting,
        "track_start": args.track_start,
        "speaker_turns": args.turns,
        "channel_speakers": channel_speakers,
    }
    return stream.run(servers.nats_url(), audio, args, speakers, stack.nats_auth(args.creds))


def speaker_turns(text: str) -> list[tuple[float, str]]:
    """`--turns 0=Ann,4.2=Bob`: (seconds into the file, who talks from there)."""
    turns = []
    for item in text.split(","):
        at, sep, name = item.partition("=")
        try:
            seconds = float(at)
        except ValueError:
            seconds = -1.0
        if not sep or not name.strip() or not 0 <= seconds < float("inf"):
            raise argparse.ArgumentTypeError(f"{item!r} is not SECONDS=NAME (e.g. 4.2=Bob)")
        turns.append((seconds, name.strip()))
    return sorted(turns)


def names(text: str) -> list[str]:
    found = [n.strip() for n in text.split(",")]
    if len(found) < 2 or not all(found):
        raise argparse.ArgumentTypeError(f"{text!r}: give one name per channel, comma-separated (e.g. Ann,Bob)")
    return found


async def _stream_live(
    url: str,
    audio,
    tenant: str,
    session: str,
    speed: float,
    language: str = "auto",
    out=None,
    speakers: dict | None = None,
    auth=None,
):
    """Stream as a bot and show the transcript live: interims rewrite one line, finals stay. `speakers`: the
    bot's speaker options of `stream_audio` (speaker, meeting_id, track_start, speaker_turns, channel_speakers)."""
    from jetscribe.client.bot import stream_audio

    out = out or sys.stdout
    nc = await _connect_nats(url, auth, tenant=tenant)
    try:
        return await _until_refused(
            nc,
            stream_audio(
                nc,
                audio,
                tenant=tenant,
                session_id=session,
                speed=speed,
                language=language,
                on_segment=lambda segment: show_live(segment, out),
                **(speakers or {}),
            ),
            tenant,
        )
    finally:
        await nc.close()


async def _connect_nats(url: str, auth=None, tenant: str | None = None):
    """A connection as `auth`'s user (the operator of a stack running here by default); with `tenant`, replies
    come to that tenant's own inboxes, the only ones a tenant's user may read."""
    import ssl

    import nats
    from nats.errors import Error as NatsError

    from jetscribe.shared.natsauth import ClientAuth

    fatal: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_error(exc):  # nats-py would log each failed connection attempt with a traceback
        if isinstance(exc, ssl.SSLError) and not fatal.done():  # nats-py stalls after a failed TLS handshake
            fatal.set_exception(Unreachable(f"TLS with NATS at {url} failed: {exc}; is JETSCRIBE_NATS_TLS_CA set?"))
        elif "permissions violation" in str(exc).lower():
            refusals.append(str(exc))
            print(f"jetscribe: NATS refused: {exc}", file=sys.stderr, flush=True)
        elif not isinstance(exc, OSError):
            print(f"jetscribe: NATS error: {exc!r}", file=sys.stderr, flush=True)

    refusals: list[str] = []
    auth = auth if auth is not None else ClientAuth()
    try:
        options = auth.connect_options(url, tenant)
    except (OSError, ValueError) as exc:  # a TLS file that is not there, or a tenant that is no subject token
        raise Unreachable(f"cannot connect to NATS at {url}: {exc}") from None
    connecting = asyncio.ensure_future(
        nats.connect(nats_servers(url), max_reconnect_attempts=3, connect_timeout=3, error_cb=on_error, **options)
    )
    try:
        await asyncio.wait([connecting, fatal], return_when=asyncio.FIRST_COMPLETED)
        if fatal.done():
            connecting.cancel()
            fatal.result()
        nc = connecting.result()
        nc.refusals = refusals  # what the server refused on it: `_until_refused` stops a command on the first
        return nc
    except NatsError as exc:
        if "authorization" in str(exc).lower():
            raise Unreachable(
                f"NATS at {url} refused the credentials ({exc}); give a tenant's seed file with --creds or "
                "NATS_CREDS (`jetscribe tenant add T` makes one)"
            ) from None
        raise Unreachable(
            f"cannot reach NATS at {url} ({exc!r}); start the stack with `jetscribe up` in this folder, or set NATS_URL"
        ) from None
    except Unreachable:
        raise
    except Exception as exc:
        raise Unreachable(
            f"cannot reach NATS at {url} ({exc!r}); start the stack with `jetscribe up` in this folder, or set NATS_URL"
        ) from None


async def _until_refused(nc, work, tenant: str):
    """Run `work`; if NATS refuses one of its subjects meanwhile (a permissions violation: the credentials are
    not tenant's), stop it and say so rather than wait for answers that cannot come."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait([task], timeout=0.1)
        if done:
            return task.result()
        if nc.refusals:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            raise Unreachable(
                f"NATS refused it ({nc.refusals[0]}): are these the credentials of tenant {tenant}? "
                "(--creds or NATS_CREDS; `jetscribe tenant list`)"
            )


def cmd_follow(args) -> int:
    from nats.errors import ConnectionClosedError

    from jetscribe.client.follow import (
        FollowPlan,
        NoStream,
        consumer_config,
        follow,
        follow_meeting,
        meeting_consumer_config,
        parse_since,
        plan_follow,
    )

    try:
        since = parse_since(args.since, datetime.now(UTC)) if args.since else None
        start = {"from_start": args.from_start, "since": since, "from_seq": args.from_seq}
        if args.meeting:
            config = meeting_consumer_config(args.tenant, args.meeting, **start)
        else:
            config = consumer_config(args.tenant, args.session, **start)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    url = servers.nats_url()

    auth = stack.nats_auth(args.creds)
    # A tenant's user creates no consumer: core subscriptions, after the gateways' history when it replays.
    live = stack.connects_as_tenant(auth)
    if live and (since or (args.meeting and (args.from_start or args.from_seq is not None))):
        raise UsageError(
            "as a tenant it replays one session from its start (--from-start) or a stream seq (--from-seq), through "
            "the gateways' history; --since, or a meeting's replay, needs the operator's credentials or a reader "
            "made by `jetscribe tenant reader T NAME`"
        )

    async def run():
        nc = await _connect_nats(url, auth, tenant=args.tenant)
        try:
            if args.meeting:
                print(
                    f"following meeting {args.meeting} of tenant {args.tenant} (NATS {url}); Ctrl-C stops",
                    file=sys.stderr,
                )
                watching = follow_meeting(
                    nc, args.tenant, args.meeting, config, fmt=args.format, keep=args.keep, live=live
                )
                return await _until_refused(nc, watching, args.tenant)
            seen = None if live else await _look_up(nc, args.tenant, args.session)  # a tenant may not look
            plan = (
                plan_follow(seen, args.tenant, args.session, config, keep=args.keep, wait=args.wait)
                if seen is not None
                else FollowPlan(f"following session {args.session} of tenant {args.tenant}; Ctrl-C stops")
            )
            if plan.exit_code is not None:
                if plan.exit_code == 1 and seen is not None and seen.messages == 0:
                    raise NotFound(plan.message + await _stored_note(args.tenant, args.session))
                print(plan.message, file=sys.stderr, flush=True)
                return plan.exit_code
            print(f"{plan.message} (NATS {url})", file=sys.stderr, flush=True)  # stdout stays the transcript
            watching = follow(nc, args.tenant, args.session, config, fmt=args.format, keep=args.keep, live=live)
            return await _until_refused(nc, watching, args.tenant)
        except NoStream as exc:
            raise Unreachable(str(exc)) from None
        except ConnectionClosedError:
            raise Unreachable(f"lost the connection to NATS at {url}") from None
        finally:
            await nc.close()

    return asyncio.run(run())


async def _look_up(nc, tenant: str, session: str):
    """What TRANSCRIPTS holds of the session, or None when these credentials may not ask (a tenant's user reads
    through its consumer only): following then starts without the checks."""
    from jetscribe.client.follow import NoStream, look_up

    asking = asyncio.ensure_future(look_up(nc.jetstream(), tenant, session))
    deadline = asyncio.get_running_loop().time() + 5
    while not asking.done() and not nc.refusals and asyncio.get_running_loop().time() < deadline:
        await asyncio.wait([asking], timeout=0.05)  # a refusal comes as an error, not as the request's answer
    if not asking.done():
        asking.cancel()
        nc.refusals.clear()  # the refused stream request is not the follow's
        return None
    try:
        return asking.result()
    except NoStream:
        raise
    except Exception:
        nc.refusals.clear()
        return None


async def _stored_note(tenant: str, session: str) -> str:
    """For a session TRANSCRIPTS does not hold: whether PostgreSQL has it (it keeps what the stream aged out)."""
    from jetscribe.cli.database import reading
    from jetscribe.services.persister.store import find_session

    try:
        async with reading(*servers.database("reader")) as engine:
            row = await find_session(engine, tenant, session)
    except CliError:
        return ""  # no database to ask: the stream's answer stands
    if row is None:
        return " (PostgreSQL has no such session either)"
    return f" (PostgreSQL has it, {row.status}: see `jetscribe transcript {session} --tenant {tenant}`)"


def cmd_transcript(args) -> int:
    if args.creds and not args.meeting:
        return _tenant_transcript(args)
    if args.meeting:
        segments = meeting_rows(asyncio.run(_meeting(servers.database("reader"), args.tenant, args.meeting)))
        if not segments:
            raise NotFound(f"no transcript for meeting {args.meeting} of tenant {args.tenant} in PostgreSQL")
        print(render(segments, args.format))
        return 0
    row, segments = asyncio.run(_transcript(servers.database("reader"), args.tenant, args.session))
    if row is None:
        raise NotFound(
            f"no session {args.session} of tenant {args.tenant} in PostgreSQL: see `jetscribe sessions` for the ids"
        )
    if row.status == "active":
        print(f"session {args.session} is still active: its transcript so far", file=sys.stderr)
    text = render(segments, args.format)
    if text:
        print(text)
    return 0


def _tenant_transcript(args) -> int:
    """`jetscribe transcript S --creds TENANT.nk`: a tenant has no database role; its session's finals come from
    TRANSCRIPTS through the gateways' history (client/history.py), as `follow --from-start` reads them."""
    from jetscribe.client.history import HistoryRefused, stored_messages, transcript_of

    url, auth = servers.nats_url(), stack.nats_auth(args.creds)

    async def read():
        nc = await _connect_nats(url, auth, tenant=args.tenant)

        async def collect():
            return [m async for m in stored_messages(nc, args.tenant, args.session)]

        try:
            return await _until_refused(nc, collect(), args.tenant)  # another tenant's session: NATS refuses at once
        finally:
            await nc.close()

    try:
        stored = asyncio.run(read())
    except HistoryRefused as exc:
        raise Unreachable(str(exc)) from None
    if not stored:
        raise NotFound(f"no session {args.session} of tenant {args.tenant} in {url}'s TRANSCRIPTS stream")
    closed, segments = transcript_of(stored)
    if closed is None:
        print(f"session {args.session} is still active: its transcript so far", file=sys.stderr)
    text = render(segments, args.format)
    if text:
        print(text)
    return 0


def cmd_sessions(args) -> int:
    from jetscribe.cli.formats import sessions_json, sessions_table

    rows = asyncio.run(_sessions(servers.database("reader"), args.tenant))
    print(sessions_json(rows) if args.format == "json" else sessions_table(rows))
    return 0


async def _transcript(database: tuple[str, PostgresClient], tenant: str, session: str, wait_s: float = 0.0):
    """A session's row (None if PostgreSQL has none) and its final segments; with wait_s, first wait until its end
    is stored (the persister lags a bit)."""
    from jetscribe.cli.database import reading
    from jetscribe.services.persister.store import final_segments, find_session, wait_until_ended

    async with reading(*database) as engine:
        if wait_s:
            await wait_until_ended(engine, tenant, session, wait_s)
        return await find_session(engine, tenant, session), await final_segments(engine, tenant, session)


async def _meeting(database: tuple[str, PostgresClient], tenant: str, meeting: str):
    """A meeting's final segments, every track's, in spoken order."""
    from jetscribe.cli.database import reading
    from jetscribe.services.persister.store import meeting_segments

    async with reading(*database) as engine:
        return await meeting_segments(engine, tenant, meeting)


async def _sessions(database: tuple[str, PostgresClient], tenant: str | None):
    from jetscribe.cli.database import reading
    from jetscribe.services.persister.store import list_sessions

    async with reading(*database) as engine:
        return await list_sessions(engine, tenant)


def cmd_status(args) -> int:
    from jetscribe.cli import status

    if args.every <= 0 or args.wait <= 0:
        raise UsageError("--every and --wait must be positive")
    url, auth = servers.nats_url(), stack.nats_auth(args.creds)
    try:
        return asyncio.run(
            status.run(
                lambda: _connect_nats(url, auth), once=args.once, fmt=args.format, every_s=args.every, wait_s=args.wait
            )
        )
    except KeyboardInterrupt:
        return 0


def cmd_tenant(args) -> int:
    from jetscribe.devstack.keys import TenantError

    keys = stack.keyring()
    if args.action == "reader":
        return _tenant_reader(args, keys)
    try:
        if args.action == "list":
            for name, revoked in keys.tenants().items():
                print(f"{name}\t{'revoked' if revoked else 'active'}\t{keys.tenant_path(name) if not revoked else ''}")
            return 0
        if args.action == "add":
            path = keys.add_tenant(args.tenant)
        else:
            readers = keys.revoke_tenant(args.tenant)
    except TenantError as exc:
        print(f"jetscribe tenant {args.action}: {exc}", file=sys.stderr)
        return 2
    reloaded = stack.reload_nats()
    if args.action == "add":
        api_key = keys.new_api_key(args.tenant)
        print(f"tenant {args.tenant}: nkey seed in {path} (0600); its bots and readers connect with")
        print(f"  NATS_CREDS={path} jetscribe stream FILE --session ID --tenant {args.tenant}")
        print(f"  or nats-py: nats.connect(url, nkeys_seed=..., inbox_prefix='_INBOX_{args.tenant}')")
        print(path.read_text().strip())
        print(f"WebSocket API key of tenant {args.tenant} (shown once; `tenant add` again makes a new one):")
        print(f"  Authorization: Token {api_key}")
    else:
        print(f"tenant {args.tenant} revoked")
    print("the running NATS reloaded its users" if reloaded else "no stack runs here: the next `jetscribe up` uses it")
    if args.action == "revoke" and readers:
        return _delete_readers(args.tenant, readers)
    return 0


def _delete_readers(tenant: str, consumers: list[str]) -> int:
    """A revoked tenant's readers go too: their consumers would keep its transcripts' place (and pending
    messages) on the server for nobody."""
    from jetscribe.client.readers import remove_reader

    async def delete(url: str) -> None:
        nc = await _connect_nats(url, stack.nats_auth())
        try:
            for consumer in consumers:
                await remove_reader(nc, consumer)
        finally:
            await nc.close()

    try:
        url = servers.nats_url()
        asyncio.run(delete(url))
    except Exception as exc:  # no NATS here, or the operator's user refused: the keys are revoked, the consumers not
        print(
            f"jetscribe tenant revoke: {tenant}'s readers {', '.join(consumers)} are still on TRANSCRIPTS ({exc}); "
            f"delete them with NATS_URL set, e.g. `nats consumer rm TRANSCRIPTS {consumers[0]}`",
            file=sys.stderr,
        )
        return 1
    print(f"deleted {tenant}'s readers: {', '.join(consumers)}")
    return 0


def _tenant_reader(args, keys) -> int:
    """Record the reader in the keyring, make (or delete) its consumer as the operator, reload NATS."""
    from jetscribe.client.readers import ReaderConflict, provision_reader, remove_reader
    from jetscribe.devstack.keys import TenantError

    try:
        if args.remove:
            consumer, filter_subject = keys.remove_reader(args.tenant, args.name), ""
        else:
            consumer, filter_subject = keys.add_reader(args.tenant, args.name, args.reads)
    except TenantError as exc:
        print(f"jetscribe tenant reader: {exc}", file=sys.stderr)
        return 2
    url = servers.nats_url()

    async def apply() -> bool:
        nc = await _connect_nats(url, stack.nats_auth())
        try:
            if args.remove:
                await remove_reader(nc, consumer)
                return True
            return await provision_reader(
                nc, consumer, filter_subject, args.ack_wait, max_ack_pending=1 if args.in_order else None
            )
        finally:
            await nc.close()

    try:
        made = asyncio.run(apply())
    except (Unreachable, ReaderConflict) as exc:
        print(f"jetscribe tenant reader: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # e.g. the operator's user refused, or no TRANSCRIPTS stream yet
        print(f"jetscribe tenant reader: consumer {consumer} at {url}: {exc!r}", file=sys.stderr)
        return 1
    reloaded = stack.reload_nats()
    if args.remove:
        print(f"reader {args.name} of {args.tenant}: consumer {consumer} deleted")
    else:
        print(
            f"reader {args.name} of {args.tenant}: pull consumer {consumer} on {filter_subject}, "
            + ("made" if made else "already there")
        )
        print(f"  nats-py, as {args.tenant}: js.pull_subscribe_bind(durable={consumer!r}, stream='TRANSCRIPTS')")
    print("the running NATS reloaded its users" if reloaded else "reload your nats-server for the permission")
    return 0


def cmd_web(args) -> int:
    """The web process in the foreground, on the database and keys of the stack here (or DATABASE_URL)."""
    from jetscribe.services.web.app import main as web_main

    url, client = servers.database("reader")  # it only reads: the stack's read-only role, where it made roles
    os.environ["DATABASE_URL"] = url
    if client.password_file:
        os.environ["JETSCRIBE_PG_PASSWORD_FILE"] = client.password_file
    os.environ.setdefault("JETSCRIBE_NATS_KEYS", str(stack.keyring().folder))
    for variable, value in (
        ("JETSCRIBE_WEB_HOST", args.host),
        ("JETSCRIBE_WEB_PORT", args.port),
        ("JETSCRIBE_WEB_GATEWAY_URL", args.gateway),
    ):
        if value is not None:
            os.environ[variable] = str(value)
    host, port = os.environ.get("JETSCRIBE_WEB_HOST") or "127.0.0.1", os.environ.get("JETSCRIBE_WEB_PORT") or "8000"
    print(f"captions page: http://{host}:{port}/  (Ctrl-C stops it)", flush=True)
    return web_main()


def cmd_nats_config(args) -> int:
    from jetscribe.shared.natsauth import Cluster, server_config

    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        print(f"jetscribe nats-config: --listen {args.listen!r} is not HOST:PORT", file=sys.stderr)
        return 2
    cluster = Cluster("jetscribe", args.cluster_listen, tuple(args.route)) if args.cluster_listen else None
    users = stack.keyring().ensure_services().users()
    print(
        server_config(
            host=host,
            port=int(port),
            store_dir=args.store_dir,
            users=users,
            server_name=args.server_name,
            cluster=cluster,
        ),
        end="",
    )
    return 0


def cmd_nats_users(args) -> int:
    """Make the services' and the operator's seeds if missing, then write every user not revoked (public keys and
    permissions only: no secret goes into the file) where the NATS nodes include it. Run again after a tenant is
    added or revoked, then have the nodes reload (SIGHUP)."""
    from pathlib import Path

    from jetscribe.shared.natsauth import users_config

    keys = stack.keyring()
    users = keys.ensure_services().users()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(users_config(users))
    tmp.chmod(0o644)  # the nodes may run as another user; the file holds public keys only
    tmp.replace(out)  # a node reloading meanwhile reads the old file or the new one, never half of one
    tenants = [u.tenant for u in users if u.role == "tenant"]
    print(f"{out}: {len(users)} NATS users (keys in {keys.folder}); tenants: {', '.join(tenants) or 'none'}")
    return 0


def cmd_db(args) -> int:
    from jetscribe.cli import database

    if args.action == "current" and args.revision:
        raise UsageError("`db current` takes no revision")
    url, client = servers.database("owner")
    if args.action == "upgrade":
        print(database.upgrade(url, args.revision, client))
    elif args.action == "downgrade":
        print(database.downgrade(url, args.revision, client))
    else:
        print(database.current(url, args.format, client))
    return 0


def cmd_schema(args) -> int:
    """Write (or with --check compare) docs/schema/*.json, the downstream contract, from the wire models."""
    from pathlib import Path

    from jetscribe.shared.schema import downstream_files

    folder = Path(args.out)
    files = downstream_files()
    if args.check:
        stale = [name for name, text in files.items() if _read_or_none(folder / name) != text]
        for name in stale:
            print(f"jetscribe schema: {folder / name} differs from the wire models", file=sys.stderr)
        if stale:
            print(f"regenerate with: jetscribe schema --out {folder}", file=sys.stderr)
        return 1 if stale else 0
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
        print(folder / name)
    return 0


def _read_or_none(path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def cmd_demo(args) -> int:
    from jetscribe.cli.stream import read_audio_file
    from jetscribe.client.bot import Audio

    if args.file:
        audio = read_audio_file(args.file)
    else:
        from jetscribe.evaluation.speech import sample_speech

        print("making the speech sample (first run only)...", file=sys.stderr, flush=True)
        speech = sample_speech()
        audio = Audio(speech.audio, speech.sample_rate)
    session = f"demo-{uuid.uuid4().hex[:8]}"
    home = stack.home_dir() / "demo"
    print(f"starting NATS, PostgreSQL and the services in {home} ...", file=sys.stderr, flush=True)
    quiet = {"JETSCRIBE_LOG_LEVEL": os.environ.get("JETSCRIBE_LOG_LEVEL", "WARNING")}  # the transcript is the output
    with stack.LocalStack(home, model=args.model, extra_env=quiet, transcribers=args.transcribers) as local:
        # Live lines go to stderr so that stdout holds only the stored transcript, in the format asked for.
        live = asyncio.run(
            _stream_live(local.nats_url, audio, "default", session, args.speed, out=sys.stderr, auth=local.auth)
        )
        _, segments = asyncio.run(_transcript(local.database("reader"), "default", session, wait_s=60.0))
        stored = max((s.updated_at.timestamp() for s in segments), default=time.time())
        timing = demo_timing(audio.duration_s, args.speed, live, stored)
        print(f"\n--- transcript of {session} from PostgreSQL ---\n{timing}", file=sys.stderr, flush=True)
        print(render(segments, args.format))
    return 0


def demo_timing(duration_s: float, speed: float, live, stored: float) -> str:
    """The demo's numbers, each named for what it is: with the whole file sent at once (speed 0) the wait after
    the last chunk is the backlog of transcribing the file, not the latency a live speaker would see."""
    first, last = live.sent_at[0], live.sent_at[-1]
    lines = [
        f"{duration_s:.1f} s of audio sent in {last - first:.1f} s; "
        f"{stored - first:.1f} s from the first chunk sent to the last final stored"
    ]
    if speed <= 0 or speed > 1:
        lines.append(
            f"last final stored {stored - last:.2f} s after the last chunk: the backlog of transcribing audio sent "
            f"{'all at once' if speed <= 0 else f'at {speed:g}x real time'}, not a live latency "
            "(run `jetscribe demo --speed 1` for that)"
        )
    else:
        lines.append(
            f"last final stored {stored - last:.2f} s after the last chunk was sent: the final latency of the last "
            "utterance, plus the persister's write"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
