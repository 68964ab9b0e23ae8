"""Hostile clients at the gateway's WebSocket way in, while a good socket session streams through it.

Handshakes the gateway must refuse (`--fuzz-count` / 5 of them) and accepted sockets whose frames it must refuse
(`--fuzz-count` / 10; tests/fuzz/socket_cases.py), then a burst above the rate limits. Afterwards: each got its
HTTP status with a JSON body, or its error message and close code on the socket; each refusal is on
`errors.ingest.<tenant>` once (a handshake without a valid key under `_`) and in the refusal metric; the gateway
still answers ready; and the good session came out complete: every chunk once and in order, bit for bit, every
final it was sent stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import urllib.parse
import uuid
from collections import Counter

import numpy as np
import pytest
import websockets
from websockets.asyncio.client import connect

from jetscribe.evaluation.opus import encode_opus
from jetscribe.evaluation.speech import sample_speech
from jetscribe.services.persister.store import final_segments, wait_until_ended
from jetscribe.shared.config import IngestConfig, TranscriberConfig
from tests.fuzz.cases import TENANT, draw_cases
from tests.fuzz.conftest import LEASE_TTL_S, MAX_CHUNK_BYTES, FuzzStack
from tests.fuzz.socket_cases import CLOSE_STREAM, HandshakeCase, SocketCase, hostile_handshake, hostile_socket
from tests.fuzz.test_entry_points import GOOD_TENANT, ErrorTally, assert_alive, in_flight, refusal_total
from tests.integration.test_websocket import stored_payload
from tests.scrape import scrape

pytestmark = pytest.mark.fuzz

GOOD_SPEED = 4.0  # the 25 s sample in about 6 s, under the session's 50 chunks/s
RATE_BURST_S = 2.0  # a session's bucket holds 100 chunks: the burst case goes over it at once
RUN = uuid.uuid4().hex[:6]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def gateway_config(nats_keys) -> IngestConfig:
    """The fuzz stack's gateway with a listener; a session for every socket case (most left open, as a client that
    went away leaves its session), so no cap on a tenant's sessions."""
    return IngestConfig(
        max_chunk_bytes=MAX_CHUNK_BYTES,
        lease_ttl_s=LEASE_TTL_S,
        ws_port=free_port(),
        api_keys=str(nats_keys.api_keys_path),
        max_sessions_per_tenant=1_000_000,
        rate_burst_s=RATE_BURST_S,
        speakers_audio="off",  # diarize=true is refused (a handshake case), whatever extras are installed
    )


@pytest.fixture(scope="module")
def worker_config() -> TranscriberConfig:
    """Every socket case's session stays open (its client went away): no cap on a worker's sessions either, or the
    good session would be rejected `worker_full` (what JETSCRIBE_MAX_SESSIONS_PER_TENANT guards against)."""
    return TranscriberConfig(
        model="null", worker_id="fuzz-w1", heartbeat_s=1.0, lease_ttl_s=LEASE_TTL_S, max_sessions=1_000_000
    )


@pytest.fixture(scope="module")
def keys(nats_keys) -> dict[str, str]:
    """Each tenant's API key."""
    return {
        tenant: (nats_keys.add_tenant(tenant), nats_keys.new_api_key(tenant))[1] for tenant in (TENANT, GOOD_TENANT)
    }


@pytest.fixture(scope="module")
def fuzz_cases(fuzz_count) -> dict[str, list]:
    """Generated before the services start (see tests/fuzz/test_entry_points.py)."""
    tone = (np.sin(np.arange(8000) * 2 * np.pi * 440 / 16000) * 8000).astype(np.int16)
    ogg, webm = encode_opus(tone, 16000, "ogg"), encode_opus(tone, 16000, "webm")
    return {
        "handshakes": draw_cases(hostile_handshake(), max(fuzz_count // 5, 1), seed=18),
        "sockets": draw_cases(hostile_socket(ogg, webm), max(fuzz_count // 10, 1), seed=19),
    }


@pytest.fixture(scope="module")
def speech():
    return sample_speech()


def auth_of(how: str, key: str) -> tuple[dict[str, str], list[str] | None, str]:
    """(headers, subprotocols, query suffix) that show `key` as `how` says."""
    return {
        "header": ({"Authorization": f"Token {key}"}, None, ""),
        "bearer": ({"Authorization": f"Bearer {key}"}, None, ""),
        "none": ({}, None, ""),
        "basic": ({"Authorization": f"Basic {key}"}, None, ""),
        "lone_token": ({}, ["token"], ""),
        "wrong": ({"Authorization": f"Token {key}x"}, None, ""),
        "wrong_protocol": ({}, ["token", f"{key}x"], ""),
        "wrong_query": ({}, None, f"token={key}x"),
    }[how]


async def refused_handshake(url: str, case: HandshakeCase, key: str) -> tuple[int, dict] | str:
    headers, protocols, query = auth_of(case.auth, key)
    target = case.target + (("&" if "?" in case.target else "?") + query if query else "")
    try:
        async with connect(url + target, additional_headers=headers, subprotocols=protocols, open_timeout=60):
            return "accepted"
    except websockets.InvalidStatus as exc:
        return exc.response.status_code, json.loads(exc.response.body)


def error_code(message: dict) -> str | None:
    """The refusal code of an error message of either dialect."""
    if message.get("type") == "error":
        return message["code"]
    if message.get("type") == "Error":
        return message["variant"]
    return None


async def hostile_session(url: str, case: SocketCase, session: str, key: str) -> tuple[int | None, list[dict]]:
    """The case's frames on a socket of its own: its close code and every message it got."""
    if case.dialect == "deepgram":
        target = "/v1/listen?" + urllib.parse.urlencode([*case.params, ("session_id", session)])
    else:
        target = f"/v1/sessions/{session}?" + urllib.parse.urlencode(case.params)
    got: list[dict] = []
    async with connect(url + target, additional_headers={"Authorization": f"Token {key}"}, open_timeout=60) as ws:
        with contextlib.suppress(websockets.ConnectionClosed):
            for frame in case.frames:
                await ws.send(frame)
        with contextlib.suppress(websockets.ConnectionClosed):
            async with asyncio.timeout(120):
                async for frame in ws:
                    got.append(json.loads(frame))
    return ws.close_code, got


async def good_session(stack: FuzzStack, speech, key: str) -> tuple[str, bytes, list[dict], int | None]:
    """The sample at GOOD_SPEED over a native socket: (session, its PCM, every message back, its close code)."""
    session = f"g{uuid.uuid4().hex[:10]}"
    pcm = speech.audio.astype("<i2").tobytes()
    url = f"{stack.ws_url}/v1/sessions/{session}?encoding=pcm_s16le&sample_rate={speech.sample_rate}"
    chunk = speech.sample_rate // 10 * 2
    got: list[dict] = []
    async with connect(url, additional_headers={"Authorization": f"Token {key}"}, open_timeout=60) as ws:
        started = time.monotonic()
        for at in range(0, len(pcm), chunk):
            await ws.send(pcm[at : at + chunk])
            await asyncio.sleep(max(0.0, started + at / 2 / speech.sample_rate / GOOD_SPEED - time.monotonic()))
        await ws.send(CLOSE_STREAM)
        with contextlib.suppress(websockets.ConnectionClosed):
            async with asyncio.timeout(120):
                async for frame in ws:
                    got.append(json.loads(frame))
    return session, pcm, got, ws.close_code


async def assert_good_complete(stack: FuzzStack, session: str, pcm: bytes, got: list[dict], close: int | None):
    """Every chunk once, in order, bit for bit; the session ended; every final sent on the socket stored."""
    assert close == 1000, got[-3:]
    assert not [m for m in got if error_code(m)], [m for m in got if error_code(m)][:3]
    seqs, stored = await stored_payload(stack.nc, session, tenant=GOOD_TENANT)
    assert seqs == list(range(len(seqs))) and stored == pcm
    finals = {m["segment_id"] for m in got if m.get("type") == "segment" and m["status"] == "final"}
    assert finals and [m["event"] for m in got if m.get("type") == "session_event"][-1] == "ended"
    row = await wait_until_ended(stack.engine, GOOD_TENANT, session, timeout_s=30.0)
    assert row.status == "ended" and row.reason is None
    assert [r.segment_id for r in await final_segments(stack.engine, GOOD_TENANT, session)] == sorted(finals)


async def test_the_socket_refuses_and_reports_every_hostile_handshake(fuzz_cases, fuzz_stack, keys, speech):
    stack = fuzz_stack
    cases: list[HandshakeCase] = fuzz_cases["handshakes"]
    before = await scrape(stack.port("ingest"))
    async with ErrorTally(stack.nc, "ingest") as tally:
        good = asyncio.create_task(good_session(stack, speech, keys[GOOD_TENANT]))
        answers = await in_flight(cases, lambda case: refused_handshake(stack.ws_url, case, keys[TENANT]))
        wrong = [
            (case, answer)
            for case, answer in zip(cases, answers, strict=True)
            if answer == "accepted" or answer[0] != case.status or not answer[1].get("err_msg")
        ]
        assert not wrong, f"{len(wrong)} answered wrongly, e.g. {wrong[:5]}"
        await tally.reach(len(cases), timeout_s=10.0)
        reported = Counter((bucket, event.code) for bucket, event in tally.events)
        assert reported == Counter((c.bucket, c.code) for c in cases)
        session, pcm, got, close = await good
    after = await scrape(stack.port("ingest"))
    for bucket, count in Counter(c.bucket for c in cases).items():
        refused = "jetscribe_ingest_refusals_total"
        assert refusal_total(after, refused, bucket) - refusal_total(before, refused, bucket) == count, bucket
    await assert_alive(stack)
    await assert_good_complete(stack, session, pcm, got, close)


async def test_the_socket_refuses_and_reports_every_hostile_frame(fuzz_cases, fuzz_stack, keys, speech):
    stack = fuzz_stack
    cases: list[SocketCase] = fuzz_cases["sockets"]
    sessions = [f"w{RUN}{i}" for i in range(len(cases))]
    before = await scrape(stack.port("ingest"))
    async with ErrorTally(stack.nc, "ingest") as tally:
        good = asyncio.create_task(good_session(stack, speech, keys[GOOD_TENANT]))
        indexed = list(zip(cases, sessions, strict=True))
        results = await in_flight(indexed, lambda cs: hostile_session(stack.ws_url, cs[0], cs[1], keys[TENANT]))
        wrong = []
        for case, (close, got) in zip(cases, results, strict=True):
            codes = [error_code(m) for m in got if error_code(m)]
            if close != (case.close_code or 1000) or codes != ([case.code] if case.code else []):
                wrong.append((case, close, codes, got[-2:]))
        assert not wrong, f"{len(wrong)} answered wrongly, e.g. {wrong[:5]}"
        expected = sum(1 for c in cases if c.code)
        await tally.reach(expected, timeout_s=10.0)
        by_session = {s: Counter() for s in sessions}
        for bucket, event in tally.events:
            assert (bucket, event.session_id) != (GOOD_TENANT, event.session_id), event
            by_session[event.session_id][event.code] += 1
        mismatched = [
            (case, dict(by_session[s]))
            for case, s in indexed
            if by_session[s] != (Counter({case.code: 1}) if case.code else Counter())
        ]
        assert not mismatched, f"{len(mismatched)} reported wrongly, e.g. {mismatched[:5]}"
        session, pcm, got, close = await good
    after = await scrape(stack.port("ingest"))
    refused = "jetscribe_ingest_refusals_total"
    assert refusal_total(after, refused, TENANT) - refusal_total(before, refused, TENANT) == expected
    await assert_alive(stack)
    await assert_good_complete(stack, session, pcm, got, close)


async def test_a_burst_above_the_rate_limits_is_slowed_reported_and_stored_whole(fuzz_stack, keys, speech):
    """A session's bucket holds RATE_BURST_S of its 50 chunks/s: three times that at once is waited out chunk by
    chunk (each `rate_limited` reported), and all of it is stored, in order, while a good session streams."""
    stack = fuzz_stack
    burst = np.random.default_rng(7).integers(-3000, 3000, 16000 * 30, dtype=np.int16).tobytes()  # 300 chunks
    session = f"b{RUN}"
    async with ErrorTally(stack.nc, "ingest") as tally:
        good = asyncio.create_task(good_session(stack, speech, keys[GOOD_TENANT]))
        case = SocketCase("burst", "native", (("encoding", "pcm_s16le"), ("sample_rate", "16000")), (), None, None)
        case = SocketCase(**{**case.__dict__, "frames": (burst[: 1 << 19], burst[1 << 19 :], CLOSE_STREAM)})
        close, got = await hostile_session(stack.ws_url, case, session, keys[TENANT])
        good_result = await good
    assert close == 1000 and not [m for m in got if error_code(m)], got[-3:]
    codes = Counter((b, e.session_id, e.code) for b, e in tally.events)
    assert set(codes) == {(TENANT, session, "rate_limited")}, codes
    seqs, stored = await stored_payload(stack.nc, session, tenant=TENANT)
    assert seqs == list(range(300)) and stored == burst
    await assert_alive(stack)
    await assert_good_complete(stack, *good_result)
