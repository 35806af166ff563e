"""gemma_rvq.recipes data builders and prompt templates (no model: datasets in, datasets out)."""

from __future__ import annotations

import pytest
from datasets import Dataset, DatasetDict, IterableDataset, load_from_disk

from gemma_rvq.recipes import (
    TEMPLATES,
    PromptTemplate,
    SemanticSFTArguments,
    build_asr_dataset,
    build_recipe_dataset,
    build_speech_instruct_dataset,
    build_speechless_dataset,
    get_template,
    resolve_token_format,
)
from gemma_rvq.testing import toy_semantic_pairs
from gemma_rvq.tokens import get_format

FORMAT = get_format("ichigo", codebook_size=16)


@pytest.fixture
def pairs() -> Dataset:
    data = toy_semantic_pairs(FORMAT, num_rows=6, seed=0)
    return data.add_column("language", ["Swahili", "English"] * 3)


def test_speechless_prompt_completion(pairs):
    out = build_speechless_dataset(pairs)
    assert out.column_names == ["prompt", "completion"]
    assert out["prompt"] == [text + "\n" for text in pairs["text"]]
    assert out["completion"] == pairs["semantic_tokens"]
    assert out["completion"][0].startswith("<|sound_start|>") and out["completion"][0].endswith("<|sound_end|>")


def test_speechless_language_tag_fixed_or_per_row(pairs):
    fixed = build_speechless_dataset(pairs, language="Swahili")
    assert fixed["prompt"][1] == f"[Swahili] {pairs['text'][1]}\n"
    per_row = build_speechless_dataset(pairs, language_column="language", keep_columns=["language"])
    assert per_row.column_names == ["language", "prompt", "completion"]
    assert per_row["prompt"][1] == f"[English] {pairs['text'][1]}\n"


def test_missing_columns_are_named(pairs):
    with pytest.raises(ValueError, match=r"no column\(s\) text_column='transcript'.*available columns"):
        build_speechless_dataset(pairs, text_column="transcript")
    with pytest.raises(ValueError, match="response_column='response'"):
        build_speech_instruct_dataset(pairs)
    with pytest.raises(ValueError, match="translation_column='translation'"):
        build_asr_dataset(pairs, translation_column="translation", target_language="English")


def test_bad_rows_name_the_row(pairs):
    tokens = list(pairs["semantic_tokens"])
    tokens[4] = None
    broken = pairs.remove_columns("semantic_tokens").add_column("semantic_tokens", tokens)
    with pytest.raises(ValueError, match=r"row 4: column 'semantic_tokens'.*drop_missing=True"):
        build_speechless_dataset(broken)
    kept = build_speechless_dataset(broken, drop_missing=True)
    assert len(kept) == 5 and kept["completion"] == [t for t in tokens if t is not None]

    texts = list(pairs["text"])
    texts[2] = "  "
    blank = pairs.remove_columns("text").add_column("text", texts)
    with pytest.raises(ValueError, match="row 2: column 'text' must be a non-empty string"):
        build_speechless_dataset(blank)


def test_token_strings_are_validated_with_the_format(pairs):
    tokens = list(pairs["semantic_tokens"])
    tokens[3] = tokens[3].replace("<|sound_end|>", "")
    broken = pairs.remove_columns("semantic_tokens").add_column("semantic_tokens", tokens)
    build_speechless_dataset(broken)  # not checked without a format
    with pytest.raises(ValueError, match="row 3: column 'semantic_tokens' does not parse with format 'ichigo'"):
        build_speechless_dataset(broken, token_format=FORMAT)


def test_dataset_dicts_keep_their_splits_and_round_trip(pairs, tmp_path):
    splits = DatasetDict({"train": pairs.select(range(4)), "test": pairs.select(range(4, 6))})
    out = build_speechless_dataset(splits)
    assert isinstance(out, DatasetDict) and {k: len(v) for k, v in out.items()} == {"train": 4, "test": 2}
    out.save_to_disk(tmp_path / "stage2")  # what push_to_hub uploads: plain prompt/completion columns
    again = load_from_disk(str(tmp_path / "stage2"))
    assert again["test"]["completion"] == pairs["semantic_tokens"][4:]


def test_iterable_datasets_are_converted_lazily(pairs):
    stream = IterableDataset.from_generator(lambda: iter(pairs.to_list()))
    out = build_speechless_dataset(stream)
    assert isinstance(out, IterableDataset)
    assert [row["completion"] for row in out] == pairs["semantic_tokens"]


def test_speech_instruct_is_conversational_prompt_completion(pairs):
    data = pairs.add_column("response", [f"answer {i}" for i in range(6)])
    out = build_speech_instruct_dataset(data, system_prompt="Be brief.", user_template="Listen: {speech}")
    row = out[0]
    assert row["prompt"] == [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "Listen: " + pairs["semantic_tokens"][0]}]
    assert row["completion"] == [{"role": "assistant", "content": "answer 0"}]
    messages = build_speech_instruct_dataset(data, output="messages")
    assert messages.column_names == ["messages"]
    assert [m["role"] for m in messages[0]["messages"]] == ["user", "assistant"]
    with pytest.raises(ValueError, match="must contain"):
        build_speech_instruct_dataset(data, user_template="no placeholder")


def test_asr_spire_prompt_and_translation_rows(pairs):
    data = pairs.add_column("translation", [f"translation {i}" for i in range(6)])
    out = build_asr_dataset(data, translation_column="translation", target_language="French")
    assert len(out) == 12 and out["task"][:2] == ["asr", "translation"]
    assert out["prompt"][0] == f"Speech: {pairs['semantic_tokens'][0]}\nEnglish:"
    assert out["completion"][0] == " " + pairs["text"][0]
    assert out["prompt"][1] == f"Speech: {pairs['semantic_tokens'][0]}\nFrench:"
    assert out["completion"][1] == " translation 0"
    with pytest.raises(ValueError, match="needs target_language"):
        build_asr_dataset(data, translation_column="translation")


def test_templates():
    assert set(TEMPLATES) >= {"speechless", "spire_asr", "asr"}
    assert TEMPLATES["spire_asr"].render(text="hi", speech="<x>", language="English") == ("Speech: <x>\nEnglish:",
                                                                                          " hi")
    with pytest.raises(ValueError, match="needs a language"):
        TEMPLATES["spire_asr"].render(text="hi", speech="<x>")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['lang'\]"):
        PromptTemplate(name="bad", prompt="{lang}: {text}", completion="{speech}")
    custom = get_template("Text: {text}\nTokens:", completion=" {speech}")
    assert custom.render(text="a", speech="b") == ("Text: a\nTokens:", " b")
    with pytest.raises(ValueError, match="unknown prompt template"):
        get_template("nope")


def test_dispatch_and_arguments(pairs):
    assert build_recipe_dataset("speechless", pairs)["completion"] == pairs["semantic_tokens"]
    with pytest.raises(ValueError, match="unknown recipe"):
        build_recipe_dataset("tts", pairs)
    with pytest.raises(ValueError, match="recipe must be one of"):
        SemanticSFTArguments(recipe="tts")


def test_token_format_from_json_file(tmp_path):
    import json

    path = tmp_path / "format.json"
    path.write_text(json.dumps(FORMAT.to_dict()))
    assert resolve_token_format(str(path)) == FORMAT
    assert resolve_token_format("gemma_rvq", codebook_size=8, num_levels=2).vocabulary()[:2] == [
        "<|rvq_start|>", "<|rvq_end|>"]
    with pytest.raises(ValueError, match="does not exist"):
        resolve_token_format(str(tmp_path / "missing.json"))
