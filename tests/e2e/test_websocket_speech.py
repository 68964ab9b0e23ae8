"""Real speech through the WebSocket way in (tiny.en): Opus in Ogg and WebM at 24 kbps, and the real deepgram-sdk
client pointed at the local gateway, each with its words checked against the reference (WER)."""

import asyncio
import json
import socket
import threading
import time
import typing
import uuid

import pytest
from websockets.asyncio.client import connect

from jetscribe.devstack.servers import NatsServer
from jetscribe.evaluation.opus import encode_opus
from jetscribe.evaluation.speech import synthesize
from jetscribe.evaluation.wer import wer
from jetscribe.services.ingest.app import run as run_ingest
from jetscribe.services.transcriber.app import run as run_transcriber
from jetscribe.shared import telemetry
from jetscribe.shared.config import IngestConfig, StreamSettings, TelemetryConfig, TranscriberConfig
from jetscribe.shared.wire import SessionEventKind
from tests.scrape import wait_until_ready

TENANT = "wsspeech"
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Please send the report before Friday afternoon."]
WER_BOUND = 0.15
EVENT_KINDS = "utterance_end" in typing.get_args(SessionEventKind)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def speech():
    return synthesize(SENTENCES, gap_s=1.5)  # a pause over utterance_end_ms between the sentences


@pytest.fixture(scope="module")
def speech_nats(tmp_path_factory):
    with NatsServer(tmp_path_factory.mktemp("ws-speech-nats")) as server:
        yield server


@pytest.fixture
async def socket_stack(speech_nats, nats_keys, tiny_model):
    """A gateway with its WebSocket listener and a tiny.en transcriber; yields (ws URL, API key)."""
    nats_keys.add_tenant(TENANT)
    key = nats_keys.new_api_key(TENANT)
    port = free_port()
    settings = StreamSettings(nats_url=speech_nats.url)
    tel = telemetry.Telemetry("ingest", config=TelemetryConfig())
    stop = asyncio.Event()
    worker = TranscriberConfig(model="tiny.en", worker_id=f"wss-{uuid.uuid4().hex[:6]}", speakers_audio="off")
    tasks = [
        asyncio.create_task(
            run_ingest(settings, IngestConfig(ws_port=port, api_keys=str(nats_keys.api_keys_path)), stop, tel)
        ),
        asyncio.create_task(run_transcriber(settings, worker, stop, model=tiny_model)),
    ]
    try:
        await wait_until_ready(tel)
        yield f"ws://127.0.0.1:{port}", key
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        tel.shutdown()


@pytest.mark.parametrize("container", ["ogg", "webm"])
async def test_opus_at_24_kbps_in_ogg_and_webm_gives_the_words(socket_stack, speech, container):
    url, key = socket_stack
    data = encode_opus(speech.audio, speech.sample_rate, container, bitrate=24_000)
    session = f"o{uuid.uuid4().hex[:8]}"
    finals: list[str] = []
    async with connect(
        f"{url}/v1/sessions/{session}?encoding=opus", additional_headers={"Authorization": f"Token {key}"}
    ) as ws:
        for at in range(0, len(data), 1000):  # about a third of a second of Opus per frame, as MediaRecorder sends
            await ws.send(data[at : at + 1000])
        await ws.send(json.dumps({"type": "CloseStream"}))
        async with asyncio.timeout(120):
            async for frame in ws:
                message = json.loads(frame)
                if message.get("type") == "segment" and message["status"] == "final":
                    finals.append(message["text"])
        assert ws.close_code == 1000
    assert wer(speech.text, " ".join(finals)) <= WER_BOUND, finals


async def test_the_real_deepgram_sdk_gets_results_with_the_words(socket_stack, speech):
    """deepgram-sdk 7.16 (its sync client, in a thread, as an application would run it) with only its URL changed."""
    from deepgram import DeepgramClient
    from deepgram.core.events import EventType
    from deepgram.environment import DeepgramClientEnvironment

    url, key = socket_stack
    environment = DeepgramClientEnvironment(base=url.replace("ws", "http"), production=url, agent=url, agent_rest=url)
    pcm = speech.audio.astype("<i2").tobytes()
    messages: list = []

    def run_client() -> None:
        client = DeepgramClient(api_key=key, environment=environment)
        with client.listen.v1.connect(
            model="nova-3",
            encoding="linear16",
            sample_rate="16000",
            interim_results="true",
            punctuate="true",
            utterance_end_ms="1000",
            vad_events="true",
        ) as connection:
            connection.on(EventType.MESSAGE, messages.append)
            listener = threading.Thread(target=connection.start_listening)
            listener.start()
            started = time.monotonic()
            for at in range(0, len(pcm), 3200):  # real time, as a live caller: UtteranceEnd is in audio time
                time.sleep(max(0.0, started + at / 32000 - time.monotonic()))
                connection.send_media(pcm[at : at + 3200])
            connection.send_keep_alive()
            connection.send_close_stream()
            listener.join(120)

    await asyncio.wait_for(asyncio.to_thread(run_client), 180)
    kinds = [type(m).__name__ for m in messages]
    finals = [m for m in messages if type(m).__name__ == "ListenV1Results" and m.is_final]
    assert finals, kinds
    text = " ".join(m.channel.alternatives[0].transcript for m in finals)
    assert wer(speech.text, text) <= WER_BOUND, text
    assert finals[0].channel.alternatives[0].words[0].punctuated_word
    assert kinds[-1] == "ListenV1Metadata"
    if EVENT_KINDS:  # the transcriber publishes them (issue 16's options): the SDK parses them
        assert {"ListenV1SpeechStarted", "ListenV1UtteranceEnd"} <= set(kinds), kinds
