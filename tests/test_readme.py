"""Every code block of README.md runs, in order, as a user would run it — so the README cannot rot.

Nothing can be downloaded here, so the Hub repos the README names are served from a local Hugging Face
cache (HF_HUB_OFFLINE=1) that this test fills with tiny random stand-ins of the same kinds: a seed-format
RVQ checkpoint, a Gemma 4 audio encoder, a Llama and a Gemma 4 model with their tokenizers. The README's
commands then run verbatim, except that the two LLM fine-tuning commands get CPU overrides appended
(`CPU_SFT_OVERRIDES`: a couple of fp32 steps instead of a multi-GPU bf16 run). `make demo` and `make test`
are not re-run here: CI runs `make test`, and `make demo` is the demo (tested in test_demo.py).

The blocks run in order through `readme_session.py`: each block and each command in its own process, forked
from one interpreter that has imported torch, transformers, datasets & co. (never gemma_rvq), so no step sees
another's state, as for a user running them one by one; `gemma-rvq` / `accelerate` run through their
console-script entry points, and what those launch (`accelerate launch examples/x.py` -> `python x.py`) as
real interpreters. Much of this test's time was interpreter starts and those imports (~6-7 CPU s per step).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BIN = Path(sys.executable).parent
NOT_RUN_HERE = {"make demo", "make test"}
CPU_SFT_OVERRIDES = (
    "--max_steps 2 --bf16 false --dtype float32 --activation_checkpointing false --report_to none "
    "--save_strategy no --dataset_num_proc 1 --per_device_train_batch_size 2 --gradient_accumulation_steps 1 "
    "--logging_steps 1 --disable_tqdm true"
)
SEED_REPO = "ik/speechless-twi-stage1-rvq-gemma4"
ENCODER_REPO = "rnagabh/gemma4-audio-encoder"

vqp = pytest.importorskip("vector_quantize_pytorch")


def readme_blocks() -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block, in order."""
    return [(m[1], m[2]) for m in re.finditer(r"```(\w+)\n(.*?)```", README.read_text(encoding="utf-8"), re.S)]


def _cache_repo(cache: Path, repo_id: str, folder: Path) -> None:
    """Lay out ``folder`` as huggingface_hub's cache leaves a downloaded repo (refs/main -> snapshot)."""
    sha = "0" * 40
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    (repo / ".no_exist" / sha).mkdir(parents=True)
    for item in folder.iterdir():
        shutil.copy(item, snapshot / item.name)


def _sft_model_ids() -> dict[str, str]:
    """model_name_or_path of every recipe YAML the README launches."""
    import yaml

    ids = {}
    for _, code in readme_blocks():
        for config in re.findall(r"--config (examples/recipes/\S+\.yaml)", code):
            ids[config] = yaml.safe_load((REPO / config).read_text())["model_name_or_path"]
    return ids


def _fill_hub_cache(cache: Path, staging: Path) -> None:
    import torch
    from transformers import Gemma4AudioFeatureExtractor, Gemma4AudioModel

    from gemma_rvq.testing import (
        byte_level_bpe_tokenizer,
        sentencepiece_tokenizer,
        tiny_gemma4_audio_config,
        tiny_gemma4_multimodal,
        tiny_llama,
    )

    # the Gemma 4 audio encoder the seed quantizer references
    encoder_dir = staging / "encoder"
    torch.manual_seed(0)
    Gemma4AudioModel(tiny_gemma4_audio_config()).save_pretrained(encoder_dir)
    Gemma4AudioFeatureExtractor().save_pretrained(encoder_dir)
    _cache_repo(cache, ENCODER_REPO, encoder_dir)

    # the seed's RVQ checkpoint: LayerNorm -> Linear -> vector_quantize_pytorch.ResidualVQ -> LayerNorm -> Linear
    from test_convert import SeedWrapper, _perturb_and_train

    dim = tiny_gemma4_audio_config().hidden_size
    wrapper = SeedWrapper(dim=dim, rvq_dim=dim, q=8, k=64)
    _perturb_and_train(wrapper, wrapper, dim)
    seed_dir = staging / "seed"
    seed_dir.mkdir()
    torch.save({"rvq": wrapper.state_dict()}, seed_dir / "rvq_averaged.pt")
    (seed_dir / "config_stage1.json").write_text(
        json.dumps({"rvq_dim": dim, "rvq_num_quantizers": 8, "rvq_codebook_size": 64})
    )
    _cache_repo(cache, SEED_REPO, seed_dir)

    # the LLMs of the fine-tuning recipes
    for model_id in set(_sft_model_ids().values()):
        folder = staging / model_id.replace("/", "--")
        if "gemma-4" in model_id:
            tokenizer = sentencepiece_tokenizer()
            model = tiny_gemma4_multimodal(tokenizer)
        else:
            tokenizer = byte_level_bpe_tokenizer()
            model = tiny_llama(tokenizer)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        _cache_repo(cache, model_id, folder)


def readme_steps() -> list[dict]:
    """The README's code blocks as session steps: each Python block, and each command of each bash block."""
    steps = []
    for i, (lang, code) in enumerate(readme_blocks()):
        if lang == "python":
            steps.append({"kind": "python", "code": code, "index": i, "what": f"python block {i}"})
        elif lang == "bash":
            commands = [line.split("#")[0].strip() for line in code.replace("\\\n", " ").splitlines()]
            for command in filter(None, commands):
                if command in NOT_RUN_HERE:
                    continue
                if "examples/sft.py" in command:
                    command = f"{command} {CPU_SFT_OVERRIDES}"
                steps.append({"kind": "command", "argv": shlex.split(command), "what": f"command {command!r}"})
        else:
            pytest.fail(f"README block {i} has language {lang!r}: this test runs only python and bash")
    return steps


def _run_session(steps: list[dict], cwd: Path, env: dict, logs: Path) -> list[str]:
    """Run ``steps`` in one ``readme_session.py`` process; the output of each, or the failure of the first that
    fails (with its output)."""
    logs.mkdir()
    (logs / "steps.json").write_text(json.dumps(steps), encoding="utf-8")
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("readme_session.py")), str(logs / "steps.json"),
                           str(logs)], cwd=cwd, env=env, capture_output=True, text=True)
    outputs = []
    for i, step in enumerate(steps):
        log, record = logs / f"step-{i}.log", logs / f"step-{i}.json"
        if not record.is_file():
            pytest.fail(f"README {step['what']} did not finish (session exit {proc.returncode}):\n"
                        f"{log.read_text()[-6000:] if log.is_file() else ''}\n{proc.stderr[-3000:]}")
        status = json.loads(record.read_text())["status"]
        if status != 0:
            pytest.fail(f"README {step['what']} failed (exit {status}):\n{log.read_text()[-8000:]}")
        outputs.append(log.read_text())
    return outputs


@pytest.mark.slow
def test_readme_code_blocks_run(tmp_path):
    blocks = readme_blocks()
    assert [lang for lang, _ in blocks].count("python") >= 2, "README lost its Python examples"
    work = tmp_path / "work"
    work.mkdir()
    for name in ("data", "examples"):
        (work / name).symlink_to(REPO / name)
    cache = tmp_path / "hub"
    _fill_hub_cache(cache, tmp_path / "staging")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("GEMMA_RVQ_MODEL", None)  # tokenize_speech's default model must be the seed repo

    outputs = _run_session(readme_steps(), work, env, tmp_path / "session")

    # what the README says the blocks produce
    text = "\n".join(outputs)
    assert "torch.Size([1, 8," in text  # audio_codes [1, Q=8, T]
    assert "<|rvq_start|><|q0_" in text  # tokenize_speech output
    assert (work / "twi-rvq" / "config.json").is_file()
    assert (work / "runs" / "rvq-tiny" / "best" / "config.json").is_file()
    assert "'fvu'" in text and "'codebook_utilization'" in text
    assert len(_sft_model_ids()) == 2  # stage 2 and stage 3
