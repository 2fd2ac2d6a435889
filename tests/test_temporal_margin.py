"""The temporal stage's evidence: a GRU head over frame features against the frame model with its
tuned smoothing, on held-out videos (benchmarks/temporal_margin.py: the frame model trains on one
tree, the head and the smoothing are fitted on a second tree of unseen videos, all scored on its
val split). Slow: each case synthesizes two trees and trains a frame model (~15 min on 2 cores).
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "temporal_margin.py"


def margin_module():
    spec = importlib.util.spec_from_file_location("temporal_margin", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def experiment(work: Path, onset_cues: int) -> dict:
    module = margin_module()
    args = argparse.Namespace(
        work=work,
        onset_cues=onset_cues,
        videos=24,
        held_out_videos=72,
        frames=400,
        seed=0,
        frame_epochs=6,
        model="gru",
    )
    return module.run(args), module


@pytest.fixture(scope="module")
def onset_result(tmp_path_factory):
    return experiment(tmp_path_factory.mktemp("margin"), onset_cues=6)


@pytest.mark.slow
def test_on_onset_cues_the_gru_head_beats_frame_and_smoothing_on_expr_and_keeps_ccc(
    onset_result,
):
    result, module = onset_result
    margins = result["margins"]
    assert margins["expr"] >= module.GOALS["expr"], module.format_result(result, "gru")
    assert margins["va"] >= -module.CCC_TOLERANCE, module.format_result(result, "gru")


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="open: the head gains only about +0.02 F1-AU over frame + smoothing here (goal +0.05); "
    "see docs/temporal.md, 'Does it beat smoothing?'",
)
def test_on_onset_cues_the_gru_head_beats_frame_and_smoothing_on_au(onset_result):
    result, module = onset_result
    assert result["margins"]["au"] >= module.GOALS["au"], module.format_result(result, "gru")


@pytest.mark.slow
def test_on_the_ordinary_tree_the_gru_head_is_not_worse_than_frame_and_smoothing(tmp_path):
    result, module = experiment(tmp_path, onset_cues=0)
    for task, margin in result["margins"].items():
        assert margin >= -module.CCC_TOLERANCE, (task, module.format_result(result, "gru"))
