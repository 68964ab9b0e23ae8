"""The WebSocket handshake's request and the Deepgram messages, without I/O."""

import pytest

from jetscribe.services.ingest.listen import (
    DeepgramDialect,
    ListenRefused,
    native_message,
    parse_request,
    resume_message,
)
from jetscribe.shared.wire import Segment, SessionEvent, Word


def parse(path: str, diarize_available: bool = False, **query: str):
    return parse_request(path, {k: [v] for k, v in query.items()}, diarize_available=diarize_available, request_id="r1")


def test_deepgram_params_map_to_the_contract_options():
    request = parse(
        "/v1/listen",
        encoding="linear16",
        sample_rate="8000",
        channels="2",
        language="en-US",
        interim_results="true",
        endpointing="300",
        utterance_end_ms="1000",
        vad_events="true",
        punctuate="false",
        model="nova-3",
        session_id="call-7",
    )
    assert (request.encoding, request.sample_rate, request.channels, request.language) == ("pcm_s16le", 8000, 2, "en")
    assert request.options == {
        "interim_results": True,
        "endpointing_ms": 300,
        "utterance_end_ms": 1000,
        "vad_events": True,
    }
    assert (request.session_id, request.punctuate, request.model) == ("call-7", False, "nova-3")
    assert parse("/v1/listen", encoding="linear16", sample_rate="16000", endpointing="false").options == {
        "interim_results": False,  # Deepgram's default
        "endpointing_ms": False,
    }


def test_deepgram_containers_need_no_encoding_and_ogg_opus_is_opus():
    for query in ({}, {"encoding": "ogg-opus", "sample_rate": "48000"}, {"encoding": "opus", "sample_rate": "16000"}):
        request = parse("/v1/listen", **query)
        assert (request.encoding, request.sample_rate) == ("opus", 48000)
    assert parse("/v1/listen", language="multi").language == "auto"
    assert parse("/v1/listen").session_id == "r1"  # the request id when the client names no session


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ({"encoding": "flac"}, "flac"),
        ({"encoding": "linear16"}, "sample_rate"),
        ({"encoding": "linear16", "sample_rate": "4000"}, "sample_rate"),
        ({"keywords": "x"}, "keywords"),
        ({"endpointing": "5"}, "endpointing"),
        ({"endpointing": "true"}, "endpointing"),
        ({"utterance_end_ms": "500"}, "utterance_end_ms"),
        ({"vad_events": "1"}, "vad_events"),
        ({"language": "klingon"}, "klingon"),
        ({"diarize": "true"}, "diarize"),
        ({"session_id": "a.b"}, "session id"),
    ],
)
def test_deepgram_refuses_what_it_does_not_do_and_says_what(query, named):
    with pytest.raises(ListenRefused) as refused:
        parse("/v1/listen", **query)
    assert refused.value.status == 400 and named in str(refused.value)
    assert refused.value.body("r1") == {
        "err_code": "INVALID_QUERY_PARAMETER",
        "err_msg": str(refused.value),
        "request_id": "r1",
    }


def test_diarize_is_taken_where_speakers_from_the_audio_run_and_a_repeated_param_is_refused():
    assert parse("/v1/listen", diarize_available=True, diarize="true").diarize
    with pytest.raises(ListenRefused, match="2 times"):
        parse_request("/v1/listen", {"language": ["en", "de"]}, diarize_available=False)
    with pytest.raises(ListenRefused) as refused:
        parse("/v2/listen")
    assert refused.value.status == 404


def test_native_params_pass_other_keys_on_as_typed_options():
    request = parse(
        "/v1/sessions/s1",
        encoding="pcm_f32le",
        sample_rate="44100",
        interim_results="false",
        endpointing_ms="250",
        x="y",
    )
    assert (request.dialect, request.session_id, request.encoding, request.language) == (
        "native",
        "s1",
        "pcm_f32le",
        "auto",
    )
    assert request.options == {"interim_results": False, "endpointing_ms": 250, "x": "y"}  # the gateway checks them
    with pytest.raises(ListenRefused, match="sample_rate"):
        parse("/v1/sessions/s1")


def segment(status="final", words=(("Hello,", 0.5, 0.9), ("World.", 1.0, 1.4)), speaker=None):
    return Segment(
        tenant="t",
        session_id="s",
        segment_id=3,
        revision=1,
        status=status,
        start=0.4,
        end=1.5,
        text=" ".join(w for w, _, _ in words),
        words=[Word(w, a, b, 0.9, speaker) for w, a, b in words],
        model="tiny.en",
    )


def test_results_have_deepgram_fields_and_punctuate_false_strips_punctuation():
    dialect = DeepgramDialect(parse("/v1/listen", punctuate="false"))
    results = dialect.results(segment())
    alternative = results["channel"]["alternatives"][0]
    assert alternative["transcript"] == "hello world"
    assert alternative["words"][0] == {"word": "hello", "start": 0.5, "end": 0.9, "confidence": 0.9}
    assert (results["is_final"], results["speech_final"], results["start"], results["duration"]) == (
        True,
        True,
        0.4,
        1.1,
    )
    assert results["metadata"]["model_info"]["name"] == "tiny.en"
    punctuated = DeepgramDialect(parse("/v1/listen")).results(segment(status="interim"))
    assert punctuated["channel"]["alternatives"][0]["words"][1]["punctuated_word"] == "World."
    assert not punctuated["is_final"]


def test_diarized_words_number_the_speakers_in_the_order_met_and_finalize_marks_one_final():
    dialect = DeepgramDialect(parse("/v1/listen", diarize_available=True, diarize="true"))
    dialect.results(segment(speaker="Ann"))
    dialect.from_finalize = True
    bob = dialect.results(segment(speaker="Bob"))
    assert [w["speaker"] for w in bob["channel"]["alternatives"][0]["words"]] == [1, 1] and bob["from_finalize"]
    assert not dialect.results(segment(speaker="Ann"))["from_finalize"]


def test_events_and_the_resume_point():
    dialect = DeepgramDialect(parse("/v1/listen"))
    ended = SessionEvent(tenant="t", session_id="s", event="ended", at=1.0)
    assert dialect.event(ended) is None
    assert native_message(ended)["event"] == "ended"
    request = parse("/v1/sessions/s1", sample_rate="16000", channels="2")
    assert resume_message(request, 9, 16000) == {
        "type": "resume",
        "session_id": "s1",
        "last_seq": 9,
        "resume_from_s": 1.0,
        "resume_from_byte": 16000 * 2 * 2,
    }


@pytest.mark.parametrize("value", ["²", "16000²", "１６０００", "٣"])
def test_a_number_in_digits_that_are_not_ascii_is_refused_not_a_crash(value):
    """str.isdigit takes these; int() raised on '²' (a 500 with no report) and took '１６０００' as 16000."""
    with pytest.raises(ListenRefused, match="sample_rate"):
        parse("/v1/listen", encoding="linear16", sample_rate=value)


@pytest.mark.parametrize("value", ["²", "--5", "-²"])
def test_a_native_option_that_only_looks_like_a_number_is_passed_as_text(value):
    assert parse("/v1/sessions/s1", sample_rate="16000", opt=value).options == {"opt": value}


def test_an_empty_session_id_is_refused_not_replaced_by_a_new_one():
    with pytest.raises(ListenRefused, match="session id"):
        parse("/v1/listen", encoding="linear16", sample_rate="16000", session_id="")
