"""qn.attention (forward) on every ISA vs reference.attention, and the exp polynomial.

Bounds: _helpers error model (attention_forward_bounds). Rows with no visible key
have a zero bound: o must be exactly 0 and lse exactly -inf there.
"""

import numpy as np
import pytest

import qkv_native as qn
from qkv_native import _core
from qkv_native import reference as ref

from _helpers import (
    ATTENTION_CASES,
    assert_within,
    at_line_offset,
    attention_forward_bounds,
    make_attention_case,
    randn,
    ref_kwargs,
)


def check(o, lse, q, k, v, rkw, name=""):
    o_ref, lse_ref = ref.attention(q, k, v, **rkw)
    bound_o, bound_lse = attention_forward_bounds(q, k, v, o_ref, lse_ref, **rkw)
    assert o.dtype == np.float32 and o.shape == o_ref.shape
    assert_within(o, o_ref, bound_o, f"o{name}")
    if lse is not None:
        assert lse.dtype == np.float32 and lse.shape == lse_ref.shape
        assert_within(lse, lse_ref, bound_lse, f"lse{name}")
    return o_ref, lse_ref


@pytest.mark.parametrize("name", list(ATTENTION_CASES))
def test_forward(isa, rng, name):
    q, k, v, kw, rb = make_attention_case(rng, **ATTENTION_CASES[name])
    o, lse = qn.attention(q, k, v, return_lse=True, **kw)
    check(o, lse, q, k, v, ref_kwargs(kw, rb))
    # return_lse=False gives the same o, alone
    o2 = qn.attention(q, k, v, **kw)
    assert isinstance(o2, np.ndarray)
    np.testing.assert_array_equal(o2, o)


# out= starts as NaN: every element must be written, including rows that see no key
# (key_lengths 0, the first rows of causal_q_gt_k, whole -inf bias rows), whose
# blocks run no product at all or a product with zero weights.
@pytest.mark.parametrize("name", ["everything", "key_lengths", "causal_q_gt_k", "bias_rows_neg_inf",
                                  "decode_chunks_gqa"])
def test_out_written_in_place(isa, rng, name):
    q, k, v, kw, rb = make_attention_case(rng, **ATTENTION_CASES[name])
    out = np.full(q.shape[:3] + (v.shape[3],), np.nan, np.float32)
    res = qn.attention(q, k, v, out=out, **kw)
    assert res is out
    check(out, None, q, k, v, ref_kwargs(kw, rb))
    out2 = np.full_like(out, np.nan)
    res, lse = qn.attention(q, k, v, out=out2, return_lse=True, **kw)
    assert res is out2
    np.testing.assert_array_equal(out2, out)
    check(out2, lse, q, k, v, ref_kwargs(kw, rb))


@pytest.mark.parametrize("causal", [False, True])
def test_views_of_packed_qkv_buffer(isa, rng, causal):
    """q, k, v sliced out of one (batch, seq, 3, heads, d_head) buffer; out= seq-major too."""
    batch, seq, heads, d_head = 2, 65, 3, 32
    buf = randn(rng, batch, seq, 3, heads, d_head)
    q, k, v = (buf[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    assert not q.flags.c_contiguous
    o_buf = np.full((batch, seq, heads, d_head), np.nan, np.float32)
    out = o_buf.transpose(0, 2, 1, 3)
    res, lse = qn.attention(q, k, v, causal=causal, return_lse=True, out=out)
    assert res is out
    check(out, lse, q, k, v, dict(causal=causal))
    # the merged (batch, seq, heads·d_head) view is the attention output of each token
    merged = o_buf.reshape(batch, seq, heads * d_head)
    np.testing.assert_array_equal(merged[:, 5, d_head : 2 * d_head], out[:, 1, 5])


def test_seq_major_layout_with_gqa(isa, rng):
    """(batch, seq, heads, d_head) tensors, with GQA k/v packed after q."""
    batch, seq_q, seq_k, heads, kv_heads, d_head = 2, 17, 63, 4, 2, 24
    q = randn(rng, batch, seq_q, heads, d_head).transpose(0, 2, 1, 3)
    kv = randn(rng, batch, seq_k, 2 * kv_heads, d_head)
    k = kv[:, :, :kv_heads].transpose(0, 2, 1, 3)
    v = kv[:, :, kv_heads:].transpose(0, 2, 1, 3)
    key_lengths = np.array([40, 63])
    o, lse = qn.attention(q, k, v, key_lengths=key_lengths, return_lse=True)
    check(o, lse, q, k, v, dict(key_lengths=key_lengths))


def test_negative_and_padded_strides(isa, rng):
    """Keys in reverse order (negative seq stride) and head dims padded inside wider rows."""
    batch, heads, seq_q, seq_k, d_head, d_v = 1, 2, 33, 65, 24, 40
    q = randn(rng, batch, heads, seq_q, d_head + 8)[..., 3 : 3 + d_head]
    k = randn(rng, batch, heads, seq_k, d_head)[:, :, ::-1]
    v = randn(rng, batch, heads, 2 * seq_k, d_v)[:, :, ::-2]
    o, lse = qn.attention(q, k, v, causal=True, return_lse=True)
    check(o, lse, q, k, v, dict(causal=True))


def test_fully_masked_rows_are_exactly_zero(isa, rng):
    """Every way a row can lose all its keys: o == 0 exactly, lse == -inf, no NaN."""
    batch, heads, seq_q, seq_k, d = 3, 2, 70, 40, 32
    q, k, v = randn(rng, batch, heads, seq_q, d), randn(rng, batch, heads, seq_k, d), randn(rng, batch, heads, seq_k, d)
    bias = randn(rng, batch, heads, seq_q, seq_k)
    bias[0, 1, 50] = -np.inf  # a row masked by the bias alone
    mask = np.ones((seq_q, seq_k), bool)
    mask[60] = False  # a row masked by the boolean mask
    key_lengths = np.array([40, 0, 17])  # batch 1: no keys at all
    o, lse = qn.attention(q, k, v, causal=True, key_lengths=key_lengths, bias=bias, mask=mask, return_lse=True)
    assert not np.isnan(o).any() and not np.isnan(lse).any()
    dead = np.zeros((batch, heads, seq_q), bool)
    dead[:, :, : seq_q - seq_k] = True  # causal, seq_q > seq_k: rows i < 30 see no key
    dead[1] = True
    dead[0, 1, 50] = True
    dead[:, :, 60] = True
    assert np.all(o[dead] == 0.0) and np.all(lse[dead] == -np.inf)
    assert np.all(np.isfinite(lse[~dead]))
    check(o, lse, q, k, v, dict(causal=True, key_lengths=key_lengths,
                                bias=np.where(mask, bias.astype(np.float64), -np.inf)))


def test_causal_diagonal_after_non_finite_scores(isa, rng):
    """Note [ragged key limits]: on the causal diagonal the products leave the score
    cells past every query's limit unwritten; the softmax must mask whatever they hold.
    A call whose scores are all NaN runs first, so that reused scratch holds NaN."""
    q, k, v = randn(rng, 1, 4, 300, 32), randn(rng, 1, 4, 300, 32), randn(rng, 1, 4, 300, 32)
    q_nan = np.full_like(q, np.nan)
    for causal_first in (False, True):
        assert np.isnan(qn.attention(q_nan, k, v, causal=causal_first)).all()
        o, lse = qn.attention(q, k, v, causal=True, return_lse=True)
        assert np.isfinite(o).all() and np.isfinite(lse).all()
        check(o, lse, q, k, v, dict(causal=True))
    # bottom-right aligned (seq_q < seq_k) and key lengths ending inside a block
    o, lse = qn.attention(q[:, :, :150], k, v, causal=True, key_lengths=np.array([250]), return_lse=True)
    check(o, lse, q[:, :, :150], k, v, dict(causal=True, key_lengths=np.array([250])))


def near_the_normal_range(rng, seq_q=3, d=16):
    """Scores whose probabilities sweep across FLT_MIN (2**-126 ~ e**-87.3): key 0 at 0,
    keys 1..96 at -80 down to -95 (a bias; q = 0), V there ~1e30 so that each
    probability still in the normal range moves o by ~1e-5 to 1e-8, far more than the
    bounds allow to lose, while the underflowing ones are within them (Note [no
    denormal results]: those flush to 0)."""
    seq_k = 97
    q = np.zeros((1, 2, seq_q, d), np.float32)
    k = randn(rng, 1, 2, seq_k, d)
    v = randn(rng, 1, 2, seq_k, d)
    v[:, :, 1:] *= np.float32(1e30)
    bias = np.concatenate([[0.0], np.linspace(-80.0, -95.0, seq_k - 1)]).astype(np.float32)
    return q, k, v, np.broadcast_to(bias, (seq_q, seq_k))


def test_probabilities_near_the_normal_range(isa, rng):
    q, k, v, bias = near_the_normal_range(rng)
    o, lse = qn.attention(q, k, v, bias=bias, return_lse=True)
    o_ref, _ = check(o, lse, q, k, v, dict(bias=bias))
    # (the keys in the normal range are what moves o off v[0])
    assert np.abs(o_ref - v[:, :, :1]).max() > 1e-6


def test_all_neg_inf_bias(isa, rng):
    q, k, v = randn(rng, 1, 2, 17, 8), randn(rng, 1, 2, 129, 8), randn(rng, 1, 2, 129, 8)
    o, lse = qn.attention(q, k, v, bias=np.full((17, 129), -np.inf, np.float32), return_lse=True)
    assert np.all(o == 0.0) and np.all(lse == -np.inf)
    o = qn.attention(q, k, v, mask=np.zeros((1, 1, 1, 129), bool))
    assert np.all(o == 0.0)


def test_no_keys_at_all(rng):
    """seq_k == 0: every row is fully masked."""
    q = randn(rng, 1, 2, 5, 8)
    k = np.zeros((1, 2, 0, 8), np.float32)
    v = np.zeros((1, 2, 0, 8), np.float32)
    o, lse = qn.attention(q, k, v, return_lse=True)
    assert np.all(o == 0.0) and np.all(lse == -np.inf)


def test_bool_mask_equals_neg_inf_bias(isa, rng):
    q, k, v, kw, rb = make_attention_case(rng, batch=2, heads=2, seq_q=17, seq_k=65, d_head=32, mask="qk")
    o_mask = qn.attention(q, k, v, mask=kw["mask"])
    o_bias = qn.attention(q, k, v, bias=np.where(kw["mask"], 0.0, -np.inf).astype(np.float32))
    np.testing.assert_array_equal(o_mask, o_bias)


def test_query_blocks_per_task_do_not_change_results(rng, restore_threads):
    """A forward task takes up to g query blocks of a head, g chosen from the thread
    count (at least 4 tasks per thread): 1, 3, 5 and 9 threads give g = 5, 4, 2, 1 here
    (8 heads of 5 query blocks). Every query's sums run in the same order whatever g is."""
    q, k, v, kw, rb = make_attention_case(rng, **ATTENTION_CASES["query_groups"])
    results = []
    for n in (1, 3, 5, 9):
        qn.set_num_threads(n)
        results.append(qn.attention(q, k, v, return_lse=True, **kw))
    check(*results[0], q, k, v, ref_kwargs(kw, rb))
    for (o, lse), n in zip(results[1:], (3, 5, 9)):
        np.testing.assert_array_equal(o, results[0][0], err_msg=f"o: {n} threads differ from 1")
        np.testing.assert_array_equal(lse, results[0][1], err_msg=f"lse: {n} threads differ from 1")


def test_isas_agree(rng):
    q, k, v, kw, rb = make_attention_case(rng, **ATTENTION_CASES["everything"])
    for name in qn.supported_isas():
        with qn.use_isa(name):
            o, lse = qn.attention(q, k, v, return_lse=True, **kw)
        check(o, lse, q, k, v, ref_kwargs(kw, rb), name=f"[{name}]")


# ----------------------------------------------------------------------------
# exp: the vectorised polynomial (qkv_native._core.exp)
# ----------------------------------------------------------------------------

F32 = np.finfo(np.float32)
# Largest x whose exp is below FLT_MAX (exp(88.72284) overflows float32).
EXP_MAX = np.float32(88.7228)


def ulp_error(got, x):
    """|got - exp(x)| in units of the float32 spacing at exp(x) (float64 exact value)."""
    want = np.exp(x.astype(np.float64))
    spacing = np.spacing(want.astype(np.float32)).astype(np.float64)
    return np.abs(got.astype(np.float64) - want) / spacing, want


def test_exp_dense_sweep_ulp(isa):
    x = np.linspace(-104.0, 88.7, 1_000_003, dtype=np.float32)
    x = np.concatenate([x, np.float32([0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, np.log(2), 88.72, -87.3, -87.4])])
    y = _core.exp(x)
    err, want = ulp_error(y, x)
    normal = want >= F32.tiny
    max_normal = float(err[normal].max())
    assert max_normal <= 4.0, f"max error {max_normal:.2f} ulp at x = {x[normal][err[normal].argmax()]!r}"
    # subnormal results: absolute error within one subnormal spacing (2**-149)
    sub_err = np.abs(y[~normal].astype(np.float64) - want[~normal]) / 2.0**-149
    assert sub_err.max() <= 1.0, f"subnormal error {sub_err.max():.2f} x 2**-149"


def test_exp_random_bits(isa):
    """Every finite float32 in the useful range, drawn from random bit patterns."""
    rng = np.random.default_rng(99)
    x = rng.integers(0, 2**32, 500_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = x[np.isfinite(x) & (x > -104.0) & (x < EXP_MAX)]
    err, want = ulp_error(_core.exp(x), x)
    normal = want >= F32.tiny
    assert err[normal].max() <= 4.0, f"max error {err[normal].max():.2f} ulp"


@pytest.mark.parametrize("n", [1, 7, 37])  # scalar tail only, and vector body + tail
def test_exp_special_values(isa, n):
    specials = {
        -np.inf: 0.0,
        -1e30: 0.0,
        -F32.max: 0.0,
        -105.0: 0.0,
        -1000.0: 0.0,
        88.73: np.inf,
        89.0: np.inf,
        1000.0: np.inf,
        1e6: np.inf,
        0.0: 1.0,
        -0.0: 1.0,
    }
    bad = []
    for xv, want in specials.items():
        y = _core.exp(np.full(n, xv, np.float32))
        if not np.all(y == np.float32(want)):
            bad.append(f"exp({xv!r}) = {y[0]!r}, want {want}")
    y = _core.exp(np.full(n, np.nan, np.float32))
    if not np.isnan(y).all():
        bad.append(f"exp(nan) = {y[0]!r}")
    assert not bad, "; ".join(bad)


@pytest.mark.parametrize("xv", [1e9, float(F32.max), np.inf])
def test_exp_overflows_to_inf_for_huge_arguments(isa, xv):
    """Every x above log(FLT_MAX) gives +inf, however large (+inf included)."""
    for n in (1, 37):  # the scalar tail alone, and vector body + tail
        y = _core.exp(np.full(n, xv, np.float32))
        assert np.all(y == np.inf), f"exp({xv!r}) gave {y[0]!r} (n={n}), want inf"


def test_exp_mixed_lanes(isa):
    """Special values mixed with ordinary ones in one vector keep their lanes apart."""
    x = np.array([0.0, -np.inf, 1.0, np.nan, -200.0, 2.0, 100.0, -1.0] * 5, np.float32)
    y = _core.exp(x)
    ordinary = np.isfinite(x) & (x > -104) & (x < EXP_MAX)
    np.testing.assert_allclose(y[ordinary], np.exp(x[ordinary].astype(np.float64)), rtol=4 * 2.0**-23)
    assert np.all(y[x == -np.inf] == 0.0) and np.all(y[x == -200.0] == 0.0)
    assert np.isnan(y[np.isnan(x)]).all()
    assert np.all(y[x == 100.0] == np.inf)


def test_key_padding_contents_are_ignored(isa, rng):
    """Keys past key_lengths are padding: NaN/inf there changes nothing."""
    q, k, v = randn(rng, 2, 2, 17, 16), randn(rng, 2, 2, 150, 16), randn(rng, 2, 2, 150, 24)
    key_lengths = np.array([30, 140])
    k_pad, v_pad = k.copy(), v.copy()
    k_pad[0, :, 30:], v_pad[0, :, 30:] = np.nan, np.inf
    k_pad[1, :, 140:], v_pad[1, :, 140:] = -np.inf, np.nan
    for causal in (False, True):
        o, lse = qn.attention(q, k, v, key_lengths=key_lengths, causal=causal, return_lse=True)
        o2, lse2 = qn.attention(q, k_pad, v_pad, key_lengths=key_lengths, causal=causal, return_lse=True)
        np.testing.assert_array_equal(o2, o)
        np.testing.assert_array_equal(lse2, lse)


@pytest.mark.parametrize("d,dv", [(64, 64), (24, 40)])
def test_operands_off_cache_lines(isa, rng, d, dv):
    """Note [misaligned operands]: V's blocks are copied into whole cache lines when its
    rows start off them; every offset of q, k, v and out gives the same bits, across key
    blocks, causal, and non-finite V rows hidden by key_lengths."""
    batch, heads, seq_q, seq_k = 2, 2, 37, 700
    q, k, v = randn(rng, batch, heads, seq_q, d), randn(rng, batch, heads, seq_k, d), randn(rng, batch, heads, seq_k, dv)
    key_lengths = np.array([700, 650])
    v_pad = v.copy()
    v_pad[1, :, 650:] = np.nan
    for causal in (False, True):
        first = None
        for off in (0, 4, 15):
            out = at_line_offset(np.full((batch, heads, seq_q, dv), np.nan, np.float32), off)
            args = (at_line_offset(q, off), at_line_offset(k, off), at_line_offset(v_pad, off))
            o, lse = qn.attention(*args, causal=causal, key_lengths=key_lengths, return_lse=True, out=out)
            assert o is out
            if first is None:
                check(o, lse, q, k, v, dict(causal=causal, key_lengths=key_lengths))
                first = (o.copy(), lse)
            else:
                np.testing.assert_array_equal(o, first[0], err_msg=f"offset {off}")
                np.testing.assert_array_equal(lse, first[1], err_msg=f"offset {off}")
