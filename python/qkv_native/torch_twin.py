"""PyTorch twins of qkv_native models: the same layers, the same weights, in torch.

:func:`to_torch` turns a :class:`qkv_native.nn.Sequential` (e.g. one built by
:func:`qkv_native.train.attention_classifier`) into a ``torch.nn.Module`` that
computes the same function with torch ops and autograd. Parameters keep
qkv_native's names and layouts (a Linear's weight is (d_in, d_out), y = x·W + b),
so ``dict(twin.named_parameters())[name]`` is the tensor of ``model``'s parameter
``name`` and weights, gradients and optimizer settings carry over one to one.

The twin is written as a PyTorch user would write it for speed: one packed GEMM
for Q, K and V, ``scaled_dot_product_attention``, ``torch.nn.LayerNorm``,
``torch.nn.Dropout``. It is the torch side of the training benchmark
(:mod:`qkv_native.bench`) and of the tests that compare training against torch.
Needs torch (imported lazily).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

from . import nn as qnn

__all__ = ["to_torch"]


def to_torch(model: qnn.Module, torch: Any = None):
    """A torch.nn.Module twin of ``model`` with copies of its current weights.

    Supported layers: Sequential, Linear, LearnedPositionalEmbedding,
    SinusoidalPositionalEncoding, Dropout, LayerNorm, GELU, ReLU,
    TransformerEncoderBlock (self-attention, any num_kv_heads, causal), MeanPool,
    ClsToken, ClsPool. The twin takes x: (batch, seq, d_in) float32 tensors
    (no key_lengths) and is in the train/eval mode of ``model``.
    """
    if torch is None:
        import torch
    twin = _build(model, torch)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            p.copy_(torch.from_numpy(dict(model.named_parameters())[name].data))
    twin.train(model.training)
    return twin


@functools.lru_cache(maxsize=None)
def _layers(torch) -> SimpleNamespace:
    """The twin's torch layer classes (defined once per torch module)."""
    tnn, F = torch.nn, torch.nn.functional

    class Linear(tnn.Module):  # y = x·W + b, W: (d_in, d_out) as in qkv_native
        def __init__(self, d_in, d_out, bias):
            super().__init__()
            self.weight = tnn.Parameter(torch.empty(d_in, d_out))
            self.bias = tnn.Parameter(torch.empty(d_out)) if bias else None

        def forward(self, x):
            return F.linear(x, self.weight.t(), self.bias)

    class AddPositions(tnn.Module):  # y = x + P[:seq]
        def __init__(self, max_seq, d_model, learned, table=None):
            super().__init__()
            if learned:
                self.weight = tnn.Parameter(torch.empty(max_seq, d_model))
            else:
                self.register_buffer("table", torch.from_numpy(table))

        def forward(self, x):
            p = self.weight if hasattr(self, "weight") else self.table
            return x + p[: x.shape[1]]

    class Attention(tnn.Module):  # MultiHeadAttention, self-attention
        def __init__(self, a: qnn.MultiHeadAttention):
            super().__init__()
            d_q, d_kv = a.num_heads * a.d_head, a.num_kv_heads * a.d_head
            self.num_heads, self.num_kv_heads, self.d_head, self.causal = a.num_heads, a.num_kv_heads, a.d_head, a.causal
            for name, shape in (("w_q", (a.d_model, d_q)), ("w_k", (a.d_model, d_kv)), ("w_v", (a.d_model, d_kv)),
                                ("w_o", (d_q, a.d_model))):
                setattr(self, name, tnn.Parameter(torch.empty(shape)))
            self.has_bias = a.has_bias
            if a.has_bias:
                for name, n in (("b_q", d_q), ("b_k", d_kv), ("b_v", d_kv), ("b_o", a.d_model)):
                    setattr(self, name, tnn.Parameter(torch.empty(n)))

        def forward(self, x):
            b, s, _ = x.shape
            h, hk, dh = self.num_heads, self.num_kv_heads, self.d_head
            w = torch.cat([self.w_q, self.w_k, self.w_v], 1)  # one GEMM for Q, K and V
            bias = torch.cat([self.b_q, self.b_k, self.b_v]) if self.has_bias else None
            qkv = F.linear(x, w.t(), bias)
            q, k, v = qkv.split([h * dh, hk * dh, hk * dh], dim=-1)
            q = q.view(b, s, h, dh).transpose(1, 2)  # (B, H, S, D)
            k = k.view(b, s, hk, dh).transpose(1, 2)
            v = v.view(b, s, hk, dh).transpose(1, 2)
            if hk != h:
                k, v = k.repeat_interleave(h // hk, 1), v.repeat_interleave(h // hk, 1)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
            return F.linear(o.transpose(1, 2).reshape(b, s, h * dh), self.w_o.t(), self.b_o if self.has_bias else None)

    class Block(tnn.Module):  # TransformerEncoderBlock
        def __init__(self, blk: qnn.TransformerEncoderBlock):
            super().__init__()
            self.norm_first = blk.norm_first
            for name in ("attn", "ln1", "drop1", "ff", "ln2", "drop2"):  # qkv_native's order
                setattr(self, name, _build(getattr(blk, name), torch))

        def forward(self, x):
            if self.norm_first:
                h = x + self.drop1(self.attn(self.ln1(x)))
                return h + self.drop2(self.ff(self.ln2(h)))
            h = self.ln1(x + self.drop1(self.attn(x)))
            return self.ln2(h + self.drop2(self.ff(h)))

    class FeedForward(tnn.Module):
        def __init__(self, ff: qnn.FeedForward):
            super().__init__()
            self.fc1, self.act, self.drop, self.fc2 = (_build(c, torch) for c in (ff.fc1, ff.act, ff.drop, ff.fc2))

        def forward(self, x):
            return self.fc2(self.drop(self.act(self.fc1(x))))

    class Lambda(tnn.Module):
        def __init__(self, f):
            super().__init__()
            self.f = f

        def forward(self, x):
            return self.f(x)

    class ClsToken(tnn.Module):
        def __init__(self, d_model):
            super().__init__()
            self.token = tnn.Parameter(torch.empty(d_model))

        def forward(self, x):
            return torch.cat([self.token.expand(x.shape[0], 1, -1), x], 1)

    return SimpleNamespace(Linear=Linear, AddPositions=AddPositions, Attention=Attention, Block=Block,
                           FeedForward=FeedForward, Lambda=Lambda, ClsToken=ClsToken)


def _build(m: qnn.Module, torch):
    tnn, L = torch.nn, _layers(torch)
    if isinstance(m, qnn.Sequential):
        seq = tnn.Sequential()
        for i, layer in enumerate(m.layers):
            seq.add_module(str(i), _build(layer, torch))
        return seq
    if isinstance(m, qnn.Linear):
        return L.Linear(m.d_in, m.d_out, m.bias is not None)
    if isinstance(m, qnn.LearnedPositionalEmbedding):
        return L.AddPositions(m.max_seq, m.d_model, True)
    if isinstance(m, qnn.SinusoidalPositionalEncoding):
        return L.AddPositions(m.max_seq, m.d_model, False, m.table)
    if isinstance(m, qnn.Dropout):
        return tnn.Dropout(m.p)
    if isinstance(m, qnn.LayerNorm):
        return tnn.LayerNorm(m.d_model, eps=m.eps)
    if isinstance(m, qnn.GELU):
        return tnn.GELU(approximate=m.approximate)
    if isinstance(m, qnn.ReLU):
        return tnn.ReLU()
    if isinstance(m, qnn.MultiHeadAttention):
        return L.Attention(m)
    if isinstance(m, qnn.FeedForward):
        return L.FeedForward(m)
    if isinstance(m, qnn.TransformerEncoderBlock):
        return L.Block(m)
    if isinstance(m, qnn.MeanPool):
        return L.Lambda(lambda x: x.mean(1))
    if isinstance(m, qnn.ClsPool):
        return L.Lambda(lambda x: x[:, 0])
    if isinstance(m, qnn.ClsToken):
        return L.ClsToken(m.d_model)
    raise TypeError(f"to_torch: no torch twin for {type(m).__name__}")
