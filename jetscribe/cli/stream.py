"""`jetscribe stream`: publish a file as a bot, with a header saying where it goes, the live transcript, and a
summary saying what the numbers are. Ctrl-C ends the session (or, with --keep-open, leaves it to resume)."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import TextIO

from jetscribe.cli.errors import UsageError
from jetscribe.cli.formats import show_live
from jetscribe.client.bot import Audio, StreamResult

INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C


def read_audio_file(path: str) -> Audio:
    """The file's audio; a missing or unreadable file is a UsageError naming it."""
    import soundfile

    from jetscribe.client.bot import read_audio

    if not Path(path).is_file():
        raise UsageError(f"no audio file {path!r}" + (" (that is a folder)" if Path(path).is_dir() else ""))
    try:
        return read_audio(path)
    except (soundfile.LibsndfileError, RuntimeError) as exc:
        raise UsageError(f"cannot read {path!r} as audio ({exc}): use a WAV, FLAC, OGG or MP3 file") from None


def header(path: str, audio: Audio, tenant: str, session: str, url: str, speed: float) -> str:
    pace = "real time" if speed == 1 else "as fast as possible" if speed <= 0 else f"{speed:g}x real time"
    return (
        f"streaming {path} ({audio.duration_s:.1f} s, {audio.sample_rate} Hz, {audio.channels} ch) as session "
        f"{session} of tenant {tenant} to NATS {url}, {pace}; Ctrl-C ends the session"
    )


def resumed_line(result: StreamResult, chunk_s: float) -> str | None:
    """Said when the gateway already had part of the session: the bot sends only the rest."""
    if result.resumed_after < 0:
        return None
    done = result.resumed_after + 1
    if done >= result.total_chunks:
        return f"resuming session: the gateway already has all {result.total_chunks} chunks; ending it"
    return (
        f"resuming session: the gateway already has chunks 0-{result.resumed_after} "
        f"({done * chunk_s:.1f} s); sending from chunk {done}"
    )


def summary(result: StreamResult, chunk_s: float, speed: float) -> str:
    """What was sent and heard. The last final's delay is after the last chunk *sent*: at real time that is the
    final latency of the last utterance; faster, the audio was sent ahead of transcription, so it holds the
    backlog too."""
    sent = len(result.sent_at)
    finals = [s for s in result.final_segments() if s.text]
    parts = [f"sent {sent * chunk_s:.1f} s of audio in {sent} chunks", f"{len(finals)} finals heard"]
    last_final = max((at for at, s in result.heard if s.status == "final"), default=None)
    if last_final is not None and result.sent_at:
        delay = last_final - result.sent_at[-1]
        if speed == 1:
            parts.append(f"last final {delay:.2f} s after the last audio was sent (its final latency)")
        else:
            parts.append(
                f"last final {delay:.2f} s after the last audio was sent (at --speed {speed:g} this includes the "
                "backlog of audio sent ahead of transcription: not a latency)"
            )
    if result.ended is not None:
        parts.append(f"session ended: {result.ended.audio_seconds:.1f} s of audio, {result.ended.segments} finals")
    return "; ".join(parts)


def stopped_line(result: StreamResult, tenant: str, session: str, path: str) -> str:
    """What Ctrl-C left behind."""
    if not result.end_sent:
        return (
            f"stopped; session {session} is still open: resume it with "
            f"`jetscribe stream {path} --session {session} --tenant {tenant}`"
        )
    if result.ended is None:
        return f"stopped; sent the session's end, its `ended` did not come in time (see `jetscribe follow {session}`)"
    return "stopped; the session is ended"


async def stream(
    url: str,
    path: str,
    audio: Audio,
    *,
    tenant: str,
    session: str,
    speed: float,
    language: str,
    keep_open: bool,
    out: TextIO,
    err: TextIO,
    speakers: dict | None = None,
    auth=None,
) -> int:
    """Run the bot until the session ends or Ctrl-C (SIGINT) stops it; a second Ctrl-C stops at once."""
    from jetscribe.cli.main import _connect_nats, _until_refused
    from jetscribe.client.bot import stream_audio

    chunk_s = 0.1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()

    def interrupt() -> None:
        if stop.is_set() and task is not None:
            task.cancel()  # the second Ctrl-C: stop waiting for the end
        stop.set()

    nc = await _connect_nats(url, auth, tenant=tenant)  # before the header: an unreachable server is the only line
    print(header(path, audio, tenant, session, url, speed), file=err, flush=True)
    loop.add_signal_handler(signal.SIGINT, interrupt)
    try:

        def started(result: StreamResult) -> None:
            line = resumed_line(result, chunk_s)
            if line:
                print(line, file=err, flush=True)

        bot = stream_audio(
            nc,
            audio,
            tenant=tenant,
            session_id=session,
            speed=speed,
            chunk_s=chunk_s,
            language=language,
            on_segment=lambda segment: show_live(segment, out),
            on_start=started,
            stop=stop,
            end_on_stop=not keep_open,
            **(speakers or {}),
        )
        result = await _until_refused(nc, bot, tenant)  # credentials not the tenant's: one line, not a hang
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        await nc.close()
    if out.isatty():
        print(file=out)  # leave the interim line
    print(summary(result, chunk_s, speed), file=err, flush=True)
    if result.stopped:
        print(stopped_line(result, tenant, session, path), file=err, flush=True)
        return INTERRUPTED
    return 0


def run(url: str, audio: Audio, args, speakers: dict | None = None, auth=None) -> int:
    """`jetscribe stream` with its parsed arguments; `speakers`: the bot's speaker options (see `stream_audio`)."""
    return asyncio.run(
        stream(
            url,
            args.file,
            audio,
            tenant=args.tenant,
            session=args.session,
            speed=args.speed,
            language=args.language,
            keep_open=args.keep_open,
            out=sys.stdout,
            err=sys.stderr,
            speakers=speakers,
            auth=auth,
        )
    )
