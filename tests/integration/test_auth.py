"""Tenant isolation enforced by nats-server: a real server with the generated config (shared/natsauth.py), the
gateway and a transcriber (null model) each as its own user, and tenants `a` and `b`. Every refusal is a
permissions violation the client sees; `a`'s own paths work; a revoked tenant is cut off at the reload."""

import asyncio
import contextlib
import io
import json
import shutil
import uuid

import nats
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy

from jetscribe.client.bot import Audio, stream_audio
from jetscribe.client.follow import consumer_config, follow
from jetscribe.client.history import stored_messages
from jetscribe.client.readers import provision_reader
from jetscribe.devstack.keys import Keyring
from jetscribe.devstack.servers import NatsServer
from jetscribe.evaluation.speech import sample_speech
from jetscribe.services.ingest.app import run as run_ingest
from jetscribe.services.transcriber.app import run as run_transcriber
from jetscribe.services.transcriber.null_model import NULL_WORD, NullModel
from jetscribe.shared import subjects
from jetscribe.shared.config import IngestConfig, StreamSettings, TranscriberConfig
from jetscribe.shared.natsauth import ClientAuth
from jetscribe.shared.wire import (
    AudioChunk,
    ErrorEvent,
    HistoryPage,
    HistoryRequest,
    Reply,
    Segment,
    SessionControl,
    SessionEvent,
    Word,
    decode,
    encode,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Its own users: services, operator, root (to look at what is stored) and tenants a and b."""
    keys = Keyring(tmp_path_factory.mktemp("auth-keys") / "keys").ensure_services()
    keys.ensure_root()
    for tenant in ("a", "b"):
        keys.add_tenant(tenant)
    return keys


@pytest.fixture(scope="module")
def server(tmp_path_factory, keys):
    with NatsServer(tmp_path_factory.mktemp("auth-nats"), keyring=keys) as server:
        yield server


class Client:
    """A connection that records what the server refused (nats-py reports a violation to error_cb)."""

    def __init__(self):
        self.errors: list[str] = []
        self.changed = asyncio.Event()
        self.nc = None

    async def on_error(self, exc):
        self.errors.append(str(exc).lower())
        self.changed.set()

    async def connect(self, url, creds, tenant=None, **options):
        self.nc = await nats.connect(
            url,
            error_cb=self.on_error,
            **ClientAuth(str(creds)).connect_options(url, tenant),
            **options,
        )
        return self

    async def refused(self, what: str, subject: str, timeout: float = 15.0, whole: bool = True) -> None:
        """Wait until the server reports `permissions violation for <what> to "<subject>"` (with whole=False, to a
        subject that begins with `subject`)."""
        wanted = f'permissions violation for {what} to "{subject.lower()}' + ('"' if whole else "")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not any(wanted in e for e in self.errors):
            self.changed.clear()
            assert loop.time() < deadline, f"no violation {wanted!r}; errors: {self.errors}"
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), deadline - loop.time())

    async def close(self):
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()


@pytest.fixture
async def tenant_a(server, keys):
    client = await Client().connect(server.url, keys.tenant_path("a"), tenant="a")
    yield client
    await client.close()


@pytest.fixture
async def root(server, keys):
    nc = await nats.connect(server.url, **ClientAuth(str(keys.path("root"))).connect_options(server.url))
    yield nc
    await nc.close()


@pytest.fixture(scope="module")
async def services(server, keys):
    """The gateway and a null-model transcriber, each connected as its own user."""

    def settings(role):
        return StreamSettings(nats_url=server.url, nats_creds=str(keys.path(role)))

    stop = asyncio.Event()
    worker = TranscriberConfig(model="null", worker_id=f"auth-{uuid.uuid4().hex[:6]}", heartbeat_s=0.5, lease_ttl_s=2)
    tasks = [
        asyncio.create_task(run_ingest(settings("ingest"), IngestConfig(), stop)),
        asyncio.create_task(run_transcriber(settings("transcriber"), worker, stop, model=NullModel())),
    ]
    nc = await nats.connect(server.url, **ClientAuth(str(keys.path("operator"))).connect_options(server.url))
    try:
        kv = None
        for _ in range(200):  # until the worker holds every partition
            with contextlib.suppress(Exception):
                kv = kv or await nc.jetstream().key_value(subjects.PARTITION_LEASES_BUCKET)
                if len(await kv.keys()) == 16:
                    break
            for task in tasks:
                if task.done():
                    task.result()
            await asyncio.sleep(0.1)
        yield
    finally:
        await nc.close()
        stop.set()
        await asyncio.gather(*tasks)


async def test_a_streams_a_session_and_follows_its_transcript_with_its_own_credentials(services, server, keys):
    speech = sample_speech()
    bot = await Client().connect(server.url, keys.tenant_path("a"), tenant="a")
    reader = await Client().connect(server.url, keys.tenant_path("a"), tenant="a")
    try:
        session = f"s{uuid.uuid4().hex[:6]}"
        out, err = io.StringIO(), io.StringIO()
        started = asyncio.Event()
        following = asyncio.create_task(  # as a tenant: live, with core subscriptions (it may create no consumer)
            follow(
                reader.nc,
                "a",
                session,
                consumer_config("a", session),
                fmt="json",
                live=True,
                started=started,
                out=out,
                err=err,
            )
        )
        await asyncio.wait_for(started.wait(), 15)
        result = await stream_audio(
            bot.nc, Audio(speech.audio, speech.sample_rate), tenant="a", session_id=session, speed=0, wait_s=60
        )
        assert result.ended is not None and result.final_segments()
        assert {s.text for s in result.final_segments()} == {NULL_WORD}
        code = await asyncio.wait_for(following, 30)
        assert code == 0
        lines = out.getvalue().splitlines()
        assert lines and lines[-1].startswith('{"type": "session_event"') and '"ended"' in lines[-1]
        assert sum('"final"' in line for line in lines) == len(result.final_segments())
        assert bot.errors == [] and reader.errors == []
    finally:
        await bot.close()
        await reader.close()


async def test_a_cannot_publish_to_bs_ingest_subjects(tenant_a, root):
    heard = await root.subscribe("ingest.*.b.>")
    await root.flush()
    chunk = AudioChunk(
        tenant="b",
        session_id="s1",
        seq=0,
        sent_at=0.0,
        sample_rate=16000,
        channels=1,
        encoding="pcm_s16le",
        payload=b"",
    )
    await tenant_a.nc.publish(subjects.ingest_audio("b", "s1"), encode(chunk))
    await tenant_a.refused("publish", "ingest.audio.b.s1")
    with pytest.raises(nats.errors.TimeoutError):  # a request is refused the same way: no gateway hears it
        await tenant_a.nc.request(
            subjects.ingest_session("b", "s1"),
            encode(SessionControl(tenant="b", session_id="s1", action="start", sent_at=0.0)),
            timeout=1,
        )
    await tenant_a.refused("publish", "ingest.session.b.s1")
    with pytest.raises(nats.errors.TimeoutError):
        await heard.next_msg(timeout=0.5)


@pytest.mark.parametrize(
    "subject", ["transcript.b.s1", "transcript.>", "session.b.s1.ended", "errors.ingest.b", "audio.a.s1.*", ">"]
)
async def test_a_cannot_subscribe_to_what_is_not_its_own(tenant_a, subject):
    await tenant_a.nc.subscribe(subject)
    await tenant_a.refused("subscription", subject)


@pytest.mark.parametrize("subject", ["_INBOX_b.>", "_INBOX.>", "_INBOX_b.abc.*"])
async def test_a_cannot_see_other_replies(tenant_a, subject):
    """b's replies come to _INBOX_b.…, the services' to _INBOX.…: a may subscribe to neither."""
    await tenant_a.nc.subscribe(subject)
    await tenant_a.refused("subscription", subject)


async def test_bs_replies_go_to_bs_inbox_only(services, server, keys, tenant_a):
    b = await Client().connect(server.url, keys.tenant_path("b"), tenant="b")
    try:
        assert b.nc.new_inbox().startswith("_INBOX_b.")
        reply = await b.nc.request(
            subjects.ingest_session("b", f"s{uuid.uuid4().hex[:6]}"),
            encode(SessionControl(tenant="b", session_id="x", action="start", sent_at=0.0)),
            timeout=5,
        )
        assert reply.data  # answered (a subject_mismatch refusal), on b's inbox
    finally:
        await b.close()


@pytest.mark.parametrize(
    "config",
    [
        ConsumerConfig(name="peek", filter_subject="transcript.b.>"),  # b's filter, in the create subject
        ConsumerConfig(name="peek", filter_subject="*.b.>"),
        ConsumerConfig(name="peek", filter_subject=">"),  # no filter in the subject: refused whatever the body
        ConsumerConfig(filter_subjects=["transcript.a.>", "transcript.b.>"]),
        ConsumerConfig(durable_name="peek", filter_subject="transcript.a.>"),  # the legacy durable subject
    ],
)
async def test_a_cannot_create_a_consumer_that_reads_bs_messages(tenant_a, config):
    config.deliver_policy = DeliverPolicy.ALL
    with pytest.raises(nats.errors.TimeoutError):
        await tenant_a.nc.jetstream(timeout=1).add_consumer(subjects.TRANSCRIPTS_STREAM, config=config)
    await tenant_a.refused("publish", "$JS.API.CONSUMER.", whole=False)


@pytest.mark.parametrize("push", [True, False])
async def test_a_may_not_create_even_a_consumer_filtered_to_itself(services, tenant_a, push):
    """Push or pull is in the request's body, where no permission looks: so no consumer at all."""
    config = ConsumerConfig(name=f"own_{uuid.uuid4().hex[:6]}", filter_subject="transcript.a.>", inactive_threshold=5)
    if push:
        config.deliver_subject = tenant_a.nc.new_inbox()
    with pytest.raises(nats.errors.TimeoutError):
        await tenant_a.nc.jetstream(timeout=1).add_consumer(subjects.TRANSCRIPTS_STREAM, config=config)
    await tenant_a.refused("publish", f"$JS.API.CONSUMER.CREATE.TRANSCRIPTS.{config.name}.transcript.a.>")


async def provision(server, keys, tenant: str, name: str) -> str:
    """What `jetscribe tenant reader` does: record the reader, make its consumer as the operator, reload."""
    consumer, filter_subject = keys.add_reader(tenant, name)
    nc = await nats.connect(server.url, **ClientAuth(str(keys.path("operator"))).connect_options(server.url))
    try:
        await provision_reader(nc, consumer, filter_subject)
    finally:
        await nc.close()
    server.reload()
    return consumer


async def test_a_reads_its_provisioned_reader_acks_and_resumes_after_a_restart(services, server, keys, root):
    consumer = await provision(server, keys, "a", f"r{uuid.uuid4().hex[:6]}")
    js = root.jetstream()
    session = f"r{uuid.uuid4().hex[:6]}"
    stored = [(await js.publish(subjects.transcript("a", session), f"m{i}".encode())).seq for i in range(4)]
    await js.publish(subjects.transcript("b", session), b"b's")

    async def read(count: int) -> list[int]:
        """As a, on a new connection: the next `count` of a's messages in this session, one at a time, each acked."""
        reader = await Client().connect(server.url, keys.tenant_path("a"), tenant="a")
        try:
            sub = await reader.nc.jetstream().pull_subscribe_bind(durable=consumer, stream=subjects.TRANSCRIPTS_STREAM)
            seen: list[int] = []
            while len(seen) < count:
                (msg,) = await sub.fetch(1, timeout=10)
                await msg.ack_sync()
                if msg.subject == subjects.transcript("a", session):  # not another test's message of a
                    seen.append(msg.metadata.sequence.stream)
            assert reader.errors == []
            return seen
        finally:
            await reader.close()

    assert await read(2) == stored[:2]
    assert await read(2) == stored[2:]  # restarted, it goes on after what it acked
    info = await js.consumer_info(subjects.TRANSCRIPTS_STREAM, consumer)
    assert info.config.deliver_subject is None and info.num_pending == 0  # a pull consumer; b's message not in it


async def test_a_cannot_use_bs_reader(services, server, keys, tenant_a):
    consumer = await provision(server, keys, "b", f"r{uuid.uuid4().hex[:6]}")
    with pytest.raises(nats.errors.TimeoutError):
        await tenant_a.nc.request(f"$JS.API.CONSUMER.MSG.NEXT.TRANSCRIPTS.{consumer}", b'{"batch": 1}', timeout=1)
    await tenant_a.refused("publish", f"$JS.API.CONSUMER.MSG.NEXT.TRANSCRIPTS.{consumer}")


@pytest.mark.parametrize(
    "endpoint",
    [
        "STREAM.MSG.GET.TRANSCRIPTS",
        "DIRECT.GET.TRANSCRIPTS",
        "STREAM.MSG.GET.AUDIO",
        "DIRECT.GET.KV_session_checkpoints",
        "STREAM.INFO.TRANSCRIPTS",
        "CONSUMER.LIST.TRANSCRIPTS",
        "CONSUMER.MSG.NEXT.TRANSCRIPTS.persister",
        "STREAM.PURGE.TRANSCRIPTS",
    ],
)
async def test_a_cannot_read_or_manage_streams_directly(tenant_a, endpoint):
    with pytest.raises(nats.errors.TimeoutError):
        await tenant_a.nc.request(f"$JS.API.{endpoint}", b'{"seq": 1}', timeout=1)
    await tenant_a.refused("publish", f"$JS.API.{endpoint}")


@pytest.mark.parametrize(
    "subject",
    ["audio.a.s1", "transcript.a.s1", "session.a.s1.ended", "$KV.session_checkpoints.a.s1", "$KV.partition_leases.p0"],
)
async def test_a_cannot_write_into_the_streams_the_services_trust(tenant_a, root, subject):
    stream = {"audio": "AUDIO", "transcript": "TRANSCRIPTS", "session": "TRANSCRIPTS"}.get(
        subject.split(".")[0], f"KV_{subject.split('.')[1]}"
    )
    js = root.jetstream()
    with contextlib.suppress(Exception):  # the buckets exist once the services ran; the streams always here
        before = (await js.stream_info(stream)).state.last_seq
    await tenant_a.nc.publish(subject, b"forged")
    await tenant_a.refused("publish", subject)
    with contextlib.suppress(Exception):
        assert (await js.stream_info(stream)).state.last_seq == before


async def test_the_operator_reads_but_does_not_write_the_streams(server, keys):
    operator = await Client().connect(server.url, keys.path("operator"))
    try:
        await operator.nc.jetstream().stream_info(subjects.TRANSCRIPTS_STREAM)  # reads
        for subject in ("audio.a.s1", "transcript.a.s1", "$KV.partition_leases.p0"):
            await operator.nc.publish(subject, b"forged")
            await operator.refused("publish", subject)
    finally:
        await operator.close()


async def test_a_revoked_tenant_is_cut_off_at_the_reload_without_a_restart(server, keys, tmp_path):
    keys.add_tenant("gone")
    server.reload()
    seed = tmp_path / "gone.nk"
    shutil.copy(keys.tenant_path("gone"), seed)  # what the tenant kept: revoking deletes the stack's copy
    disconnected = asyncio.Event()

    async def on_disconnect():
        disconnected.set()

    client = await Client().connect(
        server.url,
        seed,
        tenant="gone",
        disconnected_cb=on_disconnect,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.1,
    )
    pid = server.pid
    try:
        await client.nc.subscribe("transcript.gone.>")
        await client.nc.flush()
        keys.revoke_tenant("gone")
        server.reload()
        await asyncio.wait_for(disconnected.wait(), 10)  # the server dropped the live connection
        # and refuses it when it tries again
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not any("authorization violation" in e for e in client.errors):
            assert loop.time() < deadline, client.errors
            await asyncio.sleep(0.05)
        assert not client.nc.is_connected
    finally:
        await client.close()
    with pytest.raises(nats.errors.Error, match="(?i)authorization"):
        await nats.connect(server.url, nkeys_seed=str(seed), max_reconnect_attempts=0, allow_reconnect=False)
    assert server.pid == pid  # reloaded, not restarted


@pytest.mark.parametrize("deliver", ["transcript.b.x.final", "_INBOX_b.injected", "errors.ingest.b"])
async def test_a_cannot_push_its_messages_onto_bs_subjects(services, server, keys, tenant_a, root, deliver):
    """nats-server does not check a push consumer's deliver subject against its creator's permissions (before
    this fix, a created this consumer and b's subscriber received a's message on each of these subjects). So a
    tenant may create no consumer: refused, and b receives nothing."""
    b = await Client().connect(server.url, keys.tenant_path("b"), tenant="b")
    try:
        heard = await b.nc.subscribe(deliver)
        await b.nc.flush()
        await root.jetstream().publish(subjects.transcript("a", "inj"), b"a's own message")
        with contextlib.suppress(nats.errors.TimeoutError):
            await tenant_a.nc.jetstream(timeout=2).add_consumer(
                subjects.TRANSCRIPTS_STREAM,
                config=ConsumerConfig(
                    name=f"inject_{uuid.uuid4().hex[:6]}",
                    filter_subject="transcript.a.>",
                    deliver_subject=deliver,
                    deliver_policy=DeliverPolicy.ALL,
                    inactive_threshold=5,
                ),
            )
        await tenant_a.refused("publish", "$JS.API.CONSUMER.CREATE.TRANSCRIPTS.inject_", whole=False)
        with pytest.raises(nats.errors.TimeoutError):
            await heard.next_msg(timeout=1)
        assert b.errors == []
    finally:
        await b.close()


@pytest.mark.parametrize("reply", ["_INBOX_b.stolen", "transcript.b.s1.reply", "audio.b.forged"])
async def test_the_gateway_does_not_answer_on_a_reply_subject_that_is_not_the_tenants(
    services, server, keys, tenant_a, root, reply
):
    """a's request with b's inbox (or b's transcript, or an AUDIO subject) as its reply: the gateway, whose rights
    include AUDIO, would have answered there. Refused instead: `bad_reply` on errors.ingest.a, nothing on `reply`."""
    js = root.jetstream()
    audio_before = (await js.stream_info(subjects.AUDIO_STREAM)).state.last_seq
    heard = await root.subscribe(reply)
    errors = await root.subscribe(subjects.errors("ingest", "a"))
    await root.flush()
    session = f"r{uuid.uuid4().hex[:6]}"
    control = SessionControl(tenant="a", session_id=session, action="start", sent_at=0.0)
    await tenant_a.nc.publish(subjects.ingest_session("a", session), encode(control), reply=reply)
    event = decode((await errors.next_msg(timeout=15)).data, ErrorEvent)
    assert (event.code, event.session_id) == ("bad_reply", session) and "_INBOX_a" in event.message
    await tenant_a.nc.flush()
    with pytest.raises(nats.errors.TimeoutError):
        await heard.next_msg(timeout=1)
    assert (await js.stream_info(subjects.AUDIO_STREAM)).state.last_seq == audio_before
    assert tenant_a.errors == []
    # and the same start on a's own inbox is served (no session was started by the refused one)
    answer = decode(
        (await tenant_a.nc.request(subjects.ingest_session("a", session), encode(control), timeout=10)).data, Reply
    )
    assert answer.ok, answer


async def test_jetscribe_tenant_reader_makes_the_consumer_and_the_permission(
    services, server, keys, root, monkeypatch, capsys
):
    from jetscribe.cli.main import main

    monkeypatch.setenv("JETSCRIBE_NATS_KEYS", str(keys.folder))
    monkeypatch.setenv("NATS_URL", server.url)
    monkeypatch.setenv("NATS_CREDS", str(keys.path("operator")))
    name = f"cli{uuid.uuid4().hex[:6]}"
    assert await asyncio.to_thread(main, ["tenant", "reader", "a", name, "--reads", "all", "--in-order"]) == 0
    assert f"reader_a_{name} on *.a.>, made" in capsys.readouterr().out
    info = await root.jetstream().consumer_info(subjects.TRANSCRIPTS_STREAM, f"reader_a_{name}")
    assert (info.config.max_ack_pending, info.config.deliver_subject, info.config.durable_name) == (
        1,
        None,
        f"reader_a_{name}",
    )
    assert await asyncio.to_thread(main, ["tenant", "reader", "a", name, "--reads", "all"]) == 0  # again: the same
    assert await asyncio.to_thread(main, ["tenant", "reader", "nobody", name]) == 2
    server.reload()  # what a running stack does itself; here the test's server
    await root.jetstream().publish(subjects.transcript("a", "cli"), b"x")
    a = await Client().connect(server.url, keys.tenant_path("a"), tenant="a")
    try:
        sub = await a.nc.jetstream().pull_subscribe_bind(durable=f"reader_a_{name}", stream=subjects.TRANSCRIPTS_STREAM)
        (msg,) = await sub.fetch(1, timeout=10)
        assert msg.subject.split(".")[1] == "a" and a.errors == []
    finally:
        await a.close()
    assert await asyncio.to_thread(main, ["tenant", "reader", "a", name, "--remove"]) == 0
    with pytest.raises(nats.js.errors.NotFoundError):
        await root.jetstream().consumer_info(subjects.TRANSCRIPTS_STREAM, f"reader_a_{name}")


def stored_final(tenant: str, session: str, segment_id: int) -> Segment:
    return Segment(
        tenant=tenant,
        session_id=session,
        segment_id=segment_id,
        revision=0,
        status="final",
        start=float(segment_id),
        end=segment_id + 0.9,
        text=f"{tenant} said {segment_id}",
        words=[Word("said", float(segment_id), segment_id + 0.5, 0.9)],
        model="null",
        worker_id="w1",
        published_at=1_700_000_000.0 + segment_id,
    )


async def store_session(js, tenant: str, session: str, finals: int = 3) -> None:
    for segment_id in range(finals):
        await js.publish(subjects.transcript(tenant, session), encode(stored_final(tenant, session, segment_id)))
    ended = SessionEvent(tenant=tenant, session_id=session, event="ended", at=1_700_000_100.0)
    await js.publish(subjects.session_event(tenant, session, "ended"), encode(ended))


async def test_a_replays_its_own_sessions_history_and_never_bs(
    services, server, keys, tenant_a, root, monkeypatch, capsys
):
    """A tenant creates no consumer, so its replay is the gateways' history (services/ingest/history.py): a asks
    for its own session and gets it, page by page; asking for b's is refused by NATS; a request forged with a's
    inbox as the reply to b's history is not answered (bad_reply on errors.ingest.b)."""
    ours, theirs = f"h{uuid.uuid4().hex[:6]}", f"h{uuid.uuid4().hex[:6]}"
    await store_session(root.jetstream(), "a", ours)
    await store_session(root.jetstream(), "b", theirs)

    got = [m async for m in stored_messages(tenant_a.nc, "a", ours, page=2)]  # two pages and a last one
    assert [m.subject for m in got] == [subjects.transcript("a", ours)] * 3 + [
        subjects.session_event("a", ours, "ended")
    ]
    assert [decode(m.data, Segment).text for m in got[:3]] == ["a said 0", "a said 1", "a said 2"]
    assert [m.seq for m in got] == sorted({m.seq for m in got})

    with pytest.raises(nats.errors.TimeoutError):
        await tenant_a.nc.request(subjects.history("b", theirs), encode(HistoryRequest()), timeout=1)
    await tenant_a.refused("publish", subjects.history("b", theirs))

    stolen = await tenant_a.nc.subscribe(f"_INBOX_a.{theirs}")
    reports = await root.subscribe(subjects.errors("ingest", "b"))
    await tenant_a.nc.flush()
    await root.flush()
    await root.publish(subjects.history("b", theirs), encode(HistoryRequest()), reply=f"_INBOX_a.{theirs}")
    report = decode((await reports.next_msg(timeout=10)).data, ErrorEvent)
    assert (report.code, report.session_id) == ("bad_reply", theirs)
    with pytest.raises(nats.errors.TimeoutError):
        await stolen.next_msg(timeout=0.5)

    # `jetscribe follow --from-start` as a: the stored session, then its end
    from jetscribe.cli.main import main

    monkeypatch.setenv("JETSCRIBE_NATS_KEYS", str(keys.folder))
    monkeypatch.setenv("NATS_URL", server.url)
    argv = ["follow", ours, "--tenant", "a", "--from-start", "--format", "json", "--creds", str(keys.tenant_path("a"))]
    assert await asyncio.to_thread(main, argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line).get("text") for line in lines[:3]] == ["a said 0", "a said 1", "a said 2"]
    assert len(lines) == 4 and '"ended"' in lines[-1]
    # `jetscribe transcript --creds` as a: its finals from the same history; b's session is refused by NATS
    argv = ["transcript", ours, "--tenant", "a", "--creds", str(keys.tenant_path("a"))]
    assert await asyncio.to_thread(main, argv) == 0
    assert capsys.readouterr().out.splitlines() == ["a said 0", "a said 1", "a said 2"]
    argv = ["transcript", theirs, "--tenant", "b", "--creds", str(keys.tenant_path("a"))]
    assert await asyncio.to_thread(main, argv) == 1
    assert "NATS refused it" in capsys.readouterr().err
    assert tenant_a.errors == [f'nats: permissions violation for publish to "{subjects.history("b", theirs)}"']


@pytest.mark.parametrize("session", ["*", ">"])
async def test_a_history_request_naming_no_one_session_is_refused_bad_id(services, tenant_a, root, session):
    """A wildcard as the session token (a client need not be pedantic: the server passes it, and a's permission
    `jetscribe.history.a.*` matches it) would read every session of a's at once, or fail as `unavailable`."""
    await store_session(root.jetstream(), "a", f"h{uuid.uuid4().hex[:6]}")
    reply = await tenant_a.nc.request(subjects.history("a", session), encode(HistoryRequest()), timeout=10)
    page = decode(reply.data, HistoryPage)
    assert (page.ok, page.code, page.messages) == (False, "bad_id", [])


async def test_a_history_request_with_no_reply_is_reported_not_dropped(services, tenant_a, root):
    reports = await root.subscribe(subjects.errors("ingest", "a"))
    await root.flush()
    await tenant_a.nc.publish(subjects.history("a", "nobody"), encode(HistoryRequest()))
    report = decode((await reports.next_msg(timeout=10)).data, ErrorEvent)
    assert (report.code, report.session_id) == ("bad_reply", "nobody")


async def test_jetscribe_tenant_revoke_deletes_the_tenants_readers(services, server, keys, root, monkeypatch, capsys):
    from jetscribe.cli.main import main

    monkeypatch.setenv("JETSCRIBE_NATS_KEYS", str(keys.folder))
    monkeypatch.setenv("NATS_URL", server.url)
    monkeypatch.setenv("NATS_CREDS", str(keys.path("operator")))
    tenant = f"rv{uuid.uuid4().hex[:6]}"
    keys.add_tenant(tenant)
    for name in ("one", "two"):
        assert await asyncio.to_thread(main, ["tenant", "reader", tenant, name]) == 0
    assert await asyncio.to_thread(main, ["tenant", "reader", "a", f"{tenant}_x"]) == 0  # begins like theirs: stays
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["tenant", "revoke", tenant]) == 0
    assert f"deleted {tenant}'s readers: reader_{tenant}_one, reader_{tenant}_two" in capsys.readouterr().out
    for name in ("one", "two"):
        with pytest.raises(nats.js.errors.NotFoundError):
            await root.jetstream().consumer_info(subjects.TRANSCRIPTS_STREAM, f"reader_{tenant}_{name}")
    assert (await root.jetstream().consumer_info(subjects.TRANSCRIPTS_STREAM, f"reader_a_{tenant}_x")).config
    assert keys.readers(tenant) == {}  # added again, it starts with none
    assert await asyncio.to_thread(main, ["tenant", "reader", "a", f"{tenant}_x", "--remove"]) == 0


@pytest.mark.parametrize("role", ["ingest", "transcriber", "persister"])
@pytest.mark.parametrize(
    "endpoint", ["STREAM.DELETE.AUDIO", "STREAM.PURGE.TRANSCRIPTS", "STREAM.DELETE.KV_session_checkpoints"]
)
async def test_a_services_key_cannot_delete_or_purge_a_stream(services, server, keys, root, role, endpoint):
    """Each service's JetStream API rights are what it uses (shared/natsauth.service_jetstream_api), not `$JS.API.>`:
    its key alone cannot delete or purge a stream, while the services run on the same rights (the fixture)."""
    stream = endpoint.rsplit(".", 1)[1]
    before = await root.jetstream().stream_info(stream)
    service = await Client().connect(server.url, keys.path(role))
    try:
        with pytest.raises(nats.errors.TimeoutError):
            await service.nc.request(f"$JS.API.{endpoint}", b"{}", timeout=1)
        await service.refused("publish", f"$JS.API.{endpoint}")
    finally:
        await service.close()
    after = await root.jetstream().stream_info(stream)
    assert after.config.name == stream and after.state.last_seq == before.state.last_seq
