"""Metrics against independent definitions, and the release's NeuronIO windowed evaluation."""

import numpy as np
import pytest

from elmcore import ELM, ELMConfig
from elmcore.data.neuronio.evaluation import align_soma, neuronio_predict, window_plan
from elmcore.training.metrics import auc_at_fp, roc_auc, roc_curve, soma_metrics, tp_at_fp


def mann_whitney_auc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return (greater + 0.5 * ties) / (len(pos) * len(neg))


def test_roc_auc_equals_the_rank_statistic_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = (rng.random(300) < 0.2).astype(int)
        s = np.round(rng.normal(size=300) + y, 1)  # rounding makes ties
        assert roc_auc(y, s) == pytest.approx(mann_whitney_auc(y, s), abs=1e-12)


def test_roc_curve_hand_example():
    # sklearn's documented example: y = [1, 1, 2, 2] (positive 2), scores [0.1, 0.4, 0.35, 0.8]
    fpr, tpr, thr = roc_curve(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(thr, [np.inf, 0.8, 0.4, 0.35, 0.1])


def test_tp_and_auc_at_fp():
    y = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    s = np.array([0.9, 0.3, 0.8, 0.2, 0.1, 0.05, 0.04, 0.03, 0.02, 0.01])
    # ROC corners after dropping collinear points: (0,0) (0,.5) (.125,.5) (.125,1) (1,1).
    # The nearest FP rate to 0.1 or 0.2 is 0.125, first reached at the point with TPR 0.5.
    assert tp_at_fp(y, s, 0.1) == pytest.approx(0.5)
    assert tp_at_fp(y, s, 0.2) == pytest.approx(0.5)
    assert tp_at_fp(y, s, 0.9) == pytest.approx(1.0)
    assert tp_at_fp(y, s, 0.0) == pytest.approx(0.5)  # index 0 is bumped to 1, as in the release
    assert 0.5 <= auc_at_fp(y, s, 0.2) <= 1.0
    perfect = auc_at_fp(np.array([1, 0, 0]), np.array([0.9, 0.1, 0.2]), 0.01)
    assert perfect == pytest.approx(1.0)


def test_soma_metrics():
    t = np.array([1.0, 2.0, 3.0, 4.0])
    p = np.array([1.5, 2.0, 2.5, 4.0])
    m = soma_metrics(t, p)
    assert m["soma_RMSE"] == pytest.approx(np.sqrt(0.125))
    assert m["soma_MAE"] == pytest.approx(0.25)
    err = t - p
    assert m["soma_explained_variance_percent"] == pytest.approx(100 * (1 - err.var() / t.var()))


@pytest.mark.parametrize("T, window, burn_in", [(6000, 500, 150), (1000, 500, 150), (300, 500, 150),
                                                (777, 100, 30), (500, 500, 0)])
def test_window_plan_covers_every_step_once(T, window, burn_in):
    plan = window_plan(T, window, burn_in)
    covered = np.zeros(T, int)
    for start, skip, lo, hi in plan:
        covered[lo:hi] += 1
        assert lo == start + skip and hi - lo <= window - skip
    assert np.all(covered == 1)
    assert plan[0][1] == 0 and all(p[1] == burn_in for p in plan[1:])
    if (T, window, burn_in) == (6000, 500, 150):
        assert len(plan) == int(2 + (6000 - 500) / 350) == 17


def test_windowed_prediction_matches_running_each_window_from_zero():
    cfg = ELMConfig(num_input=6, num_output=2, num_memory=4, version="branch_elm_v2")
    model = ELM(cfg, seed=1, dtype="float64")
    rng = np.random.default_rng(0)
    X = (rng.random((2, 130, 6)) < 0.2) * rng.choice([-1.0, 1.0], 6)
    spike, soma = neuronio_predict(model, X, window=50, burn_in=20, batch_size=3)
    for start, skip, lo, hi in window_plan(130, 50, 20):
        part = np.zeros((2, 50, 6))
        part[:, :min(50, 130 - start)] = X[:, start:start + 50]
        Y = model.forward(part)
        np.testing.assert_allclose(spike[:, lo:hi], 1 / (1 + np.exp(-Y[:, skip:skip + hi - lo, 0])), rtol=1e-12)
        np.testing.assert_allclose(soma[:, lo:hi], Y[:, skip:skip + hi - lo, 1] / 0.1, rtol=1e-12)


def test_soma_alignment_matches_target_moments():
    rng = np.random.default_rng(0)
    pred, true = rng.normal(3, 2, (4, 50)), rng.normal(-1, 5, (4, 50))
    al = align_soma(pred, true)
    assert al.mean() == pytest.approx(true.mean()) and al.std() == pytest.approx(true.std())
    assert np.corrcoef(al.ravel(), pred.ravel())[0, 1] == pytest.approx(1.0)


# ---- cross-checks against scikit-learn (skipped where it is not installed) ------------------

@pytest.mark.parametrize("seed", range(6))
def test_roc_curve_and_auc_equal_scikit_learn_on_tie_heavy_scores(seed):
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    y = (rng.random(n) < rng.uniform(0.05, 0.6)).astype(int)
    y[:2] = [0, 1]  # both classes present
    # Few distinct values: most scores tie, within and across the classes.
    score = np.round(rng.normal(size=n) + 0.8 * y, int(rng.integers(0, 2)))
    fpr, tpr, thr = roc_curve(y, score)
    sk_fpr, sk_tpr, sk_thr = sk.roc_curve(y, score)
    np.testing.assert_allclose(fpr, sk_fpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(thr, sk_thr)
    assert roc_auc(y, score) == pytest.approx(sk.roc_auc_score(y, score), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_soma_explained_variance_equals_scikit_learn(seed):
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    true = rng.normal(-67.0, 3.0, size=500)
    pred = np.round(true + rng.normal(0, 1.5, size=500), 1)  # ties in the prediction
    got = soma_metrics(true, pred)
    assert got["soma_explained_variance_percent"] == pytest.approx(
        100 * sk.explained_variance_score(true, pred), abs=1e-10)
    assert got["soma_RMSE"] == pytest.approx(np.sqrt(sk.mean_squared_error(true, pred)), abs=1e-12)
    assert got["soma_MAE"] == pytest.approx(sk.mean_absolute_error(true, pred), abs=1e-12)
