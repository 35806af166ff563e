"""Continued-pretraining data (gemma_rvq.recipes.interleave), CTC word alignment (gemma_rvq.alignment) and the
``cpt`` recipe of examples/sft.py, offline: the committed corpus with its word timings, a tiny random RVQ,
Llama and wav2vec2 CTC model.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset

from conftest import load_script
from gemma_rvq import build_interleaved_dataset
from gemma_rvq.alignment import CTCWordAligner, ctc_forced_align, ctc_token_spans, ctc_word_timings
from gemma_rvq.recipes.interleave import (
    build_cpt_dataset,
    interleave_words,
    mix_cpt_datasets,
    render_cpt_rows,
    word_frame_spans,
)
from gemma_rvq.testing import byte_level_bpe_tokenizer, tiny_llama
from gemma_rvq.tokens import get_format

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "corpus"
FMT = get_format("gemma_rvq", codebook_size=16, num_levels=2)
SPAN = re.compile(r"\[(TEXT|SPEECH)\]")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _split(text: str) -> list[tuple[str, str]]:
    """``[(modality, content)]`` of an interleaved string."""
    parts = SPAN.split(text)
    assert parts[0] == ""
    return [(parts[i].lower(), parts[i + 1]) for i in range(1, len(parts), 2)]


WORDS = [{"word": "The", "start": 0.10, "end": 0.30}, {"word": "sun", "start": 0.30, "end": 0.52},
         {"word": "rises", "start": 0.61, "end": 0.98}, {"word": "early.", "start": 1.02, "end": 1.40}]


# ---------------------------------------------------------------------------------------------- one row
def test_speech_spans_are_exactly_the_frames_of_their_words():
    codes = np.random.default_rng(0).integers(0, 16, size=(2, 40))  # 1.6 s at 25 fps
    for seed in range(20):
        text, spans = interleave_words(WORDS, codes, FMT, 25.0, switch_rate=0.5, rng=np.random.default_rng(seed))
        pieces = _split(text)
        assert [p[0] for p in pieces] == [s["modality"] for s in spans]
        assert spans[0]["first_word"] == 0 and spans[-1]["end_word"] == len(WORDS)
        for span, (modality, content), following in zip(spans, pieces, [*spans[1:], None]):
            words = WORDS[span["first_word"]: span["end_word"]]
            if following is not None:
                assert following["first_word"] == span["end_word"] and following["modality"] != modality
            if modality == "text":
                assert content == " ".join(w["word"] for w in words)
            else:  # the boundaries are the word times, in frames
                first, end = round(words[0]["start"] * 25), round(words[-1]["end"] * 25)
                assert (span["start_frame"], span["end_frame"]) == (first, end)
                assert content == FMT.render(codes[:, first:end])
        assert len(spans) >= 2  # ensure_both: every sequence interleaves


def test_word_frame_spans_and_errors():
    assert word_frame_spans(WORDS, 25.0, 40) == [(2, 8), (8, 13), (15, 24), (26, 35)]
    assert word_frame_spans([{"word": "a", "start": 0.0, "end": 0.01}], 25.0, 40) == [(0, 1)]  # >= 1 frame
    assert word_frame_spans(WORDS, 25.0, 30)[-1] == (26, 30)  # clipped to the audio
    with pytest.raises(ValueError, match=r"row 7: word 1 \('sun'\)"):
        word_frame_spans([WORDS[0], {"word": "sun", "start": 0.5, "end": 0.2}], 25.0, 40, name="row 7")
    with pytest.raises(ValueError, match="after the 10 frames"):
        word_frame_spans(WORDS, 25.0, 10)
    with pytest.raises(ValueError, match="must be a dict"):
        word_frame_spans([{"word": "x"}], 25.0, 10)


def test_switching_rate_is_honoured():
    words = [{"word": f"w{i}", "start": i * 0.1, "end": i * 0.1 + 0.08} for i in range(400)]
    codes = np.zeros((2, 1000), dtype=np.int64)
    for rate in (0.0, 0.1, 0.3, 1.0):
        _, spans = interleave_words(words, codes, FMT, 25.0, switch_rate=rate, ensure_both=False,
                                    rng=np.random.default_rng(1), start_modality="text")
        switches = len(spans) - 1
        assert switches == pytest.approx(rate * 399, abs=max(3.0, 0.2 * rate * 399)), rate
    _, spans = interleave_words(words[:2], codes, FMT, 25.0, switch_rate=0.0, ensure_both=False,
                                start_modality="speech")
    assert [s["modality"] for s in spans] == ["speech"]


# ---------------------------------------------------------------------------------------------- corpus
@pytest.fixture(scope="module")
def corpus_tokens():
    """Four corpus clips through a tiny random RVQ (SpeechTokenizer, codes kept) joined with words.jsonl."""
    from datasets import Audio

    from gemma_rvq.testing import tiny_rvq_model
    from gemma_rvq.transforms import SpeechTokenizer

    words = {}
    with open(CORPUS / "words.jsonl", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            words[row["id"]] = row["words"]
    with open(CORPUS / "metadata.jsonl", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle][:4]
    dataset = Dataset.from_dict({
        "id": [r["id"] for r in rows], "text": [r["text"] for r in rows],
        "audio": [str(CORPUS / r["file"]) for r in rows], "words": [words[r["id"]] for r in rows],
    }).cast_column("audio", Audio(decode=False))
    model = tiny_rvq_model(num_quantizers=2, codebook_size=16)
    dataset = dataset.map(SpeechTokenizer(model, format=FMT, return_codes=True, batch_size=1), batched=True,
                          batch_size=4)
    return dataset.remove_columns("audio"), model.config.frame_rate


def test_build_interleaved_dataset_on_the_corpus(corpus_tokens):
    tokens, frame_rate = corpus_tokens
    out = build_interleaved_dataset(tokens, FMT, frame_rate=frame_rate, switch_rate=0.4, seed=3,
                                    return_spans=True, keep_columns=["id"])
    assert out.column_names == ["id", "text", "spans"]
    again = build_interleaved_dataset(tokens, FMT, frame_rate=frame_rate, switch_rate=0.4, seed=3)
    assert again["text"] == out["text"]  # seeded per row
    for row, source in zip(out, tokens):
        codes = np.asarray(source["audio_codes"])
        for span, (modality, content) in zip(row["spans"], _split(row["text"])):
            words = source["words"][span["first_word"]: span["end_word"]]
            if modality == "speech":
                first, end = round(words[0]["start"] * frame_rate), round(words[-1]["end"] * frame_rate)
                assert (span["start_frame"], span["end_frame"]) == (first, end)
                assert content == FMT.render(codes[:, first:end])
            else:
                assert content == " ".join(w["word"] for w in words)
    # from the token string alone (a deduplicating format is expanded back to frames first)
    ichigo = get_format("ichigo", codebook_size=16)
    strings = tokens.map(lambda row: {"semantic_tokens": ichigo.render(np.asarray(row["audio_codes"])[:1])})
    by_codes = build_interleaved_dataset(strings, ichigo, frame_rate=frame_rate, seed=3)
    by_string = build_interleaved_dataset(strings.remove_columns("audio_codes"), ichigo, frame_rate=frame_rate,
                                          seed=3)
    assert by_codes["text"] == by_string["text"]
    with pytest.raises(ValueError, match="no column"):
        build_interleaved_dataset(tokens.remove_columns("words"), FMT, frame_rate=frame_rate)
    with pytest.raises(ValueError, match="wrong frame_rate"):
        build_interleaved_dataset(tokens, FMT, frame_rate=frame_rate * 10)


def test_render_kinds_and_exact_mixture_ratios(corpus_tokens):
    tokens, frame_rate = corpus_tokens
    kinds = {kind: render_cpt_rows(tokens, kind, FMT, frame_rate=frame_rate) if kind == "interleaved"
             else render_cpt_rows(tokens, kind, FMT) for kind in ("text", "speech", "paired", "interleaved")}
    assert kinds["text"]["text"] == tokens["text"]
    assert kinds["speech"]["text"] == tokens["semantic_tokens"]
    assert kinds["paired"]["text"][0] == "[SPEECH]" + tokens["semantic_tokens"][0] + "[TEXT]" + tokens["text"][0]
    assert all("[SPEECH]" in t and "[TEXT]" in t for t in kinds["interleaved"]["text"])

    big = {kind: Dataset.from_dict({"text": [f"{kind} {i}" for i in range(50)]}) for kind in ("a", "b", "c")}
    mixed = mix_cpt_datasets(big, {"a": 2, "b": 1, "c": 1}, num_rows=22, seed=0)
    counts = {k: mixed["kind"].count(k) for k in "abc"}
    assert counts == {"a": 11, "b": 6, "c": 5} or counts == {"a": 11, "b": 5, "c": 6}
    assert mixed["document"] == list(range(22))
    assert all(text.startswith(kind) for text, kind in zip(mixed["text"], mixed["kind"]))
    assert len(set(mixed["text"])) == 22  # no document drawn twice
    assert mixed["kind"] != sorted(mixed["kind"])  # shuffled
    default = mix_cpt_datasets(big, {"a": 2, "b": 1, "c": 1})
    assert [default["kind"].count(k) for k in "abc"] == [50, 25, 25]  # the most without repeating a document
    with pytest.raises(ValueError, match="needs 60 documents but its source has 50"):
        mix_cpt_datasets(big, {"a": 1}, num_rows=60)
    assert len(mix_cpt_datasets(big, {"a": 1}, num_rows=60, replace=True)) == 60
    with pytest.raises(ValueError, match="no source dataset for kind"):
        mix_cpt_datasets(big, {"z": 1})

    mixture = build_cpt_dataset(tokens, FMT, {"text": 1, "speech": 1, "paired": 1, "interleaved": 1},
                                frame_rate=frame_rate, num_rows=8)
    assert sorted(mixture["kind"]) == sorted(["text", "speech", "paired", "interleaved"] * 2)


# ---------------------------------------------------------------------------------------------- cpt recipe
def _load_sft():
    return load_script("examples/sft.py", "sft_script")


def test_cpt_recipe_packs_documents_without_crossing_them(tmp_path):
    from gemma_rvq.recipes import build_sft_trainer

    sft = _load_sft()
    tokenizer = byte_level_bpe_tokenizer()
    tiny_llama(tokenizer, hidden_size=32).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    fmt = get_format("gemma_rvq", codebook_size=8, num_levels=2)
    rng = np.random.default_rng(0)
    documents = [("[SPEECH]" + fmt.render(rng.integers(0, 8, (2, int(rng.integers(2, 40))))) + "[TEXT]" +
                  "The sun rises early. " * int(rng.integers(1, 4))) for _ in range(12)]
    Dataset.from_dict({"text": documents}).save_to_disk(tmp_path / "docs")
    args = ["--config", str(ROOT / "examples" / "recipes" / "tiny_cpt.yaml"), "--model_name_or_path",
            str(tmp_path / "base"), "--dataset_name", str(tmp_path / "docs"), "--output_dir", str(tmp_path / "out"),
            "--max_length", "64"]
    script_args, training_args, model_args = sft.make_parser().parse_args_and_config(args)
    trainer = build_sft_trainer(script_args, training_args, model_args)
    tokenizer = trainer.processing_class
    encoded = [tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id] for doc in documents]
    assert max(map(len, encoded)) > 64  # some documents must be split
    pieces = []
    for row in trainer.train_dataset:
        ids, lengths = row["input_ids"], row["seq_lengths"]
        assert len(ids) <= 64 and sum(lengths) == len(ids)
        offsets = [0, *itertools.accumulate(lengths)]
        pieces += [ids[a:b] for a, b in itertools.pairwise(offsets)]
    # every packed segment is one contiguous piece of one document, and the pieces rebuild every document
    for piece in pieces:
        assert any(any(doc[i:i + len(piece)] == piece for i in range(len(doc) - len(piece) + 1)) for doc in encoded)
    assert sorted(map(len, pieces)) and sum(map(len, pieces)) == sum(map(len, encoded))

    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert "position_ids" in batch and "attention_mask" not in batch  # padding-free: documents restart at 0
    model = trainer.model.eval()
    starts = [*(batch["position_ids"][0] == 0).nonzero().flatten().tolist(), batch["input_ids"].shape[1]]
    assert len(starts) > 2
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for a, b in itertools.pairwise(starts):  # no attention across documents
            alone = model(input_ids=batch["input_ids"][:, a:b], use_cache=False).logits
            torch.testing.assert_close(packed[:, a:b], alone, rtol=1e-4, atol=1e-4)
    model.train()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(np.isfinite(losses))
    with pytest.raises(ValueError, match="without crossing them"):
        build_sft_trainer(*sft.make_parser().parse_args_and_config([*args, "--packing_strategy", "wrapped"]))


# ---------------------------------------------------------------------------------------------- CTC
def _brute_force(log_probs: torch.Tensor, targets: list[int], blank: int = 0):
    """Best path by enumerating every frame labelling that collapses to ``targets``."""
    frames, vocab = log_probs.shape
    best, best_path = -float("inf"), None
    for path in itertools.product(range(vocab), repeat=frames):
        collapsed = [p for i, p in enumerate(path) if p != blank and (i == 0 or path[i - 1] != p)]
        if collapsed == targets:
            score = float(sum(log_probs[t, p] for t, p in enumerate(path)))
            if score > best:
                best, best_path = score, list(path)
    return best, best_path


@pytest.mark.parametrize(("frames", "targets", "seed"), [(4, [1, 2], 0), (5, [1, 1], 1), (6, [2, 1, 2], 2),
                                                         (3, [1, 2, 1], 3), (5, [3], 4)])
def test_ctc_forced_align_matches_brute_force(frames, targets, seed):
    log_probs = torch.randn(frames, 4, generator=torch.Generator().manual_seed(seed)).log_softmax(-1)
    path, scores = ctc_forced_align(log_probs, targets)
    best, best_path = _brute_force(log_probs, targets)
    assert scores.sum().item() == pytest.approx(best, abs=1e-5)
    assert path.tolist() == best_path
    spans = ctc_token_spans(path, len(targets))
    assert [path[a].item() for a, _ in spans] == targets


def test_ctc_word_timings_by_hand_and_errors():
    # 10 frames of 20 ms; vocabulary: blank, a, b, | ; frames 1-2 say a, 3 |, 6-8 b
    wanted = [0, 1, 1, 3, 0, 0, 2, 2, 2, 0]
    log_probs = torch.full((10, 4), -10.0)
    log_probs[torch.arange(10), torch.tensor(wanted)] = 0.0
    timings = ctc_word_timings(log_probs.log_softmax(-1), [[1], [2]], 0.02, delimiter=3)
    assert timings == [pytest.approx((0.02, 0.06)), pytest.approx((0.12, 0.18))]
    with pytest.raises(ValueError, match="cannot hold"):
        ctc_forced_align(log_probs[:2], [1, 1])
    with pytest.raises(ValueError, match="non-blank"):
        ctc_forced_align(log_probs, [0, 1])


def test_ctc_word_aligner_on_a_corpus_clip(tmp_path):
    """The real path: a (random) wav2vec2 CTC model and its character tokenizer, as a datasets.map transform."""
    from datasets import Audio
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC, Wav2Vec2Processor

    from gemma_rvq.testing import tiny_wav2vec2_config

    letters = list("abcdefghijklmnopqrstuvwxyz'")
    vocab = {"<pad>": 0, "<unk>": 1, "|": 2, **{c: i + 3 for i, c in enumerate(letters)}}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json"), word_delimiter_token="|")
    processor = Wav2Vec2Processor(Wav2Vec2FeatureExtractor(sampling_rate=16000), tokenizer)
    torch.manual_seed(0)
    model = Wav2Vec2ForCTC(tiny_wav2vec2_config(vocab_size=len(vocab), pad_token_id=0))
    with open(CORPUS / "metadata.jsonl", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle][:2]
    dataset = Dataset.from_dict({"audio": [str(CORPUS / r["file"]) for r in rows],
                                 "text": [r["text"] for r in rows]}).cast_column("audio", Audio(decode=False))
    aligned = dataset.map(CTCWordAligner(model, processor, lowercase=True), batched=True, batch_size=2)
    for row, source in zip(aligned, rows):
        words = row["words"]
        assert " ".join(w["word"] for w in words) == source["text"]  # the transcript's words, verbatim
        previous = 0.0
        for word in words:
            assert previous <= word["start"] < word["end"] <= source["duration"] + 0.03
            previous = word["end"]
    # and the result feeds the interleaver
    codes = np.zeros((2, int(rows[0]["duration"] * 25)), dtype=np.int64)
    text, _ = interleave_words(aligned[0]["words"], codes, FMT, 25.0, rng=np.random.default_rng(0))
    assert "[SPEECH]" in text and "[TEXT]" in text
