"""The per-stream plan of [`Gemma4StreamingEncoder`]: what a push reads from a ``Gemma4AudioModel``,
resolved once per utterance, and the few-frame kernels it runs with.

- kernels with the bits of the modules they replace, cheaper for a push's few frames: the causal
  depthwise convolution as one multiply-add per tap (``_causal_depthwise``), the feature extractor's
  spectrogram arithmetic (``_log_mel``), ``Gemma4RMSNorm`` (``_norm_step``, ``_norm_fast``), activations;
- weight products of rows ``[R, K] -> [R, N]`` (``_Product``), through oneDNN-packed copies of the large
  fp32 CPU weights (``_packed_weight``, switched by ``PACK_WEIGHTS``);
- one layer's attention and convolution state (``_AttentionWindow``, ``_ConvWindow``);
- the resolved layers (``_LayerPlan``, ``_Plan``), built by ``Gemma4StreamingEncoder._make_plan``.

This file is copied next to saved checkpoints (remote code, imported by ``streaming_encoders.py``): at
module level it imports only numpy, torch and the standard library.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


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
