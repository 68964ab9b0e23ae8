"""examples/translate_finals.py, its pure part: the consumer it asks for, where it resumes, what it does with a
message, and the stand-in translation."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from jetscribe.shared.wire import Segment

_spec = importlib.util.spec_from_file_location(
    "translate_finals", Path(__file__).parents[2] / "examples" / "translate_finals.py"
)
assert _spec and _spec.loader
example = sys.modules["translate_finals"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(example)


def segment(status="final", text="hello there", segment_id=3):
    return Segment(
        tenant="acme", session_id="s1", segment_id=segment_id, revision=1, status=status, start=1.0, end=2.5, text=text
    )


def test_it_reads_the_tenants_reader_made_by_the_operator():
    assert example.reader_consumer("acme", "translate") == "reader_acme_translate"  # jetscribe tenant reader


@pytest.mark.parametrize("tenant", ["", "a.b", "a*", "a>", "x" * 65])
def test_a_tenant_that_is_not_one_subject_token_is_refused(tenant):
    with pytest.raises(ValueError, match="must be 1-64 letters"):
        example.reader_consumer(tenant, "d")


def test_a_jwt_credentials_file_and_a_bare_seed_are_told_apart():
    jwt = "-----BEGIN NATS USER JWT-----\neyJ0...\n------END NATS USER JWT------\n\n-----BEGIN USER NKEY SEED-----\n"
    assert example.credentials_option(jwt) == "user_credentials"
    assert example.credentials_option("SUAM2CJ3Q7ZJ4LDTZ6P3GRXZP3X5TJ2O\n") == "nkeys_seed"


def test_it_resumes_after_the_last_whole_line_written():
    lines = [example.record(segment(segment_id=i), seq) for i, seq in enumerate((4, 9, 12))]
    assert example.last_handled([]) == 0
    assert example.last_handled(lines) == 12
    assert example.last_handled([*lines, lines[-1][:20]]) == 12  # killed while writing: that one was not handled
    assert json.loads(lines[0]) | {"translation": "?"} == {
        "stream_seq": 4,
        "tenant": "acme",
        "session_id": "s1",
        "segment_id": 0,
        "start": 1.0,
        "end": 2.5,
        "text": "hello there",
        "translation": "?",
        "translation_is_a_stand_in": True,
    }


def test_interims_are_skipped_and_a_final_written_before_is_not_translated_again():
    assert example.next_step(segment(status="interim"), 20, 10) == "interim"
    assert example.next_step(segment(), 10, 10) == "repeat"
    assert example.next_step(segment(), 9, 10) == "repeat"
    assert example.next_step(segment(), 11, 10) == "translate"


def test_the_stand_in_translation_is_pig_latin():
    assert example.translate("Hello there, apple tree 42.") == "Ellohay erethay, appleway eetray 42."
    assert "[stand-in translation] Ellohay" in example.show(segment(text=" Hello"))
