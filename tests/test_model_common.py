"""GemmaRVQModel against the conventions transformers' common model tests check (ModelTesterMixin,
ConfigTester), in the style of those suites for the codec models (DAC, Encodec, Xcodec), plus the processor.

What the common tests would catch, tested here directly: `main_input_name` is forward's first argument;
`return_dict=False` (argument or config) gives tuples equal to the dict outputs; no bool tensor among the
outputs; hidden states / attentions of the wrapped encoder through `**kwargs`; `attn_implementation`
reaches the bundled encoder and eager matches sdpa; a feature extractor is saved with every checkpoint and
`encode` takes its output.
"""

from __future__ import annotations

import copy
import inspect
import json

import numpy as np
import pytest
import torch
from transformers import AutoFeatureExtractor, AutoModel, AutoProcessor

from gemma_rvq import GemmaRVQConfig, GemmaRVQModel
from gemma_rvq.testing import tiny_gemma4_audio_config, tiny_hubert_config, tiny_rvq_model

SR = 16000


def _hubert_config(**kwargs) -> GemmaRVQConfig:
    """A bundled tiny HuBERT (2 layers, LayerNorm feature encoder) under a Q=2, K=16 quantizer."""
    encoder = tiny_hubert_config(hidden_size=32, num_hidden_layers=2, feat_extract_norm="layer")
    return GemmaRVQConfig(encoder_family="hubert", encoder_name_or_path=None, encoder_config=encoder, dim=32,
                          num_quantizers=2, codebook_size=16, **kwargs)


def _audio(batch: int = 3, samples: int = 4000, seed: int = 0) -> torch.Tensor:
    return 0.2 * torch.randn(batch, samples, generator=torch.Generator().manual_seed(seed))


def _assert_same(tuple_output, dict_output) -> None:
    """Element-wise equality as the mixin's equivalence check does it (subtraction included)."""
    assert len(tuple_output) == len(dict_output)
    for a, b in zip(tuple_output, dict_output):
        if isinstance(a, (tuple, list)):
            _assert_same(a, b)
        else:
            assert a.dtype != torch.bool, "a bool tensor breaks transformers' output-equivalence check"
            assert float((a - b).detach().abs().max()) == 0.0


# ---------------------------------------------------------------------------------------------- class contract
def test_main_input_name_is_the_first_argument_of_forward():
    params = list(inspect.signature(GemmaRVQModel.forward).parameters)
    assert params[1] == GemmaRVQModel.main_input_name == "input_values"
    assert params[2] == "padding_mask"  # as Encodec / Mimi
    assert GemmaRVQModel.input_modalities == "audio"


def test_forward_runs_audio_embeddings_and_processor_output_to_the_same_loss():
    model = GemmaRVQModel(_hubert_config()).eval()
    audio = _audio()
    from_audio = model(audio, sampling_rate=SR)
    embeddings, mask = model.embed(audio, sampling_rate=SR)
    from_embeddings = model(embeddings=embeddings, attention_mask=mask)
    torch.testing.assert_close(from_audio.loss, from_embeddings.loss)
    assert torch.equal(from_audio.audio_codes, from_embeddings.audio_codes)
    assert from_audio.audio_codes.shape == (3, 2, model.get_encoded_length(4000))
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        model(audio, output_everything=True, sampling_rate=SR)


# ---------------------------------------------------------------------------------------------- return_dict
def test_return_dict_false_gives_tuples_from_the_argument_or_the_config():
    model = GemmaRVQModel(_hubert_config()).eval()
    audio = _audio()
    as_dict = model(audio, sampling_rate=SR)
    _assert_same(model(audio, return_dict=False, sampling_rate=SR), as_dict.to_tuple())
    encoded = model.encode(audio, sampling_rate=SR)
    decoded = model.decode(encoded.audio_codes, encoded.codes_mask)
    model.config.return_dict = False  # as DacModel: the config decides when the call does not
    as_tuple = model(audio, sampling_rate=SR)
    assert isinstance(as_tuple, tuple)
    _assert_same(as_tuple, as_dict.to_tuple())
    assert isinstance(model.encode(audio, sampling_rate=SR), tuple) and isinstance(model.decode(encoded.audio_codes), tuple)
    codes, codes_mask, embeddings = model.encode(audio, sampling_rate=SR)  # encode / decode keep BoolTensor masks
    assert torch.equal(codes, encoded.audio_codes) and torch.equal(codes_mask, encoded.codes_mask)
    torch.testing.assert_close(embeddings, encoded.embeddings)
    torch.testing.assert_close(model.decode(encoded.audio_codes, encoded.codes_mask)[0], decoded.embeddings)
    assert not isinstance(model(audio, return_dict=True, sampling_rate=SR), tuple)


@pytest.mark.parametrize("extra", [{}, {"output_hidden_states": True}, {"output_attentions": True},
                                   {"output_hidden_states": True, "output_attentions": True}])
def test_tuple_and_dict_outputs_are_equivalent(extra):
    model = GemmaRVQModel(_hubert_config(attn_implementation="eager")).eval()
    audio = _audio()
    with torch.no_grad():
        _assert_same(model(audio, return_dict=False, sampling_rate=SR, **extra),
                     model(audio, return_dict=True, sampling_rate=SR, **extra).to_tuple())
    out = model(audio, **extra, sampling_rate=SR)
    assert out.codes_mask.dtype == torch.long and out.codes_mask.sum() == out.codes_mask.numel()


# ---------------------------------------------------------------------------------------------- encoder outputs
def test_hidden_states_and_attentions_are_the_encoders():
    model = GemmaRVQModel(_hubert_config(attn_implementation="eager")).eval()
    audio = _audio()
    out = model(audio, output_hidden_states=True, output_attentions=True, sampling_rate=SR)
    frames = model.get_encoded_length(audio.shape[-1])
    assert len(out.hidden_states) == 1 + 2 and all(h.shape == (3, frames, 32) for h in out.hidden_states)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (3, 2, frames, frames)
    inputs, input_mask = model._encoder_adapter().features(list(audio.numpy()))
    with torch.no_grad():
        reference = model.encoder(inputs, attention_mask=input_mask, output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[-1], reference.hidden_states[-1])
    plain = model(audio, sampling_rate=SR)
    assert plain.hidden_states is None and plain.attentions is None
    model.config.output_hidden_states = True  # the config's default, as transformers models
    assert len(model(audio, sampling_rate=SR).hidden_states) == 3
    embeddings, mask = model.embed(audio, sampling_rate=SR)
    assert model(embeddings=embeddings, attention_mask=mask).hidden_states is None  # no encoder ran


@pytest.mark.parametrize("family", ["gemma4_audio", "hubert"])
def test_hidden_states_can_be_selected_by_index(family, make_speech):
    model = tiny_rvq_model(family)
    wave = torch.from_numpy(make_speech(0.6, SR, seed=3))[None]
    full = model(wave, output_hidden_states=True, sampling_rate=SR).hidden_states
    some = model(wave, output_hidden_states=[0, -1], sampling_rate=SR).hidden_states
    assert len(some) == len(full) and all(h is None for h in some[1:-1])
    torch.testing.assert_close(some[0], full[0])
    torch.testing.assert_close(some[-1], full[-1])


def test_encoder_outputs_need_one_window():
    model = tiny_rvq_model("hubert", max_chunk_seconds=1.0, chunk_overlap_seconds=0.2)
    with pytest.raises(ValueError, match="within one encoder window"):
        model(_audio(1, 2 * SR), output_hidden_states=True, sampling_rate=SR)


# ---------------------------------------------------------------------------------------------- attention
def test_attn_implementation_reaches_the_bundled_encoder(tmp_path):
    model = GemmaRVQModel(_hubert_config())
    assert model.config._attn_implementation == model.encoder.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    assert model.encoder.config._attn_implementation == "eager"
    model.save_pretrained(tmp_path)
    for implementation in ("eager", "sdpa"):
        loaded = AutoModel.from_pretrained(tmp_path, attn_implementation=implementation)
        assert loaded.encoder.config._attn_implementation == implementation


def test_gemma4_refuses_sdpa_and_defaults_to_eager(tmp_path):
    config = GemmaRVQConfig(encoder_config=tiny_gemma4_audio_config(), dim=64, num_quantizers=2, codebook_size=16)
    model = GemmaRVQModel(config)
    assert model.config._attn_implementation == model.encoder.config._attn_implementation == "eager"
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="gemma4_audio encoder does not support attn_implementation='sdpa'"):
        GemmaRVQModel.from_pretrained(tmp_path, attn_implementation="sdpa")


def test_eager_matches_sdpa(tmp_path):
    torch.manual_seed(0)
    GemmaRVQModel(_hubert_config()).save_pretrained(tmp_path)
    eager = GemmaRVQModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    sdpa = GemmaRVQModel.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    audio = _audio(7)
    mask = torch.ones(7, audio.shape[-1], dtype=torch.long)
    mask[-1, -800:] = 0  # right padding, as the feature extractor returns it
    for kwargs in ({}, {"attention_mask": mask}):
        a = eager(audio, output_hidden_states=True, **kwargs, sampling_rate=SR)
        b = sdpa(audio, output_hidden_states=True, **kwargs, sampling_rate=SR)
        torch.testing.assert_close(a.hidden_states[-1], b.hidden_states[-1], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- processor
@pytest.mark.parametrize("family", ["gemma4_audio", "hubert", "whisper"])
def test_every_checkpoint_carries_its_feature_extractor(family, tmp_path, make_speech):
    model = tiny_rvq_model(family)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["sampling_rate"] == model.sampling_rate == 16000
    feature_extractor = AutoFeatureExtractor.from_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(feature_extractor) is type(processor) is type(model.feature_extractor)
    waves = [make_speech(1.0, SR, seed=1), make_speech(0.45, SR, seed=2)]
    kwargs = {} if family == "whisper" else {"padding": True}  # Whisper pads to its 30 s window itself
    inputs = processor(waves, sampling_rate=SR, return_tensors="pt", **kwargs)
    from_processor = model.encode(**inputs)
    from_audio = model.encode(waves, sampling_rate=SR)
    assert torch.equal(from_processor.codes_mask, from_audio.codes_mask)
    assert torch.equal(from_processor.audio_codes, from_audio.audio_codes)


def test_processor_output_is_checked():
    whisper = tiny_rvq_model("whisper")
    features = whisper.feature_extractor([np.zeros(SR, np.float32)], sampling_rate=SR, return_tensors="pt")
    with pytest.raises(ValueError, match="need the feature extractor's attention_mask"):
        whisper.encode(input_features=features["input_features"])
    gemma = tiny_rvq_model("gemma4_audio")
    features = gemma.feature_extractor([np.zeros(SR, np.float32)], return_tensors="pt")
    with pytest.raises(ValueError, match=r"mask of input_features has shape \(1, 3\)"):
        gemma.encode(input_features=features["input_features"], input_features_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="not both"):
        gemma.encode(torch.zeros(1, SR), input_features=features["input_features"], sampling_rate=SR)
    hubert = tiny_rvq_model("hubert")
    with pytest.raises(ValueError, match="takes input_values"):
        hubert.encode(input_features=features["input_features"])


def test_push_to_hub_uploads_the_feature_extractor(tiny_gemma4_rvq, monkeypatch, tmp_path):
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoUrl

    uploaded: dict[str, bytes] = {}

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            with open(op.path_or_fileobj, "rb") as f:
                uploaded[op.path_in_repo] = f.read()

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: RepoUrl(f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    model = copy.deepcopy(tiny_gemma4_rvq)
    model.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="someone/tiny")
    assert json.loads(uploaded["preprocessor_config.json"])["feature_extractor_type"] == "Gemma4AudioFeatureExtractor"
    assert {"config.json", "model.safetensors"} <= set(uploaded)


# ---------------------------------------------------------------------------------------------- compile / export
def test_arithmetic_masks_give_the_eager_codes(tiny_hubert_rvq):
    """The masked path used under torch.compile / torch.export (no data-dependent shapes) gives the codes and
    reconstruction of the gather path, and NaN padding cannot leak into it."""
    model = tiny_hubert_rvq
    embeddings, mask = model.embed([_audio(1, 9000)[0].numpy(), _audio(1, 4100, seed=1)[0].numpy()], sampling_rate=SR)
    poisoned = embeddings.clone()
    poisoned[~mask] = float("nan")
    eager = model.quantize(embeddings, mask)
    traced = model._quantize_all_frames(poisoned, mask, None, reconstruct=True)
    assert torch.equal(traced.audio_codes, eager.audio_codes)
    torch.testing.assert_close(traced.quantized, eager.quantized)
    assert len(set(eager.audio_codes[0, 0].tolist())) > 1


class _Tokenize(torch.nn.Module):
    """quantize + decode from embeddings, as one module (what torch.export takes)."""

    def __init__(self, model: GemmaRVQModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor):
        out = self.model.quantize(embeddings, mask)
        decoded = self.model.decode(out.audio_codes, out.codes_mask)
        return out.audio_codes, out.quantized, decoded.embeddings


def _frames(batch: int, frames: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(batch, frames, 32, generator=generator)
    mask = torch.ones(batch, frames, dtype=torch.bool)
    mask[0, frames // 2 :] = False  # one padded row
    return embeddings, mask


def test_quantize_and_decode_export_with_dynamic_batch_and_length(tiny_hubert_rvq):
    from torch.export import Dim

    module = _Tokenize(tiny_hubert_rvq).eval()
    batch, frames = Dim("batch", min=1, max=1024), Dim("frames", min=2, max=1 << 16)
    exported = torch.export.export(module, _frames(2, 7, seed=0),
                                   dynamic_shapes=({0: batch, 1: frames}, {0: batch, 1: frames}))
    for shape, seed in (((1, 5), 1), ((3, 17), 2), ((5, 64), 3)):
        inputs = _frames(*shape, seed=seed)
        got, want = exported.module()(*inputs), module(*inputs)
        assert torch.equal(got[0], want[0])  # codes: identical to eager
        torch.testing.assert_close(got[1], want[1])
        torch.testing.assert_close(got[2], want[2])
    assert len(set(want[0][:, 0].flatten().tolist())) > 1


def test_quantize_compiles_with_fullgraph(tiny_hubert_rvq):
    module = _Tokenize(tiny_hubert_rvq).eval()
    compiled = torch.compile(module, fullgraph=True, dynamic=True, backend="eager")  # graph capture, no codegen
    for shape, seed in (((2, 9), 4), ((4, 13), 5)):
        inputs = _frames(*shape, seed=seed)
        got, want = compiled(*inputs), module(*inputs)
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[2], want[2])
