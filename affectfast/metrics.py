"""The ABAW metrics over a whole split, and the per-class tables (docs/design.md §4).

- VA: Lin's concordance correlation coefficient (CCC) for valence and for arousal, and their mean.
- EXPR: macro F1 over the 8 classes (over those present in labels or predictions, as ABAW's code does).
- AU: mean over the 12 AUs of each AU's binary F1 (0 for an AU with no positive label or prediction, as ABAW's code), at threshold 0.5 (and, on request, at per-AU
  thresholds tuned on the same split, reported under separate keys since they are optimistic).
- P_MTL: the sum of ``ccc_mean``, ``f1_expr`` and ``f1_au`` over the tasks trained.
F1 comes from scikit-learn. Each task is scored on the frames whose label for it is valid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import f1_score

from affectfast.tasks import AU_NAMES, EXPR_NAMES, NUM_AU, NUM_EXPR, TASKS, VA_NAMES

# The headline metrics of each task (None when a split has no label for it).
TASK_METRICS = {
    "va": ("ccc_valence", "ccc_arousal", "ccc_mean"),
    "expr": ("f1_expr",),
    "au": ("f1_au",),
}
AU_THRESHOLD_GRID = np.round(np.arange(0.05, 0.96, 0.05), 2)  # candidates for --tune-au-thresholds


def ccc(x: np.ndarray, y: np.ndarray) -> float:
    """Lin's CCC of two 1-D arrays (population moments); 0.0 for fewer than 2 values or zero spread."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 2:
        return 0.0
    mx, my = x.mean(), y.mean()
    denominator = x.var() + y.var() + (mx - my) ** 2
    if denominator == 0:
        return 0.0
    return float(2 * ((x - mx) * (y - my)).mean() / denominator)


def tune_au_thresholds(probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-AU threshold from :data:`AU_THRESHOLD_GRID` that maximizes that AU's F1 on (probs, targets)."""
    best = np.full(NUM_AU, 0.5)
    for j in range(NUM_AU):
        scores = [
            f1_score(targets[:, j], probs[:, j] > t, zero_division=0) for t in AU_THRESHOLD_GRID
        ]
        best[j] = AU_THRESHOLD_GRID[int(np.argmax(scores))]
    return best


@dataclass
class Predictions:
    """Per-frame model outputs and labels of one split, in frame-key order once :meth:`sorted`.

    ``outputs[task]``: VA N×2 values, EXPR N×8 logits, AU N×12 probabilities (after sigmoid).
    ``labels[task]`` and ``masks[task]``: as in :class:`affectfast.batch.Batch`, as numpy.
    """

    keys: list[str] = field(default_factory=list)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    masks: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def concat(cls, parts: list[Predictions]) -> Predictions:
        """Join parts (batches, or ranks' shares) and drop repeated keys (a padded last batch)."""
        parts = [p for p in parts if p.keys]
        if not parts:
            return cls()
        keys = [k for p in parts for k in p.keys]
        _, first = np.unique(
            np.asarray(keys), return_index=True
        )  # also sorts by key = video/frame order

        def join(name: str) -> dict:
            return {
                t: np.concatenate([getattr(p, name)[t] for p in parts])[first]
                for t in getattr(parts[0], name)
            }

        return cls([keys[i] for i in first], join("outputs"), join("labels"), join("masks"))

    def __len__(self) -> int:
        return len(self.keys)


def compute_metrics(
    preds: Predictions, tasks: tuple[str, ...], au_thresholds: np.ndarray | None = None
) -> dict:
    """The ABAW metrics for ``tasks`` as a flat dict of floats, plus per-class F1 lists.

    A trained task without a single valid label in ``preds`` is absent: its metrics are None and
    P_MTL sums the others (None when no task has a label).

    Keys: ``ccc_valence``, ``ccc_arousal``, ``ccc_mean``, ``f1_expr``, ``f1_expr_per_class``,
    ``f1_au``, ``f1_au_per_class``, ``p_mtl``, ``frames_<task>``; with ``au_thresholds`` also
    ``f1_au_tuned``, ``f1_au_tuned_per_class`` and ``au_thresholds``.
    """
    metrics: dict = {}
    p_mtl = None
    for task in TASKS:
        if task not in tasks:
            continue
        valid = preds.masks[task].astype(bool)
        out, label = preds.outputs[task][valid], preds.labels[task][valid]
        metrics[f"frames_{task}"] = int(valid.sum())
        if not valid.any():  # the split has no label for it: absent (None), not a score of 0
            metrics.update(dict.fromkeys(TASK_METRICS[task]))
            continue
        p_mtl = 0.0 if p_mtl is None else p_mtl
        if task == "va":
            for j, name in enumerate(VA_NAMES):
                metrics[f"ccc_{name}"] = ccc(out[:, j], label[:, j])
            metrics["ccc_mean"] = (metrics["ccc_valence"] + metrics["ccc_arousal"]) / 2
            p_mtl += metrics["ccc_mean"]
        elif task == "expr":
            metrics.update(_expr_f1(out.argmax(1), label.astype(int)))
            p_mtl += metrics["f1_expr"]
        else:
            metrics.update(_au_f1(out, label, np.full(NUM_AU, 0.5), ""))
            p_mtl += metrics["f1_au"]
            if au_thresholds is not None:
                metrics.update(_au_f1(out, label, np.asarray(au_thresholds), "_tuned"))
                metrics["au_thresholds"] = [float(t) for t in au_thresholds]
    metrics["p_mtl"] = p_mtl
    return metrics


def _expr_f1(predicted: np.ndarray, targets: np.ndarray) -> dict:
    """Macro F1 over the classes present in the labels or the predictions, as the ABAW evaluation
    code computes it (scikit-learn's default); a class absent from both has no F1 (None in the table).
    On Aff-Wild2's val split all 8 classes are present, so this is the macro F1 over the 8."""
    present = np.union1d(targets, predicted).astype(int)
    if present.size == 0:
        return {"f1_expr_per_class": [None] * NUM_EXPR, "f1_expr": 0.0}
    scores = f1_score(targets, predicted, labels=present, average=None, zero_division=0)
    per_class: list[float | None] = [None] * NUM_EXPR
    for c, v in zip(present, scores):
        per_class[c] = float(v)
    return {"f1_expr_per_class": per_class, "f1_expr": float(scores.mean())}


def _au_f1(probs: np.ndarray, targets: np.ndarray, thresholds: np.ndarray, suffix: str) -> dict:
    """Each AU's binary F1 at its threshold, and their mean."""
    targets = targets.astype(int)
    if len(targets) == 0:
        per_au = np.zeros(NUM_AU)
    else:
        per_au = f1_score(targets, (probs > thresholds).astype(int), average=None, zero_division=0)
    return {
        f"f1_au{suffix}_per_class": [float(v) for v in per_au],
        f"f1_au{suffix}": float(per_au.mean()),
    }


def format_tables(metrics: dict) -> str:
    """Human-readable tables: the headline metrics, F1 per expression (Table 1), F1 per AU (Table 2)."""
    lines = []
    headline = [
        k
        for k in (
            "ccc_valence",
            "ccc_arousal",
            "ccc_mean",
            "f1_expr",
            "f1_au",
            "f1_au_tuned",
            "p_mtl",
        )
        if k in metrics
    ]
    lines.append(f"{'metric':<14}{'value':>8}")
    lines += [
        f"{k:<14}" + (f"{metrics[k]:>8.4f}" if metrics[k] is not None else f"{'absent':>8}")
        for k in headline
    ]
    if "f1_expr_per_class" in metrics:
        lines += [
            "",
            f"F1 per expression ({metrics['frames_expr']} frames)",
            f"{'class':<14}{'F1':>8}",
        ]
        lines += [
            f"{n:<14}" + (f"{v:>8.4f}" if v is not None else f"{'-':>8}")
            for n, v in zip(EXPR_NAMES, metrics["f1_expr_per_class"])
        ]
    if "f1_au_per_class" in metrics:
        tuned = "f1_au_tuned_per_class" in metrics
        lines += [
            "",
            f"F1 per action unit ({metrics['frames_au']} frames)",
            f"{'AU':<14}{'F1@0.5':>8}" + (f"{'F1@tuned':>10}{'thresh':>8}" if tuned else ""),
        ]
        for j, name in enumerate(AU_NAMES):
            row = f"{name:<14}{metrics['f1_au_per_class'][j]:>8.4f}"
            if tuned:
                row += f"{metrics['f1_au_tuned_per_class'][j]:>10.4f}{metrics['au_thresholds'][j]:>8.2f}"
            lines.append(row)
    return "\n".join(lines)


def headline(metrics: dict) -> dict[str, float]:
    """Only the scalar metrics (scores and frame counts) that go into metrics.jsonl and TensorBoard;
    an absent task's scores stay in as None (null in metrics.jsonl)."""
    return {k: v for k, v in metrics.items() if v is None or isinstance(v, (int, float))}
