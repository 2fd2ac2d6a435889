"""The study (affectfast.study): the run matrix, restart skipping finished runs, and the summaries."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from affectfast.config import TrainConfig
from affectfast.study import StudyConfig, format_table, plan_runs, read_records, run_study

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


def test_table_shows_a_dash_for_untrained_tasks():
    rows = [
        {
            "run": "uni-expr",
            "init": "scratch",
            "f1_expr": 0.91234,
            "p_mtl": 0.91234,
            "images_per_s": 812.4,
            "wall_s": 12.0,
        }
    ]
    table = format_table(rows).splitlines()
    assert (
        table[0]
        == "| run | init | CCC-V | CCC-A | F1-EXPR | F1-AU | P_MTL | images/s | wall time (s) |"
    )
    assert table[2] == "| uni-expr | scratch | - | - | 0.912 | - | 0.912 | 812 | 12 |"


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
    with open(config.out / "results.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 5
    assert (config.out / "results.md").read_text().count("\n") == 2 + 5
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
