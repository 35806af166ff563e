"""Importers: the seed's ``rvq_*.pt`` checkpoints and SpireLM scikit-learn k-means models -> ``GemmaRVQModel``.

Seed checkpoints (``ik/speechless-twi-stage1-rvq-gemma4``) hold ``{"rvq": state_dict}`` of a small wrapper
module, LayerNorm -> Linear -> ``vector_quantize_pytorch.ResidualVQ`` -> LayerNorm -> Linear, next to a
``config_stage1.json``. The wrapper's key names are not published, so :func:`match_seed_layout` proves the
layout from the keys and shapes it finds and refuses anything it cannot prove (``ValueError`` listing every
key with its shape). The seed's ``rvq_wrapper.py`` is never imported or executed, and checkpoints are read
with ``torch.load(..., weights_only=True)``.

SpireLM (``utter-project/SpireLM``) labels speech with HuBERT Large (``facebook/hubert-large-ll60k``) layer 22
and a 5000-unit scikit-learn k-means (``utter-project/SpireKMeans``, file ``kmeans_model``, a joblib pickle).
:func:`convert_spire_kmeans` turns the cluster centres into a one-level, projection-free ``GemmaRVQModel``
whose codes equal ``kmeans.predict`` on the same features.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from transformers.utils import logging

from .configuration_gemma_rvq import GemmaRVQConfig
from .modeling_gemma_rvq import GemmaRVQModel

logger = logging.get_logger(__name__)

__all__ = [
    "DEFAULT_SEED_ENCODER",
    "DEFAULT_SEED_REPO",
    "DEFAULT_SPIRE_ENCODER",
    "DEFAULT_SPIRE_LAYER",
    "HubUnreachableError",
    "SeedLayout",
    "add_arguments",
    "check_hub_source",
    "convert_main",
    "convert_seed_state_dict",
    "convert_spire_kmeans",
    "load_any",
    "load_seed_checkpoint",
    "looks_like_local_path",
    "match_seed_layout",
    "read_seed_checkpoint",
    "run",
]

DEFAULT_SEED_REPO = "ik/speechless-twi-stage1-rvq-gemma4"
DEFAULT_SEED_ENCODER = "rnagabh/gemma4-audio-encoder"
DEFAULT_SPIRE_ENCODER = "facebook/hubert-large-ll60k"
DEFAULT_SPIRE_LAYER = 22
SEED_CONFIG_NAME = "config_stage1.json"

# vector_quantize_pytorch ResidualVQ: <prefix>layers.<i>._codebook.<name>
_CODEBOOK_RE = re.compile(r"^(?P<prefix>(?:.*\.)?)layers\.(?P<level>\d+)\._codebook\.(?P<name>[A-Za-z_]+)$")
_CODEBOOK_KNOWN = {"embed", "embed_avg", "cluster_size", "initted"}
_ROLES = ("in_norm", "in_proj", "out_norm", "out_proj")
_IN_WORDS = {"in", "pre", "input", "inp", "enc", "encoder", "first", "before"}
_OUT_WORDS = {"out", "post", "output", "dec", "decoder", "last", "final", "after"}
# config_stage1.json keys whose value changes what the ResidualVQ computes at inference (eval mode):
# word in the key -> predicate on the value that means "not the plain greedy Euclidean single-head RVQ".
# (rotation_trick, stochastic sampling, quantize dropout, kmeans_init... only act in training.)
_UNSUPPORTED_CONFIG: dict[str, Any] = {
    "cosine": lambda v: v is True,
    "heads": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 1,
    "beam": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 1,
    "implicit": lambda v: v is True,
    "qinco": lambda v: v is True,
    "diveq": lambda v: v is True,
}


# ---------------------------------------------------------------------------------------------- layout
@dataclass
class SeedLayout:
    """What :func:`match_seed_layout` proved about a seed state dict.

    Attributes:
        rvq_prefix: prefix of the ResidualVQ keys (``"rvq."``, ``"2."``, ``""``).
        modules: role (``in_norm``, ``in_proj``, ``out_norm``, ``out_proj``) -> module prefix in the state
            dict (no trailing dot); empty when the checkpoint is a bare ResidualVQ.
        dim: D, the encoder embedding size. codebook_dim: Dc. num_quantizers: Q. codebook_size: K.
        ignored: keys read but not carried over, with why.
        shapes: every key -> its shape (for the report).
        how: how the in/out sides were told apart (``"names"``, ``"sequential indices"``, ``"given"``).
    """

    rvq_prefix: str
    modules: dict[str, str]
    dim: int
    codebook_dim: int
    num_quantizers: int
    codebook_size: int
    ignored: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    how: str = ""

    @property
    def use_projection(self) -> bool:
        return bool(self.modules)

    def describe(self) -> str:
        """Human-readable report: the layout, then every key with its shape and what became of it."""
        lines = [
            f"seed layout: ResidualVQ at {self.rvq_prefix or '<root>'!r}: Q={self.num_quantizers} levels, "
            f"K={self.codebook_size} codes, Dc={self.codebook_dim}; D={self.dim}",
        ]
        if self.modules:
            lines.append("  " + " -> ".join(f"{role}={self.modules[role]!r}" for role in _ROLES[:2])
                         + " -> ResidualVQ -> "
                         + " -> ".join(f"{role}={self.modules[role]!r}" for role in _ROLES[2:])
                         + f"   (sides told apart by {self.how})")
        else:
            lines.append("  no projections (bare ResidualVQ): use_projection=False")
        lines.append("  keys:")
        for key, shape in self.shapes.items():
            note = self.ignored.get(key, "used")
            lines.append(f"    {key:<48} {list(shape)!s:<18} {note}")
        return "\n".join(lines)


def _shape_report(state_dict: Mapping[str, Any]) -> str:
    rows = []
    for key, value in state_dict.items():
        shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        rows.append(f"    {key}: {shape}")
    return "\n".join(rows) if rows else "    (empty)"


def _refuse(problem: str, state_dict: Mapping[str, Any]) -> ValueError:
    return ValueError(
        f"unrecognised seed checkpoint layout: {problem}\n"
        f"  expected LayerNorm -> Linear -> vector_quantize_pytorch.ResidualVQ (<prefix>layers.<i>._codebook.embed) "
        f"-> LayerNorm -> Linear, or a bare ResidualVQ.\n"
        f"  keys found ({len(state_dict)}):\n{_shape_report(state_dict)}\n"
        f"  If the layout is right but the names are unusual, pass prefixes={{'in_norm': ..., 'in_proj': ..., "
        f"'out_norm': ..., 'out_proj': ...}} explicitly."
    )


def _side(module: str, rvq_prefix: str) -> tuple[str | None, str]:
    """``("in" | "out" | None, how)`` for a module prefix, from its name words or a Sequential index."""
    words = [w for w in re.split(r"[._\-]", module.lower()) if w]
    is_in = any(w in _IN_WORDS or w.startswith(("pre", "input")) for w in words)
    is_out = any(w in _OUT_WORDS or w.startswith(("post", "output")) for w in words)
    if is_in != is_out:
        return ("in" if is_in else "out"), "names"
    # nn.Sequential: "<parent>.<i>" beside "<parent>.<j>." for the ResidualVQ
    m_mod = re.fullmatch(r"(?P<parent>(?:.*\.)?)(?P<idx>\d+)", module)
    m_rvq = re.fullmatch(r"(?P<parent>(?:.*\.)?)(?P<idx>\d+)\.", rvq_prefix)
    if m_mod and m_rvq and m_mod["parent"] == m_rvq["parent"]:
        return ("in" if int(m_mod["idx"]) < int(m_rvq["idx"]) else "out"), "sequential indices"
    return None, ""


def match_seed_layout(state_dict: Mapping[str, Any], *, config: Mapping[str, Any] | None = None,
                      prefixes: Mapping[str, str] | None = None) -> SeedLayout:
    """Prove the layout of a seed RVQ state dict, or refuse it.

    Recognised: ``vector_quantize_pytorch.ResidualVQ`` codebooks ``<prefix>layers.<i>._codebook.embed`` shaped
    ``[1, K, Dc]`` or ``[K, Dc]`` for ``i = 0..Q-1`` (``embed_avg`` ignored, ``cluster_size`` carried into the EMA
    statistics, ``initted`` checked), plus either nothing else (a bare ResidualVQ) or exactly two LayerNorms
    (``weight`` and ``bias`` ``[n]``) and two Linears (``weight [out, in]``, optional ``bias``), one of each on
    the input side and one of each on the output side. Sides are told apart by name words (``pre``/``in``/
    ``input``... vs ``post``/``out``/``output``...; e.g. ``pre_norm``, ``in_proj``, ``proj_in``, ``norm_out``), by
    elimination (``norm``/``proj`` beside ``out_norm``/``out_proj``), by ``nn.Sequential`` indices relative to
    the ResidualVQ, or given by ``prefixes``. Shapes must chain:
    ``in_norm [D]``, ``in_proj [Dc, D]``, ``out_norm [Dc]``, ``out_proj [D, Dc]``. Within a side the order is the
    seed's (norm, then linear); when ``D != Dc`` the shapes prove it, otherwise it is the documented
    assumption (and Sequential indices are checked).

    Args:
        state_dict: the wrapper's ``state_dict()`` (tensors).
        config: ``config_stage1.json`` contents; ``rvq_dim``, ``rvq_num_quantizers``, ``rvq_codebook_size``
            are checked against the shapes when present.
        prefixes: explicit role -> module prefix mapping (any subset of ``in_norm``, ``in_proj``,
            ``out_norm``, ``out_proj``, plus ``rvq`` for the ResidualVQ prefix).

    Raises:
        ValueError: the layout is not one of the above; the message lists every key and shape found.
    """
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise ValueError(f"expected a non-empty state dict (mapping of name -> tensor), got {type(state_dict)}")
    non_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise _refuse(f"values that are not tensors: {non_tensors}", state_dict)
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    prefixes = dict(prefixes or {})

    # ---- the ResidualVQ
    levels: dict[int, dict[str, str]] = {}
    rvq_prefixes = set()
    for key in state_dict:
        m = _CODEBOOK_RE.match(key)
        if m and (prefixes.get("rvq") is None or m["prefix"] == prefixes["rvq"]):
            rvq_prefixes.add(m["prefix"])
            levels.setdefault(int(m["level"]), {})[m["name"]] = key
    if not levels:
        raise _refuse("no ResidualVQ codebook keys '<prefix>layers.<i>._codebook.embed'", state_dict)
    if len(rvq_prefixes) != 1:
        raise _refuse(f"codebooks under several prefixes {sorted(rvq_prefixes)}", state_dict)
    rvq_prefix = rvq_prefixes.pop()
    q = len(levels)
    if sorted(levels) != list(range(q)):
        raise _refuse(f"ResidualVQ levels are not 0..{q - 1}: {sorted(levels)}", state_dict)
    ignored: dict[str, str] = {}
    embed_shapes = set()
    for level, names in sorted(levels.items()):
        unknown = set(names) - _CODEBOOK_KNOWN
        if unknown:
            raise _refuse(f"unknown codebook tensors at level {level}: {sorted(unknown)} (only "
                          f"{sorted(_CODEBOOK_KNOWN)} are understood: an affine/cosine/other codebook variant?)",
                          state_dict)
        if "embed" not in names:
            raise _refuse(f"level {level} has no '_codebook.embed'", state_dict)
        shape = shapes[names["embed"]]
        if len(shape) == 3 and shape[0] != 1:
            raise _refuse(f"level {level} codebook {list(shape)} has {shape[0]} heads; only 1 head is supported",
                          state_dict)
        if len(shape) not in (2, 3):
            raise _refuse(f"level {level} codebook has shape {list(shape)}, expected [1, K, Dc] or [K, Dc]",
                          state_dict)
        embed_shapes.add(shape[-2:])
        if "embed_avg" in names:
            ignored[names["embed_avg"]] = "ignored (EMA sum; rebuilt from embed and cluster_size)"
        if "initted" in names:
            ignored[names["initted"]] = "checked (must be True), not carried"
        if "cluster_size" in names:
            cs_shape = shapes[names["cluster_size"]]
            if cs_shape[-1] != shape[-2] or int(np.prod(cs_shape)) != shape[-2]:
                raise _refuse(f"level {level} cluster_size {list(cs_shape)} does not match codebook {list(shape)}",
                              state_dict)
            ignored[names["cluster_size"]] = "carried into quantizer.cluster_size (EMA counts)"
    if len(embed_shapes) != 1:
        raise _refuse(f"codebook shapes differ between levels: {sorted(embed_shapes)}", state_dict)
    k, dc = embed_shapes.pop()
    rvq_keys = {key for names in levels.values() for key in names.values()}
    other_rvq = [key for key in state_dict if key.startswith(rvq_prefix) and key not in rvq_keys
                 and rvq_prefix != ""]
    if other_rvq:
        raise _refuse(f"ResidualVQ tensors other than codebooks: {other_rvq} (a ResidualVQ with its own "
                      f"project_in/project_out, i.e. codebook_dim != dim, or another variant, is not supported)",
                      state_dict)

    # ---- the projections
    modules: dict[str, dict[str, str]] = {}
    for key in state_dict:
        if key in rvq_keys:
            continue
        module, _, param = key.rpartition(".")
        modules.setdefault(module, {})[param] = key
    kinds: dict[str, str] = {}
    for module, params in modules.items():
        ps = {p: shapes[key] for p, key in params.items()}
        if set(ps) == {"weight", "bias"} and len(ps["weight"]) == 1 and ps["bias"] == ps["weight"]:
            kinds[module] = "norm"
        elif set(ps) <= {"weight", "bias"} and "weight" in ps and len(ps["weight"]) == 2 and \
                ps.get("bias", (ps["weight"][0],)) == (ps["weight"][0],):
            kinds[module] = "linear"
        elif set(ps) == {"weight"} and len(ps["weight"]) == 1:
            raise _refuse(f"module {module!r} has a 1-D weight and no bias: an RMSNorm or a bias-free LayerNorm "
                          f"cannot be told apart, so it is not converted", state_dict)
        else:
            raise _refuse(f"module {module or '<root>'!r} with tensors {sorted(ps)} is neither a LayerNorm nor a "
                          f"Linear", state_dict)

    roles: dict[str, str] = {}
    how = ""
    if kinds:
        given = {role: prefixes[role] for role in _ROLES if role in prefixes}
        if given:
            missing = [r for r in _ROLES if r not in given]
            if missing:
                raise _refuse(f"prefixes must name all of {list(_ROLES)}; missing {missing}", state_dict)
            roles, how = dict(given), "given"
            for role, module in roles.items():
                want = "norm" if role.endswith("norm") else "linear"
                if kinds.get(module) != want:
                    raise _refuse(f"prefixes[{role!r}]={module!r} is not a {want} module of the state dict",
                                  state_dict)
            if set(roles.values()) != set(kinds):
                raise _refuse(f"modules not covered by prefixes: {sorted(set(kinds) - set(roles.values()))}",
                              state_dict)
        else:
            if sorted(kinds.values()) != ["linear", "linear", "norm", "norm"]:
                raise _refuse(f"expected exactly 2 LayerNorms and 2 Linears beside the ResidualVQ, found "
                              f"{ {m: kinds[m] for m in kinds} }", state_dict)
            hows = set()
            undecided = []
            for module, kind in kinds.items():
                side, side_how = _side(module, rvq_prefix)
                if side is None:
                    undecided.append(module)
                    continue
                role = f"{side}_{'norm' if kind == 'norm' else 'proj'}"
                if role in roles:
                    raise _refuse(f"both {roles[role]!r} and {module!r} look like {role}", state_dict)
                roles[role] = module
                hows.add(side_how)
            # One norm and one linear per side: when one side is named (e.g. "out_norm", "out_proj") the
            # two unnamed modules ("norm", "proj") can only be the other side.
            sides = {role.split("_")[0] for role in roles}
            if undecided and len(roles) == 2 and len(sides) == 1:
                other = "out" if sides == {"in"} else "in"
                for module in undecided:
                    roles[f"{other}_{'norm' if kinds[module] == 'norm' else 'proj'}"] = module
                if len(roles) == 4:
                    undecided, hows = [], {*hows, "elimination"}
            if undecided:
                raise _refuse(f"cannot tell whether {undecided} are on the input or the output side of the "
                              f"ResidualVQ from their names", state_dict)
            how = " and ".join(sorted(hows))
            if how == "sequential indices":  # the indices also prove the order within each side
                idx = {role: int(roles[role].rsplit(".", 1)[-1]) for role in _ROLES}
                if not idx["in_norm"] < idx["in_proj"] or not idx["out_norm"] < idx["out_proj"]:
                    raise _refuse("Sequential order is not LayerNorm -> Linear on both sides", state_dict)

        w_in = shapes[f"{roles['in_proj']}.weight"]
        w_out = shapes[f"{roles['out_proj']}.weight"]
        d = w_in[1]
        chain = {
            "in_norm": (shapes[f"{roles['in_norm']}.weight"], (d,)),
            "in_proj": (w_in, (dc, d)),
            "out_norm": (shapes[f"{roles['out_norm']}.weight"], (dc,)),
            "out_proj": (w_out, (d, dc)),
        }
        bad = {role: (list(got), list(want)) for role, (got, want) in chain.items() if got != want}
        if bad:
            raise _refuse(f"shapes do not chain D -> Dc={dc} -> D (role: [found, expected]): {bad}", state_dict)
    else:
        d = dc

    if config:
        expected = {"rvq_dim": dc, "rvq_num_quantizers": q, "rvq_codebook_size": k}
        bad = {key: (config[key], want) for key, want in expected.items()
               if key in config and config[key] is not None and int(config[key]) != want}
        if bad:
            raise _refuse(f"config_stage1.json disagrees with the tensors (key: [config, tensors]): {bad}",
                          state_dict)
    return SeedLayout(rvq_prefix=rvq_prefix, modules=roles, dim=d, codebook_dim=dc, num_quantizers=q,
                      codebook_size=k, ignored=ignored, shapes=shapes, how=how)


# ---------------------------------------------------------------------------------------------- hub
def _hub_download(repo_id: str, filename: str, **kwargs: Any) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id, filename, **kwargs)


_WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".npy", ".safetensors", ".bin", ".joblib", ".pkl", ".ckpt")
_OFFLINE_HINT = (
    "Offline, pass a local checkpoint folder instead (or set GEMMA_RVQ_MODEL=/path/to/folder for "
    "tokenize_speech); with the model already in the Hugging Face cache, set HF_HUB_OFFLINE=1."
)
_REACHABLE: set[str] = set()


class HubUnreachableError(LocalEntryNotFoundError):
    """A Hub file that is not cached while the Hub cannot be reached (offline mode, no network): raised at
    once, naming the repo, ``GEMMA_RVQ_MODEL`` and ``HF_HUB_OFFLINE``."""


def looks_like_local_path(name: str) -> bool:
    """True when ``name`` can only mean a local path, never a Hub repo id (``./x``, ``/x``, ``~/x``, ``x/y/z``,
    a weights-file suffix, ``runs/x`` where ``runs/`` exists, or anything that is not a valid repo id)."""
    if name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or "\\" in name or name in (".", ".."):
        return True
    if name.lower().endswith(_WEIGHT_FILE_SUFFIXES):
        return True
    parts = name.split("/")
    if len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir()):
        return True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def _check_hub_reachable(repo_id: str, filename: str, revision: str | None) -> None:
    """Fail within seconds, naming ``repo_id``, when the Hub cannot be reached for a file that is not cached
    (``hf_hub_download`` itself retries network errors for close to a minute before it gives up)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, is_offline_mode
    from huggingface_hub.errors import HfHubHTTPError

    if is_offline_mode():
        raise HubUnreachableError(
            f"cannot load {repo_id!r}: HF_HUB_OFFLINE is set and {filename} of {repo_id!r} is not in the local "
            f"Hugging Face cache. {_OFFLINE_HINT}"
        )
    if repo_id in _REACHABLE:
        return
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision), timeout=10)
    except HfHubHTTPError:  # the Hub answered (404, 401...): the download reports it as usual
        pass
    except Exception as err:  # network errors: DNS, refused connection, timeout
        raise HubUnreachableError(
            f"cannot load {repo_id!r}: the Hugging Face Hub is unreachable ({type(err).__name__}: {err}) and "
            f"{filename} of {repo_id!r} is not in the local cache. {_OFFLINE_HINT}"
        ) from err
    _REACHABLE.add(repo_id)


def check_hub_source(name: str, filename: str = "config.json", revision: str | None = None) -> None:
    """Before ``name`` (not an existing local path) is looked up on the Hub: a ``FileNotFoundError`` at once
    when it looks like a local path, an ``OSError`` naming it at once when the Hub cannot be reached and
    ``filename`` is not cached."""
    if looks_like_local_path(name):
        raise FileNotFoundError(
            f"no such checkpoint file or folder: {name} (it looks like a local path, so it is not looked up on "
            "the Hugging Face Hub)"
        )
    from huggingface_hub import try_to_load_from_cache

    if try_to_load_from_cache(name, filename, revision=revision) is None:
        _check_hub_reachable(name, filename, revision)


def _hub_file(repo_id: str, filename: str, **kwargs: Any) -> str | None:
    """Download ``filename`` from a Hub repo; None when the repo has no such file.

    Only "the repo has no such file" becomes None: being offline or a missing repo still raises (offline:
    at once, with an ``OSError`` naming the repo, ``GEMMA_RVQ_MODEL`` and ``HF_HUB_OFFLINE``).
    """
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError

    cached = try_to_load_from_cache(repo_id, filename, revision=kwargs.get("revision"))
    if cached is not None and not isinstance(cached, str):  # the cache remembers the file does not exist
        return None
    if cached is None:
        _check_hub_reachable(repo_id, filename, kwargs.get("revision"))
    try:
        return _hub_download(repo_id, filename, **kwargs)
    except LocalEntryNotFoundError:
        raise
    except EntryNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------- seed
def _check_seed_config(config: Mapping[str, Any]) -> None:
    """Refuse config_stage1.json settings that change what the ResidualVQ computes at inference."""
    bad = {key: value for key, value in config.items()
           if any(word in key.lower() and unsupported(value) for word, unsupported in _UNSUPPORTED_CONFIG.items())}
    if bad:
        raise ValueError(
            f"config_stage1.json sets ResidualVQ options this converter does not reproduce: {bad}. Only greedy "
            f"Euclidean residual quantization with one head is converted (vector_quantize_pytorch's default)."
        )


def _extract_state_dict(obj: Any, source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensor dict inside a loaded checkpoint, and the top-level keys left aside."""
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj), []
    if isinstance(obj, Mapping):
        for key in ("rvq", "state_dict", "model", "model_state_dict", "quantizer"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner), [k for k in obj if k != key]
        found = {k: type(v).__name__ for k, v in obj.items()}
        raise ValueError(f"{source}: no state dict found; expected {{'rvq': state_dict}} or a plain state dict, "
                         f"top-level keys: {found}")
    raise ValueError(f"{source}: expected a dict, got {type(obj).__name__}")


def read_seed_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Load ``{"rvq": state_dict}`` (or a plain state dict) safely: ``torch.load(weights_only=True)`` on CPU.

    Returns:
        ``(state_dict, other_top_level_keys)``.
    """
    path = str(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses pickled code objects: say so plainly
        raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True) ({err}). gemma-rvq never "
                         f"unpickles arbitrary objects from checkpoints. (A k-means joblib file is converted with "
                         f"--format spire --allow-pickle / convert_spire_kmeans(..., allow_pickle=True).)") from err
    return _extract_state_dict(obj, path)


def _smoothed(cs: torch.Tensor, eps: float) -> torch.Tensor:
    total = cs.sum(-1, keepdim=True)
    return (cs + eps) / (total + cs.shape[-1] * eps) * total


def convert_seed_state_dict(state_dict: Mapping[str, torch.Tensor], *,
                            config_stage1: Mapping[str, Any] | None = None,
                            encoder: str | None = DEFAULT_SEED_ENCODER, encoder_family: str = "gemma4_audio",
                            encoder_layer: int | None = None, prefixes: Mapping[str, str] | None = None,
                            verbose: bool = True, **config_overrides: Any) -> GemmaRVQModel:
    """Build a quantizer-only ``GemmaRVQModel`` from a seed wrapper's state dict.

    The codebooks are the checkpoint's ``embed`` tensors (authoritative for codes and reconstructions). The
    EMA state is made consistent with them: ``cluster_size`` is the checkpoint's (or ones when absent or all
    zero) and ``embed_sum = codebooks * smoothed(cluster_size)``, so continued EMA training starts from exactly
    these codebooks (an averaged checkpoint's ``embed_avg`` no longer matches its ``embed``).

    Args:
        state_dict: the wrapper's state dict (see :func:`match_seed_layout`).
        config_stage1: the seed's ``config_stage1.json`` contents (checked against the tensors).
        encoder: Hub id or path of the frozen encoder the model references (not bundled, loaded lazily).
        encoder_family / encoder_layer: see ``GemmaRVQConfig``.
        prefixes: explicit module prefixes, see :func:`match_seed_layout`.
        verbose: print the layout report (it is always logged at INFO level).
        **config_overrides: further ``GemmaRVQConfig`` fields (e.g. ``ema_decay``).

    Raises:
        ValueError: unknown layout, unsupported options, non-finite weights, uninitialised codebooks.
    """
    config_stage1 = dict(config_stage1 or {})
    _check_seed_config(config_stage1)
    layout = match_seed_layout(state_dict, config=config_stage1, prefixes=prefixes)
    report = layout.describe()
    if config_stage1:
        report += "\n  config_stage1.json: " + json.dumps(config_stage1, sort_keys=True, default=str)
    logger.info(report)
    if verbose:
        print(report)

    sd = {k: v.detach().to("cpu") for k, v in state_dict.items()}
    for key, value in sd.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"seed checkpoint tensor {key!r} contains NaN or inf")
    q, kk, dc = layout.num_quantizers, layout.codebook_size, layout.codebook_dim
    codebooks, cluster_sizes = [], []
    for level in range(q):
        base = f"{layout.rvq_prefix}layers.{level}._codebook."
        initted = sd.get(base + "initted")
        if initted is not None and not bool(initted.all()):
            raise ValueError(f"ResidualVQ level {level} was never initialised ({base}initted is False): its "
                             f"codebook holds no trained codes")
        codebooks.append(sd[base + "embed"].float().reshape(kk, dc))
        cs = sd.get(base + "cluster_size")
        cluster_sizes.append(cs.float().reshape(kk) if cs is not None else torch.ones(kk))
    codebooks_t = torch.stack(codebooks)  # [Q, K, Dc]
    cluster_size = torch.stack(cluster_sizes)  # [Q, K]
    empty = cluster_size.sum(-1) <= 0
    cluster_size[empty] = 1.0

    fields: dict[str, Any] = dict(
        encoder_family=encoder_family, encoder_name_or_path=encoder, encoder_layer=encoder_layer,
        dim=layout.dim, codebook_dim=dc, num_quantizers=q, codebook_size=kk,
        use_projection=layout.use_projection, codebook_type="ema",
    )
    decay = config_stage1.get("rvq_decay", config_stage1.get("rvq_ema_decay"))
    if isinstance(decay, (int, float)) and 0 < decay < 1:
        fields["ema_decay"] = float(decay)
    ln_eps = config_stage1.get("layer_norm_eps", config_stage1.get("rvq_layer_norm_eps"))
    if isinstance(ln_eps, (int, float)) and ln_eps > 0:  # otherwise torch's LayerNorm default, 1e-5
        fields["layer_norm_eps"] = float(ln_eps)
    fields.update(config_overrides)
    config = GemmaRVQConfig(**fields)
    model = GemmaRVQModel(config)
    eps = getattr(model.quantizer, "eps", 1e-5)

    new_sd: dict[str, torch.Tensor] = {
        "quantizer.codebooks": codebooks_t,
        "quantizer.cluster_size": cluster_size,
        "quantizer.embed_sum": codebooks_t * _smoothed(cluster_size, eps).unsqueeze(-1),
    }
    for role, module in layout.modules.items():
        weight = sd[f"{module}.weight"].float()
        new_sd[f"{role}.weight"] = weight
        bias = sd.get(f"{module}.bias")
        new_sd[f"{role}.bias"] = bias.float() if bias is not None else torch.zeros(weight.shape[0])
    expected = {k for k in model.state_dict() if not k.startswith("encoder.")}
    missing, unexpected = expected - set(new_sd), set(new_sd) - expected
    if missing or unexpected:  # a contract mismatch between this converter and the model: fail loudly
        raise RuntimeError(f"GemmaRVQModel state dict mismatch: missing {sorted(missing)}, "
                           f"unexpected {sorted(unexpected)}")
    model.load_state_dict(new_sd, strict=False)
    model.eval()
    return model


def _read_json(path: str | os.PathLike) -> dict:
    """A JSON object from ``path``; a malformed file or anything but an object is a ``ValueError`` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of fields, got a {type(data).__name__}")
    return data


def load_seed_checkpoint(repo_or_dir: str | os.PathLike = DEFAULT_SEED_REPO, filename: str = "rvq_averaged.pt",
                         encoder: str | None = DEFAULT_SEED_ENCODER, *, revision: str | None = None,
                         config_filename: str = SEED_CONFIG_NAME, verbose: bool = True,
                         **kwargs: Any) -> GemmaRVQModel:
    """Convert a seed checkpoint from a local folder, a local ``.pt`` file or a Hub repo.

    Args:
        repo_or_dir: folder holding ``filename`` (+ ``config_stage1.json``), a ``.pt`` file, or a Hub repo id
            (default: the seed, ``ik/speechless-twi-stage1-rvq-gemma4``; its files are ``rvq_best.pt``,
            ``rvq_final.pt``, ``rvq_averaged.pt``). ``rvq_wrapper.py`` is never downloaded or run.
        filename: which checkpoint file.
        encoder: encoder reference stored in the converted config.
        revision: Hub revision (branch, tag or commit) to download.
        config_filename: the seed's config file; optional (shapes alone prove the layout).
        verbose: print the layout report.
        **kwargs: passed to :func:`convert_seed_state_dict` (``prefixes``, ``encoder_layer``, config fields).
    """
    src = Path(repo_or_dir)
    if src.is_file():
        ckpt, cfg = src, src.parent / config_filename
    elif src.is_dir():
        ckpt, cfg = src / filename, src / config_filename
        if not ckpt.is_file():
            present = sorted(p.name for p in src.iterdir())
            raise ValueError(f"{src} has no {filename!r}; files: {present}")
    else:
        ckpt = Path(_hub_download(str(repo_or_dir), filename, revision=revision))
        cfg_file = _hub_file(str(repo_or_dir), config_filename, revision=revision)
        cfg = Path(cfg_file) if cfg_file else None
    config_stage1 = _read_json(cfg) if cfg is not None and cfg.is_file() else None
    if config_stage1 is None:
        logger.warning(f"{repo_or_dir}: no {config_filename}; the layout is inferred from the tensors alone")
    state_dict, other = read_seed_checkpoint(ckpt)
    if other:
        logger.info(f"{ckpt}: top-level entries left aside: {other}")
        if verbose:
            print(f"{ckpt.name}: top-level entries left aside: {other}")
    return convert_seed_state_dict(state_dict, config_stage1=config_stage1, encoder=encoder, verbose=verbose,
                                   **kwargs)


# ---------------------------------------------------------------------------------------------- spire
def _load_centers(kmeans: Any, allow_pickle: bool) -> np.ndarray:
    if hasattr(kmeans, "cluster_centers_"):
        return np.asarray(kmeans.cluster_centers_)
    if isinstance(kmeans, torch.Tensor):
        return kmeans.detach().cpu().numpy()
    if isinstance(kmeans, np.ndarray):
        return kmeans
    if isinstance(kmeans, (str, os.PathLike)):
        path = Path(kmeans)
        if not path.is_file():
            raise ValueError(f"k-means file {path} does not exist")
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if not allow_pickle:
            raise ValueError(
                f"{path} is not a .npy file. A joblib/pickle k-means model (such as SpireLM's 'kmeans_model') is "
                f"a pickle: loading it runs arbitrary code embedded in the file. Only if you trust its source, "
                f"pass allow_pickle=True (CLI: --allow-pickle). Safer: on a trusted machine, save "
                f"kmeans.cluster_centers_ with numpy.save and convert the .npy."
            )
        from .extras import require

        require("joblib", "reading a pickled scikit-learn k-means")
        import joblib  # installed with scikit-learn

        logger.warning(f"unpickling {path} (allow_pickle=True): this executes code from the file")
        return _load_centers(joblib.load(path), allow_pickle=False)
    raise ValueError(f"expected a fitted k-means estimator (with cluster_centers_), an array of centres [K, D], "
                     f"or a path; got {type(kmeans).__name__}")


def convert_spire_kmeans(kmeans: Any, *, encoder: str | None = DEFAULT_SPIRE_ENCODER,
                         encoder_family: str = "hubert", layer: int | None = DEFAULT_SPIRE_LAYER,
                         allow_pickle: bool = False, verbose: bool = True,
                         **config_overrides: Any) -> GemmaRVQModel:
    """A SpireLM-style k-means speech unit model -> one-level ``GemmaRVQModel`` without projections.

    The model's codes equal ``kmeans.predict(features)`` on the same features (nearest centre in Euclidean
    distance, computed in fp32: exact up to ties closer than fp32 rounding). SpireLM's published setup is
    HuBERT Large (``facebook/hubert-large-ll60k``) ``hidden_states[22]`` (the output of layer 22, before the
    encoder's final LayerNorm), 5000 units, consecutive duplicates collapsed downstream (token format
    ``spire``).

    Args:
        kmeans: a fitted estimator with ``cluster_centers_`` (scikit-learn ``KMeans`` / ``MiniBatchKMeans``),
            an array or tensor of centres ``[K, D]``, a ``.npy`` path (safe: ``numpy.load(allow_pickle=False)``),
            or a joblib/pickle path, which is read ONLY with ``allow_pickle=True``.
        encoder: Hub id or path of the encoder the model references.
        encoder_family: ``"hubert"`` (SpireLM) or another family of ``GemmaRVQConfig``.
        layer: hidden-state index quantized (``encoder_layer``); SpireLM uses 22.
        allow_pickle: permit unpickling a joblib/pickle file. SECURITY: a pickle can execute arbitrary code
            when loaded; only set this for files from a source you trust.
        verbose: print what was found.
        **config_overrides: further ``GemmaRVQConfig`` fields.
    """
    centers = _load_centers(kmeans, allow_pickle)
    if centers.ndim != 2 or centers.shape[0] < 2 or centers.shape[1] < 1:
        raise ValueError(f"k-means centres must be [K >= 2, D], got shape {list(centers.shape)}")
    if not np.issubdtype(centers.dtype, np.floating) or not np.isfinite(centers).all():
        raise ValueError(f"k-means centres must be finite floats, got dtype {centers.dtype}")
    k, d = centers.shape
    fields: dict[str, Any] = dict(
        encoder_family=encoder_family, encoder_name_or_path=encoder, encoder_layer=layer, dim=d,
        codebook_dim=d, num_quantizers=1, codebook_size=k, use_projection=False, codebook_type="ema",
    )
    fields.update(config_overrides)
    model = GemmaRVQModel(GemmaRVQConfig(**fields))
    codebooks = torch.from_numpy(np.ascontiguousarray(centers, dtype=np.float32)).unsqueeze(0)  # [1, K, D]
    new_sd = {"quantizer.codebooks": codebooks, "quantizer.cluster_size": torch.ones(1, k),
              "quantizer.embed_sum": codebooks.clone()}
    expected = {key for key in model.state_dict() if not key.startswith("encoder.")}
    if set(new_sd) != expected:
        raise RuntimeError(f"GemmaRVQModel state dict mismatch: expected {sorted(expected)}")
    model.load_state_dict(new_sd, strict=False)
    model.eval()
    msg = (f"k-means: {k} centres of dim {d} -> GemmaRVQModel(Q=1, K={k}, use_projection=False, "
           f"encoder={encoder!r}, family={encoder_family!r}, layer={layer})")
    logger.info(msg)
    if verbose:
        print(msg)
    return model


# ---------------------------------------------------------------------------------------------- any


def load_any(name_or_path: str | os.PathLike | GemmaRVQModel, *, revision: str | None = None,
             verbose: bool = False, **kwargs: Any) -> GemmaRVQModel:
    """Load whatever speech-tokenizer checkpoint ``name_or_path`` names, as a ``GemmaRVQModel``.

    - a ``GemmaRVQModel``: returned as is;
    - a gemma-rvq folder or Hub repo (``config.json`` with ``model_type == "gemma_rvq"``):
      ``GemmaRVQModel.from_pretrained(name_or_path, revision=..., **kwargs)``;
    - a seed folder or Hub repo (``config_stage1.json``) or a seed ``.pt`` file:
      :func:`load_seed_checkpoint` (``kwargs``: ``filename``, ``encoder``, ...);
    - a ``.npy`` file of k-means centres: :func:`convert_spire_kmeans`.

    Raises:
        ValueError: nothing recognisable at ``name_or_path`` (the message says what was found).
        FileNotFoundError: ``name_or_path`` looks like a local path (``./x``, ``/x``, ``x/y/z``...) and does
            not exist; it is not tried as a Hub id.
        OSError: a Hub id that is not cached while the Hub is unreachable or ``HF_HUB_OFFLINE`` is set
            (at once, naming the id).
    """
    if isinstance(name_or_path, GemmaRVQModel):
        return name_or_path
    path = Path(name_or_path).expanduser()
    if path.exists():
        name_or_path = str(path)
    elif looks_like_local_path(os.fspath(name_or_path)):
        check_hub_source(os.fspath(name_or_path))
    if path.is_file():
        if path.suffix == ".pt":
            return load_seed_checkpoint(path, verbose=verbose, **kwargs)
        if path.suffix == ".npy":
            return convert_spire_kmeans(path, verbose=verbose, **kwargs)
        raise ValueError(f"{path}: expected a gemma-rvq folder, a seed folder or .pt file, or a .npy of k-means "
                         f"centres")
    if path.is_dir():
        config_file = path / "config.json"
        seed_config = path / SEED_CONFIG_NAME
        seed_files = sorted(p.name for p in path.glob("rvq_*.pt"))
    else:
        errors: list[Exception] = []

        def probe(filename: str) -> str | None:
            try:
                return _hub_file(str(name_or_path), filename, revision=revision)
            except LocalEntryNotFoundError as err:  # offline and not cached: try the other format first
                errors.append(err)
                return None

        config_file = probe("config.json")
        seed_config = None if config_file else probe(SEED_CONFIG_NAME)
        if config_file is None and seed_config is None and errors:
            raise errors[0]
        seed_files = []
    if config_file is not None and Path(config_file).is_file():
        model_type = _read_json(config_file).get("model_type")
        if model_type == GemmaRVQConfig.model_type:
            if revision is not None:
                kwargs["revision"] = revision
            return GemmaRVQModel.from_pretrained(name_or_path, **kwargs)
        if not (seed_config is not None and Path(seed_config).is_file()):
            raise ValueError(f"{name_or_path}: config.json has model_type {model_type!r}, not "
                             f"{GemmaRVQConfig.model_type!r}: not a gemma-rvq checkpoint")
    if (seed_config is not None and Path(seed_config).is_file()) or seed_files:
        if path.is_dir() and "filename" not in kwargs and seed_files and "rvq_averaged.pt" not in seed_files:
            kwargs["filename"] = seed_files[0]
        return load_seed_checkpoint(name_or_path, revision=revision, verbose=verbose, **kwargs)
    found = sorted(p.name for p in path.iterdir()) if path.is_dir() else "nothing (no config.json or " \
        f"{SEED_CONFIG_NAME} in the Hub repo)"
    raise ValueError(f"{name_or_path}: not a gemma-rvq checkpoint (config.json with model_type 'gemma_rvq') nor "
                     f"a seed checkpoint ({SEED_CONFIG_NAME} + rvq_*.pt); found: {found}")


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``gemma-rvq convert SOURCE OUTPUT_DIR``."""
    parser.add_argument("source", help="seed folder / Hub repo / .pt file, or k-means .npy (or joblib file with "
                                       "--allow-pickle)")
    parser.add_argument("output_dir", help="where to save_pretrained the converted model")
    parser.add_argument("--format", choices=("auto", "seed", "spire"), default="auto",
                        help="source format (auto: .npy and --allow-pickle files are spire, the rest seed)")
    parser.add_argument("--filename", default="rvq_averaged.pt", help="seed checkpoint file (default: %(default)s)")
    parser.add_argument("--revision", default=None, help="Hub revision of a seed repo")
    parser.add_argument("--encoder", default=None,
                        help=f"encoder Hub id or path (default: {DEFAULT_SEED_ENCODER} for seed, "
                             f"{DEFAULT_SPIRE_ENCODER} for spire)")
    parser.add_argument("--encoder-layer", type=int, default=None,
                        help=f"hidden state to quantize (spire default: {DEFAULT_SPIRE_LAYER})")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow reading a joblib/pickle k-means file. SECURITY: unpickling runs code from "
                             "the file; only for files you trust")
    return parser


def run(args: argparse.Namespace) -> int:
    """Convert ``args.source`` and save it to ``args.output_dir``; verifies the saved copy reloads identically."""
    fmt = args.format
    if fmt == "auto":
        fmt = "spire" if str(args.source).endswith(".npy") or args.allow_pickle else "seed"
    if fmt == "spire":
        layer = DEFAULT_SPIRE_LAYER if args.encoder_layer is None else args.encoder_layer
        model = convert_spire_kmeans(args.source, encoder=args.encoder or DEFAULT_SPIRE_ENCODER, layer=layer,
                                     allow_pickle=args.allow_pickle, verbose=True)
    else:
        model = load_seed_checkpoint(args.source, args.filename, args.encoder or DEFAULT_SEED_ENCODER,
                                     revision=args.revision, encoder_layer=args.encoder_layer, verbose=True)
    model.save_pretrained(args.output_dir)
    reloaded = GemmaRVQModel.from_pretrained(args.output_dir)
    for key, value in model.state_dict().items():
        if not torch.equal(value, reloaded.state_dict()[key]):
            raise RuntimeError(f"saved checkpoint differs from the converted model at {key!r}")
    cfg = model.config
    print(f"saved {args.output_dir}: Q={cfg.num_quantizers} K={cfg.codebook_size} D={cfg.dim} "
          f"Dc={cfg.codebook_dim} use_projection={cfg.use_projection} encoder={cfg.encoder_name_or_path!r} "
          f"(reload verified)")
    return 0


def convert_main(argv: Sequence[str] | None = None) -> int:
    """``python -m gemma_rvq.convert SOURCE OUTPUT_DIR [...]`` (also wired as ``gemma-rvq convert``)."""
    parser = add_arguments(argparse.ArgumentParser(prog="gemma-rvq convert", description=__doc__.split("\n\n")[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(convert_main())
