"""A tenant's durable readers: PULL consumers on TRANSCRIPTS made for it with the operator's rights.

A tenant's NATS user may not create consumers (shared/natsauth.py says why); `jetscribe tenant reader T NAME`
records the reader in the keyring (so T's user may pull from it, look at it and ack) and makes its consumer here.
The tenant then reads with a pull subscription bound to it, e.g. in nats-py
`await js.pull_subscribe_bind(durable="reader_T_NAME", stream="TRANSCRIPTS")`, and resumes after a restart from
the first message it had not acked.
"""

from __future__ import annotations

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from jetscribe.shared import subjects


def reader_config(
    consumer: str, filter_subject: str, ack_wait_s: float = 30.0, max_ack_pending: int | None = None
) -> ConsumerConfig:
    """A durable pull consumer (no deliver subject: it pushes nowhere), from the start of what the stream holds,
    acked explicitly; `max_ack_pending=1` hands out the next message only once the one before is acked, so a
    redelivery after a crash comes before any later message (a reader that must keep stream order)."""
    return ConsumerConfig(
        name=consumer,
        durable_name=consumer,
        filter_subject=filter_subject,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s,
        max_ack_pending=max_ack_pending,
    )


class ReaderConflict(RuntimeError):
    """A consumer of that name exists and is not this reader (another filter, or a push consumer)."""


async def provision_reader(
    nc, consumer: str, filter_subject: str, ack_wait_s: float = 30.0, max_ack_pending: int | None = None
) -> bool:
    """Make the reader's consumer unless it is there; True if it was made. One that is there with another filter
    or a deliver subject is refused, not changed."""
    js = nc.jetstream()
    try:
        info = await js.consumer_info(subjects.TRANSCRIPTS_STREAM, consumer)
    except NotFoundError:
        config = reader_config(consumer, filter_subject, ack_wait_s, max_ack_pending)
        await js.add_consumer(subjects.TRANSCRIPTS_STREAM, config=config)
        return True
    if info.config.filter_subject != filter_subject or info.config.deliver_subject:
        raise ReaderConflict(
            f"consumer {consumer} exists with filter {info.config.filter_subject!r}"
            + (f" and deliver subject {info.config.deliver_subject!r}" if info.config.deliver_subject else "")
        )
    return False


async def remove_reader(nc, consumer: str) -> None:
    """Delete the reader's consumer (gone already is fine)."""
    try:
        await nc.jetstream().delete_consumer(subjects.TRANSCRIPTS_STREAM, consumer)
    except NotFoundError:
        pass
