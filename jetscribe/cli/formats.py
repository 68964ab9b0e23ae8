"""A session's final segments as plain text, JSON, SubRip (srt) or WebVTT; live segments as they come."""

from __future__ import annotations

import json
from types import SimpleNamespace

FORMATS = ("text", "json", "srt", "vtt")
WORD_FIELDS = ("word", "start", "end", "probability", "speaker")  # a word's items in segments.words and on the wire


def show_live(segment, out) -> None:
    """Print a wire Segment as it arrives: finals stay; on a terminal an interim rewrites the current line,
    elsewhere interims are left out."""
    interactive = out.isatty()
    if segment.status == "final":
        if segment.text:
            line = f"[{segment.start:7.2f} - {segment.end:7.2f}] {_speaker_prefix(segment)}{segment.text}"
            print(("\r\033[K" if interactive else "") + line, file=out, flush=True)
    elif interactive:
        print(f"\r\033[K  … {segment.text[-100:]}", end="", file=out, flush=True)


def render(segments, fmt: str) -> str:
    """`segments`: objects with segment_id, start_s, end_s, text, speaker, words (final, in order)."""
    spoken = [s for s in segments if s.text]
    if fmt == "text":  # no finals: an empty transcript (json `[]`, vtt its header alone)
        return "\n".join(_speaker_prefix(s) + s.text for s in spoken)
    if fmt == "json":
        return json.dumps(
            [
                {
                    "segment_id": s.segment_id,
                    "start": s.start_s,
                    "end": s.end_s,
                    "text": s.text,
                    "speaker": s.speaker,
                    "words": [dict(zip(WORD_FIELDS, w, strict=False)) for w in s.words],
                }
                | ({"track": s.track} if getattr(s, "track", None) else {})
                for s in spoken
            ],
            indent=2,
        )
    if fmt == "srt":
        return "\n".join(
            f"{i}\n{_clock(s.start_s, ',')} --> {_clock(s.end_s, ',')}\n{_speaker_prefix(s)}{s.text}\n"
            for i, s in enumerate(spoken, 1)
        )
    if fmt == "vtt":
        cues = [f"{_clock(s.start_s, '.')} --> {_clock(s.end_s, '.')}\n{_voice(s)}{s.text}\n" for s in spoken]
        return "WEBVTT\n\n" + "\n".join(cues)
    raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")


# `jetscribe sessions`: (heading, attribute, right-aligned); dropped: words the guards removed; empty: finals
# that came out empty over speech.
_SESSION_COLUMNS = (
    ("tenant", "tenant", False),
    ("session", "session_id", False),
    ("status", "status", False),
    ("reason", "reason", False),
    ("audio s", "audio_seconds", True),
    ("segments", "segment_count", True),
    ("dropped", "words_dropped", True),
    ("empty", "empty_finals", True),
    ("started", "created_at", False),
)


def _session_cell(row, attribute: str) -> str:
    value = getattr(row, attribute)
    if attribute == "audio_seconds":
        return f"{value or 0:.1f}"
    if attribute == "created_at":
        return f"{value:%Y-%m-%d %H:%M:%S}" if value else "-"
    if attribute in ("segment_count", "words_dropped", "empty_finals"):
        return str(value or 0)
    return str(value) if value else "-"


def sessions_table(rows) -> str:
    """Sessions as a table whose columns are as wide as their widest cell (a session id may be 64 characters)."""
    cells = [[heading for heading, _, _ in _SESSION_COLUMNS]]
    cells += [[_session_cell(row, attribute) for _, attribute, _ in _SESSION_COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(_SESSION_COLUMNS))]
    return "\n".join(
        "  ".join(
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, (_, _, right) in zip(line, widths, _SESSION_COLUMNS, strict=True)
        ).rstrip()
        for line in cells
    )


def sessions_json(rows) -> str:
    """Sessions as a JSON list, one object per session with every stored field (times in ISO 8601)."""
    fields = (
        "tenant session_id status reason language model created_at ended_at last_activity chunks_received "
        "audio_seconds segment_count words_dropped empty_finals worker_id"
    ).split()

    def value(row, name: str):
        item = getattr(row, name, None)
        return item.isoformat() if hasattr(item, "isoformat") else item

    return json.dumps([{name: value(row, name) for name in fields} for row in rows], indent=2)


def _clock(seconds: float, separator: str) -> str:
    millis = int(round(seconds * 1000))
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _speaker_prefix(segment) -> str:
    return f"{segment.speaker}: " if segment.speaker else ""


def _voice(segment) -> str:
    """A WebVTT voice tag; the name escaped as cue text must be (no '<', '>', '&' or line break inside a tag)."""
    if not segment.speaker:
        return ""
    name = " ".join(segment.speaker.split()).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return f"<v {name}>"


def meeting_rows(rows) -> list[SimpleNamespace]:
    """A meeting's final rows (every track's, in spoken order) with times from the first track's start, so the
    formats above show the meeting as one transcript; `track` says which session each came from."""
    if not rows:
        return []
    t0 = min(r.track_start for r in rows)
    out = []
    for r in rows:
        shift = r.track_start - t0
        words = [[w[0], round(w[1] + shift, 3), round(w[2] + shift, 3), *w[3:]] for w in r.words]
        out.append(
            SimpleNamespace(
                segment_id=r.segment_id,
                track=r.session_id,
                start_s=round(r.start_s + shift, 3),
                end_s=round(r.end_s + shift, 3),
                text=r.text,
                speaker=r.speaker,
                words=words,
            )
        )
    return out
