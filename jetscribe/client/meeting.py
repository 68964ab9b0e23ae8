"""A meeting's tracks read together: one session per participant's track, their finals merged in spoken order.

Each track's own finals come in order; across tracks they come as each worker publishes them. `MeetingMerge`
holds a final until no open track can still publish an earlier one: every other track it has seen has
published something (an interim or a final) starting later, or has ended. A track that stays silent would
hold the others forever, so a final waits at most `hold_s` (the order may then differ from the spoken one
by a final that came later than that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from jetscribe.shared.wire import Segment, SessionEvent


def meeting_time(segment: Segment) -> float:
    """When a segment was spoken, in wall time: its track's start plus its start in the track."""
    return segment.track_start + segment.start


@dataclass
class _Held:
    at: float  # meeting time
    arrived: float  # reader's clock
    segment: Segment


@dataclass
class MeetingMerge:
    meeting_id: str
    hold_s: float = 3.0
    reached: dict[str, float] = field(default_factory=dict)  # track -> the latest start it published; inf: ended
    held: list[_Held] = field(default_factory=list)

    def segment(self, segment: Segment, now: float) -> list[Segment]:
        """A segment from TRANSCRIPTS; returns the finals now due, in spoken order (other meetings' are ignored)."""
        if segment.meeting_id != self.meeting_id:
            return []
        track = segment.session_id
        if self.reached.get(track) != math.inf:  # a late segment of an ended track changes nothing
            self.reached[track] = max(self.reached.get(track, -math.inf), meeting_time(segment))
        if segment.status == "final" and segment.text:
            self.held.append(_Held(meeting_time(segment), now, segment))
            self.held.sort(key=lambda h: (h.at, h.segment.session_id, h.segment.segment_id))
        return self.due(now)

    def event(self, event: SessionEvent, now: float) -> list[Segment]:
        """A track's lifecycle event: `started` makes it one to wait for, `ended` / `rejected` one not to."""
        if event.meeting_id != self.meeting_id:
            return []
        if event.event == "started":
            self.reached.setdefault(event.session_id, -math.inf)
        elif event.event in ("ended", "rejected"):  # not a pause or an onset (`utterance_end`, `speech_started`)
            self.reached[event.session_id] = math.inf
        return self.due(now)

    def due(self, now: float) -> list[Segment]:
        """The held finals no open track can precede any more, or held for `hold_s` (with all before them)."""
        expired = max((h.at for h in self.held if now - h.arrived >= self.hold_s), default=-math.inf)
        out = []
        while self.held:
            head = self.held[0]
            others = [r for track, r in self.reached.items() if track != head.segment.session_id]
            if head.at > min(others, default=math.inf) and head.at > expired:
                break
            out.append(self.held.pop(0).segment)
        return out

    @property
    def tracks(self) -> list[str]:
        return sorted(self.reached)

    @property
    def over(self) -> bool:
        """Every track seen has ended (and at least one was seen)."""
        return bool(self.reached) and all(r == math.inf for r in self.reached.values())

    def wait_s(self, now: float) -> float | None:
        """How long until the oldest held final is due by its hold (None: nothing held)."""
        if not self.held:
            return None
        return max(0.0, min(h.arrived for h in self.held) + self.hold_s - now)
