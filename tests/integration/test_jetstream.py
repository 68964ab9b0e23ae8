"""shared/jetstream.py against a real nats-server: KV compare-and-set and TTL writes, RESET, UNPIN and a
pinned pull refused with 423. Each test has its own stream, consumer or bucket on the shared server."""

import asyncio
import time
import uuid

import nats
import nats.errors
import pytest
from nats.js.api import KeyValueConfig, StreamConfig
from nats.js.errors import KeyNotFoundError

from jetscribe.shared.jetstream import (
    ERR_CONSUMER_NOT_FOUND,
    ERR_STREAM_NOT_FOUND,
    ERR_WRONG_LAST_SEQUENCE,
    JetStreamAPI,
    JetStreamAPIError,
    NotFoundError,
    PinMismatchError,
    WrongLastSequenceError,
    is_stored_message,
    kv_key,
    kv_subject,
    nanoseconds,
    pin_id,
    pull_status,
)
from jetscribe.shared.natsauth import env_connect_options

GROUP = "workers"


@pytest.fixture
async def nc(nats_url):
    conn = await nats.connect(nats_url, **env_connect_options(nats_url))
    yield conn
    await conn.close()


@pytest.fixture
async def bucket(nc):
    name = f"jsapi_{uuid.uuid4().hex[:8]}"
    await nc.jetstream().create_key_value(KeyValueConfig(bucket=name, history=1))
    return name


@pytest.fixture
async def stream(nc):
    name = f"JS{uuid.uuid4().hex[:8]}"
    await nc.jetstream().add_stream(StreamConfig(name=name, subjects=[f"{name.lower()}.>"]))
    return name


def consumer_config(name, **extra):
    return {
        "durable_name": name,
        "ack_policy": "explicit",
        "deliver_policy": "all",
        "ack_wait": nanoseconds(30),
        **extra,
    }


async def test_kv_compare_and_set(nc, bucket):
    api = JetStreamAPI(nc)
    first = await api.kv_put(bucket, "p0", b"a", last_revision=0)  # 0: only if the key has no entry
    with pytest.raises(WrongLastSequenceError) as refused:
        await api.kv_put(bucket, "p0", b"b", last_revision=0)
    assert refused.value.err_code == ERR_WRONG_LAST_SEQUENCE and refused.value.status == 400
    assert refused.value.code == "jetstream_wrong_last_sequence"
    assert isinstance(refused.value, JetStreamAPIError)
    with pytest.raises(WrongLastSequenceError):
        await api.kv_put(bucket, "p0", b"c", last_revision=first + 100)
    second = await api.kv_put(bucket, "p0", b"d", last_revision=first)
    assert second > first
    entry = await (await nc.jetstream().key_value(bucket)).get("p0")
    assert (entry.value, entry.revision) == (b"d", second)


async def test_kv_write_with_ttl_expires(nc, bucket):
    api = JetStreamAPI(nc)
    kv = await nc.jetstream().key_value(bucket)
    await api.kv_put(bucket, "short", b"gone soon", ttl_s=1)
    await api.kv_put(bucket, "plain", b"stays")
    assert (await kv.get("short")).value == b"gone soon"
    deadline = time.monotonic() + 10
    while True:
        try:
            await kv.get("short")
        except KeyNotFoundError:
            break
        assert time.monotonic() < deadline, "the entry outlived its 1 s TTL by 9 s"
        await asyncio.sleep(0.2)
    assert (await kv.get("plain")).value == b"stays"
    with pytest.raises(ValueError):
        await api.kv_put(bucket, "k", b"x", ttl_s=0)


async def test_kv_purge_leaves_no_marker(nc, bucket):
    api, js = JetStreamAPI(nc), nc.jetstream()
    await api.kv_put(bucket, "gone", b"1")
    await api.kv_put(bucket, "kept", b"2")
    await api.kv_purge(bucket, "gone")
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=kv_subject(bucket))
    assert sorted(kv_key(bucket, s) for s in info.state.subjects) == ["kept"]  # no delete marker left behind
    await api.kv_purge(bucket, "never-written")  # nothing to purge is fine


async def test_reset_redelivers_what_is_unacked(nc, stream):
    api, js = JetStreamAPI(nc), nc.jetstream()
    await api.create_consumer(stream, consumer_config("c"))
    for i in range(3):
        await js.publish(f"{stream.lower()}.x", f"m{i}".encode())
    sub = await js.pull_subscribe_bind("c", stream=stream)
    first = await sub.fetch(3, timeout=2)
    await first[0].ack()  # the ack floor moves past m0 only
    # Acks are processed asynchronously: a RESET sent right behind one may still see it unacked.
    while (await js.consumer_info(stream, "c")).ack_floor.stream_seq < first[0].metadata.sequence.stream:
        await asyncio.sleep(0.05)
    reply = await api.reset(stream, "c")
    assert reply["reset_seq"] == first[1].metadata.sequence.stream
    again = await sub.fetch(3, timeout=2)
    assert [m.data for m in again] == [b"m1", b"m2"]
    # nats-server 2.15.1 restarts the delivery count on a reset: num_delivered cannot tell a redelivery.
    assert [m.metadata.num_delivered for m in again] == [1, 1]


async def test_unknown_consumer_or_stream_is_not_found(nc, stream):
    api = JetStreamAPI(nc)
    with pytest.raises(NotFoundError) as missing:
        await api.unpin(stream, "nobody", GROUP)
    assert (missing.value.status, missing.value.err_code) == (404, ERR_CONSUMER_NOT_FOUND)
    with pytest.raises(NotFoundError) as missing:
        await api.unpin("NOSUCHSTREAM", "nobody", GROUP)
    assert (missing.value.status, missing.value.err_code) == (404, ERR_STREAM_NOT_FOUND)


async def test_reset_of_a_missing_consumer_gets_no_answer(nc, stream):
    # nats-server 2.15.1 does not answer RESET for a consumer that does not exist: callers see a timeout.
    with pytest.raises(nats.errors.TimeoutError):
        await JetStreamAPI(nc, timeout_s=0.5).reset(stream, "nobody")


async def test_refused_consumer_config_is_an_api_error(nc, stream):
    with pytest.raises(JetStreamAPIError) as refused:
        await JetStreamAPI(nc).create_consumer(stream, consumer_config("bad", priority_policy="pinned_client"))
    assert refused.value.status == 400 and refused.value.err_code and refused.value.description


async def pull_one(api, sub, stream, consumer, reply, pin=None):
    """One pinned pull: the stored message it brings, or the status that ended it."""
    await api.pull(stream, consumer, reply=reply, batch=1, expires_s=2, group=GROUP, pin=pin)
    while True:
        msg = await sub.next_msg(timeout=3)
        if is_stored_message(msg) or msg.headers.get("Status") != "100":  # not an idle heartbeat
            return msg


async def test_pinned_pull_unpin_and_pin_mismatch(nc, stream):
    api, js = JetStreamAPI(nc), nc.jetstream()
    await api.create_consumer(
        stream,
        consumer_config(
            "pinned", priority_groups=[GROUP], priority_policy="pinned_client", priority_timeout=nanoseconds(30)
        ),
    )
    inbox = nc.new_inbox()
    sub = await nc.subscribe(f"{inbox}.*")
    for i in range(3):
        await js.publish(f"{stream.lower()}.x", f"m{i}".encode())

    msg = await pull_one(api, sub, stream, "pinned", f"{inbox}.1")  # no id: this request gets pinned
    old_pin = pin_id(msg)
    assert msg.data == b"m0" and old_pin
    await msg.ack()

    await api.unpin(stream, "pinned", GROUP)
    msg = await pull_one(api, sub, stream, "pinned", f"{inbox}.2")  # a new client, pinned now
    new_pin = pin_id(msg)
    assert msg.data == b"m1" and new_pin and new_pin != old_pin
    await msg.ack()

    status = await pull_one(api, sub, stream, "pinned", f"{inbox}.3", pin=old_pin)
    with pytest.raises(PinMismatchError) as refused:
        pull_status(status)
    assert refused.value.status == 423 and refused.value.code == "jetstream_pin_mismatch"

    msg = await pull_one(api, sub, stream, "pinned", f"{inbox}.4", pin=new_pin)  # the pinned client goes on
    assert msg.data == b"m2" and pin_id(msg) == new_pin
    await sub.unsubscribe()
