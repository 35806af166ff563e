"""The streaming encoders: samples in, final frame embeddings out, behind [`AudioCodeStream`].

- [`Gemma4StreamingEncoder`]: exact, incremental ``Gemma4AudioModel`` (per-layer key/value and convolution
  caches; its per-stream plan and kernels are in ``streaming_plan.py``);
- [`WindowedStreamingEncoder`]: approximate, for encoders that attend both ways (HuBERT, wav2vec2,
  Whisper): re-encodes a bounded window per push.

This file is copied next to saved checkpoints (remote code, imported by ``streaming.py``): at module level
it imports only numpy, torch and its flat siblings.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .streaming_plan import (
    _activation,
    _AttentionWindow,
    _causal_depthwise,
    _clip_bounds,
    _ConvWindow,
    _depthwise_taps,
    _feed_forward,
    _fp32,
    _LayerPlan,
    _log_mel,
    _packed_weight,
    _Plan,
    _Product,
    _RMSNorm,
)


# ============================================================================================ Gemma 4: exact
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
