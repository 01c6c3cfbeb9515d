"""Native ops against PyTorch (an independent implementation), forward and autograd.

PyTorch runs in float64 on the very float32 inputs the native op gets, so it is a
second ground truth beside qkv_native.reference, and the _helpers error bounds
apply unchanged. Fully masked rows are left out here (PyTorch's SDPA gives NaN
for them; the reference tests cover them).
"""

import numpy as np
import pytest

import qkv_native as qn
from qkv_native import reference as ref

from _helpers import (
    ATTENTION_CASES,
    assert_within,
    attention_backward_bounds,
    attention_forward_bounds,
    gemm_bound,
    make_attention_case,
    randn,
    ref_kwargs,
    rounding,
)

torch = pytest.importorskip("torch")
F = torch.nn.functional


def t64(a, grad=False):
    return torch.tensor(np.asarray(a, dtype=np.float64), dtype=torch.float64, requires_grad=grad)


def _has_enable_gqa():
    q = torch.zeros(1, 2, 1, 4, dtype=torch.float64)
    k = torch.zeros(1, 1, 1, 4, dtype=torch.float64)
    try:
        F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
    except TypeError:
        return False
    return True


HAS_GQA = _has_enable_gqa()


def torch_sdpa(q, k, v, *, causal=False, key_lengths=None, bias=None, scale=None, use_gqa_flag=True):
    """SDPA in float64 with the native masking conventions; returns the output tensor."""
    heads, kv_heads = q.shape[1], k.shape[1]
    seq_q, seq_k = q.shape[2], k.shape[2]
    kwargs = {}
    if heads != kv_heads:
        if HAS_GQA and use_gqa_flag:
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(heads // kv_heads, dim=1)
            v = v.repeat_interleave(heads // kv_heads, dim=1)
    add = None
    if key_lengths is not None:
        keep = torch.arange(seq_k)[None, :] < torch.as_tensor(key_lengths)[:, None]
        add = torch.where(keep, 0.0, float("-inf")).to(torch.float64)[:, None, None, :]
    if bias is not None:
        # a copy (bias may be a read-only broadcast view), or a leaf tensor whose grad is wanted
        b = bias if torch.is_tensor(bias) else torch.tensor(np.array(bias, dtype=np.float64))
        add = b if add is None else add + b
    if causal and seq_q != seq_k:
        # SDPA's is_causal is top-left aligned; the native one is bottom-right
        i = torch.arange(seq_q)[:, None]
        j = torch.arange(seq_k)[None, :]
        c = torch.where(j <= i + (seq_k - seq_q), 0.0, float("-inf")).to(torch.float64)
        add = c if add is None else add + c
        causal = False
    if add is not None:
        if causal:  # is_causal and attn_mask together are not allowed: fold it in
            i = torch.arange(seq_q)[:, None]
            j = torch.arange(seq_k)[None, :]
            add = add + torch.where(j <= i, 0.0, float("-inf")).to(torch.float64)
            causal = False
        kwargs["attn_mask"] = add
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **kwargs)


# cases without fully masked rows (SDPA gives NaN there)
TORCH_CASES = [
    "small",
    "causal_q_lt_k",
    "causal_square_mqa",
    "d_v_differs",
    "long_causal",
    "bias_qk",
    "bias_h1k",
    "ramp_sharp",
    "gqa_6_3",
    "custom_scale",
    "large_scores",
]
TORCH_EXTRA = {
    "key_lengths_nonzero": dict(batch=3, heads=2, seq_q=17, seq_k=65, d_head=32, key_lengths=[1, 65, 30]),
    "bool_mask_all_rows_live": dict(batch=2, heads=4, kv_heads=1, seq_q=17, seq_k=63, d_head=24, mask="b1qk",
                                    causal=True),
}


def case(rng, name):
    spec = ATTENTION_CASES.get(name) or TORCH_EXTRA[name]
    q, k, v, kw, rb = make_attention_case(rng, **spec)
    if "mask" in kw:  # keep every row alive for SDPA: the last key is always visible
        kw["mask"][..., -1] = True
        rb = np.where(np.broadcast_to(kw["mask"], rb.shape), 0.0, -np.inf)
    return q, k, v, kw, rb


@pytest.mark.parametrize("name", TORCH_CASES + list(TORCH_EXTRA))
def test_forward_and_grads_match_torch(rng, name):
    q, k, v, kw, rb = case(rng, name)
    rkw = ref_kwargs(kw, rb)
    o, lse = qn.attention(q, k, v, return_lse=True, **kw)
    do = randn(rng, *o.shape)
    dq, dk, dv = qn.attention_backward(do, q, k, v, o, lse, **kw)

    tq, tk, tv = t64(q, True), t64(k, True), t64(v, True)
    to = torch_sdpa(tq, tk, tv, causal=kw["causal"], key_lengths=kw.get("key_lengths"), bias=rb,
                    scale=kw["scale"])
    to.backward(t64(do))
    o_t = to.detach().numpy()
    _, lse_ref = ref.attention(q, k, v, **rkw)
    bound_o, _ = attention_forward_bounds(q, k, v, o_t, lse_ref, **rkw)
    assert_within(o, o_t, bound_o, "o vs torch")

    # Torch differentiates at the exact o; the native backward gets the forward's float32
    # o and lse. Their errors enter through P = exp(S - lse) (relative error |δlse|) and
    # D = rowsum(dO∘O) (|δD| <= Σ|dO|·|δo|); both are bounded by the forward factor
    # (<= the backward factor, as d_head + seq_k <= k_len) times the same absolute
    # twins P∘(|dO||V|ᵀ + Σ|dO||O|), once each: hence 3x the backward-only bound.
    grads_t = (tq.grad.numpy(), tk.grad.numpy(), tv.grad.numpy())
    bounds = attention_backward_bounds(do, q, k, v, o, grads_t, **rkw)
    for label, g, want, b in zip(("dq", "dk", "dv"), (dq, dk, dv), grads_t, bounds):
        assert_within(g, want, 3.0 * b, f"{label} vs torch autograd")


@pytest.mark.parametrize("name", ["bias_qk", "bias_h1k", "ramp_sharp", "bias_gqa_causal_full"])
def test_bias_grad_matches_torch(rng, name):
    """dbias against autograd through SDPA's additive attn_mask (broadcast axes summed by torch)."""
    spec = ATTENTION_CASES.get(name) or dict(batch=2, heads=4, kv_heads=2, seq_q=33, seq_k=65, d_head=24,
                                             causal=True, bias="1hqk")
    q, k, v, kw, rb = make_attention_case(rng, **spec)
    o, lse = qn.attention(q, k, v, return_lse=True, **kw)
    do = randn(rng, *o.shape)
    *_, dbias = qn.attention_backward(do, q, k, v, o, lse, bias_grad=True, **kw)
    tb = t64(kw["bias"], True)
    to = torch_sdpa(t64(q), t64(k), t64(v), causal=kw["causal"], bias=tb, scale=kw["scale"])
    to.backward(t64(do))
    want = tb.grad.numpy()
    assert want.shape == dbias.shape
    # the bound of test_bias_grad, tripled as in the test above (float32 o and lse)
    rkw = ref_kwargs(kw, rb)
    grads_ref = ref.attention_backward(do, q, k, v, o, lse, **rkw) + (want,)
    bound = attention_backward_bounds(do, q, k, v, o, grads_ref, bias_grad_shape=want.shape, **rkw)[3]
    assert_within(dbias, want, 3.0 * bound, "dbias vs torch autograd")
    assert np.abs(want).max() > 1e-3


@pytest.mark.skipif(not HAS_GQA, reason="this torch has no enable_gqa")
def test_gqa_flag_and_repeat_agree(rng):
    q, k, v, kw, rb = case(rng, "causal_square_mqa")
    a = torch_sdpa(t64(q), t64(k), t64(v), causal=True)
    b = torch_sdpa(t64(q), t64(k), t64(v), causal=True, use_gqa_flag=False)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    o = qn.attention(q, k, v, causal=True)
    bound_o, _ = attention_forward_bounds(q, k, v, a.numpy(), np.zeros(q.shape[:3]), causal=True)
    assert_within(o, a.numpy(), bound_o, "o vs torch (enable_gqa)")


@pytest.mark.parametrize("biases", [True, False])
@pytest.mark.parametrize("shape", [(2, 17, 65, 4, 2, 24), (1, 63, 129, 2, 1, 64), (3, 7, 300, 1, 1, 32)])
def test_projection_and_grads_match_torch(rng, shape, biases):
    batch, seq, d_model, heads, kv_heads, d_head = shape
    x = randn(rng, batch, seq, d_model)
    ws = [randn(rng, d_model, h * d_head) for h in (heads, kv_heads, kv_heads)]
    bs = [randn(rng, h * d_head) for h in (heads, kv_heads, kv_heads)] if biases else [None] * 3
    q, k, v = qn.qkv_project(x, *ws, *bs, num_heads=heads, num_kv_heads=kv_heads)
    ups = [randn(rng, batch, h, seq, d_head) for h in (heads, kv_heads, kv_heads)]
    grads = qn.qkv_project_backward(x, *ws, *ups)

    tx = t64(x, True)
    tws = [t64(w, True) for w in ws]
    tbs = [t64(b, True) if b is not None else None for b in bs]
    outs = []
    for w, b, h in zip(tws, tbs, (heads, kv_heads, kv_heads)):
        y = tx @ w + (b if b is not None else 0.0)  # (batch, seq, h·d_head)
        outs.append(y.reshape(batch, seq, h, d_head).transpose(1, 2))
    torch.autograd.backward(outs, [t64(g) for g in ups])

    for label, got, t, w, b in zip("qkv", (q, k, v), outs, ws, bs):
        want = t.detach().numpy()
        absterm = (np.abs(x).astype(np.float64) @ np.abs(w)) + (0.0 if b is None else np.abs(b))
        h = want.shape[1]
        absterm = absterm.reshape(batch, seq, h, d_head).transpose(0, 2, 1, 3)
        assert_within(got, want, gemm_bound(absterm, d_model + 1) + rounding(want), label)

    up_merged = np.concatenate([g.transpose(0, 2, 1, 3).reshape(batch, seq, -1) for g in ups], axis=2)
    w_all = np.concatenate(ws, axis=1)
    dx, dws, dbs = grads[0], grads[1:4], grads[4:7]
    abs_dx = np.abs(up_merged).astype(np.float64) @ np.abs(w_all).T
    assert_within(dx, tx.grad.numpy(), gemm_bound(abs_dx, w_all.shape[1]) + rounding(tx.grad.numpy()), "dx")
    xa = np.abs(x).reshape(-1, d_model).astype(np.float64)
    col = 0
    for label, g, tw in zip(("dw_q", "dw_k", "dw_v"), dws, tws):
        n = tw.shape[1]
        absw = xa.T @ np.abs(up_merged.reshape(-1, up_merged.shape[2])[:, col : col + n])
        want = tw.grad.numpy()
        assert_within(g, want, gemm_bound(absw, batch * seq) + rounding(want), label)
        col += n
    if biases:
        col = 0
        for label, g, tb in zip(("db_q", "db_k", "db_v"), dbs, tbs):
            n = tb.shape[0]
            absb = np.abs(up_merged.reshape(-1, up_merged.shape[2])[:, col : col + n]).sum(axis=0)
            want = tb.grad.numpy()
            assert_within(g, want, gemm_bound(absb, batch * seq) + rounding(want), label)
            col += n
