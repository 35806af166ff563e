"""The encoder's compute dtype of a transform: ``dtype="auto"`` picks it per device, by measurement.

A frozen speech encoder dominates tokenization, and bfloat16 can run it up to ~2x faster where the hardware
has bf16 arithmetic (CPUs with AVX512-BF16 or AMX, NVIDIA GPUs from Ampere on), and several times *slower*
where it does not (the CPU then emulates it). bf16 also changes the codes: at the Gemma 4 encoder's full
size about 1-5 % of level-0 codes differ from float32 (the seed model card runs its encoder in bf16). So:

- :func:`native_bf16` says whether a device has bf16 arithmetic (CPU flags, CUDA compute capability read
  through NVML so that a parent process never initialises CUDA before ``datasets`` forks its workers);
- :func:`measure_encoder_dtype` times the model's own encoder in float32 and in bfloat16 on a few seconds
  of synthetic audio (each twice, alternating) and keeps bf16 only when it runs at least
  :data:`MIN_SPEEDUP` times faster;
- :class:`Precision` is what a transform runs: the encoder in one dtype, the quantizer (projections and
  nearest-code search) in float32 or wider. It is part of the transform's cache identity.

On a CPU without bf16 arithmetic, and on devices other than CPU and CUDA, ``"auto"`` is float32 without any
timing; on CUDA it is bf16 from compute capability 8.0 on (measured on an H200: ``model.encode`` 834x real
time in bf16 against 648x in float32, the encoder alone 4480x in bf16).
"""

from __future__ import annotations

import copy
import logging
import os
import platform
import subprocess
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

MIN_SPEEDUP = 1.15
"""bf16 must run the encoder at least this many times faster than float32 for ``"auto"`` to pick it: a
margin, so that timing noise on a near tie cannot flip the choice (and with it the codes) between runs."""

PROBE_SECONDS = 4.0
"""Seconds of synthetic audio each timing encodes."""

_CHOICES: dict[tuple, str] = {}  # (model identity, device, threads) -> chosen dtype name, per process
_CHOICE_LOCK = threading.Lock()


@dataclass(frozen=True)
class Precision:
    """The dtypes a transform computes in; ``None`` leaves the model's own dtype."""

    encoder: str | None
    quantizer: str | None

    @classmethod
    def for_encoder(cls, encoder_dtype: str | None) -> Precision:
        """The encoder in ``encoder_dtype``; the quantizer in float32, or float64 with a float64 encoder.
        ``None``: nothing is cast (the model as given)."""
        if encoder_dtype is None:
            return cls(None, None)
        quantizer = torch.promote_types(torch.float32, getattr(torch, encoder_dtype))
        return cls(encoder_dtype, str(quantizer).removeprefix("torch."))

    def as_dict(self) -> dict[str, str | None]:
        return {"encoder": self.encoder, "quantizer": self.quantizer}


# ---------------------------------------------------------------------------------------------- hardware
def _cpu_flags() -> set[str]:
    """Feature flags of this CPU (Linux ``/proc/cpuinfo``; macOS ``sysctl``); empty when unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=5)  # fmt: skip
            return {"bf16"} if out.stdout.strip() == "1" else set()
        except (OSError, subprocess.SubprocessError):
            return set()
    return set()


def _cuda_capability(index: int) -> tuple[int, int] | None:
    """Compute capability of CUDA device ``index``, without initialising CUDA in this process when it is not
    yet (NVML through ctypes, as ``torch.cuda`` counts devices); None when it cannot be read."""
    if torch.cuda.is_initialized():
        return torch.cuda.get_device_capability(index)
    from ctypes import CDLL, byref, c_int, c_void_p

    try:
        nvml = CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() != 0:
            return None
        try:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            if visible:  # NVML counts physical devices; CUDA_VISIBLE_DEVICES renumbers them
                ids = [v.strip() for v in visible.split(",") if v.strip()]
                if index >= len(ids) or not ids[index].isdigit():
                    return None
                index = int(ids[index])
            handle, major, minor = c_void_p(), c_int(), c_int()
            if nvml.nvmlDeviceGetHandleByIndex_v2(index, byref(handle)) != 0:
                return None
            if nvml.nvmlDeviceGetCudaComputeCapability(handle, byref(major), byref(minor)) != 0:
                return None
            return major.value, minor.value
        finally:
            nvml.nvmlShutdown()
    except (OSError, AttributeError):
        return None


def native_bf16(device: torch.device | str) -> bool:
    """True when ``device`` has bf16 arithmetic: a CPU with AVX512-BF16 or AMX-BF16 (x86) or BF16 (Arm), a
    CUDA GPU of compute capability >= 8.0. Elsewhere bf16 is emulated (slow) or unknown: False."""
    device = torch.device(device)
    if device.type == "cpu":
        flags = _cpu_flags()
        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    if device.type == "cuda":
        capability = _cuda_capability(device.index or 0)
        return capability is not None and capability >= (8, 0)
    return False


# ---------------------------------------------------------------------------------------------- timing
def _time_encode(adapter, clips: list[np.ndarray]) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        adapter.forward_batch(clips)
    return time.perf_counter() - start


def measure_encoder_dtype(model: torch.nn.Module, seconds: float = PROBE_SECONDS) -> tuple[str, dict]:
    """Time ``model``'s encoder (a ``GemmaRVQModel``'s, on its device) in float32 and in bfloat16.

    Each dtype encodes ``seconds`` of synthetic audio once to warm up, then twice more, alternating; the
    best time of each counts. bf16 runs on a copy of the encoder (the model is not changed).

    Returns:
        ``("bfloat16" or "float32", {"float32": s, "bfloat16": s})``: bf16 when it ran at least
        :data:`MIN_SPEEDUP` times faster.
    """
    adapter = model._encoder_adapter()
    fp32 = copy.copy(adapter)
    if adapter.dtype != torch.float32:
        fp32.model = copy.deepcopy(adapter.model).to(torch.float32)
    bf16 = copy.copy(adapter)
    bf16.model = copy.deepcopy(adapter.model).to(torch.bfloat16)
    rng = np.random.default_rng(0)
    clips = [(0.1 * rng.standard_normal(int(seconds * adapter.sampling_rate))).astype(np.float32)]
    times = {"float32": float("inf"), "bfloat16": float("inf")}
    for adapter_ in (fp32, bf16):  # warm-up: first calls allocate and pick kernels
        _time_encode(adapter_, clips)
    for _ in range(2):
        for name, adapter_ in (("float32", fp32), ("bfloat16", bf16)):
            times[name] = min(times[name], _time_encode(adapter_, clips))
    del bf16
    choice = "bfloat16" if times["float32"] >= MIN_SPEEDUP * times["bfloat16"] else "float32"
    return choice, times


def choose_encoder_dtype(device: torch.device, load_model, key: tuple) -> str:
    """``dtype="auto"`` on ``device``: float32 where bf16 is not native; bf16 on CUDA where it is; on a CPU
    with native bf16, whichever :func:`measure_encoder_dtype` finds faster for the model ``load_model()``
    returns. Decided once per (``key``, device, torch threads) and process, and logged."""
    device = torch.device(device)
    if not native_bf16(device):
        return "float32"
    if device.type != "cpu":
        return "bfloat16"
    full_key = (key, str(device), torch.get_num_threads())
    with _CHOICE_LOCK:
        if full_key not in _CHOICES:
            choice, times = measure_encoder_dtype(load_model())
            _CHOICES[full_key] = choice
            logger.info(
                "gemma-rvq: dtype='auto' chose %s for the encoder on %s (%.2f s in float32, %.2f s in bfloat16 "
                "for %.0f s of audio); pass dtype= to fix it", choice, device, times["float32"], times["bfloat16"],
                PROBE_SECONDS,
            )
        return _CHOICES[full_key]


__all__ = ["MIN_SPEEDUP", "PROBE_SECONDS", "Precision", "choose_encoder_dtype", "measure_encoder_dtype", "native_bf16"]
