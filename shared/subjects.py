"""Every subject, stream and consumer name, built here and nowhere else.

Tenant and session are subject tokens, so per-tenant permissions stay plain subject rules.
"""

from __future__ import annotations

import functools
import re

AUDIO_STREAM = "AUDIO"
TRANSCRIPTS_STREAM = "TRANSCRIPTS"
ERRORS_STREAM = "ERRORS"

PERSISTER_CONSUMER = "persister"

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def is_valid_token(value: str) -> bool:
    """Tenant and session ids must be one subject token: letters, digits, '_' or '-', at most 64."""
    return _TOKEN.fullmatch(value) is not None  # fullmatch: "$" would let a trailing newline through


# Bots -> ingest gateway (request/reply)
def channel_track(session: str, channel: int) -> str:
    """The session a channel of a multichannel session is stored as (`channel_speakers`): the split session's
    id is the meeting's, each channel a track of it."""
    return f"{session}-ch{channel}"


def ingest_audio(tenant: str, session: str) -> str:
    """A bot's audio chunks, as requests the gateway answers."""
    return f"ingest.audio.{tenant}.{session}"


INGEST_AUDIO_ALL = "ingest.audio.*.*"


def ingest_session(tenant: str, session: str) -> str:
    """A bot's start and end of a session, as requests."""
    return f"ingest.session.{tenant}.{session}"


INGEST_SESSION_ALL = "ingest.session.*.*"


# Ingest gateway -> AUDIO stream; the stream appends the partition as a fourth token.
def audio(tenant: str, session: str) -> str:
    """Where the gateway publishes stored audio; the AUDIO stream adds the partition token."""
    return f"audio.{tenant}.{session}"


AUDIO_PUBLISHED = "audio.*.*"


def audio_partition_transform(partitions: int) -> tuple[str, str]:
    """(source, destination) of the AUDIO stream's subject transform: a stable hash of tenant+session."""
    return AUDIO_PUBLISHED, f"audio.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}.{{{{partition({partitions},1,2)}}}}"


def audio_partition_filter(partition: int) -> str:
    """The filter of partition N's consumer: every session the stream hashed there."""
    return f"audio.*.*.{partition}"


def audio_of_session(tenant: str, session: str) -> str:
    """All stored audio of one session, whatever its partition."""
    return f"audio.{tenant}.{session}.*"


def is_audio_of(subject: str, tenant: str, session: str) -> bool:
    """Whether a stored audio subject (`audio.<tenant>.<session>.<partition>`) is that session's."""
    parts = subject.split(".")
    return len(parts) == 4 and parts[0] == "audio" and (parts[1], parts[2]) == (tenant, session)


@functools.lru_cache(maxsize=1 << 16)  # asked for every request a gateway takes
def session_partition(tenant: str, session: str, partitions: int) -> int:
    """The partition nats-server's `partition(N,1,2)` gives a session: FNV-1a (32 bit) of tenant + session, mod N.
    Its audio is stored there, and the gateway holding that partition serves its requests."""
    digest = 0x811C9DC5
    for byte in f"{tenant}{session}".encode():
        digest = ((digest ^ byte) * 0x01000193) & 0xFFFFFFFF
    return digest % partitions


# The gateways' group: the transcribers' lease machinery (services/transcriber/group.py) without a consumer. Any
# gateway takes a bot's request (queue group); the one holding the session's partition serves it, the others
# forward it there.
INGEST_QUEUE = "ingest"
INGEST_MEMBERS_BUCKET = "ingest_members"
INGEST_LEASES_BUCKET = "ingest_leases"


_INGEST_PARTITION = "ingest.partition."


def ingest_partition(partition: int, kind: str, tenant: str, session: str) -> str:
    """A bot's request forwarded to the gateway holding `partition`; `kind` is "audio" or "session"."""
    return f"{_INGEST_PARTITION}{partition}.{kind}.{tenant}.{session}"


def ingest_partition_all(partition: int) -> str:
    """What the gateway holding `partition` subscribes to."""
    return f"{_INGEST_PARTITION}{partition}.>"


INGEST_PARTITIONS_ALL = f"{_INGEST_PARTITION}*.>"  # every forwarded request (the gateways' NATS permissions)


def is_forwarded(subject: str) -> bool:
    """A request one gateway forwarded to another (`ingest_partition`), not a bot's own."""
    return subject.startswith(_INGEST_PARTITION)


# The per-tenant session limit, global across gateways: KV key <tenant> holds its open sessions, written only by
# compare-and-set; a durable consumer of the transcribers' `ended` / `rejected` events frees their slots.
TENANT_SESSIONS_BUCKET = "tenant_sessions"
SESSION_ENDS_CONSUMER = "ingest-session-ends"


# The transcribers' consumer group: live members and partition leases in KV buckets, and one
# priority group (pinned_client) on every transcriber-p<N> consumer. Group names: at most 16 chars.
TRANSCRIBER_MEMBERS_BUCKET = "transcriber_members"
PARTITION_LEASES_BUCKET = "partition_leases"


def partition_lease_key(partition: int) -> str:
    """Key of a partition's lease in KV `partition_leases`."""
    return f"p{partition}"


TRANSCRIBER_PRIORITY_GROUP = "transcribers"


# The owner's claim on a partition, one in each stream its writes go to (services/transcriber/group.py): every
# segment and event it publishes, and every checkpoint it writes, is stored only while its claim is the last.
def transcriber_claim(partition: int) -> str:
    """The subject in TRANSCRIPTS of the claims on one partition."""
    return f"claim.transcriber.p{partition}"


TRANSCRIBER_CLAIMS_ALL = "claim.transcriber.*"


def checkpoint_claim_key(partition: int) -> str:
    """The key in KV `session_checkpoints` of the claims on one partition; the '=' keeps it apart from every
    checkpoint key (`<tenant>.<session>`, whose tokens hold none)."""
    return f"claim=transcriber.p{partition}"


def transcriber_consumer(partition: int) -> str:
    """Durable pull consumer of one AUDIO partition, pinned to the worker holding its lease."""
    return f"transcriber-p{partition}"


def partition_of_consumer(name: str) -> int | None:
    """The partition a `transcriber-p<N>` consumer reads; None for any other consumer."""
    found = re.fullmatch(r"transcriber-p(\d+)", name)
    return int(found.group(1)) if found else None


SESSION_CHECKPOINTS_BUCKET = "session_checkpoints"


def checkpoint_key(tenant: str, session: str) -> str:
    """Key of a session's checkpoint in KV `session_checkpoints`."""
    return f"{tenant}.{session}"


# Transcriber -> TRANSCRIPTS stream
def transcript(tenant: str, session: str) -> str:
    """A session's segments, interim and final, in TRANSCRIPTS."""
    return f"transcript.{tenant}.{session}"


TRANSCRIPTS_ALL = "transcript.*.*"


def session_event(tenant: str, session: str, event: str) -> str:
    """One lifecycle event (started, ended, rejected) of a session, in TRANSCRIPTS."""
    return f"session.{tenant}.{session}.{event}"


SESSION_EVENTS_ALL = "session.*.*.*"


def session_events_of(tenant: str, session: str) -> str:
    """Every lifecycle event of one session."""
    return f"session.{tenant}.{session}.*"


def session_event_all(event: str) -> str:
    """One kind of event (e.g. "ended") of every session."""
    return f"session.*.*.{event}"


# Transcriber -> whoever watches its load (bench/load.py): core NATS, not stored
def history(tenant: str, session: str) -> str:
    """Where a tenant asks a gateway for a page of a session's stored transcript (services/ingest/history.py)."""
    return f"jetscribe.history.{tenant}.{session}"


HISTORY_ALL = "jetscribe.history.*.*"
HISTORY_QUEUE = "history"


def transcriber_stats(worker_id: str) -> str:
    """Where a transcriber publishes its `WorkerStats` every second; the worker id as one subject token
    (characters other than letters, digits, '_' and '-', such as the dots of a host name, become '_')."""
    return f"jetscribe.stats.transcriber.{re.sub(r'[^A-Za-z0-9_-]', '_', worker_id) or '_'}"


TRANSCRIBER_STATS_ALL = "jetscribe.stats.transcriber.*"


# NATS micro-services ($SRV.PING|INFO|STATS are the micro API's own): each instance's endpoints
def service_endpoint(service: str, instance_id: str, endpoint: str) -> str:
    """An endpoint ("health", "stats") of one running instance of a service (ingest, transcriber, persister)."""
    return f"jetscribe.svc.{service}.{instance_id}.{endpoint}"


# Errors, per service and tenant
UNKNOWN_TENANT = "_"  # the error subjects' tenant token when the tenant is unknown or not a valid id


def errors(service: str, tenant: str) -> str:
    """Refusals and failures one service reports for a tenant: `errors.<service>._` when none is known or it is not
    a valid id (what a subject or payload named may be any bytes)."""
    return f"errors.{service}.{tenant if is_valid_token(tenant) else UNKNOWN_TENANT}"


ERRORS_ALL = "errors.>"


def message_id(tenant: str, session: str, seq: int | str) -> str:
    """Nats-Msg-Id of stored audio: the stream's duplicate window drops a repeat."""
    return f"{tenant}:{session}:{seq}"


def segment_message_id(tenant: str, session: str, segment_id: int, status: str, revision: int, worker_id: str) -> str:
    """Nats-Msg-Id of a transcript segment. A final's id is its segment id alone: a worker that re-decodes
    the same utterance after a takeover publishes a duplicate the stream drops. Interims are per worker
    and revision."""
    suffix = "final" if status == "final" else f"{revision}:{worker_id}"
    return f"{tenant}:{session}:seg:{segment_id}:{suffix}"


def event_message_id(tenant: str, session: str, event: str, at_s: float | None = None) -> str:
    """Nats-Msg-Id of a session event: one of each lifecycle kind per session, repeats dropped by the stream; a kind
    that comes many times (`utterance_end`, `speech_started`) is told apart by its session time `at_s`."""
    return f"{tenant}:{session}:event:{event}" + (f":{at_s:.3f}" if at_s is not None else "")
