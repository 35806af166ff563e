"""Checkpoints load with ``trust_remote_code=True`` where gemma-rvq is NOT installed."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import gemma_rvq

REMOTE_FILES = (
    "configuration_gemma_rvq.py", "modeling_gemma_rvq.py", "encoders.py", "audio.py", "quantization.py", "bounds.py",
    "search.py", "kmeans.py",
)
# huggingface_hub is a hard dependency of transformers (its `@strict` config validation lives there).
ALLOWED_THIRD_PARTY = {"torch", "numpy", "transformers", "huggingface_hub"}

# Runs in `python -I` (no PYTHONPATH, no user site) after removing the source tree and any editable-install
# finder from the import system, so `import gemma_rvq` must fail there.
_CHILD = r"""
import importlib, os, sys
src = os.path.realpath(sys.argv[1])
# drop the source tree and any other path holding the package (an editable install's .pth entry)
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != src
               and not os.path.isdir(os.path.join(p or ".", "gemma_rvq"))]
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()
                    and "editable" not in getattr(f, "__name__", "").lower()]
importlib.invalidate_caches()
try:
    import gemma_rvq  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("gemma_rvq is still importable: the test would prove nothing")
import numpy as np, torch
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[2], trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
assert "gemma_rvq" not in sys.modules
wave = np.load(os.path.join(sys.argv[3], "wave.npy"))
out = model.encode([wave, wave[: len(wave) // 3]], sampling_rate=16000)
np.save(os.path.join(sys.argv[3], "codes.npy"), out.audio_codes.numpy())
np.save(os.path.join(sys.argv[3], "mask.npy"), out.codes_mask.numpy())
print("remote ok", type(model).__module__)
"""


def test_remote_files_import_only_siblings_and_allowed_libraries():
    src = Path(gemma_rvq.__file__).parent
    siblings = {name[:-3] for name in REMOTE_FILES}
    for name in REMOTE_FILES:
        tree = ast.parse((src / name).read_text())
        for node in tree.body:  # module level only: imports inside functions are lazy
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.module in siblings, f"{name}: relative import of {node.module!r} is not a flat sibling"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for module in modules:
                    top = module.split(".")[0]
                    assert top in sys.stdlib_module_names or top in ALLOWED_THIRD_PARTY or top == "__future__", (
                        f"{name} imports {module} at module level"
                    )


def test_save_pretrained_copies_remote_code(tiny_gemma4_rvq, tmp_path):
    tiny_gemma4_rvq.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_gemma_rvq.GemmaRVQConfig",
        "AutoModel": "modeling_gemma_rvq.GemmaRVQModel",
    }
    for name in REMOTE_FILES:
        assert (tmp_path / name).read_text() == (Path(gemma_rvq.__file__).parent / name).read_text()


def test_trust_remote_code_loads_and_encodes_identically_without_the_package(tiny_gemma4_rvq, make_speech, tmp_path):
    ckpt, work = tmp_path / "ckpt", tmp_path / "work"
    work.mkdir()
    tiny_gemma4_rvq.save_pretrained(ckpt)
    wave = make_speech(2.2, 16000, seed=21)
    np.save(work / "wave.npy", wave)
    reference = tiny_gemma4_rvq.encode([wave, wave[: len(wave) // 3]], sampling_rate=16000)

    src_dir = str(Path(gemma_rvq.__file__).parent.parent)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run(
        [sys.executable, "-I", "-c", _CHILD, src_dir, str(ckpt), str(work)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "remote ok transformers_modules" in result.stdout
    np.testing.assert_array_equal(np.load(work / "codes.npy"), reference.audio_codes.numpy())
    np.testing.assert_array_equal(np.load(work / "mask.npy"), reference.codes_mask.numpy())
