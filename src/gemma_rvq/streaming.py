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

The encoders are in ``streaming_encoders.py``, the exact encoder's per-stream plan and kernels in
``streaming_plan.py``; this module holds the streams, the token renderer and ``open_stream``.

This file is copied next to saved checkpoints (remote code, imported by ``modeling_gemma_rvq.py``, with the
two above): at module level it imports only numpy, torch, transformers and its flat siblings.
"""

from __future__ import annotations

import math
import sys
import types
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import search, streaming_plan
from .audio import check_sampling_rate, to_float_mono
from .streaming_encoders import Gemma4StreamingEncoder, WindowedStreamingEncoder

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


class _StreamingModule(types.ModuleType):
    """This module, with ``PACK_WEIGHTS`` read from and set on ``streaming_plan`` (where the plan reads it), so
    that the documented switch ``gemma_rvq.streaming.PACK_WEIGHTS = False`` keeps working."""

    @property
    def PACK_WEIGHTS(self) -> bool:
        return streaming_plan.PACK_WEIGHTS

    @PACK_WEIGHTS.setter
    def PACK_WEIGHTS(self, value: bool) -> None:
        streaming_plan.PACK_WEIGHTS = value


sys.modules[__name__].__class__ = _StreamingModule

__all__ = [
    "AudioCodeStream",
    "Gemma4StreamingEncoder",
    "StreamBatch",
    "StreamingTokenRenderer",
    "TokenStream",
    "WindowedStreamingEncoder",
    "open_stream",
]
