"""Harder listening conditions for clean speech: pure functions on float32 mono arrays.

Used by bench/make_realistic.py (which reads and writes devset-format folders) and unit-tested in
tests/unit/bench/. Every function takes the signal as float32 in [-1, 1] at `rate` Hz and returns a
signal of the SAME length, so the turn timings of the source JSON stay valid. Randomness comes only
from the `rng` (numpy Generator) passed in: a given seed gives the same samples.

Levels: dBFS here is RMS relative to a full-scale DC of 1.0 (so a full-scale sine is -3 dBFS).
"Active" level / power means over the samples inside the speech turns, not over the whole file.

Only numpy, soxr (already a jetscribe dependency) and PyAV (installed with faster-whisper, for Opus).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import soxr

EPS = 1e-12


# --- levels -----------------------------------------------------------------------------------------
def turn_mask(n: int, rate: int, turns: list[dict] | None) -> np.ndarray:
    """Boolean mask of the samples inside any turn ({start, end} in seconds); all True without turns."""
    if not turns:
        return np.ones(n, dtype=bool)
    mask = np.zeros(n, dtype=bool)
    for t in turns:
        a, b = max(0, int(round(t["start"] * rate))), min(n, int(round(t["end"] * rate)))
        mask[a:b] = True
    return mask if mask.any() else np.ones(n, dtype=bool)


def power(x: np.ndarray, mask: np.ndarray | None = None) -> float:
    x = np.asarray(x, dtype=np.float64)
    if mask is not None:
        x = x[mask]
    return float(np.mean(x * x)) if len(x) else 0.0


def dbfs(x: np.ndarray, mask: np.ndarray | None = None) -> float:
    """RMS level in dBFS (re 1.0), over `mask` if given."""
    return 10 * math.log10(power(x, mask) + EPS)


def snr_db(clean: np.ndarray, noise: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Active speech power (over `mask`) / noise power over the whole file, in dB."""
    return 10 * math.log10((power(clean, mask) + EPS) / (power(noise) + EPS))


def avoid_clipping(x: np.ndarray, peak: float = 0.99) -> tuple[np.ndarray, float]:
    """Scale `x` down (never up) so that |x| <= peak; returns (signal, gain applied)."""
    top = float(np.max(np.abs(x))) if len(x) else 0.0
    gain = min(1.0, peak / top) if top > 0 else 1.0
    return (x * gain).astype(np.float32), gain


# --- filters (FFT domain, zero phase) ------------------------------------------------------------------
def band_limit(
    x: np.ndarray, rate: int, low_hz: float | None, high_hz: float | None, transition_hz: float = 100.0
) -> np.ndarray:
    """Zero-phase band-pass by FFT with raised-cosine edges `transition_hz` wide, centred on the
    cut-offs. low_hz/high_hz None: that side is open."""
    n = len(x)
    if n == 0:
        return x.astype(np.float32)
    spec = np.fft.rfft(np.asarray(x, dtype=np.float64))
    f = np.fft.rfftfreq(n, 1.0 / rate)
    gain = np.ones_like(f)
    half = transition_hz / 2
    if low_hz is not None:
        ramp = np.clip((f - (low_hz - half)) / transition_hz, 0, 1)
        gain *= 0.5 - 0.5 * np.cos(np.pi * ramp)
    if high_hz is not None:
        ramp = np.clip(((high_hz + half) - f) / transition_hz, 0, 1)
        gain *= 0.5 - 0.5 * np.cos(np.pi * ramp)
    return np.fft.irfft(spec * gain, n).astype(np.float32)


def fft_convolve(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Full linear convolution by FFT (len(x) + len(h) - 1 samples)."""
    n = len(x) + len(h) - 1
    size = 1 << (n - 1).bit_length()
    y = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(h, size), size)[:n]
    return y.astype(np.float32)


# --- room -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Room:
    size: tuple[float, float, float]  # metres
    source: tuple[float, float, float]
    mic: tuple[float, float, float]
    rt60_s: float

    @property
    def distance(self) -> float:
        return float(np.linalg.norm(np.subtract(self.source, self.mic)))


def random_room(rng: np.random.Generator) -> Room:
    """An ordinary room: 3-8 x 3-7 x 2.5-3.5 m, RT60 0.25-0.8 s, talker 0.7-2.5 m from the microphone."""
    size = (rng.uniform(3, 8), rng.uniform(3, 7), rng.uniform(2.5, 3.5))
    mic = tuple(rng.uniform(0.8, s - 0.8) for s in size[:2]) + (rng.uniform(0.7, 1.2),)
    for _ in range(100):
        src = tuple(rng.uniform(0.5, s - 0.5) for s in size[:2]) + (rng.uniform(1.2, 1.8),)
        if 0.7 <= np.linalg.norm(np.subtract(src, mic)) <= 2.5:
            break
    return Room(tuple(map(float, size)), tuple(map(float, src)), tuple(map(float, mic)), float(rng.uniform(0.25, 0.8)))


def room_rir(room: Room, rate: int, rng: np.random.Generator, max_order: int = 3, c: float = 343.0) -> np.ndarray:
    """Impulse response of a shoebox room, direct path at sample 0.

    Early part: image-source method (Allen & Berkley) up to `max_order` reflections, with one
    frequency-independent reflection coefficient per wall from Sabine's formula for `room.rt60_s`.
    Late part: Gaussian noise under an exponential decay of 60 dB per RT60, starting 10 ms after
    the direct path with a 20 ms fade-in, low-passed a little (air and wall absorption). The
    reverberant energy (early reflections + tail) is set from the critical distance r_c = 0.057
    sqrt(V / RT60): reverberant / direct = (distance / r_c)^2, the tail taking what the early
    reflections leave (at least a tenth). Length 1.2 x RT60.
    """
    lx, ly, lz = room.size
    volume, surface = lx * ly * lz, 2 * (lx * ly + lx * lz + ly * lz)
    alpha = min(0.95, 0.161 * volume / (surface * room.rt60_s))
    beta = math.sqrt(1 - alpha)
    length = int(1.2 * room.rt60_s * rate)
    h = np.zeros(length, dtype=np.float64)
    d0 = room.distance
    sx, sy, sz = room.source
    mx, my, mz = room.mic
    rng_o = range(-max_order, max_order + 1)
    for nx in rng_o:
        for ny in rng_o:
            for nz in rng_o:
                for px in (0, 1):
                    for py in (0, 1):
                        for pz in (0, 1):
                            # image position and number of wall hits
                            ix = (1 - 2 * px) * sx + 2 * nx * lx
                            iy = (1 - 2 * py) * sy + 2 * ny * ly
                            iz = (1 - 2 * pz) * sz + 2 * nz * lz
                            hits = abs(2 * nx - px) + abs(2 * ny - py) + abs(2 * nz - pz)
                            if hits > max_order:
                                continue
                            d = math.dist((ix, iy, iz), (mx, my, mz))
                            k = int(round((d - d0) / c * rate))
                            if 0 <= k < length:
                                h[k] += beta**hits * d0 / max(d, 0.1)  # direct path = 1
    # late reverberation
    critical = 0.057 * math.sqrt(volume / room.rt60_s)
    t = np.arange(length) / rate
    tail = rng.standard_normal(length) * np.exp(-6.908 * t / room.rt60_s)
    tail = band_limit(tail, rate, None, 4000.0, 2000.0).astype(np.float64)
    tail *= np.clip((t - 0.010) / 0.020, 0, 1)
    early = float(np.sum(h * h)) - 1.0  # the direct path is 1.0
    target = max((d0 / critical) ** 2 - early, 0.1 * (d0 / critical) ** 2)
    tail *= math.sqrt(target / (np.sum(tail * tail) + EPS))
    return (h + tail).astype(np.float32)


def reverberate(x: np.ndarray, rir: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """`x` convolved with `rir` (direct path at 0), cut to len(x), active level kept as in `x`."""
    y = fft_convolve(np.asarray(x, dtype=np.float32), rir)[: len(x)]
    y *= math.sqrt((power(x, mask) + EPS) / (power(y, mask) + EPS))
    return avoid_clipping(y)[0]


# --- noises ---------------------------------------------------------------------------------------------
def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """1/f noise (power -3 dB per octave) by spectral shaping of white noise, unit RMS."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n)
    f[0] = f[1] if n > 1 else 1.0
    y = np.fft.irfft(spec / np.sqrt(f), n)
    return (y / (np.sqrt(np.mean(y * y)) + EPS)).astype(np.float32)


def long_term_spectrum(speech: np.ndarray, frame: int = 512) -> np.ndarray:
    """Mean magnitude spectrum (rfft of `frame` samples, Hann) over the frames of `speech` with
    energy; length frame // 2 + 1."""
    n = len(speech) // frame
    if n == 0:
        raise ValueError("need at least one frame of speech")
    frames = np.asarray(speech[: n * frame], dtype=np.float64).reshape(n, frame)
    energy = np.mean(frames**2, axis=1)
    frames = frames[energy > 1e-3 * energy.max()]
    return np.mean(np.abs(np.fft.rfft(frames * np.hanning(frame), axis=1)), axis=0)


def speech_shaped_noise(n: int, rng: np.random.Generator, speech: np.ndarray, frame: int = 512) -> np.ndarray:
    """Stationary noise with the long-term spectrum of `speech`, unit RMS."""
    shape = long_term_spectrum(speech, frame)
    f = np.fft.rfftfreq(n)
    gain = np.interp(f, np.fft.rfftfreq(frame), shape)
    y = np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) * gain, n)
    return (y / (np.sqrt(np.mean(y * y)) + EPS)).astype(np.float32)


def speech_stream(pool: list[np.ndarray], n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` samples of one talker: random pieces of `pool` (speech only) back to back, unit RMS."""
    out, have = [], 0
    while have < n:
        piece = pool[int(rng.integers(len(pool)))]
        start = int(rng.integers(0, max(1, len(piece) // 2)))
        out.append(piece[start:])
        have += len(out[-1])
    y = np.concatenate(out)[:n].astype(np.float64)
    return (y / (np.sqrt(np.mean(y * y)) + EPS)).astype(np.float32)


def babble(n: int, rng: np.random.Generator, pool: list[np.ndarray], talkers: int = 6) -> np.ndarray:
    """Several talkers from `pool` at equal level summed: a cafeteria background, unit RMS."""
    y = sum(speech_stream(pool, n, rng).astype(np.float64) for _ in range(talkers))
    return (y / (np.sqrt(np.mean(y * y)) + EPS)).astype(np.float32)


def add_noise(x: np.ndarray, noise: np.ndarray, snr: float, mask: np.ndarray | None = None) -> np.ndarray:
    """`x` plus `noise` scaled so that active speech power (over `mask`) / noise power over the whole
    file = `snr` dB. The noise runs through the whole file, pauses included. The sum is scaled
    down as a whole if it would clip (the SNR stays)."""
    noise = np.asarray(noise[: len(x)], dtype=np.float64)
    gain = math.sqrt(power(x, mask) / (power(noise) + EPS) / 10 ** (snr / 10))
    return avoid_clipping(x + noise * gain)[0]


# --- telephone ------------------------------------------------------------------------------------------
MU = 255


def mulaw_encode(x: np.ndarray, mu: int = MU) -> np.ndarray:
    """Continuous mu-law companding quantized to 8 bits (uint8 codes 0-255), as G.711 does."""
    x = np.clip(np.asarray(x, dtype=np.float64), -1, 1)
    y = np.sign(x) * np.log1p(mu * np.abs(x)) / math.log1p(mu)
    return np.clip(np.round((y + 1) / 2 * mu), 0, mu).astype(np.uint8)


def mulaw_decode(codes: np.ndarray, mu: int = MU) -> np.ndarray:
    y = codes.astype(np.float64) / mu * 2 - 1
    return (np.sign(y) * np.expm1(np.abs(y) * math.log1p(mu)) / mu).astype(np.float32)


def telephone(x: np.ndarray, rate: int, low_hz: float = 300.0, high_hz: float = 3400.0) -> np.ndarray:
    """A narrowband phone line: 300-3400 Hz band-pass, resampled to 8 kHz, mu-law encoded and decoded,
    resampled back to `rate`, band-limited again (the far end's filters)."""
    y = band_limit(x, rate, low_hz, high_hz)
    narrow = soxr.resample(y, rate, 8000, quality="HQ")
    narrow = mulaw_decode(mulaw_encode(narrow))
    back = soxr.resample(narrow, 8000, rate, quality="HQ")
    back = band_limit(_fit(back, len(x)), rate, low_hz, high_hz)
    return avoid_clipping(back)[0]


def _fit(y: np.ndarray, n: int) -> np.ndarray:
    return y[:n] if len(y) >= n else np.concatenate([y, np.zeros(n - len(y), dtype=y.dtype)])


# --- Opus -----------------------------------------------------------------------------------------------
def opus_roundtrip(x: np.ndarray, rate: int, bitrate: int) -> np.ndarray:
    """Encode with libopus at `bitrate` bit/s (PyAV) and decode again, aligned to `x`.

    The encoder gets mono float frames of its frame size, each with its `pts` (without layout and
    pts the round trip is garbage). The decoder gets the encoder's extradata (so it skips the
    pre-skip samples) and returns 48 kHz, resampled back to `rate`. Any lag left is found by
    cross-correlation within +-20 ms and removed.
    """
    import av

    if rate not in (8000, 12000, 16000, 24000, 48000):
        raise ValueError(f"Opus takes 8/12/16/24/48 kHz, not {rate}")
    enc = av.CodecContext.create("libopus", "w")
    enc.sample_rate, enc.layout, enc.format, enc.bit_rate = rate, "mono", "flt", int(bitrate)
    enc.open()
    size = enc.frame_size or rate // 50
    pad = np.zeros(((len(x) + 2 * size) // size + 1) * size, dtype=np.float32)
    pad[: len(x)] = x
    packets = []
    for start in range(0, len(pad), size):
        frame = av.AudioFrame.from_ndarray(pad[None, start : start + size], format="flt", layout="mono")
        frame.sample_rate, frame.pts = rate, start
        packets += enc.encode(frame)
    packets += enc.encode(None)
    dec = av.CodecContext.create("libopus", "r")
    dec.sample_rate, dec.layout = rate, "mono"
    if enc.extradata:
        dec.extradata = enc.extradata
    parts, out_rate = [], rate
    for packet in [*packets, None]:
        for frame in dec.decode(packet):
            out_rate = frame.sample_rate
            a = frame.to_ndarray()
            a = a.astype(np.float32) / 32768.0 if a.dtype == np.int16 else a.astype(np.float32)
            parts.append(a.reshape(-1) if a.shape[0] == 1 else a.mean(axis=0))
    y = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    if out_rate != rate:
        y = soxr.resample(y, out_rate, rate, quality="HQ").astype(np.float32)
    lag = best_lag(x, y, int(0.02 * rate))
    return avoid_clipping(_fit(y[lag:], len(x)))[0]


def best_lag(x: np.ndarray, y: np.ndarray, max_lag: int) -> int:
    """The lag d in [0, max_lag] maximising the correlation of y[d:] with x."""
    n = min(len(x), len(y) - max_lag)
    if n <= 0:
        return 0
    xs = np.asarray(x[:n], dtype=np.float64)
    scores = [float(np.dot(xs, y[d : d + n])) for d in range(max_lag + 1)]
    return int(np.argmax(scores))


def aligned_correlation(x: np.ndarray, y: np.ndarray, max_lag: int = 480) -> float:
    """Pearson correlation of x and y after the best lag of either against the other."""
    best = -1.0
    for a, b in ((x, y), (y, x)):
        d = best_lag(a, b, max_lag)
        n = min(len(a), len(b) - d)
        best = max(best, float(np.corrcoef(a[:n], b[d : d + n])[0, 1]))
    return best


# --- quiet speaker with hum ----------------------------------------------------------------------------
def hum(
    n: int,
    rate: int,
    mains_hz: float,
    rng: np.random.Generator,
    harmonics: tuple[float, ...] = (1.0, 0.5, 0.35, 0.2, 0.12),
) -> np.ndarray:
    """Mains hum: `mains_hz` and its harmonics (amplitudes relative to the fundamental, random
    phases, a slow 0.2 Hz wobble of 10 % in amplitude), unit RMS."""
    t = np.arange(n) / rate
    y = np.zeros(n)
    for k, a in enumerate(harmonics, start=1):
        y += a * np.sin(2 * np.pi * mains_hz * k * t + rng.uniform(0, 2 * np.pi))
    y *= 1 + 0.1 * np.sin(2 * np.pi * 0.2 * t + rng.uniform(0, 2 * np.pi))
    return (y / (np.sqrt(np.mean(y * y)) + EPS)).astype(np.float32)


def quiet_with_hum(
    x: np.ndarray,
    rate: int,
    rng: np.random.Generator,
    mask: np.ndarray | None = None,
    level_dbfs: float = -26.0,
    mains_hz: float = 50.0,
    hum_dbfs: float = -45.0,
) -> np.ndarray:
    """Speech scaled to `level_dbfs` active level, plus hum at `hum_dbfs` through the whole file."""
    y = np.asarray(x, dtype=np.float64) * 10 ** ((level_dbfs - dbfs(x, mask)) / 20)
    y += hum(len(x), rate, mains_hz, rng) * 10 ** (hum_dbfs / 20)
    return y.astype(np.float32)


# --- crosstalk -------------------------------------------------------------------------------------------
def crosstalk(
    x: np.ndarray,
    rate: int,
    turns: list[dict],
    pool: list[np.ndarray],
    rng: np.random.Generator,
    fraction: tuple[float, float] = (0.10, 0.20),
    level_db: tuple[float, float] = (-10.0, -3.0),
    length_s: tuple[float, float] = (1.0, 2.5),
) -> tuple[np.ndarray, list[dict]]:
    """A second voice (pieces of `pool`) over a fraction of the turns, inside each chosen turn.

    The number of turns overlapped is drawn so that it is within `fraction` of the turns when
    that is possible (at least one). Each overlap is 1-2.5 s (at most 80 % of the turn), starts at
    a random point of the turn and ends inside it, at `level_db` relative to the main speaker's
    active level. Returns (audio, overlaps: [{turn, start, end, level_db}]).
    """
    if not turns:
        raise ValueError("crosstalk needs turns")
    n_turns = len(turns)
    low, high = math.ceil(fraction[0] * n_turns - 1e-9), math.floor(fraction[1] * n_turns + 1e-9)
    k = int(rng.integers(low, high + 1)) if low <= high else 1
    k = max(1, min(k, n_turns))
    chosen = sorted(int(i) for i in rng.choice(n_turns, size=k, replace=False))
    mask = turn_mask(len(x), rate, turns)
    main_rms = math.sqrt(power(x, mask))
    y = np.asarray(x, dtype=np.float64).copy()
    overlaps = []
    for i in chosen:
        t0, t1 = turns[i]["start"], turns[i]["end"]
        span = t1 - t0
        dur = min(rng.uniform(*length_s), 0.8 * span)
        start = t0 + rng.uniform(0, span - dur)
        start, dur = round(start, 3), round(dur, 3)  # whole milliseconds: the JSON times are exact
        a, b = int(round(start * rate)), min(len(y), int(round((start + dur) * rate)))
        level = float(rng.uniform(*level_db))
        voice = speech_stream(pool, b - a, rng).astype(np.float64) * main_rms * 10 ** (level / 20)
        fade = min(len(voice) // 2, int(0.02 * rate))
        if fade:
            ramp = np.linspace(0, 1, fade)
            voice[:fade] *= ramp
            voice[-fade:] *= ramp[::-1]
        y[a:b] += voice
        overlaps.append(
            {"turn": i, "start": round(a / rate, 3), "end": round(b / rate, 3), "level_db": round(level, 2)}
        )
    return avoid_clipping(y.astype(np.float32))[0], overlaps
