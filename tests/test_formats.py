"""The token format travels with the data and the models, and one function decides which one applies."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset, DatasetDict, concatenate_datasets, load_from_disk

from gemma_rvq.formats import (
    FORMAT_FILE,
    attach_format,
    dataset_format,
    dataset_format_record,
    format_for_rvq_model,
    load_format,
    load_format_record,
    model_format,
    resolve_format,
    save_format,
    save_rvq_format,
)
from gemma_rvq.recipes import build_asr_dataset, build_speech_instruct_dataset, build_speechless_dataset
from gemma_rvq.recipes.sft import load_raw_dataset
from gemma_rvq.testing import tiny_rvq_model, toy_semantic_pairs
from gemma_rvq.tokens import get_format

FORMAT = get_format("gemma_rvq", codebook_size=8, num_levels=2)
ICHIGO = get_format("ichigo", codebook_size=8)


def test_folder_round_trip(tmp_path):
    path = save_format(tmp_path / "model", FORMAT, speech_tokenizer="org/rvq")
    assert path.name == FORMAT_FILE
    record = load_format_record(tmp_path / "model")
    assert record.format == FORMAT and record.speech_tokenizer == "org/rvq"
    assert load_format(path) == FORMAT  # the file itself
    (tmp_path / "bare.json").write_text(json.dumps(ICHIGO.to_dict()))  # a plain to_dict() is read too
    assert load_format(tmp_path / "bare.json") == ICHIGO
    assert load_format(tmp_path / "nothing") is None
    # an examples/sft.py folder from before semantic_format.json: its recipe file has the format
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "gemma_rvq_recipe.json").write_text(json.dumps({"token_format": ICHIGO.to_dict()}))
    assert load_format(tmp_path / "old") == ICHIGO
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / FORMAT_FILE).write_text('{"token_format": {"name": "x", "bogus": 1}}')
    with pytest.raises(ValueError, match=r"broken.*not a token format"):
        load_format(tmp_path / "broken")


def test_dataset_round_trip_through_map_filter_and_disk(tmp_path):
    pairs = toy_semantic_pairs(FORMAT, num_rows=6)  # carries its format
    assert dataset_format(pairs) == FORMAT
    changed = (pairs.map(lambda row: {"n": len(row["text"])}).filter(lambda row: row["n"] > 0)
               .select_columns(["semantic_tokens", "n"]).add_column("k", list(range(len(pairs)))))
    assert dataset_format(changed) == FORMAT
    DatasetDict(train=changed, dev=changed).save_to_disk(tmp_path / "data")
    loaded = load_from_disk(tmp_path / "data")
    assert dataset_format(loaded) == FORMAT and dataset_format(loaded["dev"]) == FORMAT
    # attaching again replaces the record (no duplicate lines), other description text is kept
    pairs.info.description = "my data"
    attach_format(attach_format(pairs, ICHIGO), FORMAT, speech_tokenizer="org/rvq")
    assert pairs.info.description.startswith("my data\n") and pairs.info.description.count("semantic") == 1
    assert dataset_format_record(pairs).speech_tokenizer == "org/rvq"
    assert dataset_format(Dataset.from_dict({"a": [1]})) is None
    mixed = concatenate_datasets([toy_semantic_pairs(FORMAT, num_rows=2), toy_semantic_pairs(ICHIGO, num_rows=2)])
    with pytest.raises(ValueError, match="several token formats"):
        dataset_format(mixed)


def test_resolution_reads_checks_and_refuses_mismatches(tmp_path):
    data = toy_semantic_pairs(FORMAT, num_rows=2)
    save_format(tmp_path / "stage2", FORMAT)
    save_format(tmp_path / "other", ICHIGO)
    assert resolve_format(dataset=data) == FORMAT
    assert resolve_format(model=tmp_path / "stage2") == FORMAT
    assert resolve_format(dataset=data, model=tmp_path / "stage2") == FORMAT
    assert resolve_format("gemma_rvq", dataset=data) == FORMAT  # the preset, as the data carries it
    assert resolve_format(FORMAT.to_dict(), dataset=data) == FORMAT
    assert resolve_format(str(tmp_path / "stage2" / FORMAT_FILE), dataset=data) == FORMAT
    assert resolve_format("gemma_rvq", codebook_size=8, num_levels=2, dataset=data) == FORMAT  # restated, agrees
    assert resolve_format("ichigo", codebook_size=8) == ICHIGO  # nothing carried: the preset
    with pytest.raises(ValueError, match="the dataset was made with token format 'gemma_rvq' and the model"):
        resolve_format(dataset=data, model=tmp_path / "other")
    with pytest.raises(ValueError, match="token_format='ichigo', but the dataset carries format 'gemma_rvq'"):
        resolve_format("ichigo", dataset=data)
    with pytest.raises(ValueError, match="num_levels: 3 vs 2"):
        resolve_format("gemma_rvq", num_levels=3, dataset=data)
    with pytest.raises(ValueError, match="no token format given and none recorded"):
        resolve_format(dataset=Dataset.from_dict({"a": [1]}))
    assert resolve_format(dataset=Dataset.from_dict({"a": [1]}), required=False) is None


def test_recipe_builders_read_and_carry_the_format():
    pairs = toy_semantic_pairs(FORMAT, num_rows=4).map(lambda row: {"response": "ok"})
    for built in (build_speechless_dataset(pairs), build_asr_dataset(pairs), build_speech_instruct_dataset(pairs)):
        assert dataset_format(built) == FORMAT
    with pytest.raises(ValueError, match="token_format='ichigo', but the dataset carries"):
        build_speechless_dataset(pairs, token_format="ichigo")
    # given explicitly and agreeing: every row is parsed too
    broken = pairs.map(lambda row, i: {"semantic_tokens": row["semantic_tokens"][:-3] if i == 2 else
                                       row["semantic_tokens"]}, with_indices=True)
    with pytest.raises(ValueError, match="row 2: column 'semantic_tokens' does not parse"):
        build_speechless_dataset(broken, token_format="gemma_rvq")


def test_a_format_file_beside_a_data_file_is_attached(tmp_path):
    pairs = toy_semantic_pairs(FORMAT, num_rows=3)
    pairs.to_json(tmp_path / "pairs.jsonl")
    assert dataset_format(load_raw_dataset(str(tmp_path / "pairs.jsonl"))) is None
    save_format(tmp_path, FORMAT)
    assert dataset_format(load_raw_dataset(str(tmp_path / "pairs.jsonl"))) == FORMAT


def test_a_stage1_folder_carries_its_format_and_the_transform_reads_it(tmp_path):
    from transformers import AutoModel

    from gemma_rvq.transforms import SpeechTokenizer

    model = tiny_rvq_model(num_quantizers=3, codebook_size=16)
    model.save_pretrained(tmp_path / "rvq")
    save_rvq_format(tmp_path / "rvq")
    fitted = get_format("gemma_rvq", codebook_size=16, num_levels=3)
    assert load_format(tmp_path / "rvq") == fitted
    loaded = AutoModel.from_pretrained(tmp_path / "rvq")
    assert model_format(loaded) == fitted
    # a folder that records another format: the transform's default follows it; explicit choices win
    save_rvq_format(tmp_path / "rvq", "ichigo")
    assert format_for_rvq_model(None, loaded) == get_format("ichigo", codebook_size=16)
    assert format_for_rvq_model("ichigo", loaded) == get_format("ichigo", codebook_size=16)
    assert format_for_rvq_model("gemma_rvq", loaded) == fitted
    assert format_for_rvq_model("gemma_rvq", loaded, num_quantizers=2).num_levels == 2
    assert SpeechTokenizer(loaded, format="ichigo").format == get_format("ichigo", codebook_size=16)
