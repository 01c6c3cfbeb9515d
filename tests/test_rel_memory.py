"""Memory: no leak over 10,000 calls of each op (resident memory and reference counts stay
flat, on success and on error), and huge requests raise MemoryError/ValueError instead
of aborting the process.

The huge requests run in a child process whose address space is capped (RLIMIT_AS,
512 MiB above what it maps after import), so that an allocation the op should refuse fails for sure (and cannot exhaust the CI
machine when the OS overcommits). They are skipped under AddressSanitizer, which
reserves terabytes of shadow memory and cannot run under such a cap.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import qkv_native as qn
from qkv_native import _core

F32 = np.float32
CALLS = 10_000
SLACK_KIB = 4096  # allocator noise; a leak of one small array per call would be > 10 MiB
UNDER_ASAN = "asan" in os.environ.get("LD_PRELOAD", "") or bool(os.environ.get("QKV_SANITIZE"))


def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def small_calls(rng):
    """Each op on small inputs (output ~1-2 KiB: a leaked output would show); with out= too."""
    def r(*shape):
        return rng.standard_normal(shape).astype(F32)

    a, b = r(16, 24), r(24, 20)
    c = np.zeros((16, 20), F32)
    x, w = r(2, 9, 16), r(16, 3 * 2 * 8)
    ws = (w[:, :16], w[:, 16:32], w[:, 32:])
    outs = tuple(np.zeros((2, 2, 9, 8), F32) for _ in range(3))
    q, k, v = r(2, 2, 9, 8), r(2, 1, 11, 8), r(2, 1, 11, 8)
    kl, bias, mask = np.array([11, 4]), r(9, 11), np.ones((9, 11), bool)
    o, lse = qn.attention(q, k, v, causal=True, key_lengths=kl, bias=bias, mask=mask, return_lse=True)
    o_out = np.zeros_like(o)
    qv, kv = r(12, 2, 8), r(15, 1, 8)
    cu_q, cu_k = np.array([0, 5, 12], np.int32), np.array([0, 7, 15], np.int32)
    ov, lv = qn.attention_varlen(qv, kv, kv, cu_q, cu_k, return_lse=True)
    pq, pk, pv = qn.qkv_project_packed(x, w, num_heads=2)
    return {
        "matmul": lambda: qn.matmul(a, b),
        "matmul_out": lambda: qn.matmul(a, b, beta=0.5, out=c),
        "qkv_project": lambda: qn.qkv_project(x, *ws, num_heads=2),
        "qkv_project_out": lambda: qn.qkv_project(x, *ws, ws[0][0], None, ws[2][1], num_heads=2, out=outs),
        "qkv_project_packed": lambda: qn.qkv_project_packed(x, w, w[0], num_heads=2),
        "qkv_project_backward": lambda: qn.qkv_project_backward(x, *ws, pq, pk, pv),
        "attention": lambda: qn.attention(q, k, v, causal=True, key_lengths=kl, bias=bias, mask=mask,
                                          return_lse=True),
        "attention_out": lambda: qn.attention(q, k, v, out=o_out),
        "attention_backward": lambda: qn.attention_backward(o, q, k, v, o, lse, causal=True, key_lengths=kl,
                                                            bias=bias, mask=mask),
        "attention_varlen": lambda: qn.attention_varlen(qv, kv, kv, cu_q, cu_k, causal=True, return_lse=True),
        "attention_varlen_backward": lambda: qn.attention_varlen_backward(ov, qv, kv, kv, ov, lv, cu_q, cu_k),
        # error paths: the exception objects must not leak either
        "error_python_layer": lambda: qn.attention(q, k, v[:, :, :3]),
        "error_binding": lambda: _core.attention(q, k, v, key_lengths=np.array([1, 99]), scale=0.5),
        "error_type": lambda: _core.matmul(a, b.astype(np.float64)),
    }, (a, b, c, x, w, q, k, v, o, lse, o_out, qv, kv, ov, lv, cu_q, cu_k) + outs


@pytest.mark.skipif(UNDER_ASAN, reason="AddressSanitizer's quarantine holds freed memory: RSS is not flat")
def test_repeated_calls_do_not_leak(rng):
    calls, arrays = small_calls(rng)
    refcounts = [sys.getrefcount(t) for t in arrays]
    growth = {}
    for name, call in calls.items():
        def once():
            try:
                call()
            except (ValueError, TypeError):
                assert name.startswith("error")

        for _ in range(300):  # warm-up: allocator pools, OpenMP pool, caches
            once()
        gc.collect()
        before = rss_kib()
        for _ in range(CALLS):
            once()
        gc.collect()
        growth[name] = rss_kib() - before
    leaks = {n: g for n, g in growth.items() if g > SLACK_KIB}
    assert not leaks, f"resident memory grew by more than {SLACK_KIB} KiB over {CALLS} calls: {leaks} (all: {growth})"
    assert [sys.getrefcount(t) for t in arrays] == refcounts, "reference counts of inputs/outputs changed"


# ----------------------------------------------------------------------------
# huge requests: MemoryError / ValueError, never an abort
# ----------------------------------------------------------------------------

_CHILD = """
import resource, sys
import numpy as np
import qkv_native as qn

def huge(shape, last):
    # a float32 view of shape + (last,) over a tiny buffer (zero strides)
    base = np.zeros(last, np.float32)
    return np.lib.stride_tricks.as_strided(base, shape=tuple(shape) + (last,),
                                           strides=(0,) * len(shape) + (4,), writeable=False)

qn.matmul(np.ones((64, 64), np.float32), np.ones((64, 64), np.float32))  # threads started
with open("/proc/self/status") as f:
    vm = next(int(l.split()[1]) for l in f if l.startswith("VmSize:")) * 1024
limit = vm + (512 << 20)  # 512 MiB above what the process already maps
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
{setup}
try:
    {call}
    print("RESULT: success")
except (MemoryError, ValueError) as e:
    print("RESULT:", type(e).__name__, str(e)[:200])
# the process is still usable afterwards
r = qn.matmul(np.ones((3, 2), np.float32), np.ones((2, 4), np.float32))
assert (r == 2).all()
print("RESULT: usable")
"""

D_HUGE = 1 << 24  # one 64 MiB row; the attention workspace holds >= 16 rows of d_head floats per thread

HUGE = {
    # outputs exactly at the binding's size cap (2**40 elements, 4 TiB): allocation must fail cleanly
    "matmul_out_4TiB": ("a = huge((1 << 20,), 1); b = np.ones((1, 1 << 20), np.float32)", "qn.matmul(a, b)"),
    "batched_matmul_out_4TiB": ("a = huge((1 << 10, 1 << 15), 1); b = np.ones((1, 1 << 15), np.float32)",
                                "qn.matmul(a, b)"),
    # empty results of 2**40 rows or products: at once (a loop over them ran for hours)
    "batched_matmul_empty_2**40": ("a = huge((1 << 40, 0), 3); b = np.ones((3, 4), np.float32)", "qn.matmul(a, b)"),
    "gelu_empty_2**40_rows": ("x = huge((1 << 40,), 0)", "qn.gelu(x); qn.gelu_backward(x, x)"),
    "attention_out_4TiB": ("q = huge((1 << 10, 1 << 10, 1 << 20), 1); k = huge((1 << 10, 1, 1), 1)",
                           "qn.attention(q, k, k)"),
    "attention_mask_4TiB": ("q = huge((1, 1, 1 << 20), 1); k = huge((1, 1, 1 << 20), 1)",
                            "qn.attention(q, k, k, mask=np.ones((1, 1), bool))"),
    "projection_output_too_large": ("x = huge((1 << 30, 1 << 20), 1); w = np.ones((1, 8), np.float32)",
                                    "qn.qkv_project(x, w, w, w, num_heads=1)"),
    # real (64 MiB) inputs whose per-thread workspace (>= 1 GiB) does not fit: bug, the process aborts
    "attention_large_d_head": (f"q = np.ones((1, 1, 1, {D_HUGE}), np.float32)", "qn.attention(q, q, q)"),
    "attention_backward_large_d_head": (
        f"q = np.ones((1, 1, 1, {D_HUGE}), np.float32); lse = np.zeros((1, 1, 1), np.float32)",
        "qn.attention_backward(q, q, q, q, q, lse)"),
    "attention_varlen_large_d_head": (f"q = np.ones((1, 1, {D_HUGE}), np.float32); cu = np.array([0, 1])",
                                      "qn.attention_varlen(q, q, q, cu, cu)"),
}


@pytest.mark.skipif(UNDER_ASAN, reason="AddressSanitizer cannot run under an address-space limit")
@pytest.mark.parametrize("name", list(HUGE))
def test_huge_request_raises_instead_of_aborting(name):
    setup, call = HUGE[name]
    code = _CHILD.replace("{setup}", setup).replace("{call}", call)
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=120)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT:")]
    assert proc.returncode == 0 and lines and lines[-1] == "RESULT: usable", (
        f"{name}: the process died (exit {proc.returncode}) instead of raising MemoryError/ValueError\n"
        f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}")
    # success is fine where the memory suffices; what must not happen is an abort
    assert lines[0].split()[1] in ("MemoryError", "ValueError", "success"), lines
