"""Connecting to NATS and declaring the JetStream streams every service relies on."""
from __future__ import annotations

import logging

import nats
from nats.aio.client import Client
from nats.js.api import DiscardPolicy, KeyValueConfig, RetentionPolicy, StorageType, StreamConfig, SubjectTransform
from nats.js.client import JetStreamContext
from nats.js.errors import BadRequestError, BucketNotFoundError

from shared import subjects
from shared.config import StreamSettings

log = logging.getLogger(__name__)


async def connect(settings: StreamSettings, name: str) -> Client:
    """One connection per process; it reconnects forever, so a NATS restart only pauses the service."""

    async def on_disconnect():  # also fires on a clean close, so not a warning
        log.info("%s: disconnected from NATS", name)

    async def on_reconnect():
        log.warning("%s: reconnected to NATS", name)

    async def on_error(exc):
        log.warning("%s: NATS error: %s", name, exc)

    return await nats.connect(
        settings.nats_url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        error_cb=on_error,
    )


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


async def ensure_checkpoints(js: JetStreamContext, settings: StreamSettings):
    """The transcribers' KV bucket of session checkpoints. Entries outlive the audio they describe, so a
    late redelivery of a finished session is still recognised."""
    ttl = 2 * settings.audio_max_age_s
    try:
        return await js.key_value(subjects.SESSION_CHECKPOINTS_BUCKET)
    except BucketNotFoundError:
        return await js.create_key_value(KeyValueConfig(bucket=subjects.SESSION_CHECKPOINTS_BUCKET, history=1,
                                                        ttl=ttl or None, storage=StorageType.FILE))
