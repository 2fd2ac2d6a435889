"""evaluate and predict against hostile or careless input: an --out folder that is not predict's
(forged records, the user's files, links, the folder of the inputs), a predict killed half-way,
tuned files applied to another checkpoint, frame counts shorter than the images or absurdly
long, FIFOs where files are expected, a val split without labels for a task.

Every test here failed on the code before the prediction folder record, the tuned files' checkpoint
fingerprint, the authoritative frame counts and the caps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import affectfast.predict as predict_module
from affectfast.cli import main
from affectfast.config import EvalConfig
from affectfast.errors import DataError
from affectfast.predict import check_submission, evaluate, predict, read_frame_counts
from affectfast.shards import MANIFEST, load_manifest
from affectfast.synth import FRAME_COUNTS_FILE, TEST_LISTS_DIR
from affectfast.tasks import CHALLENGE_DIRS, TASKS

RECORD = ".affectfast-predict.json"
FOLDER = {task: names[0] for task, names in CHALLENGE_DIRS.items()}

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def config(checkpoint: Path, shards: Path, **kwargs) -> EvalConfig:
    return EvalConfig(checkpoint, shards, loader="dali-cpu", num_threads=1, **kwargs)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()[1:]


def last_images(shards: Path, split: str) -> dict[str, int]:
    """The last frame with an image of each video of ``split``, from the shards' index files."""
    last: dict[str, int] = {}
    for shard in load_manifest(shards)["splits"][split]["shards"]:
        for line in (shards / shard["index"]).read_text().splitlines()[1:]:
            video, frame = line.split()[3].split(".")[0].split("/")
            last[video] = max(last.get(video, 0), int(frame))
    return last


@pytest.fixture
def no_inference(monkeypatch):
    """Fails a test in which the model runs: what it checks must stop predict before that."""

    def inference(*args, **kwargs):
        raise AssertionError("the model ran: the input should have been refused before")

    monkeypatch.setattr(predict_module, "predict_split", inference)


@pytest.fixture
def checkpoint(trained_run, tmp_path) -> Path:
    """A copy of the session run's best.pt in a folder of its own (what tuning writes beside)."""
    folder = tmp_path / "run"
    folder.mkdir()
    return Path(shutil.copy(trained_run / "best.pt", folder / "best.pt"))


# --- --out: only predict's own folder is replaced ---------------------------------------------------


def test_a_forged_or_linked_record_never_makes_a_folder_predicts(
    trained_run, packed_holdout, tmp_path, no_inference
):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    forged = (
        "{}",
        "[" * 100_000 + "]" * 100_000,  # nested deeper than the JSON parser goes
        json.dumps({"written_by": "affectfast predict", "version": 2, "files": {"../x": "0"}}),
    )
    for text in forged:
        (mine / RECORD).write_text(text)
        with pytest.raises(DataError, match="not a prediction record|'files' must map"):
            predict(config(trained_run / "best.pt", packed_holdout, split="test"), mine)
    (mine / RECORD).unlink()
    (tmp_path / "real.json").write_text("{}")
    (mine / RECORD).symlink_to(tmp_path / "real.json")
    with pytest.raises(DataError, match="symbolic link"):
        predict(config(trained_run / "best.pt", packed_holdout, split="test"), mine)
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "real.json"]


def test_files_the_user_added_to_a_prediction_folder_are_named_and_kept(
    trained_run, packed_holdout, holdout_tree, tmp_path
):
    out = tmp_path / "pred"
    predict(config(trained_run / "best.pt", packed_holdout, split="test"), out)
    counts = Path(shutil.copy(holdout_tree / TEST_LISTS_DIR / FRAME_COUNTS_FILE, out))
    with_counts = config(trained_run / "best.pt", packed_holdout, split="test", frame_counts=counts)
    with pytest.raises(DataError, match=r"--out holds .*frame_counts.csv \(the frame-count CSV\)"):
        predict(with_counts, out)
    counts.rename(out / FOLDER["va"] / "notes.txt")
    with pytest.raises(DataError, match=rf"notes.txt: not listed in {RECORD}"):
        predict(config(trained_run / "best.pt", packed_holdout, split="test"), out)
    (out / FOLDER["va"] / "notes.txt").unlink()
    edited = next((out / FOLDER["au"]).iterdir())
    edited.write_text(edited.read_text() + "hand-edited\n")
    with pytest.raises(DataError, match=rf"{edited.name}: changed since predict wrote it"):
        predict(config(trained_run / "best.pt", packed_holdout, split="test"), out)
    assert edited.read_text().endswith("hand-edited\n")
    edited.unlink()  # without its edited file the folder is predict's again
    predict(config(trained_run / "best.pt", packed_holdout, split="test"), out)
    assert edited.is_file() and not edited.read_text().endswith("hand-edited\n")


def test_out_as_a_link_writes_into_its_target_and_keeps_the_link(
    trained_run, packed_holdout, tmp_path
):
    target, link = tmp_path / "scratch" / "pred", tmp_path / "pred"
    target.mkdir(parents=True)
    link.symlink_to(target)
    for _ in range(2):  # a new folder, then replacing the earlier one, both through the link
        submission = predict(config(trained_run / "best.pt", packed_holdout, split="test"), link)
        assert link.is_symlink() and os.readlink(link) == str(target)
        assert (target / RECORD).is_file() and submission.files
        assert all(p.is_relative_to(link) and p.is_file() for p in submission.files)
    assert sorted(p.name for p in target.parent.iterdir()) == ["pred"]  # nothing left beside
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(DataError, match="symbolic link to .*nowhere, which is not a folder"):
        predict(config(trained_run / "best.pt", packed_holdout, split="test"), dangling)


def test_out_holding_the_inputs_is_refused_before_inference(
    checkpoint, packed_holdout, tmp_path, monkeypatch, no_inference
):
    monkeypatch.chdir(checkpoint.parent)
    with pytest.raises(DataError, match=r"--out holds .*best.pt \(the checkpoint\)"):
        predict(config(Path("best.pt"), packed_holdout, split="test"), ".")
    with pytest.raises(DataError, match=r"\(the shards\)"):
        predict(config(checkpoint, packed_holdout, split="test"), packed_holdout)
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["best.pt"]


def test_missing_parent_folders_of_out_are_created(trained_run, packed_holdout, tmp_path):
    out = tmp_path / "submissions" / "mtl"
    submission = predict(config(trained_run / "best.pt", packed_holdout, split="test"), out)
    assert (out / RECORD).is_file() and all(p.is_file() for p in submission.files)


KILLED_WHILE_CHECKING = """
import os, signal, sys
import affectfast.predict as predict_module
from affectfast.config import EvalConfig

def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)  # what a scheduler's kill -9 does half-way through

predict_module.check_submission = killed
config = EvalConfig(sys.argv[1], sys.argv[2], split="test", loader="dali-cpu", num_threads=1)
predict_module.predict(config, sys.argv[3])
"""


def test_a_killed_predict_leaves_a_staging_folder_the_next_run_removes(
    trained_run, packed_holdout, tmp_path
):
    out = tmp_path / "pred"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_WHILE_CHECKING, trained_run / "best.pt", packed_holdout, out],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left and all(name.startswith(".pred.") for name in left)  # files written, out not
    assert not out.exists()
    predict(config(trained_run / "best.pt", packed_holdout, split="test"), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred"]


def test_a_staging_name_holding_the_users_files_is_refused_not_removed(
    trained_run, packed_holdout, tmp_path, no_inference
):
    staging = tmp_path / ".pred.predict-staging"
    staging.mkdir()
    (staging / "diary.txt").write_text("mine")
    with pytest.raises(DataError, match="diary.txt: not written by predict"):
        predict(config(trained_run / "best.pt", packed_holdout, split="test"), tmp_path / "pred")
    assert (staging / "diary.txt").read_text() == "mine"


# --- tuned files belong to one checkpoint ----------------------------------------------------------


def _rewrite(checkpoint: Path) -> None:
    """Other bytes under the same name: best.pt after more epochs, or copied from another run."""
    state = torch.load(checkpoint, weights_only=True)
    state["model"]["heads.va.bias"] += 0.01
    torch.save(state, checkpoint)


def test_smoothing_tuned_for_other_bytes_of_the_checkpoint_is_refused(
    checkpoint, packed_holdout, tmp_path
):
    runner = CliRunner()
    tune = ["evaluate", str(checkpoint), str(packed_holdout), "--tune-smoothing"]
    options = ["--loader", "dali-cpu", "--num-threads", "1"]
    assert runner.invoke(main, [*tune, *options]).exit_code == 0
    smooth = ["predict", str(checkpoint), str(packed_holdout), "--smooth", *options]
    result = runner.invoke(main, [*smooth, "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "smoothing windows: va " in result.output
    _rewrite(checkpoint)
    result = runner.invoke(main, [*smooth, "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "tuned for another checkpoint" in result.output
    assert not (tmp_path / "b").exists()


def test_au_thresholds_tuned_by_evaluate_are_saved_and_predict_writes_at_them(
    checkpoint, packed_holdout, tmp_path
):
    metrics = evaluate(config(checkpoint, packed_holdout, tune_au_thresholds=True))
    saved = checkpoint.parent / "best.au_thresholds.json"
    assert metrics["au_thresholds_path"] == str(saved)
    document = json.loads(saved.read_text())
    assert document["thresholds"] == metrics["au_thresholds"] and document["split"] == "val"
    # Thresholds near 1 make every AU 0, near 0 every AU 1: the files follow the saved ones.
    for value, line in ((0.999999, ",".join(["0"] * 12)), (1e-6, ",".join(["1"] * 12))):
        saved.write_text(json.dumps({**document, "thresholds": [value] * 12}))
        out = tmp_path / f"pred-{value}"
        submission = predict(config(checkpoint, packed_holdout), out)
        assert f"AU thresholds: tuned on val by evaluate ({saved})" in submission.summary()
        assert {row for p in (out / FOLDER["au"]).iterdir() for row in lines(p)} == {line}
        assert json.loads((out / RECORD).read_text())["au_thresholds"]["values"] == [value] * 12
    _rewrite(checkpoint)
    with pytest.raises(DataError, match="best.au_thresholds.json: tuned for another checkpoint"):
        predict(config(checkpoint, packed_holdout), tmp_path / "other")


# --- frame counts: authoritative, capped, read safely -----------------------------------------------


def test_a_count_shorter_than_the_images_writes_exactly_that_many_lines(
    trained_run, packed_holdout, tmp_path
):
    last = last_images(packed_holdout, "test")
    short = {video: frame - 2 for video, frame in last.items()}  # the images run 2 frames past
    csv = tmp_path / "counts.csv"
    csv.write_text("video,frames\n" + "".join(f"{v},{n}\n" for v, n in short.items()))
    out = tmp_path / "pred"
    submission = predict(
        config(trained_run / "best.pt", packed_holdout, split="test", frame_counts=csv), out
    )
    lists = load_manifest(packed_holdout)["splits"]["test"]["lists"]
    check_submission(out, {t: {v: short[v] for v in lists[t]} for t in TASKS})
    summary = submission.summary()
    assert "have images past their frame count N: those frames are left out" in summary
    for video, count in submission.frames.items():
        assert (count.frames, count.last_image) == (short[video], last[video])
        assert 1 <= count.left_out <= 2
        assert f"{count.last_image:>10}{count.left_out:>10}" in summary


def test_a_manifest_count_shorter_than_the_images_is_authoritative_too(
    trained_run, packed_holdout, tmp_path
):
    shards = Path(shutil.copytree(packed_holdout, tmp_path / "shards"))
    manifest = json.loads((shards / MANIFEST).read_text())
    last = last_images(shards, "val")
    video = sorted(last)[0]
    manifest["frame_counts"][video] = last[video] - 3
    (shards / MANIFEST).write_text(json.dumps(manifest))
    out = tmp_path / "pred"
    submission = predict(config(trained_run / "best.pt", shards), out)
    assert submission.frames[video].frames == last[video] - 3
    for task in TASKS:
        assert len(lines(out / FOLDER[task] / f"{video}.txt")) == last[video] - 3


@pytest.mark.parametrize("count", ["100000", "1000000000000", "9" * 5000])
def test_an_absurd_csv_count_is_refused_naming_the_line(tmp_path, count):
    path = tmp_path / "counts.csv"
    path.write_text(f"video,frames\nv1,12\nv2,{count}\n")
    with pytest.raises(DataError, match=r"counts.csv:3: video v2: .* at most 99,999") as caught:
        read_frame_counts(path)
    assert len(str(caught.value)) < 400


def test_an_absurd_manifest_count_is_refused_before_inference(
    trained_run, packed_holdout, tmp_path, no_inference
):
    shards = Path(shutil.copytree(packed_holdout, tmp_path / "shards"))
    manifest = json.loads((shards / MANIFEST).read_text())
    video = sorted(manifest["frame_counts"])[0]
    match = "expected an integer in 1..99,999"  # the manifest check every reader runs
    for bad in (10**12, -4):
        manifest["frame_counts"][video] = bad
        (shards / MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(
            DataError, match=rf"manifest.json: frame_counts.{video} is {bad}: {match}"
        ):
            predict(config(trained_run / "best.pt", shards), tmp_path / "pred")
        with pytest.raises(DataError, match=match):
            evaluate(config(trained_run / "best.pt", shards, tune_smoothing=True))


def test_a_fifo_as_the_frame_counts_is_refused_at_once(tmp_path):
    fifo = tmp_path / "counts.csv"
    os.mkfifo(fifo)

    def unblock():  # a reader that waits for a writer would otherwise wait forever
        time.sleep(10)
        with open(fifo, "w"):
            pass

    threading.Thread(target=unblock, daemon=True).start()
    start = time.monotonic()
    with pytest.raises(DataError, match="FIFO"):
        read_frame_counts(fifo)
    assert time.monotonic() - start < 5


# --- a val split without labels for a task ------------------------------------------------------


@pytest.fixture(scope="module")
def packed_without_val_va(holdout_tree, tmp_path_factory):
    """``holdout_tree`` without its VA Validation_Set folder, packed: val has no VA label."""
    from affectfast.pack import PackConfig, pack

    tree = tmp_path_factory.mktemp("tree-no-val-va")
    shutil.copytree(holdout_tree / "annotations", tree / "annotations")
    (tree / "cropped_aligned").symlink_to(holdout_tree / "cropped_aligned")
    shutil.rmtree(tree / "annotations" / "VA_Estimation_Challenge" / "Validation_Set")
    out = tmp_path_factory.mktemp("shards-no-val-va")
    pack(PackConfig(tree, out, workers=1, shard_size=64), progress=False)
    return out


def test_tuning_smoothing_without_val_labels_for_a_task_tunes_the_others(
    checkpoint, packed_without_val_va, tmp_path
):
    tuned = evaluate(config(checkpoint, packed_without_val_va, tune_smoothing=True))["smoothing"]
    assert set(tuned["windows"]) == {"expr", "au"} and tuned["absent"] == ["va"]
    submission = predict(config(checkpoint, packed_without_val_va, smooth=True), tmp_path / "p")
    assert submission.windows["va"] == 1
    assert "va 1 (not tuned: no val label)" in submission.summary()


# --- the command line -----------------------------------------------------------------------------


def test_version_and_one_name_for_the_thread_count(monkeypatch, packed):
    runner = CliRunner()
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("affectfast ")
    help_text = runner.invoke(main, ["bench", "loaders", "--help"]).output
    assert "--num-threads" in help_text and " --threads" not in help_text
    seen = []
    monkeypatch.setattr("affectfast.bench.bench_loaders", lambda config: seen.append(config) or [])
    monkeypatch.setattr("affectfast.bench.format_table", lambda results: "")
    for spelling in ("--num-threads", "--threads"):  # the earlier name still works, unlisted
        args = ["bench", "loaders", str(packed), "--loaders", "dali-cpu", spelling, "3"]
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
    assert [c.num_threads for c in seen] == [3, 3]


def test_the_readme_predict_example_runs_as_written(trained_run, packed_holdout, tmp_path):
    """README's test-set submission: `--out submissions/mtl` with no submissions/ folder yet."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "--out submissions/mtl" in readme
    result = CliRunner().invoke(
        main,
        [
            "predict",
            str(trained_run / "best.pt"),
            str(packed_holdout),
            "--split",
            "test",
            "--loader",
            "dali-cpu",
            "--num-threads",
            "1",
            "--out",
            str(tmp_path / "submissions" / "mtl"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "AU thresholds: 0.5 (none tuned" in result.output
    assert (tmp_path / "submissions" / "mtl" / RECORD).is_file()


def test_tune_smoothing_still_scores_every_task_the_split_labels():
    # tune_smoothing's absent tasks are the split's, not a crash.
    from affectfast.metrics import Predictions
    from affectfast.predict import tune_smoothing

    keys = [f"v1/{f:05d}" for f in range(1, 9)]
    rng = np.random.default_rng(0)
    preds = Predictions(
        keys,
        {"va": rng.normal(size=(8, 2)), "expr": rng.normal(size=(8, 8))},
        {"va": np.full((8, 2), -5.0), "expr": rng.integers(0, 8, 8).astype(float)},
        {"va": np.zeros(8, bool), "expr": np.ones(8, bool)},
    )
    windows, scores = tune_smoothing(preds, ("va", "expr"), {}, grid=(1, 3))
    assert set(windows) == set(scores) == {"expr"}
