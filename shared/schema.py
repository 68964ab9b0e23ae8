"""The downstream contract: a JSON Schema of every message a consumer of TRANSCRIPTS reads, made from the wire models.

A translation service (or any other reader of `transcript.*` and `session.*`) gets msgpack maps; these schemas say
what the decoded map holds. They are generated from `shared/wire.py` with msgspec, committed under `docs/schema/`
(`jetscribe schema --out docs/schema` writes them again) and a test fails when the two differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import msgspec

from jetscribe.shared import subjects
from jetscribe.shared.wire import SCHEMA_VERSION, Segment, SessionEvent

SCHEMA_FOLDER = "docs/schema"  # where the repository keeps them
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


@dataclass(frozen=True)
class Published:
    """One kind of message a downstream consumer reads: the file its schema goes to, where it is published."""

    file: str
    model: type[msgspec.Struct]
    subject: str  # the subject pattern, tokens in angle brackets
    stream: str
    about: str


DOWNSTREAM = (
    Published(
        "transcript.json",
        Segment,
        subjects.transcript("<tenant>", "<session>"),
        subjects.TRANSCRIPTS_STREAM,
        "A segment of a session's transcript. Interims (status `interim`) of one segment_id are replaced by its "
        "final (status `final`); a final is published once (its Nats-Msg-Id is `<tenant>:<session>:seg:<id>:final`, "
        "so the stream drops a repeat). `words` items are arrays [word, start, end, probability, speaker] (speaker "
        "optional) and `dropped` items [word, start, end, probability, reason]; times are seconds of session audio. "
        "A reader ignores fields and trailing array items it does not know: new optional ones keep the version.",
    ),
    Published(
        "session.json",
        SessionEvent,
        subjects.session_event("<tenant>", "<session>", "<event>"),
        subjects.TRANSCRIPTS_STREAM,
        "A session's lifecycle event: `started` when a worker takes it, then `ended` (reason empty after the bot's "
        "end, the reason its end gave, e.g. `refused: bad_payload` when the gateway refused a WebSocket session's "
        "input, or `idle_timeout`) or `rejected` (reason `worker_full` or `buffer_full`). One of each of these per "
        "session (Nats-Msg-Id `<tenant>:<session>:event:<event>`); `at` is a Unix time. Only for a session whose "
        "start asked for them (options `utterance_end_ms`, `vad_events`), any number of `utterance_end` (with "
        "`last_word_end`, session seconds) and `speech_started` (with `timestamp`, session seconds) (Nats-Msg-Id "
        "`<tenant>:<session>:event:<event>:<that time>`). A reader skips kinds it does not know.",
    ),
)


def schema_of(published: Published) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one downstream message, with where it is published."""
    [root], components = msgspec.json.schema_components([published.model], ref_template="#/$defs/{name}")
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "title": f"jetscribe {published.model.__name__} (wire schema version {SCHEMA_VERSION})",
        "description": published.about,
        "x-jetscribe": {
            "subject": published.subject,
            "stream": published.stream,
            "encoding": "msgpack (a map; the schema describes it decoded)",
            "schema_version": SCHEMA_VERSION,
            "generated_from": f"jetscribe.shared.wire.{published.model.__name__}",
        },
        **root,
        "$defs": components,
    }


def render(schema: dict[str, Any]) -> str:
    """A schema as the committed file holds it: stable key order, two-space indent, a final newline."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def downstream_files() -> dict[str, str]:
    """{file name: text} of every downstream schema, as `jetscribe schema` writes them."""
    return {published.file: render(schema_of(published)) for published in DOWNSTREAM}
