"""Every subject, stream and consumer name, built here and nowhere else.

Tenant and session are subject tokens, so per-tenant permissions stay plain subject rules.
"""

from __future__ import annotations

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
def ingest_audio(tenant: str, session: str) -> str:
    return f"ingest.audio.{tenant}.{session}"


def ingest_session(tenant: str, session: str) -> str:
    return f"ingest.session.{tenant}.{session}"


INGEST_AUDIO_ALL = "ingest.audio.*.*"
INGEST_SESSION_ALL = "ingest.session.*.*"


# Ingest gateway -> AUDIO stream; the stream appends the partition as a fourth token.
def audio(tenant: str, session: str) -> str:
    return f"audio.{tenant}.{session}"


AUDIO_PUBLISHED = "audio.*.*"


def audio_partition_transform(partitions: int) -> tuple[str, str]:
    """(source, destination) of the AUDIO stream's subject transform: a stable hash of tenant+session."""
    return AUDIO_PUBLISHED, f"audio.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}.{{{{partition({partitions},1,2)}}}}"


def audio_partition_filter(partition: int) -> str:
    return f"audio.*.*.{partition}"


def audio_of_session(tenant: str, session: str) -> str:
    """All stored audio of one session, whatever its partition."""
    return f"audio.{tenant}.{session}.*"


def transcriber_consumer(partition: int) -> str:
    return f"transcriber-p{partition}"


# The transcribers' consumer group: live members and partition leases in KV buckets, and one
# priority group (pinned_client) on every transcriber-p<N> consumer. Group names: at most 16 chars.
TRANSCRIBER_MEMBERS_BUCKET = "transcriber_members"
PARTITION_LEASES_BUCKET = "partition_leases"
TRANSCRIBER_PRIORITY_GROUP = "transcribers"


SESSION_CHECKPOINTS_BUCKET = "session_checkpoints"


def checkpoint_key(tenant: str, session: str) -> str:
    return f"{tenant}.{session}"


def partition_lease_key(partition: int) -> str:
    return f"p{partition}"


# Transcriber -> TRANSCRIPTS stream
def transcript(tenant: str, session: str) -> str:
    return f"transcript.{tenant}.{session}"


def session_event(tenant: str, session: str, event: str) -> str:
    return f"session.{tenant}.{session}.{event}"


def session_events_of(tenant: str, session: str) -> str:
    return f"session.{tenant}.{session}.*"


def session_event_all(event: str) -> str:
    """One kind of event (e.g. "ended") of every session."""
    return f"session.*.*.{event}"


TRANSCRIPTS_ALL = "transcript.*.*"
SESSION_EVENTS_ALL = "session.*.*.*"


# Errors, per service and tenant
def errors(service: str, tenant: str) -> str:
    return f"errors.{service}.{tenant or '_'}"


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


def event_message_id(tenant: str, session: str, event: str) -> str:
    """Nats-Msg-Id of a session event: one of each kind per session, repeats dropped by the stream."""
    return f"{tenant}:{session}:event:{event}"
