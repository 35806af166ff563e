"""Stage-2/3 folders are Hub-ready: a real model card (base model, data, recipe, results, usage that runs)
rendered from data through the template, and no local path in any file (adapter_config.json, the recipe
file, the card; no pickled training arguments).

Every run goes through ``gemma-rvq sft``'s own parser (``gemma_rvq.commands.sft``) on tiny real models; the
usage snippets of the cards run against a local Hugging Face cache that holds the folders under Hub ids
(HF_HUB_OFFLINE=1), as they would after ``gemma-rvq push``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gemma_rvq.cards import LOCAL_PATHS_FILE, HubReference, hub_reference, training_hyperparameters
from gemma_rvq.commands import sft as sft_command
from gemma_rvq.formats import FORMAT_FILE, attach_format, load_format_record, save_format
from gemma_rvq.hub import find_local_paths, plan_upload, split_card
from gemma_rvq.testing import byte_level_bpe_tokenizer, tiny_llama, toy_semantic_pairs
from gemma_rvq.tokens import get_format

ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = ROOT / "examples" / "recipes"
FORMAT = get_format("gemma_rvq", codebook_size=8, num_levels=2)
BASE_ID = "tiny-org/tiny-llama"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Everything of this module lives below one temporary folder: no file may name it."""
    return tmp_path_factory.mktemp("cards")


@pytest.fixture(scope="module")
def base_dir(root) -> Path:
    tokenizer = byte_level_bpe_tokenizer()
    tiny_llama(tokenizer, hidden_size=32).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    return root / "base"


@pytest.fixture(scope="module")
def data(root) -> dict[str, Path]:
    (root / "rvq-model").mkdir()  # the stage-1 model the tokens came from: a local folder
    pairs = attach_format(toy_semantic_pairs(FORMAT, num_rows=8, seed=1), FORMAT, speech_tokenizer=root / "rvq-model")
    pairs.save_to_disk(root / "pairs")
    instructions = pairs.map(lambda row: {"response": "Answer: " + row["text"].lower()}).rename_column(
        "text", "instruction")
    (root / "instructions").mkdir()
    instructions.to_json(root / "instructions" / "instructions.jsonl")
    save_format(root / "instructions", FORMAT)  # the format beside a JSON Lines file
    return {"pairs": root / "pairs", "instructions": root / "instructions" / "instructions.jsonl"}


def train(config: str, **overrides):
    """``gemma-rvq sft --config examples/recipes/<config> --key value ...`` (in process)."""
    argv = ["--config", str(RECIPES_DIR / config)]
    for key, value in overrides.items():
        argv += [f"--{key}", str(value)]
    return sft_command.run(argv)


@pytest.fixture(scope="module")
def lora_dir(root, base_dir, data) -> Path:
    """Stage 2 as a LoRA adapter of a base whose Hub id is given (a pre-downloaded copy)."""
    train("tiny_speechless.yaml", model_name_or_path=base_dir, base_model_id=BASE_ID, dataset_name=data["pairs"],
          output_dir=root / "speechless-lora", use_peft="true", hub_model_id="someone/speechless-lora",
          language="English")
    return root / "speechless-lora"


@pytest.fixture(scope="module")
def full_dir(root, base_dir, data) -> Path:
    """Stage 3 as a full fine-tune of a local base without a Hub id, with an evaluation split."""
    train("tiny_speech_instruct.yaml", model_name_or_path=base_dir, dataset_name=data["instructions"],
          output_dir=root / "speech-instruct", use_peft="false", hub_model_id="someone/speech-instruct")
    return root / "speech-instruct"


def _every_file_free_of(folder: Path, text: str) -> None:
    """No file that ``gemma-rvq push`` would upload names ``text``; only the local-paths file (never uploaded)
    may."""
    plan = plan_upload(folder, "someone/x")
    needle = text.encode()
    for name, _ in plan.files:
        assert needle not in (folder / name).read_bytes(), f"{name} names {text}"
    assert plan.local_paths == {}
    assert set(plan.ignored) <= {LOCAL_PATHS_FILE}, plan.ignored


def _as_uploaded(folder: Path, target: Path) -> Path:
    """The files of ``folder`` that ``gemma-rvq push`` uploads, copied to ``target`` (a copy from the Hub)."""
    for name, _ in plan_upload(folder, "someone/x").files:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / name, target / name)
    return target


def _card(folder: Path) -> tuple[dict, str]:
    return split_card((folder / "README.md").read_text(encoding="utf-8"))


def _usage(body: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", body, re.S)
    assert len(blocks) == 1, "the card has one usage block"
    return blocks[0]


def test_lora_adapter_folder_is_hub_ready(lora_dir, root):
    _every_file_free_of(lora_dir, str(root))
    assert set(find_local_paths(lora_dir)) == {LOCAL_PATHS_FILE}  # this machine's paths: there only
    names = {p.name for p in lora_dir.iterdir()}
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "gemma_rvq_recipe.json"} <= names
    assert "training_args.bin" not in names  # a pickle of the arguments, paths included
    adapter = json.loads((lora_dir / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == BASE_ID
    recipe = json.loads((lora_dir / "gemma_rvq_recipe.json").read_text())
    assert (recipe["base_model"], recipe["model_id"]) == (BASE_ID, "someone/speechless-lora")
    # save_embedding_layers=False, deliberately: only LoRA and the new tokens' rows, not two embedding matrices
    from safetensors.torch import load_file

    weights = load_file(lora_dir / "adapter_model.safetensors")
    assert not [k for k in weights if k.endswith(("embed_tokens.weight", "lm_head.weight"))]


def test_the_speech_tokenizer_is_named_and_found_locally(lora_dir, root, tmp_path):
    """The stage-1 model recorded with the data is a local folder: the uploaded files name it, the local-paths
    file finds it on this machine (the speech-instruct pipeline's default), a copy from the Hub has none."""
    recipe = json.loads((lora_dir / "gemma_rvq_recipe.json").read_text())
    assert (recipe["speech_tokenizer"], recipe["speech_tokenizer_name"]) == (None, "rvq-model")
    assert json.loads((lora_dir / FORMAT_FILE).read_text())["speech_tokenizer"] is None
    assert load_format_record(lora_dir).speech_tokenizer == str(root / "rvq-model")
    assert load_format_record(_as_uploaded(lora_dir, tmp_path)).speech_tokenizer is None
    assert "`rvq-model` (local)" in _card(lora_dir)[1]


def test_lora_card_says_what_was_trained(lora_dir):
    meta, body = _card(lora_dir)
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert meta["base_model"] == BASE_ID and meta["base_model_relation"] == "adapter"
    assert {"gemma-rvq", "speechless", "lora", "trl"} <= set(meta["tags"])
    assert meta["model_name"] == "speechless-lora" and "datasets" not in meta  # the data was a local folder
    for default in ("fine-tuned version of None", 'model="None"', "[More Information Needed]", "| None |"):
        assert default not in body, default  # TRL's and PEFT's defaults
    for text in ("# speechless-lora", "stage 2 (Speechless)", f"[{BASE_ID}](https://huggingface.co/{BASE_ID})",
                 "LoRA adapter (r=4, alpha=8)", "format `gemma_rvq`: 2 level(s) x 8 codes",
                 "`pairs` (local), 8 training examples", "language `English`", "| Steps | 2 ",
                 "| `max_steps` | `2` |", "| `learning_rate` | `0.001` |", "trainable_token_indices"):
        assert text in body, text
    assert 'load_sft_model("someone/speechless-lora")' in _usage(body)
    assert "output_dir" not in body and "`seed`" not in body  # where and bookkeeping are not hyperparameters


def test_local_base_without_an_id_is_named_not_pathed(root, base_dir, data, tmp_path):
    out = tmp_path / "adapter"
    trainer = train("tiny_speechless.yaml", model_name_or_path=base_dir, dataset_name=data["pairs"],
                    output_dir=out, use_peft="true", learning_rate=5e-2)
    _every_file_free_of(out, str(root))
    _every_file_free_of(out, str(tmp_path))
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    recipe = json.loads((out / "gemma_rvq_recipe.json").read_text())
    assert recipe["base_model"] is None and recipe["base_model_name"] == "base"
    meta, body = _card(out)
    assert "base_model" not in meta
    assert "`base`: a local model, not on the Hub" in body
    assert 'base_model_name_or_path="path/to/base"' in _usage(body)

    # on this machine the folder remembers its base in the local-paths file (never uploaded) ...
    assert json.loads((out / LOCAL_PATHS_FILE).read_text())["base_model"] == str(base_dir)
    from gemma_rvq.recipes import load_sft_model

    batch_text = ["Hello there\n<|rvq_start|><|q0_0003|><|q1_0005|><|rvq_end|>"]
    trainer.model.eval()
    model, tokenizer = load_sft_model(str(out))
    batch = tokenizer(batch_text, return_tensors="pt")
    with torch.no_grad():
        expected = trainer.model(**batch).logits
        torch.testing.assert_close(model.eval()(**batch).logits, expected, rtol=1e-5, atol=1e-5)
    # ... a copy as uploaded does not: the base must be named, and given it, the adapter reproduces the model
    hub_copy = _as_uploaded(out, tmp_path / "from-the-hub")
    with pytest.raises(ValueError, match=r"local base model \('base'\).*base_model_name_or_path"):
        load_sft_model(str(hub_copy))
    model, tokenizer = load_sft_model(str(hub_copy), base_model_name_or_path=str(base_dir))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch).logits, expected, rtol=1e-5, atol=1e-5)


def test_full_model_card_and_folder(full_dir, root):
    _every_file_free_of(full_dir, str(root))
    assert "training_args.bin" not in {p.name for p in full_dir.iterdir()}
    meta, body = _card(full_dir)
    assert meta["library_name"] == "transformers" and "base_model" not in meta  # the base was local
    assert "speech-instruct" in meta["tags"] and "lora" not in meta["tags"]
    assert "| System prompt | You answer spoken questions. |" in body
    assert "full model" in body and "`base`: a local model, not on the Hub" in body
    assert 'load_sft_model("someone/speech-instruct")' in _usage(body)


def test_a_stage2_folder_with_a_hub_id_names_the_stage3_base(root, full_dir, data, tmp_path):
    """Stage 3 trained from a local stage-2 folder that has its own Hub id (hub_model_id) names that id."""
    train("tiny_speech_instruct.yaml", model_name_or_path=full_dir, dataset_name=data["instructions"],
          output_dir=tmp_path / "next", use_peft="true")
    meta, _ = _card(tmp_path / "next")
    assert meta["base_model"] == "someone/speech-instruct" and meta["base_model_relation"] == "adapter"
    adapter = json.loads((tmp_path / "next" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "someone/speech-instruct"


def test_distilled_student_card(root, full_dir, data, tmp_path):
    from gemma_rvq.commands import sft as _  # noqa: F401 - the sft extra is installed
    from gemma_rvq.recipes.distill import DistillArguments, LayerDistillationConfig, run_distill

    script_args = DistillArguments(teacher_model_name_or_path=str(full_dir), dataset_name=str(data["instructions"]),
                                   recipe="speech_instruct", system_prompt="You answer spoken questions.",
                                   layer_stride=2, **{k: v for k, v in FORMAT_ARGS.items()})
    training_args = LayerDistillationConfig(
        output_dir=str(tmp_path / "student"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
        max_length=128, bf16=False, use_cpu=True, activation_checkpointing=False, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True)
    run_distill(script_args, training_args)
    student = tmp_path / "student"
    _every_file_free_of(student, str(root))
    _every_file_free_of(student, str(tmp_path))
    meta, body = _card(student)
    assert meta["base_model"] == "someone/speech-instruct" and "distillation" in meta["tags"]
    assert "distilled from [someone/speech-instruct]" in body and "student layers" in body
    recipe = json.loads((student / "gemma_rvq_recipe.json").read_text())
    assert recipe["distillation"]["teacher"] == "someone/speech-instruct"


FORMAT_ARGS = {"token_format": "gemma_rvq", "codebook_size": 8, "num_levels": 2}


def _cache_repo(cache: Path, repo_id: str, folder: Path) -> None:
    """``folder`` laid out as huggingface_hub's cache leaves a downloaded repo."""
    sha = "0" * 40
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    (repo / ".no_exist" / sha).mkdir(parents=True)
    shutil.copytree(folder, repo / "snapshots" / sha)


@pytest.mark.slow
def test_card_usage_runs_from_the_hub(lora_dir, full_dir, base_dir, tmp_path):
    """The cards' usage blocks, verbatim, against the folders served as Hub repos (one interpreter)."""
    cache = tmp_path / "hub"
    for repo_id, folder in ((BASE_ID, base_dir), ("someone/speechless-lora", lora_dir),
                            ("someone/speech-instruct", full_dir)):
        _cache_repo(cache, repo_id, folder)
    blocks = [_usage(_card(folder)[1]) for folder in (lora_dir, full_dir)]
    script = "\n".join(f"exec({block!r}, {{'__name__': '__main__'}})\nprint('<<block done>>')" for block in blocks)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    speechless, instruct = proc.stdout.split("<<block done>>")[:2]
    assert speechless.strip()  # a token string, or the reason one did not parse
    assert isinstance(instruct, str)


def test_hub_reference(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub_reference("meta-llama/Llama-3.2-1B") == HubReference("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B")
    assert hub_reference(None) == HubReference(None, None)
    (tmp_path / "models" / "llama").mkdir(parents=True)
    assert hub_reference(tmp_path / "models" / "llama") == HubReference(None, "llama")
    assert hub_reference("models/llama") == HubReference(None, "llama")  # relative, existing: local
    assert hub_reference(str(tmp_path / "models" / "llama"), "me/llama") == HubReference("me/llama", "me/llama")
    (tmp_path / "models" / "llama" / "gemma_rvq_recipe.json").write_text(json.dumps({"model_id": "me/stage2"}))
    assert hub_reference(tmp_path / "models" / "llama").id == "me/stage2"
    with pytest.raises(ValueError, match="is a local path, not a Hub repo id"):
        hub_reference("x", str(tmp_path))


def test_hyperparameters_show_no_paths(tmp_path):
    from trl import SFTConfig

    args = SFTConfig(output_dir=str(tmp_path / "out"), learning_rate=3e-4, max_steps=7, activation_checkpointing=False,
                     bf16=False, use_cpu=True, report_to="none", chat_template_path=str(tmp_path), seed=3)
    shown = training_hyperparameters(args)
    assert shown["learning_rate"] == 3e-4 and shown["max_steps"] == 7
    assert not any(str(tmp_path) in str(v) for v in shown.values())
    assert {"output_dir", "chat_template_path", "seed", "report_to", "gradient_checkpointing"}.isdisjoint(shown)
