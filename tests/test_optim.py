"""qkv_native.optim: update rules against float64 formulas and torch.optim,
schedules, global-norm clipping, state round trips."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qkv_native import nn, optim
from qkv_native import reference as ref

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
    """Float64 trajectory: reference.sgd_update step after step."""
    buf = None
    for g in grads:
        w, buf = ref.sgd_update(w, g, buf, lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                                weight_decay=wd)
    return w


def adam64(w, grads, lr, b1, b2, eps, wd, decoupled):
    """Float64 trajectory: reference.adam_update step after step."""
    m = v = np.zeros_like(w, np.float64)
    for t, g in enumerate(grads, 1):
        w, m, v = ref.adam_update(w, g, m, v, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, decoupled=decoupled,
                                  step=t)
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


def test_clip_grad_norm_takes_a_module_and_checks_params():
    """clip_grad_norm(model, ...) iterated a Sequential's layers ('Linear' object has no
    attribute 'grad') and refused a Linear ('not iterable'); the optimizers take a Module."""
    for make in (lambda: nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), lambda: nn.Linear(2, 3)):
        model = make()
        for p in model.parameters():
            p.grad[...] = 10.0
        n = sum(p.grad.size for p in model.parameters())
        assert abs(optim.clip_grad_norm(model, 1.0) - 10.0 * math.sqrt(n)) < 1e-3
        assert abs(math.sqrt(sum(float(np.sum(p.grad**2)) for p in model.parameters())) - 1.0) < 1e-5
    for bad, name in (([np.ones(3, F32)], "ndarray at 0"), (nn.Linear(2, 2).named_parameters(), "tuple at 0")):
        with pytest.raises(TypeError, match=f"^params must hold qkv_native.nn.Parameters, got {name}"):
            optim.clip_grad_norm(bad, 1.0)


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


@pytest.mark.parametrize(
    "kind,kw",
    [
        ("SGD", {"lr": float("inf")}),
        ("SGD", {"weight_decay": float("nan")}),
        ("SGD", {"momentum": float("nan")}),
        ("SGD", {"momentum": -0.5}),
        ("SGD", {"dampening": float("nan")}),
        ("Adam", {"eps": float("nan")}),
        ("Adam", {"eps": -1.0}),
        ("Adam", {"weight_decay": -0.1}),
        ("AdamW", {"weight_decay": float("inf")}),
    ],
)
def test_hyperparameters_must_be_finite(kind, kw):
    """NaN, inf or a negative hyperparameter is refused by name (the first step would
    otherwise make every weight NaN, or, with a negative eps, step uphill)."""
    (name,) = kw
    make = getattr(optim, kind)
    with pytest.raises(ValueError, match=f"^{name} must be a finite number"):
        make(**{"lr": 0.1, **kw})
    with pytest.raises(TypeError, match=f"^{name} must be a real number"):
        make(**{"lr": 0.1, name: "0.1"})


# ----------------------------------------------------------------------------
# the native fused updates: bit-identical to the float32 NumPy formulas
# ----------------------------------------------------------------------------


def numpy_sgd_f32(w, g, buf, lr, wd, momentum, dampening, nesterov, first):
    """The float32 NumPy update optim.SGD did per parameter before the native kernel (in place)."""
    d = g + F32(wd) * w if wd else g
    if momentum:
        if first:
            np.copyto(buf, d)
        else:
            buf *= F32(momentum)
            buf += F32(1.0 - dampening) * d
        d = d + F32(momentum) * buf if nesterov else buf
    w -= F32(lr) * d


def numpy_adam_f32(w, g, m, v, lr, wd, b1, b2, eps, t, decoupled):
    """The float32 NumPy update optim.Adam/AdamW did per parameter before the native kernel (in place)."""
    if wd and decoupled:
        w *= F32(1.0 - lr * wd)
    elif wd:
        g = g + F32(wd) * w
    m *= F32(b1)
    m += F32(1.0 - b1) * g
    v *= F32(b2)
    v += F32(1.0 - b2) * (g * g)
    denom = np.sqrt(v)
    denom /= F32(math.sqrt(1.0 - b2**t))
    denom += F32(eps)
    w -= F32(lr / (1.0 - b1**t)) * (m / denom)


SIZES = [(1,), (7,), (17,), (65,), (3, 11), (40000,)]  # tails, and more than one thread chunk


def _flat_case(seed):
    rng = np.random.default_rng(seed)
    ps = [nn.Parameter(rng.standard_normal(s).astype(F32)) for s in SIZES]
    grads = [[rng.standard_normal(s).astype(F32) for s in SIZES] for _ in range(4)]
    return ps, grads


@pytest.mark.parametrize("decoupled,wd", [(False, 0.0), (False, 0.1), (True, 0.1)])
def test_adam_native_bit_identical_to_numpy(isa, decoupled, wd):
    ps, grads = _flat_case(5)
    ws = [p.data.copy() for p in ps]
    ms, vs = [np.zeros_like(w) for w in ws], [np.zeros_like(w) for w in ws]
    decay = lambda name, p: name != "1"  # noqa: E731  (parameter "1" without weight decay)
    cls = optim.AdamW if decoupled else optim.Adam
    opt = cls(ps, lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd, decay=decay,
              schedule=optim.LinearWarmup(2))
    for t, gs in enumerate(grads, 1):
        lr = opt.current_lr()
        for i, (p, g) in enumerate(zip(ps, gs)):
            p.grad[...] = g
            numpy_adam_f32(ws[i], g, ms[i], vs[i], lr, wd if i != 1 else 0.0, 0.8, 0.99, 1e-6, t, decoupled)
        opt.step()
        for i, p in enumerate(ps):
            np.testing.assert_array_equal(p.data, ws[i], err_msg=f"step {t}, parameter {i}")
            np.testing.assert_array_equal(opt.state[str(i)]["exp_avg_sq"], vs[i])


@pytest.mark.parametrize("kw", [{}, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
                                {"momentum": 0.5, "dampening": 0.3, "weight_decay": 0.01}])
def test_sgd_native_bit_identical_to_numpy(isa, kw):
    ps, grads = _flat_case(6)
    ws = [p.data.copy() for p in ps]
    bufs = [np.zeros_like(w) for w in ws]
    opt = optim.SGD(ps, lr=0.05, **kw)
    m, damp, nest, wd = kw.get("momentum", 0.0), kw.get("dampening", 0.0), kw.get("nesterov", False), kw.get("weight_decay", 0.0)
    for t, gs in enumerate(grads):
        for i, (p, g) in enumerate(zip(ps, gs)):
            p.grad[...] = g
            numpy_sgd_f32(ws[i], g, bufs[i], 0.05, wd, m, damp, nest, t == 0)
        opt.step()
        for i, p in enumerate(ps):
            np.testing.assert_array_equal(p.data, ws[i], err_msg=f"step {t}, parameter {i}")


def test_flat_parameters_are_views_and_survive_replacement():
    model = nn.Sequential(nn.Linear(3, 4, rng=0), nn.LayerNorm(4))
    w0 = model[0].weight.data.copy()
    opt = optim.SGD(model, lr=0.5)
    flat = opt.flat_grad()
    assert flat.shape == (3 * 4 + 4 + 4 + 4,)
    assert np.shares_memory(model[0].weight.grad, flat)
    np.testing.assert_array_equal(model[0].weight.data, w0)  # values kept by the move
    for p in model.parameters():
        p.grad[...] = 1.0
    opt.zero_grad()
    assert not any(p.grad.any() for p in model.parameters())
    # a parameter whose arrays were replaced (here: by hand) is picked up before the next step
    model[0].bias.data = np.full(4, 2.0, F32)
    model[0].bias.grad = np.ones(4, F32)
    opt.step()
    np.testing.assert_allclose(model[0].bias.data, 1.5)
    assert np.shares_memory(model[0].bias.data, opt._flat.w)
    # clipping through the optimizer: one pass over the flat gradient buffer
    for p in model.parameters():
        p.grad[...] = 3.0
    norm = optim.clip_grad_norm(opt, 1.0)
    assert abs(norm - 3.0 * math.sqrt(flat.size)) < 1e-4
    assert abs(float(np.linalg.norm(opt.flat_grad())) - 1.0) < 1e-5
    with pytest.raises(ValueError, match="twice"):
        optim.SGD([model[0].bias, model[0].bias], lr=0.1)


@pytest.mark.parametrize("make", [lambda m: optim.SGD(m, lr=0.1), lambda m: optim.SGD(m, lr=0.1, momentum=0.9),
                                  lambda m: optim.AdamW(m, lr=0.1)])
def test_replaced_parameter_arrays_must_keep_their_shape(make):
    """A grad replaced by a (1, n) array was broadcast into the (m, n) parameter's gradient
    (a silently wrong update); new data of another shape met the state's old layout (an error
    naming an internal buffer, 'm must have shape (20,)'). Now a ValueError naming the parameter."""
    lin = nn.Linear(3, 4)
    opt = make(lin)
    w0 = lin.weight.data.copy()
    lin.weight.grad = np.ones((1, 4), F32)
    with pytest.raises(ValueError, match=r"^parameter 'weight' must keep its shape \(3, 4\)"):
        opt.step()
    np.testing.assert_array_equal(lin.weight.data, w0)
    lin.weight.data, lin.weight.grad = np.ones((4, 4), F32), np.ones((4, 4), F32)
    with pytest.raises(ValueError, match=r"^parameter 'weight' must keep its shape \(3, 4\).*now \(4, 4\)"):
        opt.zero_grad()
    opt.attach([("weight", lin.weight)])  # attaching again takes the new shape
    opt.step()
    assert lin.weight.shape == (4, 4) and np.shares_memory(lin.weight.data, opt._flat.w)


def test_native_update_errors_name_the_argument():
    from qkv_native import functional as F

    w, g, m, v = (np.zeros(5, F32) for _ in range(4))
    off, decay = np.array([0, 2, 5]), np.array([True, False])
    kw = dict(lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, decoupled=True, step=1)
    F.adam_update(w, g, m, v, off, decay, **kw)
    with pytest.raises(ValueError, match="^m must have shape"):
        F.adam_update(w, g, np.zeros(4, F32), v, off, decay, **kw)
    with pytest.raises(TypeError, match="^g must have dtype float32"):
        F.adam_update(w, g.astype(np.float64), m, v, off, decay, **kw)
    with pytest.raises(ValueError, match="offsets"):
        F.adam_update(w, g, m, v, np.array([0, 3, 2]), decay, **kw)
    with pytest.raises(ValueError, match="decay"):
        F.adam_update(w, g, m, v, off, np.array([True]), **kw)
    with pytest.raises(ValueError, match="^buf must have shape"):
        F.sgd_update(w, g, np.zeros(6, F32), off, decay, lr=0.1, momentum=0.9, dampening=0.0, nesterov=False,
                     weight_decay=0.0, first=True)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("cls, kw", [(optim.SGD, {"lr": 0.1, "momentum": 0.9}), (optim.AdamW, {"lr": 0.01})])
def test_copied_optimizer_trains_like_the_original(how, cls, kw):
    """Note [flat parameters]. Bug: a deepcopy or pickle of (model, optimizer) held the
    parameters as standalone arrays, no longer views of the flat buffers, and its steps
    updated the buffers alone: the copy's weights never moved (a copied Trainer printed
    the same loss every epoch); its state_dict kept the state of the copying moment."""
    import copy
    import pickle

    model = nn.Linear(4, 3, rng=np.random.default_rng(0))
    opt = cls(model, **kw)
    rng = np.random.default_rng(1)
    gs = [[rng.standard_normal(p.data.shape).astype(F32) for p in model.parameters()] for _ in range(3)]
    run_steps(opt, list(model.parameters()), gs[:1])  # state that is not zero
    m2, o2 = copy.deepcopy((model, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((model, opt)))
    want = run_steps(opt, list(model.parameters()), gs[1:])
    got = run_steps(o2, list(m2.parameters()), gs[1:])
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g, w)
    a1, meta1 = opt.state_dict()
    a2, meta2 = o2.state_dict()
    assert meta1["step_count"] == meta2["step_count"] == 3
    for k in a1:
        np.testing.assert_array_equal(a2[k], a1[k])


def test_schedule_parameters_are_checked():
    """Bug: NaN/inf/negative factors and fractional step counts were taken: NaN or -inf
    weights, or a negative learning rate that climbed the loss."""
    for make in (lambda: optim.StepDecay(1, gamma=math.nan), lambda: optim.StepDecay(1, gamma=-1.0),
                 lambda: optim.StepDecay(1, gamma=math.inf), lambda: optim.Cosine(5, min_factor=math.nan),
                 lambda: optim.Cosine(5, min_factor=-3.0), lambda: optim.Cosine(0), lambda: optim.StepDecay(0),
                 lambda: optim.LinearWarmup(-1)):
        with pytest.raises(ValueError):
            make()
    for make in (lambda: optim.StepDecay(1.5), lambda: optim.Cosine(2.5), lambda: optim.LinearWarmup(2.5),
                 lambda: optim.StepDecay(True), lambda: optim.LinearWarmup(2, after="cosine")):
        with pytest.raises(TypeError):
            make()


def test_learning_rate_from_a_schedule_is_checked_before_the_update():
    """A schedule whose factor overflows or is not finite raises ValueError at step(),
    before any weight changes (gamma 1e200: the lr was -inf, then an OverflowError)."""

    class Bad(optim.Schedule):
        def factor(self, step):
            return math.nan

    ps, grads = make_params()
    before = [p.data.copy() for p in ps]
    for sched in (Bad(), optim.StepDecay(1, gamma=1e200)):
        opt = optim.SGD(ps, lr=0.1, schedule=sched)
        opt.step_count = 5
        with pytest.raises(ValueError, match="learning rate"):
            opt.step()
        for p, b in zip(ps, before):
            np.testing.assert_array_equal(p.data, b)


@pytest.mark.parametrize("kw, message", [
    ({"schedule": lambda step: 1.0}, "^schedule must be a qkv_native.optim.Schedule or None, got function"),
    ({"schedule": "cosine"}, "^schedule must be a qkv_native.optim.Schedule or None, got str"),
    ({"decay": True}, r"^decay must be a function f\(name, param\) -> bool or None, got bool"),
])
def test_schedule_and_decay_are_checked_at_construction(kw, message):
    """A function as schedule failed at the first step ('function' object has no attribute
    'factor'), decay=True at attach ('bool' object is not callable)."""
    for cls in (optim.SGD, optim.Adam, optim.AdamW):
        with pytest.raises(TypeError, match=message):
            cls(lr=0.1, **kw)


def test_state_loads_only_into_an_attached_optimizer():
    """A state loaded before attach was taken (step count 2), then reset to 0 by the attach:
    a schedule silently started over."""
    src = optim.SGD(nn.Linear(2, 2), lr=0.1, schedule=optim.StepDecay(1, 0.5))
    src.step()
    src.step()
    opt = optim.SGD(lr=0.1, schedule=optim.StepDecay(1, 0.5))
    with pytest.raises(RuntimeError, match="^the optimizer has no parameters to load a state into: attach it"):
        opt.load_state_dict(*src.state_dict())
    opt.attach(nn.Linear(2, 2)).load_state_dict(*src.state_dict())
    assert opt.step_count == 2 and opt.current_lr() == 0.025


def test_betas_and_a_numpy_step_count():
    """betas=(0.9, 0.99, 0.1) failed with 'too many values to unpack', ('0.9', 0.99) in a
    comparison, neither naming betas; a state whose step count is a NumPy integer was refused."""
    for betas in ((0.9, 0.99, 0.1), 0.9, None):
        with pytest.raises(TypeError, match=r"^betas must be a pair \(beta1, beta2\)"):
            optim.Adam(lr=0.1, betas=betas)
    with pytest.raises(TypeError, match=r"^betas\[0\] must be a real number, got str"):
        optim.AdamW(lr=0.1, betas=("0.9", 0.99))
    assert optim.Adam(lr=0.1, betas=np.array([0.8, 0.9])).betas == (0.8, 0.9)
    src = optim.Adam(nn.Linear(2, 2), lr=0.1)
    src.step()
    arrays, meta = src.state_dict()
    opt = optim.Adam(nn.Linear(2, 2), lr=0.1)
    opt.load_state_dict(arrays, dict(meta, step_count=np.int64(1)))
    assert opt.step_count == 1 and type(opt.step_count) is int


def test_params_as_a_dict_and_bad_items():
    """A {name: Parameter} dict was iterated as its names, each split into letters ('parameter
    'w' must be a Parameter, got str'); a string failed with IndexError."""
    model = nn.Linear(2, 3)
    opt = optim.SGD(dict(model.named_parameters()), lr=0.1)
    assert [n for n, _ in opt.params] == ["weight", "bias"] and opt.params[0][1] is model.weight
    for bad, what in (("ab", "str at 0"), ([model.weight, 3], "int at 1"), ([("a", model.bias, 1)], "tuple at 0")):
        with pytest.raises(TypeError, match=f"^params must hold Parameters or \\(name, Parameter\\) pairs, got {what}"):
            optim.SGD(bad, lr=0.1)


def test_parameter_names_must_be_unique():
    """Bug: two Parameters under one name were taken, and the state of one was lost in
    state_dict (keyed by name)."""
    p1, p2 = nn.Parameter(np.ones(2, F32)), nn.Parameter(np.ones(2, F32))
    with pytest.raises(ValueError, match="'w'"):
        optim.SGD([("w", p1), ("w", p2)], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="'0'"):
        optim.SGD([p1, ("0", p2)], lr=0.1)


def test_clip_grad_norm_max_norm_is_checked():
    """Bug: max_norm = -1 flipped the gradients' signs, NaN disabled clipping silently."""
    ps, grads = make_params()
    for p, g in zip(ps, grads[0]):
        p.grad[...] = g
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError, match="max_norm"):
            optim.clip_grad_norm(ps, bad)
    with pytest.raises(TypeError, match="max_norm"):
        optim.clip_grad_norm(ps, "1")
    before = [p.grad.copy() for p in ps]
    optim.clip_grad_norm(ps, math.inf)  # no clipping
    for p, b in zip(ps, before):
        np.testing.assert_array_equal(p.grad, b)


def test_adam_update_step_must_be_positive():
    """Bug: step = 0 divided by 1 - beta**0 = 0 (ZeroDivisionError)."""
    from qkv_native import functional as F

    w, g, m, v = (np.zeros(3, F32) for _ in range(4))
    args = (w, g, m, v, np.array([0, 3]), np.array([True]))
    for step, err in ((0, ValueError), (-1, ValueError), (1.0, TypeError)):
        with pytest.raises(err, match="step"):
            F.adam_update(*args, lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=True, step=step)
