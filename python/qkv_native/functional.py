"""The native ops, with NumPy arrays in and out.

Shapes use the project's names: ``batch``, ``seq`` (``seq_q``/``seq_k``),
``d_model``, ``num_heads``, ``num_kv_heads``, ``d_head``, ``d_v``.

Arrays must be ``float32`` with unit stride in the last axis; anything else is a
``TypeError``/``ValueError`` naming the argument (nothing is silently converted or
copied). Views such as ``qkv[:, :, 0].transpose(0, 2, 1, 3)`` are used in place.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import numpy as np

from . import _core

PackedWeight = _core.PackedWeight

__all__ = [
    "PackedWeight",
    "pack_weight",
    "pack_weights",
    "matmul",
    "qkv_project",
    "qkv_project_packed",
    "qkv_project_backward",
    "attention",
    "attention_backward",
    "attention_varlen",
    "attention_varlen_backward",
    "linear",
    "layer_norm",
    "layer_norm_backward",
    "gelu",
    "gelu_backward",
    "softmax_cross_entropy",
    "dropout",
    "adam_update",
    "sgd_update",
]


def _type_name(x) -> str:
    """x's type as a user reads it: ``list``, ``numpy.float32`` (a scalar, not an array)."""
    t = type(x)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _flag(x, name: str) -> bool:
    """A yes/no argument: a bool (Python or NumPy), not any object that happens to be truthy
    (causal='no' ran causal attention)."""
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {_type_name(x)}")
    return bool(x)


def _check_array(x, name: str, ndim=None) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of float32, got {_type_name(x)}")
    if x.dtype != np.float32:
        raise TypeError(
            f"{name} must have dtype float32, got {x.dtype} (convert explicitly with .astype(np.float32))"
        )
    if ndim is not None and x.ndim not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {x.shape}")
    return x


def _check_no_overlap(out: Optional[np.ndarray], out_name: str, **inputs) -> None:
    if out is None:
        return
    for name, arr in inputs.items():
        # the exact test: views of one buffer that interleave (q, k, v and out as slots of
        # one token-major array) share an address range but no element
        if arr is not None and isinstance(arr, np.ndarray) and np.shares_memory(out, arr):
            raise ValueError(f"{out_name} must not overlap the input {name}")


def _check_self_overlap(out: np.ndarray, name: str) -> None:
    """A ValueError when two elements of ``out`` share an address (a zero stride, rows that
    interleave): the binding's rule for the native ops' outputs (self_overlapping in
    module.cpp), for outputs the Python layer writes itself. Sorted by |stride|, each axis
    must step past everything the smaller ones span."""
    if out.size <= 1:
        return
    span = out.itemsize  # bytes covered by the smaller axes
    for stride, extent in sorted((abs(st), n) for st, n in zip(out.strides, out.shape) if n > 1):
        if stride < span:
            raise ValueError(f"{name} has overlapping elements (e.g. a zero stride); pass a fresh array")
        span += stride * (extent - 1)


def pack_weight(w: np.ndarray, *, trans: bool = False) -> PackedWeight:
    """Pack a weight once for many products (inference): a :class:`PackedWeight`.

    w: (d_in, d_out) float32, the right operand of ``x @ w``; with ``trans=True``
    w is (d_out, d_in), e.g. a PyTorch ``Linear.weight``, and its transpose is
    packed. :func:`matmul` (as ``b``), :func:`linear` (as ``w``) and
    :func:`qkv_project_packed` (as ``w_qkv``) accept the result in place of the
    array and then skip packing it on every call, and stream it sequentially,
    which is what products with few rows (a few tokens) are limited by. The
    packing does not depend on the ISA (it stays valid across :func:`use_isa`);
    ``PackedWeight.to_array()`` gives the (d_in, d_out) weight back, ``.shape``
    is (d_in, d_out), and it pickles. Later changes to ``w`` are not seen.
    """
    _check_array(w, "w", 2)
    return PackedWeight(w, _flag(trans, "trans"))


def pack_weights(ws, *, trans: bool = False) -> list:
    """:func:`pack_weight` for several weights at once, into one allocation.

    ws: a sequence of 2-D float32 arrays; returns one :class:`PackedWeight` each, in
    order. A model's weights packed together fill whole huge pages (fewer TLB misses
    while a few-token batch streams them); each PackedWeight keeps the shared memory
    alive, so any of them may be dropped or pickled on its own.
    """
    ws = list(ws)
    for i, w in enumerate(ws):
        _check_array(w, f"ws[{i}]", 2)
    return _core.pack_weights(ws, _flag(trans, "trans"))


def _weight_shape(w, name: str) -> Tuple[int, ...]:
    """Shape of a weight given as a 2-D float32 array or a PackedWeight."""
    if isinstance(w, PackedWeight):
        return w.shape
    return _check_array(w, name, 2).shape


def matmul(
    a: np.ndarray,
    b: np.ndarray,
    trans_a: bool = False,
    trans_b: bool = False,
    alpha: float = 1.0,
    beta: float = 0.0,
    out: Optional[np.ndarray] = None,
) -> np.ndarray:
    """``alpha · op(a) · op(b) + beta · out``, with op(x) = xᵀ when ``trans_x``.

    a: (M, K) or (batch, M, K) — (K, M) / (batch, K, M) when ``trans_a``.
    b: (K, N) or (batch, K, N) — (N, K) / (batch, N, K) when ``trans_b``; or a
    :class:`PackedWeight` of shape (K, N) (see :func:`pack_weight`).
    A 2-D operand is broadcast against a 3-D one. Returns (M, N) or (batch, M, N),
    written into ``out`` when given (``beta != 0`` needs ``out``; ``beta == 0``
    never reads it).
    """
    _check_array(a, "a", (2, 3))
    if not isinstance(b, PackedWeight):
        _check_array(b, "b", (2, 3))
    if out is not None:
        _check_array(out, "out")
        _check_no_overlap(out, "out", a=a, b=b)
    return _core.matmul(a, b, _flag(trans_a, "trans_a"), _flag(trans_b, "trans_b"), _real32(alpha, "alpha"), _real32(beta, "beta"), out)


def qkv_project(
    x: np.ndarray,
    w_q: np.ndarray,
    w_k: np.ndarray,
    w_v: np.ndarray,
    b_q: Optional[np.ndarray] = None,
    b_k: Optional[np.ndarray] = None,
    b_v: Optional[np.ndarray] = None,
    *,
    num_heads: int,
    num_kv_heads: Optional[int] = None,
    out: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q = x·W_Q + b_Q, K = x·W_K + b_K, V = x·W_V + b_V in one GEMM, head-major.

    x: (batch, seq, d_model); w_q: (d_model, d_q) with d_q = num_heads·d_head;
    w_k, w_v: (d_model, num_kv_heads·d_head); biases (d_q,) / (num_kv_heads·d_head,).
    Returns q (batch, num_heads, seq, d_head) and k, v (batch, num_kv_heads, seq,
    d_head), written straight in that layout (no transpose copy), or into
    ``out = (q, k, v)`` when given.
    """
    _check_array(x, "x", 3)
    for name, w in (("w_q", w_q), ("w_k", w_k), ("w_v", w_v)):
        _check_array(w, name, 2)
    for name, bvec in (("b_q", b_q), ("b_k", b_k), ("b_v", b_v)):
        if bvec is not None:
            _check_array(bvec, name, 1)
    num_heads = _positive_int(num_heads, "num_heads")
    num_kv_heads = num_heads if num_kv_heads is None else _positive_int(num_kv_heads, "num_kv_heads")
    outs = _check_outs(out, 4, x=x, w_q=w_q, w_k=w_k, w_v=w_v, b_q=b_q, b_k=b_k, b_v=b_v)
    return _core.qkv_project(x, w_q, w_k, w_v, b_q, b_k, b_v, num_heads, num_kv_heads, *outs)


def _check_outs(out, ndim: int, **inputs) -> Tuple[Optional[np.ndarray], ...]:
    """A triple of output arrays (or None -> three Nones), checked: float32, ndim, no overlap
    with the inputs or with each other."""
    if out is None:
        return None, None, None
    if not (isinstance(out, (tuple, list)) and len(out) == 3):
        raise TypeError("out must be a tuple of three float32 arrays")
    for i, o in enumerate(out):
        _check_array(o, f"out[{i}]", ndim)
        _check_no_overlap(o, f"out[{i}]", **inputs)
    a, b, c = out  # exact test: interleaved views of one buffer (its column blocks) are fine
    if np.shares_memory(a, b) or np.shares_memory(a, c) or np.shares_memory(b, c):
        raise ValueError("out arrays must not overlap each other")
    return tuple(out)


def qkv_project_packed(
    x: np.ndarray,
    w_qkv: np.ndarray,
    b_qkv: Optional[np.ndarray] = None,
    *,
    num_heads: int,
    num_kv_heads: Optional[int] = None,
    out: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`qkv_project` with the concatenated weight [W_Q | W_K | W_V].

    w_qkv: (d_model, d_q + 2·d_kv), an array (its slices are views: no copy) or a
    :class:`PackedWeight` (:func:`pack_weight`: packed once, for inference);
    b_qkv: (d_q + 2·d_kv,). d_head is w_qkv.shape[1] / (num_heads + 2·num_kv_heads).
    ``out = (q, k, v)`` as in :func:`qkv_project`.
    """
    num_heads = _positive_int(num_heads, "num_heads")
    num_kv_heads = num_heads if num_kv_heads is None else _positive_int(num_kv_heads, "num_kv_heads")
    _check_array(x, "x", 3)
    if b_qkv is not None:
        _check_array(b_qkv, "b_qkv", 1)
    if isinstance(w_qkv, PackedWeight):
        return _core.qkv_project_packed(x, w_qkv, b_qkv, num_heads, num_kv_heads, *_check_outs(out, 4, x=x, b_qkv=b_qkv))
    _check_array(w_qkv, "w_qkv", 2)
    _check_unit_last(w_qkv, "w_qkv")  # (its slices would be blamed as w_q, w_k, w_v)
    n = w_qkv.shape[1]
    heads = num_heads + 2 * num_kv_heads
    if n % heads != 0 or n == 0:  # (d_head 0 would be blamed on its slice w_q)
        raise ValueError(
            f"w_qkv must have (num_heads + 2*num_kv_heads)*d_head = {heads}*d_head columns, got shape {w_qkv.shape}"
        )
    d_head = n // heads
    d_q, d_kv = num_heads * d_head, num_kv_heads * d_head
    if b_qkv is not None:
        if b_qkv.shape != (n,):
            raise ValueError(f"b_qkv must have shape ({n},), got {b_qkv.shape}")
        bq, bk, bv = b_qkv[:d_q], b_qkv[d_q : d_q + d_kv], b_qkv[d_q + d_kv :]
    else:
        bq = bk = bv = None
    outs = _check_outs(out, 4, x=x, w_qkv=w_qkv, b_qkv=b_qkv)
    wq, wk, wv = w_qkv[:, :d_q], w_qkv[:, d_q : d_q + d_kv], w_qkv[:, d_q + d_kv :]
    return _core.qkv_project(x, wq, wk, wv, bq, bk, bv, num_heads, num_kv_heads, *outs)


def qkv_project_backward(
    x: np.ndarray,
    w_q: np.ndarray,
    w_k: np.ndarray,
    w_v: np.ndarray,
    dq: np.ndarray,
    dk: np.ndarray,
    dv: np.ndarray,
) -> Tuple[np.ndarray, ...]:
    """Gradients of :func:`qkv_project`.

    dq: (batch, num_heads, seq, d_head); dk, dv: (batch, num_kv_heads, seq, d_head).
    Returns (dx, dw_q, dw_k, dw_v, db_q, db_k, db_v) with the shapes of x, the
    weights and the biases: dx = [dQ|dK|dV]·[W_Q|W_K|W_V]ᵀ and
    dW = xᵀ·[dQ|dK|dV] are one GEMM each; db are column sums.
    """
    _check_array(x, "x", 3)
    for name, w in (("w_q", w_q), ("w_k", w_k), ("w_v", w_v)):
        _check_array(w, name, 2)
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        _check_array(g, name, 4)
    num_heads, num_kv_heads = dq.shape[1], dk.shape[1]
    if num_heads == 0 or num_kv_heads == 0:
        raise ValueError(f"dq and dk must have at least one head, got {dq.shape} and {dk.shape}")
    # the head counts come from dq and dk: name the pair that disagrees (not a weight alone)
    for gname, g, wname, w in (("dq", dq, "w_q", w_q), ("dk", dk, "w_k", w_k), ("dv", dv, "w_v", w_v)):
        if w.shape[0] != x.shape[2]:
            raise ValueError(f"x has d_model = {x.shape[2]} columns but {wname} has {w.shape[0]} rows, shape {w.shape}")
        if g.shape[1] * g.shape[3] != w.shape[1]:
            raise ValueError(
                f"{gname} (batch, heads, seq, d_head) = {g.shape} has heads·d_head = {g.shape[1] * g.shape[3]}, "
                f"but {wname} has {w.shape[1]} columns"
            )
    return _core.qkv_project_backward(x, w_q, w_k, w_v, dq, dk, dv, num_heads, num_kv_heads, True, True, True)


_INT64_MAX = 2**63 - 1


def _check_int(value, name: str, minimum: int = 1, *, type_error: bool = False, maximum: Optional[int] = None) -> int:
    """value as an int: a Python or NumPy integer (not a bool) >= minimum (and <= maximum
    when given); otherwise a ValueError naming it (a TypeError for a non-integer when
    ``type_error``). For sizes, counts, seeds and indices, where 2.5, True and -1 are
    all bad values."""
    if type(value) is int and value >= minimum and (maximum is None or value <= maximum):
        return value  # the common case, without the ABC check (0.2 us a call)
    if maximum is not None:
        what = f"an integer in [{minimum}, {maximum}]"
    else:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        if type_error:
            raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
        raise ValueError(f"{name} must be {what}, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def _positive_int(n, name: str) -> int:
    """n as an int the native code takes as int64: _check_int's positive integer below 2**63
    (a TypeError for a non-integer)."""
    return _check_int(n, name, type_error=True, maximum=_INT64_MAX)



def _real(x, name: str) -> float:
    """x as a float: a Python or NumPy real number (not a string, not a bool)."""
    if type(x) is float:  # the common case, without the ABC check (0.2 us a call)
        return x
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    return float(x)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _real32(x, name: str) -> float:
    """A real number the native op receives as float32: a finite one past float32's range
    is refused (alpha=1e39 became inf, and the product inf or NaN where the float64
    answer is finite)."""
    x = _real(x, name)
    if -_FLOAT32_MAX <= x <= _FLOAT32_MAX:
        return x
    if math.isfinite(x):
        raise ValueError(f"{name} must lie within float32's range (|{name}| <= {_FLOAT32_MAX:.8g}), got {x!r}")
    return x


def _attention_inputs(q, k, v, key_lengths, bias, mask, scale):
    _check_array(q, "q", 4)
    _check_array(k, "k", 4)
    _check_array(v, "v", 4)
    batch, num_heads, seq_q, d_head = q.shape
    seq_k = k.shape[2]
    if k.shape[0] != batch or k.shape[3] != d_head:
        raise ValueError(
            f"k must have shape (batch={batch}, num_kv_heads, seq_k, d_head={d_head}), got {k.shape}"
        )
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must have shape ({k.shape[0]}, {k.shape[1]}, {k.shape[2]}, d_v), got {v.shape}")
    num_kv_heads = k.shape[1]
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_kv_heads (k.shape[1]={num_kv_heads}) must divide num_heads (q.shape[1]={num_heads})"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(d_head) if d_head > 0 else 1.0
    scale = _real32(scale, "scale")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if key_lengths is not None:
        kl = key_lengths
        if not isinstance(kl, np.ndarray) or kl.dtype.kind not in "iu":
            raise TypeError("key_lengths must be a numpy array of integers, shape (batch,)")
        if kl.shape != (batch,):
            raise ValueError(f"key_lengths must have shape (batch={batch},), got {kl.shape}")
        if kl.size and (kl.min() < 0 or kl.max() > seq_k):
            raise ValueError(f"key_lengths must lie in [0, seq_k={seq_k}], got min {kl.min()} and max {kl.max()}")
        key_lengths = kl.astype(np.int64, copy=False)
    full = (batch, num_heads, seq_q, seq_k)
    add = None
    if bias is not None:
        _check_array(bias, "bias")
        add = _broadcast4(bias, "bias", full)
    if mask is not None:
        if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
            raise TypeError("mask must be a boolean numpy array (True = may attend)")
        m = _broadcast4(mask, "mask", full)
        # where the mask is False the bias is -inf whatever it held (NaN + -inf would be NaN)
        add = np.where(m, np.float32(0.0) if add is None else add, np.float32(-np.inf))
    return scale, key_lengths, add


def _broadcast4(a: np.ndarray, name: str, full) -> np.ndarray:
    if a.ndim > 4:
        raise ValueError(f"{name} must be broadcastable to (batch, num_heads, seq_q, seq_k) = {full}, got {a.shape}")
    try:
        return np.broadcast_to(a, full)
    except ValueError:
        raise ValueError(
            f"{name} must be broadcastable to (batch, num_heads, seq_q, seq_k) = {full}, got {a.shape}"
        ) from None


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    causal: bool = False,
    key_lengths: Optional[np.ndarray] = None,
    bias: Optional[np.ndarray] = None,
    mask: Optional[np.ndarray] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    out: Optional[np.ndarray] = None,
) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """softmax(q·kᵀ·scale + bias + mask)·v, flash style (no (seq_q, seq_k) matrix).

    q: (batch, num_heads, seq_q, d_head); k: (batch, num_kv_heads, seq_k, d_head);
    v: (batch, num_kv_heads, seq_k, d_v). num_kv_heads divides num_heads
    (grouped-query attention: query head h reads kv head h // (num_heads // num_kv_heads),
    without copying k/v). Any strides are accepted as long as the last axis is
    contiguous.

    causal: query i attends key j iff j <= i + (seq_k - seq_q) — aligned
    bottom-right, so a block of new queries after a key cache sees the whole
    cache; for seq_q == seq_k this is the usual top-left causal mask.
    key_lengths: (batch,) ints; keys j >= key_lengths[b] are ignored (right padding).
    bias: float32 additive, broadcastable to (batch, num_heads, seq_q, seq_k); -inf masks.
    mask: bool, broadcastable likewise; False masks (materialised as an additive bias).
    scale: defaults to 1/sqrt(d_head).
    A query row with no key left gives output 0 (and lse -inf), never NaN.

    Returns o: (batch, num_heads, seq_q, d_v), and with ``return_lse`` also
    lse: (batch, num_heads, seq_q) = log Σ_j exp(s_ij), which the backward needs.
    """
    scale, key_lengths, add = _attention_inputs(q, k, v, key_lengths, bias, mask, scale)
    if out is not None:
        _check_array(out, "out", 4)
        _check_no_overlap(out, "out", q=q, k=k, v=v, bias=add)
    return _core.attention(q, k, v, _flag(causal, "causal"), key_lengths, add, scale, _flag(return_lse, "return_lse"), out)


def attention_backward(
    do: np.ndarray,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    o: np.ndarray,
    lse: np.ndarray,
    *,
    causal: bool = False,
    key_lengths: Optional[np.ndarray] = None,
    bias: Optional[np.ndarray] = None,
    mask: Optional[np.ndarray] = None,
    scale: Optional[float] = None,
    out: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None,
    bias_grad: bool = False,
) -> Tuple[np.ndarray, ...]:
    """Gradients of :func:`attention` with respect to q, k and v (and the bias).

    do, o: (batch, num_heads, seq_q, d_v); lse: (batch, num_heads, seq_q) from
    ``attention(..., return_lse=True)``, C-contiguous as it returns it (unlike q, k, v,
    do and o, lse is not read through strides); the masking arguments must be those of
    the forward. Returns (dq, dk, dv) with the shapes of q, k, v (for grouped-query
    attention dk/dv sum over the query heads of each group). Fully masked rows
    get zero gradients. Results do not depend on the thread count. ``out = (dq, dk, dv)``:
    arrays (any strides with a contiguous last axis, e.g. head-major views of one
    token-major buffer) that receive the gradients.

    bias_grad: also return dbias, the gradient with respect to ``bias`` (a learned
    position bias, say), with bias's own shape: summed over every axis along which
    bias broadcasts. Masked pairs (mask False, causal, past key_lengths, a -inf bias)
    get 0. A full-shape bias, or one shared by the batch ((num_heads, seq_q, seq_k) and
    the like) when batch·num_kv_heads >= 8 and num_kv_heads >= 2·threads, is summed as
    the backward runs (5-40% more time: a few % for small biases, more for large
    ones, whose sum over the batch is memory traffic); other shapes take a pass that
    recomputes the scores (50-75% more); ``benchmarks/attention_bias_grad.py`` times
    it. Either way the result does not depend on the thread count.
    The batch and head axes are summed in the kernel, the query and key axes of a bias
    that broadcasts over them afterwards, from a (batch|1, heads|1, seq_q, seq_k) array.
    """
    scale, key_lengths, add = _attention_inputs(q, k, v, key_lengths, bias, mask, scale)
    _check_array(do, "do", 4)
    _check_array(o, "o", 4)
    _check_array(lse, "lse", 3)
    outs = _check_outs(out, 4, do=do, q=q, k=k, v=v, o=o, lse=lse, bias=add)
    causal = _flag(causal, "causal")
    if not _flag(bias_grad, "bias_grad"):
        return _core.attention_backward(do, q, k, v, o, lse, causal, key_lengths, add, scale, *outs)
    if bias is None:
        raise ValueError("bias_grad=True needs a bias (the gradient is with respect to it)")
    b4 = (1,) * (4 - bias.ndim) + bias.shape  # bias as broadcast from the left
    dq, dk, dv, dbias = _core.attention_backward(
        do, q, k, v, o, lse, causal, key_lengths, add, scale, *outs, dbias_batch=b4[0], dbias_heads=b4[1]
    )
    axes = tuple(ax for ax in (2, 3) if b4[ax] == 1 and dbias.shape[ax] != 1)
    if axes:
        dbias = dbias.sum(axis=axes, keepdims=True, dtype=np.float32)
    return dq, dk, dv, dbias.reshape(bias.shape)


def _varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, scale):
    _check_array(q, "q", 3)
    _check_array(k, "k", 3)
    _check_array(v, "v", 3)
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]), ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
        if not isinstance(cu, np.ndarray) or cu.dtype.kind not in "iu":
            raise TypeError(f"{name} must be a numpy array of integers, shape (batch + 1,)")
        if cu.ndim != 1 or cu.shape[0] < 1:
            raise ValueError(f"{name} must have shape (batch + 1,), got {cu.shape}")
        if cu[0] != 0 or np.any(np.diff(cu) < 0) or cu[-1] != total:
            raise ValueError(f"{name} must start at 0, be non-decreasing and end at {total} (the rows of its tensor)")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same shape, got {cu_seqlens_q.shape} and {cu_seqlens_k.shape}"
        )
    d_head = q.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(d_head) if d_head > 0 else 1.0
    return _real32(scale, "scale"), cu_seqlens_q.astype(np.int64, copy=False), cu_seqlens_k.astype(np.int64, copy=False)


def attention_varlen(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    cu_seqlens_q: np.ndarray,
    cu_seqlens_k: np.ndarray,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    return_lse: bool = False,
    out: Optional[np.ndarray] = None,
) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """Attention over packed variable-length sequences: no compute spent on padding.

    Sequences of different lengths are concatenated along the first axis:
    q: (total_q, num_heads, d_head); k: (total_k, num_kv_heads, d_head);
    v: (total_k, num_kv_heads, d_v). Sequence b is rows
    [cu_seqlens_q[b], cu_seqlens_q[b+1]) of q and [cu_seqlens_k[b], cu_seqlens_k[b+1])
    of k and v; the offsets are int arrays of shape (batch + 1,) starting at 0.
    ``causal`` is aligned bottom-right per sequence (see :func:`attention`).

    Returns o: (total_q, num_heads, d_v), and with ``return_lse`` also
    lse: (num_heads, total_q).
    """
    scale, cu_q, cu_k = _varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, scale)
    if out is not None:
        _check_array(out, "out", 3)
        _check_no_overlap(out, "out", q=q, k=k, v=v)
    return _core.attention_varlen(q, k, v, cu_q, cu_k, _flag(causal, "causal"), scale, _flag(return_lse, "return_lse"), out)


def attention_varlen_backward(
    do: np.ndarray,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    o: np.ndarray,
    lse: np.ndarray,
    cu_seqlens_q: np.ndarray,
    cu_seqlens_k: np.ndarray,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of :func:`attention_varlen`: (dq, dk, dv) with the shapes of q, k, v.

    do, o: (total_q, num_heads, d_v); lse: (num_heads, total_q) from the forward,
    C-contiguous as it returns it.
    """
    scale, cu_q, cu_k = _varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, scale)
    _check_array(do, "do", 3)
    _check_array(o, "o", 3)
    _check_array(lse, "lse", 2)
    return _core.attention_varlen_backward(do, q, k, v, o, lse, cu_q, cu_k, _flag(causal, "causal"), scale)


def _check_unit_last(x: np.ndarray, name: str) -> None:
    """Refuses an array whose last axis is not contiguous, as the native ops do (before a
    reshape would copy it silently)."""
    if x.ndim and x.shape[-1] > 1 and x.size and x.strides[-1] != x.itemsize:
        raise ValueError(
            f"{name} must be contiguous in its last axis (stride 1), got a stride of {x.strides[-1]} bytes; "
            f"pass np.ascontiguousarray({name})"
        )


def _rows(x: np.ndarray, name: str) -> np.ndarray:
    """(..., n) -> (rows, n) view (a copy only when the leading axes cannot be merged;
    the last axis must be contiguous, as for 2-D arrays)."""
    if x.ndim < 1:
        raise ValueError(f"{name} must have at least 1 dimension, got a scalar")
    _check_unit_last(x, name)
    # the row count spelled out: reshape(-1, 0) cannot infer it (a (2, 3, 0) x failed)
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1]) if x.ndim != 2 else x


def linear(
    x: np.ndarray,
    w: np.ndarray,
    b: Optional[np.ndarray] = None,
    *,
    activation: Optional[str] = None,
    out: Optional[np.ndarray] = None,
) -> np.ndarray:
    """activation(x·w + b): a dense layer, bias and activation applied in the GEMM's store.

    x: (..., d_in); w: (d_in, d_out) or a :class:`PackedWeight` of that shape;
    b: (d_out,) or None; activation: None or
    ``"gelu"`` (exact erf form, as BERT and torch's default). Returns (..., d_out),
    written into ``out`` when given (it must be C-contiguous).
    """
    _check_array(x, "x")
    w_shape = _weight_shape(w, "w")
    if b is not None:
        _check_array(b, "b", 1)
    act = "none" if activation is None else activation
    if act not in ("none", "gelu"):
        raise ValueError(f"activation must be None or 'gelu', got {activation!r}")
    if x.ndim < 1 or x.shape[-1] != w_shape[0]:
        raise ValueError(f"x must have shape (..., d_in={w_shape[0]}), got {x.shape}")
    shape = x.shape[:-1] + (w_shape[1],)
    out2 = None
    if out is not None:
        _check_array(out, "out")
        if out.shape != shape:
            raise ValueError(f"out must have shape {shape}, got {out.shape}")
        if not out.flags.c_contiguous:
            raise ValueError("out must be C-contiguous")
        _check_no_overlap(out, "out", x=x, w=w, b=b)
        out2 = _rows(out, "out")
    y = _core.linear(_rows(x, "x"), w, b, act, out2)
    return out if out is not None else y.reshape(shape)


def layer_norm(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-5, *, out: Optional[np.ndarray] = None
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LayerNorm over the last axis: (x - mean)/sqrt(var + eps)·weight + bias (biased var).

    x: (..., n); weight, bias: (n,). Returns y (..., n) and mean, rstd (...,), the
    statistics :func:`layer_norm_backward` needs. ``out`` (C-contiguous, the shape
    of x) receives y and may be x itself (normalised in place).
    """
    _check_array(x, "x")
    _check_array(weight, "weight", 1)
    _check_array(bias, "bias", 1)
    out2 = None
    if out is not None:
        _check_array(out, "out")
        if out.shape != x.shape or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous with the shape of x {x.shape}, got {out.shape}")
        if out is not x:
            _check_no_overlap(out, "out", x=x, weight=weight, bias=bias)
        out2 = _rows(out, "out")
    y, mean, rstd = _core.layer_norm(_rows(x, "x"), weight, bias, _real32(eps, "eps"), out2)
    return (out if out is not None else y.reshape(x.shape)), mean.reshape(x.shape[:-1]), rstd.reshape(x.shape[:-1])


def layer_norm_backward(
    dy: np.ndarray, x: np.ndarray, weight: np.ndarray, mean: np.ndarray, rstd: np.ndarray
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of :func:`layer_norm`: (dx (..., n), dweight (n,), dbias (n,)).

    dweight and dbias are summed over fixed row chunks in a fixed order, so they do
    not depend on the thread count.
    """
    for name, a in (("dy", dy), ("x", x), ("weight", weight), ("mean", mean), ("rstd", rstd)):
        _check_array(a, name)
    if dy.shape != x.shape:
        raise ValueError(f"dy must have the shape of x {x.shape}, got {dy.shape}")
    dx, dw, db = _core.layer_norm_backward(
        _rows(dy, "dy"), _rows(x, "x"), weight, mean.reshape(-1), rstd.reshape(-1)
    )
    return dx.reshape(x.shape), dw, db


def gelu(x: np.ndarray) -> np.ndarray:
    """GELU(x) = x·Φ(x), the exact (erf) form; any shape."""
    _check_array(x, "x")
    if x.ndim == 0:
        raise ValueError("x must have at least 1 dimension")
    return _core.gelu(_rows(x, "x")).reshape(x.shape)


def gelu_backward(x: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """dx = dy·GELU'(x) = dy·(Φ(x) + x·φ(x)); x and dy of the same shape."""
    _check_array(x, "x")
    _check_array(dy, "dy")
    if dy.shape != x.shape:
        raise ValueError(f"dy must have the shape of x {x.shape}, got {dy.shape}")
    if x.ndim == 0:
        raise ValueError("x must have at least 1 dimension")
    return _core.gelu_backward(_rows(x, "x"), _rows(dy, "dy")).reshape(x.shape)


def softmax_cross_entropy(
    logits: np.ndarray,
    targets: np.ndarray,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    out: Optional[np.ndarray] = None,
) -> Tuple[float, np.ndarray]:
    """Mean softmax cross-entropy and its gradient in one pass, computed stably (log-sum-exp).

    logits: (N, C) float32; targets: (N,) int32/int64 in [0, C) or ``ignore_index``.
    With label smoothing eps the target distribution is (1 - eps)·onehot + eps/C
    (torch's definition): row loss (1 - eps)·(lse - x_t) + eps·(lse - mean(x)).
    The mean runs over the rows that are not ignored; with none left the loss is
    0 and the gradient 0. Rows run in parallel; the loss is summed in row order
    (in float64), so it does not depend on the thread count.
    Returns (loss, dlogits (N, C) float32 = d loss / d logits), dlogits written
    into ``out`` when given.
    """
    _check_array(logits, "logits", 2)
    if out is not None:
        _check_array(out, "out", 2)
        _check_no_overlap(out, "out", logits=logits)
    # an int64 (int() truncated 2.5 to 2 and read '1' and True as 1)
    ignore_index = _check_int(ignore_index, "ignore_index", -(2**63), type_error=True, maximum=_INT64_MAX)
    return _core.softmax_cross_entropy(logits, targets, ignore_index, _real(label_smoothing, "label_smoothing"), out)


def dropout(x: np.ndarray, p: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Inverted dropout: each element dropped with probability p, the others scaled by 1/(1-p).

    x: C-contiguous float32, any shape. The drops are a pure function of (seed,
    element index) (counter-based bits, see :func:`qkv_native.reference.dropout_bits`):
    element i is dropped iff bits < round(p·2^32). seed: int in [0, 2^64).
    Returns y (shape of x) and mask (float32, shape of x, 1/(1-p) or 0) with y = x·mask,
    the mask the backward multiplies by.
    """
    _check_array(x, "x")
    p = _real(p, "p")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must lie in [0, 1), got {p}")
    seed = _check_int(seed, "seed", 0, type_error=True, maximum=2**64 - 1)  # (int() truncated 2.5)
    return _core.dropout(x, seed, dropout_threshold(p), 1.0 / (1.0 - p))


def dropout_threshold(p: float) -> int:
    """The uint32 threshold of drop probability p: round(p·2^32), at most 2^32 - 1."""
    return min(int(round(p * 2.0**32)), 2**32 - 1)


def _flat_args(w, g, state, offsets, decay, optional=()):
    buffers = [(name, a) for name, a in (("w", w), ("g", g), *state) if a is not None or name not in optional]
    for i, (name, a) in enumerate(buffers):
        _check_array(a, name, 1)
        # each element of every buffer is read and written in one pass: two that share
        # memory (m passed as v) would read each other's updates
        for other, b in buffers[:i]:
            if np.shares_memory(a, b):
                raise ValueError(f"{name} must not overlap {other}")
    if not isinstance(decay, np.ndarray) or decay.dtype != np.bool_:
        raise TypeError("decay must be a numpy bool array, one entry per parameter")


def adam_update(
    w: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, offsets: np.ndarray, decay: np.ndarray, *,
    lr: float, betas: Tuple[float, float], eps: float, weight_decay: float, decoupled: bool, step: int,
) -> None:
    """One Adam (``decoupled=False``, L2 weight decay) or AdamW step, in place, in one pass.

    w, g, m, v: (n,) flat float32 buffers holding the parameters back to back:
    parameter p is elements [offsets[p], offsets[p+1]) (offsets: (n_params + 1,)
    ints from 0); decay: (n_params,) bool, weight decay on for parameter p. step:
    t = 1, 2, ... (bias correction). Per element, rounding as written (torch's formulas):
    AdamW w *= 1 - lr·wd; Adam g += wd·w; m = β1·m + (1-β1)·g; v = β2·v + (1-β2)·g²;
    w -= lr/(1-β1^t) · m / (√v / √(1-β2^t) + eps). The constants are computed here in
    float64 and rounded to float32 once.
    """
    _flat_args(w, g, (("m", m), ("v", v)), offsets, decay)
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise TypeError(f"betas must be a pair of real numbers, got {betas!r}")
    b1, b2 = _real(betas[0], "betas[0]"), _real(betas[1], "betas[1]")
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):  # (β = 1: 1 - β^t = 0, a ZeroDivisionError or inf)
        raise ValueError(f"betas must lie in [0, 1), got {betas!r}")
    lr, eps, wd = _real(lr, "lr"), _real(eps, "eps"), _real(weight_decay, "weight_decay")
    step = _positive_int(step, "step")  # (t = 0 would divide by 1 - β^0 = 0)
    decoupled = _flag(decoupled, "decoupled")
    _core.adam_update(
        w, g, m, v, offsets, decay, b1, 1.0 - b1, b2, 1.0 - b2, math.sqrt(1.0 - b2**step), eps,
        lr / (1.0 - b1**step), (1.0 - lr * wd) if (wd and decoupled) else 1.0, wd if not decoupled else 0.0,
    )


def sgd_update(
    w: np.ndarray, g: np.ndarray, buf: Optional[np.ndarray], offsets: np.ndarray, decay: np.ndarray, *,
    lr: float, momentum: float, dampening: float, nesterov: bool, weight_decay: float, first: bool,
) -> None:
    """One SGD step (torch.optim.SGD), in place, in one pass; flat buffers as in :func:`adam_update`.

    d = g + wd·w; buf = d on the ``first`` step, else momentum·buf + (1 - dampening)·d;
    d = d + momentum·buf (Nesterov) or buf; w -= lr·d. buf: (n,) float32, or None
    without momentum.
    """
    _flat_args(w, g, (("buf", buf),), offsets, decay, optional=("buf",))
    lr, momentum, dampening = _real(lr, "lr"), _real(momentum, "momentum"), _real(dampening, "dampening")
    _core.sgd_update(w, g, buf, offsets, decay, _real(weight_decay, "weight_decay"), momentum, 1.0 - dampening, lr,
                     _flag(first, "first"), _flag(nesterov, "nesterov"))
