"""The ``affectfast`` command line. Commands are thin: build a config, call a library function.

Bad input (``DataError``) prints one line naming file and line and exits with code 2.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

from affectfast.errors import DataError


def exits_2_on_data_error(command):
    """Turn a DataError into a one-line message on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except DataError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """affectfast: train facial-affect models on the whole of Aff-Wild2, fast.

    \b
    Typical flow:
      affectfast synth demo/tree --videos 40 --frames 200     # or use the real Aff-Wild2 tree
      affectfast pack demo/tree --out shards/demo
      affectfast verify shards/demo
      affectfast train shards/demo --tasks va,expr,au --out runs/demo
    """


# --- commands (each block is owned by one module; keep them thin) -------------------------------


# --- synth (owner: affectfast.synth) ------------------------------------------------------------


@main.command("synth")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--videos",
    type=click.IntRange(min=4),
    default=40,
    show_default=True,
    help="Frame folders (a _left/_right pair counts as two).",
)
@click.option(
    "--frames",
    type=click.IntRange(min=10),
    default=200,
    show_default=True,
    help="Frames per video, before the gaps with no image.",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--image-size",
    type=click.IntRange(32, 1024),
    default=112,
    show_default=True,
    help="Square frame size in pixels (the real crops are 112).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=os.cpu_count() or 1,
    show_default=True,
    help="Drawing processes (the tree does not depend on it).",
)
@click.option(
    "--overwrite", is_flag=True, help="Write into a non-empty OUT (old files may remain)."
)
def synth_command(out, videos, frames, seed, image_size, workers, overwrite):
    """Write a synthetic Aff-Wild2-layout tree to OUT whose labels are drawn into the pixels.

    Valence is the background grey, arousal the face brightness, the expression the colour of the
    central disc, each AU a mirrored pair of coloured marks. The tree has the real quirks (missing
    images, ignore markers, missing task files, _left/_right subjects, both sets) and is
    byte-identical for a seed whatever --workers.
    """
    from affectfast.synth import SynthConfig, synthesize

    config = SynthConfig(
        out=out,
        videos=videos,
        frames=frames,
        seed=seed,
        image_size=image_size,
        workers=workers,
        overwrite=overwrite,
    )
    try:
        synthesize(config, progress=True)
    except FileExistsError as error:
        raise click.UsageError(str(error)) from None
    click.echo(f"wrote {out}: {videos} videos x {frames} frames, seed {seed}")


# --- pack / verify (owner: affectfast.pack, affectfast.verify) -----------------------------------


@main.command("pack")
@click.argument("root", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output folder [default: shards/<ROOT name>].",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=os.cpu_count() or 1,
    show_default=True,
    help="Processes writing shards (the output does not depend on it).",
)
@click.option(
    "--shard-size",
    type=click.IntRange(min=1),
    default=5000,
    show_default=True,
    help="Samples per shard.",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Seed of the global train shuffle.",
)
@click.option(
    "--check",
    type=click.Choice(["full", "header"]),
    default="full",
    show_default=True,
    help="full: decode every JPEG; header: markers, size and end marker only (faster).",
)
@click.option(
    "--skip-bad",
    is_flag=True,
    help="Leave bad JPEGs out (listed and counted in manifest.json) instead of failing.",
)
@click.option(
    "--frames",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The cropped_aligned folder, if not found under ROOT.",
)
@click.option(
    "--va",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The VA_Estimation_Challenge folder, if not found under ROOT.",
)
@click.option(
    "--expr",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The EXPR_Recognition_Challenge folder, if not found under ROOT.",
)
@click.option(
    "--au",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The AU_Detection_Challenge folder, if not found under ROOT.",
)
@exits_2_on_data_error
def pack_command(root, out, workers, shard_size, seed, check, skip_bad, frames, va, expr, au):
    """Pack the Aff-Wild2 tree ROOT into WebDataset shards + DALI indexes + manifest.json.

    Byte-identical for any --workers; a killed pack run again resumes where it stopped.
    """
    from affectfast.pack import PackConfig, pack

    config = PackConfig(
        root=root,
        out=out or Path("shards") / root.resolve().name,
        workers=workers,
        shard_size=shard_size,
        seed=seed,
        check=check,
        skip_bad=skip_bad,
        frames=frames,
        va=va,
        expr=expr,
        au=au,
    )
    manifest = pack(config)
    splits = manifest["splits"]
    for entry in splits.values():
        for bad in entry["bad_files"]:
            click.echo(f"skipped {bad['path']}: {bad['error']}", err=True)
    shards = sum(len(entry["shards"]) for entry in splits.values())
    bad = sum(len(entry["bad_files"]) for entry in splits.values())
    counts = ", ".join(f"{split} {entry['samples']}" for split, entry in splits.items())
    click.echo(
        f"packed {config.out}: {shards} shards, samples {counts}"
        + (f", {bad} bad images skipped (listed in manifest.json)" if bad else "")
    )


@main.command("verify")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--decode", is_flag=True, help="Also decode every image (slower).")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=os.cpu_count() or 1,
    show_default=True,
    help="Processes reading shards.",
)
def verify_command(out, decode, workers):
    """Check pack output OUT against its manifest: sizes, sha256, .idx files, counts.

    Exit 0 with a one-line summary when all is well, else the problems and exit 1.
    """
    from affectfast.verify import summary, verify

    problems = verify(out, decode=decode, workers=workers, progress=True)
    if problems:
        for problem in problems:
            click.echo(problem)
        click.echo(f"{len(problems)} problem(s) found in {out}", err=True)
        sys.exit(1)
    click.echo(summary(out))


# --- train / evaluate / predict (owner: affectfast.train) ----------------------------------------


def _task_weights(ctx, param, value):
    """Parse --task-weights "va=1,expr=0.5" into (task, weight) pairs."""
    try:
        pairs = [item.split("=") for item in value.split(",") if item.strip()] if value else []
        return tuple((task.strip(), float(weight)) for task, weight in pairs)
    except ValueError:
        raise click.BadParameter(
            "expected TASK=WEIGHT[,TASK=WEIGHT...], e.g. va=1,expr=0.5"
        ) from None


_LOADERS = ("dali-gpu", "dali-cpu", "wds", "files")


def _training_options(command):
    """The training settings shared by `train` and `study` (one TrainConfig field each)."""
    for option in reversed(
        [
            click.option(
                "--loader",
                type=click.Choice(_LOADERS),
                default="dali-gpu",
                show_default=True,
                help="Data loader; without CUDA dali-gpu falls back to dali-cpu.",
            ),
            click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True),
            click.option(
                "--batch-size",
                type=click.IntRange(min=2),
                default=256,
                show_default=True,
                help="Per process.",
            ),
            click.option(
                "--lr",
                type=click.FloatRange(min=0, min_open=True),
                default=1e-3,
                show_default=True,
                help="AdamW peak learning rate (5% linear warm-up, then cosine to zero).",
            ),
            click.option(
                "--weight-decay", type=click.FloatRange(min=0), default=1e-4, show_default=True
            ),
            click.option(
                "--image-size",
                type=click.IntRange(min=32),
                default=112,
                show_default=True,
                help="Pixels, square.",
            ),
            click.option(
                "--amp",
                type=click.Choice(["auto", "bf16", "fp16", "off"]),
                default="auto",
                show_default=True,
                help="Mixed precision. auto: bf16 (fp16 + grad scaler where bf16 is unsupported) on a GPU, off on the CPU.",
            ),
            click.option("--channels-last/--no-channels-last", default=True, show_default=True),
            click.option(
                "--va-loss", type=click.Choice(["ccc", "mse"]), default="ccc", show_default=True
            ),
            click.option(
                "--task-weights",
                callback=_task_weights,
                default="",
                help="Loss weight per task, e.g. va=1,expr=0.5 (unlisted tasks weigh 1).",
            ),
            click.option(
                "--augment/--no-augment",
                default=True,
                show_default=True,
                help="Random flip and rotation.",
            ),
            click.option(
                "--rotate-degrees", type=click.FloatRange(min=0), default=10.0, show_default=True
            ),
            click.option(
                "--interpolation",
                type=click.Choice(["nearest", "linear"]),
                default="nearest",
                show_default=True,
            ),
            click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True),
            click.option(
                "--num-threads",
                type=click.IntRange(min=1),
                default=2,
                show_default=True,
                help="Loader threads/workers per process.",
            ),
            click.option(
                "--tune-au-thresholds",
                is_flag=True,
                help="Also report AU F1 at per-AU thresholds tuned on val.",
            ),
            click.option(
                "--tree",
                type=click.Path(exists=True, file_okay=False, path_type=Path),
                default=None,
                help="The raw Aff-Wild2 root (loader files only).",
            ),
        ]
    ):
        command = option(command)
    return command


@main.command("train")
@click.argument("shards", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Run folder (config.json, metrics.jsonl, tb/, last.pt, best.pt), e.g. runs/NAME.",
)
@click.option(
    "--tasks", default="va,expr,au", show_default=True, help="Comma-separated subset of va,expr,au."
)
@click.option(
    "--init",
    default="scratch",
    show_default=True,
    help="scratch | imagenet (torchvision's cache) | imagenet:PATH | ckpt:PATH (another run's trunk).",
)
@_training_options
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt.")
@click.option(
    "--stop-after",
    type=click.IntRange(min=1),
    default=None,
    help="Train at most this many epochs now, leaving last.pt for --resume (wall-time limits).",
)
@exits_2_on_data_error
def train_command(shards, out, resume, stop_after, **options):
    """Train ResNet-18 on packed SHARDS (uni- or multi-task); multi-GPU via torchrun.

    \b
    Single process:   affectfast train shards/demo --tasks expr --out runs/expr
    Multi-GPU:        torchrun --nproc-per-node 8 -m affectfast train shards/aff --out runs/mtl
    """
    from affectfast.train import TrainConfig, train

    try:
        config = TrainConfig(shards=shards, out=out, **options)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    train(config, resume=resume, stop_after=stop_after)


def _eval_config(checkpoint, shards, split, loader, batch_size, num_threads, tune_au_thresholds):
    from affectfast.train import EvalConfig

    return EvalConfig(
        checkpoint=checkpoint,
        shards=shards,
        split=split,
        loader=loader,
        batch_size=batch_size,
        num_threads=num_threads,
        tune_au_thresholds=tune_au_thresholds,
    )


def _eval_options(command):
    for option in reversed(
        [
            click.argument(
                "checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path)
            ),
            click.argument("shards", type=click.Path(exists=True, file_okay=False, path_type=Path)),
            click.option(
                "--split", type=click.Choice(["train", "val"]), default="val", show_default=True
            ),
            # No "files": it reads the raw tree, which a checkpoint does not name.
            click.option(
                "--loader",
                type=click.Choice(_LOADERS[:3]),
                default="dali-gpu",
                show_default=True,
                help="Without CUDA dali-gpu falls back to dali-cpu.",
            ),
            click.option(
                "--batch-size", type=click.IntRange(min=1), default=256, show_default=True
            ),
            click.option("--num-threads", type=click.IntRange(min=1), default=2, show_default=True),
        ]
    ):
        command = option(command)
    return command


@main.command("evaluate")
@_eval_options
@click.option(
    "--tune-au-thresholds",
    is_flag=True,
    help="Also report AU F1 at per-AU thresholds tuned on SPLIT.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the metrics as one JSON object instead of tables.",
)
@exits_2_on_data_error
def evaluate_command(as_json, **options):
    """Print the ABAW metrics of CHECKPOINT on SHARDS: CCC, F1 per expression and per AU, P_MTL."""
    import json

    from affectfast.metrics import format_tables
    from affectfast.train import evaluate

    metrics = evaluate(_eval_config(**options))
    click.echo(json.dumps(metrics) if as_json else format_tables(metrics))


@main.command("predict")
@_eval_options
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder for <Challenge>/<video>.txt prediction files.",
)
@exits_2_on_data_error
def predict_command(out, **options):
    """Write CHECKPOINT's predictions on SHARDS in the ABAW submission layout, one file per video and task."""
    from affectfast.train import predict

    written = predict(_eval_config(tune_au_thresholds=False, **options), out)
    click.echo(f"wrote {len(written)} prediction files under {out}")


# --- bench loaders (owner: affectfast.bench) ------------------------------------------------------


@main.group("bench")
def bench_group():
    """Benchmarks (warm-up, timed runs, medians, CSV beside the printed table)."""


@bench_group.command("loaders")
@click.argument("shards", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--tree",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The raw Aff-Wild2 tree SHARDS was packed from (needed by the files loader).",
)
@click.option(
    "--loaders",
    default="dali-cpu,wds,files",
    show_default=True,
    help="Comma-separated kinds: dali-gpu (needs CUDA), dali-cpu, wds, files.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--image-size", type=click.IntRange(min=8), default=112, show_default=True)
@click.option(
    "--seconds",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Timed seconds per loader, after the warm-up batches.",
)
@click.option(
    "--interpolation",
    type=click.Choice(["nearest", "linear"]),
    default="nearest",
    show_default=True,
    help="Resampling of the rotation (nearest is torchvision's default).",
)
@click.option(
    "--no-augment", is_flag=True, help="Time with augmentation off (resize and normalize only)."
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="DALI threads / DataLoader workers.",
)
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the table as CSV (columns loader,images_per_s,...).",
)
@click.option(
    "--plot", type=click.Path(dir_okay=False, path_type=Path), help="Write a PNG bar chart."
)
@exits_2_on_data_error
def bench_loaders_command(
    shards,
    tree,
    loaders,
    batch_size,
    image_size,
    seconds,
    interpolation,
    no_augment,
    threads,
    csv_path,
    plot,
):
    """Images/s of each loader on SHARDS' train split, with the decode-only ceiling of the same run."""
    from affectfast.bench import BenchConfig, bench_loaders, format_table, write_csv, write_plot
    from affectfast.loader import AugmentSpec

    kinds = tuple(k.strip() for k in loaders.split(",") if k.strip())
    try:
        config = BenchConfig(
            shards=shards,
            loaders=kinds,
            tree=tree,
            batch_size=batch_size,
            image_size=image_size,
            seconds=seconds,
            num_threads=threads,
            augment=None if no_augment else AugmentSpec(interpolation=interpolation),
            device="cuda" if "dali-gpu" in kinds else "cpu",
        )
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    results = bench_loaders(config, progress=lambda line: click.echo(line, err=True))
    click.echo(format_table(results))
    if csv_path:
        write_csv(results, csv_path)
    if plot:
        write_plot(results, plot, f"batch {batch_size}, {image_size} px, {threads} threads")


# --- study (owner: affectfast.study) --------------------------------------------------------------


@main.command("study")
@click.argument("shards", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Study folder: one run per <init>/<model>, plus results.md, results.csv, curves.png.",
)
@click.option(
    "--inits",
    default="scratch",
    show_default=True,
    help="Comma-separated initializations: scratch, imagenet, imagenet:PATH, ckpt:PATH give "
    "uni-va, uni-expr, uni-au and multi each; uni-TASK adds a multi-task model fine-tuned "
    "from the first one's uni-TASK run.",
)
@_training_options
@exits_2_on_data_error
def study_command(shards, out, inits, **options):
    """Run the uni- vs multi-task study on SHARDS and print the comparison table.

    Restartable: finished runs are skipped and an interrupted one resumes from its last.pt.

    \b
    On a GPU node:  affectfast study shards/affwild2 --out runs/study --inits scratch,imagenet,uni-expr
    """
    from affectfast.study import StudyConfig, format_table, run_study
    from affectfast.train import TrainConfig

    try:
        base = TrainConfig(shards=shards, out=out, **options)
        config = StudyConfig(
            out=out, base=base, inits=tuple(t.strip() for t in inits.split(",") if t.strip())
        )
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    click.echo(format_table(run_study(config)))
