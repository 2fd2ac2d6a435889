"""Complete ABAW submissions (affectfast.predict): every frame of every video, the test split,
frame counts, temporal smoothing tuned on val, the output folder, the format checker.

A one-epoch checkpoint trained on the session's pack with a test split (tests/conftest.py) serves
every test: the files' format and completeness matter here, not the scores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import affectfast.train as train_module
from affectfast.cli import main
from affectfast.config import EvalConfig, TrainConfig
from affectfast.errors import DataError
from affectfast.metrics import Predictions, compute_metrics
from affectfast.predict import (
    FROM_ANNOTATIONS,
    FROM_CSV,
    FROM_LAST_IMAGE,
    FrameCount,
    check_prediction_file,
    check_submission,
    evaluate,
    predict,
    read_frame_counts,
    resolve_frame_counts,
    split_key,
    tune_smoothing,
)
from affectfast.prediction_folder import RECORD
from affectfast.shards import load_manifest
from affectfast.smoothing import save_windows, smooth
from affectfast.synth import FRAME_COUNTS_FILE, TEST_LISTS_DIR
from affectfast.tasks import CHALLENGE_DIRS, TASKS
from affectfast.train import build_run, resolve_device
from affectfast.tuned import SMOOTHING, Fingerprint, tuned_path

EXAMPLE = Path(__file__).parent / "data" / "abaw_submission"  # written by hand
EXAMPLE_FRAMES = {"va": {"video1": 4}, "expr": {"video1": 4}, "au": {"video2_left": 3}}
SMALL = dict(
    loader="dali-cpu", batch_size=32, image_size=48, num_threads=1, amp="off", device="cpu"
)
FOLDER = {task: names[0] for task, names in CHALLENGE_DIRS.items()}


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def run(trained_run):
    """A one-epoch multi-task run folder on the pack with a test split (tests/conftest.py)."""
    return trained_run


def eval_config(run, packed, **kwargs) -> EvalConfig:
    return EvalConfig(run / "best.pt", packed, loader="dali-cpu", num_threads=1, **kwargs)


def csv_counts(tree: Path) -> dict[str, int]:
    lines = (tree / TEST_LISTS_DIR / FRAME_COUNTS_FILE).read_text().splitlines()[1:]
    return {video: int(n) for video, n in (line.split(",") for line in lines)}


def listed(packed) -> dict[str, list[str]]:
    """task -> the videos its test list names, as the manifest records them."""
    return load_manifest(packed)["splits"]["test"]["lists"]


def rows(path: Path) -> list[str]:
    return path.read_text().splitlines()[1:]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --- the format checker ---------------------------------------------------------------------------


def test_checker_accepts_the_hand_written_example():
    assert check_submission(EXAMPLE, EXAMPLE_FRAMES) == 3
    assert check_prediction_file(EXAMPLE / FOLDER["va"] / "video1.txt", "va") == 4


@pytest.mark.parametrize(
    "task, line, text, match",
    [
        ("va", 1, "valence;arousal", r"video1.txt:1: expected the va header 'valence,arousal'"),
        ("va", 3, "0.5,1.5", r"video1.txt:3: expected 'valence,arousal', two numbers in \[-1, 1\]"),
        ("va", 2, "0.5", r"video1.txt:2: expected 'valence,arousal'"),
        ("va", 2, "nan,0", r"video1.txt:2: expected 'valence,arousal'"),
        ("expr", 4, "8", r"video1.txt:4: expected one integer 0..7"),
        ("expr", 2, "1,0", r"video1.txt:2: expected one integer 0..7"),
        ("expr", 1, "Neutral,Anger", r"video1.txt:1: expected the expr header"),
        ("au", 2, "0,0,0,0,0,0,0,0,0,0,0", r"video2_left.txt:2: expected 12 comma-separated 0/1"),
        ("au", 3, "1,0,0,1,0,0,1,0,0,0,1,-1", r"video2_left.txt:3: expected 12 comma-separated"),
        ("au", 2, "", r"video2_left.txt:2: expected 12 comma-separated"),  # a blank line
    ],
)
def test_checker_names_the_file_and_line_of_each_deviation(tmp_path, task, line, text, match):
    folder = Path(shutil.copytree(EXAMPLE, tmp_path / "submission"))
    (path,) = (folder / FOLDER[task]).iterdir()
    lines = path.read_text().splitlines()
    lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=match):
        check_submission(folder, EXAMPLE_FRAMES)


def test_checker_counts_frames_and_files(tmp_path):
    folder = Path(shutil.copytree(EXAMPLE, tmp_path / "submission"))
    with pytest.raises(DataError, match=r"video1.txt: 4 frame lines, expected 5"):
        check_submission(folder, {**EXAMPLE_FRAMES, "va": {"video1": 5}})
    with pytest.raises(DataError, match=r"video9.txt: missing: the expr submission needs a file"):
        check_submission(folder, {**EXAMPLE_FRAMES, "expr": {"video1": 4, "video9": 2}})
    (folder / FOLDER["au"] / "stale.txt").write_text("x")
    with pytest.raises(DataError, match=r"stale.txt: not expected in a au submission"):
        check_submission(folder, EXAMPLE_FRAMES)


# --- frame counts ---------------------------------------------------------------------------------


def test_frame_counts_csv_is_read_and_bad_lines_are_named(tmp_path):
    path = tmp_path / "counts.csv"
    path.write_bytes(b"\xef\xbb\xbfvideo,frames\r\nv1,120\r\n\r\nv2_left, 7\r\n")
    assert read_frame_counts(path) == {"v1": (120, 2), "v2_left": (7, 4)}
    for text, match in (
        ("name,count\nv1,3\n", r"counts.csv:1: expected the header 'video,frames'"),
        ("", r"counts.csv:1: expected the header"),
        ("video,frames\nv1,3,4\n", r"counts.csv:2: expected 'video,frames'"),
        ("video,frames\nv1,0\n", r"counts.csv:2: frames '0': expected a positive integer"),
        ("video,frames\nv1,2.5\n", r"counts.csv:2: frames '2.5'"),
        ("video,frames\n../v1,3\n", r"counts.csv:2: '../v1' is not a video name"),
        ("video,frames\nv1,3\nv1,4\n", r"counts.csv:3: video v1 is listed twice"),
    ):
        path.write_text(text)
        with pytest.raises(DataError, match=match):
            read_frame_counts(path)


def test_frame_count_comes_from_the_csv_then_the_manifest_then_the_last_image(tmp_path):
    csv = tmp_path / "counts.csv"
    images = {"a": np.array([2, 10]), "b": np.array([1, 18, 20]), "c": np.array([30])}
    assert resolve_frame_counts(images, {"a": 12}, None, None) == {
        "a": (12, FROM_ANNOTATIONS, 10, 0),
        "b": (20, FROM_LAST_IMAGE, 20, 0),
        "c": (30, FROM_LAST_IMAGE, 30, 0),
    }
    given = {"a": (11, 2), "b": (25, 3), "c": (30, 4), "other": (5, 5)}
    assert resolve_frame_counts(images, {"a": 12}, given, csv) == {
        "a": (11, FROM_CSV, 10, 0),  # the CSV overrides the manifest
        "b": (25, FROM_CSV, 20, 0),
        "c": (30, FROM_CSV, 30, 0),
    }
    with pytest.raises(DataError, match=r"counts.csv: no line for video c"):
        resolve_frame_counts(images, {}, {"a": (11, 2), "b": (25, 3)}, csv)
    # A video the manifest counts needs no line.
    assert resolve_frame_counts({"a": images["a"]}, {"a": 12}, {}, csv) == {
        "a": FrameCount(12, FROM_ANNOTATIONS, 10, 0)
    }


def test_a_count_below_the_last_image_is_authoritative_and_counts_what_it_leaves_out(tmp_path):
    csv = tmp_path / "counts.csv"
    images = {"a": np.array([2, 9, 10, 11, 14]), "b": np.array([5, 6])}
    assert resolve_frame_counts(images, {"a": 12, "b": 3}, {"a": (10, 2)}, csv) == {
        "a": (10, FROM_CSV, 14, 2),  # frames 11 and 14 have images past N = 10
        "b": (3, FROM_ANNOTATIONS, 6, 2),  # a manifest count is authoritative too
    }


def test_keys_that_could_leave_the_output_folder_are_refused():
    assert split_key("21-60-480x360_left/00012", Path("s")) == ("21-60-480x360_left", 12)
    for key in ("../x/00001", "a/b/00001", "v/1", "v/0001x", "/00001", "v\\w/00001", "v w/00001"):
        with pytest.raises(DataError, match="refusing to write"):
            split_key(key, Path("s"))


# --- predict --------------------------------------------------------------------------------------


def test_test_split_submission_has_every_frame_of_each_listed_video(
    run, packed_holdout, holdout_tree, tmp_path
):
    counts_csv = holdout_tree / TEST_LISTS_DIR / FRAME_COUNTS_FILE
    out = tmp_path / "pred"
    submission = predict(
        eval_config(run, packed_holdout, split="test", frame_counts=counts_csv), out
    )
    counts, lists = csv_counts(holdout_tree), listed(packed_holdout)
    expected = {task: {video: counts[video] for video in lists[task]} for task in TASKS}
    assert check_submission(out, expected) == sum(len(v) for v in lists.values())
    assert sorted(submission.files) == sorted(
        out / FOLDER[t] / f"{v}.txt" for t in TASKS for v in lists[t]
    )
    assert {v: (c.frames, c.source) for v, c in submission.frames.items()} == {
        v: (counts[v], FROM_CSV) for v in counts
    }
    assert json.loads((out / RECORD).read_text())["split"] == "test"
    # Frames after the last image (the CSV counts more) hold the last image's prediction.
    for task in TASKS:
        for video in lists[task]:
            lines, last = (
                rows(out / FOLDER[task] / f"{video}.txt"),
                submission.frames[video].last_image,
            )
            assert len(lines) == counts[video] > last
            assert set(lines[last - 1 :]) == {lines[last - 1]}
    summary = submission.summary()
    assert all(f"{video}" in summary for video in counts) and FROM_CSV in summary


def test_without_counts_test_videos_end_at_their_last_image_and_say_so(
    run, packed_holdout, holdout_tree, tmp_path
):
    result = CliRunner().invoke(
        main,
        [
            "predict",
            str(run / "best.pt"),
            str(packed_holdout),
            "--split",
            "test",
            "--out",
            str(tmp_path / "pred"),
            "--loader",
            "dali-cpu",
            "--num-threads",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    for video in csv_counts(holdout_tree):
        last = max(int(p.stem) for p in (holdout_tree / "cropped_aligned" / video).glob("*.jpg"))
        line = next(line for line in result.output.splitlines() if line.startswith(video + " "))
        assert line.split()[1:] == [str(last), "last", "image", str(last), "0"]
        for task, videos in listed(packed_holdout).items():
            if video in videos:
                assert len(rows(tmp_path / "pred" / FOLDER[task] / f"{video}.txt")) == last


def test_val_files_cover_every_annotated_frame_and_interpolate_the_gaps(
    run, packed_holdout, tmp_path
):
    out = tmp_path / "pred"
    submission = predict(eval_config(run, packed_holdout), out)
    manifest = load_manifest(packed_holdout)
    videos = {v for v, c in submission.frames.items() if c.source == FROM_ANNOTATIONS}
    assert videos == set(submission.frames) and len(videos) == manifest["splits"]["val"]["videos"]
    expected = {t: {v: manifest["frame_counts"][v] for v in videos} for t in TASKS}
    check_submission(out, expected)
    # Frames without an image: VA linear between its neighbours, EXPR a neighbour's class.
    keys = {
        k for s in manifest["splits"]["val"]["shards"] for k in _keys(packed_holdout / s["index"])
    }
    checked = 0
    for video in videos:
        has = {int(k.split("/")[1]) for k in keys if k.split("/")[0] == video}
        va = np.array(
            [[float(x) for x in r.split(",")] for r in rows(out / FOLDER["va"] / f"{video}.txt")]
        )
        expr = rows(out / FOLDER["expr"] / f"{video}.txt")
        for frame in range(2, max(has)):
            if frame not in has and frame - 1 in has:
                after = min(f for f in has if f > frame)
                if np.abs(va[[frame - 2, after - 1]]).max() >= 1:  # clipped after interpolation
                    continue
                weight = 1 / (after - frame + 1)
                np.testing.assert_allclose(
                    va[frame - 1], va[frame - 2] * (1 - weight) + va[after - 1] * weight, atol=2e-6
                )
                assert expr[frame - 1] in (expr[frame - 2], expr[after - 1])
                checked += 1
    assert checked  # the synthetic videos have gaps


def _keys(idx: Path) -> list[str]:
    return [line.split()[3].split(".")[0] for line in idx.read_text().splitlines()[1:]]


def test_an_earlier_prediction_folder_is_replaced_whole_and_a_failure_leaves_it(
    run, packed_holdout, holdout_tree, tmp_path
):
    out = tmp_path / "pred"
    predict(eval_config(run, packed_holdout), out)  # val: files for the val videos
    val_files = snapshot(out)
    bad = tmp_path / "counts.csv"
    bad.write_text("video,frames\n")  # lacks the test videos it must supply
    result = CliRunner().invoke(
        main,
        [
            "predict",
            str(run / "best.pt"),
            str(packed_holdout),
            "--split",
            "test",
            "--frame-counts",
            str(bad),
            "--out",
            str(out),
            "--loader",
            "dali-cpu",
        ],
    )
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "counts.csv: no line for video" in result.output
    assert snapshot(out) == val_files  # untouched
    predict(eval_config(run, packed_holdout, split="test"), out)
    lists = listed(packed_holdout)
    assert {p.stem for p in out.rglob("*.txt")} == set().union(*lists.values())  # no val file left
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pred.")]  # no temporaries


def test_a_folder_of_other_files_is_refused_before_any_work(run, packed_holdout, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    with pytest.raises(DataError, match="holds notes.txt and is not a prediction folder"):
        predict(eval_config(run, packed_holdout, split="test"), out)
    assert snapshot(out) == {"notes.txt": b"keep"}


def test_test_split_missing_from_the_pack_is_a_one_line_error(run, packed, tmp_path):
    with pytest.raises(
        DataError, match="no test split in this pack; pack the tree with --test-videos"
    ):
        predict(eval_config(run, packed, split="test"), tmp_path / "pred")


# --- evaluate and smoothing ---------------------------------------------------------------------


def test_evaluate_does_not_offer_the_test_split(run, packed_holdout):
    with pytest.raises(DataError, match="the test split has no labels"):
        evaluate(eval_config(run, packed_holdout, split="test"))
    runner = CliRunner()
    assert "[train|val]" in runner.invoke(main, ["evaluate", "--help"]).output
    assert "[train|val|test]" in runner.invoke(main, ["predict", "--help"]).output
    result = runner.invoke(
        main, ["evaluate", str(run / "best.pt"), str(packed_holdout), "--split", "test"]
    )
    assert result.exit_code == 2 and "'test' is not one of 'train', 'val'" in result.output


def test_predict_smooth_without_windows_is_a_clear_error(run, packed_holdout, tmp_path):
    copy = tmp_path / "run"
    copy.mkdir()
    shutil.copy(run / "best.pt", copy / "best.pt")
    with pytest.raises(
        DataError,
        match=r"best.smoothing.json: no smoothing windows beside the checkpoint: run `affectfast evaluate CKPT SHARDS --tune-smoothing`",
    ):
        predict(
            EvalConfig(
                copy / "best.pt", packed_holdout, split="test", loader="dali-cpu", smooth=True
            ),
            tmp_path / "pred",
        )
    save_windows(
        tuned_path(copy / "best.pt", SMOOTHING),
        Fingerprint.of(copy / "best.pt"),
        {"va": 3},
        {
            "va": {
                "metric": "ccc_mean",
                "raw": 0.0,
                "smoothed": 0.0,
                "grid": [1],
                "grid_scores": [0.0],
            }
        },
    )
    with pytest.raises(DataError, match=r"no window for expr,au; run `affectfast evaluate"):
        predict(
            EvalConfig(
                copy / "best.pt", packed_holdout, split="test", loader="dali-cpu", smooth=True
            ),
            tmp_path / "pred",
        )
    assert not (tmp_path / "pred").exists()


def test_tune_smoothing_prints_raw_and_smoothed_and_predict_applies_the_windows(
    run, packed_holdout, tmp_path
):
    plain = evaluate(eval_config(run, packed_holdout))
    result = CliRunner().invoke(
        main,
        [
            "evaluate",
            str(run / "best.pt"),
            str(packed_holdout),
            "--tune-smoothing",
            "--loader",
            "dali-cpu",
            "--num-threads",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (
        "smoothing (every frame completed" in result.output
        and f"saved {run / 'best.smoothing.json'}" in result.output
    )
    tuned = evaluate(eval_config(run, packed_holdout, tune_smoothing=True))["smoothing"]
    assert set(tuned["windows"]) == set(TASKS)
    scores = tuned["scores"]
    # Window 1 on completed outputs scores what plain evaluation scores: completion keeps the
    # predicted frames' values and the frames it adds carry no label.
    assert scores["va"]["raw"] == pytest.approx(plain["ccc_mean"], abs=1e-6)
    assert scores["expr"]["raw"] == pytest.approx(plain["f1_expr"], abs=1e-6)
    assert scores["au"]["raw"] == pytest.approx(plain["f1_au"], abs=1e-6)
    assert all(s["smoothed"] >= s["raw"] for s in scores.values())
    line = next(text for text in result.output.splitlines() if text.startswith("va "))
    assert f"{scores['va']['raw']:.4f}" in line and f"{scores['va']['smoothed']:.4f}" in line
    # predict --smooth applies smoothing.json: a 5-frame moving average of the raw VA files.
    save_windows(
        tuned_path(run / "best.pt", SMOOTHING),
        Fingerprint.of(run / "best.pt"),
        {"va": 5, "expr": 1, "au": 1},
        {t: scores[t] for t in TASKS},
    )
    raw = predict(eval_config(run, packed_holdout), tmp_path / "raw")
    smoothed = predict(eval_config(run, packed_holdout, smooth=True), tmp_path / "smooth")
    assert smoothed.windows == {"va": 5, "expr": 1, "au": 1} and raw.windows is None
    for video in raw.frames:
        before, after = (
            np.array(
                [
                    [float(x) for x in r.split(",")]
                    for r in rows(folder / FOLDER["va"] / f"{video}.txt")
                ]
            )
            for folder in (tmp_path / "raw", tmp_path / "smooth")
        )
        inside = np.abs(before).max(axis=1) < 1  # clipping happens after smoothing
        window = np.convolve(inside, np.ones(5), "same") == 5
        np.testing.assert_allclose(after[window], smooth(before, 5)[window], atol=3e-6)
        assert rows(tmp_path / "raw" / FOLDER["expr"] / f"{video}.txt") == rows(
            tmp_path / "smooth" / FOLDER["expr"] / f"{video}.txt"
        )


def test_tune_smoothing_completes_each_video_and_scores_au_at_the_checkpoint_thresholds():
    rng = np.random.default_rng(0)
    frames = {"v1": [1, 2, 4, 5, 6], "v2": [2, 3, 4]}  # gaps, and v1 runs past its last image
    keys = [f"{v}/{f:05d}" for v, fs in frames.items() for f in fs]
    n = len(keys)
    truth = np.repeat([[0.5, -0.5]], n, axis=0)
    preds = Predictions(
        keys,
        {
            "va": truth + rng.normal(0, 0.3, (n, 2)),
            "expr": rng.normal(0, 1, (n, 8)),
            "au": rng.random((n, 12)),
        },
        {
            "va": truth,
            "expr": rng.integers(0, 8, n).astype(float),
            "au": (rng.random((n, 12)) < 0.5).astype(float),
        },
        {t: np.ones(n, dtype=bool) for t in TASKS},
    )
    windows, scores = tune_smoothing(preds, TASKS, {"v1": 9}, [0.3] * 12, grid=(1, 3))
    assert set(windows) == set(TASKS) and scores["au"]["metric"] == "f1_au_tuned"
    assert scores["va"]["grid"] == [1, 3]
    raw = {"va": "ccc_mean", "expr": "f1_expr"}
    plain = compute_metrics(preds, TASKS, np.full(12, 0.3))
    for task, metric in raw.items():  # window 1 scores the predicted frames as they are
        assert scores[task]["raw"] == pytest.approx(plain[metric])
    assert scores["au"]["raw"] == pytest.approx(plain["f1_au_tuned"])


def test_training_never_reads_the_test_split(packed_holdout, tmp_path, monkeypatch):
    splits = []
    original = train_module.build_loader

    def recording(kind, shards, split, *args, **kwargs):
        splits.append(split)
        return original(kind, shards, split, *args, **kwargs)

    monkeypatch.setattr(train_module, "build_loader", recording)
    config, _ = resolve_device(
        TrainConfig(shards=packed_holdout, out=tmp_path / "r", **SMALL), cuda=False
    )
    build_run(config, train_module.DistInfo())
    assert sorted(splits) == ["train", "val"]
