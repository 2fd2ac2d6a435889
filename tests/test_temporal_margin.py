"""The temporal stage's evidence: a GRU head over frame features against the frame model with its
tuned smoothing, on held-out videos (benchmarks/temporal_margin.py: the frame model trains on one
tree, the head and the smoothing are fitted on a second tree of unseen videos, all scored on its
val split). Slow: each case synthesizes two trees and trains a frame model (~20 min on 2 cores).
"""

from __future__ import annotations

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
    """The script's run at its defaults (the issue's: train-temporal's defaults for the head)."""
    module = margin_module()
    args = module.build_parser().parse_args(["--work", str(work), "--onset-cues", str(onset_cues)])
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
def test_on_onset_cues_the_gru_head_beats_frame_and_smoothing_on_au(onset_result):
    result, module = onset_result
    assert result["margins"]["au"] >= module.GOALS["au"], module.format_result(result, "gru")


@pytest.mark.slow
def test_on_the_ordinary_tree_the_gru_head_is_not_worse_than_frame_and_smoothing(tmp_path):
    result, module = experiment(tmp_path, onset_cues=0)
    for task, margin in result["margins"].items():
        assert margin >= -module.CCC_TOLERANCE, (task, module.format_result(result, "gru"))
