"""Build bench/data/real (real human speech with reference transcripts) from the Debian package
pocketsphinx-testdata. See bench/data/real/README.md for what is taken, the licence and the texts.

    python bench/make_real.py [--deb pocketsphinx-testdata_*.deb] [--out bench/data/real]

Without --deb, `apt-get download pocketsphinx-testdata` is run in a temporary folder (needs apt).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

RATE = 16000
DATA = "usr/share/pocketsphinx/test/data"
LIBRIVOX = ["0870", "0880", "0890", "0920", "0930"]  # utterances of sense_and_sensibility_01_austen_64kb


def speech_span(x: np.ndarray, frame: int = 320, rel_db: float = -30.0) -> tuple[float, float]:
    """First and last 20 ms frame whose RMS is within `rel_db` of the loudest frame, in seconds."""
    n = len(x) // frame
    rms = np.sqrt(np.mean(x[: n * frame].astype(np.float64).reshape(n, frame) ** 2, axis=1))
    loud = np.flatnonzero(rms > rms.max() * 10 ** (rel_db / 20))
    return loud[0] * frame / RATE, (loud[-1] + 1) * frame / RATE


def transcription(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            words, fileid = line.rsplit("(", 1)
            out[fileid.strip(" )")] = " ".join(w for w in words.split() if w not in ("<s>", "</s>"))
    return out


def build(root: Path, out: Path, version: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = root / DATA
    texts = transcription(data / "librivox" / "transcription")
    pieces, turns, pos = [], [], 0
    for utt in LIBRIVOX:
        fileid = f"sense_and_sensibility_01_austen_64kb-{utt}"
        x, rate = sf.read(str(data / "librivox" / f"{fileid}.wav"), dtype="int16")
        assert rate == RATE and x.ndim == 1
        start, end = speech_span(x)
        turns.append(
            {
                "speaker": "A",
                "start": round(pos / RATE + start, 3),
                "end": round(pos / RATE + end, 3),
                "text": texts[fileid],
                "source_utterance": fileid,
            }
        )
        pieces.append(x)
        pos += len(x)
    audio = np.concatenate(pieces)
    write(
        out,
        "real_librivox_austen",
        audio,
        turns,
        {
            "kind": "real",
            "topic": "audiobook: Jane Austen, Sense and Sensibility, chapter 1",
            "voices": {"A": "LibriVox volunteer reader (human)"},
            "source": f"Debian pocketsphinx-testdata {version}: {DATA}/librivox/{{{','.join(LIBRIVOX)}}}.wav, "
            "concatenated in this order, samples unchanged; text: librivox/transcription",
        },
    )
    raw = np.fromfile(data / "goforward.raw", dtype="<i2")
    start, end = speech_span(raw)
    write(
        out,
        "real_pocketsphinx_goforward",
        raw,
        [{"speaker": "A", "start": round(start, 3), "end": round(end, 3), "text": "go forward ten meters"}],
        {
            "kind": "real",
            "topic": "robot command",
            "voices": {"A": "CMU Sphinx test recording (human)"},
            "source": f"Debian pocketsphinx-testdata {version}: {DATA}/goforward.raw (16 kHz s16le raw, "
            "samples unchanged); text: goforward.gram's first rule, the expected result of "
            "pocketsphinx's own tests",
        },
    )


def write(out: Path, name: str, audio: np.ndarray, turns: list[dict], meta: dict) -> None:
    sf.write(str(out / f"{name}.wav"), audio, RATE, subtype="PCM_16")
    doc = {
        "text": " ".join(t["text"] for t in turns),
        "turns": turns,
        "duration": round(len(audio) / RATE, 3),
        "sample_rate": RATE,
        "synthetic": False,
        **meta,
    }
    (out / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{out / name}.wav: {len(audio) / RATE:.1f} s, {len(doc['text'].split())} words")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deb", type=Path, help="pocketsphinx-testdata .deb (default: apt-get download it)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data" / "real")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        deb = args.deb
        if deb is None:
            subprocess.run(["apt-get", "download", "pocketsphinx-testdata"], cwd=tmp, check=True)
            deb = next(Path(tmp).glob("pocketsphinx-testdata_*.deb"))
        version = deb.name.split("_")[1]
        subprocess.run(["dpkg-deb", "-x", str(deb), f"{tmp}/x"], check=True)
        build(Path(tmp) / "x", args.out, version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
