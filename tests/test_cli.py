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
SUBCOMMANDS = ["tokenize", "train", "evaluate", "sft", "convert", "push", "demo", "info"]


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


# ---------------------------------------------------------------------------------------------- audio input
# The issue-10 audio-input cases through `gemma-rvq tokenize` and `gemma-rvq evaluate`.
def _bad_files(folder: Path) -> dict[str, Path]:
    import numpy as np
    import soundfile

    wave, rate = soundfile.read(CLIPS[0], dtype="float32")
    files = {}
    files["unscaled-float"] = folder / "loud.wav"
    soundfile.write(files["unscaled-float"], wave * 32767, rate, subtype="FLOAT")  # int16 values as floats
    files["rate-16"] = folder / "sixteen.wav"
    soundfile.write(files["rate-16"], wave, 16, subtype="PCM_16")
    full = folder / "full.wav"
    soundfile.write(full, wave, rate, subtype="PCM_16")
    files["truncated"] = folder / "cut.wav"
    files["truncated"].write_bytes(full.read_bytes()[: full.stat().st_size // 3])
    files["stereo"] = folder / "stereo.wav"
    soundfile.write(files["stereo"], np.stack([wave, wave[::-1]], axis=1), rate, subtype="PCM_16")
    return files


MESSAGES = {"unscaled-float": "float samples reach", "rate-16": r"\[1000, 384000\]", "truncated": "truncated"}


@pytest.mark.parametrize("case", list(MESSAGES))
@pytest.mark.parametrize("command", ["tokenize", "evaluate"])
def test_bad_audio_files_fail_with_one_clear_line(model_dir, tmp_path, capsys, case, command):
    import re

    path = _bad_files(tmp_path)[case]
    extra = ["-o", str(tmp_path / "out.jsonl")] if command == "tokenize" else []
    assert main([command, str(CLIPS[0]), str(path), "-m", str(model_dir), *extra]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gemma-rvq")]  # not progress
    assert len(err) == 1 and err[0].startswith(f"gemma-rvq {command}: error:")
    assert re.search(MESSAGES[case], err[0]) and path.name in err[0]


def test_stereo_file_is_one_row(model_dir, tmp_path):
    path = _bad_files(tmp_path)["stereo"]
    out = tmp_path / "tokens.jsonl"
    assert main(["tokenize", str(path), "-m", str(model_dir), "-o", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 1
    assert main(["evaluate", str(path), "-m", str(model_dir)]) == 0


def test_tokenize_int_pcm_dataset_needs_pcm_dtype(model_dir, tmp_path, capsys):
    import datasets
    import numpy as np
    import soundfile

    wave, rate = soundfile.read(CLIPS[0], dtype="int16")
    folder = tmp_path / "pcm"
    datasets.Dataset.from_dict({"audio": [wave], "sr": [rate]}).save_to_disk(str(folder))
    base = ["tokenize", "--dataset", str(folder), "--sampling-rate-column", "sr", "-m", str(model_dir)]
    assert main([*base, "-o", str(tmp_path / "a.jsonl")]) == 1
    assert "pcm_dtype='int16'" in capsys.readouterr().err
    assert main([*base, "--pcm-dtype", "int16", "-o", str(tmp_path / "b.jsonl")]) == 0
    assert main(["tokenize", str(CLIPS[0]), "-m", str(model_dir), "-o", str(tmp_path / "c.jsonl")]) == 0
    row_int, row_file = (json.loads((tmp_path / n).read_text()) for n in ("b.jsonl", "c.jsonl"))
    assert row_int["semantic_tokens"] == row_file["semantic_tokens"]  # int16 scaled like the file's samples
    assert np.asarray(wave).dtype == np.int16


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet", ""])
def test_tokenize_writes_the_format_the_suffix_names(model_dir, tmp_path, suffix):
    import datasets
    import pandas as pd

    out = tmp_path / f"tokens{suffix}"
    assert main(["tokenize", *map(str, CLIPS[:2]), "-m", str(model_dir), "-o", str(out), "--codes"]) == 0
    if suffix == "":
        rows = datasets.load_from_disk(str(out)).to_list()
    elif suffix == ".jsonl":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    elif suffix == ".json":
        rows = json.loads(out.read_text())
    elif suffix == ".csv":
        rows = pd.read_csv(out).to_dict("records")
        for row in rows:
            row["audio_codes"] = json.loads(row["audio_codes"])
    else:
        rows = pd.read_parquet(out).to_dict("records")
        for row in rows:
            row["audio_codes"] = [list(level) for level in row["audio_codes"]]
    assert out.is_dir() == (suffix == "")
    assert [r["file"] for r in rows] == list(map(str, CLIPS[:2]))
    assert all(r["semantic_tokens"].startswith("<|") and len(r["audio_codes"]) == 2 for r in rows)


def test_tokenize_refuses_an_unknown_suffix_before_any_work(model_dir, tmp_path, capsys):
    assert main(["tokenize", str(CLIPS[0]), "-m", str(model_dir), "-o", str(tmp_path / "x.txt")]) == 1
    assert "cannot tell the output format" in capsys.readouterr().err
    assert not (tmp_path / "x.txt").exists()


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "unreachable"])
def test_offline_hub_id_and_mistyped_path_fail_within_seconds(tmp_path, monkeypatch, capsys, offline):
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    if not offline:  # a Hub endpoint that refuses connections, whatever network this machine has
        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}")
    for command in (["tokenize", str(CLIPS[0]), "-o", str(tmp_path / "o.jsonl")], ["evaluate", str(CLIPS[0])]):
        start = time.perf_counter()
        assert main([*command, "-m", "someone/not-cached-rvq"]) == 1
        assert time.perf_counter() - start < 5  # the retries this replaces took 46-54 s
        err = capsys.readouterr().err
        assert "someone/not-cached-rvq" in err and "GEMMA_RVQ_MODEL" in err and "HF_HUB_OFFLINE" in err
    for bad in ("./no-such-rvq", "no/such/rvq", str(tmp_path / "missing")):
        start = time.perf_counter()
        assert main(["info", bad]) == 1 and main(["evaluate", str(CLIPS[0]), "-m", bad]) == 1
        assert time.perf_counter() - start < 5
        assert capsys.readouterr().err.count("no such checkpoint file or folder") == 2


# ---------------------------------------------------------------------------------------------- parsers
def test_one_parser_per_task_for_the_example_and_the_subcommand(tmp_path, capsys):
    import runpy

    from gemma_rvq.commands import train
    from gemma_rvq.training import parse_args

    config = tmp_path / "run.yaml"
    config.write_text("output_dir: from-yaml\nbatch_size: 64\nmodel_config: {num_quantizers: 2}\n")
    argv = ["--config", str(config), "--batch-size", "32"]
    (from_command,) = train.make_parser(prog="gemma-rvq train").parse_args_and_config(argv)
    assert from_command == parse_args(argv)  # the library's parse_args is the same parser
    assert from_command.batch_size == 32 and from_command.output_dir == "from-yaml"  # the flag wins
    assert from_command.model_config == {"num_quantizers": 2}  # YAML mapping -> JSON text -> the config's dict
    (config.parent / "bad.yaml").write_text("batch_sise: 3\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown RVQTrainingConfig keys: \['batch_sise'\]"):
        train.make_parser().parse_args_and_config(["-c", str(config.parent / "bad.yaml")])
    # the example scripts import their parser from the library
    example = runpy.run_path(str(REPO / "examples" / "train_rvq.py"))
    assert example["make_parser"] is train.make_parser
    from gemma_rvq.commands import sft, tokenize

    assert runpy.run_path(str(REPO / "examples" / "sft.py"))["make_parser"] is sft.make_parser
    tokenize_example = (REPO / "examples" / "tokenize_dataset.py").read_text()
    assert "from gemma_rvq.commands.tokenize import main, make_parser" in tokenize_example
    standalone = tokenize.make_parser(prog="tokenize_dataset.py").parse_args(["a.wav", "-m", "x", "-o", "o.jsonl"])
    via_cli = build_parser().parse_args(["tokenize", "a.wav", "-m", "x", "-o", "o.jsonl"])
    assert vars(standalone) == {k: v for k, v in vars(via_cli).items() if k not in ("command", "traceback")}
    # gemma-rvq train / sft hand their arguments to the task's own parser
    assert main(["train", "-c", str(config.parent / "bad.yaml")]) == 1
    assert "unknown RVQTrainingConfig keys" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    assert "--recipe" in capsys.readouterr().out  # SemanticSFTArguments, through TrlParser


def test_tokenize_dtype_reaches_the_tokenizer(model_dir, tmp_path, capsys):
    """``--dtype`` (default auto) is used on the local path too, not only with --executor."""
    out = tmp_path / "t.jsonl"
    assert main(["tokenize", str(CLIPS[0]), "-m", str(model_dir), "-o", str(out), "--dtype", "bogus"]) == 1
    assert "unknown dtype 'bogus'" in capsys.readouterr().err
    rows = {}
    for dtype in ("float32", "none"):
        assert main(["tokenize", str(CLIPS[0]), "-m", str(model_dir), "-o", str(out), "--dtype", dtype]) == 0
        rows[dtype] = json.loads(out.read_text())["semantic_tokens"]
    assert rows["float32"] == rows["none"]  # the saved tiny model is float32: casting to it changes nothing
    assert build_parser().parse_args(["tokenize", "a.wav", "-m", "x", "-o", "o.jsonl"]).dtype == "auto"
