"""Cost of grammar-constrained generation: ``SemanticGrammarLogitsProcessor`` against plain ``generate``.

Three ways of running the same ``model.generate`` at batch 8, measured in one process, rounds interleaved,
best round reported (these shared machines drift: only the ratios mean anything):

(a) plain: no logits processor at all (the unconstrained baseline);
(b) vocab: ``SemanticVocabularyLogitsProcessor`` (only the format's tokens; what stage 2 used before);
(c) grammar: ``SemanticGrammarLogitsProcessor`` (every string parses).

Every run generates exactly ``--new-tokens`` tokens per row (``generate`` gets no stop id; a closed row
goes on writing stop tokens), so the three do the same number of model steps and the ratio is the
processor's cost alone. Models: the demo's stage-2 LM (a random Llama, hidden 64, 2 layers, the demo's
byte-level BPE vocabulary + the ``gemma_rvq`` tokens for 4 levels x 64 codes) and, with ``--sizes``, larger
random Llamas with a 32k-token vocabulary (a realistic share of the logits width).

    python benchmarks/bench_generate.py                       # the demo's stage-2 model
    python benchmarks/bench_generate.py --sizes demo 256x4 --rounds 5 --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList

from gemma_rvq.grammar import SemanticGrammarLogitsProcessor
from gemma_rvq.llm import add_semantic_tokens
from gemma_rvq.recipes.generation import SemanticVocabularyLogitsProcessor, semantic_token_ids
from gemma_rvq.testing import byte_level_bpe_tokenizer
from gemma_rvq.tokens import get_format

TEXTS = ["Habari za asubuhi?", "Hello, how are you today?", "Mji mkuu wa Kenya ni Nairobi.", "Good night",
         "Where is the market?", "Asante sana rafiki yangu", "The weather is nice.", "Tell me a story"]


def build(size: str, fmt, device: str):
    """(model, tokenizer) for ``demo`` (the demo's stage-2 LM) or ``HIDDENxLAYERS`` with a 32k vocabulary."""
    tokenizer = byte_level_bpe_tokenizer(vocab_size=512)
    if size == "demo":
        hidden, layers, vocab = 64, 2, None
    else:
        hidden, layers = (int(v) for v in size.split("x"))
        vocab = 32000
    add_semantic_tokens(tokenizer, None, fmt)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab or len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    model = LlamaForCausalLM(config).to(device).eval()
    return model, tokenizer


def run(model, tokenizer, fmt, mode: str, new_tokens: int) -> float:
    stops = sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(fmt.end_token)})
    processors = []
    if mode == "vocab":
        processors = [SemanticVocabularyLogitsProcessor([*semantic_token_ids(tokenizer, fmt), *stops])]
    elif mode == "grammar":
        processors = [SemanticGrammarLogitsProcessor(tokenizer, fmt, eos_token_id=stops,
                                                     max_new_tokens=new_tokens)]
    tokenizer.padding_side = "left"
    encoded = tokenizer(TEXTS, return_tensors="pt", padding=True).to(model.device)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**encoded, logits_processor=LogitsProcessorList(processors), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                             pad_token_id=tokenizer.pad_token_id)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    assert out.shape[1] - encoded["input_ids"].shape[1] == new_tokens
    if mode == "grammar":  # every row wrote a string that parses
        ids = dict(zip(semantic_token_ids(tokenizer, fmt), fmt.vocabulary()))
        for row in out[:, encoded["input_ids"].shape[1]:].tolist():
            end = row.index(tokenizer.convert_tokens_to_ids(fmt.end_token))
            fmt.parse("".join(ids[i] for i in row[: end + 1]))
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["demo"], help="demo and/or HIDDENxLAYERS (32k vocabulary)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fmt = get_format("gemma_rvq", codebook_size=64, num_levels=4)  # the demo's format
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {args.device}, {args.threads} thread(s), batch {len(TEXTS)}, {args.new_tokens} new tokens, "
          f"load average {load:.2f}")
    results = {}
    for size in args.sizes:
        model, tokenizer = build(size, fmt, args.device)
        params = sum(p.numel() for p in model.parameters())
        for mode in ("plain", "vocab", "grammar"):  # warm-up
            run(model, tokenizer, fmt, mode, 8)
        best = {mode: float("inf") for mode in ("plain", "vocab", "grammar")}
        for _ in range(args.rounds):
            for mode in best:
                best[mode] = min(best[mode], run(model, tokenizer, fmt, mode, args.new_tokens))
        per_step = {mode: 1000 * t / args.new_tokens for mode, t in best.items()}
        results[size] = {"parameters": params, "vocab_size": model.config.vocab_size, "ms_per_step": per_step,
                         "grammar_overhead": best["grammar"] / best["plain"] - 1,
                         "vocab_overhead": best["vocab"] / best["plain"] - 1}
        print(f"{size:>8}: {params / 1e6:.2f}M parameters, vocabulary {model.config.vocab_size}: "
              f"plain {per_step['plain']:.2f} ms/step, vocab-only {per_step['vocab']:.2f} "
              f"({results[size]['vocab_overhead']:+.1%}), grammar {per_step['grammar']:.2f} "
              f"({results[size]['grammar_overhead']:+.1%})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
