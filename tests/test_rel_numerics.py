"""Numerical reliability: extreme scores, fully masked rows, NaN/Inf policy, denormals,
every head-dim tail, and determinism (fixed thread count and across thread counts).

NaN/Inf policy tested here (README "Guarantees"): a NaN in an input makes non-finite
exactly the output rows whose mathematical value depends on it (an infinity at most
those rows: k = -inf is just a key of weight 0), and every other row is bit-identical
to the run without it. A k or v row hidden from query i by causal, a mask, a -inf bias
or key_lengths does not reach row i, even when it shares a key block with keys that
row i sees (Note [non-finite rows] in cpp/src/attention_common.h). The rows are
derived by propagating "bad" through the dependency graph of the forward
(S = q·kᵀ·scale + bias, lse, o = P·v) and backward (P, D = rowsum(do∘o), dP = do·vᵀ,
dS, dq = dS·k, dk = dSᵀ·q, dv = Pᵀ·do) over the visible (query, key) pairs only.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import qkv_native as qn
from qkv_native import reference as ref

from _helpers import (
    THREAD_COUNTS,
    assert_within,
    attention_backward_bounds,
    attention_forward_bounds,
    gemm_bound,
    make_attention_case,
    randn,
    ref_kwargs,
    rounding,
)

F32 = np.float32


def forward_and_backward(q, k, v, kw, do):
    o, lse = qn.attention(q, k, v, return_lse=True, **kw)
    return (o, lse) + tuple(qn.attention_backward(do, q, k, v, o, lse, **kw))


def check_against_reference(q, k, v, kw, rb, do):
    o, lse = qn.attention(q, k, v, return_lse=True, **kw)
    rkw = ref_kwargs(kw, rb)
    o_ref, lse_ref = ref.attention(q, k, v, **rkw)
    bo, bl = attention_forward_bounds(q, k, v, o_ref, lse_ref, **rkw)
    assert_within(o, o_ref, bo, "o")
    assert_within(lse, lse_ref, bl, "lse")
    grads = qn.attention_backward(do, q, k, v, o, lse, **kw)
    want = ref.attention_backward(do, q, k, v, o, lse, **rkw)
    for name, g, w, b in zip(("dq", "dk", "dv"), grads, want, attention_backward_bounds(do, q, k, v, o, want, **rkw)):
        assert_within(g, w, b, name)
    return o, lse, grads


# ----------------------------------------------------------------------------
# scores of magnitude 1e4
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_scores_of_magnitude_1e4(isa, rng, causal):
    """|q·kᵀ·scale| ~ 1e4 and a ±1e4 bias: the online softmax must not overflow (no inf,
    no NaN) and o, lse, gradients stay within the error model (which grows with |S|)."""
    q, k, v, kw, rb = make_attention_case(rng, heads=2, seq_q=33, seq_k=70, d_head=24, causal=causal, q_scale=1.0)
    q = (q * F32(1e4 / 24**0.5 * 0.5)).astype(F32)  # scores ~ 1e4
    bias = (rng.choice([-1e4, 0.0, 1e4], size=(33, 70))).astype(F32)
    kw["bias"] = bias
    rb = np.broadcast_to(bias.astype(np.float64), (1, 2, 33, 70))
    s = np.einsum("bhid,bhjd->bhij", q.astype(np.float64), k.astype(np.float64)) / math.sqrt(24)
    assert np.abs(s).max() > 5e3
    do = randn(rng, 1, 2, 33, 24)
    o, lse, grads = check_against_reference(q, k, v, kw, rb, do)
    assert np.isfinite(o).all() and np.isfinite(lse).all() and np.abs(lse).max() > 5e3
    for g in grads:
        assert np.isfinite(g).all()


def test_extreme_scores_never_overflow(isa, rng):
    """Scores near the float32 limit (|S| ~ 1e37): every row is still a convex combination of v."""
    q, k, v = randn(rng, 1, 1, 17, 8), randn(rng, 1, 1, 40, 8), randn(rng, 1, 1, 40, 8)
    o, lse = qn.attention(q * F32(1e18), k * F32(1e18), v, return_lse=True, scale=1.0)
    assert not np.isnan(o).any() and not np.isnan(lse).any()
    assert (np.abs(o) <= np.abs(v).max() * (1 + 1e-5)).all()


@pytest.mark.parametrize("causal", [False, True])
def test_every_key_position_can_hold_the_max(isa, rng, causal):
    """Query i's largest score is key i's (unit keys, q = 1e18·k: the others trail by
    ~1e35), so its softmax is one-hot and o_i = v_i. A key left out of the running max,
    at any position of the score product's micro-tiles, would overflow its
    exponential and turn the row into NaN. (400 keys: causal blocks below the diagonal
    too; a ragged last tile.)"""
    k = randn(rng, 1, 2, 400, 8)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = randn(rng, 1, 2, 400, 8)
    o = qn.attention(k * F32(1e18), k, v, scale=1.0, causal=causal)
    np.testing.assert_allclose(o, v, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------
# fully masked rows: o = 0, lse = -inf, zero gradients, for every way to mask
# ----------------------------------------------------------------------------


def _fully_masked_cases(rng):
    b, h, sq, sk = 2, 2, 9, 6
    bias = randn(rng, b, h, sq, sk)
    bias[0, 1, 4] = -np.inf
    mask = np.ones((sq, sk), bool)
    mask[7] = False
    return {
        "causal_seq_q_gt_seq_k": (dict(causal=True), [(slice(None), slice(None), slice(0, sq - sk))]),
        "key_lengths_0": (dict(key_lengths=np.array([0, sk])), [(0, slice(None), slice(None))]),
        "bias_row_neg_inf": (dict(bias=bias), [(0, 1, 4)]),
        "mask_row_false": (dict(mask=mask), [(slice(None), slice(None), 7)]),
        "everything_masked": (dict(mask=np.zeros((sq, sk), bool)), [(slice(None),) * 3]),
    }


@pytest.mark.parametrize("name", ["causal_seq_q_gt_seq_k", "key_lengths_0", "bias_row_neg_inf", "mask_row_false",
                                  "everything_masked"])
def test_fully_masked_rows(isa, rng, name):
    kw, rows = _fully_masked_cases(rng)[name]
    q, k, v = randn(rng, 2, 2, 9, 16), randn(rng, 2, 2, 6, 16), randn(rng, 2, 2, 6, 16)
    o, lse = qn.attention(q, k, v, return_lse=True, **kw)
    do = randn(rng, *o.shape)
    dq, dk, dv = qn.attention_backward(do, q, k, v, o, lse, **kw)
    for t in (o, dq, dk, dv):
        assert np.isfinite(t).all()
    dead = np.zeros(o.shape[:3], bool)
    for r in rows:
        dead[r] = True
    assert np.all(o[dead] == 0.0) and np.all(np.isneginf(lse[dead])) and np.all(dq[dead] == 0.0)
    assert np.isfinite(lse[~dead]).all()
    if name == "everything_masked":
        assert np.all(dk == 0.0) and np.all(dv == 0.0)


def test_varlen_sequence_without_keys(isa, rng):
    """A packed sequence with 0 keys: its rows are 0 with lse -inf and zero gradients."""
    q, k = randn(rng, 7, 2, 8), randn(rng, 3, 2, 8)
    cu_q, cu_k = np.array([0, 4, 7]), np.array([0, 0, 3])
    o, lse = qn.attention_varlen(q, k, k, cu_q, cu_k, return_lse=True)
    assert np.all(o[:4] == 0.0) and np.all(np.isneginf(lse[:, :4])) and np.isfinite(lse[:, 4:]).all()
    dq, dk, dv = qn.attention_varlen_backward(randn(rng, *o.shape), q, k, k, o, lse, cu_q, cu_k)
    assert np.all(dq[:4] == 0.0) and np.isfinite(dq).all() and np.isfinite(dk).all() and np.isfinite(dv).all()


# ----------------------------------------------------------------------------
# NaN / Inf: only the affected rows
# ----------------------------------------------------------------------------

def _expected_bad(allowed, group, qbad, kbad, vbad, biasbad, dobad):
    """Rows of o/lse/dq/dk/dv whose value depends on a bad input (see module docstring).

    allowed: (B, H, SQ, SK), which keys each query attends; group: query heads per kv head;
    qbad, dobad: (B, H, SQ); kbad, vbad: (B, HKV, SK); biasbad: (B, H, SQ, SK).
    """
    b_, h_, sq, sk = allowed.shape
    kb = np.repeat(kbad, group, axis=1)[:, :, None, :]
    vb = np.repeat(vbad, group, axis=1)[:, :, None, :]
    a = allowed
    s_bad = a & (qbad[..., None] | kb | biasbad)
    lse_bad = s_bad.any(-1)
    o_bad = lse_bad | (a & vb).any(-1)
    p_bad = a & (s_bad | lse_bad[..., None])
    d_bad = dobad | o_bad
    dp_bad = a & (dobad[..., None] | vb)
    ds_bad = a & (p_bad | dp_bad | d_bad[..., None])
    dq_bad = (a & (ds_bad | kb)).any(-1)

    def reduce(t):  # (B, H, SK) -> (B, HKV, SK): any over each group
        return t.reshape(b_, h_ // group, group, sk).any(axis=2)

    dk_bad = reduce((a & (ds_bad | qbad[..., None])).any(-2))
    dv_bad = reduce((a & (p_bad | dobad[..., None])).any(-2))
    return dict(o=o_bad, lse=lse_bad, dq=dq_bad, dk=dk_bad, dv=dv_bad)


def _check_rows(label, got, clean, must, value, where):
    """Non-finite rows of got are exactly `must` (an infinity may vanish); the rest equal clean."""
    rows_bad = ~np.isfinite(got) if label == "lse" else ~np.isfinite(got).all(-1)
    extra = np.argwhere(rows_bad & ~must).tolist()
    missing = np.argwhere(must & ~rows_bad).tolist()
    assert not extra, f"{label}: rows {extra[:8]} are not finite but do not depend on the {where} value"
    # a NaN must show; an infinity may legitimately vanish (k = -inf is a key with weight 0)
    assert not (missing and np.isnan(value)), f"{label}: rows {missing[:8]} depend on the NaN but are finite"
    np.testing.assert_array_equal(got[~must], clean[~must], err_msg=f"{label}: unaffected rows changed")


# name: (where the bad value goes, value, masking)
NAN_CASES = {
    "q_nan": ("q", np.nan, {}),
    "q_inf": ("q", np.inf, {}),
    "k_nan": ("k", np.nan, {}),
    "k_inf": ("k", -np.inf, {}),
    "v_nan": ("v", np.nan, {}),
    "v_inf": ("v", np.inf, {}),
    "bias_nan": ("bias", np.nan, {}),
    "bias_pos_inf": ("bias", np.inf, {}),
    "do_nan": ("do", np.nan, {}),
    "q_nan_causal": ("q", np.nan, dict(causal=True)),
    "k_nan_causal": ("k", np.nan, dict(causal=True)),
    "k_inf_causal": ("k", np.inf, dict(causal=True)),
    "v_nan_causal": ("v", np.nan, dict(causal=True)),
    "v_inf_causal": ("v", -np.inf, dict(causal=True)),
    "do_nan_causal": ("do", np.nan, dict(causal=True)),
    "do_inf_causal": ("do", np.inf, dict(causal=True)),
    "bias_nan_causal": ("bias", np.nan, dict(causal=True)),
    "bias_inf_causal": ("bias", np.inf, dict(causal=True)),
    "k_nan_past_key_lengths": ("k", np.nan, dict(key_lengths=True)),
    "v_nan_past_key_lengths": ("v", np.nan, dict(key_lengths=True)),
    "q_nan_mask": ("q", np.nan, dict(mask=True)),
    "k_nan_masked_key": ("k", np.nan, dict(mask=True)),
    "v_nan_masked_key": ("v", np.nan, dict(mask=True)),
    "v_inf_masked_key": ("v", np.inf, dict(mask=True)),
    "do_nan_mask": ("do", np.nan, dict(mask=True)),
    "bias_nan_masked_by_mask": ("bias", np.nan, dict(mask=True)),
    "bias_inf_masked_by_mask": ("bias", np.inf, dict(mask=True)),
    "q_nan_bias_masked": ("q", np.nan, dict(bias=True)),
    "k_nan_bias_masked_key": ("k", np.nan, dict(bias=True)),
    "v_nan_bias_masked_key": ("v", np.nan, dict(bias=True)),
    "do_nan_bias_masked": ("do", np.nan, dict(bias=True)),
    "v_nan_causal_and_mask": ("v", np.nan, dict(causal=True, mask=True)),
}

# name: (batch, num_heads, num_kv_heads, seq_q, seq_k, d_head). "one_block": every key in one
# block; "blocks": several query and key blocks, the bad key in a block that straddles the
# causal diagonal; "one_pass": batch·num_kv_heads >= 8, the backward's fused dq pass (Note
# [backward schedule]); "decode": seq_q <= 4, the forward's few-queries path.
NAN_SHAPES = {
    "one_block": (1, 2, 1, 20, 20, 16),
    "blocks": (1, 2, 1, 150, 200, 16),
    "one_pass": (4, 4, 2, 40, 130, 8),
    "decode": (2, 4, 1, 3, 130, 16),
}


@pytest.mark.parametrize("shape", list(NAN_SHAPES))
@pytest.mark.parametrize("name", list(NAN_CASES))
def test_non_finite_inputs_reach_only_the_affected_rows(isa, rng, name, shape):
    where, value, masking = NAN_CASES[name]
    B, H, HKV, SQ, SK, D = NAN_SHAPES[shape]
    q, k, v, do = randn(rng, B, H, SQ, D), randn(rng, B, HKV, SK, D), randn(rng, B, HKV, SK, D), randn(rng, B, H, SQ, D)
    bias = np.zeros((B, H, SQ, SK), F32)
    kw = dict(causal=masking.get("causal", False))
    # bad query row (head 0 of batch 0) and bad key; with causal the key is hidden from
    # the first queries and seen by the last
    bad_row = min(5, SQ - 2)
    bad_key = 13 if SK <= 20 else SK - 2 if SQ <= 4 else 113
    if masking.get("key_lengths"):
        kw["key_lengths"] = np.array([bad_key - 3] + [SK] * (B - 1))  # key bad_key is padding
    if masking.get("mask"):
        m = rng.random((SQ, SK)) < 0.8  # a scattered mask, and ...
        m[:, bad_key] = False  # nobody sees the bad key ...
        m[SQ - 1, bad_key] = True  # ... except the last query
        m[bad_row, :] = True
        m[bad_row, bad_key] = False
        m[bad_row, ::3] = False  # the bad query row sees some keys of every block
        kw["mask"] = m
    if masking.get("bias"):
        bias[:, :, : SQ // 2 + 1, bad_key] = -np.inf  # the first queries do not see the bad key
        bias[:, :, bad_row, 1::4] = -np.inf
    clean = dict(q=q, k=k, v=v, bias=bias, do=do)
    dirty = {n: t.copy() for n, t in clean.items()}
    if where == "q":
        dirty["q"][0, 0, bad_row, 3] = value
    elif where in ("k", "v"):
        dirty[where][0, 0, bad_key, 2] = value
    elif where == "bias":
        dirty["bias"][0, 0, bad_row, bad_key] = value
    else:
        dirty["do"][0, 0, bad_row, 3] = value

    def run(t):
        args = dict(kw)
        if masking.get("bias") or where == "bias":
            args["bias"] = t["bias"]
        return forward_and_backward(t["q"], t["k"], t["v"], args, t["do"])

    want_clean = run(clean)
    got = dict(zip(("o", "lse", "dq", "dk", "dv"), run(dirty)))
    ref_bias = np.where(np.isneginf(bias), -np.inf, 0.0)
    allowed = ref._allowed_mask(B, H, SQ, SK, causal=kw["causal"], key_lengths=kw.get("key_lengths"), bias=ref_bias)
    if "mask" in kw:
        allowed &= kw["mask"]
    bad = {n: ~np.isfinite(dirty[n]) for n in dirty}
    must = _expected_bad(allowed, H // HKV, bad["q"].any(-1), bad["k"].any(-1), bad["v"].any(-1), bad["bias"],
                         bad["do"].any(-1))
    if where != "bias" and not masking.get("key_lengths"):  # some rows see the bad value
        assert any(t.any() for t in must.values())
    for (label, g), c in zip(got.items(), want_clean):
        _check_rows(label, g, c, must[label], value, where)


@pytest.mark.parametrize("where", ["q", "k", "v", "do"])
def test_non_finite_inputs_varlen_causal(isa, rng, where):
    """Packed sequences (causal): a NaN reaches only the rows of its own sequence that see it."""
    H, HKV, D = 2, 1, 16
    lq, lk = [70, 130], [100, 200]
    cu_q, cu_k = np.array([0, 70, 200]), np.array([0, 100, 300])
    q, k, v, do = randn(rng, 200, H, D), randn(rng, 300, HKV, D), randn(rng, 300, HKV, D), randn(rng, 200, H, D)
    bad_row, bad_key = 5, 113  # of sequence 1
    clean = dict(q=q, k=k, v=v, do=do)
    dirty = {n: t.copy() for n, t in clean.items()}
    if where in ("q", "do"):
        dirty[where][cu_q[1] + bad_row, 0, 3] = np.nan
    else:
        dirty[where][cu_k[1] + bad_key, 0, 2] = np.nan

    def run(t):
        o, lse = qn.attention_varlen(t["q"], t["k"], t["v"], cu_q, cu_k, causal=True, return_lse=True)
        return (o, lse) + tuple(qn.attention_varlen_backward(t["do"], t["q"], t["k"], t["v"], o, lse, cu_q, cu_k,
                                                             causal=True))

    got, want = run(dirty), run(clean)
    for b in range(2):
        sq, sk = lq[b], lk[b]
        rq, rk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        # (seq, heads, ...) -> (1, heads, seq, ...)
        bad = {n: np.moveaxis(~np.isfinite(dirty[n][rq if n in ("q", "do") else rk]), 0, 1)[None].any(-1)
               for n in dirty}
        allowed = ref._allowed_mask(1, H, sq, sk, causal=True)
        must = _expected_bad(allowed, H // HKV, bad["q"], bad["k"], bad["v"], np.zeros((1, H, sq, sk), bool),
                             bad["do"])
        for label, g, c in zip(("o", "lse", "dq", "dk", "dv"), got, want):
            if label == "lse":
                g, c = g[None, :, rq], c[None, :, rq]
            else:
                sl = rk if label in ("dk", "dv") else rq
                g, c = np.moveaxis(g[sl], 0, 1)[None], np.moveaxis(c[sl], 0, 1)[None]
            _check_rows(label, g, c, must[label], np.nan, where)


def test_matmul_nan_reaches_only_its_row_and_column(isa, rng):
    a, b = randn(rng, 33, 40), randn(rng, 40, 21)
    clean = qn.matmul(a, b)
    a[7, 3], b[5, 11] = np.nan, np.inf
    got = qn.matmul(a, b)
    bad = np.zeros(got.shape, bool)
    bad[7, :] = True
    bad[:, 11] = True
    assert not np.isfinite(got[7]).all() and not np.isfinite(got[:, 11]).all()
    np.testing.assert_array_equal(got[~bad], clean[~bad])


def test_projection_nan_reaches_only_its_token(isa, rng):
    x, w = randn(rng, 2, 9, 16), randn(rng, 16, 3 * 2 * 8)
    clean = qn.qkv_project_packed(x, w, num_heads=2)
    x[1, 4, 7] = np.nan
    got = qn.qkv_project_packed(x, w, num_heads=2)
    for g, c in zip(got, clean):
        assert np.isnan(g[1, :, 4]).all()
        keep = np.ones(g.shape[:3], bool)
        keep[1, :, 4] = False
        np.testing.assert_array_equal(g[keep], c[keep])


# ----------------------------------------------------------------------------
# denormals
# ----------------------------------------------------------------------------

TINY = np.finfo(np.float32).smallest_subnormal


def test_denormal_inputs(isa, rng):
    """Subnormal inputs are computed (not flushed to zero): within the error model plus
    the absolute underflow term (2**-149 per operation)."""
    a = (randn(rng, 17, 40) * F32(1e-39)).astype(F32)
    assert (np.abs(a[a != 0]) < np.finfo(np.float32).tiny).all()
    b = randn(rng, 40, 19)
    got = qn.matmul(a, b)
    want = ref.matmul(a, b)
    abs_terms = ref.matmul(np.abs(a), np.abs(b))
    assert_within(got, want, gemm_bound(abs_terms, 40) + rounding(want) + 4 * 41 * float(TINY), "matmul")
    assert np.count_nonzero(got) > got.size // 2, "subnormal products were flushed to zero"
    # attention with subnormal v: o = P·v is subnormal too
    q, k = randn(rng, 1, 2, 17, 16), randn(rng, 1, 2, 30, 16)
    v = (randn(rng, 1, 2, 30, 16) * F32(1e-39)).astype(F32)
    o = qn.attention(q, k, v)
    o_ref, lse_ref = ref.attention(q, k, v)
    bo, _ = attention_forward_bounds(q, k, v, o_ref, lse_ref)
    assert_within(o, o_ref, bo + 8 * 31 * float(TINY), "o")
    assert np.count_nonzero(o) > o.size // 2, "subnormal outputs were flushed to zero"


def test_ops_leave_the_fpu_in_ieee_mode(isa, rng):
    """Calling the ops must not switch on flush-to-zero / denormals-are-zero for the caller."""
    q = randn(rng, 1, 2, 33, 16)
    qn.attention(q, q, q)
    qn.matmul(randn(rng, 40, 40), randn(rng, 40, 40))
    x = np.array([TINY * 8], np.float32)
    assert (x / np.float32(2))[0] == TINY * 4
    assert (np.float32(np.finfo(np.float32).tiny) * np.float32(0.5)) != 0


# ----------------------------------------------------------------------------
# head dims at every tail
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("d_head", list(range(1, 34)) + [63, 64, 65, 127, 129])
def test_every_head_dim(isa, rng, d_head):
    """d_head (and d_v = d_head, d_head + 1) across all vector-width tails (4, 8, 16 lanes)."""
    q, k, v, kw, rb = make_attention_case(rng, heads=2, kv_heads=1, seq_q=17, seq_k=19, d_head=d_head,
                                          d_v=d_head + (d_head % 2), causal=bool(d_head % 3 == 0))
    check_against_reference(q, k, v, kw, rb, randn(rng, 1, 2, 17, v.shape[3]))


# ----------------------------------------------------------------------------
# determinism
# ----------------------------------------------------------------------------


def _all_ops(rng):
    """One call of every op on shapes large enough for the drivers to split work across threads."""
    a, b = randn(rng, 129, 300), randn(rng, 300, 131)
    x1, w1 = randn(rng, 1, 600), randn(rng, 600, 1200)  # one row, 2.9 MB of weight: gemv strips
    x, w = randn(rng, 2, 65, 96), randn(rng, 96, (4 + 2 * 2) * 32)
    q, k, v = randn(rng, 1, 4, 150, 64), randn(rng, 1, 2, 150, 64), randn(rng, 1, 2, 150, 64)
    qv, kv_ = randn(rng, 200, 4, 32), randn(rng, 230, 2, 32)
    cu_q, cu_k = np.array([0, 70, 71, 200]), np.array([0, 100, 130, 230])
    do = randn(rng, 1, 4, 150, 64)
    dov = randn(rng, 200, 4, 32)

    def run():
        out = {"matmul": qn.matmul(a, b), "matmul_tt": qn.matmul(b, a, trans_a=True, trans_b=True)}
        out["gemv"] = qn.matmul(x1, w1)
        pq, pk, pv = qn.qkv_project_packed(x, w, num_heads=4, num_kv_heads=2)
        out.update(proj_q=pq, proj_k=pk, proj_v=pv)
        for i, g in enumerate(qn.qkv_project_backward(x, w[:, :128], w[:, 128:192], w[:, 192:], pq, pk, pv)):
            out[f"proj_grad{i}"] = g
        o, lse = qn.attention(q, k, v, causal=True, return_lse=True)
        out.update(o=o, lse=lse)
        for name, g in zip(("dq", "dk", "dv"), qn.attention_backward(do, q, k, v, o, lse, causal=True)):
            out[name] = g
        ov, lv = qn.attention_varlen(qv, kv_, kv_, cu_q, cu_k, causal=True, return_lse=True)
        out.update(varlen_o=ov, varlen_lse=lv)
        for name, g in zip(("dq", "dk", "dv"), qn.attention_varlen_backward(dov, qv, kv_, kv_, ov, lv, cu_q, cu_k,
                                                                          causal=True)):
            out["varlen_" + name] = g
        return out

    return run


def test_repeated_calls_are_bit_identical(isa, rng):
    run = _all_ops(rng)
    first = run()
    for _ in range(2):
        for name, arr in run().items():
            np.testing.assert_array_equal(arr, first[name], err_msg=f"{name} differs between two identical calls")


def test_every_op_bit_identical_across_thread_counts(isa, rng, restore_threads):
    """Documented for the attention backward; measured to hold for every op (the drivers split
    work across threads but never split a sum), so the README promises it for all of them."""
    run = _all_ops(rng)
    results = {}
    for n in THREAD_COUNTS:
        qn.set_num_threads(n)
        results[n] = run()
    for n in THREAD_COUNTS[1:]:
        for name, arr in results[n].items():
            np.testing.assert_array_equal(arr, results[1][name], err_msg=f"{name}: {n} threads differ from 1")
