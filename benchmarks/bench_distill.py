"""Layer-aligned distillation at demo scale, set up as distillation is used: a teacher that knows more than the
students' training data, settings chosen on a dev split with the same budget for both students, scores on a
test split that no choice ever saw, several seeds (not a timed test).

    python benchmarks/bench_distill.py --output-dir /tmp/bench-distill          # hours on 2 busy CPU cores
    python benchmarks/bench_distill.py --output-dir /tmp/bench-distill-q --quick  # minutes: the script runs

Every step is cached in the output folder (the demo run, the clips, the token datasets, each teacher, each
student with its scores): the same command resumes where it stopped, then prints the tables and writes
``results.json``. A cached step whose settings differ from the current ones is redone.

- Questions: the 24 question/answer pairs of ``data/corpus/instructions.jsonl`` (12 English, 12 Swahili),
  numbered 0-11 per language. 0-6 are the students' questions (the corpus' spoken training rows, i.e. the demo's
  stage-3 rows), 7-8 are held out for dev only, 9-11 for test only.
- Voices (espeak-ng variants): students m3/f3 (the corpus clips); teacher m3, f3, m1, m2, m4, m7, f1, f2 (speed
  and pitch drawn per clip); dev m5 and f4; test m6 and f5. No dev or test voice is in any training set.
- Teacher (one per seed): the stage-3 model of ``gemma-rvq demo`` run with 6-layer LMs (LoRA merged), fine-tuned
  in full on all 24 questions in the 8 teacher voices plus the corpus clips: it knows the 10 held-out questions.
- Students: teacher layers 0 and 3 (3x shallower, weights copied), trained on the 14 corpus rows only.
  ``ce``: cross-entropy only; ``distill``: cross-entropy + distillation terms (``gemma_rvq.recipes.distill``).
- Tuning, on seed 0's teacher and the dev split only: 8 configurations per student kind, the lowest dev answer
  loss is chosen: ``ce`` over learning rate x steps, ``distill`` over temperature x completion-only x terms.
- Report: the two chosen configurations trained again with seeds 1-3 (each with its own teacher), scored on
  the test split: answer loss (teacher forcing) and chrF (sacrebleu) of greedy answers, for the students'
  questions and the held-out ones in new voices, and the fraction of the teacher's test chrF each student keeps.

Needs espeak-ng (``apt-get install espeak-ng``) and sacrebleu (``pip install gemma-rvq[bench]``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import random
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

STUDENT_QUESTIONS = tuple(range(7))  # per language: the corpus' spoken training questions
DEV_QUESTIONS = (7, 8)  # held out from the students, used for choices
TEST_QUESTIONS = (9, 10, 11)  # held out from the students, never used for a choice
STUDENT_VOICES = ("m3", "f3")  # the corpus clips' variants (one per question)
TEACHER_VOICES = ("m3", "f3", "m1", "m2", "m4", "m7", "f1", "f2")
DEV_VOICES = ("m5", "f4")
TEST_VOICES = ("m6", "f5")
TUNE_SEED = 0

NO_DISTILLATION = {"kl_weight": 0.0, "hidden_weight": 0.0, "attention_weight": 0.0}
TERMS = {"all": {"kl_weight": 1.0, "hidden_weight": 1.0, "attention_weight": 1.0},
         "kl": {"kl_weight": 1.0, "hidden_weight": 0.0, "attention_weight": 0.0}}
# the same number of configurations for each student kind
CE_GRID = {f"ce lr={lr:g} steps={steps}": {"learning_rate": lr, "max_steps": steps, **NO_DISTILLATION}
           for lr in (1e-4, 3e-4, 1e-3, 3e-3) for steps in (50, 100)}
DISTILL_GRID = {
    f"distill T={t:g} {'answer' if answers else 'every'}-tokens {terms}": {
        "learning_rate": 1e-3, "max_steps": 100, "temperature": t, "distill_completion_only": answers,
        **TERMS[terms]}
    for t in (1.0, 4.0) for answers in (False, True) for terms in ("all", "kl")
}


# ---------------------------------------------------------------------------------------------- data
def _make_corpus():
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_corpus

    return make_corpus


def _questions() -> list[dict]:
    """The 24 training question rows of the corpus, each with its number ``q`` (0-11 within its language)."""
    rows = [dict(row) for row in _make_corpus().instruction_specs() if row["split"] == "train"]
    for row in rows:
        row["q"] = int(row["id"].rsplit("_", 1)[1])
    return rows


def _clip_specs(work: Path) -> dict[str, list[dict]]:
    """Every clip of the benchmark by set: ``student`` (corpus clips), ``teacher``, ``dev``, ``test``."""
    make_corpus = _make_corpus()
    rng = random.Random(1234)  # fixed: the data never changes with the run seed
    questions = _questions()
    sets: dict[str, list[dict]] = {"student": [], "teacher": [], "dev": [], "test": []}

    def clip(row, variant, kind, speed=175, pitch=50, path=None):
        voice = f"{make_corpus.LANGUAGES[row['language']]}+{variant}"
        return {"id": f"{row['id']}-{variant}-{kind}", "q": row["q"], "language": row["language"],
                "instruction": row["instruction"], "response": row["response"], "voice": voice, "speed": speed,
                "pitch": pitch, "synthesize": path is None,
                "path": str(path or work / "clips" / kind / variant / f"{row['id']}.flac"),
                "group": "student-questions" if row["q"] in STUDENT_QUESTIONS else "held-out-questions"}

    for row in questions:
        if row["q"] in STUDENT_QUESTIONS:
            variant = row["voice"].split("+")[1]
            assert variant in STUDENT_VOICES, row
            corpus_clip = clip(row, variant, "corpus", path=ROOT / "data" / "corpus" / row["file"])
            sets["student"].append(corpus_clip)
            sets["teacher"].append(corpus_clip)
        for variant in TEACHER_VOICES:
            sets["teacher"].append(clip(row, variant, "teacher", rng.randint(160, 190), rng.randint(40, 60)))
        for variant in DEV_VOICES:
            if row["q"] in STUDENT_QUESTIONS + DEV_QUESTIONS:
                sets["dev"].append(clip(row, variant, "dev"))
        for variant in TEST_VOICES:
            if row["q"] in STUDENT_QUESTIONS + TEST_QUESTIONS:
                sets["test"].append(clip(row, variant, "test"))
    return sets


def build_data(out: Path, rvq_folder: Path, fmt) -> dict[str, list[dict]]:
    """Synthesise the clips (cached), tokenize every set with the demo's RVQ model; saved under ``out/data``."""
    import datasets

    data = out / "data"
    done = data / "sets.json"
    sets = _clip_specs(out)
    if done.is_file():
        return json.loads(done.read_text())
    make_corpus = _make_corpus()
    todo = {c["path"]: c for rows in sets.values() for c in rows if c["synthesize"] and not Path(c["path"]).is_file()}

    def speak(c):
        make_corpus.synthesize(c["instruction"], c["voice"], c["path"], speed=c["speed"], pitch=c["pitch"])

    print(f"synthesising {len(todo)} clips with espeak-ng")
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(speak, todo.values()))
    from transformers import AutoModel

    from gemma_rvq.transforms import SpeechTokenizer

    rvq_model = AutoModel.from_pretrained(rvq_folder).eval()
    unique = {c["path"]: c for rows in sets.values() for c in rows}
    table = datasets.Dataset.from_list([{"path": p, "audio": {"path": p, "bytes": None}} for p in unique])
    table = table.cast_column("audio", datasets.Audio(decode=False))
    table = table.map(SpeechTokenizer(rvq_model, format=fmt, batch_size=1), batched=True, batch_size=16,
                      desc="Tokenizing the benchmark clips")
    tokens = dict(zip(table["path"], table["semantic_tokens"], strict=True))
    for rows in sets.values():
        for c in rows:
            c["semantic_tokens"] = tokens[c["path"]]
    for name in ("student", "teacher"):
        datasets.Dataset.from_list([{"semantic_tokens": c["semantic_tokens"], "response": c["response"]}
                                    for c in sets[name]]).save_to_disk(str(data / f"{name}-train"))
    done.write_text(json.dumps(sets))
    return sets


# ---------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def score(model, tokenizer, rows: list[dict], system_prompt: str) -> list[dict]:
    """Per prompt: the answer's summed cross-entropy (teacher forcing, answer tokens only), its token count,
    and the greedy answer (16 new tokens at most)."""
    from gemma_rvq.recipes.distill import causal_lm_cross_entropy

    model.eval()
    results = []
    for row in rows:
        messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": row["semantic_tokens"]}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                               return_tensors="pt")
        full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": row["response"]}],
                                             return_dict=True, return_tensors="pt")
        labels = full["input_ids"].clone()
        labels[:, : prompt["input_ids"].shape[1]] = -100
        logits = model(input_ids=full["input_ids"], attention_mask=full["attention_mask"]).logits
        counted = int((labels[:, 1:] != -100).sum())
        output = model.generate(**prompt, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        results.append({"id": row["id"], "group": row["group"], "nll": causal_lm_cross_entropy(logits, labels).item()
                        * counted, "tokens": counted, "answer": answer, "reference": row["response"]})
    return results


def summarize(per_prompt: list[dict], group: str | None = None) -> dict[str, float]:
    """Answer loss (per answer token) and corpus chrF over the prompts of ``group`` (None: all)."""
    import sacrebleu

    rows = [r for r in per_prompt if group is None or r["group"] == group]
    if not rows:
        return {"loss": float("nan"), "chrf": float("nan"), "prompts": 0}
    chrf = sacrebleu.corpus_chrf([r["answer"] for r in rows], [[r["reference"] for r in rows]]).score
    return {"loss": sum(r["nll"] for r in rows) / sum(r["tokens"] for r in rows), "chrf": chrf, "prompts": len(rows)}


@contextlib.contextmanager
def _lock(path: Path):
    """Wait while another live process holds ``path`` (its pid inside), then hold it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                os.kill(int(path.read_text() or 0), 0)
            except (ProcessLookupError, ValueError, FileNotFoundError):
                path.unlink(missing_ok=True)  # left by a process that is gone
                continue
            time.sleep(30)
    os.write(handle, str(os.getpid()).encode())
    os.close(handle)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _cached(folder: Path, spec: dict) -> dict | None:
    path = folder / "scores.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("spec") == spec:
            return saved
    return None


# ---------------------------------------------------------------------------------------------- runs
class Bench:
    def __init__(self, args):
        from gemma_rvq.demo import SYSTEM_PROMPT

        self.args = args
        self.out = Path(args.output_dir).resolve()
        self.demo = self.out / "demo"
        self.stage3 = self.demo / "hub" / "speech-instruct-lora"
        self.system_prompt = SYSTEM_PROMPT
        self.sets: dict[str, list[dict]] = {}

    def scale(self, steps: int) -> int:
        return max(2, steps // 25) if self.args.quick else steps

    def eval_rows(self, split: str) -> list[dict]:
        rows = self.sets[split]
        return rows[::6] if self.args.quick else rows

    def prepare(self) -> None:
        from gemma_rvq.demo import DemoSettings, run_demo
        from gemma_rvq.tokens import get_format

        if not (self.demo / "results.json").is_file():
            settings = DemoSettings.quick() if self.args.quick else DemoSettings()
            settings.lm_layers = self.args.teacher_layers
            run_demo(output_dir=self.demo, corpus_dir=ROOT / "data" / "corpus", seed=0, settings=settings)
        fmt = get_format(json.loads((self.demo / "results.json").read_text())["tokens"]["format"])
        self.sets = build_data(self.out, self.demo / "hub" / "rvq-model", fmt)

    def training_args(self, output_dir: Path, seed: int, **settings):
        from gemma_rvq.recipes.distill import DistillArguments, LayerDistillationConfig

        steps = self.scale(settings.pop("max_steps"))
        data = "teacher-train" if settings.pop("teacher_data", False) else "student-train"
        script_args = DistillArguments(
            teacher_model_name_or_path=str(settings.pop("teacher")), dataset_name=str(self.out / "data" / data),
            recipe="speech_instruct", tokens_column="semantic_tokens", response_column="response",
            system_prompt=self.system_prompt, layer_stride=self.args.stride)
        training_args = LayerDistillationConfig(
            output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=8, lr_scheduler_type="cosine",
            warmup_steps=0, max_length=1024, bf16=False, use_cpu=True, gradient_checkpointing=False, report_to="none",
            save_strategy="no", logging_steps=max(1, steps // 10), seed=seed, data_seed=seed, disable_tqdm=True,
            dataloader_num_workers=0, ce_weight=1.0, **settings)
        return script_args, training_args

    def teacher(self, seed: int) -> tuple[Path, dict]:
        """The seed's teacher: the demo's stage-3 model fine-tuned in full on every question in 8 voices."""
        folder = self.out / "teachers" / f"seed{seed}"
        spec = {"seed": seed, "steps": self.scale(self.args.teacher_steps), "lr": self.args.teacher_lr,
                "dev": len(self.eval_rows("dev")), "test": len(self.eval_rows("test"))}
        with _lock(folder.with_suffix(".lock")):  # another invocation may be training it (--teachers-only)
            cached = _cached(folder, spec)
            if cached:
                return folder / "model", cached
            return self._train_teacher(folder, seed, spec)

    def _train_teacher(self, folder: Path, seed: int, spec: dict) -> tuple[Path, dict]:
        from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

        from gemma_rvq.recipes.distill import build_distill_trainer, load_teacher, save_student_metadata

        shutil.rmtree(folder, ignore_errors=True)
        model, tokenizer = load_teacher(str(self.stage3))
        model.requires_grad_(True)  # merged from a LoRA adapter: the base weights come frozen
        set_seed(seed)
        script_args, training_args = self.training_args(
            folder / "run", seed, teacher=self.stage3, teacher_data=True, max_steps=self.args.teacher_steps,
            learning_rate=self.args.teacher_lr, **NO_DISTILLATION)
        trainer = build_distill_trainer(script_args, training_args, teacher=copy.deepcopy(model),
                                        tokenizer=tokenizer, student=model)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        trainer.save_model(str(folder / "model"))
        save_student_metadata(trainer, str(folder / "model"))
        recipe_file = folder / "model" / "gemma_rvq_recipe.json"
        recipe = json.loads(recipe_file.read_text())
        recipe.pop("distillation", None)
        recipe_file.write_text(json.dumps({**recipe, "fine_tuned_from": str(self.stage3)}, indent=2))
        model = AutoModelForCausalLM.from_pretrained(folder / "model")
        tokenizer = AutoTokenizer.from_pretrained(folder / "model")
        scores = {split: score(model, tokenizer, self.eval_rows(split), self.system_prompt) for split in ("dev", "test")}
        from gemma_rvq.recipes.distill import build_student

        pruned = build_student(model, layer_stride=self.args.stride)  # the students' start, untrained
        result = {"spec": spec, "train_seconds": seconds, "scores": scores,
                  "pruned_scores": {split: score(pruned, tokenizer, self.eval_rows(split), self.system_prompt)
                                    for split in ("dev", "test")},
                  "final_log": [e for e in trainer.state.log_history if "loss" in e][-1],
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "student_parameters": sum(p.numel() for p in pruned.parameters())}
        (folder / "scores.json").write_text(json.dumps(result, indent=1))
        return folder / "model", result

    def student(self, name: str, folder: Path, seed: int, config: dict, splits: tuple[str, ...]) -> dict:
        """Train one student of ``teacher(seed)`` with ``config``; cached scores on ``splits``."""
        from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

        from gemma_rvq.recipes import load_sft_model
        from gemma_rvq.recipes.distill import build_distill_trainer, build_student, save_student_metadata

        teacher_dir, _ = self.teacher(seed)
        spec = {"name": name, "seed": seed, "config": config, "stride": self.args.stride,
                "steps": self.scale(config["max_steps"]), "teacher": self.teacher_spec(seed),
                "prompts": {split: len(self.eval_rows(split)) for split in splits}}
        cached = _cached(folder, spec)
        if cached:
            return cached
        shutil.rmtree(folder, ignore_errors=True)
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
        tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
        set_seed(seed)
        student = build_student(teacher, layer_stride=self.args.stride)
        script_args, training_args = self.training_args(folder / "run", seed, teacher=teacher_dir, **config)
        trainer = build_distill_trainer(script_args, training_args, teacher=teacher, tokenizer=tokenizer,
                                        student=student)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        trainer.save_model(str(folder / "model"))
        save_student_metadata(trainer, str(folder / "model"))
        saved, saved_tokenizer = load_sft_model(str(folder / "model"))  # as stage-3 inference loads it
        result = {"spec": spec, "train_seconds": seconds,
                  "scores": {split: score(saved, saved_tokenizer, self.eval_rows(split), self.system_prompt)
                             for split in splits},
                  "final_log": [e for e in trainer.state.log_history if "loss" in e][-1]}
        (folder / "scores.json").write_text(json.dumps(result, indent=1))
        shutil.rmtree(folder / "run", ignore_errors=True)
        return result

    def teacher_spec(self, seed: int) -> dict:
        return json.loads((self.out / "teachers" / f"seed{seed}" / "scores.json").read_text())["spec"]

    def grids(self) -> tuple[dict, dict]:
        if self.args.quick:
            return dict(list(CE_GRID.items())[:2]), dict(list(DISTILL_GRID.items())[:2])
        return CE_GRID, DISTILL_GRID


# ---------------------------------------------------------------------------------------------- report
def _mean_sd(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"


def _mean_sd1(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def _cell(key: str, values: list[float]) -> str:
    if key.endswith("/kept"):
        mean = statistics.fmean(values)
        return f"{mean:.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"
    return (_mean_sd1 if key.endswith("/chrf") else _mean_sd)(values)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="bench_distill_output")
    parser.add_argument("--teacher-layers", type=int, default=6)
    parser.add_argument("--stride", type=int, default=3)
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--teacher-lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds of the reported runs")
    parser.add_argument("--teachers-only", action="store_true",
                        help="train (or wait for) the teachers of --seeds and stop: run beside the full command to "
                             "train them while the tuning runs")
    parser.add_argument("--quick", action="store_true", help="a few steps and prompts: checks that it runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    start = time.perf_counter()
    bench = Bench(args)
    bench.prepare()
    if args.teachers_only:
        for seed in args.seeds:
            bench.teacher(seed)
        return {}
    ce_grid, distill_grid = bench.grids()

    # 1. tuning: seed 0's teacher, dev split only
    tuning = {}
    for kind, grid in (("ce", ce_grid), ("distill", distill_grid)):
        for i, (name, config) in enumerate(grid.items()):
            result = bench.student(name, bench.out / "tune" / f"{kind}-{i}", TUNE_SEED, config, ("dev",))
            tuning[name] = {"kind": kind, "config": config, "dev": summarize(result["scores"]["dev"]),
                            "train_seconds": result["train_seconds"]}
            print(f"tuned {name}: dev loss {tuning[name]['dev']['loss']:.3f}, chrF {tuning[name]['dev']['chrf']:.1f}")
    chosen = {kind: min((n for n in tuning if tuning[n]["kind"] == kind), key=lambda n: tuning[n]["dev"]["loss"])
              for kind in ("ce", "distill")}

    # 2. report: fresh seeds, each with its own teacher, test split
    groups = (None, "student-questions", "held-out-questions")
    table: dict[str, dict[str, list]] = {}

    def add(row: str, seed: int, per_prompt: list[dict], split: str):
        for group in groups:
            summary = summarize(per_prompt, group)
            for metric in ("loss", "chrf"):
                table.setdefault(row, {}).setdefault(f"{split}/{group or 'all'}/{metric}", []).append(summary[metric])

    final = {}
    for seed in args.seeds:
        _, teacher = bench.teacher(seed)
        for split in ("dev", "test"):
            add("teacher", seed, teacher["scores"][split], split)
            add("pruned, untrained", seed, teacher["pruned_scores"][split], split)
        for kind, name in chosen.items():
            result = bench.student(name, bench.out / "final" / f"seed{seed}" / kind, seed, tuning[name]["config"],
                                   ("dev", "test"))
            final[f"{kind} seed {seed}"] = result
            for split in ("dev", "test"):
                add(kind, seed, result["scores"][split], split)
    for row in list(table):
        table[row]["test/all/kept"] = [s / t if t else float("nan") for s, t in
                                       zip(table[row]["test/all/chrf"], table["teacher"]["test/all/chrf"], strict=True)]
    paired = {key: [d - c for d, c in zip(table["distill"][key], table["ce"][key], strict=True)]
              for key in table["ce"]}

    load_end = os.getloadavg()
    teacher0 = json.loads((bench.out / "teachers" / f"seed{args.seeds[0]}" / "scores.json").read_text())
    print(f"\nload average {load_start[0]:.1f} at start, {load_end[0]:.1f} at the end; {time.perf_counter() - start:.0f} s "
          f"this invocation. Teacher {args.teacher_layers} layers, {teacher0['parameters']:,} parameters; students "
          f"{args.teacher_layers // args.stride} layers, {teacher0['student_parameters']:,} parameters")
    print(f"data: students {len(bench.sets['student'])} rows, teacher {len(bench.sets['teacher'])} rows, "
          f"dev {len(bench.eval_rows('dev'))} prompts, test {len(bench.eval_rows('test'))} prompts")
    print(f"\nTuning (seed {TUNE_SEED}, dev split; chosen: lowest dev answer loss per kind)")
    print(f"{'configuration':<42} {'dev loss':>9} {'dev chrF':>9} {'train s':>8}")
    for name, entry in tuning.items():
        mark = " *" if name in chosen.values() else ""
        print(f"{name + mark:<42} {entry['dev']['loss']:>9.3f} {entry['dev']['chrf']:>9.1f} {entry['train_seconds']:>8.0f}")
    print(f"\nTest split, seeds {args.seeds} (mean ± sd); 'kept' = student test chrF / teacher test chrF")
    header = ["test loss", "test chrF", "kept", "loss, stud. q", "chrF, stud. q", "loss, held-out q",
              "chrF, held-out q"]
    keys = ["test/all/loss", "test/all/chrf", "test/all/kept", "test/student-questions/loss",
            "test/student-questions/chrf", "test/held-out-questions/loss", "test/held-out-questions/chrf"]
    print("| model | " + " | ".join(header) + " |")
    print("|---" * (len(header) + 1) + "|")
    for row in ("teacher", "pruned, untrained", "ce", "distill"):
        label = {"ce": f"ce ({chosen['ce']})", "distill": f"distill ({chosen['distill']})"}.get(row, row)
        cells = [_cell(k, table[row][k]) for k in keys]
        print(f"| {label} | " + " | ".join(cells) + " |")
    cells = [_cell(k, paired[k]) for k in keys]
    print("| distill - ce (paired by seed) | " + " | ".join(cells) + " |")
    results = {"args": vars(args), "load_average": {"start": load_start, "end": load_end},
               "setup": {"student_questions": STUDENT_QUESTIONS, "dev_questions": DEV_QUESTIONS,
                         "test_questions": TEST_QUESTIONS, "student_voices": STUDENT_VOICES,
                         "teacher_voices": TEACHER_VOICES, "dev_voices": DEV_VOICES, "test_voices": TEST_VOICES},
               "tuning": tuning, "chosen": chosen, "table": table, "paired_distill_minus_ce": paired,
               "final_runs": {k: {"spec": v["spec"], "train_seconds": v["train_seconds"], "final_log": v["final_log"]}
                              for k, v in final.items()}}
    (bench.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
