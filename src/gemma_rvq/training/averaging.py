"""Checkpoint averaging: the element-wise mean of the last N checkpoints' weights.

Why averaging codebooks is sound here: checkpoints late in one run share one code assignment (code
``k`` of level ``q`` keeps its identity; EMA codebooks already are running means and move slowly), so
the mean of ``codebooks[q, k]`` over checkpoints is a point inside that code's own region, just as for
the projection weights. The one event that breaks this is a dead-code restart inside the window (the
code jumps to an unrelated residual). The trainer stops restarts before the averaging window
(``dead_code_restart_until``), and :func:`average_state_dicts` still guards against it: a code whose
vector in some checkpoint is farther than ``jump_tolerance`` x (median code norm of its level) from its
vector in the newest checkpoint is taken from the newest checkpoint instead of averaged.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence

import torch
from safetensors.torch import load_file


def average_state_dicts(
    states: Sequence[dict[str, torch.Tensor]], *, codebook_keys: Sequence[str] = ("quantizer.codebooks",),
    jump_tolerance: float = 0.5,
) -> tuple[dict[str, torch.Tensor], int]:
    """Element-wise mean of floating tensors (integer/bool tensors are taken from the newest state).

    Args:
        states: state dicts, oldest first, with identical keys and shapes.
        codebook_keys: keys holding codebooks ``[Q, K, Dc]`` that get the restart guard.
        jump_tolerance: see the module docstring.

    Returns:
        ``(averaged state dict, number of codes taken from the newest checkpoint)``.
    """
    if not states:
        raise ValueError("average_state_dicts needs at least one state dict")
    keys = list(states[-1])
    for i, s in enumerate(states):
        if set(s) != set(keys):
            raise ValueError(f"checkpoint {i} has different keys: {sorted(set(s) ^ set(keys))[:5]}")
        for k in keys:
            if s[k].shape != states[-1][k].shape:
                raise ValueError(f"checkpoint {i}: {k} has shape {tuple(s[k].shape)}, "
                                 f"newest has {tuple(states[-1][k].shape)}")
    out: dict[str, torch.Tensor] = {}
    kept = 0
    for k in keys:
        last = states[-1][k]
        if not last.is_floating_point():
            out[k] = last.clone()
            continue
        stack = torch.stack([s[k].double() for s in states])
        mean = stack.mean(0)
        if k in codebook_keys and last.dim() == 3 and len(states) > 1:
            scale = last.double().norm(dim=-1).median(dim=-1).values.clamp_min(1e-12)  # [Q]
            dist = (stack - last.double()).norm(dim=-1)  # [S, Q, K]
            jumped = (dist > jump_tolerance * scale[None, :, None]).any(0)  # [Q, K]
            mean[jumped] = last.double()[jumped]
            kept += int(jumped.sum())
        out[k] = mean.to(last.dtype)
    return out, kept


def average_checkpoints(folders: Sequence[str | os.PathLike], output_dir: str | os.PathLike, *,
                        jump_tolerance: float = 0.5) -> dict[str, object]:
    """Average ``save_pretrained`` folders (oldest first) into ``output_dir`` (config from the newest).

    The EMA statistics (``cluster_size``, ``embed_sum``) are averaged too; they only matter for
    continued training and stay consistent to first order. Returns a summary (sources, codes kept).
    """
    if not folders:
        raise ValueError("average_checkpoints needs at least one folder")
    states = []
    for folder in folders:
        path = os.path.join(os.fspath(folder), "model.safetensors")
        if not os.path.exists(path):
            raise ValueError(f"{folder} has no model.safetensors (not a save_pretrained folder?)")
        states.append(load_file(path))
    averaged, kept = average_state_dicts(states, jump_tolerance=jump_tolerance)
    output_dir = os.fspath(output_dir)
    newest = os.fspath(folders[-1])
    os.makedirs(output_dir, exist_ok=True)
    from transformers import AutoModel

    import gemma_rvq  # noqa: F401  (registers the Auto classes)

    model = AutoModel.from_pretrained(newest)
    missing, unexpected = model.load_state_dict(averaged, strict=False)
    if unexpected or [m for m in missing if m in averaged]:
        raise ValueError(f"averaged weights do not fit the model: missing {missing}, unexpected {unexpected}")
    model.save_pretrained(output_dir)
    summary = {"averaged_from": [os.path.basename(os.path.dirname(os.fspath(f).rstrip("/"))) or os.fspath(f)
                                 for f in folders],
               "num_checkpoints": len(folders), "codes_taken_from_newest": kept}
    with open(os.path.join(output_dir, "averaging.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    for extra in ("preprocessor_config.json",):
        if os.path.exists(os.path.join(newest, extra)):
            shutil.copy(os.path.join(newest, extra), output_dir)
    return summary
