"""Importers (gemma_rvq.convert): seed ``rvq_*.pt`` checkpoints built with the real vector-quantize-pytorch
ResidualVQ, and SpireLM-style scikit-learn k-means models."""

from __future__ import annotations

import json

import joblib
import numpy as np
import pytest
import torch
from safetensors import safe_open
from sklearn.cluster import KMeans
from torch import nn

from gemma_rvq import GemmaRVQModel
from gemma_rvq.convert import (
    convert_main,
    convert_seed_state_dict,
    convert_spire_kmeans,
    load_any,
    load_seed_checkpoint,
    match_seed_layout,
    read_seed_checkpoint,
)

vqp = pytest.importorskip("vector_quantize_pytorch")

D, DC, Q, K = 24, 16, 3, 16


class SeedWrapper(nn.Module):
    """The seed's (inferred) wrapper: LayerNorm -> Linear -> ResidualVQ -> LayerNorm -> Linear."""

    def __init__(self, dim: int = D, rvq_dim: int = DC, q: int = Q, k: int = K) -> None:
        super().__init__()
        self.pre_norm = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, rvq_dim)
        self.rvq = vqp.ResidualVQ(dim=rvq_dim, num_quantizers=q, codebook_size=k, decay=0.8,
                                  kmeans_init=True, kmeans_iters=4)
        self.post_norm = nn.LayerNorm(rvq_dim)
        self.out_proj = nn.Linear(rvq_dim, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        quantized, indices, _ = self.rvq(self.in_proj(self.pre_norm(x)))
        return self.out_proj(self.post_norm(quantized)), indices  # [B, T, D], [B, T, Q]


def _perturb_and_train(module: nn.Module, forward, dim: int, steps: int = 4) -> None:
    """Non-trivial weights: random norms/projections, k-means init + a few EMA steps of the codebooks."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    module.train()
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        with torch.no_grad():
            forward(torch.randn(4, 50, dim, generator=gen) * 2 + 0.5)
    module.eval()


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory):
    """A seed-format folder: rvq_averaged.pt ({"rvq": state_dict}) + config_stage1.json + the wrapper."""
    wrapper = SeedWrapper()
    _perturb_and_train(wrapper, wrapper, D)
    folder = tmp_path_factory.mktemp("seed")
    torch.save({"rvq": wrapper.state_dict(), "epoch": 3}, folder / "rvq_averaged.pt")
    (folder / "config_stage1.json").write_text(json.dumps(
        {"rvq_dim": DC, "rvq_num_quantizers": Q, "rvq_codebook_size": K, "lr": 1e-3, "rotation_trick": True}))
    return folder, wrapper


def _embeddings(batch: int = 2, frames: int = 37, dim: int = D, seed: int = 5) -> torch.Tensor:
    return torch.randn(batch, frames, dim, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def _assert_same_as_wrapper(model: GemmaRVQModel, wrapper: nn.Module, dim: int = D) -> None:
    x = _embeddings(dim=dim)
    with torch.no_grad():
        ref_out, ref_idx = wrapper(x)
    out = model.quantize(x)
    assert torch.equal(out.audio_codes, ref_idx.permute(0, 2, 1))
    torch.testing.assert_close(out.quantized, ref_out, atol=1e-5, rtol=1e-5)


def test_seed_checkpoint_reproduces_wrapper(seed_dir, capsys):
    folder, wrapper = seed_dir
    # the codebooks moved away from their k-means init: a real test of the mapping
    sd = wrapper.state_dict()
    assert all(bool(sd[f"rvq.layers.{i}._codebook.initted"]) for i in range(Q))
    model = load_seed_checkpoint(folder, encoder="rnagabh/gemma4-audio-encoder")
    printed = capsys.readouterr().out
    assert "in_norm='pre_norm'" in printed and "out_proj='out_proj'" in printed
    assert "rvq.layers.0._codebook.embed_avg" in printed and "ignored" in printed

    cfg = model.config
    assert (cfg.dim, cfg.codebook_dim, cfg.num_quantizers, cfg.codebook_size) == (D, DC, Q, K)
    assert cfg.use_projection and cfg.encoder_family == "gemma4_audio"
    assert cfg.encoder_name_or_path == "rnagabh/gemma4-audio-encoder" and cfg.encoder_config is None
    _assert_same_as_wrapper(model, wrapper)

    # EMA statistics: cluster sizes carried over, embed_sum consistent with the codebooks
    qz = model.quantizer
    expected_cs = torch.stack([sd[f"rvq.layers.{i}._codebook.cluster_size"].reshape(K) for i in range(Q)])
    torch.testing.assert_close(qz.cluster_size, expected_cs)
    smoothed = qz._smoothed_cluster_size(qz.cluster_size).unsqueeze(-1)
    torch.testing.assert_close(qz.embed_sum / smoothed, qz.codebooks, atol=1e-6, rtol=1e-5)


def test_seed_roundtrip_save_pretrained(seed_dir, tmp_path):
    folder, wrapper = seed_dir
    out = tmp_path / "converted"
    assert convert_main([str(folder), str(out)]) == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any(k.startswith("encoder.") for k in keys)  # quantizer-only checkpoint
    assert {"in_norm.weight", "in_proj.weight", "quantizer.codebooks", "out_proj.bias"} <= keys
    assert json.loads((out / "config.json").read_text())["model_type"] == "gemma_rvq"
    reloaded = load_any(out)
    assert isinstance(reloaded, GemmaRVQModel)
    _assert_same_as_wrapper(reloaded, wrapper)
    # the same function also takes the seed folder, a .pt file, and a model
    _assert_same_as_wrapper(load_any(folder), wrapper)
    _assert_same_as_wrapper(load_any(folder / "rvq_averaged.pt"), wrapper)
    assert load_any(reloaded) is reloaded


def test_sequential_layout_same_dims():
    """nn.Sequential naming (0., 1., 2.layers..., 3., 4.) with D == Dc: sides proven by the indices."""
    torch.manual_seed(3)
    rvq = vqp.ResidualVQ(dim=20, num_quantizers=2, codebook_size=8, decay=0.8, kmeans_init=True, kmeans_iters=3)
    seq = nn.Sequential(nn.LayerNorm(20), nn.Linear(20, 20), rvq, nn.LayerNorm(20), nn.Linear(20, 20))

    class Wrap(nn.Module):
        def forward(self, x):
            h = seq[1](seq[0](x))
            q, idx, _ = seq[2](h)
            return seq[4](seq[3](q)), idx

    wrap = Wrap()
    wrap.seq = seq
    _perturb_and_train(seq, wrap, 20)
    layout = match_seed_layout(seq.state_dict())
    assert layout.modules == {"in_norm": "0", "in_proj": "1", "out_norm": "3", "out_proj": "4"}
    assert layout.how == "sequential indices" and layout.rvq_prefix == "2."
    model = convert_seed_state_dict(seq.state_dict(), verbose=False)
    _assert_same_as_wrapper(model, wrap, dim=20)


def test_bare_residual_vq():
    rvq = vqp.ResidualVQ(dim=12, num_quantizers=2, codebook_size=8, decay=0.8, kmeans_init=True, kmeans_iters=3)
    _perturb_and_train(rvq, rvq, 12)
    model = convert_seed_state_dict(rvq.state_dict(), encoder=None, verbose=False)
    assert not model.config.use_projection
    x = _embeddings(dim=12)
    with torch.no_grad():
        ref, idx, _ = rvq(x)
    out = model.quantize(x)
    assert torch.equal(out.audio_codes, idx.permute(0, 2, 1))
    torch.testing.assert_close(out.quantized, ref, atol=1e-5, rtol=1e-5)


def test_refuses_unknown_layout_with_key_listing(seed_dir):
    _, wrapper = seed_dir
    sd = dict(wrapper.state_dict())
    sd["extra.conv.weight"] = torch.zeros(4, 3, 3)
    with pytest.raises(ValueError, match="unrecognised seed checkpoint layout") as err:
        convert_seed_state_dict(sd, verbose=False)
    msg = str(err.value)
    assert "extra.conv.weight: [4, 3, 3]" in msg and "pre_norm.weight: [24]" in msg
    assert f"rvq.layers.0._codebook.embed: [1, {K}, {DC}]" in msg

    with pytest.raises(ValueError, match="no ResidualVQ codebook keys"):
        match_seed_layout({"weight": torch.zeros(3, 3), "bias": torch.zeros(3)})
    unknown_codebook = dict(wrapper.state_dict())
    unknown_codebook["rvq.layers.1._codebook.batch_mean"] = torch.zeros(1, DC)
    with pytest.raises(ValueError, match="unknown codebook tensors at level 1"):
        match_seed_layout(unknown_codebook)
    rms = {k: v for k, v in wrapper.state_dict().items() if k != "post_norm.bias"}
    with pytest.raises(ValueError, match="RMSNorm"):
        match_seed_layout(rms)


def test_ambiguous_names_refused_then_explicit_prefixes(seed_dir):
    _, wrapper = seed_dir
    rename = {"pre_norm": "norm_a", "in_proj": "lin_a", "post_norm": "norm_b", "out_proj": "lin_b"}
    sd = {}
    for key, value in wrapper.state_dict().items():
        module, _, param = key.partition(".")
        sd[f"{rename.get(module, module)}.{param}"] = value
    with pytest.raises(ValueError, match="cannot tell whether"):
        match_seed_layout(sd)
    # one side named, the other not: decided by elimination
    half = {k.replace("norm_b", "out_norm").replace("lin_b", "out_proj"): v for k, v in sd.items()}
    layout = match_seed_layout(half)
    assert layout.modules == {"in_norm": "norm_a", "in_proj": "lin_a", "out_norm": "out_norm",
                              "out_proj": "out_proj"}
    assert "elimination" in layout.how
    prefixes = {"in_norm": "norm_a", "in_proj": "lin_a", "out_norm": "norm_b", "out_proj": "lin_b"}
    model = convert_seed_state_dict(sd, prefixes=prefixes, verbose=False)
    _assert_same_as_wrapper(model, wrapper)
    with pytest.raises(ValueError, match="is not a norm module"):
        match_seed_layout(sd, prefixes={**prefixes, "in_norm": "lin_a"})


def test_refuses_config_mismatch_and_unsupported_options(seed_dir):
    _, wrapper = seed_dir
    sd = wrapper.state_dict()
    with pytest.raises(ValueError, match="rvq_num_quantizers"):
        convert_seed_state_dict(sd, config_stage1={"rvq_num_quantizers": Q + 1}, verbose=False)
    with pytest.raises(ValueError, match="use_cosine_sim"):
        convert_seed_state_dict(sd, config_stage1={"use_cosine_sim": True}, verbose=False)
    with pytest.raises(ValueError, match="eval_beam_size"):
        convert_seed_state_dict(sd, config_stage1={"eval_beam_size": 4}, verbose=False)
    not_init = dict(sd)
    not_init["rvq.layers.2._codebook.initted"] = torch.tensor(False)
    with pytest.raises(ValueError, match="level 2 was never initialised"):
        convert_seed_state_dict(not_init, verbose=False)
    nan = dict(sd)
    nan["in_proj.weight"] = sd["in_proj.weight"].clone().fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        convert_seed_state_dict(nan, verbose=False)


class _NotAllowed:
    """An arbitrary pickled object: torch.load(weights_only=True) must refuse it."""


def test_read_seed_checkpoint_is_weights_only(tmp_path):
    torch.save({"rvq": {"x": torch.zeros(1)}, "obj": _NotAllowed()}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        read_seed_checkpoint(tmp_path / "bad.pt")
    torch.save({"rvq": [1, 2]}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="no state dict found"):
        read_seed_checkpoint(tmp_path / "odd.pt")
    torch.save({"layers.0._codebook.embed": torch.zeros(1, 4, 2)}, tmp_path / "plain.pt")
    sd, other = read_seed_checkpoint(tmp_path / "plain.pt")
    assert list(sd) == ["layers.0._codebook.embed"] and other == []


@pytest.fixture(scope="module")
def kmeans_data():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(12, 16)) * 3
    train = (centers[rng.integers(0, 12, 600)] + rng.normal(size=(600, 16))).astype(np.float32)
    test = (centers[rng.integers(0, 12, 300)] + 1.5 * rng.normal(size=(300, 16))).astype(np.float32)
    km = KMeans(n_clusters=12, n_init=1, random_state=0).fit(train)
    return km, test


def test_spire_kmeans_codes_equal_predict(kmeans_data, tmp_path):
    km, feats = kmeans_data
    expected = km.predict(feats)
    model = convert_spire_kmeans(km, verbose=False)
    cfg = model.config
    assert (cfg.num_quantizers, cfg.codebook_size, cfg.dim, cfg.use_projection) == (1, 12, 16, False)
    assert (cfg.encoder_family, cfg.encoder_layer, cfg.encoder_name_or_path) == \
        ("hubert", 22, "facebook/hubert-large-ll60k")
    codes = model.quantize(torch.from_numpy(feats)[None]).audio_codes  # [1, 1, T]
    assert np.array_equal(codes[0, 0].numpy(), expected)

    np.save(tmp_path / "centers.npy", km.cluster_centers_)
    from_npy = load_any(tmp_path / "centers.npy")
    assert np.array_equal(from_npy.quantize(torch.from_numpy(feats)[None]).audio_codes[0, 0].numpy(), expected)

    joblib.dump(km, tmp_path / "kmeans_model")
    with pytest.raises(ValueError, match="arbitrary code"):
        convert_spire_kmeans(tmp_path / "kmeans_model")
    trusted = convert_spire_kmeans(tmp_path / "kmeans_model", allow_pickle=True, layer=6, verbose=False)
    assert trusted.config.encoder_layer == 6
    torch.testing.assert_close(trusted.quantizer.codebooks[0], model.quantizer.codebooks[0])

    with pytest.raises(ValueError, match=r"\[K >= 2, D\]"):
        convert_spire_kmeans(np.zeros(5), verbose=False)


def test_spire_cli(kmeans_data, tmp_path, capsys):
    km, feats = kmeans_data
    np.save(tmp_path / "c.npy", km.cluster_centers_.astype(np.float32))
    assert convert_main([str(tmp_path / "c.npy"), str(tmp_path / "out")]) == 0
    assert "reload verified" in capsys.readouterr().out
    model = load_any(tmp_path / "out")
    codes = model.quantize(torch.from_numpy(feats)[None]).audio_codes[0, 0].numpy()
    assert np.array_equal(codes, km.predict(feats))


def test_load_any_rejects_unknown(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not a gemma-rvq checkpoint"):
        load_any(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"notes\.txt"):
        load_any(empty)
    with pytest.raises(ValueError, match=r"has no .rvq_best\.pt."):
        load_seed_checkpoint(empty, "rvq_best.pt")


def _fake_hub_cache(root, repo_id: str, files: dict, missing: tuple[str, ...] = ()) -> None:
    """The huggingface_hub cache layout (refs/main -> snapshots/<sha>/...), as a past download leaves it."""
    import shutil

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    (repo / "snapshots" / sha).mkdir(parents=True)
    for name, src in files.items():
        shutil.copy(src, repo / "snapshots" / sha / name)
    (repo / ".no_exist" / sha).mkdir(parents=True)
    for name in missing:
        (repo / ".no_exist" / sha / name).touch()


def test_hub_repo_ids_resolve_through_the_offline_cache(seed_dir, tmp_path, monkeypatch):
    """The Hub code path (hf_hub_download) for the seed repo, served from a populated offline cache."""
    import huggingface_hub.constants as hub_constants

    folder, wrapper = seed_dir
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    seed_files = {"rvq_averaged.pt": folder / "rvq_averaged.pt", "config_stage1.json": folder / "config_stage1.json"}
    _fake_hub_cache(tmp_path / "hub", "ik/speechless-twi-stage1-rvq-gemma4", seed_files)
    _assert_same_as_wrapper(load_seed_checkpoint(verbose=False), wrapper)  # default repo id
    _assert_same_as_wrapper(load_any("ik/speechless-twi-stage1-rvq-gemma4"), wrapper)
    with pytest.raises(OSError):  # offline and not cached: the download error, not "not a checkpoint"
        load_any("someone/not-cached")
