"""Masked per-task losses and their weighted sum (docs/design.md §4).

Each task's loss covers only the frames whose label for that task is valid, and is normalized by
that count. A batch with no valid label for a task contributes exactly 0 for it, never NaN, and
without a host sync (no ``.item()``): masking is done with ``torch.where`` on finite values.

- VA: ``1 - CCC`` averaged over valence and arousal (or MSE, as the seed did).
- EXPR: cross-entropy with per-class weights from the train split's class counts.
- AU: binary cross-entropy with ``pos_weight`` = negatives / positives per AU from the train split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from affectfast.tasks import NUM_AU, NUM_EXPR

EPS = 1e-8  # keeps CCC's denominator and the weight ratios finite when a batch or a count is empty


def expr_class_weights(class_counts) -> torch.Tensor:
    """Inverse-frequency class weights, normalized so a uniform class distribution gives all ones.

    An absent class (count 0) gets weight 0: its label never appears, so its weight never matters,
    and a huge value would only hurt if one slipped in.
    """
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.shape != (NUM_EXPR,):
        raise ValueError(f"expected {NUM_EXPR} EXPR class counts, got shape {tuple(counts.shape)}")
    present = counts > 0
    weights = torch.where(present, counts.sum() / (present.sum() * counts.clamp(min=1)), 0.0)
    return weights.float()


def au_pos_weight(positive_counts, valid_count: int) -> torch.Tensor:
    """BCE ``pos_weight`` per AU: negatives / positives on the train split (1 where an AU never fires)."""
    positives = torch.as_tensor(positive_counts, dtype=torch.float64)
    if positives.shape != (NUM_AU,):
        raise ValueError(
            f"expected {NUM_AU} AU positive counts, got shape {tuple(positives.shape)}"
        )
    negatives = float(valid_count) - positives
    weights = torch.where(positives > 0, negatives / positives.clamp(min=1), 1.0)
    return weights.float()


def masked_ccc(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CCC per column of N×D ``pred``/``target`` over the rows where ``mask``; 0 where fewer than 2 rows."""
    weight = mask.to(pred.dtype).unsqueeze(1)
    count = weight.sum(0)
    n = count.clamp(min=1)
    pred = torch.where(mask.unsqueeze(1), pred, 0.0)
    target = torch.where(mask.unsqueeze(1), target, 0.0)
    mean_p = pred.sum(0) / n
    mean_t = target.sum(0) / n
    dp = (pred - mean_p) * weight
    dt = (target - mean_t) * weight
    var_p = (dp * dp).sum(0) / n
    var_t = (dt * dt).sum(0) / n
    cov = (dp * dt).sum(0) / n
    ccc = 2 * cov / (var_p + var_t + (mean_p - mean_t) ** 2 + EPS)
    return torch.where(count >= 2, ccc, 0.0)


@dataclass(frozen=True)
class TaskLoss:
    """The loss settings for one run: VA flavour, EXPR class weights, AU pos_weight, task weights."""

    va_loss: str = "ccc"  # "ccc" (1 - CCC) or "mse"
    expr_weights: torch.Tensor | None = None  # 8 floats, None = unweighted
    au_pos_weight: torch.Tensor | None = None  # 12 floats, None = 1
    task_weights: tuple[tuple[str, float], ...] = ()  # (task, weight); a task not listed weighs 1

    def __post_init__(self):
        if self.va_loss not in ("ccc", "mse"):
            raise ValueError(f"va_loss must be ccc or mse, got {self.va_loss!r}")

    def to(self, device: torch.device) -> TaskLoss:
        """The same settings with the weight tensors on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TaskLoss(
            self.va_loss, move(self.expr_weights), move(self.au_pos_weight), self.task_weights
        )


def va_loss(pred, target, mask, kind: str = "ccc") -> torch.Tensor:
    """VA loss over valid rows: mean over the two dimensions of 1 - CCC, or the MSE."""
    if kind == "ccc":
        valid = mask.sum() >= 2  # a CCC needs two frames; fewer -> the task adds nothing
        return torch.where(valid, 1 - masked_ccc(pred, target, mask).mean(), 0.0)
    per_row = ((pred - target) ** 2).mean(1)
    return torch.where(mask, per_row, 0.0).sum() / mask.sum().clamp(min=1)


def expr_loss(logits, target, mask, class_weights=None) -> torch.Tensor:
    """Class-weighted cross-entropy summed over valid rows, divided by their count."""
    target = torch.where(
        mask, target, 0
    )  # invalid rows carry arbitrary labels; keep indices in range
    per_row = F.cross_entropy(logits, target, weight=class_weights, reduction="none")
    return torch.where(mask, per_row, 0.0).sum() / mask.sum().clamp(min=1)


def au_loss(logits, target, mask, pos_weight=None) -> torch.Tensor:
    """BCE with logits over the 12 AUs, averaged over AUs, summed over valid rows, divided by their count."""
    per_row = F.binary_cross_entropy_with_logits(
        logits, target, pos_weight=pos_weight, reduction="none"
    ).mean(1)
    return torch.where(mask, per_row, 0.0).sum() / mask.sum().clamp(min=1)


def multitask_loss(
    outputs: dict[str, torch.Tensor],
    labels: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    spec: TaskLoss,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the masked per-task losses over the tasks in ``outputs``; also each task's loss.

    Outputs are cast to float32 first: CCC's moments and the BCE are not safe in fp16/bf16.
    """
    weights = dict(spec.task_weights)
    per_task = {}
    for task, out in outputs.items():
        out, label, mask = out.float(), labels[task], masks[task]
        if task == "va":
            per_task[task] = va_loss(out, label.float(), mask, spec.va_loss)
        elif task == "expr":
            per_task[task] = expr_loss(out, label.long(), mask, spec.expr_weights)
        else:
            per_task[task] = au_loss(out, label.float(), mask, spec.au_pos_weight)
    total = sum(weights.get(task, 1.0) * loss for task, loss in per_task.items())
    return total, per_task
