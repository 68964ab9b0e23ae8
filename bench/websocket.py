"""The WebSocket way in against the NATS way in, on the same speech, in one run of one local stack.

    python bench/websocket.py [--model tiny.en] [--rounds 2] [--json OUT.json]

Starts the local stack in a temporary folder (`jetscribe up`'s LocalStack, its gateway's WebSocket listener on),
makes a tenant and its API key, and streams synthetic speech (jetscribe.evaluation.speech, with its reference) in
real time, alternating the two ways in for --rounds rounds:
- NATS: `jetscribe.client.bot.stream_audio`, 100 ms chunks, as `jetscribe stream` does;
- WebSocket: the same 16 kHz PCM in 100 ms frames on `/v1/sessions/<id>`.
Final latency, both ways, as bench/accuracy.py measures it: the wall time a final reached this process minus the
wall time the chunk holding its last word's end was sent. Target: the WebSocket's p50 within 0.1 s of NATS's.

Then the same speech as WebM/Opus at 24 kbps (PyAV, as a browser's MediaRecorder sends it) and as PCM, each on the
socket as fast as it takes it; WER of each against the reference. Target: Opus within 0.01 of PCM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from websockets.asyncio.client import connect  # noqa: E402

from bench.common import Watchdog, local_stack, segment_latencies  # noqa: E402
from jetscribe.client.bot import Audio, stream_audio  # noqa: E402
from jetscribe.evaluation.metrics import corpus_wer, percentile, send_time  # noqa: E402
from jetscribe.evaluation.opus import encode_opus  # noqa: E402
from jetscribe.evaluation.speech import synthesize  # noqa: E402
from jetscribe.shared.natsauth import env_connect_options  # noqa: E402

TENANT = "bench"
CHUNK_S = 0.1
SENTENCES = [
    "The meeting starts at nine tomorrow morning in the large room.",
    "Please bring the quarterly numbers and the draft of the new contract.",
    "We will decide on the budget before lunch.",
    "After that the team can go back to work on the release.",
    "Send me your questions by email tonight.",
]


async def over_websocket(url: str, key: str, audio: Audio, realtime: bool) -> dict:
    """The audio as 16 kHz PCM on the native socket; finals with their receive time, latencies when real time."""
    session = f"ws-{uuid.uuid4().hex[:10]}"
    pcm = audio.samples.astype("<i2").tobytes()
    step = int(audio.sample_rate * CHUNK_S) * 2
    sent_by_seq: dict[int, float] = {}
    finals: list[tuple[float, dict]] = []
    target = f"{url}/v1/sessions/{session}?encoding=pcm_s16le&sample_rate={audio.sample_rate}"
    async with connect(target, additional_headers={"Authorization": f"Token {key}"}) as ws:

        async def receive() -> None:
            async for frame in ws:
                message = json.loads(frame)
                if message.get("type") == "segment" and message["status"] == "final":
                    finals.append((time.time(), message))

        receiver = asyncio.create_task(receive())
        t0 = time.monotonic()
        for seq, at in enumerate(range(0, len(pcm), step)):
            if realtime:
                await asyncio.sleep(max(0.0, t0 + seq * CHUNK_S - time.monotonic()))
            sent_by_seq[seq] = time.time()
            await ws.send(pcm[at : at + step])
        await ws.send(json.dumps({"type": "CloseStream"}))
        await asyncio.wait_for(receiver, 300)
    latencies = [
        round(received - send_time(m["words"][-1]["end"], sent_by_seq, audio.sample_rate, step // 2), 3)
        for received, m in finals
        if m["words"]
    ]
    return {"text": " ".join(m["text"] for _, m in finals), "latencies": latencies}


async def opus_over_websocket(url: str, key: str, audio: Audio) -> str:
    data = encode_opus(audio.samples, audio.sample_rate, "webm", bitrate=24_000)
    session = f"opus-{uuid.uuid4().hex[:10]}"
    texts = []
    target = f"{url}/v1/sessions/{session}?encoding=opus"
    async with connect(target, additional_headers={"Authorization": f"Token {key}"}) as ws:
        for at in range(0, len(data), 1000):
            await ws.send(data[at : at + 1000])
        await ws.send(json.dumps({"type": "CloseStream"}))
        async for frame in ws:
            message = json.loads(frame)
            if message.get("type") == "segment" and message["status"] == "final":
                texts.append(message["text"])
    return " ".join(texts)


async def measure(stack, key: str, rounds: int) -> dict:
    import nats

    speech = synthesize(SENTENCES, gap_s=0.8)
    audio = Audio(speech.audio, speech.sample_rate)
    nc = await nats.connect(stack.nats_url, **env_connect_options(stack.nats_url))
    nats_latencies: list[float] = []
    ws_latencies: list[float] = []
    try:
        async with Watchdog(stack) as watchdog:
            print("warming up ...", file=sys.stderr, flush=True)
            await watchdog.run(
                stream_audio(nc, audio, tenant=TENANT, session_id=f"warm-{uuid.uuid4().hex[:8]}", speed=0)
            )
            for round_ in range(rounds):
                print(f"round {round_ + 1}/{rounds}: NATS, then WebSocket, real time", file=sys.stderr, flush=True)
                result = await watchdog.run(
                    stream_audio(nc, audio, tenant=TENANT, session_id=f"nats-{uuid.uuid4().hex[:10]}", speed=1.0)
                )
                nats_latencies += [s["latency"] for s in segment_latencies(result, audio.sample_rate)[0]]
                ws = await watchdog.run(over_websocket(stack.ws_url, key, audio, realtime=True))
                ws_latencies += ws["latencies"]
            print("WER: WebM/Opus 24 kbps and PCM on the socket", file=sys.stderr, flush=True)
            pcm_text = (await watchdog.run(over_websocket(stack.ws_url, key, audio, realtime=False)))["text"]
            opus_text = await watchdog.run(opus_over_websocket(stack.ws_url, key, audio))
    finally:
        await nc.close()
    nats_p50, ws_p50 = percentile(nats_latencies, 50), percentile(ws_latencies, 50)
    pcm_wer, opus_wer = corpus_wer([speech.text], [pcm_text]), corpus_wer([speech.text], [opus_text])
    return {
        "audio_s": round(audio.duration_s, 2),
        "rounds": rounds,
        "nats": {"finals": len(nats_latencies), "p50": nats_p50, "p95": percentile(nats_latencies, 95)},
        "websocket": {"finals": len(ws_latencies), "p50": ws_p50, "p95": percentile(ws_latencies, 95)},
        "latency_p50_gap_s": None if nats_p50 is None or ws_p50 is None else round(ws_p50 - nats_p50, 3),
        "wer_pcm": round(pcm_wer, 4),
        "wer_webm_opus_24k": round(opus_wer, 4),
        "wer_gap": round(opus_wer - pcm_wer, 4),
        "load": os.getloadavg(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny.en", help="the transcriber's model (default tiny.en)")
    parser.add_argument("--rounds", type=int, default=2, help="NATS then WebSocket runs of the speech (default 2)")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="jetscribe-bench-ws-") as home,
        local_stack(Path(home), args.model, transcribers=1) as stack,
    ):
        if not stack.ws_url:
            print("the stack's WebSocket listener is off (JETSCRIBE_WS_PORT=0?)", file=sys.stderr)
            return 2
        keys = stack.nats.keyring if stack.nats is not None else None
        if keys is None:
            print("bench/websocket.py starts its own NATS: unset NATS_URL", file=sys.stderr)
            return 2
        keys.add_tenant(TENANT)
        key = keys.new_api_key(TENANT)
        report = asyncio.run(measure(stack, key, args.rounds))
    nats_, ws = report["nats"], report["websocket"]
    print(f"final latency over {report['rounds']} round(s) of {report['audio_s']} s of speech, real time:")
    print(f"  NATS       finals {nats_['finals']:3d}  p50 {nats_['p50']:.3f} s  p95 {nats_['p95']:.3f} s")
    print(f"  WebSocket  finals {ws['finals']:3d}  p50 {ws['p50']:.3f} s  p95 {ws['p95']:.3f} s")
    print(f"  WebSocket - NATS at p50: {report['latency_p50_gap_s']:+.3f} s (target: within 0.1 s)")
    print(
        f"WER: PCM {report['wer_pcm']:.4f}  WebM/Opus 24 kbps {report['wer_webm_opus_24k']:.4f}  "
        f"gap {report['wer_gap']:+.4f} (target: within 0.01)"
    )
    print("load average (1, 5, 15 min): " + " ".join(f"{x:.2f}" for x in report["load"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
