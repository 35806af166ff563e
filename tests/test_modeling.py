"""GemmaRVQModel: encode / quantize / decode / forward, validation, checkpoints (bundled and lazy encoder)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel

from gemma_rvq import GemmaRVQConfig, GemmaRVQModel
from gemma_rvq.audio import resample
from gemma_rvq.quantization import ResidualQuantizer
from gemma_rvq.testing import tiny_rvq_model

SR = 16000


def _safetensors_keys(path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


# ---------------------------------------------------------------------------------------------- structure
def test_submodules_and_state_dict_keys_follow_the_contract(tiny_gemma4_rvq):
    model = tiny_gemma4_rvq
    assert isinstance(model.in_norm, torch.nn.LayerNorm) and isinstance(model.in_proj, torch.nn.Linear)
    assert isinstance(model.out_norm, torch.nn.LayerNorm) and isinstance(model.out_proj, torch.nn.Linear)
    assert isinstance(model.quantizer, ResidualQuantizer)
    prefixes = {k.split(".")[0] for k in model.state_dict()}
    assert prefixes == {"in_norm", "in_proj", "quantizer", "out_norm", "out_proj", "encoder"}
    assert model.quantizer.codebooks.shape == (2, 16, 64)
    assert model.sampling_rate == 16000 and model.frame_rate == 25


def test_no_projection_uses_identities():
    model = tiny_rvq_model("hubert", use_projection=False)
    assert isinstance(model.in_proj, torch.nn.Identity) and isinstance(model.out_norm, torch.nn.Identity)
    x = torch.randn(2, 5, 32)
    assert torch.equal(model.project_in(x), x) and torch.equal(model.project_out(x), x)


# ---------------------------------------------------------------------------------------------- encode
def test_encode_outputs_and_padding(tiny_gemma4_rvq, make_speech):
    waves = [make_speech(1.0, SR, seed=1), make_speech(2.0, SR, seed=2)]
    out = tiny_gemma4_rvq.encode(waves, sampling_rate=SR)
    assert out.audio_codes.dtype == torch.long and out.codes_mask.dtype == torch.bool
    assert out.audio_codes.shape == (2, 2, 50) and out.codes_mask.shape == (2, 50)
    assert out.embeddings.shape == (2, 50, 64)
    assert out.codes_mask.sum(-1).tolist() == [25, 50]
    assert (out.audio_codes[0, :, 25:] == 0).all()  # padded frames: 0, masked out
    assert int(out.audio_codes.max()) < 16 and int(out.audio_codes.min()) >= 0
    first = tiny_gemma4_rvq.encode(waves, num_quantizers=1, sampling_rate=SR)
    assert first.audio_codes.shape == (2, 1, 50)
    assert torch.equal(first.audio_codes[:, 0], out.audio_codes[:, 0])
    codes, mask, emb = tiny_gemma4_rvq.encode(waves, return_dict=False, sampling_rate=SR)
    assert torch.equal(codes, out.audio_codes) and torch.equal(mask, out.codes_mask) and emb.shape[-1] == 64


def test_frame_arithmetic_on_the_model(tiny_gemma4_rvq, make_speech):
    waves = [make_speech(1.0, SR, seed=1), make_speech(0.37, SR, seed=2)]
    padded = torch.zeros(2, len(waves[0]))
    padded[0], padded[1, : len(waves[1])] = torch.from_numpy(waves[0]), torch.from_numpy(waves[1])
    padding_mask = torch.arange(padded.shape[1])[None] < torch.tensor([[len(waves[0])], [len(waves[1])]])
    out = tiny_gemma4_rvq.encode(padded, padding_mask, sampling_rate=SR)
    assert torch.equal(tiny_gemma4_rvq.get_audio_codes_mask(padding_mask), out.codes_mask)
    assert tiny_gemma4_rvq.get_encoded_length(len(waves[1])) == int(out.codes_mask[1].sum())
    assert tiny_gemma4_rvq.frame_rate == tiny_gemma4_rvq.config.frame_rate == 25


def test_encode_from_precomputed_embeddings_equals_audio_path(tiny_gemma4_rvq, make_speech):
    waves = [make_speech(1.3, SR, seed=3), make_speech(0.6, SR, seed=4)]
    emb, mask = tiny_gemma4_rvq.embed(waves, sampling_rate=SR)
    from_audio = tiny_gemma4_rvq.encode(waves, sampling_rate=SR)
    from_emb = tiny_gemma4_rvq.encode(embeddings=emb, embeddings_mask=mask)
    assert torch.equal(from_audio.audio_codes, from_emb.audio_codes)
    with pytest.raises(ValueError, match="exactly one"):
        tiny_gemma4_rvq.encode(waves, embeddings=emb, sampling_rate=SR)
    with pytest.raises(ValueError, match="exactly one"):
        tiny_gemma4_rvq.encode()


def test_sampling_rate_and_int_pcm_inputs(tiny_gemma4_rvq, speech_22k):
    wave, sr = speech_22k
    at_16k = resample(wave, sr, SR)
    reference = tiny_gemma4_rvq.encode([at_16k], sampling_rate=SR)
    resampled = tiny_gemma4_rvq.encode([wave], sampling_rate=sr)
    assert torch.equal(resampled.audio_codes, reference.audio_codes)
    pcm = np.round(np.stack([at_16k, at_16k], axis=1) * 32767).astype(np.int16)  # [S, 2] int16 stereo
    from_pcm = tiny_gemma4_rvq.encode([pcm], sampling_rate=SR)
    agree = (from_pcm.audio_codes[0, 0] == reference.audio_codes[0, 0]).float().mean()
    assert agree > 0.9  # int16 quantization only moves near-ties


def test_padded_frames_never_reach_the_quantizer(tiny_gemma4_rvq):
    torch.manual_seed(0)
    emb = torch.randn(2, 7, 64)
    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4])
    poisoned = emb.clone()
    poisoned[1, 3:] = float("nan")  # would raise (or give garbage codes) if padded frames were quantized
    out = tiny_gemma4_rvq.quantize(poisoned, mask)
    clean = tiny_gemma4_rvq.quantize(emb[1:, :3])
    assert torch.equal(out.audio_codes[1, :, :3], clean.audio_codes[0])
    assert (out.audio_codes[1, :, 3:] == 0).all() and (out.quantized[1, 3:] == 0).all()
    with pytest.raises(ValueError, match="NaN"):
        tiny_gemma4_rvq.quantize(poisoned)


def test_quantize_reconstruction_and_decode_agree(tiny_gemma4_rvq, make_speech):
    emb, mask = tiny_gemma4_rvq.embed([make_speech(1.0, SR, seed=5), make_speech(0.5, SR, seed=6)], sampling_rate=SR)
    q = tiny_gemma4_rvq.quantize(emb, mask)
    dec = tiny_gemma4_rvq.decode(q.audio_codes, q.codes_mask)
    torch.testing.assert_close(dec.embeddings, q.quantized)
    assert (dec.embeddings[~mask] == 0).all()
    # decode = out-projection of the sum of the selected codes
    codes = q.audio_codes[0, :, :3]  # [Q, 3]
    cb = tiny_gemma4_rvq.quantizer.codebooks
    manual = tiny_gemma4_rvq.project_out(cb[0][codes[0]] + cb[1][codes[1]])
    torch.testing.assert_close(dec.embeddings[0, :3], manual)
    # first level only
    one = tiny_gemma4_rvq.decode(q.audio_codes, q.codes_mask, num_quantizers=1)
    torch.testing.assert_close(one.embeddings[0, :3], tiny_gemma4_rvq.project_out(cb[0][codes[0]]))
    # residual levels improve the reconstruction
    err2 = (dec.embeddings[mask] - emb[mask]).square().mean()
    err1 = (one.embeddings[mask] - emb[mask]).square().mean()
    assert err2 < err1


@pytest.mark.parametrize(
    ("codes", "mask", "kwargs", "match"),
    [
        (torch.full((1, 2, 4), 16), None, {}, r"\[0, 16\)"),
        (torch.full((1, 2, 4), -1), None, {}, r"\[0, 16\)"),
        (torch.zeros(2, 4, dtype=torch.long), None, {}, r"\[B, Q, T\]"),
        (torch.zeros(1, 3, 4, dtype=torch.long), None, {}, "3 levels"),
        (torch.zeros(1, 2, 4), None, {}, "integer"),
        (torch.zeros(1, 2, 4, dtype=torch.long), torch.ones(1, 5, dtype=torch.bool), {}, "codes_mask shape"),
        (torch.zeros(1, 2, 4, dtype=torch.long), None, {"num_quantizers": 3}, "num_quantizers"),
    ],
)
def test_decode_rejects_bad_codes(tiny_gemma4_rvq, codes, mask, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_gemma4_rvq.decode(codes, mask, **kwargs)


def test_out_of_range_codes_on_padded_frames_are_ignored(tiny_gemma4_rvq):
    codes = torch.tensor([[[1, 2, 999], [3, 4, -5]]])
    mask = torch.tensor([[True, True, False]])
    out = tiny_gemma4_rvq.decode(codes, mask)
    assert out.embeddings.shape == (1, 3, 64) and (out.embeddings[0, 2] == 0).all()


@pytest.mark.parametrize(
    ("emb", "mask", "match"),
    [
        (torch.randn(1, 4, 32), None, "dimension 32"),
        (torch.randn(4), None, r"\[B, T, D\]"),
        (torch.zeros(1, 4, 64, dtype=torch.long), None, "floating-point"),
        (torch.randn(1, 4, 64), torch.ones(1, 5, dtype=torch.bool), "mask shape"),
    ],
)
def test_quantize_rejects_bad_embeddings(tiny_gemma4_rvq, emb, mask, match):
    with pytest.raises(ValueError, match=match):
        tiny_gemma4_rvq.quantize(emb, mask)


def test_embed_rejects_bad_inputs(tiny_gemma4_rvq):
    with pytest.raises(ValueError, match="input 0: the audio contains 1 NaN"):
        tiny_gemma4_rvq.embed([np.array([0.0] * 4000 + [np.nan], dtype=np.float32)], sampling_rate=SR)
    with pytest.raises(ValueError, match="empty list"):
        tiny_gemma4_rvq.embed([], sampling_rate=SR)
    with pytest.raises(ValueError, match="padding_mask shape"):
        tiny_gemma4_rvq.embed(torch.zeros(2, 4000), torch.ones(2, 10, dtype=torch.bool), sampling_rate=SR)
    with pytest.raises(ValueError, match="only meaningful"):
        tiny_gemma4_rvq.embed([np.zeros(4000, np.float32)], torch.ones(1, 4000, dtype=torch.bool), sampling_rate=SR)
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        tiny_gemma4_rvq.embed(torch.zeros(1, 2, 4000), sampling_rate=SR)
    with pytest.raises(ValueError, match="input 0: the audio is empty"):
        tiny_gemma4_rvq.embed([np.zeros(0, np.float32)], sampling_rate=SR)


def test_model_without_encoder_explains_itself():
    model = GemmaRVQModel(GemmaRVQConfig(encoder_name_or_path=None, dim=16, num_quantizers=2, codebook_size=8))
    with pytest.raises(ValueError, match="no encoder"):
        model.encode([np.zeros(16000, np.float32)], sampling_rate=SR)
    out = model.encode(embeddings=torch.randn(1, 5, 16))  # precomputed embeddings still work
    assert out.audio_codes.shape == (1, 2, 5)


# ---------------------------------------------------------------------------------------------- forward
def test_forward_loss_gradients_and_ema_update(tiny_gemma4_rvq):
    model = copy.deepcopy(tiny_gemma4_rvq).train()
    assert not model.encoder.training  # the encoder stays frozen in eval mode
    torch.manual_seed(1)
    emb = torch.randn(3, 6, 64)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[2, 4:] = False
    before = model.quantizer.codebooks.clone()
    out = model(embeddings=emb, attention_mask=mask)
    cfg = model.config
    expected = (cfg.mse_weight * out.mse_loss + cfg.cosine_weight * out.cosine_loss
                + cfg.commitment_weight * out.commitment_loss + out.codebook_loss)
    torch.testing.assert_close(out.loss, expected)
    x, recon = emb[mask], out.quantized[mask]
    torch.testing.assert_close(out.mse_loss, torch.nn.functional.mse_loss(recon, x))
    torch.testing.assert_close(out.cosine_loss, (1 - torch.nn.functional.cosine_similarity(recon, x, dim=-1)).mean())
    assert out.audio_codes.shape == (3, 2, 6) and (out.quantized[2, 4:] == 0).all()
    out.loss.backward()
    assert model.in_proj.weight.grad is not None and model.in_proj.weight.grad.abs().sum() > 0
    assert model.out_proj.weight.grad is not None
    assert all(p.grad is None for p in model.encoder.parameters())
    assert not torch.equal(model.quantizer.codebooks, before)  # EMA update in training mode
    # flat [N, D] input: one sequence of N frames
    flat = model(embeddings=emb[mask])
    assert flat.audio_codes.shape == (1, 2, int(mask.sum()))
    with pytest.raises(ValueError, match="no valid frames"):
        model(embeddings=emb, attention_mask=torch.zeros(3, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="pass them as embeddings="):
        model(emb)  # the first argument is audio, as for the codec models


def test_learnable_codebooks_are_parameters_with_codebook_loss(tmp_path):
    model = tiny_rvq_model("hubert", codebook_type="learnable").train()
    assert isinstance(model.quantizer.codebooks, torch.nn.Parameter)
    out = model(embeddings=torch.randn(2, 5, 32))
    assert out.codebook_loss > 0
    out.loss.backward()
    assert model.quantizer.codebooks.grad is not None
    model.save_pretrained(tmp_path)
    assert _safetensors_keys(tmp_path)["quantizer.codebooks"] == (2, 16, 32)
    loaded = GemmaRVQModel.from_pretrained(tmp_path)
    assert isinstance(loaded.quantizer.codebooks, torch.nn.Parameter)
    torch.testing.assert_close(loaded.quantizer.codebooks, model.quantizer.codebooks)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_bundled_checkpoint_roundtrip(tiny_gemma4_rvq, make_speech, tmp_path):
    wave = make_speech(1.5, SR, seed=12)
    reference = tiny_gemma4_rvq.encode([wave], sampling_rate=SR)
    tiny_gemma4_rvq.save_pretrained(tmp_path)
    keys = _safetensors_keys(tmp_path)
    assert keys["quantizer.codebooks"] == (2, 16, 64)
    assert keys["quantizer.cluster_size"] == (2, 16) and keys["quantizer.embed_sum"] == (2, 16, 64)
    assert any(k.startswith("encoder.") for k in keys)
    assert {"in_norm.weight", "in_proj.weight", "out_norm.weight", "out_proj.weight"} <= set(keys)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, GemmaRVQModel) and not loaded.training
    torch.testing.assert_close(loaded.quantizer.codebooks, tiny_gemma4_rvq.quantizer.codebooks)
    assert all(not p.requires_grad for p in loaded.encoder.parameters())
    assert torch.equal(loaded.encode([wave], sampling_rate=SR).audio_codes, reference.audio_codes)
    # meta-device construction: every parameter and buffer comes back exactly as saved
    original = tiny_gemma4_rvq.state_dict()
    restored = loaded.state_dict()
    assert set(restored) == set(original)
    for name, tensor in restored.items():
        assert tensor.device.type == "cpu" and torch.equal(tensor, original[name]), name


def test_quantizer_only_checkpoint_with_lazily_loaded_encoder(make_speech, tmp_path):
    encoder_dir, rvq_dir = tmp_path / "encoder", tmp_path / "rvq"
    lazy = tiny_rvq_model("hubert", bundle_encoder=False, encoder_path=encoder_dir, encoder_layer=2,
                          encoder_kwargs={"feat_extract_norm": "layer"})
    assert lazy._lazy_encoder is None and lazy.encoder is None
    lazy.save_pretrained(rvq_dir)
    keys = _safetensors_keys(rvq_dir)
    assert not any(k.startswith("encoder") for k in keys)
    config = json.loads((rvq_dir / "config.json").read_text())
    assert config["encoder_name_or_path"] == str(encoder_dir) and config.get("encoder_config") is None

    loaded = GemmaRVQModel.from_pretrained(rvq_dir)
    assert loaded._lazy_encoder is None  # from_pretrained does not touch the encoder
    wave = make_speech(2.0, SR, seed=13)
    out = loaded.encode([wave], sampling_rate=SR)
    assert type(loaded._lazy_encoder).__name__ == "HubertModel"
    assert len(loaded._lazy_encoder.encoder.layers) == 2
    assert all(not p.requires_grad for p in loaded._lazy_encoder.parameters())
    assert not any("encoder" in k for k in loaded.state_dict())  # still quantizer-only
    loaded.save_pretrained(tmp_path / "again")
    assert set(_safetensors_keys(tmp_path / "again")) == set(keys)

    # The same encoder weights bundled give the same codes.
    bundled = copy.deepcopy(loaded)
    bundled.bundle_encoder()
    assert bundled.config.encoder_config["model_type"] == "hubert"
    bundled.save_pretrained(tmp_path / "bundled")
    assert any(k.startswith("encoder.") for k in _safetensors_keys(tmp_path / "bundled"))
    reloaded = GemmaRVQModel.from_pretrained(tmp_path / "bundled")
    assert reloaded.encoder is not None and torch.equal(reloaded.encode([wave], sampling_rate=SR).audio_codes, out.audio_codes)


def test_lazy_whisper_encoder_from_a_full_whisper_checkpoint(make_speech, tmp_path):
    from transformers import WhisperFeatureExtractor, WhisperModel

    from gemma_rvq.testing import tiny_whisper_config

    torch.manual_seed(0)
    whisper = WhisperModel(tiny_whisper_config()).eval()
    whisper.save_pretrained(tmp_path)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(tmp_path)
    model = GemmaRVQModel(GemmaRVQConfig(encoder_family="whisper", encoder_name_or_path=str(tmp_path), dim=32,
                                         num_quantizers=2, codebook_size=8))
    wave = make_speech(1.0, SR, seed=14)
    emb, mask = model.embed([wave], sampling_rate=SR)
    assert type(model._lazy_encoder).__name__ == "WhisperEncoder" and emb.shape == (1, 50, 32) and mask.all()
    feats = WhisperFeatureExtractor(feature_size=80)(wave, sampling_rate=SR, return_tensors="pt")
    with torch.no_grad():
        expected = whisper.encoder(feats["input_features"]).last_hidden_state[:, :50]
    torch.testing.assert_close(emb, expected)


def test_lazy_encoder_with_wrong_hidden_size_is_rejected(tmp_path):
    model = tiny_rvq_model("hubert", bundle_encoder=False, encoder_path=tmp_path / "enc")
    model.config.dim = 48  # does not match the saved 32-d encoder
    model._adapter = None
    with pytest.raises(ValueError, match="hidden size 32"):
        model.embed([np.zeros(16000, np.float32)])


def test_push_to_hub_uploads_the_checkpoint_and_remote_code(tiny_gemma4_rvq, monkeypatch):
    """push_to_hub through transformers' mixin; only the two network calls of HfApi are replaced."""
    import huggingface_hub
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoUrl

    uploaded: dict[str, bytes] = {}

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            with open(op.path_or_fileobj, "rb") as f:
                uploaded[op.path_in_repo] = f.read()
        return None

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # model card: local template
    tiny_gemma4_rvq.push_to_hub("someone/tiny-gemma-rvq")
    expected = {"config.json", "model.safetensors", "configuration_gemma_rvq.py", "modeling_gemma_rvq.py",
                "encoders.py", "audio.py", "quantization.py", "README.md"}
    assert expected <= set(uploaded)
    config = json.loads(uploaded["config.json"])
    assert config["auto_map"] == {"AutoConfig": "configuration_gemma_rvq.GemmaRVQConfig",
                                  "AutoModel": "modeling_gemma_rvq.GemmaRVQModel"}
    assert b"quantizer.codebooks" in uploaded["model.safetensors"][:20000]
