"""Tests of the float64 NumPy reference implementations (qkv_native.reference).

The reference module is loaded directly from its file so these tests run
without the compiled native extension (``qkv_native/__init__.py`` imports it).
Every check compares against an independent computation: naive Python loops,
np.einsum, or central finite differences.
"""

import importlib.util
import math
import pathlib

import numpy as np
import pytest

_REFERENCE_PATH = (pathlib.Path(__file__).resolve().parent.parent
                   / "python" / "qkv_native" / "reference.py")


def _load_reference():
    spec = importlib.util.spec_from_file_location(
        "_qkv_native_reference_under_test", _REFERENCE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _load_reference()

# Floating-point errors that must never happen in the reference. (Underflow in
# exp() of very negative logits is legitimate and stays ignored.)
STRICT = dict(divide="raise", over="raise", invalid="raise")


# ----------------------------------------------------------------------------
# independent naive implementations
# ----------------------------------------------------------------------------


def naive_attention(q, k, v, causal=False, key_lengths=None, bias=None, scale=None):
    """Per-(batch, head, query) loop over keys using plain Python floats."""
    batch, num_heads, seq_q, d_head = q.shape
    num_kv_heads, seq_k, d_v = k.shape[1], k.shape[2], v.shape[3]
    group = num_heads // num_kv_heads
    if scale is None:
        scale = 1.0 / math.sqrt(d_head)
    full_bias = (np.zeros((batch, num_heads, seq_q, seq_k)) if bias is None
                 else np.broadcast_to(bias, (batch, num_heads, seq_q, seq_k)))
    o = np.zeros((batch, num_heads, seq_q, d_v))
    lse = np.full((batch, num_heads, seq_q), -np.inf)
    for b in range(batch):
        for h in range(num_heads):
            kv = h // group
            for i in range(seq_q):
                logits, keys = [], []
                for j in range(seq_k):
                    if causal and j - (seq_k - seq_q) > i:
                        continue
                    if key_lengths is not None and j >= key_lengths[b]:
                        continue
                    if full_bias[b, h, i, j] == -np.inf:
                        continue
                    dot = sum(float(q[b, h, i, d]) * float(k[b, kv, j, d])
                              for d in range(d_head))
                    logits.append(dot * scale + float(full_bias[b, h, i, j]))
                    keys.append(j)
                if not logits:
                    continue
                top = max(logits)
                weights = [math.exp(x - top) for x in logits]
                total = sum(weights)
                lse[b, h, i] = top + math.log(total)
                for w, j in zip(weights, keys):
                    o[b, h, i] += (w / total) * v[b, kv, j].astype(np.float64)
    return o, lse


# ----------------------------------------------------------------------------
# attention cases
# ----------------------------------------------------------------------------


def make_case(seed, *, batch=2, heads=2, kv_heads=None, seq_q=4, seq_k=4,
              d=3, d_v=None, causal=False, key_lengths=None, bias=None,
              scale=None, neg_inf_frac=0.0):
    """Random q, k, v plus keyword arguments for attention.

    bias: None, "full" (batch, heads, seq_q, seq_k) or "bcast" (heads, 1, seq_k).
    neg_inf_frac: fraction of bias entries set to -inf.
    """
    rng = np.random.default_rng(seed)
    kv_heads = heads if kv_heads is None else kv_heads
    d_v = d if d_v is None else d_v
    q = rng.standard_normal((batch, heads, seq_q, d))
    k = rng.standard_normal((batch, kv_heads, seq_k, d))
    v = rng.standard_normal((batch, kv_heads, seq_k, d_v))
    kwargs = dict(causal=causal, scale=scale)
    if key_lengths is not None:
        kwargs["key_lengths"] = np.asarray(key_lengths, dtype=np.int64)
    if bias is not None:
        shape = {"full": (batch, heads, seq_q, seq_k), "bcast": (heads, 1, seq_k)}[bias]
        b = rng.standard_normal(shape)
        b[rng.random(shape) < neg_inf_frac] = -np.inf
        kwargs["bias"] = b
    return q, k, v, kwargs


CASES = {
    "plain": dict(),
    "causal_square": dict(causal=True),
    "causal_q_lt_k": dict(causal=True, seq_q=3, seq_k=5),
    "causal_q_gt_k": dict(causal=True, seq_q=5, seq_k=3),
    "key_lengths": dict(key_lengths=[2, 4], seq_k=4),
    "key_lengths_zero": dict(key_lengths=[0, 3]),
    "bias_full": dict(bias="full"),
    "bias_bcast": dict(bias="bcast", seq_q=3, seq_k=5),
    "bias_neg_inf": dict(bias="full", neg_inf_frac=0.3),
    "gqa_4_2": dict(heads=4, kv_heads=2),
    "gqa_4_1": dict(heads=4, kv_heads=1, seq_q=3, seq_k=5),
    "d_v_differs": dict(d=3, d_v=5),
    "custom_scale": dict(scale=0.37),
    "everything": dict(heads=4, kv_heads=2, seq_q=3, seq_k=5, d=4, d_v=2,
                       causal=True, key_lengths=[5, 3], bias="full",
                       neg_inf_frac=0.2, scale=0.8),
    "everything_q_gt_k": dict(heads=4, kv_heads=1, seq_q=5, seq_k=4, d=3,
                              d_v=4, causal=True, key_lengths=[4, 2],
                              bias="bcast", neg_inf_frac=0.1),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_attention_matches_naive(name):
    q, k, v, kwargs = make_case(1, **CASES[name])
    with np.errstate(**STRICT):
        o, lse = ref.attention(q, k, v, **kwargs)
    o_naive, lse_naive = naive_attention(q, k, v, **kwargs)
    assert o.dtype == np.float64 and lse.dtype == np.float64
    assert o.shape == o_naive.shape and lse.shape == lse_naive.shape
    assert not np.isnan(o).any() and not np.isnan(lse).any()
    np.testing.assert_allclose(o, o_naive, rtol=1e-12, atol=1e-12)
    finite = np.isfinite(lse_naive)
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    np.testing.assert_allclose(lse[finite], lse_naive[finite], rtol=1e-12, atol=1e-12)
    assert np.all(lse[~finite] == -np.inf)


def test_causal_bottom_right_pattern():
    """With q = 0 the softmax is uniform over visible keys; one-hot V exposes it."""
    for seq_q, seq_k in [(2, 4), (4, 4), (4, 2)]:
        q = np.zeros((1, 1, seq_q, 2))
        k = np.ones((1, 1, seq_k, 2))
        v = np.eye(seq_k)[None, None]  # d_v = seq_k
        o, lse = ref.attention(q, k, v, causal=True)
        expected_mask = np.array([[j <= i + seq_k - seq_q for j in range(seq_k)]
                                  for i in range(seq_q)])
        counts = expected_mask.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            expected_o = np.where(counts[:, None] > 0,
                                  expected_mask / counts[:, None], 0.0)
            expected_lse = np.where(counts > 0, np.log(counts), -np.inf)
        np.testing.assert_allclose(o[0, 0], expected_o, atol=1e-15)
        np.testing.assert_array_equal(lse[0, 0], expected_lse)


def test_fully_masked_rows():
    rng = np.random.default_rng(7)
    batch, heads, seq_q, seq_k, d = 2, 2, 5, 3, 3
    q = rng.standard_normal((batch, heads, seq_q, d))
    k = rng.standard_normal((batch, heads, seq_k, d))
    v = rng.standard_normal((batch, heads, seq_k, d))
    bias = rng.standard_normal((batch, heads, seq_q, seq_k))
    bias[1, 0, 3, :] = -np.inf                       # a row masked by bias alone
    key_lengths = np.array([3, 0])                    # batch 1: no keys at all
    with np.errstate(**STRICT):
        o, lse = ref.attention(q, k, v, causal=True, key_lengths=key_lengths,
                               bias=bias)
    # causal with seq_q > seq_k: rows 0, 1 see no key (j <= i - 2).
    assert np.all(o[:, :, :2] == 0.0) and np.all(lse[:, :, :2] == -np.inf)
    assert np.all(o[1] == 0.0) and np.all(lse[1] == -np.inf)
    assert np.all(np.isfinite(lse[0, :, 2:]))
    assert not np.isnan(o).any() and not np.isnan(lse).any()

    # All-(-inf) bias on every row.
    with np.errstate(**STRICT):
        o2, lse2 = ref.attention(q, k, v, bias=np.full((seq_q, seq_k), -np.inf))
    assert np.all(o2 == 0.0) and np.all(lse2 == -np.inf)

    # Backward: zero gradients, no NaN, no warnings.
    do = rng.standard_normal(o.shape)
    with np.errstate(**STRICT):
        dq, dk, dv = ref.attention_backward(do, q, k, v, o, lse, causal=True,
                                            key_lengths=key_lengths, bias=bias)
    for g in (dq, dk, dv):
        assert np.all(np.isfinite(g))
    assert np.all(dq[:, :, :2] == 0.0)
    assert np.all(dq[1] == 0.0) and np.all(dk[1] == 0.0) and np.all(dv[1] == 0.0)
    assert np.all(dq[1, 0, 3] == 0.0)
    with np.errstate(**STRICT):
        grads = ref.attention_backward(np.ones_like(o2), q, k, v, o2, lse2,
                                       bias=np.full((seq_q, seq_k), -np.inf))
    for g in grads:
        assert np.all(g == 0.0)


def test_attention_float32_inputs_give_float64():
    q, k, v, kwargs = make_case(3, heads=4, kv_heads=2, causal=True)
    o64, lse64 = ref.attention(q, k, v, **kwargs)
    q32, k32, v32 = (t.astype(np.float32) for t in (q, k, v))
    o, lse = ref.attention(q32, k32, v32, **kwargs)
    assert o.dtype == np.float64 and lse.dtype == np.float64
    o_naive, lse_naive = naive_attention(q32, k32, v32, **kwargs)
    np.testing.assert_allclose(o, o_naive, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(o, o64, rtol=1e-5, atol=1e-5)
    grads = ref.attention_backward(o.astype(np.float32), q32, k32, v32, o, lse, **kwargs)
    assert all(g.dtype == np.float64 for g in grads)


def test_attention_rejects_bad_gqa():
    q = np.zeros((1, 3, 2, 4))
    k = np.zeros((1, 2, 2, 4))
    with pytest.raises(ValueError):
        ref.attention(q, k, k)


# ----------------------------------------------------------------------------
# attention backward: central finite differences
# ----------------------------------------------------------------------------

EPS = 1e-6


def numerical_grad(f, x, eps=EPS):
    """Central-difference gradient of scalar f w.r.t. every entry of x (in place)."""
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for idx in range(flat.size):
        orig = flat[idx]
        flat[idx] = orig + eps
        plus = f()
        flat[idx] = orig - eps
        minus = f()
        flat[idx] = orig
        gflat[idx] = (plus - minus) / (2 * eps)
    return grad


GRAD_CASES = {
    "plain": dict(seq_q=3, seq_k=4),
    "causal_square": dict(causal=True, seq_q=4, seq_k=4),
    "causal_q_lt_k": dict(causal=True, seq_q=3, seq_k=5),
    "causal_q_gt_k": dict(causal=True, seq_q=5, seq_k=3),
    "key_lengths": dict(key_lengths=[2, 0], seq_q=3, seq_k=4),
    "bias": dict(bias="full", neg_inf_frac=0.25, seq_q=3, seq_k=4),
    "bias_bcast": dict(bias="bcast", seq_q=4, seq_k=3),
    "bias_bcast_causal_gqa": dict(bias="bcast", heads=4, kv_heads=2, causal=True, key_lengths=[3, 1],
                                  neg_inf_frac=0.2, seq_q=3, seq_k=4),
    "gqa_4_2": dict(heads=4, kv_heads=2, seq_q=3, seq_k=3),
    "gqa_4_1": dict(heads=4, kv_heads=1, seq_q=3, seq_k=4, causal=True),
    "d_v_differs": dict(d=3, d_v=4, seq_q=3, seq_k=4, scale=0.6),
    "everything": dict(heads=4, kv_heads=2, seq_q=4, seq_k=3, d=4, d_v=3,
                       causal=True, key_lengths=[3, 2], bias="full",
                       neg_inf_frac=0.2, scale=0.9),
}


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_attention_backward_finite_differences(name):
    q, k, v, kwargs = make_case(11, **GRAD_CASES[name])
    rng = np.random.default_rng(12)
    g = rng.standard_normal((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))

    def loss():
        return float(np.sum(ref.attention(q, k, v, **kwargs)[0] * g))

    with np.errstate(**STRICT):
        o, lse = ref.attention(q, k, v, **kwargs)
        dq, dk, dv = ref.attention_backward(g, q, k, v, o, lse, **kwargs)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape

    for analytic, tensor in ((dq, q), (dk, k), (dv, v)):
        numeric = numerical_grad(loss, tensor)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)
    # The check must not be vacuous.
    assert np.abs(dq).max() > 1e-3 and np.abs(dk).max() > 1e-3 and np.abs(dv).max() > 1e-3

    if "bias" in kwargs:  # the bias gradient, summed over the axes the bias broadcasts over
        bias = kwargs["bias"]
        with np.errstate(**STRICT):
            *rest, dbias = ref.attention_backward(g, q, k, v, o, lse, bias_grad=True, **kwargs)
        for a, b in zip(rest, (dq, dk, dv)):
            np.testing.assert_array_equal(a, b)
        assert dbias.shape == bias.shape
        numeric = numerical_grad(loss, bias)  # -inf entries stay -inf: numeric 0
        np.testing.assert_allclose(dbias, numeric, rtol=1e-6, atol=1e-8)
        assert np.abs(dbias).max() > 1e-3
        assert np.all(dbias[np.isneginf(bias)] == 0.0)


# ----------------------------------------------------------------------------
# QKV projection
# ----------------------------------------------------------------------------


def make_projection(seed, batch=2, seq=3, d_model=5, num_heads=4, num_kv_heads=2,
                    d_head=2, with_bias=True):
    rng = np.random.default_rng(seed)
    d_q, d_kv = num_heads * d_head, num_kv_heads * d_head
    x = rng.standard_normal((batch, seq, d_model))
    w_q = rng.standard_normal((d_model, d_q))
    w_k = rng.standard_normal((d_model, d_kv))
    w_v = rng.standard_normal((d_model, d_kv))
    biases = ([rng.standard_normal(d_q), rng.standard_normal(d_kv),
               rng.standard_normal(d_kv)] if with_bias else [None, None, None])
    return x, [w_q, w_k, w_v], biases


@pytest.mark.parametrize("num_heads,num_kv_heads,with_bias",
                         [(2, None, True), (4, 2, True), (4, 1, False), (3, 3, False)])
def test_qkv_project_matches_loops(num_heads, num_kv_heads, with_bias):
    kv = num_heads if num_kv_heads is None else num_kv_heads
    x, ws, bs = make_projection(2, num_heads=num_heads, num_kv_heads=kv,
                                with_bias=with_bias)
    q, k, v = ref.qkv_project(x, *ws, *bs, num_heads=num_heads,
                              num_kv_heads=num_kv_heads)
    d_head = ws[0].shape[1] // num_heads
    batch, seq, d_model = x.shape
    for out, w, bvec, heads in ((q, ws[0], bs[0], num_heads), (k, ws[1], bs[1], kv),
                                (v, ws[2], bs[2], kv)):
        assert out.shape == (batch, heads, seq, d_head) and out.dtype == np.float64
        for b in range(batch):
            for s in range(seq):
                row = [sum(x[b, s, m] * w[m, c] for m in range(d_model))
                       + (0.0 if bvec is None else bvec[c]) for c in range(w.shape[1])]
                for h in range(heads):
                    np.testing.assert_allclose(
                        out[b, h, s], row[h * d_head:(h + 1) * d_head],
                        rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (4, 2), (4, 1)])
def test_qkv_project_backward_finite_differences(num_heads, num_kv_heads):
    x, ws, bs = make_projection(5, num_heads=num_heads, num_kv_heads=num_kv_heads)
    rng = np.random.default_rng(6)
    q, k, v = ref.qkv_project(x, *ws, *bs, num_heads=num_heads,
                              num_kv_heads=num_kv_heads)
    gq, gk, gv = (rng.standard_normal(t.shape) for t in (q, k, v))

    def loss():
        q, k, v = ref.qkv_project(x, *ws, *bs, num_heads=num_heads,
                                  num_kv_heads=num_kv_heads)
        return float(np.sum(q * gq) + np.sum(k * gk) + np.sum(v * gv))

    grads = ref.qkv_project_backward(x, *ws, gq, gk, gv)
    assert len(grads) == 7
    for analytic, tensor in zip(grads, [x, *ws, *bs]):
        assert analytic.shape == tensor.shape
        numeric = numerical_grad(loss, tensor)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------
# matmul
# ----------------------------------------------------------------------------


def _operand(rng, batch, rows, cols, trans):
    shape = (cols, rows) if trans else (rows, cols)
    if batch is not None:
        shape = (batch,) + shape
    return rng.standard_normal(shape)


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("batch_a,batch_b", [(None, None), (3, 3), (None, 3), (3, None)])
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (-0.7, 0.0), (1.3, 0.5), (1.0, -2.0)])
def test_matmul_matches_einsum(trans_a, trans_b, batch_a, batch_b, alpha, beta):
    rng = np.random.default_rng(21)
    m, k, n = 4, 5, 3
    a = _operand(rng, batch_a, m, k, trans_a)
    b = _operand(rng, batch_b, k, n, trans_b)
    batched = batch_a is not None or batch_b is not None
    out_shape = (3, m, n) if batched else (m, n)
    c = rng.standard_normal(out_shape)
    if beta == 0.0:
        c[...] = np.nan  # must not be read when beta == 0

    a_idx = ("z" if batch_a else "") + ("km" if trans_a else "mk")
    b_idx = ("z" if batch_b else "") + ("nk" if trans_b else "kn")
    out_idx = ("z" if batched else "") + "mn"
    expected = alpha * np.einsum(f"{a_idx},{b_idx}->{out_idx}", a, b)
    if beta != 0.0:
        expected = expected + beta * c

    got = ref.matmul(a, b, trans_a=trans_a, trans_b=trans_b, alpha=alpha,
                     beta=beta, c=c)
    assert got.shape == out_shape and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    if beta == 0.0:
        np.testing.assert_allclose(
            ref.matmul(a, b, trans_a=trans_a, trans_b=trans_b, alpha=alpha),
            expected, rtol=1e-12, atol=1e-12)


def test_matmul_float32_and_errors():
    rng = np.random.default_rng(22)
    a = rng.standard_normal((2, 3)).astype(np.float32)
    b = rng.standard_normal((3, 4)).astype(np.float32)
    got = ref.matmul(a, b)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, np.einsum("mk,kn->mn", a.astype(np.float64),
                                              b.astype(np.float64)), rtol=1e-12)
    with pytest.raises(ValueError):
        ref.matmul(a, a)                                   # inner dims differ
    with pytest.raises(ValueError):
        ref.matmul(np.zeros((2, 3, 4)), np.zeros((3, 4, 5)))  # batch differs
    with pytest.raises(ValueError):
        ref.matmul(a, b, beta=1.0)                         # c missing
