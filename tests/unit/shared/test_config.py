import logging

import pytest

from jetscribe.shared.config import StreamSettings


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

    from jetscribe.shared.config import IngestConfig, PersisterConfig, StreamSettings, TranscriberConfig

    for cls in (StreamSettings, IngestConfig, TranscriberConfig, PersisterConfig):
        for item in fields(cls):
            variable = item.metadata.get("env")
            assert variable, f"{cls.__name__}.{item.name} names no environment variable"
            default = getattr(cls(), item.name)
            monkeypatch.setenv(variable, str(default))
            assert getattr(cls.from_env(), item.name) == default or item.name in ("worker_id", "gateway_id")
            assert type(getattr(cls.from_env(), item.name)) is type(default)
            monkeypatch.delenv(variable)
