"""Hostile input at every entry point of the running services, while a good session streams through them.

Per entry point, `--fuzz-count` (default 1,000; `JETSCRIBE_FUZZ_COUNT`) generated messages that the service must
refuse (tests/fuzz/cases.py). Afterwards: every one was refused with a code that fits it, each refusal is on
`errors.<service>.<tenant>` exactly once (an invalid tenant under `_`) and in the service's refusal metric, every
service still answers ready, nothing is left unsettled in its consumer, and the good session came out complete.
"""

from __future__ import annotations

import asyncio
import gc
import math
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable

import numpy as np
import pytest

from jetscribe.client.bot import Audio, StreamResult, stream_audio
from jetscribe.evaluation.speech import sample_speech
from jetscribe.services.persister.store import final_segments, list_sessions, wait_until_ended
from jetscribe.shared import subjects
from jetscribe.shared.wire import AudioChunk, ErrorEvent, Reply, SessionControl, decode, encode
from tests.fuzz.cases import (
    TENANT,
    Case,
    GatewaySessions,
    draw_cases,
    gateway_audio,
    gateway_session,
    stored_audio,
    transcripts,
)
from tests.fuzz.conftest import MAX_CHUNK_BYTES, FuzzStack
from tests.integration.running import wait_all_ready
from tests.integration.test_ingest import stored_audio as stored_audio_of
from tests.scrape import readiness, scrape, total

pytestmark = pytest.mark.fuzz

GOOD_TENANT = "good"
GOOD_SPEED = 5.0  # the 25 s sample in about 5 s: it streams while the barrage runs
IN_FLIGHT = 16


@pytest.fixture(scope="module")
def speech():
    sample = sample_speech()
    return Audio(sample.audio, sample.sample_rate)


RUN = uuid.uuid4().hex[:6]
GATEWAY_SESSIONS = {
    entry: GatewaySessions(
        victims=tuple(f"v{entry[0]}{RUN}{i}" for i in range(4)),
        ended=f"e{entry[0]}{RUN}",
        max_chunk_bytes=MAX_CHUNK_BYTES,
    )
    for entry in ("audio", "session")
}


@pytest.fixture(scope="module")
def fuzz_cases(fuzz_count) -> dict[str, list[Case]]:
    """Every entry point's cases, generated before the services start: generating takes seconds, and on their event
    loop it would stall their lease renewals (a test artefact, not a finding)."""
    return {
        "audio": draw_cases(gateway_audio(GATEWAY_SESSIONS["audio"]), fuzz_count, seed=14),
        "session": draw_cases(gateway_session(GATEWAY_SESSIONS["session"]), fuzz_count, seed=15),
        "stored_audio": draw_cases(stored_audio(), fuzz_count, seed=16),
        "transcripts": draw_cases(transcripts(), fuzz_count, seed=17),
    }


class ErrorTally:
    """Every ErrorEvent on `errors.<service>.>`, by the tenant token of its subject."""

    def __init__(self, nc, service: str):
        self.nc, self.service = nc, service
        self.events: list[tuple[str, ErrorEvent]] = []

    async def __aenter__(self) -> ErrorTally:
        async def take(msg):
            self.events.append((msg.subject.split(".")[2], decode(msg.data, ErrorEvent)))

        self.sub = await self.nc.subscribe(f"errors.{self.service}.>", cb=take)
        await self.nc.flush()
        return self

    async def __aexit__(self, *_) -> None:
        await self.sub.unsubscribe()

    def buckets(self) -> Counter:
        return Counter(bucket for bucket, _ in self.events)

    async def reach(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.events) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


async def in_flight(cases: list[Case], send: Callable[[Case], Awaitable[object]]) -> list[object]:
    """`send` every case, IN_FLIGHT at a time; their results in order."""
    slots = asyncio.Semaphore(IN_FLIGHT)

    async def one(case: Case):
        async with slots:
            return await send(case)

    return await asyncio.gather(*(one(case) for case in cases))


async def stream_good(stack: FuzzStack, speech: Audio) -> tuple[str, StreamResult]:
    session = f"g{uuid.uuid4().hex[:10]}"
    result = await stream_audio(stack.nc, speech, tenant=GOOD_TENANT, session_id=session, speed=GOOD_SPEED)
    return session, result


async def assert_complete(stack: FuzzStack, speech: Audio, session: str, result: StreamResult) -> None:
    """Every chunk accepted once and stored in order, the session ended, and every final heard stored."""
    chunks = math.ceil(len(speech.samples) / result.frames_per_chunk)
    assert sorted(result.sent_by_seq) == list(range(chunks))
    stored = [
        m.seq for _, m in await stored_audio_of(stack.nc.jetstream(), GOOD_TENANT, session) if isinstance(m, AudioChunk)
    ]
    assert stored == list(range(len(stored))) and len(stored) >= chunks  # (+ the resampler's tail)
    assert result.ended is not None and result.finals
    row = await wait_until_ended(stack.engine, GOOD_TENANT, session, timeout_s=30.0)
    assert row.status == "ended" and row.reason is None
    rows = await final_segments(stack.engine, GOOD_TENANT, session)
    assert [r.segment_id for r in rows] == sorted(result.finals)


async def assert_alive(stack: FuzzStack) -> None:
    """No service stopped, all three answer ready on NATS ($SRV) and on their /readyz."""
    await wait_all_ready(stack.nc, stack.tasks, workers=1, deadline_s=30.0)
    for service in stack.tels:
        status, report = await readiness(stack.port(service))
        assert status == 200, (service, report)


async def wait_settled(stack: FuzzStack, stream: str, consumers: list[str], timeout_s: float = 60.0) -> None:
    """Until these consumers have nothing pending or unacked: every message was taken and settled (a stall or
    a message redelivered forever shows here)."""
    js = stack.nc.jetstream()
    deadline = time.monotonic() + timeout_s
    while True:
        infos = [await js.consumer_info(stream, name) for name in consumers]
        left = {i.name: (i.num_pending, i.num_ack_pending) for i in infos if i.num_pending or i.num_ack_pending}
        if not left:
            return
        assert time.monotonic() < deadline, f"unsettled after {timeout_s} s: {left}"
        await asyncio.sleep(0.1)


def refusal_total(samples, name: str, bucket: str | None = None) -> float:
    return total(samples, name, **({"jetscribe_tenant": bucket} if bucket else {}))


def assert_tally(tally: ErrorTally, cases: list[Case], extra: Counter | None = None) -> None:
    expected = Counter(case.bucket for case in cases) + (extra or Counter())
    assert GOOD_TENANT not in tally.buckets(), [e for b, e in tally.events if b == GOOD_TENANT][:5]
    assert tally.buckets() == expected, f"reported {sum(tally.buckets().values())}, expected {len(cases)}"


def misfits(events: list[ErrorEvent], cases: list[Case], case_subject: Callable[[str], str]) -> list:
    """Reports whose code fits no case sent on their subject (named at the start of the report's message)."""
    codes: dict[str, set[str]] = {}
    for case in cases:
        codes.setdefault(case.subject, set()).update(case.codes)
    out = []
    for event in events:
        subject = case_subject(event.message.split(": ", 1)[0])
        if event.code not in codes.get(subject, ()):
            out.append((subject[:80], event.code, event.message[:200]))
    return out


def wrong_answers(cases: list[Case], replies: list[Reply]) -> list[tuple[Case, str, str]]:
    return [(c, r.code, r.message[:200]) for c, r in zip(cases, replies, strict=True) if r.ok or r.code not in c.codes]


# --- the gateway ------------------------------------------------------------------------------------------------
async def prepare_gateway_sessions(stack: FuzzStack, sessions: GatewaySessions) -> None:
    """Victim sessions (started, never a chunk) and an ended one, of the fuzz tenant."""
    victims, ended = sessions.victims, sessions.ended
    for session in (*victims, ended):
        start = SessionControl(tenant=TENANT, session_id=session, action="start")
        assert (await ask(stack, subjects.ingest_session(TENANT, session), encode(start))).ok
    end = SessionControl(tenant=TENANT, session_id=ended, action="end")
    assert (await ask(stack, subjects.ingest_session(TENANT, ended), encode(end))).ok


async def ask(stack: FuzzStack, subject: str, data: bytes) -> Reply:
    return decode((await stack.nc.request(subject, data, timeout=30)).data, Reply)


def the_gateway(stack: FuzzStack):
    """This stack's gateway object (other tests' stacks may run in this process too)."""
    found = [
        o for o in gc.get_objects() if type(o).__name__ == "IngestGateway" and o.settings.nats_url == stack.nats_url
    ]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("entry", ["audio", "session"])
async def test_the_gateway_refuses_and_reports_every_hostile_request(fuzz_cases, fuzz_stack, speech, entry):
    stack = fuzz_stack
    sessions = GATEWAY_SESSIONS[entry]
    await prepare_gateway_sessions(stack, sessions)
    cases = fuzz_cases[entry]
    before = await scrape(stack.port("ingest"))
    async with ErrorTally(stack.nc, "ingest") as tally:
        good = asyncio.create_task(stream_good(stack, speech))
        replies = await in_flight(cases, lambda case: ask(stack, case.subject, case.data))
        session, result = await good
        await stack.nc.flush()
        await tally.reach(len(cases), timeout_s=10.0)
        wrong = wrong_answers(cases, replies)
        assert not wrong, f"{len(wrong)} answered wrongly, e.g. {wrong[:5]}"
        assert_tally(tally, cases)
    after = await scrape(stack.port("ingest"))
    for bucket, count in Counter(c.bucket for c in cases).items():
        refused = "jetscribe_ingest_refusals_total"
        assert refusal_total(after, refused, bucket) - refusal_total(before, refused, bucket) == count, bucket
    await assert_alive(stack)
    await assert_complete(stack, speech, session, result)
    gateway = the_gateway(stack)  # requests for sessions it never knew leave nothing behind
    assert set(gateway._locks) <= set(gateway.book.sessions), len(gateway._locks)
    for victim in sessions.victims:
        assert gateway.book.last_seq_of(TENANT, victim) == -1  # no hostile chunk got in


# --- the transcriber, for a client that writes to AUDIO ------------------------------------------------------------
def silence(seq: int, session: str) -> AudioChunk:
    return AudioChunk(
        tenant=TENANT,
        session_id=session,
        seq=seq,
        sent_at=1.0,
        sample_rate=16000,
        channels=1,
        encoding="pcm_s16le",
        payload=np.zeros(1600, "<i2").tobytes(),
        received_at=time.time(),
    )


async def test_the_transcriber_refuses_and_reports_what_the_gateway_never_stores(fuzz_cases, fuzz_stack, speech):
    stack = fuzz_stack
    js = stack.nc.jetstream()
    cases = fuzz_cases["stored_audio"]
    jump = f"jump{uuid.uuid4().hex[:6]}"  # seqs that jump: transcribed on, each jump and late seq reported
    script = [SessionControl(tenant=TENANT, session_id=jump, action="start")]
    script += [silence(seq, jump) for seq in (0, 5, 3, 2**62, 6)]
    script += [SessionControl(tenant=TENANT, session_id=jump, action="end")]
    before = await scrape(stack.port("transcriber"))
    async with ErrorTally(stack.nc, "transcriber") as tally:
        good = asyncio.create_task(stream_good(stack, speech))
        for message in script:
            await js.publish(subjects.audio(TENANT, jump), encode(message))
        await in_flight(cases, lambda case: js.publish(case.subject, case.data))
        session, result = await good
        await wait_settled(stack, subjects.AUDIO_STREAM, [subjects.transcriber_consumer(p) for p in range(16)])
        await tally.reach(len(cases) + 4, timeout_s=10.0)
        others = [e for _, e in tally.events if e.session_id != jump]
        wrong = misfits(others, cases, lambda subject: subject.rsplit(".", 1)[0])  # the stored subject's partition
        assert not wrong, wrong[:5]
        assert_tally(tally, cases, extra=Counter({TENANT: 4}))
        jumps = Counter(e.code for _, e in tally.events if e.session_id == jump)
        assert jumps == {"seq_gap": 2, "late_seq": 2}, jumps
        by_case = Counter(e.code for _, e in tally.events if e.session_id != jump)
    after = await scrape(stack.port("transcriber"))
    name = "jetscribe_transcriber_errors_total"
    assert refusal_total(after, name) - refusal_total(before, name) == len(cases) + 4
    assert sum(by_case.values()) == len(cases)
    await assert_alive(stack)
    await assert_complete(stack, speech, session, result)
    row = await wait_until_ended(stack.engine, TENANT, jump, timeout_s=30.0)
    assert row.chunks_received == 3  # 0, 5 and 2**62; the late ones were dropped, and said so
    opened = [s.session_id for s in await list_sessions(stack.engine, TENANT) if s.session_id.startswith("tx")]
    assert not opened, opened[:5]  # no refused message opened a session


async def test_the_transcriber_refuses_audio_whose_tenant_is_not_its_subjects(fuzz_stack):
    stack = fuzz_stack
    session = f"wt{uuid.uuid4().hex[:6]}"
    async with ErrorTally(stack.nc, "transcriber") as tally:
        chunk = silence(0, session)
        chunk.tenant = "other"
        await stack.nc.jetstream().publish(subjects.audio(TENANT, session), encode(chunk))
        await tally.reach(1, timeout_s=5.0)
        assert [(b, e.code) for b, e in tally.events] == [(TENANT, "subject_mismatch")]


# --- the persister, for a client that writes to TRANSCRIPTS --------------------------------------------------------
async def test_the_persister_refuses_and_reports_what_no_transcriber_publishes(fuzz_cases, fuzz_stack, speech):
    stack = fuzz_stack
    js = stack.nc.jetstream()
    cases = fuzz_cases["transcripts"]
    before = await scrape(stack.port("persister"))
    async with ErrorTally(stack.nc, "persister") as tally:
        good = asyncio.create_task(stream_good(stack, speech))
        await in_flight(cases, lambda case: js.publish(case.subject, case.data))
        session, result = await good
        consumers = [subjects.PERSISTER_CONSUMER, subjects.SESSION_ENDS_CONSUMER]  # the gateways' too: no poison
        await wait_settled(stack, subjects.TRANSCRIPTS_STREAM, consumers)
        await tally.reach(len(cases), timeout_s=10.0)
        wrong = misfits([e for _, e in tally.events], cases, lambda subject: subject)
        assert not wrong, wrong[:5]
        assert_tally(tally, cases)
    after = await scrape(stack.port("persister"))
    for bucket, count in Counter(c.bucket for c in cases).items():
        name = "jetscribe_persister_dropped_total"
        assert refusal_total(after, name, bucket) - refusal_total(before, name, bucket) == count, bucket
    await assert_alive(stack)
    await assert_complete(stack, speech, session, result)
    stored = [s.session_id for s in await list_sessions(stack.engine, TENANT) if s.session_id.startswith("px")]
    assert not stored, stored[:5]
