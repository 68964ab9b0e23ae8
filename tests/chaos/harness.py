"""Chaos harness: the three services as real child processes against real servers, faults injected
from the test, and the checks and measurements every chaos scenario shares.

Nothing here knows a scenario; tests/chaos/conftest.py turns it into fixtures, and any test (or a
script) can use it directly:

    stack = ChaosStack(tmp_path, nats_server, database_url)
    stack.start_ingest(); stack.start_persister(); stack.start_transcriber("w1")
    stack.wait_ready()
    ...  stream with jetscribe.bot.stream_audio, kill with stack.services["transcriber-w1"].kill() ...
    stack.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import jiwer
import nats
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError, ServiceUnavailableError
from sqlalchemy import select

from jetscribe.client.bot import Audio, StreamResult, stream_audio
from jetscribe.devstack.servers import NatsCluster, NatsServer
from jetscribe.evaluation.speech import Speech, dialog, synthesize
from jetscribe.evaluation.wer import normalize, wer
from jetscribe.services.persister.store import open_engine
from jetscribe.services.persister.tables import SegmentRow, SessionRow
from jetscribe.services.transcriber.partitions import decode_claim_owner, decode_lease
from jetscribe.shared import subjects
from jetscribe.shared.config import nats_servers
from jetscribe.shared.jetstream import (
    EXPECTED_LAST_SUBJECT_SEQUENCE_HEADER,
    EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT_HEADER,
)
from jetscribe.shared.natsauth import env_connect_options
from jetscribe.shared.wire import Segment, SessionEvent, TranscriptMessage, decode

REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny.en"
PARTITIONS = 16

# What the issue asks of the group, and what the tests configure: a dead worker's partitions move after
# about lease TTL + heartbeat (3.5 s here); the bound the issue sets is 10 s.
LEASE_TTL_S = 3
HEARTBEAT_S = 0.5
ACK_WAIT_S = 10
TAKEOVER_BOUND_S = 10.0

# Speech for the scenarios: short, so the suite stays quick on two cores.
DIALOG_TURNS = (
    ("A", "Good morning, did you finish the report for the garden club?"),
    ("B", "Almost, I still need the numbers from the spring plant sale."),
    ("A", "We sold forty trays of tomatoes and twelve boxes of herbs."),
    ("B", "That is more than last year, the new sign by the road helped."),
    ("A", "Let us meet on Thursday afternoon to print the final copy."),
    ("B", "Thursday works for me, I will bring coffee and the stapler."),
)
SHORT_SENTENCES = ("Please send the blue folder to the front desk.", "Thank you very much.")


def dialog_speech() -> Speech:
    """Two voices, six turns, about 22.6 s (cached in $JETSCRIBE_CACHE/speech after the first run)."""
    return dialog(list(DIALOG_TURNS))


def short_speech() -> Speech:
    """One voice, two sentences, about 5.1 s."""
    return synthesize(list(SHORT_SENTENCES))


def audio_of(speech: Speech) -> Audio:
    return Audio(speech.audio, speech.sample_rate)


# --- child processes ------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
try:  # resolved here, in the parent: the child must not load libraries between fork and exec
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None
_SIGKILL = int(signal.SIGKILL)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    # If the test process dies without its teardown (a hard timeout, a kill), the service dies too.
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, _SIGKILL)


READY = {
    "jetscribe.services.ingest": r"ingest gateway serving on",
    "jetscribe.services.persister": r"persisting TRANSCRIPTS to Postgres",
    # The worker says "transcriber w1 ready; partitions: all"; a group member also logs
    # "w1: holds partitions 0-7 (+0-7)". Either one means the model is loaded and it is consuming.
    "jetscribe.services.transcriber": r"transcriber \S+ ready|: holds partitions \d",
}


@dataclass
class Service:
    """One service process; its stdout and stderr go to `log_path` (appended across restarts)."""

    name: str
    module: str
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None
    ready_pattern: str = ""  # what its log says once it serves; by default READY[module]
    frozen: bool = False  # SIGSTOPped by `freeze`
    _log_offset: int = 0  # where the last start's output begins in the log

    def start(self) -> Service:
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.proc.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"===== {self.name} started at {time.strftime('%H:%M:%S')} =====\n".encode())
            log.flush()
            self._log_offset = log.tell()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module],
                env=self.env,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def output(self) -> str:
        """What this start of the process has logged so far."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def wait_for_log(self, pattern: str, timeout: float = 60.0) -> float:
        """Wait until this start's output matches `pattern`; returns the wall time it was seen."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            if regex.search(self.output()):
                return time.time()
            if not self.running:
                code = self.proc.returncode if self.proc else None
                raise RuntimeError(f"{self.name} exited with code {code} before logging /{pattern}/:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not log /{pattern}/ within {timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.05)

    def wait_ready(self, timeout: float = 60.0) -> float:
        return self.wait_for_log(self.ready_pattern or READY[self.module], timeout)

    def kill(self) -> float:
        """SIGKILL (a crash); returns the wall time of the kill."""
        if not self.running:
            raise RuntimeError(f"{self.name} is not running:\n{self.tail()}")
        at = time.time()
        self.proc.kill()
        self.proc.wait()
        return at

    def freeze(self) -> float:
        """SIGSTOP (a process that stops being scheduled: swap, a paused VM); returns the wall time of the signal."""
        if not self.running:
            raise RuntimeError(f"{self.name} is not running:\n{self.tail()}")
        at = time.time()
        self.proc.send_signal(signal.SIGSTOP)
        self.frozen = True
        return at

    def thaw(self) -> float:
        """SIGCONT after `freeze`; returns the wall time of the signal."""
        at = time.time()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        self.frozen = False
        return at

    async def sigterm(self, timeout: float = 30.0) -> tuple[float, int | None, float | None]:
        """SIGTERM without blocking the event loop: (wall time of the signal, exit code or None if it
        still runs after `timeout`, seconds it took to exit)."""
        if not self.running:
            raise RuntimeError(f"{self.name} is not running:\n{self.tail()}")
        at = time.time()
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        code = self.proc.poll()
        return at, code, (time.time() - at if code is not None else None)

    async def ready(self, timeout: float = 60.0) -> float:
        """wait_ready without blocking the event loop (the bot keeps streaming meanwhile)."""
        return await asyncio.to_thread(self.wait_ready, timeout)

    async def logged(self, pattern: str, timeout: float = 60.0) -> float:
        return await asyncio.to_thread(self.wait_for_log, pattern, timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`: nothing may outlive the test."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.frozen:  # a stopped process would keep the SIGTERM pending until the timeout
            self.thaw()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class ChaosStack:
    """Services as child processes against one NATS and one database, all logs in `home`."""

    def __init__(self, home: Path, nats_server: NatsServer | NatsCluster, database_url: str, **env: str):
        self.home = Path(home)
        self.nats = nats_server
        self.database_url = database_url
        self.extra_env = {k: str(v) for k, v in env.items()}
        self.services: dict[str, Service] = {}

    @property
    def nats_url(self) -> str:
        return self.nats.url

    def env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JETSCRIBE_", "PYTEST_"))}
        env.update(
            {
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])),
                "PYTHONUNBUFFERED": "1",
                "NATS_URL": self.nats_url,
                "DATABASE_URL": self.database_url,
                "JETSCRIBE_MODEL": MODEL,
                "JETSCRIBE_CPU_THREADS": "1",  # two cores shared by every process of the test
                "JETSCRIBE_SPEAKERS_AUDIO": "off",  # on where a test is about it (torch costs each start seconds)
                "JETSCRIBE_LEASE_TTL_S": str(LEASE_TTL_S),
                "JETSCRIBE_HEARTBEAT_S": str(HEARTBEAT_S),
                "JETSCRIBE_ACK_WAIT_S": str(ACK_WAIT_S),
                "JETSCRIBE_PERSIST_RETRY_MAX_S": "1",
                "JETSCRIBE_LOG_LEVEL": "INFO",
                "JETSCRIBE_CLOCK_OFFSET_S": os.environ.get("JETSCRIBE_CLOCK_OFFSET_S", str(10 * 24 * 3600)),
            }
        )
        if os.environ.get("JETSCRIBE_CACHE"):
            env["JETSCRIBE_CACHE"] = os.environ["JETSCRIBE_CACHE"]
        env.update(self.extra_env)
        env.update({k: str(v) for k, v in overrides.items()})
        return env

    def add(self, name: str, module: str, ready_pattern: str = "", **env: str) -> Service:
        service = Service(
            name, module, self.env(**env), self.home / "logs" / f"{name}.log", ready_pattern=ready_pattern
        )
        self.services[name] = service
        return service

    def creds(self, role: str) -> dict[str, str]:
        """Each service connects as its own NATS user, as under `jetscribe up`."""
        keyring = self.nats.keyring
        return {"NATS_CREDS": str(keyring.path(role))} if keyring is not None else {}

    def start_ingest(self, **env) -> Service:
        return self.add("ingest", "jetscribe.services.ingest", **{**self.creds("ingest"), **env}).start()

    def start_persister(self, **env) -> Service:
        return self.add("persister", "jetscribe.services.persister", **{**self.creds("persister"), **env}).start()

    def start_transcriber(self, worker_id: str, **env) -> Service:
        # $JETSCRIBE_CHAOS_TRANSCRIBER runs another module in its place (a variant under test).
        module = os.environ.get("JETSCRIBE_CHAOS_TRANSCRIBER") or "jetscribe.services.transcriber"
        return self.add(
            f"transcriber-{worker_id}",
            module,
            READY["jetscribe.services.transcriber"],
            JETSCRIBE_WORKER_ID=worker_id,
            **{**self.creds("transcriber"), **env},
        ).start()

    def transcriber(self, worker_id: str) -> Service:
        return self.services[f"transcriber-{worker_id}"]

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        for service in self.services.values():
            if service.running:
                service.wait_ready(max(1.0, deadline - time.monotonic()))

    def check_alive(self, *names: str) -> None:
        """Raise, with its log, if one of these services (all by default) has died."""
        for name in names or self.services:
            service = self.services[name]
            if not service.running:
                code = service.proc.returncode if service.proc else None
                raise AssertionError(f"{name} died (code {code}):\n{service.tail()}")

    def stop(self) -> None:
        for service in self.services.values():
            with contextlib.suppress(Exception):
                if service.running:
                    if service.frozen:
                        service.thaw()
                    service.proc.send_signal(signal.SIGTERM)
        for service in self.services.values():
            service.stop(timeout=10.0)

    def logs(self, lines: int = 40) -> str:
        return "\n".join(f"----- {name} ({s.log_path}) -----\n{s.tail(lines)}" for name, s in self.services.items())


async def connect(url: str):
    """A test client that rides out a NATS restart, as the services do; `url` may list a cluster's nodes."""
    return await nats.connect(
        nats_servers(url),
        **env_connect_options(url),
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
        connect_timeout=2,
        allow_reconnect=True,
    )


# --- the consumer group, seen from outside ------------------------------------------------------


async def lease_holders(js) -> dict[int, str]:
    """partition -> member id currently holding its lease (KV partition_leases), as far as it exists."""
    try:
        kv = await js.key_value(subjects.PARTITION_LEASES_BUCKET)
    except Exception:  # no bucket (yet)
        return {}
    holders = {}
    for partition in range(PARTITIONS):
        try:
            entry = await kv.get(subjects.partition_lease_key(partition))
        except Exception:
            continue
        if entry.value:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                # The owner is "<member id>#<random>": the process that holds it.
                holders[partition] = decode_lease(entry.value, entry.revision).owner.split("#", 1)[0]
    return holders


async def wait_group_settled(js, workers: list[str], timeout: float = 20.0, stable_s: float = 1.0) -> dict[int, str]:
    """Wait until every partition is leased, every worker holds some, and nothing moved for `stable_s`."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while True:
        holders = await lease_holders(js)
        if holders != last:
            last, since = holders, time.monotonic()
        settled = len(holders) == PARTITIONS and set(holders.values()) == set(workers)
        if settled and time.monotonic() - since >= stable_s:
            return holders
        if time.monotonic() > deadline:
            try:
                await js.key_value(subjects.PARTITION_LEASES_BUCKET)
                why = f"leases: {holders}"
            except Exception:
                why = (
                    f"there is no KV bucket {subjects.PARTITION_LEASES_BUCKET}: the transcribers do not run "
                    f"the consumer group (services/transcriber/group.py)"
                )
            raise TimeoutError(f"consumer group not settled on {workers} within {timeout:.0f} s; {why}")
        await asyncio.sleep(0.1)


# --- what was published and what was stored -----------------------------------------------------

# What a JetStream API request may meet for a few seconds after a cluster's node died or came back (no leader yet,
# the request routed to a node still catching up): the test asks again rather than fail on the cluster's behalf.
# A fetch on a consumer just made there can find no responder until its interest has crossed the routes.
_TRANSIENT = (ServiceUnavailableError, nats.errors.NoRespondersError, nats.errors.TimeoutError, TimeoutError)
_UNAVAILABLE = (ServiceUnavailableError, nats.errors.NoRespondersError)  # for a fetch, a timeout means "no more"


async def settled(request, within_s: float = 20.0, transient=_TRANSIENT):
    """`await request()`, asked again on a transient JetStream error for up to `within_s`."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await request()
        except transient:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def pull_subscribe(js, subject: str, **kwargs):
    """An ephemeral pull consumer, made even while the cluster settles after a fault."""
    return await settled(lambda: js.pull_subscribe(subject, **kwargs))


@dataclass(frozen=True)
class Published:
    """One message as the TRANSCRIPTS stream holds it."""

    seq: int  # stream sequence
    stored_at: float  # when the stream stored it (wall time)
    message: TranscriptMessage
    headers: dict[str, str] = field(default_factory=dict, compare=False)  # as published: the claim it was made under


async def published(js, tenant: str, session_id: str = "*") -> list[Published]:
    """Everything the TRANSCRIPTS stream holds for one session (all of the tenant's with "*"), in
    stream order."""
    filters = [subjects.transcript(tenant, session_id), subjects.session_events_of(tenant, session_id)]
    out = []
    for subject in filters:
        sub = await pull_subscribe(
            js,
            subject,
            stream=subjects.TRANSCRIPTS_STREAM,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=30.0),
        )
        try:
            while True:
                try:
                    msgs = await settled(lambda sub=sub: sub.fetch(500, timeout=1.0), 5.0, _UNAVAILABLE)
                except (TimeoutError, nats.errors.TimeoutError):
                    break
                for msg in msgs:
                    out.append(
                        Published(
                            msg.metadata.sequence.stream,
                            msg.metadata.timestamp.timestamp(),
                            decode(msg.data, TranscriptMessage),
                            dict(msg.headers or {}),
                        )
                    )
                    await msg.ack()
                info = await sub.consumer_info()
                if info.num_pending == 0:
                    break
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
    out.sort(key=lambda item: item.seq)
    return out


async def first_stored_since(js, stream_name: str, subject: str, since: float) -> float | None:
    """When `stream_name` stored its first message on `subject` at or after wall time `since`."""
    start = datetime.fromtimestamp(since, UTC).isoformat().replace("+00:00", "Z")
    sub = await pull_subscribe(
        js,
        subject,
        stream=stream_name,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=start, inactive_threshold=30.0
        ),
    )
    try:
        msgs = await settled(lambda: sub.fetch(1, timeout=2.0), 5.0, _UNAVAILABLE)
        return msgs[0].metadata.timestamp.timestamp() if msgs else None
    except (TimeoutError, nats.errors.TimeoutError):
        return None
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


@dataclass
class Stored:
    session: SessionRow | None
    rows: list[SegmentRow]  # every segment row of the session, by segment id

    @property
    def finals(self) -> list[SegmentRow]:
        return [r for r in self.rows if r.status == "final"]

    @property
    def text(self) -> str:
        return transcript_text(self.finals)


def transcript_text(finals) -> str:
    """The transcript as the store gives it: finals in spoken order (start, then id), empty ones left out."""
    ordered = sorted(finals, key=lambda s: (s.start_s if hasattr(s, "start_s") else s.start, s.segment_id))
    return " ".join(s.text for s in ordered if s.text)


async def stored(database_url: str, tenant: str, session_id: str) -> Stored:
    engine = open_engine(database_url)
    try:
        async with engine.connect() as conn:
            session = (
                await conn.execute(
                    select(SessionRow).where(SessionRow.tenant == tenant, SessionRow.session_id == session_id)
                )
            ).first()
            rows = list(
                (
                    await conn.execute(
                        select(SegmentRow)
                        .where(SegmentRow.tenant == tenant, SegmentRow.session_id == session_id)
                        .order_by(SegmentRow.segment_id)
                    )
                ).all()
            )
        return Stored(session, rows)
    finally:
        await engine.dispose()


async def wait_stored_ended(database_url: str, tenant: str, session_id: str, timeout: float = 60.0) -> Stored:
    deadline = time.monotonic() + timeout
    while True:
        found = await stored(database_url, tenant, session_id)
        if found.session is not None and found.session.status == "ended":
            return found
        if time.monotonic() > deadline:
            status = found.session.status if found.session else "no row"
            raise TimeoutError(
                f"{tenant}/{session_id} not ended in Postgres within {timeout:.0f} s ({status}, "
                f"{len(found.rows)} segment rows)"
            )
        await asyncio.sleep(0.2)


async def wait_persister_drained(js, timeout: float = 30.0) -> float:
    """Wait until the persister's consumer has nothing pending or unacked; returns the seconds it took."""
    started = time.monotonic()
    while True:
        info = await settled(lambda: js.consumer_info(subjects.TRANSCRIPTS_STREAM, subjects.PERSISTER_CONSUMER))
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise TimeoutError(
                f"persister consumer not drained after {timeout:.0f} s: {info.num_pending} pending, "
                f"{info.num_ack_pending} unacked, {info.num_redelivered} redelivered"
            )
        await asyncio.sleep(0.2)


async def wait_audio_acked(js, timeout: float = 30.0) -> None:
    """Every AUDIO partition consumer that exists has delivered and had acked everything."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for p in range(PARTITIONS):
            try:
                info = await settled(
                    lambda p=p: js.consumer_info(subjects.AUDIO_STREAM, subjects.transcriber_consumer(p))
                )
            except NotFoundError:
                continue
            if info.num_pending or info.num_ack_pending:
                left.append((p, info.num_pending, info.num_ack_pending))
        if not left:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"audio left unacked (partition, pending, unacked): {left}")
        await asyncio.sleep(0.2)


# --- the fence on the owners' writes (services/transcriber/group.py, 5.) --------------------------


@dataclass(frozen=True)
class ClaimMade:
    """One claim on a partition as TRANSCRIPTS holds it."""

    seq: int
    subject: str
    owner: str  # "<worker id>#<incarnation>"
    stored_at: float


async def claims_made(js) -> dict[str, list[ClaimMade]]:
    """Claim subject -> every claim on it TRANSCRIPTS holds, in stream order."""
    sub = await pull_subscribe(
        js,
        subjects.TRANSCRIBER_CLAIMS_ALL,
        stream=subjects.TRANSCRIPTS_STREAM,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=30.0),
    )
    claims: dict[str, list[ClaimMade]] = defaultdict(list)
    try:
        while True:
            try:
                msgs = await settled(lambda: sub.fetch(500, timeout=1.0), 5.0, _UNAVAILABLE)
            except (TimeoutError, nats.errors.TimeoutError):
                break
            for msg in msgs:
                meta = msg.metadata
                claims[msg.subject].append(
                    ClaimMade(
                        meta.sequence.stream, msg.subject, decode_claim_owner(msg.data), meta.timestamp.timestamp()
                    )
                )
                await msg.ack()
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return {subject: sorted(made, key=lambda c: c.seq) for subject, made in claims.items()}


def claim_of(item: Published) -> tuple[str, int] | None:
    """(claim subject, claim seq) a message was published under, from its headers; None if it names none."""
    subject = item.headers.get(EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT_HEADER)
    seq = item.headers.get(EXPECTED_LAST_SUBJECT_SEQUENCE_HEADER)
    return (subject, int(seq)) if subject and seq else None


def superseded(claim: tuple[str, int], claims: dict[str, list[ClaimMade]], before_seq=None, before_time=None) -> bool:
    """Whether another claim on the same partition came after `claim` and before stream seq `before_seq` (a stored
    message) or wall time `before_time` (a publish heard)."""
    subject, seq = claim
    return any(
        c.seq > seq
        and (before_seq is None or c.seq < before_seq)
        and (before_time is None or c.stored_at < before_time)
        for c in claims.get(subject, [])
    )


def stale_writes(messages: list[Published], claims: dict[str, list[ClaimMade]]) -> list[str]:
    """Stored segments and events that name no claim, or whose claim another had superseded before the stream
    stored them: written by a fenced owner. The stream's condition makes the second impossible (group.py, 5.)."""
    problems = []
    for item in messages:
        claim = claim_of(item)
        what = f"{type(item.message).__name__} seq {item.seq} by {item.message.worker_id}"
        if claim is None:
            problems.append(f"{what} was published under no claim")
        elif superseded(claim, claims, before_seq=item.seq):
            problems.append(f"{what} was stored under claim {claim[1]} on {claim[0]}, superseded before it")
    return problems


def stale_attempts(heard: list[Published], stored: list[Published], claims: dict[str, list[ClaimMade]]) -> list:
    """Publishes heard (a Tap) under a claim already superseded when they went out, that the stream did not store:
    what a fenced owner tried to write and the stream refused. A worker's look at its lease before each write
    usually keeps it from trying at all."""
    kept = {(item.headers.get("Nats-Msg-Id"), claim_of(item)) for item in stored}
    return [
        item
        for item in heard
        if (claim := claim_of(item))
        and superseded(claim, claims, before_time=item.stored_at)
        and (item.headers.get("Nats-Msg-Id"), claim) not in kept
    ]


# --- checks and measures -------------------------------------------------------------------------


@dataclass
class Findings:
    """What a scenario's checks found; empty lists mean the property holds."""

    problems: list[str] = field(default_factory=list)

    def add(self, problem: str) -> None:
        self.problems.append(problem)

    def __bool__(self) -> bool:
        return bool(self.problems)


def final_segments_published(messages) -> dict[int, list[Segment]]:
    """segment id -> every final message published with that id, in stream order."""
    finals: dict[int, list[Segment]] = defaultdict(list)
    for item in messages:
        message = item.message
        if isinstance(message, Segment) and message.status == "final":
            finals[message.segment_id].append(message)
    return dict(finals)


def duplicated_finals(finals_by_id: dict[int, list[Segment]]) -> list[int]:
    """Ids whose final was published more than once with different words: two versions of one segment."""
    return sorted(i for i, versions in finals_by_id.items() if len({normalize(v.text) for v in versions}) > 1)


def seq_overlaps(finals) -> list[tuple[int, int]]:
    """Pairs of finals (by id) whose audio seq ranges overlap by more than a shared boundary chunk.

    Two consecutive utterances may share one 100 ms chunk (one ends and the next starts inside it),
    so [a, b] followed by [b, c] is fine; [a, b] followed by [c, d] with c < b means some audio was
    transcribed twice (or out of order)."""
    ordered = sorted(finals, key=lambda s: s.segment_id)
    out = []
    for i, a in enumerate(ordered):
        for b in ordered[i + 1 :]:
            if min(a.seq_last, b.seq_last) > max(a.seq_first, b.seq_first) or b.seq_first < a.seq_first:
                out.append((a.segment_id, b.segment_id))
    return sorted(set(out))


def check_transcript(found: Stored, messages, findings: Findings) -> None:
    """The stored transcript is whole and single: the session ended, its final ids are 0..n-1 with no
    interim left over, every final published is stored once as published (its last version), its
    count is right, and no audio seq is covered twice."""
    if found.session is None or found.session.status != "ended":
        findings.add(f"session not ended in Postgres: {found.session.status if found.session else 'no row'}")
    ids = [r.segment_id for r in found.rows]
    if len(ids) != len(set(ids)):
        findings.add(f"segment ids stored twice: {ids}")
    interims = [r.segment_id for r in found.rows if r.status != "final"]
    if interims:
        findings.add(f"segments left as interims (their final never stored): {interims}")
    final_ids = sorted(r.segment_id for r in found.finals)
    if final_ids != list(range(len(final_ids))):
        missing = sorted(set(range(max(final_ids, default=-1) + 1)) - set(final_ids))
        findings.add(f"final segment ids are not 0..n-1: missing {missing} (have {final_ids})")
    published_finals = final_segments_published(messages)
    stored_by_id = {r.segment_id: r for r in found.finals}
    not_stored = sorted(set(published_finals) - set(stored_by_id))
    if not_stored:
        findings.add(f"finals published but not in Postgres: {not_stored}")
    not_published = sorted(set(stored_by_id) - set(published_finals))
    if not_published:
        findings.add(f"finals in Postgres that TRANSCRIPTS does not hold: {not_published}")
    for i, versions in published_finals.items():
        row = stored_by_id.get(i)
        best = max(versions, key=lambda v: v.revision)
        if row is not None and (row.text, row.revision) != (best.text, best.revision):
            findings.add(
                f"segment {i} stored as r{row.revision} {row.text!r}, last published r{best.revision} {best.text!r}"
            )
    dup = duplicated_finals(published_finals)
    if dup:
        findings.add(f"finals published twice with different text: {dup}")
    overlaps = seq_overlaps(found.finals)
    if overlaps:
        findings.add(
            f"finals covering the same audio seqs: {overlaps} "
            f"({[(r.segment_id, r.seq_first, r.seq_last, r.worker_id) for r in found.finals]})"
        )
    ended = [p.message for p in messages if isinstance(p.message, SessionEvent) and p.message.event == "ended"]
    if not ended:
        findings.add("no `ended` event in TRANSCRIPTS")
    elif ended[-1].segments != len(found.finals):
        findings.add(f"the `ended` event counts {ended[-1].segments} segments, Postgres has {len(found.finals)} finals")
    if found.session is not None and found.session.segment_count != len(found.finals):
        findings.add(f"sessions.segment_count {found.session.segment_count} != {len(found.finals)} finals stored")


@dataclass
class WordDiff:
    wer: float
    deleted: int  # words of the reference missing from the hypothesis: words lost
    inserted: int
    substituted: int
    reference_words: int


def word_diff(reference: str, hypothesis: str) -> WordDiff:
    ref, hyp = normalize(reference), normalize(hypothesis)
    if not ref:
        return WordDiff(wer(reference, hypothesis), 0, len(hyp.split()), 0, 0)
    out = jiwer.process_words(ref, hyp)
    return WordDiff(out.wer, out.deletions, out.insertions, out.substitutions, len(ref.split()))


def first_after(
    messages: list[Published], at: float, *, worker: str | None = None, not_worker: str | None = None
) -> Published | None:
    """The first segment (interim or final) the stream stored after wall time `at`, by `worker` (or
    by anyone but `not_worker`) if given."""
    found = [
        p
        for p in messages
        if isinstance(p.message, Segment)
        and p.stored_at > at
        and (worker is None or p.message.worker_id == worker)
        and (not_worker is None or p.message.worker_id != not_worker)
    ]
    return min(found, key=lambda p: p.stored_at, default=None)


def first_write_after(found: Stored, at: float) -> float | None:
    """Wall time of the first segment row Postgres wrote after `at` (its updated_at)."""
    times = [r.updated_at.timestamp() for r in found.rows if r.updated_at.timestamp() > at]
    return min(times, default=None)


def workers_of(messages) -> list[str]:
    """Worker ids in the order they first published for the session."""
    seen = []
    for m in (p.message for p in messages):
        if isinstance(m, (Segment, SessionEvent)) and m.worker_id and m.worker_id not in seen:
            seen.append(m.worker_id)
    return seen


def concurrent_workers(messages) -> list[str]:
    """Signs that two workers processed one session at once, from its segment metadata: for every
    pair of workers, their spans of publishing [first, last published_at] overlap, or their
    segments' audio seq ranges overlap (beyond one shared boundary chunk)."""
    spans: dict[str, list[float]] = {}
    ranges: dict[str, set[tuple[int, int, int]]] = defaultdict(set)  # the stream's copy and the tap's are one
    for m in (p.message for p in messages):
        if not isinstance(m, Segment) or not m.worker_id:
            continue
        span = spans.setdefault(m.worker_id, [m.published_at, m.published_at])
        span[0], span[1] = min(span[0], m.published_at), max(span[1], m.published_at)
        if m.status == "final":
            ranges[m.worker_id].add((m.seq_first, m.seq_last, m.segment_id))
    problems = []
    workers = sorted(spans)
    for i, a in enumerate(workers):
        for b in workers[i + 1 :]:
            (a0, a1), (b0, b1) = spans[a], spans[b]
            if max(a0, b0) < min(a1, b1):
                problems.append(f"{a} published during [{a0:.3f}, {a1:.3f}] and {b} during [{b0:.3f}, {b1:.3f}]")
            for fa, la, ia in sorted(ranges[a]):
                for fb, lb, ib in sorted(ranges[b]):
                    if min(la, lb) > max(fa, fb):
                        problems.append(
                            f"{a} segment {ia} seqs [{fa}, {la}] overlaps {b} segment {ib} seqs [{fb}, {lb}]"
                        )
    return problems


# --- the report ----------------------------------------------------------------------------------


@dataclass
class ChaosSummary:
    """One scenario's numbers: the line the issue's closing note is built from."""

    scenario: str
    passed: bool = False
    takeover_s: float | None = None  # fault -> the faulted hop delivers again (see `takeover`)
    takeover: str = ""  # what takeover_s measures in this scenario
    outage_s: float | None = None  # how long the test held the component down
    words_lost: int | None = None  # reference words missing vs the no-fault run (jiwer deletions)
    words_inserted: int | None = None
    words_substituted: int | None = None
    segments_duplicated: int | None = None  # ids published twice with different text + seq overlaps
    finals_republished: int | None = None  # ids whose final was published more than once (same text)
    stale_stored: int | None = None  # segments/events stored under a superseded claim (a fenced owner's): must be 0
    stale_refused: int | None = None  # publishes heard under a superseded claim, refused by the stream
    wer_vs_baseline: float | None = None
    wer_vs_reference: float | None = None
    segments: int | None = None
    sessions: int | None = None
    workers: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    wall_s: float | None = None

    def emit(self) -> str:
        line = json.dumps(
            {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}, sort_keys=False
        )
        print(f"CHAOS {line}", flush=True)
        path = os.environ.get("JETSCRIBE_CHAOS_REPORT")
        if path:
            with open(path, "a", encoding="utf-8") as out:
                out.write(line + "\n")
        return line


async def stream(nc, speech: Speech, tenant: str, session_id: str, speed: float, **kwargs) -> StreamResult:
    return await stream_audio(
        nc,
        audio_of(speech),
        tenant=tenant,
        session_id=session_id,
        speed=speed,
        wait_s=kwargs.pop("wait_s", 90.0),
        **kwargs,
    )


class Live:
    """What the bot hears while it streams, for timing faults: call `start()` just before streaming and
    pass `on_segment` to stream_audio."""

    def __init__(self, speed: float, duration_s: float):
        self.speed = speed
        self.duration_s = duration_s
        self.t0 = 0.0
        self.heard: list[tuple[float, Segment]] = []

    def start(self) -> Live:
        self.t0 = time.time()
        return self

    def on_segment(self, segment: Segment) -> None:
        self.heard.append((time.time(), segment))

    @property
    def audio_s(self) -> float:
        """Seconds of audio sent so far (by the pace the bot keeps)."""
        return (time.time() - self.t0) * self.speed if self.speed > 0 else self.duration_s

    async def until(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{what}: not seen within {timeout:.0f} s (heard {len(self.heard)} segments, "
                    f"{self.audio_s:.1f} s of audio sent)"
                )
            await asyncio.sleep(0.01)

    async def inside_turn(self, turn, fraction: float = 0.5, timeout: float = 60.0) -> tuple[Segment, bool]:
        """Wait until the bot has sent `fraction` of the script's `turn` (a speech.Turn) and the session
        has published something; returns (the latest segment heard: its worker owns the session, whether
        an interim of a not yet final utterance was heard in the last 1.5 s). Timed by the script, not
        by interims (a loaded worker publishes few, and late): the worker runs its VAD as audio arrives,
        so it has that turn's utterance open whether or not it has decoded anything of it yet."""
        at = turn.start_s + fraction * (turn.end_s - turn.start_s)
        await self.until(lambda: self.audio_s >= at and self.heard, timeout, f"{at:.1f} s of audio sent")
        return self.heard[-1][1], self.mid_utterance(0.0) is not None

    def mid_utterance(self, after_fraction: float, fresh_s: float = 1.5) -> Segment | None:
        """The latest interim, if it is recent, its utterance has no final yet and the bot is past
        `after_fraction` of the audio: a fault now lands inside an utterance."""
        if self.audio_s < after_fraction * self.duration_s or not self.heard:
            return None
        at, segment = self.heard[-1]
        finals = {s.segment_id for _, s in self.heard if s.status == "final"}
        if segment.status == "interim" and time.time() - at <= fresh_s and segment.segment_id not in finals:
            return segment
        return None

    def just_finalised(self, after_fraction: float, fresh_s: float = 0.05) -> Segment | None:
        """A final heard in the last `fresh_s`, once past `after_fraction` of the audio: the persister
        has just been handed it, so a fault now likely lands mid-batch."""
        if self.audio_s < after_fraction * self.duration_s or not self.heard:
            return None
        at, segment = self.heard[-1]
        return segment if segment.status == "final" and time.time() - at <= fresh_s else None


async def settle_and_check(
    stack: ChaosStack,
    js,
    tenant: str,
    session_id: str,
    speech: Speech,
    baseline_text: str,
    summary: ChaosSummary,
    findings: Findings,
    *,
    drain_timeout: float = 20.0,
    heard: list[Published] = (),
):
    """After a session: wait for Postgres to have it ended and the persister to be drained, read what
    TRANSCRIPTS holds, check the stored transcript and fill the summary's word and duplicate numbers.
    `heard` (a Tap's messages) adds publishes the stream dropped as repeats to the duplicate count.
    Returns (stored, messages)."""
    at_end = await wait_stored_ended(stack.database_url, tenant, session_id, timeout=60.0)
    ended_seen = time.time()
    try:
        summary.extra["persister_drain_s"] = round(await wait_persister_drained(js, drain_timeout), 3)
    except TimeoutError as exc:
        findings.add(str(exc))
    messages = await published(js, tenant, session_id)
    found = await stored(stack.database_url, tenant, session_id)
    # The store promises a session's finals are in once its `ended` is: were they?
    missing_at_end = sorted({r.segment_id for r in found.finals} - {r.segment_id for r in at_end.finals})
    summary.extra["finals_missing_when_ended_stored"] = missing_at_end
    if missing_at_end:
        later = [r.updated_at.timestamp() for r in found.finals if r.segment_id in missing_at_end]
        summary.extra["ended_before_its_finals_s"] = round(max(later) - ended_seen, 3)
        findings.add(
            f"the session stood ended in Postgres for {max(later) - ended_seen:.1f} s without its "
            f"finals {missing_at_end}"
        )
    check_transcript(found, messages, findings)
    finals_by_id = final_segments_published(messages + list(heard))
    conflicting = sorted(
        set(duplicated_finals(finals_by_id)) - set(duplicated_finals(final_segments_published(messages)))
    )
    if conflicting:
        findings.add(
            f"finals published twice with different text, one dropped by the stream as a repeat: "
            f"{[(i, [v.text for v in finals_by_id[i]]) for i in conflicting]}"
        )
    vs_base = word_diff(baseline_text, found.text)
    vs_ref = word_diff(speech.text, found.text)
    summary.words_lost = vs_base.deleted
    summary.words_inserted = vs_base.inserted
    summary.words_substituted = vs_base.substituted
    summary.wer_vs_baseline = vs_base.wer
    summary.wer_vs_reference = vs_ref.wer
    summary.segments = len(found.finals)
    summary.sessions = 1
    summary.segments_duplicated = len(duplicated_finals(finals_by_id)) + len(seq_overlaps(found.finals))
    summary.finals_republished = sum(1 for versions in final_segments_published(messages).values() if len(versions) > 1)
    summary.workers = workers_of(messages)
    summary.extra["text"] = found.text
    claims = await claims_made(js)
    stale = stale_writes(messages, claims)
    findings.problems += stale
    summary.stale_stored = len(stale)
    summary.stale_refused = len(stale_attempts(list(heard), messages, claims))
    return found, messages


async def check_audio_acked(js, findings: Findings, timeout: float = 30.0) -> None:
    """wait_audio_acked, as a finding rather than an exception, so the other checks still run."""
    try:
        await wait_audio_acked(js, timeout)
    except TimeoutError as exc:
        findings.add(str(exc))


class Tap:
    """Every segment and session event of a tenant as published, heard on plain NATS subjects.

    Unlike a read of the TRANSCRIPTS stream, this also sees publishes the stream dropped as repeats
    (same Nats-Msg-Id: same segment id and revision), e.g. a second worker transcribing a session it
    does not own. It misses what was published while the test's connection was down."""

    def __init__(self, nc, tenant: str, on_heard=None):
        self.nc = nc
        self.tenant = tenant
        self.on_heard = on_heard  # called with each Published as it is heard (e.g. to time a fault)
        self.heard: list[Published] = []
        self._subs = []

    async def start(self) -> Tap:
        async def on_msg(msg):
            try:
                item = Published(-1, time.time(), decode(msg.data, TranscriptMessage), dict(msg.headers or {}))
            except Exception:
                return
            self.heard.append(item)
            if self.on_heard is not None:
                self.on_heard(item)

        for subject in (subjects.transcript(self.tenant, "*"), subjects.session_events_of(self.tenant, "*")):
            self._subs.append(await self.nc.subscribe(subject, cb=on_msg))
        await self.nc.flush()
        return self

    def of(self, session_id: str) -> list[Published]:
        return [p for p in self.heard if p.message.session_id == session_id]

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()


@dataclass(frozen=True)
class KVWrite:
    """One write the checkpoints' bucket stored."""

    seq: int
    key: str
    stored_at: float
    headers: dict[str, str]


class CheckpointTap:
    """Every write the `session_checkpoints` bucket stores from now on, checkpoints and claims, with its headers
    (the bucket keeps only each key's last). A checkpoint stored under a claim that a later one superseded is a
    fenced owner's: `stale_checkpoints`."""

    def __init__(self, js):
        self.js = js
        self.stored: list[KVWrite] = []
        self._sub = None

    async def start(self) -> CheckpointTap:
        bucket = subjects.SESSION_CHECKPOINTS_BUCKET

        async def on_msg(msg):
            meta = msg.metadata
            key = msg.subject.removeprefix(f"$KV.{bucket}.")
            self.stored.append(KVWrite(meta.sequence.stream, key, meta.timestamp.timestamp(), dict(msg.headers or {})))

        self._sub = await self.js.subscribe(
            f"$KV.{bucket}.>",
            stream=f"KV_{bucket}",
            cb=on_msg,
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW),
        )
        return self

    def claims(self) -> dict[str, list[ClaimMade]]:
        """The claims stored in the bucket since the tap started, by claim subject."""
        bucket = subjects.SESSION_CHECKPOINTS_BUCKET
        out: dict[str, list[ClaimMade]] = defaultdict(list)
        for write in self.stored:
            if write.key.startswith("claim="):
                subject = f"$KV.{bucket}.{write.key}"
                out[subject].append(ClaimMade(write.seq, subject, "", write.stored_at))
        return out

    def stale_checkpoints(self, key: str) -> list[str]:
        """Writes of checkpoint `key` that name no claim, or whose claim was superseded before they were stored."""
        claims, problems = self.claims(), []
        for write in (w for w in self.stored if w.key == key):
            claim = claim_of(Published(write.seq, write.stored_at, None, write.headers))
            if claim is None:
                problems.append(f"checkpoint {key} (seq {write.seq}) was written under no claim")
            elif superseded(claim, claims, before_seq=write.seq):
                problems.append(f"checkpoint {key} (seq {write.seq}) was stored under claim {claim}, superseded before")
        return problems

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
