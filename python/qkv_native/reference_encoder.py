"""Float64 NumPy reference ("twin") of :mod:`qkv_native.encoder`, for tests.

Written for clarity, not speed: the BERT forward pass exactly as the Hugging Face
``BertModel`` defines it, then sentence-transformers' pooling, all in float64.
It shares no code with the native encoder: its inputs are the canonical tensors
(the names of :func:`qkv_native.encoder.bert_tensor_shapes`, torch's (out, in)
layout for linear weights), the ``config.json`` fields, and already tokenized,
right-padded ids with their attention mask.

Shapes: input_ids, token_type_ids, attention_mask are (batch, seq);
hidden states are (batch, seq, d_model); embeddings are (batch, len(pooling)·d_model).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

__all__ = ["layer_norm", "gelu", "bert_forward", "pool", "encode"]

_erf = np.frompyfunc(math.erf, 1, 1)  # exact double-precision erf, elementwise


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def layer_norm(x, gamma, beta, eps):
    """(x - mean) / sqrt(var + eps) * gamma + beta over the last axis (biased variance)."""
    x = _f64(x)
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * _f64(gamma) + _f64(beta)


def gelu(x):
    """Exact GELU: x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2)))."""
    x = _f64(x)
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))


def _linear(x, params, name):
    """x @ W.T + b for the torch-layout weight ``name.weight`` (out, in) and bias ``name.bias``."""
    return x @ _f64(params[name + ".weight"]).T + _f64(params[name + ".bias"])


def bert_forward(params: Mapping[str, np.ndarray], config: Mapping, input_ids, token_type_ids,
                 attention_mask) -> np.ndarray:
    """Last hidden states of a BertModel: (batch, seq, d_model), float64.

    config: the config.json fields hidden_size, num_attention_heads,
    num_hidden_layers and layer_norm_eps (default 1e-12).
    attention_mask: 1 for tokens, 0 for padding; padded keys get no attention weight.
    """
    input_ids = np.asarray(input_ids)
    token_type_ids = np.asarray(token_type_ids)
    mask = np.asarray(attention_mask).astype(bool)
    batch, seq = input_ids.shape
    d = int(config["hidden_size"])
    num_heads = int(config["num_attention_heads"])
    d_head = d // num_heads
    eps = float(config.get("layer_norm_eps", 1e-12))

    # embeddings
    x = _f64(params["embeddings.word_embeddings.weight"])[input_ids]
    if "embeddings.token_type_embeddings.weight" in params:
        x = x + _f64(params["embeddings.token_type_embeddings.weight"])[token_type_ids]
    x = x + _f64(params["embeddings.position_embeddings.weight"])[np.arange(seq)][None]
    x = layer_norm(x, params["embeddings.LayerNorm.weight"], params["embeddings.LayerNorm.bias"], eps)

    # additive key mask: (batch, 1, 1, seq_k)
    key_bias = np.where(mask, 0.0, -np.inf)[:, None, None, :]

    def heads(t):  # (batch, seq, d) -> (batch, num_heads, seq, d_head)
        return t.reshape(batch, seq, num_heads, d_head).transpose(0, 2, 1, 3)

    for n in range(int(config["num_hidden_layers"])):
        p = f"encoder.layer.{n}."
        q = heads(_linear(x, params, p + "attention.self.query"))
        k = heads(_linear(x, params, p + "attention.self.key"))
        v = heads(_linear(x, params, p + "attention.self.value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d_head) + key_bias  # (b, h, seq_q, seq_k)
        row_max = scores.max(axis=-1, keepdims=True)
        row_max = np.where(np.isfinite(row_max), row_max, 0.0)  # a row with no key: all weights 0
        w = np.exp(scores - row_max)
        w = w / np.maximum(w.sum(axis=-1, keepdims=True), np.finfo(np.float64).tiny)
        ctx = (w @ v).transpose(0, 2, 1, 3).reshape(batch, seq, d)
        x = layer_norm(_linear(ctx, params, p + "attention.output.dense") + x,
                       params[p + "attention.output.LayerNorm.weight"],
                       params[p + "attention.output.LayerNorm.bias"], eps)
        h = gelu(_linear(x, params, p + "intermediate.dense"))
        x = layer_norm(_linear(h, params, p + "output.dense") + x,
                       params[p + "output.LayerNorm.weight"], params[p + "output.LayerNorm.bias"], eps)
    return x


def pool(hidden, attention_mask, modes: Sequence[str] = ("mean",)) -> np.ndarray:
    """sentence-transformers' Pooling for right-padded rows, modes concatenated in order.

    hidden: (batch, seq, d_model); attention_mask: (batch, seq) of 0/1.
    Returns (batch, len(modes)·d_model). A row of no tokens pools to zeros in every mode,
    as the encoder's does (max gave -inf, hence NaN once normalised, and cls a padding state).
    """
    h = _f64(hidden)
    m = np.asarray(attention_mask).astype(np.float64)
    lengths = m.sum(axis=1).astype(np.int64)
    count = np.maximum(m.sum(axis=1, keepdims=True), 1e-9)
    parts = []
    for mode in modes:
        if mode == "cls":
            parts.append(h[:, 0])
        elif mode == "lasttoken":
            last = h[np.arange(h.shape[0]), np.maximum(lengths - 1, 0)]
            parts.append(np.where((lengths > 0)[:, None], last, 0.0))
        elif mode == "max":
            parts.append(np.where(m[:, :, None] > 0, h, -np.inf).max(axis=1))
        elif mode == "mean":
            parts.append((h * m[:, :, None]).sum(axis=1) / count)
        elif mode == "mean_sqrt_len_tokens":
            parts.append((h * m[:, :, None]).sum(axis=1) / np.sqrt(count))
        elif mode == "weightedmean":
            w = m * np.arange(1, h.shape[1] + 1)[None, :]
            parts.append((h * w[:, :, None]).sum(axis=1) / np.maximum(w.sum(axis=1, keepdims=True), 1e-9))
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    out = np.concatenate(parts, axis=1)
    out[lengths == 0] = 0.0
    return out


def encode(params: Mapping[str, np.ndarray], config: Mapping, input_ids, token_type_ids, attention_mask, *,
           pooling: Sequence[str] = ("mean",), normalize: bool = True) -> np.ndarray:
    """Sentence embeddings: BERT forward, pooling, optional L2 normalisation. float64."""
    e = pool(bert_forward(params, config, input_ids, token_type_ids, attention_mask), attention_mask, pooling)
    if normalize:
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    return e
