"""What a speech-tokenizer checkpoint holds, read without building the model.

Backs ``gemma-rvq info``: the config, whether the encoder is bundled or referenced, codebook shapes,
tensor counts and file sizes. Reads safetensors headers only (no weights are loaded) and seed ``.pt``
files with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .configuration_gemma_rvq import GemmaRVQConfig

SEED_CONFIG_NAME = "config_stage1.json"


def _safetensors_summary(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    groups: dict[str, int] = {}
    shapes: dict[str, list[int]] = {}
    total = 0
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
            shape = list(handle.get_slice(key).get_shape())
            numel = 1
            for size in shape:
                numel *= size
            total += numel
            group = key.split(".", 1)[0]
            groups[group] = groups.get(group, 0) + numel
            if key.startswith("quantizer."):
                shapes[key] = shape
    return {"parameters_and_buffers": total, "by_module": groups, "quantizer_tensors": shapes}


def _files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}


def remote_code_files(folder: str | os.PathLike, auto_map: dict[str, Any] | None) -> tuple[list[str], list[str]]:
    """The ``.py`` files ``trust_remote_code=True`` needs in ``folder``: the modules named in ``auto_map`` and,
    recursively, their relative imports (found as transformers finds them). Returns ``(present, missing)``.

    References to another repository (``"repo--module.Class"``) are not local files and are skipped.
    """
    from transformers.dynamic_module_utils import get_relative_imports

    folder = Path(folder)
    refs = [r for v in (auto_map or {}).values() for r in (v if isinstance(v, (list, tuple)) else [v])]
    todo = sorted({f"{r.rsplit('.', 1)[0]}.py" for r in refs if isinstance(r, str) and "--" not in r})
    present: list[str] = []
    missing: list[str] = []
    while todo:
        name = todo.pop(0)
        if name in present or name in missing:
            continue
        path = folder / name
        if not path.is_file():
            missing.append(name)
            continue
        present.append(name)
        todo.extend(f"{module.replace('.', '/')}.py" for module in get_relative_imports(path))
    return sorted(present), sorted(missing)


def _describe_gemma_rvq(folder: Path) -> dict[str, Any]:
    config = GemmaRVQConfig.from_pretrained(str(folder))
    info: dict[str, Any] = {
        "format": "gemma-rvq (save_pretrained folder)",
        "path": str(folder),
        "encoder": {
            "family": config.encoder_family,
            "bundled": config.bundles_encoder,
            "name_or_path": None if config.bundles_encoder else config.encoder_name_or_path,
            "layer": config.encoder_layer,
            "sampling_rate": config.sampling_rate,
            "frame_rate": config.frame_rate,
        },
        "quantizer": {
            "num_quantizers": config.num_quantizers,
            "codebook_size": config.codebook_size,
            "dim": config.dim,
            "codebook_dim": config.codebook_dim,
            "use_projection": config.use_projection,
            "codebook_type": config.codebook_type,
        },
        # with trust_remote_code=True where gemma-rvq is not installed: auto_map AND every file it needs
        "loads_without_gemma_rvq": False,
        "files": _files(folder),
    }
    auto_map = getattr(config, "auto_map", None)
    present, missing = remote_code_files(folder, auto_map)
    info["loads_without_gemma_rvq"] = bool(auto_map) and bool(present) and not missing
    info["remote_code"] = {"auto_map": auto_map, "files": present, "missing_files": missing}
    weights = folder / "model.safetensors"
    if weights.is_file():
        info["weights"] = _safetensors_summary(weights)
    return info


def _describe_seed(path: Path) -> dict[str, Any]:
    from .convert import match_seed_layout, read_seed_checkpoint

    folder = path.parent if path.is_file() else path
    config_path = folder / SEED_CONFIG_NAME
    config = json.loads(config_path.read_text()) if config_path.is_file() else None
    checkpoints = [path] if path.is_file() else sorted(folder.glob("rvq_*.pt"))
    info: dict[str, Any] = {
        "format": "seed (rvq_*.pt + config_stage1.json); convert with `gemma-rvq convert`",
        "path": str(path),
        "config_stage1": config,
        "files": _files(folder),
    }
    if checkpoints:
        state_dict, other_keys = read_seed_checkpoint(checkpoints[0])
        layout = match_seed_layout(state_dict, config=config)
        info["checkpoint"] = str(checkpoints[0])
        info["layout"] = layout.describe().splitlines()
        info["other_top_level_keys"] = other_keys
    return info


def describe_checkpoint(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """Summarise a gemma-rvq folder, a seed folder or ``rvq_*.pt`` file, or a Hub repo of either.

    Raises:
        ValueError: when nothing recognisable is there (the message lists what was found).
    """
    path = Path(name_or_path)
    if not path.exists():
        from huggingface_hub import snapshot_download

        from .convert import check_hub_source

        check_hub_source(str(name_or_path))  # a mistyped path or an unreachable Hub fails at once

        path = Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.md", "*.safetensors", "rvq_*.pt"]))
    if path.is_file() and path.suffix == ".pt":
        return _describe_seed(path)
    if path.is_dir():
        config = path / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("model_type") == GemmaRVQConfig.model_type:
            return _describe_gemma_rvq(path)
        if (path / SEED_CONFIG_NAME).is_file() or any(path.glob("rvq_*.pt")):
            return _describe_seed(path)
        names = sorted(p.name for p in path.iterdir())
        found = ", ".join(names[:12]) + (f" ... ({len(names)} entries)" if len(names) > 12 else "") or "an empty folder"
        raise ValueError(f"{path}: not a gemma-rvq or seed checkpoint; found {found}")
    raise ValueError(f"{path}: expected a checkpoint folder or an rvq_*.pt file")
