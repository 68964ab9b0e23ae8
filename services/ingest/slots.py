"""The per-tenant session limit over all gateways: KV bucket `tenant_sessions`, key <tenant>, value its open
sessions. Every change is a compare-and-set on the key's revision (`core.admit` and `core.without` decide, this
file reads and writes), so two gateways starting sessions of one tenant at once cannot both take its last slot.

Slots are freed by the bot's end (the gateway that stored it) and by the transcriber's `ended` / `rejected`
events, read from TRANSCRIPTS through one durable consumer the gateways share, so an event that comes while
no gateway runs still frees its slot. A slot whose session never got stored (its gateway died in between)
is found when the tenant hits its limit: older than a minute and nothing of it in AUDIO.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable

import nats.errors
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyNotFoundError, NotFoundError

from jetscribe.services.ingest.core import (
    RequestRefused,
    TenantSessions,
    admit,
    decode_tenant_sessions,
    encode_tenant_sessions,
    stale_candidates,
    without,
)
from jetscribe.shared import jetstream, subjects
from jetscribe.shared.jetstream import JetStreamAPI, JetStreamAPIError, WrongLastSequenceError
from jetscribe.shared.streams import ensure_key_value
from jetscribe.shared.wire import SessionEvent, WireError, decode

log = logging.getLogger(__name__)

_WRITE_ATTEMPTS = 50  # compare-and-set rounds before giving up (each lost round means another gateway wrote)
_PRUNE_EVERY_S = 10.0  # a tenant at its limit is checked for stale slots at most this often per gateway
_NATS_ERRORS = (nats.errors.Error, asyncio.TimeoutError, JetStreamAPIError)


class TenantSlots:
    """Takes and frees the slots of `tenant_sessions`; `limit` is JETSCRIBE_MAX_SESSIONS_PER_TENANT."""

    def __init__(
        self, nc, limit: int, replicas: int = 1, report: Callable[[str, WireError], Awaitable[None]] | None = None
    ):
        """`report(subject, error)`: how a session event that frees nothing (unreadable, or not its subject's) is
        reported; it is terminated either way."""
        self.report = report
        self.js = nc.jetstream()
        self.replicas = replicas  # copies of the bucket
        self.api = JetStreamAPI(nc)
        self.limit = limit
        self.freed_stale = 0  # slots found stale and freed by this gateway
        self._kv = None
        self._pruned_at: dict[str, float] = {}

    async def open(self) -> None:
        self._kv = await ensure_key_value(
            self.js,
            KeyValueConfig(
                bucket=subjects.TENANT_SESSIONS_BUCKET, history=1, storage=StorageType.FILE, replicas=self.replicas
            ),
        )

    async def open_sessions(self, tenant: str) -> TenantSessions:
        return (await self._read(tenant))[0]

    async def take(self, tenant: str, session_id: str) -> None:
        """A slot for a new session; raises `too_many_sessions` at the limit, `unavailable` if NATS cannot say."""
        try:
            try:
                await self._update(tenant, lambda open_: admit(open_, tenant, session_id, self.limit, time.time()))
            except RequestRefused as exc:
                if exc.code != "too_many_sessions" or not await self._free_stale(tenant):
                    raise
                await self._update(tenant, lambda open_: admit(open_, tenant, session_id, self.limit, time.time()))
        except _NATS_ERRORS as exc:
            raise RequestRefused(
                "unavailable", f"could not count the tenant's sessions, send it again: {exc!r}"
            ) from None

    async def free(self, *session_ids: str, tenant: str) -> bool:
        """Free these sessions' slots; True if one was held. Raises NATS errors."""
        return await self._update(tenant, lambda open_: without(open_, *session_ids))

    async def free_quietly(self, tenant: str, session_id: str) -> None:
        """Free a slot where failing must not fail the request: the transcriber's `ended` frees it later."""
        try:
            await self.free(session_id, tenant=tenant)
        except Exception as exc:
            log.warning("could not free the slot of %s/%s now (%r); its `ended` event will", tenant, session_id, exc)

    async def _read(self, tenant: str) -> tuple[TenantSessions, int]:
        """(open sessions, revision to compare-and-set against; 0 = the key has no entry)."""
        try:
            entry = await self._kv.get(tenant)
        except KeyNotFoundError as err:
            return {}, err.entry.revision if err.entry is not None else 0
        return decode_tenant_sessions(entry.value), entry.revision

    async def _update(self, tenant: str, change: Callable[[TenantSessions], TenantSessions | None]) -> bool:
        """Apply `change` by compare-and-set until it sticks; False if it had nothing to change."""
        for attempt in range(_WRITE_ATTEMPTS):
            if attempt:  # another gateway wrote since we read: read again, after a jittered pause
                await asyncio.sleep(random.uniform(0, 0.001 * attempt))
            current, revision = await self._read(tenant)
            new = change(current)
            if new is None:
                return False
            try:
                await self.api.kv_put(
                    subjects.TENANT_SESSIONS_BUCKET, tenant, encode_tenant_sessions(new), last_revision=revision
                )
                return True
            except WrongLastSequenceError:
                continue
        raise RequestRefused("unavailable", f"the session count of tenant {tenant} is changing too fast; send it again")

    async def _free_stale(self, tenant: str) -> bool:
        """Free the slots of sessions that were never stored; True if any was. At most every _PRUNE_EVERY_S."""
        now = time.monotonic()
        if now - self._pruned_at.get(tenant, -_PRUNE_EVERY_S) < _PRUNE_EVERY_S:
            return False
        self._pruned_at[tenant] = now
        current, _ = await self._read(tenant)
        stale = [s for s in stale_candidates(current, time.time()) if not await self._stored(tenant, s)]
        if not stale or not await self.free(*stale, tenant=tenant):
            return False
        self.freed_stale += len(stale)
        log.warning("tenant %s: freed %d slots of sessions never stored: %s", tenant, len(stale), ", ".join(stale))
        return True

    async def _stored(self, tenant: str, session_id: str) -> bool:
        try:
            await self.js.get_last_msg(subjects.AUDIO_STREAM, subjects.audio_of_session(tenant, session_id))
        except NotFoundError:
            return False
        return True

    async def free_ended(self) -> None:
        """Free the slots of sessions the transcriber ended or rejected, from the shared durable consumer, until
        cancelled. An event is acked once its slot is free, so none is lost to a crash."""
        await self.api.create_consumer(
            subjects.TRANSCRIPTS_STREAM,
            {
                "durable_name": subjects.SESSION_ENDS_CONSUMER,
                "filter_subjects": [subjects.session_event_all("ended"), subjects.session_event_all("rejected")],
                "ack_policy": "explicit",
                "deliver_policy": "new",  # slots exist from the first gateway on; older events free nothing
                "ack_wait": jetstream.nanoseconds(30),
            },
        )
        pulls = await self.js.pull_subscribe_bind(
            durable=subjects.SESSION_ENDS_CONSUMER, stream=subjects.TRANSCRIPTS_STREAM
        )
        this = asyncio.current_task()
        try:
            # Not `while True`: a cancel that lands as a message arrives is swallowed inside nats-py's fetch (Python
            # 3.11's wait_for returns the message instead), and the gateway's stop then waited here for ever.
            while this is None or not this.cancelling():
                try:
                    msgs = await pulls.fetch(64, timeout=1.0)
                except (TimeoutError, nats.errors.TimeoutError):  # nothing came
                    continue
                except _NATS_ERRORS as exc:
                    log.warning("reading session ends: %r", exc)
                    await asyncio.sleep(1.0)
                    continue
                for msg in msgs:
                    await self._free_for(msg)
        finally:
            with contextlib.suppress(Exception):  # a subscription left open would hold up the connection's drain
                await pulls.unsubscribe()

    async def _free_for(self, msg) -> None:
        try:
            event = decode(msg.data, SessionEvent)
            if msg.subject != subjects.session_event(event.tenant, event.session_id, event.event):
                raise WireError("subject_mismatch", f"a {event.event} event of {event.tenant}/{event.session_id}")
            if not (subjects.is_valid_token(event.tenant) and subjects.is_valid_token(event.session_id)):
                raise WireError("bad_id", "tenant and session_id must be 1-64 letters, digits, '_' or '-'")
        except WireError as exc:
            # Never redelivered: it could only fail again (an invalid tenant is not even a KV key) or free the slot
            # of a session its subject does not name.
            log.warning("ignoring a bad session event on %s: %s", msg.subject, exc)
            await msg.term()
            if self.report is not None:
                await self.report(msg.subject, exc)
            return
        try:
            await self.free(event.session_id, tenant=event.tenant)
        except Exception as exc:  # redelivered after ack_wait
            log.warning("could not free the slot of %s/%s: %r", event.tenant, event.session_id, exc)
            return
        await msg.ack()
