"""Optional dependencies, grouped as pip extras, and the ImportError that names the extra to install.

``pip install gemma-rvq`` installs what tokenizing speech needs (torch, transformers, datasets, soundfile,
soxr...). The rest comes with an extra:

| extra | installs | for |
|---|---|---|
| ``train`` | accelerate, matplotlib | stage-1 RVQ training (``train_rvq``, ``gemma-rvq train``), its plots |
| ``metrics`` | evaluate, matplotlib | the ``evaluate`` metric modules and metric Spaces, plots |
| ``sft`` | trl, peft, accelerate | stage 2/3 recipes (``gemma_rvq.recipes``, ``examples/sft.py``, generation) |
| ``spire`` | scikit-learn | converting SpireLM's pickled k-means (joblib) |
| ``fast`` | numba | the fused CPU kernels of the exact search (``search_kernels.py``); eager torch steps without |
| ``all`` | every extra above | the demo (``gemma-rvq demo``), the whole pipeline |
| ``cluster`` | datatrove, orjson | tokenizing on many machines (``gemma_rvq.cluster``, ``tokenize --executor``) |
| ``ray`` | ``cluster`` and ray | ... with datatrove's Ray executor |
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS: dict[str, str] = {
    "accelerate": "train",
    "matplotlib": "train",
    "evaluate": "metrics",
    "trl": "sft",
    "peft": "sft",
    "sklearn": "spire",
    "joblib": "spire",
    "numba": "fast",
    "datatrove": "cluster",
    "orjson": "cluster",
    "ray": "ray",
}
"""Top-level module -> the gemma-rvq extra that installs it."""


def require(module: str, purpose: str) -> ModuleType:
    """``import module``; when it is missing, an ``ImportError`` naming ``purpose`` and the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        extra = EXTRAS.get(top, "all")
        raise ImportError(
            f"{purpose} needs the optional dependency {top!r}: pip install 'gemma-rvq[{extra}]' "
            "(or 'gemma-rvq[all]' for the whole pipeline)"
        ) from err


__all__ = ["EXTRAS", "require"]
