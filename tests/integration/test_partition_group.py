"""The transcribers' consumer group against a real nats-server: ownership, rebalancing, takeover
after a crash, and the server fencing a stale owner.

Each test has its own stream, consumers and buckets on the shared server, and short timings
(lease TTL 2 s, heartbeat 0.5 s, ack_wait 2 s)."""

import asyncio
import contextlib
import inspect
import json
import time
import uuid

import nats
import pytest
from nats.js.api import KeyValueConfig, StreamConfig, SubjectTransform
from nats.js.errors import KeyNotFoundError, ServiceUnavailableError

from jetscribe.services.transcriber.group import Fence, PartitionGroup, PartitionLost, _Held
from jetscribe.services.transcriber.partitions import decode_lease, decode_member
from jetscribe.shared.config import StreamSettings, TranscriberConfig
from jetscribe.shared.jetstream import EXPECTED_LAST_SUBJECT_SEQUENCE_HEADER, WrongLastSequenceError
from jetscribe.shared.natsauth import env_connect_options
from jetscribe.shared.subjects import partition_lease_key

P = 16
TTL_S = 2
HEARTBEAT_S = 0.5
ACK_WAIT_S = 10.0  # longer than any wait here: redelivery must not depend on it


class Setup:
    """A partitioned stream like AUDIO, and group settings that point at it."""

    def __init__(self):
        tag = uuid.uuid4().hex[:8]
        self.stream = f"GT{tag}"
        self.prefix = f"gt{tag}"
        self.members_bucket = f"members_{tag}"
        self.leases_bucket = f"leases_{tag}"
        self.out_stream = f"GO{tag}"  # fenced writes, as the transcribers' into TRANSCRIPTS
        self.kv_bucket = f"ckpt_{tag}"  # fenced writes to a KV bucket, as their checkpoints
        self.fenced_made = False

    async def create_fenced(self, js, max_age_s: float = 0.0):
        """The streams `fences()` names; their messages age out after `max_age_s` (0: never)."""
        await js.add_stream(
            StreamConfig(
                name=self.out_stream, subjects=[f"{self.prefix}out.>", f"{self.prefix}claim.*"], max_age=max_age_s
            )
        )
        await js.create_key_value(KeyValueConfig(bucket=self.kv_bucket, history=1, ttl=max_age_s or None))
        self.fenced_made = True

    def fences(self):
        return (
            Fence("out", self.out_stream, lambda p: f"{self.prefix}claim.p{p}"),
            Fence("kv", f"KV_{self.kv_bucket}", lambda p: f"$KV.{self.kv_bucket}.claim=p{p}"),
        )

    def out(self, partition):
        return f"{self.prefix}out.p{partition}"

    def kv(self, key):
        return f"$KV.{self.kv_bucket}.{key}"

    async def create(self, js):
        await js.add_stream(
            StreamConfig(
                name=self.stream,
                subjects=[f"{self.prefix}.*.*"],
                subject_transform=SubjectTransform(
                    src=f"{self.prefix}.*.*",
                    dest=f"{self.prefix}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}.{{{{partition({P},1,2)}}}}",
                ),
            )
        )

    def names(self):
        return dict(
            stream=self.stream,
            consumer_name=lambda p: f"tr-p{p}",
            filter_subject=lambda p: f"{self.prefix}.*.*.{p}",
            members_bucket=self.members_bucket,
            leases_bucket=self.leases_bucket,
        )

    def group(self, nc, member_id, **kwargs):
        return PartitionGroup(
            nc,
            member_id,
            partitions=P,
            heartbeat_s=HEARTBEAT_S,
            lease_ttl_s=TTL_S,
            ack_wait_s=ACK_WAIT_S,
            max_ack_pending=1000,
            **self.names(),
            **kwargs,
        )

    async def publish(self, js, count, start=0):
        for i in range(start, start + count):
            await js.publish(f"{self.prefix}.acme.s{i}", f"m{i}".encode())

    async def consumers_settled(self, js):
        """True once every partition's consumer has delivered and had acked everything stored."""
        for p in range(P):
            info = await js.consumer_info(self.stream, f"tr-p{p}")
            if info.num_pending or info.num_ack_pending:
                return False
        return True


class Worker:
    """A stand-in transcriber: consumes each assigned partition, records what it got and when it
    owned what."""

    def __init__(self, setup, nc, name, ack=True):
        self.name = name
        self.nc = nc
        self.ack = ack
        self.group = setup.group(nc, name, on_assigned=self.on_assigned, on_revoked=self.on_revoked)
        self.since: dict[int, float] = {}
        self.intervals: list[tuple[int, float, float]] = []  # (partition, owned from, owned until)
        self.received: list[tuple[int, int, float, int]] = []  # (partition, stream seq, when, deliveries)
        self.pullers = {}
        self.tasks: dict[int, asyncio.Task] = {}

    async def on_assigned(self, partition, puller):
        self.since[partition] = time.monotonic()
        self.pullers[partition] = puller
        self.tasks[partition] = asyncio.create_task(self.consume(partition, puller))

    async def on_revoked(self, partition, lost):
        task = self.tasks.pop(partition)
        await asyncio.wait_for(task, 5)  # the puller is stopped: the loop ends on PartitionLost
        self.intervals.append((partition, self.since.pop(partition), time.monotonic()))

    async def consume(self, partition, puller):
        while True:
            try:
                msgs = await puller.fetch(64, timeout=0.5)
            except PartitionLost:
                return
            for msg in msgs:
                meta = msg.metadata
                assert msg.subject.endswith(f".{partition}")
                self.received.append((partition, meta.sequence.stream, time.monotonic(), meta.num_delivered))
                if self.ack:
                    await msg.ack()

    def all_intervals(self, now):
        return self.intervals + [(p, since, now) for p, since in self.since.items()]

    async def crash(self):
        """Stop without a word: no release, no callbacks, connection gone."""
        await self.group.stop(release=False)
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        self.intervals += [(p, since, time.monotonic()) for p, since in self.since.items()]
        self.since.clear()
        await self.nc.close()


async def wait_for(condition, timeout, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic()
        await asyncio.sleep(step)
    raise AssertionError(f"condition not met within {timeout} s")


async def partition_of(js, setup, session):
    info = await js.stream_info(setup.stream, subjects_filter=f"{setup.prefix}.acme.{session}.*")
    return int(next(iter(info.state.subjects)).rsplit(".", 1)[1])


async def members_of(js, setup) -> set[str]:
    """The member ids the group's member bucket holds now."""
    kv = await js.key_value(setup.members_bucket)
    members = set()
    for key in await kv.keys():
        with contextlib.suppress(KeyNotFoundError):
            members.add(decode_member((await kv.get(key)).value)[0])
    return members


async def lease_owners(js, setup) -> dict[int, str]:
    """partition -> the member id holding its lease now (a released lease is deleted: no entry)."""
    kv = await js.key_value(setup.leases_bucket)
    owners = {}
    for partition in range(P):
        try:
            entry = await kv.get(partition_lease_key(partition))
        except KeyNotFoundError:
            continue
        owners[partition] = decode_lease(entry.value, entry.revision).owner.split("#", 1)[0]
    return owners


def assert_no_overlap(workers):
    now = time.monotonic()
    for p in range(P):
        spans = sorted((start, end, w.name) for w in workers for q, start, end in w.all_intervals(now) if q == p)
        for (_s1, e1, w1), (s2, _e2, w2) in zip(spans, spans[1:], strict=False):
            assert e1 <= s2, f"partition {p} owned by {w1} until {e1} and by {w2} from {s2}"
    for w in workers:  # every message was handled inside an ownership interval of its worker
        spans = w.all_intervals(now)
        for p, _, when, _ in w.received:
            assert any(q == p and s <= when <= e for q, s, e in spans), (w.name, p, when)


@pytest.fixture
async def env(nats_url):
    setup = Setup()
    conns = []

    async def connect():
        nc = await nats.connect(nats_url, **env_connect_options(nats_url))
        conns.append(nc)
        return nc

    admin = await connect()
    js = admin.jetstream()
    await setup.create(js)
    yield setup, js, connect
    for nc in conns:
        if not nc.is_closed:
            await nc.close()
    js = (await nats.connect(nats_url, **env_connect_options(nats_url))).jetstream()
    await js.delete_stream(setup.stream)
    for bucket in (setup.members_bucket, setup.leases_bucket):
        await js.delete_key_value(bucket)
    if setup.fenced_made:
        await js.delete_stream(setup.out_stream)
        await js.delete_key_value(setup.kv_bucket)
    await js._nc.close()


async def test_one_member_owns_all_partitions_and_consumes_them(env):
    setup, js, connect = env
    a = Worker(setup, await connect(), "a")
    await a.group.start()
    await wait_for(lambda: len(a.group.owned) == P, 5)
    await setup.publish(js, 64)
    await wait_for(lambda: len(a.received) == 64, 10)
    await wait_for(lambda: setup.consumers_settled(js), 5)
    assert sorted(seq for _, seq, _, _ in a.received) == list(range(1, 65))
    assert len({p for p, *_ in a.received}) > 8  # spread over partitions
    # Every delivery came through a pinned pull of this member.
    assert all(puller.pin_id for puller in a.pullers.values() if puller.partition in {p for p, *_ in a.received})
    # The consumers carry the priority group.
    info = await js._nc.request(f"$JS.API.CONSUMER.INFO.{setup.stream}.tr-p0", b"", timeout=2)
    config = json.loads(info.data)["config"]
    assert config["priority_policy"] == "pinned_client" and config["priority_groups"] == ["transcribers"]
    assert config["ack_wait"] == int(ACK_WAIT_S * 1e9) and config["max_ack_pending"] == 1000
    await a.group.stop()
    assert a.group.owned == frozenset()
    assert_no_overlap([a])


async def test_a_joining_member_takes_its_share_without_overlap(env):
    setup, js, connect = env
    a = Worker(setup, await connect(), "a")
    await a.group.start()
    await wait_for(lambda: len(a.group.owned) == P, 5)

    async def publish_steadily():
        for i in range(0, 400, 10):
            await setup.publish(js, 10, start=i)
            await asyncio.sleep(0.02)

    publisher = asyncio.create_task(publish_steadily())
    await asyncio.sleep(0.2)
    b = Worker(setup, await connect(), "b")
    await b.group.start()
    await wait_for(
        lambda: len(a.group.owned) == 8 and len(b.group.owned) == 8 and a.group.owned.isdisjoint(b.group.owned), 10
    )
    await publisher
    await wait_for(lambda: len(a.received) + len(b.received) >= 400, 10)
    await wait_for(lambda: setup.consumers_settled(js), 10)

    handed_out = sorted(seq for w in (a, b) for _, seq, _, _ in w.received)
    assert handed_out == list(range(1, 401))  # each message handed to exactly one worker, once
    assert b.received, "the joiner got nothing"
    assert_no_overlap([a, b])

    # b leaves gracefully: once its stop returns it is out of the member set and holds no lease, so a takes
    # everything back at its next rebalance, with no lease left to expire. (Timed against the lease TTL instead, the
    # hand-back took 0.8-0.9 s here, and 2.1 s with three busy loops on the two cores.)
    left_at = time.monotonic()
    await b.group.stop()
    assert "b" not in await members_of(js, setup)
    assert "b" not in (await lease_owners(js, setup)).values()
    back = await wait_for(lambda: len(a.group.owned) == P, TTL_S + HEARTBEAT_S + 3)
    print(f"graceful hand-back after {back - left_at:.2f} s")
    await setup.publish(js, 50, start=400)
    await wait_for(lambda: len(a.received) + len(b.received) >= 450, 10)
    await wait_for(lambda: setup.consumers_settled(js), 10)
    assert sorted(seq for w in (a, b) for _, seq, _, _ in w.received) == list(range(1, 451))
    await a.group.stop()
    assert_no_overlap([a, b])


async def test_survivor_takes_over_a_crashed_members_partitions(env):
    setup, js, connect = env
    a = Worker(setup, await connect(), "a", ack=False)  # holds what it gets, as if mid-decode
    b = Worker(setup, await connect(), "b")
    await a.group.start()
    await b.group.start()
    await wait_for(lambda: len(a.group.owned) == 8 and len(b.group.owned) == 8, 10)
    await setup.publish(js, 100)
    await wait_for(lambda: len(a.received) + len(b.received) == 100, 10)
    held_by_a = {seq for _, seq, _, _ in a.received}
    assert held_by_a

    crashed_at = time.monotonic()
    await a.crash()
    took_over = await wait_for(lambda: len(b.group.owned) == P, TTL_S + HEARTBEAT_S + 3)
    print(f"takeover after {took_over - crashed_at:.2f} s")
    assert took_over - crashed_at <= TTL_S + HEARTBEAT_S + 1.5
    # a's unacked messages come back to b at once: a new owner resets the consumer to its ack floor.
    back = await wait_for(lambda: held_by_a <= {seq for _, seq, _, _ in b.received}, ACK_WAIT_S + 5)
    print(f"held messages redelivered {back - took_over:.2f} s after the takeover")
    assert back - took_over < 1.0
    await wait_for(lambda: setup.consumers_settled(js), 5)
    assert_no_overlap([a, b])
    await b.group.stop()


async def test_the_server_fences_a_stale_owner(env):
    setup, js, connect = env
    nc_a = await connect()
    a = setup.group(nc_a, "a")
    await a.start()
    await wait_for(lambda: len(a.owned) == P, 5)
    await setup.publish(js, 32)
    got = {}
    for p in sorted(a.owned):  # a pulls once per partition and gets pinned where there was audio
        puller = a._held[p].puller
        msgs = await puller.fetch(64, timeout=0.2)
        for msg in msgs:
            await msg.ack_sync()
        if msgs:
            got[p] = (puller, msgs[0].subject.split(".")[2])
    stale, session = next(iter(got.values()))
    assert stale.pin_id

    # a freezes (a GC pause, a stopped VM): no heartbeats, no renewals, yet it still believes it
    # owns the partition, as a process whose clock stood still would.
    for task in (a._heartbeat_task, a._rebalance_task):
        task.cancel()
    a._held[stale.partition].deadline = time.monotonic() + 60

    b = Worker(setup, await connect(), "b")
    await b.group.start()
    await wait_for(lambda: len(b.group.owned) == P, TTL_S + HEARTBEAT_S + 3)
    await js.publish(f"{setup.prefix}.acme.{session}", b"after takeover")
    await wait_for(lambda: any(p == stale.partition for p, *_ in b.received), 5)  # b is pinned there now

    # A raw pull with the stale pin id is refused with 423.
    inbox = nc_a.new_inbox()
    sub = await nc_a.subscribe(inbox)
    request = {"batch": 10, "expires": 500_000_000, "group": "transcribers", "id": stale.pin_id}
    await nc_a.publish(
        f"$JS.API.CONSUMER.MSG.NEXT.{setup.stream}.tr-p{stale.partition}", json.dumps(request).encode(), reply=inbox
    )
    refusal = await sub.next_msg(timeout=2)
    assert refusal.headers["Status"] == "423" and not refusal.data

    # The stale owner's own puller gets nothing, though there is audio, and learns it is fenced.
    await js.publish(f"{setup.prefix}.acme.{session}", b"more")
    assert await stale.fetch(64, timeout=0.5) == []
    assert stale.fenced and not stale.active
    with pytest.raises(PartitionLost):
        await stale.fetch(64, timeout=0.5)
    await wait_for(lambda: sum(p == stale.partition for p, *_ in b.received) == 2, 10)
    await b.group.stop()
    await a.stop(release=False)


async def test_a_static_member_owns_only_its_listed_partitions(env):
    setup, js, connect = env
    config = TranscriberConfig(partitions="0,1,2", worker_id="edge", heartbeat_s=HEARTBEAT_S, lease_ttl_s=TTL_S)
    settings = StreamSettings(partitions=P)
    edge = PartitionGroup.from_config(await connect(), settings, config, fences=(), **setup.names())
    anywhere = setup.group(await connect(), "anywhere")
    await edge.start()
    await wait_for(lambda: edge.owned == {0, 1, 2}, 5)
    await anywhere.start()
    await wait_for(lambda: len(edge.owned) + len(anywhere.owned) == P and edge.owned.isdisjoint(anywhere.owned), 10)
    assert edge.owned <= {0, 1, 2}
    await asyncio.gather(edge.stop(), anywhere.stop())


def test_member_ids_must_be_kv_keys():
    with pytest.raises(ValueError):
        PartitionGroup(nats.NATS(), "host name")
    with pytest.raises(ValueError):  # renewals must come well inside the lease
        PartitionGroup(nats.NATS(), "w1", heartbeat_s=2.0, lease_ttl_s=5.0)


async def test_three_workers_with_churn_never_share_a_partition(env):
    """30 live sessions while workers join, one leaves and one crashes: at no instant do two
    workers own a partition, and every chunk is handed out (again only if its worker crashed)."""
    setup, js, connect = env
    sessions, chunks = 30, 20

    async def stream_sessions():
        for seq in range(chunks):
            for s in range(sessions):
                await js.publish(f"{setup.prefix}.acme.s{s}", f"{s}:{seq}".encode())
            await asyncio.sleep(0.15)

    a, b, c = [Worker(setup, await connect(), name) for name in "abc"]
    await a.group.start()
    publisher = asyncio.create_task(stream_sessions())
    await asyncio.sleep(0.3)
    await b.group.start()
    await asyncio.sleep(0.3)
    await c.group.start()
    await wait_for(lambda: sorted(len(w.group.owned) for w in (a, b, c)) == [5, 5, 6], 10)
    await b.group.stop()  # a graceful leave
    await asyncio.sleep(0.5)
    await c.crash()
    d = Worker(setup, await connect(), "d")
    await d.group.start()
    await publisher
    workers = [a, b, c, d]
    await wait_for(lambda: len(a.group.owned) + len(d.group.owned) == P, TTL_S + HEARTBEAT_S + 3)
    total = sessions * chunks
    await wait_for(lambda: len({seq for w in workers for _, seq, _, _ in w.received}) == total, ACK_WAIT_S + 10)
    await wait_for(lambda: setup.consumers_settled(js), 5)

    seen = [seq for w in workers for _, seq, _, _ in w.received]
    assert set(seen) == set(range(1, total + 1))
    crashed = {seq for _, seq, _, _ in c.received}
    twice = {seq for seq in seen if seen.count(seq) > 1}
    assert twice <= crashed, "only a crashed worker's messages may be handed out again"
    assert_no_overlap(workers)
    await asyncio.gather(a.group.stop(), d.group.stop())
    assert_no_overlap(workers)


async def test_an_owner_whose_pin_lapsed_pins_itself_again(env):
    """A worker that did not pull for priority_timeout (= the lease TTL) loses its pin but not its
    lease: its next pull is refused with 423, it confirms the lease, unpins and goes on."""
    setup, js, connect = env
    a = setup.group(await connect(), "a")
    await a.start()
    await wait_for(lambda: len(a.owned) == P, 5)
    await js.publish(f"{setup.prefix}.acme.s1", b"first")
    puller = a._held[await partition_of(js, setup, "s1")].puller
    msgs = await puller.fetch(10, timeout=1.0)
    assert [m.data for m in msgs] == [b"first"] and puller.pin_id
    await msgs[0].ack()
    old_pin = puller.pin_id
    await asyncio.sleep(TTL_S + 1)  # no pulls: the server drops the pin
    await js.publish(f"{setup.prefix}.acme.s1", b"second")
    got = []
    for _ in range(5):
        got += await puller.fetch(10, timeout=0.5)
        if got:
            break
    assert [m.data for m in got] == [b"second"]
    assert puller.pin_id and puller.pin_id != old_pin and not puller.fenced
    await a.stop()


def freeze(group, partition):
    """As a SIGSTOP would: no heartbeats, renewals or rebalances any more, and the member still believes it holds
    `partition` (its look at the lease passed just before the freeze, or its clock stood still)."""
    for task in (group._heartbeat_task, group._rebalance_task):
        task.cancel()
    group._held[partition].deadline = time.monotonic() + 60


async def stored_on(js, stream, subject):
    """(payload, headers) of every message on `subject` in `stream`, in order."""
    sub = await js.pull_subscribe(subject, stream=stream)
    out, unanswered = [], 0
    try:
        while True:
            try:
                msgs = await sub.fetch(100, timeout=0.5)
            except nats.errors.TimeoutError:
                return out
            except ServiceUnavailableError:  # on a cluster: the new consumer's interest has not reached us yet
                unanswered += 1
                assert unanswered < 25, "the consumer never answered a fetch"
                await asyncio.sleep(0.2)
                continue
            out += [(m.data, m.headers or {}) for m in msgs]
    finally:
        await sub.unsubscribe()


async def test_a_frozen_owners_writes_are_refused_once_another_member_claimed_the_partition(env):
    """group.py, 5.: the stream itself refuses a write made under a claim a later owner superseded, whatever the
    writer believes; the write is counted, the partition dropped, and nothing of it is stored."""
    setup, js, connect = env
    await setup.create_fenced(js)
    a = setup.group(await connect(), "a", fences=setup.fences())
    await a.start()
    await wait_for(lambda: len(a.owned) == P, 5)
    ack = await a.write(3, "out", setup.out(3), b"a before")
    claim = a._held[3].claims["out"]
    assert (await stored_on(js, setup.out_stream, setup.out(3)))[-1][1][EXPECTED_LAST_SUBJECT_SEQUENCE_HEADER] == str(
        claim.seq
    )
    assert ack["seq"] > claim.seq
    await a.write(4, "kv", setup.kv("acme.s1"), b"checkpoint by a")

    for partition in (3, 4):
        freeze(a, partition)
    b = setup.group(await connect(), "b", fences=setup.fences())
    await b.start()
    await wait_for(lambda: len(b.owned) == P, TTL_S + HEARTBEAT_S + 3)

    with pytest.raises(PartitionLost):  # it passed its own look at the lease: the stream refuses
        await a.write(3, "out", setup.out(3), b"a after")
    with pytest.raises(PartitionLost):
        await a.write(4, "kv", setup.kv("acme.s1"), b"stale checkpoint by a")
    assert a.refused_writes == 2 and a._held[3].lost and a._held[4].lost
    with pytest.raises(PartitionLost):  # dropped now: not even sent
        await a.write(3, "out", setup.out(3), b"a again")
    assert a.refused_writes == 2

    await b.write(3, "out", setup.out(3), b"b after")
    assert [data for data, _ in await stored_on(js, setup.out_stream, setup.out(3))] == [b"a before", b"b after"]
    entry = await (await js.key_value(setup.kv_bucket)).get("acme.s1")
    assert entry.value == b"checkpoint by a"
    await b.stop()
    await a.stop(release=False)


async def test_a_claim_made_over_one_seen_before_a_later_owners_lease_is_refused(env):
    """A member that froze between winning a lease and claiming cannot overwrite the claim of the owner who came
    after it: its claim is conditional on the claim it saw before its lease."""
    setup, js, connect = env
    await setup.create_fenced(js)
    a = setup.group(await connect(), "a", fences=setup.fences())
    seen = await a._claims_seen(5)  # then a wins the lease, and freezes
    b = setup.group(await connect(), "b", fences=setup.fences())
    await b.start()
    await wait_for(lambda: len(b.owned) == P, 5)
    with pytest.raises(WrongLastSequenceError):
        await a._claim(_Held(5, 1, time.monotonic() + 60), seen)
    await b.write(5, "out", setup.out(5), b"b keeps it")
    await b.stop()


async def test_claims_are_made_again_before_their_stream_ages_them_out(env):
    """Streams age claims out like any message; an owner claims again over its own claim in time, so its writes
    go on being stored long after its first claim would have gone."""
    setup, js, connect = env
    max_age = 2.0
    await setup.create_fenced(js, max_age_s=max_age)
    a = setup.group(await connect(), "a", fences=setup.fences())
    await a.start()
    await wait_for(lambda: len(a.owned) == P, 5)
    first = a._held[0].claims["out"].seq
    await asyncio.sleep(2.5 * max_age)
    await a.write(0, "out", setup.out(0), b"later")
    await a.write(0, "kv", setup.kv("acme.s1"), b"later")
    assert a._held[0].claims["out"].seq > first and a.refused_writes == 0 and len(a.owned) == P
    await a.stop()
