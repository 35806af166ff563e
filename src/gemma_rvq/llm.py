"""Extend an LLM's tokenizer and embeddings with the semantic tokens of a :class:`SemanticTokenFormat`.

:func:`add_semantic_tokens` adds every token the format can emit as an *added token* (so that
SentencePiece and byte-level BPE tokenizers alike give exactly one id per semantic token, even for the
private-use characters of the ``spire`` format and for tokens written without spaces), resizes the
model's embeddings, and initialises the new rows:

- ``init="mean"``: the mean of the existing rows plus small seeded Gaussian noise scaled to their
  per-dimension standard deviation (input and, when untied, output embeddings; Gemma 4 per-layer
  embeddings too).
- ``init="codebook"`` (a Gemma 4 multimodal LLM and the RVQ that produced the codes): each code token
  starts where the continuous audio frame it stands for would land in the LLM, i.e. its looked-up
  embedding is ``embed_audio(audio_tower.output_proj(rvq.project_out(vector)))``. See
  ``docs/token-formats.md`` for the choice made for deeper RVQ levels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .tokens import SemanticTokenFormat, get_format

__all__ = ["add_semantic_tokens", "audio_code_embeddings"]

_INITS = ("mean", "codebook")


def add_semantic_tokens(
    tokenizer: Any,
    model: Any = None,
    format: str | SemanticTokenFormat | dict = "gemma_rvq",
    *,
    init: str = "mean",
    rvq_model: Any = None,
    pad_to_multiple_of: int | None = 64,
    seed: int = 0,
    noise_scale: float = 0.1,
) -> list[int]:
    """Add the format's tokens to ``tokenizer`` and (optionally) resize and initialise ``model``.

    Args:
        tokenizer: a transformers tokenizer (SentencePiece/Gemma, byte-level BPE/Llama 3/Qwen, ...).
            Tokens are added as ``AddedToken(special=False, normalized=False)``: matched whole before
            normalisation and pre-tokenisation, and kept by ``decode(skip_special_tokens=True)``.
        model: a ``PreTrainedModel`` whose input (and output) embeddings are resized to
            ``len(tokenizer)`` rounded up to ``pad_to_multiple_of``; ``None`` only extends the tokenizer.
        format: preset name, :class:`SemanticTokenFormat` or its dict; its :meth:`vocabulary` is added
            (it needs ``codebook_size`` and ``num_levels``).
        init: ``"mean"`` or ``"codebook"`` (Gemma 4 multimodal ``model`` + ``rvq_model`` required; code
            tokens get the audio embedding of their code vector, markers and durations the mean init).
        rvq_model: the ``GemmaRVQModel`` whose codes the format renders (``init="codebook"``).
        pad_to_multiple_of: embedding rows are rounded up to a multiple of this (``None``: exact).
        seed: seeds the Gaussian noise of the mean init.
        noise_scale: noise standard deviation as a fraction of the existing rows' per-dimension std.

    Returns:
        The ids of all the format's tokens in :meth:`SemanticTokenFormat.vocabulary` order (``ids[i]`` is
        the id of ``vocabulary()[i]``), e.g. for PEFT ``trainable_token_indices``. Tokens the tokenizer
        already had keep their id, and their embedding rows are left untouched.

    Raises:
        ValueError: unknown ``init``; ``init="codebook"`` without a Gemma 4 multimodal model, without
            ``rvq_model``, or with sizes that do not match; a tokenizer that cannot give one id per token.
    """
    fmt = get_format(format)
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")
    vocab = fmt.vocabulary()
    if init == "codebook":
        # validate everything before the tokenizer is touched
        if model is None:
            raise ValueError(
                "init='codebook' needs the model (a Gemma4ForConditionalGeneration with an audio tower)"
            )
        _audio_path(model)
        _check_rvq(fmt, rvq_model, model)
    if noise_scale < 0:
        raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")

    old_len = len(tokenizer)
    tokenizer.add_tokens([_added_token(token) for token in vocab])
    ids = tokenizer.convert_tokens_to_ids(vocab)
    _check_single_ids(tokenizer, vocab, ids)
    new_positions = [i for i, token_id in enumerate(ids) if token_id >= old_len]

    if model is not None and new_positions:
        _resize_and_init(
            model,
            tokenizer,
            fmt,
            ids,
            new_positions,
            old_len,
            init,
            rvq_model,
            pad_to_multiple_of,
            seed,
            noise_scale,
        )
    return list(ids)


def _added_token(content: str):
    from tokenizers import AddedToken

    return AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=False)


def _check_single_ids(tokenizer: Any, vocab: list[str], ids: list[int], sample_every: int = 64) -> None:
    """All tokens written back to back, and a sample of them alone, must encode to exactly their ids.

    (Encoding every token alone through the transformers wrapper costs ~1 s per 16k tokens; the
    back-to-back string covers every token in one call, the sample covers tokens at a string start.)
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    for token, token_id in zip(vocab, ids):
        if token_id is None or (token_id == unk and token != getattr(tokenizer, "unk_token", None)):
            raise ValueError(f"the tokenizer did not register the semantic token {token!r}")
    name = type(tokenizer).__name__
    joined = tokenizer("".join(vocab), add_special_tokens=False)["input_ids"]
    sample = (
        sorted({*range(0, len(vocab), sample_every), len(vocab) - 1})
        if joined == list(ids)
        else range(len(vocab))
    )
    encoded = tokenizer([vocab[i] for i in sample], add_special_tokens=False)["input_ids"]
    for i, got in zip(sample, encoded):
        if got != [ids[i]]:
            raise ValueError(
                f"{name} encodes the semantic token {vocab[i]!r} as {got}, not the single id {ids[i]}: "
                "this tokenizer cannot be extended safely"
            )
    if joined != list(ids):
        first = next((i for i, (a, b) in enumerate(zip(joined, ids)) if a != b), min(len(joined), len(ids)))
        raise ValueError(
            f"{name} does not split adjacent semantic tokens cleanly (first difference at token {first}: "
            f"{vocab[first] if first < len(vocab) else '<end>'!r})"
        )


# ----------------------------------------------------------------------------- embeddings
def _resize_and_init(
    model, tokenizer, fmt, ids, new_positions, old_len, init, rvq_model, pad_to_multiple_of, seed, noise_scale
) -> None:
    input_embeddings = model.get_input_embeddings()
    output_embeddings = model.get_output_embeddings()
    old_rows = input_embeddings.weight.shape[0]
    old_ple = _per_layer_embeddings(model)
    ple_rows = old_ple.weight.shape[0] if old_ple is not None else 0
    needed = len(tokenizer)
    if needed > old_rows or (ple_rows and ple_rows < needed):
        # never shrinks; Gemma 4 resizes its per-layer table along with the main one
        model.resize_token_embeddings(
            max(needed, old_rows), pad_to_multiple_of=pad_to_multiple_of, mean_resizing=False
        )
    input_embeddings = model.get_input_embeddings()
    output_embeddings = model.get_output_embeddings()
    rows = input_embeddings.weight.shape[0]
    reference = min(old_len, old_rows)  # rows of real tokens (not padding, not the new ones)
    new_ids = torch.tensor([ids[i] for i in new_positions], dtype=torch.long)
    padding_ids = torch.arange(max(old_rows, needed), rows, dtype=torch.long)  # pad_to_multiple_of rows
    generator = torch.Generator().manual_seed(seed)

    tied = output_embeddings is None or output_embeddings.weight is input_embeddings.weight
    tables = [input_embeddings] + ([] if tied else [output_embeddings])
    ple = _per_layer_embeddings(model)
    if ple is not None:
        tables.append(ple)
    with torch.no_grad():
        for table in tables:
            _mean_init(table.weight, reference, new_ids, padding_ids, generator, noise_scale)
        if not tied and getattr(output_embeddings, "bias", None) is not None:
            bias = output_embeddings.bias
            fill = bias[:reference].mean()
            bias[new_ids] = fill
            bias[padding_ids] = fill
        if init == "codebook":
            _codebook_init(model, fmt, ids, new_positions, rvq_model, input_embeddings, ple)


def _mean_init(
    weight: torch.Tensor,
    reference: int,
    new_ids: torch.Tensor,
    padding_ids: torch.Tensor,
    generator: torch.Generator,
    noise_scale: float,
) -> None:
    """Rows ``new_ids`` = mean of rows ``[0, reference)`` + N(0, (noise_scale * std)^2); padding rows = mean."""
    old = weight[:reference].float()
    mean = old.mean(dim=0)
    std = old.std(dim=0) if reference > 1 else torch.zeros_like(mean)
    noise = torch.randn(len(new_ids), weight.shape[1], generator=generator) * (noise_scale * std.cpu())
    weight[new_ids.to(weight.device)] = (mean + noise.to(mean.device)).to(weight.dtype)
    if len(padding_ids):
        weight[padding_ids.to(weight.device)] = mean.to(weight.dtype)


def _per_layer_embeddings(model) -> nn.Embedding | None:
    """Gemma 4 (and 3n) per-layer embeddings (PLE) table, or None."""
    getter = getattr(model, "get_per_layer_input_embeddings", None)
    if getter is None:
        return None
    try:
        table = getter()
    except AttributeError:
        return None
    return table if isinstance(table, nn.Embedding) else None


def _audio_path(model) -> tuple[nn.Module, nn.Module]:
    """(audio_tower.output_proj, embed_audio) of a Gemma 4 multimodal model; ValueError otherwise."""
    base = getattr(model, "model", model)
    tower = getattr(base, "audio_tower", None)
    embedder = getattr(base, "embed_audio", None)
    output_proj = getattr(tower, "output_proj", None)
    if tower is None or embedder is None or not isinstance(output_proj, nn.Linear):
        raise ValueError(
            "init='codebook' needs a Gemma 4 multimodal model (Gemma4ForConditionalGeneration with an audio "
            f"tower and embed_audio); got {type(model).__name__}. Use init='mean' for text-only LLMs."
        )
    return output_proj, embedder


def _check_rvq(fmt: SemanticTokenFormat, rvq_model, model) -> None:
    if rvq_model is None or not hasattr(rvq_model, "project_out") or not hasattr(rvq_model, "quantizer"):
        raise ValueError("init='codebook' needs rvq_model: the GemmaRVQModel whose codes the format renders")
    family = getattr(getattr(rvq_model, "config", None), "encoder_family", None)
    if family != "gemma4_audio":
        raise ValueError(
            f"init='codebook' maps RVQ codes into Gemma 4's audio embedding space; this RVQ quantizes "
            f"{family!r} features. Use init='mean'."
        )
    codebooks = rvq_model.quantizer.codebooks
    levels, size = codebooks.shape[0], codebooks.shape[1]
    if fmt.codebook_size != size:
        raise ValueError(f"format codebook_size {fmt.codebook_size} != the RVQ's codebook size {size}")
    if fmt.num_levels > levels:
        raise ValueError(f"format renders {fmt.num_levels} levels but the RVQ has {levels}")
    output_proj, _ = _audio_path(model)
    dim = rvq_model.config.dim
    if output_proj.in_features != dim:
        raise ValueError(
            f"the RVQ's dim {dim} != the audio tower's output_proj input size {output_proj.in_features} "
            "(the RVQ must quantize this model's pre-projection audio frames)"
        )


@torch.no_grad()
def audio_code_embeddings(rvq_model, model, num_levels: int | None = None) -> torch.Tensor:
    """Where each RVQ code lands in a Gemma 4 LLM's embedding space: ``[Q, K, hidden_size]`` float32.

    Level 0: ``embed_audio(output_proj(project_out(c)))`` for each codebook vector ``c``: exactly the
    soft token the LLM receives for an audio frame that quantizes to that single code. Level ``l > 0``:
    the same map applied to ``m_0 + ... + m_(l-1) + c``, where ``m_j`` is the usage-weighted mean code
    vector of level ``j`` (uniform weights when the quantizer has no usage counts): an average frame of
    the coarser levels refined by this code. These are the embeddings *after* the text embedding scale;
    divide by it to get table rows.
    """
    output_proj, embedder = _audio_path(model)
    codebooks = rvq_model.quantizer.codebooks.detach()
    levels = codebooks.shape[0] if num_levels is None else num_levels
    counts = getattr(rvq_model.quantizer, "cluster_size", None)
    device = output_proj.weight.device
    rvq_dtype = next(rvq_model.parameters()).dtype
    context = torch.zeros(codebooks.shape[-1], dtype=torch.float32, device=codebooks.device)
    out = []
    for level in range(levels):
        vectors = context + codebooks[level].float()  # [K, Dc]
        frames = rvq_model.project_out(vectors.to(rvq_dtype))  # [K, D] encoder space (pre-output_proj)
        soft = embedder(output_proj(frames.to(device, output_proj.weight.dtype)))  # [K, H]
        out.append(soft.float())
        weights = None
        if isinstance(counts, torch.Tensor) and counts.dim() == 2 and float(counts[level].sum()) > 0:
            weights = counts[level].float() / counts[level].float().sum()
        mean = (
            codebooks[level].float().mean(0)
            if weights is None
            else (weights[:, None] * codebooks[level].float()).sum(0)
        )
        context = context + mean
    return torch.stack(out)


def _codebook_init(model, fmt, ids, new_positions, rvq_model, input_embeddings, ple) -> None:
    """Code-token rows = audio embedding / text embedding scale; their PLE rows = the pad token's."""
    embeddings = audio_code_embeddings(rvq_model, model, fmt.num_levels)  # [Q, K, H]
    scale = getattr(input_embeddings, "embed_scale", None)
    weight = input_embeddings.weight
    scale = (
        scale.to(weight.dtype).float().to(weight.device)
        if isinstance(scale, torch.Tensor)
        else torch.tensor(float(scale or 1.0), device=weight.device)
    )
    first_code = len(fmt.vocabulary()) - fmt.num_levels * fmt.codebook_size  # markers and durations first
    code_positions = [i for i in new_positions if i >= first_code]
    if not code_positions:
        return
    flat = torch.tensor([i - first_code for i in code_positions], device=embeddings.device)
    rows = embeddings.reshape(-1, embeddings.shape[-1])[flat].to(weight.device) / scale
    target = torch.tensor([ids[i] for i in code_positions], device=weight.device)
    weight[target] = rows.to(weight.dtype)
    # an audio soft token's per-layer input is the pad token's (Gemma4Model replaces audio ids by pad)
    pad_id = getattr(model.config.get_text_config(), "pad_token_id", None)
    if ple is not None and pad_id is not None:
        ple.weight[target.to(ple.weight.device)] = ple.weight[pad_id].clone()
