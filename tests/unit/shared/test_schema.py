"""The downstream contract: docs/schema/*.json are what the wire models generate, and they hold real messages."""

import json
from pathlib import Path

import jsonschema
import msgspec
import pytest

from jetscribe.cli.main import main as jetscribe
from jetscribe.shared.schema import DOWNSTREAM, SCHEMA_FOLDER, downstream_files
from jetscribe.shared.wire import DroppedWord, Segment, SessionEvent, Word, encode

ROOT = Path(__file__).parents[3]
FOLDER = ROOT / SCHEMA_FOLDER


def test_the_committed_schemas_are_what_the_wire_models_generate():
    files = downstream_files()
    assert sorted(files) == sorted(p.name for p in FOLDER.glob("*.json")), "a schema file is missing or left over"
    for name, text in files.items():
        assert (FOLDER / name).read_text(encoding="utf-8") == text, (
            f"{SCHEMA_FOLDER}/{name} differs from shared/wire.py: regenerate with "
            f"`jetscribe schema --out {SCHEMA_FOLDER}`"
        )


def test_jetscribe_schema_check_fails_on_a_changed_file_and_rewrites_it(tmp_path, capsys):
    def schema(*args) -> int:
        return jetscribe(["schema", "--out", str(tmp_path), *args])

    assert schema("--check") == 1  # nothing written yet
    assert schema() == 0
    assert schema("--check") == 0
    (tmp_path / "session.json").write_text("{}\n")
    capsys.readouterr()
    assert schema("--check") == 1 and "session.json differs" in capsys.readouterr().err
    assert schema() == 0 and (tmp_path / "session.json").read_text() == downstream_files()["session.json"]


def schema_of(model) -> dict:
    [published] = [p for p in DOWNSTREAM if p.model is model]
    return json.loads((FOLDER / published.file).read_text())


def on_the_wire(message) -> dict:
    """What a downstream consumer decodes from the msgpack bytes a service publishes."""
    return msgspec.msgpack.decode(encode(message))


FINAL = Segment(
    tenant="acme",
    session_id="s1",
    segment_id=3,
    revision=2,
    status="final",
    start=1.5,
    end=3.25,
    text="hello there",
    words=[Word("hello", 1.5, 2.0, 0.9), Word("there", 2.1, 3.2, 0.8)],
    language="en",
    model="tiny.en",
    seq_first=10,
    seq_last=30,
    worker_id="w1",
    published_at=1.7e9,
    dropped=[DroppedWord("uh", 3.0, 3.1, 0.2, "trailing")],
)
ENDED = SessionEvent(tenant="acme", session_id="s1", event="ended", at=1.7e9, reason="idle_timeout", segments=4)


def test_real_messages_validate_against_the_committed_schemas():
    jsonschema.Draft202012Validator.check_schema(schema_of(Segment))
    jsonschema.Draft202012Validator.check_schema(schema_of(SessionEvent))
    jsonschema.validate(on_the_wire(FINAL), schema_of(Segment), cls=jsonschema.Draft202012Validator)
    interim = msgspec.structs.replace(FINAL, status="interim", dropped=[], speaker="A")
    jsonschema.validate(on_the_wire(interim), schema_of(Segment), cls=jsonschema.Draft202012Validator)
    jsonschema.validate(on_the_wire(ENDED), schema_of(SessionEvent), cls=jsonschema.Draft202012Validator)


@pytest.mark.parametrize(
    "model, message, change",
    [
        (Segment, FINAL, {"status": "done"}),
        (Segment, FINAL, {"words": [["hello", "1.5", 2.0, 0.9]]}),
        (Segment, FINAL, {"type": "session_event"}),
        (Segment, FINAL, {"segment_id": None}),
        (SessionEvent, ENDED, {"event": "paused"}),
        (SessionEvent, ENDED, {"at": "yesterday"}),
    ],
)
def test_a_message_the_services_would_refuse_does_not_validate(model, message, change):
    data = on_the_wire(message) | change
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, schema_of(model), cls=jsonschema.Draft202012Validator)
    with pytest.raises(msgspec.ValidationError):  # the schema refuses what the models refuse
        msgspec.convert(data, model)


def test_the_schema_names_where_each_message_is_published():
    assert schema_of(Segment)["x-jetscribe"]["subject"] == "transcript.<tenant>.<session>"
    assert schema_of(SessionEvent)["x-jetscribe"]["subject"] == "session.<tenant>.<session>.<event>"
    assert {schema_of(m)["x-jetscribe"]["stream"] for m in (Segment, SessionEvent)} == {"TRANSCRIPTS"}
