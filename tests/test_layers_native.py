"""Native dense layer (bias + GELU in the GEMM store), LayerNorm, GELU and softmax
cross-entropy vs float64."""

import numpy as np
import pytest

import qkv_native as qn
from qkv_native import _core
from qkv_native import reference as ref

EPS = 2.0**-24  # unit roundoff of float32


def randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("rows,d_in,d_out", [(1, 7, 17), (13, 65, 33), (130, 384, 129), (3, 700, 40), (63, 1, 65)])
@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear(isa, rng, rows, d_in, d_out, activation, with_bias):
    x, w = randn(rng, rows, d_in), randn(rng, d_in, d_out, scale=d_in**-0.5)
    b = randn(rng, d_out) if with_bias else None
    got = qn.linear(x, w, b, activation=activation)
    want = ref.linear(x, w, b, activation=activation)
    # |x|·|w| bounds the GEMM's rounding; GELU is 1.13-Lipschitz and adds ~1e-7 relative
    bound = 8 * np.sqrt(d_in) * EPS * (np.abs(x) @ np.abs(w) + (np.abs(b) if b is not None else 0)) + 4e-7 * np.abs(want) + 1e-30
    assert np.all(np.abs(got - want) <= bound), float(np.max(np.abs(got - want) - bound))


def test_linear_batched_leading_axes_and_out(rng):
    x, w, b = randn(rng, 2, 3, 16), randn(rng, 16, 8), randn(rng, 8)
    out = np.empty((2, 3, 8), np.float32)
    got = qn.linear(x, w, b, activation="gelu", out=out)
    assert got is out
    np.testing.assert_allclose(out, ref.linear(x, w, b, "gelu"), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="activation"):
        qn.linear(x, w, b, activation="relu6")
    with pytest.raises(ValueError, match="d_in"):
        qn.linear(x, w[:5], b)
    with pytest.raises(TypeError, match="float32"):
        qn.linear(x.astype(np.float64), w, b)


def test_empty_last_axis_with_leading_axes():
    # (2, 3, 0) went through reshape(-1, 0), which NumPy cannot infer: its own error
    # ("cannot reshape array of size 0") where a 2-D (6, 0) x worked
    x, b = np.zeros((2, 3, 0), np.float32), np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(qn.linear(x, np.zeros((0, 5), np.float32), b), np.broadcast_to(b, (2, 3, 5)))
    out = np.empty((2, 3, 0), np.float32)
    assert qn.linear(np.ones((2, 3, 4), np.float32), np.zeros((4, 0), np.float32), out=out) is out
    assert qn.gelu(x).shape == (2, 3, 0)
    assert qn.gelu_backward(x, x).shape == (2, 3, 0)
    with pytest.raises(ValueError, match="x must have at least one feature"):
        qn.layer_norm(x, np.zeros(0, np.float32), np.zeros(0, np.float32))


@pytest.mark.parametrize("rows,d_in,d_out", [(1, 7, 17), (13, 65, 33), (200, 1536, 64)])
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_linear_adds_to_out_with_beta(isa, rng, rows, d_in, d_out, activation):
    """The encoder's residual connections: activation(x·w + b + beta·out) in the GEMM's
    store, for a plain and a packed w (d_in 1536: K in two blocks, beta only on the first)."""
    x, w, b = randn(rng, rows, d_in), randn(rng, d_in, d_out, scale=d_in**-0.5), randn(rng, d_out)
    y0 = randn(rng, rows, d_out)
    pre = x.astype(np.float64) @ w.astype(np.float64) + b + 0.5 * y0.astype(np.float64)
    want = ref.gelu(pre) if activation == "gelu" else pre
    bound = 8 * np.sqrt(d_in) * EPS * (np.abs(x) @ np.abs(w) + np.abs(b) + np.abs(y0)) + 4e-7 * np.abs(want) + 1e-30
    for weight in (w, qn.pack_weight(w)):
        y = y0.copy()
        assert _core.linear(x, weight, b, activation, y, 0.5) is y
        assert np.all(np.abs(y - want) <= bound), float(np.max(np.abs(y - want) - bound))
    with pytest.raises(ValueError, match="pass out"):
        _core.linear(x, w, b, "none", None, 1.0)


@pytest.mark.parametrize("n", [1, 7, 16, 17, 64, 384, 1000])
def test_gelu_forward_backward(isa, rng, n):
    x = np.concatenate([randn(rng, 3, n, scale=3.0), np.linspace(-12, 12, 3 * n, dtype=np.float32).reshape(3, n)])
    dy = randn(rng, *x.shape)
    y, dx = qn.gelu(x), qn.gelu_backward(x, dy)
    # erfc fit: fractional error < 1.2e-7, plus a few float32 roundings; in the left
    # tail exp(-x²/2) is computed from x² in float32, whose absolute error x²·2^-24
    # becomes a relative error of the result
    x64 = x.astype(np.float64)
    rel = 1e-6 + 2 * x64 * x64 * EPS
    want_y, want_dx = ref.gelu(x), ref.gelu_backward(x, dy)
    assert np.all(np.abs(y - want_y) <= rel * np.abs(want_y) + 1e-37)
    assert np.all(np.abs(dx - want_dx) <= 2 * rel * np.abs(dy) * (1 + np.abs(x64)) + 1e-37)


def test_gelu_special_values():
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -100.0, 100.0], np.float32)
    y = qn.gelu(x[None])[0]
    assert y[0] == 0 and y[1] == 0 and y[2] == np.inf and y[3] == 0 and np.isnan(y[4])
    assert y[5] == 0 and y[6] == 100.0


@pytest.mark.parametrize("rows,n", [(1, 1), (5, 7), (33, 64), (17, 384), (4, 1023)])
def test_layer_norm_forward_backward(isa, rng, rows, n):
    x = randn(rng, rows, n, scale=2.0) + 3.0
    w, b = randn(rng, n), randn(rng, n)
    y, mean, rstd = qn.layer_norm(x, w, b, eps=1e-5)
    ry, rmean, rrstd = ref.layer_norm(x, w, b, eps=1e-5)
    tol = 16 * np.sqrt(n) * EPS
    np.testing.assert_allclose(mean, rmean, rtol=tol, atol=tol * 4)
    np.testing.assert_allclose(rstd, rrstd, rtol=tol * 8)
    np.testing.assert_allclose(y, ry, rtol=tol * 8, atol=tol * 8 * (np.abs(w) * 4 + np.abs(b)).max())
    dy = randn(rng, rows, n)
    dx, dw, db = qn.layer_norm_backward(dy, x, w, mean, rstd)
    rdx, rdw, rdb = ref.layer_norm_backward(dy, x, w, rmean, rrstd)
    scale = np.abs(dy).max() * np.abs(w).max() * rrstd.max()
    np.testing.assert_allclose(dx, rdx, atol=64 * np.sqrt(n) * EPS * scale)
    np.testing.assert_allclose(dw, rdw, atol=64 * np.sqrt(rows) * EPS * np.abs(dy).max() * 4)
    np.testing.assert_allclose(db, rdb, atol=64 * np.sqrt(rows) * EPS * np.abs(dy).max())


def test_layer_norm_leading_axes_and_thread_independence(rng, restore_threads):
    x, w, b = randn(rng, 4, 50, 24), randn(rng, 24), randn(rng, 24)
    y, mean, rstd = qn.layer_norm(x, w, b)
    assert y.shape == x.shape and mean.shape == (4, 50) and rstd.shape == (4, 50)
    dy = randn(rng, *x.shape)
    results = []
    for n in (1, 2):
        qn.set_num_threads(n)
        results.append(qn.layer_norm_backward(dy, x, w, mean, rstd))
    for a, c in zip(*results):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("c", [1, 7, 17, 65, 1000])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_softmax_cross_entropy(isa, rng, c, label_smoothing):
    rows = 37
    logits = randn(rng, rows, c, scale=3.0)
    logits[0] += 1e4  # huge logits: computed from x - max, nothing is lost
    logits[1] -= 1e4
    targets = rng.integers(0, c, rows)
    targets[[2, 5]] = -7  # ignored rows
    loss, grad = qn.softmax_cross_entropy(logits, targets, label_smoothing=label_smoothing, ignore_index=-7)
    want_loss, want_grad = ref.softmax_cross_entropy(logits, targets, label_smoothing=label_smoothing, ignore_index=-7)
    # a row's loss is a handful of float32 operations on log(Σ exp) (Σ of c terms) and the shifted logits
    n_valid = rows - 2
    assert abs(loss - want_loss) <= 64 * EPS * (1 + np.log(c)) * (1 + np.abs(logits - logits.max(1, keepdims=True)).max())
    # softmax probabilities to a few ulp (exp polynomial + sum of c terms), over n_valid
    assert np.all(np.abs(grad - want_grad) <= (16 + np.sqrt(c)) * EPS * (np.abs(want_grad) + 1.0 / (c * n_valid)) + 1e-30)
    assert not grad[[2, 5]].any()
    if c == 1:
        assert loss == 0.0 and not grad.any()  # one class: probability 1, no loss


@pytest.mark.parametrize("logits,target,want", [
    ([1.0, 2.0, -np.inf], 0, 1.0 + np.log1p(np.exp(-1.0))),  # a -inf logit of weight 0 adds nothing
    ([1.0, 2.0, -np.inf], 2, np.inf),                          # the target's probability is 0
    ([3e38, -3e38], 0, 0.0),                                   # the shifted logits' sum overflows
])
def test_softmax_cross_entropy_without_smoothing_extremes(isa, logits, target, want):
    """Without smoothing the loss is -log p[target] alone: its mean-logit term, -inf or NaN
    here, once entered as 0·inf = NaN. (torch gives the same values.)"""
    x = np.array([logits], np.float32)
    loss, _ = qn.softmax_cross_entropy(x, np.array([target]))
    want_ref, _ = ref.softmax_cross_entropy(x, np.array([target]))
    assert loss == pytest.approx(want, rel=1e-6) and want_ref == pytest.approx(want, rel=1e-12)


def test_softmax_cross_entropy_edge_cases(rng, restore_threads):
    logits = randn(rng, 3000, 17)
    targets = rng.integers(0, 17, 3000).astype(np.int32)
    out = np.empty_like(logits)
    results = []
    for n in (1, 2):
        qn.set_num_threads(n)
        results.append(qn.softmax_cross_entropy(logits, targets, label_smoothing=0.2, out=out)[0])
    assert results[0] == results[1]  # row losses summed in row order
    loss0, grad0 = qn.softmax_cross_entropy(logits[:4], np.full(4, -100))
    assert loss0 == 0.0 and not grad0.any()  # every row ignored
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 17\).*targets\[1\] = 17"):
        qn.softmax_cross_entropy(logits[:3], np.array([0, 17, 2]))
    with pytest.raises(ValueError, match=r"targets must have shape \(3,\)"):
        qn.softmax_cross_entropy(logits[:3], np.array([0, 1]))
    with pytest.raises(TypeError, match="targets must be a numpy array of int32 or int64"):
        qn.softmax_cross_entropy(logits[:3], np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="label_smoothing"):
        qn.softmax_cross_entropy(logits[:3], np.array([0, 1, 2]), label_smoothing=1.0)
    with pytest.raises(TypeError, match="logits must have dtype float32"):
        qn.softmax_cross_entropy(logits[:3].astype(np.float64), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="out must not overlap"):
        qn.softmax_cross_entropy(logits, targets, out=logits)


@pytest.mark.parametrize("shape", [(1,), (7,), (17,), (5, 13), (65, 3, 7), (70000,)])
@pytest.mark.parametrize("seed", [0, 12345, 2**40 + 7, 2**64 - 1])
def test_dropout(isa, rng, shape, seed):
    x = randn(rng, *shape)
    y, mask = qn.functional.dropout(x, 0.3, seed)
    want_y, want_mask = ref.dropout(x, 0.3, seed)
    np.testing.assert_array_equal(mask != 0, want_mask != 0)  # the same drops on every ISA
    np.testing.assert_array_equal(mask[mask != 0], np.float32(1 / 0.7))
    np.testing.assert_array_equal(y, x * mask)  # one float32 product
    assert np.all(np.abs(y - want_y) <= 2 * EPS * np.abs(want_y))


def test_dropout_statistics_threads_and_errors(rng, restore_threads):
    x = np.ones((300, 1000), np.float32)
    results = []
    for n in (1, 2):
        qn.set_num_threads(n)
        results.append(qn.functional.dropout(x, 0.1, 99)[0])
    np.testing.assert_array_equal(results[0], results[1])
    dropped = (results[0] == 0).mean()
    assert abs(dropped - 0.1) < 5 * np.sqrt(0.1 * 0.9 / x.size)
    # neighbouring seeds and neighbouring elements are not correlated
    other = qn.functional.dropout(x, 0.5, 100)[0] == 0
    half = qn.functional.dropout(x, 0.5, 99)[0] == 0
    assert abs((other == half).mean() - 0.5) < 0.01
    assert abs((half[:, 1:] == half[:, :-1]).mean() - 0.5) < 0.01
    assert not qn.functional.dropout(x, 0.0, 1)[1].min() == 0  # p = 0 keeps everything
    with pytest.raises(ValueError, match="p must"):
        qn.functional.dropout(x, 1.0, 1)
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        qn.functional.dropout(x[:, ::2], 0.1, 1)
    with pytest.raises(TypeError, match="x must have dtype float32"):
        qn.functional.dropout(x.astype(np.float64), 0.1, 1)


def test_integer_and_real_arguments_are_not_coerced():
    # int() truncated ignore_index=2.5 to 2 (row ignored), read '1' and True as 1, and
    # dropout's seed 2.7 as 2; seed -1 or 2**64 and ignore_index 2**70 were pybind11's
    # 'incompatible function arguments'; p='0.5' was a comparison TypeError naming nothing
    logits, targets = np.zeros((2, 3), np.float32), np.array([2, 1])
    for bad in (2.5, True, "1"):
        with pytest.raises(TypeError, match="ignore_index must be an integer"):
            qn.softmax_cross_entropy(logits, targets, ignore_index=bad)
    with pytest.raises(ValueError, match="ignore_index must be an integer in"):
        qn.softmax_cross_entropy(logits, targets, ignore_index=2**70)
    assert qn.softmax_cross_entropy(logits, targets, ignore_index=np.int32(2))[0] == np.float32(np.log(3))
    x = np.ones(8, np.float32)
    for bad in (2.7, True, "3"):
        with pytest.raises(TypeError, match="seed must be an integer"):
            qn.functional.dropout(x, 0.5, bad)
    for bad in (-1, 2**64):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 18446744073709551615\]"):
            qn.functional.dropout(x, 0.5, bad)
    for bad in ("0.5", True):
        with pytest.raises(TypeError, match="p must be a real number"):
            qn.functional.dropout(x, bad, 1)
    np.testing.assert_array_equal(qn.functional.dropout(x, 0.5, np.uint64(2**64 - 1))[1],
                                  qn.functional.dropout(x, 0.5, 2**64 - 1)[1])
