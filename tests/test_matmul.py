"""qn.matmul on every ISA variant against reference.matmul.

Bounds: _helpers error model, |err| <= C·sqrt(K)·u·(|alpha|·|A|·|B| + |beta|·|C|) + 2u·|want|.
Sizes cross the micro-tile edges (mr/nr: 4×8, 6×16, 12×32; A read in place: up to 14
rows on AVX-512), the MC block (64/96 rows), the KC block (1152 on AVX-512, 256
below; up to 4/3 of it is one block) and the NC panel (512/1024/2048 columns).
"""

import numpy as np
import pytest

import qkv_native as qn
from qkv_native import reference as ref

from _helpers import assert_within, at_line_offset, gemm_bound, randn, rounding

# (m, n, k)
SHAPES = [
    (1, 1, 1),
    (1, 7, 17),
    (7, 1, 63),
    (17, 65, 7),
    (63, 17, 129),
    (65, 129, 65),
    (129, 63, 300),  # m > MC, k > KC
    (7, 65, 520),  # two KC blocks and a tail
    (17, 7, 256),  # k == KC
    (97, 33, 257),  # m = MC(avx512, avx2) + 1, k = KC + 1
    (5, 33, 1024),  # k = 4/3 KC(avx512) before it was 1152: one K block
    (9, 40, 1025),  # ... plus one: still one
    (5, 17, 1536),  # k = 4/3 KC(avx512): one K block
    (3, 40, 1537),  # ... plus one: two
    (3, 2049, 5),  # n > NC on every ISA
    (7, 1100, 520),  # few rows, enough flops for the N split across threads
    (14, 32, 9),  # one full avx512 micro-tile, A in place
    (13, 40, 11),  # one 13-row tile (a short query's tokens), a ragged column panel
    (28, 32, 390),  # two 14-row tiles (A in place) or 12 + 12 + 4 (packed)
    (15, 33, 5),  # ... plus one row and one column
    (6, 16, 3),  # one full avx2 micro-tile
    (5, 9, 2),  # a scalar micro-tile plus one
    (29, 40, 500),  # one K block longer than 384 on AVX-512 (a transposed A read in place)
    (1024, 9, 20),  # a transposed A with a 4 KiB row step (packed, not read in place)
    (1024, 5, 1700),  # ... over two K blocks, packed 8 rows of X at a time with a ragged last group
    # k = 1: A's rows and columns both unit-stepped (an (m, 1) array). Its 13- and 14-row
    # tiles once went down the column path, which stops at 12 rows (a call through a
    # table entry past its end: garbage, heap corruption)
    (63, 65, 1),
    (14, 2, 1),
    (300, 65, 1),  # packed path
    (129, 1, 1),
]


def op(x, trans):
    return np.swapaxes(x, -1, -2) if trans else x


def stored(x, trans):
    """The array to pass for op(arg) == x: x itself or a C-contiguous transpose."""
    return np.ascontiguousarray(np.swapaxes(x, -1, -2)) if trans else x


def check(got, a, b, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, c=None, name="matmul"):
    want = ref.matmul(a, b, trans_a, trans_b, alpha, beta, c)
    k = op(a, trans_a).shape[-1]
    abs_terms = abs(alpha) * ref.matmul(np.abs(a), np.abs(b), trans_a, trans_b)
    if beta != 0.0:
        abs_terms = abs_terms + abs(beta) * np.abs(np.asarray(c, np.float64))
    assert_within(got, want, gemm_bound(abs_terms, k) + rounding(want), name)


@pytest.mark.parametrize("trans_b", [False, True], ids=["N", "T"])
@pytest.mark.parametrize("trans_a", [False, True], ids=["N", "T"])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_shapes_and_transposes(isa, rng, m, n, k, trans_a, trans_b):
    a = stored(randn(rng, m, k), trans_a)
    b = stored(randn(rng, k, n), trans_b)
    got = qn.matmul(a, b, trans_a=trans_a, trans_b=trans_b)
    assert got.shape == (m, n) and got.dtype == np.float32
    check(got, a, b, trans_a, trans_b)


@pytest.mark.parametrize("m,n,k", [(17, 65, 300), (129, 7, 63)])
def test_beta_zero_never_reads_out(isa, rng, m, n, k):
    a, b = randn(rng, m, k), randn(rng, k, n)
    out = np.full((m, n), np.nan, dtype=np.float32)
    res = qn.matmul(a, b, alpha=-1.5, out=out)
    assert res is out
    assert np.isfinite(out).all()
    check(out, a, b, alpha=-1.5)


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (1.0, 0.5), (-0.75, 0.5), (2.0, -1.0)])
@pytest.mark.parametrize("m,n,k", [(7, 17, 63), (65, 33, 520), (129, 129, 17)])
def test_alpha_beta_with_out(isa, rng, m, n, k, alpha, beta):
    a, b = randn(rng, m, k), randn(rng, k, n)
    c0 = randn(rng, m, n)
    out = c0.copy()
    res = qn.matmul(a, b, alpha=alpha, beta=beta, out=out)
    assert res is out
    check(out, a, b, alpha=alpha, beta=beta, c=c0)


@pytest.mark.parametrize("zero_a", [False, True])
@pytest.mark.parametrize("alpha,beta", [(1e-40, 1.0), (1e-30, 1e10), (1e20, 1e-30)])
@pytest.mark.parametrize("n,k", [(3, 5), (64, 64), (300, 17)])
def test_one_row_alpha_beta_extremes(isa, rng, n, k, alpha, beta, zero_a):
    """One row went through the gemv as alpha·((beta/alpha)·C + a·B): the quotient
    overflowed (alpha 1e-40, beta 1: out became inf) or underflowed (alpha 1e20, beta
    1e-30: beta·C lost, 0 where a is 0)."""
    a, b = randn(rng, 1, k) * np.float32(not zero_a), randn(rng, k, n)
    c0 = randn(rng, 1, n)
    out = c0.copy()
    qn.matmul(a, b, alpha=alpha, beta=beta, out=out)
    check(out, a, b, alpha=alpha, beta=beta, c=c0)


def test_alpha_zero(isa, rng):
    """alpha = 0 leaves beta·C (no product formed); with beta = 0 too, zeros even over NaN."""
    a, b = randn(rng, 17, 65), randn(rng, 65, 7)
    c0 = randn(rng, 17, 7)
    out = c0.copy()
    qn.matmul(a, b, alpha=0.0, beta=0.5, out=out)
    assert_within(out, 0.5 * c0.astype(np.float64), rounding(0.5 * c0), "alpha=0, beta=0.5")
    out = np.full((17, 7), np.nan, dtype=np.float32)
    qn.matmul(a, b, alpha=0.0, beta=0.0, out=out)
    assert np.array_equal(out, np.zeros((17, 7), np.float32))


@pytest.mark.parametrize("m,n", [(7, 17), (1, 1)])
def test_empty_k_gives_zeros(isa, m, n):
    a = np.zeros((m, 0), np.float32)
    b = np.zeros((0, n), np.float32)
    got = qn.matmul(a, b)
    assert np.array_equal(got, np.zeros((m, n), np.float32))
    out = np.full((m, n), np.nan, dtype=np.float32)
    qn.matmul(a, b, out=out)
    assert np.array_equal(out, np.zeros((m, n), np.float32))


@pytest.mark.parametrize("shape", [(0, 5, 3), (4, 0, 3)])
def test_empty_output(shape):
    m, n, k = shape
    got = qn.matmul(np.zeros((m, k), np.float32), np.zeros((k, n), np.float32))
    assert got.shape == (m, n)


@pytest.mark.parametrize("trans_b", [False, True], ids=["N", "T"])
@pytest.mark.parametrize("trans_a", [False, True], ids=["N", "T"])
@pytest.mark.parametrize("m,n,k", [(17, 65, 300), (65, 7, 129)])
def test_strided_operands(isa, rng, m, n, k, trans_a, trans_b):
    """Row strides wider than the row, every other row, and reversed rows."""
    sa = (k, m) if trans_a else (m, k)
    sb = (n, k) if trans_b else (k, n)
    big_a = randn(rng, 2 * sa[0] + 1, sa[1] + 7)
    big_b = randn(rng, sb[0] + 3, sb[1] + 11)
    a = big_a[: 2 * sa[0] : 2, 3 : 3 + sa[1]]  # row stride 2·(width + 7)
    b = big_b[3 : 3 + sb[0], 5 : 5 + sb[1]][::-1]  # negative row stride
    assert not a.flags.c_contiguous and not b.flags.c_contiguous
    got = qn.matmul(a, b, trans_a=trans_a, trans_b=trans_b)
    check(got, a, b, trans_a, trans_b)


def test_transposed_views(isa, rng):
    """.T of a Fortran-ordered array is C-contiguous: used in place with the trans flags."""
    m, n, k = 65, 17, 129
    a_f = np.asfortranarray(randn(rng, m, k))  # op(a) = a_f: pass a_f.T with trans_a
    b_f = np.asfortranarray(randn(rng, k, n))
    got = qn.matmul(a_f.T, b_f.T, trans_a=True, trans_b=True)
    check(got, a_f.T, b_f.T, True, True)
    want = a_f.astype(np.float64) @ b_f.astype(np.float64)
    np.testing.assert_array_equal(ref.matmul(a_f.T, b_f.T, True, True), want)
    # a plain C array and the .T view of a Fortran one (column-contiguous)
    x = randn(rng, k, m)
    got = qn.matmul(x, b_f.T, trans_a=True, trans_b=True)
    check(got, x, b_f.T, True, True)


def test_out_strided_view_written_in_place(isa, rng):
    """out= a window of a bigger array: only the window changes."""
    m, n, k = 33, 47, 65
    a, b = randn(rng, m, k), randn(rng, k, n)
    big = randn(rng, m + 4, n + 9)
    before = big.copy()
    out = big[2 : 2 + m, 5 : 5 + n]
    c0 = out.copy()
    res = qn.matmul(a, b, beta=1.0, out=out)
    assert res is out
    check(out, a, b, beta=1.0, c=c0)
    mask = np.ones(big.shape, bool)
    mask[2 : 2 + m, 5 : 5 + n] = False
    np.testing.assert_array_equal(big[mask], before[mask])


@pytest.mark.parametrize("trans_b", [False, True], ids=["N", "T"])
@pytest.mark.parametrize("trans_a", [False, True], ids=["N", "T"])
def test_batched_3d(isa, rng, trans_a, trans_b):
    batch, m, n, k = 3, 17, 33, 65
    a = stored(randn(rng, batch, m, k), trans_a)
    b = stored(randn(rng, batch, k, n), trans_b)
    got = qn.matmul(a, b, trans_a=trans_a, trans_b=trans_b)
    assert got.shape == (batch, m, n)
    check(got, a, b, trans_a, trans_b)


@pytest.mark.parametrize("k", [64, 390, 1024])
def test_a_in_place_or_packed(isa, rng, restore_threads, k):
    """Note [A in place] (gemm.cpp): row blocks of A read where they lie (k = 64) or
    packed (k = 390, over the in-place limit; k = 1024, rows 4 KiB apart). Blocks of
    both kinds in one call (a projection's token rows crossing a batch boundary) are
    covered by test_projection.py."""
    a, b = randn(rng, 700, k), randn(rng, k, 40)
    for n in (1, 2):
        qn.set_num_threads(n)
        check(qn.matmul(a, b), a, b)


@pytest.mark.parametrize("m", [256, 384])
def test_transposed_a_in_place_or_packed(isa, rng, restore_threads, m):
    """Note [A in place]: a transposed A (dW = Xᵀ·dY) is read where it lies when X's
    rows fall on at least 8 page offsets (m = 384: 1536-byte rows) and packed below
    (m = 256: 1024-byte rows, 4 offsets)."""
    x, dy = randn(rng, 300, m), randn(rng, 300, 70)
    for n in (1, 2):
        qn.set_num_threads(n)
        check(qn.matmul(x, dy, trans_a=True), x, dy, trans_a=True)


@pytest.mark.parametrize("trans_b", [False, True], ids=["N", "T"])
@pytest.mark.parametrize("n", [33, 48, 63, 64, 65, 96, 127, 129])
def test_wide_tiles(isa, rng, n, trans_b):
    """Note [wide tiles] (kernels.cpp): the packed GEMM (M = 200, past the few-row path)
    takes 6 x 64 tiles on AVX-512, two panels of B side by side: full, masked, beside a
    one-panel tail; B packed per call from either orientation and beforehand; beta."""
    a = randn(rng, 200, 70)
    b = stored(randn(rng, 70, n), trans_b)
    check(qn.matmul(a, b, trans_b=trans_b), a, b, trans_b=trans_b)
    c0 = randn(rng, 200, n)
    out = c0.copy()
    qn.matmul(a, b, trans_b=trans_b, alpha=0.5, beta=-1.0, out=out)
    check(out, a, b, trans_b=trans_b, alpha=0.5, beta=-1.0, c=c0)
    if not trans_b:
        check(qn.matmul(a, qn.pack_weight(b)), a, b)


@pytest.mark.parametrize("trans_a", [False, True], ids=["N", "T"])
@pytest.mark.parametrize("m", [601, 602, 605, 606])
def test_packed_a_panels(isa, rng, m, trans_a):
    """A packed into micro-panels (k = 421 > 384: not read in place), 16 columns at a
    time and 5 left over, with a last panel of 1, 2, 5 and 6 rows (AVX-512's 6-row
    panels have their own transpose); and the transposed A's copy."""
    a, b = randn(rng, 421, m) if trans_a else randn(rng, m, 421), randn(rng, 421, 70)
    check(qn.matmul(a, b, trans_a=trans_a), a, b, trans_a=trans_a)


@pytest.mark.parametrize("m", [736, 1729])
def test_m_blocks(isa, rng, restore_threads, m):
    """M is cut into blocks of equal micro-tile counts, as many as the threads or
    more (736 = 61 tiles + 4 rows on AVX-512; 1729 rows, 12 blocks and a row): every
    row once, the same bits for 1, 2 and 3 threads, plain and packed B."""
    a, b = randn(rng, m, 64), randn(rng, 64, 130)
    packed = qn.pack_weight(b)
    results = []
    for n in (1, 2, 3):
        qn.set_num_threads(n)
        for got in (qn.matmul(a, b), qn.matmul(a, packed)):
            check(got, a, b)
            results.append(got)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


@pytest.mark.parametrize("which", ["a2d", "b2d"])
@pytest.mark.parametrize("trans", [False, True], ids=["N", "T"])
def test_broadcast_2d_against_3d(isa, rng, which, trans):
    batch, m, n, k = 4, 7, 65, 129
    if which == "a2d":
        a = stored(randn(rng, m, k), trans)
        b = randn(rng, batch, k, n)
        got = qn.matmul(a, b, trans_a=trans)
        check(got, a, b, trans_a=trans)
    else:
        a = randn(rng, batch, m, k)
        b = stored(randn(rng, k, n), trans)
        got = qn.matmul(a, b, trans_b=trans)
        check(got, a, b, trans_b=trans)
    assert got.shape == (batch, m, n)


def test_batched_strided_and_out(isa, rng):
    """3-D views with unusual batch strides, and a 3-D strided out= with beta."""
    batch, m, n, k = 3, 17, 63, 300
    x = randn(rng, m, batch, k + 5)
    a = x[:, :, 2 : 2 + k].transpose(1, 0, 2)  # (batch, m, k), batch stride k+5
    b = randn(rng, batch * 2, k, n)[::2]  # every other batch item
    big = randn(rng, batch, m + 1, n + 4)
    before = big.copy()
    out = big[:, 1:, 4:]
    c0 = out.copy()
    res = qn.matmul(a, b, alpha=0.5, beta=0.5, out=out)
    assert res is out
    check(out, a, b, alpha=0.5, beta=0.5, c=c0)
    np.testing.assert_array_equal(big[:, 0, :], before[:, 0, :])  # outside the window: untouched
    np.testing.assert_array_equal(big[:, :, :4], before[:, :, :4])


def test_out_3d_beta_zero_nan(isa, rng):
    batch, m, n, k = 2, 65, 17, 129
    a, b = randn(rng, batch, m, k), randn(rng, k, n)
    out = np.full((batch, m, n), np.nan, np.float32)
    res = qn.matmul(a, b, out=out)
    assert res is out and np.isfinite(out).all()
    check(out, a, b)


def test_isas_agree_closely(rng):
    """Every variant within the bound of each other (a cross-check of the dispatch table)."""
    a, b = randn(rng, 65, 300), randn(rng, 300, 33)
    results = {}
    for name in qn.supported_isas():
        with qn.use_isa(name):
            results[name] = qn.matmul(a, b)
    for name, got in results.items():
        check(got, a, b, name=f"matmul[{name}]")


def test_bit_identical_across_thread_counts(isa, rng, restore_threads):
    """Threads split M and N, never K: every element is summed in the same order."""
    cases = [(randn(rng, 129, 300), randn(rng, 300, 257)), (randn(rng, 7, 520), randn(rng, 520, 1100))]
    for a, b in cases:
        results = []
        for n in (1, 2, 3):
            qn.set_num_threads(n)
            results.append(qn.matmul(a, b))
        for r in results[1:]:
            np.testing.assert_array_equal(r, results[0])


@pytest.mark.parametrize("m,n", [(48, 1100), (48, 100), (7, 20), (100, 1000)])
def test_few_row_strips_split_by_work(isa, rng, restore_threads, m, n):
    """The few-row GEMM's threads take runs of column strips of about equal work
    (gemm_small_m): B 4 floats past a line makes a narrow first and last strip; with
    20 columns some of 3-4 threads get no strip. Every column once, the same bits."""
    a, b = randn(rng, m, 384), at_line_offset(randn(rng, 384, n), 4)
    results = []
    for t in (1, 2, 3, 4):
        qn.set_num_threads(t)
        out = np.full((m, n), np.nan, np.float32)
        qn.matmul(a, b, out=out)
        check(out, a, b)
        results.append(out)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


# Note [misaligned operands]: the few-row path starts its column strips on B's cache
# lines when B's rows all start alike (a row step of whole lines: ldb 112, 32, 80); where
# four or more row tiles read a piece of a strip, the first leaves a copy on lines for
# the others if B's rows alias in L1 (ldb 1024, 2048: every CPU) or start off lines (m =
# 60, 100: every strip with ldb 97, the first with ldb 80; not on Zen 5, which reads
# them in place); the micro-tiles prefetch every line of C's rows (m = 200: the packed
# path). Each element is the same sum in the same order whatever strip it falls in, so
# every offset gives the same bits.
@pytest.mark.parametrize(
    "m,n,k,ldb",
    [(13, 97, 40, 112), (5, 20, 7, 32), (40, 70, 33, 70), (60, 97, 40, 97), (100, 70, 33, 80), (200, 70, 300, 80),
     (60, 97, 40, 1024), (100, 70, 33, 2048), (29, 17, 5, 1024)],
)
def test_operands_off_cache_lines(isa, rng, m, n, k, ldb):
    a, b = randn(rng, m, k), randn(rng, k, ldb)
    first = None
    for off in (0, 1, 4, 15):
        a_off, b_off = at_line_offset(a, off), at_line_offset(b, off)[:, :n]
        out = at_line_offset(np.full((m, n), np.nan, np.float32), off)
        assert qn.matmul(a_off, b_off, out=out) is out
        if first is None:
            check(out, a, b[:, :n])
            first = out.copy()
        else:
            np.testing.assert_array_equal(out, first, err_msg=f"offset {off}")
