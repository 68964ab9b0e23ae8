"""Make a devset-format folder harder: reverberation, noise, a phone line, Opus, a quiet speaker, crosstalk.

    python bench/make_realistic.py [--data DIR] [--data bench/data/real] \
        [--conditions room,noise,phone,opus,quiet,crosstalk] [--seed 0] [--files a,b] [--every] [--out DIR]

Each source <name>.wav + <name>.json (16 kHz mono s16, JSON with `text` and `turns` of
{speaker, start, end, text}) gives <name>@<condition>: a WAV of the same length (turn timings stay
valid) and a JSON with the reference unchanged plus `condition`, `seed`, the condition's parameters
(`snr_db`, `noise`, `rt60_s`, `bitrate_kbps`, `level_dbfs`, `mains_hz`, `overlaps`, ...),
`source_file` and `source_sha256`.

By default each file is put in TWO of the conditions, rotating so that every condition meets every
kind of speech (dialog, monologue, meeting, real) as far as the files allow; --every puts each file
in every condition. The files in `noise` take babble, speech-shaped and pink noise in turn. Results
are cached in $JETSCRIBE_CACHE/realistic (default ~/.cache/jetscribe/realistic), keyed by the source's
hash, the condition, the seed, the versions of numpy, soxr and PyAV and, for the conditions that mix
in other speech (babble noise, crosstalk), the hash of that other speech. With
--out DIR the chosen files are also written there as <name>@<condition>.wav/.json, a devset-format
folder. Conditions and their parameter ranges: listed at the end of --help, details in
jetscribe/evaluation/conditions.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jetscribe.evaluation import conditions as C  # noqa: E402

RATE = 16000
VERSION = 1  # bump when a condition's processing changes: old cache entries are then not used
CONDITIONS = ("clean", "room", "noise", "phone", "opus", "quiet", "crosstalk")
DEGRADED = CONDITIONS[1:]
KINDS = ("dialog", "mono", "meeting", "real")
CONDITION_DOC = {
    "clean": "the source file unchanged",
    "room": "shoebox room 3-8 x 3-7 x 2.5-3.5 m, RT60 0.25-0.8 s, talker 0.7-2.5 m away (image sources "
    "to order 3 + exponential late tail); active level kept",
    "noise": "babble (6 talkers of other speech), speech-shaped or pink noise at 0-20 dB SNR "
    "(active speech / noise), through the whole file",
    "phone": "300-3400 Hz band-pass, 8 kHz, 8-bit mu-law, back to 16 kHz",
    "opus": "libopus round trip at 12, 16, 20 or 24 kbit/s",
    "quiet": "speech at -26 dBFS active level, mains hum 50 or 60 Hz + 4 harmonics at -50..-40 dBFS",
    "crosstalk": "a second voice (other speech) over 10-20 % of the turns (at least one), 1-2.5 s "
    "inside each, 3-10 dB below the main speaker; reference = main speaker only",
}


def cache_root() -> Path:
    root = os.environ.get("JETSCRIBE_CACHE") or Path.home() / ".cache" / "jetscribe"
    return Path(root).expanduser() / "realistic"


@dataclass
class Source:
    name: str
    wav: Path
    meta: dict

    @cached_property
    def sha256(self) -> str:
        h = hashlib.sha256(self.wav.read_bytes())
        h.update(json.dumps({"text": self.meta["text"], "turns": self.meta.get("turns")}, sort_keys=True).encode())
        return h.hexdigest()

    @cached_property
    def audio(self) -> np.ndarray:
        audio, rate = sf.read(str(self.wav), dtype="float32", always_2d=False)
        if rate != RATE or audio.ndim != 1:
            raise SystemExit(f"{self.wav}: needs {RATE} Hz mono")
        return audio

    @property
    def turns(self) -> list[dict]:
        return self.meta.get("turns") or [{"start": 0.0, "end": len(self.audio) / RATE}]

    @property
    def kind(self) -> str:
        return kind_of(self.name, self.meta)


def kind_of(name: str, meta: dict) -> str:
    if meta.get("synthetic") is False or name.startswith("real"):
        return "real"
    kind = str(meta.get("kind") or name.split("_")[0])
    return {"monologue": "mono"}.get(kind, kind)


def load_sources(folders: list[Path], files: str | None = None) -> list[Source]:
    sources: dict[str, Source] = {}
    for folder in folders:
        if not folder.is_dir():
            raise SystemExit(f"--data {folder}: no such folder")
        for wav in sorted(folder.glob("*.wav")):
            js = wav.with_suffix(".json")
            if js.exists() and wav.stem not in sources:
                sources[wav.stem] = Source(wav.stem, wav, json.loads(js.read_text()))
    if files:
        wanted = [f.strip() for f in files.split(",") if f.strip()]
        missing = [f for f in wanted if f not in sources]
        if missing:
            raise SystemExit(f"not in {', '.join(map(str, folders))} (as .wav + .json): {', '.join(missing)}")
        return [sources[f] for f in wanted]
    if not sources:
        raise SystemExit(f"no <name>.wav with <name>.json in {', '.join(map(str, folders))}")
    return list(sources.values())


# --- the plan: which file in which condition ------------------------------------------------------------
def plan(sources: list[Source], conditions: list[str], per_file: int = 2) -> list[tuple[Source, str]]:
    """Each source in `per_file` conditions (all of them if there are fewer), rotating so that each
    condition meets each kind of speech as far as the files allow, and conditions are used about
    equally. Deterministic: depends only on the names, kinds and the order of `conditions`."""
    per_file = min(per_file, len(conditions))
    if per_file == len(conditions):
        return [(s, c) for s in sources for c in conditions]
    by_kind: dict[str, list[Source]] = {}
    for s in sorted(sources, key=lambda s: s.name):
        by_kind.setdefault(s.kind, []).append(s)
    # rarest kinds first, then interleave the kinds so that no kind takes all the early picks
    order = []
    queues = sorted(by_kind.values(), key=len)
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop(0))
    met = {(c, k): 0 for c in conditions for k in by_kind}
    used = {c: 0 for c in conditions}
    chosen: dict[str, list[str]] = {}
    for s in order:
        picks: list[str] = []
        for _ in range(per_file):
            c = min(
                (c for c in conditions if c not in picks),
                key=lambda c: (met[(c, s.kind)], used[c], conditions.index(c)),
            )
            picks.append(c)
            met[(c, s.kind)] += 1
            used[c] += 1
        chosen[s.name] = picks
    return [(s, c) for s in sources for c in conditions if c in chosen[s.name]]


NOISE_KINDS = ("babble", "speech_shaped", "pink")


def variants(pairs: list[tuple[Source, str]]) -> list[dict]:
    """Options fixed by the plan rather than drawn: the files in `noise` take babble, speech-shaped and pink
    noise in turn (in plan order), so that a set with few noise files still has every kind."""
    out, n = [], 0
    for _, condition in pairs:
        if condition == "noise":
            out.append({"noise": NOISE_KINDS[n % len(NOISE_KINDS)]})
            n += 1
        else:
            out.append({})
    return out


def coverage(pairs: list[tuple[Source, str]]) -> dict[str, dict[str, int]]:
    """{condition: {kind: number of files}}."""
    out: dict[str, dict[str, int]] = {}
    for s, c in pairs:
        out.setdefault(c, {}).setdefault(s.kind, 0)
        out[c][s.kind] += 1
    return out


# --- other speech: babble and crosstalk material ---------------------------------------------------------
def speech_pieces(source: Source) -> list[np.ndarray]:
    return [
        source.audio[int(t["start"] * RATE) : int(t["end"] * RATE)] for t in source.turns if t["end"] - t["start"] > 0.3
    ]


def other_speech(source: Source, sources: list[Source]) -> tuple[list[np.ndarray], str]:
    """Speech of every other source (turns only), and a hash of it. Without other sources: Piper
    speech from jetscribe.evaluation.speech (voice joe-high), made and cached on first use."""
    others = [s for s in sorted(sources, key=lambda s: s.name) if s.sha256 != source.sha256]
    if others:
        pool = [p for s in others for p in speech_pieces(s)]
        return pool, hashlib.sha256("".join(s.sha256 for s in others).encode()).hexdigest()
    from jetscribe.evaluation.speech import SAMPLE_SENTENCES, synthesize

    speech = synthesize(list(SAMPLE_SENTENCES), voice="joe-high")
    audio = speech.audio.astype(np.float32) / 32768.0
    pool = [audio[int(t.start_s * RATE) : int(t.end_s * RATE)] for t in speech.turns]
    return pool, "piper-joe-high-sample"


# --- one condition ----------------------------------------------------------------------------------------
def rng_for(seed: int, name: str, condition: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(f"{name}/{condition}".encode())])


def degrade(
    condition: str,
    x: np.ndarray,
    turns: list[dict],
    rng: np.random.Generator,
    pool: list[np.ndarray] | None,
    options: dict | None = None,
) -> tuple[np.ndarray, dict]:
    """Apply `condition` to x (float32 16 kHz); returns (audio, parameters for the JSON). `options` may fix
    what would otherwise be drawn: {"noise": one of NOISE_KINDS}."""
    options = options or {}
    mask = C.turn_mask(len(x), RATE, turns)
    if condition == "clean":
        return x, {}
    if condition == "room":
        room = C.random_room(rng)
        y = C.reverberate(x, C.room_rir(room, RATE, rng), mask)
        return y, {
            "rt60_s": round(room.rt60_s, 3),
            "room_m": [round(v, 2) for v in room.size],
            "distance_m": round(room.distance, 2),
        }
    if condition == "noise":
        kind = str(rng.choice(NOISE_KINDS))
        kind = options.get("noise", kind)
        if kind not in NOISE_KINDS:
            raise ValueError(f"noise {kind!r}: one of {', '.join(NOISE_KINDS)}")
        snr = round(float(rng.uniform(0.0, 20.0)), 1)
        if kind == "babble":
            noise = C.babble(len(x), rng, pool)
        elif kind == "speech_shaped":
            noise = C.speech_shaped_noise(len(x), rng, np.concatenate(pool))
        else:
            noise = C.pink_noise(len(x), rng)
        return C.add_noise(x, noise, snr, mask), {"noise": kind, "snr_db": snr}
    if condition == "phone":
        return C.telephone(x, RATE), {"band_hz": [300, 3400], "line_rate": 8000, "codec": "mu-law 8 bit"}
    if condition == "opus":
        kbps = int(rng.choice([12, 16, 20, 24]))
        return C.opus_roundtrip(x, RATE, kbps * 1000), {"bitrate_kbps": kbps}
    if condition == "quiet":
        mains = int(rng.choice([50, 60]))
        hum_db = round(float(rng.uniform(-50.0, -40.0)), 1)
        y = C.quiet_with_hum(x, RATE, rng, mask, level_dbfs=-26.0, mains_hz=mains, hum_dbfs=hum_db)
        return y, {"level_dbfs": -26.0, "mains_hz": mains, "hum_dbfs": hum_db}
    if condition == "crosstalk":
        y, overlaps = C.crosstalk(x, RATE, turns, pool, rng)
        return y, {"overlaps": overlaps, "overlap_turn_fraction": round(len(overlaps) / len(turns), 3)}
    raise ValueError(f"unknown condition {condition!r}; known: {', '.join(CONDITIONS)}")


def library_versions() -> str:
    """numpy (random streams), soxr (resampling) and PyAV (libopus): a new version may change the samples."""
    from importlib import metadata

    out = []
    for dist in ("numpy", "soxr", "av"):
        try:
            out.append(f"{dist}={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            out.append(f"{dist}=?")
    return ",".join(out)


def realize(
    source: Source,
    condition: str,
    seed: int,
    sources: list[Source],
    root: Path | None = None,
    options: dict | None = None,
) -> tuple[Path, Path]:
    """The WAV and JSON of `source` in `condition` (with `options`, see degrade), from the cache or made now."""
    options = options or {}
    if condition == "clean":
        return source.wav, source.wav.with_suffix(".json")
    needs_pool = condition in ("noise", "crosstalk")
    pool, pool_hash = other_speech(source, sources) if needs_pool else (None, "")
    key = hashlib.sha256(
        f"{source.sha256}/{condition}/{seed}/{VERSION}/{pool_hash}/{library_versions()}/"
        f"{json.dumps(options, sort_keys=True)}".encode()
    ).hexdigest()[:16]
    root = root or cache_root()
    stem = f"{source.name}@{condition}-{key}"
    wav, js = root / f"{stem}.wav", root / f"{stem}.json"
    if js.exists() and wav.exists():
        return wav, js
    audio, params = degrade(condition, source.audio, source.turns, rng_for(seed, source.name, condition), pool, options)
    meta = {
        **source.meta,
        "condition": condition,
        "seed": seed,
        **params,
        "source_file": source.name,
        "source_sha256": source.sha256,
        "conditions_version": VERSION,
    }
    if needs_pool:
        meta["other_speech_sha256"] = pool_hash
    root.mkdir(parents=True, exist_ok=True)
    tmp = wav.with_name(f".{wav.name}.{os.getpid()}.tmp")
    sf.write(
        str(tmp), np.clip(np.round(audio * 32767), -32768, 32767).astype(np.int16), RATE, format="WAV", subtype="PCM_16"
    )
    os.replace(tmp, wav)
    tmp = js.with_name(f".{js.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, js)  # the JSON last: its presence means the WAV is complete
    return wav, js


def parse_conditions(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONDITIONS]
    if unknown or not names:
        raise SystemExit(
            f"--conditions: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(CONDITIONS)}"
        )
    return list(dict.fromkeys(names))


def print_coverage(pairs: list[tuple[Source, str]], conditions: list[str], file=sys.stderr) -> None:
    cov = coverage(pairs)
    kinds = [k for k in KINDS if any(s.kind == k for s, _ in pairs)] + sorted({s.kind for s, _ in pairs} - set(KINDS))
    print(
        "files per condition and kind: "
        + "; ".join(f"{c}: " + ", ".join(f"{k} {cov.get(c, {}).get(k, 0)}" for k in kinds) for c in conditions),
        file=file,
    )
    missing = [f"{c}/{k}" for c in conditions for k in kinds if not cov.get(c, {}).get(k)]
    if missing:
        print(f"not met (too few files of that kind): {', '.join(missing)}", file=file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="conditions:\n" + "\n".join(f"  {c}: {d}" for c, d in CONDITION_DOC.items()),
    )
    parser.add_argument(
        "--data",
        type=Path,
        action="append",
        help="folder of <name>.wav + <name>.json (repeat for more folders; default: the benchmarks' default set, "
        "see bench/accuracy.py --help)",
    )
    parser.add_argument("--conditions", default=",".join(DEGRADED), help=f"comma list of {', '.join(CONDITIONS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--files", help="comma list of names (default: all)")
    parser.add_argument("--every", action="store_true", help="every file in every condition (default: two each)")
    parser.add_argument("--out", type=Path, help="also write <name>@<condition>.wav/.json into this folder")
    parser.add_argument("--cache", type=Path, help="cache folder (default $JETSCRIBE_CACHE/realistic)")
    args = parser.parse_args(argv)
    conditions = parse_conditions(args.conditions)
    if not args.data:
        from bench.common import default_data

        args.data = default_data(with_real=False)
    everything = load_sources(args.data)
    sources = load_sources(args.data, args.files) if args.files else everything
    pairs = plan(sources, conditions, len(conditions) if args.every else 2)
    print_coverage(pairs, conditions)
    for (source, condition), options in zip(pairs, variants(pairs), strict=False):
        wav, js = realize(source, condition, args.seed, everything, args.cache, options)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            for path, ext in ((wav, ".wav"), (js, ".json")):
                shutil.copyfile(path, args.out / f"{source.name}@{condition}{ext}")
        extra = json.loads(js.read_text())
        params = {
            k: extra[k]
            for k in ("snr_db", "noise", "rt60_s", "bitrate_kbps", "mains_hz", "overlap_turn_fraction")
            if k in extra
        }
        print(f"{source.name}@{condition}\t{wav}\t{json.dumps(params)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
