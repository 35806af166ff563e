"""add_semantic_tokens: one id per semantic token on real tokenizers; mean and codebook initialisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemma_rvq.llm import add_semantic_tokens, audio_code_embeddings
from gemma_rvq.testing import (
    byte_level_bpe_tokenizer,
    sentencepiece_tokenizer,
    tiny_gemma4_multimodal,
    tiny_llama,
    tiny_rvq_model,
)
from gemma_rvq.tokens import get_format


def llama2_tokenizer():
    """A Llama 2 style ``LlamaTokenizer``: SentencePiece BPE with the default dummy prefix (Metaspace)."""
    import os
    import tempfile

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    from gemma_rvq.testing import TINY_CORPUS

    with tempfile.TemporaryDirectory() as folder:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(list(TINY_CORPUS) * 4),
            model_prefix=os.path.join(folder, "tokenizer"),
            vocab_size=400,
            model_type="bpe",
            byte_fallback=True,
            character_coverage=1.0,
            hard_vocab_limit=False,
            minloglevel=2,
            num_threads=1,
        )
        return LlamaTokenizer.from_pretrained(folder)


TOKENIZERS = {
    "bpe": byte_level_bpe_tokenizer,
    "gemma-sp": sentencepiece_tokenizer,
    "llama2-sp": llama2_tokenizer,
}


def _strings(fmt, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(text, its semantic part): rendered codes with a run, in text with and without spaces around."""
    codes = rng.integers(0, fmt.codebook_size, size=(fmt.num_levels, 30))
    codes[:, 4:9] = codes[:, 4:5]  # a run (durations for ichigo, collapse for spire)
    rendered = fmt.render(codes)
    return [
        (rendered, rendered),
        (f"Hello{rendered}world", rendered),
        (f"Habari {rendered} asante.", rendered),
        (rendered + rendered, rendered + rendered),
    ]


@pytest.mark.parametrize("tokenizer_name", sorted(TOKENIZERS))
@pytest.mark.parametrize(
    "fmt",
    [
        get_format("gemma_rvq"),
        get_format("ichigo"),
        get_format("spire"),
        get_format("gemma_rvq", num_levels=3, dedup=True, separator=" "),
    ],
    ids=["gemma_rvq", "ichigo", "spire", "gemma_rvq-dedup-spaced"],
)
def test_one_id_per_semantic_token(tokenizer_name, fmt):
    tokenizer = TOKENIZERS[tokenizer_name]()
    old_len = len(tokenizer)
    before = tokenizer("Hello world, habari.", add_special_tokens=False)["input_ids"]
    vocab = fmt.vocabulary()
    ids = add_semantic_tokens(tokenizer, None, fmt)
    assert len(ids) == len(vocab) and ids == list(range(old_len, old_len + len(vocab)))
    assert len(tokenizer) == old_len + len(vocab)
    # ordinary text tokenizes as before
    assert tokenizer("Hello world, habari.", add_special_tokens=False)["input_ids"] == before
    id_of = dict(zip(vocab, ids))
    for text, semantic_part in _strings(fmt, np.random.default_rng(0)):
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        semantic = [i for i in encoded if i >= old_len]
        # one id per token: the semantic ids spell the semantic part exactly, token by token
        tokens = tokenizer.convert_ids_to_tokens(semantic)
        assert [id_of[t] for t in tokens] == semantic
        assert "".join(tokens) == (
            semantic_part.replace(fmt.separator, "") if fmt.separator else semantic_part
        )
        # decoding gives back the same string, and the tokens survive skip_special_tokens
        assert tokenizer.decode(encoded) == text
        assert tokenizer.decode(encoded, skip_special_tokens=True) == text
    # a second call adds nothing and returns the same ids
    assert add_semantic_tokens(tokenizer, None, fmt) == ids
    assert len(tokenizer) == old_len + len(vocab)


def test_adjacent_tokens_count_exactly():
    """A rendered string is exactly its number of tokens, for every preset, on both tokenizer kinds."""
    for make in TOKENIZERS.values():
        tokenizer = make()
        for fmt in (get_format("gemma_rvq", num_levels=2), get_format("ichigo"), get_format("spire")):
            add_semantic_tokens(tokenizer, None, fmt)
            codes = np.arange(40).reshape(2, 20) % 7
            text = fmt.render(codes)
            expected = {"gemma_rvq": 2 + 2 * 20, "ichigo": 2 + 20, "spire": 20}[fmt.name]
            assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == expected
            assert (
                fmt.parse(
                    tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"])
                ).codes.shape[1]
                == 20
            )


def test_mean_init_untied_llama_is_seeded_and_leaves_old_rows():
    tokenizer = byte_level_bpe_tokenizer()
    model = tiny_llama(tokenizer, tie_word_embeddings=False)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    old_len = len(tokenizer)
    fmt = get_format("ichigo", codebook_size=100)
    ids = add_semantic_tokens(tokenizer, model, fmt, seed=3)
    rows = model.get_input_embeddings().weight.detach()
    out_rows = model.get_output_embeddings().weight.detach()
    assert rows.shape[0] % 64 == 0 and rows.shape[0] >= len(tokenizer) == old_len + len(ids)
    assert out_rows.shape[0] == rows.shape[0] and model.config.vocab_size == rows.shape[0]
    torch.testing.assert_close(rows[:old_len], old_in)
    torch.testing.assert_close(out_rows[:old_len], old_out)
    for new, old in ((rows, old_in), (out_rows, old_out)):
        added = new[ids]
        # mean + noise of 0.1 std: centred on the old mean, spread 0.1 x the old std, rows all distinct
        torch.testing.assert_close(
            added.mean(0),
            old.mean(0),
            atol=4 * 0.1 * float(old.std(0).max()) / len(ids) ** 0.5 + 1e-6,
            rtol=0,
        )
        ratio = (added.std(0) / old.std(0)).mean()
        assert 0.07 < float(ratio) < 0.13
        assert torch.cdist(added, added).add(torch.eye(len(ids)) * 1e9).min() > 0
        # padding rows (pad_to_multiple_of) hold the mean
        torch.testing.assert_close(
            new[len(tokenizer) :], old.mean(0).expand(new.shape[0] - len(tokenizer), -1)
        )
    assert not torch.allclose(rows[ids], out_rows[ids])  # untied: output rows have their own noise
    # the same seed gives the same rows; another seed other rows
    tokenizer2 = byte_level_bpe_tokenizer()
    model2 = tiny_llama(tokenizer2, tie_word_embeddings=False)
    assert add_semantic_tokens(tokenizer2, model2, fmt, seed=3) == ids
    torch.testing.assert_close(model2.get_input_embeddings().weight, model.get_input_embeddings().weight)
    tokenizer3 = byte_level_bpe_tokenizer()
    model3 = tiny_llama(tokenizer3, tie_word_embeddings=False)
    add_semantic_tokens(tokenizer3, model3, fmt, seed=4)
    assert not torch.allclose(model3.get_input_embeddings().weight[ids], rows[ids])
    # the extended model runs on semantic text
    batch = tokenizer([fmt.render([1, 1, 2, 99])], return_tensors="pt")
    loss = model(**batch, labels=batch["input_ids"]).loss
    assert torch.isfinite(loss)


def test_tied_gemma_style_model_keeps_tying():
    tokenizer = sentencepiece_tokenizer()
    model = tiny_gemma4_multimodal(tokenizer)
    ids = add_semantic_tokens(tokenizer, model, get_format("spire", codebook_size=200))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ple = model.get_per_layer_input_embeddings()
    assert ple.weight.shape[0] == model.get_input_embeddings().weight.shape[0]
    old_ple = ple.weight.detach()[: len(tokenizer) - len(ids)]
    torch.testing.assert_close(
        ple.weight.detach()[ids].mean(0), old_ple.mean(0), atol=0.05 * float(old_ple.std()), rtol=0
    )
    logits = model(**tokenizer([get_format("spire").render([5, 6, 7])], return_tensors="pt")).logits
    assert logits.shape[-1] == model.get_input_embeddings().weight.shape[0]


def _gemma4_with_rvq(num_quantizers: int = 2, codebook_size: int = 16):
    tokenizer = sentencepiece_tokenizer()
    rvq = tiny_rvq_model(num_quantizers=num_quantizers, codebook_size=codebook_size, seed=1)
    model = tiny_gemma4_multimodal(tokenizer, audio_config=rvq.config.encoder_config)
    return tokenizer, rvq, model


def test_codebook_init_lands_on_the_audio_embedding():
    tokenizer, rvq, model = _gemma4_with_rvq()
    old_len = len(tokenizer)
    old_rows = model.get_input_embeddings().weight.detach().clone()
    fmt = get_format("gemma_rvq", num_levels=2, codebook_size=16, dedup=True)
    ids = add_semantic_tokens(tokenizer, model, fmt, init="codebook", rvq_model=rvq)
    vocab = fmt.vocabulary()
    embed = model.get_input_embeddings()
    base = model.model
    codebooks = rvq.quantizer.codebooks
    with torch.no_grad():
        # level 0: the looked-up embedding is the audio soft token of the code vector
        looked = embed(torch.tensor([ids[vocab.index(f"<|q0_{k:04d}|>")] for k in range(16)]))
        expected = base.embed_audio(base.audio_tower.output_proj(rvq.project_out(codebooks[0])))
        torch.testing.assert_close(looked, expected, atol=1e-5, rtol=1e-5)
        # level 1: the same map of (mean level-0 code vector + this code's vector)
        context = (
            codebooks[0].mean(0)
            if rvq.quantizer.cluster_size[0].sum() == 0
            else (rvq.quantizer.cluster_size[0, :, None] * codebooks[0]).sum(0)
            / rvq.quantizer.cluster_size[0].sum()
        )
        looked1 = embed(torch.tensor([ids[vocab.index(f"<|q1_{k:04d}|>")] for k in range(16)]))
        expected1 = base.embed_audio(base.audio_tower.output_proj(rvq.project_out(context + codebooks[1])))
        torch.testing.assert_close(looked1, expected1, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(audio_code_embeddings(rvq, model, 2), torch.stack([expected, expected1]))
    # markers and durations: mean init (near the mean of the old rows, not audio embeddings)
    marker_rows = embed.weight[ids[: 2 + 48]].detach()
    torch.testing.assert_close(marker_rows.mean(0), old_rows[:old_len].mean(0), atol=0.05, rtol=0)
    # per-layer embeddings: code tokens get the pad token's row, as audio soft tokens do
    ple = model.get_per_layer_input_embeddings().weight
    pad = tokenizer.pad_token_id
    torch.testing.assert_close(ple[ids[50:]], ple[pad].expand(len(ids) - 50, -1))
    assert not torch.allclose(ple[ids[0]], ple[pad])


def test_codebook_tokens_reproduce_the_continuous_audio_path():
    """The LM's hidden states for semantic tokens equal those for the RVQ's reconstructed audio frames."""
    tokenizer, rvq, model = _gemma4_with_rvq(num_quantizers=1)
    fmt = get_format("ichigo", codebook_size=16, dedup=False, markers=False)
    ids = add_semantic_tokens(tokenizer, model, fmt, init="codebook", rvq_model=rvq)
    codes = torch.tensor([3, 7, 7, 1, 15, 0, 9])
    frames = rvq.decode(codes[None, None, :]).embeddings  # [1, T, D]: what the RVQ reconstructs
    text_ids = tokenizer(fmt.render(codes), add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert text_ids[0].tolist() == [ids[int(c)] for c in codes]
    with torch.no_grad():
        from_tokens = model.model(input_ids=text_ids).last_hidden_state
        soft = model.model.embed_audio(model.model.audio_tower.output_proj(frames))
        lm = model.model.language_model
        # Gemma4Model gives audio soft tokens the pad token's per-layer input
        ple = lm.get_per_layer_inputs(torch.full_like(text_ids, tokenizer.pad_token_id))
        from_audio = lm(inputs_embeds=soft, per_layer_inputs=ple).last_hidden_state
    torch.testing.assert_close(from_tokens, from_audio, atol=1e-4, rtol=1e-4)


def test_codebook_init_errors_leave_the_tokenizer_untouched():
    tokenizer, rvq, model = _gemma4_with_rvq()
    old_len = len(tokenizer)
    fmt = get_format("gemma_rvq", num_levels=2, codebook_size=16)
    with pytest.raises(ValueError, match="needs rvq_model"):
        add_semantic_tokens(tokenizer, model, fmt, init="codebook")
    with pytest.raises(ValueError, match="Gemma 4 multimodal"):
        add_semantic_tokens(tokenizer, tiny_llama(tokenizer), fmt, init="codebook", rvq_model=rvq)
    with pytest.raises(ValueError, match="codebook_size 2048"):
        add_semantic_tokens(
            tokenizer, model, get_format("gemma_rvq", num_levels=2), init="codebook", rvq_model=rvq
        )
    with pytest.raises(ValueError, match="renders 3 levels but the RVQ has 2"):
        add_semantic_tokens(
            tokenizer,
            model,
            get_format("gemma_rvq", num_levels=3, codebook_size=16),
            init="codebook",
            rvq_model=rvq,
        )
    with pytest.raises(ValueError, match="hubert"):
        add_semantic_tokens(
            tokenizer, model, fmt, init="codebook", rvq_model=tiny_rvq_model("hubert", codebook_size=16)
        )
    with pytest.raises(ValueError, match="init must be one of"):
        add_semantic_tokens(tokenizer, model, fmt, init="zeros")
    assert len(tokenizer) == old_len


def test_returned_ids_train_only_the_new_rows_with_peft():
    from peft import LoraConfig, get_peft_model

    tokenizer = byte_level_bpe_tokenizer()
    model = tiny_llama(tokenizer, tie_word_embeddings=True)
    fmt = get_format("ichigo", codebook_size=64)
    ids = add_semantic_tokens(tokenizer, model, fmt)
    before = model.get_input_embeddings().weight.detach().clone()
    peft_model = get_peft_model(
        model, LoraConfig(target_modules="all-linear", trainable_token_indices={"embed_tokens": ids})
    )
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    batch = tokenizer(["Hello " + fmt.render([1, 1, 2, 3, 63])], return_tensors="pt")
    for _ in range(2):
        peft_model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    merged = peft_model.merge_and_unload()
    after = merged.get_input_embeddings().weight.detach()
    old = len(tokenizer) - len(ids)
    torch.testing.assert_close(after[:old], before[:old], atol=0, rtol=0)
    used = [ids[fmt.vocabulary().index(t)] for t in ("<|sound_0001|>", "<|sound_0063|>", "<|duration_02|>")]
    assert (after[used] - before[used]).abs().amax(dim=1).min() > 1e-4
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
