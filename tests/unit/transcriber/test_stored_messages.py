"""What the worker refuses from AUDIO: messages the gateway would never have stored."""

import numpy as np
import pytest

from jetscribe.services.transcriber.core import MAX_SEQ, stored_message_problem
from jetscribe.shared.wire import AudioChunk, SessionControl


def chunk(**overrides):
    fields = dict(
        tenant="acme",
        session_id="s1",
        seq=0,
        sent_at=1.0,
        sample_rate=16000,
        channels=1,
        encoding="pcm_s16le",
        payload=np.zeros(160, "<i2").tobytes(),
        received_at=2.0,
    )
    return AudioChunk(**{**fields, **overrides})


def test_what_the_gateway_stores_passes():
    assert stored_message_problem(chunk()) is None
    assert stored_message_problem(chunk(seq=MAX_SEQ)) is None
    assert stored_message_problem(SessionControl(tenant="acme", session_id="s1", action="start", language="de")) is None


@pytest.mark.parametrize(
    "overrides, code",
    [
        ({"seq": -1}, "bad_seq"),  # before: acked unused without a word
        ({"seq": MAX_SEQ + 1}, "bad_seq"),  # before: it moved the session past every later chunk, which were dropped
        ({"tenant": "a$b"}, "bad_id"),
        ({"session_id": "x" * 65}, "bad_id"),
        ({"sent_at": float("nan")}, "malformed"),
        ({"received_at": float("inf")}, "malformed"),
        ({"sample_rate": 48000}, "malformed"),
        ({"payload": b"\x00"}, "malformed"),
    ],
)
def test_what_it_never_stores_is_refused(overrides, code):
    assert stored_message_problem(chunk(**overrides))[0] == code


def test_a_start_in_a_language_whisper_does_not_know_is_refused():
    start = SessionControl(tenant="acme", session_id="s1", action="start", language="xx" * 1000)
    code, message = stored_message_problem(start)
    assert code == "bad_language" and len(message) < 200
