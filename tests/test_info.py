"""gemma_rvq.info: what `gemma-rvq info` says about a checkpoint folder."""

from __future__ import annotations

import json

from gemma_rvq.info import describe_checkpoint, remote_code_files


def test_loads_without_gemma_rvq_checks_the_remote_code_files(tiny_gemma4_rvq, tmp_path):
    tiny_gemma4_rvq.save_pretrained(tmp_path)
    info = describe_checkpoint(tmp_path)
    assert info["loads_without_gemma_rvq"] is True
    # every module the auto_map names, and what they import relatively (found the way transformers does)
    files = info["remote_code"]["files"]
    assert {"configuration_gemma_rvq.py", "modeling_gemma_rvq.py", "quantization.py", "audio.py"} <= set(files)
    assert info["remote_code"]["missing_files"] == []

    # a file imported by the modeling file (not named in auto_map) is missing: it would not load
    (tmp_path / "quantization.py").unlink()
    info = describe_checkpoint(tmp_path)
    assert info["loads_without_gemma_rvq"] is False
    assert info["remote_code"]["missing_files"] == ["quantization.py"]

    # every .py file deleted: auto_map alone is not enough
    for path in tmp_path.glob("*.py"):
        path.unlink()
    info = describe_checkpoint(tmp_path)
    assert info["loads_without_gemma_rvq"] is False
    assert "modeling_gemma_rvq.py" in info["remote_code"]["missing_files"]

    # no auto_map at all
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("auto_map")
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert describe_checkpoint(tmp_path)["loads_without_gemma_rvq"] is False


def test_remote_code_files_follows_relative_imports_and_skips_other_repositories(tmp_path):
    (tmp_path / "a.py").write_text("from .b import x\n\ndef f():\n    from .c import y\n")
    (tmp_path / "b.py").write_text("x = 1\n")
    present, missing = remote_code_files(tmp_path, {"AutoConfig": "a.Config", "AutoModel": "other/repo--m.Model"})
    assert present == ["a.py", "b.py"] and missing == ["c.py"]
    assert remote_code_files(tmp_path, None) == ([], [])
