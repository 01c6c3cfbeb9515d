"""qkv_project / qkv_project_packed / qkv_project_backward on every ISA vs the reference.

Bounds: _helpers error model; the forward sums d_model terms (plus the bias), dx
sums d_q + 2·d_kv terms, dW and db sum batch·seq terms.
"""

import numpy as np
import pytest

import qkv_native as qn
from qkv_native import reference as ref

from _helpers import assert_within, at_line_offset, gemm_bound, randn, rounding

# (batch, seq, d_model, num_heads, num_kv_heads, d_head, biases given)
CASES = [
    (1, 1, 7, 1, 1, 8, "qkv"),
    (2, 7, 17, 2, 1, 24, ""),
    (1, 17, 63, 4, 2, 32, "q"),
    (2, 65, 65, 2, 2, 64, "kv"),
    (1, 63, 129, 1, 1, 80, "qkv"),
    (1, 7, 300, 3, 1, 96, "k"),  # d_model > KC, MQA
    (1, 129, 33, 2, 2, 128, "qv"),
    (3, 1, 16, 8, 4, 8, "qkv"),
    (1, 5, 520, 6, 2, 24, "qkv"),  # two KC blocks, GQA 3:1
    (1, 7, 17, 8, 8, 96, "qkv"),  # N = 2304 columns > NC: bias offsets past the first panel
    (2, 129, 129, 4, 2, 64, "qk"),  # M = 258 rows > MC, enough work for two threads
    (1, 200, 40, 3, 1, 80, "qkv"),  # wide tiles (Note [wide tiles]) split by 80-column heads
    (2, 101, 33, 5, 5, 24, "qk"),  # ... by heads narrower than a panel
    (1, 63, 1, 2, 1, 16, "qkv"),  # d_model = 1: x's rows and columns both unit-stepped
]
IDS = [f"b{c[0]}s{c[1]}dm{c[2]}h{c[3]}kv{c[4]}d{c[5]}bias-{c[6] or 'none'}" for c in CASES]


def make(rng, batch, seq, d_model, num_heads, num_kv_heads, d_head, biases):
    x = randn(rng, batch, seq, d_model)
    w_q = randn(rng, d_model, num_heads * d_head)
    w_k = randn(rng, d_model, num_kv_heads * d_head)
    w_v = randn(rng, d_model, num_kv_heads * d_head)
    b_q = randn(rng, num_heads * d_head) if "q" in biases else None
    b_k = randn(rng, num_kv_heads * d_head) if "k" in biases else None
    b_v = randn(rng, num_kv_heads * d_head) if "v" in biases else None
    return x, (w_q, w_k, w_v), (b_q, b_k, b_v)


def abs_or_none(t):
    return None if t is None else np.abs(t)


def check_forward(got, x, ws, bs, num_heads, num_kv_heads):
    want = ref.qkv_project(x, *ws, *bs, num_heads=num_heads, num_kv_heads=num_kv_heads)
    absw = ref.qkv_project(np.abs(x), *(np.abs(w) for w in ws), *(abs_or_none(b) for b in bs),
                           num_heads=num_heads, num_kv_heads=num_kv_heads)
    d_model = x.shape[2]
    for name, g, w, a in zip("qkv", got, want, absw):
        assert g.dtype == np.float32 and g.shape == w.shape, (name, g.shape, w.shape)
        assert_within(g, w, gemm_bound(a, d_model + 1) + rounding(w), name)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward(isa, rng, case):
    batch, seq, d_model, num_heads, num_kv_heads, d_head, biases = case
    x, ws, bs = make(rng, *case)
    got = qn.qkv_project(x, *ws, *bs, num_heads=num_heads, num_kv_heads=num_kv_heads)
    assert got[0].shape == (batch, num_heads, seq, d_head)
    assert got[1].shape == got[2].shape == (batch, num_kv_heads, seq, d_head)
    check_forward(got, x, ws, bs, num_heads, num_kv_heads)


def test_num_kv_heads_defaults_to_num_heads(rng):
    x, ws, bs = make(rng, 2, 7, 17, 3, 3, 8, "qkv")
    a = qn.qkv_project(x, *ws, *bs, num_heads=3)
    b = qn.qkv_project(x, *ws, *bs, num_heads=3, num_kv_heads=3)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("case", [CASES[2], CASES[5], CASES[8]], ids=[IDS[2], IDS[5], IDS[8]])
def test_packed_equals_separate_exactly(isa, rng, case):
    batch, seq, d_model, num_heads, num_kv_heads, d_head, _ = case
    x, ws, bs = make(rng, *case[:-1], "qkv")
    w_qkv = np.concatenate(ws, axis=1)
    b_qkv = np.concatenate(bs)
    packed = qn.qkv_project_packed(x, w_qkv, b_qkv, num_heads=num_heads, num_kv_heads=num_kv_heads)
    separate = qn.qkv_project(x, *ws, *bs, num_heads=num_heads, num_kv_heads=num_kv_heads)
    for name, p, s in zip("qkv", packed, separate):
        np.testing.assert_array_equal(p, s, err_msg=name)
    # and without biases
    packed = qn.qkv_project_packed(x, w_qkv, num_heads=num_heads, num_kv_heads=num_kv_heads)
    separate = qn.qkv_project(x, *ws, num_heads=num_heads, num_kv_heads=num_kv_heads)
    for name, p, s in zip("qkv", packed, separate):
        np.testing.assert_array_equal(p, s, err_msg=name)
    check_forward(separate, x, ws, (None, None, None), num_heads, num_kv_heads)


def bias_only(bias, batch, heads, seq, d_head):
    """The (batch, heads, seq, d_head) projection of a zero-width x: the bias in every token."""
    if bias is None:
        return np.zeros((batch, heads, seq, d_head), np.float32)
    return np.broadcast_to(bias.reshape(1, heads, 1, d_head), (batch, heads, seq, d_head))


# Odd d_head: the head-major output splits the micro-tiles at every head, leaving tiles of
# 1 < n < NR columns. M = batch·seq rows: 1, 7 = 6 + 1 and 13 = 12 + 1 end in a one-row
# tile (MR is 6 on AVX2, 12 on AVX-512); 14 does not.
@pytest.mark.parametrize("d_head", [1, 7, 17, 33])
@pytest.mark.parametrize("heads", [(1, 1), (2, 1), (3, 3), (4, 2), (8, 1)], ids=lambda h: f"h{h[0]}kv{h[1]}")
@pytest.mark.parametrize("batch,seq", [(1, 1), (1, 7), (1, 13), (2, 7)])
def test_bias_only_when_d_model_is_zero(isa, rng, d_head, heads, batch, seq):
    """d_model = 0 (K = 0, a product with nothing to sum): the result is the bias alone.

    Regression: the sanitizer build's AVX2 one-row micro-tile, compiled by GCC 12, gave
    every vector of a 9..15-column tile the second vector's bias (head 1 of Q with
    d_head 17 came out as [26..32, 0, 26..34] for b_q = 1..34); Note [GCC 12 epilogue
    unroll] in cpp/src/kernels/kernels.cpp.
    """
    num_heads, num_kv_heads = heads
    d_q, d_kv = num_heads * d_head, num_kv_heads * d_head
    x = np.zeros((batch, seq, 0), np.float32)
    ws = (np.zeros((0, d_q), np.float32), np.zeros((0, d_kv), np.float32), np.zeros((0, d_kv), np.float32))
    bs = (np.arange(1, d_q + 1, dtype=np.float32), randn(rng, d_kv), randn(rng, d_kv))
    for biases in (bs, (bs[0], None, bs[2])):
        got = qn.qkv_project(x, *ws, *biases, num_heads=num_heads, num_kv_heads=num_kv_heads)
        for name, g, b, h in zip("qkv", got, biases, (num_heads, num_kv_heads, num_kv_heads)):
            np.testing.assert_array_equal(g, bias_only(b, batch, h, seq, d_head), err_msg=name)
    # the concatenated-weight form reaches the same kernel through another binding
    got = qn.qkv_project_packed(x, np.concatenate(ws, axis=1), np.concatenate(bs),
                                num_heads=num_heads, num_kv_heads=num_kv_heads)
    for name, g, b, h in zip("qkv", got, bs, (num_heads, num_kv_heads, num_kv_heads)):
        np.testing.assert_array_equal(g, bias_only(b, batch, h, seq, d_head), err_msg=name)


@pytest.mark.parametrize("d_head", [1, 7, 17, 33])
@pytest.mark.parametrize("heads", [(1, 1), (2, 1), (4, 2)], ids=lambda h: f"h{h[0]}kv{h[1]}")
def test_one_token_against_packed_weight(isa, rng, d_head, heads):
    """One token against a PackedWeight (K > 0): the one-row micro-tile that reads A along
    its row, the other instance of Note [GCC 12 epilogue unroll]."""
    num_heads, num_kv_heads = heads
    x, ws, bs = make(rng, 1, 1, 5, num_heads, num_kv_heads, d_head, "qkv")
    packed = qn.pack_weight(np.concatenate(ws, axis=1))
    got = qn.qkv_project_packed(x, packed, np.concatenate(bs), num_heads=num_heads, num_kv_heads=num_kv_heads)
    check_forward(got, x, ws, bs, num_heads, num_kv_heads)


@pytest.mark.parametrize("heads", [(1, 1), (4, 2), (6, 6)], ids=lambda h: f"h{h[0]}kv{h[1]}")
def test_one_token_plain_weight_runs(isa, rng, heads):
    """One token against a plain [W_Q | W_K | W_V] (the gemv path): its head blocks join into
    whole rows of the weight, one run, and the heads take their pieces of it (through a
    buffer; also into output windows). The same bits as three separate weights (a run
    each); nothing outside the output windows is written."""
    num_heads, num_kv_heads = heads
    d_model, d_head = 65, 24
    x, ws, bs = make(rng, 1, 1, d_model, num_heads, num_kv_heads, d_head, "qkv")
    w_qkv, b_qkv = np.concatenate(ws, axis=1), np.concatenate(bs)
    joined = qn.qkv_project_packed(x, w_qkv, b_qkv, num_heads=num_heads, num_kv_heads=num_kv_heads)
    check_forward(joined, x, ws, bs, num_heads, num_kv_heads)
    bigs = [np.full((1, h, 3, d_head + 3), -7.0, np.float32) for h in (num_heads, num_kv_heads, num_kv_heads)]
    outs = tuple(b[:, :, 1:2, 2 : 2 + d_head] for b in bigs)
    windows = qn.qkv_project_packed(x, w_qkv, b_qkv, num_heads=num_heads, num_kv_heads=num_kv_heads, out=outs)
    separate = qn.qkv_project(x, *ws, *bs, num_heads=num_heads, num_kv_heads=num_kv_heads)
    for name, j, w, s in zip("qkv", joined, windows, separate):
        np.testing.assert_array_equal(w, j, err_msg=name)
        np.testing.assert_array_equal(s, j, err_msg=name)
    for big in bigs:
        outside = np.ones(big.shape, bool)
        outside[:, :, 1:2, 2 : 2 + d_head] = False
        assert np.all(big[outside] == -7.0)


def test_out_written_in_place(isa, rng):
    """out=(q, k, v), including views in the (batch, seq, heads, d_head) layout."""
    batch, seq, d_model, num_heads, num_kv_heads, d_head = 2, 17, 65, 4, 2, 24
    x, ws, bs = make(rng, batch, seq, d_model, num_heads, num_kv_heads, d_head, "qkv")
    q_out = np.full((batch, num_heads, seq, d_head), np.nan, np.float32)
    k_buf = np.full((batch, seq, num_kv_heads, d_head), np.nan, np.float32)
    k_out = k_buf.transpose(0, 2, 1, 3)  # seq-major storage
    v_big = np.full((batch, num_kv_heads, seq + 3, d_head + 5), -7.0, np.float32)
    v_out = v_big[:, :, 1 : 1 + seq, 2 : 2 + d_head]  # a window
    res = qn.qkv_project(x, *ws, *bs, num_heads=num_heads, num_kv_heads=num_kv_heads, out=(q_out, k_out, v_out))
    assert res[0] is q_out and res[1] is k_out and res[2] is v_out
    check_forward(res, x, ws, bs, num_heads, num_kv_heads)
    outside = np.ones(v_big.shape, bool)
    outside[:, :, 1 : 1 + seq, 2 : 2 + d_head] = False
    assert np.all(v_big[outside] == -7.0)


@pytest.mark.parametrize("off", [0, 4])
def test_weights_whose_rows_alias(isa, rng, off):
    """W_Q, W_K, W_V as column blocks of one (d_model, 1024) array: rows 4 KiB apart,
    which the few-row GEMM's first row tile copies into lines as it streams them
    (Note [misaligned operands]), here into heads of 64, wide tiles and a ragged last
    row tile, on and 4 floats off cache lines."""
    x = randn(rng, 1, 61, 40)
    w_all = at_line_offset(randn(rng, 40, 1024), off)
    ws = (w_all[:, :256], w_all[:, 256:384], w_all[:, 384:512])
    bs = (randn(rng, 256), None, randn(rng, 128))
    got = qn.qkv_project(x, *ws, *bs, num_heads=4, num_kv_heads=2)
    check_forward(got, x, ws, bs, 4, 2)


def test_strided_inputs(isa, rng):
    """x as a strided view (every other token, a column window); weights as column windows."""
    batch, seq, d_model, num_heads, num_kv_heads, d_head = 2, 33, 129, 2, 1, 32
    x_big = randn(rng, batch, 2 * seq, d_model + 9)
    x = x_big[:, ::2, 4 : 4 + d_model]
    w_big = randn(rng, d_model, (num_heads + 2 * num_kv_heads) * d_head + 13)
    d_q, d_kv = num_heads * d_head, num_kv_heads * d_head
    ws = (w_big[:, 3 : 3 + d_q], w_big[:, 3 + d_q : 3 + d_q + d_kv], w_big[:, 3 + d_q + d_kv : 3 + d_q + 2 * d_kv])
    b_big = randn(rng, d_q + 5)
    bs = (b_big[5:], None, randn(rng, d_kv))  # a bias at an unaligned offset
    assert not x.flags.c_contiguous
    got = qn.qkv_project(x, *ws, *bs, num_heads=num_heads, num_kv_heads=num_kv_heads)
    check_forward(got, x, ws, bs, num_heads, num_kv_heads)
    # The same values, contiguous: identical bits (the layout must not change the arithmetic)
    again = qn.qkv_project(np.ascontiguousarray(x), *(np.ascontiguousarray(w) for w in ws),
                           np.ascontiguousarray(bs[0]), None, bs[2],
                           num_heads=num_heads, num_kv_heads=num_kv_heads)
    for g, a in zip(got, again):
        np.testing.assert_array_equal(g, a)


def check_backward(got, x, ws, grads):
    want = ref.qkv_project_backward(x, *ws, *grads)
    absw = ref.qkv_project_backward(np.abs(x), *(np.abs(w) for w in ws), *(np.abs(g) for g in grads))
    batch, seq, d_model = x.shape
    n = sum(w.shape[1] for w in ws)
    lengths = [n] + [batch * seq] * 6  # dx sums over columns; dW, db over tokens
    names = ["dx", "dw_q", "dw_k", "dw_v", "db_q", "db_k", "db_v"]
    assert len(got) == 7
    for name, g, w, a, k in zip(names, got, want, absw, lengths):
        assert g.dtype == np.float32 and g.shape == w.shape, (name, g.shape, w.shape)
        assert_within(g, w, gemm_bound(a, k) + rounding(w), name)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_backward(isa, rng, case):
    batch, seq, d_model, num_heads, num_kv_heads, d_head, _ = case
    x, ws, _ = make(rng, *case)
    dq = randn(rng, batch, num_heads, seq, d_head)
    dk = randn(rng, batch, num_kv_heads, seq, d_head)
    dv = randn(rng, batch, num_kv_heads, seq, d_head)
    got = qn.qkv_project_backward(x, *ws, dq, dk, dv)
    check_backward(got, x, ws, (dq, dk, dv))


def test_backward_strided(isa, rng):
    """Upstream grads as (batch, seq, heads, d_head) views, x strided."""
    batch, seq, d_model, num_heads, num_kv_heads, d_head = 2, 65, 63, 4, 2, 32
    x = randn(rng, batch, seq, d_model + 3)[:, :, 1 : 1 + d_model]
    _, ws, _ = make(rng, batch, seq, d_model, num_heads, num_kv_heads, d_head, "")
    buf = randn(rng, batch, seq, num_heads + 2 * num_kv_heads, d_head)
    dq = buf[:, :, :num_heads].transpose(0, 2, 1, 3)
    dk = buf[:, :, num_heads : num_heads + num_kv_heads].transpose(0, 2, 1, 3)
    dv = buf[:, :, num_heads + num_kv_heads :].transpose(0, 2, 1, 3)
    got = qn.qkv_project_backward(x, *ws, dq, dk, dv)
    check_backward(got, x, ws, (dq, dk, dv))


def test_bit_identical_across_thread_counts(isa, rng, restore_threads):
    x, ws, bs = make(rng, 2, 129, 129, 4, 2, 64, "qkv")
    grads = [randn(rng, 2, h, 129, 64) for h in (4, 2, 2)]
    results = []
    for n in (1, 2, 3):
        qn.set_num_threads(n)
        results.append(tuple(qn.qkv_project(x, *ws, *bs, num_heads=4, num_kv_heads=2))
                       + tuple(qn.qkv_project_backward(x, *ws, *grads)))
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            np.testing.assert_array_equal(a, b)
