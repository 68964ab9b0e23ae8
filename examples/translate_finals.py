"""A translation-style subscriber: one tenant's finals from the TRANSCRIPTS stream, each handled once, in order.

This is how a service downstream of jetscribe (a translator, say) reads transcripts. It reads a durable JetStream
pull consumer on `transcript.<tenant>.>`, a reader the operator made for the tenant (every session of the tenant;
docs/schema/transcript.json describes the messages), skips interims, "translates" each final and acks it only after
the translation is written. Stop it (Ctrl-C, SIGTERM: it finishes the final in hand) or kill it, start it again with
the same --durable, and it goes on from the first final it had not acked: the consumer is kept by the server.

THE TRANSLATION IS A STAND-IN: pig latin, so that the output is visibly transformed. Put a real model call in
`translate()`.

Exactly once, in order:
- `max_ack_pending=1`: the server hands out the next message only once the one before is acked, so a message
  redelivered after a crash (when the reader's `--ack-wait` runs out) comes before any later one.
- A crash after a final was written but before its ack would hand it out again: every line of `--out` carries its
  TRANSCRIPTS stream sequence, and a final at or below the last one written is acked and not handled again. A
  real service does the same with its own store (or an idempotency key: tenant, session_id, segment_id).
- Run one instance per --durable: a second one on the same consumer would receive the same deliveries.

    python examples/translate_finals.py --tenant acme [--nats nats://host:4222] [--creds acme.nk]

`--creds FILE`: the tenant's NATS credentials, an nkey seed file (what `jetscribe tenant add` makes) or a JWT
credentials file (nats-py's `user_credentials`). A tenant's user may create no consumer (nats-server does not check
where a push consumer delivers, so one could push onto another tenant's subjects), so the operator makes the
reader first, once, in order (one unacked message at a time) and with the ack wait wanted:

    jetscribe tenant reader acme translate --in-order --ack-wait 30

which makes the pull consumer `reader_acme_translate` and lets acme's user fetch from it and ack. `--durable` names
that reader (`translate`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import nats

from jetscribe.shared import subjects
from jetscribe.shared.config import DEFAULT_NATS_URL
from jetscribe.shared.natsauth import reader_consumer as reader_name
from jetscribe.shared.wire import Segment, WireError, decode

# --- the pure part -------------------------------------------------------------------------------------------------


def reader_consumer(tenant: str, durable: str) -> str:
    """The TRANSCRIPTS consumer of the tenant's reader `durable` (`jetscribe tenant reader <tenant> <durable>`)."""
    for what, value in (("tenant", tenant), ("durable", durable)):
        if not subjects.is_valid_token(value):
            raise ValueError(f"{what} {value!r} must be 1-64 letters, digits, '_' or '-'")
    return reader_name(tenant, durable)


def inbox_prefix(tenant: str) -> str:
    """The reply subjects a tenant's user may read (jetscribe's NATS permissions): `_INBOX_<tenant>`."""
    return f"_INBOX_{tenant}"


def credentials_option(text: str) -> str:
    """The nats-py connect option for a credentials file with this content: a JWT credentials file is
    `user_credentials`, a bare nkey seed `nkeys_seed`."""
    return "user_credentials" if "BEGIN NATS USER JWT" in text else "nkeys_seed"


def translate(text: str) -> str:
    """STAND-IN for a translation model: pig latin ("hello there" -> "ellohay erethay")."""
    return " ".join(_pig_latin(word) for word in text.split())


def _pig_latin(word: str) -> str:
    core = word.strip(".,;:!?\"'")
    if not core.isalpha():
        return word
    head = next((i for i, c in enumerate(core.lower()) if c in "aeiou"), len(core))
    moved = core[head:] + core[:head] + ("way" if head == 0 else "ay")
    return word.replace(core, moved.capitalize() if core[0].isupper() else moved.lower())


def record(final: Segment, stream_seq: int) -> str:
    """One line of --out: the final, its translation, and its stream sequence (the resume point)."""
    return json.dumps(
        {
            "stream_seq": stream_seq,
            "tenant": final.tenant,
            "session_id": final.session_id,
            "segment_id": final.segment_id,
            "start": final.start,
            "end": final.end,
            "text": final.text,
            "translation": translate(final.text),
            "translation_is_a_stand_in": True,
        },
        ensure_ascii=False,
    )


def last_handled(lines: list[str]) -> int:
    """The stream sequence of the last final written to --out (0: none). A torn last line (killed while writing)
    does not count: that final was not handled."""
    for line in reversed(lines):
        try:
            return int(json.loads(line)["stream_seq"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def next_step(segment: Segment, stream_seq: int, last_done: int) -> str:
    """What to do with a message: "interim" (ack, not ours), "repeat" (a final written before a crash and handed
    out again: ack, do not translate twice) or "translate"."""
    if segment.status != "final":
        return "interim"
    return "repeat" if stream_seq <= last_done else "translate"


def show(final: Segment) -> str:
    """The line printed for a final."""
    return (
        f"{final.tenant}/{final.session_id} #{final.segment_id} [{final.start:.2f}-{final.end:.2f}] "
        f"{final.text.strip()}  =>  [stand-in translation] {translate(final.text)}"
    )


@dataclass
class Tally:
    handled: int = 0
    interims: int = 0  # acked without handling: not finals
    repeats: int = 0  # finals handled before a crash and handed out again: acked, not handled twice
    refused: int = 0  # messages that are not a Segment: reported and terminated

    def __str__(self) -> str:
        return (
            f"{self.handled} finals translated, {self.interims} interims skipped, {self.repeats} repeats skipped, "
            f"{self.refused} refused"
        )


# --- the asyncio shell ---------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> int:
    out_path = Path(args.out or f"translations-{args.tenant}.jsonl")
    done = last_handled(out_path.read_text(encoding="utf-8").splitlines()) if out_path.exists() else 0
    consumer = reader_consumer(args.tenant, args.durable or "translate")
    options: dict[str, object] = {"name": f"translate-example-{args.tenant}", "inbox_prefix": inbox_prefix(args.tenant)}
    if args.creds:
        try:
            options[credentials_option(Path(args.creds).read_text(encoding="utf-8"))] = args.creds
        except OSError as exc:
            print(f"translate: cannot read --creds {args.creds}: {exc.strerror}", file=sys.stderr)
            return 2

    async def on_error(exc: Exception) -> None:  # nats-py would log each failed attempt with a traceback
        if not isinstance(exc, OSError):  # a refused connection is retried, and said once if it stays refused
            print(f"translate: NATS: {exc!r}", file=sys.stderr, flush=True)

    try:
        # A few attempts, then it exits 1: run it under a supervisor (compose's `restart:`); the consumer resumes.
        nc = await nats.connect(
            args.nats, connect_timeout=3, reconnect_time_wait=1, max_reconnect_attempts=5, error_cb=on_error, **options
        )
    except Exception as exc:
        print(f"translate: cannot connect to {args.nats}: {exc}", file=sys.stderr)
        return 2
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    tally = Tally()
    try:
        sub = await nc.jetstream().pull_subscribe_bind(durable=consumer, stream=subjects.TRANSCRIPTS_STREAM)
        print(
            f"translate: reader {consumer}, after stream seq {done}",
            file=sys.stderr,
            flush=True,
        )
        with out_path.open("a", encoding="utf-8") as out:
            while not stop.is_set():
                try:
                    (msg,) = await sub.fetch(1, timeout=1.0)
                except nats.errors.TimeoutError:
                    continue
                except nats.js.errors.APIError as exc:  # e.g. 503 while a cluster moves the consumer's leader
                    print(f"translate: fetch refused ({exc!r}); asking again", file=sys.stderr, flush=True)
                    await asyncio.sleep(0.5)
                    continue
                seq = msg.metadata.sequence.stream
                try:
                    segment = decode(msg.data, Segment)
                except WireError as exc:
                    tally.refused += 1
                    print(f"translate: refused stream seq {seq} on {msg.subject}: {exc}", file=sys.stderr, flush=True)
                    await msg.term()  # it will never decode: not handed out again
                    continue
                step = next_step(segment, seq, done)
                if step == "interim":
                    tally.interims += 1
                elif step == "repeat":
                    tally.repeats += 1
                    print(f"translate: stream seq {seq} was translated before: skipped", file=sys.stderr, flush=True)
                else:
                    await asyncio.sleep(args.work_s)  # the stand-in's "model call"
                    out.write(record(segment, seq) + "\n")
                    out.flush()
                    os.fsync(out.fileno())
                    done = seq
                    tally.handled += 1
                    print(show(segment), flush=True)
                try:
                    await msg.ack_sync()
                except nats.errors.TimeoutError:  # the ack may be lost (a leader change): it comes again, a repeat
                    print(
                        f"translate: ack of stream seq {seq} unconfirmed; a redelivery is skipped as a repeat",
                        file=sys.stderr,
                        flush=True,
                    )
    except Exception as exc:
        print(f"translate: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        print(f"translate: stopped; {tally}", file=sys.stderr, flush=True)
        await nc.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenant", required=True)
    parser.add_argument("--nats", default=os.environ.get("NATS_URL") or DEFAULT_NATS_URL, help="NATS URL ($NATS_URL)")
    parser.add_argument(
        "--creds",
        metavar="FILE",
        default=os.environ.get("NATS_CREDS") or None,
        help="the tenant's NATS credentials: an nkey seed file or a JWT credentials file ($NATS_CREDS)",
    )
    parser.add_argument(
        "--durable", help="the reader's name (translate): `jetscribe tenant reader <tenant> <name> --in-order` made it"
    )
    parser.add_argument("--out", metavar="FILE", help="translations, one JSON line each (translations-<tenant>.jsonl)")
    parser.add_argument(
        "--work-s", type=float, default=0.0, metavar="S", help="seconds each stand-in translation takes"
    )
    args = parser.parse_args(argv)
    try:
        reader_consumer(args.tenant, args.durable or "translate")
    except ValueError as exc:
        parser.error(str(exc))
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
