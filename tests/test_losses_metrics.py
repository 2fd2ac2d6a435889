"""Masked losses (affectfast.losses) and the ABAW metrics (affectfast.metrics) on hand-made tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score

from affectfast.losses import (
    TaskLoss,
    au_loss,
    au_pos_weight,
    expr_class_weights,
    expr_loss,
    masked_ccc,
    multitask_loss,
    va_loss,
)
from affectfast.metrics import Predictions, ccc, compute_metrics, format_tables, tune_au_thresholds


def test_ccc_matches_a_hand_computed_value():
    # x = 1,2,3,4; y = 2,2,3,5: means 2.5 and 3, population variances 1.25 and 1.5, covariance 1.25
    # CCC = 2 * 1.25 / (1.25 + 1.5 + 0.5**2) = 5/6
    assert ccc([1, 2, 3, 4], [2, 2, 3, 5]) == pytest.approx(5 / 6, abs=1e-12)


def test_ccc_matches_the_textbook_formula_via_pearson():
    rng = np.random.default_rng(0)
    x = rng.normal(0.2, 0.5, 500)
    y = 0.7 * x + rng.normal(-0.1, 0.3, 500)
    rho = np.corrcoef(x, y)[0, 1]
    expected = 2 * rho * x.std() * y.std() / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)
    assert ccc(x, y) == pytest.approx(expected, abs=1e-12)
    assert ccc(x, x) == pytest.approx(1.0)
    assert ccc(x - x.mean(), x.mean() - x) == pytest.approx(-1.0)  # -1 needs equal means too
    assert ccc([0.5], [0.1]) == 0.0 and ccc([1, 1], [1, 1]) == 0.0


def test_masked_ccc_ignores_invalid_rows_whatever_they_hold():
    rng = np.random.default_rng(1)
    pred, target = (
        rng.normal(size=(64, 2)).astype(np.float32),
        rng.normal(size=(64, 2)).astype(np.float32),
    )
    mask = rng.random(64) < 0.6
    garbage = pred.copy()
    garbage[~mask] = 1e3
    got = masked_ccc(torch.from_numpy(garbage), torch.from_numpy(target), torch.from_numpy(mask))
    for j in range(2):
        assert got[j].item() == pytest.approx(ccc(pred[mask, j], target[mask, j]), abs=1e-5)


@pytest.mark.parametrize("valid", [0, 1])
def test_va_loss_with_fewer_than_two_valid_frames_is_exactly_zero(valid):
    pred = torch.randn(8, 2, requires_grad=True)
    mask = torch.zeros(8, dtype=torch.bool)
    mask[:valid] = True
    for kind in ("ccc", "mse") if valid == 0 else ("ccc",):
        loss = va_loss(pred, torch.randn(8, 2), mask, kind)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.isfinite(pred.grad).all() and (pred.grad == 0).all()
        pred.grad = None


def test_perfect_va_gives_zero_ccc_loss_and_mse_is_normalized_by_valid_count():
    target = torch.randn(16, 2)
    mask = torch.ones(16, dtype=torch.bool)
    assert va_loss(target.clone(), target, mask, "ccc").item() == pytest.approx(0.0, abs=1e-5)
    mask[8:] = False
    pred = target + 0.5  # squared error 0.25 on every valid value
    pred[8:] = 100.0
    assert va_loss(pred, target, mask, "mse").item() == pytest.approx(0.25, abs=1e-6)


def test_expr_loss_is_weighted_ce_over_valid_rows_divided_by_their_count():
    torch.manual_seed(0)
    logits, target = torch.randn(32, 8), torch.randint(0, 8, (32,))
    mask = torch.rand(32) < 0.5
    weights = torch.linspace(0.5, 2.0, 8)
    expected = (
        F.cross_entropy(logits[mask], target[mask], weight=weights, reduction="sum") / mask.sum()
    )
    target_with_garbage = torch.where(mask, target, 0)
    assert expr_loss(logits, target_with_garbage, mask, weights).item() == pytest.approx(
        expected.item(), rel=1e-6
    )


def test_au_loss_is_bce_over_valid_rows_with_pos_weight():
    torch.manual_seed(0)
    logits, target = torch.randn(32, 12), (torch.rand(32, 12) < 0.3).float()
    mask = torch.rand(32) < 0.5
    pos_weight = torch.linspace(1.0, 5.0, 12)
    expected = F.binary_cross_entropy_with_logits(logits[mask], target[mask], pos_weight=pos_weight)
    assert au_loss(logits, target, mask, pos_weight).item() == pytest.approx(
        expected.item(), rel=1e-6
    )


def test_all_invalid_tasks_add_exactly_zero_and_finite_gradients():
    torch.manual_seed(0)
    outputs = {"va": torch.randn(4, 2), "expr": torch.randn(4, 8), "au": torch.randn(4, 12)}
    outputs = {t: o.requires_grad_() for t, o in outputs.items()}
    labels = {
        "va": torch.zeros(4, 2),
        "expr": torch.zeros(4, dtype=torch.long),
        "au": torch.zeros(4, 12),
    }
    masks = {t: torch.zeros(4, dtype=torch.bool) for t in outputs}
    spec = TaskLoss("ccc", torch.ones(8), torch.full((12,), 3.0))
    total, per_task = multitask_loss(outputs, labels, masks, spec)
    total.backward()
    assert total.item() == 0.0 and all(v.item() == 0.0 for v in per_task.values())
    assert all(torch.isfinite(o.grad).all() for o in outputs.values())


def test_multitask_loss_weights_tasks_and_casts_half_outputs():
    torch.manual_seed(0)
    outputs = {"expr": torch.randn(8, 8).bfloat16(), "au": torch.randn(8, 12).bfloat16()}
    labels = {"expr": torch.randint(0, 8, (8,)), "au": (torch.rand(8, 12) < 0.5).float()}
    masks = {t: torch.ones(8, dtype=torch.bool) for t in outputs}
    total, per_task = multitask_loss(outputs, labels, masks, TaskLoss(task_weights=(("au", 2.0),)))
    assert total.dtype == torch.float32
    assert total.item() == pytest.approx(
        per_task["expr"].item() + 2 * per_task["au"].item(), rel=1e-6
    )


def test_class_weights_and_pos_weight_from_counts():
    weights = expr_class_weights([100, 50, 0, 25, 100, 50, 25, 50])
    # total 400 over 7 present classes: weight = 400 / (7 * count); an absent class weighs 0
    assert weights.tolist() == pytest.approx(
        [400 / 700, 400 / 350, 0, 400 / 175, 400 / 700, 400 / 350, 400 / 175, 400 / 350]
    )
    assert expr_class_weights([5] * 8).tolist() == pytest.approx([1.0] * 8)
    pos = au_pos_weight([10, 50, 0, 90, 1, 2, 3, 4, 5, 6, 7, 8], valid_count=100)
    assert pos[:4].tolist() == pytest.approx([9.0, 1.0, 1.0, 10 / 90])
    with pytest.raises(ValueError):
        expr_class_weights([1, 2, 3])


def _predictions(n: int = 200, seed: int = 0) -> Predictions:
    rng = np.random.default_rng(seed)
    va_label = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    expr_label = rng.integers(0, 8, n)
    au_label = (rng.random((n, 12)) < 0.4).astype(np.float32)
    outputs = {
        "va": va_label + rng.normal(0, 0.3, (n, 2)).astype(np.float32),
        "expr": np.eye(8, dtype=np.float32)[
            np.where(rng.random(n) < 0.7, expr_label, rng.integers(0, 8, n))
        ],
        "au": np.clip(au_label * 0.6 + rng.random((n, 12)) * 0.5, 0, 1).astype(np.float32),
    }
    masks = {"va": rng.random(n) < 0.8, "expr": rng.random(n) < 0.7, "au": rng.random(n) < 0.9}
    keys = [f"v{i % 3}/{i:05d}" for i in range(n)]
    return Predictions(
        keys,
        outputs,
        {"va": va_label, "expr": expr_label.astype(np.float32), "au": au_label},
        masks,
    )


def test_compute_metrics_matches_sklearn_and_textbook_ccc_on_valid_frames():
    preds = _predictions()
    m = compute_metrics(preds, ("va", "expr", "au"))
    va, ex, au = (preds.masks[t] for t in ("va", "expr", "au"))
    assert m["ccc_valence"] == pytest.approx(
        ccc(preds.outputs["va"][va, 0], preds.labels["va"][va, 0])
    )
    assert m["ccc_arousal"] == pytest.approx(
        ccc(preds.outputs["va"][va, 1], preds.labels["va"][va, 1])
    )
    assert m["ccc_mean"] == pytest.approx((m["ccc_valence"] + m["ccc_arousal"]) / 2)
    expected_expr = f1_score(
        preds.labels["expr"][ex], preds.outputs["expr"][ex].argmax(1), average="macro"
    )
    assert m["f1_expr"] == pytest.approx(expected_expr)
    per_au = [
        f1_score(preds.labels["au"][au, j], preds.outputs["au"][au, j] > 0.5) for j in range(12)
    ]
    assert m["f1_au"] == pytest.approx(np.mean(per_au)) and m["f1_au_per_class"] == pytest.approx(
        per_au
    )
    assert m["p_mtl"] == pytest.approx(m["ccc_mean"] + m["f1_expr"] + m["f1_au"])
    assert m["frames_va"] == va.sum() and len(m["f1_expr_per_class"]) == 8
    table = format_tables(m)
    assert "Happiness" in table and "AU26" in table and "p_mtl" in table


def test_expr_macro_f1_skips_classes_absent_from_labels_and_predictions():
    labels = np.array([6, 6, 6, 1, 1, 6], dtype=np.float32)
    logits = np.eye(8, dtype=np.float32)[[6, 6, 1, 1, 1, 6]]
    preds = Predictions(
        [f"v/{i:05d}" for i in range(6)],
        {"expr": logits},
        {"expr": labels},
        {"expr": np.ones(6, dtype=bool)},
    )
    m = compute_metrics(preds, ("expr",))
    # class 6: P 1, R 3/4 -> 6/7; class 1: P 2/3, R 1 -> 4/5; the 6 absent classes are not averaged
    assert m["f1_expr"] == pytest.approx((6 / 7 + 4 / 5) / 2)
    assert m["f1_expr_per_class"][6] == pytest.approx(6 / 7) and m["f1_expr_per_class"][0] is None
    assert "Neutral" in format_tables(m)


def test_metrics_only_for_trained_tasks_and_p_mtl_sums_them():
    m = compute_metrics(_predictions(), ("expr",))
    assert "ccc_mean" not in m and "f1_au" not in m
    assert m["p_mtl"] == m["f1_expr"]


def test_tuned_au_thresholds_never_score_below_half():
    preds = _predictions(seed=3)
    valid = preds.masks["au"]
    thresholds = tune_au_thresholds(preds.outputs["au"][valid], preds.labels["au"][valid])
    m = compute_metrics(preds, ("au",), thresholds)
    assert m["f1_au_tuned"] >= m["f1_au"] and len(m["au_thresholds"]) == 12
    assert "F1@tuned" in format_tables(m)


def test_predictions_concat_sorts_by_key_and_drops_repeats():
    full = _predictions(30)

    def half(idx):
        return Predictions(
            [full.keys[i] for i in idx],
            {t: v[idx] for t, v in full.outputs.items()},
            {t: v[idx] for t, v in full.labels.items()},
            {t: v[idx] for t, v in full.masks.items()},
        )

    a, b = (
        half(np.arange(1, 30, 2)),
        half(np.r_[np.arange(0, 30, 2), 1, 3]),
    )  # 1 and 3 repeated (padding)
    joined = Predictions.concat([b, a])
    assert joined.keys == sorted(full.keys) and len(joined) == 30
    order = np.argsort(full.keys)
    np.testing.assert_array_equal(joined.outputs["au"], full.outputs["au"][order])
    assert compute_metrics(joined, ("va", "expr", "au")) == compute_metrics(
        full, ("va", "expr", "au")
    )
