"""GemmaRVQConfig: seed defaults, derived rates, validation, serialisation."""

from __future__ import annotations

import inspect
import json
import re

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from transformers import AutoConfig

from gemma_rvq import GemmaRVQConfig
from gemma_rvq.bounds import BOUNDS
from gemma_rvq.configuration_gemma_rvq import encoder_frames
from gemma_rvq.quantization import ResidualQuantizer
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
    with pytest.raises(StrictDataclassClassValidationError, match="hidden size 32"):
        GemmaRVQConfig(encoder_family="hubert", encoder_config=enc, dim=64)
    with pytest.raises(StrictDataclassClassValidationError, match="model_type 'hubert'"):
        GemmaRVQConfig(encoder_family="whisper", encoder_config=enc, dim=32)
    with pytest.raises(StrictDataclassClassValidationError, match="only 3 layers"):
        GemmaRVQConfig(encoder_family="hubert", encoder_config=enc, dim=32, encoder_layer=4)
    whisper = GemmaRVQConfig(encoder_family="whisper", encoder_config=tiny_whisper_config(d_model=32), dim=32)
    assert whisper.encoder_hidden_size == 32 and whisper.encoder_num_layers == 2


@pytest.mark.parametrize(
    ("kwargs", "field", "match"),
    [
        ({"encoder_family": "mimi"}, "encoder_family", "must be one of"),
        ({"dim": 0}, "dim", "an int >= 1"),
        ({"dim": "32"}, "dim", "expected int, got str"),
        ({"num_quantizers": 0}, "num_quantizers", "an int >= 1"),
        ({"num_quantizers": True}, "num_quantizers", "got bool"),
        ({"codebook_size": 1}, "codebook_size", "an int >= 2"),
        ({"codebook_size": 16.0}, "codebook_size", "expected int, got float"),
        ({"codebook_type": "gumbel"}, "codebook_type", "must be one of"),
        ({"ema_decay": 1.0}, "ema_decay", r"in \[0, 1\)"),
        ({"ema_decay": None}, "ema_decay", "NoneType"),
        ({"ema_decay": float("nan")}, "ema_decay", "finite"),
        ({"commitment_weight": -1.0}, "commitment_weight", ">= 0"),
        ({"balance_weight": -0.5}, "balance_weight", ">= 0"),
        ({"mse_weight": float("inf")}, "mse_weight", "finite"),
        ({"encoder_layer": -1}, "encoder_layer", ">= 0"),
        ({"max_chunk_seconds": 0}, "max_chunk_seconds", "> 0"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps", "> 0"),
        ({"encoder_config": 3}, "encoder_config", "doesn't match any type"),
        ({"use_projection": "yes"}, "use_projection", "expected bool"),
    ],
)
def test_invalid_fields_are_refused_naming_the_field(kwargs, field, match):
    with pytest.raises(StrictDataclassFieldValidationError, match=rf"field '{field}'(.|\n)*{match}"):
        GemmaRVQConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"codebook_dim": 512, "use_projection": False}, "use_projection=False"),
        ({"balance_weight": 1.0, "codebook_type": "learnable"}, "EMA codebooks only"),
        ({"mse_weight": 0.0, "cosine_weight": 0.0}, "mse_weight"),
        ({"chunk_overlap_seconds": 20.0}, "chunk_overlap_seconds"),
        ({"encoder_family": "whisper", "max_chunk_seconds": 40.0}, "whisper encoder's fixed 30 s window"),
    ],
)
def test_inconsistent_fields_are_refused_by_validate_architecture(kwargs, match):
    with pytest.raises(StrictDataclassClassValidationError, match=rf"validate_architecture(.|\n)*{match}"):
        GemmaRVQConfig(**kwargs)


def test_fields_are_checked_when_set_and_numbers_may_be_ints():
    config = GemmaRVQConfig(mse_weight=1, cosine_weight=0, ema_decay=0)  # ints where floats are declared
    assert config.mse_weight == 1
    with pytest.raises(StrictDataclassFieldValidationError, match="num_quantizers"):
        config.num_quantizers = -2
    config.check()  # the pre-@strict entry point still runs every check
    config.balance_weight, config.codebook_type = 1.0, "learnable"  # each valid alone, not together
    with pytest.raises(StrictDataclassClassValidationError, match="EMA codebooks only"):
        config.check()


@pytest.mark.parametrize("name", sorted(set(BOUNDS) & set(inspect.signature(ResidualQuantizer).parameters)))
def test_config_and_quantizer_share_one_set_of_bounds(name):
    """Each quantizer setting: a value just outside the shared bound is refused by both, one inside by neither."""
    bound = BOUNDS[name]
    inside = bound.low + (1 if bound.low_open else 0) if bound.low is not None else 1
    outside = bound.low - 1 if not bound.low_open else bound.low
    quantizer_args = {"dim": 4, "num_quantizers": 1, "codebook_size": 4}
    config_name = "codebook_dim" if name == "dim" else name
    ResidualQuantizer(**{**quantizer_args, name: inside})
    with pytest.raises(ValueError, match=rf"{name} must be {re.escape(bound.describe())}"):
        ResidualQuantizer(**{**quantizer_args, name: outside})
    if config_name in GemmaRVQConfig.__dataclass_fields__:
        kwargs = {config_name: inside}
        if config_name == "codebook_size":
            kwargs["codebook_size"] = max(inside, 2)
        GemmaRVQConfig(**kwargs)
        with pytest.raises(StrictDataclassFieldValidationError, match=re.escape(bound.describe())):
            GemmaRVQConfig(**{config_name: outside})


def test_family_table_gives_the_documented_frame_arithmetic():
    expected = {  # family: (samples per frame, frames/s, min samples, lookahead frames, frames in 1 s)
        "gemma4_audio": (640, 25.0, 640, 4, 25),
        "hubert": (320, 50.0, 400, None, 49),  # valid convolutions: (16000 - 400) // 320 + 1
        "wav2vec2": (320, 50.0, 400, None, 49),
        "whisper": (320, 50.0, 320, None, 50),
    }
    for family, (spf, rate, min_samples, lookahead, one_second) in expected.items():
        frames = encoder_frames(family)
        assert (frames.samples_per_frame, frames.frame_rate, frames.min_samples, frames.lookahead_frames) == (
            spf, rate, min_samples, lookahead), family
        assert frames.get_encoded_length(16000) == one_second
        lengths = torch.tensor([[0, 100, min_samples], [16000, 16001, 95 * 16000]])
        assert frames.get_encoded_length(lengths).tolist() == [
            [frames.get_encoded_length(int(n)) for n in row] for row in lengths
        ]
        assert frames.get_encoded_length(min_samples) >= 1 and frames.get_encoded_length(0) == 0
    # the encoder's own config wins: strides of a bundled wav2vec2, Gemma 4's per-layer right context
    custom = tiny_hubert_config(conv_kernel=(10, 3, 3), conv_stride=(5, 4, 2), conv_dim=(16,) * 3).to_dict()
    assert encoder_frames("hubert", encoder_config=custom).samples_per_frame == 40
    gemma = tiny_gemma4_audio_config(attention_context_right=2).to_dict()
    assert encoder_frames("gemma4_audio", encoder_config=gemma, num_layers=2).lookahead_frames == 4 + 2 * 2
    config = GemmaRVQConfig(encoder_config=gemma, dim=gemma["hidden_size"], encoder_layer=1)
    assert config.frames.lookahead_frames == 4 + 2 * 1  # only the layers that run


def test_config_json_errors_name_the_file_and_the_field(tmp_path):
    GemmaRVQConfig(encoder_family="hubert", encoder_name_or_path=None, dim=32).save_pretrained(tmp_path / "ok")
    good = json.loads((tmp_path / "ok" / "config.json").read_text())
    cases = {
        "ema_null": ({**good, "ema_decay": None}, "ema_decay"),
        "dim_text": ({**good, "dim": "32"}, "dim"),
        "family": ({**good, "encoder_family": "mimi"}, "encoder_family"),
        "overlap": ({**good, "chunk_overlap_seconds": 29.0}, "chunk_overlap_seconds"),
        "a_list": ([good], "JSON object"),
    }
    for name, (content, field) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(content))
        file = re.escape(str(folder / "config.json"))
        for load in (GemmaRVQConfig.from_pretrained, AutoConfig.from_pretrained):
            if name == "a_list" and load == AutoConfig.from_pretrained:
                # transformers itself refuses a list before it knows the model type, naming the folder
                with pytest.raises(ValueError, match=rf"{re.escape(str(folder))}(.|\n)*model_type"):
                    load(folder)
                continue
            with pytest.raises(ValueError, match=rf"^{file}: (.|\n)*{field}"):
                load(folder)
        with pytest.raises(ValueError, match=rf"^{file}: (.|\n)*{field}"):
            GemmaRVQConfig.from_json_file(folder / "config.json")


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
