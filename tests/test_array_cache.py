"""The cache behind large result arrays (Note [array cache], qkv_native.set_cache_limit)."""

import gc

import numpy as np
import pytest

import qkv_native as qn
from qkv_native import reference as ref


@pytest.fixture(autouse=True)
def default_limit():
    old = qn.set_cache_limit(256 << 20)
    yield
    qn.set_cache_limit(old)


def big_result(rows=256, cols=256):
    """A fresh (rows, cols) result from a native op: 256 KiB by default, over the cache's minimum."""
    a = np.ones((rows, 8), np.float32)
    b = np.ones((8, cols), np.float32)
    return qn.matmul(a, b)


def test_large_results_are_ordinary_writeable_arrays():
    c = big_result()
    assert c.nbytes >= qn.cache_info()["min_array_bytes"]
    assert c.flags.c_contiguous and c.flags.writeable and c.flags.aligned
    assert c.ctypes.data % 4096 == 0
    np.testing.assert_array_equal(c, np.full((256, 256), 8.0, np.float32))
    c[0, 0] = -1.0  # writeable in place, and its own memory
    assert c[0, 0] == -1.0
    d = c.copy()
    assert not np.shares_memory(c, d)


def test_small_results_bypass_the_cache():
    qn.set_cache_limit(0)
    qn.set_cache_limit(256 << 20)
    c = big_result(4, 4)
    assert c.base is None  # NumPy's own memory
    del c
    gc.collect()
    assert qn.cache_info()["blocks"] == 0


def test_freed_block_is_reused_for_the_next_result_of_that_size():
    qn.set_cache_limit(0)  # start empty
    qn.set_cache_limit(256 << 20)
    c = big_result()
    addr = c.ctypes.data
    del c
    gc.collect()
    info = qn.cache_info()
    assert info["blocks"] == 1 and info["bytes"] == 256 * 256 * 4
    c = big_result()
    assert c.ctypes.data == addr
    assert qn.cache_info()["blocks"] == 0


def test_limit_zero_keeps_nothing_and_returns_the_old_limit():
    assert qn.set_cache_limit(123 << 20) == 256 << 20
    c = big_result()
    del c
    gc.collect()
    assert qn.cache_info()["blocks"] == 1
    assert qn.set_cache_limit(0) == 123 << 20
    assert qn.cache_info() == {**qn.cache_info(), "bytes": 0, "blocks": 0, "limit": 0}
    c = big_result()
    del c
    gc.collect()
    assert qn.cache_info()["blocks"] == 0


def test_limits_bound_what_is_kept():
    qn.set_cache_limit(0)
    qn.set_cache_limit(600 << 10)  # room for two 256 KiB blocks
    arrays = [big_result() for _ in range(5)]
    del arrays
    gc.collect()
    info = qn.cache_info()
    assert info["blocks"] == 2 and info["bytes"] == 2 * (256 << 10)
    qn.set_cache_limit(1 << 30)
    arrays = [big_result(64, 256) for _ in range(80)]  # 64 KiB each: more than the block bound
    del arrays
    gc.collect()
    assert 0 < qn.cache_info()["blocks"] <= 64


def test_set_cache_limit_rejects_negative():
    with pytest.raises(ValueError, match="nbytes"):
        qn.set_cache_limit(-1)


def test_reused_memory_never_leaks_into_results():
    """Blocks come back full of NaN: every op must write its whole result, never read it."""
    rng = np.random.default_rng(3)
    shape = (4, 4, 64, 32)  # 128 KiB per tensor
    q, k, v, do = (rng.standard_normal(shape).astype(np.float32) for _ in range(4))

    def poison(n_arrays, nbytes):
        arrays = [big_result(nbytes // (4 * 256), 256) for _ in range(n_arrays)]
        for a in arrays:
            a.fill(np.nan)
        del arrays
        gc.collect()

    qn.set_cache_limit(0)
    qn.set_cache_limit(256 << 20)
    poison(4, q.nbytes)
    o, lse = qn.attention(q, k, v, causal=True, return_lse=True)
    poison(4, q.nbytes)
    dq, dk, dv = qn.attention_backward(do, q, k, v, o, lse, causal=True)
    o_ref, lse_ref = ref.attention(q, k, v, causal=True)
    grads_ref = ref.attention_backward(do, q, k, v, o_ref, lse_ref, causal=True)
    np.testing.assert_allclose(o, o_ref, rtol=1e-4, atol=1e-5)
    for g, r in zip((dq, dk, dv), grads_ref):
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-4)
