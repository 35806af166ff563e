"""``gemma-rvq demo``: the whole pipeline in quick mode on the committed corpus, and its report folder."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import datasets
import evaluate
import pytest
import torch
from filelock import FileLock
from PIL import Image
from transformers import AutoConfig, AutoModel

import gemma_rvq
from gemma_rvq import cli
from gemma_rvq.audio import decode_audio, prepare_waveform
from gemma_rvq.demo import LANGUAGE_NAMES, DemoResult, encoder_model_config, load_corpus, run_demo
from gemma_rvq.testing import tiny_rvq_model
from gemma_rvq.tokens import get_format

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "corpus"


@pytest.fixture(scope="session")
def demo(tmp_path_factory, worker_id):
    """One quick demo run for the whole session, shared by the pytest-xdist workers (file lock)."""
    shared = tmp_path_factory.getbasetemp()
    if worker_id != "master":  # xdist: the workers' temp folders share this run's parent folder
        shared = shared.parent
    out = shared / "gemma_rvq_demo" / "demo_output"
    with FileLock(str(shared / "gemma_rvq_demo.lock")):
        if (out / "results.json").is_file():
            return DemoResult.from_folder(out)
        (out / "work").mkdir(parents=True)
        (out / "work" / "stale.txt").write_text("from an earlier run")
        (out / "notes.txt").write_text("the user's own file")
        result = run_demo(output_dir=out, corpus_dir=CORPUS, seed=0, quick=True)
    assert DemoResult.from_folder(out) == result
    return result


def _corpus_rows():
    _, utterances, instructions = load_corpus(CORPUS)
    return utterances, instructions


def test_report_has_every_section_and_the_seed_card_table(demo):
    text = demo.report.read_text(encoding="utf-8")
    for heading in ("## Setup", "## Stage 1: the RVQ on the dev split", "## Semantic tokens",
                    "## Stage 2: Speechless", "## Stage 3: speech instructions", "## Loss curves",
                    "## Hub-ready folders", "## Timings"):
        assert heading in text, heading
    assert "RANDOM weights" in text and "--encoder rnagabh/gemma4-audio-encoder" in text
    m = demo.metrics
    # the seed card's four rows, with the values the evaluate modules computed
    assert f"| Reconstruction MSE | {m['mse']:.4f} |" in text
    assert f"| Cosine Similarity | {m['cosine_similarity']:.4f} |" in text
    assert f"| Codebook Utilization | {m['codebook_utilization']:.1%} |" in text
    assert f"| Codebook Perplexity | {m['codebook_perplexity']:.1f} (of 64) |" in text
    for row in (f"| NMSE | {m['nmse']:.4f} |", f"| FVU (fraction of variance unexplained) | {m['fvu']:.4f} |",
                f"| Centred cosine similarity | {m['centred_cosine_similarity']:.4f} |"):
        assert row in text
    assert 0 < m["codebook_utilization"] <= 1 and 1 <= m["codebook_perplexity"] <= 64
    assert 0 < m["fvu"] < 1.5 and all(math.isfinite(v) for v in m.values())
    # dev = the 10 utterances of the held-out voice
    utterances, _ = _corpus_rows()
    assert m["dev_utterances"] == sum(r["split"] == "dev" for r in utterances) == 10
    # per-step timings: six steps and a total
    assert len(demo.timings) == 6 and all(f"[{k}/6]" in name for k, name in enumerate(demo.timings, 1))
    assert re.search(r"\| total \| \d+\.\d \|", text)


def test_report_and_model_card_show_one_evaluation(demo):
    text = demo.report.read_text(encoding="utf-8")
    card = (demo.hub_folders["rvq-model"] / "README.md").read_text(encoding="utf-8")
    m = demo.metrics
    for row in (f"| Reconstruction MSE | {m['mse']:.4f} |", f"| Cosine Similarity | {m['cosine_similarity']:.4f} |",
                f"| Codebook Utilization | {m['codebook_utilization']:.1%} |"):
        assert row in text and row in card, row
    info = json.loads((demo.hub_folders["rvq-model"] / "training_info.json").read_text())
    step = info["step"]  # the step whose weights `best` holds, stated as such in the report
    assert f"The exported `best` weights (step {step} of " in text
    assert f"| Weights | `best`: the checkpoint with the lowest dev MSE (step {step}) |" in card
    # the evaluate modules, re-evaluating the exported folder from the dev audio, agree
    agree = float(re.search(r"every number agrees within (\S+?)\.\s", text).group(1))
    assert agree < 1e-3


def test_plots_are_linked_and_valid_pngs(demo):
    text = demo.report.read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {"plots/code_usage.png", "plots/loss_curves.png", "plots/token_lengths.png"} <= set(links)
    for link in links:
        path = demo.output_dir / link
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 200 and image.size[1] > 100
            image.verify()


def test_rvq_model_folder_loads_with_automodel_and_encodes(demo):
    folder = demo.hub_folders["rvq-model"]
    assert (folder / "README.md").is_file()
    model = AutoModel.from_pretrained(folder).eval()
    assert isinstance(model, gemma_rvq.GemmaRVQModel)
    assert (model.config.num_quantizers, model.config.codebook_size) == (4, 64)
    wave, rate = decode_audio(CORPUS / "clips" / "en_dev_000.flac")
    out = model.encode([prepare_waveform(wave, rate, model.config.sampling_rate)], sampling_rate=model.config.sampling_rate)
    codes = out.audio_codes
    assert codes.shape[:2] == (1, 4) and codes.shape[2] > 10
    assert int(codes.max()) < 64 and int(codes.min()) >= 0


def test_token_dataset_folder_matches_the_rvq_codes(demo, tmp_path):
    folder = demo.hub_folders["semantic-tokens"]
    assert (folder / "README.md").read_text().startswith("---\n")
    # as the Hub would load it: load_dataset reads the splits from the card's `configs`
    from_card = datasets.load_dataset(str(folder), cache_dir=str(tmp_path))
    assert {split: len(part) for split, part in from_card.items()} == {"train": 39, "dev": 12}
    tokens = datasets.load_from_disk(str(folder))
    utterances, instructions = _corpus_rows()
    spoken = [r for r in instructions if r["file"]]
    assert len(tokens["train"]) == sum(r["split"] == "train" for r in utterances + spoken)
    assert len(tokens["dev"]) == sum(r["split"] == "dev" for r in utterances + spoken)
    fmt = get_format("gemma_rvq", codebook_size=64, num_levels=4)
    for row in tokens["train"].select(range(5)):
        parsed = fmt.parse(row["semantic_tokens"])
        assert parsed.codes.tolist() == row["audio_codes"] and parsed.codes.shape[1] == row["num_frames"]
        assert row["language_name"] == LANGUAGE_NAMES[row["language"]]
    # the tokens are what the saved model gives for that clip
    model = AutoModel.from_pretrained(demo.hub_folders["rvq-model"]).eval()
    row = tokens["dev"][0]
    wave, rate = decode_audio(CORPUS / row["file"])
    codes = model.encode([prepare_waveform(wave, rate, 16000)], sampling_rate=16000).audio_codes[0]
    assert torch.equal(codes, torch.tensor(row["audio_codes"]))


def test_metric_space_folder_loads_with_evaluate(demo):
    folder = demo.hub_folders["rvq_quality"]
    assert {"app.py", "README.md", "requirements.txt", "rvq_quality.py", "rvq_functional.py"} <= {
        p.name for p in folder.iterdir()}
    metric = evaluate.load(str(folder), codebook_size=2)
    out = metric.compute(predictions=[[[1.0, 0.0], [0.0, 1.0]]], references=[[[1.0, 0.0], [0.0, 2.0]]],
                         codes=[[[0, 1]]])
    assert out["mse"] == pytest.approx(0.25) and out["codebook_perplexity"] == pytest.approx(2.0)


def test_report_lists_a_push_command_per_folder(demo):
    text = demo.report.read_text(encoding="utf-8")
    for name, folder in demo.hub_folders.items():
        assert folder.is_dir()
        rel = folder.relative_to(demo.output_dir).as_posix()
        assert re.search(rf"`gemma-rvq push \S*demo_output/{re.escape(rel)} your-name/\S+ --repo-type "
                         r"(model|dataset|space)`", text), name
    assert "--repo-type space" in text and "--repo-type dataset" in text
    assert re.search(r"Rerun: `gemma-rvq demo --output-dir \S*demo_output --seed 0`", text)
    # the push command's arguments are the CLI's
    args = cli.build_parser().parse_args(["push", "demo_output/hub/rvq_quality", "your-name/x", "--repo-type", "space"])
    assert args.func is cli.cmd_push


def test_stage2_and_stage3_ran_and_answered_the_held_out_prompt(demo):
    _, instructions = _corpus_rows()
    text_only = [r for r in instructions if not r["file"] and r["split"] == "train"]
    assert demo.generated == len(text_only) == 10 and 0 <= demo.parsed <= demo.generated
    held_out = {r["id"]: r for r in instructions if r["file"] and r["split"] == "dev"}
    assert {a["id"] for a in demo.answers} == set(held_out)
    for answer in demo.answers:
        assert answer["reference"] == held_out[answer["id"]]["response"]
        assert answer["voice"].endswith("+f5")  # the voice never heard in training
        assert answer["prompt_tokens"].startswith("<|rvq_start|>") and answer["prompt_tokens"].endswith("<|rvq_end|>")
    text = demo.report.read_text(encoding="utf-8")
    assert f"**{demo.parsed} of {demo.generated} parse**" in text
    assert 'reference: "Four."' in text
    # the stage-3 adapter and its recipe file were saved (load_sft_model reads them back)
    lora = demo.hub_folders["speech-instruct-lora"]
    assert (lora / "adapter_config.json").is_file()
    assert json.loads((lora / "gemma_rvq_recipe.json").read_text())["recipe"] == "speech_instruct"
    assert (demo.hub_folders["speechless-lm"] / "model.safetensors").is_file()


def test_rerun_replaces_only_the_demo_folders(demo):
    assert not (demo.output_dir / "work" / "stale.txt").exists()
    assert (demo.output_dir / "notes.txt").read_text() == "the user's own file"
    results = json.loads((demo.output_dir / "results.json").read_text())
    assert results["quick"] is True and results["seed"] == 0


def test_missing_corpus_fails_loudly(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*--corpus"):
        run_demo(output_dir=tmp_path / "out", corpus_dir=tmp_path / "nowhere", quick=True)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "metadata.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match=r"no instructions\.jsonl"):
        run_demo(output_dir=tmp_path / "out", corpus_dir=partial, quick=True)
    # through the command line: one clear line, non-zero exit status
    status = cli.main(["demo", "--output-dir", str(tmp_path / "out"), "--corpus", str(tmp_path / "nowhere")])
    assert status != 0
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(("family", "dim"), [("gemma4_audio", 64), ("hubert", 32)])
def test_encoder_family_is_read_from_the_encoder_config(tmp_path, family, dim):
    tiny_rvq_model(family, bundle_encoder=False, encoder_path=str(tmp_path))
    assert AutoConfig.from_pretrained(tmp_path).model_type == family
    kwargs = encoder_model_config(str(tmp_path), num_quantizers=4, codebook_size=64)
    assert kwargs == {"encoder_family": family, "encoder_name_or_path": str(tmp_path), "dim": dim,
                      "num_quantizers": 4, "codebook_size": 64}
    config = gemma_rvq.GemmaRVQConfig(**kwargs)
    assert config.frame_rate == (25 if family == "gemma4_audio" else 50)


def test_unsupported_encoder_is_refused(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path)
    with pytest.raises(ValueError, match="model_type 'bert'"):
        encoder_model_config(str(tmp_path), num_quantizers=4, codebook_size=64)


def test_continued_pretraining_runs_before_stage_3_and_is_its_base(demo):
    results = json.loads((demo.output_dir / "results.json").read_text(encoding="utf-8"))
    cpt = results["cpt"]
    # the corpus ships word timings, so interleaved documents join the three other kinds, in equal shares
    assert cpt["steps"] == 4 and set(cpt["documents"]) == {"text", "speech", "paired", "interleaved"}
    assert len(set(cpt["documents"].values())) == 1
    recipe = json.loads((demo.hub_folders["speech-instruct-lora"] / "gemma_rvq_recipe.json").read_text())
    # the base is local and has no Hub id: the Hub-ready adapter names it, never its path
    assert recipe["base_model"] is None and recipe["base_model_name"] == Path(cpt["folder"]).name == "cpt-lm"
    assert "steps of continued pretraining (`--recipe cpt`)" in demo.report.read_text(encoding="utf-8")


def test_every_hub_folder_is_hub_ready(demo):
    """What `gemma-rvq push` would upload from each folder the report lists names no local path (push would
    refuse it); the LLM folders carry a real card, and their local-paths file (never uploaded) is what lets
    them load here."""
    from gemma_rvq.cards import LOCAL_PATHS_FILE
    from gemma_rvq.formats import load_format_record
    from gemma_rvq.hub import plan_upload, split_card

    for name, folder in demo.hub_folders.items():
        assert plan_upload(folder, f"your-name/{name}").local_paths == {}, name
    tokens = demo.hub_folders["semantic-tokens"]
    assert load_format_record(tokens).speech_tokenizer == str(demo.hub_folders["rvq-model"])  # here, not uploaded
    llm_folders = [name for name in demo.hub_folders if (demo.hub_folders[name] / "gemma_rvq_recipe.json").is_file()]
    assert {"speechless-lm", "speech-instruct-lora"} <= set(llm_folders)
    for name in llm_folders:
        folder = demo.hub_folders[name]
        plan = plan_upload(folder, f"your-name/{name}")
        assert plan.local_paths == {}, name
        assert plan.ignored == [LOCAL_PATHS_FILE] and "training_args.bin" not in dict(plan.files), name
        meta, body = split_card((folder / "README.md").read_text(encoding="utf-8"))
        assert "gemma-rvq" in meta["tags"] and "fine-tuned version of None" not in body, name
        assert "`rvq-model` (local)" in body and re.search(r"\| Training data \| `[\w-]+` \(local\)", body), name
