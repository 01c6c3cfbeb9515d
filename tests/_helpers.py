"""Shared helpers of the native test suite: inputs and error bounds.

Error model (one for every op)
------------------------------
The reference twins (``qkv_native.reference``) compute in float64 from the very
float32 values the native op receives, so every difference is the native op's
own float32 rounding. For a float32 sum of K terms t_p, the probabilistic bound
of Higham & Mary (SIAM J. Sci. Comput. 2019) is

    |error| <= lam * sqrt(K) * u * sum_p |t_p|,     u = 2**-24 (unit roundoff),

violated with probability <= 2*exp(-lam**2 / 2) per element. We use lam = C = 8
(probability ~ 1e-14 per element). So the bound of each output element is
``C * sqrt(K) * u`` times an *absolute-value twin* of the computation: the same
formula evaluated on |inputs| (for a GEMM, |A|·|B|). Attention adds one factor:
an error delta in the scores S moves softmax(S)·V by at most 2·delta·(P·|V|),
and delta itself is ~ sqrt(d_head)·u·|S terms|, hence ``(1 + s_abs)`` where
s_abs is the largest |scale·q|·|k| + |bias| (+ log seq_k for the lse shift).
A final rounding of the result (2u·|want|) is added, and for attention the
gradual-underflow term of the model, |fl(x) - x| <= u|x| + eta with
eta = 2**-126 (FLT_MIN): probabilities below FLT_MIN (e.g. exp(-150)) are
denormal or 0 in float32, so each visible (query, key) pair may contribute an
absolute error of up to ETA_OPS·eta times its |terms| (ETA_OPS = 4 operations
per pair may underflow: exp, the P∘(dP−D) product and the two FMAs using it).
Nothing here is tuned to make a test pass: the constants are fixed by the model.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from qkv_native import reference as ref

U = 2.0**-24  # float32 unit roundoff
C = 8.0  # Higham-Mary lambda: per-element failure probability ~ 2*exp(-32)
ETA = 2.0**-126  # FLT_MIN: absolute error of a result that underflows
ETA_OPS = 4.0

# Thread counts the determinism tests compare: 1, 2, 3 (more threads than this
# machine's 2 cores is fine: bit-identity must hold for any count) and every core
# this process may run on, where there are more (a 16-core machine checks 16).
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
THREAD_COUNTS = tuple(sorted({1, 2, 3, _CORES}))


def randn(rng, *shape):
    """Standard-normal float32 array."""
    return rng.standard_normal(shape).astype(np.float32)


def at_line_offset(x, off):
    """A float32 copy of x whose data starts `off` floats past a 64-byte cache line.

    NumPy's own large arrays start 16 bytes into a line (off = 4); see Note
    [misaligned operands] in cpp/include/qkv/kernels.h.
    """
    buf = np.empty(x.size + 32, np.float32)
    start = (-(buf.ctypes.data // 4)) % 16 + off
    y = buf[start : start + x.size].reshape(x.shape)
    assert y.ctypes.data % 64 == 4 * off
    y[...] = x
    return y


def assert_within(got, want, bound, name="result"):
    """|got - want| <= bound elementwise; non-finite entries must agree exactly.

    bound: array broadcastable to want (0 where the answer must be exact).
    """
    got64 = np.asarray(got, dtype=np.float64)
    want64 = np.asarray(want, dtype=np.float64)
    assert got64.shape == want64.shape, f"{name}: shape {got64.shape} != {want64.shape}"
    assert not np.isnan(got64).any(), f"{name}: NaN at {np.argwhere(np.isnan(got64))[:5].tolist()}"
    fin = np.isfinite(want64)
    bad_nonfinite = ~fin & (got64 != want64)
    assert not bad_nonfinite.any(), (
        f"{name}: non-finite mismatch at {np.argwhere(bad_nonfinite)[:5].tolist()}: "
        f"got {got64[bad_nonfinite][:5]}, want {want64[bad_nonfinite][:5]}"
    )
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), want64.shape)
    err = np.abs(np.where(fin, got64, 0.0) - np.where(fin, want64, 0.0))
    over = err > bound
    if over.any():
        ratio = np.where(bound > 0, err / np.where(bound > 0, bound, 1.0), np.inf)
        worst = np.unravel_index(np.argmax(np.where(over, ratio, -1.0)), want64.shape)
        raise AssertionError(
            f"{name}: {int(over.sum())} of {want64.size} elements outside the error bound; "
            f"worst at {tuple(int(i) for i in worst)}: got {got64[worst]!r}, want {want64[worst]!r}, "
            f"|err| {err[worst]:.3e} > bound {bound[worst]:.3e}; max |err| {err.max():.3e}"
        )


def rounding(want):
    """Final rounding of a float32 result."""
    return 2.0 * U * np.abs(np.asarray(want, dtype=np.float64))


def gemm_bound(abs_terms, k):
    """Bound for a float32 sum of k terms whose absolute values sum to abs_terms."""
    return C * math.sqrt(max(k, 1)) * U * abs_terms


# ----------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------


def expand_kv(t, num_heads):
    return np.repeat(np.asarray(t, dtype=np.float64), num_heads // t.shape[1], axis=1)


def reduce_kv(t, num_kv_heads):
    b, h, s, d = t.shape
    return t.reshape(b, num_kv_heads, h // num_kv_heads, s, d).sum(axis=2)


def combined_bias(bias, mask, shape):
    """The additive bias the reference sees for native (bias, mask) arguments."""
    if bias is None and mask is None:
        return None
    add = np.zeros(shape)
    if bias is not None:
        add = add + np.asarray(bias, dtype=np.float64)
    if mask is not None:
        add = add + np.where(mask, 0.0, -np.inf)
    return np.broadcast_to(add, shape)


def default_scale(q, scale):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def score_abs(q, k, bias, scale, seq_k):
    """s_abs of the module docstring: the largest |score term| (plus the lse shift)."""
    num_heads = q.shape[1]
    qa = np.abs(np.asarray(q, dtype=np.float64))
    ka = expand_kv(np.abs(np.asarray(k, dtype=np.float64)), num_heads)
    s = abs(scale) * np.einsum("bhid,bhjd->bhij", qa, ka)
    if bias is not None:
        b = np.asarray(bias, dtype=np.float64)
        s = s + np.where(np.isfinite(b), np.abs(b), 0.0)
    return (float(s.max()) if s.size else 0.0) + math.log(seq_k + 1.0)


def probabilities(q, k, *, causal, key_lengths, bias, scale):
    """The reference P = softmax(S) (0 on masked entries) and the visible mask, float64."""
    s, allowed, _ = ref._scores_and_mask(np.asarray(q, np.float64), np.asarray(k, np.float64), causal,
                                         key_lengths, bias, scale)
    _, lse = ref.attention(q, k, np.zeros(k.shape[:3] + (1,)), causal=causal, key_lengths=key_lengths,
                           bias=bias, scale=scale)
    return ref._probabilities(s, allowed, lse), allowed.astype(np.float64)


def attention_forward_bounds(q, k, v, o_ref, lse_ref, *, causal=False, key_lengths=None, bias=None, scale=None):
    """Error bounds for (o, lse) of the native forward against the reference.

    bias: the reference's additive bias (mask already folded in as -inf).
    """
    scale = default_scale(q, scale)
    seq_k, d_head = k.shape[2], q.shape[3]
    s_abs = score_abs(q, k, bias, scale, seq_k)
    # P·|V|: the reference with |v| (P does not depend on v)
    o_abs, _ = ref.attention(q, k, np.abs(v), causal=causal, key_lengths=key_lengths, bias=bias, scale=scale)
    _, allowed = probabilities(q, k, causal=causal, key_lengths=key_lengths, bias=bias, scale=scale)
    underflow = ETA_OPS * ETA * np.einsum("bhij,bhjd->bhid", allowed, expand_kv(np.abs(v), q.shape[1]))
    factor = C * math.sqrt(d_head + seq_k) * U * (1.0 + s_abs)
    bound_o = factor * o_abs + underflow + rounding(o_ref)
    lse_fin = np.where(np.isfinite(lse_ref), lse_ref, 0.0)
    bound_lse = np.where(np.isfinite(lse_ref), factor + rounding(lse_fin), 0.0)
    return bound_o, bound_lse


def attention_backward_bounds(do, q, k, v, o, grads_ref, *, causal=False, key_lengths=None, bias=None, scale=None,
                              bias_grad_shape=None):
    """Error bounds for (dq, dk, dv) of the native backward against the reference.

    Absolute-value twin of  dS = P∘(dO·Vᵀ − rowsum(dO∘O)),  dQ = scale·dS·K,
    dK = scale·dSᵀ·Q,  dV = Pᵀ·dO  (GQA: dK, dV summed over each group).
    With bias_grad_shape (the shape of the user's bias), grads_ref holds dbias too and
    a fourth bound follows: dS's, summed over the axes the bias broadcasts over, plus
    the rounding of that sum of n terms.
    """
    scale = default_scale(q, scale)
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    seq_q, seq_k, d_head, d_v = q.shape[2], k.shape[2], q.shape[3], v.shape[3]
    p, allowed = probabilities(q, k, causal=causal, key_lengths=key_lengths, bias=bias, scale=scale)
    a_do, a_o = np.abs(np.asarray(do, np.float64)), np.abs(np.asarray(o, np.float64))
    a_q = np.abs(np.asarray(q, np.float64))
    a_k, a_v = expand_kv(np.abs(k), num_heads), expand_kv(np.abs(v), num_heads)
    dp_abs = np.einsum("bhid,bhjd->bhij", a_do, a_v) + np.sum(a_do * a_o, axis=-1, keepdims=True)

    def twins(pp):
        ds_abs = pp * dp_abs
        dq_abs = abs(scale) * np.einsum("bhij,bhjd->bhid", ds_abs, a_k)
        dk_abs = reduce_kv(abs(scale) * np.einsum("bhij,bhid->bhjd", ds_abs, a_q), num_kv_heads)
        dv_abs = reduce_kv(np.einsum("bhij,bhid->bhjd", pp, a_do), num_kv_heads)
        return dq_abs, dk_abs, dv_abs

    s_abs = score_abs(q, k, bias, scale, seq_k)
    group = num_heads // num_kv_heads
    k_len = max(d_head, d_v) + max(seq_k, seq_q * group)
    factor = C * math.sqrt(k_len) * U * (1.0 + s_abs)
    bounds = tuple(factor * a + ETA_OPS * ETA * (1.0 + abs(scale)) * e + rounding(g)
                   for a, e, g in zip(twins(p), twins(allowed), grads_ref[:3]))
    if bias_grad_shape is None:
        return bounds
    ds_abs = p * dp_abs
    n = ds_abs.size // max(1, math.prod(bias_grad_shape))  # terms summed into each dbias element
    summed = (factor + C * math.sqrt(n) * U) * sum_to_shape(ds_abs, bias_grad_shape)
    underflow = ETA_OPS * ETA * sum_to_shape(allowed.astype(np.float64), bias_grad_shape)
    return bounds + (summed + underflow + rounding(grads_ref[3]),)


def sum_to_shape(g, shape):
    """g (batch, heads, seq_q, seq_k) summed over the axes along which `shape` broadcasts."""
    b4 = (1,) * (4 - len(shape)) + tuple(shape)
    for ax in range(4):
        if b4[ax] == 1 and g.shape[ax] != 1:
            g = g.sum(axis=ax, keepdims=True)
    return g.reshape(shape)


# ----------------------------------------------------------------------------
# attention cases shared by the forward, backward and torch tests
# ----------------------------------------------------------------------------


def make_attention_case(rng, *, batch=1, heads=1, kv_heads=None, seq_q=7, seq_k=7, d_head=8, d_v=None,
                        causal=False, key_lengths=None, bias=None, mask=None, scale=None, q_scale=1.0):
    """Random float32 q, k, v and the native keyword arguments of one attention case.

    bias: None | "qk" (seq_q, seq_k) | "qk_T" the same as a transposed view (key stride seq_q) |
          "q1" (seq_q, 1) (key stride 0) | "h1k" (1, heads, 1, seq_k) | "b11k" (batch, 1, 1, seq_k) |
          "1hqk" (1, heads, seq_q, seq_k) | "full" (batch, heads, seq_q,
          seq_k) with 10% -inf | "rows_inf" full with whole rows -inf | "ramp" (seq_k,) rising
          along the keys, so the running max moves in every key block.
    mask: None | "qk" (seq_q, seq_k) bool with one all-False row | "b1qk" (batch, 1, seq_q, seq_k).
    Returns q, k, v, kwargs (native) and ref_bias (the reference's additive bias).
    """
    kv_heads = heads if kv_heads is None else kv_heads
    d_v = d_head if d_v is None else d_v
    q = (randn(rng, batch, heads, seq_q, d_head) * np.float32(q_scale)).astype(np.float32)
    k = randn(rng, batch, kv_heads, seq_k, d_head)
    v = randn(rng, batch, kv_heads, seq_k, d_v)
    kwargs = dict(causal=causal, scale=scale)
    if key_lengths is not None:
        kwargs["key_lengths"] = np.asarray(key_lengths, dtype=np.int64)
    full = (batch, heads, seq_q, seq_k)
    b = None
    if bias == "qk":
        b = randn(rng, seq_q, seq_k)
    elif bias == "qk_T":
        b = randn(rng, seq_k, seq_q).T
    elif bias == "q1":
        b = randn(rng, seq_q, 1)
    elif bias == "h1k":
        b = randn(rng, 1, heads, 1, seq_k)
    elif bias == "full":
        b = randn(rng, *full)
        b[rng.random(full) < 0.1] = -np.inf
    elif bias == "rows_inf":
        b = randn(rng, *full)
        b[..., ::3, :] = -np.inf
    elif bias == "b11k":
        b = randn(rng, batch, 1, 1, seq_k)
    elif bias == "1hqk":
        b = randn(rng, 1, heads, seq_q, seq_k)
    elif bias == "ramp":
        b = (0.5 * np.arange(seq_k)).astype(np.float32)
    elif bias is not None:
        raise ValueError(bias)
    m = None
    if mask == "qk":
        m = rng.random((seq_q, seq_k)) < 0.7
        m[seq_q // 2] = False
    elif mask == "b1qk":
        m = rng.random((batch, 1, seq_q, seq_k)) < 0.8
    elif mask is not None:
        raise ValueError(mask)
    if b is not None:
        kwargs["bias"] = b
    if m is not None:
        kwargs["mask"] = m
    return q, k, v, kwargs, combined_bias(b, m, full)


def ref_kwargs(kwargs, ref_bias):
    """The reference's keyword arguments for native ones (mask folded into the bias)."""
    out = {k: v for k, v in kwargs.items() if k not in ("bias", "mask")}
    out["bias"] = ref_bias
    return out


ATTENTION_CASES = {
    "1x1": dict(seq_q=1, seq_k=1, d_head=8),
    "small": dict(batch=2, heads=2, seq_q=7, seq_k=17, d_head=24),
    "causal_q_lt_k": dict(heads=4, kv_heads=2, seq_q=17, seq_k=63, d_head=32, causal=True),
    "causal_square_mqa": dict(heads=2, kv_heads=1, seq_q=65, seq_k=65, d_head=64, causal=True),
    "causal_q_gt_k": dict(seq_q=129, seq_k=65, d_head=80, causal=True),
    "d_v_differs": dict(heads=2, seq_q=63, seq_k=129, d_head=96, d_v=48),
    "long_causal": dict(seq_q=300, seq_k=300, d_head=128, causal=True),
    "key_lengths": dict(batch=3, heads=2, seq_q=17, seq_k=65, d_head=32, key_lengths=[0, 65, 30]),
    "key_lengths_causal": dict(batch=2, heads=2, kv_heads=1, seq_q=65, seq_k=129, d_head=24, d_v=40,
                               causal=True, key_lengths=[1, 100]),
    "bias_qk": dict(batch=2, heads=2, seq_q=17, seq_k=63, d_head=64, bias="qk"),
    "bias_h1k": dict(batch=2, heads=4, kv_heads=2, seq_q=7, seq_k=129, d_head=32, bias="h1k"),
    "bias_full_neg_inf": dict(batch=2, heads=2, seq_q=33, seq_k=65, d_head=24, bias="full"),
    "bias_rows_neg_inf": dict(heads=2, seq_q=17, seq_k=17, d_head=8, bias="rows_inf"),
    "mask": dict(batch=2, heads=2, seq_q=17, seq_k=65, d_head=32, mask="qk"),
    "everything": dict(batch=2, heads=4, kv_heads=2, seq_q=63, seq_k=129, d_head=24, d_v=8, causal=True,
                       key_lengths=[129, 50], bias="h1k", mask="b1qk", scale=0.7),
    # every feature across several key blocks (the forward's are 192 keys at d <= 80)
    "everything_long": dict(batch=2, heads=4, kv_heads=2, seq_q=70, seq_k=450, d_head=24, d_v=8, causal=True,
                            key_lengths=[450, 200], bias="h1k", mask="b1qk", scale=0.7),
    "ramp_sharp": dict(seq_q=17, seq_k=300, d_head=32, bias="ramp", scale=2.0),
    "large_scores": dict(heads=2, seq_q=65, seq_k=129, d_head=64, q_scale=8.0),
    "gqa_6_3": dict(heads=6, kv_heads=3, seq_q=7, seq_k=7, d_head=8, d_v=128),
    "seq_k_1": dict(batch=2, seq_q=7, seq_k=1, d_head=128),
    "d_v_1": dict(heads=2, kv_heads=1, seq_q=129, seq_k=7, d_head=16, d_v=1),
    "custom_scale": dict(seq_q=65, seq_k=65, d_head=64, scale=0.05),
    "negative_scale": dict(heads=2, seq_q=17, seq_k=33, d_head=24, scale=-0.3),
    "bias_transposed_view": dict(heads=2, seq_q=65, seq_k=129, d_head=32, bias="qk_T", causal=True),
    "bias_per_query": dict(batch=2, heads=2, seq_q=17, seq_k=63, d_head=16, bias="q1"),
    "d_head_160": dict(seq_q=33, seq_k=200, d_head=160, d_v=24, causal=True),  # key block of 64
    # 5 query blocks (the last of 16 rows) over 8 heads: forward tasks of several query
    # blocks each (Note [query blocks per task]), the padded sequence's blocks ending early
    "query_groups": dict(batch=2, heads=4, kv_heads=2, seq_q=400, seq_k=400, d_head=64, causal=True,
                         key_lengths=[400, 250]),
    # 8 (batch, kv head) pairs: the backward's one-pass schedule, tasks of 5 key blocks
    # (Note [key blocks per task]) with a fused full-shape bias gradient
    "key_groups_one_pass": dict(batch=2, heads=4, seq_q=300, seq_k=400, d_head=64, causal=True,
                                key_lengths=[400, 170], bias="full"),
    # one query per head (Note [decode tasks]): a task per kv group (its 4 heads as dot
    # products) and key chunk; sequences of 2 chunks (the last ragged), of one chunk
    # (700 keys: chunks have at least 512) and of none
    "decode_chunks_gqa": dict(batch=3, heads=8, kv_heads=2, seq_q=1, seq_k=1300, d_head=64, causal=True,
                              key_lengths=[1300, 700, 0]),
    # 6 heads on one kv head (more than 4 rows: a packed Qᵀ block), 10% of the scores -inf
    "decode_mqa_bias": dict(batch=2, heads=6, kv_heads=1, seq_q=1, seq_k=1100, d_head=24, d_v=40, bias="full",
                            scale=0.7),
    # the running max moves in every key block, so every chunk's partial max differs
    "decode_ramp": dict(heads=2, seq_q=1, seq_k=2000, d_head=32, bias="ramp", scale=2.0),
}


def torch_one_thread():
    """torch (the test skips without it), limited to one thread: two OpenMP runtimes
    (torch's and ours) spinning on the same 2 cores slow each other down ~40x."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    return torch
