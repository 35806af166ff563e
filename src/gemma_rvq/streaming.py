"""Streaming tokenization: codes (and token strings) while the audio arrives.

``stream = model.stream(sampling_rate=16000)`` opens one utterance; ``stream.push(samples)`` returns the codes
``[Q, n]`` of the frames that became final with this chunk (often none), ``stream.flush()`` ends the utterance
and returns the rest. Frame ``t`` is emitted as soon as the stream holds ``t * frame_ms + lookahead_ms`` of
audio (``frame_ms = 1000 / frame_rate``), and never changes afterwards.

Gemma 4 audio (exact). Its encoder only looks back: the feature extractor's mel frames (20 ms windows, 10 ms
hop, fixed per-bin normalisation) and two 3x3 stride-2 subsampling convolutions reach one frame (40 ms, plus
one sample) past a frame's start, and every conformer layer is causal (chunked local attention over the 12
previous frames with right context 0, a causal depthwise convolution of 5 frames, per-frame feed-forward
blocks). So [`Gemma4StreamingEncoder`] keeps per-layer state bounded by that context (the keys/values of the
last 12 frames and the 4-frame convolution tail of every layer, a few mel frames, fewer than 320 samples)
and runs every new frame through each layer exactly once. The concatenated streamed codes equal
``model.encode`` of the whole clip; the only possible differences are float summation-order near-ties
(matrix products over a few frames vs. a whole clip round differently in the last bit).
``lookahead_ms`` is 40.0625 (one frame and one sample at 16 kHz).

HuBERT / wav2vec2 / Whisper attend in both directions: every frame depends on all of the audio, so no stream
can equal the offline codes. [`WindowedStreamingEncoder`] re-encodes a bounded window (``context_ms`` of
audio before the new frames, ``lookahead_ms`` after each frame's start) and keeps the new frames; its codes
approximate the offline ones (see docs/streaming.md for measured agreement). It only runs when the caller
states ``lookahead_ms``; without it ``model.stream`` raises.

Token strings: [`TokenStream`] (``model.stream(..., token_format="ichigo")``) renders the same codes with any
[`SemanticTokenFormat`]; the concatenated pieces equal ``format.render(codes)`` of the whole utterance. With
run-length collapse and duration tokens a run is only written once it is closed (a different frame arrived,
the run reached ``max_duration``, or the stream was flushed); without duration tokens a run's token is written
when the run starts, since nothing about it can change.

This file is copied next to saved checkpoints (remote code, imported by ``modeling_gemma_rvq.py``): at module
level it imports only numpy, torch, transformers and its flat siblings.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import search
from .audio import check_sampling_rate, to_float_mono

#: encoder families whose layers attend in both directions (windowed, approximate streaming only).
BIDIRECTIONAL_FAMILIES = ("hubert", "wav2vec2", "whisper")


def _as_samples(samples: Any, name: str = "samples") -> np.ndarray:
    """One chunk of mono audio -> float32 ``[S]``, through the one audio reader (``audio.to_float_mono``:
    integer PCM scaled by its width, NaN / unscaled floats refused, as for ``model.encode``)."""
    if isinstance(samples, (list, tuple)) and len(samples) == 0:
        return np.zeros(0, dtype=np.float32)
    array = samples.detach().cpu() if isinstance(samples, torch.Tensor) else samples
    shape = tuple(getattr(array, "shape", np.shape(array)))
    if len(shape) != 1:
        raise ValueError(
            f"{name} must be mono [S] (one 1-D chunk), got shape {shape}; downmix multi-channel audio first "
            "(e.g. chunk.mean(axis=1) for [S, C])"
        )
    if shape[0] == 0:
        return np.zeros(0, dtype=np.float32)
    try:
        return to_float_mono(array)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from err


class _Resampler:
    """Streaming soxr resampler (HQ): its concatenated output equals ``soxr.resample`` of the whole input."""

    def __init__(self, source: int, target: int) -> None:
        self.identity = source == target
        if not self.identity:
            try:
                import soxr
            except ImportError as err:  # pragma: no cover - soxr is a dependency of gemma-rvq
                raise ImportError(f"streaming from {source} Hz to {target} Hz needs soxr: pip install soxr") from err
            self._stream = soxr.ResampleStream(source, target, 1, dtype="float32", quality="HQ")

    def __call__(self, wave: np.ndarray, last: bool = False) -> np.ndarray:
        if self.identity:
            return wave
        return np.ascontiguousarray(self._stream.resample_chunk(wave, last=last), dtype=np.float32)


# ============================================================================================ Gemma 4: exact
def _depthwise_taps(conv: nn.Conv1d) -> list[torch.Tensor]:
    """The fp32 weights of a depthwise ``conv``'s taps, each ``[1, C, 1]`` (for [`_causal_depthwise`])."""
    weight = conv.weight.detach()[:, 0].float()  # [C, kernel]
    return [weight[None, :, tap, None] for tap in range(weight.shape[1])]


def _causal_depthwise(conv: nn.Conv1d, x: torch.Tensor, taps: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``conv`` (depthwise, stride 1, no bias) over ``x [B, C, pad + n]`` whose first ``pad`` frames are the
    left context -> ``[B, C, n]``.

    On CPU a oneDNN convolution call costs ~1 ms whatever its size, more than the rest of a layer for a few
    frames; the same products summed in the same order (one multiply-add per tap, first tap first: what
    the convolution computes) cost microseconds. Elsewhere the convolution itself runs. ``taps``: the
    [`_depthwise_taps`] of ``conv``, if the caller holds them.
    """
    kernel = conv.kernel_size[0]
    if x.device.type != "cpu" or conv.bias is not None or conv.stride[0] != 1 or conv.groups != x.shape[1]:
        return nn.Conv1d.forward(conv, x)
    dilation = conv.dilation[0]
    n = x.shape[2] - (kernel - 1) * dilation
    taps = _depthwise_taps(conv) if taps is None else taps
    source = x if x.dtype == torch.float32 else x.float()
    out = source[:, :, :n] * taps[0]
    for tap in range(1, kernel):  # in place on the contiguous temporary: the same loop, no allocations
        out.addcmul_(source[:, :, tap * dilation : tap * dilation + n], taps[tap])
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _log_mel(extractor: Any, piece: np.ndarray) -> np.ndarray:
    """``Gemma4AudioFeatureExtractor._extract_spectrogram(piece[None], mask)[0]`` as float32 ``[frames, bins]``:
    the same NumPy operations on the same arrays (semicausal zero padding, frames of ``frame_length + 1``
    samples every ``hop_length``, pre-emphasis, window, ``rfft``, magnitude, mel filters, log, per-bin
    normalisation), without the step's ``np.pad`` calls and mask, which cost more than the arithmetic for
    a push's few frames. [`Gemma4StreamingEncoder`] uses it only after it gave the step's bits."""
    waveform = piece[None]
    if extractor.input_scale_factor != 1.0:
        waveform = waveform * extractor.input_scale_factor
    pad_left = extractor.frame_length // 2
    waveform = np.concatenate([np.zeros((1, pad_left), dtype=waveform.dtype), waveform], axis=1)
    size, hop = extractor.frame_length + 1, extractor.hop_length
    count = (waveform.shape[1] - size) // hop + 1
    if count <= 0:
        return np.zeros((0, extractor.mel_filters.shape[1]), dtype=np.float32)
    stride = waveform.strides[1]
    frames = np.lib.stride_tricks.as_strided(waveform, (1, count, size), (waveform.strides[0], stride * hop, stride))
    emphasis = extractor.preemphasis
    if emphasis > 0.0:
        if extractor.preemphasis_htk_flavor:
            frames = np.concatenate([frames[..., :1] * (1.0 - emphasis),
                                     frames[..., 1:-1] - emphasis * frames[..., :-2]], axis=-1)
        else:
            frames = frames[..., 1:] - emphasis * frames[..., :-1]
    else:
        frames = frames[..., :-1]
    spectrum = np.abs(np.fft.rfft(frames * extractor.window, n=extractor.fft_length, axis=-1))
    mel = np.log(np.matmul(spectrum, extractor.mel_filters) + extractor.mel_floor)
    if extractor.per_bin_mean is not None:
        mel = mel - extractor.per_bin_mean
    if extractor.per_bin_stddev is not None:
        mel = mel / extractor.per_bin_stddev
    return mel[0].astype(np.float32, copy=False)


#: pack the encoder's large fp32 CPU weights for the stream's few-frame products (see ``_packed_weight``);
#: False saves their memory (one more copy of them) at about twice the per-push time of a full-size encoder
PACK_WEIGHTS = True
#: oneDNN-packed copies of large fp32 CPU weights, per ``nn.Linear`` (dropped with the module): (key, packed)
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: weights from this many elements on (4 MiB of fp32, more than a core's L2 cache) are packed
PACK_MIN_ELEMENTS = 1 << 20
#: products of 4 to this many rows use the packed weight (larger ones are compute-bound: plain GEMM)
PACK_MAX_ROWS = 48
_PACK_FAILED = False


def _packed_weight(linear: nn.Linear) -> torch.Tensor | None:
    """The oneDNN-packed copy of ``linear.weight`` (fp32, CPU, large), or None.

    A push multiplies a few frames by every weight matrix: the product is memory-bound, and on CPU the
    plain GEMM for 4 rows (MKL) reaches only about half the memory bandwidth (it re-packs the weight on
    every call), while the same product on a weight packed once by oneDNN reads it at the bandwidth
    (measured 2.2 vs 4.1-4.8 GB/s on one core). The packed copy is built on first use, kept while the
    module lives, and rebuilt when the weight changes (new storage or an in-place update).
    """
    global _PACK_FAILED
    weight = linear.weight
    if (not PACK_WEIGHTS or _PACK_FAILED or weight.device.type != "cpu" or weight.dtype != torch.float32
            or weight.numel() < PACK_MIN_ELEMENTS or not torch.backends.mkldnn.is_available()):
        return None
    try:
        version = weight._version
    except RuntimeError:  # an inference tensor (made under torch.inference_mode) has no version counter
        version = -1
    key = (weight.data_ptr(), version, tuple(weight.shape))
    entry = _PACKED.get(linear)
    if entry is None or entry[0] != key:
        try:
            entry = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 4))
        except (AttributeError, RuntimeError):  # a torch without oneDNN's packed linear: the plain product
            _PACK_FAILED = True
            return None
        _PACKED[linear] = entry
    return entry[1]


def _norm_step(hidden: torch.Tensor, eps: float, weight: torch.Tensor | None, inplace: bool = False) -> torch.Tensor:
    """``Gemma4RMSNorm`` on fp32 ``hidden`` with its ``eps`` and fp32 ``weight`` (None: no scale): the same
    operations as its ``forward`` (``x * pow(mean(x ** 2) + eps, -0.5)``, then the weight), in place on
    temporaries (and on ``hidden`` itself with ``inplace``), without its dtype round trips and module look-ups."""
    factor = hidden.pow(2).mean(-1, keepdim=True).add_(eps).pow_(-0.5)
    hidden = hidden.mul_(factor) if inplace else hidden * factor
    return hidden.mul_(weight) if weight is not None else hidden


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """``x.float()`` without the call when ``x`` already is fp32."""
    return x if x.dtype == torch.float32 else x.float()


def _clip_bounds(module: nn.Module) -> tuple[tuple | None, tuple | None]:
    """A ``Gemma4ClippableLinear``'s (min, max) clamps of its input and its output; None where it does not
    clip or clips to (-inf, inf)."""
    if not getattr(module, "use_clipped_linears", False):
        return None, None

    def pair(low: torch.Tensor, high: torch.Tensor) -> tuple | None:
        unbounded = bool((low == -math.inf).all()) and bool((high == math.inf).all())
        return None if unbounded else (low, high)

    return pair(module.input_min, module.input_max), pair(module.output_min, module.output_max)


class _Product:
    """One linear map of a stream's rows, resolved once per stream: ``x [R, K] -> [R, N]``, the forward of a
    ``Gemma4ClippableLinear`` (its clamps where the bounds are finite) or an ``nn.Linear``. The product is
    ``torch.mm`` / ``addmm`` with the transposed weight view (what ``F.linear`` calls, without its layers of
    dispatch: the same bits), or the oneDNN-packed weight for 4 to ``PACK_MAX_ROWS`` rows when there is one."""

    __slots__ = ("after", "before", "bias", "packed", "parts_after", "weight_t")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, before: tuple | None, after: tuple | None,
                 packed: torch.Tensor | None) -> None:
        self.weight_t, self.bias, self.before, self.after, self.packed = weight.t(), bias, before, after, packed
        self.parts_after: list = []

    @classmethod
    def stack(cls, products: list[_Product]) -> _Product | None:
        """One product of the stacked weights of ``products`` that read the same rows (an attention's q, k
        and v: one ``mm`` instead of three, the same bits per column), or None where they cannot be stacked
        (input clamps, biases or packed weights). Each part's output clamps are in ``parts_after``."""
        if any(p.before is not None or p.bias is not None or p.packed is not None for p in products):
            return None
        stacked = cls(torch.cat([p.weight_t.t() for p in products]), None, None, None, None)
        stacked.parts_after = [p.after for p in products]
        return stacked

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.before is not None:
            x = torch.clamp(x, *self.before)
        if self.packed is not None and 4 <= x.shape[0] <= PACK_MAX_ROWS:
            out = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        elif self.bias is None:
            out = torch.mm(x, self.weight_t)
        else:
            out = torch.addmm(self.bias, x, self.weight_t)
        return out if self.after is None else out.clamp_(*self.after)


class _RMSNorm:
    """``Gemma4RMSNorm.forward`` on rows, its eps and fp32 weight resolved once per stream (see [`_norm_step`]).
    ``fresh``: ``x`` is a temporary of the caller's, normalised in place."""

    __slots__ = ("eps", "weight")

    def __init__(self, norm: nn.Module) -> None:
        self.eps = norm.eps
        self.weight = norm.weight.detach().float() if norm.with_scale else None

    def __call__(self, x: torch.Tensor, fresh: bool = False) -> torch.Tensor:
        if x.dtype == torch.float32:
            return (_norm_fast if _fast_norm_exact(x.device) else _norm_step)(x, self.eps, self.weight, fresh)
        return _norm_step(x.float(), self.eps, self.weight, True).type_as(x)


def _norm_fast(hidden: torch.Tensor, eps: float, weight: torch.Tensor | None, inplace: bool = False) -> torch.Tensor:
    """[`_norm_step`] through cheaper steps with the same bits on CPU (torch 2.x): ``x * x`` for ``pow(2)``
    (what ``pow`` computes for the exponent 2), a sum and a division for ``mean`` (what ``mean`` runs on
    CPU: it costs twice a sum), ``rsqrt`` for ``pow(-0.5)``. A norm of a few rows is dispatch-bound: 35 instead
    of 50 microseconds here, and a tiny encoder's push has 18 of them. Used where [`_fast_norm_exact`]."""
    factor = torch.mul(hidden, hidden).sum(-1, keepdim=True).div_(hidden.shape[-1]).add_(eps).rsqrt_()
    hidden = hidden.mul_(factor) if inplace else hidden * factor
    return hidden.mul_(weight) if weight is not None else hidden


#: per device type: whether ``_norm_fast`` gives the bits of ``_norm_step`` (checked once, see below)
_FAST_NORM_EXACT: dict[str, bool] = {}


def _fast_norm_exact(device: torch.device) -> bool:
    """Whether [`_norm_fast`] computes ``Gemma4RMSNorm``'s fp32 bits on this device type: checked once on random
    rows of several sizes and magnitudes, contiguous and transposed, with and without a weight."""
    kind = device.type
    if kind not in _FAST_NORM_EXACT:
        gen = torch.Generator().manual_seed(0)
        exact = True
        for rows, dim, scale in ((1, 64, 1.0), (3, 160, 30.0), (5, 1024, 1e-3), (12, 1536, 1e4)):
            x = (torch.randn(rows, dim, generator=gen) * scale).to(device)
            weight = torch.randn(dim, generator=gen).to(device)
            for sample in (x, x.t().contiguous().t()):
                for w in (weight, None):
                    exact = exact and torch.equal(_norm_fast(sample, 1e-6, w), _norm_step(sample, 1e-6, w))
        _FAST_NORM_EXACT[kind] = exact
    return _FAST_NORM_EXACT[kind]


def _activation(module: nn.Module, inplace: bool = True) -> Any:
    """An activation module as a function (SiLU, ReLU: the same kernel without the module call), applied in
    place to a temporary with ``inplace``; any other module is called as it is. In place only on contiguous
    inputs: SiLU's vectorised and scalar loops round differently, and which elements take which loop
    depends on the input's and output's layouts."""
    kind = type(module).__name__
    if kind in ("SiLU", "SiLUActivation"):
        return (lambda x: F.silu(x, inplace=True)) if inplace else F.silu
    if kind == "ReLU":
        return torch.relu_ if inplace else torch.relu
    return module


def _feed_forward(plan: tuple, x: torch.Tensor) -> torch.Tensor:
    """``Gemma4AudioFeedForward.forward`` on rows ``x [R, D]``, resolved by ``_feed_forward_plan``."""
    clip, pre, first, act, second, post, scale = plan
    hidden = pre(torch.clamp(x, -clip, clip), fresh=True)
    hidden = second(act(first(hidden)))
    hidden = post(hidden.clamp_(-clip, clip), fresh=True)
    hidden *= scale
    hidden += x
    return hidden


class _AttentionWindow:
    """One layer's attention state in a stream: the window of the current block of queries (see
    ``Gemma4StreamingEncoder._attention``).

    ``keys [B, heads, head_dim, width]``: columns ``[lead, lead + positions)`` the relative position keys,
    zeros around them, then from ``key_col`` on the keys of the window's ``context = past + chunk`` frames
    (``past`` frames before the block, then the block); ``values [B, heads, context, head_dim]`` of the same
    frames; ``queries [B, heads, chunk, head_dim]`` of the block (rows not received yet are left over from
    before: their results are dropped). Frames before the stream's start are zeros, and masked."""

    def __init__(self, batch: int, heads: int, head_dim: int, chunk: int, past: int, relative: torch.Tensor,
                 device: torch.device) -> None:
        self.chunk, self.past, self.context = chunk, past, chunk + past
        positions = relative.shape[-1]
        self.lead = chunk - 1  # zero columns before the relative keys: the shift's j - i < 0
        self.key_col = self.lead + self.context  # the relative keys and zeros fill [lead, key_col)
        width = self.key_col + self.context
        self.keys = torch.zeros(batch, heads, head_dim, width, device=device)
        self.keys[..., self.lead : self.lead + positions] = relative
        self.values = torch.zeros(batch, heads, self.context, head_dim, device=device)
        self.queries = torch.zeros(batch, heads, chunk, head_dim, device=device)
        rows = batch * heads
        self.keys_3d = self.keys.view(rows, head_dim, width)
        self.values_3d = self.values.view(rows, self.context, head_dim)
        self.queries_3d = self.queries.view(rows, chunk, head_dim)
        self.batch, self.heads, self.head_dim = batch, heads, head_dim
        # what each block computes, in place: scores [B * heads, chunk, width] of the queries against every
        # column; the content scores are its key columns, the position scores [i, j] = relative[j - i] (0
        # outside) a strided view (row i read from column lead - i on); their sum; the attention output
        self.scores = torch.empty(rows, chunk, width, device=device)
        self.content = self.scores[..., self.key_col :]
        self.position = self.scores.as_strided((rows, chunk, self.context), (chunk * width, width - 1, 1), self.lead)
        self.logits = torch.empty(rows, chunk, self.context, device=device)
        self.out = torch.empty(rows, chunk, head_dim, device=device)
        self._rows: dict[tuple[int, int], tuple] = {}
        self.block = 0

    def rows(self, offset: int, m: int) -> tuple[torch.Tensor, ...]:
        """Views of the block's rows ``[offset, offset + m)`` as ``[B, m, heads, head_dim]`` (the layout of the
        projected frames): in the queries, the keys, the values and the attention output (made once per
        (offset, m): a push of a fixed size uses a few)."""
        views = self._rows.get((offset, m))
        if views is None:
            slot = self.past + offset
            out = self.out.view(self.batch, self.heads, self.chunk, self.head_dim)
            keys = self.keys[..., self.key_col + slot : self.key_col + slot + m]
            views = self._rows[offset, m] = (
                self.queries[:, :, offset : offset + m].transpose(1, 2), keys.permute(0, 3, 1, 2),
                self.values[:, :, slot : slot + m].transpose(1, 2), out[:, :, offset : offset + m].transpose(1, 2))
        return views

    def advance(self, block: int) -> None:
        """Move the window to ``block`` (the next one): the last ``past`` frames become the first."""
        key_col, chunk, past = self.key_col, self.chunk, self.past
        self.keys[..., key_col : key_col + past] = self.keys[..., key_col + chunk :].clone()
        self.values[:, :, :past] = self.values[:, :, chunk:].clone()
        self.block = block

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.queries, self.scores,
                                                         self.logits, self.out))


class _ConvWindow:
    """One layer's depthwise convolution state in a stream: the last ``tail`` input frames ``[B, C, tail]``,
    and per push size ``n`` an input buffer ``[B, C, tail + n]`` with the views a push writes and reads."""

    def __init__(self, batch: int, channels: int, tail: int, dilation: int, kernel: int, device: torch.device) -> None:
        self.tail = torch.zeros(batch, channels, tail, device=device)
        self.dilation, self.kernel = dilation, kernel
        self._views: dict[int, tuple] = {}

    def views(self, n: int) -> tuple:
        """Views of the buffer for ``n`` new frames, whose first ``tail`` frames now hold the stored tail: (its
        last ``n`` frames, each tap's ``n`` input frames, its last ``tail`` frames)."""
        views = self._views.get(n)
        if views is None:
            batch, channels, tail = self.tail.shape
            buffer = torch.empty(batch, channels, tail + n, device=self.tail.device)
            taps = [buffer[:, :, t * self.dilation : t * self.dilation + n] for t in range(self.kernel)]
            views = self._views[n] = (buffer, buffer[:, :, :tail], buffer[:, :, tail:], taps, buffer[:, :, n:])
            if len(self._views) > 8:  # pushes of ever new sizes: keep a few
                self._views.pop(next(iter(self._views)))
        views[1].copy_(self.tail)
        return views[2:]

    @property
    def nbytes(self) -> int:
        held = [self.tail] + [views[0] for views in self._views.values()]
        return sum(t.numel() * t.element_size() for t in held)


class _LayerPlan:
    """One ``Gemma4AudioLayer`` as a push reads it (weights, norms, constants), resolved once per stream."""


class _Plan:
    """What a push reads from the encoder: the input projection and every layer's [`_LayerPlan`]."""

    def __init__(self, input_proj: _Product, layers: list[_LayerPlan]) -> None:
        self.input_proj, self.layers = input_proj, layers


class Gemma4StreamingEncoder:
    """Incremental ``Gemma4AudioModel``: samples in, final frame embeddings ``[n, D]`` out.

    Mirrors ``Gemma4AudioModel.forward`` (transformers 5.x) frame by frame: each new mel frame is computed
    once by the model's own feature extractor, each output of each subsampling convolution once (the
    previous stage's last frame kept as left context), and each frame goes through every layer once, with
    per-layer caches: attention keys/values of the last ``attention_context_left - 1`` frames and the
    depthwise convolution's input tail (``conv_kernel_size - 1`` frames). Memory is bounded by that context,
    not the stream length. Not thread-safe; keep the model on one device and dtype while a stream is open.
    What a push reads from the modules (norm weights, clamp bounds, packed weights) is looked up once per
    utterance: after changing the weights, ``reset()`` (or open a new stream).
    On CPU the large fp32 weights are multiplied through copies packed once by oneDNN (``PACK_WEIGHTS``):
    a push reads every weight, and the packed product of a few frames reads it at the memory bandwidth.

    Args:
        model: the frozen ``Gemma4AudioModel`` (layers already cut to the wanted one).
        feature_extractor: its ``Gemma4AudioFeatureExtractor``.
        min_samples: fewest samples an utterance needs to give frames (``model.encode`` refuses shorter
            audio); default: one frame.
        batch_size: None for one utterance (``push`` takes ``[S]``, returns ``[n, D]``); ``B`` for ``B``
            utterances pushed in lockstep, the same number of samples each push (``push`` takes ``[B, S]``,
            returns ``[B, n, D]``): one pass over the weights serves all of them (see [`StreamBatch`]).
    """

    #: output frames per mel frame (two stride-2 convolutions)
    SUBSAMPLING = 4

    def __init__(self, model: nn.Module, feature_extractor: Any, min_samples: int | None = None,
                 batch_size: int | None = None) -> None:
        config = model.config
        if getattr(config, "attention_context_right", 0) != 0:
            raise ValueError(
                f"this Gemma 4 audio encoder attends {config.attention_context_right} frames ahead in every layer "
                "(attention_context_right); exact streaming needs right context 0"
            )
        sub = model.subsample_conv_projection
        for conv in (sub.layer0.conv, sub.layer1.conv):
            if tuple(conv.kernel_size) != (3, 3) or tuple(conv.stride) != (2, 2) or tuple(conv.padding) != (1, 1):
                raise ValueError(
                    "exact streaming expects Gemma 4's 3x3 stride-2 subsampling convolutions with padding 1, got "
                    f"kernel {tuple(conv.kernel_size)}, stride {tuple(conv.stride)}, padding {tuple(conv.padding)}"
                )
        if getattr(feature_extractor, "dither", 0.0):
            raise ValueError("the feature extractor adds random dither (dither > 0): its features are not reproducible")
        self.model = model
        self.feature_extractor = feature_extractor
        self.batch_size = batch_size
        self._rows = 1 if batch_size is None else int(batch_size)  # utterances computed together
        self.sampling_rate = int(feature_extractor.sampling_rate)
        self.hop = int(feature_extractor.hop_length)
        self.samples_per_frame = self.hop * self.SUBSAMPLING
        pad_left = int(feature_extractor.frame_length) // 2
        # Mel frame i reads samples [i*hop - pad_left, i*hop - pad_left + frame_length] and is valid once the
        # last of them exists; the feature extractor pads `pad_left` zeros on the left.
        self._mel_reach = int(feature_extractor.frame_length) - pad_left  # sample i*hop + reach must exist
        self._mel_skip = -(-pad_left // self.hop)  # leading frames of a slice that see the zero padding
        # Frame u needs mel frames up to 4u + 3: sample 4u*hop + 3*hop + reach must exist.
        self.lookahead_samples = (self.SUBSAMPLING - 1) * self.hop + self._mel_reach + 1
        self.min_samples = self.samples_per_frame if min_samples is None else int(min_samples)
        self._direct_mel = hasattr(feature_extractor, "_extract_spectrogram")  # see _mel
        self._mirror_mel: bool | None = None  # _log_mel gives the spectrogram step's bits (None: not checked yet)
        layer = model.layers[0] if len(model.layers) else None
        self._past = config.attention_context_left - 1  # keys a query sees: itself and past - 1 before it
        self._chunk = config.attention_chunk_size
        self._conv_tail = layer.lconv1d.depthwise_conv1d.left_pad if layer is not None else 0
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the utterance: the next push starts a new one."""
        self._wave = np.zeros((self._rows, 0), dtype=np.float32)  # [B, samples] from global index _wave_start on
        self._wave_start = 0
        self.num_samples = 0  # samples received (at `sampling_rate`), per utterance
        # subsampling inputs not consumed yet, [B, C, frames, F] from a global frame index on
        self._buffers: dict[str, tuple[torch.Tensor | None, int]] = {"mel": (None, 0), "l0": (None, 0)}
        self._done = {"l0": 0, "l1": 0}  # frames made by each subsampling convolution
        self._mel_done = 0  # mel frames computed
        self.frames_done = 0  # final frames emitted
        self._caches: list[dict[str, Any]] = [{} for _ in self.model.layers]  # per layer: windows, conv tail
        self._plan: _Plan | None = None  # what a push reads from the modules, resolved on first use
        self._masks: dict[tuple[int, bool], torch.Tensor] = {}
        self._block_masks: tuple[torch.Tensor, torch.Tensor] | None = None  # [chunk, context]: first block, others
        self._clip_bounds: dict[int, tuple] = {}  # per Gemma4ClippableLinear: (input, output) clamp bounds

    @property
    def state_nbytes(self) -> int:
        """Bytes held by the stream's state (bounded by the encoder's context, not the stream length)."""
        tensors = [buffer for buffer, _ in self._buffers.values() if buffer is not None]
        tensors += [t for cache in self._caches for t in cache.values() if isinstance(t, torch.Tensor)]
        windows = sum(cache[key].nbytes for cache in self._caches for key in ("window", "conv") if key in cache)
        return int(self._wave.nbytes) + windows + sum(t.numel() * t.element_size() for t in tensors)

    def _num_mel(self, num_samples: int) -> int:
        """Valid mel frames of a clip of ``num_samples`` samples (the feature extractor's mask)."""
        return max(0, (num_samples - self._mel_reach - 1) // self.hop + 1)

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ------------------------------------------------------------------ push / flush
    def push(self, wave: np.ndarray) -> torch.Tensor:
        """Append float32 samples ``[S]`` (``[B, S]`` with ``batch_size``; at ``sampling_rate``) -> embeddings
        ``[n, D]`` (``[B, n, D]``) of the frames that became final (``n`` may be 0)."""
        return self._unbatch(self._push(wave)).clone()  # a normal tensor: the stream computes in inference mode

    def flush(self) -> torch.Tensor:
        """End of the utterance -> embeddings ``[n, D]`` (``[B, n, D]``) of the remaining frames, computed as
        the offline forward computes a clip's last frames (zero mel frames past the end). Fewer than
        ``min_samples`` samples in all give no frame (``model.encode`` refuses such a clip)."""
        return self._unbatch(self._flush()).clone()

    def _unbatch(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, n, D]`` -> ``[n, D]`` for a single utterance (``batch_size`` None)."""
        return hidden[0] if self.batch_size is None else hidden

    # The work runs in inference mode (no autograd bookkeeping: about a tenth of a tiny encoder's push, whose
    # hundreds of small operations cost more in dispatch than in arithmetic). Its tensors, the state
    # included, are inference tensors: callers (AudioCodeStream) return normal tensors made outside it.
    @torch.inference_mode()
    def _push(self, wave: np.ndarray) -> torch.Tensor:
        """``wave [S]`` or ``[B, S]`` -> ``[B, n, D]``."""
        if self.batch_size is not None and (wave.ndim != 2 or wave.shape[0] != self.batch_size):
            raise ValueError(f"a batch of {self.batch_size} streams takes samples [{self.batch_size}, S], got "
                             f"shape {tuple(wave.shape)}")
        wave = wave.reshape(self._rows, -1)
        if wave.size:
            # a copy either way: the caller may reuse its buffer (audio callbacks do)
            self._wave = np.concatenate([self._wave, wave], axis=1) if self._wave.size else wave.copy()
            self.num_samples += wave.shape[1]
        self._compute_mel()
        final = self._mel_done // self.SUBSAMPLING
        return self._frames(self.frames_done, final, self._mel_done)

    @torch.inference_mode()
    def _flush(self) -> torch.Tensor:
        self._compute_mel()
        if self.num_samples < self.min_samples:
            return self._empty()
        total = -(-self._mel_done // self.SUBSAMPLING)
        return self._frames(self.frames_done, total, self._mel_done)

    def _empty(self) -> torch.Tensor:
        return torch.zeros(self._rows, 0, self.model.config.hidden_size, device=self._device, dtype=self._dtype)

    def _compute_mel(self) -> None:
        """Mel frames for every sample received, through the model's own feature extractor."""
        stop = self._num_mel(self.num_samples)
        start = self._mel_done
        if stop <= start:
            return
        skip = min(start, self._mel_skip)
        first = (start - skip) * self.hop  # global sample index of the slice
        piece = self._wave[:, first - self._wave_start :]
        mel = np.stack([self._mel(row, skip + stop - start)[skip:] for row in piece])  # [B, frames, bins]
        if mel.shape[1] != stop - start:  # pragma: no cover - a feature extractor with other arithmetic
            raise RuntimeError(f"expected {stop - start} mel frames from the feature extractor, got {mel.shape[1]}")
        mel = torch.from_numpy(mel).to(self._device, self._dtype)[:, None]
        buffer, origin = self._buffers["mel"]
        self._buffers["mel"] = (mel if buffer is None else torch.cat([buffer, mel], dim=2), origin)
        self._mel_done = stop
        # keep the samples the next mel frame starts from
        keep_from = max(0, (stop - self._mel_skip) * self.hop)
        if keep_from > self._wave_start:
            self._wave = self._wave[:, keep_from - self._wave_start :].copy()
            self._wave_start = keep_from

    def _mel(self, piece: np.ndarray, frames: int) -> np.ndarray:
        """The first ``frames`` mel frames ``[frames, bins]`` (float32) of the samples ``piece``, computed by the
        feature extractor.

        Straight through its spectrogram step (``_extract_spectrogram``: the framing, FFT, mel and log of
        ``__call__``, without its batching, padding to a multiple of 128 samples and masking, which leave
        the valid frames as they are): half the time of ``__call__`` for a push's few frames. That step's
        own arithmetic ([`_log_mel`]) once it gave the same bits as the step on this stream's first piece:
        another 0.3 ms less per push. ``__call__`` where the step is missing or gives fewer frames
        (``_check_against_offline`` compares the result with the offline forward once per model)."""
        extractor = self.feature_extractor
        if self._direct_mel:
            if self._mirror_mel:
                return _log_mel(extractor, piece)[:frames]
            try:
                mel, _ = extractor._extract_spectrogram(piece[None], np.ones(piece.shape[0], dtype=np.int32))
                if mel.ndim == 2 and mel.shape[0] >= frames:
                    mel = mel[:frames].astype(np.float32, copy=False)
                    if self._mirror_mel is None:  # the first piece: does the step's arithmetic give its bits?
                        try:
                            self._mirror_mel = np.array_equal(_log_mel(extractor, piece)[:frames], mel)
                        except (AttributeError, TypeError, ValueError):
                            self._mirror_mel = False
                    return mel
            except (AttributeError, TypeError, ValueError):  # another transformers version: its public call
                pass
            self._direct_mel = False
        feats = extractor([piece], truncation=False, padding="longest", return_attention_mask=True, return_tensors="np")
        return feats["input_features"][0, :frames]

    def _frames(self, start: int, stop: int, num_mel: int) -> torch.Tensor:
        """Frames ``[start, stop)`` through the subsampling and every layer -> ``[B, n, D]``; ``num_mel`` mel
        frames are valid (at the end of the utterance the frames past them are zeros, as in the offline
        forward). Between the subsampling and the output the frames are rows ``[B * n, D]``: every product
        is one ``mm`` of the rows."""
        if stop <= start:
            return self._empty()
        sub = self.model.subsample_conv_projection
        n = stop - start
        # Each 3x3 stride-2 convolution: output t reads inputs 2t-1 .. 2t+1. Every frame of both stages is
        # computed once, from the previous stage's frames kept in a buffer (one frame of left context).
        self._stage(sub.layer0, "mel", "l0", 2 * stop, valid=num_mel, into="l0")
        hidden = self._stage(sub.layer1, "l0", "l1", stop, valid=-(-num_mel // 2))
        hidden = hidden.reshape(self._rows * n, -1)  # [B, n, F, C] -> [B * n, F * C]
        plan = self._plan if self._plan is not None else self._make_plan(hidden)
        hidden = plan.input_proj(hidden)
        for layer, cache in zip(plan.layers, self._caches):
            hidden = self._layer(layer, hidden, cache, start, n)
        self.frames_done = stop
        return hidden.view(self._rows, n, -1)

    def _stage(self, layer: nn.Module, source: str, target: str, stop: int, valid: int,
               into: str | None = None) -> torch.Tensor | None:
        """``Gemma4AudioSubSampleConvProjectionLayer.forward`` for output frames ``[done, stop)`` of stage
        ``target`` from the buffered input frames of stage ``source`` (``valid`` of them are real; the rest
        are zeros, as the offline forward masks them). Returns the new frames ``[B, n, F, C]`` (the layout
        the input projection reads, without the offline forward's round trip through ``[B, C, n, F]``); with
        ``into``, appends them as ``[B, C, n, F]`` to that buffer instead (the activation writes them there:
        one pass over them, where a transposed copy and a concatenation would take two).

        The convolution runs with time padding 0 on the exact input frames (the left zero padding of the
        stream's first frame is added explicitly): on CPU this gives the same bits as the offline padded
        convolution (checked by the tests)."""
        buffer, first = self._buffers[source]
        done = self._done[target]
        lo, hi = 2 * done - 1, 2 * stop  # input frames [lo, hi)
        avail_lo, avail_hi = max(lo, first), min(hi, first + buffer.shape[2])
        x = buffer[:, :, avail_lo - first : avail_hi - first]
        if avail_lo > lo or avail_hi < hi:  # the stream's start (-1), or past the end of the utterance
            x = F.pad(x, (0, 0, avail_lo - lo, hi - avail_hi))
        if valid < hi:  # end of the utterance: zero the input frames past the real ones
            keep = (torch.arange(lo, hi, device=x.device) < valid).to(x.dtype)
            x = x * keep[None, None, :, None]
        conv = layer.conv
        if x.dtype != conv.weight.dtype:
            x = x.to(conv.weight.dtype)
        out = F.conv2d(x, conv.weight, conv.bias, conv.stride, (0, conv.padding[1]), conv.dilation, conv.groups)
        norm = layer.norm
        out = out.permute(0, 2, 3, 1)
        if type(norm) is nn.LayerNorm:  # its forward, without the module call
            out = F.layer_norm(out, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        else:  # pragma: no cover - another transformers version
            out = norm(out)
        self._done[target] = stop
        # the next call reads from input frame 2 * stop - 1 on
        keep_from = max(first, 2 * stop - 1)
        self._buffers[source] = (buffer[:, :, keep_from - first :].clone(), keep_from)
        if into is None:
            return _activation(layer.act)(out)
        held, origin = self._buffers[into]
        k = 0 if held is None else held.shape[2]
        batch, n, freq, channels = out.shape
        merged = torch.empty(batch, channels, k + n, freq, device=out.device, dtype=out.dtype)
        if k:
            merged[:, :, :k] = held
        if type(layer.act) is nn.ReLU:  # relu is clamp_min(x, 0), which can write into a view
            torch.clamp_min(out.permute(0, 3, 1, 2), 0, out=merged[:, :, k:])
        else:  # pragma: no cover - another transformers version
            merged[:, :, k:] = layer.act(out).permute(0, 3, 1, 2)
        self._buffers[into] = (merged, origin)
        return None

    # ------------------------------------------------------------------ one conformer layer, incrementally
    @staticmethod
    def _layer_constants(attn: nn.Module, position_embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        """What every call of ``attn`` recomputes from its weights alone."""
        relative = attn.relative_k_proj(position_embeddings).view(-1, attn.num_heads, attn.head_dim)
        return {
            "relative": relative.float().permute(1, 2, 0),  # [heads, head_dim, positions]
            "query_scale": F.softplus(attn.per_dim_scale),
        }

    def _product_for(self, module: nn.Module) -> _Product:
        """A ``Gemma4ClippableLinear`` or ``nn.Linear`` as a [`_Product`] of rows (clamp bounds recorded)."""
        plain = isinstance(module, nn.Linear)
        bounds = (None, None) if plain else _clip_bounds(module)
        if not plain:
            self._clip_bounds[id(module)] = bounds
        linear = module if plain else module.linear
        return _Product(linear.weight.detach(), None if linear.bias is None else linear.bias.detach(), *bounds,
                        _packed_weight(linear))

    def _make_plan(self, like: torch.Tensor) -> _Plan:
        """What a push reads from the modules, resolved once per utterance (see the class docstring)."""
        model, dtype = self.model, self._dtype
        position_embeddings = model.rel_pos_enc(like)
        layers = []
        for layer in model.layers:
            attn, conv_block = layer.self_attn, layer.lconv1d
            constants = self._layer_constants(attn, position_embeddings)
            plan = _LayerPlan()
            plan.clip = min(layer.gradient_clipping, torch.finfo(layer.norm_pre_attn.weight.dtype).max)
            plan.feed_forward = [self._feed_forward_plan(block, dtype)
                                 for block in (layer.feed_forward1, layer.feed_forward2)]
            plan.norm_pre_attn, plan.norm_post_attn, plan.norm_out = (
                _RMSNorm(norm) for norm in (layer.norm_pre_attn, layer.norm_post_attn, layer.norm_out))
            # attention
            qkv = [self._product_for(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
            plan.qkv = _Product.stack(qkv) or qkv
            plan.post = self._product_for(attn.post)
            plan.heads, plan.head_dim = attn.num_heads, attn.head_dim
            plan.q_scale, plan.k_scale = attn.q_scale, attn.k_scale
            plan.query_scale = constants["query_scale"].float()
            plan.relative = constants["relative"]  # [heads, head_dim, positions]
            plan.softcap, plan.invalid = attn.softcap, attn.config.attention_invalid_logits_value
            # light convolution
            plan.conv_pre = _RMSNorm(conv_block.pre_layer_norm)
            plan.conv_start = self._product_for(conv_block.linear_start)
            conv = conv_block.depthwise_conv1d
            plan.conv = conv
            plan.taps = _depthwise_taps(conv)
            plan.conv_clip = min(conv_block.gradient_clipping, torch.finfo(dtype).max)
            plan.conv_norm = _RMSNorm(conv_block.conv_norm)
            plan.conv_act = _activation(conv_block.act_fn, inplace=False)  # on a transposed view
            plan.conv_end = self._product_for(conv_block.linear_end)
            layers.append(plan)
        self._plan = _Plan(self._product_for(model.subsample_conv_projection.input_proj_linear), layers)
        return self._plan

    def _feed_forward_plan(self, block: nn.Module, dtype: torch.dtype) -> tuple:
        """A ``Gemma4AudioFeedForward`` resolved for [`_feed_forward`]."""
        return (min(block.gradient_clipping, torch.finfo(dtype).max), _RMSNorm(block.pre_layer_norm),
                self._product_for(block.ffw_layer_1), _activation(block.act_fn), self._product_for(block.ffw_layer_2),
                _RMSNorm(block.post_layer_norm), block.post_layer_scale)

    def _layer(self, plan: _LayerPlan, x: torch.Tensor, cache: dict, pos: int, n: int) -> torch.Tensor:
        """``Gemma4AudioLayer.forward`` on the rows ``x [B * n, D]`` of new frames ``[pos, pos + n)``."""
        clip = plan.clip
        hidden = _feed_forward(plan.feed_forward[0], x)
        residual = hidden
        hidden = plan.norm_pre_attn(torch.clamp(hidden, -clip, clip), fresh=True)
        hidden = self._attention(plan, hidden, cache, pos, n)
        hidden = plan.norm_post_attn(hidden.clamp_(-clip, clip), fresh=True)
        hidden += residual
        hidden = self._light_conv(plan, hidden, cache, n)
        hidden = _feed_forward(plan.feed_forward[1], hidden)
        return plan.norm_out(hidden.clamp_(-clip, clip), fresh=True)

    def _attention(self, plan: _LayerPlan, x: torch.Tensor, cache: dict, pos: int, n: int) -> torch.Tensor:
        """``Gemma4AudioAttention.forward`` for the rows ``x [B * n, D]`` of queries at frames ``[pos, pos + n)``.

        The offline forward cuts the frames into blocks of ``chunk`` queries, each attending over a window
        of ``context = chunk + past`` keys (its own block and the ``past`` frames before it). The stream
        keeps the current block's window per layer (``[B, heads, head_dim, W]`` keys, ``[B, heads, context,
        head_dim]`` values, ``[B, heads, chunk, head_dim]`` queries), writes the new frames into it, and
        computes each block a push touches as the offline forward computes that block (rows the stream
        has not received are computed and dropped: a product of all ``chunk`` rows gives the same bits as
        offline, one of a single row does not). Frames before the stream's start are zeros, masked.

        The key window also holds the relative position keys, zero-padded, so that one ``bmm`` gives both
        the content scores and the position scores, and the relative shift (``_rel_shift``) is a strided
        view of the latter: position score ``[i, j]`` is ``relative[j - i]`` for ``0 <= j - i < positions``
        and 0 otherwise.
        """
        batch, heads, head_dim = self._rows, plan.heads, plan.head_dim
        chunk, past = self._chunk, self._past
        window = cache.get("window")
        if window is None:
            window = cache["window"] = _AttentionWindow(batch, heads, head_dim, chunk, past, plan.relative, x.device)
        if self._block_masks is None:
            self._block_masks = tuple(self._mask(first, 1, x.device).view(chunk, -1) for first in (0, 1))
        if isinstance(plan.qkv, list):
            q, k, v = (product(x) for product in plan.qkv)
        else:  # one product of the stacked weights; each part's own output clamps
            q, k, v = plan.qkv(x).split(heads * head_dim, dim=1)
            for part, bounds in zip((q, k, v), plan.qkv.parts_after):
                if bounds is not None:
                    part.clamp_(*bounds)
        shape = (batch, n, heads, head_dim)
        q, k, v = _fp32(q).view(shape), _fp32(k).view(shape), _fp32(v).view(shape)
        pieces = []
        done = 0
        while done < n:
            block, offset = divmod(pos + done, chunk)
            m = min(n - done, chunk - offset)
            if block != window.block:  # the window moves on by one block: its last `past` frames stay
                window.advance(block)
            if m == n:
                q_new, k_new, v_new = q, k, v
            else:
                q_new, k_new, v_new = q[:, done : done + m], k[:, done : done + m], v[:, done : done + m]
            query_rows, key_rows, value_rows, out_rows = window.rows(offset, m)  # [B, m, heads, head_dim] each
            torch.mul(q_new, plan.q_scale, out=query_rows).mul_(plan.query_scale)
            torch.mul(k_new, plan.k_scale, out=key_rows)
            value_rows.copy_(v_new)
            torch.bmm(window.queries_3d, window.keys_3d, out=window.scores)  # [B * heads, chunk, width]
            weights = torch.add(window.content, window.position, out=window.logits)
            weights.div_(plan.softcap).tanh_().mul_(plan.softcap)
            weights.masked_fill_(self._block_masks[block != 0], plan.invalid)
            torch.bmm(torch.softmax(weights, dim=-1), window.values_3d, out=window.out)
            pieces.append(out_rows if m == n else out_rows.clone())  # the next block overwrites window.out
            done += m
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)  # [B, n, heads, head_dim]
        out = out.reshape(batch * n, heads * head_dim)
        return plan.post(out if out.dtype == x.dtype else out.to(x.dtype))

    def _mask(self, first_block: int, blocks: int, device: torch.device) -> torch.Tensor:
        """True where a query may NOT attend: ``[1, 1, blocks, chunk, context]`` (only the stream's first
        block differs from the others: it has no frames before it)."""
        key = (blocks, first_block == 0)
        if key not in self._masks:
            chunk, past = self._chunk, self._past
            context = chunk + past
            q = torch.arange(blocks * chunk, device=device).view(blocks, chunk, 1)
            k = (torch.arange(blocks, device=device) * chunk - past).view(blocks, 1, 1)
            k = k + torch.arange(context, device=device).view(1, 1, context)
            distance = q - k
            allowed = (distance >= 0) & (distance < past)
            if first_block == 0:
                allowed &= k >= 0
            self._masks[key] = ~allowed[None, None]
        return self._masks[key]

    def _light_conv(self, plan: _LayerPlan, x: torch.Tensor, cache: dict, n: int) -> torch.Tensor:
        """``Gemma4AudioLightConv1d.forward`` on the rows ``x [B * n, D]`` of new frames, the causal
        convolution's left padding replaced by the previous frames' inputs (kept per layer)."""
        batch = self._rows
        hidden = F.glu(plan.conv_start(plan.conv_pre(x)), dim=-1).view(batch, n, -1)  # [B, n, C]
        conv = plan.conv
        if x.device.type == "cpu" and conv.bias is None and conv.stride[0] == 1 and conv.groups == hidden.shape[2]:
            window = cache.get("conv")
            if window is None:
                window = cache["conv"] = _ConvWindow(batch, hidden.shape[2], self._conv_tail, conv.dilation[0],
                                                     len(plan.taps), x.device)
            # the depthwise convolution as one multiply-add per tap (see _causal_depthwise), over the window's
            # [B, C, tail + n] input (its views per n made once)
            new, taps, last = window.views(n)
            new.copy_(hidden.transpose(1, 2))
            out = torch.mul(taps[0], plan.taps[0])
            for source, tap in zip(taps[1:], plan.taps[1:]):
                out.addcmul_(source, tap)
            window.tail.copy_(last)
            out = out if out.dtype == x.dtype else out.to(x.dtype)
        else:
            tail = cache.get("conv_tail")
            if tail is None:
                tail = hidden.new_zeros(batch, hidden.shape[2], self._conv_tail)
            hidden = torch.cat([tail, hidden.transpose(1, 2)], dim=2)  # [B, C, tail + n]
            cache["conv_tail"] = hidden[:, :, n:].clone()
            out = _causal_depthwise(conv, hidden, plan.taps)
        # The output [B, C, n] is read as [B, n, C] (a transposed view), as the offline forward reads its
        # convolution's output: the norm after it then sums each frame's channels in the same order.
        out = out.transpose(1, 2)
        clip = plan.conv_clip
        hidden = plan.conv_act(plan.conv_norm(torch.clamp(out, -clip, clip), fresh=True))
        # contiguous rows (a reshape would keep the transposed layout for B = 1): the plain product's bits
        hidden = plan.conv_end(hidden.contiguous().view(batch * n, -1))
        hidden += x
        return hidden


# =========================================================================== bidirectional encoders: windowed
class WindowedStreamingEncoder:
    """Approximate streaming for encoders that attend both ways (HuBERT, wav2vec2, Whisper).

    Frame ``f`` (its audio starts at sample ``f * samples_per_frame``) is emitted once the stream holds
    ``lookahead_ms`` of audio from that start on. The frames that became final in one push are computed by
    one encoder forward over a window that starts ``context_ms`` before the first of them and ends at the
    last sample received; the codes therefore differ from the offline ones (which see the whole clip) and
    depend a little on the chunking. Memory and cost per push are bounded by the window.

    Args:
        adapter: the model's ``EncoderAdapter``.
        lookahead_ms: audio a frame must have from its start on before it is emitted; at least one frame's
            own receptive field (25 ms for HuBERT / wav2vec2, 20 ms for Whisper at 16 kHz).
        context_ms: audio before the new frames given to every forward (default: 2000 ms; for Whisper,
            whose forward always costs a 30 s window, as much as fits it with 1 s of new frames).
    """

    DEFAULT_CONTEXT_MS = 2000.0

    def __init__(self, adapter: Any, lookahead_ms: float, context_ms: float | None = None) -> None:
        self.adapter = adapter
        self.sampling_rate = int(adapter.sampling_rate)
        self.samples_per_frame = int(adapter.samples_per_frame)
        self.min_samples = int(adapter.min_samples)
        if isinstance(lookahead_ms, bool) or not isinstance(lookahead_ms, (int, float)) or not math.isfinite(lookahead_ms):
            raise ValueError(f"lookahead_ms must be a number of milliseconds, got {lookahead_ms!r}")
        if context_ms is None:
            # Whisper pays for its whole 30 s window whatever it holds: fill it with left context (which
            # also keeps the frames of a short utterance at their offline positions).
            context_ms = self.DEFAULT_CONTEXT_MS
            if adapter.family == "whisper":
                # room for 1 s of new frames per forward
                spare = adapter.window - math.ceil(lookahead_ms * self.sampling_rate / 1000) - self.sampling_rate
                context_ms = max(0.0, 1000.0 * spare / self.sampling_rate)
        if isinstance(context_ms, bool) or not isinstance(context_ms, (int, float)) or not math.isfinite(context_ms) or context_ms < 0:
            raise ValueError(f"context_ms must be a number of milliseconds >= 0, got {context_ms!r}")
        least = 1000.0 * self.min_samples / self.sampling_rate
        self.lookahead_samples = math.ceil(lookahead_ms * self.sampling_rate / 1000 - 1e-9)
        if self.lookahead_samples < self.min_samples:
            raise ValueError(
                f"lookahead_ms={lookahead_ms} is shorter than one {adapter.family} frame's receptive field "
                f"({least:g} ms): a frame cannot be computed before its own audio has arrived"
            )
        self.context_frames = round(context_ms * self.sampling_rate / 1000 / self.samples_per_frame)
        # new frames per forward so that context + new frames + lookahead fit the encoder's window
        room = adapter.window - self.context_frames * self.samples_per_frame - self.lookahead_samples
        if room < self.samples_per_frame:
            longest = (adapter.window - self.lookahead_samples - self.samples_per_frame) / self.sampling_rate * 1000
            raise ValueError(
                f"context_ms={context_ms} + lookahead_ms={lookahead_ms} exceed the {adapter.family} encoder's "
                f"window of {adapter.window / self.sampling_rate:g} s (context_ms <= {max(0.0, longest):.0f} here)"
            )
        self._max_new = room // self.samples_per_frame
        self.reset()

    def reset(self) -> None:
        self._wave = np.zeros(0, dtype=np.float32)
        self._wave_start = 0
        self.num_samples = 0
        self.frames_done = 0

    @property
    def state_nbytes(self) -> int:
        return int(self._wave.nbytes)

    def _encoded_length(self, num_samples: int) -> int:
        """Frames of a clip of ``num_samples`` samples, as ``model.encode`` counts them (0 below
        ``min_samples``, which ``encode`` refuses)."""
        if num_samples < self.min_samples:
            return 0
        return int(self.adapter.frames.get_encoded_length(num_samples))

    @torch.no_grad()
    def push(self, wave: np.ndarray) -> torch.Tensor:
        if wave.size:
            # a copy either way: the caller may reuse its buffer (audio callbacks do)
            self._wave = np.concatenate([self._wave, wave]) if self._wave.size else wave.copy()
            self.num_samples += int(wave.size)
        ready = (self.num_samples - self.lookahead_samples) // self.samples_per_frame + 1
        return self._frames(min(ready, self._encoded_length(self.num_samples)))

    @torch.no_grad()
    def flush(self) -> torch.Tensor:
        return self._frames(self._encoded_length(self.num_samples))

    def _frames(self, stop: int) -> torch.Tensor:
        spf = self.samples_per_frame
        parts = []
        while self.frames_done < stop:
            start = self.frames_done
            end = min(stop, start + self._max_new)
            first = max(0, start - self.context_frames)
            last = min(self.num_samples, (end - 1) * spf + max(self.lookahead_samples, self.min_samples))
            if end == stop:  # the newest frames get all the audio there is
                last = self.num_samples
            piece = self._wave[first * spf - self._wave_start : last - self._wave_start]
            hidden, mask = self.adapter.forward_batch([piece])
            got = int(mask[0].sum())
            if got < end - first:  # pragma: no cover - an adapter with other frame arithmetic
                raise RuntimeError(f"the encoder gave {got} frames for a window that should hold {end - first}")
            parts.append(hidden[0, start - first : end - first])
            self.frames_done = end
        keep = max(0, self.frames_done - self.context_frames) * spf
        if keep > self._wave_start:
            self._wave = self._wave[keep - self._wave_start :].copy()
            self._wave_start = keep
        if not parts:
            dim = getattr(self.adapter.model.config, "hidden_size", None) or self.adapter.model.config.d_model
            return torch.zeros(0, dim, device=self.adapter.device, dtype=self.adapter.dtype)
        return torch.cat(parts)


# ================================================================================================ streams
class _CodeStreamBase:
    """What [`AudioCodeStream`] and [`StreamBatch`] share: the counters, ``reset`` and the state size."""

    encoder: Any

    def _new_resamplers(self) -> None:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def reset(self) -> None:
        """Start anew (after ``flush``, or to drop what was pushed)."""
        self.encoder.reset()
        self._new_resamplers()
        self.frames_emitted = 0
        self.samples_received = 0
        self.finished = False

    @property
    def state_nbytes(self) -> int:
        """Bytes of audio, features and per-layer caches held (bounded by the context, not the length)."""
        return self.encoder.state_nbytes


def _embeddings_to_codes(model: nn.Module, hidden: torch.Tensor, num_quantizers: int | None) -> torch.Tensor:
    """Codes ``[Q', n]`` of encoder embeddings ``hidden [n, D]`` (``n >= 1``): what ``model.encode(embeddings=
    hidden[None])`` does with an all-valid mask, without its batch wrapping (mask, gather / scatter, output
    dataclass), which costs a few milliseconds per push, as much as a tiny encoder's layers. The same codes.

    A push's few frames against a small codebook on CPU go straight to the search the quantizer's own
    ``encode`` picks for them (``search._search_few``, the defining float64 search), without its input
    checks and dispatch: here one sum of the projected rows proves them finite. Anything else (a non-finite
    sum, a larger search, another device) takes ``quantizer.encode``."""
    with torch.no_grad():
        x = hidden if hidden.dtype == model._param_dtype() else hidden.to(model._param_dtype())
        norm, proj = model.in_norm, model.in_proj
        if type(norm) is nn.LayerNorm and type(proj) is nn.Linear:  # project_in without the module calls
            z = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            z = F.linear(z, proj.weight, proj.bias)
        else:
            z = model.project_in(x)
        quantizer = model.quantizer
        tables = quantizer._search_tables() if hasattr(quantizer, "_search_tables") else None
        if (tables is not None and tables.device.type == "cpu" and tables.stats is None
                and z.shape[0] * tables.codebook_size * tables.dim <= search.FEW_ROWS_ELEMENTS
                and math.isfinite(float(z.sum()))):
            return search._search_few(tables, z, range(quantizer._num_levels(num_quantizers)), True)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("the encoder gave NaN or infinite embeddings for this chunk")
        return quantizer.encode(z, num_quantizers).t()


class AudioCodeStream(_CodeStreamBase):
    """One utterance streamed through a [`GemmaRVQModel`]: ``push`` samples, get the codes of final frames.

    Made by [`GemmaRVQModel.stream`]. Codes are ``LongTensor [Q, n]`` on the model's device; frame ``t`` is
    emitted once ``t * frame_ms + lookahead_ms`` of audio (at the model's rate) has been pushed.

    Attributes:
        sampling_rate: rate of the pushed samples (resampled to the model's rate on the fly, with soxr's
            streaming resampler: the same samples as offline resampling).
        lookahead_ms: algorithmic latency: audio past a frame's start needed to emit it (40.0625 ms for
            Gemma 4: one 40 ms frame and one sample).
        frame_rate: frames per second.
        exact: True when the streamed codes equal the offline ones (Gemma 4), False for windowed streaming.
        frames_emitted: frames returned so far.
    """

    def __init__(self, model: nn.Module, encoder: Any, sampling_rate: int, num_quantizers: int | None) -> None:
        self.model = model
        self.encoder = encoder
        self.sampling_rate = sampling_rate
        self.num_quantizers = num_quantizers
        self.exact = isinstance(encoder, Gemma4StreamingEncoder)
        self.frame_rate = encoder.sampling_rate / encoder.samples_per_frame
        self.lookahead_ms = 1000.0 * encoder.lookahead_samples / encoder.sampling_rate
        levels = model.config.num_quantizers if num_quantizers is None else num_quantizers
        self._levels = levels
        self.reset()

    def _new_resamplers(self) -> None:
        self._resampler = _Resampler(self.sampling_rate, self.encoder.sampling_rate)

    @property
    def received_ms(self) -> float:
        """Milliseconds of audio pushed so far."""
        return 1000.0 * self.samples_received / self.sampling_rate

    def push(self, samples: Any) -> torch.Tensor:
        """Append a chunk of mono audio ``[S]`` (any length, float or integer PCM at ``sampling_rate``).

        Returns:
            ``LongTensor [Q, n]``: codes of the frames that became final with this chunk (``n`` may be 0).
        """
        if self.finished:
            raise RuntimeError("this stream was flushed: call reset() to start a new utterance")
        wave = _as_samples(samples)
        self.samples_received += int(wave.size)
        return self._step(self._resampler(wave))

    def flush(self) -> torch.Tensor:
        """End the utterance: ``LongTensor [Q, n]``, the codes of every frame not returned yet. An utterance
        shorter than one frame (``model.encode`` would refuse it) gives ``[Q, 0]``."""
        if self.finished:
            raise RuntimeError("this stream was already flushed: call reset() to start a new utterance")
        codes = self._step(self._resampler(np.zeros(0, dtype=np.float32), last=True), last=True)
        self.finished = True
        return codes

    def _step(self, wave: np.ndarray, last: bool = False) -> torch.Tensor:
        """Codes ``[Q, n]`` of the frames that ``wave`` (at the encoder's rate) makes final, and of all the
        remaining ones when ``last``. The exact encoder computes in inference mode (see
        ``Gemma4StreamingEncoder._push``); the codes returned are a normal tensor made outside it."""
        if self.exact:
            encoder = self.encoder
            with torch.inference_mode():
                hidden = encoder._unbatch(encoder._push(wave))
                if last:
                    hidden = torch.cat([hidden, encoder._unbatch(encoder._flush())])
                codes = self._codes(hidden)
        else:
            hidden = self.encoder.push(wave)
            if last:
                hidden = torch.cat([hidden, self.encoder.flush()])
            codes = self._codes(hidden)
        return torch.clone(codes, memory_format=torch.contiguous_format)

    def _codes(self, hidden: torch.Tensor) -> torch.Tensor:
        """Codes ``[Q, n]`` of the embeddings ``hidden [n, D]``."""
        if hidden.shape[0] == 0:
            return torch.zeros(self._levels, 0, dtype=torch.long, device=self.model.device)
        codes = _embeddings_to_codes(self.model, hidden, self.num_quantizers)  # [Q', n]
        self.frames_emitted += hidden.shape[0]
        return codes


class StreamBatch(_CodeStreamBase):
    """``B`` utterances streamed together through a Gemma 4 [`GemmaRVQModel`], in lockstep: every ``push``
    gives each of them the same number of samples, and one pass over the encoder's weights computes the new
    frames of all of them.

    A single stream's push is bound by reading every weight once (the full-size encoder: 1.2 GB per push in
    fp32) or by the dispatch of a few hundred small operations (small encoders); a batch pays either once for
    ``B`` streams. For synchronised sources: the channels of a multi-microphone recording, or calls that a
    server collects on one clock (streams that start later open a batch of their own, or wait for one).
    Each utterance's codes are those of ``model.encode`` of its own clip (float near-ties aside), as with
    [`AudioCodeStream`].

    ```python
    batch = StreamBatch(model, 4, sampling_rate=16000)
    codes = batch.push(chunks)     # chunks [4, S] -> LongTensor [4, Q, n]
    codes = batch.flush()          # the rest of every utterance
    ```

    Args:
        model: a [`GemmaRVQModel`] with a Gemma 4 audio encoder (the exact stream).
        batch_size: number of utterances ``B``.
        sampling_rate: rate of the pushed samples (resampled to the model's rate on the fly, per utterance).
        num_quantizers: emit only the first levels (default: all).
    """

    def __init__(self, model: nn.Module, batch_size: int, sampling_rate: Any, num_quantizers: int | None = None) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if model.config.encoder_family != "gemma4_audio":
            raise ValueError(
                f"StreamBatch streams exactly and needs a Gemma 4 audio encoder, not {model.config.encoder_family!r}; "
                "open one model.stream(..., lookahead_ms=...) per utterance for bidirectional encoders"
            )
        self.sampling_rate = check_sampling_rate(sampling_rate)
        _check_num_quantizers(model, num_quantizers)
        adapter = model._encoder_adapter()
        self.model = model
        self.batch_size = batch_size
        self.encoder = Gemma4StreamingEncoder(adapter.model, adapter.feature_extractor, adapter.min_samples, batch_size)
        _check_against_offline(self.encoder, adapter)  # it streams its own single-utterance probe
        self.num_quantizers = num_quantizers
        self._levels = model.config.num_quantizers if num_quantizers is None else num_quantizers
        self.frame_rate = self.encoder.sampling_rate / self.encoder.samples_per_frame
        self.lookahead_ms = 1000.0 * self.encoder.lookahead_samples / self.encoder.sampling_rate
        self.reset()

    def _new_resamplers(self) -> None:
        self._resamplers = [_Resampler(self.sampling_rate, self.encoder.sampling_rate) for _ in range(self.batch_size)]

    def _samples(self, samples: Any) -> np.ndarray:
        """``[B, S]`` chunks -> float32 ``[B, S']`` at the encoder's rate (every row read as ``push`` reads one)."""
        shape = tuple(getattr(samples, "shape", np.shape(samples)))
        if len(shape) != 2 or shape[0] != self.batch_size:
            raise ValueError(f"push takes one chunk per utterance, [{self.batch_size}, S]; got shape {shape}")
        rows = [_as_samples(samples[b], name=f"samples[{b}]") for b in range(self.batch_size)]
        self.samples_received += int(rows[0].size)
        return np.stack([resample(row) for resample, row in zip(self._resamplers, rows)])

    def push(self, samples: Any) -> torch.Tensor:
        """Append one chunk per utterance, ``[B, S]`` (float or integer PCM at ``sampling_rate``).

        Returns:
            ``LongTensor [B, Q, n]``: codes of the frames that became final with this chunk (``n`` may be 0).
        """
        if self.finished:
            raise RuntimeError("this stream batch was flushed: call reset() to start new utterances")
        return self._step(self._samples(samples))

    def flush(self) -> torch.Tensor:
        """End the utterances: ``LongTensor [B, Q, n]``, the codes of every frame not returned yet."""
        if self.finished:
            raise RuntimeError("this stream batch was already flushed: call reset() to start new utterances")
        tail = np.stack([resample(np.zeros(0, dtype=np.float32), last=True) for resample in self._resamplers])
        codes = self._step(tail, last=True)
        self.finished = True
        return codes

    def _step(self, wave: np.ndarray, last: bool = False) -> torch.Tensor:
        """``wave [B, S]`` at the encoder's rate -> codes ``[B, Q, n]`` (a normal tensor, as in ``AudioCodeStream``)."""
        batch, model = self.batch_size, self.model
        with torch.inference_mode():
            hidden = self.encoder._push(wave)
            if last:
                hidden = torch.cat([hidden, self.encoder._flush()], dim=1)
            n = hidden.shape[1]
            if n == 0:
                codes = torch.zeros(self._levels, batch, 0, dtype=torch.long, device=model.device)
            else:
                codes = _embeddings_to_codes(model, hidden.reshape(batch * n, -1), self.num_quantizers).view(-1, batch, n)
        self.frames_emitted += n
        return torch.clone(codes.transpose(0, 1), memory_format=torch.contiguous_format)


class StreamingTokenRenderer:
    """Renders codes ``[Q, n]`` that arrive in pieces with a [`SemanticTokenFormat`]: the concatenation of
    every ``feed`` and the final ``close`` equals ``format.render`` of all the codes at once.

    Without run-length collapse every frame is written when it arrives. With ``dedup`` and duration tokens a
    run is written once it is closed (a different frame arrives, it reaches ``max_duration`` frames, or
    ``close``); with ``dedup`` and no duration tokens a run is written when it starts (its token does not
    depend on its length).
    """

    def __init__(self, token_format: Any) -> None:
        self.format = token_format
        self.reset()

    def reset(self) -> None:
        self._started = False
        self._wrote = False
        self._run: tuple[int, ...] | None = None  # codes of the open run
        self._run_length = 0  # frames of the open run not written yet

    def _join(self, tokens: list[str]) -> str:
        if not tokens:
            return ""
        text = self.format.separator.join(tokens)
        if self._wrote:
            text = self.format.separator + text
        self._wrote = True
        return text

    def _frame_tokens(self, codes: tuple[int, ...]) -> list[str]:
        return [self.format.code_token(code, level) for level, code in enumerate(codes)]

    def _run_tokens(self) -> list[str]:
        """The open run's pending frames as ``[duration] + frame tokens`` (durations formats only)."""
        if not self._run_length:
            return []
        tokens = [self.format.duration_token(self._run_length)] if self._run_length >= 2 else []
        self._run_length = 0
        return tokens + self._frame_tokens(self._run)

    def feed(self, codes: Any) -> str:
        """Codes ``[Q, n]`` of the next frames -> the text that became final."""
        fmt = self.format
        array = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
        if array.ndim != 2:
            raise ValueError(f"feed() takes codes [Q, n], got shape {tuple(array.shape)}")
        levels = array.shape[0] if fmt.num_levels is None else fmt.num_levels
        if array.shape[0] < levels:
            raise ValueError(
                f"format {fmt.name!r} renders {levels} levels but the codes have only {array.shape[0]}; "
                "stream with more quantizers or use a format with fewer levels"
            )
        array = array[:levels]
        if array.size:
            limit = fmt.codebook_size
            if array.min() < 0 or (limit is not None and array.max() >= limit):
                raise ValueError(
                    f"codes outside [0, {limit}) for format {fmt.name!r}: min {int(array.min())}, max {int(array.max())}"
                )
        tokens: list[str] = []
        if not self._started:
            self._started = True
            if fmt.start_token is not None:
                tokens.append(fmt.start_token)
        for frame in map(tuple, array.T.tolist()):
            if not fmt.dedup:
                tokens += self._frame_tokens(frame)
            elif not fmt.uses_durations:
                if frame != self._run:
                    tokens += self._frame_tokens(frame)
                    self._run = frame
            else:
                if frame != self._run:
                    tokens += self._run_tokens()
                    self._run = frame
                self._run_length += 1
                if self._run_length == fmt.max_duration:  # a full chunk of the run: nothing can change it
                    tokens += self._run_tokens()
        return self._join(tokens)

    def close(self) -> str:
        """End of the utterance: the open run and the end marker."""
        fmt = self.format
        tokens: list[str] = []
        if not self._started:
            self._started = True
            if fmt.start_token is not None:
                tokens.append(fmt.start_token)
        if fmt.uses_durations:
            tokens += self._run_tokens()
        if fmt.end_token is not None:
            tokens.append(fmt.end_token)
        return self._join(tokens)


class TokenStream:
    """An [`AudioCodeStream`] whose ``push`` / ``flush`` return token text in a [`SemanticTokenFormat`].

    The concatenation of every returned piece equals ``format.render(codes)`` of the whole utterance.
    ``codes`` is the underlying code stream (``lookahead_ms``, ``frame_rate``, ``frames_emitted``...).
    """

    def __init__(self, codes: AudioCodeStream, token_format: Any) -> None:
        self.codes = codes
        self.format = token_format
        self.renderer = StreamingTokenRenderer(token_format)

    @property
    def lookahead_ms(self) -> float:
        return self.codes.lookahead_ms

    @property
    def frame_rate(self) -> float:
        return self.codes.frame_rate

    def reset(self) -> None:
        self.codes.reset()
        self.renderer.reset()

    def push(self, samples: Any) -> str:
        """Append a chunk of mono audio -> the text that became final (possibly ``""``)."""
        return self.renderer.feed(self.codes.push(samples))

    def flush(self) -> str:
        """End the utterance -> the remaining text (the last run and the end marker)."""
        return self.renderer.feed(self.codes.flush()) + self.renderer.close()


# ================================================================================================= factory
def _check_against_offline(encoder: Gemma4StreamingEncoder, adapter: Any) -> None:
    """Once per encoder module: stream 1 s of noise (two pushes, across attention blocks) and compare it with
    the offline forward. The incremental encoder mirrors ``Gemma4AudioModel``'s code; should another
    transformers version compute differently, streaming refuses instead of silently giving other codes."""
    model = encoder.model
    if getattr(model, "_gemma_rvq_stream_checked", False):
        return
    wave = (0.1 * np.random.default_rng(0).standard_normal(encoder.sampling_rate)).astype(np.float32)
    probe = Gemma4StreamingEncoder(model, encoder.feature_extractor, encoder.min_samples)
    streamed = torch.cat([probe.push(wave[:7000]), probe.push(wave[7000:]), probe.flush()]).float()
    offline, mask = adapter.forward_batch([wave])
    reference = offline[0, : int(mask[0].sum())].float()
    error = float((streamed - reference).norm() / reference.norm()) if streamed.shape == reference.shape else math.inf
    # Rounding alone: ~1e-6 in fp32 on CPU (a wrong attention scale: 5e-3); bf16, and TF32 convolutions on
    # CUDA, round more coarsely, so there only gross differences can be told apart.
    exact = reference.device.type == "cpu" and encoder._dtype in (torch.float32, torch.float64)
    if not error < (1e-4 if exact else 3e-2):
        import transformers

        raise RuntimeError(
            f"streaming does not reproduce this Gemma 4 audio encoder (transformers {transformers.__version__}): "
            f"relative difference {error:.3g} from the offline forward on a test signal. Encode whole "
            "utterances with model.encode, and please report this with your transformers version"
        )
    model._gemma_rvq_stream_checked = True


def _check_num_quantizers(model: nn.Module, num_quantizers: Any) -> None:
    if num_quantizers is not None and (
        isinstance(num_quantizers, bool) or not isinstance(num_quantizers, int)
        or not 1 <= num_quantizers <= model.config.num_quantizers
    ):
        raise ValueError(f"num_quantizers must be an int in [1, {model.config.num_quantizers}], got {num_quantizers!r}")


def open_stream(
    model: nn.Module,
    sampling_rate: Any,
    num_quantizers: int | None = None,
    *,
    token_format: Any = None,
    lookahead_ms: float | None = None,
    context_ms: float | None = None,
) -> AudioCodeStream | TokenStream:
    """The stream behind [`GemmaRVQModel.stream`] (see there)."""
    rate = check_sampling_rate(sampling_rate)
    _check_num_quantizers(model, num_quantizers)
    family = model.config.encoder_family
    adapter = model._encoder_adapter()
    if family == "gemma4_audio":
        if lookahead_ms is not None or context_ms is not None:
            raise ValueError(
                "Gemma 4 streams exactly with its fixed lookahead (40.0625 ms at 16 kHz) and its whole left context; "
                "lookahead_ms / context_ms apply to bidirectional encoders (HuBERT, wav2vec2, Whisper) only"
            )
        encoder: Any = Gemma4StreamingEncoder(adapter.model, adapter.feature_extractor, adapter.min_samples)
        _check_against_offline(encoder, adapter)
    elif family in BIDIRECTIONAL_FAMILIES:
        if lookahead_ms is None:
            raise ValueError(
                f"a {family} encoder attends in both directions: every frame depends on the whole clip, so streamed "
                "codes cannot equal model.encode. Pass lookahead_ms= (audio each frame waits for, e.g. 500) and "
                "optionally context_ms= (left context, default 2000) to stream with windowed, approximate codes, "
                "or encode whole utterances with model.encode"
            )
        encoder = WindowedStreamingEncoder(adapter, lookahead_ms, context_ms)
    else:  # pragma: no cover - the config validates the family
        raise ValueError(f"streaming is not supported for encoder family {family!r}")
    stream = AudioCodeStream(model, encoder, rate, num_quantizers)
    if token_format is None:
        return stream
    from .tokens import format_for_model

    # a preset name is fitted to the model (K, levels); a format object or dict is used as given
    fmt = format_for_model(token_format, codebook_size=model.config.codebook_size, num_quantizers=stream._levels)
    if fmt.num_levels is not None and fmt.num_levels > stream._levels:
        raise ValueError(
            f"format {fmt.name!r} renders {fmt.num_levels} levels but the stream has {stream._levels} "
            "(num_quantizers)"
        )
    return TokenStream(stream, fmt)


__all__ = [
    "AudioCodeStream",
    "Gemma4StreamingEncoder",
    "StreamBatch",
    "StreamingTokenRenderer",
    "TokenStream",
    "WindowedStreamingEncoder",
    "open_stream",
]
