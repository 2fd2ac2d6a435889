"""Temporal post-processing: exact completion and smoothing values, window tuning, the JSON file,
and smoothing that beats per-frame reads on a synthetic tree with corrupted frames."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import f1_score

from affectfast.errors import DataError
from affectfast.metrics import ccc
from affectfast.smoothing import (
    INTERPOLATION,
    complete_and_smooth,
    complete_video,
    load_windows,
    save_windows,
    smooth,
    tune_windows,
)
from affectfast.synth import (
    SynthConfig,
    frame_path,
    labels_from_pixels,
    plan_tree,
    synthesize,
    video_labels,
)
from affectfast.tasks import NUM_AU, NUM_EXPR
from affectfast.tuned import Fingerprint


# --- complete_video -------------------------------------------------------------------------------
def test_linear_fills_gaps_at_start_middle_and_end():
    frames = np.array([3, 5, 9])
    values = np.array([[0.0, 10.0], [2.0, 20.0], [10.0, 0.0]])
    filled = complete_video(frames, values, total=11, kind="linear")
    expected = [
        [0, 10],  # 1, 2: before the first prediction, held at frame 3's
        [0, 10],
        [0, 10],  # 3
        [1, 15],  # 4: halfway between 3 and 5
        [2, 20],  # 5
        [4, 15],  # 6..8: a quarter, half, three quarters of the way to 9
        [6, 10],
        [8, 5],
        [10, 0],  # 9
        [10, 0],  # 10, 11: after the last prediction, held at frame 9's
        [10, 0],
    ]
    np.testing.assert_array_equal(filled, np.array(expected, dtype=float))


def test_nearest_copies_the_nearest_row_and_ties_go_earlier():
    frames = np.array([2, 5, 6, 10])
    values = np.eye(4, dtype=np.float32)  # row r is one-hot at r
    filled = complete_video(frames, values, total=12, kind="nearest")
    assert filled.dtype == np.float32 and filled.shape == (12, 4)
    # Frame:        1  2  3  4  5  6  7  8 (6 and 10 tie: 6) 9 10 11 12
    np.testing.assert_array_equal(filled.argmax(1), [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 3])
    assert (filled.sum(1) == 1).all()  # whole rows copied, never mixed


def test_one_predicted_frame_fills_the_video_and_complete_frames_are_kept():
    for kind in ("linear", "nearest"):
        filled = complete_video(np.array([4]), np.array([[0.5, -0.25]]), total=6, kind=kind)
        np.testing.assert_array_equal(filled, np.tile([0.5, -0.25], (6, 1)))
    values = np.arange(24, dtype=float).reshape(8, 3)
    for kind in ("linear", "nearest"):
        np.testing.assert_array_equal(complete_video(np.arange(1, 9), values, 8, kind), values)


def test_trailing_shape_is_kept():
    values = np.arange(12, dtype=float).reshape(3, 2, 2)
    filled = complete_video(np.array([1, 3, 5]), values, total=5, kind="linear")
    assert filled.shape == (5, 2, 2)
    np.testing.assert_array_equal(filled[1], (values[0] + values[1]) / 2)


@pytest.mark.parametrize(
    "frames, total, kind, match",
    [
        ([3, 2], 5, "linear", "increasing"),
        ([2, 2], 5, "nearest", "increasing"),
        ([0, 2], 5, "linear", r"1\.\.5"),
        ([2, 6], 5, "nearest", r"1\.\.5"),
        ([1, 2], 5, "cubic", "kind"),
        ([1.0, 2.0], 5, "linear", "integers"),
    ],
)
def test_complete_refuses_bad_input(frames, total, kind, match):
    with pytest.raises(ValueError, match=match):
        complete_video(np.array(frames), np.zeros((2, 2)), total, kind)


def test_complete_refuses_no_prediction_and_a_count_mismatch():
    with pytest.raises(ValueError, match="no predicted frame"):
        complete_video(np.array([], dtype=int), np.zeros((0, 2)), 5, "linear")
    with pytest.raises(ValueError, match="one number per row"):
        complete_video(np.array([1, 2, 3]), np.zeros((2, 2)), 5, "linear")


# --- smooth ---------------------------------------------------------------------------------------
def test_window_one_is_the_identity():
    values = np.random.default_rng(0).normal(size=(50, 3))
    np.testing.assert_array_equal(smooth(values, 1), values)


def test_known_moving_averages_with_edges_over_the_frames_available():
    values = np.array([[0, 10], [0, 10], [3, 10], [0, 10], [0, 10], [6, 10]], dtype=float)
    np.testing.assert_allclose(smooth(values, 3)[:, 0], [0, 1, 1, 1, 2, 3])
    np.testing.assert_allclose(smooth(values, 5)[:, 0], [1, 0.75, 0.6, 1.8, 2.25, 2])
    # A constant keeps its level up to the edges (no shrinking towards zero there).
    np.testing.assert_allclose(smooth(values, 5)[:, 1], 10)
    # A window longer than the video: every frame gets the mean of the video.
    np.testing.assert_allclose(smooth(values, 41), np.tile(values.mean(0), (6, 1)))


def test_smooth_matches_a_direct_window_mean_and_keeps_probabilities_summing_to_one():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(NUM_EXPR), size=300)
    for window in (3, 9, 25):
        half = window // 2
        direct = np.stack([probs[max(0, i - half) : i + half + 1].mean(0) for i in range(300)])
        smoothed = smooth(probs, window)
        np.testing.assert_allclose(smoothed, direct, atol=1e-12)
        np.testing.assert_allclose(smoothed.sum(1), 1, atol=1e-12)


@pytest.mark.parametrize("window", [0, 2, -3, 1.0, True])
def test_smooth_refuses_a_window_that_is_not_odd_and_positive(window):
    with pytest.raises(ValueError, match="window"):
        smooth(np.zeros((5, 2)), window)


def test_complete_and_smooth_completes_first():
    # Nearest fill for AU gives frames 1..4 = [0, 0, 1, 1] (frame 2 ties: earlier), then window 3.
    out = complete_and_smooth("au", np.array([1, 4]), np.array([[0.0], [1.0]]), 4, window=3)
    np.testing.assert_allclose(out[:, 0], [0, 1 / 3, 2 / 3, 1])


# --- tune_windows ---------------------------------------------------------------------------------
def _series(rng: np.random.Generator, videos: int, frames: int):
    """Per-video true labels that change smoothly: VA sinusoids, EXPR and AU segments."""
    truth = {"va": [], "expr": [], "au": []}
    for _ in range(videos):
        t = np.arange(frames)[:, None]
        truth["va"].append(
            0.6 * np.sin(2 * np.pi * t / rng.uniform(80, 200, 2) + rng.uniform(0, 6))
        )
        segments = np.repeat(rng.integers(0, NUM_EXPR, frames // 30 + 1), 30)[:frames]
        truth["expr"].append(segments)
        truth["au"].append(np.repeat(rng.random((frames // 20 + 1, NUM_AU)) < 0.5, 20, 0)[:frames])
    return truth


def _outputs(rng: np.random.Generator, truth: dict, noise: float) -> dict:
    """Model-like outputs: VA with Gaussian noise, probabilities of a wrong class/AU on a fraction
    ``noise`` of the frames."""
    outputs = {"va": [], "expr": [], "au": []}
    for va, expr, au in zip(truth["va"], truth["expr"], truth["au"]):
        n = len(expr)
        outputs["va"].append(va + rng.normal(0, noise, va.shape))
        wrong = np.where(rng.random(n) < noise, rng.integers(0, NUM_EXPR, n), expr)
        outputs["expr"].append(0.8 * np.eye(NUM_EXPR)[wrong] + 0.2 / NUM_EXPR)
        flipped = np.where(rng.random(au.shape) < noise, ~au, au)
        outputs["au"].append(np.where(flipped, 0.9, 0.1))
    return outputs


def _masks(rng: np.random.Generator, truth: dict) -> dict:
    """Valid labels on about 90% of frames: ignored frames must not count."""
    return {task: [rng.random(len(a)) < 0.9 for a in arrays] for task, arrays in truth.items()}


def test_tuning_picks_a_window_on_noisy_smooth_signals():
    rng = np.random.default_rng(2)
    truth = _series(rng, videos=4, frames=400)
    windows, scores = tune_windows(_outputs(rng, truth, noise=0.3), truth, _masks(rng, truth))
    assert set(windows) == {"va", "expr", "au"}
    for task in windows:
        assert windows[task] > 1, (task, scores[task])
        entry = scores[task]
        assert entry["smoothed"] > entry["raw"] + 0.05
        assert entry["grid"][0] == 1 and entry["grid_scores"][0] == entry["raw"]
        assert entry["smoothed"] == max(entry["grid_scores"])
        assert entry["grid"][entry["grid_scores"].index(entry["smoothed"])] == windows[task]
    assert [scores[t]["metric"] for t in ("va", "expr", "au")] == ["ccc_mean", "f1_expr", "f1_au"]


def test_tuning_keeps_window_one_on_clean_outputs():
    rng = np.random.default_rng(3)
    truth = _series(rng, videos=3, frames=300)
    outputs = _outputs(rng, truth, noise=0.0)
    windows, scores = tune_windows(outputs, truth, _masks(rng, truth))
    assert windows == {"va": 1, "expr": 1, "au": 1}
    assert all(scores[t]["raw"] == pytest.approx(1.0) for t in windows)


def test_tuning_smooths_each_video_on_its_own():
    # Two constant videos of different classes, perfectly predicted: any window scores 1.0 unless
    # smoothing leaked from one video into the next.
    labels = {"expr": [np.zeros(10, int), np.ones(10, int)]}
    outputs = {"expr": [np.eye(NUM_EXPR)[e] for e in labels["expr"]]}
    masks = {"expr": [np.ones(10, bool)] * 2}
    windows, scores = tune_windows(outputs, labels, masks, grid=(1, 41))
    assert windows == {"expr": 1} and scores["expr"]["grid_scores"] == [1.0, 1.0]


def test_tuning_with_au_thresholds_scores_at_them():
    rng = np.random.default_rng(4)
    truth = _series(rng, videos=2, frames=200)
    probs = [np.where(au, 0.3, 0.1) for au in truth["au"]]  # right only at a threshold below 0.5
    masks = _masks(rng, truth)
    _, at_half = tune_windows({"au": probs}, truth, masks, grid=(1,))
    _, tuned = tune_windows({"au": probs}, truth, masks, grid=(1,), au_thresholds=np.full(12, 0.2))
    assert at_half["au"]["raw"] == 0.0 and tuned["au"]["raw"] == pytest.approx(1.0)
    assert tuned["au"]["metric"] == "f1_au_tuned"


def test_tuning_refuses_mismatched_videos():
    labels = {"va": [np.zeros((5, 2))]}
    with pytest.raises(ValueError, match="differ"):
        tune_windows({"va": [np.zeros((6, 2))]}, labels, {"va": [np.ones(5, bool)]})


# --- save_windows / load_windows ------------------------------------------------------------------
CHECKPOINT = Fingerprint("best.pt", "ab" * 32)


def test_windows_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    truth = _series(rng, videos=2, frames=200)
    windows, scores = tune_windows(_outputs(rng, truth, 0.3), truth, _masks(rng, truth))
    path = save_windows(tmp_path / "best.smoothing.json", CHECKPOINT, windows, scores)
    assert load_windows(path, CHECKPOINT) == (windows, scores, ())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.smoothing.json"]  # no temporary


def _document(**changes) -> str:
    document = {
        "version": 2,
        "kind": "smoothing",
        "checkpoint": CHECKPOINT.to_dict(),
        "windows": {"va": 3},
        "scores": {
            "va": {
                "metric": "ccc_mean",
                "raw": 0.1,
                "smoothed": 0.2,
                "grid": [1],
                "grid_scores": [0.1],
            }
        },
        "absent": [],
    }
    return json.dumps({**document, **changes})


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", r":1: not JSON"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        (_document(version=1), "format version 1, not 2"),
        (_document(kind="au_thresholds"), "not a smoothing file"),
        (_document(windows={"valence": 3}), "'windows'"),
        (_document(windows={"va": 4}), r"windows\.va.*odd"),
        (_document(windows={"va": 10**30}), r"windows\.va: window must be at most 99999 frames"),
        (_document(windows={"va": "x" * 10**6}), r"windows\.va: .* got 'xxx"),
        (_document(scores={}), "'scores'"),
        (_document(scores={"va": {"raw": 1}}), r"scores\.va"),
        (_document(absent=["va"]), "'absent'"),
        (_document(windows={}, scores={}, absent=[]), "'absent'"),
    ],
)
def test_a_bad_windows_file_is_a_one_line_data_error_naming_it(tmp_path, text, match):
    path = tmp_path / "best.smoothing.json"
    path.write_text(text)
    with pytest.raises(DataError, match=match) as caught:
        load_windows(path, CHECKPOINT)
    assert caught.value.path == path and str(path) in str(caught.value)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 600


def test_windows_tuned_for_other_bytes_of_the_checkpoint_are_refused(tmp_path):
    path = tmp_path / "best.smoothing.json"
    path.write_text(_document())
    assert load_windows(path, CHECKPOINT)[0] == {"va": 3}
    rewritten = Fingerprint("best.pt", "cd" * 32)  # best.pt after more epochs, say
    with pytest.raises(DataError, match=r"tuned for another checkpoint .*tune-smoothing` again"):
        load_windows(path, rewritten)


def test_a_windows_file_that_is_a_fifo_or_huge_is_refused_at_once(tmp_path):
    fifo = tmp_path / "best.smoothing.json"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="FIFO"):
        load_windows(fifo, CHECKPOINT)  # a plain open() would wait for a writer forever
    huge = tmp_path / "last.smoothing.json"
    huge.write_text(" " * (2 << 20))
    with pytest.raises(DataError, match="a smoothing file holds at most"):
        load_windows(huge, CHECKPOINT)


def test_a_missing_windows_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        load_windows(tmp_path / "absent.json", CHECKPOINT)


def test_saving_refuses_what_loading_would_refuse(tmp_path):
    for windows in ({"va": 2}, {"va": 10**30}):
        with pytest.raises(DataError, match=r"odd|at most"):
            save_windows(tmp_path / "s.json", CHECKPOINT, windows, {"va": {}})
    assert not list(tmp_path.iterdir())


def test_windows_and_frame_counts_beyond_any_video_are_refused():
    with pytest.raises(ValueError, match="at most 99999"):
        smooth(np.zeros((5, 2)), 10**30 + 1)
    with pytest.raises(ValueError, match=r"total must be in 1\.\.99999"):
        complete_video(np.array([1]), np.zeros((1, 2)), 10**12, "linear")


def test_a_task_without_a_valid_label_is_left_out_and_the_others_are_tuned():
    rng = np.random.default_rng(6)
    truth = _series(rng, videos=2, frames=100)
    masks = _masks(rng, truth)
    masks["va"] = [np.zeros_like(m) for m in masks["va"]]  # val: every VA label -5
    windows, scores = tune_windows(_outputs(rng, truth, 0.3), truth, masks)
    assert set(windows) == set(scores) == {"expr", "au"}


# --- end to end on a synthetic tree with corrupted frames -----------------------------------------
def test_smoothing_pixel_reads_beats_raw_reads_on_noisy_frames(tmp_path):
    """Per-frame reads of the labels from the pixels err on corrupted frames; completing each
    video, then smoothing, gets closer to the true labels for every task."""
    config = SynthConfig(
        out=tmp_path, videos=4, frames=300, seed=2, image_size=48, workers=1, noisy_frames=0.3
    )
    synthesize(config)
    outputs = {"va": [], "expr": [], "au": []}
    truth = {"va": [], "expr": [], "au": []}
    filled = 0
    for plan in plan_tree(config):
        labels = video_labels(config.seed, plan, config.frames)
        frames = np.flatnonzero(labels.has_image) + 1
        reads = [_read(frame_path(config.out, plan.name, int(f))) for f in frames]
        total = len(labels.expr)  # gaps and frames past the last image are completed too
        filled += total - len(frames)
        for task in outputs:
            values = np.stack([r[task] for r in reads]).astype(float)
            if task == "expr":
                values = np.eye(NUM_EXPR)[values.astype(int)]  # a one-hot "probability"
            outputs[task].append(complete_video(frames, values, total, INTERPOLATION[task]))
            truth[task].append(getattr(labels, task))
    assert filled > 0
    masks = {task: [np.ones(len(a), bool) for a in arrays] for task, arrays in truth.items()}

    windows, scores = tune_windows(outputs, truth, masks)
    for task in windows:
        assert windows[task] > 1, (task, scores[task])
        assert scores[task]["smoothed"] > scores[task]["raw"] + 0.03, (task, scores[task])
    # The same by hand at a fixed window, per VA dimension, for EXPR and for the AUs.
    raw = {task: np.concatenate(arrays) for task, arrays in outputs.items()}
    smoothed = {
        task: np.concatenate([smooth(a, 9) for a in arrays]) for task, arrays in outputs.items()
    }
    true = {task: np.concatenate(arrays) for task, arrays in truth.items()}
    for j in range(2):
        assert ccc(smoothed["va"][:, j], true["va"][:, j]) > ccc(raw["va"][:, j], true["va"][:, j])
    expr_f1 = [
        f1_score(true["expr"], p["expr"].argmax(1), average="macro") for p in (raw, smoothed)
    ]
    au_f1 = [f1_score(true["au"], p["au"] > 0.5, average="macro") for p in (raw, smoothed)]
    assert expr_f1[1] > expr_f1[0] + 0.03 and au_f1[1] > au_f1[0] + 0.03


def _read(path) -> dict[str, np.ndarray]:
    with Image.open(path) as image:
        return labels_from_pixels(np.asarray(image.convert("RGB")))
