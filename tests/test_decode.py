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


# One query per head takes the decode tasks (Note [decode tasks] in
# cpp/src/attention_fwd.cpp): the heads of a kv group as the rows of one task, keys in
# chunks of at least 512 merged afterwards. Group sizes 1-4 use dot products, larger
# ones a packed block; 1300 and 1100 keys are 2 chunks, 700 one.
@pytest.mark.parametrize("heads,kv_heads", [(3, 3), (4, 1), (6, 2), (10, 2)])
@pytest.mark.parametrize("d_head", [8, 80, 128])
def test_decode_groups_and_chunks(isa, rng, heads, kv_heads, d_head):
    batch, seq_k = 2, 1300
    q = rng.standard_normal((batch, heads, 1, d_head)).astype(np.float32)
    k = rng.standard_normal((batch, kv_heads, seq_k, d_head)).astype(np.float32)
    v = rng.standard_normal((batch, kv_heads, seq_k, d_head)).astype(np.float32)
    for kw in (dict(), dict(key_lengths=np.array([1100, 700]))):
        o, lse = qn.attention(q, k, v, return_lse=True, **kw)
        ro, rl = ref.attention(q, k, v, **kw)
        bo, bl = attention_forward_bounds(q, k, v, ro, rl, **kw)
        assert_within(o, ro, bo, "o")
        assert_within(lse, rl, bl, "lse")


def test_decode_hidden_chunks(isa, rng):
    """A bias that hides a whole chunk of keys (and, for one head, every key), with NaN
    in k and v wherever keys are hidden: the hidden keys reach nothing, a head that
    sees no key gets o = 0 and lse = -inf."""
    batch, heads, kv_heads, seq_k, d_head = 2, 4, 2, 1800, 32
    q = rng.standard_normal((batch, heads, 1, d_head)).astype(np.float32)
    k = rng.standard_normal((batch, kv_heads, seq_k, d_head)).astype(np.float32)
    v = rng.standard_normal((batch, kv_heads, seq_k, d_head)).astype(np.float32)
    bias = rng.standard_normal((batch, heads, 1, seq_k)).astype(np.float32)
    bias[:, :, :, 512:1024] = -np.inf  # the second chunk
    bias[0, 1] = -np.inf  # every key of one head
    bias[1, :, :, 1500:] = -np.inf  # the tail of the last chunk
    o_clean, lse_clean = ref.attention(q, k, v, bias=bias)
    hidden_everywhere = np.isinf(bias).all(axis=(1, 2))  # (batch, seq_k): hidden from every head
    group = heads // kv_heads
    for b in range(batch):
        for hk in range(kv_heads):
            cols = np.isinf(bias[b, hk * group:(hk + 1) * group, 0]).all(axis=0)
            k[b, hk, cols] = np.nan
            v[b, hk, cols] = np.nan
    assert hidden_everywhere[:, 600].all()
    o, lse = qn.attention(q, k, v, bias=bias, return_lse=True)
    assert np.isfinite(o).all()
    np.testing.assert_array_equal(o[0, 1], 0.0)
    assert lse[0, 1, 0] == -np.inf
    bo, bl = attention_forward_bounds(q, np.nan_to_num(k), np.nan_to_num(v), o_clean, lse_clean, bias=bias)
    assert_within(o, o_clean, bo, "o")
    assert_within(lse, lse_clean, bl, "lse")


def test_decode_same_bits_for_any_thread_count(rng, restore_threads):
    """The key chunks depend on the shape only: 1, 2, 3, 5 and 9 threads give the same bits."""
    batch, heads, kv_heads, seq_k, d_head = 2, 8, 2, 2100, 64
    q = rng.standard_normal((batch, heads, 1, d_head)).astype(np.float32)
    k = rng.standard_normal((batch, kv_heads, seq_k, d_head)).astype(np.float32)
    v = rng.standard_normal((batch, kv_heads, seq_k, d_head)).astype(np.float32)
    kw = dict(key_lengths=np.array([2100, 1500]))
    results = []
    for n in (1, 2, 3, 5, 9):
        qn.set_num_threads(n)
        results.append(qn.attention(q, k, v, return_lse=True, **kw))
    ro, rl = ref.attention(q, k, v, **kw)
    bo, bl = attention_forward_bounds(q, k, v, ro, rl, **kw)
    assert_within(results[0][0], ro, bo, "o")
    assert_within(results[0][1], rl, bl, "lse")
    for (o, lse), n in zip(results[1:], (2, 3, 5, 9)):
        np.testing.assert_array_equal(o, results[0][0], err_msg=f"o: {n} threads differ from 1")
        np.testing.assert_array_equal(lse, results[0][1], err_msg=f"lse: {n} threads differ from 1")
