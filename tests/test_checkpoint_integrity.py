"""Damaged gemma-rvq checkpoints are refused with the reason, through every loader (issue: integrity).

Each case builds a real checkpoint with `save_pretrained`, damages it with safetensors (or by editing
config.json) and loads it through `GemmaRVQModel.from_pretrained`, `AutoModel.from_pretrained`,
`gemma_rvq.convert.load_any` and the `gemma-rvq` command.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from gemma_rvq import GemmaRVQModel
from gemma_rvq.cli import main
from gemma_rvq.convert import load_any
from gemma_rvq.testing import tiny_rvq_model

REPO = Path(__file__).resolve().parents[1]
CLIP = sorted((REPO / "data" / "corpus" / "clips").glob("*.flac"))[0]
LOADERS = {
    "from_pretrained": GemmaRVQModel.from_pretrained,
    "AutoModel": AutoModel.from_pretrained,
    "load_any": load_any,
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A bundled tiny HuBERT gemma-rvq checkpoint (projections, EMA codebooks, encoder weights)."""
    folder = tmp_path_factory.mktemp("intact")
    tiny_rvq_model("hubert", num_quantizers=2, codebook_size=16, seed=0).save_pretrained(folder)
    return folder


def _damaged(saved: Path, tmp_path: Path, *, tensors=None, config=None) -> Path:
    """A copy of ``saved`` with its tensors passed through ``tensors(dict)`` and its config through ``config``."""
    folder = tmp_path / "damaged"
    shutil.copytree(saved, folder)
    if tensors is not None:
        state = load_file(folder / "model.safetensors")
        tensors(state)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        content = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config(content)))
    return folder


def _assert_refused(folder: Path, match: str, capsys) -> None:
    for name, load in LOADERS.items():
        with pytest.raises(ValueError, match=match):
            load(str(folder))
        assert name  # (named in the parametrisation report when it fails)
    assert main(["tokenize", str(CLIP), "-m", str(folder), "-o", str(folder / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after transformers' progress bars)
    assert re.search(match, err) and err.startswith("gemma-rvq tokenize: error:"), err
    assert not (folder / "out").exists()


def _drop(*prefixes: str):
    def damage(state: dict) -> None:
        for key in [k for k in state if k.startswith(prefixes)]:
            del state[key]
    return damage


def _poke(key: str, value: float):
    def damage(state: dict) -> None:
        state[key].view(-1)[3] = value
    return damage


def test_the_intact_checkpoint_loads_everywhere(saved, capsys, tmp_path):
    for load in LOADERS.values():
        assert isinstance(load(str(saved)), GemmaRVQModel)
    assert main(["tokenize", str(CLIP), "-m", str(saved), "-o", str(tmp_path / "out.jsonl")]) == 0


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (_drop("quantizer.codebooks"), r"missing tensors that define its codes: quantizer\.codebooks\."),
        (_drop("out_proj.weight"), r"missing .*: out_proj\.weight"),
        (_drop("in_norm."), r"missing .*: in_norm\.bias, in_norm\.weight"),
        (_drop("quantizer.cluster_size", "quantizer.embed_sum"), r"quantizer\.cluster_size, quantizer\.embed_sum"),
        (_drop("encoder."), r"missing .*encoder\.encoder\.layer_norm\.bias.*under encoder\.\*"),
        (_poke("quantizer.codebooks", float("nan")), r"quantizer\.codebooks holds 1 NaN or infinite"),
        (_poke("in_proj.weight", float("inf")), r"in_proj\.weight holds 1 NaN or infinite"),
        (_poke("out_norm.bias", float("-inf")), r"out_norm\.bias holds 1 NaN or infinite"),
        (_poke("encoder.feature_projection.projection.weight", float("nan")),
         r"encoder\.feature_projection\.projection\.weight holds 1 NaN values"),
        (lambda s: s.update({"quantizer.codebooks": (s["quantizer.codebooks"] * 10).long()}),
         r"quantizer\.codebooks is stored as I64 in model\.safetensors; it must be floating point"),
        (lambda s: s.update({"quantizer.codebooks": torch.zeros(2, 8, 32)}),
         r"wrong shape for its config\.json: quantizer\.codebooks \(stored \[2, 8, 32\], config\.json gives \[2, 16, 32\]"),
        (_drop("in_", "out_"), r"use_projection: true, but the checkpoint holds none of the projection tensors"),
    ],
    ids=["codebooks", "out_proj", "in_norm", "ema_statistics", "bundled_encoder", "nan_codebook", "inf_projection",
         "inf_norm", "nan_encoder", "integer_codebooks", "wrong_shape", "projection_flag_true"],
)
def test_damaged_tensors_are_refused_with_the_reason(saved, tmp_path, capsys, damage, match):
    _assert_refused(_damaged(saved, tmp_path, tensors=damage), match, capsys)


def test_a_projection_flag_contradicting_the_tensors_is_refused(saved, tmp_path, capsys):
    folder = _damaged(saved, tmp_path, config=lambda c: {**c, "use_projection": False, "codebook_dim": c["dim"]})
    _assert_refused(folder, r"use_projection: false, but the checkpoint holds projection tensors \(in_norm\.bias",
                    capsys)


def test_other_config_and_weight_mismatches_are_refused(saved, tmp_path, capsys):
    learnable = _damaged(saved, tmp_path, config=lambda c: {**c, "codebook_type": "learnable"})
    _assert_refused(learnable, r"tensors this config does not describe \(quantizer\.cluster_size", capsys)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda c: {**c, "ema_decay": None}, "ema_decay"),
        (lambda c: [c], "JSON object"),
        (lambda c: {**c, "num_quantizers": "2"}, "num_quantizers"),
        (lambda c: {**c, "codebook_size": 16.5}, "codebook_size"),
        (lambda c: {**c, "encoder_layer": 99}, "encoder_layer"),
        (lambda c: {**c, "encoder_family": None}, "encoder_family"),
    ],
    ids=["ema_decay_null", "list", "string_int", "float_int", "layer_out_of_range", "family_null"],
)
def test_malformed_config_json_names_the_file_and_the_field(saved, tmp_path, capsys, edit, field):
    folder = _damaged(saved, tmp_path, config=edit)
    for name, load in LOADERS.items():
        if name == "AutoModel" and field == "JSON object":
            # transformers reads the file before it knows whose it is, and names the folder and the field
            with pytest.raises(ValueError, match=rf"{re.escape(str(folder))}\. Should have a `model_type` key"):
                load(str(folder))
            continue
        with pytest.raises(ValueError, match=rf"{re.escape(str(folder / 'config.json'))}: .*{field}"):
            load(str(folder))
    assert main(["tokenize", str(CLIP), "-m", str(folder), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert str(folder / "config.json") in err and field in err and "Traceback" not in err


def test_missing_tensors_are_initialised_only_on_explicit_opt_in(saved, tmp_path):
    folder = _damaged(saved, tmp_path, tensors=_drop("quantizer.codebooks"))
    model = GemmaRVQModel.from_pretrained(folder, allow_missing_keys=True)
    assert torch.isfinite(model.quantizer.codebooks).all()
    model, info = load_any(str(folder), allow_missing_keys=True, output_loading_info=True)
    assert info["missing_keys"] == {"quantizer.codebooks"}
    # the opt-in covers missing tensors only, never corrupt ones
    nan = _damaged(saved, tmp_path / "nan", tensors=_poke("quantizer.codebooks", float("nan")))
    with pytest.raises(ValueError, match="NaN"):
        GemmaRVQModel.from_pretrained(nan, allow_missing_keys=True)


class _Exploit:
    def __reduce__(self):
        return (Path.write_text, (Path(_Exploit.marker), "pickle code ran"))


def test_a_pickled_checkpoint_is_never_unpickled(saved, tmp_path):
    folder = _damaged(saved, tmp_path)
    (folder / "model.safetensors").unlink()
    _Exploit.marker = str(tmp_path / "pwned")
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"quantizer.codebooks": _Exploit()}, f)
    for load in LOADERS.values():
        with pytest.raises((OSError, ValueError), match="safetensors"):
            load(str(folder))
    assert not (tmp_path / "pwned").exists()
