"""What a VAD costs per session, and where it puts endpoints on noisy files.

    python bench/vad_cost.py [--data PATH ...] [--files 8]

PATH: devset-format WAV files or folders (16 kHz mono s16 + JSON with `turns`); by default the noisy, quiet
and phone-line files that bench/make_realistic.py cached in $JETSCRIBE_CACHE/realistic, one per source and
condition. Single-threaded, one session at a time, as a worker runs it.

Prints, for webrtcvad (mode 2), Silero, the hybrid (webrtcvad, AND Silero where webrtcvad hears no pauses; with
the share of frames Silero ran on) and the segmenter as the transcriber runs it (the detector + frame levels,
noise floor and babble gate): milliseconds of CPU per second of audio for one session; then, per file and
detector, how many turn ends (those followed by a pause longer than the endpoint silence + 0.3 s) got an
endpoint within the endpoint silence + 0.3 s, the longest utterance, and how many Silero endpoints webrtcvad
also has (within 0.3 s).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jetscribe.services.transcriber.options import CommitOptions  # noqa: E402
from jetscribe.services.transcriber.segmenter import UtteranceSegmenter  # noqa: E402
from jetscribe.services.transcriber.vad import (  # noqa: E402
    HybridVoiceDetector,
    SileroModel,
    SileroVoiceDetector,
    VoiceDetector,
    WebrtcVoiceDetector,
)
from jetscribe.shared.audio import SAMPLE_RATE  # noqa: E402
from jetscribe.shared.config import cache_root  # noqa: E402

SLACK_S = 0.3  # an endpoint within the endpoint silence + this of a turn's end is on time (issue 10)
CHUNK = SAMPLE_RATE // 50  # 20 ms, as a bot sends


def default_files(limit: int) -> list[Path]:
    folder = cache_root() / "realistic"
    seen, files = set(), []
    for wav in sorted(folder.glob("*.wav")):
        source, _, rest = wav.stem.partition("@")
        condition = rest.split("-")[0]
        if condition in ("noise", "quiet", "phone") and (source, condition) not in seen:
            seen.add((source, condition))
            files.append(wav)
    return files[:limit]


def expand(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        out += sorted(p.glob("*.wav")) if p.is_dir() else [p]
    return out


def load(wav: Path) -> tuple[np.ndarray, list[tuple[float, float]], str]:
    audio, rate = sf.read(str(wav), dtype="int16")
    if rate != SAMPLE_RATE or audio.ndim != 1:
        raise SystemExit(f"{wav}: needs 16 kHz mono")
    meta = json.loads(wav.with_suffix(".json").read_text())
    label = meta.get("condition", "clean")
    if meta.get("noise"):
        label += f" {meta['noise']} {meta.get('snr_db', '?')} dB"
    return audio, [(t["start"], t["end"]) for t in meta.get("turns", [])], label


def cpu_ms_per_second(run: Callable[[], None], seconds: float) -> float:
    started = time.process_time()
    run()
    return (time.process_time() - started) * 1000 / seconds


def frames(vad: VoiceDetector, audio: np.ndarray) -> None:
    n = vad.frame_samples
    for i in range(0, len(audio) - n + 1, n):
        vad.is_speech(audio[i : i + n])


def segment(vad: VoiceDetector, audio: np.ndarray, options: CommitOptions) -> list[tuple[float, float, float]]:
    """(start, end, closed at) in seconds of every utterance kept."""
    seg = UtteranceSegmenter(vad, options)
    for i in range(0, len(audio), CHUNK):
        seg.add(audio[i : i + CHUNK], min(len(audio), i + CHUNK) / SAMPLE_RATE)
    seg.close_open(len(audio) / SAMPLE_RATE)
    return [(u.start / SAMPLE_RATE, (u.end or 0) / SAMPLE_RATE, u.closed_at) for u in seg.closed]


def on_time(utts: list[tuple[float, float, float]], turns: list[tuple[float, float]], duration: float) -> str:
    """How many of the turn ends that a pause (or the file's end) follows got an endpoint on time."""
    bound = CommitOptions().endpoint_silence_s + SLACK_S
    starts_after = [start for start, _ in turns[1:]] + [duration + bound + 1]
    expected = [end for (_, end), after in zip(turns, starts_after, strict=True) if after - end > bound]
    hit = sum(1 for e in expected if any(e - 0.5 <= closed <= e + bound for _, _, closed in utts))
    return f"{hit}/{len(expected)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="*", default=None)
    parser.add_argument("--files", type=int, default=8)
    args = parser.parse_args()
    files = expand(args.data) if args.data else default_files(args.files)
    if not files:
        raise SystemExit("no files: run bench/make_realistic.py first, or pass --data")
    model = SileroModel()
    gated, plain = CommitOptions(), CommitOptions(speech_above_floor_db=0.0)
    makers: dict[str, Callable[[], VoiceDetector]] = {
        "webrtc": lambda: WebrtcVoiceDetector(2),
        "silero": lambda: SileroVoiceDetector(model),
        "hybrid": lambda: HybridVoiceDetector(model),
    }
    loaded = [(wav, *load(wav)) for wav in files]
    total_s = sum(len(a) for _, a, _, _ in loaded) / SAMPLE_RATE

    print(f"cost, one session, {total_s:.0f} s of audio in {len(files)} files (CPU ms per audio second)")
    for name, make in makers.items():
        detector = cpu_ms_per_second(lambda make=make: [frames(make(), a) for _, a, _, _ in loaded], total_s)
        segmenter = cpu_ms_per_second(lambda make=make: [segment(make(), a, gated) for _, a, _, _ in loaded], total_s)
        share = ""
        if name == "hybrid":
            hybrids = [HybridVoiceDetector(model) for _ in loaded]
            for hybrid, (_, a, _, _) in zip(hybrids, loaded, strict=True):
                frames(hybrid, a)
            share = (
                f"   Silero on {sum(h.silero_frames for h in hybrids) / sum(h.frames for h in hybrids):.0%} of frames"
            )
        print(f"  {name:7s} detector alone {detector:6.2f}   segmenter (+ levels, floor, gate) {segmenter:6.2f}{share}")

    bound = CommitOptions().endpoint_silence_s + SLACK_S
    print(f"\nturn ends with an endpoint within {bound:.1f} s / longest utterance; agree: silero+gate endpoints")
    print("that webrtc (no gate) also has, within 0.3 s")
    columns = [name + gate for name in makers for gate in ("", "+gate")]
    header = f"  {'file':48s} {'condition':24s} " + " ".join(f"{c:>14s}" for c in columns) + "  agree"
    print(header)
    for wav, audio, turns, label in loaded:
        duration = len(audio) / SAMPLE_RATE
        cells, closes = [], {}
        for name, make in makers.items():
            for gate_name, options in (("", plain), ("+gate", gated)):
                utts = segment(make(), audio, options)
                closes[name + gate_name] = [c for _, _, c in utts]
                longest = max((e - s for s, e, _ in utts), default=0.0)
                cells.append(f"{on_time(utts, turns, duration):>7s} {longest:5.1f}s")
        silero, webrtc = closes["silero+gate"], closes["webrtc"]
        agree = sum(1 for c in silero if any(abs(c - w) <= 0.3 for w in webrtc))
        print(
            f"  {wav.stem[:48]:48s} {label[:24]:24s} "
            + " ".join(f"{c:>14s}" for c in cells)
            + f"  {agree}/{len(silero)}"
        )


if __name__ == "__main__":
    main()
