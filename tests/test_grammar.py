"""SemanticGrammarLogitsProcessor: every string written under the grammar parses, for every kind of format.

Most tests drive the processor directly with random logits (a simulated ``generate`` loop over a batch,
sampling among the allowed tokens), which reaches far more grammar states per second than a model would;
the last ones run the real ``model.generate`` (greedy, sampling, beam search) on an untrained tiny Llama.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemma_rvq.grammar import SemanticGrammarLogitsProcessor
from gemma_rvq.llm import add_semantic_tokens
from gemma_rvq.recipes.generation import _to_string, generate_semantic_tokens
from gemma_rvq.testing import byte_level_bpe_tokenizer, tiny_llama
from gemma_rvq.tokens import SemanticTokenFormat, get_format

FORMATS = {
    "gemma_rvq": get_format("gemma_rvq", codebook_size=8, num_levels=3),
    "gemma_rvq-dedup-durations": get_format("gemma_rvq", codebook_size=3, num_levels=2, dedup=True, max_duration=4),
    "gemma_rvq-markers-off": get_format("gemma_rvq", codebook_size=8, num_levels=2, markers=False),
    "ichigo": get_format("ichigo", codebook_size=4, max_duration=5),
    "ichigo-markers-off": get_format("ichigo", codebook_size=4, max_duration=3, markers=False),
    "spire": get_format("spire", codebook_size=6),
    "template-separator": SemanticTokenFormat.from_template(
        "<unit_{code}>", codebook_size=8, start_token="<s>", end_token="</s>", separator=" "),
    "template-levels-separator-nomarkers": SemanticTokenFormat.from_template(
        "<L{level}_{code}>", codebook_size=5, num_levels=2, separator=" ", dedup=True,
        duration_template="<d{duration}>", max_duration=3),
}


@pytest.fixture(scope="module")
def tokenizers():
    out = {}
    for name, fmt in FORMATS.items():
        tokenizer = byte_level_bpe_tokenizer()
        add_semantic_tokens(tokenizer, None, fmt)
        out[name] = tokenizer
    return out


def _stops(tokenizer, fmt) -> list[int]:
    stops = {tokenizer.eos_token_id}
    if fmt.end_token is not None:
        stops.add(tokenizer.convert_tokens_to_ids(fmt.end_token))
    return sorted(stops)


def _simulate(tokenizer, fmt, *, max_new_tokens, rows=24, seed=0, end_bias=0.0, shuffle=False):
    """A ``generate`` loop with random logits; returns the generated id lists (prompt removed)."""
    stops = _stops(tokenizer, fmt)
    processor = SemanticGrammarLogitsProcessor(tokenizer, fmt, eos_token_id=stops, max_new_tokens=max_new_tokens)
    generator = torch.Generator().manual_seed(seed)
    vocab_size = len(tokenizer) + 5  # padded embeddings: ids no token has
    ids = torch.randint(0, 100, (rows, 4), generator=generator)
    finished = torch.zeros(rows, dtype=torch.bool)
    for _ in range(max_new_tokens):
        scores = torch.randn(rows, vocab_size, generator=generator)
        scores[:, stops] += end_bias
        out = processor(ids, scores)
        assert torch.isfinite(out).any(1).all()  # never a row with nothing allowed
        token = torch.multinomial(out.softmax(-1), 1, generator=generator).squeeze(1)
        token = torch.where(finished, tokenizer.pad_token_id or 0, token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        finished |= torch.isin(token, torch.tensor(stops))
        if shuffle:  # what beam search does to rows between steps
            order = torch.randperm(rows, generator=generator)
            ids, finished = ids[order], finished[order]
        if finished.all():
            break
    return ids[:, 4:].tolist(), stops, processor


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize(("max_new_tokens", "end_bias", "shuffle"),
                         [(60, 0.0, False), (60, 4.0, False), (60, 0.0, True)])
def test_every_sampled_string_parses_and_is_canonical(tokenizers, name, max_new_tokens, end_bias, shuffle):
    fmt, tokenizer = FORMATS[name], tokenizers[name]
    outputs, stops, processor = _simulate(tokenizer, fmt, max_new_tokens=max_new_tokens, end_bias=end_bias,
                                          shuffle=shuffle, seed=hash(name) % 1000)
    id_to_token = {i: t for t, i in zip(fmt.vocabulary(), tokenizer.convert_tokens_to_ids(fmt.vocabulary()))}
    lengths = []
    for ids in outputs:
        text, error = _to_string(ids, stops, fmt, id_to_token, max_new_tokens, processor.separator_ids)
        assert error is None, (error, ids)
        parsed = fmt.parse(text)
        lengths.append(parsed.codes.shape[1])
        # canonical: what render writes for these frames (runs collapsed and split exactly as render does)
        if fmt.uses_durations or not fmt.dedup:
            assert fmt.render(parsed.expand()) == text
        else:
            assert fmt.render(parsed.codes) == text
        # the ids are exactly how the tokenizer writes this string (separator ids included)
        cut = next(k for k, i in enumerate(ids) if i in stops)
        written = ids[: cut + 1] if fmt.end_token is not None else ids[:cut]
        assert written == tokenizer(text, add_special_tokens=False)["input_ids"], (text, written)
    assert min(lengths) >= 1
    if end_bias == 0.0:
        assert max(lengths) >= 3  # long strings, closed in time


@pytest.mark.parametrize("name", ["gemma_rvq", "ichigo", "template-separator", "gemma_rvq-markers-off"])
def test_strings_close_exactly_at_the_shortest_budget(tokenizers, name):
    fmt, tokenizer = FORMATS[name], tokenizers[name]
    stops = _stops(tokenizer, fmt)
    shortest = SemanticGrammarLogitsProcessor(tokenizer, fmt, eos_token_id=stops).minimum_new_tokens
    for budget in range(shortest, shortest + 9):
        outputs, stops, _ = _simulate(tokenizer, fmt, max_new_tokens=budget, rows=8, seed=budget)
        for ids in outputs:
            assert len(ids) <= budget and any(i in stops for i in ids), (budget, ids)
    with pytest.raises(ValueError, match=f"max_new_tokens={shortest - 1} cannot hold one frame"):
        SemanticGrammarLogitsProcessor(tokenizer, fmt, eos_token_id=stops, max_new_tokens=shortest - 1)


def test_hand_checked_masks_for_gemma_rvq(tokenizers):
    fmt, tokenizer = FORMATS["gemma_rvq"], tokenizers["gemma_rvq"]  # 3 levels x 8 codes, markers
    vocab = fmt.vocabulary()
    ids = dict(zip(vocab, tokenizer.convert_tokens_to_ids(vocab)))
    eos = tokenizer.eos_token_id
    processor = SemanticGrammarLogitsProcessor(tokenizer, fmt, eos_token_id=[eos, ids["<|rvq_end|>"]],
                                               max_new_tokens=9)
    prompt = torch.tensor([[5, 6, 7]])

    def allowed(sequence):
        processor._state = None  # a fresh call over the whole sequence, step by step
        seq = prompt
        for token in [None, *sequence]:
            if token is not None:
                seq = torch.cat([seq, torch.tensor([[ids[token]]])], dim=1)
            out = processor(seq, torch.zeros(1, len(tokenizer)))
        return {t for t, i in ids.items() if torch.isfinite(out[0, i])} | (
            {"EOS"} if torch.isfinite(out[0, eos]) else set())

    assert allowed([]) == {"<|rvq_start|>"}
    level0 = {f"<|q0_{c:04d}|>" for c in range(8)}
    assert allowed(["<|rvq_start|>"]) == level0  # no end marker before a frame
    assert allowed(["<|rvq_start|>", "<|q0_0003|>"]) == {f"<|q1_{c:04d}|>" for c in range(8)}
    frame = ["<|q0_0003|>", "<|q1_0000|>", "<|q2_0007|>"]
    # after a frame: another frame (it fits: 1 + 3 + 3 + 1 end <= 9) or the end marker
    assert allowed(["<|rvq_start|>", *frame]) == level0 | {"<|rvq_end|>"}
    # 7 tokens written, 2 left: a new frame would not close in time
    assert allowed(["<|rvq_start|>", *frame, *frame[:0], "<|q0_0001|>", "<|q1_0001|>", "<|q2_0001|>"]) == {
        "<|rvq_end|>"}


def test_dedup_forbids_a_repeated_frame_unless_the_run_is_full(tokenizers):
    fmt, tokenizer = FORMATS["ichigo"], tokenizers["ichigo"]  # K=4, max_duration 5
    vocab = fmt.vocabulary()
    ids = dict(zip(vocab, tokenizer.convert_tokens_to_ids(vocab)))
    processor = SemanticGrammarLogitsProcessor(tokenizer, fmt, eos_token_id=[ids["<|sound_end|>"]])

    def allowed(sequence):
        processor._state = None
        seq = torch.tensor([[1, 2]])
        for token in [None, *sequence]:
            if token is not None:
                seq = torch.cat([seq, torch.tensor([[ids[token]]])], dim=1)
            out = processor(seq, torch.zeros(1, len(tokenizer)))
        return {t for t, i in ids.items() if torch.isfinite(out[0, i])}

    codes = {f"<|sound_{c:04d}|>" for c in range(4)}
    durations = {f"<|duration_{d:02d}|>" for d in range(2, 6)}
    start = ["<|sound_start|>"]
    assert allowed(start) == codes | durations
    assert allowed([*start, "<|sound_0002|>"]) == (codes - {"<|sound_0002|>"}) | durations | {"<|sound_end|>"}
    assert allowed([*start, "<|sound_0002|>", "<|duration_03|>"]) == codes - {"<|sound_0002|>"}
    # a full run (max_duration) may be continued by the same code: a run of 6 is <|duration_05|>X X
    assert allowed([*start, "<|duration_05|>", "<|sound_0002|>"]) == codes | durations | {"<|sound_end|>"}


@pytest.mark.parametrize("preset", ["gemma_rvq", "ichigo", "spire"])
@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_generate_with_an_untrained_model_always_parses(preset, mode):
    fmt = get_format(preset, codebook_size=8, **({"num_levels": 2} if preset == "gemma_rvq" else {}))
    tokenizer = byte_level_bpe_tokenizer()
    model = tiny_llama(tokenizer, hidden_size=32)
    add_semantic_tokens(tokenizer, model, fmt, pad_to_multiple_of=8)
    texts = ["Habari za asubuhi?", "Hello, how are you today?", "Mji mkuu wa Kenya ni Nairobi.", "Ok"] * 2
    kwargs = {"greedy": {}, "sample": {"do_sample": True, "top_k": 0},
              "beam": {"num_beams": 3, "early_stopping": True}}[mode]
    torch.manual_seed(0)
    out = generate_semantic_tokens(model, tokenizer, texts, fmt, max_new_tokens=16, batch_size=4,
                                   show_progress=False, **kwargs)
    assert out["generation_error"] == [None] * len(texts), out["generation_error"]
    for tokens in out["semantic_tokens"]:
        assert fmt.parse(tokens).codes.shape[1] >= 1
        assert set(tokenizer.tokenize(tokens)) <= set(fmt.vocabulary())


def test_processor_restarts_for_each_generate_call_and_rejects_small_logits(tokenizers):
    fmt, tokenizer = FORMATS["gemma_rvq"], tokenizers["gemma_rvq"]
    processor = SemanticGrammarLogitsProcessor(tokenizer, fmt, max_new_tokens=20)
    first = processor(torch.tensor([[1, 2, 3]]), torch.zeros(1, len(tokenizer)))
    start = tokenizer.convert_tokens_to_ids("<|rvq_start|>")
    assert torch.isfinite(first[0]).nonzero().flatten().tolist() == [start]
    # a second call with other prompts starts the grammar again
    second = processor(torch.tensor([[4, 5], [6, 7]]), torch.zeros(2, len(tokenizer)))
    assert (torch.isfinite(second).nonzero()[:, 1] == start).all()
    with pytest.raises(ValueError, match="outside the logits"):
        processor(torch.tensor([[1]]), torch.zeros(1, 10))
    with pytest.raises(ValueError, match="lacks"):
        SemanticGrammarLogitsProcessor(byte_level_bpe_tokenizer(), fmt)
    assert np.isfinite(processor.minimum_new_tokens)
