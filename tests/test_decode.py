"""Attention with a few queries against many keys (decode steps): the dot-product path."""

import numpy as np
import pytest

import qkv_native as qn
from qkv_native import reference as ref

from _helpers import assert_within, attention_forward_bounds


@pytest.mark.parametrize("seq_q", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("d_head", [8, 24, 64, 128])
def test_decode_matches_reference(isa, rng, seq_q, d_head):
    batch, heads, kv_heads, seq_k = 2, 4, 2, 300
    q = rng.standard_normal((batch, heads, seq_q, d_head)).astype(np.float32)
    k = rng.standard_normal((batch, kv_heads, seq_k, d_head)).astype(np.float32)
    v = rng.standard_normal((batch, kv_heads, seq_k, d_head)).astype(np.float32)
    key_lengths = np.array([seq_k, 123])
    for kw in (dict(causal=True), dict(key_lengths=key_lengths), dict(causal=True, key_lengths=key_lengths)):
        o, lse = qn.attention(q, k, v, return_lse=True, **kw)
        ro, rl = ref.attention(q, k, v, **kw)
        bo, bl = attention_forward_bounds(q, k, v, ro, rl, **kw)
        assert_within(o, ro, bo, "o")
        assert_within(lse, rl, bl, "lse")
