"""shared/jetstream.py's reply parsing: each refusal becomes its typed error, from the JSON, not the bytes."""

import pytest
from nats.aio.msg import Msg

from jetscribe.shared.errors import CodedError
from jetscribe.shared.jetstream import (
    JetStreamAPIError,
    NotFoundError,
    PinMismatchError,
    WrongLastSequenceError,
    nanoseconds,
    parse_reply,
    pin_id,
    pull_status,
)


def error_reply(code, err_code, description):
    return (
        f'{{"type":"io.nats.jetstream.api.v1.x","error":{{"code":{code},"err_code":{err_code},'
        f'"description":"{description}"}}}}'
    ).encode()


def status(code, description=""):
    return Msg(None, subject="_INBOX.x.1", headers={"Status": code, "Description": description})


def test_a_reply_without_error_is_returned_parsed():
    assert parse_reply(b'{"stream":"KV_b","seq":7}') == {"stream": "KV_b", "seq": 7}


def test_a_reply_that_mentions_error_in_its_data_is_not_an_error():
    assert parse_reply(b'{"description":"no \\"error\\" here","seq":1}')["seq"] == 1


@pytest.mark.parametrize(
    "code, err_code, cls",
    [
        (400, 10071, WrongLastSequenceError),
        (404, 10014, NotFoundError),
        (404, 10059, NotFoundError),
        (400, 10025, JetStreamAPIError),
        (500, 10999, JetStreamAPIError),
    ],
)
def test_an_error_reply_raises_its_typed_error(code, err_code, cls):
    with pytest.raises(cls) as raised:
        parse_reply(error_reply(code, err_code, "what went wrong"), "CONSUMER.INFO.S.c")
    error = raised.value
    assert type(error) is cls and isinstance(error, CodedError)
    assert (error.status, error.err_code, error.description) == (code, err_code, "what went wrong")
    assert str(error) == f"CONSUMER.INFO.S.c: {code} {err_code} what went wrong"


def test_a_reply_that_is_not_json_is_an_api_error():
    with pytest.raises(JetStreamAPIError):
        parse_reply(b"+OK")


@pytest.mark.parametrize(
    "code, heartbeat, interrupted",
    [("100", True, False), ("404", False, False), ("408", False, False), ("409", False, True)],
)
def test_pull_statuses_that_end_or_keep_a_request(code, heartbeat, interrupted):
    result = pull_status(status(code, "why"))
    assert (result.status, result.heartbeat, result.interrupted, result.description) == (
        int(code),
        heartbeat,
        interrupted,
        "why",
    )


def test_a_pin_mismatch_raises():
    with pytest.raises(PinMismatchError) as raised:
        pull_status(status("423", "Nats-Pin-Id mismatch"))
    assert raised.value.status == 423 and raised.value.code == "jetstream_pin_mismatch"


def test_other_pull_statuses_raise():
    with pytest.raises(JetStreamAPIError) as raised:
        pull_status(status("400", "Bad Request"))
    assert type(raised.value) is JetStreamAPIError and raised.value.status == 400


def test_pin_id_and_durations():
    assert pin_id(Msg(None, headers={"Nats-Pin-Id": "abc"})) == "abc"
    assert pin_id(Msg(None)) is None
    assert nanoseconds(1.5) == 1_500_000_000


def test_expect_last_makes_a_publish_conditional_on_another_subjects_last_message():
    from jetscribe.shared.jetstream import expect_last

    assert expect_last("claim.transcriber.p3", 41) == {
        "Nats-Expected-Last-Subject-Sequence": "41",
        "Nats-Expected-Last-Subject-Sequence-Subject": "claim.transcriber.p3",
    }
