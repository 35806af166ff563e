"""gemma_rvq.hub: Space folders for the metrics (dry run, no network) and the generic push helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from huggingface_hub import SpaceCard, metadata_load

from gemma_rvq import hub
from gemma_rvq.metrics import METRICS, functional, module_path


@pytest.fixture(scope="module")
def spaces(tmp_path_factory):
    root = tmp_path_factory.mktemp("spaces")
    return {
        name: Path(hub.push_metric(name, f"someone/{name}", folder=root / name, dry_run=True))
        for name in METRICS
    }


def test_metric_space_folder_contents(spaces):
    for name, folder in spaces.items():
        assert folder.name == name
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            ["README.md", "app.py", f"{name}.py", "requirements.txt", "rvq_functional.py"]
        )
        meta = metadata_load(folder / "README.md")
        assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
        assert meta["sdk_version"] == hub.METRIC_SPACE_GRADIO_VERSION
        assert {"evaluate", "metric"} <= set(meta["tags"])
        assert meta["title"] and meta["description"]
        card = SpaceCard.load(folder / "README.md")
        assert card.data.sdk == "gradio"
        assert f"# Metric Card for {meta['title']}" in card.text

        app = (folder / "app.py").read_text()
        compile(app, "app.py", "exec")
        assert "launch_gradio_widget(module)" in app and f'"{name}.py"' in app
        assert ("codebook_size=2048" in app) == (name not in ("reconstruction_mse", "cosine_similarity",
                                                              "unit_error_rate"))
        requirements = (folder / "requirements.txt").read_text().split()
        assert any(r.startswith("evaluate") for r in requirements) and "torch" in requirements

        source = (folder / f"{name}.py").read_text()
        assert "gemma_rvq" not in source.replace("https://github.com/gemma-rvq/gemma-rvq", "")
        assert "from .rvq_functional import" in source
        assert (folder / "rvq_functional.py").read_text() == Path(functional.__file__).read_text()
        # the card shipped in the package is the Space's card
        assert metadata_load(Path(module_path(name), "README.md"))["title"] == meta["title"]


_LOAD_WITHOUT_PACKAGE = textwrap.dedent(
    """
    import json, sys

    class Block:  # gemma_rvq is installed in this venv: make it unimportable
        def find_spec(self, name, path=None, target=None):
            if name == "gemma_rvq" or name.startswith("gemma_rvq."):
                raise ModuleNotFoundError(f"No module named {name!r}")

    sys.meta_path.insert(0, Block())
    import evaluate

    root, package_module = sys.argv[1], sys.argv[2]
    frames = dict(predictions=[[[1.0, 2.0], [3.0, 4.0]]], references=[[[1.0, 2.0], [3.0, 2.0]]])
    calls = {
        "reconstruction_mse": ({}, frames),
        "cosine_similarity": ({}, frames),
        "codebook_utilization": ({"codebook_size": 4}, dict(predictions=[[[0, 1, 1], [2, 2, 2]]])),
        "codebook_perplexity": ({"codebook_size": 4}, dict(predictions=[[[0, 1, 2, 3], [0, 0, 0, 0]]])),
        "rvq_quality": ({"codebook_size": 2}, dict(**frames, codes=[[[0, 1]]])),
    }
    out = {}
    for name, (options, inputs) in calls.items():
        metric = evaluate.load(f"{root}/{name}", keep_in_memory=True, **options)
        out[name] = metric.compute(**inputs)
    try:
        evaluate.load(package_module)
        out["control"] = "loaded"
    except ImportError as err:
        out["control"] = str(err)
    out["imported"] = sorted(m for m in sys.modules if m.startswith("gemma_rvq"))
    print(json.dumps(out))
    """
)


def test_space_modules_load_without_gemma_rvq(spaces, tmp_path):
    root = next(iter(spaces.values())).parent
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_PACKAGE, str(root), module_path("codebook_perplexity")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["imported"] == []
    assert "gemma_rvq" in out["control"]  # the package-shipped module does need the package
    # hand values: error 4 over 4 elements, energy 18, spread 2; cosines 1 and 17 / (5 sqrt 13)
    assert out["reconstruction_mse"] == pytest.approx(
        {"mse": 1.0, "nmse": 4 / 18, "fvu": 2.0, "num_frames": 2}
    )
    assert out["cosine_similarity"]["cosine_similarity"] == pytest.approx((1 + 17 / (5 * 13**0.5)) / 2)
    assert out["codebook_utilization"]["codebook_utilization"] == 0.375
    assert out["codebook_perplexity"]["codebook_perplexity"] == pytest.approx(2.5)
    assert out["rvq_quality"]["fvu"] == pytest.approx(2.0)
    assert out["rvq_quality"]["codebook_perplexity"] == pytest.approx(2.0)


def test_write_space_folder_and_cards(tmp_path):
    (tmp_path / "src.txt").write_text("copied")
    folder = hub.write_space_folder(
        tmp_path / "demo",
        metadata={"title": "Demo", "sdk": "gradio", "tags": ["speech"]},
        readme_body="# Demo\n\nHello.\n",
        files={"app.py": "print('hi')\n", "assets/logo.bin": b"\x00\x01", "copy.txt": tmp_path / "src.txt"},
        requirements=["numpy"],
    )
    assert (folder / "assets" / "logo.bin").read_bytes() == b"\x00\x01"
    assert (folder / "copy.txt").read_text() == "copied"
    assert (folder / "requirements.txt").read_text() == "numpy\n"
    meta, body = hub.split_card((folder / "README.md").read_text())
    assert meta == {"title": "Demo", "sdk": "gradio", "tags": ["speech"], "app_file": "app.py"}
    assert body.strip() == "# Demo\n\nHello."
    assert hub.split_card(hub.join_card(meta, body)) == (meta, body)
    assert hub.split_card("no header") == ({}, "no header")

    with pytest.raises(ValueError, match="app_file"):
        hub.write_space_folder(tmp_path / "x", metadata={"sdk": "gradio"}, readme_body="", files={})
    with pytest.raises(ValueError, match="sdk"):
        hub.write_space_folder(tmp_path / "x", metadata={}, readme_body="", files={"app.py": ""})
    with pytest.raises(ValueError, match="inside the folder"):
        hub.write_space_folder(
            tmp_path / "x", metadata={"sdk": "static"}, readme_body="", files={"../escape.txt": "x"}
        )


def test_push_validates_before_any_network_call(tmp_path):
    # every case fails on its arguments before huggingface_hub is asked anything
    with pytest.raises(ValueError, match="unknown metric"):
        hub.push_metric("bleu", "someone/bleu")
    with pytest.raises(ValueError, match="repo id"):
        hub.push_metric("rvq_quality", "bad id with spaces", dry_run=True)
    with pytest.raises(ValueError, match="repo_type"):
        hub.push_folder(tmp_path, "someone/x", repo_type="spaces")
    with pytest.raises(ValueError, match="space_sdk"):
        hub.push_folder(tmp_path, "someone/x", repo_type="space")  # no README header, no sdk
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "secret.txt").write_text("x")
    with pytest.raises(ValueError, match=r"secret\.txt"):
        hub.push_metric("rvq_quality", "someone/rvq_quality", folder=stale, dry_run=True)
    with pytest.raises(ValueError, match="not a folder"):
        hub.push_folder(tmp_path / "missing", "someone/x")


@pytest.mark.parametrize(("family", "fps"), [("gemma4_audio", 25), ("whisper", 50)])
def test_model_card_frame_rate_and_bitrate_come_from_the_config(tmp_path, family, fps):
    from gemma_rvq import GemmaRVQConfig

    config = GemmaRVQConfig(encoder_family=family, encoder_name_or_path=None, dim=8, num_quantizers=2,
                            codebook_size=16)
    config.save_pretrained(tmp_path)
    body = hub.split_card(hub.write_model_card(tmp_path).read_text())[1]
    assert f"| Frame rate | {config.frame_rate:g} frames/s |" in body and config.frame_rate == fps
    assert f"| Bitrate | {2 * 4 * fps} bit/s |" in body  # Q x log2(K) x frames/s
