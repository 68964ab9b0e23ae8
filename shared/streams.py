"""Connecting to NATS and declaring the JetStream streams every service relies on."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

import nats.errors
from nats.aio.client import Client
from nats.js.api import DiscardPolicy, KeyValueConfig, RetentionPolicy, StorageType, StreamConfig, SubjectTransform
from nats.js.client import JetStreamContext
from nats.js.errors import APIError, BadRequestError, NotFoundError, ServiceUnavailableError
from nats.js.kv import KeyValue

from jetscribe.shared import subjects
from jetscribe.shared.config import ConfigError, StreamSettings
from jetscribe.shared.natsauth import ClientAuth
from jetscribe.shared.retry import Stopped, service_stop

log = logging.getLogger(__name__)

T = TypeVar("T")


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
            settings.nats_servers,
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


def replicas(settings: StreamSettings, nc: Any) -> int:
    """Copies kept of every stream and KV bucket: JETSCRIBE_REPLICAS, or when it is 0 (auto), 3 if the server
    `nc` is connected to belongs to a cluster (its INFO names one) and 1 on a single server. A cluster of two
    nodes, or more than three copies, needs JETSCRIBE_REPLICAS set."""
    if settings.replicas:
        return settings.replicas
    nc = getattr(nc, "_nc", nc)  # a JetStreamContext keeps its connection there
    info = getattr(nc, "_server_info", None) or {}  # nats-py keeps the server's INFO only there
    return 3 if info.get("cluster") else 1


def stream_configs(settings: StreamSettings, copies: int = 1) -> list[StreamConfig]:
    """The three streams, each kept in `copies` replicas (see `replicas`)."""
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
            num_replicas=copies,
        ),
        StreamConfig(
            name=subjects.TRANSCRIPTS_STREAM,
            # The transcribers' claims on their partitions live beside the segments they fence (group.py).
            subjects=[subjects.TRANSCRIPTS_ALL, subjects.SESSION_EVENTS_ALL, subjects.TRANSCRIBER_CLAIMS_ALL],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=settings.transcripts_max_age_s,
            duplicate_window=min(settings.duplicate_window_s, settings.transcripts_max_age_s),
            num_replicas=copies,
        ),
        StreamConfig(
            name=subjects.ERRORS_STREAM,
            subjects=[subjects.ERRORS_ALL],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=24 * 3600.0,
            max_msgs=100_000,
            discard=DiscardPolicy.OLD,
            num_replicas=copies,
        ),
    ]


# On a cluster, a stream another service made a moment ago may not be found, or answered for, on every node yet
# (its copies are still electing a leader): asked again for a while, like a stream being recovered.
_SETTLING = (NotFoundError, ServiceUnavailableError, nats.errors.NoRespondersError, nats.errors.TimeoutError)
SETTLE_S = 30.0


async def while_settling(operation: Callable[[], Awaitable[T]], what: str, within_s: float = SETTLE_S) -> T:
    """`await operation()`, again on the errors of a cluster still settling (see _SETTLING), for up to `within_s`."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await operation()
        except _SETTLING as exc:
            if time.monotonic() > deadline:
                raise
            log.info("%s: %r; asking again", what, exc)
            await asyncio.sleep(0.25)


async def ensure_streams(js: JetStreamContext, settings: StreamSettings) -> None:
    """Create the streams, or bring an existing one to this configuration (its replicas too). Safe to call from
    every service, at once."""
    copies = replicas(settings, js)
    for config in stream_configs(settings, copies):

        async def ensure(config: StreamConfig = config) -> None:
            try:
                await js.add_stream(config)
            except BadRequestError:
                # Exists with other settings: update what may change in place.
                await js.update_stream(config)

        try:
            await while_settling(ensure, f"stream {config.name}")
        except APIError as exc:
            raise _replicas_refused(config.name or "", copies, exc) from exc


async def ensure_key_value(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    """Create a KV bucket, or open it as it is; of its configuration only its replicas are brought to `config`'s
    (a bucket made before the servers became a cluster gets its copies). Safe to call from every service, at once."""
    try:
        return await while_settling(lambda: _ensure_key_value(js, config), f"KV bucket {config.bucket}")
    except APIError as exc:
        raise _replicas_refused(f"KV bucket {config.bucket}", config.replicas, exc) from exc


async def _ensure_key_value(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    try:
        return await js.create_key_value(config)
    except BadRequestError:  # exists with another configuration (or another service created it meanwhile)
        pass
    kv = await js.key_value(config.bucket)
    info = await js.stream_info(f"KV_{config.bucket}")
    if info.config.num_replicas != config.replicas:
        log.info("KV bucket %s: %s -> %d replicas", config.bucket, info.config.num_replicas, config.replicas)
        await js.update_stream(replace(info.config, num_replicas=config.replicas))
    return kv


def _replicas_refused(what: str, copies: int, exc: APIError) -> Exception:
    if copies > 1 and exc.err_code == _ERR_INSUFFICIENT_RESOURCES:
        return ConfigError(
            f"{what}: NATS cannot keep {copies} copies ({exc.description}): set JETSCRIBE_REPLICAS to at most the "
            f"number of JetStream servers in the cluster"
        )
    return exc


_ERR_INSUFFICIENT_RESOURCES = 10023  # JetStream's "insufficient resources", e.g. more replicas than servers


async def ensure_checkpoints(js: JetStreamContext, settings: StreamSettings) -> KeyValue:
    """The transcribers' KV bucket of session checkpoints. Entries outlive the audio they describe, so a
    late redelivery of a finished session is still recognised."""
    ttl = 2 * settings.audio_max_age_s
    return await ensure_key_value(
        js,
        KeyValueConfig(
            bucket=subjects.SESSION_CHECKPOINTS_BUCKET,
            history=1,
            ttl=ttl or None,
            storage=StorageType.FILE,
            replicas=replicas(settings, js),
        ),
    )
