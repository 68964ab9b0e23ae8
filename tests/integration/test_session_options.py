"""Per-session options over a real nats-server, gateway and transcriber (the null model: one word per decode, so
what differs is the cutting and publishing): two sessions at once with different options behave differently, a
finalize gets a final out without ending its session, and a bad option is refused before anything is stored."""

import asyncio
import contextlib
import time
import uuid

import nats
import numpy as np
import pytest

from jetscribe.devstack.servers import NatsServer
from jetscribe.evaluation.speech import sample_speech
from jetscribe.services.ingest.app import run as run_ingest
from jetscribe.services.transcriber.app import run as run_transcriber
from jetscribe.services.transcriber.null_model import NULL_MODEL, NullModel
from jetscribe.shared import subjects
from jetscribe.shared.config import IngestConfig, StreamSettings, TranscriberConfig
from jetscribe.shared.natsauth import env_connect_options
from jetscribe.shared.wire import ErrorEvent, Segment, SessionControl, SessionEvent, TranscriptMessage, decode
from tests.integration.running import NAMES, PARTITIONS, endpoint_data, gather_replies
from tests.integration.test_ingest import ask, chunk

TENANT = "opts"
CHUNK = 1600  # 100 ms


@pytest.fixture(scope="module")
def own_nats(tmp_path_factory):
    """Its own server: the consumer group's leases and consumers are per server."""
    with NatsServer(tmp_path_factory.mktemp("options-nats")) as server:
        yield server


@contextlib.asynccontextmanager
async def pipeline(url):
    settings = StreamSettings(nats_url=url)
    config = TranscriberConfig(
        model=NULL_MODEL, worker_id=f"w-{uuid.uuid4().hex[:6]}", heartbeat_s=0.5, lease_ttl_s=2, speakers_audio="off"
    )
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(run_ingest(settings, IngestConfig(), stop)),
        asyncio.create_task(run_transcriber(settings, config, stop, model=NullModel())),
    ]
    nc = await nats.connect(url, **env_connect_options(url))
    try:
        await until_serving(nc, tasks)
        yield nc
    finally:
        await nc.close()
        stop.set()
        await asyncio.gather(*tasks)


async def until_serving(nc, tasks, deadline_s=60.0):
    """The gateway answers ready and the worker holds every partition (a task that ended meanwhile raises)."""
    deadline = time.monotonic() + deadline_s
    while True:
        for task in tasks:
            if task.done():
                task.result()
        replies = await gather_replies(nc, "$SRV.STATS", 0.3)
        ready = {r["name"] for r in replies if endpoint_data(r, "health").get("ready")}
        held = [p for r in replies if r["name"] == NAMES[2] for p in endpoint_data(r, "stats").get("partitions", [])]
        if {NAMES[0], NAMES[2]} <= ready and sorted(held) == list(range(PARTITIONS)):
            return
        assert time.monotonic() < deadline, f"not serving in {deadline_s} s: {replies}"


class Heard:
    """Every segment and session event of one session, as a reader subscribed before its start gets them."""

    def __init__(self):
        self.messages: list[TranscriptMessage] = []
        self.changed = asyncio.Event()

    async def listen(self, nc, session):
        for subject in (subjects.transcript(TENANT, session), subjects.session_events_of(TENANT, session)):
            await nc.subscribe(subject, cb=self._keep)
        return self

    async def _keep(self, msg):
        self.messages.append(decode(msg.data, TranscriptMessage))
        self.changed.set()

    def segments(self, status):
        return [m for m in self.messages if isinstance(m, Segment) and m.status == status]

    def events(self, kind):
        return [m for m in self.messages if isinstance(m, SessionEvent) and m.event == kind]

    async def until(self, done, timeout_s=30.0):
        async with asyncio.timeout(timeout_s):
            while not done():
                self.changed.clear()
                await self.changed.wait()


async def start(nc, session, options):
    control = SessionControl(tenant=TENANT, session_id=session, action="start", sent_at=time.time(), options=options)
    return await ask(nc, subjects.ingest_session(TENANT, session), control)


async def control(nc, session, action):
    message = SessionControl(tenant=TENANT, session_id=session, action=action, sent_at=time.time())
    reply = await ask(nc, subjects.ingest_session(TENANT, session), message)
    assert reply.ok, reply


async def send(nc, session, samples, first_seq=0):
    seq = first_seq
    for off in range(0, len(samples), CHUNK):
        payload = samples[off : off + CHUNK].astype("<i2").tobytes()
        reply = await ask(nc, subjects.ingest_audio(TENANT, session), chunk(TENANT, session, seq, payload=payload))
        assert reply.ok, reply
        seq += 1
    return seq


def two_phrases():
    """Two phrases 0.3 s apart (a pause the default 0.5 s endpoint does not cut at), then 2 s of silence."""
    speech, pause = sample_speech().audio, np.zeros(int(0.3 * 16000), np.int16)
    return np.concatenate([speech[: int(4.6 * 16000)], pause, speech[int(5.3 * 16000) : int(8.4 * 16000)]])


async def test_sessions_at_once_follow_their_own_options(own_nats):
    audio = np.concatenate([two_phrases(), np.zeros(2 * 16000, np.int16)])  # a pause long enough for utterance_end
    asked = {
        "snappy": {"interim_results": False, "endpointing_ms": 200, "utterance_end_ms": 1000, "vad_events": True},
        "usual": {},
        "patient": {"endpointing_ms": False},
    }
    async with pipeline(own_nats.url) as nc:
        heard = {session: await Heard().listen(nc, session) for session in asked}
        for session, options in asked.items():
            assert (await start(nc, session, options)).ok
        snappy, usual, patient = heard.values()
        middle = int(2.5 * 16000)  # inside the first phrase: an interim is due for each open utterance
        await asyncio.gather(*(send(nc, session, audio[:middle]) for session in asked))
        await usual.until(lambda: usual.segments("interim"))
        await patient.until(lambda: patient.segments("interim"))
        await asyncio.gather(*(send(nc, session, audio[middle:], first_seq=middle // CHUNK) for session in asked))
        await snappy.until(lambda: snappy.events("utterance_end"))  # it comes while the session is open
        await usual.until(lambda: usual.segments("final"))  # the usual endpoint, in the trailing silence
        assert not patient.segments("final")  # no endpoint: its final waits for the end
        await asyncio.gather(*(control(nc, session, "end") for session in asked))
        for reader in heard.values():
            await reader.until(lambda reader=reader: reader.events("ended"))
    # endpointing 200 ms cuts at the 0.3 s pause, the default 0.5 s does not, false cuts only at the end.
    assert [len(h.segments("final")) for h in heard.values()] == [2, 1, 1]
    assert snappy.segments("final")[0].end < 4.7 < snappy.segments("final")[1].start
    # interim_results false: none at all; the default: interims while the utterance is open.
    assert not snappy.segments("interim") and usual.segments("interim") and patient.segments("interim")
    # vad_events: a speech_started at each utterance's onset, in session seconds; none where not asked.
    onsets = [e.timestamp for e in snappy.events("speech_started")]
    assert len(onsets) == 2 and 0.0 < onsets[0] < 1.0 and 4.6 < onsets[1] < 5.0
    (gap,) = snappy.events("utterance_end")
    assert gap.last_word_end == max(w.end for s in snappy.segments("final") for w in s.words)
    for reader in (usual, patient):
        assert not reader.events("speech_started") and not reader.events("utterance_end")


async def test_a_finalize_gets_the_final_out_now_and_the_session_goes_on(own_nats):
    speech = sample_speech().audio[: 3 * 16000]
    async with pipeline(own_nats.url) as nc:
        heard = await Heard().listen(nc, "flush")
        assert (await start(nc, "flush", {"endpointing_ms": False})).ok
        seq = await send(nc, "flush", speech)
        await control(nc, "flush", "finalize")
        await heard.until(lambda: heard.segments("final"))
        (final,) = heard.segments("final")
        assert final.end <= 3.0 and not heard.events("ended")
        seq = await send(nc, "flush", speech, first_seq=seq)  # the session takes audio on
        await control(nc, "flush", "end")
        await heard.until(lambda: heard.events("ended"))
    assert [s.segment_id for s in heard.segments("final")] == [0, 1] and heard.segments("final")[1].start >= 3.0


async def test_a_bad_option_is_refused_reported_counted_and_opens_nothing(own_nats):
    async with pipeline(own_nats.url) as nc:
        errors = await nc.subscribe(subjects.errors("ingest", TENANT))
        reply = await start(nc, "bad", {"endpointing_ms": 5})
        assert (reply.ok, reply.code) == (False, "bad_option") and "'endpointing_ms'" in reply.message
        assert "10..5000" in reply.message
        event = decode((await errors.next_msg(timeout=5)).data, ErrorEvent)
        assert (event.code, event.session_id) == ("bad_option", "bad")
        audio = await ask(nc, subjects.ingest_audio(TENANT, "bad"), chunk(TENANT, "bad", 0))
        assert audio.code == "unknown_session"  # the refused start opened nothing
        [gateway] = [r for r in await gather_replies(nc, "$SRV.STATS.jetscribe-ingest") if r]
        assert endpoint_data(gateway, "stats")["refusals"].get("bad_option") == 1


async def test_a_worker_taking_a_session_over_keeps_its_options(own_nats):
    settings = StreamSettings(nats_url=own_nats.url)

    def worker(name, stop):
        config = TranscriberConfig(
            model=NULL_MODEL, worker_id=name, heartbeat_s=0.5, lease_ttl_s=2, speakers_audio="off"
        )
        return asyncio.create_task(run_transcriber(settings, config, stop, model=NullModel()))

    stop_first, stop = asyncio.Event(), asyncio.Event()
    tasks = [asyncio.create_task(run_ingest(settings, IngestConfig(), stop)), worker("first", stop_first)]
    nc = await nats.connect(own_nats.url, **env_connect_options(own_nats.url))
    try:
        await until_serving(nc, tasks)
        heard = await Heard().listen(nc, "moved")
        assert (await start(nc, "moved", {"interim_results": False, "endpointing_ms": 200, "vad_events": True})).ok
        audio = two_phrases()
        first_phrase = int(4.9 * 16000)  # with the 0.3 s pause: the 200 ms endpoint has cut it
        seq = await send(nc, "moved", audio[:first_phrase])
        await heard.until(lambda: heard.segments("final"))
        tasks.append(worker("second", stop))
        stop_first.set()  # drains: its sessions are handed over with their checkpoints
        await tasks[1]
        await until_serving(nc, tasks[2:])  # the second worker holds every partition now
        rest = np.concatenate([audio[first_phrase:], np.zeros(16000, np.int16)])  # and a pause that ends it
        await send(nc, "moved", rest, first_seq=seq)
        await heard.until(lambda: len(heard.segments("final")) == 2)
    finally:
        await nc.close()
        stop.set()
        await asyncio.gather(*tasks)
    first, second = heard.segments("final")
    assert (first.worker_id, second.worker_id) == ("first", "second")
    assert not heard.segments("interim")  # interim_results false held on the second worker
    assert len(heard.events("speech_started")) == 2  # vad_events too, and the 200 ms endpoint cut the pause
