"""Fuzz target for the binding layer: calls ``qkv_native._core`` directly.

Hypothesis builds a consistent call of one of the native functions (shapes that agree,
so the drivers and kernels run), then replaces up to three arguments by something else:
an array of another rank, shape, dtype or memory layout (negative, zero, overlapping or
non-unit strides, unaligned, read-only, Fortran order, absurd sizes over a tiny
buffer), or a non-array (None, numbers, strings, lists, objects). The only acceptable
outcomes are a return value or TypeError / ValueError / MemoryError; any other
exception fails the run (Hypothesis shrinks it and prints the call), and a crash kills
the process (the pytest wrapper, test_rel_fuzz.py, runs this file in a subprocess).

Time-bounded: chunks of 60 examples, chunk i seeded with i (so a run is reproducible),
until the budget is spent.

    python tests/fuzz_binding.py                      # QKV_FUZZ_SECONDS or 10 s
    QKV_FUZZ_SECONDS=600 python tests/fuzz_binding.py # longer, locally
    python tests/fuzz_binding.py --seconds 60 --first-chunk 1000 --verbose

The process caps its address space (RLIMIT_AS, 2 GiB above what it maps at start) so
that an absurd allocation fails with MemoryError instead of swapping; under
AddressSanitizer (which needs terabytes of address space) the cap and the absurd
sizes are left out.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import resource
import sys
import time
from collections import Counter

import numpy as np
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import qkv_native as qn  # noqa: F401 - builds/loads the extension
from qkv_native import _core

ALLOWED = (TypeError, ValueError, MemoryError)
F32 = np.float32
UNDER_ASAN = "asan" in os.environ.get("LD_PRELOAD", "") or bool(os.environ.get("QKV_SANITIZE"))

DIMS = [0, 1, 1, 2, 3, 5, 8, 16, 17, 33]
BAD_DTYPES = [np.float64, np.float16, np.int32, np.int64, np.bool_, np.uint8, np.complex64, object, ">f4"]
JUNK = [None, 0, 1, -1, 2**31, 2**63, -(2**63), 2**70, 0.5, float("nan"), float("inf"), 1e300, True, "x", b"x",
        [], [1.0, 2.0], (1, 2), {}, object(), np.float32(1.0), np.int64(3), np.array(1.0, F32)]
# layouts of the arguments of a consistent call (all acceptable to the binding) ...
LAYOUTS = ["c", "c", "c", "neg", "gap", "bcast", "overlap", "unaligned", "readonly"]
# ... and, for replaced arguments, also the ones it must reject (a last axis that is not contiguous)
ANY_LAYOUT = LAYOUTS + ["neg_last", "swap_last", "fortran"]

stats: Counter = Counter()


# ----------------------------------------------------------------------------
# arrays
# ----------------------------------------------------------------------------


def make_array(data, shape, dtype=F32, layout=None, label="array"):
    """An array of ``shape`` and ``dtype`` in a drawn memory layout (views stay inside
    their buffers: nothing here is out of bounds by construction)."""
    shape = tuple(int(s) for s in shape)
    if layout is None:
        layout = data.draw(st.sampled_from(LAYOUTS), label=f"{label} layout")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label=f"{label} values"))
    vals = rng.standard_normal(shape) * data.draw(st.sampled_from([1.0, 1.0, 1e-40, 1e20, 0.0]), label="scale")
    with np.errstate(all="ignore"):
        if dtype is object:
            base = vals.astype(object)
        else:
            base = vals.astype(dtype)
    nd = len(shape)
    if layout == "c" or nd == 0 or dtype is object:
        return base
    if layout == "neg":
        return np.ascontiguousarray(base[(slice(None, None, -1),) * (nd - 1)])[(slice(None, None, -1),) * (nd - 1)]
    if layout == "neg_last":
        return np.ascontiguousarray(base[..., ::-1])[..., ::-1]
    if layout == "gap":
        big = np.zeros(tuple(2 * s for s in shape[:-1]) + (shape[-1] + 3,), base.dtype)
        view = big[(slice(None, None, 2),) * (nd - 1) + (slice(1, 1 + shape[-1]),)]
        view[...] = base
        return view
    if layout == "swap_last" and nd >= 2:
        return np.ascontiguousarray(np.swapaxes(base, -1, -2)).swapaxes(-1, -2)
    if layout == "bcast":
        return np.broadcast_to(base[:1], shape)
    if layout == "overlap" and nd >= 2:
        rows, cols = shape[-2], shape[-1]
        outer = int(np.prod(shape[:-2], dtype=np.int64))
        span = rows + cols
        flat = np.zeros(max(outer * span, 1), base.dtype)
        item = flat.itemsize
        strides, step = [], span * item
        for s in reversed(shape[:-2]):
            strides.append(step)
            step *= max(s, 1)
        return np.lib.stride_tricks.as_strided(flat, shape, tuple(reversed(strides)) + (item, item), writeable=False)
    if layout == "unaligned":
        raw = np.zeros(base.nbytes + 16, np.uint8)
        view = raw[1 : 1 + base.nbytes].view(base.dtype).reshape(shape)
        view[...] = base
        return view
    if layout == "readonly":
        base.flags.writeable = False
        return base
    if layout == "fortran":
        return np.asfortranarray(base)
    return base


def giant(data, ndim):
    """A float32 view of absurd size over a 4-element buffer (zero strides)."""
    big = [data.draw(st.sampled_from([1, 2**20, 2**31, 2**33, 2**40, 2**58]), label="giant dim") for _ in range(ndim - 1)]
    last = data.draw(st.sampled_from([1, 4]), label="giant last")
    while int(np.prod([float(x) for x in big] + [last * 4.0])) >= 2**62:  # NumPy's own limit
        i = big.index(max(big))
        big[i] = 1 if big[i] <= 2**20 else 2**20
    base = np.zeros(4, F32)
    return np.lib.stride_tricks.as_strided(base, tuple(big) + (last,), (0,) * (ndim - 1) + (4,), writeable=False)


def anything(data, label):
    """A replacement argument: a random array, an absurdly large view, or a non-array."""
    kind = data.draw(st.sampled_from(["array", "array", "giant", "junk"]), label=f"{label} replacement")
    if kind == "junk":
        return data.draw(st.sampled_from(JUNK), label=f"{label} junk")
    if kind == "giant" and not UNDER_ASAN:
        return giant(data, data.draw(st.integers(1, 5), label="giant ndim"))
    ndim = data.draw(st.integers(0, 5), label=f"{label} ndim")
    shape = [data.draw(st.sampled_from(DIMS), label="dim") for _ in range(ndim)]
    while int(np.prod(shape, dtype=np.int64)) > 20_000:  # keep every example fast
        shape[shape.index(max(shape))] //= 2
    dtype = data.draw(st.sampled_from([F32] * 4 + BAD_DTYPES), label=f"{label} dtype")
    return make_array(data, shape, dtype, data.draw(st.sampled_from(ANY_LAYOUT), label=f"{label} layout"), label)


def mutate(data, args: dict):
    """Replace 0-3 arguments (most calls keep 0 or 1, so that deep paths run)."""
    names = list(args)
    n = data.draw(st.sampled_from([0, 0, 0, 1, 1, 2, 3]), label="mutations")
    for _ in range(n):
        name = data.draw(st.sampled_from(names), label="mutated argument")
        args[name] = anything(data, name)
    return args


def out_array(data, shape, label="out"):
    if data.draw(st.booleans(), label=f"{label} given"):
        layout = data.draw(st.sampled_from(["c", "c", "neg", "gap", "unaligned", "swap_last", "readonly"]),
                           label=f"{label} layout")
        return make_array(data, shape, F32, layout, label)
    return None


def dim(data, label, choices=DIMS):
    return data.draw(st.sampled_from(choices), label=label)


# ----------------------------------------------------------------------------
# one call per native function
# ----------------------------------------------------------------------------


def call_matmul(data):
    m, n, k = dim(data, "M"), dim(data, "N"), dim(data, "K")
    ta, tb = data.draw(st.booleans(), label="trans_a"), data.draw(st.booleans(), label="trans_b")
    batch = dim(data, "batch", [0, 1, 2, 3])
    ra, rb = data.draw(st.sampled_from([2, 3])), data.draw(st.sampled_from([2, 3]))
    a_shape = ((batch,) if ra == 3 else ()) + ((k, m) if ta else (m, k))
    b_shape = ((batch,) if rb == 3 else ()) + ((n, k) if tb else (k, n))
    o_shape = ((batch,) if 3 in (ra, rb) else ()) + (m, n)
    beta = data.draw(st.sampled_from([0.0, 0.0, 1.0, float("nan")]), label="beta")
    args = dict(a=make_array(data, a_shape, label="a"), b=make_array(data, b_shape, label="b"), trans_a=ta,
                trans_b=tb, alpha=data.draw(st.sampled_from([1.0, -2.0, 0.0, float("inf")]), label="alpha"),
                beta=beta, out=out_array(data, o_shape))
    return _core.matmul, mutate(data, args)


def _projection_shapes(data):
    batch, seq, d_model = dim(data, "batch", [0, 1, 2]), dim(data, "seq"), dim(data, "d_model")
    num_kv_heads = dim(data, "num_kv_heads", [1, 2])
    num_heads = num_kv_heads * dim(data, "group", [1, 2, 3])
    d_head = dim(data, "d_head", [1, 2, 3, 8, 17])
    return batch, seq, d_model, num_heads, num_kv_heads, d_head


def call_qkv_project(data):
    batch, seq, d_model, h, hkv, d = _projection_shapes(data)
    args = dict(x=make_array(data, (batch, seq, d_model), label="x"), w_q=make_array(data, (d_model, h * d), label="w_q"),
                w_k=make_array(data, (d_model, hkv * d), label="w_k"), w_v=make_array(data, (d_model, hkv * d), label="w_v"),
                b_q=make_array(data, (h * d,), label="b_q") if data.draw(st.booleans()) else None,
                b_k=make_array(data, (hkv * d,), label="b_k") if data.draw(st.booleans()) else None,
                b_v=None, num_heads=h, num_kv_heads=hkv,
                q_out=out_array(data, (batch, h, seq, d), "q_out"), k_out=out_array(data, (batch, hkv, seq, d), "k_out"),
                v_out=None)
    return _core.qkv_project, mutate(data, args)


def call_qkv_project_backward(data):
    batch, seq, d_model, h, hkv, d = _projection_shapes(data)
    args = dict(x=make_array(data, (batch, seq, d_model), label="x"), w_q=make_array(data, (d_model, h * d), label="w_q"),
                w_k=make_array(data, (d_model, hkv * d), label="w_k"), w_v=make_array(data, (d_model, hkv * d), label="w_v"),
                dq=make_array(data, (batch, h, seq, d), label="dq"), dk=make_array(data, (batch, hkv, seq, d), label="dk"),
                dv=make_array(data, (batch, hkv, seq, d), label="dv"), num_heads=h, num_kv_heads=hkv,
                need_dx=data.draw(st.booleans()), need_dw=data.draw(st.booleans()), need_db=data.draw(st.booleans()))
    return _core.qkv_project_backward, mutate(data, args)


def _attention_shapes(data):
    b, hkv = dim(data, "batch", [0, 1, 2]), dim(data, "num_kv_heads", [0, 1, 2])
    h = hkv * dim(data, "group", [0, 1, 2])
    return b, h, hkv, dim(data, "seq_q"), dim(data, "seq_k", DIMS + [65, 130]), dim(data, "d_head"), dim(data, "d_v")


def _key_lengths(data, batch, seq_k):
    kind = data.draw(st.sampled_from(["none", "none", "valid", "bad"]), label="key_lengths")
    if kind == "none":
        return None
    dtype = data.draw(st.sampled_from([np.int64, np.int32, np.int64, np.int32, np.int16, np.float32]), label="kl dtype")
    vals = np.random.default_rng(batch).integers(0, seq_k + 1, size=batch)
    if kind == "bad" and batch:
        vals[0] = data.draw(st.sampled_from([-1, seq_k + 1, 2**31, -(2**40)]), label="bad length")
    with np.errstate(all="ignore"):
        return vals.astype(dtype)


def _bias(data, shape):
    if not data.draw(st.booleans(), label="bias"):
        return None
    vals = make_array(data, shape, F32, data.draw(st.sampled_from(["c", "neg", "gap", "swap_last", "bcast"])),
                      label="bias")
    if data.draw(st.booleans(), label="bias -inf") and vals.size and vals.flags.writeable:
        vals[..., :1] = -np.inf
    return vals


def call_attention(data):
    b, h, hkv, sq, sk, d, dv = _attention_shapes(data)
    args = dict(q=make_array(data, (b, h, sq, d), label="q"), k=make_array(data, (b, hkv, sk, d), label="k"),
                v=make_array(data, (b, hkv, sk, dv), label="v"), causal=data.draw(st.booleans(), label="causal"),
                key_lengths=_key_lengths(data, b, sk), bias=_bias(data, (b, h, sq, sk)),
                scale=data.draw(st.sampled_from([0.5, 0.5, -1.0, 0.0, 2.0, float("nan")]), label="scale"),
                return_lse=data.draw(st.booleans(), label="return_lse"), out=out_array(data, (b, h, sq, dv)))
    return _core.attention, mutate(data, args)


def call_attention_backward(data):
    b, h, hkv, sq, sk, d, dv = _attention_shapes(data)
    q, k = make_array(data, (b, h, sq, d), label="q"), make_array(data, (b, hkv, sk, d), label="k")
    v = make_array(data, (b, hkv, sk, dv), label="v")
    kl, bias = _key_lengths(data, b, sk), _bias(data, (b, h, sq, sk))
    causal = data.draw(st.booleans(), label="causal")
    try:  # o and lse from a forward when the shapes allow it, so the backward runs for real
        o, lse = _core.attention(q, k, v, causal=causal, key_lengths=kl, bias=bias, scale=0.5, return_lse=True)
    except ALLOWED:
        o, lse = make_array(data, (b, h, sq, dv), label="o"), make_array(data, (b, h, sq), label="lse")
    args = dict(do=make_array(data, (b, h, sq, dv), label="do"), q=q, k=k, v=v, o=o, lse=lse, causal=causal,
                key_lengths=kl, bias=bias, scale=data.draw(st.sampled_from([0.5, 2.0, float("inf")]), label="scale"))
    return _core.attention_backward, mutate(data, args)


def _cu(data, lengths, label):
    kind = data.draw(st.sampled_from(["valid", "valid", "valid", "bad"]), label=f"{label} kind")
    dtype = data.draw(st.sampled_from([np.int64, np.int32, np.int64, np.int32, np.uint32, np.float64]), label="cu dtype")
    cu = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    if kind == "bad":
        how = data.draw(st.sampled_from(["start", "decrease", "end", "huge", "2d", "empty"]), label=f"{label} fault")
        if how == "start":
            cu = cu + 1
        elif how == "decrease" and len(cu) > 2:
            cu[1] = cu[-1] + 5
        elif how == "end":
            cu[-1] += 1
        elif how == "huge":
            cu[-1] = 2**62
        elif how == "2d":
            cu = cu[None]
        else:
            cu = cu[:0]
    with np.errstate(all="ignore"):
        return cu.astype(dtype)


def _varlen_shapes(data):
    batch = dim(data, "batch", [0, 1, 2, 3])
    lens_q = [dim(data, "len_q", [0, 1, 2, 7, 17, 40]) for _ in range(batch)]
    lens_k = [dim(data, "len_k", [0, 1, 2, 7, 17, 40]) for _ in range(batch)]
    hkv = dim(data, "num_kv_heads", [0, 1, 2])
    h = hkv * dim(data, "group", [0, 1, 2])
    return lens_q, lens_k, h, hkv, dim(data, "d_head"), dim(data, "d_v")


def call_attention_varlen(data):
    lens_q, lens_k, h, hkv, d, dv = _varlen_shapes(data)
    tq, tk = sum(lens_q), sum(lens_k)
    args = dict(q=make_array(data, (tq, h, d), label="q"), k=make_array(data, (tk, hkv, d), label="k"),
                v=make_array(data, (tk, hkv, dv), label="v"), cu_seqlens_q=_cu(data, lens_q, "cu_q"),
                cu_seqlens_k=_cu(data, lens_k, "cu_k"), causal=data.draw(st.booleans(), label="causal"),
                scale=data.draw(st.sampled_from([0.5, -1.0, float("nan")]), label="scale"),
                return_lse=data.draw(st.booleans()), out=out_array(data, (tq, h, dv)))
    return _core.attention_varlen, mutate(data, args)


def call_attention_varlen_backward(data):
    lens_q, lens_k, h, hkv, d, dv = _varlen_shapes(data)
    tq, tk = sum(lens_q), sum(lens_k)
    q, k, v = make_array(data, (tq, h, d), label="q"), make_array(data, (tk, hkv, d), label="k"), \
        make_array(data, (tk, hkv, dv), label="v")
    cu_q, cu_k = _cu(data, lens_q, "cu_q"), _cu(data, lens_k, "cu_k")
    causal = data.draw(st.booleans(), label="causal")
    try:
        o, lse = _core.attention_varlen(q, k, v, cu_q, cu_k, causal=causal, scale=0.5, return_lse=True)
    except ALLOWED:
        o, lse = make_array(data, (tq, h, dv), label="o"), make_array(data, (h, tq), label="lse")
    args = dict(do=make_array(data, (tq, h, dv), label="do"), q=q, k=k, v=v, o=o, lse=lse, cu_seqlens_q=cu_q,
                cu_seqlens_k=cu_k, causal=causal, scale=0.5)
    return _core.attention_varlen_backward, mutate(data, args)


def call_misc(data):
    which = data.draw(st.sampled_from(["exp", "set_isa", "set_num_threads", "cpu_info", "get_isa"]), label="misc")
    if which == "exp":
        return _core.exp, mutate(data, dict(x=make_array(data, (dim(data, "n", DIMS + [100]),), label="x")))
    if which == "set_isa":
        return _core.set_isa, dict(isa=data.draw(st.sampled_from(
            _core.supported_isas() + ["", "AVX2", "avx1024", None, 3]), label="isa"))
    if which == "set_num_threads":
        return _core.set_num_threads, dict(n=data.draw(st.sampled_from([1, 2, 3, 0, -1, 2**40, 1.5, None, "2"]),
                                                       label="n"))
    return getattr(_core, which), {}


CALLS = [call_matmul, call_qkv_project, call_qkv_project_backward, call_attention, call_attention_backward,
         call_attention_varlen, call_attention_varlen_backward, call_misc]


def one_call(data, verbose=False):
    make = data.draw(st.sampled_from(CALLS), label="function")
    fn, kwargs = make(data)
    positional = data.draw(st.booleans(), label="positional")
    if verbose:
        desc = {k: (f"array{v.shape}:{v.dtype}:{v.strides}" if isinstance(v, np.ndarray) else repr(v)[:40])
                for k, v in kwargs.items()}
        print(f"{fn.__name__}({desc})", flush=True)
    isa_before, threads_before = _core.get_isa(), _core.get_num_threads()
    try:
        fn(*kwargs.values()) if positional else fn(**kwargs)
        stats[f"{fn.__name__}: ok"] += 1
    except ALLOWED as e:
        stats[f"{fn.__name__}: {type(e).__name__}"] += 1
    finally:
        _core.set_isa(isa_before)
        _core.set_num_threads(threads_before)


# ----------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------


def cap_address_space():
    if UNDER_ASAN:
        return
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
    limit = vm + (2 << 30)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def run_chunk(chunk, examples, verbose):
    @seed(chunk)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=False, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def fuzz(data):
        one_call(data, verbose)

    fuzz()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("QKV_FUZZ_SECONDS", "10")))
    parser.add_argument("--first-chunk", type=int, default=0, help="seed of the first chunk (chunks count up)")
    parser.add_argument("--examples", type=int, default=60, help="examples per chunk")
    parser.add_argument("--verbose", action="store_true", help="print every call before making it")
    args = parser.parse_args(argv)
    faulthandler.enable()
    cap_address_space()
    _core.set_num_threads(min(_core.get_num_threads(), 2))
    deadline = time.monotonic() + args.seconds
    chunk = args.first_chunk
    while True:
        print(f"chunk {chunk}", flush=True)  # the seed to rerun after a crash: --first-chunk N
        run_chunk(chunk, args.examples, args.verbose)
        chunk += 1
        if time.monotonic() >= deadline:
            break
    calls = sum(stats.values())
    print(f"fuzz_binding: {chunk - args.first_chunk} chunks, {calls} calls, no crash and no unexpected exception")
    for key, n in sorted(stats.items()):
        print(f"  {key}: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
