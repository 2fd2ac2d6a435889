"""The seed study as one command: uni-task VA, EXPR, AU against one multi-task model, per initialization.

A study is a folder of runs, ``OUT/<init>/<model>/`` (each an ordinary ``affectfast train`` run), and
three summaries written after every run: ``results.md``, ``results.csv`` and ``curves.png`` (each
run's val metrics per epoch). A finished run (``epochs`` records in its metrics.jsonl) is skipped and
an interrupted one resumed, so a study on a GPU node can simply be started again after a time limit.
Before the first run trains, every input every run will read is checked (:func:`check_inputs`):
a missing ImageNet file stops the study at once, not after hours of the runs before it.

Temporal rows (``temporal``: sequence models, e.g. ``("gru",)``): after the frame runs of a base
initialization, its multi-task model's features are extracted once (``OUT/<init>/features``, again
only when that best.pt changes) and each model trains uni-va, uni-expr, uni-au and multi heads on
them (``OUT/<init>/<model>-<run>/``, ordinary ``train-temporal`` runs): the seed's question, does
multi-task help, asked again at the temporal stage on the same features.

Initializations: the base ones ``TrainConfig.init`` accepts (``scratch``, ``imagenet``,
``imagenet:PATH``, ``ckpt:PATH``) give four rows each (uni-va, uni-expr, uni-au, multi); ``uni-TASK``
gives one row: the multi-task model fine-tuned from the trunk of the uni-task TASK run of the first
base initialization (uni-task pre-training, then multi-task fine-tuning).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

from affectfast.config import EvalConfig, ExtractConfig, TemporalConfig, TrainConfig, parse_init
from affectfast.console import say
from affectfast.constants import SEQUENCE_MODELS, SHARD_LOADER_KINDS
from affectfast.errors import DataError
from affectfast.extract import extract_features
from affectfast.features import FEATURES_MANIFEST
from affectfast.features import load_manifest as load_features_manifest
from affectfast.model import build_model
from affectfast.rundir import RunDir, read_metrics
from affectfast.safe_files import sha256_file
from affectfast.shards import MANIFEST, load_manifest, split_shards
from affectfast.tasks import TASKS, parse_tasks
from affectfast.train import build_task_loss, config_changes, resolve_device, train
from affectfast.train_temporal import train_temporal

RESULT_COLUMNS = (
    "run",
    "init",
    "best_epoch",
    "epochs",
    "ccc_valence",
    "ccc_arousal",
    "f1_expr",
    "f1_au",
    "p_mtl",
    "p_mtl_last",
    "images_per_s",
    "train_s",
)
METRIC_COLUMNS = ("ccc_valence", "ccc_arousal", "f1_expr", "f1_au", "p_mtl")
HEADINGS = {
    "best_epoch": "best epoch",
    "ccc_valence": "CCC-V",
    "ccc_arousal": "CCC-A",
    "f1_expr": "F1-EXPR",
    "f1_au": "F1-AU",
    "p_mtl": "P_MTL",
    "p_mtl_last": "P_MTL last",
    "images_per_s": "images/s",
    "train_s": "train time (s)",
}
# Printed under the table and written under it in results.md: how to read it fairly.
TABLE_NOTES = (
    "Val metrics at each run's best epoch. The val split both picks that epoch (the highest val "
    "P_MTL) and reports it, so every row is optimistic by the same rule; P_MTL last is the last "
    "epoch's val P_MTL, which nothing picked. P_MTL sums the metrics of the tasks a run trains: "
    "a uni-task run picks its epoch by its one task's metric (CCC mean, F1-EXPR or F1-AU), the "
    "multi-task run by the sum of all three, so its best epoch need not be best for each task. "
    "images/s: the median training throughput over epochs; train time: the training epochs' "
    "wall time summed, validation and checkpointing excluded. Temporal rows (gru uni-va, ...): "
    "heads trained on the features of the same initialization's multi-task frame model; their "
    "images/s counts the frames stepped through (a frame in two overlapping windows twice)."
)
ABSENT = "absent"  # in results.md/.csv: a trained task without a single val label
CURVE_METRICS = ("ccc_mean", "f1_expr", "f1_au", "p_mtl")
SUMMARIES = {
    "results.md": "the table and how to read it",
    "results.csv": "the same rows as CSV",
    "curves.png": "val metrics per epoch, a line per run",
}


@dataclass(frozen=True)
class StudyRun:
    """One cell of the study: a model (task set) trained from one initialization."""

    name: str  # "uni-va", "uni-expr", "uni-au" or "multi"; "gru multi" for a temporal head
    init_label: str  # the --inits token, e.g. "scratch" or "uni-expr"
    tasks: tuple[str, ...]
    init: str  # what TrainConfig.init gets
    out: Path
    model: str | None = None  # a temporal head's sequence model; None for a frame run

    @property
    def features(self) -> Path:
        """The feature folder a temporal run trains on: beside its frame runs."""
        return self.out.parent / "features"


@dataclass(frozen=True)
class StudyConfig:
    """The study matrix plus the training settings every run shares (``base``; its out/tasks/init are set per run)."""

    out: Path
    base: TrainConfig
    inits: tuple[str, ...] = ("scratch",)
    temporal: tuple[str, ...] = ()  # sequence models with rows on the multi-task features
    temporal_epochs: int | None = None  # None: TemporalConfig's default

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))
        unknown = [m for m in self.temporal if m not in SEQUENCE_MODELS]
        if unknown:
            raise ValueError(f"temporal models must be among {SEQUENCE_MODELS}; got {unknown[0]}")
        if self.temporal_epochs is not None and self.temporal_epochs < 1:
            raise ValueError("temporal_epochs must be >= 1")
        if not self.inits:
            raise ValueError("inits must name at least one initialization")
        for token in self.inits:
            if token.startswith("uni-"):
                parse_tasks(token[len("uni-") :])
            else:
                parse_init(token)
        if not any(not t.startswith("uni-") for t in self.inits):
            raise ValueError(
                "uni-TASK fine-tuning needs a base initialization (scratch, imagenet, ...) first"
            )


def slug(init: str) -> str:
    """A folder name for an initialization token ("imagenet:/x/r18.pth" -> "imagenet-r18.pth")."""
    kind, _, path = init.partition(":")
    return kind if not path else f"{kind}-{Path(path).name}"


def plan_runs(config: StudyConfig) -> list[StudyRun]:
    """The runs of the study in the order they must be trained (pre-training before fine-tuning)."""
    runs: list[StudyRun] = []
    base_inits = [t for t in config.inits if not t.startswith("uni-")]
    for init in base_inits:
        folder = config.out / slug(init)
        runs += [
            StudyRun(f"uni-{task}", init, (task,), init, folder / f"uni-{task}") for task in TASKS
        ]
        runs.append(StudyRun("multi", init, TASKS, init, folder / "multi"))
        for model in config.temporal:
            runs += [
                StudyRun(
                    f"{model} uni-{task}",
                    init,
                    (task,),
                    init,
                    folder / f"{model}-uni-{task}",
                    model,
                )
                for task in TASKS
            ]
            runs.append(
                StudyRun(f"{model} multi", init, TASKS, init, folder / f"{model}-multi", model)
            )
    for token in config.inits:
        if token.startswith("uni-"):
            pretrained = RunDir(config.out / slug(base_inits[0]) / token).best
            runs.append(
                StudyRun(
                    "multi",
                    token,
                    TASKS,
                    f"ckpt:{pretrained}",
                    config.out / f"from-{token}" / "multi",
                )
            )
    return runs


def read_records(run_dir: Path) -> list[dict]:
    """The per-epoch records of a run (empty if it has not started)."""
    return read_metrics(RunDir(run_dir).metrics)


def run_study(config: StudyConfig) -> list[dict]:
    """Train every run of the study that is not finished yet; return the result rows.

    Every input is checked first (:func:`check_inputs`), so a study fails in seconds or not
    for want of a file."""
    runs = plan_runs(config)
    base, _ = resolve_device(config.base)  # what each run's config.json records
    check_inputs(base, runs)
    config.out.mkdir(parents=True, exist_ok=True)
    for index, run in enumerate(runs, 1):
        folder = RunDir(run.out)
        label = f"study [{index}/{len(runs)}] {run.init_label}/{run.name}"
        if run.model is not None:
            temporal = temporal_config(config, base, run)
            if len(read_records(run.out)) >= temporal.epochs and folder.config.is_file():
                say(f"{label}: finished, skipped")
                continue
            ensure_features(base, run)
            say(f"{label}: training a {run.model} head for {run.tasks}")
            train_temporal(temporal, resume=folder.config.exists())
        else:
            if len(read_records(run.out)) >= base.epochs and folder.config.is_file():
                say(f"{label}: finished, skipped")
                continue
            say(f"{label}: training {run.tasks}")
            train(run_config(base, run), resume=folder.config.exists())
        write_summaries(config.out, runs)  # after every run, so a long study shows progress
    return write_summaries(config.out, runs)


def temporal_config(config: StudyConfig, base: TrainConfig, run: StudyRun) -> TemporalConfig:
    """A temporal row's settings: TemporalConfig's defaults, with the study's seed, device, VA
    loss and task weights, and ``temporal_epochs`` where given."""
    weights = tuple((t, w) for t, w in base.task_weights if t in run.tasks)
    epochs = {} if config.temporal_epochs is None else {"epochs": config.temporal_epochs}
    return TemporalConfig(
        features=run.features,
        out=run.out,
        tasks=run.tasks,
        model=run.model,
        seed=base.seed,
        device=base.device,
        va_loss=base.va_loss,
        task_weights=weights,
        **epochs,
    )


def ensure_features(base: TrainConfig, run: StudyRun) -> Path:
    """The features of the multi-task frame model beside ``run`` (its best.pt, else last.pt),
    extracted unless a finished folder from those very bytes is there already."""
    frames = RunDir(run.out.parent / "multi")
    checkpoint = frames.best if frames.best.is_file() else frames.last
    if (run.features / FEATURES_MANIFEST).is_file():
        made_from = load_features_manifest(run.features)["checkpoint"]["sha256"]
        if made_from == sha256_file(checkpoint, what="checkpoint"):
            return run.features
        shutil.rmtree(run.features)  # the study's own folder, from an earlier best.pt
    say(f"study: extracting the features of {checkpoint} into {run.features}")
    loader = base.loader if base.loader in SHARD_LOADER_KINDS else EvalConfig.loader
    return extract_features(
        ExtractConfig(
            checkpoint,
            base.shards,
            run.features,
            splits=("train", "val"),
            loader=loader,
            batch_size=base.batch_size,
            num_threads=base.num_threads,
        )
    )


def run_config(base: TrainConfig, run: StudyRun) -> TrainConfig:
    """The training settings of one run: the study's, with the run's folder, tasks and init."""
    weights = tuple((t, w) for t, w in base.task_weights if t in run.tasks)
    return dataclasses.replace(
        base, out=run.out, tasks=run.tasks, init=run.init, task_weights=weights
    )


def check_inputs(base: TrainConfig, runs: list[StudyRun]) -> None:
    """Before any run trains, what every run will read: the pack (manifest, the train and val
    shards, the counts each run's loss is weighted by), the weights each base initialization
    names (ImageNet's, a ckpt:), and the settings of each run folder already there. A DataError
    names the first problem; nothing is trained or written."""
    manifest = load_manifest(base.shards)
    for split in ("train", "val"):
        split_shards(base.shards, split)
    for run in runs:
        if run.model is not None:
            continue  # a temporal run's inputs are made by the study itself
        config = run_config(base, run)
        build_task_loss(config, manifest, base.shards / MANIFEST)
        if RunDir(run.out).config.is_file():
            _check_same_settings(RunDir(run.out), config)
    for init in dict.fromkeys(run.init for run in runs if not run.init_label.startswith("uni-")):
        build_model(("va",), init)  # reads the weights and checks they are a ResNet-18's


def _check_same_settings(folder: RunDir, config: TrainConfig) -> None:
    """A run already in the study's folder is skipped or resumed only if it was trained as this
    study asks: a rerun into the same --out with other settings would otherwise print the old
    results as the new ones (or mix them)."""
    try:
        saved = json.loads(folder.config.read_text())
    except (OSError, ValueError) as error:
        raise DataError(folder.config, f"unreadable run config ({error})") from None
    changed = config_changes(saved, config)
    if changed:
        raise DataError(
            folder.config,
            f"this run was trained with other settings than this study asks "
            f"({', '.join(changed)}); choose another --out or ask for the same settings",
        )


def result_row(run: StudyRun, records: list[dict]) -> dict:
    """One table row: val metrics of the best epoch (highest val P_MTL) and its number, the
    last epoch's P_MTL, median images/s, the training epochs' total seconds."""
    best = max(records, key=lambda r: -math.inf if r.get("p_mtl") is None else r["p_mtl"])
    row = {"run": run.name, "init": run.init_label, "best_epoch": best["epoch"]}
    row["epochs"] = len(records)
    # A task the run trained but val had no label for is "absent"; one it did not train is None.
    row.update(
        {k: ABSENT if k in best and best[k] is None else best.get(k) for k in METRIC_COLUMNS}
    )
    row["p_mtl_last"] = records[-1].get("p_mtl")
    row["images_per_s"] = statistics.median(r["images_per_s"] for r in records)
    row["train_s"] = sum(r["epoch_seconds"] for r in records)
    return row


def write_summaries(out: Path, runs: list[StudyRun]) -> list[dict]:
    """Write results.md, results.csv and curves.png for the runs that have records; return the rows."""
    finished = [(run, read_records(run.out)) for run in runs]
    finished = [(run, records) for run, records in finished if records]
    rows = [result_row(run, records) for run, records in finished]
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.md").write_text(format_table(rows) + "\n\n" + TABLE_NOTES + "\n")
    if finished:
        plot_curves(finished, out / "curves.png")
    return rows


def format_table(rows: list[dict]) -> str:
    """The comparison table as Markdown: a dash where a run did not train that task, "absent"
    where it did but the val split has no label for it; the best epoch as "best/epochs"."""
    columns = [c for c in RESULT_COLUMNS if c != "epochs"]
    header = [c if c not in HEADINGS else HEADINGS[c] for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [
            f"{row['best_epoch']}/{row['epochs']}"
            if c == "best_epoch"
            else _format_cell(row.get(c), c in ("images_per_s", "train_s"))
            for c in columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_summary(config: StudyConfig) -> str:
    """One screen at the end of a study: where its files went, and each run's folder and epochs."""
    runs = plan_runs(config)
    width = max(len(str(run.out.relative_to(config.out))) for run in runs)
    lines = [f"study folder {config.out}:"]
    lines += [f"  {name:<{width + 2}}{what}" for name, what in SUMMARIES.items()]
    lines.append("  a run folder each (config.json, metrics.jsonl, last.pt, best.pt, tb/):")
    for run in runs:
        done = len(read_records(run.out))
        epochs = config.base.epochs
        if run.model is not None:
            epochs = temporal_config(config, config.base, run).epochs
        lines.append(f"    {str(run.out.relative_to(config.out)):<{width}}  {done}/{epochs} epochs")
    features = sorted({run.features for run in runs if run.model is not None})
    lines += [f"  {f.relative_to(config.out)}: the multi-task model's features" for f in features]
    return "\n".join(lines)


def _format_cell(value, whole: bool) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if whole else f"{value:.3f}"
    return str(value)


def plot_curves(finished: list[tuple[StudyRun, list[dict]]], path: Path) -> None:
    """One panel per val metric, one line per run, over epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(CURVE_METRICS), figsize=(4 * len(CURVE_METRICS), 3.2), squeeze=False
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes[0], CURVE_METRICS):
        for index, (run, records) in enumerate(finished):  # one colour per run in every panel
            points = [(r["epoch"], r[metric]) for r in records if r.get(metric) is not None]
            if points:
                ax.plot(
                    *zip(*points),
                    marker="o",
                    color=colors[index % len(colors)],
                    label=f"{run.init_label}/{run.name}",
                )
        ax.set_title(f"val {metric}")
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
