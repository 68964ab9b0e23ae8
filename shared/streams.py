"""Connecting to NATS and declaring the JetStream streams every service relies on."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.client import Client
from nats.js.api import DiscardPolicy, KeyValueConfig, RetentionPolicy, StorageType, StreamConfig, SubjectTransform
from nats.js.client import JetStreamContext
from nats.js.errors import BadRequestError, BucketNotFoundError
from nats.js.kv import KeyValue

from jetscribe.shared import subjects
from jetscribe.shared.config import StreamSettings
from jetscribe.shared.natsauth import ClientAuth
from jetscribe.shared.retry import Stopped, service_stop

log = logging.getLogger(__name__)


async def connect(settings: StreamSettings, name: str, stop: asyncio.Event | None = None) -> Client:
    """One connection per process; it reconnects forever, so a NATS restart only pauses the service.

    The first connection too is retried until it succeeds, or until `stop` (by default the stop event
    of the service being served, see telemetry.serve) is set: then it raises Stopped.
    """

    connected = False

    async def on_disconnect() -> None:  # also fires on a clean close, so not a warning
        if connected:  # and on closing a client that never connected: not worth a line
            log.info("%s: disconnected from NATS", name)

    async def on_reconnect() -> None:
        log.warning("%s: reconnected to NATS", name)

    async def on_error(exc: Exception) -> None:
        log.warning("%s: NATS error: %s", name, exc)

    nc = Client()
    connecting = asyncio.ensure_future(
        nc.connect(
            settings.nats_url,
            name=name,
            max_reconnect_attempts=-1,
            # nats-py annotates this int, but only sleeps on it and compares it with float times
            reconnect_time_wait=0.5,  # type: ignore[arg-type]
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            error_cb=on_error,
            **ClientAuth.of(settings).connect_options(settings.nats_url),
        )
    )
    if stop is None:
        stop = service_stop.get()
    stopping = asyncio.ensure_future(stop.wait()) if stop is not None else None
    try:
        await asyncio.wait([t for t in (connecting, stopping) if t is not None], return_when=asyncio.FIRST_COMPLETED)
    finally:
        if stopping is not None:
            stopping.cancel()
        if not connecting.done():  # stopped, or this task was cancelled
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
            with contextlib.suppress(Exception):
                await nc.close()
    if connecting.cancelled():
        raise Stopped("connecting to NATS")
    connecting.result()  # raises what connecting raised
    connected = True
    return nc


def stream_configs(settings: StreamSettings) -> list[StreamConfig]:
    src, dest = subjects.audio_partition_transform(settings.partitions)
    window = min(settings.duplicate_window_s, settings.audio_max_age_s)
    return [
        StreamConfig(
            name=subjects.AUDIO_STREAM,
            subjects=[subjects.AUDIO_PUBLISHED],
            subject_transform=SubjectTransform(src=src, dest=dest),
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=settings.audio_max_age_s,
            duplicate_window=window,
        ),
        StreamConfig(
            name=subjects.TRANSCRIPTS_STREAM,
            subjects=[subjects.TRANSCRIPTS_ALL, subjects.SESSION_EVENTS_ALL],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=settings.transcripts_max_age_s,
            duplicate_window=min(settings.duplicate_window_s, settings.transcripts_max_age_s),
        ),
        StreamConfig(
            name=subjects.ERRORS_STREAM,
            subjects=[subjects.ERRORS_ALL],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=24 * 3600.0,
            max_msgs=100_000,
            discard=DiscardPolicy.OLD,
        ),
    ]


async def ensure_streams(js: JetStreamContext, settings: StreamSettings) -> None:
    """Create the streams, or bring an existing one to this configuration. Safe to call from every service."""
    for config in stream_configs(settings):
        try:
            await js.add_stream(config)
        except BadRequestError:
            # Exists with other settings: update what may change in place.
            await js.update_stream(config)


async def ensure_checkpoints(js: JetStreamContext, settings: StreamSettings) -> KeyValue:
    """The transcribers' KV bucket of session checkpoints. Entries outlive the audio they describe, so a
    late redelivery of a finished session is still recognised."""
    ttl = 2 * settings.audio_max_age_s
    try:
        return await js.key_value(subjects.SESSION_CHECKPOINTS_BUCKET)
    except BucketNotFoundError:
        return await js.create_key_value(
            KeyValueConfig(
                bucket=subjects.SESSION_CHECKPOINTS_BUCKET, history=1, ttl=ttl or None, storage=StorageType.FILE
            )
        )
