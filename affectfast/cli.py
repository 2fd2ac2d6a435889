"""The ``affectfast`` command line. Commands are thin: build a config, call a library function.

Bad input (``DataError``) prints one line naming file and line and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import importlib
import os
import sys
from pathlib import Path

import click

from affectfast.constants import (
    AMP_CHOICES,
    DEVICES,
    INTERPOLATIONS,
    JPEG_CHECKS,
    LABELLED_SPLITS,
    LOADER_KINDS,
    SEQUENCE_MODELS,
    SHARD_LOADER_KINDS,
    SPLITS,
    VA_LOSSES,
)
from affectfast.errors import DataError, SystemFailure, check_writable_folder

# The dataclasses whose fields the options fill, as "module:Class": imported only to show --help.
TRAIN = "affectfast.config:TrainConfig"
TEMPORAL = "affectfast.config:TemporalConfig"
EVAL = "affectfast.config:EvalConfig"
PACK = "affectfast.pack:PackConfig"
SYNTH = "affectfast.synth:SynthConfig"
BENCH = "affectfast.bench:BenchConfig"


def field_default(config: str, name: str):
    """The default of field ``name`` of the dataclass named ``config`` ("module:Class")."""
    module, _, cls = config.partition(":")
    field = {f.name: f for f in dataclasses.fields(getattr(importlib.import_module(module), cls))}[
        name
    ]
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


class ConfigOption(click.Option):
    """An option whose default is its config field's: the value is None unless given (the
    dataclass then applies its default), and --help shows that default, looked up only then.
    """

    def __init__(self, *args, config: str, field: str | None = None, **kwargs):
        super().__init__(*args, default=None, show_default=False, **kwargs)
        self.config, self.field = config, field or self.name

    def get_help_record(self, ctx):
        names, text = super().get_help_record(ctx)
        default = field_default(self.config, self.field)
        if isinstance(default, bool) and self.secondary_opts:
            default = self.opts[0] if default else self.secondary_opts[0]
        elif isinstance(default, tuple):
            default = ",".join(map(str, default))
        shown = "" if default in (None, "", ()) else f"  [default: {default}]"
        return names, f"{text}{shown}".strip()


def config_option(*decls, config: str, **kwargs):
    """``click.option`` whose default comes from ``config``'s field of the same name."""
    return click.option(*decls, cls=ConfigOption, config=config, **kwargs)


def given(options: dict) -> dict:
    """The options the user gave (None means: let the config's default apply)."""
    return {name: value for name, value in options.items() if value is not None}


def _thread_count(ctx, param, value):
    """Parse --num-threads: "auto" or an integer >= 1 (None when not given)."""
    if value is None or value == "auto":
        return value
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise click.BadParameter(f'expected "auto" or an integer >= 1, got {value!r}')


def use_passive_openmp() -> None:
    """Let idle OpenMP threads sleep at once instead of spinning (unless the user chose a policy).

    A spinning thread holds a core that a thread doing work, or another process, needs: on 2
    cores, CPU training beside one busy process kept 31% of its speed spinning, 55% passive
    (benchmarks/bench_contention.py). libgomp reads the policy once, when torch loads, so this
    runs before any command imports torch.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# What to do about the OSErrors a user's files and disks cause, by errno.
OS_ADVICE = {
    errno.EACCES: "check the permissions of it and of the folders above it",
    errno.EPERM: "check the permissions of it and of the folders above it",
    errno.ENOSPC: "free space on that disk or choose a folder on another one",
    errno.EDQUOT: "free space (disk quota exceeded) or choose a folder on another disk",
    errno.EROFS: "it is on a read-only file system: choose another folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "it is a folder where a file was expected",
    errno.ENOENT: "it does not exist: check the path",
    errno.EEXIST: "it already exists",
}


def describe_os_error(error: OSError) -> str:
    """One line for an OSError: the path, what happened and what to do."""
    where = error.filename if error.filename is not None else "while writing a file"
    what = error.strerror or str(error)
    advice = OS_ADVICE.get(error.errno)
    return f"{where}: {what}" + (f"; {advice}" if advice else "")


class SafeGroup(click.Group):
    """The safety net under every command: a DataError or an OSError (permissions, a full disk,
    a path through a file, ...) ends in one line on stderr and exit code 2, a SystemFailure (out
    of memory, CUDA, the driver) in one line and exit code 1; never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DataError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)
        except OSError as error:
            if error.errno == errno.EPIPE:  # stdout closed early (| head): click's to handle
                raise
            click.echo(f"error: {describe_os_error(error)}", err=True)
            sys.exit(2)
        except SystemFailure as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(1)


@click.group(cls=SafeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(
    package_name="affectfast", prog_name="affectfast", message="%(prog)s %(version)s"
)
def main():
    """affectfast: train facial-affect models on the whole of Aff-Wild2, fast.

    \b
    Typical flow:
      affectfast synth demo/tree --videos 40 --frames 200     # or use the real Aff-Wild2 tree
      affectfast pack demo/tree --out shards/demo
      affectfast verify shards/demo
      affectfast train shards/demo --tasks va,expr,au --out runs/demo
    """
    use_passive_openmp()


# --- synth ----------------------------------------------------------------------------------------


@main.command("synth")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@config_option(
    "--videos",
    config=SYNTH,
    type=click.IntRange(min=4),
    help="Frame folders (a _left/_right pair counts as two).",
)
@config_option(
    "--frames",
    config=SYNTH,
    type=click.IntRange(min=10),
    help="Frames per video, before the gaps with no image.",
)
@config_option("--seed", config=SYNTH, type=click.IntRange(min=0))
@config_option(
    "--image-size",
    config=SYNTH,
    type=click.IntRange(32, 1024),
    help="Square frame size in pixels (the real crops are 112).",
)
@config_option(
    "--workers",
    config=SYNTH,
    type=click.IntRange(min=1),
    help="Drawing processes (the tree does not depend on it).",
)
@config_option(
    "--noisy-frames",
    config=SYNTH,
    type=click.FloatRange(0, 1),
    help="Fraction of frames whose cues are corrupted (occlusion, exposure jump or blur) while "
    "their labels stay smooth along the video: what temporal smoothing is for.",
)
@config_option(
    "--test-videos",
    config=SYNTH,
    type=click.IntRange(min=0),
    help="More frame folders held out as an ABAW test set: no annotation file; "
    "test_lists/{VA,EXPR,AU}_test_set.txt and test_lists/frame_counts.csv name them.",
)
@config_option(
    "--onset-cues",
    config=SYNTH,
    type=click.IntRange(0, 24),
    help="K > 0: the expression and AU cues show only on the K frames at each segment's onset "
    "(an AU shows black marks on its last K frames), labels constant over the segment, segments "
    "48-120 frames: a tree on which only a model of time reads the labels between onsets.",
)
@click.option(
    "--overwrite", is_flag=True, help="Write into a non-empty OUT (old files may remain)."
)
def synth_command(out, **options):
    """Write a synthetic Aff-Wild2-layout tree to OUT whose labels are drawn into the pixels.

    Valence is the background grey, arousal the face brightness, the expression the colour of the
    central disc, each AU a mirrored pair of coloured marks. The tree has the real quirks (missing
    images, ignore markers, missing task files, _left/_right subjects, both sets) and is
    byte-identical for a seed whatever --workers.
    """
    from affectfast.synth import SynthConfig, synthesize

    config = SynthConfig(out=out, **given(options))
    try:
        synthesize(config, progress=True)
    except FileExistsError as error:
        raise click.UsageError(str(error)) from None
    held_out = f", {config.test_videos} test videos" if config.test_videos else ""
    click.echo(
        f"wrote {out}: {config.videos} videos x {config.frames} frames{held_out}, seed {config.seed}"
    )


# --- pack / verify ---------------------------------------------------------------------------------


def _test_lists(ctx, param, values):
    """Parse repeated --test-videos into (task, list file) pairs: one FILE for every task, or
    TASK=FILE per task (a value whose text before "=" is not a task is a file name)."""
    if not values:
        return ()
    from affectfast.tasks import TASKS

    pairs, files = [], []
    for value in values:
        task, sep, path = value.partition("=")
        if sep and task.strip().lower() in TASKS:
            if not path:
                raise click.BadParameter(f"{value!r}: expected TASK=FILE with a file name")
            pairs.append((task.strip().lower(), Path(path)))
        else:
            files.append(Path(value))
    if files and (pairs or len(files) > 1):
        raise click.BadParameter(
            "give one FILE for every task, or TASK=FILE (va, expr, au) per task, not both"
        )
    if files:
        return tuple((task, files[0]) for task in TASKS)
    tasks = [task for task, _ in pairs]
    twice = sorted({task for task in tasks if tasks.count(task) > 1})
    if twice:
        raise click.BadParameter(f"a second list for {', '.join(twice)}: one list per task")
    return tuple(pairs)


@main.command("pack")
@click.argument("root", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output folder [default: shards/<ROOT name>].",
)
@config_option(
    "--workers",
    config=PACK,
    type=click.IntRange(min=1),
    help="Processes writing shards (the output does not depend on it).",
)
@config_option("--shard-size", config=PACK, type=click.IntRange(min=1), help="Samples per shard.")
@config_option(
    "--seed", config=PACK, type=click.IntRange(min=0), help="Seed of the global train shuffle."
)
@config_option(
    "--check",
    config=PACK,
    type=click.Choice(JPEG_CHECKS),
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
@click.option(
    "--test-videos",
    "test_lists",
    multiple=True,
    callback=_test_lists,
    metavar="[TASK=]FILE",
    help="An ABAW test-set list (one video name a line): FILE for every task, or TASK=FILE per "
    "task (repeat it). Packs a test split of those videos' images; a video with labels for the "
    "task of its list is refused.",
)
def pack_command(root, out, **options):
    """Pack the Aff-Wild2 tree ROOT into WebDataset shards + DALI indexes + manifest.json.

    Byte-identical for any --workers; a killed pack run again resumes where it stopped.
    With --test-videos it also writes the unlabelled test split (images only).
    """
    from affectfast.pack import PackConfig, pack
    from affectfast.shards import manifest_summary

    config = PackConfig(
        root=root, out=out or Path("shards") / root.resolve().name, **given(options)
    )
    manifest = pack(config)
    for entry in manifest["splits"].values():
        for bad in entry["bad_files"]:
            click.echo(f"skipped {bad['path']}: {bad['error']}", err=True)
    click.echo(f"packed {config.out}: {manifest_summary(manifest)}")


@main.command("verify")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--decode", is_flag=True, help="Also decode every image (slower).")
@click.option(
    "--workers", type=click.IntRange(min=1), help="Processes reading shards [default: all cores]."
)
def verify_command(out, decode, workers):
    """Check pack output OUT against its manifest: sizes, sha256, .idx files, counts.

    Exit 0 with a one-line summary when all is well, else the problems and exit 1.
    """
    from affectfast.verify import summary, verify

    problems = verify(out, decode=decode, workers=workers or os.cpu_count() or 1, progress=True)
    if problems:
        for problem in problems:
            click.echo(problem)
        click.echo(f"{len(problems)} problem(s) found in {out}", err=True)
        sys.exit(1)
    click.echo(summary(out))


@main.command("stage")
@click.argument("shards", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--to",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Node-local folder for the copy (LOCAL_DIR; created if needed): new, empty, or one "
    "an earlier stage wrote (a folder of other files is refused).",
)
@click.option(
    "--recheck",
    is_flag=True,
    help="Also re-hash the files already staged (slower; catches a change that kept size and mtime).",
)
def stage_command(shards, to, recheck):
    """Copy pack SHARDS to node-local disk (--to), verified against its manifest.

    Each tar must have the size and sha256 the manifest lists. Run again, it copies only what
    changed (nothing while the pack is unchanged); a second stage into the same folder waits for
    the first. For shared filesystems, where DALI's memory-mapped reads are slow; `affectfast
    train --stage-dir` does this itself, once per node.
    """
    from affectfast.stage import stage

    click.echo(f"staged {shards} -> {stage(shards, to, progress=True, recheck=recheck).summary()}")


# --- train / evaluate / predict --------------------------------------------------------------------


def _task_weights(ctx, param, value):
    """Parse --task-weights "va=1,expr=0.5" into (task, weight) pairs (None when not given)."""
    if value is None:
        return None
    try:
        pairs = [item.split("=") for item in value.split(",") if item.strip()]
        return tuple((task.strip(), float(weight)) for task, weight in pairs)
    except ValueError:
        raise click.BadParameter(
            "expected TASK=WEIGHT[,TASK=WEIGHT...], e.g. va=1,expr=0.5"
        ) from None


def _training_options(command):
    """The training settings shared by `train` and `study` (one TrainConfig field each)."""
    for option in reversed(
        [
            config_option(
                "--loader",
                config=TRAIN,
                type=click.Choice(LOADER_KINDS),
                help="Data loader; without CUDA dali-gpu falls back to dali-cpu.",
            ),
            config_option("--epochs", config=TRAIN, type=click.IntRange(min=1)),
            config_option(
                "--batch-size", config=TRAIN, type=click.IntRange(min=2), help="Per process."
            ),
            config_option(
                "--lr",
                config=TRAIN,
                type=click.FloatRange(min=0, min_open=True),
                help="AdamW peak learning rate (5% linear warm-up, then cosine to zero).",
            ),
            config_option("--weight-decay", config=TRAIN, type=click.FloatRange(min=0)),
            config_option(
                "--image-size", config=TRAIN, type=click.IntRange(min=32), help="Pixels, square."
            ),
            config_option(
                "--amp",
                config=TRAIN,
                type=click.Choice(AMP_CHOICES),
                help="Mixed precision. auto: bf16 (fp16 + grad scaler where bf16 is "
                "unsupported) on a GPU, off on the CPU. fp16's scaler reads the loss scale back "
                "every step (a host sync); bf16 has none.",
            ),
            config_option("--channels-last/--no-channels-last", config=TRAIN),
            config_option("--va-loss", config=TRAIN, type=click.Choice(VA_LOSSES)),
            config_option(
                "--task-weights",
                config=TRAIN,
                callback=_task_weights,
                help="Loss weight per task, e.g. va=1,expr=0.5 (unlisted tasks weigh 1).",
            ),
            config_option("--augment/--no-augment", config=TRAIN, help="Random flip and rotation."),
            config_option("--rotate-degrees", config=TRAIN, type=click.FloatRange(min=0)),
            config_option("--interpolation", config=TRAIN, type=click.Choice(INTERPOLATIONS)),
            config_option("--seed", config=TRAIN, type=click.IntRange(min=0)),
            config_option(
                "--num-threads",
                config=TRAIN,
                callback=_thread_count,
                metavar="auto|N",
                help="Loader threads/workers per process, or auto: from the CPUs this process "
                "may use (all of them per GPU process; a quarter on the CPU, the rest to torch).",
            ),
            config_option(
                "--tune-au-thresholds/--no-tune-au-thresholds",
                config=TRAIN,
                help="Also report AU F1 at per-AU thresholds tuned on val.",
            ),
            click.option(
                "--tree",
                type=click.Path(exists=True, file_okay=False, path_type=Path),
                default=None,
                help="The raw Aff-Wild2 root (loader files only).",
            ),
            config_option(
                "--device",
                config=TRAIN,
                type=click.Choice(DEVICES),
                help="auto: CUDA where present (LOCAL_RANK's GPU under torchrun), else the CPU.",
            ),
            config_option(
                "--deterministic/--no-deterministic",
                config=TRAIN,
                help="CUDA: reproducible kernels, no TF32, no cuDNN autotuning (slower); makes "
                "--resume exact on a GPU.",
            ),
            config_option(
                "--compile/--no-compile",
                "torch_compile",
                config=TRAIN,
                help="torch.compile the model (default mode; the first steps compile).",
            ),
            config_option(
                "--hw-decoder-load",
                config=TRAIN,
                type=click.FloatRange(0, 1),
                help="dali-gpu: share of JPEGs for the GPU's hardware decoder (the rest: CUDA).",
            ),
            config_option(
                "--decoder-affine/--no-decoder-affine",
                config=TRAIN,
                help="dali-gpu: pin decoder threads to cores (turn off inside a restricted cpuset).",
            ),
            config_option(
                "--fancy-upsampling/--no-fancy-upsampling",
                config=TRAIN,
                help="dali-gpu: chroma upsampling as the CPU decoder does (closer GPU/CPU pixels).",
            ),
            config_option(
                "--stage-dir",
                config=TRAIN,
                type=click.Path(file_okay=False, path_type=Path),
                help="Node-local folder: copy the pack there first (once per node, verified, "
                "reused while unchanged; see `affectfast stage`) and train from the copy.",
            ),
            config_option(
                "--dont-use-mmap/--use-mmap",
                config=TRAIN,
                help="DALI reader: plain file reads instead of memory-mapped tars (faster on "
                "shared filesystems).",
            ),
            config_option(
                "--read-ahead/--no-read-ahead",
                config=TRAIN,
                help="DALI reader: read each tar ahead on first access.",
            ),
        ]
    ):
        command = option(command)
    return command


def _train_config(**options):
    """A TrainConfig from the options given; a bad combination is a usage error."""
    from affectfast.config import TrainConfig

    try:
        return TrainConfig(**given(options))
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


@main.command("train")
@click.argument("shards", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Run folder (config.json, metrics.jsonl, tb/, last.pt, best.pt), e.g. runs/NAME.",
)
@config_option("--tasks", config=TRAIN, help="Comma-separated subset of va,expr,au.")
@config_option(
    "--init",
    config=TRAIN,
    help="scratch | imagenet (torchvision's cache) | imagenet:PATH | ckpt:PATH (another run's "
    "trunk).",
)
@_training_options
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt.")
@click.option(
    "--stop-after",
    type=click.IntRange(min=1),
    default=None,
    help="Train at most this many epochs now, leaving last.pt for --resume (wall-time limits).",
)
def train_command(shards, out, resume, stop_after, **options):
    """Train ResNet-18 on packed SHARDS (uni- or multi-task); multi-GPU via torchrun.

    \b
    Single process:   affectfast train shards/demo --tasks expr --out runs/expr
    Multi-GPU:        torchrun --nproc-per-node 8 -m affectfast train shards/aff --out runs/mtl
    """
    from affectfast.dist import launched_rank
    from affectfast.train import run_summary, train

    config = _train_config(shards=shards, out=out, **options)
    train(config, resume=resume, stop_after=stop_after)
    if launched_rank() == 0:  # the run folder is the main rank's
        click.echo(run_summary(config))


@main.command("train-temporal")
@click.argument("features", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Run folder (config.json, metrics.jsonl, tb/, last.pt, best.pt), e.g. runs/NAME-gru.",
)
@config_option("--tasks", config=TEMPORAL, help="Comma-separated subset of va,expr,au.")
@config_option("--model", config=TEMPORAL, type=click.Choice(SEQUENCE_MODELS))
@config_option("--window", config=TEMPORAL, type=click.IntRange(min=2), help="Frames per window.")
@config_option(
    "--stride", config=TEMPORAL, type=click.IntRange(min=1), help="Frames between window starts."
)
@config_option("--epochs", config=TEMPORAL, type=click.IntRange(min=1))
@config_option(
    "--batch-size", config=TEMPORAL, type=click.IntRange(min=1), help="Windows per step."
)
@config_option(
    "--lr",
    config=TEMPORAL,
    type=click.FloatRange(min=0, min_open=True),
    help="AdamW peak learning rate (5% linear warm-up, then cosine to zero).",
)
@config_option("--weight-decay", config=TEMPORAL, type=click.FloatRange(min=0))
@config_option(
    "--hidden", config=TEMPORAL, type=click.IntRange(min=8), help="Encoder width (a multiple of 4)."
)
@config_option("--dropout", config=TEMPORAL, type=click.FloatRange(0, 1, max_open=True))
@config_option("--va-loss", config=TEMPORAL, type=click.Choice(VA_LOSSES))
@config_option(
    "--task-weights",
    config=TEMPORAL,
    callback=_task_weights,
    help="Loss weight per task, e.g. va=1,expr=0.5 (unlisted: au 6, the others 1; see docs/temporal.md).",
)
@config_option("--seed", config=TEMPORAL, type=click.IntRange(min=0))
@config_option(
    "--tune-au-thresholds/--no-tune-au-thresholds",
    config=TEMPORAL,
    help="Also report AU F1 at per-AU thresholds tuned on val.",
)
@config_option(
    "--device", config=TEMPORAL, type=click.Choice(DEVICES), help="auto: CUDA where present."
)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt.")
@click.option(
    "--stop-after",
    type=click.IntRange(min=1),
    default=None,
    help="Train at most this many epochs now, leaving last.pt for --resume.",
)
def train_temporal_command(features, out, resume, stop_after, **options):
    """Train a sequence head (GRU, TCN or Transformer) over the feature folder FEATURES.

    Windows of consecutive frames (overlapping, never across videos) of the features `affectfast
    extract` wrote; frames without an image read the nearest frame's features and a missing flag.
    The same losses, metrics and run folder as `train`.

    \b
    affectfast train-temporal features/mtl --tasks va,expr,au --model gru --out runs/mtl-gru
    """
    from affectfast.config import TemporalConfig
    from affectfast.train import run_summary
    from affectfast.train_temporal import train_temporal

    try:
        config = TemporalConfig(features=features, out=out, **given(options))
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    train_temporal(config, resume=resume, stop_after=stop_after)
    click.echo(run_summary(config))


def _eval_options(splits: tuple[str, ...]):
    """The arguments and options evaluate and predict share; ``splits``: those --split offers."""
    return functools.partial(_add_eval_options, splits=splits)


def _add_eval_options(command, splits: tuple[str, ...]):
    for option in reversed(
        [
            click.argument(
                "checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path)
            ),
            click.argument("shards", type=click.Path(exists=True, file_okay=False, path_type=Path)),
            config_option("--split", config=EVAL, type=click.Choice(splits)),
            config_option(
                "--loader",
                config=EVAL,
                type=click.Choice(SHARD_LOADER_KINDS),
                help="Without CUDA dali-gpu falls back to dali-cpu.",
            ),
            config_option("--batch-size", config=EVAL, type=click.IntRange(min=1)),
            click.option(
                "--features",
                type=click.Path(file_okay=False, path_type=Path),
                default=None,
                help="For a temporal CHECKPOINT (train-temporal): the feature folder extract "
                "wrote from SHARDS. Without it the features of SPLIT are extracted on the fly "
                "with the frame checkpoint the temporal one names.",
            ),
            config_option(
                "--num-threads",
                config=EVAL,
                callback=_thread_count,
                metavar="auto|N",
                help="Loader threads/workers, or auto (from the CPUs this process may use).",
            ),
        ]
    ):
        command = option(command)
    return command


def _eval_config(**options):
    from affectfast.config import EvalConfig

    return EvalConfig(**given(options))


@main.command("evaluate")
@_eval_options(LABELLED_SPLITS)
@click.option(
    "--tune-au-thresholds",
    is_flag=True,
    default=None,
    help="Also tune a threshold per AU on SPLIT, report AU F1 at them and save them beside "
    "CHECKPOINT (best.pt -> best.au_thresholds.json): predict writes AU at them.",
)
@click.option(
    "--tune-smoothing",
    is_flag=True,
    default=None,
    help="Also choose a temporal smoothing window per task on SPLIT (every frame completed, "
    "then a moving average per video), print the raw and smoothed scores and save them beside "
    "CHECKPOINT (best.pt -> best.smoothing.json: what predict --smooth applies).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the metrics as one JSON object instead of tables.",
)
def evaluate_command(as_json, **options):
    """Print the ABAW metrics of CHECKPOINT on SHARDS: CCC, F1 per expression and per AU, P_MTL.

    The test split has no labels: evaluate train or val (predict writes the test files).
    """
    import json

    from affectfast.metrics import format_tables
    from affectfast.predict import evaluate, format_smoothing

    metrics = evaluate(_eval_config(**options))
    if metrics is None:  # another rank of a torchrun launch reports
        return
    if as_json:
        click.echo(json.dumps(metrics))
        return
    click.echo(format_tables(metrics))
    if "au_thresholds_path" in metrics:
        click.echo(f"\nsaved {metrics['au_thresholds_path']} (predict writes AU at them)")
    elif options.get("tune_au_thresholds"):
        click.echo("\nno AU thresholds tuned or saved: this split has no valid AU label")
    if "smoothing" in metrics:
        click.echo("\n" + format_smoothing(metrics["smoothing"]))


@main.command("predict")
@_eval_options(SPLITS)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder for <Challenge>/<video>.txt prediction files (its parents are created): "
    "missing, empty or an earlier prediction folder holding only what predict wrote, which is "
    "replaced once the new files are written and checked. A link to a folder: its target.",
)
@click.option(
    "--frame-counts",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="CSV with the header video,frames: each video's frame count, faces or not. Overrides "
    "the manifest's counts (from the annotations); required for every video without one (the "
    "test set) when given. Without it, such videos end at their last image.",
)
@click.option(
    "--smooth",
    is_flag=True,
    default=None,
    help="Smooth along time with the windows tuned for CHECKPOINT (best.pt -> "
    "best.smoothing.json beside it; evaluate --tune-smoothing writes it).",
)
def predict_command(out, **options):
    """Write CHECKPOINT's predictions on SHARDS as a complete ABAW submission.

    One file per video and task (on the test split: per video its task's test list names), with
    the task's header and a line for every frame 1..N of the video, faces or not: frames without
    an image are interpolated from their neighbours, then smoothed with --smooth. A video's
    frame count N is authoritative: images after frame N are left out, and the summary counts
    them. AU is written at the thresholds evaluate --tune-au-thresholds saved for CHECKPOINT
    (else the checkpoint's, else 0.5; the summary names which). Every file is checked against
    the challenge format before --out is replaced.
    """
    from affectfast.predict import predict

    click.echo(predict(_eval_config(**options), out).summary())


# --- extract -------------------------------------------------------------------------------------

EXTRACT = "affectfast.config:ExtractConfig"


def _splits(ctx, param, value):
    """Parse --split: comma-separated split names (None when not given)."""
    if value is None:
        return None
    names = tuple(s.strip() for s in value.split(",") if s.strip())
    unknown = [s for s in names if s not in SPLITS]
    if unknown or not names or len(set(names)) != len(names):
        raise click.BadParameter(f"expected distinct names of {','.join(SPLITS)}, got {value!r}")
    return names


@main.command("extract")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("shards", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="The feature folder to write: missing or empty (its parents are created).",
)
@config_option(
    "--split",
    "splits",
    config=EXTRACT,
    callback=_splits,
    metavar="SPLITS",
    help="Comma-separated splits, e.g. train,val,test  [default: every split the pack has]",
)
@config_option(
    "--loader",
    config=EXTRACT,
    type=click.Choice(SHARD_LOADER_KINDS),
    help="Without CUDA dali-gpu falls back to dali-cpu.",
)
@config_option("--batch-size", config=EXTRACT, type=click.IntRange(min=1))
@config_option(
    "--num-threads",
    config=EXTRACT,
    callback=_thread_count,
    metavar="auto|N",
    help="Loader threads/workers, or auto (from the CPUs this process may use).",
)
def extract_command(**options):
    """Write every frame's pooled trunk features of CHECKPOINT (a frame checkpoint: train's
    best.pt/last.pt) on SHARDS into a feature folder for train-temporal (docs/temporal.md).

    Per split: 512-d float16 features in video/frame order, the frame numbers, a table of
    videos, and the labels and masks the split has; features.json names the checkpoint and pack
    by sha256. Written beside --out and renamed into place when complete. Several processes:
    launch it with torchrun.
    """
    from affectfast.config import ExtractConfig
    from affectfast.dist import launched_rank
    from affectfast.extract import extract

    result = extract(ExtractConfig(**given(options)))
    if launched_rank() == 0:
        click.echo(result.summary())


# --- bench loaders ---------------------------------------------------------------------------------


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
    default=None,
    help="Comma-separated kinds: dali-gpu (needs CUDA), dali-cpu, wds, files "
    "[default: dali-cpu,wds,files].",
)
@config_option("--batch-size", config=BENCH, type=click.IntRange(min=1))
@config_option("--image-size", config=BENCH, type=click.IntRange(min=8))
@config_option(
    "--seconds",
    config=BENCH,
    type=click.FloatRange(min=0.1),
    help="Timed seconds per loader, after the warm-up batches.",
)
@click.option(
    "--interpolation",
    type=click.Choice(INTERPOLATIONS),
    default=None,
    help="Resampling of the rotation (nearest, torchvision's default, unless given).",
)
@click.option(
    "--no-augment", is_flag=True, help="Time with augmentation off (resize and normalize only)."
)
@config_option(
    "--num-threads",
    config=BENCH,
    type=click.IntRange(min=1),
    help="DALI threads / DataLoader workers.",
)
@click.option("--threads", "threads_alias", type=click.IntRange(min=1), hidden=True)
@config_option(
    "--hw-decoder-load",
    config=BENCH,
    type=click.FloatRange(0, 1),
    help="dali-gpu: share of JPEGs for the GPU's hardware decoder (time 0, 0.65 and 1 to choose "
    "train's --hw-decoder-load; `affectfast doctor` sweeps it too).",
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
def bench_loaders_command(
    shards, tree, loaders, interpolation, no_augment, csv_path, plot, threads_alias, **options
):
    """Images/s of each loader on SHARDS' train split, with the decode-only ceiling of the same run."""
    from affectfast.bench import BenchConfig, bench_loaders, format_table, write_csv, write_plot
    from affectfast.config import AugmentSpec

    if options["num_threads"] is None:  # --threads: the earlier name of --num-threads
        options["num_threads"] = threads_alias
    options = given(options)
    if loaders is not None:
        options["loaders"] = tuple(k.strip() for k in loaders.split(",") if k.strip())
    if no_augment:
        options["augment"] = None
    elif interpolation is not None:
        options["augment"] = AugmentSpec(interpolation=interpolation)
    if "dali-gpu" in options.get("loaders", ()):
        options["device"] = "cuda"
    try:
        config = BenchConfig(shards=shards, tree=tree, **options)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    for path in (p for p in (csv_path, plot) if p is not None):  # before minutes of timing
        if not path.parent.is_dir():
            raise DataError(path, f"no folder {path.parent} to write it in; create it first")
        check_writable_folder(path.parent)
    results = bench_loaders(config)
    click.echo(format_table(results))
    if csv_path:
        write_csv(results, csv_path)
    if plot:
        title = f"batch {config.batch_size}, {config.image_size} px, {config.num_threads} threads"
        write_plot(results, plot, title)


# --- doctor ----------------------------------------------------------------------------------------


@main.command("doctor")
@click.argument(
    "shards", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="REPORT_DIR: report.md, report.json, the profiler trace, and work/ (synthesized packs); "
    "a new or empty folder, or an earlier doctor report.",
)
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="auto",
    show_default=True,
    help="auto: cuda where torch sees a GPU, else cpu (the GPU-only checks then say 'not run').",
)
@click.option("--quick", is_flag=True, help="Shorter: fewer timed steps, no torch.compile.")
def doctor_command(shards, out, device, quick):
    """Prove this node's GPU path: run the library's own checks, write REPORT_DIR/report.md + .json.

    Without SHARDS a small tree is synthesized and packed into REPORT_DIR/work first. Each check is
    passed, failed or not run (with the reason); exit 1 when a check failed. About 10 minutes on
    one GPU.
    """
    from affectfast.doctor import FAILED, DoctorConfig, format_summary, run_doctor

    checks = run_doctor(DoctorConfig(out=out, shards=shards, device=device, quick=quick))
    click.echo(format_summary(checks, out))
    if any(c.status == FAILED for c in checks):
        sys.exit(1)


# --- study -----------------------------------------------------------------------------------------


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
@click.option(
    "--temporal",
    default="",
    metavar="MODELS",
    help="Comma-separated sequence models (gru, tcn, transformer): after the frame runs, "
    "extract the multi-task model's features and train uni- and multi-task heads of each on "
    "them (temporal rows of the table). Default: none.",
)
@click.option(
    "--temporal-epochs",
    type=click.IntRange(min=1),
    default=None,
    help="Epochs of each temporal head (default: train-temporal's).",
)
@_training_options
def study_command(shards, out, inits, temporal, temporal_epochs, **options):
    """Run the uni- vs multi-task study on SHARDS and print the comparison table.

    Every input (the pack, each initialization's weights, run folders already there) is checked
    before the first run trains. Restartable: finished runs are skipped and an interrupted one
    resumes from its last.pt. Ends with where every file went.

    \b
    On a GPU node:  affectfast study shards/affwild2 --out runs/study --inits scratch,imagenet,uni-expr
    With temporal rows:  affectfast study shards/affwild2 --out runs/study --temporal gru
    """
    from affectfast.study import TABLE_NOTES, StudyConfig, format_summary, format_table, run_study

    base = _train_config(shards=shards, out=out, **options)
    try:
        config = StudyConfig(
            out=out,
            base=base,
            inits=tuple(t.strip() for t in inits.split(",") if t.strip()),
            temporal=tuple(m.strip() for m in temporal.split(",") if m.strip()),
            temporal_epochs=temporal_epochs,
        )
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    rows = run_study(config)
    click.echo(f"{format_table(rows)}\n\n{TABLE_NOTES}\n\n{format_summary(config)}")
