"""The ``gemma-rvq`` command: complete help, one-line errors, and the read-only subcommands end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gemma_rvq.cli import build_parser, main, repo_type_of
from gemma_rvq.testing import tiny_rvq_model

REPO = Path(__file__).resolve().parents[1]
CLIPS = sorted((REPO / "data" / "corpus" / "clips").glob("*.flac"))
SUBCOMMANDS = ["tokenize", "train", "evaluate", "convert", "push", "demo", "info"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-rvq")
    tiny_rvq_model(num_quantizers=2, codebook_size=16).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_complete_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: gemma-rvq {command}" in text
    # every option documents itself
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if action.dest != "help":
            assert action.help, f"gemma-rvq {command}: option {action.dest} has no help text"


def test_errors_are_one_line_and_nonzero(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gemma-rvq info: error:")
    assert main(["evaluate", str(CLIPS[0]), "-m", str(tmp_path / "nope")]) == 1
    assert "no such checkpoint" in capsys.readouterr().err
    assert main(["info", str(tmp_path)]) == 1
    assert "not a gemma-rvq or seed checkpoint" in capsys.readouterr().err


def test_console_script_exit_status(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "gemma_rvq.cli", "info", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr


def test_info_describes_checkpoint(model_dir, capsys):
    assert main(["info", str(model_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["quantizer"]["num_quantizers"] == 2
    assert info["quantizer"]["codebook_size"] == 16
    assert info["encoder"]["bundled"] is True
    assert info["weights"]["quantizer_tensors"]["quantizer.codebooks"] == [2, 16, 64]
    assert info["loads_without_gemma_rvq"] is True


def test_evaluate_and_tokenize_on_real_clips(model_dir, tmp_path, capsys):
    out_json = tmp_path / "metrics.json"
    assert main(["evaluate", *map(str, CLIPS[:3]), "-m", str(model_dir), "-o", str(out_json)]) == 0
    metrics = json.loads(out_json.read_text())
    assert metrics["num_files"] == 3
    assert 0.0 < metrics["codebook_utilization"] <= 1.0
    assert len(metrics["codebook_perplexity_per_level"]) == 2
    assert metrics["mse"] > 0

    out = tmp_path / "tokens.jsonl"
    assert main(["tokenize", *map(str, CLIPS[:3]), "-m", str(model_dir), "-o", str(out), "--codes"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    from gemma_rvq.tokens import format_for_model

    # the preset is fitted to the model: 2 levels of 16 codes
    fmt = format_for_model("gemma_rvq", codebook_size=16, num_quantizers=2)
    for row in rows:
        parsed = fmt.parse(row["semantic_tokens"])
        assert parsed.codes.shape[0] == 2
        assert parsed.codes.tolist() == row["audio_codes"]
        assert row["num_frames"] == parsed.codes.shape[1]


def test_push_detects_repo_type(tmp_path, model_dir):
    import datasets

    assert repo_type_of(model_dir) == "model"
    ds_dir = tmp_path / "ds"
    datasets.Dataset.from_dict({"a": [1]}).save_to_disk(str(ds_dir))
    assert repo_type_of(ds_dir) == "dataset"
    space = tmp_path / "space"
    space.mkdir()
    (space / "README.md").write_text("---\nsdk: gradio\napp_file: app.py\n---\n# metric\n")
    assert repo_type_of(space) == "space"
