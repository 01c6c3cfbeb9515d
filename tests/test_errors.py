"""Bad input raises the documented exception, naming the argument; nothing crashes.

TypeError: not an ndarray, or not float32 (message names the argument and 'float32').
ValueError: ndim, shapes, head counts, a non-contiguous last axis, bad key_lengths,
a bad out= (shape, non-writeable, overlapping an input), absurd sizes.
The private qkv_native._core functions check what memory safety depends on.
"""

import pickle
import re

import numpy as np
import pytest

import qkv_native as qn
from qkv_native import _core

from _helpers import randn


@pytest.fixture
def mm(rng):
    return randn(rng, 7, 5), randn(rng, 5, 3)


@pytest.fixture
def proj(rng):
    # batch 2, seq 3, d_model 8, num_heads 4, num_kv_heads 2, d_head 4
    x = randn(rng, 2, 3, 8)
    return x, randn(rng, 8, 16), randn(rng, 8, 8), randn(rng, 8, 8)


@pytest.fixture
def att(rng):
    # batch 2, heads 4, kv heads 2, seq_q 5, seq_k 6, d_head 8, d_v 3
    return randn(rng, 2, 4, 5, 8), randn(rng, 2, 2, 6, 8), randn(rng, 2, 2, 6, 3)


def raises(exc, *words):
    """pytest.raises whose message must contain every word (literally)."""
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(w)})" for w in words))


def readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


# ----------------------------------------------------------------------------
# matmul
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.float16])
def test_matmul_dtype(mm, dtype):
    a, b = mm
    with raises(TypeError, "a", "float32"):
        qn.matmul(a.astype(dtype), b)
    with raises(TypeError, "b", "float32"):
        qn.matmul(a, b.astype(dtype))


def test_scalars_are_real_numbers(mm, att):
    """Scalar arguments take Python or NumPy real numbers; a string is refused by name,
    not converted."""
    a, b = mm
    q, k, v = att
    for name in ("alpha", "beta"):
        with raises(TypeError, name, "real number"):
            qn.matmul(a, b, **{name: "2"})
    with raises(TypeError, "scale", "real number"):
        qn.attention(q, k, v, scale="0.5")
    np.testing.assert_array_equal(qn.matmul(a, b, alpha=np.float32(2.0)), qn.matmul(a, b, alpha=2))


def test_matmul_not_ndarray(mm):
    a, b = mm
    with raises(TypeError, "a"):
        qn.matmul(a.tolist(), b)
    with raises(TypeError, "b"):
        qn.matmul(a, None)


def test_matmul_shapes(mm, rng):
    a, b = mm
    with raises(ValueError, "a"):
        qn.matmul(a[0], b)  # 1-D
    with raises(ValueError, "b"):
        qn.matmul(a, b[None, None])  # 4-D
    with raises(ValueError, "inner"):
        qn.matmul(a, b.T.copy())
    with raises(ValueError, "inner"):
        qn.matmul(a, b, trans_a=True)
    with raises(ValueError, "batch"):
        qn.matmul(randn(rng, 2, 7, 5), randn(rng, 3, 5, 3))


def test_matmul_last_axis_not_contiguous(rng):
    a = randn(rng, 7, 10)[:, ::2]
    with raises(ValueError, "a", "contiguous"):
        qn.matmul(a, randn(rng, 5, 3))
    b = randn(rng, 5, 6)[:, ::2]
    with raises(ValueError, "b", "contiguous"):
        qn.matmul(randn(rng, 7, 5), b)


def test_matmul_out(mm):
    a, b = mm
    with raises(ValueError, "out"):
        qn.matmul(a, b, beta=1.0)  # beta != 0 needs out
    with raises(ValueError, "out"):
        qn.matmul(a, b, out=np.zeros((3, 7), np.float32))
    with raises(ValueError, "out"):
        qn.matmul(a, b, out=np.zeros((1, 7, 3), np.float32))
    with raises(TypeError, "out", "float32"):
        qn.matmul(a, b, out=np.zeros((7, 3)))
    with raises(TypeError, "out"):
        qn.matmul(a, b, out=[[0.0] * 3] * 7)
    with raises(ValueError, "out", "writeable"):
        qn.matmul(a, b, out=readonly(np.zeros((7, 3), np.float32)))
    with raises(ValueError, "out", "contiguous"):
        qn.matmul(a, b, out=np.zeros((7, 6), np.float32)[:, ::2])


def test_matmul_out_overlapping_input():
    buf = np.ones((7, 7), np.float32)
    a = buf[:, :5]
    b = np.ones((5, 3), np.float32)
    with raises(ValueError, "out", "overlap"):
        qn.matmul(a, b, out=buf[:, 4:7])
    sq = np.ones((4, 4), np.float32)
    with raises(ValueError, "out", "overlap"):
        qn.matmul(sq, sq.copy(), out=sq)


# ----------------------------------------------------------------------------
# projection
# ----------------------------------------------------------------------------


def test_projection_dtypes(proj):
    x, wq, wk, wv = proj
    with raises(TypeError, "x", "float32"):
        qn.qkv_project(x.astype(np.float64), wq, wk, wv, num_heads=4, num_kv_heads=2)
    with raises(TypeError, "w_k", "float32"):
        qn.qkv_project(x, wq, wk.astype(np.int64), wv, num_heads=4, num_kv_heads=2)
    with raises(TypeError, "b_v", "float32"):
        qn.qkv_project(x, wq, wk, wv, None, None, np.zeros(8), num_heads=4, num_kv_heads=2)
    with raises(TypeError, "w_q"):
        qn.qkv_project(x, wq.tolist(), wk, wv, num_heads=4, num_kv_heads=2)


def test_projection_shapes_and_heads(proj):
    x, wq, wk, wv = proj
    with raises(ValueError, "x"):
        qn.qkv_project(x[0], wq, wk, wv, num_heads=4, num_kv_heads=2)
    with raises(ValueError, "w_q"):
        qn.qkv_project(x, wq[:7], wk, wv, num_heads=4, num_kv_heads=2)
    with raises(ValueError, "num_heads"):
        qn.qkv_project(x, wq, wk, wv, num_heads=3, num_kv_heads=1)  # 3 does not divide d_q = 16
    with raises(ValueError, "num_kv_heads"):
        qn.qkv_project(x, wq, wk[:, :6], wv[:, :6], num_heads=4, num_kv_heads=3)  # 3 does not divide 4
    with raises(ValueError, "w_k"):
        qn.qkv_project(x, wq, wk[:, :4], wv, num_heads=4, num_kv_heads=2)
    with raises(ValueError, "w_v"):
        qn.qkv_project(x, wq, wk, wv[:4], num_heads=4, num_kv_heads=2)
    with raises(ValueError, "b_q"):
        qn.qkv_project(x, wq, wk, wv, np.zeros(15, np.float32), num_heads=4, num_kv_heads=2)
    with raises(ValueError, "num_heads"):
        qn.qkv_project(x, wq, wk, wv, num_heads=0)
    with raises(ValueError, "num_heads"):
        qn.qkv_project(x, wq, wk, wv, num_heads=2**64)  # past int64: named, not pybind's signature error
    with raises(ValueError, "num_kv_heads"):
        qn.qkv_project(x, wq, wk, wv, num_heads=4, num_kv_heads=-2)
    with raises(TypeError, "num_heads"):
        qn.qkv_project(x, wq, wk, wv, num_heads=4.0, num_kv_heads=2)
    with raises(TypeError, "num_heads"):
        qn.qkv_project(x, wq, wk, wv, num_heads=True, num_kv_heads=2)
    with raises(ValueError, "x", "contiguous"):
        qn.qkv_project(np.repeat(x, 2, axis=2)[..., ::2], wq, wk, wv, num_heads=4, num_kv_heads=2)


def test_projection_out(proj):
    x, wq, wk, wv = proj
    kw = dict(num_heads=4, num_kv_heads=2)
    good = lambda: (np.zeros((2, 4, 3, 4), np.float32), np.zeros((2, 2, 3, 4), np.float32),  # noqa: E731
                    np.zeros((2, 2, 3, 4), np.float32))
    q, k, v = good()
    with raises(TypeError, "out"):
        qn.qkv_project(x, wq, wk, wv, out=q, **kw)
    with raises(TypeError, "out"):
        qn.qkv_project(x, wq, wk, wv, out=(q, k), **kw)
    with raises(ValueError, "out[0]", "shape"):
        qn.qkv_project(x, wq, wk, wv, out=(np.zeros((2, 4, 3, 5), np.float32), k, v), **kw)
    with raises(ValueError, "out[1]", "shape"):
        qn.qkv_project(x, wq, wk, wv, out=(q, np.zeros((2, 4, 3, 4), np.float32), v), **kw)
    with raises(TypeError, "out[2]", "float32"):
        qn.qkv_project(x, wq, wk, wv, out=(q, k, v.astype(np.float64)), **kw)
    with raises(ValueError, "writeable"):
        qn.qkv_project(x, wq, wk, wv, out=(q, readonly(k), v), **kw)
    with raises(ValueError, "overlap"):
        qn.qkv_project(x, wq, wk, wv, out=(q, k, k), **kw)
    # an output overlapping an input
    buf = np.zeros((2, 3, 8 + 16), np.float32)
    x_view = buf[:, :, :8]
    x_view[...] = x
    q_alias = buf[:, :, :16].reshape(2, 3, 4, 4).transpose(0, 2, 1, 3)  # its first 8 columns are x's
    with raises(ValueError, "out[0]", "overlap", "x"):
        qn.qkv_project(x_view, wq, wk, wv, out=(q_alias, k, v), **kw)
    # beside x in the same rows (no element shared: the exact test) is fine
    q_beside = buf[:, :, 8:].reshape(2, 3, 4, 4).transpose(0, 2, 1, 3)
    want = qn.qkv_project(x, wq, wk, wv, **kw)[0]
    assert qn.qkv_project(x_view, wq, wk, wv, out=(q_beside, k, v), **kw)[0] is q_beside
    np.testing.assert_array_equal(q_beside, want)
    w_buf = np.zeros(64, np.float32)
    w_buf[:] = wk.ravel()
    k_alias = w_buf[16:].reshape(2, 2, 3, 4)  # shares memory with w_k
    with raises(ValueError, "out[1]", "overlap", "w_k"):
        qn.qkv_project(x, wq, w_buf.reshape(8, 8), wv, out=(q, k_alias, v), **kw)


def test_projection_packed_errors(proj):
    x, wq, wk, wv = proj
    w_qkv = np.concatenate([wq, wk, wv], axis=1)
    with raises(ValueError, "w_qkv"):
        qn.qkv_project_packed(x, w_qkv[:, :-1], num_heads=4, num_kv_heads=2)
    with raises(ValueError, "b_qkv"):
        qn.qkv_project_packed(x, w_qkv, np.zeros(31, np.float32), num_heads=4, num_kv_heads=2)
    with raises(TypeError, "w_qkv", "float32"):
        qn.qkv_project_packed(x, w_qkv.astype(np.float64), num_heads=4, num_kv_heads=2)


def test_projection_backward_errors(proj, rng):
    x, wq, wk, wv = proj
    dq, dk, dv = randn(rng, 2, 4, 3, 4), randn(rng, 2, 2, 3, 4), randn(rng, 2, 2, 3, 4)
    with raises(ValueError, "dq"):
        qn.qkv_project_backward(x, wq, wk, wv, dq[:, :, :2], dk, dv)
    with raises(ValueError, "dv"):
        qn.qkv_project_backward(x, wq, wk, wv, dq, dk, dv[..., :3])
    with raises(TypeError, "dk", "float32"):
        qn.qkv_project_backward(x, wq, wk, wv, dq, dk.astype(np.float64), dv)
    with raises(ValueError, "dq"):
        qn.qkv_project_backward(x, wq, wk, wv, dq[0], dk, dv)
    with raises(ValueError, "num_kv_heads"):  # 3 kv heads for 4 query heads
        qn.qkv_project_backward(x, wq, wk[:, :6], wv[:, :6], dq, randn(rng, 2, 3, 3, 2), randn(rng, 2, 3, 3, 2))


# ----------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------


def test_attention_dtypes(att):
    q, k, v = att
    with raises(TypeError, "q", "float32"):
        qn.attention(q.astype(np.float64), k, v)
    with raises(TypeError, "k", "float32"):
        qn.attention(q, k.astype(np.int32), v)
    with raises(TypeError, "v", "float32"):
        qn.attention(q, k, v.astype(np.float16))
    with raises(TypeError, "q"):
        qn.attention(q.tolist(), k, v)
    with raises(TypeError, "bias", "float32"):
        qn.attention(q, k, v, bias=np.zeros((5, 6)))
    with raises(TypeError, "mask"):
        qn.attention(q, k, v, mask=np.ones((5, 6), np.float32))


def test_attention_shapes(att, rng):
    q, k, v = att
    with raises(ValueError, "q"):
        qn.attention(q[0], k, v)
    with raises(ValueError, "k"):
        qn.attention(q, k[:1], v[:1])  # batch mismatch
    with raises(ValueError, "k"):
        qn.attention(q, k[..., :4], v)  # d_head mismatch
    with raises(ValueError, "v"):
        qn.attention(q, k, v[:, :, :5])  # seq_k mismatch
    with raises(ValueError, "v"):
        qn.attention(q, k, v[:, :1])  # kv heads mismatch
    with raises(ValueError, "num_kv_heads"):
        qn.attention(q, randn(rng, 2, 3, 6, 8), randn(rng, 2, 3, 6, 3))  # 3 does not divide 4
    with raises(ValueError, "bias"):
        qn.attention(q, k, v, bias=np.zeros((5, 7), np.float32))
    with raises(ValueError, "bias"):
        qn.attention(q, k, v, bias=np.zeros((1, 1, 1, 5, 6), np.float32))
    with raises(ValueError, "mask"):
        qn.attention(q, k, v, mask=np.ones((3, 5, 6), bool))
    with raises(ValueError, "scale"):
        qn.attention(q, k, v, scale=float("nan"))
    with raises(ValueError, "scale"):
        qn.attention(q, k, v, scale=float("inf"))


def test_attention_last_axis_not_contiguous(att, rng):
    q, k, v = att
    with raises(ValueError, "q", "contiguous"):
        qn.attention(randn(rng, 2, 4, 5, 16)[..., ::2], k, v)
    with raises(ValueError, "k", "contiguous"):
        qn.attention(q, randn(rng, 2, 2, 6, 16)[..., ::2], v)
    with raises(ValueError, "v", "contiguous"):
        qn.attention(q, k, randn(rng, 2, 2, 6, 6)[..., ::2])


def test_attention_key_lengths(att):
    q, k, v = att
    with raises(ValueError, "key_lengths"):
        qn.attention(q, k, v, key_lengths=np.array([7, 1]))  # > seq_k = 6
    with raises(ValueError, "key_lengths"):
        qn.attention(q, k, v, key_lengths=np.array([-1, 1]))
    with raises(ValueError, "key_lengths"):
        qn.attention(q, k, v, key_lengths=np.array([1, 2, 3]))
    with raises(ValueError, "key_lengths"):
        qn.attention(q, k, v, key_lengths=np.array([[1, 2]]))
    with raises(TypeError, "key_lengths"):
        qn.attention(q, k, v, key_lengths=np.array([1.0, 2.0]))
    with raises(TypeError, "key_lengths"):
        qn.attention(q, k, v, key_lengths=[1, 2])
    # any integer dtype in range is fine
    for dt in (np.int8, np.uint16, np.int32, np.int64):
        qn.attention(q, k, v, key_lengths=np.array([6, 0], dtype=dt))


def test_attention_out(att):
    q, k, v = att
    with raises(ValueError, "out"):
        qn.attention(q, k, v, out=np.zeros((2, 4, 5, 8), np.float32))  # d_v is 3
    with raises(ValueError, "out"):
        qn.attention(q, k, v, out=np.zeros((2, 4, 5), np.float32))
    with raises(TypeError, "out", "float32"):
        qn.attention(q, k, v, out=np.zeros((2, 4, 5, 3)))
    with raises(ValueError, "out", "writeable"):
        qn.attention(q, k, v, out=readonly(np.zeros((2, 4, 5, 3), np.float32)))
    with raises(ValueError, "out", "contiguous"):
        qn.attention(q, k, v, out=np.zeros((2, 4, 5, 6), np.float32)[..., ::2])
    q2, k2, v2 = q[..., :3].copy(), k[..., :3].copy(), v.copy()
    with raises(ValueError, "out", "overlap"):
        qn.attention(q2, k2, v2, out=q2)
    vv = np.zeros((2, 4, 6, 3), np.float32)
    with raises(ValueError, "out", "overlap"):
        qn.attention(q2, vv[:, :2], vv[:, 2:], out=vv[:, :, :5])
    bias = np.zeros((2, 4, 5, 3), np.float32)
    with raises(ValueError, "out", "overlap"):
        qn.attention(q2, k2[:, :, :3], v2[:, :, :3], bias=bias, out=bias)


def test_attention_backward_errors(att, rng):
    q, k, v = att
    o, lse = qn.attention(q, k, v, return_lse=True)
    do = randn(rng, *o.shape)
    with raises(ValueError, "lse"):
        qn.attention_backward(do, q, k, v, o, lse[:, :, :4])
    with raises(ValueError, "lse"):
        qn.attention_backward(do, q, k, v, o, lse[..., None])
    with raises(ValueError, "lse"):  # last axis not contiguous
        qn.attention_backward(do, q, k, v, o, np.repeat(lse, 2, axis=2)[:, :, ::2])
    with raises(ValueError, "lse", "contiguous"):  # C order expected
        qn.attention_backward(do, q, k, v, o, np.ascontiguousarray(lse.transpose(1, 0, 2)).transpose(1, 0, 2))
    with raises(ValueError, "do"):
        qn.attention_backward(do[..., :2], q, k, v, o, lse)
    with raises(ValueError, "o"):
        qn.attention_backward(do, q, k, v, o[:, :, :4], lse)
    with raises(TypeError, "o", "float32"):
        qn.attention_backward(do, q, k, v, o.astype(np.float64), lse)
    with raises(TypeError, "do", "float32"):
        qn.attention_backward(do.astype(np.float64), q, k, v, o, lse)
    with raises(TypeError, "lse", "float32"):
        qn.attention_backward(do, q, k, v, o, lse.astype(np.float64))
    with raises(ValueError, "key_lengths"):
        qn.attention_backward(do, q, k, v, o, lse, key_lengths=np.array([9, 1]))


# ----------------------------------------------------------------------------
# absurd sizes: an error, never a crash or a huge allocation
# ----------------------------------------------------------------------------


def huge(shape, last=8):
    """A float32 view of `shape` (+ last axis) over a tiny buffer (zero strides)."""
    base = np.zeros(last, np.float32)
    return np.lib.stride_tricks.as_strided(base, shape=tuple(shape) + (last,),
                                           strides=(0,) * len(shape) + (4,), writeable=False)


def test_absurd_attention_output():
    q = huge((2**20, 2**20, 2**10))  # output would be 2**53 floats
    k = huge((2**20, 1, 1))
    with pytest.raises((ValueError, MemoryError)):
        qn.attention(q, k, k)


def test_absurd_matmul_output():
    a = huge((2**41,), last=1)  # (2**41, 1) @ (1, 1)
    b = np.ones((1, 1), np.float32)
    with pytest.raises((ValueError, MemoryError)):
        qn.matmul(a, b)
    a3 = huge((2**21, 2**21), last=1)
    with pytest.raises((ValueError, MemoryError)):
        qn.matmul(a3, b)


def test_absurd_projection_output():
    x = huge((2**30, 2**20), last=1)  # (batch, seq, d_model=1)
    w = np.ones((1, 8), np.float32)
    with pytest.raises((ValueError, MemoryError)):
        qn.qkv_project(x, w, w, w, num_heads=1)
    dq = huge((2**30, 1, 2**20))
    with pytest.raises((ValueError, MemoryError)):
        qn.qkv_project_backward(x, w, w, w, dq, dq, dq)


# ----------------------------------------------------------------------------
# the private _core functions, called directly
# ----------------------------------------------------------------------------


def test_core_matmul_direct(mm):
    a, b = mm
    with raises(TypeError, "a"):
        _core.matmul(None, b)
    with raises(TypeError, "b"):
        _core.matmul(a, "b")
    with raises(TypeError, "a", "float32"):
        _core.matmul(a.astype(np.float64), b)
    with raises(ValueError, "a"):
        _core.matmul(a[0], b)
    with raises(ValueError, "inner"):
        _core.matmul(a, b[:4])
    with raises(ValueError, "out"):
        _core.matmul(a, b, beta=1.0)
    with raises(ValueError, "out"):
        _core.matmul(a, b, out=readonly(np.zeros((7, 3), np.float32)))
    with raises(ValueError, "out"):
        _core.matmul(a, b, out=np.zeros((7, 4), np.float32))
    with pytest.raises(TypeError):
        _core.matmul(a, b, False, False, "x")  # alpha not a number


def test_core_projection_direct(proj):
    x, wq, wk, wv = proj
    with raises(ValueError, "num_heads"):
        _core.qkv_project(x, wq, wk, wv, None, None, None, 0, 1)
    with raises(ValueError, "num_kv_heads"):
        _core.qkv_project(x, wq, wk, wv, None, None, None, 4, -1)
    with raises(ValueError, "num_kv_heads"):
        _core.qkv_project(x, wq, wk, wv, None, None, None, 4, 3)
    with raises(ValueError, "num_heads"):
        _core.qkv_project(x, wq, wk, wv, None, None, None, 2**62, 1)
    with raises(ValueError, "b_k"):
        _core.qkv_project(x, wq, wk, wv, None, np.zeros(9, np.float32), None, 4, 2)
    with raises(TypeError, "b_q"):
        _core.qkv_project(x, wq, wk, wv, [0.0] * 16, None, None, 4, 2)
    with raises(ValueError, "out[0]"):
        _core.qkv_project(x, wq, wk, wv, None, None, None, 4, 2, np.zeros((2, 4, 3, 3), np.float32))
    with raises(ValueError, "dq"):
        _core.qkv_project_backward(x, wq, wk, wv, np.zeros((2, 4, 3, 3), np.float32),
                                   np.zeros((2, 2, 3, 4), np.float32), np.zeros((2, 2, 3, 4), np.float32), 4, 2)


def test_core_attention_direct(att, rng):
    q, k, v = att
    s = 0.5
    with raises(TypeError, "q"):
        _core.attention(None, k, v, scale=s)
    with raises(ValueError, "scale"):
        _core.attention(q, k, v, scale=float("nan"))
    with raises(ValueError, "scale"):
        _core.attention(q, k, v, scale=1e300)  # not finite as float32
    with raises(ValueError, "bias"):  # not broadcast to 4-D by the Python layer
        _core.attention(q, k, v, bias=np.zeros((5, 6), np.float32), scale=s)
    with raises(ValueError, "bias"):
        _core.attention(q, k, v, bias=np.zeros((2, 4, 5, 5), np.float32), scale=s)
    with raises(TypeError, "bias"):
        _core.attention(q, k, v, bias=np.zeros((2, 4, 5, 6)), scale=s)
    with raises(TypeError, "key_lengths"):
        _core.attention(q, k, v, key_lengths=np.array([1, 2], np.int16), scale=s)
    with raises(TypeError, "key_lengths"):
        _core.attention(q, k, v, key_lengths=[1, 2], scale=s)
    with raises(ValueError, "key_lengths"):
        _core.attention(q, k, v, key_lengths=np.array([1, 7]), scale=s)
    with raises(ValueError, "key_lengths"):
        _core.attention(q, k, v, key_lengths=np.array([-5, 1]), scale=s)
    with raises(ValueError, "key_lengths"):
        _core.attention(q, k, v, key_lengths=np.array([1, 2, 3]), scale=s)
    with raises(ValueError):  # kv heads do not divide
        _core.attention(q, randn(rng, 2, 3, 6, 8), randn(rng, 2, 3, 6, 3), scale=s)
    with raises(ValueError):  # zero kv heads
        _core.attention(q, np.ones((2, 0, 6, 8), np.float32), np.ones((2, 0, 6, 3), np.float32), scale=s)
    with raises(ValueError, "out"):
        _core.attention(q, k, v, scale=s, out=readonly(np.zeros((2, 4, 5, 3), np.float32)))
    o, lse = _core.attention(q, k, v, scale=s, return_lse=True)
    do = np.ones_like(o)
    with raises(ValueError, "lse"):
        _core.attention_backward(do, q, k, v, o, lse[:, :, :1], scale=s)
    with raises(ValueError, "lse"):
        _core.attention_backward(do, q, k, v, o, np.ascontiguousarray(lse.transpose(1, 0, 2)).transpose(1, 0, 2),
                                 scale=s)
    with raises(TypeError, "do"):
        _core.attention_backward(None, q, k, v, o, lse, scale=s)


def test_core_misc_direct():
    with raises(TypeError, "x", "float32"):
        _core.exp(np.zeros(4))
    with raises(ValueError, "x"):
        _core.exp(np.zeros((2, 2), np.float32))
    with raises(ValueError, "contiguous"):
        _core.exp(np.zeros(8, np.float32)[::2])
    with raises(ValueError, "n"):
        _core.set_num_threads(0)
    with raises(ValueError, "n", "1024"):  # past it, thread creation could fail inside a region: an abort
        _core.set_num_threads(_core.MAX_THREADS + 1)
    for bad in (0, _core.MAX_THREADS + 1, 10**30):
        with raises(ValueError, "set_num_threads"):
            qn.set_num_threads(bad)
    for bad in (2.0, True, "2"):
        with raises(TypeError, "set_num_threads"):
            qn.set_num_threads(bad)
        with raises(TypeError, "set_cache_limit", "nbytes"):
            qn.set_cache_limit(bad)
    for bad in (-1, 2**63):
        with raises(ValueError, "set_cache_limit", "nbytes"):
            qn.set_cache_limit(bad)


def test_core_optimizer_buffers_not_none():
    """Only sgd's momentum buffer may be None: a None w, g, m or v was a null pointer."""
    n = 8
    w, g, m, v, buf = (np.zeros(n, np.float32) for _ in range(5))
    offsets, decay = np.array([0, n]), np.array([True])
    for name, args in [("w", (None, g, m, v)), ("g", (w, None, m, v)), ("m", (w, g, None, v)), ("v", (w, g, m, None))]:
        with raises(TypeError, name, "None"):
            _core.adam_update(*args, offsets, decay, 0.9, 0.1, 0.999, 0.001, 1.0, 1e-8, 1e-3, 1.0, 0.0)
        with raises(TypeError, name):
            qn.functional.adam_update(*args, offsets, decay, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                                      weight_decay=0.0, decoupled=True, step=1)
    for name, args in [("w", (None, g, buf)), ("g", (w, None, buf))]:
        with raises(TypeError, name, "None"):
            _core.sgd_update(*args, offsets, decay, 0.0, 0.9, 1.0, 0.1, True, False)
        with raises(TypeError, name):
            qn.functional.sgd_update(*args, offsets, decay, lr=0.1, momentum=0.9, dampening=0.0,
                                     nesterov=False, weight_decay=0.0, first=True)
    _core.sgd_update(w, g, None, offsets, decay, 0.0, 0.0, 1.0, 0.1, True, False)  # no momentum: fine


def test_optimizer_updates_refuse_overlapping_buffers_and_name_hyperparameters():
    """Bug: the in-place updates took m passed as v (or g as w, buf as w) and updated one
    buffer with both formulas (silently wrong weights), and a string lr or eps, or betas
    of three, failed inside the arithmetic or as pybind11's 'incompatible function
    arguments'; now a ValueError / TypeError naming them."""
    n = 8
    w, g, m, v = (np.zeros(n, np.float32) for _ in range(4))
    offsets, decay = np.array([0, n]), np.array([True])
    kw = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=True, step=1)
    for args, name in (((w, g, m, m), "v"), ((w, w, m, v), "g"), ((w, g, m, w[::-1]), "v")):
        with raises(ValueError, name, "overlap"):
            qn.functional.adam_update(*args, offsets, decay, **kw)
    sgd = dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, first=True)
    with raises(ValueError, "buf", "overlap"):
        qn.functional.sgd_update(w, g, w, offsets, decay, **sgd)
    for key, bad, name in (("lr", "1", "lr"), ("eps", "1", "eps"), ("betas", (0.9, 0.9, 0.9), "betas"),
                           ("betas", (0.9, "x"), "betas[1]")):
        with raises(TypeError, name):
            qn.functional.adam_update(w, g, m, v, offsets, decay, **{**kw, key: bad})
    for key in ("lr", "momentum", "dampening", "weight_decay"):
        with raises(TypeError, key):
            qn.functional.sgd_update(w, g, m, offsets, decay, **{**sgd, key: "0.5"})
    for betas in ((1.0, 0.999), (0.9, 1.0), (-0.1, 0.9), (0.9, float("nan"))):  # beta1 = 1: ZeroDivisionError
        with raises(ValueError, "betas", "[0, 1)"):
            qn.functional.adam_update(w, g, m, v, offsets, decay, **{**kw, "betas": betas})


def test_float32_scalars_past_float32_range():
    """Bug: alpha, beta, scale and eps reach the kernels as float32, and a finite value past
    its range became inf: matmul(a, b, alpha=1e39) gave inf where the float64 answer
    (5e37) is a float32, and NaN for K = 0; scale=1e39 was refused as 'not finite'."""
    a, b = np.full((1, 5), 0.1, np.float32), np.full((5, 3), 0.1, np.float32)
    for kw in (dict(alpha=1e39), dict(alpha=-1e39), dict(beta=1e39, out=np.zeros((1, 3), np.float32))):
        with raises(ValueError, next(iter(kw)), "float32's range"):
            qn.matmul(a, b, **kw)
    with raises(ValueError, "alpha", "float32's range"):
        qn.matmul(np.zeros((3, 0), np.float32), np.zeros((0, 4), np.float32), alpha=1e39)
    q = np.ones((1, 1, 2, 4), np.float32)
    with raises(ValueError, "scale", "float32's range"):
        qn.attention(q, q, q, scale=np.float64(1e39))
    with raises(ValueError, "scale", "float32's range"):
        qn.attention_varlen(q[0], q[0], q[0], np.array([0, 1]), np.array([0, 1]), scale=-1e39)
    with raises(ValueError, "eps", "float32's range"):
        qn.layer_norm(np.ones((2, 3), np.float32), np.ones(3, np.float32), np.ones(3, np.float32), eps=1e39)
    assert np.isinf(qn.matmul(a, b, alpha=np.inf)).all()  # infinities are passed on as they are


def test_packed_projection_with_no_columns_names_w_qkv():
    """Bug: a (d_model, 0) w_qkv array was blamed on its slice ('w_q has 0 columns'), an
    argument the caller never passed; the PackedWeight form named w_qkv already."""
    x = np.zeros((2, 3, 8), np.float32)
    for w in (np.zeros((8, 0), np.float32), qn.pack_weight(np.zeros((8, 0), np.float32))):
        with raises(ValueError, "w_qkv", "columns"):
            qn.qkv_project_packed(x, w, num_heads=2)


def test_packed_weight_constructor_trans_must_be_a_bool():
    """Bug: the public PackedWeight(w, trans) class (and _core.pack_weights) took any number
    as trans: PackedWeight(w, 2.5) packed the transpose, trans=None did not, where
    pack_weight refuses them; now a TypeError naming trans."""
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    for bad in (2.5, 1, None, np.float64(1.0)):
        with raises(TypeError, "trans", "bool"):
            qn.PackedWeight(w, bad)
        with raises(TypeError, "trans", "bool"):
            _core.pack_weights([w], bad)
    assert qn.PackedWeight(w, np.True_).shape == (3, 2) and qn.PackedWeight(w).shape == (2, 3)


def test_use_isa_names_a_non_string():
    """Bug: use_isa(None) or use_isa(2) failed as pybind11's 'incompatible function
    arguments' naming set_isa, and use_isa(b'avx2') was taken."""
    for bad in (None, 2, b"avx2"):
        with raises(TypeError, "use_isa", "isa must be a str"):
            with qn.use_isa(bad):
                pass


def test_core_packed_weight_not_initialised():
    """PackedWeight.__new__ without __init__: raw memory (pybind11 allocates the value
    lazily), refused by every use instead of read as sizes and pointers."""
    for _ in range(3):  # a freed PackedWeight's memory, reused, is not taken for a live one
        assert _core.PackedWeight(np.ones((3, 40), np.float32)).shape == (3, 40)  # made and freed
        pw = _core.PackedWeight.__new__(_core.PackedWeight)
        assert "not initialised" in repr(pw)
        for use in (lambda: pw.shape, lambda: pw.nbytes, pw.to_array, lambda: pickle.dumps(pw),
                    lambda: _core.matmul(np.ones((2, 3), np.float32), pw, False, False, 1.0, 0.0, None)):
            with raises(TypeError, "not initialised"):
                use()


def test_core_projection_head_count_bounded():
    """One map segment per head, even of an empty operand: 2**30 heads of zero rows
    would allocate 77 GB of them."""
    heads = 2**30
    x = np.zeros((0, 1, 0), np.float32)
    w = np.lib.stride_tricks.as_strided(np.zeros(4, np.float32), (0, heads), (0, 0))
    with raises(ValueError, "num_heads", "2**20"):
        _core.qkv_project(x, w, w, w, None, None, None, heads, heads, None, None, None)


def test_layer_norm_needs_a_feature():
    with raises(ValueError, "x", "feature"):
        qn.layer_norm(np.zeros((3, 0), np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32))
    with raises(ValueError, "bogus"):
        _core.set_isa("bogus")


def misaligned(a):
    """a's values in a view at an odd byte offset (flags.aligned is False)."""
    r = np.zeros(a.nbytes + 1, np.uint8)[1:].view(a.dtype).reshape(a.shape)
    r[...] = a
    return r


def test_misaligned_bias_and_integer_arrays(att, rng):
    """Bug: a bias at an odd byte offset was read through a misaligned float pointer, and
    key_lengths, cu_seqlens and the optimizers' offsets through misaligned integer ones
    (undefined behaviour), where every other float argument raised. Now the bias raises
    like the others, and the integer arrays (small) are read by copy: the same results."""
    q, k, v = att
    bias = misaligned(randn(rng, 2, 4, 5, 6))
    assert not bias.flags.aligned
    with raises(ValueError, "bias", "aligned"):
        qn.attention(q, k, v, bias=bias)
    kl = np.array([6, 3], np.int64)
    np.testing.assert_array_equal(qn.attention(q, k, v, key_lengths=misaligned(kl)),
                                  qn.attention(q, k, v, key_lengths=kl))
    qp, kp, vp = randn(rng, 5, 4, 8), randn(rng, 6, 2, 8), randn(rng, 6, 2, 3)
    for dt in (np.int32, np.int64):
        cu_q, cu_k = np.array([0, 2, 5], dt), np.array([0, 3, 6], dt)
        want = qn.attention_varlen(qp, kp, vp, cu_q, cu_k, causal=True)
        got = qn.attention_varlen(qp, kp, vp, misaligned(cu_q), misaligned(cu_k), causal=True)
        np.testing.assert_array_equal(got, want)
    w, g = randn(rng, 6), randn(rng, 6)
    outs = []
    for offsets in (np.array([0, 2, 6]), misaligned(np.array([0, 2, 6]))):
        w1, m, vv = w.copy(), np.zeros(6, np.float32), np.zeros(6, np.float32)
        qn.functional.adam_update(w1, g, m, vv, offsets, np.array([True, False]), lr=0.1, betas=(0.9, 0.999),
                                  eps=1e-8, weight_decay=0.1, decoupled=True, step=1)
        outs.append(w1)
    np.testing.assert_array_equal(outs[1], outs[0])


def test_rows_of_nd_inputs_need_a_contiguous_last_axis(rng):
    """Bug: linear, gelu and layer_norm reshaped an N-D x whose last axis is strided into a
    silent copy, where the same x as a 2-D array raised (as the README says)."""
    x = np.asfortranarray(randn(rng, 4, 6, 7))
    w = randn(rng, 7, 3)
    with raises(ValueError, "x", "contiguous in its last axis"):
        qn.linear(x, w)
    with raises(ValueError, "x", "contiguous in its last axis"):
        qn.gelu(x)
    with raises(ValueError, "x", "contiguous in its last axis"):
        qn.layer_norm(x, np.ones(7, np.float32), np.zeros(7, np.float32))
    # leading axes that cannot be merged are fine (their rows are read as given)
    x2 = randn(rng, 4, 12, 7)[:, ::2]
    np.testing.assert_allclose(qn.linear(x2, w), x2.astype(np.float64) @ w, rtol=1e-5, atol=1e-5)


def test_out_interleaved_with_the_inputs_is_not_an_overlap(rng):
    """Bug: q, k, v and out as slots of one token-major buffer share an address range but
    no element; the overlap check compared ranges and refused them ('out must not
    overlap the input q')."""
    b, s, h, d = 2, 5, 3, 8
    buf = randn(rng, b, s, 4, h, d)
    q, k, v, o = (buf[:, :, i].transpose(0, 2, 1, 3) for i in range(4))
    want = qn.attention(q.copy(), k.copy(), v.copy(), causal=True)
    got = qn.attention(q, k, v, causal=True, out=o)
    assert got is o
    np.testing.assert_array_equal(buf[:, :, 3].transpose(0, 2, 1, 3), want)


def test_messages_name_what_was_passed(rng):
    """A NumPy scalar is named as one (was: 'must be a numpy.ndarray of float32, got
    float32'); a packed weight with a strided last axis is named w_qkv (was: w_q, an
    internal slice of it)."""
    w = randn(rng, 1, 3)
    with raises(TypeError, "x", "numpy.float32"):
        qn.linear(np.float32(1.0), w)
    x = randn(rng, 2, 3, 8)
    with raises(ValueError, "w_qkv", "contiguous"):
        qn.qkv_project_packed(x, np.asfortranarray(randn(rng, 8, 24)), num_heads=2, num_kv_heads=2)


def test_flags_are_bools(att, mm, proj, rng):
    """Bug: yes/no arguments took any truthy object: attention(causal='no') ran causal
    attention, return_lse='no' returned a tuple, bias_grad='no' turned the bias gradient
    on. Now a TypeError naming the flag; NumPy bools are fine."""
    q, k, v = att
    for kw in ({"causal": "no"}, {"causal": 1}, {"return_lse": "no"}, {"return_lse": None}):
        name = next(iter(kw))
        with raises(TypeError, name, "bool"):
            qn.attention(q, k, v, **kw)
    o, lse = qn.attention(q, k, v, causal=np.bool_(True), return_lse=np.True_)
    np.testing.assert_array_equal(o, qn.attention(q, k, v, causal=True))
    with raises(TypeError, "bias_grad", "bool"):
        qn.attention_backward(o, q, k, v, o, lse, causal=True, bias=np.zeros((5, 6), np.float32), bias_grad="no")
    with raises(TypeError, "causal", "bool"):
        qn.attention_backward(o, q, k, v, o, lse, causal="yes")
    a, b = mm
    with raises(TypeError, "trans_b", "bool"):
        qn.matmul(a, b.T.copy(), trans_b="yes")
    with raises(TypeError, "trans", "bool"):
        qn.pack_weight(b, trans="no")


def test_projection_backward_names_the_gradient_that_disagrees(proj, rng):
    """Bug: the head counts come from dq and dk, so a dq of the wrong head count was
    reported as a wrong w_k ("w_k must have shape (8, 8), got (8, 16)"), and an x of the
    wrong d_model as a wrong w_q."""
    x, wq, wk, wv = proj  # num_heads 4, num_kv_heads 2, d_head 4
    dq, dk, dv = randn(rng, 2, 4, 3, 4), randn(rng, 2, 2, 3, 4), randn(rng, 2, 2, 3, 4)
    qn.qkv_project_backward(x, wq, wk, wv, dq, dk, dv)
    with raises(ValueError, "dq", "w_q", "16 columns"):
        qn.qkv_project_backward(x, wq, wk, wv, randn(rng, 2, 2, 3, 4), dk, dv)
    with raises(ValueError, "dv", "w_v"):
        qn.qkv_project_backward(x, wq, wk, wv, dq, dk, randn(rng, 2, 2, 3, 2))
    with raises(ValueError, "x", "d_model = 6", "w_q"):
        qn.qkv_project_backward(randn(rng, 2, 3, 6), wq, wk, wv, dq, dk, dv)
