"""Downstream evaluation of a speech tokenizer and of the LLMs trained on its tokens.

- :func:`text_metrics`: WER / CER (``jiwer``) and chrF (``sacrebleu``) of text against references.
- :func:`evaluate_stage2`: parse rate and unit error rate of a stage-2 (Speechless) model: the units it
  generates from each text against the units stage 1 gives for that utterance's audio (the
  ``unit_error_rate`` evaluate module).
- :func:`evaluate_speech_llm`: a stage-3 model on held-out speech, through the ``speech-instruct``
  pipeline (what users call): WER / CER for an ``asr``-recipe model (transcripts), chrF for a
  ``speech_instruct`` model (answers against reference answers).
- :func:`gemma_rvq.probe.content_probe`: does the tokenizer carry what was said (CTC probe CER).

``gemma-rvq evaluate-llm --model DIR --dataset DATA`` runs :func:`evaluate_speech_llm`;
``gemma-rvq answer FILE... --model DIR`` answers spoken files.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

__all__ = ["evaluate_speech_llm", "evaluate_stage2", "make_answer_parser", "make_evaluate_llm_parser",
           "text_metrics"]


def text_metrics(predictions: Sequence[str], references: Sequence[str], *, kind: str) -> dict[str, float]:
    """``kind="asr"``: ``wer`` and ``cer`` (jiwer, lower-cased); ``kind="answer"``: ``chrf`` (sacrebleu, 0-100)."""
    if len(predictions) != len(references) or not references:
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references")
    if kind == "asr":
        try:
            import jiwer
        except ImportError as error:
            raise ImportError("WER/CER need jiwer: pip install 'gemma-rvq[eval]'") from error
        hyps = [p.lower().strip() for p in predictions]
        refs = [r.lower().strip() for r in references]
        if not all(refs):
            raise ValueError("a reference transcript is empty")
        return {"wer": float(jiwer.wer(refs, hyps)), "cer": float(jiwer.cer(refs, hyps))}
    if kind == "answer":
        try:
            from sacrebleu.metrics import CHRF
        except ImportError as error:
            raise ImportError("chrF needs sacrebleu: pip install 'gemma-rvq[eval]'") from error
        return {"chrf": float(CHRF().corpus_score(list(predictions), [list(references)]).score)}
    raise ValueError(f"kind must be 'asr' or 'answer', got {kind!r}")


def evaluate_stage2(model, tokenizer, texts: Sequence[str], reference_tokens: Sequence[str], *,
                    token_format: Any = None, languages: Any = None, **generate_kwargs: Any) -> dict[str, Any]:
    """Generate the tokens of each text with a stage-2 model and compare them with the audio's tokens.

    Args:
        texts: transcripts of utterances that also have audio.
        reference_tokens: the stage-1 token string of each utterance's audio (same format as the model's).
        generate_kwargs: :func:`gemma_rvq.recipes.generate_semantic_tokens` options (``max_new_tokens``...).

    Returns:
        ``parse_rate`` (share of generated strings that parse), ``unit_error_rate`` and
        ``unit_error_rate_per_level`` (the ``unit_error_rate`` evaluate module over the parsed rows),
        ``generated`` (the strings, ``None`` where generation failed), ``errors``.
    """
    import evaluate

    from .formats import resolve_format
    from .metrics import module_path
    from .recipes.generation import generate_semantic_tokens

    if len(texts) != len(reference_tokens):
        raise ValueError(f"got {len(texts)} texts for {len(reference_tokens)} reference token strings")
    fmt = resolve_format(token_format, model=model)
    out = generate_semantic_tokens(model, tokenizer, list(texts), fmt, languages=languages,
                                   **{"show_progress": False, **generate_kwargs})
    predictions, references = [], []
    for generated, reference in zip(out["semantic_tokens"], reference_tokens):
        if generated is not None:
            predictions.append(fmt.parse(generated).codes)
            references.append(fmt.parse(reference).codes)
    result: dict[str, Any] = {"parse_rate": len(predictions) / len(texts) if texts else 0.0,
                              "generated": out["semantic_tokens"], "errors": out["generation_error"]}
    if predictions:
        metric = evaluate.load(module_path("unit_error_rate"))
        result.update(metric.compute(predictions=predictions, references=references))
    return result


def evaluate_speech_llm(model: Any, audio: Sequence[Any], references: Sequence[str], *,
                        speech_tokenizer: Any = None, batch_size: int = 8, max_new_tokens: int = 128,
                        sampling_rate: int | None = None, **generate_kwargs: Any) -> dict[str, Any]:
    """A stage-3 model on held-out speech, through ``pipeline("speech-instruct")``.

    Args:
        model: the stage-3 folder (or a ready ``SpeechInstructPipeline``).
        audio: the inputs (paths, audio dicts, arrays with ``sampling_rate``).
        references: transcripts (``asr`` recipe) or reference answers (``speech_instruct``).

    Returns:
        ``recipe``, ``wer``/``cer`` (asr) or ``chrf`` (speech_instruct), ``num_examples``, ``predictions``.
    """
    from .pipelines import SpeechInstructPipeline

    if len(audio) != len(references):
        raise ValueError(f"got {len(audio)} audio inputs for {len(references)} references")
    pipe = model if isinstance(model, SpeechInstructPipeline) else _pipeline(model, speech_tokenizer)
    kwargs = {"sampling_rate": sampling_rate} if sampling_rate is not None else {}
    outputs = pipe(list(audio), batch_size=batch_size, max_new_tokens=max_new_tokens,
                   generate_kwargs=generate_kwargs or None, **kwargs)
    predictions = [o["generated_text"] for o in outputs]
    recipe = pipe.recipe.get("recipe", "speech_instruct")
    scores = text_metrics(predictions, list(references), kind="asr" if recipe == "asr" else "answer")
    return {"recipe": recipe, **scores, "num_examples": len(predictions), "predictions": predictions}


def _pipeline(model: Any, speech_tokenizer: Any):
    from transformers import pipeline

    from .pipelines import register

    register()
    kwargs = {"speech_tokenizer": speech_tokenizer} if speech_tokenizer is not None else {}
    return pipeline("speech-instruct", model=str(model), dtype="float32", **kwargs)


# ---------------------------------------------------------------------------------------------- CLI
def make_answer_parser(subparsers=None) -> argparse.ArgumentParser:
    """``gemma-rvq answer FILE... --model DIR``: spoken files in, the stage-3 model's answers out."""
    kwargs = {"description": "Answer spoken files with a stage-3 model (pipeline('speech-instruct'))."}
    parser = subparsers.add_parser("answer", help=kwargs["description"], **kwargs) if subparsers else \
        argparse.ArgumentParser(**kwargs)
    parser.add_argument("files", nargs="+", help="audio files")
    parser.add_argument("--model", required=True, help="the stage-3 folder examples/sft.py saved")
    parser.add_argument("--speech-tokenizer", help="the stage-1 model (default: the one the folder records)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print one JSON object per file")
    parser.set_defaults(func=run_answer)
    return parser


def run_answer(args: argparse.Namespace) -> int:
    pipe = _pipeline(args.model, args.speech_tokenizer)
    outputs = pipe(list(args.files), batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    for path, output in zip(args.files, outputs):
        if args.json:
            print(json.dumps({"file": path, "answer": output["generated_text"]}, ensure_ascii=False))
        else:
            print(f"{path}\t{output['generated_text']}")
    return 0


def make_evaluate_llm_parser(subparsers=None) -> argparse.ArgumentParser:
    """``gemma-rvq evaluate-llm``: WER/CER (asr recipe) or chrF (speech_instruct) on held-out speech."""
    kwargs = {"description": "Evaluate a stage-3 model on held-out speech: WER/CER for an asr-recipe model, chrF "
                             "for a speech_instruct model, through pipeline('speech-instruct')."}
    parser = subparsers.add_parser("evaluate-llm", help=kwargs["description"], **kwargs) if subparsers else \
        argparse.ArgumentParser(**kwargs)
    parser.add_argument("--model", required=True, help="the stage-3 folder examples/sft.py saved")
    parser.add_argument("--dataset", required=True, help="a save_to_disk folder, a data file or a Hub dataset id")
    parser.add_argument("--split", default=None, help="split of a DatasetDict (default: dev, validation or test)")
    parser.add_argument("--audio-column", default="audio")
    parser.add_argument("--reference-column", default=None,
                        help="default: 'text' for an asr model, 'response' for a speech_instruct model")
    parser.add_argument("--speech-tokenizer", help="the stage-1 model (default: the one the folder records)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--output", help="also write the results (with predictions) to this JSON file")
    parser.set_defaults(func=run_evaluate_llm)
    return parser


def run_evaluate_llm(args: argparse.Namespace) -> int:
    from datasets import Audio, DatasetDict

    from .recipes.sft import load_raw_dataset

    data = load_raw_dataset(args.dataset)
    if isinstance(data, DatasetDict):
        split = args.split or next((s for s in ("dev", "validation", "test") if s in data), None)
        if split not in data:
            raise ValueError(f"split {split!r} not found; available: {list(data)} (pass --split)")
        data = data[split]
    if args.max_samples is not None:
        data = data.select(range(min(args.max_samples, len(data))))
    pipe = _pipeline(args.model, args.speech_tokenizer)
    recipe = pipe.recipe.get("recipe", "speech_instruct")
    column = args.reference_column or ("text" if recipe == "asr" else "response")
    for name in (args.audio_column, column):
        if name not in data.column_names:
            raise ValueError(f"the dataset has no column {name!r}; available: {data.column_names}")
    if isinstance(data.features[args.audio_column], Audio):
        data = data.cast_column(args.audio_column, Audio(decode=False))  # decoded by the pipeline (soundfile)
    result = evaluate_speech_llm(pipe, data[args.audio_column], data[column], batch_size=args.batch_size,
                                 max_new_tokens=args.max_new_tokens)
    scores = {k: v for k, v in result.items() if k != "predictions"}
    print(json.dumps(scores, indent=1))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump({**result, "references": list(data[column])}, handle, indent=1, ensure_ascii=False)
    return 0
