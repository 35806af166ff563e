"""Embedding cache: writing, crash/resume, streaming order and resumability, bounded RAM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from gemma_rvq.training import cache as cache_module
from gemma_rvq.training.cache import EmbeddingCache, EmbeddingCacheWriter, FrameStream, finalize_cache


def _utterances(n: int, dim: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((int(rng.integers(5, 40)), dim)).astype(np.float32) for _ in range(n)]


def _write(path, utts, shard_frames=64, stop_after=None) -> EmbeddingCacheWriter:
    w = EmbeddingCacheWriter(path, utts[0].shape[1], shard_frames=shard_frames, metadata={"enc": "x"})
    for row in range(w.next_row, len(utts)):
        if stop_after is not None and row >= stop_after:
            return w
        w.add(f"u{row}", row, utts[row], seconds=utts[row].shape[0] / 25)
    w.close(num_rows=len(utts))
    return w


def test_write_read_roundtrip(tmp_path):
    utts = _utterances(30, 8)
    _write(tmp_path, utts)
    cache = finalize_cache(tmp_path)
    assert cache.num_utterances == 30
    assert cache.num_frames == sum(u.shape[0] for u in utts)
    assert len(cache.shards) > 3
    for (record, emb), ref in zip(cache.utterances(), utts):
        assert emb.dtype == np.float16 and record["frames"] == ref.shape[0]
        np.testing.assert_allclose(emb.astype(np.float32), ref, atol=2e-3, rtol=1e-3)
    assert cache.seconds == pytest.approx(cache.num_frames / 25)
    everything = cache.sample_frames(None)
    np.testing.assert_allclose(everything.numpy(), np.concatenate(utts), atol=2e-3, rtol=1e-3)
    sub = cache.sample_frames(50, seed=3)
    assert sub.shape == (50, 8) and torch.equal(sub, cache.sample_frames(50, seed=3))


def test_resume_after_kill_keeps_completed_and_redoes_partial(tmp_path):
    utts = _utterances(30, 8)
    ref_dir, dir_ = tmp_path / "ref", tmp_path / "killed"
    _write(ref_dir, utts)
    ref = finalize_cache(ref_dir)
    w = _write(dir_, utts, stop_after=17)  # killed while the buffer holds unflushed rows
    done = w.completed_shards
    assert done and done[-1]["end_row"] < 17
    # a shard whose .npy landed but whose sidecar did not: must be detected and redone
    orphan = dir_ / f"shard-000-{len(done):05d}.npy"
    np.save(orphan, np.ones((3, 8), np.float16))
    (dir_ / "shard-000-00099.npy.tmp-1.npy").write_bytes(b"junk")
    mtimes = {s["file"]: os.path.getmtime(dir_ / s["file"]) for s in done}
    w2 = EmbeddingCacheWriter(dir_, 8, shard_frames=64, metadata={"enc": "x"})
    assert w2.next_row == done[-1]["end_row"]
    assert not orphan.exists() and not (dir_ / "shard-000-00099.npy.tmp-1.npy").exists()
    _write(dir_, utts)  # resumes from next_row
    cache = finalize_cache(dir_)
    for s in done:  # completed shards were not rewritten
        assert os.path.getmtime(dir_ / s["file"]) == mtimes[s["file"]]
    assert cache.num_frames == ref.num_frames and cache.num_utterances == 30
    assert torch.equal(cache.sample_frames(None), ref.sample_frames(None))
    # a different source/encoder refuses to mix into the same folder
    with pytest.raises(ValueError, match="different encoder or source"):
        EmbeddingCacheWriter(dir_, 8, shard_frames=64, metadata={"enc": "other"})


def test_finalize_refuses_unfinished_rank(tmp_path):
    utts = _utterances(10, 4)
    _write(tmp_path, utts, stop_after=5)
    with pytest.raises(ValueError, match="rank 0 has not finished"):
        finalize_cache(tmp_path)
    with pytest.raises(ValueError, match="not a finished embedding cache"):
        EmbeddingCache(tmp_path)


def test_stream_is_a_shuffled_partition_and_resumes_exactly(tmp_path):
    utts = [np.full((10, 4), i, np.float32) for i in range(40)]  # frame value = utterance id
    _write(tmp_path, utts, shard_frames=50)
    cache = finalize_cache(tmp_path)
    stream = FrameStream(cache, 20, seed=1, shuffle_shards=2)
    n = stream.batches_per_epoch()
    assert n == 20  # 8 shards x 50 frames, windows of 100 frames -> 5 batches each
    epoch0 = list(stream.iter_epoch(0))
    seen = torch.cat(epoch0)[:, 0]
    assert len(epoch0) == n and all(b.shape == (20, 4) for b in epoch0)
    assert sorted(seen.tolist()) == sorted(float(i) for i in range(40) for _ in range(10))  # each frame once
    assert seen[:100].unique().numel() > 5  # frames of different utterances are mixed within a window
    assert not torch.equal(torch.cat(list(stream.iter_epoch(1))), torch.cat(epoch0))  # reshuffled per epoch
    # resume mid-epoch: identical continuation
    it = iter(FrameStream(cache, 20, seed=1))
    straight = [next(it) for _ in range(27)]
    s2 = FrameStream(cache, 20, seed=1)
    it2 = iter(s2)
    [next(it2) for _ in range(13)]
    state = s2.state_dict()
    s3 = FrameStream(cache, 20, seed=1)
    s3.load_state_dict(json.loads(json.dumps(state)))
    it3 = iter(s3)
    resumed = [next(it3) for _ in range(14)]
    assert all(torch.equal(a, b) for a, b in zip(straight[13:], resumed))
    with pytest.raises(ValueError, match="batch_size was 20"):
        FrameStream(cache, 10, seed=1).load_state_dict(state)


def test_stream_splits_batches_across_processes(tmp_path):
    utts = _utterances(40, 4)
    _write(tmp_path, utts, shard_frames=60)
    cache = finalize_cache(tmp_path)
    single = list(FrameStream(cache, 16, seed=2).iter_epoch(0))
    parts = [list(FrameStream(cache, 16, seed=2, rank=r, world_size=3).iter_epoch(0)) for r in range(3)]
    assert len({len(p) for p in parts}) == 1  # same number of steps on every process
    for g in range(3 * len(parts[0])):
        assert torch.equal(parts[g % 3][g // 3], single[g])
    with pytest.raises(ValueError, match="no full batch"):
        FrameStream(cache, 10**6)


_RAM_SCRIPT = textwrap.dedent(
    """
    import importlib.util, resource, sys, numpy as np
    # cache.py needs only numpy + torch: load it alone, skipping the (slow) transformers import
    spec = importlib.util.spec_from_file_location("rvq_cache", sys.argv[3])
    cache_mod = sys.modules["rvq_cache"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cache_mod)
    EmbeddingCacheWriter, FrameStream, finalize_cache = (
        cache_mod.EmbeddingCacheWriter, cache_mod.FrameStream, cache_mod.finalize_cache)
    path, n_utts = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(0)
    w = EmbeddingCacheWriter(path, 256, shard_frames=8192)
    for i in range(n_utts):
        w.add(str(i), i, rng.standard_normal((250, 256), dtype=np.float32))
    w.close()
    cache = finalize_cache(path)
    total = 0
    for batch in FrameStream(cache, 1024, seed=0, shuffle_shards=2).iter_epoch(0):
        total += batch.shape[0]
    print(cache.num_frames, total, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """
)


def test_peak_ram_does_not_grow_with_corpus(tmp_path):
    """1x (200 utterances, 50k frames x 256, 25 MB fp16) vs 4x (100 MB): peak RSS must stay flat."""
    rss = {}
    for scale in (1, 4):
        out = subprocess.run([sys.executable, "-c", _RAM_SCRIPT, str(tmp_path / f"c{scale}"), str(200 * scale),
                              cache_module.__file__],
                             capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        frames, streamed, maxrss_kb = map(int, out.stdout.split())
        assert frames == 50_000 * scale and streamed > 0.9 * frames
        rss[scale] = maxrss_kb / 1024
    data_growth_mb = 3 * 50_000 * 256 * 2 / 2**20  # 73 MB more data on disk
    assert rss[4] - rss[1] < 0.25 * data_growth_mb, rss


# ---------------------------------------------------------------------------------------------- audio input
# The issue-10 audio-input cases through build_embedding_cache (it reads audio only through gemma_rvq.audio).
@pytest.fixture(scope="module")
def tiny_model():
    from gemma_rvq.testing import tiny_rvq_model

    return tiny_rvq_model(num_quantizers=2, codebook_size=16, seed=0).eval()


def _speech(seconds: float = 1.0, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32)


def _build(model, rows, path, **kwargs):
    from datasets import Dataset

    from gemma_rvq.training.cache import build_embedding_cache

    return build_embedding_cache(model, Dataset.from_dict({"audio": rows}), path, progress=False, **kwargs)


def test_cache_audio_input_int_pcm_needs_a_width(tiny_model, tmp_path):
    wave = _speech()
    pcm = np.round(wave * 32767).astype(np.int16)
    ref = _build(tiny_model, [{"array": pcm.astype(np.float32) / 32768, "sampling_rate": 16000}], tmp_path / "f")
    rows = [{"array": pcm, "sampling_rate": 16000}]  # Arrow hands the int16 samples back as int64
    with pytest.raises(ValueError, match=r"row 0 \('audio'\).*pcm_dtype='int16'"):
        _build(tiny_model, rows, tmp_path / "refused")
    cache = _build(tiny_model, rows, tmp_path / "declared", pcm_dtype="int16")
    assert torch.equal(cache.sample_frames(None), ref.sample_frames(None))


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"array": _speech() * 32767, "sampling_rate": 16000}, "float samples reach"),
        ({"array": _speech(), "sampling_rate": 16}, r"\[1000, 384000\].*did you mean 16000 Hz"),
        ({"array": _speech(), "sampling_rate": 0}, r"\[1000, 384000\]"),
    ],
    ids=["unscaled-float", "rate-16", "rate-0"],
)
def test_cache_audio_input_refusals_name_the_row(tiny_model, tmp_path, row, match):
    good = {"array": _speech(), "sampling_rate": 16000}
    with pytest.raises(ValueError, match=rf"row 1 \('audio'\).*{match}"):
        _build(tiny_model, [good, row], tmp_path / "c")


def test_cache_truncated_wav_and_stereo(tiny_model, tmp_path):
    import soundfile

    from gemma_rvq.training.cache import build_embedding_cache

    wave = _speech(2.0)
    full, cut = tmp_path / "full.wav", tmp_path / "cut.wav"
    soundfile.write(full, np.stack([wave, wave], axis=1), 16000, subtype="PCM_16")  # stereo file
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    cache = build_embedding_cache(tiny_model, [str(full)], tmp_path / "ok", progress=False)
    assert cache.num_utterances == 1  # one utterance for the two channels
    decoded = soundfile.read(full, dtype="float32")[0].mean(axis=1)
    mono = _build(tiny_model, [{"array": decoded, "sampling_rate": 16000}], tmp_path / "m")
    assert torch.equal(cache.sample_frames(None), mono.sample_frames(None))
    with pytest.raises(ValueError, match=r"row 1 .*truncated"):
        build_embedding_cache(tiny_model, [str(full), str(cut)], tmp_path / "bad", progress=False)


# ---------------------------------------------------------------------------------------------- integrity
@pytest.mark.parametrize("damage", ["overwritten-same-size", "truncated", "missing"])
def test_damaged_shard_is_named_before_training_and_rebuilt(tmp_path, damage, caplog):
    utts = _utterances(30, 8)
    _write(tmp_path / "ref", utts)
    reference = finalize_cache(tmp_path / "ref").sample_frames(None)
    path = tmp_path / "cache"
    _write(path, utts)
    cache = finalize_cache(path)
    victim = path / cache.shards[2].file
    stat = victim.stat()
    if damage == "overwritten-same-size":
        arr = np.load(victim)
        np.save(victim, (arr.astype(np.float32) * 1000).astype(np.float16))  # same shape, same size
        os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old modification time
        assert victim.stat().st_size == stat.st_size
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[: stat.st_size // 2])
    else:
        victim.unlink()
    with pytest.raises(ValueError, match=rf"{victim.name}: .*Rebuild it: run the same training again"):
        EmbeddingCache(path)  # what the trainer opens: refused before any batch is read
    with caplog.at_level("WARNING"):
        _write(path, utts)  # the resume every training run starts with: re-encodes the damaged shard
    assert victim.name in caplog.text and "re-encoding rows" in caplog.text
    rebuilt = finalize_cache(path)
    assert torch.equal(rebuilt.sample_frames(None), reference)
    record = json.loads((path / "index.json").read_text())["shards"][2]
    assert record["checksum"].startswith("xxh3_128:") and record["bytes"] == victim.stat().st_size
