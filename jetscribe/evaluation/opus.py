"""Speech as a browser or a phone bridge would send it: Opus in an Ogg or WebM stream, made with PyAV."""

from __future__ import annotations

import io

import av
import numpy as np


def encode_opus(samples: np.ndarray, sample_rate: int, container: str = "webm", bitrate: int = 24_000) -> bytes:
    """Mono int16 `samples` as Opus at `bitrate` bits/s in a `container` ('webm' or 'ogg') stream."""
    out = io.BytesIO()
    with av.open(out, "w", format=container) as box:
        stream = box.add_stream("libopus", rate=48_000)
        stream.bit_rate = bitrate
        stream.layout = "mono"  # without it, and each frame's pts, the round trip is noise (NOTES.md)
        resampler = av.AudioResampler(format="s16", layout="mono", rate=48_000)
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples, dtype=np.int16).reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = sample_rate
        frame.pts = 0
        for resampled in [*resampler.resample(frame), *resampler.resample(None)]:
            for packet in stream.encode(resampled):
                box.mux(packet)
        for packet in stream.encode(None):
            box.mux(packet)
    return out.getvalue()
