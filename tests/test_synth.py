"""The synthetic Aff-Wild2 tree: layout, quirks, determinism, and labels that are really in the pixels."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from affectfast.cli import main
from affectfast.smoothing import complete_video, tune_windows
from affectfast.synth import (
    NO_CUE,
    ONSET_SEGMENT,
    SynthConfig,
    frame_corruption,
    frame_path,
    labels_from_pixels,
    plan_tree,
    synthesize,
    video_labels,
)
from affectfast.tasks import CHALLENGE_DIRS, HEADERS, NUM_AU, NUM_EXPR

CHALLENGES = {task: names[0] for task, names in CHALLENGE_DIRS.items()}
SETS = {"Train_Set": "train", "Validation_Set": "val"}


def annotations(root: Path) -> dict[tuple[str, str], tuple[str, list[str], bytes]]:
    """{(task, video): (split, lines, raw bytes)} for every annotation file of a tree."""
    found = {}
    for task, challenge in CHALLENGES.items():
        for set_dir, split in SETS.items():
            for path in sorted((root / "annotations" / challenge / set_dir).glob("*.txt")):
                raw = path.read_bytes()
                found[(task, path.stem)] = (split, raw.decode().splitlines(), raw)
    return found


def images(root: Path) -> dict[str, list[int]]:
    """{video: sorted 1-based frame numbers that have an image}."""
    return {
        d.name: sorted(int(f.stem) for f in d.glob("*.jpg"))
        for d in sorted((root / "cropped_aligned").iterdir())
    }


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_layout_and_headers(synth_tree):
    assert sorted(p.name for p in synth_tree.iterdir()) == ["annotations", "cropped_aligned"]
    assert sorted(p.name for p in (synth_tree / "annotations").iterdir()) == sorted(
        CHALLENGES.values()
    )
    for challenge in CHALLENGES.values():
        assert sorted(p.name for p in (synth_tree / "annotations" / challenge).iterdir()) == sorted(
            SETS
        )
    frames = images(synth_tree)
    assert len(frames) == 8
    for video, numbers in frames.items():
        assert "." not in video and numbers
        for path in (synth_tree / "cropped_aligned" / video).iterdir():
            assert re.fullmatch(r"\d{5}\.jpg", path.name)
        with Image.open(synth_tree / "cropped_aligned" / video / f"{numbers[0]:05d}.jpg") as image:
            assert image.format == "JPEG" and image.size == (64, 64) and image.mode == "RGB"
    pattern = {
        "va": r"-?\d\.\d{3},-?\d\.\d{3}|-5,-?\d\.\d{3}|-?\d\.\d{3},-5|-5,-5",
        "expr": r"-1|[0-7]",
        "au": r"(-1(,-1){11})|([01](,[01]){11})",
    }
    for (task, video), (_, lines, _) in annotations(synth_tree).items():
        assert video in frames
        assert lines[0] == ",".join(HEADERS[task])
        for line in lines[1:]:
            assert re.fullmatch(pattern[task], line), (task, video, line)
        if task == "va":
            values = np.array([line.split(",") for line in lines[1:]], dtype=float)
            assert ((np.abs(values) <= 1) | (values == -5)).all()


def test_every_quirk_is_present(synth_tree):
    frames = images(synth_tree)
    files = annotations(synth_tree)
    # Frames with no image inside a video, and annotation lines past the last image.
    assert any(len(n) < n[-1] for n in frames.values())
    assert any(len(lines) - 1 > frames[video][-1] for (_, video), (_, lines, _) in files.items())
    # Ignore markers: VA -5 in both values, in valence only, in arousal only; EXPR -1; AU rows of -1.
    va_lines = [
        line for (task, _), (_, lines, _) in files.items() if task == "va" for line in lines[1:]
    ]
    assert "-5,-5" in va_lines
    assert any(line.startswith("-5,") and line != "-5,-5" for line in va_lines)
    assert any(line.endswith(",-5") and line != "-5,-5" for line in va_lines)
    assert any("-1" in lines[1:] for (task, _), (_, lines, _) in files.items() if task == "expr")
    au_ignored = ",".join(["-1"] * NUM_AU)
    assert any(au_ignored in lines for (task, _), (_, lines, _) in files.items() if task == "au")
    # A video lacking one task's file (but keeping the others).
    tasks_of = {video: {task for task, v in files if v == video} for video in frames}
    assert any(len(tasks) == 2 for tasks in tasks_of.values())
    assert all(tasks for tasks in tasks_of.values())
    # A _left/_right pair: two frames folders and their own annotation files.
    lefts = [v[:-5] for v in frames if v.endswith("_left")]
    assert lefts and all(f"{base}_right" in frames for base in lefts)
    assert all(tasks_of[f"{base}_left"] and tasks_of[f"{base}_right"] for base in lefts)
    # Both sets, and one set per video whatever the task.
    split_of: dict[str, set[str]] = {}
    for (_, video), (split, _, _) in files.items():
        split_of.setdefault(video, set()).add(split)
    assert all(len(s) == 1 for s in split_of.values())
    assert {s for (s,) in split_of.values()} == {"train", "val"}
    # Files with and without a final newline.
    assert {raw.endswith(b"\n") for _, _, raw in files.values()} == {True, False}
    # Labels change smoothly: VA steps are small, expressions come in segments that change.
    for (task, video), (_, lines, _) in files.items():
        if task == "va":
            values = np.array([line.split(",") for line in lines[1:]], dtype=float)
            valid = (values != -5).all(axis=1)
            steps = np.abs(np.diff(values, axis=0))[valid[1:] & valid[:-1]]
            assert steps.max() < 0.1, video
    changes = []
    for (task, _), (_, lines, _) in files.items():
        if task == "expr":
            expr = np.array(lines[1:], dtype=int)
            expr = expr[expr >= 0]
            changes.append(np.count_nonzero(np.diff(expr)) / len(expr))
    assert max(changes) > 0 and np.mean(changes) < 0.15  # segments, not noise


def test_same_seed_same_bytes_for_any_worker_count_and_other_seed_differs(tmp_path):
    def tree(name, seed, workers):
        return synthesize(
            SynthConfig(
                out=tmp_path / name, videos=5, frames=20, seed=seed, image_size=48, workers=workers
            )
        )

    one, two = tree_digest(tree("w1", 3, 1)), tree_digest(tree("w2", 3, 2))
    assert one == two and len(one) > 80
    other = tree_digest(tree("s4", 4, 2))
    assert other != one
    assert set(other.values()).isdisjoint(one.values())


def _expected(files, video: str, frame: int) -> dict[str, np.ndarray | None]:
    """The annotated labels of one frame, None where absent or ignored."""
    expected: dict[str, np.ndarray | None] = {"va": None, "expr": None, "au": None}
    for task in expected:
        if (task, video) in files:
            values = np.array(files[(task, video)][1][frame].split(","), dtype=float)
            if not (values == -5).any() and not (values == -1).all():
                expected[task] = values
    return expected


@pytest.mark.parametrize("size, flip", [(64, False), (64, True), (48, True), (32, False)])
def test_labels_are_in_the_pixels(synth_tree, size, flip):
    files = annotations(synth_tree)
    checked = 0
    for video, numbers in images(synth_tree).items():
        for frame in numbers[::7]:
            with Image.open(synth_tree / "cropped_aligned" / video / f"{frame:05d}.jpg") as image:
                image = image.convert("RGB").resize((size, size), Image.BILINEAR)
                if flip:
                    image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                decoded = labels_from_pixels(np.asarray(image))
            expected = _expected(files, video, frame)
            if expected["va"] is not None:
                np.testing.assert_allclose(decoded["va"], expected["va"], atol=0.08)
            if expected["expr"] is not None:
                assert decoded["expr"] == expected["expr"][0]
            if expected["au"] is not None:
                np.testing.assert_array_equal(decoded["au"], expected["au"])
            checked += 1
    assert checked > 30


def test_pixels_differ_when_labels_differ(synth_tree):
    """The decoder is not fooled: a frame's decoded labels differ from a frame labelled otherwise."""
    files = annotations(synth_tree)
    video = next(v for (t, v) in files if t == "expr")
    numbers = images(synth_tree)[video]
    decoded = {}
    for frame in numbers:
        with Image.open(synth_tree / "cropped_aligned" / video / f"{frame:05d}.jpg") as image:
            decoded[frame] = labels_from_pixels(np.asarray(image.convert("RGB")))
    expr = [decoded[f]["expr"] for f in numbers]
    au = np.stack([decoded[f]["au"] for f in numbers])
    va = np.stack([decoded[f]["va"] for f in numbers])
    assert len(set(expr)) > 1 or len({tuple(r) for r in au}) > 1
    assert np.ptp(va, axis=0).max() > 0.01


def test_reader_reads_the_tree_and_agrees_with_the_pixels(synth_tree):
    from affectfast.affwild2 import find_annotation_dirs, image_path, read_tree

    videos = read_tree(find_annotation_dirs(synth_tree))
    frames = images(synth_tree)
    assert sorted(v.name for v in videos) == sorted(frames)
    assert {v.split for v in videos} == {"train", "val"}
    for labels in videos:
        assert set(labels.frames.tolist()) <= set(frames[labels.name])
        for i in range(0, len(labels), 9):
            path = image_path(synth_tree / "cropped_aligned", labels.name, int(labels.frames[i]))
            with Image.open(path) as image:
                decoded = labels_from_pixels(np.asarray(image.convert("RGB")))
            if not np.isnan(labels.va[i]).any():
                np.testing.assert_allclose(decoded["va"], labels.va[i], atol=0.08)
            if labels.expr[i] >= 0:
                assert decoded["expr"] == labels.expr[i]
            if (labels.au[i] >= 0).all():
                np.testing.assert_array_equal(decoded["au"], labels.au[i])


@pytest.mark.parametrize(
    "field, value",
    [
        ("videos", 3),
        ("frames", 5),
        ("image_size", 16),
        ("workers", 0),
        ("seed", -1),
        ("noisy_frames", -0.1),
        ("noisy_frames", 1.5),
        ("test_videos", -1),
        ("onset_cues", -1),
        ("onset_cues", 25),
    ],
)
def test_config_rejects_bad_values(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        SynthConfig(out=tmp_path / "t", **{field: value})


def test_refuses_a_non_empty_folder_unless_told(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    config = dict(out=tmp_path, videos=4, frames=10, image_size=32, workers=1)
    with pytest.raises(FileExistsError):
        synthesize(SynthConfig(**config))
    assert synthesize(SynthConfig(**config, overwrite=True)) == tmp_path
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_cli_smoke(tmp_path):
    out = tmp_path / "tree"
    result = CliRunner().invoke(
        main,
        [
            "synth",
            str(out),
            "--videos",
            "4",
            "--frames",
            "10",
            "--seed",
            "1",
            "--image-size",
            "32",
            "--workers",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert len(images(out)) == 4
    again = CliRunner().invoke(main, ["synth", str(out), "--videos", "4", "--frames", "10"])
    assert again.exit_code == 2 and "not empty" in again.output


def test_cli_noisy_frames_and_test_videos_reach_the_config(tmp_path):
    common = ["--videos", "4", "--frames", "10", "--seed", "1", "--image-size", "32"]
    command = ["synth", str(tmp_path / "cli"), *common, "--workers", "1"]
    result = CliRunner().invoke(main, [*command, "--noisy-frames", "0.3", "--test-videos", "2"])
    assert result.exit_code == 0, result.output
    assert "2 test videos" in result.output
    config = SynthConfig(
        out=tmp_path / "api",
        videos=4,
        frames=10,
        seed=1,
        image_size=32,
        workers=1,
        noisy_frames=0.3,
        test_videos=2,
    )
    assert tree_digest(tmp_path / "cli") == tree_digest(synthesize(config))
    for option, value in (("--noisy-frames", "1.5"), ("--test-videos", "-1")):
        bad = CliRunner().invoke(main, ["synth", str(tmp_path / "bad"), *common, option, value])
        assert bad.exit_code == 2 and option in bad.output
    assert "[default: 0.0]" in CliRunner().invoke(main, ["synth", "--help"]).output


# --- corrupted frames (noisy_frames) -----------------------------------------------------------
def _combined(digest: dict[str, str]) -> str:
    """One sha256 over a tree_digest."""
    return hashlib.sha256(
        "".join(f"{k} {v}\n" for k, v in sorted(digest.items())).encode()
    ).hexdigest()


# Digests of SynthConfig(videos=5, frames=12, seed=7, image_size=32) as written before the
# noisy_frames, test_videos and onset_cues options existed. JPEG bytes depend on the encoder build, so the
# whole-tree digest is compared only under the libjpeg-turbo it was made with.
GOLDEN_ANNOTATIONS = "df80ee6650f4f9e9111f9041c1ba864ca9462994607fccf9d3494e8c907fe2d3"
GOLDEN_TREE = "548b73201d89814f6be750a581c5355fcc638226811ac8e67c7bfea0618d0187"
GOLDEN_LIBJPEG_TURBO = "3.2.0"


def test_default_tree_is_byte_identical_to_before_the_new_options(tmp_path):
    from PIL import features

    config = SynthConfig(out=tmp_path, videos=5, frames=12, seed=7, image_size=32, workers=1)
    assert (config.noisy_frames, config.test_videos, config.onset_cues) == (0.0, 0, 0)
    digest = tree_digest(synthesize(config))
    assert len(digest) == 62
    assert _combined({k: v for k, v in digest.items() if k.endswith(".txt")}) == GOLDEN_ANNOTATIONS
    if features.version("libjpeg_turbo") == GOLDEN_LIBJPEG_TURBO:
        assert _combined(digest) == GOLDEN_TREE


def test_noisy_frames_change_exactly_the_corrupted_frames_for_any_worker_count(tmp_path):
    def tree(name, workers, noisy):
        config = SynthConfig(
            out=tmp_path / name,
            videos=5,
            frames=40,
            seed=5,
            image_size=32,
            workers=workers,
            noisy_frames=noisy,
        )
        return config, tree_digest(synthesize(config))

    _, clean = tree("clean", 1, 0.0)
    config, noisy = tree("noisy", 1, 0.5)
    assert tree("noisy2", 2, 0.5)[1] == noisy
    assert clean.keys() == noisy.keys()
    plans = {plan.name: plan for plan in plan_tree(config)}
    corrupted = 0
    for path in clean:
        if path.endswith(".txt"):  # annotations: labels are untouched
            assert clean[path] == noisy[path], path
            continue
        _, video, name = path.split("/")
        kind = frame_corruption(config.seed, plans[video], int(name[:5]), config.noisy_frames)
        assert (clean[path] != noisy[path]) == (kind is not None), (path, kind)
        corrupted += kind is not None
    images_count = sum(not p.endswith(".txt") for p in clean)
    assert 0.35 < corrupted / images_count < 0.65


def test_corrupted_frames_disagree_with_their_labels_and_clean_ones_do_not(tmp_path):
    config = SynthConfig(
        out=tmp_path, videos=4, frames=150, seed=1, image_size=48, workers=1, noisy_frames=0.3
    )
    synthesize(config)
    files = annotations(tmp_path)
    plans = {plan.name: plan for plan in plan_tree(config)}
    wrong: dict[tuple[bool, str], list[bool]] = {}  # (corrupted, task) -> per frame: read != label
    kinds = []
    for video, numbers in images(tmp_path).items():
        for frame in numbers:
            kind = frame_corruption(config.seed, plans[video], frame, config.noisy_frames)
            kinds.append(kind)
            with Image.open(tmp_path / "cropped_aligned" / video / f"{frame:05d}.jpg") as image:
                decoded = labels_from_pixels(np.asarray(image.convert("RGB")))
            for task, label in _expected(files, video, frame).items():
                if label is None:
                    continue
                if task == "va":
                    miss = np.abs(decoded["va"] - label).max() > 0.08
                else:
                    miss = not np.array_equal(np.atleast_1d(decoded[task]), label)
                wrong.setdefault((kind is not None, task), []).append(bool(miss))
    assert 0.2 < np.mean([k is not None for k in kinds]) < 0.4
    assert {k for k in kinds if k} == {"occlusion", "exposure", "blur"}
    rate = {key: np.mean(misses) for key, misses in wrong.items()}
    for task, margin in (("va", 0.3), ("expr", 0.1), ("au", 0.5)):
        assert rate[(False, task)] < 0.01, (task, rate)
        assert rate[(True, task)] > rate[(False, task)] + margin, (task, rate)


# --- a held-out test set (test_videos) ----------------------------------------------------------
def test_test_set_frames_without_annotations_and_one_list_per_challenge(tmp_path):
    from affectfast.affwild2 import find_annotation_dirs, read_tree

    common = dict(videos=6, frames=20, seed=1, image_size=32, workers=1)
    base = tree_digest(synthesize(SynthConfig(out=tmp_path / "base", **common)))
    root = synthesize(SynthConfig(out=tmp_path / "test", test_videos=5, **common))
    digest = tree_digest(root)
    # Train and val are the same bytes as without a test set.
    assert {k: v for k, v in digest.items() if k in base} == base
    test_videos = set(images(root)) - set(images(tmp_path / "base"))
    assert len(test_videos) == 5
    assert any(v.endswith("_left") for v in test_videos)
    # No annotation file of a test video anywhere, and the reader (hence pack) never sees them.
    assert not test_videos & {video for _, video in annotations(root)}
    assert not [
        p for p in digest if p not in base and not p.startswith(("cropped_aligned/", "test_lists/"))
    ]
    read = {v.name for v in read_tree(find_annotation_dirs(root))}
    assert read == {v.name for v in read_tree(find_annotation_dirs(tmp_path / "base"))}
    # One list per challenge: sorted names, one a line; each non-empty, not all the same.
    lists_dir = root / "test_lists"
    assert sorted(p.name for p in lists_dir.iterdir()) == [
        "AU_test_set.txt",
        "EXPR_test_set.txt",
        "VA_test_set.txt",
        "frame_counts.csv",
    ]
    lists = {}
    for name in ("VA", "EXPR", "AU"):
        text = (lists_dir / f"{name}_test_set.txt").read_text()
        assert text.endswith("\n")
        lists[name] = text.splitlines()
        assert lists[name] and lists[name] == sorted(set(lists[name]))
    assert set().union(*map(set, lists.values())) == test_videos
    assert len({tuple(v) for v in lists.values()}) > 1
    # frame_counts.csv: every test video's length, at least up to its last image.
    lines = (lists_dir / "frame_counts.csv").read_text().splitlines()
    assert lines[0] == "video,frames"
    counts = {video: int(n) for video, n in (line.split(",") for line in lines[1:])}
    assert counts.keys() == test_videos
    frames = images(root)
    assert all(common["frames"] <= counts[v] <= common["frames"] + 5 for v in test_videos)
    assert all(frames[v][-1] <= counts[v] for v in test_videos)


# --- cues only at segment onsets (onset_cues) -----------------------------------------------------
def _runs(values: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) runs of equal consecutive values."""
    edges = [0, *(np.flatnonzero(np.diff(values)) + 1).tolist(), len(values)]
    return list(zip(edges[:-1], edges[1:]))


def _read_frame(root: Path, video: str, frame: int) -> dict[str, np.ndarray]:
    with Image.open(frame_path(root, video, frame)) as image:
        return labels_from_pixels(np.asarray(image.convert("RGB")))


def test_onset_cues_keep_va_and_gaps_and_give_long_alternating_segments():
    plans = plan_tree(SynthConfig(out=Path("unused"), videos=12, frames=600, seed=3))
    low, high = ONSET_SEGMENT
    for plan in plans:
        plain, onset = (video_labels(3, plan, 600, k) for k in (0, 6))
        np.testing.assert_array_equal(onset.va, plain.va)
        np.testing.assert_array_equal(onset.has_image, plain.has_image)
        columns = [onset.expr] + [onset.au[:, k] for k in range(NUM_AU)]
        for values in columns:
            lengths = [stop - start for start, stop in _runs(values)]
            # Every run but the last (cut by the end of the video) is one whole segment: AU
            # segments alternate on and off, so no two merge into a run longer than a segment.
            assert all(low <= n <= high for n in lengths[:-1]), lengths
    assert 0.35 < np.mean([video_labels(3, p, 600, 6).au.mean() for p in plans]) < 0.65


def test_onset_cues_show_in_the_pixels_only_at_onsets_and_offsets(tmp_path):
    """Pixels show the expression on the first K frames of each segment and the neutral disc after;
    an AU's marks on the first K frames of an "on" run (in its colour) and its last K frames (in
    black), never in an "off" run; VA on every frame; labels as ever."""
    k = 6
    config = SynthConfig(
        out=tmp_path, videos=4, frames=300, seed=1, image_size=48, workers=1, onset_cues=k
    )
    synthesize(config)
    files = annotations(tmp_path)
    shown = {"expr": 0, "hidden expr": 0, "au": 0, "hidden au": 0}
    per_frame, truths = [], []  # EXPR as a per-frame reader sees it: one-hot, uniform where hidden
    for plan in plan_tree(config):
        truth = video_labels(config.seed, plan, config.frames, k)
        # The annotation files hold the labels, constant over each segment, not the cues.
        if ("expr", plan.name) in files:
            lines = np.array(files[("expr", plan.name)][1][1:], dtype=int)
            np.testing.assert_array_equal(lines[lines >= 0], truth.expr[lines >= 0])
        reads = {f: _read_frame(tmp_path, plan.name, f) for f in images(tmp_path)[plan.name]}
        for frame, read in reads.items():
            np.testing.assert_allclose(read["va"], truth.va[frame - 1], atol=0.08)
        for start, stop in _runs(truth.expr):
            for frame in (f for f in reads if start < f <= stop):
                onset = frame - 1 - start < k
                assert reads[frame]["expr"] == (truth.expr[start] if onset else NO_CUE)
                shown["expr" if onset else "hidden expr"] += 1
        # Carrying the last expression cue forward reads every frame right (the first K frames of a
        # segment always have an image: gaps are at most 4 frames long) ...
        frames = np.array(list(reads))
        expr = np.array([read["expr"] for read in reads.values()])
        last_cue = np.maximum.accumulate(np.where(expr != NO_CUE, np.arange(len(expr)), 0))
        np.testing.assert_array_equal(expr[last_cue], truth.expr[frames - 1])
        onehot = np.eye(NUM_EXPR)[np.maximum(expr, 0)]
        probs = np.where((expr == NO_CUE)[:, None], 1 / NUM_EXPR, onehot)
        per_frame.append(complete_video(frames, probs, len(truth.expr), "nearest"))
        truths.append(truth.expr)
        for au in range(NUM_AU):
            for start, stop in _runs(truth.au[:, au]):
                for frame in (f for f in reads if start < f <= stop):
                    i, last = frame - 1 - start, stop - frame  # frames since start, to last
                    on = truth.au[start, au] == 1
                    cue = on and (i < k or last < k)
                    assert reads[frame]["au"][au] == cue, (plan.name, au, frame, start, stop)
                    shown["au" if cue else "hidden au"] += on
    # ... while per-frame reads, even at the best smoothing window, miss most of them.
    masks = [np.ones(len(t), bool) for t in truths]
    _, scores = tune_windows({"expr": per_frame}, {"expr": truths}, {"expr": masks})
    assert scores["expr"]["smoothed"] < 0.6, scores
    # Most frames of a segment hide its cue: that is what the option is for.
    assert shown["hidden expr"] > 5 * shown["expr"] > 0
    assert shown["hidden au"] > 5 * shown["au"] > 0


def test_cli_onset_cues_reach_the_config(tmp_path):
    common = ["--videos", "4", "--frames", "60", "--seed", "2", "--image-size", "32"]
    command = ["synth", str(tmp_path / "cli"), *common, "--workers", "1", "--onset-cues", "3"]
    assert CliRunner().invoke(main, command).exit_code == 0
    config = SynthConfig(
        out=tmp_path / "api", videos=4, frames=60, seed=2, image_size=32, workers=1, onset_cues=3
    )
    assert tree_digest(tmp_path / "cli") == tree_digest(synthesize(config))
    plain = SynthConfig(
        out=tmp_path / "plain", videos=4, frames=60, seed=2, image_size=32, workers=1
    )
    assert tree_digest(synthesize(plain)) != tree_digest(tmp_path / "cli")
    bad = CliRunner().invoke(main, ["synth", str(tmp_path / "bad"), *common, "--onset-cues", "25"])
    assert bad.exit_code == 2 and "--onset-cues" in bad.output
