"""Layer-aligned distillation at demo scale: a 3x-shallower student of the demo's stage-3 model, distilled
versus trained without distillation for the same steps (not a timed test).

    python benchmarks/bench_distill.py --output-dir /tmp/bench-distill            # ~15 min on 2 CPU cores
    python benchmarks/bench_distill.py --output-dir /tmp/bench-distill --reuse    # keep the teacher, rerun students

1. The teacher: ``gemma-rvq demo`` (offline, tiny random encoder) with 6-layer LMs instead of 2; its stage-3
   model (LoRA on the continued-pretrained base, merged) is the teacher.
2. Students: every 3rd teacher layer (layers 0 and 3 of 6, aligned with teacher layers 2 and 5), the same
   initial weights for both runs, the same data (the demo's stage-3 training rows), steps, batches and learning
   rate. ``distilled`` trains with CE + softened-logit KL + hidden MSE + attention KL
   (``gemma_rvq.recipes.distill``); ``baseline`` with CE only.
3. Scores on held-out prompts: every spoken training question spoken again by the held-out voice (espeak-ng
   variant f5, never heard in training) and tokenized by the demo's RVQ: dev answer loss (CE of the reference
   answer, teacher forcing) and answer chrF (sacrebleu) of greedy answers; the same on the training prompts.
   Each student's chrF is also given as the fraction of the teacher's.

Needs espeak-ng (``apt-get install espeak-ng``) for the held-out prompts and sacrebleu (``pip install
gemma-rvq[bench]``). Prints a table and writes ``results.json`` in the output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _dev_prompts(demo_dir: Path, work: Path, fmt, rvq_model) -> list[dict]:
    """Every spoken training question, spoken again by the held-out voice and tokenized by the demo's RVQ."""
    import datasets

    sys.path.insert(0, str(ROOT / "scripts"))
    import make_corpus

    from gemma_rvq.transforms import SpeechTokenizer

    rows = []
    for row in make_corpus.instruction_specs():
        if row["file"] and row["split"] == "train":
            voice = f"{make_corpus.LANGUAGES[row['language']]}+{make_corpus.DEV_VARIANT}"
            path = work / "dev-prompts" / f"{row['id']}.flac"
            make_corpus.synthesize(row["instruction"], voice, path)
            rows.append({"id": row["id"], "instruction": row["instruction"], "response": row["response"],
                         "audio": {"path": str(path), "bytes": None}})
    dataset = datasets.Dataset.from_list(rows).cast_column("audio", datasets.Audio(decode=False))
    dataset = dataset.map(SpeechTokenizer(rvq_model, format=fmt, batch_size=1), batched=True, batch_size=8)
    return [{k: row[k] for k in ("id", "instruction", "response", "semantic_tokens")} for row in dataset]


def _conversation(tokens: str, system_prompt: str) -> list[dict]:
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": tokens}]


@torch.no_grad()
def _score(model, tokenizer, prompts: list[dict], system_prompt: str) -> dict[str, float]:
    """Answer loss (teacher forcing, answer tokens only) and chrF of greedy answers against the references."""
    import sacrebleu

    from gemma_rvq.recipes.distill import causal_lm_cross_entropy

    model.eval()
    total, count, answers = 0.0, 0, []
    for row in prompts:
        messages = _conversation(row["semantic_tokens"], system_prompt)
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                               return_tensors="pt")
        full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": row["response"]}],
                                             return_dict=True, return_tensors="pt")
        ids = full["input_ids"]
        labels = ids.clone()
        labels[:, : prompt["input_ids"].shape[1]] = -100
        logits = model(input_ids=ids, attention_mask=full["attention_mask"]).logits
        counted = int((labels[:, 1:] != -100).sum())
        total += causal_lm_cross_entropy(logits, labels).item() * counted
        count += counted
        output = model.generate(**prompt, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    chrf = sacrebleu.corpus_chrf(answers, [[row["response"] for row in prompts]]).score
    return {"loss": total / count, "chrf": chrf, "answers": answers}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="bench_distill_output")
    parser.add_argument("--reuse", action="store_true", help="reuse the teacher demo run in the output folder")
    parser.add_argument("--teacher-layers", type=int, default=6)
    parser.add_argument("--stride", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100, help="student training steps (both runs)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--kl-weight", type=float, default=1.0)
    parser.add_argument("--hidden-weight", type=float, default=1.0)
    parser.add_argument("--attention-weight", type=float, default=1.0)
    parser.add_argument("--teacher-steps", type=int, default=200,
                        help="brief full fine-tuning of the merged teacher on the stage-3 data first (0: none)")
    parser.add_argument("--completion-only", action="store_true",
                        help="distillation terms on the answer positions only (distill_completion_only)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.output_dir).resolve()
    demo_dir = out / "demo"
    load = os.getloadavg()

    from transformers import AutoModel, set_seed

    from gemma_rvq.demo import SYSTEM_PROMPT, DemoSettings, run_demo
    from gemma_rvq.recipes.distill import (
        DistillArguments,
        LayerDistillationConfig,
        build_distill_trainer,
        build_student,
        load_teacher,
        save_student_metadata,
    )
    from gemma_rvq.tokens import get_format

    start = time.perf_counter()
    if not (args.reuse and (demo_dir / "results.json").is_file()):
        run_demo(output_dir=demo_dir, corpus_dir=ROOT / "data" / "corpus", seed=args.seed,
                 settings=DemoSettings(lm_layers=args.teacher_layers))
    demo_seconds = time.perf_counter() - start
    demo = json.loads((demo_dir / "results.json").read_text())
    fmt = get_format(demo["tokens"]["format"])
    work = out / "bench"
    work.mkdir(parents=True, exist_ok=True)
    rvq_model = AutoModel.from_pretrained(demo_dir / "hub" / "rvq-model").eval()
    dev = _dev_prompts(demo_dir, work, fmt, rvq_model)
    import datasets

    train_rows = datasets.load_from_disk(str(demo_dir / "work" / "stage3-data"))
    spoken_train = [{"semantic_tokens": r["semantic_tokens"], "response": r["response"]} for r in train_rows
                    if r["source"] == "spoken"]

    teacher_dir = demo_dir / "hub" / "speech-instruct-lora"
    teacher, tokenizer = load_teacher(str(teacher_dir), attn_implementation="eager")
    scores = {"demo_teacher": {"dev": _score(teacher, tokenizer, dev, SYSTEM_PROMPT),
                               "train": _score(teacher, tokenizer, spoken_train, SYSTEM_PROMPT)}}

    def arguments(name: str, steps: int, **weights):
        script_args = DistillArguments(
            teacher_model_name_or_path=str(teacher_dir), dataset_name=str(demo_dir / "work" / "stage3-data"),
            recipe="speech_instruct", tokens_column="semantic_tokens", response_column="response",
            system_prompt=SYSTEM_PROMPT, layer_stride=args.stride)
        training_args = LayerDistillationConfig(
            output_dir=str(work / name), max_steps=steps, per_device_train_batch_size=8,
            learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=0, max_length=1024,
            bf16=False, use_cpu=True, gradient_checkpointing=False, report_to="none", save_strategy="no",
            logging_steps=max(1, steps // 10), seed=args.seed, data_seed=args.seed, disable_tqdm=True,
            dataloader_num_workers=0, ce_weight=1.0, temperature=args.temperature,
            distill_completion_only=args.completion_only, **weights)
        return script_args, training_args

    timings = {}
    saved_teacher = work / "teacher"
    if args.teacher_steps and args.reuse and (saved_teacher / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        teacher = AutoModelForCausalLM.from_pretrained(saved_teacher, attn_implementation="eager").eval()
    elif args.teacher_steps:  # TinyWave first fine-tunes the teacher briefly on the target data (all layers, CE)
        import copy

        set_seed(args.seed)
        teacher.requires_grad_(True)  # merged from a LoRA adapter: the base weights come frozen
        trainer = build_distill_trainer(*arguments("teacher", args.teacher_steps, kl_weight=0.0, hidden_weight=0.0,
                                                   attention_weight=0.0),
                                        teacher=copy.deepcopy(teacher), tokenizer=tokenizer, student=teacher)
        t0 = time.perf_counter()
        trainer.train()
        timings["teacher"] = time.perf_counter() - t0
        teacher = trainer.model.eval()
        teacher.save_pretrained(saved_teacher)  # --reuse starts from it
        del trainer
    scores["teacher"] = {"dev": _score(teacher, tokenizer, dev, SYSTEM_PROMPT),
                         "train": _score(teacher, tokenizer, spoken_train, SYSTEM_PROMPT)}
    layers = teacher.config.num_hidden_layers
    runs = {
        "baseline": {"kl_weight": 0.0, "hidden_weight": 0.0, "attention_weight": 0.0},
        "distilled": {"kl_weight": args.kl_weight, "hidden_weight": args.hidden_weight,
                      "attention_weight": args.attention_weight},
    }
    for name, weights in runs.items():
        set_seed(args.seed)
        student = build_student(teacher, layer_stride=args.stride)
        script_args, training_args = arguments(name, args.steps, **weights)
        trainer = build_distill_trainer(script_args, training_args, teacher=teacher, tokenizer=tokenizer,
                                        student=student)
        t0 = time.perf_counter()
        trainer.train()
        timings[name] = time.perf_counter() - t0
        trainer.save_model(training_args.output_dir)
        save_student_metadata(trainer, training_args.output_dir)
        from gemma_rvq.recipes import load_sft_model

        saved, saved_tokenizer = load_sft_model(training_args.output_dir)  # as stage-3 inference loads it
        scores[name] = {"dev": _score(saved, saved_tokenizer, dev, SYSTEM_PROMPT),
                        "train": _score(saved, saved_tokenizer, spoken_train, SYSTEM_PROMPT),
                        "final_logs": [e for e in trainer.state.log_history if "loss" in e][-1]}

    teacher_params = sum(p.numel() for p in teacher.parameters())
    student_params = sum(p.numel() for p in saved.parameters())
    print(f"\nload average at start {load[0]:.2f}; teacher demo {demo_seconds:.0f} s; "
          f"teacher fine-tuning {timings.get('teacher', 0):.0f} s; student runs {timings['baseline']:.0f} s (CE only) "
          f"/ {timings['distilled']:.0f} s (distilled)")
    print(f"teacher: {layers} layers, {teacher_params:,} parameters; students: {layers // args.stride} layers "
          f"(teacher layers {list(range(0, layers, args.stride))}), {student_params:,} parameters; "
          f"{args.steps} steps each; {len(dev)} held-out-voice prompts, {len(spoken_train)} training prompts")
    teacher_chrf = scores["teacher"]["dev"]["chrf"]
    print(f"{'model':<13} {'dev loss':>9} {'dev chrF':>9} {'of teacher':>11} {'train loss':>11} {'train chrF':>11}")
    for name in ("demo_teacher", "teacher", "baseline", "distilled"):
        s = scores[name]
        kept = s["dev"]["chrf"] / teacher_chrf if teacher_chrf else float("nan")
        print(f"{name:<13} {s['dev']['loss']:>9.3f} {s['dev']['chrf']:>9.1f} {kept:>11.2f} "
              f"{s['train']['loss']:>11.3f} {s['train']['chrf']:>11.1f}")
    results = {"args": vars(args), "load_average": load, "timings": timings, "demo_seconds": demo_seconds,
               "teacher_parameters": teacher_params, "student_parameters": student_params, "scores": scores}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
