"""The README's wire table names every field of every message in shared/wire.py, and only those; the arrays it
shows (`[word, start, end, probability]`) are the array-like structs' fields in order; `jetscribe follow --format
json` prints those names."""

import json
import re
import typing
from pathlib import Path

import msgspec

from jetscribe.client.follow import as_json
from jetscribe.shared import wire

README = Path(__file__).parents[2] / "README.md"


def tagged_messages() -> dict[str, type[msgspec.Struct]]:
    found = {}
    for value in vars(wire).values():
        if isinstance(value, type) and issubclass(value, msgspec.Struct) and value.__struct_config__.tag:
            found[value.__struct_config__.tag] = value
    return found


def wire_table() -> dict[str, str]:
    """type tag -> its fields cell, from the table under `## Wire contract`."""
    text = README.read_text()
    section = text[text.index("## Wire contract") :]
    section = section[: section.index("\n## ", 1)]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\| `(\w+)` \((\w+)\) \| (.*) \|$", line)
        if match:
            tag, name, cell = match.groups()
            rows[tag] = (name, cell)
    return rows


def top_level_items(cell: str) -> list[str]:
    """Split at commas outside (), [], {} and backticks; a `:` or `;` outside them ends the list (prose follows)."""
    items, depth, quoted, current = [], 0, False, ""
    for ch in cell:
        if ch == "`":
            quoted = not quoted
        elif not quoted and ch in "([{":
            depth += 1
        elif not quoted and ch in ")]}":
            depth -= 1
        if depth == 0 and not quoted and ch in ":;":
            break
        if ch == "," and depth == 0 and not quoted:
            items.append(current.strip())
            current = ""
        else:
            current += ch
    items.append(current.strip())
    return [item for item in items if item]


def named(cell: str) -> dict[str, str]:
    """field name -> the rest of its item."""
    fields = {}
    for item in top_level_items(cell):
        match = re.match(r"(\w+)\s*(.*)", item, re.S)
        assert match, f"no field name in {item!r}"
        fields[match[1]] = match[2]
    return fields


def test_every_message_is_in_the_table_with_exactly_its_fields():
    messages, table = tagged_messages(), wire_table()
    assert set(table) == set(messages), "rows and wire types differ"
    for tag, cls in messages.items():
        name, cell = table[tag]
        assert name == cls.__name__, f"row `{tag}` names {name}, the class is {cls.__name__}"
        fields = named(cell)
        assert list(fields) == [f for f in cls.__struct_fields__ if f != "v"], f"`{tag}`: README {list(fields)}"


def test_arrays_in_the_table_are_the_array_like_structs_in_order():
    messages, table = tagged_messages(), wire_table()
    checked = 0
    for tag, cls in messages.items():
        hints = typing.get_type_hints(cls)
        for field, rest in named(table[tag][1]).items():
            args = typing.get_args(hints[field])
            inner = args[0] if len(args) == 1 else None
            if not (
                isinstance(inner, type) and issubclass(inner, msgspec.Struct) and inner.__struct_config__.array_like
            ):
                continue
            shown = re.search(r"`\[([\w, ]+)\]`", rest)
            assert shown, f"`{tag}`.{field}: the README shows no array for it"
            assert [s.strip() for s in shown[1].split(",")] == list(inner.__struct_fields__), f"`{tag}`.{field}"
            checked += 1
    assert checked >= 3  # at least Segment.words, Segment.dropped, AudioChunk.speaker_changes


def test_follow_json_prints_the_table_names_with_words_as_objects():
    segment = wire.Segment(
        tenant="acme",
        session_id="s1",
        segment_id=0,
        revision=1,
        status="final",
        start=0.0,
        end=1.0,
        text="hi",
        words=[wire.Word("hi", 0.1, 0.4, 0.9)],
        dropped=[wire.DroppedWord("hi", 0.5, 0.9, 0.2, "trailing")],
    )
    line = json.loads(as_json(segment, 5))
    assert set(line) == {*wire.Segment.__struct_fields__, "type", "stream_seq"}
    assert set(line) >= set(named(wire_table()["segment"][1]))
    assert line["words"] == [{"word": "hi", "start": 0.1, "end": 0.4, "probability": 0.9, "speaker": None}]
    assert line["dropped"] == [{"word": "hi", "start": 0.5, "end": 0.9, "probability": 0.2, "reason": "trailing"}]
