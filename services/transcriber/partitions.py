"""Which transcriber owns which AUDIO partition: pure decisions, no I/O.

Assignment is rendezvous hashing (highest random weight) with bounded loads: every (member,
partition) pair gets a stable weight, and pairs are granted heaviest first while the member still
has room, so each member gets floor(P/n) or ceil(P/n) partitions. It is a function of the live
member set alone, so every member computes the same answer without talking to the others. Pure
rendezvous would move nothing but the joiner's/leaver's partitions, but over 16 partitions it is
lumpy (3 members often get 9/4/3); the load bound costs about one extra move per join or leave
(at most 4 of 16 in simulations).

`group.py` does the I/O; this file decides.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

# member id -> the partitions it may own (None: any). A static worker lists a subset.
Members = Mapping[str, Collection[int] | None]


def weight(member: str, partition: int) -> int:
    """Stable across processes and machines (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(f"{member}\x00{partition}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def assign(partitions: int, members: Members | Iterable[str]) -> dict[int, str]:
    """Owner of each partition 0..partitions-1; a partition no live member may own is left out."""
    if not isinstance(members, Mapping):
        members = {m: None for m in members}
    if not members:
        return {}
    eligible = {m: set(range(partitions)) if ps is None else set(ps) for m, ps in members.items()}
    base, extra = divmod(partitions, len(members))
    load = dict.fromkeys(members, 0)
    above_base = 0  # members holding base + 1; only `extra` of them may
    owner: dict[int, str] = {}
    pairs = sorted(((weight(m, p), m, p) for m, ps in eligible.items() for p in ps), reverse=True)
    for _, m, p in pairs:
        if p in owner or not (load[m] < base or (load[m] == base and above_base < extra)):
            continue
        owner[p] = m
        load[m] += 1
        if load[m] == base + 1:
            above_base += 1
    # Static subsets can leave a partition whose only candidates are full: its best candidate takes it.
    for _, m, p in pairs:
        owner.setdefault(p, m)
    return owner


def assigned_to(member: str, partitions: int, members: Members | Iterable[str]) -> set[int]:
    return {p for p, m in assign(partitions, members).items() if m == member}


@dataclass(frozen=True)
class Plan:
    release: tuple[int, ...]  # held, but rendezvous gives them to someone else (or nobody)
    acquire: tuple[int, ...]  # rendezvous gives them to us, not held yet


def plan(member: str, partitions: int, members: Members, held: Collection[int]) -> Plan:
    """What to do now. A member that is not in the live set (its key expired) owns nothing."""
    wanted = assigned_to(member, partitions, members) if member in members else set()
    return Plan(release=tuple(sorted(set(held) - wanted)), acquire=tuple(sorted(wanted - set(held))))


# --- what a member holds, for its log -------------------------------------------------------------
def spans(partitions: Iterable[int]) -> str:
    """Partitions as runs: {0, 1, 2, 3, 5, 7, 8} -> "0-3,5,7-8"."""
    runs: list[list[int]] = []
    for p in sorted(set(partitions)):
        if runs and p == runs[-1][1] + 1:
            runs[-1][1] = p
        else:
            runs.append([p, p])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


def holding_line(before: Collection[int], after: Collection[int]) -> str | None:
    """One line per change of what a member holds ("holds partitions 0-7 (+4-7, -8-15)"), None if nothing
    changed: a member taking 16 partitions says so once, not 16 times."""
    gained, lost = set(after) - set(before), set(before) - set(after)
    if not gained and not lost:
        return None
    change = ", ".join(f"{sign}{spans(ps)}" for sign, ps in (("+", gained), ("-", lost)) if ps)
    held = f"holds partitions {spans(after)}" if after else "holds no partitions"
    return f"{held} ({change})"


# --- leases ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lease:
    owner: str
    revision: int  # of the KV entry; every write is a compare-and-set on it


def may_acquire(lease: Lease | None, member: str) -> bool:
    """A lease is taken only when free (absent, deleted or expired away by its TTL) or already ours."""
    return lease is None or lease.owner == member


def lease_ttl_seconds(ttl_s: float) -> int:
    """The server keeps message TTLs in whole seconds and truncates (1.5 s lives 1 s), so round up
    here and use the same whole number on both sides."""
    return max(1, math.ceil(ttl_s))


def lease_deadline(sent_at: float, ttl_s: int, margin_s: float) -> float:
    """Until when the owner may act on a lease written (or renewed) by a request sent at `sent_at`.

    The server starts the TTL when it stores the write, which is after we sent it, so the key lives
    at least until sent_at + ttl on the server; the margin covers clock-rate drift and the time a
    pull request spends in flight."""
    return sent_at + ttl_s - margin_s


def pull_window(now: float, deadline: float, wanted_s: float, margin_s: float) -> float:
    """How long a pull request may wait for messages: never past the lease deadline (minus margin).
    0 means do not pull now."""
    window = min(wanted_s, deadline - margin_s - now)
    return window if window >= 0.05 else 0.0


def encode_lease(owner: str, ttl_s: int, at: float) -> bytes:
    """For people reading the bucket; the server's TTL, not `expires_at`, is what frees a lease."""
    return json.dumps({"owner": owner, "ttl_s": ttl_s, "expires_at": round(at + ttl_s, 3)}).encode()


def decode_lease(value: bytes, revision: int) -> Lease:
    return Lease(owner=json.loads(value)["owner"], revision=revision)


# --- claims: the fence on an owner's writes (group.py) ----------------------------------------------
@dataclass(frozen=True)
class Claim:
    """A member's claim on a partition in one stream: its message on `subject` is that subject's last, at `seq`.
    The member's writes to the stream carry `seq` as a condition (jetstream.expect_last), so once anyone claims
    after it the stream refuses them."""

    stream: str
    subject: str
    seq: int
    at: float  # monotonic time the claim was sent


def claim_refresh_due(claim: Claim, now: float, max_age_s: float) -> bool:
    """A claim is written again (over itself) once a quarter of its stream's max age has passed, long before the
    stream could age it out, which would make the stream refuse every write of its owner. Max age 0: never."""
    return max_age_s > 0 and now - claim.at >= max_age_s / 4


def encode_claim(owner: str, partition: int, lease_revision: int, at: float) -> bytes:
    """For people reading the stream (`nats stream view TRANSCRIPTS --subject claim.transcriber.p3`); only the
    claim's sequence counts."""
    return json.dumps(
        {"owner": owner, "partition": partition, "lease_revision": lease_revision, "at": round(at, 3)}
    ).encode()


def decode_claim_owner(value: bytes) -> str:
    return str(json.loads(value)["owner"])


def encode_member(member: str, eligible: Collection[int] | None, at: float) -> bytes:
    return json.dumps(
        {"member": member, "partitions": None if eligible is None else sorted(eligible), "at": round(at, 3)}
    ).encode()


def decode_member(value: bytes) -> tuple[str, frozenset[int] | None]:
    data = json.loads(value)
    partitions = data.get("partitions")
    return data["member"], None if partitions is None else frozenset(partitions)
