"""evaluate and predict with a temporal checkpoint: the frame model's path, fed by the head.

A temporal head trained on the features of the holdout pack (``trained_run``'s best.pt, every
split extracted) is scored by evaluate exactly as train-temporal validated it, with its features
given or extracted on the fly; predict writes a complete, checked test-set submission from it, with
the smoothing tuned for it; stale or mismatched inputs are one-line refusals.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from affectfast.cli import main
from affectfast.config import EvalConfig, ExtractConfig, TemporalConfig
from affectfast.errors import DataError
from affectfast.extract import extract_features
from affectfast.predict import check_submission, evaluate, predict
from affectfast.prediction_folder import RECORD
from affectfast.rundir import RunDir, read_metrics
from affectfast.shards import load_manifest
from affectfast.synth import FRAME_COUNTS_FILE, TEST_LISTS_DIR
from affectfast.train_temporal import train_temporal

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
EXTRACT = dict(loader="dali-cpu", batch_size=32, num_threads=1)
# device auto: the head trains and validates where evaluate runs it (CUDA where present), so
# their scores match exactly.
HEAD = dict(window=32, stride=16, batch_size=8, hidden=32, dropout=0.0, lr=1e-2, device="auto")
METRICS = ("ccc_valence", "ccc_arousal", "f1_expr", "f1_au", "p_mtl")


@pytest.fixture(scope="module")
def features(trained_run, packed_holdout, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("features") / "mtl"
    return extract_features(ExtractConfig(trained_run / "best.pt", packed_holdout, out, **EXTRACT))


@pytest.fixture(scope="module")
def head(features, tmp_path_factory) -> Path:
    """A two-epoch GRU run folder on ``features``."""
    out = tmp_path_factory.mktemp("runs") / "gru"
    train_temporal(TemporalConfig(features=features, out=out, epochs=2, model="gru", **HEAD))
    return out


def eval_config(checkpoint: Path, shards: Path, **kwargs) -> EvalConfig:
    return EvalConfig(checkpoint, shards, **{**EXTRACT, **kwargs})


def test_evaluate_scores_the_head_as_train_temporal_validated_it(head, features, packed_holdout):
    metrics = evaluate(eval_config(head / "last.pt", packed_holdout, features=features))
    last = read_metrics(RunDir(head).metrics)[-1]
    for name in METRICS:
        assert metrics[name] == pytest.approx(last[name], abs=1e-6), name


def test_without_features_the_split_is_extracted_on_the_fly_alike(head, features, packed_holdout):
    given = evaluate(eval_config(head / "last.pt", packed_holdout, features=features))
    on_the_fly = evaluate(eval_config(head / "last.pt", packed_holdout))
    for name in METRICS:
        assert on_the_fly[name] == pytest.approx(given[name], abs=1e-3), name


def test_a_temporal_head_writes_a_complete_smoothed_test_submission(
    head, features, packed_holdout, holdout_tree, tmp_path
):
    checkpoint = tmp_path / "best.pt"  # tuning writes beside the checkpoint: a copy of it
    shutil.copy(head / "best.pt", checkpoint)
    tuned = evaluate(
        eval_config(checkpoint, packed_holdout, features=features, tune_smoothing=True)
    )
    assert set(tuned["smoothing"]["windows"]) == {"va", "expr", "au"}
    counts_csv = holdout_tree / TEST_LISTS_DIR / FRAME_COUNTS_FILE
    out = tmp_path / "pred"
    config = eval_config(
        checkpoint,
        packed_holdout,
        split="test",
        features=features,
        smooth=True,
        frame_counts=counts_csv,
    )
    submission = predict(config, out)
    lines = counts_csv.read_text().splitlines()[1:]
    counts = {video: int(n) for video, n in (line.split(",") for line in lines)}
    lists = load_manifest(packed_holdout)["splits"]["test"]["lists"]
    expected = {task: {video: counts[video] for video in lists[task]} for task in lists}
    assert check_submission(out, expected) == len(submission.files) > 0
    record = json.loads((out / RECORD).read_text())
    assert record["features"] == str(features) and record["smoothing"]["windows"]


def test_features_of_another_pack_are_refused(head, features, packed):
    with pytest.raises(DataError, match="these features come from another pack"):
        evaluate(eval_config(head / "last.pt", packed, features=features))


def test_features_from_another_frame_checkpoint_are_refused(
    head, trained_run, packed_holdout, tmp_path
):
    other = tmp_path / "other.pt"  # the same weights saved again: other bytes, another sha256
    checkpoint = torch.load(trained_run / "best.pt", weights_only=True)
    checkpoint["epoch"] = checkpoint.get("epoch", 0) + 100
    torch.save(checkpoint, other)
    features = extract_features(
        ExtractConfig(other, packed_holdout, tmp_path / "feats", splits=("val",), **EXTRACT)
    )
    with pytest.raises(DataError, match="another frame checkpoint"):
        evaluate(eval_config(head / "last.pt", packed_holdout, features=features))


def test_a_changed_frame_checkpoint_is_refused_for_extraction_on_the_fly(
    features, packed_holdout, tmp_path
):
    frame = tmp_path / "frame.pt"
    shutil.copy(json.loads((features / "features.json").read_text())["checkpoint"]["path"], frame)
    moved = tmp_path / "features"
    shutil.copytree(features, moved)
    manifest = json.loads((moved / "features.json").read_text())
    manifest["checkpoint"]["path"] = str(frame)
    (moved / "features.json").write_text(json.dumps(manifest))
    out = tmp_path / "gru"
    train_temporal(TemporalConfig(features=moved, out=out, epochs=1, model="gru", **HEAD))
    frame.write_bytes(frame.read_bytes() + b"\0")  # another sha256 than the head was trained on
    with pytest.raises(DataError, match="not the frame checkpoint this temporal head"):
        evaluate(eval_config(out / "last.pt", packed_holdout))
    frame.unlink()
    with pytest.raises(DataError, match="its frame checkpoint .* is gone: pass --features"):
        evaluate(eval_config(out / "last.pt", packed_holdout))


def test_features_with_a_frame_checkpoint_are_refused_in_one_line(
    trained_run, features, packed_holdout
):
    result = CliRunner().invoke(
        main,
        [
            "evaluate",
            str(trained_run / "best.pt"),
            str(packed_holdout),
            "--features",
            str(features),
            "--loader",
            "dali-cpu",
        ],
    )
    assert result.exit_code == 2
    assert "--features is for a temporal checkpoint" in result.output
    assert len(result.output.strip().splitlines()) == 1
