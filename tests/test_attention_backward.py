"""qn.attention_backward on every ISA vs reference.attention_backward.

The reference backward is itself checked by finite differences (test_reference.py).
Both sides get the same float32 o and lse (from the native forward), so the
comparison isolates the backward. Bounds: _helpers.attention_backward_bounds.
"""

import numpy as np
import pytest

import qkv_native as qn
from qkv_native import reference as ref

from _helpers import (
    ATTENTION_CASES,
    THREAD_COUNTS,
    assert_within,
    attention_backward_bounds,
    make_attention_case,
    randn,
    ref_kwargs,
    sum_to_shape,
)

BACKWARD_CASES = [
    "1x1",
    "small",
    "causal_q_lt_k",
    "causal_square_mqa",
    "causal_q_gt_k",
    "d_v_differs",
    "long_causal",
    "key_lengths",
    "key_lengths_causal",
    "bias_qk",
    "bias_h1k",
    "bias_full_neg_inf",
    "bias_rows_neg_inf",
    "mask",
    "everything",
    "ramp_sharp",
    "gqa_6_3",
    "seq_k_1",
    "d_v_1",
    "custom_scale",
    "negative_scale",
    "bias_transposed_view",
    "bias_per_query",
    "d_head_160",
    "query_groups",
    "key_groups_one_pass",
]


def run_and_check(q, k, v, kw, rb, do=None, rng=None):
    o, lse = qn.attention(q, k, v, return_lse=True, **kw)
    if do is None:
        do = randn(rng, *o.shape)
    grads = qn.attention_backward(do, q, k, v, o, lse, **kw)
    rkw = ref_kwargs(kw, rb)
    want = ref.attention_backward(do, q, k, v, o, lse, **rkw)
    bounds = attention_backward_bounds(do, q, k, v, o, want, **rkw)
    for name, g, w, b, x in zip(("dq", "dk", "dv"), grads, want, bounds, (q, k, v)):
        assert g.dtype == np.float32 and g.shape == x.shape, (name, g.shape, x.shape)
        assert_within(g, w, b, name)
    return grads, o, lse


@pytest.mark.parametrize("name", BACKWARD_CASES)
def test_backward(isa, rng, name):
    q, k, v, kw, rb = make_attention_case(rng, **ATTENTION_CASES[name])
    run_and_check(q, k, v, kw, rb, rng=rng)


def test_probabilities_near_the_normal_range(isa, rng):
    """The backward's P = exp(s - lse) across FLT_MIN (test_attention.near_the_normal_range)."""
    from test_attention import near_the_normal_range

    q, k, v, bias = near_the_normal_range(rng)
    run_and_check(q, k, v, dict(bias=bias), bias, rng=rng)


def test_strided_inputs(isa, rng):
    """q, k, v from one packed (batch, seq, heads+2·kv_heads, d_head) buffer (GQA), and
    do / o as (batch, seq, heads, d_v) views."""
    batch, seq, heads, kv_heads, d_head = 2, 65, 4, 2, 32
    buf = randn(rng, batch, seq, heads + 2 * kv_heads, d_head)
    q = buf[:, :, :heads].transpose(0, 2, 1, 3)
    k = buf[:, :, heads : heads + kv_heads].transpose(0, 2, 1, 3)
    v = buf[:, :, heads + kv_heads :].transpose(0, 2, 1, 3)
    o_buf = np.empty((batch, seq, heads, d_head), np.float32)
    o, lse = qn.attention(q, k, v, causal=True, return_lse=True, out=o_buf.transpose(0, 2, 1, 3))
    do = randn(rng, batch, seq, heads, d_head).transpose(0, 2, 1, 3)
    grads = qn.attention_backward(do, q, k, v, o, lse, causal=True)
    want = ref.attention_backward(do, q, k, v, o, lse, causal=True)
    bounds = attention_backward_bounds(do, q, k, v, o, want, causal=True)
    for name, g, w, b in zip(("dq", "dk", "dv"), grads, want, bounds):
        assert_within(g, w, b, name)


def test_fully_masked_rows_get_zero_gradients(isa, rng):
    batch, heads, seq_q, seq_k, d = 3, 2, 70, 40, 24
    q, k, v = randn(rng, batch, heads, seq_q, d), randn(rng, batch, heads, seq_k, d), randn(rng, batch, heads, seq_k, d)
    bias = randn(rng, batch, heads, seq_q, seq_k)
    bias[0, 1, 50] = -np.inf
    key_lengths = np.array([40, 0, 17])
    kw = dict(causal=True, key_lengths=key_lengths, bias=bias)
    (dq, dk, dv), _, _ = run_and_check(q, k, v, kw, bias.astype(np.float64), rng=rng)
    for g in (dq, dk, dv):
        assert np.isfinite(g).all()
    assert np.all(dq[:, :, : seq_q - seq_k] == 0.0)  # causal rows with no key
    assert np.all(dq[1] == 0.0) and np.all(dk[1] == 0.0) and np.all(dv[1] == 0.0)  # no keys at all
    assert np.all(dq[0, 1, 50] == 0.0)
    assert np.all(dk[2, :, 17:] == 0.0) and np.all(dv[2, :, 17:] == 0.0)  # padded keys


def test_all_keys_masked_everywhere(isa, rng):
    q, k, v = randn(rng, 1, 2, 17, 8), randn(rng, 1, 2, 65, 16), randn(rng, 1, 2, 65, 8)
    k = k[..., :8]
    mask = np.zeros((17, 65), bool)
    o, lse = qn.attention(q, k, v, mask=mask, return_lse=True)
    do = randn(rng, *o.shape)
    for g in qn.attention_backward(do, q, k, v, o, lse, mask=mask):
        assert np.all(g == 0.0)


# ----------------------------------------------------------------------------
# determinism across thread counts
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["causal_square_mqa", "everything", "long_causal"])
def test_bit_identical_across_thread_counts(isa, rng, restore_threads, name):
    spec = dict(ATTENTION_CASES[name])
    spec["batch"] = 1  # one (batch, kv head): the key-block split is what runs in parallel
    q, k, v, kw, _ = make_attention_case(rng, **spec)
    if "key_lengths" in kw:
        kw["key_lengths"] = kw["key_lengths"][:1]
    do = randn(rng, *q.shape[:3], v.shape[3])
    results = {}
    for n in THREAD_COUNTS:
        qn.set_num_threads(n)
        assert qn.get_num_threads() == n
        o, lse = qn.attention(q, k, v, return_lse=True, **kw)
        results[n] = (o, lse) + tuple(qn.attention_backward(do, q, k, v, o, lse, **kw))
    for n in THREAD_COUNTS[1:]:
        for label, a, b in zip(("o", "lse", "dq", "dk", "dv"), results[1], results[n]):
            np.testing.assert_array_equal(b, a, err_msg=f"{label} differs between 1 and {n} threads")


@pytest.mark.parametrize("name", ["query_groups", "key_groups_one_pass"])
def test_blocks_per_task_do_not_change_results(rng, restore_threads, name):
    """Backward tasks take up to g key blocks (forward tasks g query blocks), g chosen
    from the thread count: from 1, 3, 5, 9 threads "query_groups" (two passes) gets
    g = 5, 2, 1, 1 key blocks (forward 5, 4, 2, 1 query blocks); "key_groups_one_pass"
    (a task per (batch, kv head)) keeps g = 5 and splits its 8 tasks differently. Every
    sum runs in the same order whatever g and the split are."""
    q, k, v, kw, _ = make_attention_case(rng, **ATTENTION_CASES[name])
    do = randn(rng, *q.shape[:3], v.shape[3])
    grad_kw = dict(kw, bias_grad=True) if "bias" in kw else kw
    results = []
    for n in (1, 3, 5, 9):
        qn.set_num_threads(n)
        o, lse = qn.attention(q, k, v, return_lse=True, **kw)
        results.append((o, lse) + tuple(qn.attention_backward(do, q, k, v, o, lse, **grad_kw)))
    for res, n in zip(results[1:], (3, 5, 9)):
        for label, a, b in zip(("o", "lse", "dq", "dk", "dv", "dbias"), results[0], res):
            np.testing.assert_array_equal(b, a, err_msg=f"{label}: {n} threads differ from 1")


def test_key_padding_contents_are_ignored(isa, rng):
    """Keys past key_lengths are padding: NaN/inf there changes no gradient, and the
    padded rows of dk and dv are exactly 0 (as in the reference)."""
    q, k, v = randn(rng, 2, 2, 17, 16), randn(rng, 2, 2, 150, 16), randn(rng, 2, 2, 150, 24)
    key_lengths = np.array([30, 140])
    k_pad, v_pad = k.copy(), v.copy()
    k_pad[0, :, 30:], v_pad[0, :, 30:] = np.nan, np.inf
    k_pad[1, :, 140:], v_pad[1, :, 140:] = -np.inf, np.nan
    for causal in (False, True):
        kw = dict(key_lengths=key_lengths, causal=causal)
        o, lse = qn.attention(q, k, v, return_lse=True, **kw)
        do = randn(rng, *o.shape)
        clean = qn.attention_backward(do, q, k, v, o, lse, **kw)
        padded = qn.attention_backward(do, q, k_pad, v_pad, o, lse, **kw)
        for name, a, b in zip(("dq", "dk", "dv"), clean, padded):
            np.testing.assert_array_equal(b, a, err_msg=f"{name} (causal={causal}) depends on the padding")
        for g in clean[1:]:
            assert np.all(g[0, :, 30:] == 0.0) and np.all(g[1, :, 140:] == 0.0)


# Note [backward schedule] in attention_bwd.cpp: with batch·num_kv_heads >= 8 the
# backward runs in one pass over (batch, kv head) tasks; the cases above mostly take
# the two-pass schedule. These run the one-pass schedule on the same features.
ONE_PASS_CASES = {
    "plain": dict(batch=4, heads=4, seq_q=33, seq_k=33, d_head=24),
    "causal_gqa_key_lengths": dict(batch=8, heads=4, kv_heads=2, seq_q=17, seq_k=100, d_head=32, causal=True,
                                   key_lengths=[0, 100, 37, 1, 99, 64, 65, 17]),
    "bias_mask_dv": dict(batch=2, heads=8, seq_q=20, seq_k=129, d_head=16, d_v=40, bias="full", mask="qk"),
}


@pytest.mark.parametrize("name", sorted(ONE_PASS_CASES))
def test_one_pass_schedule(isa, rng, name):
    q, k, v, kw, rb = make_attention_case(rng, **ONE_PASS_CASES[name])
    assert q.shape[0] * k.shape[1] >= 8
    run_and_check(q, k, v, kw, rb, rng=rng)


def test_one_pass_schedule_bit_identical_across_thread_counts(isa, rng, restore_threads):
    q, k, v, kw, _ = make_attention_case(rng, **ONE_PASS_CASES["causal_gqa_key_lengths"])
    do = randn(rng, *q.shape[:3], v.shape[3])
    results = []
    for n in (1, 2):
        qn.set_num_threads(n)
        o, lse = qn.attention(q, k, v, return_lse=True, **kw)
        results.append(tuple(qn.attention_backward(do, q, k, v, o, lse, **kw)))
    for label, a, b in zip(("dq", "dk", "dv"), *results):
        np.testing.assert_array_equal(a, b, err_msg=f"{label} differs between 1 and 2 threads")


# ----------------------------------------------------------------------------
# the bias gradient (bias_grad=True)
# ----------------------------------------------------------------------------


BIAS_GRAD_CASES = {
    name: ATTENTION_CASES[name]
    for name in ("bias_qk", "bias_h1k", "bias_full_neg_inf", "bias_rows_neg_inf", "everything", "ramp_sharp",
                 "bias_transposed_view", "bias_per_query", "key_groups_one_pass")
}
BIAS_GRAD_CASES.update({
    "full_causal_gqa_odd": dict(batch=2, heads=4, kv_heads=2, seq_q=129, seq_k=65, d_head=17, d_v=7, causal=True,
                                bias="full"),
    "b11k_key_lengths": dict(batch=3, heads=2, seq_q=65, seq_k=300, d_head=64, key_lengths=[0, 300, 129],
                             bias="b11k"),
    "1hqk_causal_one_pass": dict(batch=4, heads=4, seq_q=33, seq_k=200, d_head=32, causal=True, bias="1hqk"),
    "full_one_pass_key_lengths": dict(batch=4, heads=4, kv_heads=2, seq_q=65, seq_k=100, d_head=24,
                                      key_lengths=[100, 0, 37, 99], bias="full"),
    "b11k_one_pass": dict(batch=4, heads=2, seq_q=17, seq_k=129, d_head=16, bias="b11k"),
    "seq_q_1": dict(batch=2, heads=3, seq_q=1, seq_k=129, d_head=80, bias="qk"),
})


def bias_grad_case(rng, name):
    q, k, v, kw, rb = make_attention_case(rng, **BIAS_GRAD_CASES[name])
    o, lse = qn.attention(q, k, v, return_lse=True, **kw)
    return q, k, v, kw, rb, o, lse, randn(rng, *o.shape)


@pytest.mark.parametrize("name", sorted(BIAS_GRAD_CASES))
def test_bias_grad(isa, rng, name):
    q, k, v, kw, rb, o, lse, do = bias_grad_case(rng, name)
    bias = kw["bias"]
    dq, dk, dv, dbias = qn.attention_backward(do, q, k, v, o, lse, bias_grad=True, **kw)
    # asking for dbias changes nothing else
    for label, a, b in zip(("dq", "dk", "dv"), (dq, dk, dv), qn.attention_backward(do, q, k, v, o, lse, **kw)):
        np.testing.assert_array_equal(a, b, err_msg=label)
    assert dbias.dtype == np.float32 and dbias.shape == bias.shape
    rkw = ref_kwargs(kw, rb)
    *want, ds = ref.attention_backward(do, q, k, v, o, lse, bias_grad=True, **rkw)
    want_db = sum_to_shape(ds, bias.shape)  # the reference's bias is the full (bias + mask)
    bounds = attention_backward_bounds(do, q, k, v, o, (*want, want_db), bias_grad_shape=bias.shape, **rkw)
    assert_within(dbias, want_db, bounds[3], "dbias")
    if bias.shape[-1] != 1:  # (a bias constant along the keys shifts softmax's input: gradient 0)
        assert np.abs(want_db).max() > 1e-3  # not vacuous
    assert np.all(dbias[np.isneginf(bias)] == 0.0)  # a -inf bias hides its pair


def test_bias_grad_zero_where_hidden(isa, rng):
    """Pairs hidden by causality, key_lengths, the mask or whole -inf rows get dbias 0."""
    batch, heads, seq_q, seq_k = 2, 2, 40, 70
    q, k, v = randn(rng, batch, heads, seq_q, 16), randn(rng, batch, heads, seq_k, 16), randn(rng, batch, heads, seq_k, 8)
    bias = randn(rng, batch, heads, seq_q, seq_k)
    bias[1, 0, 7] = -np.inf
    mask = rng.random((seq_q, seq_k)) < 0.8
    kw = dict(causal=True, key_lengths=np.array([50, 70]), bias=bias, mask=mask)
    o, lse = qn.attention(q, k, v, return_lse=True, **kw)
    dbias = qn.attention_backward(randn(rng, *o.shape), q, k, v, o, lse, bias_grad=True, **kw)[3]
    i, j = np.arange(seq_q)[:, None], np.arange(seq_k)[None, :]
    hidden = np.broadcast_to((j > i + seq_k - seq_q) | ~mask, dbias.shape).copy()
    hidden[0, :, :, 50:] = True
    hidden[1, 0, 7] = True
    assert np.all(dbias[hidden] == 0.0)
    assert np.all(dbias[~hidden] != 0.0)


@pytest.mark.parametrize("name", ["b11k_key_lengths", "1hqk_causal_one_pass", "full_causal_gqa_odd",
                                  "full_one_pass_key_lengths", "b11k_one_pass"])
def test_bias_grad_bit_identical_across_thread_counts(isa, rng, restore_threads, name):
    """Note [bias gradient]: the schedule may change with the thread count (1hqk_causal_one_pass
    sums dbias inside the backward on 1 and 2 threads, in a separate pass on 3), the bits may not."""
    q, k, v, kw, _, o, lse, do = bias_grad_case(rng, name)
    results = []
    for n in (1, 2, 3):
        qn.set_num_threads(n)
        results.append(qn.attention_backward(do, q, k, v, o, lse, bias_grad=True, **kw))
    for n, r in zip((2, 3), results[1:]):
        for label, a, b in zip(("dq", "dk", "dv", "dbias"), results[0], r):
            np.testing.assert_array_equal(a, b, err_msg=f"{label} differs between 1 and {n} threads")


def test_bias_grad_needs_a_bias(rng):
    q, k, v = randn(rng, 1, 1, 5, 8), randn(rng, 1, 1, 5, 8), randn(rng, 1, 1, 5, 8)
    mask = np.ones((5, 5), bool)
    o, lse = qn.attention(q, k, v, mask=mask, return_lse=True)
    with pytest.raises(ValueError, match="bias_grad=True needs a bias"):
        qn.attention_backward(o, q, k, v, o, lse, mask=mask, bias_grad=True)
