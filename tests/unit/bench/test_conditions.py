"""jetscribe/evaluation/conditions.py and the plan/realize of bench/make_realistic.py, on generated signals."""

import json
import math

import numpy as np
import pytest
import soundfile as sf

from bench import make_realistic as M
from jetscribe.evaluation import conditions as C

RATE = 16000


def voiced(seconds: float, f0: float, rng: np.random.Generator) -> np.ndarray:
    """A speech-like sound: a gliding harmonic complex with a 4 Hz syllable envelope, some noise."""
    t = np.arange(int(seconds * RATE)) / RATE
    pitch = f0 * (1 + 0.1 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(pitch) / RATE
    y = sum(np.sin(k * phase) / k for k in range(1, 25) if k * f0 < 7000)
    y = y * (0.55 + 0.45 * np.sin(2 * np.pi * 4 * t) ** 2) + 0.02 * rng.standard_normal(len(t))
    return (0.3 * y / np.max(np.abs(y))).astype(np.float32)


def talk(n_turns: int = 4, seed: int = 1, turn_s: float = 1.2, gap_s: float = 0.6, lead_s: float = 0.5):
    """Turns of voiced sound with digital silence between them: (audio, turns)."""
    rng = np.random.default_rng(seed)
    parts, turns, pos = [np.zeros(int(lead_s * RATE), np.float32)], [], lead_s
    for i in range(n_turns):
        piece = voiced(turn_s, 110 + 40 * (i % 2), rng)
        turns.append({"start": round(pos, 3), "end": round(pos + turn_s, 3), "text": f"turn {i}"})
        parts += [piece, np.zeros(int(gap_s * RATE), np.float32)]
        pos += turn_s + gap_s
    return np.concatenate(parts), turns


@pytest.fixture(scope="module")
def speech():
    return talk()


@pytest.fixture(scope="module")
def pool():
    rng = np.random.default_rng(5)
    return [voiced(1.5, f0, rng) for f0 in (95, 130, 180, 210)]


def band_energy_fraction(x, low, high=None):
    spec = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(len(x), 1 / RATE)
    sel = (f >= low) & (f < (high if high else np.inf))
    return spec[sel].sum() / spec.sum()


@pytest.mark.parametrize("kind", ["babble", "speech_shaped", "pink"])
@pytest.mark.parametrize("snr", [0.0, 8.0, 20.0])
def test_noise_reaches_the_snr_and_fills_the_pauses(speech, pool, kind, snr):
    x, turns = speech
    rng = np.random.default_rng(3)
    noise = {
        "babble": lambda: C.babble(len(x), rng, pool),
        "pink": lambda: C.pink_noise(len(x), rng),
        "speech_shaped": lambda: C.speech_shaped_noise(len(x), rng, np.concatenate(pool)),
    }[kind]()
    mask = C.turn_mask(len(x), RATE, turns)
    y = C.add_noise(x, noise, snr, mask)
    added = y - x  # no clipping guard at these levels
    assert C.snr_db(x, added, mask) == pytest.approx(snr, abs=0.5)
    pauses = ~mask
    assert np.all(x[pauses] == 0)
    # the noise runs through the pauses at the same level as under speech
    assert C.dbfs(y, pauses) == pytest.approx(C.dbfs(added, mask), abs=1.5)
    for second in range(int(len(x) / RATE)):  # no second of the file without noise
        assert C.dbfs(added[second * RATE : (second + 1) * RATE]) > C.dbfs(x, mask) - snr - 6


def test_telephone_is_band_limited_and_keeps_the_speech(speech):
    x, _ = speech
    y = C.telephone(x, RATE)
    assert len(y) == len(x)
    assert band_energy_fraction(x, 3600) > 5e-4  # the input has energy up there, and below 200 Hz
    assert band_energy_fraction(x, 0, 200) > 1e-2
    assert band_energy_fraction(y, 3600) < 1e-6
    assert band_energy_fraction(y, 0, 200) < 1e-6
    narrow = C.band_limit(x, RATE, 300, 3400)
    assert C.aligned_correlation(narrow, y) > 0.95


def test_mulaw_round_trip():
    x = np.linspace(-1, 1, 20001).astype(np.float32)
    codes = C.mulaw_encode(x)
    assert codes.dtype == np.uint8 and codes.min() == 0 and codes.max() == 255
    y = C.mulaw_decode(codes)
    # 8-bit mu-law: error relative to the level, about 3 % of |x| (plus a floor near zero)
    assert np.all(np.abs(y - x) <= 0.035 * np.abs(x) + 2e-4)
    assert np.array_equal(C.mulaw_encode(y), codes)  # decode then encode is the identity on codes
    rng = np.random.default_rng(0)
    s = 0.1 * rng.standard_normal(16000).astype(np.float32)
    err = C.mulaw_decode(C.mulaw_encode(s)) - s
    assert 10 * math.log10(C.power(s) / C.power(err)) > 30  # ~38 dB SNR for speech levels


@pytest.mark.parametrize("kbps", [12, 24])
def test_opus_round_trip_is_correlated_with_the_input(speech, kbps):
    x, _ = speech
    y = C.opus_roundtrip(x, RATE, kbps * 1000)
    assert len(y) == len(x)
    assert C.aligned_correlation(x, y) > 0.9
    assert C.best_lag(x, y, 320) == 0  # aligned already: turn timings stay valid
    assert C.dbfs(y) == pytest.approx(C.dbfs(x), abs=1.5)


def test_quiet_speaker_is_at_minus_26_dbfs_with_hum_in_the_pauses(speech):
    x, turns = speech
    mask = C.turn_mask(len(x), RATE, turns)
    y = C.quiet_with_hum(x, RATE, np.random.default_rng(2), mask, level_dbfs=-26.0, mains_hz=50, hum_dbfs=-45)
    assert C.dbfs(y, mask) == pytest.approx(-26.0, abs=1.0)
    assert C.dbfs(y, ~mask) == pytest.approx(-45.0, abs=1.0)
    # the hum is at 50 Hz and its harmonics
    pause = y[~mask][:RATE]
    spec = np.abs(np.fft.rfft(pause))
    peaks = np.fft.rfftfreq(len(pause), 1 / RATE)[np.argsort(spec)[-3:]]
    assert set(np.round(peaks).astype(int)) <= {50, 100, 150, 200, 250}


def test_room_reverberation_keeps_timing_and_level_and_adds_a_tail(speech):
    x, turns = speech
    rng = np.random.default_rng(4)
    room = C.random_room(rng)
    assert 0.7 <= room.distance <= 2.5 and 0.25 <= room.rt60_s <= 0.8
    rir = C.room_rir(room, RATE, rng)
    assert np.argmax(np.abs(rir)) == 0 and rir[0] == pytest.approx(1.0, abs=0.05)
    mask = C.turn_mask(len(x), RATE, turns)
    y = C.reverberate(x, rir, mask)
    assert len(y) == len(x)
    assert C.dbfs(y, mask) == pytest.approx(C.dbfs(x, mask), abs=0.1)
    end = int(turns[0]["end"] * RATE)  # just after the first turn: the room still rings
    assert C.dbfs(y[end + 800 : end + 1600]) > -60 and np.all(x[end + 800 : end + 1600] == 0)
    assert C.best_lag(x, y, 160) == 0


def test_crosstalk_overlaps_10_to_20_percent_of_turns_inside_them(pool):
    x, turns = talk(n_turns=10, turn_s=3.0, gap_s=0.3)
    for seed in range(5):
        y, overlaps = C.crosstalk(x, RATE, turns, pool, np.random.default_rng(seed))
        assert 0.1 <= len(overlaps) / len(turns) <= 0.2
        for o in overlaps:
            t = turns[o["turn"]]
            assert t["start"] <= o["start"] < o["end"] <= t["end"] + 1e-3
            assert 1.0 - 1e-3 <= o["end"] - o["start"] <= 2.5 + 1e-3
            a, b = round(o["start"] * RATE), round(o["end"] * RATE)
            assert np.abs(y[a:b] - x[a:b]).max() > 1e-3
        hit = np.zeros(len(x), bool)
        for o in overlaps:
            hit[round(o["start"] * RATE) : round(o["end"] * RATE)] = True
        assert np.abs(y[~hit] - x[~hit]).max() < 1e-6  # nothing elsewhere
    x2, turns2 = talk(n_turns=2)
    _, few = C.crosstalk(x2, RATE, turns2, pool, np.random.default_rng(0))
    assert len(few) == 1  # at least one turn even when 10-20 % of the turns is less than one


def write_source(folder, name, audio, turns, **meta):
    sf.write(str(folder / f"{name}.wav"), np.round(audio * 32767).astype(np.int16), RATE, subtype="PCM_16")
    text = " ".join(t["text"] for t in turns)
    (folder / f"{name}.json").write_text(json.dumps({"text": text, "turns": turns, **meta}))


def test_realize_is_deterministic_cached_and_keeps_the_reference(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i, name in enumerate(["dialog_a", "mono_b", "real_c"]):
        audio, turns = talk(n_turns=3, seed=i)
        write_source(data, name, audio, turns, synthetic=not name.startswith("real"))
    sources = M.load_sources([data])
    meta_in = json.loads((data / "dialog_a.json").read_text())
    outs = {}
    for condition in M.DEGRADED:
        first = M.realize(sources[0], condition, 7, sources, tmp_path / "c1")
        again = M.realize(sources[0], condition, 7, sources, tmp_path / "c2")  # made afresh elsewhere
        a, b = sf.read(str(first[0]), dtype="int16")[0], sf.read(str(again[0]), dtype="int16")[0]
        assert np.array_equal(a, b), condition
        assert len(a) == len(sources[0].audio)
        meta = json.loads(first[1].read_text())
        assert meta["text"] == meta_in["text"] and meta["turns"] == meta_in["turns"]
        assert meta["condition"] == condition and meta["seed"] == 7
        mtime = first[0].stat().st_mtime_ns
        assert M.realize(sources[0], condition, 7, sources, tmp_path / "c1") == first
        assert first[0].stat().st_mtime_ns == mtime  # served from the cache
        outs[condition] = a
    other = M.realize(sources[0], "noise", 8, sources, tmp_path / "c1")
    assert not np.array_equal(sf.read(str(other[0]), dtype="int16")[0], outs["noise"])
    assert "snr_db" in json.loads(other[1].read_text())
    pink = M.realize(sources[0], "noise", 7, sources, tmp_path / "c1", {"noise": "pink"})
    assert json.loads(pink[1].read_text())["noise"] == "pink" and pink[0] != other[0]


def test_plan_puts_each_file_in_two_conditions_and_spreads_kinds(tmp_path):
    sources = [
        M.Source(n, tmp_path / f"{n}.wav", {"synthetic": not n.startswith("real")})
        for n in [
            "dialog_a",
            "dialog_b",
            "dialog_c",
            "mono_a",
            "mono_b",
            "mono_c",
            "mono_d",
            "meeting_a",
            "real_a",
            "real_b",
        ]
    ]
    conditions = list(M.CONDITIONS)
    pairs = M.plan(sources, conditions)

    def names(ps):
        return sorted((s.name, c) for s, c in ps)

    assert names(pairs) == names(M.plan(list(reversed(sources)), conditions))  # not hanging on the order
    per_file = {}
    for s, c in pairs:
        per_file.setdefault(s.name, []).append(c)
    assert all(len(set(v)) == 2 for v in per_file.values()) and len(per_file) == 10
    cov = M.coverage(pairs)
    met = sum(1 for c in cov for k in cov[c])
    assert met == 19  # the most possible: meeting 2 + real 4 + dialog 6 + mono 7
    counts = sorted(sum(cov[c].values()) for c in cov)
    assert counts[-1] - counts[0] <= 1
    assert len(M.plan(sources, conditions[:2])) == 20
    kinds = [v["noise"] for v in M.variants(pairs) if v]
    assert sorted(kinds) == sorted(M.NOISE_KINDS)  # three files in noise: one of each kind
