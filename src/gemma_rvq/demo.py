"""``gemma-rvq demo``: the whole pipeline, offline, at toy scale, on the bundled espeak-ng corpus.

    gemma-rvq demo --output-dir demo_output            # or: make demo
    gemma-rvq demo --encoder rnagabh/gemma4-audio-encoder   # the same run with a real encoder (Hub access)

Six steps, each through the library's public entry points (nothing here re-implements them):

1. the frozen encoder: a tiny *random* Gemma 4 audio encoder (``gemma_rvq.testing``), or any supported
   encoder given by id/path (its family is read from its config);
2. stage 1: embedding cache + RVQ training (``gemma_rvq.training.train_rvq``, the code behind
   ``examples/train_rvq.py``), then the evaluate metrics on the dev split (unseen sentences, unseen voice);
3. the corpus -> semantic tokens with ``dataset.map(SpeechTokenizer(...), batched=True)``;
4. stage 2 (Speechless): a tiny LM learns text -> tokens (``gemma_rvq.recipes.run_sft``, the code behind
   ``examples/sft.py``), then writes tokens for the text-only instructions (constrained generation);
5. stage 3: the base LM first continues pretraining for a few steps on packed speech/text documents
   (``--recipe cpt``: transcripts, token strings, pairs, word-interleaved sequences), then learns tokens ->
   answers with LoRA (spoken + Speechless-generated instructions) and answers the held-out spoken prompts;
6. a report folder: ``report.md``, PNG plots, and Hub-ready folders with the ``gemma-rvq push`` commands.

Every step prints a ``[k/6]`` header and its elapsed time; any failure raises (the CLI exits non-zero).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DemoResult", "DemoSettings", "encoder_model_config", "load_corpus", "run_demo"]

REAL_ENCODER_HINT = "rnagabh/gemma4-audio-encoder"
LANGUAGE_NAMES = {"en": "English", "sw": "Swahili", "vi": "Vietnamese", "es": "Spanish", "fr": "French"}
NUM_STEPS = 6


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the toy run. ``quick`` keeps the same pipeline with far fewer optimisation steps."""

    encoder_hidden_size: int = 64
    num_quantizers: int = 4
    codebook_size: int = 64
    rvq_steps: int = 60
    rvq_batch_frames: int = 256
    lm_hidden_size: int = 64
    lm_layers: int = 2
    lm_vocab_size: int = 512
    stage2_steps: int = 300
    stage3_steps: int = 200
    cpt_steps: int = 40  # continued pretraining of the base LM on packed speech/text documents before stage 3
    batch_size: int = 8
    learning_rate: float = 3e-3
    lora_r: int = 16
    lora_alpha: int = 32
    rvq_evaluations: int = 3
    rvq_plots: bool = True
    max_new_tokens: int | None = None  # stage-2 generation; None: 1.5x the longest training token string
    asr_steps: int = 200  # stage 3, asr recipe (evaluated with CER/WER)
    probe_steps: int = 100  # the content probe (CTC, tokens -> characters)
    # torch CPU threads during the demo (restored afterwards). Models this small gain little from a second
    # thread, and on a busy machine OpenMP's spinning makes 2 threads 10-20x slower than 1 (measured).
    num_threads: int | None = 1

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(rvq_steps=8, rvq_evaluations=1, rvq_plots=False, stage2_steps=8, stage3_steps=6, cpt_steps=4,
                   max_new_tokens=24, asr_steps=6, probe_steps=10)


@dataclass
class DemoResult:
    """What :func:`run_demo` produced: folders, the stage-1 dev metrics, counts and per-step timings."""

    output_dir: Path
    report: Path
    plots: dict[str, Path]
    hub_folders: dict[str, Path]
    metrics: dict[str, float]
    generated: int
    parsed: int
    answers: list[dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)
    downstream: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_folder(cls, output_dir: str | os.PathLike) -> DemoResult:
        """The result of a finished run, read back from ``<output_dir>/results.json``."""
        out = Path(output_dir).expanduser().resolve()
        path = out / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: no finished demo run in {out}")
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(output_dir=out, report=out / "report.md",
                   plots={k: out / v for k, v in data["plots"].items()},
                   hub_folders={k: out / v for k, v in data["hub_folders"].items()},
                   metrics=data["stage1"]["metrics"], generated=data["stage2"]["generated"],
                   parsed=data["stage2"]["parsed"], answers=data["stage3"]["answers"], timings=data["timings"],
                   downstream=data.get("downstream", {}))


# ---------------------------------------------------------------------------------------------- corpus


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not a JSON line ({err})") from None
    return rows


def load_corpus(corpus_dir: str | os.PathLike | None = None) -> tuple[Path, list[dict], list[dict]]:
    """``(folder, utterances, instructions)`` of a corpus laid out like ``data/corpus``.

    ``utterances``: rows of ``metadata.jsonl`` (``file``, ``text``, ``language``, ``voice``, ``split``);
    ``instructions``: rows of ``instructions.jsonl`` (``instruction``, ``response``, ``file`` or null).
    Raises ``FileNotFoundError`` naming what is missing.
    """
    folder = Path(corpus_dir if corpus_dir is not None else "data/corpus").expanduser().resolve()
    hint = ("run the demo from the root of a gemma-rvq clone (the corpus is committed at data/corpus), pass "
            "--corpus DIR, or regenerate it with `python scripts/make_corpus.py --out data/corpus`")
    if not folder.is_dir():
        raise FileNotFoundError(f"corpus folder {folder} does not exist: {hint}")
    for name in ("metadata.jsonl", "instructions.jsonl"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"corpus folder {folder} has no {name}: {hint}")
    utterances = _read_jsonl(folder / "metadata.jsonl")
    instructions = _read_jsonl(folder / "instructions.jsonl")
    for kind, rows, needed in (("metadata.jsonl", utterances, ("file", "text", "language", "split")),
                               ("instructions.jsonl", instructions, ("instruction", "response", "language",
                                                                     "split"))):
        for index, row in enumerate(rows):
            missing = [key for key in needed if key not in row]
            if missing:
                raise ValueError(f"{folder / kind}: row {index} lacks {missing}")
            if row.get("file") is not None and not (folder / row["file"]).is_file():
                raise FileNotFoundError(f"{folder / kind}: row {index}: audio file {row['file']} is missing")
    splits = {row["split"] for row in utterances}
    if not {"train", "dev"} <= splits:
        raise ValueError(f"{folder / 'metadata.jsonl'} needs train and dev rows, found splits {sorted(splits)}")
    if not any(row.get("file") and row["split"] == "dev" for row in instructions):
        raise ValueError(f"{folder / 'instructions.jsonl'} has no spoken dev instruction (the held-out prompt)")
    return folder, utterances, instructions


# ---------------------------------------------------------------------------------------------- encoder


def encoder_model_config(encoder: str, *, num_quantizers: int, codebook_size: int) -> dict[str, Any]:
    """``GemmaRVQConfig`` keyword arguments for a pretrained encoder (Hub id or local folder).

    The family and the hidden size are read from the encoder's own config: ``gemma4`` (a full Gemma 4
    checkpoint: its audio tower) or ``gemma4_audio``, ``hubert``, ``wav2vec2``, ``whisper``.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(encoder)
    except Exception as err:
        raise ValueError(f"cannot read the config of encoder {encoder!r}: {err}") from err
    model_type = getattr(config, "model_type", None)
    if model_type == "gemma4":
        audio = getattr(config, "audio_config", None)
        if audio is None:
            raise ValueError(f"{encoder!r} is a Gemma 4 checkpoint without an audio tower")
        family, dim = "gemma4_audio", audio.hidden_size
    elif model_type == "gemma4_audio":
        family, dim = "gemma4_audio", config.hidden_size
    elif model_type in ("hubert", "wav2vec2"):
        family, dim = model_type, config.hidden_size
    elif model_type == "whisper":
        family, dim = "whisper", config.d_model
    else:
        raise ValueError(
            f"encoder {encoder!r} has model_type {model_type!r}; supported: gemma4 / gemma4_audio, hubert, "
            "wav2vec2, whisper"
        )
    return {"encoder_family": family, "encoder_name_or_path": str(encoder), "dim": int(dim),
            "num_quantizers": num_quantizers, "codebook_size": codebook_size}


# ---------------------------------------------------------------------------------------------- helpers


class _Progress:
    """Step headers with elapsed time, and per-step durations for the report."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.timings: dict[str, float] = {}
        self._current: tuple[str, float] | None = None

    def step(self, k: int, title: str) -> None:
        self.done()
        elapsed = time.perf_counter() - self.start
        print(f"\n[{k}/{NUM_STEPS}] {title}   (elapsed {elapsed:.0f} s)", flush=True)
        self._current = (f"[{k}/{NUM_STEPS}] {title}", time.perf_counter())

    def done(self) -> None:
        if self._current is not None:
            name, t0 = self._current
            self.timings[name] = time.perf_counter() - t0
            print(f"      done in {self.timings[name]:.1f} s", flush=True)
            self._current = None

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


def _clean(folder: Path) -> None:
    """Remove a folder the demo itself writes (never the output folder as a whole)."""
    if folder.is_dir():
        shutil.rmtree(folder)
    elif folder.exists():
        folder.unlink()


def _sft_args(**values: Any):
    """``(script_args, training_args, model_args)`` parsed exactly as ``examples/sft.py`` would parse them."""
    from trl import ModelConfig, SFTConfig, TrlParser

    from .recipes import SemanticSFTArguments

    argv = []
    for key, value in values.items():
        argv += [f"--{key}", str(value)]
    parsed = TrlParser((SemanticSFTArguments, SFTConfig, ModelConfig)).parse_args_and_config(argv)
    return parsed, shlex.join(["python", "examples/sft.py", *argv])


def _losses(log_history: list[dict]) -> list[tuple[int, float]]:
    return [(int(entry["step"]), float(entry["loss"])) for entry in log_history if "loss" in entry]


def _truncate_tokens(tokens: str, fmt: Any, keep: int = 12) -> str:
    """The first ``keep`` code tokens of a token string (markers kept), with the number left out."""
    import re

    parts = re.findall(r"<\|[^|]*\|>", tokens)
    if len(parts) <= keep + 2:
        return tokens
    return "".join(parts[: keep + 1]) + f" ... ({len(parts) - keep - 2} more) ..." + parts[-1]


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


# ---------------------------------------------------------------------------------------------- the demo


def run_demo(
    output_dir: str | os.PathLike = "demo_output",
    corpus_dir: str | os.PathLike | None = None,
    encoder: str | None = None,
    seed: int = 0,
    *,
    quick: bool = False,
    settings: DemoSettings | None = None,
) -> DemoResult:
    """Run the six steps and write the report folder; returns a :class:`DemoResult`.

    Args:
        output_dir: the report folder (created; the demo's own sub-folders in it are replaced).
        corpus_dir: a corpus laid out like ``data/corpus`` (default: ``./data/corpus``).
        encoder: ``None`` for a tiny random Gemma 4 audio encoder (offline), or a Hub id / folder of a
            supported encoder (e.g. ``rnagabh/gemma4-audio-encoder``).
        seed: seeds every random choice (encoder and LM weights, k-means, training order).
        quick: far fewer optimisation steps (the test suite's mode); same pipeline and outputs.
        settings: explicit sizes (overrides ``quick``).
    """
    import torch

    settings = settings or (DemoSettings.quick() if quick else DemoSettings())
    threads = torch.get_num_threads()
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    try:
        return _run(output_dir, corpus_dir, encoder, seed, quick, settings)
    finally:
        torch.set_num_threads(threads)


def _run(output_dir, corpus_dir, encoder: str | None, seed: int, quick: bool, settings: DemoSettings) -> DemoResult:
    from transformers import set_seed

    progress = _Progress()
    corpus, utterances, instructions = load_corpus(corpus_dir)
    out = Path(output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    work, hub, plots_dir = out / "work", out / "hub", out / "plots"
    for folder in (work, hub, plots_dir, out / "report.md", out / "results.json"):
        _clean(folder)
    work.mkdir()
    hub.mkdir()
    plots_dir.mkdir()
    set_seed(seed)
    state: dict[str, Any] = {"settings": asdict(settings), "seed": seed, "quick": quick, "corpus": str(corpus)}

    # ------------------------------------------------------------------ 1. encoder
    progress.step(1, "Frozen speech encoder")
    rvq_config = _stage1_config(settings, corpus, work, encoder, seed)
    from .training import build_model

    probe = build_model(rvq_config)
    enc_params = sum(p.numel() for p in probe.encoder.parameters()) if probe.config.bundles_encoder else None
    state["encoder"] = {
        "name": encoder or "tiny random Gemma 4 audio encoder (gemma_rvq.training.TINY_ENCODER_CONFIG)",
        "family": probe.config.encoder_family, "dim": probe.config.dim,
        "frame_rate": probe.config.frame_rate, "parameters": enc_params, "random": encoder is None,
    }
    del probe
    print(f"      encoder: {state['encoder']['name']}")
    print(f"      family {state['encoder']['family']}, {state['encoder']['dim']}-d frames at "
          f"{state['encoder']['frame_rate']:g} frames/s" + (f", {enc_params:,} parameters" if enc_params else ""))
    if encoder is None:
        print(_random_encoder_note())

    # ------------------------------------------------------------------ 2. stage 1
    progress.step(2, "Stage 1: embedding cache, RVQ training, evaluation on the dev split")
    from .training import train_rvq

    result = train_rvq(rvq_config)
    best = Path(result.folders["best"])
    rvq_folder = hub / "rvq-model"
    shutil.copytree(best, rvq_folder)
    if not (rvq_folder / "semantic_format.json").is_file():
        from .formats import save_rvq_format

        save_rvq_format(rvq_folder)
    card_note = _ensure_model_card(rvq_folder, state)
    from transformers import AutoModel

    rvq_model = AutoModel.from_pretrained(rvq_folder).eval()
    # One evaluation feeds the model card and this report: the trainer's, of the exported `best` weights on
    # the dev split. The evaluate modules re-evaluate the exported folder from the dev audio as a check.
    import torch

    card = result.metrics["best"]["dev"]
    recheck, _, _ = _evaluate_dev(rvq_model, corpus, utterances)
    metrics = {key: card[key] for key in _REPORT_METRICS}
    metrics["dev_utterances"] = recheck["dev_utterances"]
    counts, level_errors = torch.tensor(card["code_counts"]), card["level_errors"]
    state["stage1"] = {"steps": result.steps, "best_step": result.best_step, "metrics": metrics,
                       "recheck_max_difference": max(abs(card[k] - recheck[k]) for k in _REPORT_METRICS if k in recheck),
                       "init": result.init_metrics, "card_note": card_note, "run_dir": str(work / "stage1")}
    _print_metrics(metrics, settings)
    state["probe"] = _content_probe(rvq_model, corpus, utterances, instructions, settings, seed)

    # ------------------------------------------------------------------ 3. tokens
    progress.step(3, "Tokenizing the corpus: dataset.map(SpeechTokenizer(model), batched=True)")
    from .cards import local_paths_of, write_local_paths
    from .formats import attach_format, format_for_rvq_model, save_format

    fmt = format_for_rvq_model(None, rvq_model)  # the stage-1 folder's semantic_format.json
    tokens = _tokenize_corpus(rvq_model, fmt, corpus, utterances, instructions)
    token_folder = hub / "semantic-tokens"
    # Hub-ready: the saved folder names no local path (the RVQ's Hub id is not known yet); this machine's
    # path goes to its local-paths file (never uploaded), and travels with the data in memory
    attach_format(tokens, fmt).save_to_disk(str(token_folder))
    save_format(token_folder, fmt)
    write_local_paths(token_folder, local_paths_of(speech_tokenizer=rvq_folder))
    tokens = attach_format(tokens, fmt, speech_tokenizer=str(rvq_folder))  # the format travels with the data
    _write_dataset_card(token_folder, tokens, fmt, state)
    state["tokens"] = {"format": fmt.to_dict(), "rows": {k: len(v) for k, v in tokens.items()},
                       "examples": _token_examples(tokens["train"], fmt)}
    for example in state["tokens"]["examples"][:2]:
        print(f"      {example['id']} ({example['language']}) {example['text']!r}\n        -> {example['tokens']}")

    # ------------------------------------------------------------------ 4. stage 2
    progress.step(4, "Stage 2 (Speechless): text -> tokens LM, then tokens for the text-only instructions")
    base_lm = _build_base_lm(settings, work / "base-lm", utterances, instructions, seed)
    stage2 = _run_stage2(settings, fmt, tokens, base_lm, work, hub / "speechless-lm", seed)
    generated = _generate_for_text_only(stage2["folder"], fmt, instructions, stage2["max_new_tokens"])
    state["stage2"] = {**{k: v for k, v in stage2.items() if k != "folder"}, **generated["summary"]}
    print(f"      {generated['summary']['parsed']} of {generated['summary']['generated']} generated token "
          f"strings parse with the format")
    state["stage2"]["unseen"] = _evaluate_stage2(stage2["folder"], tokens["dev"], stage2["max_new_tokens"])
    unseen = state["stage2"]["unseen"]
    print(f"      unseen sentences (dev): {unseen['parsed']} of {unseen['generated']} parse; unit error rate "
          f"{unseen.get('unit_error_rate', float('nan')):.3f} (per level "
          + ", ".join(f"{v:.2f}" for v in unseen.get("unit_error_rate_per_level", [])) + ")")

    # ------------------------------------------------------------------ 5. stage 3
    progress.step(5, "Stage 3: tokens -> answer LM with LoRA, then the held-out spoken prompt")
    state["cpt"] = _run_cpt(settings, fmt, tokens, rvq_model.config.frame_rate, corpus, base_lm, work, seed)
    stage3_base = Path(state["cpt"]["folder"]) if state["cpt"]["steps"] else base_lm
    stage3 = _run_stage3(settings, fmt, tokens, generated["rows"], stage3_base, work, hub / "speech-instruct-lora",
                         seed)
    answers, answer_scores = _answer_held_out(hub / "speech-instruct-lora", tokens["dev"], fmt,
                                              stage3["system_prompt"], corpus)
    asr = _run_asr(settings, tokens, base_lm, work, hub / "asr-lm", seed, corpus)
    state["stage3"] = {**stage3, "answers": answers, "scores": answer_scores, "asr": asr}
    print(f"      speech_instruct on the held-out spoken prompts: chrF {answer_scores['chrf']:.1f}; asr recipe on the "
          f"{asr['num_examples']} dev utterances: CER {asr['cer']:.3f}, WER {asr['wer']:.3f} (through "
          "pipeline('speech-instruct'))")
    for answer in answers:
        print(f"      prompt ({answer['language']}, unseen voice {answer['voice']}): {answer['prompt_tokens']}")
        print(f"      answer:    {answer['answer']!r}\n      reference: {answer['reference']!r}")

    # ------------------------------------------------------------------ 6. report
    progress.step(6, "Report: report.md, plots, Hub-ready folders")
    from .hub import push_metric

    space = Path(push_metric("rvq_quality", "your-name/rvq_quality", folder=hub / "rvq_quality", dry_run=True))
    plots = _make_plots(plots_dir, counts, level_errors, state, tokens, stage2["folder"])
    hub_folders = {"rvq-model": rvq_folder, "semantic-tokens": token_folder, "rvq_quality": space,
                   "speechless-lm": hub / "speechless-lm", "speech-instruct-lora": hub / "speech-instruct-lora",
                   "asr-lm": hub / "asr-lm"}
    progress.done()
    state["total_seconds"] = progress.total
    state["downstream"] = _downstream_summary(state)
    report = _write_report(out, state, plots, hub_folders, progress.timings)
    relative = {"plots": {k: v.relative_to(out).as_posix() for k, v in plots.items()},
                "hub_folders": {k: v.relative_to(out).as_posix() for k, v in hub_folders.items()}}
    with open(out / "results.json", "w", encoding="utf-8") as handle:
        json.dump({**state, **relative, "timings": progress.timings}, handle, indent=1, default=str)
    print(f"\nDemo finished in {progress.total:.0f} s. Report: {report}")
    return DemoResult(output_dir=out, report=report, plots=plots, hub_folders=hub_folders, metrics=metrics,
                      generated=state["stage2"]["generated"], parsed=state["stage2"]["parsed"], answers=answers,
                      timings=progress.timings, downstream=state["downstream"])


def _random_encoder_note() -> str:
    return (
        "      NOTE: the encoder has RANDOM weights (offline demo): the pipeline runs for real, but the tokens\n"
        "      carry no linguistic meaning and the LMs cannot learn anything useful from them. With Hub access\n"
        f"      pass --encoder {REAL_ENCODER_HINT} (or any HuBERT / wav2vec2 / Whisper checkpoint)."
    )


# ---------------------------------------------------------------------------------------------- stage 1


def _stage1_config(settings: DemoSettings, corpus: Path, work: Path, encoder: str | None, seed: int):
    from .training import RVQTrainingConfig

    if encoder is None:
        model_config = {"dim": settings.encoder_hidden_size, "num_quantizers": settings.num_quantizers,
                        "codebook_size": settings.codebook_size}
    else:
        model_config = encoder_model_config(encoder, num_quantizers=settings.num_quantizers,
                                            codebook_size=settings.codebook_size)
    # EMA decay 0.95 rather than 0.99: with frequent restarts, a shorter memory calls regularly used deep
    # codes dead (docs/benchmarks.md, Training); measured here too: dev utilization 0.84 -> 0.90.
    # Usage-balanced EMA (balance_weight 1): dev utilization 0.895 -> 0.945, perplexity 37.1 -> 42.6 and
    # FVU 0.4297 -> 0.4197, the first setting where training beats its k-means init on the unseen voice
    # (with the in-projection trained; frozen, the default since: 0.953 / 42.3 / 0.4184).
    model_config = {"ema_decay": 0.95, "balance_weight": 1.0, **model_config}
    steps = settings.rvq_steps
    return RVQTrainingConfig(
        output_dir=str(work / "stage1"),
        tiny_encoder=encoder is None,
        model_config=model_config,
        dataset_name=str(corpus / "metadata.jsonl"),
        audio_column="file",
        split_column="split",
        train_split="train",
        dev_split="dev",
        id_column="id",
        languages=sorted({*LANGUAGE_NAMES}),
        shard_frames=4096,
        embed_batch_size=1,  # one clip per encoder call is fastest on CPU (docs/benchmarks)
        seed=seed,
        batch_size=settings.rvq_batch_frames,
        max_steps=steps,  # learning_rate: the trainer's default (3e-3 drifted the projections off the init)
        warmup_ratio=0.1,
        kmeans_init_frames=4096,
        kmeans_iters=10,
        dead_code_restart_steps=max(1, steps // 6),
        eval_steps=max(1, steps // settings.rvq_evaluations),
        save_steps=max(1, steps // settings.rvq_evaluations),
        average_last_n=min(2, settings.rvq_evaluations),
        logging_steps=max(1, steps // 30),
        log_with=None,
        make_plots=settings.rvq_plots,
    )


def _ensure_model_card(folder: Path, state: dict) -> str | None:
    """The training code writes the card; if this installation's hub module could not, write a short one."""
    if (folder / "README.md").is_file():
        return None
    from .hub import join_card

    body = (
        "# gemma-rvq demo RVQ (toy)\n\n"
        "A residual vector quantizer trained by `gemma-rvq demo` on the bundled synthetic espeak-ng corpus "
        f"with the encoder {state['encoder']['name']}. A demonstration artifact, not a useful model.\n\n"
        "```python\nimport gemma_rvq\nfrom transformers import AutoModel\nmodel = AutoModel.from_pretrained(...)\n```\n"
    )
    meta = {"library_name": "transformers", "license": "apache-2.0", "tags": ["gemma-rvq", "speech-tokenizer", "demo"]}
    (folder / "README.md").write_text(join_card(meta, body), encoding="utf-8")
    return "gemma_rvq.hub.write_model_card was unavailable: the demo wrote a minimal card instead"


def _load_clip(corpus: Path, relative: str, target_sr: int):
    from .audio import load_waveform

    return load_waveform(corpus / relative, target_sr, name=relative)


_REPORT_METRICS = ("mse", "nmse", "fvu", "cosine_similarity", "centred_cosine_similarity", "codebook_utilization",
                   "codebook_perplexity", "num_frames")


def _evaluate_dev(model, corpus: Path, utterances: list[dict]):
    """The evaluate modules on the dev split: each clip encoded, quantized and reconstructed."""
    import evaluate
    import torch

    from .metrics import module_path, unpad_codes, unpad_frames
    from .metrics.functional import code_counts, per_level_errors

    k = model.config.codebook_size
    modules = {
        "reconstruction_mse": evaluate.load(module_path("reconstruction_mse")),
        "cosine_similarity": evaluate.load(module_path("cosine_similarity")),
        "codebook_utilization": evaluate.load(module_path("codebook_utilization"), codebook_size=k),
        "codebook_perplexity": evaluate.load(module_path("codebook_perplexity"), codebook_size=k),
    }
    dev = [row for row in utterances if row["split"] == "dev"]
    all_codes, all_refs = [], []
    with torch.no_grad():
        for row in dev:
            wave = _load_clip(corpus, row["file"], model.config.sampling_rate)
            embeddings, mask = model.embed([wave], sampling_rate=model.config.sampling_rate)
            out = model.quantize(embeddings, mask)
            pred = unpad_frames(out.quantized, out.codes_mask)
            ref = unpad_frames(embeddings, mask)
            codes = unpad_codes(out.audio_codes, out.codes_mask)
            for name in ("reconstruction_mse", "cosine_similarity"):
                modules[name].add_batch(predictions=pred, references=ref)
            for name in ("codebook_utilization", "codebook_perplexity"):
                modules[name].add_batch(predictions=codes)
            all_codes.append(torch.as_tensor(codes[0]))
            all_refs.append(torch.as_tensor(ref[0]))
    metrics: dict[str, float] = {}
    for module in modules.values():
        metrics.update({key: value for key, value in module.compute().items() if isinstance(value, int | float)})
    metrics["dev_utterances"] = len(dev)
    codes = torch.cat(all_codes, dim=1)  # [Q, N]
    counts = code_counts(codes.unsqueeze(0), codebook_size=k)
    frames = torch.cat(all_refs)
    level_errors = per_level_errors(model, frames)
    return metrics, counts, level_errors


def _print_metrics(metrics: dict[str, float], settings: DemoSettings) -> None:
    print(f"      dev split ({int(metrics['dev_utterances'])} utterances, {int(metrics['num_frames'])} frames, "
          "unseen sentences and voice):")
    print(f"      MSE {metrics['mse']:.4f} | cosine {metrics['cosine_similarity']:.3f} | utilization "
          f"{metrics['codebook_utilization']:.1%} | perplexity {metrics['codebook_perplexity']:.1f}/"
          f"{settings.codebook_size} | FVU {metrics['fvu']:.3f} | centred cosine "
          f"{metrics['centred_cosine_similarity']:.3f}")


# ---------------------------------------------------------------------------------------------- tokens


def _tokenize_corpus(model, fmt, corpus: Path, utterances: list[dict], instructions: list[dict]):
    """Every spoken clip (utterances + spoken instructions) -> a DatasetDict(train, dev) with tokens."""
    import datasets

    from .transforms import SpeechTokenizer

    rows = []
    for row in utterances:
        rows.append({"id": row.get("id") or Path(row["file"]).stem, "kind": "utterance", "text": row["text"],
                     "response": None, "language": row["language"], "voice": row.get("voice"),
                     "split": row["split"], "file": row["file"]})
    for row in instructions:
        if row.get("file"):
            rows.append({"id": row.get("id") or Path(row["file"]).stem, "kind": "instruction",
                         "text": row["instruction"], "response": row["response"], "language": row["language"],
                         "voice": row.get("voice"), "split": row["split"], "file": row["file"]})
    for row in rows:
        row["language_name"] = LANGUAGE_NAMES.get(row["language"], row["language"])
        # the Audio(decode=False) form: datasets' own decoding needs torchcodec; SpeechTokenizer uses soundfile
        row["audio"] = {"path": str(corpus / row["file"]), "bytes": None}
    dataset = datasets.Dataset.from_list(rows).cast_column("audio", datasets.Audio(decode=False))
    tokenizer = SpeechTokenizer(model, format=fmt, return_codes=True, return_num_frames=True, batch_size=1)
    dataset = dataset.map(tokenizer, batched=True, batch_size=16, desc="Tokenizing speech")
    dataset = dataset.remove_columns("audio")
    splits = {}
    for split in ("train", "dev"):
        splits[split] = dataset.filter(lambda s, want=split: s == want, input_columns="split")
    return datasets.DatasetDict(splits)


def _token_examples(dataset, fmt, n: int = 3) -> list[dict]:
    examples = []
    for row in dataset.select(range(min(n, len(dataset)))):
        examples.append({"id": row["id"], "language": row["language"], "text": row["text"],
                         "frames": row["num_frames"], "tokens": _truncate_tokens(row["semantic_tokens"], fmt)})
    return examples


def _write_dataset_card(folder: Path, tokens, fmt, state: dict) -> None:
    from .hub import join_card

    languages = sorted({lang for split in tokens.values() for lang in split["language"]})
    meta = {
        "license": "apache-2.0",
        "language": languages,
        "pretty_name": "gemma-rvq demo semantic tokens",
        "tags": ["gemma-rvq", "semantic-tokens", "speech", "synthetic"],
        "size_categories": ["n<1K"],
        "configs": [{"config_name": "default",
                     "data_files": [{"split": split, "path": f"{split}/*.arrow"} for split in tokens]}],
    }
    random_note = ("\n> The encoder had **random weights** (offline demo): these tokens carry no linguistic "
                   "meaning.\n" if state["encoder"]["random"] else "")
    body = f"""# gemma-rvq demo semantic tokens

The bundled synthetic espeak-ng corpus of gemma-rvq (5 languages; dev = unseen sentences and an unseen
voice), encoded by `gemma-rvq demo` with `dataset.map(SpeechTokenizer(model), batched=True)`.
Encoder: {state['encoder']['name']}.
{random_note}
| split | rows |
|---|---|
""" + "".join(f"| {split} | {len(part)} |\n" for split, part in tokens.items()) + f"""
Columns: `id`, `kind` (`utterance` or spoken `instruction`), `text` (transcript / instruction), `response`
(instructions only), `language`, `language_name`, `voice`, `split`, `file` (clip path in the corpus),
`semantic_tokens` (the token string), `audio_codes` (`[Q][T]` codes), `num_frames`.

Token format (`gemma_rvq.tokens.SemanticTokenFormat.from_dict`):

```json
{json.dumps(fmt.to_dict(), indent=1)}
```

Load it with `datasets.load_from_disk(folder)`, or from the Hub with `datasets.load_dataset(repo_id)`.
"""
    (folder / "README.md").write_text(join_card(meta, body), encoding="utf-8")


# ---------------------------------------------------------------------------------------------- stage 2 / 3


def _build_base_lm(settings: DemoSettings, folder: Path, utterances: list[dict], instructions: list[dict],
                   seed: int) -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer trained in-process on the corpus texts."""
    from .testing import byte_level_bpe_tokenizer, tiny_llama

    texts = [row["text"] for row in utterances]
    texts += [row[key] for row in instructions for key in ("instruction", "response")]
    tokenizer = byte_level_bpe_tokenizer(vocab_size=settings.lm_vocab_size, extra_texts=texts)
    model = tiny_llama(tokenizer, hidden_size=settings.lm_hidden_size, num_hidden_layers=settings.lm_layers,
                       seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    print(f"      base LM: random LlamaForCausalLM, hidden {settings.lm_hidden_size}, {settings.lm_layers} layers, "
          f"{params:,} parameters; byte-level BPE tokenizer of {len(tokenizer)} tokens")
    return folder


def _common_sft(settings: DemoSettings, fmt, seed: int) -> dict[str, Any]:
    return {
        # no token_format: it is read from the data (gemma_rvq.formats)
        "embedding_pad_to_multiple_of": 8, "per_device_train_batch_size": settings.batch_size,
        "gradient_accumulation_steps": 1, "learning_rate": settings.learning_rate,
        "lr_scheduler_type": "cosine", "warmup_steps": 0, "max_length": 1024, "bf16": "false",
        "activation_checkpointing": "false", "use_cpu": "true", "report_to": "none", "save_strategy": "no",
        "seed": seed, "data_seed": seed, "dataloader_num_workers": 0,
    }


def _run_stage2(settings: DemoSettings, fmt, tokens, base_lm: Path, work: Path, out: Path, seed: int) -> dict:
    from .recipes import run_sft

    train = tokens["train"].select_columns(["text", "semantic_tokens", "language_name"])
    data = work / "stage2-data"
    train.save_to_disk(str(data))
    steps = settings.stage2_steps
    (script_args, training_args, model_args), command = _sft_args(
        recipe="speechless", model_name_or_path=base_lm, dataset_name=data, output_dir=out,
        text_column="text", tokens_column="semantic_tokens", language_column="language_name",
        use_peft="false", max_steps=steps, logging_steps=max(1, steps // 30), **_common_sft(settings, fmt, seed),
    )
    print(f"      {len(train)} (text, tokens) pairs; {command}")
    trainer = run_sft(script_args, training_args, model_args)
    _name_card(trainer, out, "gemma-rvq demo Speechless LM (toy)")
    tokenizer = trainer.processing_class
    lengths = [len(tokenizer(s, add_special_tokens=False).input_ids) for s in train["semantic_tokens"]]
    losses = _losses(trainer.state.log_history)
    return {"folder": out, "steps": trainer.state.global_step, "pairs": len(train), "losses": losses,
            "command": command, "max_new_tokens": settings.max_new_tokens or int(max(lengths) * 1.5) + 8}


def _name_card(trainer, folder: Path, name: str) -> None:
    """The card run_sft wrote, with the demo's title; the data is named as the demo's Hub-ready token folder."""
    from .cards import write_lm_model_card

    write_lm_model_card(trainer, folder, model_name=name, dataset_name=str(folder.parent / "semantic-tokens"),
                        tags=["demo"])


def _generate_for_text_only(folder: Path, fmt, instructions: list[dict], max_new_tokens: int) -> dict:
    import datasets

    from .recipes import generate_semantic_dataset, load_sft_model

    model, tokenizer = load_sft_model(str(folder))
    text_only = [row for row in instructions if not row.get("file") and row["split"] == "train"]
    if not text_only:
        return {"rows": [], "summary": {"generated": 0, "parsed": 0, "examples": []}}
    dataset = datasets.Dataset.from_list([
        {"id": row.get("id"), "instruction": row["instruction"], "response": row["response"],
         "language": row["language"], "language_name": LANGUAGE_NAMES.get(row["language"], row["language"])}
        for row in text_only])
    generated = generate_semantic_dataset(model, tokenizer, dataset, text_column="instruction",  # model's format
                                          language_column="language_name", max_new_tokens=max_new_tokens,
                                          batch_size=16)
    ok = [row for row in generated if row["semantic_tokens"]]
    examples = [{"instruction": row["instruction"],
                 "tokens": _truncate_tokens(row["semantic_tokens"], fmt) if row["semantic_tokens"] else None,
                 "error": row["generation_error"]} for row in generated.select(range(min(3, len(generated))))]
    return {"rows": ok, "summary": {"generated": len(generated), "parsed": len(ok), "examples": examples}}


def _run_cpt(settings: DemoSettings, fmt, tokens, frame_rate: float, corpus: Path, base_lm: Path, work: Path,
             seed: int) -> dict:
    """Continued pretraining (``--recipe cpt``) of the base LM on a SpireLM-style mixture of the train split:
    transcripts, token strings, speech -> transcript pairs and SpiritLM-interleaved sequences (from the corpus'
    word timings, ``words.jsonl``, when it has them), packed without crossing documents."""
    from .recipes import run_sft
    from .recipes.interleave import build_cpt_dataset

    folder = work / "cpt-lm"
    if not settings.cpt_steps:
        return {"folder": str(base_lm), "steps": 0}
    train = tokens["train"]
    ratios = {"text": 1, "speech": 1, "paired": 1}
    words_file = corpus / "words.jsonl"
    if words_file.is_file():
        timings = {row["id"]: row["words"] for row in _read_jsonl(words_file)}
        if all(row_id in timings for row_id in train["id"]):
            train = train.add_column("words", [timings[row_id] for row_id in train["id"]])
            ratios["interleaved"] = 1
    # No [TEXT] / [SPEECH] markers here: the format's own start / end tokens delimit speech, as in the stage-3
    # prompts that follow. With SpiritLM's markers, a stage-3 model on this base (6-layer LMs,
    # benchmarks/bench_distill.py) answered with pieces of them: "S[]P", "STCFourTSTSTST]ATP".
    documents = build_cpt_dataset(train, fmt, ratios, frame_rate=frame_rate, seed=seed,
                                  markers={"text": None, "speech": None})
    data = work / "cpt-data"
    from .formats import attach_format

    attach_format(documents, fmt).save_to_disk(str(data))  # the cpt recipe reads the format from the data
    steps = settings.cpt_steps
    (script_args, training_args, model_args), command = _sft_args(
        recipe="cpt", model_name_or_path=base_lm, dataset_name=data, output_dir=folder, text_column="text",
        use_peft="false", packing="true", packing_strategy="bfd_split", max_steps=steps,
        logging_steps=max(1, steps // 10),
        # rows of 256 tokens, 4 per step: about 1k tokens a step keeps this step short beside stages 2 and 3
        **{**_common_sft(settings, fmt, seed), "max_length": 256, "per_device_train_batch_size": 4},
    )
    kinds = {kind: documents["kind"].count(kind) for kind in ratios}
    print(f"      continued pretraining: {len(documents)} documents {kinds}, packed; {command}")
    trainer = run_sft(script_args, training_args, model_args)
    return {"folder": str(folder), "steps": trainer.state.global_step, "documents": kinds,
            "losses": _losses(trainer.state.log_history), "command": command}


SYSTEM_PROMPT = "You answer spoken questions."


def _run_stage3(settings: DemoSettings, fmt, tokens, generated_rows: list[dict], base_lm: Path, work: Path,
                out: Path, seed: int) -> dict:
    import datasets

    from .recipes import run_sft

    spoken = tokens["train"].filter(lambda kind: kind == "instruction", input_columns="kind")
    rows = [{"semantic_tokens": r["semantic_tokens"], "response": r["response"], "source": "spoken"}
            for r in spoken]
    rows += [{"semantic_tokens": r["semantic_tokens"], "response": r["response"], "source": "speechless"}
             for r in generated_rows]
    from .formats import attach_format, dataset_format_record

    data = work / "stage3-data"
    record = dataset_format_record(tokens["train"])
    attach_format(datasets.Dataset.from_list(rows), fmt, speech_tokenizer=record.speech_tokenizer).save_to_disk(
        str(data))
    steps = settings.stage3_steps
    (script_args, training_args, model_args), command = _sft_args(
        recipe="speech_instruct", model_name_or_path=base_lm, dataset_name=data, output_dir=out,
        tokens_column="semantic_tokens", response_column="response", system_prompt=SYSTEM_PROMPT,
        use_peft="true", lora_r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
        lora_target_modules="all-linear", max_steps=steps, logging_steps=max(1, steps // 30),
        **_common_sft(settings, fmt, seed),
    )
    print(f"      {len(spoken)} spoken + {len(generated_rows)} Speechless-generated instructions; {command}")
    trainer = run_sft(script_args, training_args, model_args)
    _name_card(trainer, out, "gemma-rvq demo speech-instruction LoRA (toy)")
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    return {"steps": trainer.state.global_step, "spoken": len(spoken), "generated": len(generated_rows),
            "losses": _losses(trainer.state.log_history), "command": command, "system_prompt": SYSTEM_PROMPT,
            "trainable_parameters": trainable, "parameters": total}


def _answer_held_out(folder: Path, dev, fmt, system_prompt: str, corpus: Path) -> tuple[list[dict], dict]:
    """The held-out spoken prompts answered through ``pipeline("speech-instruct")``, scored with chrF."""
    from .downstream import evaluate_speech_llm, text_metrics
    from .pipelines import SpeechInstructPipeline, load_speech_llm

    prompts = dev.filter(lambda kind: kind == "instruction", input_columns="kind")
    if not len(prompts):
        raise ValueError("the dev split has no spoken instruction to answer")
    model, tokenizer = load_speech_llm(folder)
    pipe = SpeechInstructPipeline(model, tokenizer, device="cpu")
    clips = [str(corpus / row["file"]) for row in prompts]
    result = evaluate_speech_llm(pipe, clips, prompts["response"], max_new_tokens=16)
    answers = []
    for row, clip, answer in zip(prompts, clips, result["predictions"]):
        tokens = pipe.semantic_tokens(clip)
        if tokens != row["semantic_tokens"]:
            raise RuntimeError(f"the pipeline tokenized {row['file']} differently from the dataset")
        length = len(tokenizer.apply_chat_template(pipe.prompt(tokens), add_generation_prompt=True,
                                                   return_dict=True)["input_ids"])
        answers.append({"id": row["id"], "language": row["language"], "voice": row["voice"],
                        "instruction": row["text"], "prompt_tokens": _truncate_tokens(tokens, fmt),
                        "prompt_length": length, "answer": answer, "reference": row["response"]})
    scores = {"chrf": result["chrf"], "num_examples": result["num_examples"],
              "chrf_per_prompt": [text_metrics([a["answer"]], [a["reference"]], kind="answer")["chrf"]
                                  for a in answers]}
    return answers, scores


def _run_asr(settings: DemoSettings, tokens, base_lm: Path, work: Path, out: Path, seed: int, corpus: Path) -> dict:
    """Stage 3, asr recipe: tokens -> transcript on the train utterances; CER/WER on the dev utterances."""
    from .downstream import evaluate_speech_llm
    from .recipes import run_sft

    train = tokens["train"].filter(lambda kind: kind == "utterance", input_columns="kind")
    data = work / "asr-data"
    train.select_columns(["text", "semantic_tokens", "language_name"]).save_to_disk(str(data))
    steps = settings.asr_steps
    (script_args, training_args, model_args), command = _sft_args(
        recipe="asr", model_name_or_path=base_lm, dataset_name=data, output_dir=out, text_column="text",
        tokens_column="semantic_tokens", language_column="language_name", use_peft="false", max_steps=steps,
        logging_steps=max(1, steps // 30), **_common_sft(settings, None, seed),
    )
    print(f"      asr recipe: {len(train)} (tokens, transcript) pairs; {command}")
    trainer = run_sft(script_args, training_args, model_args)
    dev = tokens["dev"].filter(lambda kind: kind == "utterance", input_columns="kind")
    result = evaluate_speech_llm(out, [str(corpus / f) for f in dev["file"]], dev["text"], max_new_tokens=32)
    examples = [{"id": i, "reference": r, "transcript": p}
                for i, r, p in list(zip(dev["id"], dev["text"], result["predictions"]))[:3]]
    return {"steps": trainer.state.global_step, "pairs": len(train), "losses": _losses(trainer.state.log_history),
            "command": command, "wer": result["wer"], "cer": result["cer"], "num_examples": result["num_examples"],
            "examples": examples}


def _content_probe(model, corpus: Path, utterances: list[dict], instructions: list[dict], settings: DemoSettings,
                   seed: int) -> dict:
    """The CTC content probe on every spoken clip: train split -> CER on the dev split (unseen voice)."""
    import torch

    from .probe import content_probe

    rows = [(r["file"], r["text"], r["split"]) for r in utterances]
    rows += [(r["file"], r["instruction"], r["split"]) for r in instructions if r.get("file")]
    data: dict[str, dict[str, list]] = {split: {"codes": [], "features": [], "texts": []} for split in ("train", "dev")}
    with torch.no_grad():
        for file, text, split in rows:
            wave = _load_clip(corpus, file, model.config.sampling_rate)
            embeddings, mask = model.embed([wave], sampling_rate=model.config.sampling_rate)
            codes = model.quantize(embeddings, mask).audio_codes
            valid = mask[0]
            data[split]["codes"].append(codes[0][:, valid].numpy())
            data[split]["features"].append(embeddings[0][valid].float().numpy())
            data[split]["texts"].append(text)
    train, dev = data["train"], data["dev"]
    result = content_probe(train["codes"], train["texts"], dev["codes"], dev["texts"],
                           codebook_size=model.config.codebook_size, train_features=train["features"],
                           dev_features=dev["features"], steps=settings.probe_steps, seed=seed)
    summary = {"cer_by_levels": {str(k): v.cer for k, v in result["levels"].items()},
               "kmeans_cer": result["kmeans"].cer, "kmeans_units": result["kmeans_size"],
               "train_clips": len(train["texts"]), "dev_clips": len(dev["texts"]), "steps": settings.probe_steps,
               "examples": [{"reference": r, "decoded": h} for r, h in result["levels"][len(result["levels"])].examples]}
    print("      content probe (CTC tokens -> characters, dev CER): "
          + ", ".join(f"{k} level{'s' if k != '1' else ''} {v:.3f}" for k, v in summary["cer_by_levels"].items())
          + f"; k-means ({summary['kmeans_units']} units) {summary['kmeans_cer']:.3f}")
    return summary


def _evaluate_stage2(folder: Path, dev, max_new_tokens: int) -> dict:
    """Parse rate and unit error rate of the stage-2 model on the dev utterances (unseen sentences)."""
    from .downstream import evaluate_stage2
    from .recipes import load_sft_model

    rows = dev.filter(lambda kind: kind == "utterance", input_columns="kind")
    model, tokenizer = load_sft_model(str(folder))
    out = evaluate_stage2(model, tokenizer, rows["text"], rows["semantic_tokens"], languages=rows["language_name"],
                          max_new_tokens=max_new_tokens, batch_size=16)
    parsed = sum(e is None for e in out["errors"])
    summary = {"generated": len(rows), "parsed": parsed, "parse_rate": out["parse_rate"]}
    if "unit_error_rate" in out:
        summary.update(unit_error_rate=out["unit_error_rate"],
                       unit_error_rate_per_level=out["unit_error_rate_per_level"],
                       reference_units=out["num_reference_units"])
    return summary


def _downstream_summary(state: dict) -> dict:
    """The ``downstream`` block of results.json: one number per question, what the report's table shows."""
    m, st2, st3 = state["stage1"]["metrics"], state["stage2"], state["stage3"]
    return {
        "random_encoder": state["encoder"]["random"],
        "stage1": {"fvu": m["fvu"], "mse": m["mse"], "cosine_similarity": m["cosine_similarity"]},
        "probe": state["probe"],
        "stage2": {"parse_rate_text_only": st2["parsed"] / st2["generated"] if st2["generated"] else None,
                   "parse_rate_unseen": st2["unseen"]["parse_rate"],
                   "unit_error_rate": st2["unseen"].get("unit_error_rate"),
                   "unit_error_rate_per_level": st2["unseen"].get("unit_error_rate_per_level")},
        "stage3": {"asr_cer": st3["asr"]["cer"], "asr_wer": st3["asr"]["wer"],
                   "speech_instruct_chrf": st3["scores"]["chrf"]},
    }


# ---------------------------------------------------------------------------------------------- report


def _make_plots(folder: Path, counts, level_errors, state: dict, tokens, stage2_folder: Path) -> dict[str, Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from transformers import AutoTokenizer

    from .metrics import plots

    out = {"code_usage": Path(plots.plot_code_usage(counts, folder / "code_usage.png",
                                                    title="dev split: code usage per RVQ level"))}
    if level_errors:
        curves = {k: v for k, v in level_errors.items() if k in ("mse", "fvu", "cosine_similarity")}
        out["level_errors"] = Path(plots.plot_level_errors(curves, folder / "level_errors.png"))

    fig = Figure(figsize=(13, 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    history_path = Path(state["stage1"]["run_dir"]) / "history.json"
    history = json.loads(history_path.read_text()) if history_path.is_file() else {"train": [], "eval": []}
    stage1 = [(r["step"], r["train/loss"]) for r in history["train"] if "train/loss" in r]
    panels = [("stage 1: RVQ loss", stage1), ("stage 2: Speechless LM loss", state["stage2"]["losses"]),
              ("stage 3: LoRA speech-instruct loss", state["stage3"]["losses"])]
    for ax, (title, points) in zip(axes, panels):
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 40 else None, label="training loss")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
    dev_fvu = [(r["step"], r["dev"]["fvu"]) for r in history["eval"] if isinstance(r.get("dev"), dict)]
    if dev_fvu:
        twin = axes[0].twinx()
        twin.plot(*zip(*dev_fvu), "o--", color="tab:orange", label="dev FVU")
        init_fvu = state["stage1"]["init"].get("init_dev_fvu")
        if init_fvu is not None:
            twin.axhline(init_fvu, ls=":", color="gray", label="dev FVU at k-means init")
        twin.set_ylabel("dev FVU")
        handles = axes[0].get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        axes[0].legend(handles=handles, fontsize=7)
    fig.savefig(folder / "loss_curves.png", dpi=100)
    out["loss_curves"] = folder / "loss_curves.png"

    tokenizer = AutoTokenizer.from_pretrained(stage2_folder)
    lengths = {split: [len(tokenizer(s, add_special_tokens=False).input_ids) for s in part["semantic_tokens"]]
               for split, part in tokens.items()}
    state["tokens"]["lengths"] = {split: {"min": min(v), "max": max(v), "mean": sum(v) / len(v)}
                                  for split, v in lengths.items() if v}
    fig = Figure(figsize=(6, 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.hist(list(lengths.values()), bins=15, label=list(lengths), stacked=True)
    ax.set_xlabel("LM tokens per clip (semantic tokens + markers)")
    ax.set_ylabel("clips")
    ax.set_title("token-string lengths", fontsize=10)
    ax.legend()
    fig.savefig(folder / "token_lengths.png", dpi=100)
    out["token_lengths"] = folder / "token_lengths.png"
    return out


_PUSH_TYPES = {"rvq-model": "model", "semantic-tokens": "dataset", "rvq_quality": "space",
               "speechless-lm": "model", "speech-instruct-lora": "model", "asr-lm": "model"}
_PUSH_WHAT = {
    "rvq-model": "the stage-1 RVQ (`save_pretrained` folder + model card); "
                 "`AutoModel.from_pretrained` after `import gemma_rvq`",
    "semantic-tokens": "the tokenized corpus (`save_to_disk` DatasetDict + dataset card)",
    "rvq_quality": "the `rvq_quality` evaluate metric as a self-contained Space "
                   "(`gemma_rvq.hub.push_metric(..., dry_run=True)`)",
    "speechless-lm": "the stage-2 Speechless LM (full model + tokenizer, TRL card)",
    "speech-instruct-lora": "the stage-3 LoRA adapter (needs its base model, see `gemma_rvq_recipe.json`)",
    "asr-lm": "the stage-3 `asr`-recipe model (tokens -> transcript, full fine-tuning)",
}


def _downstream_lines(state: dict) -> list[str]:
    d = state["downstream"]
    probe, st2, st3 = d["probe"], d["stage2"], d["stage3"]
    unseen = state["stage2"]["unseen"]
    per_level = ", ".join(f"{v:.2f}" for v in st2["unit_error_rate_per_level"] or [])
    rows = [
        ("Stage 1", "reconstruction FVU on the dev split (MSE)", f"{d['stage1']['fvu']:.4f} ({d['stage1']['mse']:.4f})"),
        *[("Tokenizer", f"content probe CER, first {k} level{'s' if k != '1' else ''}", f"{v:.3f}")
          for k, v in probe["cer_by_levels"].items()],
        ("Tokenizer", f"content probe CER, k-means on the same features ({probe['kmeans_units']} units)",
         f"{probe['kmeans_cer']:.3f}"),
        ("Stage 2", "parse rate, text-only instructions", f"{st2['parse_rate_text_only']:.0%}"),
        ("Stage 2", "parse rate, unseen sentences (dev)", f"{st2['parse_rate_unseen']:.0%}"),
        ("Stage 2", "unit error rate, unseen sentences (frame; per level)",
         f"{st2['unit_error_rate']:.3f} ({per_level})" if st2["unit_error_rate"] is not None else "n/a"),
        ("Stage 3", "`asr` recipe: CER / WER on the dev utterances", f"{st3['asr_cer']:.3f} / {st3['asr_wer']:.3f}"),
        ("Stage 3", "`speech_instruct`: chrF against the reference answers", f"{st3['speech_instruct_chrf']:.1f}"),
    ]
    lines = [
        "",
        "## Downstream evaluation",
        "",
        "What users of speech tokenizers compare (docs/evaluation.md). The probe is a small CTC model "
        f"(tokens -> characters) trained on the {probe['train_clips']} train clips and scored on the "
        f"{probe['dev_clips']} dev clips (unseen voice); the unit error rate compares the units stage 2 writes "
        f"for the {unseen['generated']} dev sentences with the units of their audio; stage 3 runs through "
        "`pipeline(\"speech-instruct\")`, as users call it.",
        "",
    ]
    if d["random_encoder"]:
        lines += ["> With the offline demo's **random encoder** the tokens carry no linguistic content: these numbers "
                  "show that every step runs, not how good the pipeline is (expect CERs near 1 and low chrF). Rerun "
                  f"with `--encoder {REAL_ENCODER_HINT}` for meaningful ones.", ""]
    lines += ["| Stage | Measure | Value |", "|---|---|---|", *[f"| {a} | {b} | {c} |" for a, b, c in rows]]
    examples = state["stage3"]["asr"]["examples"]
    if examples:
        lines += ["", "`asr` transcripts of unseen-voice clips:", ""]
        lines += [f"- {_md_escape(e['reference'])} -> \"{_md_escape(e['transcript'])}\"" for e in examples]
    return lines


def _display_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (shorter commands), else absolute."""
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return path.as_posix()


def _write_report(out: Path, state: dict, plots: dict[str, Path], hub_folders: dict[str, Path],
                  timings: dict[str, float]) -> Path:
    from . import __version__

    shown = _display_path(out)
    for stage in ("stage2", "stage3"):
        state[stage]["command"] = state[stage]["command"].replace(out.as_posix(), shown)

    m = state["stage1"]["metrics"]
    s = state["settings"]
    enc = state["encoder"]
    rel = {name: path.relative_to(out).as_posix() for name, path in plots.items()}
    lines = [
        "# gemma-rvq demo report",
        "",
        f"gemma-rvq {__version__}, seed {state['seed']}{', quick mode' if state['quick'] else ''}; "
        f"corpus `{state['corpus']}`; total {state['total_seconds']:.0f} s.",
        "",
    ]
    if enc["random"]:
        lines += [
            "> **NOTE: the encoder has RANDOM weights** (offline demo). Every step runs for real, but the tokens "
            "carry no linguistic meaning, so the numbers below say nothing about tokenizer quality and the "
            f"LMs cannot learn a useful mapping. With Hub access rerun with `gemma-rvq demo --encoder "
            f"{REAL_ENCODER_HINT}`.",
            "",
        ]
    lines += [
        "## Setup",
        "",
        f"- Encoder: {enc['name']} (family `{enc['family']}`, {enc['dim']}-d frames at {enc['frame_rate']:g} "
        "frames/s" + (f", {enc['parameters']:,} parameters" if enc["parameters"] else "") + ", frozen)",
        f"- RVQ: {s['num_quantizers']} levels x {s['codebook_size']} codes, {state['stage1']['steps']} steps of "
        f"{s['rvq_batch_frames']} frames",
        f"- LMs: random Llama, hidden {s['lm_hidden_size']}, {s['lm_layers']} layers, byte-level BPE tokenizer; "
        f"stage 2 {state['stage2']['steps']} steps (full fine-tuning), stage 3 {state['stage3']['steps']} "
        f"steps (LoRA r={s['lora_r']})",
        "",
        "## Stage 1: the RVQ on the dev split",
        "",
        f"Dev split: {int(m['dev_utterances'])} utterances ({int(m['num_frames'])} frames), sentences and voice "
        f"never seen in training. The exported `best` weights (step {state['stage1']['best_step']} of "
        f"{state['stage1']['steps']}), scored once by `gemma_rvq.evaluation.evaluate_frames` when they were "
        "exported: the same numbers as on their model card. Re-evaluated from the dev audio with the "
        "package's evaluate modules (`evaluate.load(gemma_rvq.metrics.module_path(name))`), every number "
        f"agrees within {state['stage1']['recheck_max_difference']:.1e}.",
        "",
        "| Metric | Value |",
        "|---|---|",
        f"| Reconstruction MSE | {m['mse']:.4f} |",
        f"| Cosine Similarity | {m['cosine_similarity']:.4f} |",
        f"| Codebook Utilization | {m['codebook_utilization']:.1%} |",
        f"| Codebook Perplexity | {m['codebook_perplexity']:.1f} (of {s['codebook_size']}) |",
        "",
        "| Also | Value |",
        "|---|---|",
        f"| NMSE | {m['nmse']:.4f} |",
        f"| FVU (fraction of variance unexplained) | {m['fvu']:.4f} |",
        f"| Centred cosine similarity | {m['centred_cosine_similarity']:.4f} |",
        "",
        "Utilization and perplexity are per codebook over all dev frames, then averaged over the levels; "
        "raw cosine and NMSE are inflated by the constant offset of the features, FVU and centred cosine "
        "are not (see docs/metrics.md).",
        "",
        f"![code usage per level]({rel['code_usage']})",
        "",
    ]
    init = state["stage1"]["init"]
    if "init_dev_fvu" in init:
        lines += [
            f"Before the first step (k-means initialisation) the dev FVU was {init['init_dev_fvu']:.4f} and the "
            f"dev MSE {init['init_dev_mse']:.4f}; the exported `best` weights (step {state['stage1']['best_step']} "
            f"of {state['stage1']['steps']}) score {m['fvu']:.4f} / {m['mse']:.4f}"
            + (" (training did not improve on the initialisation for the unseen voice here)."
               if m["fvu"] >= init["init_dev_fvu"] else "."),
            "",
        ]
    if "level_errors" in rel:
        lines += [f"![error after the first k levels]({rel['level_errors']})", ""]
    if state["stage1"].get("card_note"):
        lines += [f"Note: {state['stage1']['card_note']}.", ""]
    lines += [
        "## Semantic tokens",
        "",
        "`dataset.map(SpeechTokenizer(model, format=...), batched=True)` over every spoken clip: "
        + ", ".join(f"{n} {split}" for split, n in state["tokens"]["rows"].items()) + " rows. Examples:",
        "",
        "| id | language | text | frames | tokens (truncated) |",
        "|---|---|---|---|---|",
    ]
    for ex in state["tokens"]["examples"]:
        lines.append(f"| {ex['id']} | {ex['language']} | {_md_escape(ex['text'])} | {ex['frames']} | "
                     f"`{ex['tokens']}` |")
    lengths = state["tokens"].get("lengths", {})
    lines += ["", "LM tokens per clip: " + "; ".join(
        f"{split} {v['min']}-{v['max']} (mean {v['mean']:.0f})" for split, v in lengths.items()) + ".", "",
        f"![token-string lengths]({rel['token_lengths']})", ""]
    st2, st3 = state["stage2"], state["stage3"]
    lines += [
        "## Stage 2: Speechless (text -> tokens)",
        "",
        f"{st2['pairs']} (text, tokens) training pairs, {st2['steps']} steps, final loss "
        f"{st2['losses'][-1][1]:.3f}." if st2["losses"] else f"{st2['pairs']} pairs, {st2['steps']} steps.",
        "",
        f"Same code path as `examples/sft.py`: `{st2['command']}`",
        "",
        f"Constrained generation for the text-only instructions: **{st2['parsed']} of {st2['generated']} "
        "parse** with the token format (the rest are reported, not used).",
        "",
    ]
    for ex in st2["examples"]:
        result = f"`{ex['tokens']}`" if ex["tokens"] else f"failed: {ex['error']}"
        lines.append(f"- {_md_escape(ex['instruction'])} -> {result}")
    lines += [
        "",
        "## Stage 3: speech instructions (tokens -> answer, LoRA)",
        "",
        *([f"Base: the LM after {state['cpt']['steps']} steps of continued pretraining (`--recipe cpt`) on "
           + ", ".join(f"{n} {kind}" for kind, n in state["cpt"]["documents"].items())
           + " documents, packed without crossing documents.", ""] if state.get("cpt", {}).get("steps") else []),
        f"{st3['spoken']} spoken + {st3['generated']} Speechless-generated instructions, {st3['steps']} steps, "
        f"{st3['trainable_parameters']:,} of {st3['parameters']:,} parameters trainable"
        + (f", final loss {st3['losses'][-1][1]:.3f}." if st3["losses"] else "."),
        "",
        f"`{st3['command']}`",
        "",
        "Held-out spoken prompts (the dev-split instructions, spoken by a voice never heard in training):",
        "",
    ]
    for a in st3["answers"]:
        lines += [
            f"- **{a['id']}** ({a['language']}, voice `{a['voice']}`): \"{_md_escape(a['instruction'])}\"",
            f"  - prompt tokens ({a['prompt_length']} LM tokens with the chat template): `{a['prompt_tokens']}`",
            f"  - answer: \"{_md_escape(a['answer'])}\"",
            f"  - reference: \"{_md_escape(a['reference'])}\"",
        ]
    lines += _downstream_lines(state)
    lines += [
        "",
        "## Loss curves",
        "",
        f"![loss curves of stages 1, 2 and 3]({rel['loss_curves']})",
        "",
        "## Hub-ready folders",
        "",
        "Each folder can be uploaded as is (needs a token: `hf auth login`); replace `your-name`:",
        "",
        "| folder | what | push |",
        "|---|---|---|",
    ]
    for name, path in hub_folders.items():
        kind = _PUSH_TYPES[name]
        relpath = path.relative_to(out).as_posix()
        lines.append(f"| `{relpath}` | {_PUSH_WHAT[name]} | `gemma-rvq push {shown}/{relpath} "
                     f"your-name/demo-{name.replace('_', '-')} --repo-type {kind}` |")
    lines += [
        "",
        "## Timings",
        "",
        "| step | seconds |",
        "|---|---|",
        *[f"| {name} | {sec:.1f} |" for name, sec in timings.items()],
        f"| total | {state['total_seconds']:.1f} |",
        "",
        f"Rerun: `gemma-rvq demo --output-dir {shown} --seed {state['seed']}`"
        + ("" if not enc["random"] else f"; with a real encoder add `--encoder {REAL_ENCODER_HINT}`") + ".",
        "",
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report
