"""Shared fixtures: synthetic speech-like audio and tiny gemma-rvq models (real transformers classes)."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def load_script(relative: str, name: str | None = None) -> types.ModuleType:
    """The repository script ``relative`` (``"examples/sft.py"``, ``"benchmarks/bench_train.py"``...) imported
    as a module named ``name`` (default: its stem) and registered in ``sys.modules`` under that name, as
    dataclasses need to resolve their annotations."""
    path = REPO / relative
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def speech_like(seconds: float, sampling_rate: int = 22050, seed: int = 0) -> np.ndarray:
    """A deterministic speech-like float32 waveform ``[S]`` in [-1, 1].

    Voiced segments (a gliding 90-220 Hz fundamental with decaying harmonics shaped by two moving
    formant-like resonances), syllable-rate (4 Hz) amplitude modulation, short pauses and a little noise.
    """
    rng = np.random.default_rng(seed)
    n = max(1, round(seconds * sampling_rate))
    t = np.arange(n) / sampling_rate
    f0 = 150 + 60 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, np.pi)) + 10 * rng.standard_normal() * np.sin(
        2 * np.pi * 3.1 * t
    )
    phase = 2 * np.pi * np.cumsum(f0) / sampling_rate
    formant1 = 500 + 200 * np.sin(2 * np.pi * 1.3 * t)
    formant2 = 1500 + 400 * np.sin(2 * np.pi * 0.9 * t + 1.0)
    wave = np.zeros(n)
    for h in range(1, 25):
        freq = h * f0
        gain = np.exp(-(((freq - formant1) / 250) ** 2)) + 0.5 * np.exp(-(((freq - formant2) / 350) ** 2)) + 0.02
        gain = np.where(freq < sampling_rate / 2, gain, 0.0)
        wave += gain * np.sin(h * phase) / h
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, np.pi))) ** 2
    pauses = (np.sin(2 * np.pi * 0.37 * t + rng.uniform(0, np.pi)) > -0.8).astype(float)
    wave = wave * envelope * pauses + 0.01 * rng.standard_normal(n)
    wave = 0.5 * wave / max(1e-6, np.abs(wave).max())
    return wave.astype(np.float32)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures(...)``): tiny
    models run fastest so, and two workers under ``pytest -n 2`` do not oversubscribe the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_speech():
    """Factory: ``make_speech(seconds, sampling_rate=22050, seed=0) -> float32 [S]``."""
    return speech_like


@pytest.fixture(scope="session")
def speech_22k() -> tuple[np.ndarray, int]:
    """``(wave, 22050)``: 3 s of speech-like audio at 22.05 kHz (the corpus rate)."""
    return speech_like(3.0, 22050, seed=1), 22050


@pytest.fixture(scope="session")
def speech_16k() -> tuple[np.ndarray, int]:
    """``(wave, 16000)``: 3 s of speech-like audio at 16 kHz (the encoders' rate)."""
    return speech_like(3.0, 16000, seed=2), 16000


@pytest.fixture(scope="session")
def tiny_gemma4_rvq():
    """A GemmaRVQModel (eval) over a tiny random Gemma 4 audio encoder, bundled: Q=2, K=16, dim 64.

    Session-scoped: tests must not modify it (copy.deepcopy it first).
    """
    from gemma_rvq.testing import tiny_rvq_model

    model = tiny_rvq_model("gemma4_audio", num_quantizers=2, codebook_size=16, seed=0)
    return _fit_codebooks(model)


@pytest.fixture(scope="session")
def tiny_hubert_rvq():
    """A GemmaRVQModel (eval) over a tiny random HuBERT (LayerNorm feature encoder, layer 2 of 3), bundled.

    Session-scoped: tests must not modify it.
    """
    from gemma_rvq.testing import tiny_rvq_model

    model = tiny_rvq_model(
        "hubert", num_quantizers=2, codebook_size=16, seed=0, encoder_layer=2,
        encoder_kwargs={"feat_extract_norm": "layer"},
    )
    return _fit_codebooks(model)


def _fit_codebooks(model):
    """k-means-initialise the codebooks on embeddings of speech-like audio, so codes are diverse."""
    clips = [speech_like(3.0, 16000, seed=s) for s in range(2)]
    embeddings, mask = model.embed(clips, sampling_rate=16000)
    with torch.no_grad():
        model.quantizer.kmeans_init(model.project_in(embeddings[mask]))
    return model
