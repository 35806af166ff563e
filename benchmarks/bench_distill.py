"""Layer-aligned distillation (``gemma_rvq.recipes.distill``), with and without a transfer set of unlabelled
prompts, against cross-entropy alone, set up honestly and sized for a 2-core CPU: tiny real ``LlamaForCausalLM``
models, no audio (not a timed test).

    python benchmarks/bench_distill.py --output-dir /tmp/bench-distill          # 1 torch thread; see below
    python benchmarks/bench_distill.py --output-dir /tmp/bench-distill-q --quick  # seconds: the script runs

The task is a stage-3 style spoken question -> text answer over semantic token strings (``gemma_rvq`` format,
2 levels x 16 codes), with a synthetic speaker model in place of audio, so that voices, held-out questions and
the amount of data are controlled exactly:

- 24 questions, each a fixed sequence of 6-9 level-0 "content" codes with its own two-word answer.
- 16 voices. A voice draws the level-1 codes from its own 3 codes (timbre), rewrites two content codes into two
  others most of the time (accent) and repeats frames at its own rate (speaking speed); every clip also has
  5 % of its content codes replaced at random (noise).
- Teacher (6 layers, trained from scratch, one per seed): all 24 questions in voices 0-7, 3 clips each.
- Students (teacher layers 0 and 3, weights copied: 3x shallower) train on questions 0-13 in voices 0-1,
  2 clips each (56 labelled rows). ``ce``: cross-entropy; ``distill``: cross-entropy + the distillation terms;
  ``distill+transfer``: the same plus a transfer set of unlabelled prompts, all 24 questions in the fresh voices
  12-15 (96 prompts, in no other set), which the recipe has the teacher answer (greedy) before training. The
  baseline has no teacher, so it cannot use unlabelled prompts: it gets the 56 labelled rows, the same numbers
  of optimizer steps and the same tuning budget.
- Dev split: questions 0-13 and 14-18 in voices 8-9. Test split: questions 0-13 and 19-23 in voices 10-11.
  No dev or test voice is in any training set; the held-out questions of each split are in no student's data.
- Tuning, on seed 0's teacher and the dev split only, 6 configurations per student kind, the lowest dev answer
  loss is chosen: first the same learning rate x steps grid for all (distillation at the recipe's defaults),
  then 2 more at each kind's best: other learning rates for ``ce``, other terms / temperature / layer map for
  ``distill``, no cross-entropy on the transfer rows / softened-logit KL only for ``distill+transfer``.
- Report: the two chosen configurations trained again with seeds 1-3 (each with its own teacher, so seeds
  differ in teacher and student), scored on the test split only: answer loss (teacher forcing, per answer
  token), exact-match accuracy and chrF (sacrebleu) of greedy answers, overall and for the students' questions
  and the held-out ones, the fraction of the teacher's test accuracy each student keeps, and each distillation
  kind minus ce paired by seed. Writes ``results.json`` and ``results.png`` to ``--output-dir``.

Cost: 4 teachers x 400 steps, 18 tuning and 9 reported student runs of 60-120 steps; it prints its wall and CPU
seconds and the load average (see docs/benchmarks.md for the measured run).

``--data speech`` runs the same comparison at demo scale on real (synthetic espeak-ng) speech:

    python benchmarks/bench_distill.py --data speech --demo-dir DEMO --output-dir /tmp/bench-distill-speech

- Speech: ``data/distill_speech`` (``scripts/make_corpus.py --distill-benchmark``), the 24 questions of the demo
  corpus' ``instructions.jsonl`` (12 English, 12 Swahili) spoken by 12 espeak-ng voices, one split per voice.
- Tokens: the stage-1 RVQ model and format of a finished ``gemma-rvq demo`` run in ``--demo-dir`` (run there with
  6-layer LMs when it holds none), through ``dataset.map(SpeechTokenizer(model, format=...))``.
- Teacher: the demo's stage-3 recipe (``speech_instruct``, its system prompt, its continued-pretrained 6-layer
  base LM) through ``run_sft``, fully fine-tuned (no LoRA) for 1500 steps of batch 8 at learning rate 2e-3 on every
  question in the 6 teacher voices (144 rows). One teacher: the seeds change the students only.
- Students: teacher layers 0 and 3 (``build_student``, stride 3). Labelled rows: the 14 questions the corpus
  speaks, in its two train voices m3 and f3 (28 rows). ``distill+transfer`` also gets the 24 questions in the
  transfer voices m6 and m7 as prompts without answers (48), answered by the teacher.
- Dev: every question in voices m4 and f4 (48); test: in m5 and f5 (48). Held-out questions: the 10 the students
  have no labels for (the corpus' text-only ones).
- Tuning (seed 0, dev only): the same 6 configurations for each kind, learning rate {3e-4, 1e-3, 3e-3} x {60, 120}
  steps of batch 8, distillation at the recipe's defaults; reported: seeds 1-3 on the test split.
- The literal setting, for the record: students of the demo run's OWN stage-3 model (its LoRA merged), trained on
  its own stage-3 rows (spoken + Speechless-generated) with the configurations chosen above, on the same test split.

A confirmation on voices no choice has seen (the ``confirm`` split, voices david and linda, in no other set):

    python benchmarks/bench_distill.py --data speech --demo-dir DEMO --confirm RUN/results.json \
        --teacher-dir RUN/teacher --output-dir /tmp/bench-distill-confirm

trains exactly the configurations ``RUN/results.json`` chose (no tuning), with that run's teacher when
``--teacher-dir`` is given (its ``bench_teacher.json`` must match; the clips shared with that run must tokenize
identically) or a new one, and reports seeds 1-3 on the confirm split and the test split.

Needs sacrebleu (``pip install gemma-rvq[bench]``) and matplotlib.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

SYSTEM_PROMPT = "You answer spoken questions."
CODEBOOK_SIZE, NUM_LEVELS = 16, 2
COLOURS = ("red", "blue", "green", "black", "white", "brown")
ANIMALS = ("fox", "cat", "owl", "goat")
ANSWERS = tuple(f"{c} {a}" for a in ANIMALS for c in COLOURS)  # 24 two-word answers

STUDENT_QUESTIONS = tuple(range(14))
DEV_QUESTIONS = tuple(range(14, 19))  # held out from the students, used for choices
TEST_QUESTIONS = tuple(range(19, 24))  # held out from the students, never used for a choice
TEACHER_VOICES = tuple(range(8))
STUDENT_VOICES = (0, 1)
DEV_VOICES = (8, 9)
TEST_VOICES = (10, 11)
TRANSFER_VOICES = (12, 13, 14, 15)  # unlabelled prompts for distill+transfer: in no other split
NUM_VOICES = 16
CLIPS = {"teacher": 3, "student": 2, "dev": 2, "test": 2, "transfer": 1}
KINDS = ("ce", "distill", "distill+transfer")
TUNE_SEED = 0

NO_DISTILLATION = {"kl_weight": 0.0, "hidden_weight": 0.0, "attention_weight": 0.0}
RECIPE_DEFAULT = {"kl_weight": 1.0, "hidden_weight": 1.0, "attention_weight": 1.0, "temperature": 2.0}
# the transfer set: the teacher answers the unlabelled prompts (greedy), sequence-level KD on its tokens
TRANSFER_DEFAULT = {**RECIPE_DEFAULT, "transfer": True, "transfer_ce_weight": 1.0}
# Tuning, the same budget for every kind (6 trained configurations each, dev split only):
# stage 1, the same learning rate x steps grid (distillation at the recipe's defaults: all terms, T = 2, the
# default layer map, every token) ...
STAGE1 = tuple((lr, steps) for lr in (3e-4, 1e-3) for steps in (60, 120))
# ... stage 2, two more configurations at the kind's best stage-1 learning rate and steps: for cross-entropy,
# learning rates further out; for distillation, other terms / temperatures; with a transfer set, the transfer
# rows without cross-entropy (distillation terms only) and softened-logit KL only
CE_STAGE2 = {"lr=1e-4": {"learning_rate": 1e-4}, "lr=3e-3": {"learning_rate": 3e-3}}
DISTILL_STAGE2 = {
    "kl only, T=2": {"kl_weight": 1.0, "hidden_weight": 0.0, "attention_weight": 0.0, "temperature": 2.0},
    "all, T=1, layer map 0,3": {**RECIPE_DEFAULT, "temperature": 1.0, "layer_map": [0, 3]},
}
TRANSFER_STAGE2 = {
    "no CE on transfer rows": {**TRANSFER_DEFAULT, "transfer_ce_weight": 0.0},
    "kl only, T=2": {**TRANSFER_DEFAULT, "hidden_weight": 0.0, "attention_weight": 0.0},
}
STAGE1_TERMS = {"ce": NO_DISTILLATION, "distill": RECIPE_DEFAULT, "distill+transfer": TRANSFER_DEFAULT}


def stage1_grid(kind: str) -> dict[str, dict]:
    return {f"{kind} lr={lr:g} steps={steps}": {"learning_rate": lr, "max_steps": steps, **STAGE1_TERMS[kind]}
            for lr, steps in STAGE1}


def stage2_grid(kind: str, best: dict) -> dict[str, dict]:
    base = {"learning_rate": best["learning_rate"], "max_steps": best["max_steps"]}
    if kind == "ce":
        return {f"ce {name} (steps of the best)": {**base, **NO_DISTILLATION, **change}
                for name, change in CE_STAGE2.items()}
    grid = DISTILL_STAGE2 if kind == "distill" else TRANSFER_STAGE2
    return {f"{kind} {name} (lr, steps of the best)": {**base, **change} for name, change in grid.items()}


# ---------------------------------------------------------------------------------------------- data
def make_sets(seed: int = 1234) -> dict[str, list[dict]]:
    """Every row of the benchmark by set (``teacher``, ``student``, ``dev``, ``test``); fixed by ``seed``.

    A row: ``semantic_tokens`` (the rendered ``[2, T]`` codes), ``response``, ``question``, ``voice`` and
    ``group`` (``student-questions`` or ``held-out-questions``). The ``transfer`` set's answers are only for
    scoring the teacher on it: its training file holds the prompts alone.
    """
    from gemma_rvq.tokens import get_format

    fmt = get_format("gemma_rvq", codebook_size=CODEBOOK_SIZE, num_levels=NUM_LEVELS)
    rng = np.random.default_rng(seed)
    contents = [rng.integers(0, CODEBOOK_SIZE, size=int(rng.integers(6, 10))) for _ in ANSWERS]
    voices = []
    for _ in range(NUM_VOICES):  # drawn in order: voices 0-11 do not depend on how many follow
        sources, targets = rng.choice(CODEBOOK_SIZE, size=(2, 2), replace=False)
        voices.append({"timbre": rng.choice(CODEBOOK_SIZE, size=3, replace=False), "stretch": rng.uniform(0.0, 0.4),
                       "accent": dict(zip(sources.tolist(), targets.tolist(), strict=True))})

    def clip(question: int, voice: dict, noise) -> str:
        frames = []
        for code in contents[question].tolist():
            if noise.random() < 0.8:
                code = voice["accent"].get(code, code)
            if noise.random() < 0.05:
                code = int(noise.integers(CODEBOOK_SIZE))
            frame = (code, int(noise.choice(voice["timbre"])))
            frames.append(frame)
            if noise.random() < voice["stretch"]:
                frames.append(frame)
        return fmt.render(np.array(frames).T)

    plan = {"teacher": (range(len(ANSWERS)), TEACHER_VOICES), "student": (STUDENT_QUESTIONS, STUDENT_VOICES),
            "dev": (STUDENT_QUESTIONS + DEV_QUESTIONS, DEV_VOICES),
            "test": (STUDENT_QUESTIONS + TEST_QUESTIONS, TEST_VOICES),
            "transfer": (range(len(ANSWERS)), TRANSFER_VOICES)}
    sets = {}
    for index, (name, (questions, voice_ids)) in enumerate(plan.items()):
        noise = np.random.default_rng([seed, index])
        sets[name] = [{"semantic_tokens": clip(q, voices[v], noise), "response": ANSWERS[q], "question": q,
                       "voice": v, "group": "student-questions" if q in STUDENT_QUESTIONS else "held-out-questions"}
                      for q in questions for v in voice_ids for _ in range(CLIPS[name])]
    return sets


def write_sets(sets: dict[str, list[dict]], folder: Path) -> dict[str, Path]:
    """The training sets as JSON lines with ``semantic_format.json`` beside them (what the recipes read); the
    transfer set without its answers."""
    from gemma_rvq.formats import save_format
    from gemma_rvq.tokens import get_format

    folder.mkdir(parents=True, exist_ok=True)
    save_format(folder, get_format("gemma_rvq", codebook_size=CODEBOOK_SIZE, num_levels=NUM_LEVELS))
    paths = {}
    for name in ("teacher", "student", "transfer"):
        paths[name] = folder / f"{name}.jsonl"
        columns = ("semantic_tokens",) if name == "transfer" else ("semantic_tokens", "response")
        with open(paths[name], "w", encoding="utf-8") as handle:
            for row in sets[name]:
                handle.write(json.dumps({c: row[c] for c in columns}) + "\n")
    return paths


# ---------------------------------------------------------------------------------------------- scoring
def _chat(tokenizer, tokens: str, response: str | None = None) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": tokens}]
    if response is None:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
    return tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": response}], tokenize=True,
                                         return_dict=True)["input_ids"]


@torch.no_grad()
def score(model, tokenizer, rows: list[dict], batch_size: int = 32, max_new_tokens: int = 12) -> list[dict]:
    """Per row: the answer's summed cross-entropy under teacher forcing (answer tokens and end of turn), their
    count, and the greedy answer (``max_new_tokens`` at most)."""
    model.eval()
    pad = tokenizer.pad_token_id
    results = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        prompts = [_chat(tokenizer, r["semantic_tokens"]) for r in chunk]
        fulls = [_chat(tokenizer, r["semantic_tokens"], r["response"]) for r in chunk]
        for p, f in zip(prompts, fulls, strict=True):
            if f[:len(p)] != p:
                raise RuntimeError("the chat template's prompt is not a prefix of the full conversation")
        # teacher forcing, right-padded (the real tokens keep their positions)
        width = max(map(len, fulls))
        ids = torch.full((len(chunk), width), pad)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100)
        for b, (p, f) in enumerate(zip(prompts, fulls, strict=True)):
            ids[b, :len(f)] = torch.tensor(f)
            mask[b, :len(f)] = 1
            labels[b, len(p):len(f)] = torch.tensor(f[len(p):])
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
        # greedy answers, left-padded prompts
        width = max(map(len, prompts))
        prompt_ids = torch.full((len(chunk), width), pad)
        prompt_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, p in enumerate(prompts):
            prompt_ids[b, width - len(p):] = torch.tensor(p)
            prompt_mask[b, width - len(p):] = 1
        output = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens,
                                do_sample=False,
                                pad_token_id=pad)
        for b, row in enumerate(chunk):
            answer = tokenizer.decode(output[b, width:], skip_special_tokens=True).strip()
            results.append({"group": row["group"], "nll": float(nll[b].sum()), "tokens": int((target[b] != -100).sum()),
                            "answer": answer, "reference": row["response"]})
    return results


def summarize(per_row: list[dict], group: str | None = None) -> dict[str, float]:
    """Answer loss (per answer token), exact-match accuracy (%) and corpus chrF over ``group`` (None: all)."""
    import sacrebleu

    rows = [r for r in per_row if group is None or r["group"] == group]
    if not rows:
        return {"loss": float("nan"), "accuracy": float("nan"), "chrf": float("nan"), "rows": 0}
    chrf = sacrebleu.corpus_chrf([r["answer"] for r in rows], [[r["reference"] for r in rows]]).score
    return {"loss": sum(r["nll"] for r in rows) / sum(r["tokens"] for r in rows),
            "accuracy": 100.0 * statistics.fmean(r["answer"] == r["reference"] for r in rows), "chrf": chrf,
            "rows": len(rows)}


# ---------------------------------------------------------------------------------------------- training
class Bench:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.output_dir).resolve()
        self.sets = make_sets()
        if args.quick:
            self.sets = {name: rows if name == "student" else rows[::8] for name, rows in self.sets.items()}
        self.paths = write_sets(self.sets, self.out / "data")
        self.teachers: dict[int, tuple] = {}
        self.report_splits = ("dev", "test")

    def steps(self, steps: int) -> int:
        return max(2, steps // 50) if self.args.quick else steps

    def _script_kwargs(self) -> dict:
        """``DistillArguments`` of this setting beyond those every setting shares (see :meth:`trainer`)."""
        return {"token_format": "gemma_rvq", "codebook_size": CODEBOOK_SIZE, "num_levels": NUM_LEVELS}

    def _training_kwargs(self) -> dict:
        """``LayerDistillationConfig`` fields of this setting beyond those every setting shares."""
        batch = min(4, self.args.batch_size) if self.args.quick else self.args.batch_size
        return {"per_device_train_batch_size": batch, "max_length": 256, "transfer_max_new_tokens": 16,
                "transfer_batch_size": 32}

    def trainer(self, seed: int, data: str, teacher, tokenizer, student, config: dict):
        from gemma_rvq.recipes.distill import DistillArguments, LayerDistillationConfig, build_distill_trainer

        config = dict(config)
        steps = self.steps(config.pop("max_steps"))
        transfer = config.pop("transfer", False)
        script_args = DistillArguments(
            dataset_name=str(self.paths[data]), recipe="speech_instruct", tokens_column="semantic_tokens",
            response_column="response", system_prompt=SYSTEM_PROMPT, layer_stride=self.args.stride,
            layer_map=config.pop("layer_map", None),
            transfer_dataset_name=str(self.paths["transfer"]) if transfer else None, **self._script_kwargs())
        training_args = LayerDistillationConfig(
            output_dir=str(self.out / "run"), max_steps=steps, lr_scheduler_type="cosine", warmup_steps=0,
            bf16=False, use_cpu=True, activation_checkpointing=False, report_to="none", save_strategy="no",
            logging_steps=steps, seed=seed, data_seed=seed, disable_tqdm=True, dataloader_num_workers=0,
            ce_weight=1.0, **self._training_kwargs(), **config)
        return build_distill_trainer(script_args, training_args, teacher=teacher, tokenizer=tokenizer,
                                     student=student)

    def teacher(self, seed: int) -> tuple:
        """``(model, tokenizer, record)``: a 6-layer Llama trained from scratch on the teacher set."""
        if seed in self.teachers:
            return self.teachers[seed]
        from gemma_rvq.recipes import prepare_semantic_tokens
        from gemma_rvq.testing import byte_level_bpe_tokenizer, tiny_llama
        from gemma_rvq.tokens import get_format

        tokenizer = byte_level_bpe_tokenizer(extra_texts=ANSWERS)
        model = tiny_llama(tokenizer, hidden_size=self.args.hidden_size, num_hidden_layers=self.args.teacher_layers,
                           seed=seed)
        prepare_semantic_tokens(model, tokenizer, get_format("gemma_rvq", codebook_size=CODEBOOK_SIZE,
                                                             num_levels=NUM_LEVELS), pad_to_multiple_of=8, seed=seed)
        config = {"learning_rate": self.args.teacher_lr, "max_steps": self.args.teacher_steps, **NO_DISTILLATION}
        trainer = self.trainer(seed, "teacher", copy.deepcopy(model), tokenizer, model, config)  # CE only
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        model = trainer.model.eval()
        record = self._record(model, tokenizer, seconds, ("dev", "test", "transfer"))
        print(f"teacher seed {seed}: {seconds:.0f} s, dev accuracy {summarize(record['scores']['dev'])['accuracy']:.1f} %"
              f", test accuracy {summarize(record['scores']['test'])['accuracy']:.1f} %, accuracy on the transfer "
              f"prompts {summarize(record['scores']['transfer'])['accuracy']:.1f} %", flush=True)
        self.teachers[seed] = (model, tokenizer, record)
        return self.teachers[seed]

    def student(self, seed: int, config: dict, splits: tuple[str, ...]) -> dict:
        """Train one student of ``teacher(seed)`` on the student set with ``config``; its scores on ``splits``."""
        from transformers import set_seed

        from gemma_rvq.recipes.distill import build_student

        teacher, tokenizer, _ = self.teacher(seed)
        set_seed(seed)
        student = build_student(teacher, layer_stride=self.args.stride)
        trainer = self.trainer(seed, "student", teacher, tokenizer, student, config)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        return {"train_seconds": seconds, "scores": {s: self.score(trainer.model, tokenizer, s) for s in splits}}

    def score(self, model, tokenizer, split: str) -> list[dict]:
        """Per-row scores of ``model`` on the set ``split`` (see :func:`score`)."""
        return score(model, tokenizer, self.sets[split])

    def _record(self, model, tokenizer, seconds: float, splits: tuple[str, ...]) -> dict:
        """A teacher's size and scores on ``splits``, and those of its pruned copy (where both students start)
        on the reported splits."""
        from gemma_rvq.recipes.distill import build_student

        pruned = build_student(model, layer_stride=self.args.stride)
        return {"train_seconds": seconds, "parameters": sum(p.numel() for p in model.parameters()),
                "student_parameters": sum(p.numel() for p in pruned.parameters()),
                "scores": {s: self.score(model, tokenizer, s) for s in splits},
                "pruned_scores": {s: self.score(pruned, tokenizer, s) for s in self.report_splits}}


# ---------------------------------------------------------------------------------------------- speech
# --data speech: real (espeak-ng) speech tokenized by a `gemma-rvq demo` run's stage-1 model, the demo's own
# stage-3 recipe and base LM. The clips: data/distill_speech (scripts/make_corpus.py --distill-benchmark).
SPEECH_DIR = Path(__file__).resolve().parents[1] / "data" / "distill_speech"
SPEECH_STUDENT_VOICES = ("m3", "f3")  # the students' labelled voices (the committed corpus' train voices)
SPOKEN_QUESTIONS = 7  # per language, the questions the committed corpus speaks (the demo's spoken stage-3 rows)
SPEECH_SPLITS = ("teacher", "dev", "test", "transfer", "confirm")
# confirm: 2 voices added after the first results (see docs/benchmarks.md), in no training or tuning set and read
# only by --confirm, which reports configurations chosen by an earlier run without any tuning
# tuning: the same grid for every kind (distillation at the recipe's defaults), as many configurations (6) as
# the synthetic mode gives each kind
SPEECH_GRID = tuple((lr, steps) for lr in (3e-4, 1e-3, 3e-3) for steps in (60, 120))
SPEECH_BATCH = 8
SPEECH_MAX_NEW_TOKENS = 16


def load_speech_rows(folder: str | os.PathLike = SPEECH_DIR) -> list[dict]:
    """Rows of ``metadata.jsonl`` in ``folder``, each with ``path`` (absolute) and ``group``."""
    folder = Path(folder)
    path = folder / "metadata.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: generate it with `python scripts/make_corpus.py "
                                f"--distill-benchmark --out {folder}`")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                index = int(row["question"].rsplit("_", 1)[1])
                rows.append({**row, "path": str(folder / row["file"]), "semantic_tokens": None,
                             "group": "student-questions" if index < SPOKEN_QUESTIONS else "held-out-questions"})
    return rows


def speech_sets(rows: list[dict]) -> dict[str, list[dict]]:
    """The benchmark's sets from the clips' ``split`` (fixed by the voice) and the students' subset.

    ``teacher``, ``dev``, ``test``, ``transfer``, ``confirm``: the rows of that split (``confirm`` is read only by
    ``--confirm``); ``student``: the teacher-split rows in
    :data:`SPEECH_STUDENT_VOICES` of the spoken questions (the first :data:`SPOKEN_QUESTIONS` per language).
    A voice is an espeak-ng variant (``m3``), which speaks both languages. Raises ``ValueError`` when a voice is
    in two splits or a split is empty.
    """
    sets = {name: [r for r in rows if r["split"] == name] for name in SPEECH_SPLITS}
    voices = {name: {r["variant"] for r in part} for name, part in sets.items()}
    for a in SPEECH_SPLITS:
        if not sets[a]:
            raise ValueError(f"the speech set has no {a!r} rows")
        for b in SPEECH_SPLITS[SPEECH_SPLITS.index(a) + 1:]:
            if voices[a] & voices[b]:
                raise ValueError(f"voices {sorted(voices[a] & voices[b])} are in both the {a} and {b} splits")
    sets["student"] = [r for r in sets["teacher"]
                       if r["variant"] in SPEECH_STUDENT_VOICES and r["group"] == "student-questions"]
    return sets


def _sft_args(**values) -> tuple[tuple, str]:
    """``(script_args, training_args, model_args)`` parsed as ``examples/sft.py`` parses them, and the command."""
    import shlex

    from trl import ModelConfig, SFTConfig, TrlParser

    from gemma_rvq.recipes import SemanticSFTArguments

    argv = [item for key, value in values.items() for item in (f"--{key}", str(value))]
    parsed = TrlParser((SemanticSFTArguments, SFTConfig, ModelConfig)).parse_args_and_config(argv)
    return parsed, shlex.join(["python", "examples/sft.py", *argv])


def ensure_demo(folder: Path, stride: int, quick: bool) -> dict:
    """The ``results.json`` of a finished ``gemma-rvq demo`` run in ``folder`` (run now, 6-layer LMs, if none)."""
    path = folder / "results.json"
    if not path.is_file():
        import dataclasses

        from gemma_rvq.demo import DemoSettings, run_demo

        settings = dataclasses.replace(DemoSettings.quick() if quick else DemoSettings(), lm_layers=2 * stride)
        print(f"no demo run in {folder}: running gemma-rvq demo there with {settings.lm_layers}-layer LMs", flush=True)
        run_demo(folder, settings=settings)
    state = json.loads(path.read_text(encoding="utf-8"))
    layers = state["settings"]["lm_layers"]
    if layers < 2 * stride:
        raise ValueError(f"the demo run in {folder} has {layers}-layer LMs: a student keeping every {stride}-th "
                         f"layer needs at least {2 * stride} (run_demo(settings=DemoSettings(lm_layers=6)))")
    return state


class SpeechBench(Bench):
    """The speech setting: one teacher (the demo's stage-3 recipe on many voices), students of it by seed."""

    def __init__(self, args):
        from gemma_rvq.formats import attach_format

        self.args = args
        self.out = Path(args.output_dir).resolve()
        self.demo_dir = Path(args.demo_dir).resolve()
        self.demo = ensure_demo(self.demo_dir, args.stride, args.quick)
        self.rvq_folder = self.demo_dir / "hub" / "rvq-model"
        self.base_lm = Path(self.demo["cpt"]["folder"]) if self.demo.get("cpt", {}).get("steps") \
            else self.demo_dir / "work" / "base-lm"
        rows = load_speech_rows(args.speech_dir)
        self.fmt = self.tokenize(rows)
        self.sets = speech_sets(rows)
        if args.quick:
            self.sets = {name: part if name == "student" else part[::6] for name, part in self.sets.items()}
        data = self.out / "data"
        self.paths = {}
        for name in ("teacher", "student", "transfer"):
            columns = ("semantic_tokens",) if name == "transfer" else ("semantic_tokens", "response")
            dataset = _dataset([{c: r[c] for c in columns} for r in self.sets[name]])
            self.paths[name] = data / name
            attach_format(dataset, self.fmt, speech_tokenizer=str(self.rvq_folder)).save_to_disk(str(self.paths[name]))
        self.teachers = {}
        self.teacher_dir = Path(args.teacher_dir).resolve() if args.teacher_dir else self.out / "teacher"
        # the confirm split is scored only in a --confirm run: no tuning run ever looks at it
        self.report_splits = ("dev", "test", "confirm") if args.confirm else ("dev", "test")

    def tokenize(self, rows: list[dict]):
        """Every clip -> its token string (``dataset.map(SpeechTokenizer(...))``), cached in the output folder."""
        import datasets
        from transformers import AutoModel

        import gemma_rvq  # noqa: F401  (registers the RVQ model with the Auto classes)
        from gemma_rvq.formats import format_for_rvq_model
        from gemma_rvq.transforms import SpeechTokenizer

        model = AutoModel.from_pretrained(self.rvq_folder).eval()
        fmt = format_for_rvq_model(None, model)
        cache = self.out / "data" / "tokens.json"
        key = {"rvq_model": str(self.rvq_folder), "speech_dir": str(Path(self.args.speech_dir).resolve())}
        stored = json.loads(cache.read_text()) if cache.is_file() else {}
        if stored.get("key") != key:
            dataset = datasets.Dataset.from_list([{"id": r["id"], "audio": {"path": r["path"], "bytes": None}}
                                                  for r in rows]).cast_column("audio", datasets.Audio(decode=False))
            start = time.perf_counter()
            dataset = dataset.map(SpeechTokenizer(model, format=fmt, batch_size=1), batched=True, batch_size=16,
                                  remove_columns=["audio"], desc="Tokenizing speech")
            print(f"tokenized {len(dataset)} clips in {time.perf_counter() - start:.0f} s", flush=True)
            stored = {"key": key, "tokens": dict(zip(dataset["id"], dataset["semantic_tokens"], strict=True))}
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(stored))
        for row in rows:
            row["semantic_tokens"] = stored["tokens"][row["id"]]
        return fmt

    def steps(self, steps: int) -> int:
        return 2 if self.args.quick else steps

    def _script_kwargs(self) -> dict:
        return {"teacher_model_name_or_path": str(self.teacher_dir)}

    def _training_kwargs(self) -> dict:
        return {"per_device_train_batch_size": SPEECH_BATCH, "max_length": 1024,
                "transfer_max_new_tokens": SPEECH_MAX_NEW_TOKENS, "transfer_batch_size": 16}

    def score(self, model, tokenizer, split: str) -> list[dict]:
        return score(model, tokenizer, self.sets[split], batch_size=16, max_new_tokens=SPEECH_MAX_NEW_TOKENS)

    def train_teacher(self) -> float:
        """The demo's stage-3 recipe (``speech_instruct``, the demo's chat prompt, its CPT base LM), fully
        fine-tuned (no LoRA) with ``run_sft`` on the teacher split; returns the training seconds."""
        from gemma_rvq.recipes import run_sft

        steps = self.steps(self.args.teacher_steps)
        (script_args, training_args, model_args), command = _sft_args(
            recipe="speech_instruct", model_name_or_path=self.base_lm, dataset_name=self.paths["teacher"],
            output_dir=self.teacher_dir, tokens_column="semantic_tokens", response_column="response",
            system_prompt=SYSTEM_PROMPT, use_peft="false", max_steps=steps, logging_steps=max(1, steps // 10),
            learning_rate=self.args.teacher_lr, per_device_train_batch_size=SPEECH_BATCH,
            lr_scheduler_type="cosine", warmup_steps=0, max_length=1024, bf16="false", embedding_pad_to_multiple_of=8,
            activation_checkpointing="false", use_cpu="true", report_to="none", save_strategy="no", seed=TUNE_SEED,
            data_seed=TUNE_SEED, dataloader_num_workers=0, disable_tqdm="true")
        print(f"teacher: {command}", flush=True)
        start = time.perf_counter()
        run_sft(script_args, training_args, model_args)
        seconds = time.perf_counter() - start
        self.teacher_command = command
        return seconds

    def teacher(self, seed: int) -> tuple:
        """``(model, tokenizer, record)`` of the one teacher (every seed: the students differ, not the teacher)."""
        if "teacher" in self.teachers:
            return self.teachers["teacher"]
        from gemma_rvq.recipes.distill import load_teacher

        marker = self.teacher_dir / "bench_teacher.json"
        spec = {"steps": self.steps(self.args.teacher_steps), "lr": self.args.teacher_lr,
                "rows": len(self.sets["teacher"]), "base": str(self.base_lm)}
        cached = json.loads(marker.read_text()) if marker.is_file() else {}
        if cached.get("spec") == spec:
            seconds = cached["train_seconds"]
            print(f"teacher: reusing {self.teacher_dir} ({spec})", flush=True)
        elif self.args.teacher_dir:
            raise ValueError(f"--teacher-dir {self.teacher_dir}: its bench_teacher.json records "
                             f"{cached.get('spec')}, not this run's teacher {spec}")
        else:
            seconds = self.train_teacher()
            marker.write_text(json.dumps({"spec": spec, "train_seconds": seconds}))
        model, tokenizer = load_teacher(str(self.teacher_dir), attn_implementation="eager")
        record = self._record(model, tokenizer, seconds, (*self.report_splits, "transfer"))
        self.teachers["teacher"] = (model, tokenizer, record)
        return self.teachers["teacher"]

    def _record(self, model, tokenizer, seconds: float, splits: tuple[str, ...]) -> dict:
        record = super()._record(model, tokenizer, seconds, splits)
        print(f"teacher: {seconds:.0f} s of training, dev accuracy {summarize(record['scores']['dev'])['accuracy']:.1f} %"
              f", test accuracy {summarize(record['scores']['test'])['accuracy']:.1f} %, test chrF "
              f"{summarize(record['scores']['test'])['chrf']:.1f}", flush=True)
        return record


class DemoTeacherBench(SpeechBench):
    """The literal setting: the demo run's OWN stage-3 model (its LoRA merged) as the teacher, and its own 24
    stage-3 rows (14 spoken + 10 Speechless-generated) as the students' labelled data."""

    def __init__(self, speech: SpeechBench):
        self.__dict__.update({k: v for k, v in vars(speech).items() if k != "teachers"})
        self.teachers = {}
        self.teacher_dir = self.demo_dir / "hub" / "speech-instruct-lora"
        self.paths = {**speech.paths, "student": self.demo_dir / "work" / "stage3-data"}

    def teacher(self, seed: int) -> tuple:
        if "teacher" in self.teachers:
            return self.teachers["teacher"]
        from gemma_rvq.recipes.distill import load_teacher

        model, tokenizer = load_teacher(str(self.teacher_dir), attn_implementation="eager")
        self.teachers["teacher"] = (model, tokenizer, self._record(model, tokenizer, 0.0, self.report_splits))
        return self.teachers["teacher"]


def _dataset(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_list(rows)


# ---------------------------------------------------------------------------------------------- report
def _mean_sd(values: list[float], digits: int) -> str:
    if any(v != v for v in values):  # NaN: e.g. the fraction kept of a teacher that got nothing right
        return "n/a"
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def split_columns(split: str = "test") -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The table's keys and column titles for the reported ``split`` (``test``, or ``confirm``)."""
    names = ("all/loss", "all/accuracy", "all/chrf", "all/kept", "all/kept_chrf", "student-questions/accuracy",
             "held-out-questions/accuracy", "held-out-questions/loss")
    keys = (*(f"{split}/{k}" for k in names), "dev/all/loss")
    header = (f"{split} loss", f"{split} acc. %", f"{split} chrF", "kept (acc.)", "kept (chrF)", "acc., stud. q",
              "acc., held-out q", "loss, held-out q", "dev loss")
    return keys, header


KEYS, HEADER = split_columns("test")


def _cell(key: str, values: list[float]) -> str:
    return _mean_sd(values, 3 if key.endswith("loss") or "kept" in key else 1)


def plot(table: dict, seeds: list[int], labels: dict[str, str], path: Path, split: str = "test") -> bool:
    """``split`` accuracy and loss per model, mean ± sd over seeds with each seed as a dot; False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in ("teacher", "pruned, untrained", *KINDS) if r in table]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key, title in zip(axes, (f"{split}/student-questions/accuracy", f"{split}/held-out-questions/accuracy",
                                     f"{split}/all/loss"),
                              (f"{split} accuracy %, students' questions", f"{split} accuracy %, held-out questions",
                               f"{split} answer loss (per token)"), strict=True):
        for x, row in enumerate(rows):
            values = [v for v in table[row][key] if v == v]  # NaN: a group without rows (--quick)
            if not values:
                continue
            ax.bar(x, statistics.fmean(values), yerr=statistics.stdev(values) if len(values) > 1 else 0,
                   color=("0.6", "0.85", "tab:blue", "tab:orange", "tab:green")[x], capsize=4)
            ax.scatter([x] * len(values), values, color="k", s=10, zorder=3)
        ax.set_xticks(range(len(rows)), [labels.get(r, r) for r in rows], fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"bench_distill: {split} split, seeds {seeds} (mean ± sd, dots = seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def add_kept(table: dict, splits: tuple[str, ...] = ("test",)) -> None:
    """``<split>/all/kept`` (accuracy) and ``<split>/all/kept_chrf`` of every row and split: its score / the
    teacher's."""
    for row in table:
        for split in splits:
            for key, metric in (("kept", "accuracy"), ("kept_chrf", "chrf")):
                table[row][f"{split}/all/{key}"] = [s / t if t else float("nan") for s, t in zip(
                    table[row][f"{split}/all/{metric}"], table["teacher"][f"{split}/all/{metric}"], strict=True)]


def paired_minus_ce(table: dict) -> tuple[dict, dict]:
    """Each distillation kind minus ``ce`` seed by seed, and the number of seeds where it is better."""
    paired = {kind: {key: [d - c for d, c in zip(table[kind][key], table["ce"][key], strict=True)]
                     for key in table["ce"]} for kind in KINDS[1:]}
    wins = {kind: {key: sum((d < 0) if key.endswith("loss") else (d > 0) for d in diffs[key]) for key in diffs}
            for kind, diffs in paired.items()}
    return paired, wins


def print_table(table: dict, labels: dict, paired: dict, wins: dict, seeds: int, split: str = "test") -> None:
    keys, header = split_columns(split)
    print("| model | " + " | ".join(header) + " |")
    print("|---" * (len(header) + 1) + "|")
    for row in ("teacher", "pruned, untrained", *KINDS):
        print(f"| {labels.get(row, row)} | " + " | ".join(_cell(k, table[row][k]) for k in keys) + " |")
    for kind in KINDS[1:]:
        print(f"| {kind} - ce, paired by seed | " + " | ".join(_cell(k, paired[kind][k]) for k in keys) + " |")
        print(f"| seeds where {kind} is better (of {seeds}) | " + " | ".join(str(wins[kind][k]) for k in keys) + " |")


def speech_grid(kind: str) -> dict[str, dict]:
    return {f"{kind} lr={lr:g} steps={steps}": {"learning_rate": lr, "max_steps": steps, **STAGE1_TERMS[kind]}
            for lr, steps in SPEECH_GRID}


def _dataset_rows(folder) -> list:
    from datasets import load_from_disk

    return list(load_from_disk(str(folder)))


def load_chosen(path: str | os.PathLike) -> dict:
    """The configurations an earlier ``--data speech`` run chose, from its ``results.json``: ``{"chosen": {kind:
    name}, "configs": {kind: config}, "args": its arguments, "folder": its output folder}``. ``--confirm`` trains
    exactly these (no tuning). Raises ``ValueError`` naming the file when it is not such a run's results."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--confirm {path}: no such results.json")
    results = json.loads(path.read_text(encoding="utf-8"))
    run_args = results.get("args") or {}
    if run_args.get("data") != "speech" or run_args.get("confirm"):
        raise ValueError(f"--confirm {path}: not the results of a tuning `bench_distill.py --data speech` run "
                         f"(data={run_args.get('data')!r}, confirm={run_args.get('confirm')!r})")
    if run_args.get("quick"):
        raise ValueError(f"--confirm {path}: the results of a --quick run choose nothing")
    chosen = results.get("chosen") or {}
    missing = [kind for kind in KINDS if kind not in chosen or chosen[kind] not in results.get("tuning", {})]
    if missing:
        raise ValueError(f"--confirm {path}: no chosen configuration for {missing}")
    return {"chosen": {kind: chosen[kind] for kind in KINDS},
            "configs": {kind: results["tuning"][chosen[kind]]["config"] for kind in KINDS},
            "args": run_args, "folder": str(Path(run_args["output_dir"]))}


def compare_tokens(bench, folder: str | os.PathLike) -> dict[str, int]:
    """Clips of this run tokenized as in the earlier run's ``data/tokens.json`` in ``folder``, per split:
    ``{split: number that differ}``; a split the earlier run did not tokenize (the confirm split) is left out."""
    cache = Path(folder) / "data" / "tokens.json"
    if not cache.is_file():
        return {}
    earlier = json.loads(cache.read_text())["tokens"]
    return {name: sum(earlier.get(r["id"]) != r["semantic_tokens"] for r in rows)
            for name, rows in bench.sets.items() if any(r["id"] in earlier for r in rows)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="bench_distill_output")
    parser.add_argument("--teacher-layers", type=int, default=6)
    parser.add_argument("--stride", type=int, default=3, help="the students keep teacher layers 0, k, 2k, ...")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--data", choices=("synthetic", "speech"), default="synthetic",
                        help="synthetic: the speaker model above; speech: espeak-ng clips (--speech-dir) tokenized by "
                             "a gemma-rvq demo run's stage-1 model, the demo's stage-3 recipe and base LM (--demo-dir)")
    parser.add_argument("--demo-dir", default="demo_output_6layers",
                        help="speech: a finished `gemma-rvq demo` output folder with >= 2x stride LM layers (run "
                             "there, with 6-layer LMs, when it holds none)")
    parser.add_argument("--speech-dir", default=str(SPEECH_DIR), help="speech: the clips and their metadata.jsonl")
    parser.add_argument("--teacher-steps", type=int, default=None,
                        help="default: 400 (synthetic), 1500 (speech), the earlier run's with --confirm")
    parser.add_argument("--teacher-lr", type=float, default=None,
                        help="default: 3e-3 (synthetic), 2e-3 (speech), the earlier run's with --confirm")
    parser.add_argument("--confirm", default=None, metavar="RESULTS_JSON",
                        help="speech: no tuning; train the configurations chosen in this results.json of an earlier "
                             "--data speech run and report them on the confirm split (voices no choice has seen) "
                             "and the test split")
    parser.add_argument("--teacher-dir", default=None,
                        help="speech: reuse this trained teacher (its bench_teacher.json must record this run's "
                             "teacher steps, learning rate, rows and base LM) instead of training one in "
                             "OUTPUT_DIR/teacher")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds of the reported runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--quick", action="store_true",
                        help="a few steps, 1 configuration per kind, an eighth of the teacher's rows and of the "
                             "prompts: checks that it runs")
    args = parser.parse_args(argv)
    if TUNE_SEED in args.seeds:
        parser.error(f"seed {TUNE_SEED} is the tuning seed; report on other seeds")
    if args.data != "speech" and (args.confirm or args.teacher_dir):
        parser.error("--confirm and --teacher-dir need --data speech")
    earlier = None
    if args.confirm:
        try:
            earlier = load_chosen(args.confirm)
        except (OSError, ValueError) as error:
            parser.error(str(error))
        args.teacher_steps = args.teacher_steps or earlier["args"].get("teacher_steps")
        args.teacher_lr = args.teacher_lr or earlier["args"].get("teacher_lr")
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    start, cpu_start = time.perf_counter(), time.process_time()
    speech = args.data == "speech"
    defaults = {"speech": (1500, 2e-3), "synthetic": (400, 3e-3)}[args.data]
    args.teacher_steps, args.teacher_lr = args.teacher_steps or defaults[0], args.teacher_lr or defaults[1]
    bench = SpeechBench(args) if speech else Bench(args)
    splits = bench.report_splits
    reported = "confirm" if args.confirm else "test"
    token_differences = {}
    if earlier:
        token_differences = compare_tokens(bench, earlier["folder"])
        print(f"--confirm {args.confirm}: {earlier['chosen']}; clips tokenized differently from that run, by split: "
              f"{token_differences or 'not compared (no data/tokens.json there)'}", flush=True)
        if args.teacher_dir and any(token_differences.get(n) for n in ("teacher", "student", "transfer")):
            raise ValueError(f"--teacher-dir {args.teacher_dir}: this run's training clips tokenize differently from "
                             f"{earlier['folder']}: {token_differences}; drop --teacher-dir to train the teacher again")

    # 1. tuning: seed 0's teacher, dev split only, the same number of configurations per kind (none with --confirm)
    tuning = {}

    def tune(kind: str, grid: dict[str, dict]) -> None:
        for name, config in grid.items():
            result = bench.student(TUNE_SEED, config, ("dev",))
            tuning[name] = {"kind": kind, "config": config, "dev": summarize(result["scores"]["dev"]),
                            "train_seconds": result["train_seconds"]}
            print(f"tuning {name}: dev loss {tuning[name]['dev']['loss']:.3f}, accuracy "
                  f"{tuning[name]['dev']['accuracy']:.1f} %, {result['train_seconds']:.1f} s", flush=True)

    def best(kind: str) -> str:
        return min((n for n in tuning if tuning[n]["kind"] == kind), key=lambda n: tuning[n]["dev"]["loss"])

    for kind in KINDS:
        if earlier:
            tuning[earlier["chosen"][kind]] = {"kind": kind, "config": earlier["configs"][kind], "from": args.confirm}
            continue
        grid = speech_grid(kind) if speech else stage1_grid(kind)
        tune(kind, dict(list(grid.items())[:1]) if args.quick else grid)
        if not args.quick and not speech:
            tune(kind, stage2_grid(kind, tuning[best(kind)]["config"]))
    chosen = earlier["chosen"] if earlier else {kind: best(kind) for kind in KINDS}
    tune_seconds = time.perf_counter() - start

    # 2. report: fresh seeds, each with its own teacher; the test split decides nothing
    groups = (None, "student-questions", "held-out-questions")
    table: dict[str, dict[str, list[float]]] = {}

    def add(table: dict, row: str, per_row: list[dict], split: str):
        for group in groups:
            summary = summarize(per_row, group)
            for metric in ("loss", "accuracy", "chrf"):
                table.setdefault(row, {}).setdefault(f"{split}/{group or 'all'}/{metric}", []).append(summary[metric])

    final_seconds = {}

    def report(which, table: dict, label: str) -> None:
        for seed in args.seeds:
            _, _, teacher = which.teacher(seed)
            for split in splits:
                add(table, "teacher", teacher["scores"][split], split)
                add(table, "pruned, untrained", teacher["pruned_scores"][split], split)
            for kind, name in chosen.items():
                result = which.student(seed, tuning[name]["config"], splits)
                final_seconds[f"{label}{kind} seed {seed}"] = result["train_seconds"]
                for split in splits:
                    add(table, kind, result["scores"][split], split)

    report(bench, table, "")
    add_kept(table, tuple(s for s in splits if s != "dev"))
    paired, wins = paired_minus_ce(table)
    # the literal setting (speech): students of the demo run's own stage-3 model, trained on its own 24 rows,
    # with the configurations chosen above (no tuning of its own)
    literal: dict[str, dict[str, list[float]]] = {}
    if speech and not args.confirm:
        demo_bench = DemoTeacherBench(bench)
        report(demo_bench, literal, "demo teacher: ")
        add_kept(literal)

    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    load_end = os.getloadavg()
    _, _, teacher0 = bench.teacher(args.seeds[0])
    print(f"\n{seconds:.0f} s in all ({tune_seconds:.0f} s {'setup, no tuning' if args.confirm else 'tuning'}), "
          f"{cpu_seconds:.0f} s of CPU; load average "
          f"{load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end; torch threads {args.threads}")
    layers = bench.demo["settings"]["lm_layers"] if speech else args.teacher_layers
    print(f"teacher: {layers} layers, {teacher0['parameters']:,} parameters, "
          f"{bench.steps(args.teacher_steps)} steps "
          f"on {len(bench.sets['teacher'])} rows; students: {layers // args.stride} layers, "
          f"{teacher0['student_parameters']:,} parameters, {len(bench.sets['student'])} rows (+ "
          f"{len(bench.sets['transfer'])} unlabelled transfer prompts for distill+transfer); dev "
          f"{len(bench.sets['dev'])} prompts, test {len(bench.sets['test'])} prompts"
          + (f", confirm {len(bench.sets['confirm'])} prompts" if args.confirm else ""))
    transfer_accuracy = [summarize(bench.teacher(seed)[2]["scores"]["transfer"])["accuracy"] for seed in args.seeds]
    print(f"the teachers' answers to the transfer prompts (what distill+transfer learns from) are right "
          f"{_mean_sd(transfer_accuracy, 1)} % of the time (seeds {args.seeds})")
    if earlier:
        print(f"\nNo tuning: the configurations chosen in {args.confirm}: {chosen}")
    else:
        print(f"\nTuning (seed {TUNE_SEED}'s teacher, dev split; * = lowest dev answer loss of its kind)")
        print(f"{'configuration':<72} {'dev loss':>9} {'dev acc. %':>10} {'dev chrF':>9} {'train s':>8}")
        for name, entry in tuning.items():
            mark = " *" if name in chosen.values() else ""
            print(f"{name + mark:<72} {entry['dev']['loss']:>9.3f} {entry['dev']['accuracy']:>10.1f} "
                  f"{entry['dev']['chrf']:>9.1f} {entry['train_seconds']:>8.1f}")
    labels = {kind: f"{kind}: {chosen[kind][len(kind) + 1:]}" for kind in KINDS}
    for split in (("confirm", "test") if args.confirm else ("test",)):
        print(f"\n{split.capitalize()} split, seeds {args.seeds} (mean ± sd); kept = student {split} accuracy "
              f"(chrF) / the teacher's")
        print_table(table, labels, paired, wins, len(args.seeds), split)
    if literal:
        literal_paired, literal_wins = paired_minus_ce(literal)
        print(f"\nThe literal setting: students of the demo run's own stage-3 model ({demo_bench.teacher_dir}), "
              f"trained on its own {len(_dataset_rows(demo_bench.paths['student']))} stage-3 rows with the "
              f"configurations chosen above; test split, seeds {args.seeds}")
        print_table(literal, labels, literal_paired, literal_wins, len(args.seeds))
    drawn = plot(table, args.seeds, {"pruned, untrained": "pruned", "distill+transfer": "distill\n+transfer"},
                 bench.out / "results.png", reported)
    results = {"args": vars(args), "seconds": seconds, "cpu_seconds": cpu_seconds,
               "load_average": {"start": load_start, "end": load_end},
               "setup": {"data": args.data, **({"demo_dir": str(bench.demo_dir), "teacher": str(bench.teacher_dir),
                                                "teacher_base": str(bench.base_lm),
                                                "student_voices": SPEECH_STUDENT_VOICES,
                                                "voices": {name: sorted({r["voice"] for r in rows})
                                                           for name, rows in bench.sets.items()},
                                                "rows": {name: len(rows) for name, rows in bench.sets.items()}}
                                             if speech else {}),
                         "student_questions": STUDENT_QUESTIONS, "dev_questions": DEV_QUESTIONS,
                         "test_questions": TEST_QUESTIONS, "teacher_voices": TEACHER_VOICES,
                         "student_voices": STUDENT_VOICES, "dev_voices": DEV_VOICES, "test_voices": TEST_VOICES,
                         "transfer_voices": TRANSFER_VOICES,
                         "rows": {name: len(rows) for name, rows in bench.sets.items()}},
               "tuning": tuning, "chosen": chosen, "confirm_of": args.confirm, "token_differences": token_differences,
               "table": table, "paired_minus_ce": paired,
               "seeds_better_than_ce": wins, "teacher_transfer_accuracy": transfer_accuracy,
               "final_train_seconds": final_seconds,
               "literal": {"table": literal, "paired_minus_ce": paired_minus_ce(literal)[0]} if literal else None,
               "plot": str(bench.out / "results.png") if drawn else None}
    (bench.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
