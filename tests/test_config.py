"""GemmaRVQConfig: seed defaults, derived rates, validation, serialisation."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig

from gemma_rvq import GemmaRVQConfig
from gemma_rvq.testing import tiny_gemma4_audio_config, tiny_hubert_config, tiny_whisper_config


def test_defaults_reproduce_the_seed_model():
    config = GemmaRVQConfig()
    assert config.model_type == "gemma_rvq"
    assert config.encoder_family == "gemma4_audio"
    assert config.encoder_name_or_path == "rnagabh/gemma4-audio-encoder"
    assert config.encoder_config is None and not config.bundles_encoder
    assert config.encoder_layer is None
    assert (config.dim, config.codebook_dim, config.num_quantizers, config.codebook_size) == (1024, 1024, 8, 2048)
    assert config.use_projection and config.codebook_type == "ema"
    assert (config.mse_weight, config.cosine_weight) == (0.5, 0.5)
    assert config.sampling_rate == 16000 and config.frame_rate == 25 and config.samples_per_frame == 640


@pytest.mark.parametrize(
    ("family", "frame_rate", "samples_per_frame"),
    [("gemma4_audio", 25, 640), ("hubert", 50, 320), ("wav2vec2", 50, 320), ("whisper", 50, 320)],
)
def test_derived_rates_per_family(family, frame_rate, samples_per_frame):
    config = GemmaRVQConfig(encoder_family=family, encoder_name_or_path=None)
    assert config.sampling_rate == 16000
    assert config.frame_rate == frame_rate
    assert config.samples_per_frame == samples_per_frame
    assert config.min_samples == (400 if family in ("hubert", "wav2vec2") else samples_per_frame)


def test_encoder_config_object_is_stored_as_dict_and_checked():
    enc = tiny_hubert_config(hidden_size=32)
    config = GemmaRVQConfig(encoder_family="hubert", encoder_config=enc, dim=32)
    assert isinstance(config.encoder_config, dict) and config.bundles_encoder
    assert config.encoder_hidden_size == 32 and config.encoder_num_layers == 3
    with pytest.raises(ValueError, match="hidden size 32"):
        GemmaRVQConfig(encoder_family="hubert", encoder_config=enc, dim=64)
    with pytest.raises(ValueError, match="model_type 'hubert'"):
        GemmaRVQConfig(encoder_family="whisper", encoder_config=enc, dim=32)
    with pytest.raises(ValueError, match="only 3 layers"):
        GemmaRVQConfig(encoder_family="hubert", encoder_config=enc, dim=32, encoder_layer=4)
    whisper = GemmaRVQConfig(encoder_family="whisper", encoder_config=tiny_whisper_config(d_model=32), dim=32)
    assert whisper.encoder_hidden_size == 32 and whisper.encoder_num_layers == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"encoder_family": "mimi"}, "encoder_family"),
        ({"dim": 0}, "dim"),
        ({"num_quantizers": 0}, "num_quantizers"),
        ({"codebook_size": 1}, "codebook_size"),
        ({"codebook_dim": 512, "use_projection": False}, "use_projection=False"),
        ({"codebook_type": "gumbel"}, "codebook_type"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"commitment_weight": -1.0}, "commitment_weight"),
        ({"balance_weight": -0.5}, "balance_weight"),
        ({"balance_weight": 1.0, "codebook_type": "learnable"}, "EMA codebooks only"),
        ({"mse_weight": 0.0, "cosine_weight": 0.0}, "mse_weight"),
        ({"encoder_layer": -1}, "encoder_layer"),
        ({"max_chunk_seconds": 0}, "max_chunk_seconds"),
        ({"chunk_overlap_seconds": 20.0}, "chunk_overlap_seconds"),
        ({"encoder_family": "whisper", "max_chunk_seconds": 40.0}, "Whisper"),
        ({"encoder_config": 3}, "encoder_config"),
    ],
)
def test_invalid_fields_raise_value_error_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GemmaRVQConfig(**kwargs)


def test_save_and_load_roundtrip(tmp_path):
    enc = tiny_gemma4_audio_config()
    config = GemmaRVQConfig(
        encoder_config=enc, dim=enc.hidden_size, num_quantizers=3, codebook_size=32, codebook_dim=16,
        encoder_layer=1, max_chunk_seconds=10.0, chunk_overlap_seconds=1.0,
        feature_extractor_config={"feature_size": 128, "sampling_rate": 16000},
    )
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "gemma_rvq" and saved["encoder_config"]["model_type"] == "gemma4_audio"
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, GemmaRVQConfig)
    for name in ("encoder_family", "encoder_layer", "dim", "codebook_dim", "num_quantizers", "codebook_size",
                 "max_chunk_seconds", "chunk_overlap_seconds", "feature_extractor_config"):
        assert getattr(loaded, name) == getattr(config, name), name
    assert loaded.encoder_config["hidden_size"] == enc.hidden_size
    assert loaded.frame_rate == 25


def test_feature_extractor_object_is_stored_json_safe():
    from transformers import WhisperFeatureExtractor

    config = GemmaRVQConfig(encoder_family="whisper", encoder_name_or_path=None,
                            feature_extractor_config=WhisperFeatureExtractor(feature_size=80))
    json.dumps(config.feature_extractor_config)  # no numpy arrays (mel filters) inside
    assert config.feature_extractor_config["feature_size"] == 80
