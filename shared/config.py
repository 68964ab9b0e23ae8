"""One config object per service, read from environment variables.

Every variable, its default and its meaning is listed in README.md ("Configuration").
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, replace
from pathlib import Path

log = logging.getLogger(__name__)

MIN_AUDIO_MAX_AGE_S = 30 * 60.0  # a bot or worker that reconnects within this finds its audio still stored
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"  # NATS_URL when unset
DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/jetscribe"  # DATABASE_URL when unset


def cache_root() -> Path:
    """Where assembled models and synthesized speech are kept: $JETSCRIBE_CACHE, by default ~/.cache/jetscribe."""
    return Path(os.environ.get("JETSCRIBE_CACHE") or Path.home() / ".cache" / "jetscribe").expanduser()


def _from_env(cls, variables: dict[str, tuple[str, type]]):
    """Build `cls` from its defaults, overridden by the environment variables named in
    `variables` (field -> (variable, type)) that are set and not empty."""
    values = {}
    for name, (variable, cast) in variables.items():
        raw = os.environ.get(variable)
        if raw:
            values[name] = cast(raw)
    return cls(**values)


@dataclass(frozen=True)
class StreamSettings:
    """Where NATS is and how the streams are shaped; every service reads the same."""

    nats_url: str = DEFAULT_NATS_URL
    partitions: int = 16
    audio_max_age_s: float = 3600.0
    transcripts_max_age_s: float = 7 * 24 * 3600.0
    duplicate_window_s: float = 120.0

    def __post_init__(self):
        check_retention(self.audio_max_age_s, self.transcripts_max_age_s)

    @classmethod
    def from_env(cls) -> "StreamSettings":
        return _from_env(cls, {
            "nats_url": ("NATS_URL", str),
            "partitions": ("JETSCRIBE_PARTITIONS", int),
            "audio_max_age_s": ("JETSCRIBE_AUDIO_MAX_AGE_S", float),
            "transcripts_max_age_s": ("JETSCRIBE_TRANSCRIPTS_MAX_AGE_S", float),
            "duplicate_window_s": ("JETSCRIBE_DUPLICATE_WINDOW_S", float),
        })


def check_retention(audio_max_age_s: float, transcripts_max_age_s: float) -> None:
    """AUDIO keeps at least 30 min (a warning below: fine for tests, not for production); TRANSCRIPTS
    keeps longer than AUDIO, so a transcript outlives its audio. A max age of 0 means forever, as in NATS."""
    forever = float("inf")
    audio, transcripts = (age or forever for age in (audio_max_age_s, transcripts_max_age_s))
    if audio < 0 or transcripts < 0:
        raise ValueError("JETSCRIBE_AUDIO_MAX_AGE_S and JETSCRIBE_TRANSCRIPTS_MAX_AGE_S must not be negative")
    if transcripts <= audio and transcripts != forever:
        raise ValueError(f"JETSCRIBE_TRANSCRIPTS_MAX_AGE_S ({transcripts_max_age_s:g} s) must be longer than "
                         f"JETSCRIBE_AUDIO_MAX_AGE_S ({audio_max_age_s:g} s): transcripts outlive their audio")
    if audio < MIN_AUDIO_MAX_AGE_S:
        log.warning("JETSCRIBE_AUDIO_MAX_AGE_S is %g s, under 30 min: audio may expire before a slow worker "
                    "or a reconnecting bot gets to it", audio_max_age_s)


@dataclass(frozen=True)
class IngestConfig:
    max_chunk_bytes: int = 1_048_576
    min_sample_rate: int = 8000
    max_sample_rate: int = 192_000
    max_channels: int = 8
    max_sessions_per_tenant: int = 100  # active ones: started and not yet ended

    @classmethod
    def from_env(cls) -> "IngestConfig":
        return _from_env(cls, {
            "max_sessions_per_tenant": ("JETSCRIBE_MAX_SESSIONS_PER_TENANT", int),
            "max_chunk_bytes": ("JETSCRIBE_MAX_CHUNK_BYTES", int),
            "min_sample_rate": ("JETSCRIBE_MIN_SAMPLE_RATE", int),
            "max_sample_rate": ("JETSCRIBE_MAX_SAMPLE_RATE", int),
            "max_channels": ("JETSCRIBE_MAX_CHANNELS", int),
        })


@dataclass(frozen=True)
class TranscriberConfig:
    model: str = "base"  # "base", "tiny.en" or a folder holding a CTranslate2 Whisper model
    device: str = "cpu"  # "cpu", "cuda" or "auto"
    compute_type: str = "int8"  # "int8" on CPU; "float16" on a GPU
    cpu_threads: int = 0  # 0: CTranslate2 decides
    beam_size: int = 5
    interim_beam_size: int = 1
    # Off by default: on the devset it cut tiny.en's p95 (3.03 -> 2.65 s) but cost base accuracy
    # (wer_ratio 1.032 -> 1.074), where a sentence's early final is a less certain decode.
    sentence_endpoint_s: float = 0.0
    final_window: str = "auto"  # "full", "short" or "auto" (short for tiny models, full otherwise)
    endpoint_silence_s: float = 0.5
    max_utterance_s: float = 15.0
    interim_every_s: float = 1.0
    vad_aggressiveness: int = 2
    partitions: str = "all"  # "all" or a comma list like "0,1,5"
    ack_wait_s: float = 30.0  # held audio is kept alive with in-progress acks; a new owner resets the consumer
    max_sessions: int = 50  # per worker; a new session beyond it is rejected ("worker_full")
    max_buffered_s: float = 120.0  # audio held per session before it is rejected ("buffer_full")
    idle_timeout_s: float = 1800.0  # no audio for this long: the session is flushed and ended
    drain_timeout_s: float = 60.0  # on SIGTERM or a rebalance, time to finalize before handing over anyway
    worker_id: str = ""
    # Consumer group: a crashed worker's partitions move after about lease_ttl_s + heartbeat_s.
    heartbeat_s: float = 1.0
    lease_ttl_s: float = 5.0  # whole seconds (the server keeps message TTLs in seconds)

    @classmethod
    def from_env(cls) -> "TranscriberConfig":
        cfg = _from_env(cls, {
            "model": ("JETSCRIBE_MODEL", str),
            "device": ("JETSCRIBE_DEVICE", str),
            "compute_type": ("JETSCRIBE_COMPUTE_TYPE", str),
            "cpu_threads": ("JETSCRIBE_CPU_THREADS", int),
            "beam_size": ("JETSCRIBE_BEAM_SIZE", int),
            "interim_beam_size": ("JETSCRIBE_INTERIM_BEAM_SIZE", int),
            "final_window": ("JETSCRIBE_FINAL_WINDOW", str),
            "sentence_endpoint_s": ("JETSCRIBE_SENTENCE_ENDPOINT_S", float),
            "endpoint_silence_s": ("JETSCRIBE_ENDPOINT_SILENCE_S", float),
            "max_utterance_s": ("JETSCRIBE_MAX_UTTERANCE_S", float),
            "interim_every_s": ("JETSCRIBE_INTERIM_EVERY_S", float),
            "vad_aggressiveness": ("JETSCRIBE_VAD_AGGRESSIVENESS", int),
            "partitions": ("JETSCRIBE_WORKER_PARTITIONS", str),
            "ack_wait_s": ("JETSCRIBE_ACK_WAIT_S", float),
            "max_sessions": ("JETSCRIBE_MAX_SESSIONS_PER_WORKER", int),
            "max_buffered_s": ("JETSCRIBE_MAX_BUFFERED_S", float),
            "idle_timeout_s": ("JETSCRIBE_IDLE_TIMEOUT_S", float),
            "drain_timeout_s": ("JETSCRIBE_DRAIN_TIMEOUT_S", float),
            "worker_id": ("JETSCRIBE_WORKER_ID", str),
            "heartbeat_s": ("JETSCRIBE_HEARTBEAT_S", float),
            "lease_ttl_s": ("JETSCRIBE_LEASE_TTL_S", float),
        })
        if not cfg.worker_id:
            cfg = replace(cfg, worker_id=f"{socket.gethostname()}-{os.getpid()}")
        return cfg

    def resolved_final_window(self) -> str:
        """The encoder window for finals. bench/windows.py on the devset: a short window (1.5x the audio)
        costs tiny.en nothing measurable (WER .094 vs .085, offline .101) at ~half the time per call;
        base loses accuracy on it (.101 vs .092, offline .088), so base keeps the full 30 s window."""
        if self.final_window not in ("auto", "full", "short"):
            raise ValueError(f"JETSCRIBE_FINAL_WINDOW is {self.final_window!r}: use auto, full or short")
        if self.final_window == "auto":
            return "short" if "tiny" in self.model.lower() else "full"
        return self.final_window

    def owned_partitions(self, total: int) -> list[int]:
        if self.partitions.strip() in ("", "all"):
            return list(range(total))
        owned = sorted({int(p) for p in self.partitions.split(",")})
        bad = [p for p in owned if not 0 <= p < total]
        if bad:
            raise ValueError(f"JETSCRIBE_WORKER_PARTITIONS has {bad}: partitions are 0..{total - 1}")
        return owned


@dataclass(frozen=True)
class PersisterConfig:
    database_url: str = DEFAULT_DATABASE_URL
    batch_size: int = 200
    retry_max_s: float = 10.0

    @classmethod
    def from_env(cls) -> "PersisterConfig":
        return _from_env(cls, {
            "database_url": ("DATABASE_URL", str),
            "batch_size": ("JETSCRIBE_PERSIST_BATCH", int),
            "retry_max_s": ("JETSCRIBE_PERSIST_RETRY_MAX_S", float),
        })

