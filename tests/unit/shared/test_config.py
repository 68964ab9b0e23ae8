import logging

import pytest

from jetscribe.shared.config import ConfigError, PostgresClient, StreamSettings


def test_default_retention_keeps_transcripts_longer_than_audio():
    settings = StreamSettings()
    assert settings.audio_max_age_s >= 30 * 60 and settings.transcripts_max_age_s > settings.audio_max_age_s


def test_retention_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("JETSCRIBE_AUDIO_MAX_AGE_S", "7200")
    monkeypatch.setenv("JETSCRIBE_TRANSCRIPTS_MAX_AGE_S", "86400")
    settings = StreamSettings.from_env()
    assert (settings.audio_max_age_s, settings.transcripts_max_age_s) == (7200, 86400)


@pytest.mark.parametrize("audio, transcripts", [(3600, 3600), (3600, 600), (0, 86400), (-1, 3600)])
def test_transcripts_must_outlive_audio(audio, transcripts):
    with pytest.raises(ValueError, match="MAX_AGE"):
        StreamSettings(audio_max_age_s=audio, transcripts_max_age_s=transcripts)


def test_zero_means_forever():
    StreamSettings(audio_max_age_s=3600, transcripts_max_age_s=0)
    StreamSettings(audio_max_age_s=0, transcripts_max_age_s=0)


def test_audio_under_30_minutes_is_allowed_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        StreamSettings(audio_max_age_s=60, transcripts_max_age_s=120)
    assert "under 30 min" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        StreamSettings()
    assert not caplog.text


def test_every_field_reads_its_variable_with_its_type(monkeypatch):
    from dataclasses import fields

    from jetscribe.shared.config import FromEnv, IngestConfig, PersisterConfig, StreamSettings, TranscriberConfig

    for cls in (StreamSettings, IngestConfig, TranscriberConfig, PersisterConfig, PostgresClient):
        for item in fields(cls):
            if isinstance(getattr(cls(), item.name), FromEnv):
                continue  # a config within a config (PersisterConfig.postgres): checked as its own class
            variable = item.metadata.get("env")
            assert variable, f"{cls.__name__}.{item.name} names no environment variable"
            default = getattr(cls(), item.name)
            monkeypatch.setenv(variable, str(default))
            assert getattr(cls.from_env(), item.name) == default or item.name in ("worker_id", "gateway_id")
            assert type(getattr(cls.from_env(), item.name)) is type(default)
            monkeypatch.delenv(variable)


def test_auto_device_takes_a_gpu_when_ctranslate2_sees_one():
    from jetscribe.shared.config import resolve_device

    assert resolve_device("auto", cuda_devices=0) == "cpu"
    assert resolve_device("auto", cuda_devices=2) == "cuda"
    assert resolve_device("cpu", cuda_devices=2) == "cpu"
    assert resolve_device("cuda", cuda_devices=1) == "cuda"


def test_cuda_without_a_gpu_is_one_clear_error():
    from jetscribe.shared.config import DeviceUnavailable, resolve_device

    with pytest.raises(DeviceUnavailable) as caught:
        resolve_device("cuda", cuda_devices=0)
    message = str(caught.value)
    assert message == (
        "JETSCRIBE_DEVICE=cuda but CTranslate2 sees no CUDA device (get_cuda_device_count() == 0): use cpu or auto"
    )
    assert "\n" not in message and caught.value.code == "device_unavailable"


def test_a_device_index_beyond_the_gpus_is_refused():
    from jetscribe.shared.config import DeviceUnavailable, resolve_device

    assert resolve_device("cuda", cuda_devices=2, device_index=1) == "cuda"
    with pytest.raises(DeviceUnavailable, match="JETSCRIBE_DEVICE_INDEX=2 .* 2 CUDA device.*use 0 to 1"):
        resolve_device("cuda", cuda_devices=2, device_index=2)
    with pytest.raises(DeviceUnavailable, match="JETSCRIBE_DEVICE_INDEX=1"):
        resolve_device("auto", cuda_devices=1, device_index=1)


def test_an_unknown_device_names_the_choices():
    from jetscribe.shared.config import ConfigError, resolve_device

    with pytest.raises(ConfigError, match="JETSCRIBE_DEVICE is 'gpu': use cpu, cuda or auto"):
        resolve_device("gpu", cuda_devices=1)


def test_compute_type_and_batch_follow_the_device_unless_set():
    from jetscribe.shared.config import device_defaults, resolve_compute_type

    assert device_defaults("cpu") == ("int8", 8)
    assert device_defaults("cuda") == ("float16", 32)
    assert resolve_compute_type("auto", "cuda") == "float16"
    assert resolve_compute_type("auto", "cpu") == "int8"
    assert resolve_compute_type("int8_float16", "cuda") == "int8_float16"  # set explicitly: kept


def test_transcriber_config_resolves_device_and_compute_type_from_the_environment(monkeypatch):
    from jetscribe.shared.config import DeviceUnavailable, TranscriberConfig

    config = TranscriberConfig.from_env()
    assert (config.device, config.compute_type, config.device_index) == ("auto", "auto", 0)
    assert (config.on_device(0).device, config.on_device(0).compute_type) == ("cpu", "int8")
    monkeypatch.setenv("JETSCRIBE_DEVICE_INDEX", "1")
    on_gpu = TranscriberConfig.from_env().on_device(2)
    assert (on_gpu.device, on_gpu.compute_type, on_gpu.device_index) == ("cuda", "float16", 1)
    monkeypatch.setenv("JETSCRIBE_DEVICE", "cuda")
    monkeypatch.setenv("JETSCRIBE_COMPUTE_TYPE", "int8_float16")
    assert TranscriberConfig.from_env().on_device(2).compute_type == "int8_float16"
    with pytest.raises(DeviceUnavailable):
        TranscriberConfig.from_env().on_device(0)


def test_nats_url_names_one_server_or_a_clusters_nodes():
    from jetscribe.shared.config import ConfigError, StreamSettings, nats_servers

    assert nats_servers("nats://a:4222") == ["nats://a:4222"]
    assert nats_servers(" nats://a:1, nats://b:2 ,nats://c:3,") == ["nats://a:1", "nats://b:2", "nats://c:3"]
    assert StreamSettings(nats_url="nats://a:1,nats://b:2").nats_servers == ["nats://a:1", "nats://b:2"]
    with pytest.raises(ConfigError, match="NATS_URL is ' , '"):
        StreamSettings(nats_url=" , ")


def test_replicas_are_auto_unless_set_and_at_most_five(monkeypatch):
    from jetscribe.shared.config import ConfigError, StreamSettings

    assert StreamSettings.from_env().replicas == 0  # auto: shared/streams.py decides from the server
    monkeypatch.setenv("JETSCRIBE_REPLICAS", "3")
    assert StreamSettings.from_env().replicas == 3
    with pytest.raises(ConfigError, match="JETSCRIBE_REPLICAS is 7"):
        StreamSettings(replicas=7)


def test_auto_replicas_are_three_on_a_cluster_and_one_on_a_single_server():
    from types import SimpleNamespace

    from jetscribe.shared.config import StreamSettings
    from jetscribe.shared.streams import replicas, stream_configs

    single = SimpleNamespace(_server_info={"server_name": "n1"})
    clustered = SimpleNamespace(_server_info={"server_name": "n1", "cluster": "jetscribe"})
    js = SimpleNamespace(_nc=clustered)  # a JetStreamContext names its connection so
    assert (replicas(StreamSettings(), single), replicas(StreamSettings(), clustered)) == (1, 3)
    assert replicas(StreamSettings(), js) == 3
    assert replicas(StreamSettings(replicas=2), clustered) == 2  # set: kept
    assert {c.num_replicas for c in stream_configs(StreamSettings(), 3)} == {3}
    transcripts = next(c for c in stream_configs(StreamSettings()) if c.name == "TRANSCRIPTS")
    assert "claim.transcriber.*" in transcripts.subjects  # the owners' claims live beside what they fence


def test_a_postgres_ca_means_verified_tls_and_the_password_comes_from_its_file(tmp_path, monkeypatch):
    for name in ("JETSCRIBE_PG_PASSWORD_FILE", "JETSCRIBE_PG_TLS_CA", "JETSCRIBE_PG_SSLMODE"):
        monkeypatch.delenv(name, raising=False)
    assert PostgresClient().connect_args() == {}  # nothing set: libpq's own defaults
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    monkeypatch.setenv("JETSCRIBE_PG_PASSWORD_FILE", str(secret))
    monkeypatch.setenv("JETSCRIBE_PG_TLS_CA", "/ca.pem")
    client = PostgresClient.from_env()
    assert client.connect_args() == {"password": "s3cret", "sslmode": "verify-full", "sslrootcert": "/ca.pem"}
    assert "s3cret" not in repr(client) and str(secret) not in repr(client)
    assert PostgresClient(tls_ca="/ca.pem", sslmode="verify-ca").connect_args()["sslmode"] == "verify-ca"


def test_a_bad_sslmode_or_an_unreadable_password_file_names_its_variable(tmp_path):
    with pytest.raises(ConfigError, match="JETSCRIBE_PG_SSLMODE is 'on': use one of disable"):
        PostgresClient(sslmode="on")
    with pytest.raises(ConfigError, match="JETSCRIBE_PG_PASSWORD_FILE names .*missing, which cannot be read"):
        PostgresClient(password_file=str(tmp_path / "missing")).connect_args()
