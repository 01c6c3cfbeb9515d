"""qkv_native.optim: update rules against float64 formulas and torch.optim,
schedules, global-norm clipping, state round trips."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qkv_native import nn, optim

F32 = np.float32


from _helpers import torch_one_thread as _torch  # noqa: E402


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    ps = [nn.Parameter(rng.standard_normal(s).astype(F32)) for s in [(3, 4), (4,), (2, 2, 3)]]
    grads = [[rng.standard_normal(p.shape).astype(F32) for p in ps] for _ in range(6)]
    return ps, grads


def run_steps(opt, ps, grads):
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad[...] = g
        opt.step()
    return [p.data.copy() for p in ps]


def sgd64(w, grads, lr, momentum=0.0, nesterov=False, wd=0.0, dampening=0.0):
    w, buf = w.astype(np.float64), None
    for g in grads:
        d = g + wd * w
        if momentum:
            buf = d.copy() if buf is None else momentum * buf + (1 - dampening) * d
            d = d + momentum * buf if nesterov else buf
        w = w - lr * d
    return w


def adam64(w, grads, lr, b1, b2, eps, wd, decoupled):
    w, m, v = w.astype(np.float64), 0.0, 0.0
    for t, g in enumerate(grads, 1):
        if decoupled:
            w = w * (1 - lr * wd)
        else:
            g = g + wd * w
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w = w - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return w


@pytest.mark.parametrize(
    "kw", [{}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}, {"momentum": 0.5, "dampening": 0.3}]
)
def test_sgd_vs_float64(kw):
    ps, grads = make_params()
    init = [p.data.copy() for p in ps]
    got = run_steps(optim.SGD(ps, lr=0.05, **kw), ps, grads)
    for i, w in enumerate(init):
        want = sgd64(w, [g[i] for g in grads], 0.05, kw.get("momentum", 0.0), kw.get("nesterov", False),
                     kw.get("weight_decay", 0.0), kw.get("dampening", 0.0))
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls,wd", [(optim.Adam, 0.0), (optim.Adam, 0.1), (optim.AdamW, 0.1)])
def test_adam_vs_float64(cls, wd):
    ps, grads = make_params(1)
    init = [p.data.copy() for p in ps]
    got = run_steps(cls(ps, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd), ps, grads)
    for i, w in enumerate(init):
        want = adam64(w, [g[i] for g in grads], 0.01, 0.8, 0.99, 1e-6, wd, cls is optim.AdamW)
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "name,kw",
    [
        ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
        ("SGD", {"lr": 0.05, "momentum": 0.7, "dampening": 0.2}),
        ("Adam", {"lr": 0.01, "weight_decay": 0.05}),
        ("AdamW", {"lr": 0.01, "weight_decay": 0.05}),
    ],
)
def test_optimizers_vs_torch(name, kw):
    torch = _torch()
    ps, grads = make_params(2)
    tps = [torch.tensor(p.data.copy(), requires_grad=True) for p in ps]
    got = run_steps(getattr(optim, name)(ps, **kw), ps, grads)
    topt = getattr(torch.optim, name)(tps, **kw)
    for gs in grads:
        for tp, g in zip(tps, gs):
            tp.grad = torch.tensor(g)
        topt.step()
    for g, t in zip(got, tps):
        np.testing.assert_allclose(g, t.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_schedules():
    assert optim.Constant().factor(123) == 1.0
    s = optim.StepDecay(10, 0.5)
    assert [s.factor(t) for t in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]
    c = optim.Cosine(100, min_factor=0.1)
    assert c.factor(0) == 1.0 and abs(c.factor(50) - 0.55) < 1e-12 and abs(c.factor(100) - 0.1) < 1e-12
    assert c.factor(500) == c.factor(100)
    w = optim.LinearWarmup(4, optim.Cosine(10))
    assert [w.factor(t) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert w.factor(4) == 1.0 and abs(w.factor(9) - 0.5) < 1e-12
    ps, _ = make_params()
    opt = optim.SGD(ps, lr=0.2, schedule=w)
    lrs = []
    for _ in range(6):
        lrs.append(opt.current_lr())
        opt.step()
    np.testing.assert_allclose(lrs, [0.05, 0.1, 0.15, 0.2, 0.2, 0.2 * w.factor(5)])
    assert optim.LinearWarmup(2, optim.Cosine(8)).config()["after"]["type"] == "Cosine"


def test_clip_grad_norm():
    ps, grads = make_params(3)
    for p, g in zip(ps, grads[0]):
        p.grad[...] = g
    want_norm = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads[0]))
    norm = optim.clip_grad_norm(ps, 1.0)
    assert abs(norm - want_norm) < 1e-5 * want_norm
    new = math.sqrt(sum(float((p.grad.astype(np.float64) ** 2).sum()) for p in ps))
    assert abs(new - 1.0) < 1e-5
    before = [p.grad.copy() for p in ps]
    optim.clip_grad_norm(ps, 10.0)  # under the limit: untouched
    for p, b in zip(ps, before):
        np.testing.assert_array_equal(p.grad, b)


def test_clip_grad_norm_vs_torch():
    torch = _torch()
    ps, grads = make_params(4)
    tps = [torch.zeros(p.shape, requires_grad=True) for p in ps]
    for p, tp, g in zip(ps, tps, grads[0]):
        p.grad[...] = g
        tp.grad = torch.tensor(g)
    n = optim.clip_grad_norm(ps, 0.5)
    tn = torch.nn.utils.clip_grad_norm_(tps, 0.5)
    assert abs(n - tn.item()) < 1e-5 * n
    for p, tp in zip(ps, tps):
        np.testing.assert_allclose(p.grad, tp.grad.numpy(), rtol=1e-6, atol=1e-7)


def test_decay_filter_and_state_roundtrip():
    model = nn.Sequential(nn.Linear(3, 4, rng=0), nn.LayerNorm(4))
    opt = optim.AdamW(model, lr=0.1, weight_decay=0.5, decay=optim.decay_matrices_only)
    b0 = model[0].bias.data.copy()
    opt.step()  # zero grads: only decay could move a weight
    np.testing.assert_array_equal(model[0].bias.data, b0)  # 1-D: no decay
    assert np.allclose(model[1].weight.data, 1.0)
    assert not np.allclose(model[0].weight.data, nn.Linear(3, 4, rng=0).weight.data)
    for p in model.parameters():
        p.grad[...] = 1.0
    opt.step()
    arrays, meta = opt.state_dict()
    assert meta["step_count"] == 2 and "exp_avg/0.weight" in arrays
    other = optim.AdamW(model, lr=0.1)
    other.load_state_dict(arrays, meta)
    assert other.step_count == 2
    np.testing.assert_array_equal(other.state["0.weight"]["exp_avg_sq"], opt.state["0.weight"]["exp_avg_sq"])
    with pytest.raises(ValueError, match="SGD"):
        optim.SGD(model, lr=0.1).load_state_dict(arrays, meta)
    small = optim.AdamW(nn.Sequential(nn.Linear(3, 5, rng=0), nn.LayerNorm(5)), lr=0.1)
    with pytest.raises(ValueError, match="shapes"):
        small.load_state_dict(arrays, meta)


def test_optimizer_arguments():
    with pytest.raises(ValueError, match="lr"):
        optim.SGD(lr=-1.0)
    with pytest.raises(ValueError, match="nesterov"):
        optim.SGD(lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        optim.Adam(lr=0.1, betas=(1.0, 0.9))
    with pytest.raises(RuntimeError, match="attach"):
        optim.SGD(lr=0.1).step()
    with pytest.raises(TypeError, match="Parameter"):
        optim.SGD([np.zeros(3, F32)], lr=0.1)
