"""examples/sft.py and gemma_rvq.recipes.sft on tiny real models (Llama + byte-level BPE, Gemma 3 + SentencePiece).

Every training run goes through ``examples/sft.py``'s ``main`` with arguments parsed by its ``TrlParser``
from the tiny YAML recipes, as ``accelerate launch examples/sft.py --config ...`` would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from conftest import load_script
from gemma_rvq.formats import dataset_format, save_format
from gemma_rvq.recipes import (
    RECIPE_FILE,
    build_sft_trainer,
    load_sft_model,
    run_sft,
)
from gemma_rvq.testing import (
    byte_level_bpe_tokenizer,
    sentencepiece_tokenizer,
    tiny_gemma_lm,
    tiny_llama,
    toy_semantic_pairs,
)
from gemma_rvq.tokens import get_format

ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = ROOT / "examples" / "recipes"
FORMAT = {"token_format": "gemma_rvq", "codebook_size": 8, "num_levels": 2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


SFT = load_script("examples/sft.py", "sft_script")


def parse(config: str, **overrides):
    """Parse examples/recipes/<config> + overrides exactly as the script's command line would."""
    args = ["--config", str(RECIPES_DIR / config)]
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    return SFT.make_parser().parse_args_and_config(args)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = byte_level_bpe_tokenizer()
    tiny_llama(tokenizer, hidden_size=48).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-gemma")
    tokenizer = sentencepiece_tokenizer()
    tiny_gemma_lm(tokenizer, hidden_size=48).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> dict[str, Path]:
    """The toy datasets, saved as the script would find them (save_to_disk folders and a jsonl file)."""
    root = tmp_path_factory.mktemp("data")
    pairs = toy_semantic_pairs(get_format("gemma_rvq", codebook_size=8, num_levels=2),
                               num_rows=8, seed=1)
    pairs.save_to_disk(root / "pairs")
    save_format(root, dataset_format(pairs))  # semantic_format.json beside instructions.jsonl
    instructions = pairs.map(lambda row: {"response": "Answer: " + row["text"].lower()}).rename_column(
        "text", "instruction")
    instructions.to_json(root / "instructions.jsonl")
    return {"pairs": root / "pairs", "instructions": root / "instructions.jsonl"}


def _rows(model, ids):
    """(input rows, output rows) of ``ids``, as the model computes them (PEFT wrappers included)."""
    index = torch.tensor(ids)
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    inputs = embed(index[None])[0].detach().clone()
    eye = torch.eye(model.config.get_text_config().hidden_size)
    outputs = head(eye)[:, index].T.detach().clone()  # [len(ids), hidden]: the head's rows
    return inputs, outputs


@pytest.mark.parametrize(
    ("model_fixture", "recipe", "config", "extra"),
    [
        ("llama_dir", "speechless", "tiny_speechless.yaml", {}),
        ("gemma_dir", "speechless", "tiny_speechless.yaml", {"use_peft": "true"}),
        ("llama_dir", "speech_instruct", "tiny_speech_instruct.yaml", {"use_peft": "false"}),
        ("gemma_dir", "speech_instruct", "tiny_speech_instruct.yaml", {}),
        ("llama_dir", "asr", "tiny_asr.yaml", {"use_peft": "true"}),
        ("gemma_dir", "asr", "tiny_asr.yaml", {}),
    ],
)
def test_each_recipe_trains_two_steps_through_the_script(request, tmp_path, data_dir, model_fixture, recipe,
                                                         config, extra):
    model_path = request.getfixturevalue(model_fixture)
    dataset = data_dir["instructions"] if recipe == "speech_instruct" else data_dir["pairs"]
    script_args, training_args, model_args = parse(
        config, model_name_or_path=model_path, dataset_name=dataset, output_dir=tmp_path / "out", **extra)
    assert script_args.recipe == recipe
    trainer = SFT.main(script_args, training_args, model_args)

    assert trainer.state.global_step == 2
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    saved = json.loads((tmp_path / "out" / RECIPE_FILE).read_text())
    assert saved["recipe"] == recipe and saved["num_new_tokens"] == len(get_format("gemma_rvq", **{
        k: v for k, v in FORMAT.items() if k != "token_format"}).vocabulary())
    weights = "adapter_model.safetensors" if model_args.use_peft else "model.safetensors"
    assert (tmp_path / "out" / weights).is_file()


def test_completion_only_masking_of_speechless_labels(tmp_path, llama_dir, data_dir):
    script_args, training_args, model_args = parse(
        "tiny_speechless.yaml", model_name_or_path=llama_dir, dataset_name=data_dir["pairs"],
        output_dir=tmp_path, language="Swahili")
    trainer = build_sft_trainer(script_args, training_args, model_args)
    tokenizer = trainer.processing_class
    pairs = Dataset.load_from_disk(str(data_dir["pairs"]))
    by_tokens = dict(zip(pairs["semantic_tokens"], pairs["text"]))
    for row in trainer.train_dataset:
        ids, labels = row["input_ids"], row["labels"]
        first = next(i for i, label in enumerate(labels) if label != -100)
        assert all(label == -100 for label in labels[:first])
        assert labels[first:] == ids[first:]
        completion = tokenizer.decode(ids[first:])
        assert completion.endswith(tokenizer.eos_token)
        tokens = completion[: -len(tokenizer.eos_token)]
        assert tokens in by_tokens  # the loss covers exactly the token string (+ eos)
        assert tokenizer.decode(ids[:first], skip_special_tokens=True) == f"[Swahili] {by_tokens[tokens]}\n"


@pytest.mark.parametrize("output", ["prompt_completion", "messages"])
def test_assistant_only_masking_of_speech_instruct_labels(tmp_path, gemma_dir, data_dir, output):
    script_args, training_args, model_args = parse(
        "tiny_speech_instruct.yaml", model_name_or_path=gemma_dir, dataset_name=data_dir["instructions"],
        output_dir=tmp_path, instruct_output=output)
    trainer = build_sft_trainer(script_args, training_args, model_args)
    tokenizer = trainer.processing_class
    answers = set(Dataset.from_json(str(data_dir["instructions"]))["response"])
    for row in trainer.train_dataset:
        ids, labels = row["input_ids"], row["labels"]
        trained = [i for i, label in zip(ids, labels) if label != -100]
        assert [label for label in labels if label != -100] == trained
        first = labels.index(trained[0])
        assert all(label == -100 for label in labels[:first])  # system/user turns and the semantic tokens
        text = tokenizer.decode(trained)
        assert text.endswith("<end_of_turn>\n") or text.endswith("<end_of_turn>")
        assert text.split("<end_of_turn>")[0] in answers
        assert "<|rvq_start|>" in tokenizer.decode(ids[:first])


@pytest.mark.parametrize(("model_fixture", "tied"), [("llama_dir", False), ("gemma_dir", True)])
def test_lora_trains_new_token_rows_only_and_reloads(tmp_path, data_dir, model_fixture, tied, request):
    model_path = request.getfixturevalue(model_fixture)
    script_args, training_args, model_args = parse(
        "tiny_speechless.yaml", model_name_or_path=model_path, dataset_name=data_dir["pairs"],
        output_dir=tmp_path / "out", use_peft="true", learning_rate=5e-2)
    trainer = build_sft_trainer(script_args, training_args, model_args)
    model = trainer.model
    base = model.get_base_model()
    assert base.config.get_text_config().tie_word_embeddings == tied
    tokenizer = trainer.processing_class
    new_ids = tokenizer.convert_tokens_to_ids(get_format("gemma_rvq", codebook_size=8, num_levels=2).vocabulary())
    old_ids = list(range(10, 30))
    new_in, new_out = _rows(model, new_ids)
    old_in, old_out = _rows(model, old_ids)

    trainer.train()

    after_in, after_out = _rows(model, new_ids)
    assert (after_in - new_in).abs().amax(-1).min() > 0  # every new input row moved
    assert (after_out - new_out).abs().amax(-1).max() > 0  # the head's new rows moved (tied or not)
    assert (after_out - new_out).abs().amax(-1).gt(0).float().mean() > 0.5
    old_after_in, old_after_out = _rows(model, old_ids)
    torch.testing.assert_close(old_after_in, old_in, rtol=0, atol=0)
    torch.testing.assert_close(old_after_out, old_out, rtol=0, atol=0)

    # the saved adapter reloads on the re-extended base and reproduces the logits
    trainer.save_model(training_args.output_dir)
    from gemma_rvq.recipes.sft import save_recipe

    save_recipe(trainer, training_args.output_dir)
    reloaded, reloaded_tokenizer = load_sft_model(str(training_args.output_dir))
    assert len(reloaded_tokenizer) == len(tokenizer)
    batch = tokenizer(["Hello there\n<|rvq_start|><|q0_0003|><|q1_0005|><|rvq_end|>"], return_tensors="pt")
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        actual = reloaded(**batch).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_gemma4_multimodal_stage3_trains_new_rows_including_per_layer_embeddings(tmp_path, data_dir):
    """Stage 3's real target: Gemma 4 (multimodal class, tied head, per-layer embeddings), LoRA on the LM only."""
    from gemma_rvq.testing import tiny_gemma4_multimodal

    tokenizer = sentencepiece_tokenizer()
    tiny_gemma4_multimodal(tokenizer).save_pretrained(tmp_path / "gemma4")
    tokenizer.save_pretrained(tmp_path / "gemma4")
    script_args, training_args, model_args = parse(
        "tiny_speech_instruct.yaml", model_name_or_path=tmp_path / "gemma4", dataset_name=data_dir["instructions"],
        output_dir=tmp_path / "out", learning_rate=5e-2,
        lora_target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    trainer = build_sft_trainer(script_args, training_args, model_args)
    model = trainer.model
    lora = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    assert lora and all("language_model" in n for n in lora)  # the audio tower is left alone
    indices = model.peft_config["default"].trainable_token_indices
    assert set(indices) == {"embed_tokens", "embed_tokens_per_layer"}
    new_ids = indices["embed_tokens"]
    per_layer = model.get_base_model().model.language_model.embed_tokens_per_layer
    before = per_layer(torch.tensor([new_ids])).detach().clone()
    new_in, _ = _rows(model, new_ids)
    trainer.train()
    assert (per_layer(torch.tensor([new_ids])) - before).abs().sum() > 0
    after_in, _ = _rows(model, new_ids)
    assert (after_in - new_in).abs().amax(-1).gt(0).float().mean() > 0.5

    from gemma_rvq.recipes.sft import save_recipe

    trainer.save_model(training_args.output_dir)
    save_recipe(trainer, training_args.output_dir)
    reloaded, _ = load_sft_model(str(training_args.output_dir))
    batch = trainer.processing_class.apply_chat_template(
        [{"role": "user", "content": "<|rvq_start|><|q0_0003|><|q1_0005|><|rvq_end|>"}], add_generation_prompt=True,
        return_dict=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-5)


REAL_RECIPES = sorted(p.name for p in RECIPES_DIR.glob("*.yaml") if not p.name.startswith(("tiny_", "accelerate_")))


@pytest.mark.parametrize("config", REAL_RECIPES)
def test_real_recipes_parse(config):
    """Every field of the hardware YAMLs exists (TrlParser refuses unknown keys); bf16 off only for this CPU."""
    script_args, training_args, model_args = parse(config, bf16="false")
    assert training_args.gradient_checkpointing and training_args.learning_rate > 0
    # the format is not restated: it travels with the data (gemma_rvq.formats)
    assert (script_args.token_format, script_args.codebook_size, script_args.num_levels) == (None, None, None)
    if script_args.recipe == "speechless":  # Ichigo's Speechless hyperparameters
        assert (training_args.learning_rate, training_args.num_train_epochs, training_args.warmup_steps,
                training_args.max_length, model_args.use_peft) == (1.5e-4, 3, 200, 512, False)
    else:
        assert model_args.use_peft and "language_model" in model_args.lora_target_modules


def test_stage3_refuses_data_in_another_format_than_its_stage2_model(tmp_path, llama_dir, data_dir):
    """Stage 3 from a stage-2 checkpoint reads the checkpoint's format: data in another one is an error."""
    stage2 = tmp_path / "stage2"
    script_args, training_args, model_args = parse("tiny_speechless.yaml", model_name_or_path=str(llama_dir),
                                                   dataset_name=str(data_dir["pairs"]), output_dir=str(stage2))
    run_sft(script_args, training_args, model_args)
    other = toy_semantic_pairs(get_format("ichigo", codebook_size=8), num_rows=4)
    other = other.map(lambda row: {"response": "ok"})
    other.save_to_disk(tmp_path / "other")
    script_args, training_args, model_args = parse("tiny_speech_instruct.yaml", model_name_or_path=str(stage2),
                                                   dataset_name=str(tmp_path / "other"),
                                                   output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="the dataset was made with token format 'ichigo' and the model"):
        build_sft_trainer(script_args, training_args, model_args)


@pytest.mark.parametrize("config", sorted(p.name for p in RECIPES_DIR.glob("accelerate_*.yaml")))
def test_accelerate_configs_load(config):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(RECIPES_DIR / config))
    assert loaded.num_processes == 8 and loaded.mixed_precision == "bf16"


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tmp_path, llama_dir, data_dir):
    """`accelerate launch` with 2 processes (DDP over gloo): sft.py trains, generate_semantic.py shards + gathers."""
    import os
    import subprocess
    import sys

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([*launch, str(ROOT / "examples" / "sft.py"), "--config", str(RECIPES_DIR / "tiny_speechless.yaml"),
                    "--model_name_or_path", str(llama_dir), "--dataset_name", str(data_dir["pairs"]),
                    "--output_dir", str(tmp_path / "out")], check=True, env=env, cwd=tmp_path, timeout=300)
    assert (tmp_path / "out" / "model.safetensors").is_file()
    texts = Dataset.load_from_disk(str(data_dir["pairs"])).select_columns(["text"])
    texts.to_json(tmp_path / "texts.jsonl")
    subprocess.run([*launch, str(ROOT / "examples" / "generate_semantic.py"), "--model_name_or_path",
                    str(tmp_path / "out"), "--dataset_name", str(tmp_path / "texts.jsonl"), "--output_dir",
                    str(tmp_path / "generated"), "--max_new_tokens", "8", "--batch_size", "2"],
                   check=True, env=env, cwd=tmp_path, timeout=300)
    generated = Dataset.load_from_disk(str(tmp_path / "generated"))
    assert generated["text"] == texts["text"]  # every row once, in order, after the gather
    assert all((t is None) != (e is None) for t, e in zip(generated["semantic_tokens"], generated["generation_error"]))


def test_all_rows_dropped_is_a_clear_error(tmp_path, llama_dir):
    Dataset.from_dict({"instruction": ["a", "b"], "response": ["x", "y"], "semantic_tokens": [None, None],
                       "generation_error": ["no stop token", "no stop token"]}).save_to_disk(tmp_path / "gen")
    script_args, training_args, model_args = parse(
        "tiny_speech_instruct.yaml", model_name_or_path=llama_dir, dataset_name=tmp_path / "gen",
        output_dir=tmp_path / "out", drop_missing_tokens="true", token_format="gemma_rvq", codebook_size=8,
        num_levels=2)  # no row holds tokens: the format cannot be read from the data
    with pytest.raises(ValueError, match="every row was dropped by drop_missing_tokens"):
        build_sft_trainer(script_args, training_args, model_args)


def test_speech_instruct_needs_a_chat_template(tmp_path, data_dir):
    tokenizer = byte_level_bpe_tokenizer()
    tokenizer.chat_template = None
    tiny_llama(tokenizer, hidden_size=32).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    script_args, training_args, model_args = parse(
        "tiny_speech_instruct.yaml", model_name_or_path=tmp_path / "base", dataset_name=data_dir["instructions"],
        output_dir=tmp_path / "out")
    with pytest.raises(ValueError, match="has none: use an instruction-tuned model"):
        build_sft_trainer(script_args, training_args, model_args)


@pytest.mark.parametrize("drop", [True, False])
def test_rows_longer_than_max_length_are_dropped_not_cut(tmp_path, llama_dir, data_dir, drop):
    """A cut token string would lose its end marker: such rows are dropped (unless asked to truncate)."""
    script_args, training_args, model_args = parse(
        "tiny_speechless.yaml", model_name_or_path=llama_dir, dataset_name=data_dir["pairs"],
        output_dir=tmp_path, max_length=25, drop_long_examples=str(drop).lower())
    trainer = build_sft_trainer(script_args, training_args, model_args)
    tokenizer = trainer.processing_class
    end = tokenizer.convert_tokens_to_ids("<|rvq_end|>")
    rows = list(trainer.train_dataset)
    assert all(len(row["input_ids"]) <= 25 for row in rows)
    complete = [row["labels"][-2:] == [end, tokenizer.eos_token_id] for row in rows]
    if drop:
        assert 0 < len(rows) < 8 and all(complete)
    else:
        assert len(rows) == 8 and not all(complete)
    with pytest.raises(ValueError, match="every one of the 8 rows is longer than max_length=5"):
        build_sft_trainer(*parse("tiny_speechless.yaml", model_name_or_path=llama_dir,
                                 dataset_name=data_dir["pairs"], output_dir=tmp_path, max_length=5))
