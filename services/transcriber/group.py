"""The transcribers' partitioned consumer group: each AUDIO partition is owned by one live worker at a
time, and partitions move when workers join, leave or die.

Why no partition is processed by two workers at once:
1. Leases. Key p<N> in KV bucket `partition_leases` names the owner. Every write is a compare-and-set
   on the key's revision (take: the revision seen free or ours; renew: our last revision; release:
   delete at our last revision), so one write wins and everyone else sees it. Each write carries a
   per-message TTL: the server drops a lease nobody renews, which is how a dead worker's partitions
   come free.
2. The owner acts only inside its lease. It may pull until (send time of its last successful renew)
   + ttl - margin, and each pull request expires a margin before that; the server started the TTL
   later than we sent, so the owner has stopped pulling before anyone else can take the lease.
   Messages arriving after the deadline are nak'd, not handed out.
3. The server fences a stale owner. Each `transcriber-p<N>` consumer has a priority group with
   `pinned_client`: the server delivers only to pull requests carrying the current pin id (learned
   from the `Nats-Pin-Id` header) and answers another id with 423. A new owner calls UNPIN before
   its first pull without an id; from its first delivery on, the old owner's pulls (waiting ones
   too) get 423, whatever the old owner believes (a paused process, a clock that stood still).
   On a 423 the puller asks the lease: still ours (our pin merely lapsed) -> UNPIN and pull again;
   not ours -> stop and report the partition lost.
4. Handover. A leaving owner stops pulling, lets the worker drain (`on_revoked`), then deletes the
   lease; a dead owner's unacked messages come back to the new owner at once (it resets the consumer).
5. Writes are fenced by the server too (the transcribers' `fences`). 1-3 keep a stale owner from
   receiving audio, but a worker frozen (SIGSTOP, swap, a paused VM) after it decoded and before it
   published would, on waking, still publish what it decoded, write its checkpoint and ack: a session
   with two writers. A local look at the lease before each write (`write` does it) narrows that window
   and cannot close it: the process can freeze between the look and the write. So every write is
   conditional on the stream, checked and stored in one step on the stream's leader:
   - Claims. Right after winning a partition's lease, and before it unpins, resets or pulls anything,
     the new owner claims the partition in every stream it writes to: one message on the partition's
     claim subject there (TRANSCRIPTS `claim.transcriber.p<N>`; KV `session_checkpoints`, key
     `claim=transcriber.p<N>`). A claim is itself conditional: stored only if that subject's last
     message is still the one seen *before* the lease was won. So a worker that froze between its lease
     and its claim cannot overwrite the claim of an owner who came after it: its claim is refused and it
     lets the lease go.
   - Every segment, session event and checkpoint carries `Nats-Expected-Last-Subject-Sequence: <our
     claim's seq>` and `Nats-Expected-Last-Subject-Sequence-Subject: <the claim subject>`: the stream
     stores it only while our claim is the partition's last and refuses it (10071) once anyone claimed
     after us, whenever the writer froze. A refused write means fenced: the step stops there (nothing
     after it in the step: no checkpoint, no ack), the worker drops the partition, its next owner redoes
     the work from the checkpoint.
   - What a stale owner stored before the new claim is what a crash could leave too: a segment
     published and not yet checkpointed. The new owner reads checkpoints only after its claim, so no
     stale checkpoint lands after it read one; it redecodes the utterance and publishes it under the
     same segment id (a final's Nats-Msg-Id is its id: the stream drops the repeat). The stale owner's
     late acks cover only audio behind a checkpoint stored before the claim, which the new owner read.
   - Claims age out with their stream (its max age), so an owner claims again over its own claim (the
     same condition, on its own seq) every quarter of that max age; a write refused meanwhile is tried
     again under the new claim, one refused under someone else's is not.
   Stored messages keep these headers, so a reader can check that nothing was stored under a claim that a
   later one had already superseded (tests/chaos/harness.py `stale_writes`).
Membership (KV bucket `transcriber_members`, one key per worker, heartbeat with TTL) only decides who
should own what (rendezvous over live members, `partitions.py`); a stale view can delay a move but
cannot make two owners, because ownership itself is only the lease.
Acks are not fenced: what a worker already received when it froze it may still ack later. The worker
must drop a partition's held messages on `on_revoked(p, lost=True)` or `PartitionLost`; such an ack
covers audio behind a stored checkpoint (5.), and a late ack of a redelivered chunk is harmless because
the transcriber's outputs are deduplicated by id.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field

import nats.errors
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig
from nats.js.errors import KeyNotFoundError

from jetscribe.services.transcriber.partitions import (
    Claim,
    Lease,
    claim_refresh_due,
    decode_lease,
    decode_member,
    encode_claim,
    encode_lease,
    encode_member,
    holding_line,
    lease_deadline,
    lease_ttl_seconds,
    may_acquire,
    plan,
    pull_window,
)
from jetscribe.shared import jetstream, subjects
from jetscribe.shared.config import StreamSettings, TranscriberConfig
from jetscribe.shared.jetstream import JetStreamAPI, PinMismatchError, WrongLastSequenceError, expect_last
from jetscribe.shared.streams import ensure_key_value, replicas, while_settling

log = logging.getLogger(__name__)

_KV_KEY = re.compile(r"[-/_=a-zA-Z0-9]+(\.[-/_=a-zA-Z0-9]+)*")

OnAssigned = Callable[[int, "PartitionPuller | None"], Awaitable[None]]  # no puller without a stream
OnRevoked = Callable[[int, bool], Awaitable[None]]  # (partition, lost): lost = taken away, not handed over


class PartitionLost(Exception):
    """This worker no longer owns the partition: stop processing it; do not ack what is still held."""


@dataclass(frozen=True)
class Fence:
    """A stream an owner writes to on behalf of its partitions, fenced by a claim on `claim_subject(p)` in it."""

    name: str  # what `PartitionGroup.write` calls it
    stream: str
    claim_subject: Callable[[int], str]


# What a transcriber writes: segments and session events into TRANSCRIPTS, checkpoints into their KV bucket.
TRANSCRIPTS_FENCE = "transcripts"
CHECKPOINTS_FENCE = "checkpoints"
TRANSCRIBER_FENCES = (
    Fence(TRANSCRIPTS_FENCE, subjects.TRANSCRIPTS_STREAM, subjects.transcriber_claim),
    Fence(
        CHECKPOINTS_FENCE,
        f"KV_{subjects.SESSION_CHECKPOINTS_BUCKET}",
        lambda p: jetstream.kv_subject(subjects.SESSION_CHECKPOINTS_BUCKET, subjects.checkpoint_claim_key(p)),
    ),
)


class PartitionPuller:
    """Pulls one partition's consumer as its pinned client. Messages are ordinary nats-py `Msg`s:
    `.ack()`, `.nak()`, `.term()`, `.in_progress()` work as usual. One fetch at a time."""

    def __init__(self, group: PartitionGroup, partition: int):
        self.group = group
        self.partition = partition
        self.consumer = group.consumer_name(partition)
        self.pin_id: str | None = None
        self.fenced = False  # the server pinned someone else and the lease is not ours
        self._stopped = False
        self._sub = None
        self._inbox = ""
        self._requests = 0
        self._request_ends = 0.0  # when the server is done with our last pull request
        self._busy = asyncio.Lock()

    @property
    def active(self) -> bool:
        return not self._stopped and self.group.holds(self.partition)

    async def fetch(self, batch: int = 256, timeout: float = 1.0) -> list[Msg]:
        """Up to `batch` messages, waiting at most about `timeout`; [] when none came.
        Raises PartitionLost once the partition is not ours any more."""
        async with self._busy:
            if not self.active:
                self._lapsed()
                raise PartitionLost(self.partition)
            g = self.group
            window = pull_window(time.monotonic(), g.deadline(self.partition), timeout, g.margin_s)
            if window == 0:  # lease too close to its end to pull; a renewal is due
                await asyncio.sleep(min(timeout, g.heartbeat_s / 2))
                return []
            msgs = await self._pull(batch, window)
            if msgs and not self.active:
                for msg in msgs:  # came in after we stopped or the lease ran out: the next owner gets them now
                    await msg.nak()
                self._lapsed()
                raise PartitionLost(self.partition)
            return msgs

    async def _pull(self, batch: int, window: float) -> list[Msg]:
        g, sub = self.group, self._sub
        if sub is None:
            return []
        self._requests += 1
        reply = f"{self._inbox}.{self._requests}"
        self._request_ends = time.monotonic() + window
        await g.api.pull(
            g.stream, self.consumer, reply=reply, batch=batch, expires_s=window, group=g.priority_group, pin=self.pin_id
        )
        msgs: list[Msg] = []
        give_up = self._request_ends + 1.0  # the server answers by `expires`; 1 s for the way back
        while len(msgs) < batch:
            # Hand over what came as soon as the flow pauses: waiting for a full batch would delay live
            # audio by up to `window`. The request stays open; what it brings later comes to the next call.
            wait = 0.005 if msgs else max(give_up - time.monotonic(), 0.001)
            try:
                msg = await sub.next_msg(timeout=wait)
            except (nats.errors.TimeoutError, nats.errors.ConnectionClosedError):
                break
            if jetstream.is_stored_message(msg):
                pin = jetstream.pin_id(msg)
                if pin and self.pin_id is None:
                    self.pin_id = pin
                msgs.append(msg)
                continue
            if msg.subject != reply:
                continue  # the late status of an earlier request
            try:
                status = jetstream.pull_status(msg, f"partition {self.partition}: pull")
            except PinMismatchError:  # pinned to another client id
                await self._pin_refused()
                break
            if status.heartbeat:
                continue
            if status.interrupted:
                log.info("partition %d: pull ended with %d %s", self.partition, status.status, status.description)
            break  # done: no messages, the request expired, or interrupted (pull again)
        return msgs

    def _lapsed(self) -> None:
        """Our lease ran out without a hand-over (e.g. NATS was unreachable): whatever a late renewal
        says, this puller is done; the group drops the partition and, if it is still ours to have,
        takes it again through the normal path (new consumer reset, sessions from checkpoints)."""
        if not self._stopped:
            self._stopped = True
            self.group.fenced(self.partition)

    async def _pin_refused(self) -> None:
        # The server pinned another client: either a new owner took over (then our lease is gone
        # too), or our pin lapsed because we did not pull for priority_timeout. Only the lease decides.
        if await self.group.confirm(self.partition):
            log.info("partition %d: pin lapsed while we hold the lease; re-pinning", self.partition)
            await self.group.unpin(self.partition)
            self.pin_id = None
            return
        log.warning("partition %d: fenced by the server (pinned to another worker)", self.partition)
        self.fenced = True
        self._stopped = True
        self.group.fenced(self.partition)

    async def _start(self) -> None:
        self._inbox = self.group.nc.new_inbox()
        self._sub = await self.group.nc.subscribe(f"{self._inbox}.*")

    async def _stop(self, give_back: bool) -> None:
        """Stop pulling. With give_back, wait for our last pull request to end, then nak what came
        in but was not handed out, so the next owner gets it at once instead of after ack_wait."""
        self._stopped = True
        if give_back:
            await asyncio.sleep(max(0.0, self._request_ends - time.monotonic()) + 0.05)
            async with self._busy:  # a fetch in flight finishes (and naks what it got)
                try:
                    while self._sub is not None and self._sub.pending_msgs:
                        msg = await self._sub.next_msg(timeout=0.1)
                        if msg.reply:
                            await msg.nak()
                except Exception as exc:  # they come back after ack_wait instead
                    log.warning("partition %d: could not give back messages: %s", self.partition, exc)
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception:  # connection already closed
                pass


@dataclass
class _Held:
    partition: int
    revision: int
    deadline: float
    puller: PartitionPuller | None = None
    lost: bool = False  # taken by another member, or fenced: stop acting on it at once
    told: bool = False  # on_assigned has been called
    done: bool = False  # on_revoked has been called
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    claims: dict[str, Claim] = field(default_factory=dict)  # fence name -> our claim in its stream
    claiming: asyncio.Lock = field(default_factory=asyncio.Lock)  # held while a claim is written again


class PartitionGroup:
    """Join the group as `member_id`, own the partitions rendezvous gives this member, and run
    `on_assigned(partition, puller)` / `on_revoked(partition, lost)` as they come and go. With `stream` None the
    group only leases partitions (no consumer, no puller): the ingest gateways use it so.

    `eligible` (None: all) restricts this member to a static subset (JETSCRIBE_WORKER_PARTITIONS).
    A crashed member's partitions move after at most lease_ttl_s + heartbeat_s (+ a request or two).
    `on_assigned` should return quickly (start a task); `on_revoked` returns once the worker has
    stopped touching the partition: with lost=False the lease is handed over right after it.

    Leases name this process (member id + a random suffix), so two processes started with the same
    member id never both own a partition: the second waits as a standby.
    """

    def __init__(
        self,
        nc,
        member_id: str,
        *,
        partitions: int = 16,
        eligible: Collection[int] | None = None,
        heartbeat_s: float = 1.0,
        lease_ttl_s: float = 5.0,
        on_assigned: OnAssigned | None = None,
        on_revoked: OnRevoked | None = None,
        stream: str | None = subjects.AUDIO_STREAM,
        consumer_name: Callable[[int], str] = subjects.transcriber_consumer,
        filter_subject: Callable[[int], str] = subjects.audio_partition_filter,
        priority_group: str = subjects.TRANSCRIBER_PRIORITY_GROUP,
        members_bucket: str = subjects.TRANSCRIBER_MEMBERS_BUCKET,
        leases_bucket: str = subjects.PARTITION_LEASES_BUCKET,
        ack_wait_s: float = 300.0,
        max_ack_pending: int = 20_000,
        consumer_config: dict | None = None,
        fences: Collection[Fence] = (),
        replicas: int = 1,
    ):
        if not _KV_KEY.fullmatch(member_id):
            raise ValueError(f"member id {member_id!r} must be a KV key: letters, digits, '-', '_', '=', '/', '.'")
        self.ttl_s = lease_ttl_seconds(lease_ttl_s)
        if heartbeat_s <= 0 or heartbeat_s > self.ttl_s / 3:
            raise ValueError(f"heartbeat_s ({heartbeat_s}) must be at most a third of the lease TTL ({self.ttl_s} s)")
        self.nc = nc
        self.js = nc.jetstream()
        self.api = JetStreamAPI(nc)
        self.member_id = member_id
        self.holder = f"{member_id}#{secrets.token_hex(4)}"  # the owner written into leases
        self.partitions = partitions
        self.eligible = None if eligible is None else frozenset(eligible)
        self.heartbeat_s = heartbeat_s
        self.margin_s = self.ttl_s / 5  # see lease_deadline / pull_window
        self.on_assigned = on_assigned
        self.on_revoked = on_revoked
        self.stream = stream
        self.consumer_name = consumer_name
        self.filter_subject = filter_subject
        self.priority_group = priority_group
        self.members_bucket = members_bucket
        self.leases_bucket = leases_bucket
        self.consumer_config = {
            "ack_wait": jetstream.nanoseconds(ack_wait_s),
            "max_ack_pending": max_ack_pending,
            **(consumer_config or {}),
        }
        self.fences = {fence.name: fence for fence in fences}
        self.replicas = replicas  # copies of the group's KV buckets
        self.claim_max_age_s: dict[str, float] = {}  # fence name -> its stream's max age (0: none), read at start
        self.refused_writes = 0  # writes a stream refused because another member had claimed the partition
        self.members: dict[str, frozenset[int] | None] = {}  # the live set as last read
        self._last_plan = None
        self._stopping = False
        self._held: dict[int, _Held] = {}
        self._announced: frozenset[int] = frozenset()  # what the log last said this member holds
        self._members_kv = None
        self._leases_kv = None
        self._wake = asyncio.Event()
        self._heartbeat_task: asyncio.Task | None = None
        self._rebalance_task: asyncio.Task | None = None

    @classmethod
    def from_config(cls, nc, settings: StreamSettings, config: TranscriberConfig, **kwargs) -> PartitionGroup:
        """The group as a transcriber runs it: JETSCRIBE_WORKER_PARTITIONS (all, or a static subset),
        worker id, heartbeat, lease TTL and ack_wait from the service's configuration, its writes fenced in
        TRANSCRIPTS and the checkpoints' bucket (`TRANSCRIBER_FENCES`), its buckets in `replicas` copies."""
        static = config.partitions.strip() not in ("", "all")
        kwargs.setdefault("fences", TRANSCRIBER_FENCES)
        kwargs.setdefault("replicas", replicas(settings, nc))
        return cls(
            nc,
            config.worker_id,
            partitions=settings.partitions,
            eligible=config.owned_partitions(settings.partitions) if static else None,
            heartbeat_s=config.heartbeat_s,
            lease_ttl_s=config.lease_ttl_s,
            ack_wait_s=config.ack_wait_s,
            **kwargs,
        )

    @property
    def takeover_s(self) -> float:
        """The longest a dead member's partitions wait for a new owner (plus a few requests)."""
        return self.ttl_s + self.heartbeat_s

    # --- the worker's view ------------------------------------------------------------------------
    @property
    def owned(self) -> frozenset[int]:
        """Partitions this member holds a lease on (including ones being handed over)."""
        return frozenset(p for p, h in self._held.items() if not h.lost)

    def holds(self, partition: int) -> bool:
        """True while this member may act on the partition: its lease is ours and not near its end."""
        held = self._held.get(partition)
        return held is not None and not held.lost and time.monotonic() < held.deadline

    def deadline(self, partition: int) -> float:
        held = self._held.get(partition)
        return held.deadline if held is not None and not held.lost else 0.0

    async def start(self) -> None:
        self._members_kv = await self._bucket(self.members_bucket)
        self._leases_kv = await self._bucket(self.leases_bucket)
        for fence in self.fences.values():  # the streams must exist: the worker made them before the group
            info = await while_settling(lambda f=fence: self.js.stream_info(f.stream), f"stream {fence.stream}")
            self.claim_max_age_s[fence.name] = float(info.config.max_age or 0.0)
        await self._first_heartbeat()
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop())
        self._rebalance_task = asyncio.create_task(self._rebalance_loop())

    async def stop(self, release: bool = True) -> None:
        """Leave the group. With release (a graceful stop): leave the member set, hand every
        partition over (on_revoked, then delete the lease) so others take over at once. Without:
        stop everything where it stands and write nothing, as a crash would; leases expire by TTL."""
        self._stopping = True
        if release and self._rebalance_task is not None:
            self.wake()  # let a rebalance under way finish its hand-overs rather than cut a drain short
            await asyncio.gather(self._rebalance_task, return_exceptions=True)
        await _cancel(self._rebalance_task)
        if release:
            await self._leave()
            await asyncio.gather(*(self._drop(h) if h.lost else self._release(h) for h in list(self._held.values())))
        await _cancel(self._heartbeat_task)
        if release:
            await self._leave()  # again, in case a heartbeat was on its way during the first
        for held in self._held.values():
            if held.puller is not None:
                await held.puller._stop(give_back=False)
        self._held.clear()
        self._announce()

    def wake(self) -> None:
        self._wake.set()

    def fenced(self, partition: int) -> None:
        """The server refused our pin and the lease could not be confirmed: stop acting on it now."""
        held = self._held.get(partition)
        if held is not None:
            held.lost = True
        self.wake()

    # --- membership -------------------------------------------------------------------------------
    async def _bucket(self, name: str):
        # One that exists with another configuration is used as it is, its replicas brought to ours.
        kv = await ensure_key_value(self.js, KeyValueConfig(bucket=name, history=1, replicas=self.replicas))
        info = await while_settling(lambda: self.js.stream_info(f"KV_{name}"), f"KV bucket {name}")
        if not info.config.allow_msg_ttl:
            raise RuntimeError(f"KV bucket {name} does not allow per-message TTLs; delete it so it is recreated")
        return kv

    async def _leave(self) -> None:
        # Purging the subject (not a KV delete) leaves no marker: the key is simply gone.
        try:
            await self.api.kv_purge(self.members_bucket, self.member_id)
        except Exception as exc:
            log.warning("%s: could not leave the member set (%s); the key expires by its TTL", self.member_id, exc)

    async def _heartbeat(self) -> None:
        await self.api.kv_put(
            self.members_bucket,
            self.member_id,
            encode_member(self.member_id, self.eligible, time.time()),
            ttl_s=self.ttl_s,
        )

    async def _first_heartbeat(self, within_s: float = 30.0) -> None:
        """Join the member set. On a cluster a bucket just made takes writes only once its copies have elected a
        leader (until then a write finds no responder, or times out): wait for that, up to `within_s`."""
        deadline = time.monotonic() + within_s
        while True:
            try:
                await self._heartbeat()
                return
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise
                log.info(
                    "%s: bucket %s does not take writes yet (%r); trying again",
                    self.member_id,
                    self.members_bucket,
                    exc,
                )
                await asyncio.sleep(0.2)

    async def _read_members(self) -> dict[str, frozenset[int] | None]:
        info = await self.js.stream_info(
            f"KV_{self.members_bucket}", subjects_filter=jetstream.kv_subject(self.members_bucket)
        )
        members = {}
        for subject in info.state.subjects or {}:
            key = jetstream.kv_key(self.members_bucket, subject)
            try:
                entry = await self._members_kv.get(key)
            except KeyNotFoundError:  # expired or left since the listing
                continue
            member, eligible = decode_member(entry.value)
            members[member] = eligible
        return members

    # --- leases -----------------------------------------------------------------------------------
    async def _read_lease(self, partition: int) -> tuple[Lease | None, int]:
        """(holder, revision to compare-and-set against); revision 0 = the key has no entry at all."""
        try:
            entry = await self._leases_kv.get(subjects.partition_lease_key(partition))
        except KeyNotFoundError as err:  # never written, expired away, or a delete marker
            return None, err.entry.revision if err.entry is not None else 0
        return decode_lease(entry.value, entry.revision), entry.revision

    async def _write_lease(self, partition: int, last: int) -> tuple[int, float]:
        """Compare-and-set our lease over revision `last`; returns (new revision, deadline).
        Raises WrongLastSequenceError if someone else wrote the key since."""
        sent = time.monotonic()
        revision = await self.api.kv_put(
            self.leases_bucket,
            subjects.partition_lease_key(partition),
            encode_lease(self.holder, self.ttl_s, time.time()),
            ttl_s=self.ttl_s,
            last_revision=last,
        )
        return revision, lease_deadline(sent, self.ttl_s, self.margin_s)

    async def _renew(self, held: _Held) -> bool | None:
        """True: renewed. False: lost (someone else wrote the key). None: unknown (e.g. no connection)."""
        async with held.lock:
            if held.lost or self._held.get(held.partition) is not held:
                return False
            try:
                held.revision, held.deadline = await self._write_lease(held.partition, held.revision)
                return True
            except WrongLastSequenceError:
                log.warning("partition %d: lease lost (changed under us)", held.partition)
                held.lost = True
                self.wake()
                return False
            except Exception as exc:
                log.warning("partition %d: lease renewal failed: %s", held.partition, exc)
                return None

    # --- claims: the fence on writes (5. above) ----------------------------------------------------------
    async def _claims_seen(self, partition: int) -> dict[str, int]:
        """The last claim on the partition in each fenced stream now (0: none): read before taking the lease."""
        return {
            name: await self.api.last_sequence(fence.stream, fence.claim_subject(partition))
            for name, fence in self.fences.items()
        }

    async def _claim(self, held: _Held, seen: Mapping[str, int]) -> None:
        """Claim a partition whose lease we just won in every fenced stream, each over the claim seen before the
        lease was won. Raises WrongLastSequenceError if someone claimed since."""
        for name, fence in self.fences.items():
            held.claims[name] = await self._write_claim(held, fence, seen[name])

    async def _write_claim(self, held: _Held, fence: Fence, over: int) -> Claim:
        subject = fence.claim_subject(held.partition)
        sent = time.monotonic()
        reply = await self.api.publish(
            subject, encode_claim(self.holder, held.partition, held.revision, time.time()), expect_last(subject, over)
        )
        return Claim(fence.stream, subject, int(reply["seq"]), sent)

    async def _refresh_claims(self, held: _Held) -> None:
        """Claim again over our own claims before their stream ages them out."""
        now = time.monotonic()
        for name, claim in list(held.claims.items()):
            if not claim_refresh_due(claim, now, self.claim_max_age_s.get(name, 0.0)):
                continue
            async with held.claiming:
                if not self.holds(held.partition):
                    return
                try:
                    held.claims[name] = await self._write_claim(held, self.fences[name], claim.seq)
                except WrongLastSequenceError:
                    log.warning("partition %d: our claim in %s was superseded", held.partition, claim.stream)
                    self.fenced(held.partition)
                    return
                except Exception as exc:  # the next heartbeat tries again; the claim lives far longer
                    log.warning("partition %d: could not claim it again in %s: %s", held.partition, claim.stream, exc)

    async def write(
        self, partition: int, fence: str, subject: str, data: bytes, headers: Mapping[str, str] | None = None
    ) -> dict:
        """Publish `data` into fence `fence`'s stream for `partition`, stored only while our claim on the partition
        is its last there; returns the stream's acknowledgement. Raises PartitionLost, without writing, when the
        lease is not ours (or near its end), and after the stream refused the write because another member
        claimed the partition (the partition is then dropped, as if lost)."""
        while True:
            held = self._held.get(partition)
            if held is None or not self.holds(partition):
                raise PartitionLost(partition)
            claim = held.claims[fence]
            try:
                return await self.api.publish(
                    subject, data, {**(headers or {}), **expect_last(claim.subject, claim.seq)}
                )
            except WrongLastSequenceError:
                async with held.claiming:  # a claim of ours being written again: wait for it
                    current = held.claims.get(fence)
                if current is not None and current.seq != claim.seq and not held.lost:
                    continue  # refused because we claimed again meanwhile: once more under that claim
                self.refused_writes += 1
                log.warning(
                    "partition %d: %s refused a write to %s: another member claimed the partition; dropping it",
                    partition,
                    claim.stream,
                    subject,
                )
                self.fenced(partition)
                raise PartitionLost(partition) from None

    async def confirm(self, partition: int) -> bool:
        """Renew now: True only if the server agrees the lease is still ours."""
        held = self._held.get(partition)
        return held is not None and await self._renew(held) is True and self.holds(partition)

    # --- the consumer ----------------------------------------------------------------------------
    async def _ensure_consumer(self, partition: int) -> None:
        """Create the partition's durable, or bring it to this configuration (an existing one without a
        priority group is upgraded in place and keeps its ack state)."""
        name = self.consumer_name(partition)
        config = {
            "durable_name": name,
            "filter_subject": self.filter_subject(partition),
            "ack_policy": "explicit",
            "deliver_policy": "all",
            "priority_groups": [self.priority_group],
            "priority_policy": "pinned_client",
            # Only a backstop: a new owner unpins explicitly, and the owner pulls continuously.
            "priority_timeout": jetstream.nanoseconds(self.ttl_s),
            **self.consumer_config,
        }
        await self.api.create_consumer(self.stream, config)

    async def unpin(self, partition: int) -> None:
        """Clear the pin: the next pull without an id (ours) is pinned; the old pin id gets 423."""
        await self.api.unpin(self.stream, self.consumer_name(partition), self.priority_group)

    # --- rebalancing ------------------------------------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                if not self._stopping:  # a leaving member keeps renewing its leases, not its membership
                    await self._heartbeat()
            except Exception as exc:
                log.warning("%s: heartbeat failed: %s", self.member_id, exc)
            await asyncio.gather(*(self._renew(h) for h in list(self._held.values())))
            await asyncio.gather(*(self._refresh_claims(h) for h in list(self._held.values()) if h.claims))
            self.wake()
            await asyncio.sleep(max(0.0, self.heartbeat_s - (time.monotonic() - started)))

    async def _rebalance_loop(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            try:
                await self._rebalance()
            except Exception:
                log.exception("%s: rebalance failed; trying again", self.member_id)
                await asyncio.sleep(self.heartbeat_s)

    async def _rebalance(self) -> None:
        now = time.monotonic()
        for held in [h for h in self._held.values() if h.lost or h.deadline <= now]:
            await self._drop(held)
        self.members = await self._read_members()
        step = plan(self.member_id, self.partitions, self.members, self._held.keys())
        if (step.release or step.acquire) and step != self._last_plan:
            log.debug(
                "%s: members %s; releasing %s, acquiring %s",
                self.member_id,
                sorted(self.members),
                list(step.release),
                list(step.acquire),
            )
        self._last_plan = step
        await asyncio.gather(*(self._release(self._held[p]) for p in step.release))
        for partition in step.acquire:
            await self._acquire(partition)
        self._announce()

    def _announce(self) -> None:
        """One INFO line when what this member holds changed since the last one (the single partitions at DEBUG)."""
        owned = self.owned
        line = holding_line(self._announced, owned)
        if line is not None:
            log.info("%s: %s; %d in the group", self.member_id, line, len(self.members))
        self._announced = owned

    async def _acquire(self, partition: int) -> None:
        lease, revision = await self._read_lease(partition)
        if not may_acquire(lease, self.holder):
            return  # still held by another member (handing over, or dead until its TTL runs out)
        seen = await self._claims_seen(partition)  # before the lease: see _claim
        try:
            revision, deadline = await self._write_lease(partition, revision)
        except WrongLastSequenceError:
            return  # someone else wrote first
        held = self._held[partition] = _Held(partition, revision, deadline)
        if self.fences:  # before anything else is done with the partition: see 5. above
            try:
                await self._claim(held, seen)
            except Exception as exc:
                why = "someone claimed it meanwhile" if isinstance(exc, WrongLastSequenceError) else repr(exc)
                log.warning("partition %d: could not claim it (%s); releasing its lease", partition, why)
                await self._delete_lease(held)
                return
        if self.stream is not None:  # a group of leases alone (the gateways') has no consumer
            try:
                await self._ensure_consumer(partition)
                await self.unpin(partition)  # fence whoever was pinned before us
                # Redeliver everything unacked now, not after ack_wait: a dead owner's held audio included.
                await self.api.reset(self.stream, self.consumer_name(partition))
                held.puller = PartitionPuller(self, partition)
                await held.puller._start()
            except Exception:
                log.exception("partition %d: could not set up its consumer; releasing", partition)
                if held.puller is not None:
                    await held.puller._stop(give_back=False)
                await self._delete_lease(held)
                return
        log.debug("%s: acquired partition %d", self.member_id, partition)
        held.told = True
        await self._callback(self.on_assigned, partition, held.puller)

    async def _release(self, held: _Held) -> None:
        """Hand over: stop pulling, let the worker drain (the lease is still renewed meanwhile), then
        delete the lease so the next owner can take it."""
        if held.puller is not None:
            await held.puller._stop(give_back=True)
        if held.told and not held.done:
            held.done = True
            await self._callback(self.on_revoked, held.partition, False)
        await self._delete_lease(held)
        log.debug("%s: released partition %d", self.member_id, held.partition)

    async def _drop(self, held: _Held) -> None:
        """The lease is gone (taken, or expired for want of renewals): stop at once, tell the worker."""
        self._held.pop(held.partition, None)
        if held.puller is not None:
            await held.puller._stop(give_back=False)
        log.warning("%s: lost partition %d", self.member_id, held.partition)
        if held.told and not held.done:
            held.done = True
            await self._callback(self.on_revoked, held.partition, True)

    async def _delete_lease(self, held: _Held) -> None:
        async with held.lock:
            self._held.pop(held.partition, None)
            if held.lost:
                return
            try:
                await self._leases_kv.delete(subjects.partition_lease_key(held.partition), last=held.revision)
            except Exception as exc:  # it expires by its TTL instead
                log.warning("partition %d: could not delete the lease: %s", held.partition, exc)

    async def _callback(self, callback, *args) -> None:
        if callback is None:
            return
        try:
            await callback(*args)
        except Exception:
            log.exception("%s: %s%s failed", self.member_id, getattr(callback, "__name__", "callback"), args)


async def _cancel(task: asyncio.Task | None) -> None:
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
