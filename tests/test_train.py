"""The trainer (affectfast.train): step, run folder, exact resume, DDP on gloo, evaluate, predict, CLI.

Runs use the session's packed synthetic shards (tests/conftest.py), the DALI CPU loader, 48 px
images and one intra-op thread (the test machine's cores are shared; two spinning threads per
process make CPU convolutions several times slower there).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tarfile
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from affectfast.batch import Batch
from affectfast.cli import main
from affectfast.config import EvalConfig, TrainConfig
from affectfast.errors import DataError
from affectfast.losses import TaskLoss
from affectfast.model import build_model
from affectfast.predict import evaluate, predict
from affectfast.rundir import load_checkpoint
from affectfast.train import (
    build_autocast,
    build_schedule,
    resolve_device,
    run_summary,
    scalar_tag,
    train,
    train_step,
)

README = Path(__file__).resolve().parent.parent / "README.md"
TIMING_KEYS = ("images_per_s", "epoch_seconds")
SMALL = dict(
    loader="dali-cpu", batch_size=32, image_size=48, num_threads=1, amp="off", lr=2e-3, device="cpu"
)


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def straight_run(packed, tmp_path_factory):
    """Two epochs in one call: the reference for resume, evaluate, predict and the CLI."""
    out = tmp_path_factory.mktemp("runs") / "straight"
    records = train(TrainConfig(shards=packed, out=out, epochs=2, **SMALL))
    return out, records


def _without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def _synthetic_batch(n=16, size=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    expr = torch.randint(0, 8, (n,), generator=g)
    # label-dependent pixels: the expression's index sets the red channel, so the batch is learnable
    images = torch.randn(n, 3, size, size, generator=g) * 0.1
    images[:, 0] += expr[:, None, None].float() / 4
    labels = {
        "va": torch.rand(n, 2, generator=g) * 2 - 1,
        "expr": expr,
        "au": (torch.rand(n, 12, generator=g) < 0.5).float(),
    }
    masks = {
        "va": torch.ones(n, dtype=torch.bool),
        "expr": torch.rand(n, generator=g) < 0.8,
        "au": torch.zeros(n, dtype=torch.bool),
    }  # no valid AU label at all: must add 0, not NaN
    return Batch(images.contiguous(memory_format=torch.channels_last), labels, masks)


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_train_step_lowers_the_loss_on_a_fixed_batch(amp):
    torch.manual_seed(0)
    model = build_model(("va", "expr", "au")).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = build_schedule(optimizer, total_steps=100)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batch = _synthetic_batch(
        n=8, size=32
    )  # small: bf16 convolutions are slow on CPUs without bf16 units
    losses = [
        train_step(
            model,
            batch,
            optimizer,
            scheduler,
            scaler,
            build_autocast(torch.device("cpu"), amp),
            TaskLoss(),
        ).item()
        for _ in range(4)
    ]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_config_is_validated_and_round_trips_through_json(tmp_path):
    config = TrainConfig(shards=tmp_path, out=tmp_path / "r", tasks="au,va", task_weights={"va": 2})
    assert config.tasks == ("va", "au") and config.task_weights == (("va", 2.0),)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for bad in (
        dict(loader="gpu"),
        dict(amp="fp8"),
        dict(init="imagenet:"),
        dict(tasks="va,xx"),
        dict(task_weights={"expr": 1.0}),
        dict(epochs=0),
        dict(va_loss="l1"),
    ):
        with pytest.raises(ValueError):
            TrainConfig(shards=tmp_path, out=tmp_path, **{"tasks": "va", **bad})


# Every field's value set to a deeply shared list: its repr has 2**64 leaves, so an error that
# formats it (or the config holding it) never returns.
DEEP_CONFIG_SCRIPT = textwrap.dedent(
    """
    import json, torch
    from affectfast.config import TrainConfig
    from affectfast.rundir import load_checkpoint
    from affectfast.train import config_changes

    deep = []
    for _ in range(64):
        deep = [deep, deep]
    config = TrainConfig(shards="s", out="o")
    good = config.to_dict()
    found = {}
    for field in [*good, "unknown"]:
        try:
            TrainConfig.from_dict({**good, field: deep})
            found[field] = ["accepted", ""]
        except Exception as error:
            found[field] = [type(error).__name__, str(error)]
    torch.save({"format": 1, "config": {**good, "flip": deep}, "model": {}}, "deep.pt")
    try:
        load_checkpoint("deep.pt")
    except Exception as error:
        found["checkpoint"] = [type(error).__name__, str(error)]
    found["resume"] = ["changes", "; ".join(config_changes({**good, "lr": deep}, config))]
    print(json.dumps(found))
    """
)


def test_a_config_holding_a_deeply_shared_structure_is_refused_promptly_and_briefly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", DEEP_CONFIG_SCRIPT],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout)
    for field, (kind, message) in found.items():
        assert len(message) < 400 and "\n" not in message, (field, message[:400])
        if field == "checkpoint":
            assert kind == "DataError" and "its config is not a run's (flip must be" in message
        elif field == "resume":
            assert message.startswith("lr changed ([[[")
        elif field == "unknown":
            assert kind == "TypeError" and "unknown" in message
        else:  # each message names its field, and quotes that field alone
            assert kind == "ValueError" and field in message, (field, message)


def test_amp_auto_takes_bf16_only_where_the_gpu_computes_it_natively(tmp_path, monkeypatch):
    """V100/T4 pass torch.cuda.is_bf16_supported() through emulation; auto must pick fp16 there."""
    config = TrainConfig(shards=tmp_path, out=tmp_path / "r")
    for native, expected in ((False, "fp16"), (True, "bf16")):
        monkeypatch.setattr(
            torch.cuda,
            "is_bf16_supported",
            lambda including_emulation=True, native=native: native or including_emulation,
        )
        resolved, use_cuda = resolve_device(config, cuda=True)
        assert (resolved.amp, use_cuda) == (expected, True)
    explicit, _ = resolve_device(TrainConfig(shards=tmp_path, out=tmp_path, amp="bf16"), cuda=True)
    assert explicit.amp == "bf16"


def test_without_cuda_the_gpu_defaults_fall_back_in_one_line(tmp_path, capsys):
    config, use_cuda = resolve_device(TrainConfig(shards=tmp_path, out=tmp_path), cuda=False)
    assert (config.loader, config.amp, use_cuda) == ("dali-cpu", "off", False)
    assert capsys.readouterr().err.strip() == (
        "affectfast: no CUDA device, falling back to the CPU (loader dali-cpu, amp off)"
    )
    kept, _ = resolve_device(
        TrainConfig(shards=tmp_path, out=tmp_path, loader="wds", amp="bf16"), cuda=False
    )
    assert (kept.loader, kept.amp) == ("wds", "bf16") and capsys.readouterr().err == ""


def test_a_run_folder_holds_config_metrics_events_and_checkpoints(straight_run):
    out, records = straight_run
    assert sorted(p.name for p in out.iterdir()) == [
        "best.pt",
        "config.json",
        "last.pt",
        "metrics.jsonl",
        "tb",
    ]
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == records and [r["epoch"] for r in lines] == [1, 2]
    for key in (
        "train_loss",
        "images_per_s",
        "epoch_seconds",
        "ccc_valence",
        "ccc_arousal",
        "ccc_mean",
        "f1_expr",
        "f1_au",
        "p_mtl",
    ):
        assert all(isinstance(r[key], float) for r in lines), key
    train_samples = json.loads((packed_of(out) / "manifest.json").read_text())["splits"]["train"]
    assert all(r["train_batches"] == train_samples["samples"] // 32 for r in lines)
    saved = json.loads((out / "config.json").read_text())
    assert saved["loader"] == "dali-cpu" and saved["amp"] == "off"
    checkpoint = load_checkpoint(out / "last.pt")
    assert checkpoint["epoch"] == 2 and checkpoint["config"] == saved
    assert load_checkpoint(out / "best.pt")["metrics"]["p_mtl"] == max(r["p_mtl"] for r in lines)


def packed_of(run: Path) -> Path:
    """The shards a run folder's config.json names."""
    return Path(json.loads((run / "config.json").read_text())["shards"])


def readme_metrics_fields() -> set[str]:
    """The field names in the first column of README's metrics.jsonl table."""
    text = README.read_text()
    table = text[text.index("| metrics.jsonl field |") :].split("\n\n")[0]
    return {
        name for row in table.splitlines()[2:] for name in re.findall(r"`(\w+)`", row.split("|")[1])
    }


def test_the_readme_lists_every_metrics_jsonl_field(straight_run):
    _, records = straight_run
    optional = {"f1_au_tuned"}  # only with --tune-au-thresholds
    assert readme_metrics_fields() == set(records[0]) | optional


def test_tensorboard_holds_every_field_under_train_or_val(straight_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, records = straight_run
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert tags == {scalar_tag(k) for k in records[0] if k != "epoch"}
    assert {"train/loss", "train/lr", "train/batches", "val/p_mtl", "val/ccc_mean"} <= tags
    assert all(t.split("/")[0] in ("train", "val") for t in tags)
    assert [e.value for e in events.Scalars("val/p_mtl")] == pytest.approx(
        [r["p_mtl"] for r in records]
    )


def test_the_run_summary_names_the_files_and_the_best_epoch(straight_run):
    out, records = straight_run
    config = TrainConfig(shards=packed_of(out), out=out, epochs=2, **SMALL)
    lines = run_summary(config).splitlines()
    best = load_checkpoint(out / "best.pt")
    assert lines[0] == f"run folder {out} (2 of 2 epochs done)"
    assert lines[1] == (
        f"  best.pt        epoch {best['epoch']}, the best val P_MTL {best['metrics']['p_mtl']:.4f}"
    )
    assert lines[2] == "  last.pt        epoch 2, what --resume continues from"
    assert "metrics.jsonl  one JSON line per epoch (2 lines)" in lines[3]
    assert str(out / "tb") in lines[5] and len(lines) <= 24  # one screen
    stopped = run_summary(dataclasses.replace(config, epochs=5)).splitlines()[0]
    assert stopped.endswith("(2 of 5 epochs done; --resume continues it)")


def test_resume_ends_exactly_like_an_uninterrupted_run(packed, straight_run, tmp_path):
    config = TrainConfig(shards=packed, out=tmp_path / "resumed", epochs=2, **SMALL)
    first = train(config, stop_after=1)
    assert len(first) == 1 and load_checkpoint(config.out / "last.pt")["epoch"] == 1
    with pytest.raises(DataError, match="--resume"):
        train(config)  # never silently overwrites a run
    with pytest.raises(DataError, match="lr changed"):
        train(
            TrainConfig(shards=packed, out=tmp_path / "resumed", epochs=2, **{**SMALL, "lr": 1e-4}),
            resume=True,
        )
    second = train(config, resume=True)
    straight_out, straight_records = straight_run
    lines = [json.loads(line) for line in (config.out / "metrics.jsonl").read_text().splitlines()]
    assert (
        _without_timing(lines)
        == _without_timing(first + second)
        == _without_timing(straight_records)
    )
    resumed, reference = (
        load_checkpoint(config.out / "last.pt"),
        load_checkpoint(straight_out / "last.pt"),
    )
    for name, value in reference["model"].items():
        assert torch.equal(resumed["model"][name], value), name


def _val_frames_per_video(shards: Path) -> Counter:
    counts = Counter()
    for tar in sorted(shards.glob("val-*.tar")):
        with tarfile.open(tar) as f:
            counts.update(
                m.name.rsplit("/", 1)[0] for m in f.getmembers() if m.name.endswith(".jpg")
            )
    return counts


def test_evaluate_reproduces_the_last_epoch_and_predict_writes_abaw_files(
    packed, straight_run, tmp_path, capsys
):
    out, records = straight_run
    metrics = evaluate(
        EvalConfig(out / "last.pt", packed, loader="dali-cpu", batch_size=64, num_threads=1)
    )
    val_samples = json.loads((packed / "manifest.json").read_text())["splits"]["val"]["samples"]
    val_batches = -(-val_samples // 64)
    # The validation pass's progress bar: its first render (later ones are rate-limited by
    # tqdm's mininterval, and the bar is cleared when done) shows the count and the ETA field.
    bar = capsys.readouterr().err
    assert f"val:   0%|          | 0/{val_batches} [00:00<?" in bar
    for key in ("ccc_valence", "ccc_arousal", "f1_expr", "f1_au", "p_mtl"):
        assert metrics[key] == pytest.approx(records[-1][key], abs=1e-6), key
    tuned = evaluate(
        EvalConfig(
            out / "last.pt", packed, loader="dali-cpu", num_threads=1, tune_au_thresholds=True
        )
    )
    assert (
        tuned["f1_au_tuned"] >= tuned["f1_au"] == metrics["f1_au"]
        and len(tuned["au_thresholds"]) == 12
    )
    written = predict(
        EvalConfig(out / "last.pt", packed, loader="dali-cpu", num_threads=1), tmp_path / "pred"
    )
    # A line for every frame of each val video (its annotation lines), images or not.
    frame_counts = json.loads((packed / "manifest.json").read_text())["frame_counts"]
    expected = {video: frame_counts[video] for video in _val_frames_per_video(packed)}
    assert any(frame_counts[v] > n for v, n in _val_frames_per_video(packed).items())
    folders = {
        "VA_Estimation_Challenge": "valence,arousal",
        "EXPR_Recognition_Challenge": "Neutral,Anger",
        "AU_Detection_Challenge": "AU1,AU2,AU4",
    }
    assert len(written.files) == 3 * len(expected)
    for folder, header in folders.items():
        for video, frames in expected.items():
            lines = (tmp_path / "pred" / folder / f"{video}.txt").read_text().splitlines()
            assert lines[0].startswith(header) and len(lines) == frames + 1
            if folder.startswith("EXPR"):
                assert all(0 <= int(x) < 8 for x in lines[1:])
            if folder.startswith("AU"):
                assert all(
                    set(x.split(",")) <= {"0", "1"} and len(x.split(",")) == 12 for x in lines[1:]
                )


def test_cli_evaluate_prints_tables_and_missing_imagenet_exits_2(packed, straight_run, tmp_path):
    out, _ = straight_run
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "evaluate",
            str(out / "best.pt"),
            str(packed),
            "--loader",
            "dali-cpu",
            "--num-threads",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (
        "F1 per expression" in result.output
        and "AU26" in result.output
        and "p_mtl" in result.output
    )
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "empty-hub"))
    try:
        result = runner.invoke(
            main,
            [
                "train",
                str(packed),
                "--out",
                str(tmp_path / "r"),
                "--init",
                "imagenet",
                "--loader",
                "dali-cpu",
                "--epochs",
                "1",
            ],
        )
    finally:
        torch.hub.set_dir(previous)
    assert result.exit_code == 2
    assert "resnet18-f37072fd.pth" in result.output and "imagenet:PATH" in result.output
    assert not (tmp_path / "r" / "last.pt").exists()


def test_ddp_two_gloo_processes_match_a_single_process_evaluation(packed, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "affectfast",
        "train",
        str(packed),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--image-size",
        "48",
        "--num-threads",
        "1",
        "--loader",
        "dali-cpu",
        "--device",
        "cpu",  # the CPU tier: gloo, even on a GPU node
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    single = evaluate(
        EvalConfig(out / "last.pt", packed, loader="dali-cpu", batch_size=64, num_threads=1)
    )
    for key in ("ccc_valence", "ccc_arousal", "f1_expr", "f1_au", "p_mtl"):
        assert record[key] == pytest.approx(single[key], abs=1e-5), key
    for task in ("va", "expr", "au"):  # every val frame counted once across the two ranks
        assert record[f"frames_{task}"] == single[f"frames_{task}"] > 0
    manifest = json.loads((packed / "manifest.json").read_text())
    assert record["train_batches"] == manifest["splits"]["train"]["samples"] // 2 // 16
    assert f"run folder {out} (1 of 1 epochs done)" in result.stdout  # the main rank's summary
    assert result.stdout.count("run folder") == 1


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_ddp_two_nccl_processes_count_batches_and_match_a_single_process_evaluation(
    packed, tmp_path
):
    """NCCL: every rank takes as many batches, validation is gathered to rank 0 and its metrics
    sent back; fp32 and deterministic kernels at one batch size, so one process scores the same."""
    out = tmp_path / "nccl"
    command = [
        *[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
        *["-m", "affectfast", "train", str(packed), "--out", str(out), "--epochs", "1"],
        *["--batch-size", "16", "--image-size", "48", "--device", "cuda", "--amp", "off"],
        "--deterministic",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    manifest = json.loads((packed / "manifest.json").read_text())
    assert record["train_batches"] == manifest["splits"]["train"]["samples"] // 2 // 16
    single = evaluate(EvalConfig(out / "last.pt", packed, batch_size=16))
    for key in ("ccc_valence", "ccc_arousal", "f1_expr", "f1_au", "p_mtl"):
        assert record[key] == pytest.approx(single[key], abs=1e-4), key
    for task in ("va", "expr", "au"):
        assert record[f"frames_{task}"] == single[f"frames_{task}"] > 0


@pytest.mark.gpu
def test_gpu_defaults_train_with_dali_gpu_mixed_precision_and_channels_last(packed, tmp_path):
    records = train(
        TrainConfig(shards=packed, out=tmp_path / "gpu", epochs=1, batch_size=32, image_size=48)
    )
    saved = json.loads((tmp_path / "gpu" / "config.json").read_text())
    native_bf16 = torch.cuda.get_device_capability()[0] >= 8  # emulated bf16 is not taken
    assert saved["loader"] == "dali-gpu" and saved["channels_last"]
    assert saved["amp"] == ("bf16" if native_bf16 else "fp16")
    assert all(np.isfinite(records[0][k]) for k in ("train_loss", "ccc_mean", "f1_expr", "f1_au"))
    assert torch.backends.cudnn.benchmark  # autotuned kernels unless --deterministic


class _Materialized:
    """A loader's batches of one pass, read beforehand (what predict_split iterates)."""

    def __init__(self, loader):
        self.config, self.batches = loader.config, list(loader)

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


@pytest.mark.gpu
def test_gpu_validation_waits_on_the_device_per_pass_not_per_batch(packed, tmp_path):
    """Under torch's sync debug mode, the validation pass's host syncs (its copies to the host at
    the end) are as many with 4x the batches: none of them is per batch."""
    import warnings

    from affectfast.dist import DistInfo
    from affectfast.train import build_eval_loader, predict_split

    config, _ = resolve_device(
        TrainConfig(shards=packed, out=tmp_path / "unused", image_size=48, device="cuda")
    )
    info = DistInfo(device=torch.device("cuda", 0))
    torch.cuda.set_device(0)
    model = build_model(config.tasks).to(info.device, memory_format=torch.channels_last)
    autocast = build_autocast(info.device, config.amp)

    def syncs(batch_size: int):
        loader = _Materialized(build_eval_loader(config, packed, "val", info, batch_size))
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                preds = predict_split(model, loader, autocast, info)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        found = sum("synchroniz" in str(w.message) for w in caught)
        return preds, len(loader), found

    small, small_batches, small_syncs = syncs(8)
    large, large_batches, large_syncs = syncs(32)
    assert small_batches >= 3 * large_batches and small.keys == large.keys
    assert 0 < small_syncs == large_syncs <= 12, (small_syncs, large_syncs)


@pytest.mark.gpu
def test_gpu_resume_with_deterministic_matches_an_uninterrupted_run(packed, tmp_path):
    """On a GPU --resume is exact only with --deterministic (no TF32, no autotuning)."""
    settings = dict(epochs=2, batch_size=32, image_size=48, deterministic=True, device="cuda")
    whole = train(TrainConfig(shards=packed, out=tmp_path / "whole", **settings))
    config = TrainConfig(shards=packed, out=tmp_path / "parts", **settings)
    train(config, stop_after=1)
    resumed = train(config, resume=True)
    assert not torch.backends.cudnn.benchmark and not torch.backends.cuda.matmul.allow_tf32
    for key in ("train_loss", "ccc_mean", "f1_expr", "f1_au"):
        assert resumed[-1][key] == pytest.approx(whole[-1][key], abs=1e-6), key


@pytest.mark.gpu
def test_gpu_compiled_training_runs(packed, tmp_path):
    config = TrainConfig(
        shards=packed,
        out=tmp_path / "c",
        epochs=1,
        batch_size=32,
        image_size=48,
        torch_compile=True,
        device="cuda",
    )
    (record,) = train(config)
    assert np.isfinite(record["train_loss"])


@pytest.mark.slow
def test_multitask_run_learns_the_synthetic_labels(tmp_path):
    """Frames and labels stay aligned through synth -> pack -> DALI -> train.

    48 videos x 40 frames at 48 px, 8 epochs on the CPU: about 3-4 minutes on 2 shared cores.
    """
    from affectfast.pack import PackConfig, pack
    from affectfast.synth import SynthConfig, synthesize

    tree = synthesize(
        SynthConfig(out=tmp_path / "tree", videos=48, frames=40, seed=1, image_size=64, workers=1)
    )
    pack(PackConfig(root=tree, out=tmp_path / "shards", workers=1, shard_size=500, seed=0))
    records = train(
        TrainConfig(
            shards=tmp_path / "shards",
            out=tmp_path / "run",
            epochs=8,
            **{**SMALL, "batch_size": 32},
        )
    )
    last = records[-1]
    assert last["f1_expr"] >= 0.8 and last["f1_au"] >= 0.8 and last["ccc_mean"] >= 0.7, last


@pytest.mark.slow
def test_compiled_training_on_the_cpu_matches_eager_closely(packed, tmp_path):
    """--compile (torch.compile, default mode) on the CPU: same run, same metrics within 1e-3."""
    settings = dict(epochs=1, **{**SMALL, "batch_size": 64})
    eager = train(TrainConfig(shards=packed, out=tmp_path / "eager", **settings))
    compiled = train(
        TrainConfig(shards=packed, out=tmp_path / "compiled", torch_compile=True, **settings)
    )
    for key in ("train_loss", "p_mtl"):
        assert compiled[0][key] == pytest.approx(eager[0][key], abs=1e-3), key
