"""One config object per service, read from environment variables.

Every variable, its default and its meaning is listed in README.md ("Configuration").
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Self

from jetscribe.shared.errors import CodedError

log = logging.getLogger(__name__)

MIN_AUDIO_MAX_AGE_S = 30 * 60.0  # a bot or worker that reconnects within this finds its audio still stored
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"  # NATS_URL when unset
DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/jetscribe"  # DATABASE_URL when unset
DEFAULT_GATEWAY_WS_URL = "ws://127.0.0.1:8765"  # the gateway's WebSocket (/v1/listen), as the captions page sees it


def cache_root() -> Path:
    """Where assembled models and synthesized speech are kept: $JETSCRIBE_CACHE, by default ~/.cache/jetscribe."""
    return Path(os.environ.get("JETSCRIBE_CACHE") or Path.home() / ".cache" / "jetscribe").expanduser()


def env(variable: str, default: Any) -> Any:
    """A config field read from `variable` when it is set and not empty, else `default`."""
    return field(default=default, metadata={"env": variable})


def env_secret(variable: str) -> Any:
    """A field read from `variable` also when the settings are made in code (`StreamSettings(nats_url=...)`):
    credentials come from the environment (or a file it names) and are never written in code or logged."""
    return field(default_factory=lambda: os.environ.get(variable, ""), metadata={"env": variable}, repr=False)


def env_now(variable: str, default: str = "") -> Any:
    """A field read from `variable` also when the settings are made in code, like `env_secret`, but shown."""
    return field(default_factory=lambda: os.environ.get(variable) or default, metadata={"env": variable})


def _cast(raw: str, kind: Any) -> Any:
    kind = {"str": str, "int": int, "float": float}.get(kind, kind)
    return kind(raw)


class FromEnv:
    """`from_env()` for a frozen config dataclass whose fields name their variables with `env(...)`."""

    @classmethod
    def from_env(cls) -> Self:
        values = {}
        for item in fields(cls):  # type: ignore[arg-type]
            variable = item.metadata.get("env")
            raw = os.environ.get(variable) if variable else None
            if raw:
                try:
                    values[item.name] = _cast(raw, item.type)
                except ValueError:
                    raise ConfigError(f"{variable} is {raw!r}: not a valid {item.type}") from None
        return cls(**values)


@dataclass(frozen=True)
class StreamSettings(FromEnv):
    """Where NATS is and how the streams are shaped; every service reads the same."""

    nats_url: str = env("NATS_URL", DEFAULT_NATS_URL)  # one URL, or a cluster's URLs separated by commas
    # Who this process is on NATS, and TLS (shared/natsauth.py): a file holding the user's nkey seed, the CA that
    # signed the server's certificate (set, or a tls:// URL, means TLS) and a client certificate and key.
    nats_creds: str = env_secret("NATS_CREDS")
    nats_tls_ca: str = env_secret("JETSCRIBE_NATS_TLS_CA")
    nats_tls_cert: str = env_secret("JETSCRIBE_NATS_TLS_CERT")
    nats_tls_key: str = env_secret("JETSCRIBE_NATS_TLS_KEY")
    partitions: int = env("JETSCRIBE_PARTITIONS", 16)
    # copies of every stream and KV bucket; 0: 1 on a single server, 3 on a cluster (`shared/streams.py`)
    replicas: int = env("JETSCRIBE_REPLICAS", 0)
    audio_max_age_s: float = env("JETSCRIBE_AUDIO_MAX_AGE_S", 3600.0)
    transcripts_max_age_s: float = env("JETSCRIBE_TRANSCRIPTS_MAX_AGE_S", 7 * 24 * 3600.0)
    duplicate_window_s: float = env("JETSCRIBE_DUPLICATE_WINDOW_S", 120.0)

    def __post_init__(self) -> None:
        check_retention(self.audio_max_age_s, self.transcripts_max_age_s)
        if not 0 <= self.replicas <= 5:
            raise ConfigError(f"JETSCRIBE_REPLICAS is {self.replicas}: use 0 (auto), or 1 to 5 copies")
        nats_servers(self.nats_url)  # refuses an empty list here, not at the first connect

    @property
    def nats_servers(self) -> list[str]:
        return nats_servers(self.nats_url)


def nats_servers(url: str) -> list[str]:
    """The servers a NATS_URL names: one URL, or several separated by commas (the nodes of a cluster), each given
    to the client so it can connect and reconnect through any of them."""
    servers = [part.strip() for part in url.split(",") if part.strip()]
    if not servers:
        raise ConfigError(f"NATS_URL is {url!r}: give a URL such as {DEFAULT_NATS_URL}, or several separated by commas")
    return servers


def check_retention(audio_max_age_s: float, transcripts_max_age_s: float) -> None:
    """AUDIO keeps at least 30 min (a warning below: fine for tests, not for production); TRANSCRIPTS
    keeps longer than AUDIO, so a transcript outlives its audio. A max age of 0 means forever, as in NATS."""
    forever = float("inf")
    audio, transcripts = (age or forever for age in (audio_max_age_s, transcripts_max_age_s))
    if audio < 0 or transcripts < 0:
        raise ConfigError("JETSCRIBE_AUDIO_MAX_AGE_S and JETSCRIBE_TRANSCRIPTS_MAX_AGE_S must not be negative")
    if transcripts <= audio and transcripts != forever:
        raise ConfigError(
            f"JETSCRIBE_TRANSCRIPTS_MAX_AGE_S ({transcripts_max_age_s:g} s) must be longer than "
            f"JETSCRIBE_AUDIO_MAX_AGE_S ({audio_max_age_s:g} s): transcripts outlive their audio"
        )
    if audio < MIN_AUDIO_MAX_AGE_S:
        log.warning(
            "JETSCRIBE_AUDIO_MAX_AGE_S is %g s, under 30 min: audio may expire before a slow worker "
            "or a reconnecting bot gets to it",
            audio_max_age_s,
        )


@dataclass(frozen=True)
class IngestConfig(FromEnv):
    max_chunk_bytes: int = env("JETSCRIBE_MAX_CHUNK_BYTES", 1_048_576)
    min_sample_rate: int = env("JETSCRIBE_MIN_SAMPLE_RATE", 8000)
    max_sample_rate: int = env("JETSCRIBE_MAX_SAMPLE_RATE", 192_000)
    max_channels: int = env("JETSCRIBE_MAX_CHANNELS", 8)
    # active ones: started and not yet ended, counted over all gateways
    max_sessions_per_tenant: int = env("JETSCRIBE_MAX_SESSIONS_PER_TENANT", 100)
    # Rate limits (token buckets holding rate_burst_s of their rate; 0 = no limit): far above a real-time bot's
    # 10 chunks/s, so only a client sending several times faster than real time for a long while meets them.
    session_chunks_per_s: float = env("JETSCRIBE_SESSION_CHUNKS_PER_S", 50.0)
    session_bytes_per_s: float = env("JETSCRIBE_SESSION_BYTES_PER_S", 8 * 1024 * 1024.0)
    tenant_chunks_per_s: float = env("JETSCRIBE_TENANT_CHUNKS_PER_S", 5000.0)  # per gateway
    tenant_bytes_per_s: float = env("JETSCRIBE_TENANT_BYTES_PER_S", 128 * 1024 * 1024.0)  # per gateway
    rate_burst_s: float = env("JETSCRIBE_RATE_BURST_S", 60.0)
    # pages of stored transcript a tenant may ask a gateway for (services/ingest/history.py); 0 = no limit
    history_pages_per_s: float = env("JETSCRIBE_HISTORY_PAGES_PER_S", 20.0)
    # The gateways' group: each serves the sessions of the partitions it holds, as the transcribers do.
    gateway_id: str = env("JETSCRIBE_GATEWAY_ID", "")
    heartbeat_s: float = env("JETSCRIBE_HEARTBEAT_S", 1.0)
    lease_ttl_s: float = env("JETSCRIBE_LEASE_TTL_S", 5.0)  # a dead gateway's sessions move after about ttl + heartbeat
    # The WebSocket way in (services/ingest/websocket.py): off (0) unless a port is given; `jetscribe up` gives 8765.
    ws_port: int = env("JETSCRIBE_WS_PORT", 0)
    ws_host: str = env("JETSCRIBE_WS_HOST", "127.0.0.1")
    # tenants' API key hashes; default: api-keys.json in $JETSCRIBE_NATS_KEYS, where `jetscribe tenant add` writes it
    api_keys: str = env("JETSCRIBE_API_KEYS", "")
    # diarize=true on the socket needs speakers from the audio in the transcribers (the same setting)
    speakers_audio: str = env("JETSCRIBE_SPEAKERS_AUDIO", "auto")

    def __post_init__(self) -> None:
        rates = ("session_chunks_per_s", "session_bytes_per_s", "tenant_chunks_per_s", "tenant_bytes_per_s")
        for name in (*rates, "history_pages_per_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"JETSCRIBE_{name.upper()} is {getattr(self, name)}: use 0 (no limit) or more")
        if self.rate_burst_s <= 0:
            raise ConfigError(f"JETSCRIBE_RATE_BURST_S is {self.rate_burst_s}: use a number of seconds above 0")

    @classmethod
    def from_env(cls) -> Self:
        cfg = super().from_env()
        if not cfg.gateway_id:
            cfg = replace(cfg, gateway_id=f"gateway-{socket.gethostname()}-{os.getpid()}")
        return cfg


@dataclass(frozen=True)
class TranscriberConfig(FromEnv):
    # The Whisper model and what it runs on.
    model: str = env("JETSCRIBE_MODEL", "base")  # "base", "tiny.en" or a folder holding a CTranslate2 Whisper model
    device: str = env("JETSCRIBE_DEVICE", "auto")  # "cpu", "cuda" or "auto" (cuda when CTranslate2 sees a GPU)
    device_index: int = env("JETSCRIBE_DEVICE_INDEX", 0)  # which GPU, on cuda
    compute_type: str = env("JETSCRIBE_COMPUTE_TYPE", "auto")  # "auto": the device's default (`device_defaults`)
    cpu_threads: int = env("JETSCRIBE_CPU_THREADS", 0)  # 0: CTranslate2 decides
    # How finals and interims are decoded.
    beam_size: int = env("JETSCRIBE_BEAM_SIZE", 5)
    interim_beam_size: int = env("JETSCRIBE_INTERIM_BEAM_SIZE", 1)
    # "full", "short" or "auto" (short for tiny models, full otherwise)
    final_window: str = env("JETSCRIBE_FINAL_WINDOW", "auto")
    interim_every_s: float = env("JETSCRIBE_INTERIM_EVERY_S", 1.0)
    # Jobs of several sessions decoded in one call (1 = one job at a time, the sequential path)
    max_batch: int = env("JETSCRIBE_MAX_BATCH", 8)
    # how long a batch that is not full may wait for more jobs; 0 = take what is due now
    batch_wait_ms: float = env("JETSCRIBE_BATCH_WAIT_MS", 0.0)
    # Where an utterance ends.
    endpoint_silence_s: float = env("JETSCRIBE_ENDPOINT_SILENCE_S", 0.5)
    max_utterance_s: float = env("JETSCRIBE_MAX_UTTERANCE_S", 15.0)
    # Off by default: bench/accuracy.py found it costs base accuracy (README, "Configuration").
    sentence_endpoint_s: float = env("JETSCRIBE_SENTENCE_ENDPOINT_S", 0.0)
    # speech with no pause is committed at sentence ends the interims confirmed, once this long; 0 = off
    commit_sentences_after_s: float = env("JETSCRIBE_COMMIT_SENTENCES_AFTER_S", 0.0)
    # What the VAD counts as speech.
    # "hybrid" (webrtc, AND Silero where webrtc calls every frame speech for 12 s), "webrtc" or "silero"; each with
    # the noise-floor gate below
    vad: str = env("JETSCRIBE_VAD", "hybrid")
    vad_threshold: float = env("JETSCRIBE_VAD_THRESHOLD", 0.3)  # silero: speech from this probability on
    vad_aggressiveness: int = env("JETSCRIBE_VAD_AGGRESSIVENESS", 2)  # webrtc: 0 (least) to 3
    # speech must stand this far above the session's noise floor; 0 turns that gate off
    vad_above_floor_db: float = env("JETSCRIBE_VAD_ABOVE_FLOOR_DB", 5.0)
    # Speakers from the audio (voice embeddings, the `speakers` extra): "auto" (on when the extra is installed),
    # "on" (refuse to start without it) or "off". Speakers the bot names win either way.
    speakers_audio: str = env("JETSCRIBE_SPEAKERS_AUDIO", "auto")
    # a voice at least this similar (cosine) to a session's speaker is that speaker; below, a new one
    speakers_match: float = env("JETSCRIBE_SPEAKERS_MATCH", 0.6)
    # seconds between the starts of an utterance's voice windows (1.5 s long): less, more CPU for finer changes
    speakers_hop_s: float = env("JETSCRIBE_SPEAKERS_HOP_S", 1.5)
    # what runs the voice model: "auto" (onnxruntime, else torch, logged), "onnx" (refuse to start without it), "torch"
    speakers_backend: str = env("JETSCRIBE_SPEAKERS_BACKEND", "auto")
    # inside a final embedded as several windows, a turn or a new speaker needs at least this many (1: any one window)
    speakers_turn_windows: int = env("JETSCRIBE_SPEAKERS_TURN_WINDOWS", 2)
    # the voice thread's niceness (Linux, that thread only): above 0 it yields the CPU to decoding
    speakers_nice: int = env("JETSCRIBE_SPEAKERS_NICE", 10)
    # What a worker allows its sessions.
    # per worker; a new session beyond it is rejected ("worker_full")
    max_sessions: int = env("JETSCRIBE_MAX_SESSIONS_PER_WORKER", 50)
    # audio held per session before it is rejected ("buffer_full")
    max_buffered_s: float = env("JETSCRIBE_MAX_BUFFERED_S", 120.0)
    # no audio for this long: the session is flushed and ended
    idle_timeout_s: float = env("JETSCRIBE_IDLE_TIMEOUT_S", 1800.0)
    # The worker in its consumer group: which partitions it takes, and how they move.
    worker_id: str = env("JETSCRIBE_WORKER_ID", "")
    partitions: str = env("JETSCRIBE_WORKER_PARTITIONS", "all")  # "all" or a comma list like "0,1,5"
    # held audio is kept alive with in-progress acks; a new owner resets the consumer
    ack_wait_s: float = env("JETSCRIBE_ACK_WAIT_S", 30.0)
    # on SIGTERM or a rebalance, time to finalize before handing over anyway
    drain_timeout_s: float = env("JETSCRIBE_DRAIN_TIMEOUT_S", 60.0)
    # a crashed worker's partitions move after about lease_ttl_s + heartbeat_s
    heartbeat_s: float = env("JETSCRIBE_HEARTBEAT_S", 1.0)
    lease_ttl_s: float = env("JETSCRIBE_LEASE_TTL_S", 5.0)  # whole seconds (the server keeps message TTLs in seconds)

    @classmethod
    def from_env(cls) -> Self:
        cfg = super().from_env()
        if not cfg.worker_id:
            cfg = replace(cfg, worker_id=f"{socket.gethostname()}-{os.getpid()}")
        return cfg

    def on_device(self, cuda_devices: int) -> Self:
        """This config with `device` and `compute_type` resolved ("auto" no more), given how many CUDA
        devices CTranslate2 sees; raises DeviceUnavailable for a GPU that is not there."""
        device = resolve_device(self.device, cuda_devices, self.device_index)
        return replace(self, device=device, compute_type=resolve_compute_type(self.compute_type, device))

    def resolved_final_window(self) -> str:
        """The encoder window for finals: short for tiny models, full otherwise, as bench/windows.py measured
        (a short window halves the cost per call; on base it costs accuracy)."""
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


class ConfigError(CodedError, ValueError):
    """A setting that cannot work on this host; the message names the variable and what to set instead."""

    code = "bad_config"

    def __init__(self, message: str):
        super().__init__(None, message)


class DeviceUnavailable(ConfigError):
    code = "device_unavailable"


DEVICES = ("cpu", "cuda", "auto")


def device_defaults(device: str) -> tuple[str, int]:
    """(compute_type, max_batch) defaults for a resolved device: int8 and JETSCRIBE_MAX_BATCH's 8 on a CPU;
    float16 and 32 on a GPU, where a larger batch costs little more than one job."""
    if device == "cuda":
        return "float16", 32
    if device == "cpu":
        return "int8", 8
    raise ConfigError(f"device {device!r} is not resolved: cpu or cuda")


def resolve_device(requested: str, cuda_devices: int, device_index: int = 0) -> str:
    """JETSCRIBE_DEVICE to "cpu" or "cuda": auto takes a GPU when CTranslate2 sees one."""
    if requested not in DEVICES:
        raise ConfigError(f"JETSCRIBE_DEVICE is {requested!r}: use cpu, cuda or auto")
    if requested == "auto":
        requested = "cuda" if cuda_devices > 0 else "cpu"
    if requested == "cuda" and cuda_devices == 0:
        raise DeviceUnavailable(
            "JETSCRIBE_DEVICE=cuda but CTranslate2 sees no CUDA device (get_cuda_device_count() == 0): use cpu or auto"
        )
    if requested == "cuda" and not 0 <= device_index < cuda_devices:
        raise DeviceUnavailable(
            f"JETSCRIBE_DEVICE_INDEX={device_index} but CTranslate2 sees {cuda_devices} CUDA device(s): "
            f"use 0 to {cuda_devices - 1}"
        )
    return requested


def resolve_compute_type(requested: str, device: str) -> str:
    """JETSCRIBE_COMPUTE_TYPE, or the device's default when it is "auto" (or empty)."""
    return device_defaults(device)[0] if requested in ("", "auto") else requested


SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


@dataclass(frozen=True)
class PostgresClient(FromEnv):
    """How a process signs in to PostgreSQL and checks the server, beside DATABASE_URL (user, host, database): a
    password file and TLS, named like NATS's (JETSCRIBE_NATS_TLS_*). A CA set means TLS verified against it and
    the host name (verify-full), as a CA means TLS for NATS. The password is read when connecting, never kept in a
    URL or logged."""

    password_file: str = env_secret("JETSCRIBE_PG_PASSWORD_FILE")
    tls_ca: str = env_secret("JETSCRIBE_PG_TLS_CA")
    tls_cert: str = env_secret("JETSCRIBE_PG_TLS_CERT")  # a client certificate, where the server asks for one
    tls_key: str = env_secret("JETSCRIBE_PG_TLS_KEY")
    sslmode: str = env_now("JETSCRIBE_PG_SSLMODE")  # libpq's; empty: verify-full with a CA, else libpq's default

    def __post_init__(self) -> None:
        if self.sslmode and self.sslmode not in SSL_MODES:
            raise ConfigError(f"JETSCRIBE_PG_SSLMODE is {self.sslmode!r}: use one of {', '.join(SSL_MODES)}")

    def connect_args(self) -> dict[str, str]:
        """libpq connection parameters (psycopg's connect keywords) for these settings."""
        args: dict[str, str] = {}
        if self.password_file:
            args["password"] = read_secret(self.password_file, "JETSCRIBE_PG_PASSWORD_FILE")
        mode = self.sslmode or ("verify-full" if self.tls_ca else "")
        if mode:
            args["sslmode"] = mode
        for name, value in (("sslrootcert", self.tls_ca), ("sslcert", self.tls_cert), ("sslkey", self.tls_key)):
            if value:
                args[name] = value
        return args


def read_secret(path: str, variable: str) -> str:
    """The first line of a secret's file; a file that cannot be read is a ConfigError naming the variable."""
    try:
        with open(path, encoding="utf-8") as source:
            return source.readline().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"{variable} names {path}, which cannot be read ({exc.strerror})") from None


@dataclass(frozen=True)
class PersisterConfig(FromEnv):
    database_url: str = env("DATABASE_URL", DEFAULT_DATABASE_URL)
    postgres: PostgresClient = field(default_factory=PostgresClient)  # its password and TLS (JETSCRIBE_PG_*)
    batch_size: int = env("JETSCRIBE_PERSIST_BATCH", 200)
    retry_max_s: float = env("JETSCRIBE_PERSIST_RETRY_MAX_S", 10.0)


@dataclass(frozen=True)
class WebConfig(FromEnv):
    """The captions page and session browser (services/web): where it listens, what it reads, where the page
    streams to."""

    database_url: str = env("DATABASE_URL", DEFAULT_DATABASE_URL)  # read only
    host: str = env("JETSCRIBE_WEB_HOST", "127.0.0.1")
    port: int = env("JETSCRIBE_WEB_PORT", 8000)
    gateway_url: str = env("JETSCRIBE_WEB_GATEWAY_URL", DEFAULT_GATEWAY_WS_URL)  # the gateway's WebSocket, for the page
    # the tenants' API key hashes, as the gateway reads them: JETSCRIBE_API_KEYS, else api-keys.json in the keys folder
    api_keys: str = env("JETSCRIBE_API_KEYS", "")
    keys_dir: str = env("JETSCRIBE_NATS_KEYS", ".jetscribe/nats-keys")

    @property
    def api_keys_file(self) -> Path:
        from jetscribe.shared.natsauth import API_KEYS_FILE  # natsauth reads this module's StreamSettings

        return Path(self.api_keys or Path(self.keys_dir) / API_KEYS_FILE)


@dataclass(frozen=True)
class TelemetryConfig(FromEnv):
    """Logs, metrics and traces of any service. The standard OTEL_* variables (OTEL_SERVICE_NAME,
    OTEL_TRACES_SAMPLER, OTEL_EXPORTER_OTLP_*, OTEL_METRICS_EXPORTER, ...) are read by OpenTelemetry itself."""

    # HTTP /metrics, /healthz and /readyz; 0 = a free port, logged at start and announced by the service
    metrics_port: int = env("JETSCRIBE_METRICS_PORT", 0)
    metrics_host: str = env("JETSCRIBE_METRICS_HOST", "127.0.0.1")  # 0.0.0.0 in a container
    log_level: str = env("JETSCRIBE_LOG_LEVEL", "INFO")
    log_format: str = env("JETSCRIBE_LOG_FORMAT", "text")  # "text" or "json" (one object per line)
    console: str = env("JETSCRIBE_OTEL_CONSOLE", "")  # "1": spans and metrics printed to stderr

    def __post_init__(self) -> None:
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"JETSCRIBE_LOG_FORMAT is {self.log_format!r}: use text or json")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"JETSCRIBE_METRICS_PORT is {self.metrics_port}: use 0 (a free port) to 65535")
