"""The Aff-Wild2 reader on tiny hand-written trees: each quirk of the release and each bad input."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from affectfast.affwild2 import (
    AnnotationDirs,
    find_annotation_dirs,
    image_path,
    read_test_list,
    read_test_set,
    read_tree,
    sample_key,
)
from affectfast.errors import DataError
from affectfast.tasks import CHALLENGE_DIRS, HEADERS

NAN = np.nan
VA_DIR, EXPR_DIR, AU_DIR = (
    "VA_Estimation_Challenge",
    "EXPR_Recognition_Challenge",
    "AU_Detection_Challenge",
)
AU0 = "0,0,0,0,0,0,0,0,0,0,0,0"
AU1 = "1,0,0,0,0,0,0,0,0,0,0,1"
AU_IGN = [-1] * 12


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 100, 50)).save(buffer, format="JPEG")
    return buffer.getvalue()


JPEG = _jpeg()


def write_frames(root: Path, video: str, frames) -> None:
    folder = root / "cropped_aligned" / video
    folder.mkdir(parents=True, exist_ok=True)
    for frame in frames:
        (folder / f"{frame:05d}.jpg").write_bytes(JPEG)


def write_labels(
    root: Path,
    challenge: str,
    video: str,
    rows: list[str],
    *,
    task: str,
    split: str = "Train_Set",
    header: str | None = None,
    newline: str = "\n",
    final_newline: bool = True,
    under: str = "",
) -> Path:
    """Write ``<root>/<under>/<challenge>/<split>/<video>.txt``: header then one row per frame."""
    path = root / under / challenge / split / f"{video}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = newline.join([header if header is not None else ",".join(HEADERS[task]), *rows])
    path.write_bytes((text + (newline if final_newline else "")).encode())
    return path


def by_name(videos) -> dict:
    return {v.name: v for v in videos}


def read(root: Path, tasks=("va", "expr", "au")):
    return by_name(read_tree(find_annotation_dirs(root), tasks))


# --- a full tree and the join ---------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path):
    """One video with all three tasks; frame 3 has no image, frame 6 is past the last image."""
    write_frames(tmp_path, "v1", [1, 2, 4, 5])
    write_labels(
        tmp_path,
        VA_DIR,
        "v1",
        ["0.5,-0.25", "-5,0.3", "0.1,0.2", "1,-1", "-5,-5", "0,0"],
        task="va",
    )
    write_labels(tmp_path, EXPR_DIR, "v1", ["3", "-1", "4", "0", "-1", "7"], task="expr")
    write_labels(
        tmp_path, AU_DIR, "v1", [AU1, AU0, AU0, "1,1,1,1,1,1,1,1,1,1,1,-1", AU0, AU0], task="au"
    )
    return tmp_path


def test_joins_three_tasks_exactly(tree):
    (video,) = read_tree(find_annotation_dirs(tree))
    assert (video.name, video.split) == ("v1", "train")
    np.testing.assert_array_equal(video.frames, [1, 2, 4, 5])  # 3: no image; 6: past last image
    assert video.frames.dtype == np.int32
    np.testing.assert_array_equal(
        video.va, np.array([[0.5, -0.25], [NAN, NAN], [1, -1], [NAN, NAN]], dtype=np.float32)
    )
    assert video.va.dtype == np.float32
    np.testing.assert_array_equal(video.expr, np.array([3, -1, 0, -1], dtype=np.int8))
    np.testing.assert_array_equal(
        video.au,
        np.array([[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], [0] * 12, AU_IGN, [0] * 12], dtype=np.int8),
    )
    assert video.au.dtype == video.expr.dtype == np.int8


def test_requested_tasks_decide_which_frames_are_kept(tree):
    video = read(tree, ("va",))["v1"]
    np.testing.assert_array_equal(video.frames, [1, 4])  # frames 2 and 5 have -5 in a VA value
    np.testing.assert_array_equal(video.expr, [-1, -1])  # tasks not asked for are not read
    video = read(tree, "expr,au")["v1"]
    np.testing.assert_array_equal(video.frames, [1, 2, 4, 5])
    assert np.isnan(video.va).all()


def test_frame_kept_only_while_some_label_is_valid(tmp_path):
    write_frames(tmp_path, "v", [1, 2, 3])
    write_labels(tmp_path, VA_DIR, "v", ["-5,0.5", "0.2,-5", "0.1,0.1"], task="va")
    write_labels(tmp_path, EXPR_DIR, "v", ["-1", "-1", "-1"], task="expr")
    write_labels(tmp_path, AU_DIR, "v", [f"-1,{AU0[2:]}", AU0, "-1," * 11 + "-1"], task="au")
    video = read(tmp_path)["v"]
    np.testing.assert_array_equal(video.frames, [2, 3])  # frame 1: -5 VA, -1 EXPR, AU row with a -1
    np.testing.assert_array_equal(video.au, np.array([[0] * 12, AU_IGN], dtype=np.int8))
    np.testing.assert_array_equal(video.va, np.array([[NAN, NAN], [0.1, 0.1]], dtype=np.float32))


def test_images_past_the_last_annotation_line_have_no_label(tmp_path):
    write_frames(tmp_path, "v", [1, 2, 3, 4])
    write_labels(tmp_path, EXPR_DIR, "v", ["1", "2"], task="expr")
    write_labels(tmp_path, VA_DIR, "v", ["0,0", "0,0", "0.5,0.5"], task="va")
    video = read(tmp_path)["v"]
    np.testing.assert_array_equal(video.frames, [1, 2, 3])
    np.testing.assert_array_equal(video.expr, [1, 2, -1])


def test_crlf_missing_final_newline_and_trailing_blank_lines(tmp_path):
    write_frames(tmp_path, "a", [1, 2])
    write_frames(tmp_path, "b", [1, 2])
    write_frames(tmp_path, "c", [1, 2])
    write_labels(tmp_path, EXPR_DIR, "a", ["5", "6"], task="expr", newline="\r\n")
    write_labels(tmp_path, EXPR_DIR, "b", ["5", "6"], task="expr", final_newline=False)
    write_labels(tmp_path, EXPR_DIR, "c", ["5", "6", "", "  "], task="expr", newline="\r\n")
    videos = read(tmp_path)
    for name in "abc":
        np.testing.assert_array_equal(videos[name].frames, [1, 2])
        np.testing.assert_array_equal(videos[name].expr, [5, 6])


def test_video_lacking_one_task_file(tree):
    write_frames(tree, "v2", [1, 2])
    write_labels(tree, VA_DIR, "v2", ["0.1,0.2", "0.3,0.4"], task="va")
    video = read(tree)["v2"]
    np.testing.assert_array_equal(video.va, np.array([[0.1, 0.2], [0.3, 0.4]], dtype=np.float32))
    np.testing.assert_array_equal(video.expr, [-1, -1])
    np.testing.assert_array_equal(video.au, np.array([AU_IGN, AU_IGN], dtype=np.int8))


def test_left_right_subjects_are_two_videos_and_splits_follow_sets(tmp_path):
    write_frames(tmp_path, "10-60-1280x720_left", [1, 2])
    write_frames(tmp_path, "10-60-1280x720_right", [2])
    write_frames(tmp_path, "val_video", [1])
    write_labels(tmp_path, EXPR_DIR, "10-60-1280x720_left", ["1", "2"], task="expr")
    write_labels(tmp_path, EXPR_DIR, "10-60-1280x720_right", ["3", "4"], task="expr")
    write_labels(tmp_path, EXPR_DIR, "val_video", ["0"], task="expr", split="Validation_Set")
    write_labels(tmp_path, VA_DIR, "val_video", ["0,0"], task="va", split="Validation_Set")
    videos = read_tree(find_annotation_dirs(tmp_path))
    assert [(v.name, v.split) for v in videos] == [
        ("10-60-1280x720_left", "train"),
        ("10-60-1280x720_right", "train"),
        ("val_video", "val"),
    ]
    np.testing.assert_array_equal(videos[1].frames, [2])
    np.testing.assert_array_equal(videos[1].expr, [4])


def test_video_with_no_kept_frame_is_left_out(tmp_path):
    write_frames(tmp_path, "v", [1])
    write_frames(tmp_path, "w", [1])
    write_labels(tmp_path, EXPR_DIR, "v", ["-1"], task="expr")
    write_labels(tmp_path, EXPR_DIR, "w", ["2"], task="expr")
    assert list(read(tmp_path)) == ["w"]


# --- finding the folders --------------------------------------------------------------------------


@pytest.mark.parametrize("expr_dir", CHALLENGE_DIRS["expr"])
def test_both_expr_folder_names(tmp_path, expr_dir):
    write_frames(tmp_path, "v", [1])
    write_labels(tmp_path, expr_dir, "v", ["2"], task="expr")
    dirs = find_annotation_dirs(tmp_path)
    assert dirs == AnnotationDirs(frames=tmp_path / "cropped_aligned", expr=tmp_path / expr_dir)
    np.testing.assert_array_equal(read_tree(dirs)[0].expr, [2])


def test_annotation_folders_below_root(tmp_path):
    write_frames(tmp_path / "data", "v", [1])
    write_labels(tmp_path, VA_DIR, "v", ["0,0"], task="va", under="Third ABAW Annotations")
    write_labels(tmp_path, AU_DIR, "v", [AU0], task="au", under="ann/2022")
    dirs = find_annotation_dirs(tmp_path)
    assert dirs.frames == tmp_path / "data" / "cropped_aligned"
    assert dirs.va == tmp_path / "Third ABAW Annotations" / VA_DIR
    assert dirs.au == tmp_path / "ann" / "2022" / AU_DIR
    assert dirs.expr is None


def test_search_does_not_look_inside_frames_folder(tmp_path):
    write_frames(tmp_path, "v", [1])
    # A challenge-named folder inside cropped_aligned must not be found: the search never enters it.
    write_labels(tmp_path / "cropped_aligned", VA_DIR, "v", ["0,0"], task="va")
    write_labels(tmp_path, EXPR_DIR, "v", ["1"], task="expr")
    assert find_annotation_dirs(tmp_path).va is None


def test_explicit_folders_win(tmp_path):
    write_frames(tmp_path / "elsewhere", "v", [1, 2])
    write_labels(tmp_path, VA_DIR, "v", ["0,0", "0,0"], task="va")
    write_labels(tmp_path / "other", VA_DIR, "v", ["0.5,0.5", "-5,0"], task="va")
    frames = tmp_path / "elsewhere" / "cropped_aligned"
    dirs = find_annotation_dirs(tmp_path / "other", frames=frames, va=str(tmp_path / VA_DIR))
    assert dirs.va == tmp_path / VA_DIR and isinstance(dirs.va, Path)
    dirs = find_annotation_dirs(
        None, frames=tmp_path / "elsewhere" / "cropped_aligned", va=tmp_path / "other" / VA_DIR
    )
    (video,) = read_tree(dirs)
    np.testing.assert_array_equal(video.frames, [1])
    np.testing.assert_array_equal(video.va, np.array([[0.5, 0.5]], dtype=np.float32))


def test_no_task_no_frames_and_duplicate_folders(tmp_path):
    write_frames(tmp_path, "v", [1])
    with pytest.raises(DataError, match="no annotation folder.*VA_Estimation_Challenge") as info:
        find_annotation_dirs(tmp_path)
    assert info.value.path == tmp_path
    write_labels(tmp_path, "EXPR_Recognition_Challenge", "v", ["1"], task="expr")
    write_labels(tmp_path, "EXPR_Classification_Challenge", "v", ["1"], task="expr", under="b")
    with pytest.raises(DataError, match="two expr folders") as info:
        find_annotation_dirs(tmp_path)
    assert "EXPR_Recognition_Challenge" in str(info.value)
    assert "EXPR_Classification_Challenge" in str(info.value)
    with pytest.raises(DataError, match="no cropped_aligned folder"):
        find_annotation_dirs(tmp_path / "b")


def test_missing_root_or_explicit_folder(tmp_path):
    with pytest.raises(DataError, match="root does not exist") as info:
        find_annotation_dirs(tmp_path / "nope")
    assert info.value.path == tmp_path / "nope"
    with pytest.raises(DataError, match="the va folder given does not exist") as info:
        find_annotation_dirs(tmp_path, va=tmp_path / "nope")
    assert info.value.path == tmp_path / "nope"


def test_challenge_folder_without_sets_is_refused(tmp_path):
    write_frames(tmp_path, "v", [1])
    (tmp_path / VA_DIR).mkdir()
    with pytest.raises(DataError, match="Train_Set or Validation_Set"):
        find_annotation_dirs(tmp_path)


# --- bad input: one line naming the file and the line ---------------------------------------------


def _bad(tmp_path, task, rows, **kwargs) -> DataError:
    write_frames(tmp_path, "v", [1, 2, 3])
    challenge = {"va": VA_DIR, "expr": EXPR_DIR, "au": AU_DIR}[task]
    path = write_labels(tmp_path, challenge, "v", rows, task=task, **kwargs)
    with pytest.raises(DataError) as info:
        read_tree(find_annotation_dirs(tmp_path))
    error = info.value
    assert error.path == path and str(error).startswith(f"{path}:")
    assert "\n" not in str(error)
    return error


@pytest.mark.parametrize(
    "task, rows, kwargs, line, message",
    [
        (
            "va",
            ["0,0"],
            {"header": "valence;arousal"},
            1,
            "expected the va header 'valence,arousal'",
        ),
        ("expr", ["1"], {"header": ""}, 1, "expected the expr header 'Neutral,Anger"),
        ("au", [AU0, "0,1", AU0], {}, 3, "expected 12 comma-separated values .*got 2"),
        ("va", ["0,0", "0,0,0"], {"newline": "\r\n"}, 3, "expected 2 comma-separated values"),
        ("expr", ["1", "1,2"], {}, 3, "expected 1 value .*got 2"),
        ("va", ["0,0", "", "0,0"], {}, 3, "expected 2 comma-separated values .*got 1"),
        ("va", ["0,0", "0.1,abc"], {}, 3, "'abc' is not a number"),
        ("expr", ["1", "2", "", "3"], {}, 4, "field 1 is empty"),
        # np.fromstring reads a blank field as 0 (-1.0 as float) and a lone sign as 0: a blank
        # EXPR line became Neutral, a VA line "v, " got an arousal of -1.
        ("expr", ["1", " ", "3"], {}, 3, "field 1 is empty: expected a number"),
        ("va", ["0,0", "0.5, "], {}, 3, "field 2 is empty"),
        ("va", ["0,0", "0.5,"], {}, 3, "field 2 is empty"),
        ("va", [" ,0.5", "0,0"], {}, 2, "field 1 is empty"),
        ("va", ["0,0", "0,0", ",0.5"], {"newline": "\r\n"}, 4, "field 1 is empty"),
        ("au", [AU0, "0,0, ,0,0,0,0,0,0,0,0,0"], {}, 3, "field 3 is empty"),
        ("au", [AU0, AU0, "0,0,0,0,0,0,0,0,0,0,0,"], {}, 4, "field 12 is empty"),
        ("au", [AU0, "0,0,0,0,0,0,0,0,0,0,0,1", "1,,0,0,0,0,0,0,0,0,0,0"], {}, 4, "field 2 is"),
        ("expr", ["1", "-", "3"], {}, 3, "'-' is not a number"),
        ("expr", ["+"], {}, 2, "'\\+' is not a number"),
        ("au", [AU0, "0,0,0,0,0,- ,0,0,0,0,0,0"], {}, 3, "'-' is not a number"),
        ("va", ["0,0", "0.5,-"], {}, 3, "'-' is not a number"),
        ("au", [AU0, AU0, "0,0,0,0,0,0,0,0,0,0,0,yes"], {}, 4, "'yes' is not a number"),
        (
            "va",
            ["0,0", "1.7,0.5"],
            {},
            3,
            r"valence 1.7 out of range: expected a value in \[-1, 1\] or -5",
        ),
        ("va", ["0,-1.01"], {}, 2, "arousal -1.01 out of range"),
        ("va", ["nan,0"], {}, 2, "valence nan out of range"),
        ("expr", ["1", "9"], {}, 3, "expression 9 out of range: expected an integer 0..7 or -1"),
        ("expr", ["2.5"], {}, 2, "expression 2.5 out of range"),
        (
            "au",
            [AU0, "0,0,0,2,0,0,0,0,0,0,0,0"],
            {},
            3,
            "AU6 2 out of range: expected 0 or 1, or -1",
        ),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, task, rows, kwargs, line, message):
    error = _bad(tmp_path, task, rows, **kwargs)
    assert error.line == line
    assert f":{line}: " in str(error)
    assert re.search(message, error.message), error.message


@pytest.mark.parametrize(
    "task, rows, kwargs, message",
    [
        ("expr", ["1"], {"header": "x" * 1_000_000}, "expected the expr header"),
        ("expr", ["1", "y" * 1_000_000], {}, "is not a number"),
        ("expr", ["1", "0" * 1_000_000 + "9"], {}, "out of range"),
        ("va", ["0,0", "0.5," + "z" * 1_000_000], {}, "is not a number"),
    ],
)
def test_error_quotes_at_most_80_characters_of_a_line(tmp_path, task, rows, kwargs, message):
    """A megabyte line (a broken file) must not be echoed whole into a one-line error."""
    error = _bad(tmp_path, task, rows, **kwargs)
    assert message in error.message
    assert len(error.message) < 200 and "..." in error.message, error.message[:300]


def test_spaces_around_numbers_are_accepted(tmp_path):
    write_frames(tmp_path, "v", [1, 2])
    write_labels(tmp_path, VA_DIR, "v", ["0.5, -0.25", " -1 ,1 "], task="va")
    write_labels(tmp_path, EXPR_DIR, "v", [" 3", "\t-1 "], task="expr")
    video = read(tmp_path)["v"]
    np.testing.assert_array_equal(video.va, np.array([[0.5, -0.25], [-1, 1]], dtype=np.float32))
    np.testing.assert_array_equal(video.expr, [3, -1])


def test_float_written_integers_are_accepted(tmp_path):
    write_frames(tmp_path, "v", [1, 2])
    write_labels(tmp_path, EXPR_DIR, "v", ["1.0", "-1.0"], task="expr")
    np.testing.assert_array_equal(read(tmp_path)["v"].expr, [1])


def test_leakage_across_tasks_names_both_files(tmp_path):
    write_frames(tmp_path, "v", [1])
    train = write_labels(tmp_path, VA_DIR, "v", ["0,0"], task="va")
    val = write_labels(tmp_path, AU_DIR, "v", [AU0], task="au", split="Validation_Set")
    with pytest.raises(DataError, match="leakage") as info:
        read_tree(find_annotation_dirs(tmp_path))
    assert str(train) in str(info.value) and str(val) in str(info.value)


def test_leakage_within_one_task_names_both_files(tmp_path):
    write_frames(tmp_path, "v", [1])
    train = write_labels(tmp_path, EXPR_DIR, "v", ["1"], task="expr")
    val = write_labels(tmp_path, EXPR_DIR, "v", ["1"], task="expr", split="Validation_Set")
    with pytest.raises(DataError, match="leakage") as info:
        read_tree(find_annotation_dirs(tmp_path))
    assert str(train) in str(info.value) and str(val) in str(info.value)


@pytest.mark.parametrize("video", ["v.1", "a:b", "a b", "v\u00e9", "x" * 95])
def test_video_names_the_key_rule_refuses(tmp_path, video):
    # '.' splits the extension, ':' DALI's source info, ' ' .idx lines; keys fit a tar header.
    write_frames(tmp_path, video, [1])
    path = write_labels(tmp_path, EXPR_DIR, video, ["1"], task="expr")
    with pytest.raises(DataError, match="cannot be packed") as info:
        read_tree(find_annotation_dirs(tmp_path))
    assert info.value.path == path
    assert str(tmp_path / "cropped_aligned" / video) in str(info.value)
    with pytest.raises(DataError, match="cannot be packed"):
        sample_key(video, 3)


def test_annotation_file_without_frames_folder(tmp_path):
    write_frames(tmp_path, "v", [1])
    path = write_labels(tmp_path, EXPR_DIR, "ghost", ["1"], task="expr")
    with pytest.raises(DataError) as info:
        read_tree(find_annotation_dirs(tmp_path))
    assert info.value.path == path
    assert str(tmp_path / "cropped_aligned" / "ghost") in str(info.value)


# --- naming ---------------------------------------------------------------------------------------


def test_image_path_and_sample_key(tmp_path):
    assert image_path(tmp_path, "10-60-1280x720_left", 7) == (
        tmp_path / "10-60-1280x720_left" / "00007.jpg"
    )
    assert sample_key("10-60-1280x720_left", 7) == "10-60-1280x720_left/00007"
    assert sample_key("v", 12345) == "v/12345"
    with pytest.raises(ValueError):
        sample_key("v", 0)


def test_files_in_a_frames_folder_that_are_not_frames_are_counted_and_reported(tmp_path, capsys):
    write_frames(tmp_path, "v", [1, 2])
    write_frames(tmp_path, "w", [1])
    folder = tmp_path / "cropped_aligned" / "v"
    strays = ("00003.png", "000004.jpg", "00005.JPG", "6.jpg", "00000.jpg", "thumbs.jpg")
    for stray in (*strays, ".DS_Store"):  # hidden files are no one's frames: not counted
        (folder / stray).write_bytes(JPEG)
    (folder / "00007.jpg").mkdir()
    os.mkfifo(folder / "00008.jpg")  # reading it would block pack for ever
    write_labels(tmp_path, EXPR_DIR, "v", ["1"] * 8, task="expr")
    write_labels(tmp_path, EXPR_DIR, "w", ["1"], task="expr")
    videos = read(tmp_path)
    np.testing.assert_array_equal(videos["v"].frames, [1, 2])
    assert (videos["v"].ignored_files, videos["w"].ignored_files) == (len(strays) + 2, 0)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and str(folder) in lines[0] and f" {len(strays) + 2} " in lines[0]


@pytest.mark.parametrize("names", [[], ["000001.jpg", "000002.jpg"], ["00001.JPG"]])
def test_annotated_video_without_a_frame_image_is_an_error(tmp_path, names):
    write_frames(tmp_path, "v", [1])
    write_frames(tmp_path, "w", [])
    for name in names:
        (tmp_path / "cropped_aligned" / "w" / name).write_bytes(JPEG)
    write_labels(tmp_path, EXPR_DIR, "v", ["1"], task="expr")
    write_labels(tmp_path, EXPR_DIR, "w", ["1", "2"], task="expr")
    with pytest.raises(DataError, match="no frame image") as info:
        read_tree(find_annotation_dirs(tmp_path))
    assert info.value.path == tmp_path / "cropped_aligned" / "w"
    assert f"{len(names)} other" in info.value.message


# --- the synthetic tree ---------------------------------------------------------------------------


def _naive_labels(dirs: AnnotationDirs) -> dict[tuple[str, int], dict]:
    """An independent, slow reading of a tree: (video, frame) -> {split, task: label} for every
    frame with an image and at least one valid label."""
    found: dict[tuple[str, int], dict] = {}
    for task in ("va", "expr", "au"):
        for set_dir, split in (("Train_Set", "train"), ("Validation_Set", "val")):
            folder = dirs.task_dir(task) / set_dir
            for path in sorted(folder.glob("*.txt")) if dirs.task_dir(task) else []:
                lines = path.read_text().splitlines()[1:]
                for frame, line in enumerate(lines, start=1):
                    if not line.strip() or not image_path(dirs.frames, path.stem, frame).exists():
                        continue
                    values = [float(x) for x in line.split(",")]
                    valid = {
                        "va": -5 not in values,
                        "expr": values != [-1],
                        "au": -1 not in values,
                    }[task]
                    if valid:
                        entry = found.setdefault((path.stem, frame), {"split": split})
                        entry[task] = values
    return found


def test_synthetic_tree_agrees_with_a_naive_reading(synth_tree):
    dirs = find_annotation_dirs(synth_tree)
    videos = read_tree(dirs)
    expected = _naive_labels(dirs)
    got = {}
    for video in videos:
        for i, frame in enumerate(video.frames.tolist()):
            entry = {"split": video.split}
            if not np.isnan(video.va[i]).any():
                entry["va"] = video.va[i].tolist()
            if video.expr[i] >= 0:
                entry["expr"] = [float(video.expr[i])]
            if (video.au[i] >= 0).all():
                entry["au"] = video.au[i].astype(float).tolist()
            got[(video.name, frame)] = entry
    assert got.keys() == expected.keys() and len(got) > 100
    for key, entry in expected.items():
        if "va" in entry:
            np.testing.assert_allclose(got[key].pop("va"), entry.pop("va"), rtol=1e-6)
        assert got[key] == entry, key
    assert {v.split for v in videos} == {"train", "val"}


# --- the unlabelled test set ----------------------------------------------------------------------


def test_frame_count_is_the_longest_annotation_file(tree):
    (video,) = read_tree(find_annotation_dirs(tree))
    assert video.frame_count == 6  # 6 lines after each header, though the last image is frame 5
    write_labels(tree, EXPR_DIR, "v1", ["3", "-1", "4", "0", "-1", "7", "1", "2"], task="expr")
    assert read_tree(find_annotation_dirs(tree))[0].frame_count == 8


def test_test_list_accepts_crlf_bom_spaces_and_blank_lines(tmp_path):
    path = tmp_path / "list.txt"
    path.write_bytes(b"\xef\xbb\xbft1\r\n\r\n  t2_left \r\nt2_right")
    assert read_test_list(path) == [("t1", 1), ("t2_left", 3), ("t2_right", 4)]


def test_test_set_holds_every_image_of_listed_videos_without_labels(tree, tmp_path):
    write_frames(tree, "t1", [2, 3, 7])
    (tree / "cropped_aligned" / "t1" / "notes.txt").write_text("x")
    va = tmp_path / "va.txt"
    va.write_text("t1\n")
    expr = tmp_path / "expr.txt"
    expr.write_text("t1\n")
    videos, names = read_test_set(find_annotation_dirs(tree), {"va": va, "expr": expr})
    (video,) = videos
    assert (video.name, video.split, video.frame_count, video.ignored_files) == ("t1", "test", 0, 1)
    np.testing.assert_array_equal(video.frames, [2, 3, 7])
    assert np.isnan(video.va).all() and (video.expr == -1).all() and (video.au == -1).all()
    assert names == {"va": ["t1"], "expr": ["t1"]}
    write_frames(tree, "empty", [])
    va.write_text("t1\nempty\n")
    with pytest.raises(DataError, match=r"va.txt:2: video empty has no frame image"):
        read_test_set(find_annotation_dirs(tree), {"va": va})
    va.write_text("t1\nv1\n")  # v1 has VA labels: leakage (pack tests the other-task case)
    with pytest.raises(DataError, match=r"va.txt:2: video v1 is in the va test list but has va"):
        read_test_set(find_annotation_dirs(tree), {"va": va})
