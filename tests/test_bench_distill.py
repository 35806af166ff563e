"""benchmarks/bench_distill.py: its splits keep dev and test apart from every training set, the transfer set is
prompts in fresh voices without answers, and the whole benchmark runs end to end at toy size (--quick, one
configuration per kind, one reported seed: seconds)."""

from __future__ import annotations

import json

import pytest

from conftest import load_script

pytest.importorskip("sacrebleu", reason="bench_distill scores answers with sacrebleu (gemma-rvq[bench])")


def _bench():
    return load_script("benchmarks/bench_distill.py")


def test_splits_are_disjoint_by_voice_and_question():
    bench = _bench()
    sets = bench.make_sets()
    assert sets == bench.make_sets()  # fixed data, whatever the run seed
    voices = {name: {row["voice"] for row in rows} for name, rows in sets.items()}
    questions = {name: {row["question"] for row in rows} for name, rows in sets.items()}
    # no dev or test voice in any training set, and dev and test voices differ
    for held in ("dev", "test"):
        assert not voices[held] & (voices["teacher"] | voices["student"] | voices["transfer"])
    assert not voices["dev"] & voices["test"]
    # the transfer set: every question, in voices of no other set
    assert voices["transfer"] == set(bench.TRANSFER_VOICES) and questions["transfer"] == set(range(24))
    assert not voices["transfer"] & set().union(*(v for name, v in voices.items() if name != "transfer"))
    # the teacher knows every question; the students only theirs; dev and test hold out different ones
    assert questions["teacher"] == set(range(24)) and questions["student"] == set(bench.STUDENT_QUESTIONS)
    assert questions["dev"] - questions["student"] == set(bench.DEV_QUESTIONS)
    assert questions["test"] - questions["student"] == set(bench.TEST_QUESTIONS)
    assert not set(bench.DEV_QUESTIONS) & set(bench.TEST_QUESTIONS)
    assert len(sets["teacher"]) > 5 * len(sets["student"])  # the teacher knows more
    for row in sets["test"]:
        assert row["group"] == ("student-questions" if row["question"] in bench.STUDENT_QUESTIONS
                                else "held-out-questions")
    # the same budget for every kind: one learning rate x steps grid, then as many configurations each
    best = {"learning_rate": 1e-3, "max_steps": 100}
    for kind in bench.KINDS:
        assert [(c["learning_rate"], c["max_steps"]) for c in bench.stage1_grid(kind).values()] == \
            [(c["learning_rate"], c["max_steps"]) for c in bench.stage1_grid("ce").values()]
        assert len(bench.stage2_grid(kind, best)) == len(bench.stage2_grid("ce", best))
        assert all(c["max_steps"] == 100 for c in bench.stage2_grid(kind, best).values())  # the same steps
    assert all(c["kl_weight"] == c["hidden_weight"] == c["attention_weight"] == 0 and not c.get("transfer")
               for kind in ("ce",) for c in [*bench.stage1_grid(kind).values(), *bench.stage2_grid(kind, best).values()])
    assert all(c["transfer"] for c in bench.stage2_grid("distill+transfer", best).values())
    assert not any(c.get("transfer") for c in bench.stage1_grid("distill").values())


def test_bench_distill_quick_runs_tunes_on_dev_and_reports_test(tmp_path, capsys):
    bench = _bench()
    out = bench.main(["--quick", "--seeds", "1", "--output-dir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert set(out["chosen"]) == set(bench.KINDS)
    kinds = [entry["kind"] for entry in out["tuning"].values()]
    assert kinds.count("ce") == kinds.count("distill") == kinds.count("distill+transfer") == 1
    for entry in out["tuning"].values():  # tuning saw the dev split only
        assert entry["dev"]["rows"] > 0 and entry["dev"]["loss"] > 0
    assert out["tuning"][out["chosen"]["ce"]]["config"]["kl_weight"] == 0
    for row in ("teacher", "pruned, untrained", *bench.KINDS):
        assert len(out["table"][row]["test/all/loss"]) == 1
        assert 0 <= out["table"][row]["test/held-out-questions/accuracy"][0] <= 100
    for kind in ("distill", "distill+transfer"):
        diff = out["paired_minus_ce"][kind]["test/all/loss"][0]
        assert diff == pytest.approx(out["table"][kind]["test/all/loss"][0] - out["table"]["ce"]["test/all/loss"][0])
        assert f"| {kind} - ce, paired by seed |" in printed
    assert "Tuning (seed 0's teacher, dev split" in printed
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["chosen"] == out["chosen"] and saved["setup"]["rows"]["student"] == 56
    # the transfer file the recipe reads holds prompts only: the teacher writes the answers
    transfer_rows = [json.loads(line) for line in (tmp_path / "data" / "transfer.jsonl").read_text().splitlines()]
    assert transfer_rows and all(set(row) == {"semantic_tokens"} for row in transfer_rows)
    if out["plot"]:
        assert (tmp_path / "results.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--seeds", "0", "--output-dir", str(tmp_path)])  # the tuning seed


def test_speech_sets_from_the_committed_clips_keep_every_voice_in_one_split():
    """--data speech: the committed data/distill_speech clips; dev/test voices are in no training set, the transfer
    voices in no labelled set, and the students get the corpus' spoken questions in its two train voices."""
    import soundfile as sf

    bench = _bench()
    rows = bench.load_speech_rows()
    sets = bench.speech_sets(rows)
    voices = {name: {row["variant"] for row in part} for name, part in sets.items()}  # a voice speaks en and sw
    questions = {name: {row["question"] for row in part} for name, part in sets.items()}
    for i, a in enumerate(bench.SPEECH_SPLITS):
        for b in bench.SPEECH_SPLITS[i + 1:]:
            assert not voices[a] & voices[b], (a, b)
        assert len(questions[a]) == 24 and len(sets[a]) == 24 * len(voices[a])  # every question in every voice
    assert voices["student"] <= voices["teacher"]
    assert voices["student"] == set(bench.SPEECH_STUDENT_VOICES)
    assert not voices["transfer"] & (voices["teacher"] | voices["student"] | voices["dev"] | voices["test"])
    assert len(questions["student"]) == 2 * bench.SPOKEN_QUESTIONS and len(sets["student"]) == 28
    assert {row["group"] for row in sets["student"]} == {"student-questions"}
    assert {row["group"] for row in sets["test"]} == {"student-questions", "held-out-questions"}
    assert len(sets["teacher"]) > 5 * len(sets["student"])  # the teacher knows more
    for row in rows[::37]:
        info = sf.info(row["path"])
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert info.frames / 16000 == pytest.approx(row["duration"], abs=1e-5)
    # the same tuning grid for every kind
    grids = {kind: [(c["learning_rate"], c["max_steps"]) for c in bench.speech_grid(kind).values()]
             for kind in bench.KINDS}
    assert grids["ce"] == grids["distill"] == grids["distill+transfer"]
    leaked = sets["test"][0]
    with pytest.raises(ValueError, match=r"\['m5'\] are in both the dev and test splits"):
        bench.speech_sets([*rows, dict(leaked, split="dev")])


def test_confirm_voices_are_in_no_training_or_tuning_set():
    """The confirm split (2 voices added after the first results) is read only by --confirm: none of its voices or
    clips is in the teacher's, the students', the transfer or the dev set, and the tuning runs never score it."""
    bench = _bench()
    rows = bench.load_speech_rows()
    sets = bench.speech_sets(rows)
    confirm = {row["variant"] for row in sets["confirm"]}
    assert confirm == {"david", "linda"} and len(sets["confirm"]) == 48
    assert {row["language"] for row in sets["confirm"]} == {"en", "sw"}
    for name in ("teacher", "student", "transfer", "dev", "test"):
        assert not confirm & {row["variant"] for row in sets[name]}, name
        assert not {row["id"] for row in sets["confirm"]} & {row["id"] for row in sets[name]}, name
    leaked = sets["confirm"][0]
    with pytest.raises(ValueError, match=r"\['david'\] are in both the teacher and confirm splits"):
        bench.speech_sets([*rows, dict(leaked, split="teacher")])
    with pytest.raises(ValueError, match="no 'confirm' rows"):
        bench.speech_sets([r for r in rows if r["split"] != "confirm"])
    keys, header = bench.split_columns("confirm")
    assert keys[0] == "confirm/all/loss" and keys[-1] == "dev/all/loss" and header[0] == "confirm loss"
    assert bench.split_columns("test") == (bench.KEYS, bench.HEADER)


def _speech_results(tmp_path, **changes) -> str:
    """A results.json shaped as a tuning --data speech run writes it (what --confirm reads)."""
    bench = _bench()
    tuning = {name: {"kind": kind, "config": config, "dev": {"loss": 1.0}}
              for kind in bench.KINDS for name, config in bench.speech_grid(kind).items()}
    chosen = {kind: next(n for n in tuning if tuning[n]["kind"] == kind) for kind in bench.KINDS}
    results = {"args": {"data": "speech", "quick": False, "confirm": None, "output_dir": str(tmp_path / "run"),
                        "teacher_steps": 1500, "teacher_lr": 2e-3},
               "tuning": tuning, "chosen": chosen}
    for key, value in changes.items():
        results[key] = value
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    return str(path)


def test_confirm_loads_the_chosen_configurations_and_rejects_other_results(tmp_path):
    bench = _bench()
    loaded = bench.load_chosen(_speech_results(tmp_path))
    assert loaded["chosen"]["distill"] == "distill lr=0.0003 steps=60"
    assert loaded["configs"]["distill+transfer"] == {"learning_rate": 3e-4, "max_steps": 60,
                                                     **bench.TRANSFER_DEFAULT}
    assert loaded["configs"]["ce"]["kl_weight"] == 0.0 and loaded["args"]["teacher_steps"] == 1500
    assert loaded["folder"] == str(tmp_path / "run")
    synthetic = {"data": "synthetic", "quick": False, "output_dir": "x"}
    with pytest.raises(ValueError, match="not the results of a tuning"):
        bench.load_chosen(_speech_results(tmp_path, args=synthetic))
    with pytest.raises(ValueError, match="not the results of a tuning"):  # a confirmation chooses nothing either
        bench.load_chosen(_speech_results(tmp_path, args={**synthetic, "data": "speech", "confirm": "r.json"}))
    with pytest.raises(ValueError, match=r"--quick run"):
        bench.load_chosen(_speech_results(tmp_path, args={**synthetic, "data": "speech", "quick": True}))
    with pytest.raises(ValueError, match=r"no chosen configuration for \['ce'\]"):
        bench.load_chosen(_speech_results(tmp_path, chosen={"distill": "distill lr=0.0003 steps=60",
                                                            "distill+transfer": "distill+transfer lr=0.0003 steps=60"}))
    with pytest.raises(FileNotFoundError):
        bench.load_chosen(tmp_path / "missing.json")
    # the command line: --confirm and --teacher-dir need --data speech; a bad results.json is a usage error
    for argv in (["--confirm", _speech_results(tmp_path)], ["--teacher-dir", str(tmp_path)],
                 ["--data", "speech", "--confirm", str(tmp_path / "missing.json")]):
        with pytest.raises(SystemExit):
            bench.main([*argv, "--output-dir", str(tmp_path / "out")])


def test_add_kept_and_paired_differences_cover_the_confirm_split():
    bench = _bench()
    table = {}
    for row, accuracy in (("teacher", [50.0, 50.0]), ("pruned, untrained", [0.0, 0.0]), ("ce", [10.0, 20.0]),
                          ("distill", [25.0, 15.0]), ("distill+transfer", [30.0, 40.0])):
        for split in ("test", "confirm"):
            table[row] = {**table.get(row, {}), f"{split}/all/accuracy": accuracy, f"{split}/all/chrf": accuracy,
                          f"{split}/all/loss": [1.0 - a / 100 for a in accuracy]}
    bench.add_kept(table, ("test", "confirm"))
    assert table["distill"]["confirm/all/kept"] == [0.5, 0.3]
    paired, wins = bench.paired_minus_ce(table)
    assert paired["distill"]["confirm/all/accuracy"] == [15.0, -5.0] and wins["distill"]["confirm/all/accuracy"] == 1
    assert wins["distill+transfer"]["confirm/all/loss"] == 2  # lower loss is better


def test_compare_tokens_counts_clips_tokenized_differently(tmp_path):
    """--confirm checks that the clips shared with the earlier run tokenize as they did there (so its teacher,
    reused with --teacher-dir, saw the same rows); splits the earlier run never had are not compared."""
    bench = _bench()

    from types import SimpleNamespace

    Run = SimpleNamespace(sets={"teacher": [{"id": "a", "semantic_tokens": "<x>"}, {"id": "b", "semantic_tokens": "<y>"}],
                                "confirm": [{"id": "c", "semantic_tokens": "<z>"}]})

    assert bench.compare_tokens(Run, tmp_path) == {}  # no data/tokens.json there
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tokens.json").write_text(json.dumps({"key": {}, "tokens": {"a": "<x>", "b": "<q>"}}))
    assert bench.compare_tokens(Run, tmp_path) == {"teacher": 1}
