"""The study (affectfast.study): the run matrix, restart skipping finished runs, and the summaries."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest
import torch

from affectfast.config import TrainConfig
from affectfast.errors import DataError
from affectfast.study import (
    TABLE_NOTES,
    StudyConfig,
    format_summary,
    format_table,
    plan_runs,
    read_records,
    run_study,
)

SMALL = dict(
    loader="dali-cpu",
    epochs=1,
    batch_size=32,
    image_size=32,
    num_threads=1,
    amp="off",
    device="cpu",
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(shards, out, inits):
    return StudyConfig(out=out, base=TrainConfig(shards=shards, out=out, **SMALL), inits=inits)


def test_plan_trains_pretraining_before_fine_tuning(tmp_path):
    runs = plan_runs(
        _config(tmp_path, tmp_path / "study", ("scratch", "imagenet:/w/r18.pth", "uni-expr"))
    )
    assert [(r.init_label, r.name) for r in runs] == [
        ("scratch", "uni-va"),
        ("scratch", "uni-expr"),
        ("scratch", "uni-au"),
        ("scratch", "multi"),
        ("imagenet:/w/r18.pth", "uni-va"),
        ("imagenet:/w/r18.pth", "uni-expr"),
        ("imagenet:/w/r18.pth", "uni-au"),
        ("imagenet:/w/r18.pth", "multi"),
        ("uni-expr", "multi"),
    ]
    assert runs[4].out == tmp_path / "study" / "imagenet-r18.pth" / "uni-va"
    assert runs[-1].init == f"ckpt:{tmp_path / 'study' / 'scratch' / 'uni-expr' / 'best.pt'}"
    assert runs[-1].tasks == ("va", "expr", "au")


@pytest.mark.parametrize("inits", [(), ("uni-expr",), ("bogus",), ("uni-xyz", "scratch")])
def test_bad_inits_are_refused(tmp_path, inits):
    with pytest.raises(ValueError):
        _config(tmp_path, tmp_path / "s", inits)


def test_table_shows_a_dash_for_untrained_tasks_and_the_best_of_the_epochs():
    rows = [
        {
            "run": "uni-expr",
            "init": "scratch",
            "best_epoch": 3,
            "epochs": 4,
            "f1_expr": 0.91234,
            "p_mtl": 0.91234,
            "p_mtl_last": 0.9,
            "images_per_s": 812.4,
            "train_s": 12.0,
        }
    ]
    table = format_table(rows).splitlines()
    assert table[0] == (
        "| run | init | best epoch | CCC-V | CCC-A | F1-EXPR | F1-AU | P_MTL | P_MTL last "
        "| images/s | train time (s) |"
    )
    assert table[2] == "| uni-expr | scratch | 3/4 | - | - | 0.912 | - | 0.912 | 0.900 | 812 | 12 |"


def test_the_table_notes_say_how_to_read_it_fairly():
    # Which split picks the best epoch and which reports it, how uni and multi runs pick theirs,
    # and what the time column leaves out.
    for words in (
        "The val split both picks that epoch",
        "and reports it",
        "P_MTL last is the last epoch's val P_MTL",
        "a uni-task run picks its epoch by its one task's metric",
        "the multi-task run by the sum of all three",
        "validation and checkpointing excluded",
    ):
        assert words in TABLE_NOTES


def test_study_runs_the_matrix_writes_summaries_and_skips_finished_runs(packed, tmp_path):
    config = _config(packed, tmp_path / "study", ("scratch", "uni-expr"))
    rows = run_study(config)
    assert [(r["init"], r["run"]) for r in rows] == [
        ("scratch", "uni-va"),
        ("scratch", "uni-expr"),
        ("scratch", "uni-au"),
        ("scratch", "multi"),
        ("uni-expr", "multi"),
    ]
    by_run = {(r["init"], r["run"]): r for r in rows}
    assert (
        by_run["scratch", "uni-va"]["f1_expr"] is None
        and by_run["scratch", "uni-va"]["ccc_valence"] is not None
    )
    assert by_run["scratch", "uni-au"]["p_mtl"] == pytest.approx(
        by_run["scratch", "uni-au"]["f1_au"]
    )
    multi = by_run["scratch", "multi"]
    assert multi["p_mtl"] == pytest.approx(
        (multi["ccc_valence"] + multi["ccc_arousal"]) / 2 + multi["f1_expr"] + multi["f1_au"]
    )
    assert all(r["best_epoch"] == r["epochs"] == 1 and r["p_mtl_last"] == r["p_mtl"] for r in rows)
    with open(config.out / "results.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 5
    assert (config.out / "results.md").read_text() == format_table(rows) + f"\n\n{TABLE_NOTES}\n"
    summary = format_summary(config).splitlines()
    assert summary[0] == f"study folder {config.out}:"
    assert [line.split()[0] for line in summary[1:4]] == ["results.md", "results.csv", "curves.png"]
    assert summary[5:] == [
        f"    {name:<19}  1/1 epochs"
        for name in (
            "scratch/uni-va",
            "scratch/uni-expr",
            "scratch/uni-au",
            "scratch/multi",
            "from-uni-expr/multi",
        )
    ]
    assert (config.out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the fine-tuned run started from the uni-expr trunk
    assert read_records(config.out / "from-uni-expr" / "multi")

    stamps = {p: p.stat().st_mtime_ns for p in Path(config.out).rglob("last.pt")}
    assert len(stamps) == 5
    assert run_study(config) == rows  # a restart trains nothing again
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_cli_study_refuses_bad_inits_with_exit_2(packed, tmp_path):
    from click.testing import CliRunner

    from affectfast.cli import main

    result = CliRunner().invoke(
        main, ["study", str(packed), "--out", str(tmp_path / "s"), "--inits", "uni-expr"]
    )
    assert result.exit_code == 2 and "base initialization" in result.output
    assert not (tmp_path / "s").exists()


def test_task_weights_go_only_to_the_runs_that_train_those_tasks(packed, tmp_path):
    base = TrainConfig(
        shards=packed, out=tmp_path, task_weights=(("va", 2.0), ("au", 0.5)), **SMALL
    )
    config = StudyConfig(out=tmp_path / "study", base=base, inits=("scratch",))
    rows = run_study(config)
    assert len(rows) == 4
    saved = [
        json.loads((run.out / "config.json").read_text())["task_weights"]
        for run in plan_runs(config)
    ]
    assert saved == [[["va", 2.0]], [], [["au", 0.5]], [["va", 2.0], ["au", 0.5]]]


@pytest.mark.parametrize(
    "inits, match",
    [
        (("scratch", "imagenet"), "ImageNet weights for ResNet-18 not found"),
        (("scratch", "ckpt:/nowhere/best.pt"), "checkpoint not found"),
    ],
)
def test_missing_weights_stop_the_study_before_any_run_trains(
    packed, tmp_path, monkeypatch, inits, match
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))  # no ImageNet weights there
    config = _config(packed, tmp_path / "study", inits)
    with pytest.raises(DataError, match=match):
        run_study(config)
    assert not config.out.exists()  # the scratch runs before it did not train


def test_a_pack_without_a_manifest_stops_the_study_at_once(tmp_path):
    (tmp_path / "shards").mkdir()
    config = _config(tmp_path / "shards", tmp_path / "study", ("scratch",))
    with pytest.raises(DataError, match="no manifest"):
        run_study(config)
    assert not config.out.exists()


def test_cli_study_ends_with_the_table_its_notes_and_where_files_went(packed, tmp_path):
    from click.testing import CliRunner

    from affectfast.cli import main

    out = tmp_path / "s"
    options = ["--loader", "dali-cpu", "--epochs", "1", "--batch-size", "32", "--image-size"]
    options += ["32", "--num-threads", "1", "--amp", "off", "--device", "cpu"]
    result = CliRunner().invoke(main, ["study", str(packed), "--out", str(out), *options])
    assert result.exit_code == 0, result.output
    table, notes, summary = result.stdout.split("\n\n")
    assert table.startswith("| run | init | best epoch |") and notes == TABLE_NOTES
    assert summary.strip().splitlines()[0] == f"study folder {out}:"
    assert summary.count("1/1 epochs") == 4 and (out / "results.md").is_file()


def test_temporal_rows_train_heads_on_the_multi_task_features_once(packed, tmp_path):
    base = TrainConfig(shards=packed, out=tmp_path / "study", **SMALL)
    config = StudyConfig(out=tmp_path / "study", base=base, temporal=("gru",), temporal_epochs=1)
    rows = run_study(config)
    assert [r["run"] for r in rows] == [
        "uni-va",
        "uni-expr",
        "uni-au",
        "multi",
        "gru uni-va",
        "gru uni-expr",
        "gru uni-au",
        "gru multi",
    ]
    by_run = {r["run"]: r for r in rows}
    assert by_run["gru uni-va"]["f1_expr"] is None and by_run["gru uni-va"]["ccc_valence"]
    multi = by_run["gru multi"]
    assert multi["p_mtl"] == pytest.approx(
        (multi["ccc_valence"] + multi["ccc_arousal"]) / 2 + multi["f1_expr"] + multi["f1_au"]
    )
    features = config.out / "scratch" / "features"
    made_from = json.loads((features / "features.json").read_text())["checkpoint"]
    frame_best = config.out / "scratch" / "multi" / "best.pt"
    assert made_from["sha256"] == hashlib.sha256(frame_best.read_bytes()).hexdigest()
    head = torch.load(config.out / "scratch" / "gru-multi" / "last.pt", weights_only=True)
    assert head["stage"] == "temporal" and head["features"]["path"] == str(features.resolve())
    assert "scratch/features: the multi-task model's features" in format_summary(config)
    assert "    scratch/gru-multi     1/1 epochs" in format_summary(config).splitlines()

    stamps = {p: p.stat().st_mtime_ns for p in config.out.rglob("*.pt")}
    stamps[features / "features.json"] = (features / "features.json").stat().st_mtime_ns
    assert run_study(config) == rows  # a restart extracts and trains nothing again
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_an_unknown_temporal_model_is_refused(tmp_path):
    base = TrainConfig(shards=tmp_path, out=tmp_path / "study", **SMALL)
    with pytest.raises(ValueError, match="temporal models must be among"):
        StudyConfig(out=tmp_path / "study", base=base, temporal=("lstm",))
