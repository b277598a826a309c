"""Optimisers against hand-computed PyTorch formulas; losses against closed forms and finite differences."""

import math

import numpy as np
import pytest

from elmcore.training import losses as losses
from elmcore.data.neuronio import neuronio_loss, prepare_soma
from elmcore.errors import ELMError
from elmcore.training.optim import Optimizer, clip_by_global_norm, cosine_lr


def _reference_adam(p, grads, lr, b1, b2, eps, wd, kind):
    m = np.zeros_like(p)
    s = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g.copy()
        if kind == "adamw":
            p = p * (1 - lr * wd)
        else:
            g = g + wd * p
        m = b1 * m + (1 - b1) * g
        if kind == "adamax":
            s = np.maximum(b2 * s, np.abs(g) + eps)
            p = p - lr / (1 - b1 ** t) * m / s
        else:
            s = b2 * s + (1 - b2) * g * g
            p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(s / (1 - b2 ** t)) + eps)
    return p


@pytest.mark.parametrize("kind", ["adam", "adamw", "adamax"])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_optimisers_match_reference_formulas(kind, wd):
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(3, 4))
    grads = [rng.normal(size=(3, 4)) for _ in range(5)]
    p = p0.copy()
    opt = Optimizer({"w": p}, kind=kind, lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd)
    for g in grads:
        opt.step({"w": g.copy()})
    assert opt.params["w"] is p  # in place
    np.testing.assert_allclose(p, _reference_adam(p0, grads, 0.01, 0.8, 0.95, 1e-6, wd, kind), rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind, wd", [("adam", 0.0), ("adam", 0.1), ("adamw", 0.1), ("adamax", 0.0),
                                      ("adamax", 0.1)])
def test_the_one_pass_update_equals_the_array_operations_bit_for_bit(kind, wd, dtype, monkeypatch):
    """NumPy parameters are updated by one compiled pass, other arrays (CuPy) by array operations: the
    same bits, step after step, including a NaN gradient entry, zeros and huge values."""
    from elmcore.training import optim
    rng = np.random.default_rng(5)
    p0 = rng.normal(size=(7, 33)).astype(dtype)
    grads = [rng.normal(scale=10.0 ** rng.integers(-6, 6), size=p0.shape).astype(dtype) for _ in range(6)]
    grads[2][0, :3] = 0
    grads[4][1, 1] = np.nan
    results = {}
    for form in ("one pass", "array ops"):
        p = p0.copy()
        params = {"w": p}
        if form == "array ops":
            monkeypatch.setattr(optim, "_one_layout", lambda *arrays: False)
        calls = []
        real = optim._update_in_one_pass
        monkeypatch.setattr(optim, "_update_in_one_pass", lambda *a: calls.append(1) or real(*a))
        opt = Optimizer(params, kind=kind, lr=3e-3, betas=(0.8, 0.95), eps=1e-7, weight_decay=wd)
        for g in grads:
            opt.step({"w": g.copy()})
        assert len(calls) == (len(grads) if form == "one pass" else 0)
        results[form] = (p, opt.exp_avg["w"], opt.exp_second["w"])
        monkeypatch.undo()
    for one, ops in zip(results["one pass"], results["array ops"]):
        assert one.dtype == dtype and np.array_equal(one, ops, equal_nan=True)
    assert np.isnan(results["one pass"][0][1, 1]) and np.isfinite(results["one pass"][0][0]).all()


def test_optimizer_state_round_trip_continues_identically():
    rng = np.random.default_rng(1)
    grads = [rng.normal(size=5) for _ in range(6)]
    a = rng.normal(size=5)
    b = a.copy()
    opt_a = Optimizer({"w": a}, lr=0.1)
    for g in grads:
        opt_a.step({"w": g.copy()})
    opt_b = Optimizer({"w": b}, lr=0.1)
    for g in grads[:3]:
        opt_b.step({"w": g.copy()})
    state = opt_b.state_dict()
    c = b.copy()
    opt_c = Optimizer({"w": c}, lr=0.1)
    opt_c.load_state_dict(state)
    for g in grads[3:]:
        opt_c.step({"w": g.copy()})
    assert np.array_equal(a, c)


def test_global_norm_clipping():
    g = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    norm = clip_by_global_norm(g, 1.0)
    assert norm == pytest.approx(5.0)
    assert math.sqrt((g["a"] ** 2).sum() + (g["b"] ** 2).sum()) == pytest.approx(1.0, rel=1e-5)
    g2 = {"a": np.array([0.3, 0.4])}
    clip_by_global_norm(g2, 1.0)
    assert np.array_equal(g2["a"], [0.3, 0.4])


def test_cosine_schedule():
    assert cosine_lr(0, 100, 1.0) == pytest.approx(1.0)
    assert cosine_lr(50, 100, 1.0) == pytest.approx(0.5)
    assert cosine_lr(100, 100, 1.0, min_lr=0.1) == pytest.approx(0.1)
    assert cosine_lr(0, 100, 1.0, warmup_steps=10) == pytest.approx(0.1)
    assert cosine_lr(10, 110, 1.0, warmup_steps=10) == pytest.approx(1.0)


def test_optimizer_rejects_bad_settings():
    for kwargs in (dict(kind="sgd"), dict(lr=-1), dict(betas=(1.0, 0.9)), dict(weight_decay=-1),
                   dict(clip_norm=0)):
        with pytest.raises(ELMError):
            Optimizer({"w": np.zeros(2)}, **kwargs)


def _fd_check(fn, Y, target, eps=1e-6):
    loss, dY = fn(Y, target)
    flat = Y.reshape(-1)
    num = np.empty_like(flat)
    for i in range(flat.size):
        keep = flat[i]
        flat[i] = keep + eps
        up = fn(Y, target)[0]
        flat[i] = keep - eps
        down = fn(Y, target)[0]
        flat[i] = keep
        num[i] = (up - down) / (2 * eps)
    np.testing.assert_allclose(dY.reshape(-1), num, atol=1e-8)
    return loss


def test_cross_entropy_closed_form_and_gradient():
    rng = np.random.default_rng(0)
    Y = rng.normal(size=(3, 4, 5))
    labels = np.array([0, 4, 2])
    loss = _fd_check(losses.cross_entropy_last, Y, labels)
    last = Y[:, -1]
    expect = np.mean([np.log(np.exp(r).sum()) - r[label] for r, label in zip(last, labels)])
    assert loss == pytest.approx(expect, rel=1e-12)


def test_losses_stable_for_huge_logits():
    Y = np.zeros((2, 1, 3))
    Y[0, 0] = [1000.0, -1000.0, 0.0]
    Y[1, 0] = [-1e4, 1e4, 1e4]
    loss, dY = losses.cross_entropy_last(Y, np.array([0, 0]))
    assert np.isfinite(loss) and np.all(np.isfinite(dY))
    assert loss == pytest.approx((0 + (2e4 + np.log(2))) / 2)
    Yn = np.zeros((1, 2, 2))
    Yn[0, :, 0] = [800.0, -800.0]
    target = np.array([[[0.0, 0.0], [0.0, 0.0]]])
    loss, dY = neuronio_loss(Yn, target)
    assert loss == pytest.approx(0.5 * 800 / 2) and np.all(np.isfinite(dY))


def test_neuronio_loss_closed_form_gradient_and_burn_in():
    rng = np.random.default_rng(2)
    Y = rng.normal(size=(2, 6, 2))
    target = np.stack([rng.random((2, 6)) < 0.3, rng.normal(size=(2, 6))], -1).astype(float)
    loss = _fd_check(neuronio_loss, Y, target)
    x, s = Y[..., 0], target[..., 0]
    bce = np.mean(-(s * np.log(1 / (1 + np.exp(-x))) + (1 - s) * np.log(1 - 1 / (1 + np.exp(-x)))))
    assert loss == pytest.approx(0.5 * bce + 0.5 * np.mean((Y[..., 1] - target[..., 1]) ** 2), rel=1e-12)
    burn = lambda Y, t: neuronio_loss(Y, t, burn_in=2)  # noqa: E731
    _fd_check(burn, Y, target)
    _, dY = burn(Y, target)
    assert np.all(dY[:, :2] == 0) and np.any(dY[:, 2:] != 0)


def test_mse_losses():
    rng = np.random.default_rng(3)
    Y = rng.normal(size=(2, 3, 2))
    t = rng.normal(size=(2, 3, 2))
    assert _fd_check(losses.mse, Y, t) == pytest.approx(np.mean((Y - t) ** 2))
    t_last = rng.normal(size=(2, 2))
    assert _fd_check(losses.mse_last, Y, t_last) == pytest.approx(np.mean((Y[:, -1] - t_last) ** 2))


def test_loss_target_validation():
    Y = np.zeros((2, 3, 4))
    with pytest.raises(ELMError, match=r"\[0, 4\)"):
        losses.cross_entropy_last(Y, np.array([0, 4]))
    with pytest.raises(ELMError, match="shape"):
        neuronio_loss(Y[..., :2], np.zeros((2, 3, 3)))


def test_soma_preparation():
    soma = np.array([-80.0, -67.7, -50.0])
    np.testing.assert_allclose(prepare_soma(soma), [-1.23, 0.0, 1.27])
    np.testing.assert_allclose(prepare_soma(soma, scale=1.0), [-12.3, 0.0, 12.7])


def test_atomic_output_keeps_the_old_file_on_failure_and_honours_suffix(tmp_path):
    from elmcore.storage.fileio import atomic_output
    target = tmp_path / "model.npz"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]
    with atomic_output(target, suffix=".npz") as tmp:
        np.savez(tmp, a=np.arange(3))  # by name: must not append a second .npz
    with np.load(target) as d:
        assert d["a"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]
