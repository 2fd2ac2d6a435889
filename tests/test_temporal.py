"""train-temporal: timelines, windows, per-row prediction, learning over time, the run folder.

Feature folders are written here with ``features.write_split``/``write_manifest``: synthetic
features whose content encodes the labels, so what a head learns is checkable.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.metrics import f1_score
from torch import nn

from affectfast.cli import main
from affectfast.config import TemporalConfig
from affectfast.errors import DataError
from affectfast.features import (
    FEATURES_MANIFEST,
    VideoSpan,
    load_split,
    write_manifest,
    write_split,
)
from affectfast.sequence import (
    build_sequence_model,
    build_timeline,
    build_windows,
    count_parameters,
    feature_stats,
    gather_windows,
    predict_rows,
    video_timeline,
    window_starts,
)
from affectfast.tasks import NUM_AU, NUM_EXPR, TASKS
from affectfast.train_temporal import epoch_order, load_temporal_checkpoint, train_temporal

README = Path(__file__).resolve().parent.parent / "README.md"
ONSET = 3  # frames at a segment's start that show its cue


# --- feature folders ------------------------------------------------------------------------------


def write_folder(root: Path, splits: dict, dim: int) -> Path:
    """Write ``splits`` {name: (features, frames, videos, labels, masks)} and the manifest."""
    for name, (features, frames, videos, labels, masks) in splits.items():
        write_split(root, name, features, frames, videos, labels, masks)
    write_manifest(
        root,
        {
            "feature_dim": dim,
            "checkpoint": {"path": "runs/frame/best.pt", "sha256": "a" * 64},
            "pack": {"path": "shards/synth", "sha256": "b" * 64},
            "splits": {
                name: {"rows": len(s[1]), "labelled": sorted(s[3], key=TASKS.index)}
                for name, s in splits.items()
            },
        },
    )
    return root


def onset_split(videos: int, frames: int, seed: int, dim: int = 24, tasks=TASKS) -> tuple:
    """A split where each constant-label segment (15..40 frames) shows its EXPR class, AUs and
    VA in the features only in its first ONSET frames; elsewhere the features are noise. About 5 %
    of the frames after an onset have no image (the row is absent). Returns the split and, per
    row, whether it shows its segment's cue."""
    rng = np.random.default_rng(seed)
    rows_features, rows_frames, spans, onsets = [], [], [], []
    labels = {"va": [], "expr": [], "au": []}
    first = 0
    for v in range(videos):
        expr = np.zeros(frames, np.int64)
        au = np.zeros((frames, NUM_AU), np.float32)
        va = np.zeros((frames, 2), np.float32)
        cue = np.zeros((frames, dim), np.float32)
        onset = np.zeros(frames, bool)
        start = 0
        while start < frames:
            end = min(frames, start + int(rng.integers(15, 41)))
            expr[start:end] = rng.integers(0, NUM_EXPR)
            au[start:end] = rng.random(NUM_AU) < 0.3
            va[start:end] = rng.uniform(-0.9, 0.9, 2)
            cue[start : start + ONSET, :NUM_EXPR] = 3 * np.eye(NUM_EXPR)[expr[start]]
            cue[start : start + ONSET, 8:20] = 3 * (2 * au[start] - 1)
            cue[start : start + ONSET, 20:22] = 3 * va[start]
            onset[start : start + ONSET] = True
            start = end
        present = onset | (rng.random(frames) > 0.05)
        present[-1] = True
        features = cue + 0.5 * rng.standard_normal((frames, dim)).astype(np.float32)
        rows_features.append(features[present])
        rows_frames.append(np.flatnonzero(present) + 1)
        onsets.append(onset[present])
        for task, values in (("va", va), ("expr", expr), ("au", au)):
            labels[task].append(values[present])
        spans.append(VideoSpan(f"video{v:02d}", first, int(present.sum()), frames))
        first += int(present.sum())
    labels = {t: np.concatenate(labels[t]) for t in tasks}
    masks = {t: np.ones(first, bool) for t in tasks}
    split = (np.concatenate(rows_features), np.concatenate(rows_frames), spans, labels, masks)
    return split, np.concatenate(onsets)


@pytest.fixture(scope="module")
def onset_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("features") / "onset"
    train, _ = onset_split(16, 160, seed=0)
    val, val_onsets = onset_split(6, 160, seed=1)
    return write_folder(root, {"train": train, "val": val}, dim=24), val_onsets


SMALL = dict(window=64, stride=32, batch_size=8, hidden=64, dropout=0.0, lr=1e-2, device="cpu")


def hand_split(tmp_path) -> Path:
    """Three videos: A frames 2,3,6 of N=7; B frames 1,2,5 of N=3 (images past N); C 1,3 of N=3."""
    frames = np.array([2, 3, 6, 1, 2, 5, 1, 3])
    videos = [VideoSpan("A", 0, 3, 7), VideoSpan("B", 3, 3, 3), VideoSpan("C", 6, 2, 3)]
    features = np.arange(8, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
    labels = {"expr": np.arange(8) % NUM_EXPR}
    masks = {"expr": np.array([1, 1, 0, 1, 1, 1, 1, 1], bool)}
    return write_folder(
        tmp_path / "hand", {"train": (features, frames, videos, labels, masks)}, dim=4
    )


# --- timelines and windows ------------------------------------------------------------------------


def test_a_timeline_reads_the_nearest_frame_with_an_image_and_flags_the_rest(tmp_path):
    split = load_split(hand_split(tmp_path), "train")
    timeline = build_timeline(split)
    # A: frames 1..7; B: 1..5 (an image past N=3 extends it); C: 1..3 (frame 2 ties: the earlier).
    assert timeline.lengths.tolist() == [7, 5, 3] and timeline.starts.tolist() == [0, 7, 12]
    assert timeline.source.tolist() == [0, 0, 1, 1, 2, 2, 2] + [3, 4, 4, 5, 5] + [6, 6, 7]
    assert timeline.row.tolist() == [-1, 0, 1, -1, -1, 2, -1] + [3, 4, -1, -1, 5] + [6, -1, 7]
    assert timeline.missing.astype(int).tolist() == [1, 0, 0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 0, 1, 0]
    source, row = video_timeline(np.array([4]), 10, 1)
    assert source.tolist() == [10] * 4 and row.tolist() == [-1, -1, -1, 10]


def test_labels_sit_only_on_frames_with_an_image_and_padding_is_masked(tmp_path):
    split = load_split(hand_split(tmp_path), "train")
    timeline = build_timeline(split)
    windows = build_windows(timeline, window=6, stride=6)
    # A (7 frames): 0..5 and the last window ending at frame 7; B and C shorter: one padded each.
    assert windows.tolist() == [[0, 7], [1, 7], [7, 12], [12, 15]]
    batch = gather_windows(split, timeline, windows, 6, ("expr",))
    assert batch.features[0, :, 0].tolist() == [0, 0, 1, 1, 2, 2]
    assert batch.missing[0].tolist() == [1, 0, 0, 1, 1, 0]
    assert batch.rows[2].tolist() == [3, 4, -1, -1, 5, -1]
    assert batch.padding[2].tolist() == [False] * 5 + [True]
    assert batch.padding[3].tolist() == [False] * 3 + [True] * 3
    assert batch.missing[3].tolist() == [0, 1, 0, 1, 1, 1]  # padding reads as missing
    assert batch.features[3, :, 0].tolist() == [6, 6, 7, 0, 0, 0]
    assert batch.masks["expr"][0].tolist() == [False, True, True, False, False, False]
    assert batch.masks["expr"][3].tolist() == [True, False, True, False, False, False]
    assert batch.labels["expr"][3, [0, 2]].tolist() == [6, 7]


def test_frame_numbers_out_of_order_are_refused(tmp_path):
    frames = np.array([1, 3, 3])
    videos = [VideoSpan("A", 0, 3, 3)]
    split = (np.zeros((3, 2), np.float32), frames, videos, {}, {})
    folder = write_folder(tmp_path / "bad", {"train": split}, dim=2)
    with pytest.raises(DataError, match="frame numbers must rise from 1 up"):
        build_timeline(load_split(folder, "train"))


def test_an_empty_split_has_no_window_and_no_prediction(tmp_path):
    split = (np.zeros((0, 2), np.float32), np.zeros(0, np.int32), [], {}, {})
    folder = write_folder(tmp_path / "empty", {"val": split}, dim=2)
    empty = load_split(folder, "val")
    assert len(build_windows(build_timeline(empty), 4, 2)) == 0
    assert predict_rows(PositionModel(), empty, 4, 2)["va"].shape == (0, 2)


@pytest.mark.parametrize(
    ("length", "window", "stride", "starts"),
    [(10, 4, 3, [0, 3, 6]), (11, 4, 3, [0, 3, 6, 7]), (3, 4, 3, [0]), (4, 4, 1, [0])],
)
def test_window_starts_end_at_the_last_frame(length, window, stride, starts):
    assert window_starts(length, window, stride) == starts


def test_windows_never_cross_videos_and_cover_every_frame(onset_folder):
    split = load_split(onset_folder[0], "train")
    timeline = build_timeline(split)
    windows = build_windows(timeline, window=64, stride=48)
    video_of = np.repeat(np.arange(len(timeline.lengths)), timeline.lengths)
    covered = np.zeros(len(timeline.row), int)
    for start, end in windows:
        assert end == timeline.starts[video_of[start]] + timeline.lengths[video_of[start]]
        covered[start : min(start + 64, end)] += 1
    assert covered.min() >= 1
    # A window longer than every video: one padded window per video, nothing refused.
    long = build_windows(timeline, window=1000, stride=500)
    assert long[:, 0].tolist() == timeline.starts.tolist()


def test_the_standardization_is_read_in_chunks_and_matches_numpy():
    features = np.random.default_rng(0).standard_normal((10, 3)).astype(np.float16)
    features[:, 2] = 5  # a constant dimension: std 1, not a division by zero
    mean, std = feature_stats(features, chunk=3)
    np.testing.assert_allclose(mean, features.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(std[:2], features[:, :2].astype(np.float64).std(0), rtol=1e-5)
    assert std[2] == 1.0 and mean[2] == 5.0


# --- models and per-row prediction ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gru", "tcn", "transformer"])
def test_each_model_is_small_and_gives_the_frame_models_output_kinds(kind):
    model = build_sequence_model(kind, TASKS, 512)
    assert 0.5e6 <= count_parameters(model) <= 2e6
    padding = torch.zeros(2, 30, dtype=torch.bool)
    padding[1, 20:] = True
    outputs = model.eval()(torch.randn(2, 30, 512), torch.zeros(2, 30), padding)
    assert {t: tuple(o.shape) for t, o in outputs.items()} == {
        "va": (2, 30, 2),
        "expr": (2, 30, NUM_EXPR),
        "au": (2, 30, NUM_AU),
    }
    assert all(torch.isfinite(o).all() for o in outputs.values())


class PositionModel(nn.Module):
    """Outputs a frame's position in its window (VA: also its first feature), so overlapping
    windows give a frame different outputs and their average is checkable by hand."""

    tasks = ("va", "au")

    def forward(self, features, missing, padding):
        position = torch.arange(features.shape[1], dtype=torch.float32).expand(padding.shape)
        va = torch.stack([position, features[..., 0]], -1)
        return {"va": va, "au": position.unsqueeze(-1).expand(*padding.shape, NUM_AU)}


def test_predict_rows_averages_overlapping_windows_per_frame(tmp_path):
    frames = np.arange(1, 11)  # one video of 10 frames, all with an image
    features = np.arange(10, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    folder = write_folder(
        tmp_path / "one",
        {"val": (features, frames, [VideoSpan("v", 0, 10, 10)], {}, {})},
        dim=2,
    )
    split = load_split(folder, "val")
    outputs = predict_rows(PositionModel(), split, window=4, stride=3, batch_size=2)
    # Windows start at 0, 3 and 6: frames 4 and 7 (1-based) are in two windows (positions 3, 0).
    position = [0, 1, 2, 1.5, 1, 2, 1.5, 1, 2, 3]
    assert outputs["va"][:, 0].tolist() == position
    assert outputs["va"][:, 1].tolist() == list(range(10))
    expected_au = 1 / (1 + np.exp(-np.asarray(position, np.float32)))  # sigmoid of the mean logit
    np.testing.assert_allclose(outputs["au"], np.repeat(expected_au[:, None], NUM_AU, 1), 1e-6)
    assert outputs["au"][3, 0] != pytest.approx((1 / (1 + np.exp(-3)) + 0.5) / 2)


# --- learning over time ---------------------------------------------------------------------------


def per_frame_oracle(split, onsets: np.ndarray, train_labels: dict) -> tuple[float, float]:
    """EXPR macro F1 and AU mean F1 of the best per-frame predictor: the cue where a frame shows
    it, the train split's most frequent label elsewhere."""
    expr = np.asarray(split.labels["expr"])
    au = np.asarray(split.labels["au"]).astype(int)
    majority = np.bincount(train_labels["expr"], minlength=NUM_EXPR).argmax()
    au_majority = (np.asarray(train_labels["au"]).mean(0) > 0.5).astype(int)
    guess_expr = np.where(onsets, expr, majority)
    guess_au = np.where(onsets[:, None], au, au_majority)
    f1_expr = f1_score(expr, guess_expr, average="macro", zero_division=0)
    f1_au = np.mean([f1_score(au[:, j], guess_au[:, j], zero_division=0) for j in range(NUM_AU)])
    return float(f1_expr), float(f1_au)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_gru_learns_labels_shown_only_at_segment_onsets(
    onset_folder, tmp_path, one_thread, device
):
    folder, val_onsets = onset_folder
    config = TemporalConfig(
        features=folder, out=tmp_path / "gru", epochs=12, **{**SMALL, "device": device}
    )
    records = train_temporal(config)
    train = load_split(folder, "train")
    oracle_expr, oracle_au = per_frame_oracle(load_split(folder, "val"), val_onsets, train.labels)
    last = records[-1]
    assert oracle_expr < 0.35 and oracle_au < 0.4  # the cue is rare: per-frame models stay low
    assert last["f1_expr"] > oracle_expr + 0.3, (last, oracle_expr)
    assert last["f1_au"] > oracle_au + 0.2, (last, oracle_au)
    assert last["ccc_mean"] > 0.5, last
    if device == "cuda":  # the checkpoint loads on the CPU and predicts there as on the GPU
        model, head, _ = load_temporal_checkpoint(tmp_path / "gru" / "last.pt")
        val = load_split(folder, "val")
        on_cpu = predict_rows(model, val, head.window, head.stride, "cpu")
        on_gpu = predict_rows(model.to("cuda"), val, head.window, head.stride, "cuda")
        for task, outputs in on_cpu.items():  # TF32 GRU matmuls on the GPU: ~1e-3 apart
            np.testing.assert_allclose(on_gpu[task], outputs, rtol=1e-2, atol=1e-2, err_msg=task)


# --- the run folder -------------------------------------------------------------------------------


def readme_metrics_fields() -> set[str]:
    """The field names of README's metrics.jsonl table (what a frame `train` run writes: its
    tests check the table against a run's records)."""
    text = README.read_text()
    table = text[text.index("| metrics.jsonl field |") :].split("\n\n")[0]
    return {
        name for row in table.splitlines()[2:] for name in re.findall(r"`(\w+)`", row.split("|")[1])
    }


@pytest.fixture(scope="module")
def straight_run(onset_folder, tmp_path_factory, one_thread_per_module):
    out = tmp_path_factory.mktemp("runs") / "straight"
    config = TemporalConfig(features=onset_folder[0], out=out, epochs=3, model="tcn", **SMALL)
    return config, train_temporal(config)


def test_a_run_folder_holds_what_a_frame_run_folder_holds(straight_run):
    config, records = straight_run
    out = config.out
    assert sorted(p.name for p in out.iterdir()) == [
        "best.pt",
        "config.json",
        "last.pt",
        "metrics.jsonl",
        "tb",
    ]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == records and [r["epoch"] for r in lines] == [1, 2, 3]
    assert set(lines[0]) | {"f1_au_tuned"} == readme_metrics_fields()
    assert all(r["train_batches"] == 8 for r in lines)  # 16 videos x 4 windows / 8
    assert json.loads((out / "config.json").read_text()) == config.to_dict()
    model, saved, checkpoint = load_temporal_checkpoint(out / "last.pt")
    assert saved == config and checkpoint["stage"] == "temporal" and checkpoint["epoch"] == 3
    assert checkpoint["features"]["checkpoint"]["sha256"] == "a" * 64
    assert checkpoint["features"]["pack"]["sha256"] == "b" * 64
    assert checkpoint["features"]["path"] == str(config.features.resolve())
    train = load_split(config.features, "train")
    mean = np.asarray(train.features, np.float64).mean(0)
    np.testing.assert_allclose(checkpoint["standardization"]["mean"].numpy(), mean, atol=1e-5)
    np.testing.assert_allclose(model.feature_mean.numpy(), mean, atol=1e-5)
    best = load_temporal_checkpoint(out / "best.pt")[2]
    assert best["metrics"]["p_mtl"] == max(r["p_mtl"] for r in lines)


def test_resume_ends_exactly_like_an_uninterrupted_run(straight_run, tmp_path):
    config, records = straight_run
    resumed = TemporalConfig(**{**config.__dict__, "out": tmp_path / "resumed"})
    first = train_temporal(resumed, stop_after=2)
    second = train_temporal(resumed, resume=True)
    timing = {"images_per_s", "epoch_seconds"}

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in timing} for r in rows]

    assert [r["epoch"] for r in first + second] == [1, 2, 3]
    assert strip(first + second) == strip(records)
    a = torch.load(config.out / "last.pt", weights_only=True)["model"]
    b = torch.load(resumed.out / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_last_pt_whose_states_do_not_fit_is_one_line_naming_it(tmp_path):
    train, _ = onset_split(2, 40, seed=0)
    folder = write_folder(tmp_path / "f", {"train": train}, dim=24)
    config = TemporalConfig(features=folder, out=tmp_path / "r", epochs=2, **SMALL)
    train_temporal(config, stop_after=1)
    last = config.out / "last.pt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["optimizer"]["param_groups"] = []  # another optimizer's state
    torch.save(checkpoint, last)
    with pytest.raises(DataError, match="cannot restore this run from it") as error:
        train_temporal(config, resume=True)
    assert error.value.path == last and "\n" not in str(error.value)


def test_resume_refuses_features_from_another_frame_checkpoint(tmp_path):
    train, _ = onset_split(2, 40, seed=0)
    folder = write_folder(tmp_path / "f", {"train": train}, dim=24)
    config = TemporalConfig(features=folder, out=tmp_path / "r", epochs=2, **SMALL)
    train_temporal(config, stop_after=1)
    manifest = json.loads((folder / FEATURES_MANIFEST).read_text())
    manifest["checkpoint"]["sha256"] = "c" * 64  # extracted again from another frame model
    (folder / FEATURES_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="another frame checkpoint"):
        train_temporal(config, resume=True)
    assert [
        json.loads(x)["epoch"] for x in (config.out / "metrics.jsonl").read_text().splitlines()
    ] == [1]


# --- refusals through the CLI ---------------------------------------------------------------------


def run_cli(*args: str):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output.strip().splitlines()


def test_tasks_the_train_split_has_no_labels_for_are_refused(tmp_path):
    train, _ = onset_split(2, 40, seed=0, tasks=("expr",))
    folder = write_folder(tmp_path / "expr-only", {"train": train}, dim=24)
    code, lines = run_cli(
        "train-temporal", str(folder), "--tasks", "va,expr", "--out", str(tmp_path / "r")
    )
    assert code == 2 and len(lines) == 1, lines
    assert "the train split has no va labels" in lines[0] and "--tasks expr" in lines[0]
    assert not (tmp_path / "r").exists()


def test_a_half_written_feature_folder_is_refused(tmp_path):
    train, _ = onset_split(2, 40, seed=0)
    folder = write_folder(tmp_path / "half", {"train": train}, dim=24)
    (folder / FEATURES_MANIFEST).unlink()
    code, lines = run_cli("train-temporal", str(folder), "--out", str(tmp_path / "r"))
    assert code == 2 and len(lines) == 1 and "not a finished feature folder" in lines[0], lines


def test_resume_on_a_frame_run_folder_is_refused(onset_folder, tmp_path):
    out = tmp_path / "frame-run"
    out.mkdir()
    torch.save({"format": 1, "config": {}, "model": {}, "epoch": 1}, out / "last.pt")
    code, lines = run_cli("train-temporal", str(onset_folder[0]), "--out", str(out), "--resume")
    assert code == 2 and len(lines) == 1, lines
    assert "a frame checkpoint" in lines[0] and str(out / "last.pt") in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["last.pt"]


def test_a_temporal_checkpoint_is_refused_by_train_init(straight_run, packed, tmp_path):
    checkpoint = straight_run[0].out / "best.pt"
    code, lines = run_cli(
        "train",
        str(packed),
        "--out",
        str(tmp_path / "r"),
        "--init",
        f"ckpt:{checkpoint}",
        *("--loader", "dali-cpu", "--amp", "off"),  # no CUDA fallback notice
    )
    assert code == 2 and len(lines) == 1, lines
    assert "a temporal checkpoint has no ResNet trunk" in lines[0] and str(checkpoint) in lines[0]
    assert not (tmp_path / "r").exists()


def test_without_a_val_split_the_metrics_are_null_and_no_best_pt(tmp_path):
    train, _ = onset_split(2, 40, seed=0)
    folder = write_folder(tmp_path / "train-only", {"train": train}, dim=24)
    config = TemporalConfig(features=folder, out=tmp_path / "r", epochs=1, **SMALL)
    (record,) = train_temporal(config)
    assert set(record) | {"f1_au_tuned"} == readme_metrics_fields()
    assert record["p_mtl"] is None and record["frames_expr"] == 0
    assert sorted(p.name for p in config.out.iterdir()) == [
        "config.json",
        "last.pt",
        "metrics.jsonl",
        "tb",
    ]


def test_every_window_once_an_epoch_in_a_fresh_order_per_epoch_and_seed(tmp_path):
    config = TemporalConfig(features=tmp_path, out=tmp_path / "run", **SMALL)
    other_seed = TemporalConfig(features=tmp_path, out=tmp_path / "run", seed=1, **SMALL)
    orders = [epoch_order(config, epoch, 500) for epoch in range(3)]
    for order in orders:
        np.testing.assert_array_equal(np.sort(order), np.arange(500))  # each window once
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    assert not np.array_equal(orders[0], epoch_order(other_seed, 0, 500))
    np.testing.assert_array_equal(orders[1], epoch_order(config, 1, 500))  # a resume repeats it


def test_au_weighs_six_unless_the_task_weights_name_it():
    def weights(**kwargs):
        return dict(TemporalConfig(features="f", out="o", **kwargs).task_weights)

    assert weights() == {"au": 6.0}
    assert weights(tasks="va,expr") == {}
    assert weights(task_weights=(("va", 2.0),)) == {"au": 6.0, "va": 2.0}
    assert weights(task_weights=(("au", 1.0),)) == {"au": 1.0}
    config = TemporalConfig(features="f", out="o")  # what config.json records reads back alike
    assert TemporalConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
