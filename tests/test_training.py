"""Stage-1 training on the committed speech corpus through a tiny random Gemma 4 audio encoder (offline)."""

from __future__ import annotations

import json
import os
import runpy
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModel

import gemma_rvq
from gemma_rvq.hub import push_model, split_card, write_model_card
from gemma_rvq.training import (
    RVQTrainer,
    RVQTrainingConfig,
    build_embedding_cache,
    build_model,
    evaluate_frames,
    initialize_from_sample,
    load_audio_splits,
    parse_args,
)

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "examples" / "configs" / "train_rvq_tiny.yaml"
QUIET = dict(disable_tqdm=True, log_with=None, make_plots=False)


def _config(tmp: Path, **overrides) -> RVQTrainingConfig:
    return RVQTrainingConfig.from_yaml(TINY_YAML, output_dir=str(tmp), **{**QUIET, **overrides})


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Train/dev caches of the corpus (25 + 10 clips, unseen voice and texts in dev), built once."""
    root = tmp_path_factory.mktemp("cache")
    cfg = _config(root / "run", cache_dir=str(root / "cache"))
    model = build_model(cfg)
    train_src, dev_src = load_audio_splits(cfg)
    assert set(dev_src["voice"]).isdisjoint(set(train_src["voice"]))
    train = build_embedding_cache(model, train_src, root / "cache" / "train", audio_column="file",
                                  batch_size=8, shard_frames=cfg.shard_frames, progress=False)
    dev = build_embedding_cache(model, dev_src, root / "cache" / "dev", audio_column="file", batch_size=8,
                                shard_frames=cfg.shard_frames, progress=False, dtype="float32")  # as train_rvq
    return root / "cache", train, dev


def test_cache_of_real_audio(caches):
    _, train, dev = caches
    assert train.num_utterances == 25 and dev.num_utterances == 10
    assert train.dim == 64 and train.num_frames > 1000
    assert abs(train.num_frames / train.seconds - 25) < 1.0  # Gemma 4: 25 frames per second
    assert set(train.languages) == {"en", "sw", "vi", "es", "fr"}
    # frames match a direct model.embed of the same clip (fp16 storage)
    cfg = _config(caches[0])
    model = build_model(cfg)
    record, emb = next(train.utterances())
    train_src, _ = load_audio_splits(cfg)
    from gemma_rvq.audio import decode_audio

    wave, sr = decode_audio(train_src[record["row"]]["file"])
    ref, mask = model.embed([wave], sampling_rate=sr)
    torch.testing.assert_close(torch.tensor(emb).float(), ref[0][mask[0]].float(), atol=2e-2, rtol=1e-2)


def test_identity_init_and_kmeans(caches):
    _, train, _ = caches
    model = build_model(_config(caches[0]))
    x = train.sample_frames(None)
    stats = initialize_from_sample(model, x, num_iters=5)
    assert torch.equal(model.in_proj.weight, torch.eye(64))
    assert stats["init_fvu"] < 0.6  # 2 x 32 codes explain most of the variance of the training frames
    # PCA in-projection when codebook_dim < dim: the projected sample is centred, variance ordered
    small = build_model(_config(caches[0], model_config={"dim": 64, "num_quantizers": 2, "codebook_size": 32,
                                                         "codebook_dim": 16}))
    initialize_from_sample(small, x, num_iters=2)
    z = small.project_in(x).detach()
    assert z.mean(0).abs().max() < 1e-3
    var = z.var(0)
    assert torch.all(var[:-1] >= var[1:] - 1e-4)


def test_train_improves_on_kmeans_init_and_exports_loadable_folders(caches, tmp_path):
    _, train, dev = caches
    # k-means on a small sample (256 frames, 1 Lloyd step): training over all data must beat it
    cfg = _config(tmp_path, max_steps=30, batch_size=128, eval_steps=10, save_steps=10, average_last_n=3,
                  kmeans_init_frames=256, kmeans_iters=1, dead_code_restart_steps=5, eval_train_frames=4096)
    trainer = RVQTrainer(build_model(cfg), cfg, train, dev)
    result = trainer.train()
    init_fvu = result.init_metrics["init_dev_fvu"]
    assert result.metrics["final"]["dev"]["fvu"] < init_fvu
    assert result.metrics["best"]["dev"]["fvu"] < init_fvu
    assert result.metrics["final"]["train"]["codebook_utilization"] >= 0.95  # no dead codes on training data
    history = json.loads((tmp_path / "history.json").read_text())
    assert [e["step"] for e in history["eval"]] == [10, 20, 30]
    best_mse = min(e["dev"]["mse"] for e in history["eval"])
    # the three exports load through the Auto classes and score what the run reported
    for name in ("best", "final", "averaged"):
        model = AutoModel.from_pretrained(tmp_path / name)
        assert isinstance(model, gemma_rvq.GemmaRVQModel)
        again = evaluate_frames(model, dev.sample_frames(None), per_level=False)
        assert again["mse"] == pytest.approx(result.metrics[name]["dev"]["mse"], rel=1e-5)
    assert result.metrics["best"]["dev"]["mse"] == pytest.approx(best_mse)
    # averaged = element-wise mean of the last 3 checkpoints
    states = [load_file(tmp_path / "checkpoints" / f"checkpoint-{s}" / "model" / "model.safetensors")
              for s in (10, 20, 30)]
    avg = load_file(tmp_path / "averaged" / "model.safetensors")
    for key in ("in_proj.weight", "out_proj.bias"):
        torch.testing.assert_close(avg[key], sum(s[key] for s in states) / 3, rtol=1e-5, atol=1e-6)
    # codebooks are averaged too: restarts (steps 5, 10) stop before the averaging window (steps 10..30), so
    # only a code that still moved far (the guard's jump test) is taken from the newest checkpoint
    info = json.loads((tmp_path / "averaged" / "training_info.json").read_text())
    assert info["averaging"]["num_checkpoints"] == 3
    cb = torch.stack([s["quantizer.codebooks"] for s in states])  # [3, Q, K, Dc]
    scale = cb[-1].norm(dim=-1).median(dim=-1).values  # [Q]
    jumped = ((cb - cb[-1]).norm(dim=-1) > 0.5 * scale[None, :, None]).any(0)  # [Q, K]
    assert info["averaging"]["codes_taken_from_newest"] == int(jumped.sum()) <= 0.05 * jumped.numel()
    expected = torch.where(jumped[..., None], cb[-1], cb.mean(0))
    torch.testing.assert_close(avg["quantizer.codebooks"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quantizer", [{"balance_weight": 1.0}, {"codebook_type": "learnable", "balance_weight": 0.0, "dead_code_threshold": 6.0}],
                         ids=["ema-balanced", "learnable"])
def test_resume_after_kill_matches_uninterrupted_run(caches, tmp_path, quantizer):
    _, train, dev = caches
    model_config = {**yaml.safe_load(TINY_YAML.read_text())["model_config"], **quantizer}
    # restarts at steps 4, 8, 12: the one at step 8 sees usage counted since step 4, across the kill
    kw = dict(max_steps=14, batch_size=128, save_steps=6, eval_steps=100, dead_code_restart_steps=4,
              kmeans_init_frames=512, kmeans_iters=2, model_config=model_config, restart_in_averaging_window=True)
    straight = RVQTrainer(build_model(_config(tmp_path / "a", **kw)), _config(tmp_path / "a", **kw), train, dev)
    assert straight.train().steps == 14
    assert json.loads((tmp_path / "a" / "checkpoints" / "checkpoint-12" / "trainer_state.json").read_text())[
        "dead_codes_restarted"] > 0
    # killed after step 8: the last checkpoint is step 6, mid-epoch (about 10 batches per epoch)
    killed_cfg = _config(tmp_path / "b", **kw)
    partial = RVQTrainer(build_model(killed_cfg), killed_cfg, train, dev).train(stop_after_step=8)
    assert not partial.completed and not (tmp_path / "b" / "final").exists()
    state = json.loads((tmp_path / "b" / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["stream"]["batch"] == 6 or state["stream"]["epoch"] == 1
    resumed_cfg = _config(tmp_path / "b", resume_from_checkpoint="latest", **kw)
    # a fresh model object: everything must come from the checkpoint
    torch.manual_seed(123)
    resumed = RVQTrainer(build_model(resumed_cfg), resumed_cfg, train, dev).train()
    assert resumed.steps == 14
    a = load_file(tmp_path / "a" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    if quantizer.get("codebook_type") == "learnable":
        assert (tmp_path / "b" / "checkpoints" / "checkpoint-6" / "quantizer_state" / "rank-0.safetensors").exists()


def test_train_in_projection_false_trains_only_the_out_projection(caches, tmp_path):
    _, train, dev = caches
    cfg = _config(tmp_path, max_steps=6, batch_size=128, eval_steps=6, save_steps=6, average_last_n=1,
                  kmeans_init_frames=512, kmeans_iters=2, learning_rate=1e-3, train_in_projection=False)
    RVQTrainer(build_model(cfg), cfg, train, dev).train()
    final = load_file(tmp_path / "final" / "model.safetensors")
    # the same data-driven init the trainer runs (deterministic for a seed)
    init = build_model(cfg)
    initialize_from_sample(init, train.sample_frames(cfg.kmeans_init_frames, seed=cfg.seed), num_iters=cfg.kmeans_iters,
                           seed=cfg.seed, batch_size=cfg.batch_size, seeding=cfg.kmeans_seeding)
    for key in ("in_norm.weight", "in_norm.bias", "in_proj.weight", "in_proj.bias"):
        assert torch.equal(final[key], init.state_dict()[key]), key
    assert not torch.equal(final["out_proj.weight"], init.state_dict()["out_proj.weight"])


def test_model_card_and_dry_run_push(caches, tmp_path):
    _, train, dev = caches
    cfg = _config(tmp_path, max_steps=6, batch_size=128, eval_steps=3, save_steps=3, make_plots=True)
    result = RVQTrainer(build_model(cfg), cfg, train, dev).train()
    folder = Path(result.folders["best"])
    assert (folder / "code_usage.png").exists() and (folder / "loss_curves.png").exists()
    readme = write_model_card(folder, variant="best", repo_id="someone/rvq-tiny")
    meta, body = split_card(readme.read_text())
    assert meta["library_name"] == "gemma-rvq" and "speech-tokenizer" in meta["tags"]
    assert meta["language"] == ["en", "sw", "vi", "es", "fr"]
    mse = result.metrics["best"]["dev"]["mse"]
    reported = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert reported["mse"] == pytest.approx(mse, rel=1e-5)
    for row in ("Reconstruction MSE", "Cosine Similarity", "Codebook Utilization", "Codebook Perplexity", "FVU"):
        assert row in body
    assert f"{mse:.4f}" in body and "0.02 | 25 |" in body  # data summary: hours, utterances
    assert 'AutoModel.from_pretrained("someone/rvq-tiny")' in body and "![Code usage per level]" in body
    # the card's numbers are those of re-evaluating the exported weights from the dev audio
    from gemma_rvq.evaluation import evaluate_audio_files

    _, dev_src = load_audio_splits(cfg)
    again = evaluate_audio_files(AutoModel.from_pretrained(folder), dev_src["file"])
    for key in ("mse", "fvu", "cosine_similarity", "codebook_utilization", "codebook_perplexity"):
        assert again[key] == pytest.approx(result.metrics["best"]["dev"][key], rel=1e-4), key
    assert again["num_frames"] == result.metrics["best"]["dev"]["num_frames"]
    assert "\n| 1 | " in body and "\n| 0 | " not in body  # level rows numbered 1..Q, as in the plots
    files = push_model(folder, "someone/rvq-tiny", dry_run=True)
    assert {"README.md", "config.json", "model.safetensors", "code_usage.png"} <= set(files)
    with pytest.raises(ValueError, match="invalid Hub repo id"):
        push_model(folder, "not a repo", dry_run=True)
    with pytest.raises(ValueError, match=r"no config\.json"):
        write_model_card(tmp_path / "checkpoints")


def test_config_yaml_and_command_line(tmp_path):
    cfg = parse_args(["--config", str(TINY_YAML), "--batch_size", "64", "--output_dir", str(tmp_path)])
    assert cfg.batch_size == 64 and cfg.model_config["codebook_size"] == 32 and cfg.tiny_encoder
    cfg.to_yaml(tmp_path / "c.yaml")
    assert RVQTrainingConfig.from_yaml(tmp_path / "c.yaml") == cfg
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"batch_sise": 3}))
    with pytest.raises(ValueError, match="batch_sise"):
        parse_args(["--config", str(tmp_path / "bad.yaml")])
    with pytest.raises(ValueError, match="lr_scheduler_type"):
        RVQTrainingConfig(lr_scheduler_type="exotic")


def test_example_script_end_to_end(caches, tmp_path):
    cache_dir = caches[0]
    main = runpy.run_path(str(ROOT / "examples" / "train_rvq.py"))["main"]
    cwd = os.getcwd()
    os.chdir(ROOT)  # the YAML's dataset path is relative to the repository
    try:
        summary = main(["--config", str(TINY_YAML), "--output_dir", str(tmp_path), "--cache_dir", str(cache_dir),
                        "--max_steps", "8", "--eval_steps", "4", "--save_steps", "4", "--disable_tqdm", "true"])
    finally:
        os.chdir(cwd)
    assert set(summary) == {"best", "final", "averaged"}
    assert 0 < summary["final"]["dev"]["fvu"] < 1.5
    for name in ("best", "final", "averaged"):
        assert (tmp_path / name / "README.md").exists()
        AutoModel.from_pretrained(tmp_path / name)
    assert any((tmp_path / "logs").rglob("events.out.tfevents.*"))  # tensorboard tracker


def test_kmeans_seeding_choice_reaches_the_init(caches):
    _, train, _ = caches
    x = train.sample_frames(None)
    codebooks = {}
    for seeding in ("kmeans++", "random"):
        model = build_model(_config(caches[0]))
        stats = initialize_from_sample(model, x, num_iters=0, seeding=seeding)
        assert stats["init_fvu"] < 1.0
        codebooks[seeding] = model.quantizer.codebooks.detach().clone()
    # with no Lloyd step the codebooks are the seeds themselves: the two schemes must pick differently
    assert not torch.equal(codebooks["kmeans++"], codebooks["random"])
    with pytest.raises(ValueError, match="kmeans_seeding"):
        _config(caches[0], kmeans_seeding="farthest")


def test_production_training_path_does_not_import_the_test_fixtures():
    # build_model(tiny_encoder=True), the trainer, the pipeline and `gemma-rvq evaluate` never load gemma_rvq.testing
    code = ("import sys; from gemma_rvq.training import RVQTrainingConfig, build_model, train_rvq; "
            "import gemma_rvq.evaluation, gemma_rvq.cli; "
            f"build_model(RVQTrainingConfig.from_yaml({str(TINY_YAML)!r})); "
            "assert 'gemma_rvq.testing' not in sys.modules, 'testing imported'")
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stderr[-2000:]


def test_tiny_encoder_option_builds_the_same_model_as_the_test_fixture(tmp_path):
    from gemma_rvq.testing import tiny_rvq_model
    from gemma_rvq.training import TINY_ENCODER_CONFIG

    cfg = _config(tmp_path)
    model = build_model(cfg)
    kwargs = dict(cfg.model_config)
    dim = kwargs.pop("dim")
    fixture = tiny_rvq_model("gemma4_audio", seed=cfg.seed, encoder_kwargs={"hidden_size": dim}, **kwargs)
    assert model.config.to_dict() == fixture.config.to_dict()
    assert model.config.encoder_config["num_hidden_layers"] == TINY_ENCODER_CONFIG["num_hidden_layers"]
    mine, theirs = model.state_dict(), fixture.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    before = torch.random.get_rng_state()
    build_model(cfg)
    assert torch.equal(before, torch.random.get_rng_state())  # seeded weights, global RNG untouched


# ------------------------------------------------------------------------------------------ output folder


def _short(tmp: Path, **overrides) -> RVQTrainingConfig:
    return _config(tmp, **{**dict(max_steps=4, batch_size=128, eval_steps=4, save_steps=2, average_last_n=2,
                                  kmeans_init_frames=256, kmeans_iters=1), **overrides})


def test_a_finished_run_folder_is_refused_unless_overwrite_or_resume(caches, tmp_path):
    _, train, dev = caches
    cfg = _short(tmp_path)
    RVQTrainer(build_model(cfg), cfg, train, dev).train()
    best = (tmp_path / "best" / "model.safetensors").read_bytes()
    # a fresh run in the folder of the finished one: refused before anything is written
    with pytest.raises(ValueError, match=r"already exists and is not empty.*resume_from_checkpoint.*overwrite_output_dir"):
        RVQTrainer(build_model(cfg), cfg, train, dev).train()
    assert (tmp_path / "best" / "model.safetensors").read_bytes() == best
    assert not (tmp_path / ".gemma-rvq.lock").exists()  # released on the error too
    # asked to overwrite: the old run's outputs go (an unrelated file stays), the new run writes its own
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "checkpoints" / "checkpoint-999").mkdir()
    over = _short(tmp_path, overwrite_output_dir=True, seed=1, max_steps=2)
    result = RVQTrainer(build_model(over), over, train, dev).train()
    assert result.steps == 2 and (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert json.loads((tmp_path / "results.json").read_text())["steps"] == 2
    # a resume is allowed into a non-empty folder (bit-exactness: test_resume_after_kill_matches_uninterrupted_run)
    resumed = _short(tmp_path, seed=1, max_steps=2, resume_from_checkpoint="latest")
    assert RVQTrainer(build_model(resumed), resumed, train, dev).train().steps == 2
    # an embedding cache inside output_dir alone (an earlier invocation that stopped while caching) is fine
    fresh = tmp_path / "fresh"
    (fresh / "embedding-cache" / "train").mkdir(parents=True)
    from gemma_rvq.training import check_output_dir

    check_output_dir(fresh, cache_dir=fresh / "embedding-cache")
    with pytest.raises(ValueError, match="not empty"):
        check_output_dir(fresh)  # the cache lives elsewhere: the folder is someone else's


def test_a_second_run_on_a_locked_folder_fails_at_once_naming_the_holder(caches, tmp_path):
    import subprocess
    import sys
    import time

    from gemma_rvq.training import OutputDirInUseError, run_lock

    _, train, dev = caches
    cfg = _short(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (tmp_path / ".gemma-rvq.lock").write_text(json.dumps(
            {"pid": holder.pid, "host": __import__("socket").gethostname(), "started": time.time(),
             "command": "python examples/train_rvq.py --config other.yaml"}))
        t0 = time.perf_counter()
        with pytest.raises(OutputDirInUseError, match=rf"pid {holder.pid} on .*other\.yaml"):
            RVQTrainer(build_model(cfg), cfg, train, dev).train()
        assert time.perf_counter() - t0 < 5  # at once: before k-means, caching or training
        assert not (tmp_path / "checkpoints").exists()
        assert json.loads((tmp_path / ".gemma-rvq.lock").read_text())["pid"] == holder.pid  # left alone
        # the whole pipeline refuses too, before it builds any embedding cache
        from gemma_rvq.training import train_rvq

        with pytest.raises(OutputDirInUseError, match=f"pid {holder.pid}"):
            train_rvq(_short(tmp_path, cache_dir=str(tmp_path / "cache")))
        assert not (tmp_path / "cache").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its stale lock is taken over, the run proceeds and releases the lock at the end
    result = RVQTrainer(build_model(cfg), cfg, train, dev).train()
    assert result.completed and not (tmp_path / ".gemma-rvq.lock").exists()
    # while a run holds the lock, the file names it; nested claims in one process (train_rvq around the
    # trainer) do not conflict
    with run_lock(tmp_path / "x") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with run_lock(tmp_path / "x"):
            pass
        assert path.exists()
    assert not path.exists()


def test_pcm_dtype_of_the_training_config_reaches_the_cache(tmp_path):
    """Integer PCM that Arrow hands back as int64 trains once the config declares its width."""
    import numpy as np
    from datasets import Dataset

    from gemma_rvq.training.pipeline import prepare_cache
    from gemma_rvq.training.trainer import make_accelerator

    with pytest.raises(ValueError, match="pcm_dtype"):
        _config(tmp_path, pcm_dtype="int24")
    cfg = _config(tmp_path / "run", pcm_dtype="int16", audio_column="audio")
    assert _config(tmp_path / "run", pcm_dtype="torch.int16").pcm_dtype == "int16"
    model, accelerator = build_model(cfg), make_accelerator(cfg)
    t = np.arange(16000) / 16000
    pcm = np.round(8000 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.int16)
    rows = Dataset.from_dict({"audio": [{"array": pcm, "sampling_rate": 16000}]})
    cache = prepare_cache(model, rows, str(tmp_path / "cache"), cfg, accelerator)
    assert cache.num_frames > 0
    with pytest.raises(ValueError, match=r"pcm_dtype='int16'"):
        prepare_cache(model, rows, str(tmp_path / "refused"), _config(tmp_path / "run2", audio_column="audio"), accelerator)
