"""``gemma-rvq push``: the dry run (what would be uploaded, where; nothing sent), offline and unreachable-Hub
failures within seconds naming the repo, and the local-path guard. No upload ever happens here: the Hub is
switched off through huggingface_hub's own offline switch, or pointed at a closed local port."""

from __future__ import annotations

import json
import re
import time

import pytest
from huggingface_hub import constants

from gemma_rvq import cli
from gemma_rvq.hub import find_local_paths, plan_upload


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 as huggingface_hub reads it: every request it would make raises at once."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "speechless-lm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8}))
    (folder / "model.safetensors").write_bytes(b"\0" * 2500)
    (folder / "README.md").write_text("---\nlibrary_name: transformers\n---\n\n# a model\n")
    (folder / "checkpoint-20").mkdir()  # intermediate checkpoints are never uploaded (as Trainer.push_to_hub)
    (folder / "checkpoint-20" / "optimizer.pt").write_bytes(b"\0" * 10)
    return folder


def test_dry_run_lists_files_sizes_and_target_and_uploads_nothing(model_folder, offline, capsys):
    assert cli.main(["push", str(model_folder), "someone/speechless-lm", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "model repository someone/speechless-lm (https://huggingface.co/someone/speechless-lm)" in out
    assert re.search(r"model\.safetensors\s+2\.5 KB", out) and re.search(r"config\.json\s+\d+ B", out)
    assert "Would upload 3 files" in out and "Nothing was uploaded (dry run)." in out
    assert "checkpoint-20/optimizer.pt" in out.split("left out")[1]
    plan = plan_upload(model_folder, "someone/speechless-lm")
    assert [name for name, _ in plan.files] == ["README.md", "config.json", "model.safetensors"]
    assert plan.total_bytes == sum(p.stat().st_size for p in model_folder.glob("*") if p.is_file())


def test_dry_run_detects_the_repo_type(tmp_path, offline, capsys):
    dataset = tmp_path / "tokens"
    dataset.mkdir()
    (dataset / "dataset_dict.json").write_text('{"splits": ["train"]}')
    assert cli.main(["push", str(dataset), "someone/tokens", "--dry-run"]) == 0
    assert "dataset repository someone/tokens (https://huggingface.co/datasets/someone/tokens)" in capsys.readouterr().out
    space = tmp_path / "metric"
    space.mkdir()
    (space / "README.md").write_text("---\nsdk: gradio\napp_file: app.py\n---\n")
    (space / "app.py").write_text("")
    assert cli.main(["push", str(space), "metric", "--dry-run", "--private"]) == 0
    out = capsys.readouterr().out
    assert "private space repository metric (https://huggingface.co/spaces/<your-namespace>/metric)" in out


def test_offline_push_fails_at_once_naming_the_repo_and_hf_hub_offline(model_folder, offline, capsys):
    start = time.perf_counter()
    assert cli.main(["push", str(model_folder), "someone/speechless-lm"]) == 1
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert "cannot push to 'someone/speechless-lm'" in err and "HF_HUB_OFFLINE" in err and "--dry-run" in err


def test_unreachable_hub_fails_within_seconds_naming_the_repo(model_folder, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.perf_counter()
    assert cli.main(["push", str(model_folder), "someone/speechless-lm"]) == 1
    assert time.perf_counter() - start < 10
    err = capsys.readouterr().err
    assert "cannot push to 'someone/speechless-lm'" in err and "unreachable" in err and "HF_HUB_OFFLINE" in err


def test_files_naming_local_paths_are_flagged_and_refused(model_folder, tmp_path, offline, capsys):
    base = tmp_path / "base-lm"
    base.mkdir()
    (model_folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    (model_folder / "notes.md").write_text("see https://huggingface.co/a/b and /no/such/dir/here")  # not local paths
    assert find_local_paths(model_folder) == {"adapter_config.json": [str(base)]}
    assert cli.main(["push", str(model_folder), "someone/x", "--dry-run"]) == 0
    assert f"WARNING: adapter_config.json contains local path(s) {base}" in capsys.readouterr().out
    assert cli.main(["push", str(model_folder), "someone/x"]) == 1
    err = capsys.readouterr().err
    assert "not Hub-ready" in err and "adapter_config.json" in err and "--allow-local-paths" in err
    # with the override the upload is attempted (and stops at the offline switch)
    assert cli.main(["push", str(model_folder), "someone/x", "--allow-local-paths"]) == 1
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err


def test_bad_input_is_named(tmp_path, capsys):
    assert cli.main(["push", str(tmp_path / "missing"), "someone/x", "--dry-run"]) == 1
    assert "no such folder" in capsys.readouterr().err
    assert cli.main(["push", str(tmp_path), "not a repo", "--dry-run"]) == 1
    assert "invalid Hub repo id 'not a repo'" in capsys.readouterr().err
