"""The lines a worker logs about a session's life: one when it starts, one when it ends (with its totals), one
when a worker takes it over from a checkpoint, one when it hands it over. Pure: the shell logs what these return.
"""

from __future__ import annotations

from jetscribe.shared.audio import SAMPLE_RATE
from jetscribe.shared.wire import SessionCheckpoint, SessionEvent


def event_line(
    event: SessionEvent, partition: int, words: int, resumed: bool = False, silero_share: float | None = None
) -> str:
    """A `started`, `ended` or `rejected` event as one line for people; `words` are the words of the finals this
    worker published (`resumed`: only since it took the session over, the earlier owner's are not known here);
    `silero_share`: the share of VAD frames the hybrid detector asked Silero about (its CPU), if it ran one."""
    name = f"session {event.tenant}/{event.session_id}"
    where = f"worker {event.worker_id}, partition {partition}"
    if event.event == "started":
        return f"{name} started on {where}: language {event.language or 'auto'}, model {event.model or '?'}"
    reason = event.reason or ("the bot ended it" if event.event == "ended" else "?")
    words_note = f"{words} words (since the takeover)" if resumed else f"{words} words"
    return (
        f"{name} {event.event} ({reason}) on {where}: {event.audio_seconds:.1f} s of audio, "
        f"{event.chunks_received} chunks, {event.segments} finals, {words_note}, "
        f"{event.words_dropped} words dropped by the guards, {event.empty_finals} empty finals"
        + ("" if silero_share is None else f", Silero VAD on {silero_share:.0%} of the frames")
    )


def takeover_line(checkpoint: SessionCheckpoint, worker_id: str, partition: int) -> str:
    """A session this worker resumes from the checkpoint another (or an earlier) worker wrote."""
    by = checkpoint.worker_id or "an unknown worker"
    return (
        f"session {checkpoint.tenant}/{checkpoint.session_id} taken over on worker {worker_id}, partition "
        f"{partition}, from {by}'s checkpoint: acked up to seq {checkpoint.acked_seq} "
        f"({checkpoint.acked_samples / SAMPLE_RATE:.1f} s), next segment {checkpoint.next_segment_id}"
    )


def handed_over_line(tenant: str, session_id: str, worker_id: str, partition: int, acked_seq: int) -> str:
    """This worker gave the session up (a drain or a rebalance); the next owner resumes after `acked_seq`."""
    return (
        f"session {tenant}/{session_id} handed over by worker {worker_id}, partition {partition}: "
        f"the next owner resumes after seq {acked_seq}"
    )
