"""Downstream evaluation: unit error rate, content probe, WER/CER/chrF, and the speech-instruct pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import evaluate
import numpy as np
import pytest
import soundfile
from datasets import Dataset

from conftest import load_script
from gemma_rvq.downstream import evaluate_speech_llm, evaluate_stage2, text_metrics
from gemma_rvq.formats import attach_format, load_format_record
from gemma_rvq.metrics import module_path
from gemma_rvq.metrics.functional import character_error_rate, edit_distance, unit_error_rate
from gemma_rvq.probe import content_probe, kmeans_units, train_ctc_probe
from gemma_rvq.testing import byte_level_bpe_tokenizer, tiny_llama, tiny_rvq_model
from gemma_rvq.tokens import get_format

ROOT = Path(__file__).resolve().parents[1]
FORMAT = get_format("gemma_rvq", codebook_size=8, num_levels=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- metrics on hand-computed cases
def test_edit_distance_hand_cases():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([1, 2, 3], [1, 3]) == 1
    assert edit_distance([], [4, 5]) == 2 and edit_distance([4, 5], []) == 2
    assert edit_distance([7, 7, 7], [7, 7, 7]) == 0
    assert edit_distance(["ab", "c"], ["ab", "d", "c"]) == 1


def test_unit_error_rate_hand_case_through_the_evaluate_module():
    # utterance 1: frames (1,5) (2,5) (3,5) vs (1,5) (2,5) (4,6): one frame substituted; level 0: 1, level 1: 1
    # utterance 2: one frame (0,0) vs two frames (0,0) (1,1): one deletion at every level
    predictions = [[[1, 2, 3], [5, 5, 5]], [[0], [0]]]
    references = [[[1, 2, 4], [5, 5, 6]], [[0, 1], [0, 1]]]
    expected = {"unit_error_rate": 2 / 5, "unit_error_rate_per_level": [2 / 5, 2 / 5], "num_reference_units": 5,
                "num_utterances": 2}
    assert unit_error_rate(predictions, references) == expected
    metric = evaluate.load(module_path("unit_error_rate"))
    assert metric.compute(predictions=predictions, references=references) == expected
    # a frame is right only when every level is: level 1 alone differs here
    assert unit_error_rate([[[1, 2], [3, 9]]], [[[1, 2], [3, 4]]])["unit_error_rate_per_level"] == [0.0, 0.5]
    with pytest.raises(ValueError, match="2 levels, references 3"):
        unit_error_rate([[[1], [2]]], [[[1], [2], [3]]])


def test_text_metrics_hand_cases():
    scores = text_metrics(["a x c", "hello"], ["a b c d", "hello"], kind="asr")
    assert scores["wer"] == pytest.approx(2 / 5)  # 1 substitution + 1 deletion over 5 words
    assert scores["cer"] == pytest.approx(3 / 12)  # "a x c" vs "a b c d": 1 sub + 2 deletions; "hello" exact
    assert character_error_rate(["a x c"], ["a b c d"]) == pytest.approx(3 / 7)
    assert text_metrics(["the same answer"], ["the same answer"], kind="answer")["chrf"] == pytest.approx(100.0)
    assert text_metrics(["zzz"], ["abc"], kind="answer")["chrf"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="kind must be"):
        text_metrics(["a"], ["a"], kind="bleu")


# ----------------------------------------------------------------------------- content probe
def _synthetic(texts, informative: bool, rng):
    chars = sorted({c for t in texts for c in t})
    units = []
    for text in texts:
        codes = [chars.index(c) for c in text for _ in range(2)]
        units.append(np.array([codes if informative else rng.integers(0, len(chars), len(codes)).tolist()]))
    return units, len(chars)


def test_probe_reads_content_bearing_units_and_not_random_ones():
    texts = ["hello world", "good morning", "the sun rises", "a cat sat", "we go home", "it is warm"] * 4
    rng = np.random.default_rng(0)
    units, size = _synthetic(texts, True, rng)
    good = train_ctc_probe(units[:18], texts[:18], units[18:], texts[18:], sizes=[size], steps=150)
    noise, _ = _synthetic(texts, False, rng)
    bad = train_ctc_probe(noise[:18], texts[:18], noise[18:], texts[18:], sizes=[size], steps=150)
    assert good.cer < 0.2 < 0.6 < bad.cer, (good.cer, bad.cer)
    assert good.examples[0][0] == texts[18]


def test_content_probe_covers_every_level_count_and_kmeans():
    rng = np.random.default_rng(1)
    texts = ["abc", "bca", "cab", "aabb"] * 3
    codes = [rng.integers(0, 8, size=(3, 2 * len(t))) for t in texts]
    features = [rng.normal(size=(c.shape[1], 4)) for c in codes]
    out = content_probe(codes[:8], texts[:8], codes[8:], texts[8:], codebook_size=8, train_features=features[:8],
                        dev_features=features[8:], kmeans_size=5, steps=5)
    assert sorted(out["levels"]) == [1, 2, 3] and out["kmeans_size"] == 5
    assert all(np.isfinite(r.cer) for r in [*out["levels"].values(), out["kmeans"]])
    train_units, dev_units = kmeans_units(features[:8], features[8:], 5)
    assert [u.shape for u in dev_units] == [(1, c.shape[1]) for c in codes[8:]] and max(u.max() for u in train_units) < 5


# ----------------------------------------------------------------------------- stage 2
def test_evaluate_stage2_parses_everything_and_scores_units():
    tokenizer = byte_level_bpe_tokenizer()
    model = tiny_llama(tokenizer, hidden_size=32)
    from gemma_rvq.llm import add_semantic_tokens

    add_semantic_tokens(tokenizer, model, FORMAT, pad_to_multiple_of=8)
    texts = ["Hello there", "Good morning", "Habari"]
    references = [FORMAT.render(np.random.default_rng(i).integers(0, 8, size=(2, 4))) for i in range(3)]
    out = evaluate_stage2(model, tokenizer, texts, references, token_format=FORMAT, max_new_tokens=12)
    assert out["parse_rate"] == 1.0 and out["errors"] == [None] * 3
    expected = unit_error_rate([FORMAT.parse(g).codes for g in out["generated"]],
                               [FORMAT.parse(r).codes for r in references])
    assert out["unit_error_rate"] == pytest.approx(expected["unit_error_rate"])
    assert len(out["unit_error_rate_per_level"]) == 2


# ----------------------------------------------------------------------------- stage 3 through the pipeline
def _sft_script():
    return load_script("examples/sft.py", "sft_script_downstream")


@pytest.fixture(scope="module")
def stage3(tmp_path_factory):
    """A stage-1 RVQ folder, spoken clips tokenized with it, and asr + speech_instruct models trained on them."""
    root = tmp_path_factory.mktemp("stage3")
    rvq = tiny_rvq_model(num_quantizers=2, codebook_size=8)
    rvq.save_pretrained(root / "rvq")
    rng = np.random.default_rng(0)
    clips = []
    for i in range(6):
        path = root / f"clip{i}.wav"
        soundfile.write(path, (0.1 * rng.standard_normal(8000 + 800 * i)).astype("float32"), 16000)
        clips.append(str(path))
    from gemma_rvq.transforms import SpeechTokenizer

    speech = SpeechTokenizer(rvq, format=FORMAT)
    texts = [f"hello number {i}" for i in range(6)]
    data = Dataset.from_dict({"audio": clips, "text": texts, "response": [f"answer {i}" for i in range(6)]})
    data = data.map(speech, batched=True, input_columns=None)
    data = attach_format(data, FORMAT, speech_tokenizer=str(root / "rvq"))
    data.save_to_disk(root / "data")
    tokenizer = byte_level_bpe_tokenizer()
    tiny_llama(tokenizer, hidden_size=32).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    sft = _sft_script()
    for recipe, config in (("asr", "tiny_asr.yaml"), ("speech_instruct", "tiny_speech_instruct.yaml")):
        args = sft.make_parser().parse_args_and_config([
            "--config", str(ROOT / "examples" / "recipes" / config), "--model_name_or_path", str(root / "base"),
            "--dataset_name", str(root / "data"), "--output_dir", str(root / recipe)])
        sft.main(*args)
    return root, clips, texts


def test_pipeline_answers_every_kind_of_audio_input(stage3):
    from transformers import pipeline

    import gemma_rvq  # noqa: F401  (registers the task)

    root, clips, _ = stage3
    # found from the stage-3 folder: named there by no path (Hub-ready), found through its local-paths file
    assert json.loads((root / "speech_instruct" / "semantic_format.json").read_text())["speech_tokenizer"] is None
    assert load_format_record(root / "speech_instruct").speech_tokenizer == str(root / "rvq")
    pipe = pipeline("speech-instruct", model=str(root / "speech_instruct"), dtype="float32")
    wave, rate = soundfile.read(clips[0], dtype="float32")
    inputs = [clips[0], {"array": wave, "sampling_rate": rate}, {"path": clips[0], "bytes": None}]
    answers = pipe(inputs, max_new_tokens=6)
    assert len(answers) == 3 and all(isinstance(a["generated_text"], str) for a in answers)
    assert answers[0] == answers[1] == answers[2]  # the same audio, however it is given
    assert pipe(wave, sampling_rate=rate, max_new_tokens=6) == answers[0]
    batched = pipe(clips, batch_size=4, max_new_tokens=6)
    assert [a["generated_text"] for a in batched] == [a["generated_text"] for a in pipe(clips, max_new_tokens=6)]
    tokens = pipe.semantic_tokens(clips[0])
    assert FORMAT.parse(tokens).codes.shape[0] == 2
    assert pipe.prompt(tokens)[0] == {"role": "system", "content": "You answer spoken questions."}
    with pytest.raises(ValueError, match="needs its sampling rate"):
        pipe(wave)


def test_asr_models_transcribe_and_are_scored_with_wer(stage3):
    root, clips, texts = stage3
    result = evaluate_speech_llm(root / "asr", clips, texts, max_new_tokens=8, batch_size=3)
    assert result["recipe"] == "asr" and result["num_examples"] == 6
    assert set(result) >= {"wer", "cer", "predictions"} and result["wer"] >= 0
    answers = evaluate_speech_llm(root / "speech_instruct", clips[:2], ["answer 0", "answer 1"], max_new_tokens=6)
    assert answers["recipe"] == "speech_instruct" and 0 <= answers["chrf"] <= 100


def test_answer_and_evaluate_llm_commands(stage3, capsys, tmp_path):
    from gemma_rvq import cli

    root, clips, _ = stage3
    assert cli.main(["answer", clips[0], clips[1], "--model", str(root / "speech_instruct"),
                     "--max-new-tokens", "4", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["file"] for line in lines] == clips[:2] and all("answer" in line for line in lines)
    assert cli.main(["evaluate-llm", "--model", str(root / "asr"), "--dataset", str(root / "data"),
                     "--max-new-tokens", "4", "--output", str(tmp_path / "scores.json")]) == 0
    scores = json.loads(tmp_path / "scores.json" and (tmp_path / "scores.json").read_text())
    assert scores["recipe"] == "asr" and len(scores["predictions"]) == 6 and "wer" in scores


def test_pipeline_refuses_a_speech_tokenizer_of_another_shape(stage3):
    from gemma_rvq.pipelines import SpeechInstructPipeline, load_speech_llm

    root, _, _ = stage3
    model, tokenizer = load_speech_llm(root / "speech_instruct")
    with pytest.raises(ValueError, match="makes 3 levels x 16 codes"):
        SpeechInstructPipeline(model, tokenizer, speech_tokenizer=tiny_rvq_model(num_quantizers=3, codebook_size=16))
