"""Layer-aligned distillation (gemma_rvq.recipes.distill, examples/distill.py) on tiny real models.

Each loss is checked on a hand-computed case and is zero when the student is the teacher; the student
builder, the layer map, the trainer (through the script's parser and YAML), the saved student and the transfer
set of unlabelled prompts (the teacher's greedy answers, their own cross-entropy term) are checked on tiny
random ``LlamaForCausalLM`` / ``Gemma3ForCausalLM`` models.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import load_script
from gemma_rvq.recipes import RECIPE_FILE
from gemma_rvq.recipes.distill import (
    PROJECTIONS_FILE,
    TRANSFER_COLUMN,
    LayerDistillationTrainer,
    attention_kl,
    build_distill_trainer,
    build_student,
    build_transfer_prompts,
    causal_lm_cross_entropy,
    default_layer_map,
    generate_transfer_set,
    hidden_state_mse,
    softened_logit_kl,
    student_layers,
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
FORMAT = get_format("gemma_rvq", codebook_size=8, num_levels=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


DISTILL = load_script("examples/distill.py", "distill_script")
SFT = load_script("examples/sft.py", "sft_script")


def parse(script, config: str, **overrides):
    args = ["--config", str(RECIPES_DIR / config)]
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    return script.make_parser().parse_args_and_config(args)


# ---------------------------------------------------------------------------------------------- losses
def test_hidden_state_mse_by_hand():
    student = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]])  # [1, 3, 2]
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 4.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the padded third position is left out
    # squared errors: (0 + 4) + (9 + 0) = 13 over 2 positions x 2 dims
    assert hidden_state_mse(student, teacher, mask).item() == pytest.approx(13 / 4)
    assert hidden_state_mse(student, teacher).item() == pytest.approx((13 + 81 + 81) / 6)
    assert hidden_state_mse(teacher, teacher, mask).item() == 0.0
    # a projection from a narrower student: [1] -> [2, -1]
    projection = nn.Linear(1, 2, bias=False)
    projection.weight.data = torch.tensor([[2.0], [-1.0]])
    narrow = torch.tensor([[[1.0], [2.0], [5.0]]])
    # projected: [2, -1], [4, -2]; errors (1 + 1) + (16 + 36) = 54 over 4
    assert hidden_state_mse(narrow, teacher, mask, projection).item() == pytest.approx(54 / 4)
    with pytest.raises(ValueError, match="widths differ"):
        hidden_state_mse(narrow, teacher, mask)


def test_attention_kl_by_hand():
    # one batch row, one head, 2 tokens (causal): query 0 sees only key 0, query 1 sees both
    teacher = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    student = torch.tensor([[[[1.0, 0.0], [0.25, 0.75]]]])
    expected_q1 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert attention_kl(student, teacher).item() == pytest.approx((0 + expected_q1) / 2)
    assert attention_kl(student, teacher, torch.tensor([[0, 1]])).item() == pytest.approx(expected_q1)
    assert attention_kl(teacher, teacher).item() == 0.0
    # different head counts: the head-averaged maps are compared
    two_heads = torch.cat([student, torch.tensor([[[[1.0, 0.0], [0.75, 0.25]]]])], dim=1)  # mean of q1: 0.5/0.5
    assert attention_kl(two_heads, teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_softened_logit_kl_by_hand():
    teacher = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])
    student = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])
    temperature = 2.0
    p = torch.softmax(torch.tensor([1.0, 0.0]), 0)  # teacher at T = 2: logits / 2
    kl_first = float((p * (p.log() - math.log(0.5))).sum())
    # mean over 2 positions (the second has KL 0), times T^2
    assert softened_logit_kl(student, teacher, None, temperature).item() == pytest.approx(4 * kl_first / 2)
    assert softened_logit_kl(student, teacher, torch.tensor([[1, 0]]), temperature).item() == pytest.approx(
        4 * kl_first)
    assert softened_logit_kl(teacher, teacher, None, temperature).item() == pytest.approx(0.0, abs=1e-7)
    # padded head rows beyond the shared vocabulary are cut
    wide = torch.cat([student, torch.full((1, 2, 1), 5.0)], dim=-1)
    assert softened_logit_kl(wide, teacher, None, temperature).item() == pytest.approx(4 * kl_first / 2)
    with pytest.raises(ValueError, match="temperature"):
        softened_logit_kl(student, teacher, None, 0.0)


def test_cross_entropy_matches_the_models_own_loss():
    tokenizer = byte_level_bpe_tokenizer()
    model = tiny_llama(tokenizer, hidden_size=32)
    ids = torch.randint(0, len(tokenizer), (2, 7), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(input_ids=ids, labels=labels)
    assert causal_lm_cross_entropy(out.logits, labels).item() == pytest.approx(out.loss.item(), rel=1e-5)
    # by hand on a 2-token vocabulary: logits [0, log 3] at position 0 predict token 1 (p = 3/4)
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])
    assert causal_lm_cross_entropy(logits, torch.tensor([[-100, 1]])).item() == pytest.approx(-math.log(0.75))


# ---------------------------------------------------------------------------------------------- student
def test_layer_plan_and_map():
    assert student_layers(6, 3) == [0, 3]
    assert student_layers(7, 3) == [0, 3, 6]
    assert default_layer_map(2, 6) == [2, 5]  # each student layer meets the end of its 3-layer block
    assert default_layer_map(3, 9) == [2, 5, 8]
    assert default_layer_map(4, 4) == [0, 1, 2, 3]
    assert default_layer_map(3, 8)[-1] == 7
    with pytest.raises(ValueError, match="stride"):
        student_layers(4, 0)
    with pytest.raises(ValueError, match="cannot be aligned"):
        default_layer_map(5, 4)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_build_student_copies_the_kept_layers(family):
    if family == "llama":
        teacher = tiny_llama(byte_level_bpe_tokenizer(), hidden_size=32, num_hidden_layers=6)
    else:
        teacher = tiny_gemma_lm(sentencepiece_tokenizer(), hidden_size=32, num_hidden_layers=6)
    student = build_student(teacher, layer_stride=3)
    assert student.config.num_hidden_layers == 2 and type(student) is type(teacher)
    if family == "gemma":  # per-layer lists follow the kept layers
        assert student.config.layer_types == [teacher.config.layer_types[i] for i in (0, 3)]
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    for key, value in student_state.items():
        source = key.replace("layers.1.", "layers.3.")
        torch.testing.assert_close(value, teacher_state[source], rtol=0, atol=0)
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    # a student that keeps every layer is the teacher
    ids = torch.randint(0, 100, (1, 9))
    same = build_student(teacher, layer_stride=1).eval()
    torch.testing.assert_close(same(ids).logits, teacher.eval()(ids).logits)
    with pytest.raises(ValueError, match="increasing"):
        build_student(teacher, layers=[3, 1])


# ---------------------------------------------------------------------------------------------- trainer
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distill-data")
    pairs = toy_semantic_pairs(FORMAT, num_rows=8, seed=1)
    rows = pairs.map(lambda row: {"response": "Answer: " + row["text"].lower()}).rename_column("text", "instruction")
    rows.to_json(root / "instructions.jsonl")
    from gemma_rvq.formats import save_format

    save_format(root, FORMAT)  # semantic_format.json beside the data file: the recipes read the format there
    return root / "instructions.jsonl"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, data_dir) -> Path:
    """A stage-3 style teacher: a 6-layer Llama + LoRA adapter trained by examples/sft.py (2 steps)."""
    root = tmp_path_factory.mktemp("teacher")
    tokenizer = byte_level_bpe_tokenizer()
    tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=6).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    SFT.main(*parse(SFT, "tiny_speech_instruct.yaml", model_name_or_path=root / "base", dataset_name=data_dir,
                    output_dir=root / "stage3", learning_rate=5e-2))
    assert (root / "stage3" / "adapter_config.json").is_file()
    return root / "stage3"


def _trainer_for(teacher, tokenizer, student, data_dir, tmp_path, *, transfer_dataset=None, **overrides):
    script_args, training_args = parse(DISTILL, "tiny_distill.yaml", teacher_model_name_or_path="unused",
                                       dataset_name=data_dir, output_dir=tmp_path, **overrides)
    return build_distill_trainer(script_args, training_args, teacher=teacher, tokenizer=tokenizer, student=student,
                                 transfer_dataset=transfer_dataset)


def test_every_distillation_loss_is_zero_when_the_student_is_the_teacher(tmp_path, teacher_dir, data_dir):
    from gemma_rvq.recipes.distill import load_teacher

    teacher, tokenizer = load_teacher(str(teacher_dir), attn_implementation="eager")
    student = copy.deepcopy(teacher)
    trainer = _trainer_for(teacher, tokenizer, student, data_dir, tmp_path, layer_stride=1)
    assert trainer.layer_map == list(range(6))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert (batch["attention_mask"] == 0).any()  # padded rows are in the batch
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("distill/")}
    assert set(logged) == {"distill/ce", "distill/kl", "distill/hidden", "distill/attention"}
    assert logged["distill/ce"] > 0
    for name in ("distill/kl", "distill/hidden", "distill/attention"):
        assert logged[name] == pytest.approx(0.0, abs=1e-6), name


def test_completion_only_distils_at_the_positions_that_predict_answer_tokens(tmp_path, teacher_dir, data_dir):
    from gemma_rvq.recipes.distill import load_teacher

    teacher, tokenizer = load_teacher(str(teacher_dir), attn_implementation="eager")
    student = build_student(teacher, layer_stride=3)
    trainer = _trainer_for(teacher, tokenizer, student, data_dir, tmp_path, distill_completion_only=True,
                           temperature=1.5)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    labels, attention = batch["labels"], batch["attention_mask"]
    assert ((labels == -100) & (attention == 1)).any() and (labels != -100).any()  # prompts are not labels
    # position t predicts token t + 1: it counts when that token is an answer label, row by row
    counted = torch.zeros_like(attention, dtype=torch.bool)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            counted[b, t] = bool(attention[b, t]) and int(labels[b, t + 1]) != -100
    assert 0 < counted.sum() < attention.sum()
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("distill/")}
    inputs = {"input_ids": batch["input_ids"], "attention_mask": attention, "output_hidden_states": True,
              "output_attentions": True}
    with torch.no_grad():
        s, t = student(**inputs), teacher(**inputs)
    layer_map = trainer.layer_map
    expected = {
        "distill/kl": softened_logit_kl(s.logits, t.logits, counted, 1.5),
        "distill/hidden": torch.stack([hidden_state_mse(s.hidden_states[i + 1], t.hidden_states[j + 1], counted)
                                       for i, j in enumerate(layer_map)]).mean(),
        "distill/attention": torch.stack([attention_kl(s.attentions[i], t.attentions[j], counted)
                                          for i, j in enumerate(layer_map)]).mean(),
    }
    for name, value in expected.items():
        assert logged[name] == pytest.approx(value.item(), rel=1e-5), name
    every_token = softened_logit_kl(s.logits, t.logits, attention.bool(), 1.5)
    assert every_token.item() != pytest.approx(logged["distill/kl"], rel=1e-3)  # the prompts were left out


def test_distill_script_trains_and_saves_a_plain_student(tmp_path, teacher_dir, data_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    script_args, training_args = parse(DISTILL, "tiny_distill.yaml", teacher_model_name_or_path=teacher_dir,
                                       dataset_name=data_dir, output_dir=tmp_path / "student")
    trainer = DISTILL.main(script_args, training_args)
    assert isinstance(trainer, LayerDistillationTrainer) and trainer.state.global_step == 2
    assert trainer.layer_map == [2, 5]
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:  # each term is logged on its own
        for name in ("distill/ce", "distill/kl", "distill/hidden", "distill/attention"):
            assert math.isfinite(entry[name]) and entry[name] >= 0, (name, entry)

    out = tmp_path / "student"
    student = AutoModelForCausalLM.from_pretrained(out).eval()
    assert student.config.num_hidden_layers == 2
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.get_vocab() == trainer.processing_class.get_vocab()
    recipe = json.loads((out / RECIPE_FILE).read_text())
    assert recipe["peft"] is False and recipe["distillation"]["layer_map"] == [2, 5]
    assert get_format(recipe["token_format"]) == FORMAT
    trained = trainer.model.eval()
    batch = tokenizer(["<|rvq_start|><|q0_0003|><|q1_0005|><|rvq_end|>"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(student(**batch).logits, trained(**batch).logits)

    # the stage-3 loader reads it as a full model
    from gemma_rvq.recipes import load_sft_model

    loaded, _ = load_sft_model(str(out))
    assert loaded.config.num_hidden_layers == 2


def test_a_narrower_student_learns_projections_saved_apart(tmp_path, data_dir):
    from transformers import AutoModelForCausalLM

    tokenizer = byte_level_bpe_tokenizer()
    teacher = tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=4, attn_implementation="eager")
    from gemma_rvq.recipes import prepare_semantic_tokens

    prepare_semantic_tokens(teacher, tokenizer, FORMAT, pad_to_multiple_of=8)
    student = tiny_llama(tokenizer, hidden_size=16, num_hidden_layers=2, seed=1)
    student.resize_token_embeddings(teacher.get_input_embeddings().num_embeddings)
    trainer = _trainer_for(teacher, tokenizer, student, data_dir, tmp_path / "out")
    projections = trainer.model.distill_projections
    assert len(projections) == 2 and projections[0].weight.shape == (32, 16)
    before = projections[0].weight.detach().clone()
    trainer.train()
    assert (projections[0].weight - before).abs().sum() > 0  # trained with the student
    trainer.save_model(str(tmp_path / "out"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as handle:
        assert not [key for key in handle.keys() if "distill" in key]  # noqa: SIM118
    with safe_open(str(tmp_path / "out" / PROJECTIONS_FILE), "pt") as handle:
        assert sorted(handle.keys()) == ["0.weight", "1.weight"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.hidden_size == 16


def test_weights_switch_terms_off_and_bad_input_is_named(tmp_path, teacher_dir, data_dir):
    from gemma_rvq.recipes.distill import load_teacher

    teacher, tokenizer = load_teacher(str(teacher_dir))
    trainer = _trainer_for(teacher, tokenizer, build_student(teacher, layer_stride=2), data_dir, tmp_path,
                           hidden_weight=0, attention_weight=0, kl_weight=0)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    teacher_calls = []
    hook = trainer.teacher_model.register_forward_hook(lambda *_: teacher_calls.append(1))
    loss = trainer.compute_loss(trainer.model, batch)
    hook.remove()
    assert teacher_calls == []  # cross-entropy only: the teacher is not run
    assert set(k for k in trainer._metrics["train"] if k.startswith("distill/")) == {"distill/ce"}
    assert loss.item() == pytest.approx(trainer._metrics["train"]["distill/ce"][-1], rel=1e-6)
    assert trainer.teacher_model.config._attn_implementation != "eager"  # not switched without attention KL
    with pytest.raises(ValueError, match="layer_map must give one teacher layer"):
        LayerDistillationTrainer(build_student(teacher, layer_stride=2), teacher, trainer.args, layer_map=[0, 1, 9],
                                 processing_class=tokenizer)
    with pytest.raises(ValueError, match="temperature"):
        parse(DISTILL, "tiny_distill.yaml", temperature=0)
    bare = byte_level_bpe_tokenizer()
    with pytest.raises(ValueError, match=r"lacks .* tokens of format"):
        _trainer_for(tiny_llama(bare, hidden_size=16), bare, None, data_dir, tmp_path)


# ---------------------------------------------------------------------------------------------- transfer set
@pytest.fixture(scope="module")
def random_teacher():
    """A random 4-layer Llama with the semantic tokens: its greedy answers are long, never empty."""
    from gemma_rvq.recipes import prepare_semantic_tokens

    tokenizer = byte_level_bpe_tokenizer()
    teacher = tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=4, attn_implementation="eager", seed=3)
    prepare_semantic_tokens(teacher, tokenizer, FORMAT, pad_to_multiple_of=8)
    return teacher.eval(), tokenizer


def _prompts_only(data_dir):
    from gemma_rvq.recipes.sft import load_raw_dataset

    return load_raw_dataset(str(data_dir))["train"].select_columns(["semantic_tokens"])


def test_transfer_prompts_are_answered_with_the_teachers_greedy_decode(tmp_path, data_dir, random_teacher):
    teacher, tokenizer = random_teacher
    script_args, _ = parse(DISTILL, "tiny_distill.yaml", dataset_name=data_dir, output_dir=tmp_path)
    rows = _prompts_only(data_dir)
    prompts = build_transfer_prompts(script_args, rows)
    # the recipe's own prompts: system prompt of the YAML file, the tokens as the user turn
    assert prompts["prompt"][2] == [{"role": "system", "content": "You answer spoken questions."},
                                    {"role": "user", "content": rows[2]["semantic_tokens"]}]
    generated = generate_transfer_set(teacher, tokenizer, prompts, max_new_tokens=5, batch_size=3,
                                      show_progress=False)  # batches of 3, left-padded
    assert len(generated) == len(rows) and all(generated[TRANSFER_COLUMN])
    for prompt, completion in zip(generated["prompt"], generated["completion"], strict=True):
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        with torch.no_grad():  # one prompt at a time, no padding
            out = teacher.generate(input_ids=ids, max_new_tokens=5, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
        expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        assert expected and completion == [{"role": "assistant", "content": expected}]
    # plain-text prompts (TRL prompt-only rows) get plain-text answers
    plain = build_transfer_prompts(script_args, rows.map(lambda r: {"prompt": r["semantic_tokens"]}))
    answered = generate_transfer_set(teacher, tokenizer, plain.select(range(2)), max_new_tokens=3,
                                     show_progress=False)
    assert all(isinstance(c, str) and c for c in answered["completion"])


def test_transfer_rows_train_with_their_own_cross_entropy_term(tmp_path, data_dir, random_teacher):
    teacher, tokenizer = random_teacher
    student = build_student(teacher, layer_stride=2)
    trainer = _trainer_for(teacher, tokenizer, student, data_dir, tmp_path, transfer_dataset=_prompts_only(data_dir),
                           transfer_max_new_tokens=4, transfer_ce_weight=0, kl_weight=0, hidden_weight=0,
                           attention_weight=0)
    rows = trainer.train_dataset
    flags = rows[TRANSFER_COLUMN]
    assert len(rows) == 16 and sum(flags) == 8  # 8 labelled rows + the teacher's answers to their 8 prompts
    labelled = [i for i, f in enumerate(flags) if not f][:2]
    transfer = [i for i, f in enumerate(flags) if f][:2]
    for i in transfer:  # the labels of a transfer row are the teacher's answer (and the end of turn)
        answer = tokenizer.decode([t for t in rows[i]["labels"] if t != -100], skip_special_tokens=True).strip()
        assert answer == rows[i]["completion"][0]["content"]

    def collate(indices):
        batch = trainer.data_collator([{k: rows[i][k] for k in ("input_ids", "labels", TRANSFER_COLUMN)}
                                       for i in indices])
        return trainer._prepare_inputs(batch)

    trainer.model.train()
    metrics = trainer._metrics["train"]
    mixed = collate(labelled + transfer)
    assert mixed[TRANSFER_COLUMN].tolist() == [False, False, True, True]
    loss = trainer.compute_loss(trainer.model, mixed)
    with torch.no_grad():
        logits = trainer.model(input_ids=mixed["input_ids"], attention_mask=mixed["attention_mask"]).logits
    by_hand = {name: causal_lm_cross_entropy(logits[part], mixed["labels"][part]).item()
               for name, part in (("ce", slice(0, 2)), ("transfer_ce", slice(2, 4)))}
    assert metrics["distill/ce"][-1] == pytest.approx(by_hand["ce"], rel=1e-5)  # logged apart
    assert metrics["distill/transfer_ce"][-1] == pytest.approx(by_hand["transfer_ce"], rel=1e-5)
    assert by_hand["transfer_ce"] > 0
    assert loss.item() == pytest.approx(by_hand["ce"], rel=1e-5)  # transfer_ce_weight 0: no CE on transfer rows
    ce_logged = len(metrics["distill/ce"])
    loss = trainer.compute_loss(trainer.model, collate(transfer))
    assert loss.item() == 0.0 and len(metrics["distill/ce"]) == ce_logged  # no labelled row, no CE entry
    trainer.args.transfer_ce_weight = 0.5
    loss = trainer.compute_loss(trainer.model, collate(labelled + transfer))
    assert loss.item() == pytest.approx(by_hand["ce"] + 0.5 * by_hand["transfer_ce"], rel=1e-5)


def test_distill_script_distils_on_a_transfer_file(tmp_path, teacher_dir, data_dir):
    transfer_file = tmp_path / "prompts.jsonl"
    _prompts_only(data_dir).to_json(transfer_file)  # prompts only: no response column
    script_args, training_args = parse(DISTILL, "tiny_distill.yaml", teacher_model_name_or_path=teacher_dir,
                                       dataset_name=data_dir, output_dir=tmp_path / "student",
                                       transfer_dataset_name=transfer_file, transfer_max_new_tokens=6,
                                       max_transfer_samples=6, per_device_train_batch_size=7)
    trainer = DISTILL.main(script_args, training_args)
    assert sum(trainer.train_dataset[TRANSFER_COLUMN]) == 6
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert {"distill/ce", "distill/kl", "distill/hidden", "distill/attention"} <= set(logs[0])
    assert any("distill/transfer_ce" in entry for entry in logs)
    recipe = json.loads((tmp_path / "student" / RECIPE_FILE).read_text())
    assert recipe["distillation"]["transfer_rows"] == 6
    assert str(tmp_path) not in recipe["distillation"]["transfer_set"]  # named, never by its local path


def test_bad_transfer_sets_are_named(tmp_path, data_dir, random_teacher):
    from datasets import Dataset, DatasetDict

    teacher, tokenizer = random_teacher
    script_args, _ = parse(DISTILL, "tiny_distill.yaml", dataset_name=data_dir, output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"transfer set .* has no rows"):
        build_transfer_prompts(script_args, _prompts_only(data_dir).select([]))
    user = [{"role": "user", "content": "<|rvq_start|><|q0_0001|><|q1_0002|><|rvq_end|>"}]
    answered = [*user, {"role": "assistant", "content": "an answer"}]
    with pytest.raises(ValueError, match=r"transfer row 1: its 'prompt' already holds an assistant turn"):
        build_transfer_prompts(script_args, Dataset.from_dict({"prompt": [user, answered]}))
    with pytest.raises(ValueError, match="transfer row 0: 'prompt' must be a non-empty string"):
        build_transfer_prompts(script_args, Dataset.from_dict({"prompt": ["  "]}))
    with pytest.raises(ValueError, match="transfer split 'train' not found"):
        build_transfer_prompts(script_args, DatasetDict(other=_prompts_only(data_dir)))
    prompts = build_transfer_prompts(script_args, _prompts_only(data_dir))
    longest = max(len(tokenizer.apply_chat_template(p, add_generation_prompt=True, return_dict=True)["input_ids"])
                  for p in prompts["prompt"])
    with pytest.raises(ValueError, match=rf"transfer row \d+: its prompt is {longest} tokens, max_length is {longest}"):
        generate_transfer_set(teacher, tokenizer, prompts, max_length=longest, show_progress=False)
    with pytest.raises(ValueError, match="cannot be packed"):
        _trainer_for(teacher, tokenizer, build_student(teacher, layer_stride=2), data_dir, tmp_path,
                     transfer_dataset=_prompts_only(data_dir), transfer_max_new_tokens=2, packing=True)
    with pytest.raises(ValueError, match="transfer_max_new_tokens and transfer_batch_size must be >= 1"):
        parse(DISTILL, "tiny_distill.yaml", transfer_max_new_tokens=0)
