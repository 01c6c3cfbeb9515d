"""Quick end-to-end check of every op on one ISA-parametrised shape."""

import numpy as np

import qkv_native as qn
from qkv_native import reference as ref


def test_every_op_matches_reference(isa, rng):
    a = rng.standard_normal((67, 129)).astype(np.float32)
    b = rng.standard_normal((129, 45)).astype(np.float32)
    np.testing.assert_allclose(qn.matmul(a, b), ref.matmul(a, b), rtol=1e-4, atol=1e-4)

    q = rng.standard_normal((2, 4, 17, 24)).astype(np.float32)
    k = rng.standard_normal((2, 2, 65, 24)).astype(np.float32)
    v = rng.standard_normal((2, 2, 65, 40)).astype(np.float32)
    o, lse = qn.attention(q, k, v, causal=True, return_lse=True)
    ro, rl = ref.attention(q, k, v, causal=True)
    np.testing.assert_allclose(o, ro, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, rl, rtol=1e-5, atol=1e-5)
    do = rng.standard_normal(o.shape).astype(np.float32)
    for got, want in zip(qn.attention_backward(do, q, k, v, o, lse, causal=True),
                         ref.attention_backward(do, q, k, v, ro, rl, causal=True)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
