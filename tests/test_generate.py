"""Stage 2 end to end on a toy mapping: train through examples/sft.py, then constrained generation.

A tiny random Llama learns ~20 text -> token string pairs (the loss must fall clearly), then
``generate_semantic_tokens`` / ``examples/generate_semantic.py`` turn texts into token strings that parse
back to codes, with failures reported in an error column.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset, load_from_disk

from conftest import load_script
from gemma_rvq.recipes import (
    SemanticVocabularyLogitsProcessor,
    generate_semantic_dataset,
    generate_semantic_tokens,
    semantic_token_ids,
)
from gemma_rvq.testing import byte_level_bpe_tokenizer, tiny_llama, toy_semantic_pairs
from gemma_rvq.tokens import get_format

ROOT = Path(__file__).resolve().parents[1]
FORMAT = get_format("gemma_rvq", codebook_size=8, num_levels=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _script(name: str):
    return load_script(f"examples/{name}.py")


@pytest.fixture(scope="module")
def stage2(tmp_path_factory):
    """A tiny Llama trained 30 full-FT steps on 20 toy pairs, through examples/sft.py."""
    root = tmp_path_factory.mktemp("stage2")
    tokenizer = byte_level_bpe_tokenizer()
    tiny_llama(tokenizer, hidden_size=32).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    pairs = toy_semantic_pairs(FORMAT, num_rows=20, seed=3)
    pairs.save_to_disk(root / "pairs")
    sft = _script("sft")
    args = sft.make_parser().parse_args_and_config([
        "--config", str(ROOT / "examples" / "recipes" / "tiny_speechless.yaml"),
        "--model_name_or_path", str(root / "base"), "--dataset_name", str(root / "pairs"),
        "--output_dir", str(root / "out"), "--max_steps", "30", "--learning_rate", "1e-2",
        "--per_device_train_batch_size", "20",
    ])
    trainer = sft.main(*args)
    return trainer, pairs, root


def test_stage2_loss_falls_on_a_toy_mapping(stage2):
    trainer, _, _ = stage2
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 30
    first, last = sum(losses[:2]) / 2, sum(losses[-3:]) / 3
    assert last < 0.5 * first, (first, last)


def test_constrained_generation_parses_back_to_codes(stage2):
    trainer, pairs, _ = stage2
    out = generate_semantic_tokens(trainer.model, trainer.processing_class, pairs["text"], FORMAT,
                                   batch_size=8, max_new_tokens=24, show_progress=False)
    tokens, errors = out["semantic_tokens"], out["generation_error"]
    assert len(tokens) == len(pairs) and errors == [None] * len(pairs)  # the grammar: every string parses
    for result in (FORMAT.parse(t) for t in tokens):
        assert result.codes.shape[0] == 2 and result.codes.shape[1] >= 1
        assert int(result.codes.max()) < 8


def test_the_saved_model_carries_its_format(stage2):
    """The docs example: no format argument on a folder saved by examples/sft.py (semantic_format.json)."""
    from gemma_rvq.formats import load_format
    from gemma_rvq.recipes import load_sft_model

    _, pairs, root = stage2
    assert load_format(root / "out") == FORMAT
    model, tokenizer = load_sft_model(str(root / "out"))
    texts = pairs["text"][:4]
    plain = generate_semantic_tokens(model, tokenizer, texts, max_new_tokens=24, show_progress=False)
    assert plain["generation_error"] == [None] * 4
    # a preset name means "that preset, as the model carries it" (here 2 levels x 8 codes, not 8 x 2048)
    named = generate_semantic_tokens(model, tokenizer, texts, "gemma_rvq", max_new_tokens=24, show_progress=False)
    assert named == plain
    with pytest.raises(ValueError, match="token_format='ichigo', but the model"):
        generate_semantic_tokens(model, tokenizer, texts, "ichigo", show_progress=False)
    with pytest.raises(ValueError, match="codebook_size: 16 vs 8"):
        generate_semantic_tokens(model, tokenizer, texts, get_format(FORMAT, codebook_size=16), show_progress=False)


def test_rows_that_do_not_finish_are_reported_not_kept(stage2):
    trainer, pairs, _ = stage2
    # without the grammar, a row that does not close its string in time is reported, not kept
    out = generate_semantic_tokens(trainer.model, trainer.processing_class, pairs["text"][:3], FORMAT,
                                   max_new_tokens=2, grammar=False, show_progress=False)
    assert out["semantic_tokens"] == [None] * 3
    assert all("max_new_tokens=2" in error for error in out["generation_error"])
    # under the grammar, a budget that cannot hold one frame is refused up front
    with pytest.raises(ValueError, match="max_new_tokens=2 cannot hold one frame"):
        generate_semantic_tokens(trainer.model, trainer.processing_class, pairs["text"][:3], FORMAT,
                                 max_new_tokens=2, show_progress=False)


@pytest.mark.parametrize("preset", ["gemma_rvq", "ichigo", "spire"])  # spire: no end marker, stops at eos
def test_untrained_model_generates_only_semantic_tokens_or_reports(preset):
    """grammar=False (vocabulary only): what does not parse is reported (the grammar: tests/test_grammar.py)."""
    fmt = get_format(preset, codebook_size=8, **({"num_levels": 2} if preset == "gemma_rvq" else {}))
    tokenizer = byte_level_bpe_tokenizer()
    model = tiny_llama(tokenizer, hidden_size=32)
    from gemma_rvq.llm import add_semantic_tokens

    add_semantic_tokens(tokenizer, model, fmt, pad_to_multiple_of=None)
    texts = ["Habari za asubuhi?", "Hello, how are you today?", "Mji mkuu wa Kenya ni Nairobi."] * 4
    torch.manual_seed(0)
    out = generate_semantic_tokens(model, tokenizer, texts, fmt, max_new_tokens=10, show_progress=False,
                                   do_sample=True, top_k=0, grammar=False)
    vocabulary = set(fmt.vocabulary())
    for tokens, error in zip(out["semantic_tokens"], out["generation_error"]):
        if tokens is None:
            assert error.startswith(("does not parse", "stopped without", "no stop token", "no frames")), error
        else:
            assert error is None and fmt.parse(tokens).codes.shape[1] >= 1
            assert set(tokenizer.tokenize(tokens)) <= vocabulary  # nothing but the format's tokens


def test_logits_processor_masks_everything_else():
    processor = SemanticVocabularyLogitsProcessor([3, 7, 7, 1])
    scores = torch.randn(2, 10)
    masked = processor(torch.zeros(2, 1, dtype=torch.long), scores)
    keep = torch.zeros(10, dtype=torch.bool)
    keep[[1, 3, 7]] = True
    assert torch.equal(masked[:, keep], scores[:, keep])
    assert torch.isinf(masked[:, ~keep]).all()
    with pytest.raises(ValueError, match="outside the logits"):
        SemanticVocabularyLogitsProcessor([12])(torch.zeros(1, 1, dtype=torch.long), scores[:1])


def test_tokenizer_without_the_format_is_refused():
    with pytest.raises(ValueError, match="lacks 18 of the 18 tokens"):
        semantic_token_ids(byte_level_bpe_tokenizer(), FORMAT)


def test_generate_semantic_dataset_checks_columns(stage2):
    trainer, pairs, _ = stage2
    with pytest.raises(ValueError, match="text_column='instruction'"):
        generate_semantic_dataset(trainer.model, trainer.processing_class, pairs, FORMAT, text_column="instruction")
    with pytest.raises(ValueError, match="already has a 'semantic_tokens' column"):
        generate_semantic_dataset(trainer.model, trainer.processing_class, pairs, FORMAT)


def test_generate_semantic_script_writes_a_dataset(stage2, tmp_path):
    _, pairs, root = stage2
    instructions = Dataset.from_dict({"instruction": pairs["text"][:6], "response": ["ok"] * 6})
    instructions.to_json(tmp_path / "instructions.jsonl")
    script = _script("generate_semantic")
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(script.GenerateSemanticArguments).parse_args_into_dataclasses([
        "--model_name_or_path", str(root / "out"), "--dataset_name", str(tmp_path / "instructions.jsonl"),
        "--text_column", "instruction", "--output_dir", str(tmp_path / "generated"), "--batch_size", "4",
        "--max_new_tokens", "24", "--dtype", "float32",
    ])
    script.main(args)
    generated = load_from_disk(str(tmp_path / "generated"))
    assert generated.column_names == ["instruction", "response", "semantic_tokens", "generation_error"]
    assert len(generated) == 6
    for tokens, error in zip(generated["semantic_tokens"], generated["generation_error"]):
        assert (tokens is None) != (error is None)
        if tokens is not None:
            FORMAT.parse(tokens)
    assert generated["generation_error"] == [None] * 6
    from gemma_rvq.formats import dataset_format, load_format

    assert dataset_format(generated) == FORMAT and load_format(tmp_path / "generated") == FORMAT


def test_gemma_rvq_generate_is_the_script_parser(stage2, tmp_path, capsys):
    """`gemma-rvq generate` (a pip install's stage 2) runs the parser and main of examples/generate_semantic.py,
    with a --config YAML whose keys the command line overrides."""
    from gemma_rvq import cli
    from gemma_rvq.commands import generate

    script = _script("generate_semantic")
    assert script.make_parser is generate.make_parser and script.main is generate.main
    _, pairs, root = stage2
    Dataset.from_dict({"text": pairs["text"][:3]}).to_json(tmp_path / "texts.jsonl")
    (tmp_path / "generate.yaml").write_text(f"model_name_or_path: {root / 'out'}\nbatch_size: 4\nmax_new_tokens: 2\n")
    status = cli.main(["generate", "--config", str(tmp_path / "generate.yaml"), "--dataset_name",
                       str(tmp_path / "texts.jsonl"), "--output_dir", str(tmp_path / "generated"),
                       "--max_new_tokens", "24", "--dtype", "float32"])
    assert status == 0 and "3 of 3 rows parsed" in capsys.readouterr().out
    generated = load_from_disk(str(tmp_path / "generated"))
    assert len(generated) == 3 and all(FORMAT.parse(tokens) for tokens in generated["semantic_tokens"])
    with pytest.raises(SystemExit):
        cli.main(["generate", "--dataset_name", "x", "--output_dir", "y"])  # no model: the parser names it
    assert "--model_name_or_path" in capsys.readouterr().err
