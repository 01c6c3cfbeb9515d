"""Packed variable-length attention (cu_seqlens) against the float64 reference."""

import numpy as np
import pytest

import qkv_native as qn
from qkv_native import reference as ref

EPS = 2.0**-23


def _packed(rng, lens_q, lens_k, num_heads, num_kv_heads, d_head, d_v):
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int64)
    q = rng.standard_normal((cu_q[-1], num_heads, d_head)).astype(np.float32)
    k = rng.standard_normal((cu_k[-1], num_kv_heads, d_head)).astype(np.float32)
    v = rng.standard_normal((cu_k[-1], num_kv_heads, d_v)).astype(np.float32)
    return q, k, v, cu_q, cu_k


CASES = [
    # lens_q, lens_k, causal, heads, kv heads, d_head, d_v
    ([5, 0, 17, 130], [5, 3, 17, 130], True, 4, 2, 24, 24),
    ([1, 64, 7], [40, 64, 90], False, 2, 2, 64, 40),
    ([3, 9], [2, 9], True, 3, 1, 8, 8),
    ([65], [129], False, 2, 1, 96, 96),
]


@pytest.mark.parametrize("lens_q,lens_k,causal,h,hkv,d,dv", CASES)
def test_varlen_forward_and_backward_match_reference(isa, rng, lens_q, lens_k, causal, h, hkv, d, dv):
    q, k, v, cu_q, cu_k = _packed(rng, lens_q, lens_k, h, hkv, d, dv)
    o, lse = qn.attention_varlen(q, k, v, cu_q, cu_k, causal=causal, return_lse=True)
    ro, rl = ref.attention_varlen(q, k, v, cu_q, cu_k, causal=causal)
    tol = 16 * np.sqrt(max(lens_k) * d) * EPS
    np.testing.assert_allclose(o, ro, rtol=tol, atol=tol)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(rl))
    finite = np.isfinite(rl)
    np.testing.assert_allclose(lse[finite], rl[finite], rtol=tol, atol=tol)
    assert not np.isnan(o).any()

    do = rng.standard_normal(o.shape).astype(np.float32)
    got = qn.attention_varlen_backward(do, q, k, v, o, lse, cu_q, cu_k, causal=causal)
    want = ref.attention_varlen_backward(do, q, k, v, ro, rl, cu_q, cu_k, causal=causal)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        gtol = 64 * np.sqrt(max(lens_k) * max(lens_q) * d) * EPS
        np.testing.assert_allclose(g, w, rtol=gtol, atol=gtol, err_msg=name)


def test_varlen_equals_padded_attention(rng):
    """The packed form computes what key_lengths computes on a right-padded batch."""
    lens = np.array([7, 30, 1, 18])
    q, k, v, cu_q, cu_k = _packed(rng, lens, lens, 4, 4, 32, 32)
    o = qn.attention_varlen(q, k, v, cu_q, cu_k)
    seq = lens.max()
    pad = np.zeros((len(lens), 4, seq, 32), np.float32)
    qp, kp, vp = pad.copy(), pad.copy(), pad.copy()
    for b in range(len(lens)):
        s = slice(cu_q[b], cu_q[b + 1])
        qp[b, :, : lens[b]] = q[s].transpose(1, 0, 2)
        kp[b, :, : lens[b]] = k[s].transpose(1, 0, 2)
        vp[b, :, : lens[b]] = v[s].transpose(1, 0, 2)
    op = qn.attention(qp, kp, vp, key_lengths=lens)
    for b in range(len(lens)):
        np.testing.assert_allclose(o[cu_q[b] : cu_q[b + 1]], op[b, :, : lens[b]].transpose(1, 0, 2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "cu_q,cu_k,err",
    [
        (np.array([0, 3, 2]), np.array([0, 1, 2]), "non-decreasing"),
        (np.array([1, 2]), np.array([0, 2]), "start at 0"),
        (np.array([0, 5]), np.array([0, 2]), "end at"),
        (np.array([0, 2]), np.array([0, 1, 2]), "same shape"),
    ],
)
def test_varlen_rejects_bad_offsets(rng, cu_q, cu_k, err):
    q = rng.standard_normal((2, 2, 8)).astype(np.float32)
    k = rng.standard_normal((2, 2, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=err):
        qn.attention_varlen(q, k, k, cu_q, cu_k)


def test_varlen_rejects_float_offsets(rng):
    q = rng.standard_normal((2, 2, 8)).astype(np.float32)
    with pytest.raises(TypeError, match="cu_seqlens_q"):
        qn.attention_varlen(q, q, q, np.array([0.0, 2.0]), np.array([0, 2]))
