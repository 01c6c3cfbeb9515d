"""qn.pack_weight / PackedWeight: products against weights packed once.

Every op that takes a PackedWeight (matmul's b, linear's w, qkv_project_packed's
w_qkv) is checked against the float64 reference on every ISA, on shapes that cross
the 32-column panels, the micro-tile rows, the small-M/packed-path switch (M about
16 micro-tile rows) and the KC/NC blocks; packing is exact (to_array round-trips),
ISA-independent (a weight packed under one variant is used by another), and bad
input raises naming the argument.
"""

import pickle

import numpy as np
import pytest

import qkv_native as qn
from qkv_native import reference as ref

from _helpers import assert_within, gemm_bound, randn, rounding

# (m, k, n): 1 row (decode), tails around the 32-column panel, small-M path, packed path,
# k across KC (256/1152; up to 4/3 of it is one block), n across NC (512/1024/2048 columns).
SHAPES = [
    (1, 1, 1),
    (1, 7, 33),
    (1, 384, 1152),
    (3, 17, 31),
    (13, 65, 129),
    (16, 384, 1536),
    (65, 300, 70),
    (193, 129, 65),  # past the small-M limit on AVX-512 (16 x 12 rows)
    (300, 1700, 2100),  # two KC blocks, n > NC
]


def check(got, x, w, bias=None, alpha=1.0, beta=0.0, c=None):
    want = alpha * (x.astype(np.float64) @ w)
    absw = abs(alpha) * (np.abs(x).astype(np.float64) @ np.abs(w))
    if bias is not None:
        want = want + bias
        absw = absw + np.abs(bias)
    if beta != 0.0:
        want = want + beta * c.astype(np.float64)
        absw = absw + abs(beta) * np.abs(c.astype(np.float64))
    assert_within(got, want, gemm_bound(absw, x.shape[-1]) + rounding(want), "packed")


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_matmul_and_linear(isa, rng, m, k, n):
    x, w, b = randn(rng, m, k), randn(rng, k, n), randn(rng, n)
    pw = qn.pack_weight(w)
    assert pw.shape == (k, n)
    assert pw.nbytes >= w.nbytes
    check(qn.matmul(x, pw), x, w)
    check(qn.linear(x, pw, b), x, w, bias=b)
    c0 = randn(rng, m, n)
    out = c0.copy()
    assert qn.matmul(x, pw, alpha=-0.5, beta=2.0, out=out) is out
    check(out, x, w, alpha=-0.5, beta=2.0, c=c0)
    # GELU epilogue: the same as with the plain array (both use the fused store)
    np.testing.assert_allclose(qn.linear(x, pw, b, activation="gelu"), qn.linear(x, w, b, activation="gelu"),
                               rtol=1e-5, atol=1e-5 * np.sqrt(k))


@pytest.mark.parametrize("m,k,n", [(1, 7, 33), (16, 384, 1536), (300, 700, 2100)])
def test_packed_agrees_with_plain(isa, rng, m, k, n):
    """Packed and unpacked weights feed the same micro-tile: results agree to rounding."""
    x, w = randn(rng, m, k), randn(rng, k, n)
    got = qn.matmul(x, qn.pack_weight(w))
    check(got, x, w)
    np.testing.assert_allclose(got, qn.matmul(x, w), rtol=1e-5, atol=1e-5 * np.sqrt(k))


def test_trans_packs_the_transpose(rng):
    w = randn(rng, 70, 33)  # (d_in, d_out)
    a = qn.pack_weight(w)
    b = qn.pack_weight(np.ascontiguousarray(w.T), trans=True)  # a PyTorch (d_out, d_in) weight
    assert a.shape == b.shape == (70, 33)
    assert np.array_equal(a.to_array(), w) and np.array_equal(b.to_array(), w)


def test_strided_source_and_copy_semantics(rng):
    big = randn(rng, 40, 100)
    w = big[::2, 10:77]  # row-strided view
    pw = qn.pack_weight(w)
    assert np.array_equal(pw.to_array(), w)
    w_before = w.copy()
    big[:] = 0.0  # later changes to the source are not seen
    assert np.array_equal(pw.to_array(), w_before)


def test_batched_a(isa, rng):
    x, w = randn(rng, 3, 17, 65), randn(rng, 65, 40)
    got = qn.matmul(x, qn.pack_weight(w))
    assert got.shape == (3, 17, 40)
    for i in range(3):
        check(got[i], x[i], w)


def test_valid_across_isas(rng):
    """The panel layout does not depend on the ISA: pack under one, use under all."""
    x, w = randn(rng, 20, 129), randn(rng, 129, 77)
    isas = qn.supported_isas()
    with qn.use_isa(isas[0]):
        pw = qn.pack_weight(w)
    for isa in isas:
        with qn.use_isa(isa):
            check(qn.matmul(x, pw), x, w)


def test_pickle_round_trip(rng):
    w = randn(rng, 9, 45)
    pw = pickle.loads(pickle.dumps(qn.pack_weight(w)))
    assert isinstance(pw, qn.PackedWeight) and np.array_equal(pw.to_array(), w)
    assert "PackedWeight(shape=(9, 45))" == repr(pw)


@pytest.mark.parametrize("num_heads,num_kv_heads,d_head", [(4, 4, 16), (6, 2, 17), (3, 1, 64)])
def test_qkv_project_packed(isa, rng, num_heads, num_kv_heads, d_head):
    batch, seq, d_model = 2, 13, 40
    n = (num_heads + 2 * num_kv_heads) * d_head
    x, w, b = randn(rng, batch, seq, d_model), randn(rng, d_model, n), randn(rng, n)
    got = qn.qkv_project_packed(x, qn.pack_weight(w), b, num_heads=num_heads, num_kv_heads=num_kv_heads)
    want = qn.qkv_project_packed(x, w, b, num_heads=num_heads, num_kv_heads=num_kv_heads)
    d_q, d_kv = num_heads * d_head, num_kv_heads * d_head
    ref_out = ref.qkv_project(x, w[:, :d_q], w[:, d_q:d_q + d_kv], w[:, d_q + d_kv:], b[:d_q],
                              b[d_q:d_q + d_kv], b[d_q + d_kv:], num_heads=num_heads, num_kv_heads=num_kv_heads)
    for g, p, r in zip(got, want, ref_out):
        assert g.shape == p.shape
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * np.sqrt(d_model))
        np.testing.assert_allclose(g, p, rtol=1e-5, atol=1e-5 * np.sqrt(d_model))
    # out= receives the heads in place
    outs = tuple(np.empty_like(t) for t in got)
    res = qn.qkv_project_packed(x, qn.pack_weight(w), b, num_heads=num_heads, num_kv_heads=num_kv_heads, out=outs)
    assert all(r is o for r, o in zip(res, outs))
    for o, g in zip(outs, got):
        assert np.array_equal(o, g)


def test_errors(rng):
    w = randn(rng, 8, 12)
    pw = qn.pack_weight(w)
    with pytest.raises(TypeError, match="w must have dtype float32"):
        qn.pack_weight(w.astype(np.float64))
    with pytest.raises(ValueError, match="w must have 2 dimensions"):
        qn.pack_weight(w[0])
    with pytest.raises(ValueError, match="inner dimensions differ"):
        qn.matmul(randn(rng, 3, 9), pw)
    with pytest.raises(ValueError, match="trans_b does not apply to a PackedWeight"):
        qn.matmul(randn(rng, 3, 12), pw, trans_b=True)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., d_in=8\)"):
        qn.linear(randn(rng, 3, 9), pw)
    with pytest.raises(ValueError, match="b must have shape"):
        qn.linear(randn(rng, 3, 8), pw, randn(rng, 11))
    with pytest.raises(ValueError, match="w_qkv must have d_model=9 rows"):
        qn.qkv_project_packed(randn(rng, 1, 2, 9), pw, num_heads=2, num_kv_heads=1)
    with pytest.raises(ValueError, match=r"w_qkv must have \(num_heads \+ 2\*num_kv_heads\)\*d_head = 5"):
        qn.qkv_project_packed(randn(rng, 1, 2, 8), pw, num_heads=3, num_kv_heads=1)
    with pytest.raises(ValueError, match="b_qkv must have shape"):
        qn.qkv_project_packed(randn(rng, 1, 2, 8), pw, randn(rng, 5), num_heads=2, num_kv_heads=1)
    with pytest.raises(ValueError, match="num_kv_heads must divide num_heads"):
        qn.qkv_project_packed(randn(rng, 1, 2, 8), pw, num_heads=2, num_kv_heads=3)


def test_pack_weights_share_one_allocation(isa, rng):
    ws = [randn(rng, 7, 33), randn(rng, 65, 17), randn(rng, 1, 1)]
    packed = qn.pack_weights(ws)
    assert [p.shape for p in packed] == [w.shape for w in ws]
    for p, w in zip(packed, ws):
        assert np.array_equal(p.to_array(), w)
        x = randn(rng, 5, w.shape[0])
        check(qn.matmul(x, p), x, w)
    torch_layout = qn.pack_weights([np.ascontiguousarray(w.T) for w in ws], trans=True)
    assert all(np.array_equal(p.to_array(), w) for p, w in zip(torch_layout, ws))
    keep = pickle.loads(pickle.dumps(packed[1]))  # one of them, on its own
    del packed
    assert np.array_equal(keep.to_array(), ws[1])
    assert qn.pack_weights([]) == []


def test_pack_weights_errors_name_the_item(rng):
    with pytest.raises(TypeError, match=r"ws\[1\] must have dtype float32"):
        qn.pack_weights([randn(rng, 3, 4), np.zeros((3, 4))])
    with pytest.raises(ValueError, match=r"ws\[0\] must have 2 dimensions"):
        qn.pack_weights([randn(rng, 3)])
