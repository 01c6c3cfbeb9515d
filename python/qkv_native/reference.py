"""Float64 NumPy reference implementations ("twins") of the qkv_native ops.

These functions define the semantics the native (C++) kernels must match.
They are written for clarity, not speed: every computation is done in
float64 with plain vectorised NumPy, and every function returns float64
arrays regardless of the input dtype (float32 or float64 inputs accepted).

Layout conventions
------------------
* Activations entering/leaving the projection: ``x`` is (batch, seq, d_model).
* Attention tensors are *head-major*: q is (batch, num_heads, seq_q, d_head),
  k is (batch, num_kv_heads, seq_k, d_head), v is (batch, num_kv_heads, seq_k, d_v).
* Grouped-query attention (GQA): ``num_heads % num_kv_heads == 0`` and query
  head ``h`` reads kv head ``h // (num_heads // num_kv_heads)``.

Masking (defined once, in :func:`_allowed_mask`)
------------------------------------------------
Key ``j`` is visible to query ``i`` (in batch ``b``, head ``h``) iff all of:

* ``causal`` is False, or ``j <= i + (seq_k - seq_q)`` (bottom-right aligned);
* ``key_lengths`` is None, or ``j < key_lengths[b]``;
* ``bias`` is None, or ``bias[b, h, i, j] != -inf``.

A query row with no visible key produces ``o = 0``, ``lse = -inf`` and zero
gradients -- never NaN.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "matmul",
    "qkv_project",
    "qkv_project_backward",
    "attention",
    "attention_backward",
    "softmax_cross_entropy",
    "dropout_bits",
    "dropout",
    "adam_update",
    "sgd_update",
]


# ----------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------


def _f64(x, name):
    """Return ``x`` as a float64 ndarray (copying only if needed)."""
    if x is None:
        raise ValueError(f"{name} must not be None")
    return np.asarray(x, dtype=np.float64)


def _split_heads(y, num_heads):
    """(batch, seq, num_heads*d_head) -> (batch, num_heads, seq, d_head)."""
    batch, seq, width = y.shape
    d_head = width // num_heads
    return y.reshape(batch, seq, num_heads, d_head).transpose(0, 2, 1, 3)


def _merge_heads(y):
    """(batch, num_heads, seq, d_head) -> (batch, seq, num_heads*d_head)."""
    batch, num_heads, seq, d_head = y.shape
    return y.transpose(0, 2, 1, 3).reshape(batch, seq, num_heads * d_head)


def _expand_kv(t, num_heads):
    """Repeat kv heads so that query head h sees kv head h // group.

    t: (batch, num_kv_heads, seq_k, d) -> (batch, num_heads, seq_k, d).
    ``np.repeat`` repeats each kv head ``group`` times consecutively, so the
    expanded head index h = kv_head * group + g, i.e. kv_head = h // group.
    """
    group = num_heads // t.shape[1]
    return np.repeat(t, group, axis=1)


def _reduce_kv(t, num_kv_heads):
    """Inverse of :func:`_expand_kv` for gradients: sum over each group.

    t: (batch, num_heads, seq_k, d) -> (batch, num_kv_heads, seq_k, d).
    """
    batch, num_heads, seq_k, d = t.shape
    group = num_heads // num_kv_heads
    return t.reshape(batch, num_kv_heads, group, seq_k, d).sum(axis=2)


# ----------------------------------------------------------------------------
# matmul
# ----------------------------------------------------------------------------


def matmul(a, b, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, c=None):
    """GEMM: ``alpha * op(a) @ op(b) + beta * c``.

    Shapes
    ------
    a : (M, K) or (batch, M, K); (K, M) or (batch, K, M) when ``trans_a``.
    b : (K, N) or (batch, K, N); (N, K) or (batch, N, K) when ``trans_b``.
    c : broadcastable to the output shape, normally (M, N) or (batch, M, N).
        Ignored (never read, may be None or contain NaN) when ``beta == 0``.

    If both a and b are 3-D their batch sizes must be equal; a 2-D operand is
    broadcast against a 3-D one.

    Returns
    -------
    float64 array of shape (M, N), or (batch, M, N) if either operand is 3-D.
    """
    a = _f64(a, "a")
    b = _f64(b, "b")
    for name, t in (("a", a), ("b", b)):
        if t.ndim not in (2, 3):
            raise ValueError(f"{name} must be 2-D or 3-D, got shape {t.shape}")
    if a.ndim == 3 and b.ndim == 3 and a.shape[0] != b.shape[0]:
        raise ValueError(f"batch sizes differ: {a.shape[0]} vs {b.shape[0]}")

    op_a = np.swapaxes(a, -1, -2) if trans_a else a  # (..., M, K)
    op_b = np.swapaxes(b, -1, -2) if trans_b else b  # (..., K, N)
    if op_a.shape[-1] != op_b.shape[-2]:
        raise ValueError(
            f"inner dimensions differ: op(a) is {op_a.shape}, op(b) is {op_b.shape}"
        )

    out = float(alpha) * np.matmul(op_a, op_b)
    if beta != 0.0:
        if c is None:
            raise ValueError("c is required when beta != 0")
        c = np.broadcast_to(_f64(c, "c"), out.shape)
        out = out + float(beta) * c
    return out


# ----------------------------------------------------------------------------
# QKV projection
# ----------------------------------------------------------------------------


def _projection_dims(d_model, w_q, w_k, w_v, num_heads, num_kv_heads):
    """Validate projection weights; return (d_head, num_kv_heads)."""
    if num_heads is None or num_heads <= 0:
        raise ValueError("num_heads must be a positive integer")
    if num_kv_heads is None:
        num_kv_heads = num_heads
    if num_kv_heads <= 0:
        raise ValueError("num_kv_heads must be a positive integer")
    if w_q.ndim != 2 or w_q.shape[0] != d_model:
        raise ValueError(f"w_q must be (d_model={d_model}, d_q), got {w_q.shape}")
    d_q = w_q.shape[1]
    if d_q % num_heads != 0:
        raise ValueError(f"d_q={d_q} is not divisible by num_heads={num_heads}")
    d_head = d_q // num_heads
    d_kv = num_kv_heads * d_head
    for name, w in (("w_k", w_k), ("w_v", w_v)):
        if w.shape != (d_model, d_kv):
            raise ValueError(f"{name} must be ({d_model}, {d_kv}), got {w.shape}")
    return d_head, num_kv_heads


def qkv_project(x, w_q, w_k, w_v, b_q=None, b_k=None, b_v=None, *,
                num_heads, num_kv_heads=None):
    """Project ``x`` to head-major q, k, v.

    Shapes
    ------
    x   : (batch, seq, d_model)
    w_q : (d_model, d_q) with d_q = num_heads * d_head
    w_k : (d_model, d_kv) with d_kv = num_kv_heads * d_head
    w_v : (d_model, d_kv)
    b_q : (d_q,) or None;  b_k, b_v : (d_kv,) or None
    num_kv_heads defaults to num_heads.

    Returns
    -------
    q : (batch, num_heads, seq, d_head)
    k : (batch, num_kv_heads, seq, d_head)
    v : (batch, num_kv_heads, seq, d_head)

    with ``q[b, h, s, :] = (x[b, s] @ w_q + b_q)[h*d_head:(h+1)*d_head]``
    (and likewise for k, v with num_kv_heads).
    """
    x = _f64(x, "x")
    if x.ndim != 3:
        raise ValueError(f"x must be (batch, seq, d_model), got {x.shape}")
    w_q, w_k, w_v = _f64(w_q, "w_q"), _f64(w_k, "w_k"), _f64(w_v, "w_v")
    _, num_kv_heads = _projection_dims(x.shape[2], w_q, w_k, w_v,
                                       num_heads, num_kv_heads)

    def project(w, bias, heads):
        y = x @ w  # (batch, seq, heads*d_head)
        if bias is not None:
            bias = _f64(bias, "bias")
            if bias.shape != (w.shape[1],):
                raise ValueError(f"bias must be ({w.shape[1]},), got {bias.shape}")
            y = y + bias
        return _split_heads(y, heads)

    q = project(w_q, b_q, num_heads)
    k = project(w_k, b_k, num_kv_heads)
    v = project(w_v, b_v, num_kv_heads)
    return q, k, v


def qkv_project_backward(x, w_q, w_k, w_v, dq, dk, dv):
    """Backward of :func:`qkv_project`.

    Shapes
    ------
    x   : (batch, seq, d_model)
    w_q : (d_model, d_q);  w_k, w_v : (d_model, d_kv)
    dq  : (batch, num_heads, seq, d_head)     -- upstream grad of q
    dk  : (batch, num_kv_heads, seq, d_head)  -- upstream grad of k
    dv  : (batch, num_kv_heads, seq, d_head)  -- upstream grad of v

    Returns
    -------
    (dx, dw_q, dw_k, dw_v, db_q, db_k, db_v) with shapes
    dx (batch, seq, d_model), dw_* like w_*, db_q (d_q,), db_k/db_v (d_kv,).
    Bias gradients are column sums of the flattened upstream gradients.
    """
    x = _f64(x, "x")
    w_q, w_k, w_v = _f64(w_q, "w_q"), _f64(w_k, "w_k"), _f64(w_v, "w_v")
    grads = []
    for name, g, w in (("dq", dq, w_q), ("dk", dk, w_k), ("dv", dv, w_v)):
        g = _f64(g, name)
        if g.ndim != 4 or g.shape[0] != x.shape[0] or g.shape[2] != x.shape[1]:
            raise ValueError(f"{name} has incompatible shape {g.shape}")
        g = _merge_heads(g)  # (batch, seq, width)
        if g.shape[2] != w.shape[1] or w.shape[0] != x.shape[2]:
            raise ValueError(f"{name} {g.shape} does not match weight {w.shape}")
        grads.append(g)
    g_q, g_k, g_v = grads

    dx = g_q @ w_q.T + g_k @ w_k.T + g_v @ w_v.T
    dw_q = np.einsum("bsd,bse->de", x, g_q)
    dw_k = np.einsum("bsd,bse->de", x, g_k)
    dw_v = np.einsum("bsd,bse->de", x, g_v)
    db_q = g_q.sum(axis=(0, 1))
    db_k = g_k.sum(axis=(0, 1))
    db_v = g_v.sum(axis=(0, 1))
    return dx, dw_q, dw_k, dw_v, db_q, db_k, db_v


# ----------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------


def _check_attention_shapes(q, k, v):
    """Validate q, k, v; return (batch, num_heads, num_kv_heads, seq_q, seq_k)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != 4:
            raise ValueError(f"{name} must be 4-D, got shape {t.shape}")
    batch, num_heads, seq_q, d_head = q.shape
    _, num_kv_heads, seq_k, _ = k.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError("q, k, v batch sizes differ")
    if k.shape[3] != d_head:
        raise ValueError(f"k head dim {k.shape[3]} != q head dim {d_head}")
    if v.shape[1] != num_kv_heads or v.shape[2] != seq_k:
        raise ValueError(f"v shape {v.shape} incompatible with k shape {k.shape}")
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_heads={num_heads} not divisible by num_kv_heads={num_kv_heads}")
    return batch, num_heads, num_kv_heads, seq_q, seq_k


def _allowed_mask(batch, num_heads, seq_q, seq_k, *, causal=False,
                  key_lengths=None, bias=None):
    """Boolean (batch, num_heads, seq_q, seq_k) mask of visible (query, key) pairs.

    This is the single definition of masking shared by forward and backward:
    * causal (bottom-right aligned): key j visible to query i iff
      ``j <= i + (seq_k - seq_q)``;
    * key_lengths (int array (batch,)): key j visible iff ``j < key_lengths[b]``;
    * bias (broadcastable to (batch, num_heads, seq_q, seq_k)): entries equal
      to ``-inf`` are not visible.
    """
    shape = (batch, num_heads, seq_q, seq_k)
    allowed = np.ones(shape, dtype=bool)
    if causal:
        i = np.arange(seq_q)[:, None]
        j = np.arange(seq_k)[None, :]
        allowed &= j <= i + (seq_k - seq_q)  # broadcasts (seq_q, seq_k)
    if key_lengths is not None:
        lengths = np.asarray(key_lengths)
        if lengths.shape != (batch,):
            raise ValueError(f"key_lengths must have shape ({batch},), got {lengths.shape}")
        if not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError(f"key_lengths must be integer, got {lengths.dtype}")
        allowed &= np.arange(seq_k)[None, None, None, :] < lengths[:, None, None, None]
    if bias is not None:
        allowed &= np.broadcast_to(bias != -np.inf, shape)
    return allowed


def _prepare_bias(bias, shape):
    """Bias as float64 broadcast to ``shape``; only finite values or -inf allowed."""
    if bias is None:
        return None
    bias = _f64(bias, "bias")
    if np.isnan(bias).any() or (bias == np.inf).any():
        raise ValueError("bias must contain only finite values or -inf")
    return np.broadcast_to(bias, shape)


def _scores_and_mask(q, k, causal, key_lengths, bias, scale):
    """Masked scores S (masked entries set to -inf) and the allowed mask.

    S[b, h, i, j] = scale * q[b, h, i] . k[b, h // group, j] + bias[b, h, i, j]
    Returns (s, allowed, scale), s and allowed of shape
    (batch, num_heads, seq_q, seq_k).
    """
    batch, num_heads, seq_q, d_head = q.shape
    seq_k = k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(d_head)
    scale = float(scale)
    shape = (batch, num_heads, seq_q, seq_k)
    bias = _prepare_bias(bias, shape)
    allowed = _allowed_mask(batch, num_heads, seq_q, seq_k, causal=causal,
                            key_lengths=key_lengths, bias=bias)

    k_full = _expand_kv(k, num_heads)
    s = np.einsum("bhid,bhjd->bhij", q, k_full) * scale
    if bias is not None:
        # Only add bias on visible entries so that -inf never meets anything.
        s = s + np.where(allowed, bias, 0.0)
    s = np.where(allowed, s, -np.inf)
    return s, allowed, scale


def _probabilities(s, allowed, lse):
    """P = exp(S - lse) on visible entries, exactly 0 elsewhere.

    Fully masked rows (lse == -inf) give an all-zero row. No NaN/inf is
    produced because masked entries are replaced by -inf before ``exp`` and
    ``lse`` is replaced by 0 on fully masked rows.
    """
    row_any = allowed.any(axis=-1, keepdims=True)
    lse_safe = np.where(row_any, lse[..., None], 0.0)
    shifted = np.where(allowed, s - lse_safe, -np.inf)
    return np.exp(shifted)  # exp(-inf) == 0 exactly


def attention(q, k, v, *, causal=False, key_lengths=None, bias=None, scale=None):
    """Scaled dot-product attention with GQA, masking and additive bias.

    Shapes
    ------
    q : (batch, num_heads, seq_q, d_head)
    k : (batch, num_kv_heads, seq_k, d_head)
    v : (batch, num_kv_heads, seq_k, d_v)
    bias : None or float array broadcastable to (batch, num_heads, seq_q, seq_k);
        finite values or -inf (-inf masks the entry).
    key_lengths : None or int array (batch,); keys j >= key_lengths[b] masked.
    causal : bottom-right aligned; query i sees key j iff j <= i + seq_k - seq_q.
    scale : defaults to 1 / sqrt(d_head).

    Query head h uses kv head ``h // (num_heads // num_kv_heads)``.

    Returns
    -------
    o   : (batch, num_heads, seq_q, d_v) = softmax(S) @ V over visible keys
    lse : (batch, num_heads, seq_q) = log(sum_j exp(S_ij)) over visible keys,
          where S = scale * q k^T + bias.
    Rows with no visible key give o = 0 and lse = -inf.
    """
    q, k, v = _f64(q, "q"), _f64(k, "k"), _f64(v, "v")
    _, num_heads, _, _, _ = _check_attention_shapes(q, k, v)
    s, allowed, _ = _scores_and_mask(q, k, causal, key_lengths, bias, scale)

    # Numerically stable log-sum-exp over visible keys.
    row_any = allowed.any(axis=-1)                           # (b, h, i)
    row_max = np.where(row_any, s.max(axis=-1, initial=-np.inf), 0.0)  # finite everywhere (seq_k may be 0)
    e = np.exp(s - row_max[..., None])                       # 0 on masked entries
    row_sum = np.where(row_any, e.sum(axis=-1), 1.0)         # >= 1 on live rows
    lse = np.where(row_any, row_max + np.log(row_sum), -np.inf)

    # e / row_sum, not exp(s - lse): at |lse| ~ 1e37, lse = max + log(sum) rounds back to max
    p = np.where(allowed, e / row_sum[..., None], 0.0)
    o = np.einsum("bhij,bhjd->bhid", p, _expand_kv(v, num_heads))
    return o, lse


def attention_backward(do, q, k, v, o, lse, *, causal=False, key_lengths=None,
                       bias=None, scale=None, bias_grad=False):
    """Backward of :func:`attention` w.r.t. q, k, v.

    Shapes
    ------
    do, o : (batch, num_heads, seq_q, d_v)
    q     : (batch, num_heads, seq_q, d_head)
    k     : (batch, num_kv_heads, seq_k, d_head)
    v     : (batch, num_kv_heads, seq_k, d_v)
    lse   : (batch, num_heads, seq_q)  (as returned by :func:`attention`)
    causal / key_lengths / bias / scale: exactly as in :func:`attention`.

    Formula (per head, with K, V expanded to query heads):
        P  = exp(S - lse)   (0 on masked entries and fully masked rows)
        D  = rowsum(dO * O)
        dV = P^T dO
        dP = dO V^T
        dS = P * (dP - D)
        dQ = dS K * scale
        dK = dS^T Q * scale
    For GQA, dK and dV are summed over the query heads of each kv group.

    With ``bias_grad``, also dbias = dS summed over the axes along which ``bias``
    broadcasts to (batch, num_heads, seq_q, seq_k), in bias's shape (S = ... + bias,
    so dL/dbias = dL/dS).

    Returns
    -------
    (dq, dk, dv) with the shapes of q, k, v, and dbias with ``bias_grad``. Fully
    masked rows contribute zero gradient.
    """
    if bias_grad and bias is None:
        raise ValueError("bias_grad=True needs a bias")
    q, k, v = _f64(q, "q"), _f64(k, "k"), _f64(v, "v")
    do, o, lse = _f64(do, "do"), _f64(o, "o"), _f64(lse, "lse")
    batch, num_heads, num_kv_heads, seq_q, _ = _check_attention_shapes(q, k, v)
    o_shape = (batch, num_heads, seq_q, v.shape[3])
    if do.shape != o_shape or o.shape != o_shape:
        raise ValueError(f"do and o must have shape {o_shape}, got {do.shape}, {o.shape}")
    if lse.shape != o_shape[:3]:
        raise ValueError(f"lse must have shape {o_shape[:3]}, got {lse.shape}")

    s, allowed, scale = _scores_and_mask(q, k, causal, key_lengths, bias, scale)
    p = _probabilities(s, allowed, lse)                      # (b, h, i, j)

    k_full = _expand_kv(k, num_heads)
    v_full = _expand_kv(v, num_heads)

    d_row = np.sum(do * o, axis=-1, keepdims=True)          # D: (b, h, i, 1)
    dv_full = np.einsum("bhij,bhid->bhjd", p, do)            # P^T dO
    dp = np.einsum("bhid,bhjd->bhij", do, v_full)            # dO V^T
    ds = p * (dp - d_row)
    dq = np.einsum("bhij,bhjd->bhid", ds, k_full) * scale
    dk_full = np.einsum("bhij,bhid->bhjd", ds, q) * scale

    dk = _reduce_kv(dk_full, num_kv_heads)
    dv = _reduce_kv(dv_full, num_kv_heads)
    if not bias_grad:
        return dq, dk, dv
    shape = np.shape(bias)
    b4 = (1,) * (4 - len(shape)) + tuple(shape)
    axes = tuple(ax for ax in range(4) if b4[ax] == 1 and ds.shape[ax] != 1)
    dbias = ds.sum(axis=axes, keepdims=True) if axes else ds
    return dq, dk, dv, dbias.reshape(shape)


def _sequences(cu_seqlens_q, cu_seqlens_k):
    """Row ranges (q_slice, k_slice) of each packed sequence."""
    cu_q = np.asarray(cu_seqlens_q, dtype=np.int64)
    cu_k = np.asarray(cu_seqlens_k, dtype=np.int64)
    return [(slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])) for b in range(len(cu_q) - 1)]


def _as_batch(t):
    """(len, heads, dim) rows of one sequence -> (1, heads, len, dim)."""
    return t.transpose(1, 0, 2)[None]


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, scale=None):
    """Packed variable-length attention: each sequence on its own, by :func:`attention`.

    q: (total_q, num_heads, d_head); k: (total_k, num_kv_heads, d_head);
    v: (total_k, num_kv_heads, d_v); cu_seqlens_*: (batch + 1,) row offsets.
    Returns (o, lse): o (total_q, num_heads, d_v), lse (num_heads, total_q).
    """
    q, k, v = _f64(q, "q"), _f64(k, "k"), _f64(v, "v")
    o = np.zeros((q.shape[0], q.shape[1], v.shape[2]))
    lse = np.full((q.shape[1], q.shape[0]), -np.inf)
    for qs, ks in _sequences(cu_seqlens_q, cu_seqlens_k):
        ob, lb = attention(_as_batch(q[qs]), _as_batch(k[ks]), _as_batch(v[ks]), causal=causal, scale=scale)
        o[qs] = ob[0].transpose(1, 0, 2)
        lse[:, qs] = lb[0]
    return o, lse


def attention_varlen_backward(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, *, causal=False, scale=None):
    """Gradients of :func:`attention_varlen`: (dq, dk, dv) with the shapes of q, k, v."""
    q, k, v = _f64(q, "q"), _f64(k, "k"), _f64(v, "v")
    do, o, lse = _f64(do, "do"), _f64(o, "o"), _f64(lse, "lse")
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for qs, ks in _sequences(cu_seqlens_q, cu_seqlens_k):
        g = attention_backward(_as_batch(do[qs]), _as_batch(q[qs]), _as_batch(k[ks]), _as_batch(v[ks]),
                               _as_batch(o[qs]), lse[:, qs][None], causal=causal, scale=scale)
        dq[qs], dk[ks], dv[ks] = (t[0].transpose(1, 0, 2) for t in g)
    return dq, dk, dv


_erfc = np.frompyfunc(math.erfc, 1, 1)


def _normal_cdf(x):
    """Φ(x) = erfc(-x/√2)/2: accurate in both tails (math.erfc per element: tests only)."""
    return 0.5 * _erfc(-x / math.sqrt(2.0)).astype(np.float64)


def gelu(x):
    """GELU(x) = x·Φ(x), float64."""
    x = np.asarray(x, dtype=np.float64)
    return x * _normal_cdf(x)


def gelu_backward(x, dy):
    """dy·GELU'(x) = dy·(Φ(x) + x·φ(x)), φ the standard normal density."""
    x = np.asarray(x, dtype=np.float64)
    cdf = _normal_cdf(x)
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return np.asarray(dy, dtype=np.float64) * (cdf + x * pdf)


def linear(x, w, b=None, activation=None):
    """activation(x·w + b) for x (..., d_in), w (d_in, d_out), b (d_out,)."""
    y = np.asarray(x, dtype=np.float64) @ np.asarray(w, dtype=np.float64)
    if b is not None:
        y = y + np.asarray(b, dtype=np.float64)
    return gelu(y) if activation == "gelu" else y


def layer_norm(x, weight, bias, eps=1e-5):
    """(x - mean)/sqrt(var + eps)·weight + bias over the last axis (biased variance).

    Returns (y, mean, rstd) with mean, rstd of shape x.shape[:-1].
    """
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=-1)
    var = ((x - mean[..., None]) ** 2).mean(axis=-1)
    rstd = 1.0 / np.sqrt(var + eps)
    y = (x - mean[..., None]) * rstd[..., None] * np.asarray(weight, np.float64) + np.asarray(bias, np.float64)
    return y, mean, rstd


def layer_norm_backward(dy, x, weight, mean, rstd):
    """Gradients of :func:`layer_norm`: (dx, dweight, dbias)."""
    dy, x = np.asarray(dy, np.float64), np.asarray(x, np.float64)
    xh = (x - np.asarray(mean, np.float64)[..., None]) * np.asarray(rstd, np.float64)[..., None]
    g = dy * np.asarray(weight, np.float64)
    dx = np.asarray(rstd, np.float64)[..., None] * (
        g - g.mean(axis=-1, keepdims=True) - xh * (g * xh).mean(axis=-1, keepdims=True)
    )
    axes = tuple(range(x.ndim - 1))
    return dx, (dy * xh).sum(axis=axes), dy.sum(axis=axes)


def softmax_cross_entropy(logits, targets, *, label_smoothing=0.0, ignore_index=-100):
    """(loss, dlogits) of the mean softmax cross-entropy, in float64.

    logits: (N, C); targets: (N,) ints in [0, C) or ``ignore_index``. Target
    distribution (1 - eps)·onehot + eps/C; the mean runs over the rows not ignored
    (no row left: loss 0, gradient 0); ignored rows have gradient 0.
    """
    x = _f64(logits, "logits")
    t = np.asarray(targets)
    n, c = x.shape
    valid = t != ignore_index
    safe_t = np.where(valid, t, 0)
    m = x.max(axis=1, keepdims=True)
    logp = x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))  # (N, C) log-softmax
    eps = float(label_smoothing)
    target = (1.0 - eps) * np.eye(c)[safe_t] + eps / c  # (N, C)
    terms = np.multiply(target, logp, out=np.zeros_like(logp), where=target > 0)  # a -inf logit of weight 0 adds 0
    row = -terms.sum(axis=1)
    denom = max(int(valid.sum()), 1)
    loss = float(row[valid].sum() / denom)
    grad = (np.exp(logp) - target) * (valid[:, None] / denom)
    return loss, grad


def adam_update(w, g, m, v, *, lr, betas, eps, weight_decay, decoupled, step):
    """One Adam/AdamW step on one parameter in float64; returns the new (w, m, v).

    AdamW (decoupled): w·(1 - lr·wd); Adam: g + wd·w; then
    m = β1·m + (1-β1)·g, v = β2·v + (1-β2)·g², w -= lr·m̂ / (√v̂ + eps) with
    m̂ = m / (1-β1^t), v̂ = v / (1-β2^t), t = step.
    """
    w, g, m, v = (np.asarray(a, np.float64) for a in (w, g, m, v))
    b1, b2 = betas
    if decoupled:
        w = w * (1 - lr * weight_decay)
    else:
        g = g + weight_decay * w
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    w = w - lr * (m / (1 - b1**step)) / (np.sqrt(v / (1 - b2**step)) + eps)
    return w, m, v


def sgd_update(w, g, buf, *, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
    """One SGD step on one parameter in float64; returns (w, buf). buf None = first step
    (it becomes d) or no momentum."""
    w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
    d = g + weight_decay * w
    if momentum:
        buf = d.copy() if buf is None else momentum * np.asarray(buf, np.float64) + (1 - dampening) * d
        d = d + momentum * buf if nesterov else buf
    return w - lr * d, buf


def _mix32(h):
    """Wellons' lowbias32 on uint32 arrays (wrapping arithmetic)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x7FEB352D)
    h = h ^ (h >> np.uint32(15))
    h = h * np.uint32(0x846CA68B)
    return h ^ (h >> np.uint32(16))


def dropout_bits(seed, n):
    """The 32 random bits of elements 0..n-1 under ``seed`` (Note [dropout bits]):
    mix(mix(lo32(i) ^ lo32(seed)) + (hi32(i) ^ hi32(seed))). Returns uint32 (n,)."""
    i = np.arange(n, dtype=np.uint64)
    lo, hi = (i & np.uint64(0xFFFFFFFF)).astype(np.uint32), (i >> np.uint64(32)).astype(np.uint32)
    k0, k1 = np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32)
    with np.errstate(over="ignore"):
        return _mix32(_mix32(lo ^ k0) + (hi ^ k1))


def dropout(x, p, seed):
    """(y, mask) of inverted dropout in float64: element i (row-major) is dropped iff
    dropout_bits(seed)[i] < round(p·2^32); mask = 1/(1-p) or 0; y = x·mask."""
    x = _f64(x, "x")
    threshold = min(int(round(p * 2.0**32)), 2**32 - 1)
    keep = (dropout_bits(seed, x.size) >= threshold).reshape(x.shape)
    mask = np.where(keep, 1.0 / (1.0 - p), 0.0)
    return x * mask, mask
