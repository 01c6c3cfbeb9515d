"""A BERT-style sentence encoder for CPU embedding inference on the native ops.

``SentenceEncoder.from_pretrained(model_dir)`` loads a BERT-family checkpoint
directory as it is published (Hugging Face / sentence-transformers layout)::

    model_dir/
      config.json                  BertConfig (hidden_size, num_attention_heads, ...)
      model.safetensors            weights (or model.safetensors.index.json + shards)
      tokenizer.json               a `tokenizers` tokenizer
      tokenizer_config.json        optional: model_max_length
      sentence_bert_config.json    optional: max_seq_length, do_lower_case
      modules.json                 optional: Transformer -> Pooling -> Normalize
      1_Pooling/config.json        optional: cls / mean / max / ... pooling

Nothing is downloaded. A missing or inconsistent file raises ``FileNotFoundError``
or :class:`CheckpointError` with a message that starts with the file's path.

The forward pass, per layer (x: (tokens, d_model), the batch's texts packed)::

    q, k, v = qkv_project_packed(x, [W_Q|W_K|W_V], [b_Q|b_K|b_V])  native, head-major
    ctx     = attention_varlen(q, k, v, cu_seqlens)                native, written token-major
    a       = LayerNorm(x + b_O + ctx·W_O)                         native GEMM with beta=1
    h       = GELU(a·W_1 + b_1)                                    native GEMM, GELU in its store
    x       = LayerNorm(a + b_2 + h·W_2)                           native GEMM with beta=1

Every weight is packed once at load (:func:`qkv_native.pack_weight`): no call
repacks it, and a batch of a few tokens streams each weight once from memory.

Note [Packed batches]
---------------------
Texts are tokenized a chunk at a time, sorted by token count (longest first) and
cut into batches; a batch's texts are concatenated token after token (no
padding at all) with ``cu_seqlens`` marking where each starts, so every GEMM runs
over exactly the batch's tokens and attention keeps each text to itself
(:func:`qkv_native.attention_varlen`). A text's embedding therefore does not
depend on the batch it is in. Sorting keeps the batches' sizes similar.

Note [Workspace]
----------------
Every activation lives in a :class:`_Workspace` buffer that is reused by the
next batch: the buffers grow to the largest batch seen (at most
``batch_size x max_seq_length`` tokens) and never with the number of texts.
So that threads sharing one encoder (a server's) do not overwrite each other's
batches, its calls take turns (a lock); to encode in parallel, give each thread
its own copy (``copy.deepcopy``; the ops themselves use every core). Buffers start
on a 64-byte cache line: with the packed (tokens, heads, d_head) attention output
16 bytes off a line, threads working on neighbouring heads wrote the same lines
(one process, taking turns, Zen 5, 2 threads: a batch's attention 228 -> 201 us).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core
from .functional import PackedWeight, _check_int, _check_self_overlap, _flag, pack_weights
from .functional import layer_norm as _native_layer_norm

__all__ = [
    "SentenceEncoder",
    "BertConfig",
    "CheckpointError",
    "POOLING_MODES",
    "bert_tensor_shapes",
    "load_state_dict",
    "layer_norm",
]

#: Pooling modes, with sentence-transformers' names; several are concatenated in the order given.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")

# sentence-transformers' legacy boolean keys of 1_Pooling/config.json, in its concatenation order.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


class CheckpointError(ValueError):
    """A checkpoint file is unreadable or disagrees with another; the message names the file."""


# ----------------------------------------------------------------------------
# LayerNorm on the native kernel, in place in the workspace
# ----------------------------------------------------------------------------


def layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float,
               out: Optional[np.ndarray] = None) -> np.ndarray:
    """LayerNorm over the last axis, float32: (x - mean) / sqrt(var + eps) * gamma + beta.

    x: (..., d) C-contiguous float32; gamma, beta: (d,). ``out`` (same shape) may be ``x``.
    """
    return _native_layer_norm(x, gamma, beta, eps, out=out)[0]


# ----------------------------------------------------------------------------
# checkpoint files
# ----------------------------------------------------------------------------


def _read_json(path: Path, what: str, kind=dict):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found ({what})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, kind):
        raise CheckpointError(f"{path}: expected a JSON {kind.__name__}, got {type(data).__name__}")
    return data


@dataclass(frozen=True)
class BertConfig:
    """The fields of a BERT ``config.json`` the forward pass needs."""

    vocab_size: int
    hidden_size: int  # d_model
    num_hidden_layers: int
    num_attention_heads: int  # num_heads
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @property
    def d_head(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict, path: Union[str, Path] = "config.json") -> "BertConfig":
        """Validate a parsed config.json; every problem names ``path``."""
        model_type = d.get("model_type", "bert")
        if model_type != "bert":
            raise CheckpointError(f"{path}: model_type {model_type!r} is not supported (only 'bert' models)")
        if d.get("is_decoder", False):
            raise CheckpointError(f"{path}: is_decoder=true is not supported (encoder models only)")
        pos_type = d.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise CheckpointError(
                f"{path}: position_embedding_type {pos_type!r} is not supported (only 'absolute')")
        act = d.get("hidden_act", "gelu")
        if act != "gelu":
            raise CheckpointError(f"{path}: hidden_act {act!r} is not supported (only 'gelu', the exact erf GELU)")
        fields = {}
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            if name not in d:
                if name == "type_vocab_size":
                    continue
                raise CheckpointError(f"{path}: missing the field {name!r}")
            v = d[name]
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "type_vocab_size" else 1):
                raise CheckpointError(f"{path}: {name} must be a positive integer, got {v!r}")
            fields[name] = v
        eps = d.get("layer_norm_eps", 1e-12)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1e30:  # (an int past floats)
            raise CheckpointError(f"{path}: layer_norm_eps must be a positive number below 1e30, got {repr(eps)[:40]}")
        cfg = cls(layer_norm_eps=float(eps), hidden_act=act, **fields)
        if cfg.hidden_size % cfg.num_attention_heads:
            raise CheckpointError(
                f"{path}: hidden_size={cfg.hidden_size} is not a multiple of "
                f"num_attention_heads={cfg.num_attention_heads}")
        return cfg


def _special_tokens(tokenizer) -> int:
    """How many special tokens the tokenizer adds to one text ([CLS] ... [SEP]: 2)."""
    post = tokenizer.post_processor
    return post.num_special_tokens_to_add(False) if post is not None else 0


def bert_tensor_shapes(config: BertConfig) -> Dict[str, Tuple[int, ...]]:
    """The tensors of a BertModel, by their canonical (unprefixed) names, with their shapes.

    Linear weights are stored (out_features, in_features), as torch.nn.Linear keeps them.
    """
    d, i = config.hidden_size, config.intermediate_size
    shapes = {
        "embeddings.word_embeddings.weight": (config.vocab_size, d),
        "embeddings.position_embeddings.weight": (config.max_position_embeddings, d),
        "embeddings.LayerNorm.weight": (d,),
        "embeddings.LayerNorm.bias": (d,),
    }
    if config.type_vocab_size > 0:
        shapes["embeddings.token_type_embeddings.weight"] = (config.type_vocab_size, d)
    for n in range(config.num_hidden_layers):
        p = f"encoder.layer.{n}."
        for name in ("query", "key", "value"):
            shapes[p + f"attention.self.{name}.weight"] = (d, d)
            shapes[p + f"attention.self.{name}.bias"] = (d,)
        shapes[p + "attention.output.dense.weight"] = (d, d)
        shapes[p + "attention.output.dense.bias"] = (d,)
        shapes[p + "attention.output.LayerNorm.weight"] = (d,)
        shapes[p + "attention.output.LayerNorm.bias"] = (d,)
        shapes[p + "intermediate.dense.weight"] = (i, d)
        shapes[p + "intermediate.dense.bias"] = (i,)
        shapes[p + "output.dense.weight"] = (d, i)
        shapes[p + "output.dense.bias"] = (d,)
        shapes[p + "output.LayerNorm.weight"] = (d,)
        shapes[p + "output.LayerNorm.bias"] = (d,)
    return shapes


def _stored_names(canonical: str, prefix: str) -> List[str]:
    """The names a canonical tensor is found under: ``bert.`` prefixes, LayerNorm ``gamma``/``beta``."""
    names = [prefix + canonical]
    if ".LayerNorm." in canonical:
        if canonical.endswith(".weight"):
            names.append(prefix + canonical[: -len("weight")] + "gamma")
        elif canonical.endswith(".bias"):
            names.append(prefix + canonical[: -len("bias")] + "beta")
    return names


class _SafetensorsFile:
    """One .safetensors file: read with the ``safetensors`` NumPy API; float32 tensors memory-mapped.

    The header (8-byte length + JSON: name -> dtype, shape, data_offsets) gives each
    tensor's place in the file, so a float32 tensor is an ``np.memmap`` view that
    costs no read until used (the 47 MB word-embedding table is only gathered from).
    """

    _DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}

    def __init__(self, path: Path):
        try:
            from safetensors import safe_open
        except ImportError as e:  # pragma: no cover - the embed extra installs it
            raise ImportError("reading model.safetensors needs the 'safetensors' package "
                              "(pip install 'qkv_native[embed]')") from e
        self.path = path
        try:
            self._file = safe_open(str(path), framework="np")
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                self._header = json.loads(f.read(n))
            self._data_start = 8 + n
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        self.keys = set(self._file.keys())

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._file.get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32: a read-only memory map when stored as F32, else a converted copy."""
        dtype = self._file.get_slice(name).get_dtype()
        if dtype not in self._DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {dtype}; "
                                  f"supported are {sorted(self._DTYPES)}")
        if dtype == "F32":
            begin, end = self._header[name]["data_offsets"]
            offset = self._data_start + begin
            shape = self.shape(name)
            if offset % 4 == 0 and end - begin == 4 * math.prod(shape) and end > begin:
                return np.memmap(self.path, dtype="<f4", mode="r", offset=offset, shape=shape)
        return np.ascontiguousarray(self._file.get_tensor(name), dtype=np.float32)


def _open_weights(model_dir: Path) -> Dict[str, "_SafetensorsFile"]:
    """name -> file holding it, for model.safetensors or a sharded model.safetensors.index.json."""
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if single.is_file():
        f = _SafetensorsFile(single)
        return {k: f for k in f.keys}
    if index.is_file():
        weight_map = _read_json(index, "the index of a sharded checkpoint").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: missing the object 'weight_map'")
        files: Dict[str, _SafetensorsFile] = {}
        out = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or not shard:
                raise CheckpointError(f"{index}: weight_map[{name!r}] must be a file name, got {shard!r}")
            if shard not in files:
                shard_path = model_dir / shard
                if not shard_path.is_file():
                    raise FileNotFoundError(f"{shard_path}: file not found (a shard listed in {index})")
                files[shard] = _SafetensorsFile(shard_path)
            if name not in files[shard].keys:
                raise CheckpointError(f"{files[shard].path}: tensor {name!r} is missing (listed in {index})")
            out[name] = files[shard]
        return out
    others = [p.name for p in (model_dir / "pytorch_model.bin", model_dir / "tf_model.h5") if p.is_file()]
    hint = f" (found {', '.join(others)}: convert it to safetensors)" if others else ""
    raise FileNotFoundError(f"{single}: file not found (the model weights){hint}")


def load_state_dict(model_dir: Union[str, Path], config: BertConfig) -> Dict[str, np.ndarray]:
    """The BertModel tensors of a checkpoint directory, under canonical names, as float32.

    Accepts the naming variants found in published checkpoints: a ``bert.`` (or any
    other) prefix before ``embeddings.``/``encoder.``, and LayerNorm ``gamma``/``beta``
    for ``weight``/``bias``. Other tensors (pooler, MLM heads, position_ids) are
    ignored. F32 tensors are memory-mapped (read-only), F16/F64 converted.
    Raises :class:`CheckpointError` naming the file for a missing tensor, a shape
    that disagrees with config.json, or more encoder layers than config.json has.
    """
    model_dir = Path(model_dir)
    where = _open_weights(model_dir)
    anchor = "embeddings.word_embeddings.weight"
    prefixes = sorted({k[: -len(anchor)] for k in where if k.endswith(anchor)}, key=lambda p: (len(p), p))
    some_file = next(iter(where.values())).path if where else model_dir / "model.safetensors"
    if not prefixes:
        raise CheckpointError(f"{some_file}: no tensor named '[prefix]{anchor}' (is this a BERT checkpoint?)")
    if len(prefixes) > 1 and len(prefixes[1]) == len(prefixes[0]):  # (a longer one: a head's copy, ignored)
        raise CheckpointError(f"{some_file}: several models in one checkpoint, under the prefixes "
                              f"{[p for p in prefixes if len(p) == len(prefixes[0])]}")
    prefix = prefixes[0]
    cfg_path = model_dir / "config.json"
    layer_re = re.compile(re.escape(prefix) + r"encoder\.layer\.(\d+)\.")
    layers = {int(m.group(1)) for k in where if (m := layer_re.match(k))}
    if layers and max(layers) >= config.num_hidden_layers:
        raise CheckpointError(
            f"{some_file}: has encoder layers 0..{max(layers)} but {cfg_path} says "
            f"num_hidden_layers={config.num_hidden_layers}")
    if len(layers) < config.num_hidden_layers:  # (before listing the tensors of every layer config.json names)
        missing = next(n for n in range(config.num_hidden_layers) if n not in layers)
        raise CheckpointError(f"{some_file}: tensor {prefix}encoder.layer.{missing}.* is missing "
                              f"({cfg_path} says num_hidden_layers={config.num_hidden_layers})")
    out = {}
    for name, shape in bert_tensor_shapes(config).items():
        stored = next((n for n in _stored_names(name, prefix) if n in where), None)
        if stored is None:
            raise CheckpointError(f"{some_file}: tensor {prefix + name!r} is missing "
                                  f"(a BertModel with the sizes of {cfg_path} needs it)")
        f = where[stored]
        got = f.shape(stored)
        if got != shape:
            raise CheckpointError(f"{f.path}: tensor {stored!r} has shape {got}, "
                                  f"but {cfg_path} implies {shape}")
        out[name] = f.get(stored)
    return out


@dataclass(frozen=True)
class _Layer:
    """One encoder layer's weights, packed once at load (PackedWeight: (in, out))."""

    w_qkv: PackedWeight  # (d_model, 3·d_model) = [W_Q | W_K | W_V]
    b_qkv: np.ndarray  # (3·d_model,)
    w_o: PackedWeight  # (d_model, d_model)
    b_o: np.ndarray  # (d_model,)
    ln1_gamma: np.ndarray
    ln1_beta: np.ndarray
    w_1: PackedWeight  # (d_model, intermediate)
    b_1: np.ndarray  # (intermediate,)
    w_2: PackedWeight  # (intermediate, d_model)
    b_2: np.ndarray  # (d_model,)
    ln2_gamma: np.ndarray
    ln2_beta: np.ndarray

    #: The packed weights of a layer, with the checkpoint names they come from (torch's (out, in)).
    _WEIGHTS = (("w_qkv", tuple(f"attention.self.{m}.weight" for m in ("query", "key", "value"))),
                ("w_o", ("attention.output.dense.weight",)),
                ("w_1", ("intermediate.dense.weight",)),
                ("w_2", ("output.dense.weight",)))

    @classmethod
    def pack_all(cls, sd: Dict[str, np.ndarray], num_layers: int) -> List["_Layer"]:
        """Every layer's weights packed together, into one allocation (Note [huge pages])."""
        def arrays(n):  # [W_Q; W_K; W_V] stacked as one (3·d_model, d_model), then W_O, W_1, W_2
            p = f"encoder.layer.{n}."
            return [np.concatenate([sd[p + name] for name in names], axis=0, dtype=np.float32) if len(names) > 1
                    else np.ascontiguousarray(sd[p + names[0]], dtype=np.float32)  # read in place when it can
                    for _, names in cls._WEIGHTS]

        packed = pack_weights([w for n in range(num_layers) for w in arrays(n)], trans=True)
        per = len(cls._WEIGHTS)
        return [cls._with(sd, n, dict(zip((f for f, _ in cls._WEIGHTS), packed[n * per:(n + 1) * per])))
                for n in range(num_layers)]

    @classmethod
    def _with(cls, sd: Dict[str, np.ndarray], n: int, weights: Dict[str, PackedWeight]) -> "_Layer":
        p = f"encoder.layer.{n}."

        def v(name):
            return np.array(sd[p + name], dtype=np.float32)

        att = "attention.self."
        return cls(
            **weights,
            b_qkv=np.concatenate([v(att + m + ".bias") for m in ("query", "key", "value")]),
            b_o=v("attention.output.dense.bias"),
            ln1_gamma=v("attention.output.LayerNorm.weight"), ln1_beta=v("attention.output.LayerNorm.bias"),
            b_1=v("intermediate.dense.bias"), b_2=v("output.dense.bias"),
            ln2_gamma=v("output.LayerNorm.weight"), ln2_beta=v("output.LayerNorm.bias"),
        )


class _Workspace:
    """Named scratch buffers reused by every batch (Note [Workspace]).

    ``take(name, shape)`` returns a C-contiguous view of the first prod(shape)
    elements of the buffer ``name`` (starting on a 64-byte boundary), reallocating
    only when it is too small.
    """

    ALIGN = 64

    def __init__(self):
        self._bufs: Dict[Tuple[str, np.dtype], np.ndarray] = {}

    def take(self, name: str, shape: Tuple[int, ...], dtype=np.float32) -> np.ndarray:
        n = math.prod(shape)
        dtype = np.dtype(dtype)
        key = (name, dtype)
        buf = self._bufs.get(key)
        if buf is None or buf.size < n:
            raw = np.empty(max(n, 1) * dtype.itemsize + self.ALIGN, np.uint8)
            off = -raw.ctypes.data % self.ALIGN
            buf = raw[off:off + max(n, 1) * dtype.itemsize].view(dtype)
            self._bufs[key] = buf
        return buf[:n].reshape(shape)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._bufs.values())


class _Progress:
    """A progress bar on stderr: tqdm when installed, else one self-rewriting line."""

    def __init__(self, total: int, enabled: bool, desc: str = "encode"):
        self.total, self.done, self.enabled, self._bar = total, 0, enabled, None
        if enabled:
            try:
                from tqdm.auto import tqdm
                self._bar = tqdm(total=total, desc=desc, unit="text")
            except ImportError:
                self._desc = desc

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled:
            pct = 100.0 * self.done / self.total if self.total else 100.0
            sys.stderr.write(f"\r{self._desc}: {self.done}/{self.total} texts ({pct:.0f}%)")
            sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


# ----------------------------------------------------------------------------
# the encoder
# ----------------------------------------------------------------------------


def _module_kind(entry, path: Path) -> str:
    if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
        raise CheckpointError(f"{path}: each module must be an object with a 'type', got {entry!r}")
    return entry["type"].rsplit(".", 1)[-1]


def _pooling_modes(pool_cfg: dict, path: Path, hidden_size: int) -> Tuple[str, ...]:
    dim = pool_cfg.get("word_embedding_dimension", pool_cfg.get("embedding_dimension", hidden_size))
    if dim != hidden_size:
        raise CheckpointError(f"{path}: word_embedding_dimension={dim} but config.json has hidden_size={hidden_size}")
    if "pooling_mode" in pool_cfg:  # sentence-transformers >= 6
        mode = pool_cfg["pooling_mode"]
        modes = (mode,) if isinstance(mode, str) else tuple(mode) if isinstance(mode, list) else None
        if not modes:
            raise CheckpointError(f"{path}: pooling_mode must be a string or a list of strings, got {mode!r}")
    else:
        modes = tuple(m for key, m in _LEGACY_POOLING_KEYS.items() if pool_cfg.get(key, False)) or ("mean",)
    for m in modes:
        if m not in POOLING_MODES:
            raise CheckpointError(f"{path}: unknown pooling mode {m!r} (supported: {', '.join(POOLING_MODES)})")
    return modes


# Every encoder, so that a child fork()ed while another thread held an encoder's lock (a
# call in progress there) gets it unlocked: the thread holding it does not exist in the child.
_ENCODERS: "weakref.WeakSet[SentenceEncoder]" = weakref.WeakSet()


def _unlock_encoders_in_child() -> None:
    for enc in list(_ENCODERS):
        enc._lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_unlock_encoders_in_child)


class SentenceEncoder:
    """Sentence embeddings from a BERT checkpoint, computed with the native ops.

    Build one with :meth:`from_pretrained`; call :meth:`encode`. Threads sharing one
    encoder take turns (Note [Workspace]).
    """

    def __init__(self, config: BertConfig, state_dict: Dict[str, np.ndarray], tokenizer, *,
                 max_seq_length: int, pooling: Sequence[str] = ("mean",), normalize_module: bool = False,
                 tokenizer_path: Union[str, Path] = "tokenizer.json"):
        """Low-level constructor: prefer :meth:`from_pretrained`.

        state_dict: canonical names (see :func:`bert_tensor_shapes`); tokenizer: a
        ``tokenizers.Tokenizer`` (its padding is turned off and its truncation set
        to ``max_seq_length``).
        """
        self.pooling = pooling  # (checked)
        self.config = config
        self.normalize_module = bool(normalize_module)
        self.tokenizer = tokenizer
        self._tokenizer_path = str(tokenizer_path)
        self.max_seq_length = max_seq_length  # (checked; turns the tokenizer's padding off, sets its truncation)
        # Embedding tables stay memory-mapped: only the rows of the batch's tokens are read.
        self._word_emb = state_dict["embeddings.word_embeddings.weight"]  # (vocab_size, d_model)
        self._pos_emb = np.array(state_dict["embeddings.position_embeddings.weight"],
                                 dtype=np.float32)  # (max_position_embeddings, d_model)
        self._type_emb = (np.array(state_dict["embeddings.token_type_embeddings.weight"], dtype=np.float32)
                          if config.type_vocab_size > 0 else None)  # (type_vocab_size, d_model)
        self._emb_ln = (np.array(state_dict["embeddings.LayerNorm.weight"], dtype=np.float32),
                        np.array(state_dict["embeddings.LayerNorm.bias"], dtype=np.float32))
        self._layers = _Layer.pack_all(state_dict, config.num_hidden_layers)
        self._ws = _Workspace()
        self._lock = threading.RLock()  # (held while a call uses the workspace; a call from its progress may nest)
        _ENCODERS.add(self)

    def __getstate__(self) -> dict:  # a copy gets its own lock and workspace
        state = dict(self.__dict__)
        del state["_lock"], state["_ws"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._ws = _Workspace()
        self._lock = threading.RLock()
        _ENCODERS.add(self)

    @property
    def pooling(self) -> Tuple[str, ...]:
        """Pooling modes (:data:`POOLING_MODES`), concatenated in this order. Settable: a sequence
        of mode names, checked (a str is not one: it would be a mode per letter)."""
        return self._pooling

    @pooling.setter
    def pooling(self, value: Sequence[str]) -> None:
        if isinstance(value, str) or not isinstance(value, Iterable):
            raise TypeError(f"pooling must be a sequence of mode names, got {value!r}")
        value = tuple(value)
        if not value:
            raise ValueError(f"pooling must name at least one mode (from: {', '.join(POOLING_MODES)})")
        for m in value:
            if not isinstance(m, str) or m not in POOLING_MODES:
                raise ValueError(f"unknown pooling mode {m!r} (supported: {', '.join(POOLING_MODES)})")
        self._pooling = value

    @property
    def max_seq_length(self) -> int:
        """Texts are truncated to this many tokens, special tokens included (as sentence-transformers
        truncates). Settable like sentence-transformers' ``model.max_seq_length = 128``: an integer
        from the tokenizer's special tokens to ``max_position_embeddings``."""
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        value = _check_int(value, "max_seq_length", type_error=True)  # (2.5 was cut to 2)
        if not 1 <= value <= self.config.max_position_embeddings:
            raise ValueError(f"max_seq_length must lie in [1, max_position_embeddings="
                             f"{self.config.max_position_embeddings}], got {value}")
        # tokenizers cannot cut below the special tokens ([CLS] ... [SEP]) and then
        # leaves a text whole: longer than max_seq_length
        n_special = _special_tokens(self.tokenizer)
        if value < n_special:
            raise ValueError(f"max_seq_length must be at least the tokenizer's {n_special} special tokens, "
                             f"got {value}")
        self._max_seq_length = value
        self._truncation = None  # (set again below)
        self._own_settings()

    # -- loading ------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model_dir: Union[str, Path], *, max_seq_length: Optional[int] = None,
                        pooling: Union[None, str, Sequence[str]] = None) -> "SentenceEncoder":
        """Load a checkpoint directory (see the module docstring for its files).

        max_seq_length: overrides sentence_bert_config.json / tokenizer_config.json
        (default: those, else max_position_embeddings). pooling: overrides
        1_Pooling/config.json (one mode name or several, concatenated).
        """
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - the embed extra installs it
            raise ImportError("SentenceEncoder needs the 'tokenizers' package "
                              "(pip install 'qkv_native[embed]')") from e
        root = Path(model_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: not a directory (expected a model directory with config.json, "
                                    "model.safetensors and tokenizer.json)")
        tdir, pool_path, normalize_module = root, None, False
        modules_path = root / "modules.json"
        if modules_path.is_file():
            modules = _read_json(modules_path, "sentence-transformers modules", kind=list)
            kinds = [_module_kind(m, modules_path) for m in modules]
            unsupported = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
            if unsupported:
                raise CheckpointError(f"{modules_path}: module type(s) {unsupported} are not supported "
                                      "(only Transformer, Pooling, Normalize)")
            order = {"Transformer": 0, "Pooling": 1, "Normalize": 2}
            if kinds[:1] != ["Transformer"] or sorted(kinds, key=order.get) != kinds or len(set(kinds)) != len(kinds):
                raise CheckpointError(f"{modules_path}: expected the modules Transformer, [Pooling], "
                                      f"[Normalize] in that order, got {kinds}")
            for m, kind in zip(modules, kinds):
                sub = root / str(m.get("path", ""))
                if kind == "Transformer":
                    tdir = sub
                elif kind == "Pooling":
                    pool_path = sub / "config.json"
                else:
                    normalize_module = True
        config_path = tdir / "config.json"
        config = BertConfig.from_dict(_read_json(config_path, "the model configuration"), config_path)
        state_dict = load_state_dict(tdir, config)

        tok_path = tdir / "tokenizer.json"
        if not tok_path.is_file():
            hint = " (only vocab.txt was found: save the tokenizer as tokenizer.json)" \
                if (tdir / "vocab.txt").is_file() else ""
            raise FileNotFoundError(f"{tok_path}: file not found (the tokenizer){hint}")
        try:
            tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise CheckpointError(f"{tok_path}: not a readable tokenizers file ({e})") from None
        top_id = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
        if top_id >= config.vocab_size:
            raise CheckpointError(f"{tok_path}: the tokenizer has token ids up to {top_id} "
                                  f"but {config_path} has vocab_size={config.vocab_size}")

        st_cfg_path = tdir / "sentence_bert_config.json"
        st_cfg = _read_json(st_cfg_path, "") if st_cfg_path.is_file() else {}
        if st_cfg.get("do_lower_case", False):
            from tokenizers import normalizers
            current = tokenizer.normalizer
            tokenizer.normalizer = (normalizers.Sequence([normalizers.Lowercase(), current])
                                    if current is not None else normalizers.Lowercase())
        if max_seq_length is None:
            max_seq_length, source = cls._default_max_seq_length(tdir, config, st_cfg, st_cfg_path)
            if not 1 <= max_seq_length <= config.max_position_embeddings:
                raise CheckpointError(f"{source}: max length {max_seq_length} is outside [1, "
                                      f"max_position_embeddings={config.max_position_embeddings}] of {config_path}")
            n_special = _special_tokens(tokenizer)
            if max_seq_length < n_special:  # (the constructor would name the argument, not the file)
                raise CheckpointError(f"{source}: max length {max_seq_length} is below the "
                                      f"{n_special} special tokens of {tok_path}")

        if pooling is not None:
            modes = (pooling,) if isinstance(pooling, str) else pooling  # (checked by the constructor)
        elif pool_path is not None:
            modes = _pooling_modes(_read_json(pool_path, "the pooling configuration"), pool_path,
                                   config.hidden_size)
        else:
            modes = ("mean",)
        return cls(config, state_dict, tokenizer, max_seq_length=max_seq_length, pooling=modes,
                   normalize_module=normalize_module, tokenizer_path=tok_path)

    @staticmethod
    def _default_max_seq_length(tdir: Path, config: BertConfig, st_cfg: dict, st_cfg_path: Path):
        """sentence_bert_config.json's max_seq_length, else tokenizer_config.json's
        model_max_length capped at max_position_embeddings, else max_position_embeddings."""
        if st_cfg.get("max_seq_length") is not None:
            v = st_cfg["max_seq_length"]
            if isinstance(v, bool) or not isinstance(v, int):
                raise CheckpointError(f"{st_cfg_path}: max_seq_length must be an integer, got {v!r}")
            return v, st_cfg_path
        tc_path = tdir / "tokenizer_config.json"
        if tc_path.is_file():
            v = _read_json(tc_path, "").get("model_max_length")
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return min(v, config.max_position_embeddings), tc_path
        return config.max_position_embeddings, tdir / "config.json"

    # -- encoding -----------------------------------------------------------

    @property
    def embedding_dim(self) -> int:
        """Width of an embedding: hidden_size times the number of pooling modes."""
        return self.config.hidden_size * len(self.pooling)

    def tokenize(self, texts: Iterable[str]) -> list:
        """``tokenizers.Encoding`` per text: special tokens added, truncated to max_seq_length.

        Under a one-thread limit (:func:`qkv_native.set_num_threads`, threadpoolctl,
        OMP_NUM_THREADS), and for fewer than 8 texts, texts are tokenized one by one in
        this thread: the ``tokenizers`` package's batch call would use its own pool of
        all the cores, which for a few texts costs more than it saves (one text, Zen 5:
        30 us batched, 21 us alone) and, on a machine whose cores our threads keep
        busy, waits for them. Raises ``TypeError`` for a lone str (it is not tokenized
        character by character) and the errors of :meth:`encode` for a text.
        """
        return self._tokenize(self._text_list(texts, single_hint="pass [text] for a single text"))

    def _own_settings(self) -> None:
        """Padding off, truncation at max_seq_length: set again when the tokenizer, the caller's
        object, was changed elsewhere (another encoder built on it, padding turned on)."""
        tok = self.tokenizer
        if tok.padding is not None or tok.truncation != self._truncation:
            tok.no_padding()
            tok.enable_truncation(max_length=self._max_seq_length)
            self._truncation = tok.truncation

    def _tokenize(self, texts: List[str]) -> list:
        """tokenize with its argument checked."""
        self._own_settings()  # (a read unless they changed: ~0.3 us)
        if _core.get_num_threads() == 1 or len(texts) < 8:
            encs = [self.tokenizer.encode(t, add_special_tokens=True) for t in texts]
        else:
            encs = self.tokenizer.encode_batch(texts, add_special_tokens=True)
        for e in encs:  # (the position table holds max_seq_length rows)
            if len(e.ids) > self.max_seq_length:
                raise ValueError(f"the tokenizer returned {len(e.ids)} tokens for a text, more than "
                                 f"max_seq_length={self.max_seq_length} (is its truncation overridden?)")
        return encs

    def encode(self, texts: Union[str, Iterable[str]], batch_size: int = 32, normalize: bool = True,
               show_progress_bar: bool = False) -> np.ndarray:
        """Embed ``texts``: float32 (n, embedding_dim), row i for texts[i].

        A single string gives one (embedding_dim,) vector. ``normalize`` L2-normalises
        each embedding; with ``normalize=False`` the result is the model's output as
        sentence-transformers computes it (still unit length when modules.json lists
        a Normalize module). A text is truncated to :attr:`max_seq_length` tokens. Texts are
        sorted by length and packed into batches without padding (Note [Packed batches]);
        the result does not depend on ``batch_size``.
        Raises ``TypeError`` for a text that is not a str (bytes included) and
        ``ValueError`` for one that is not valid Unicode (a lone surrogate).
        """
        single = isinstance(texts, str)
        texts = self._text_list(texts)
        batch_size = self._check_args(batch_size, normalize)
        out = np.empty((len(texts), self.embedding_dim), np.float32)
        progress = _Progress(len(texts), bool(show_progress_bar))
        try:
            self._encode_into(texts, out, batch_size, normalize, progress)
        finally:
            progress.close()
        return out[0] if single else out

    @property
    def chunk_size(self) -> int:
        """Texts tokenized, sorted and batched together (bounds the memory of token ids)."""
        return self._chunk_size

    @chunk_size.setter
    def chunk_size(self, value: int) -> None:
        self._chunk_size = _check_int(value, "chunk_size")

    _chunk_size = 8192

    def encode_into(self, texts: Iterable[str], out: np.ndarray, *, batch_size: int = 32,
                    normalize: bool = True, progress: Optional[_Progress] = None) -> np.ndarray:
        """:meth:`encode` writing into ``out`` (len(texts), embedding_dim) float32, e.g. a memory map."""
        texts = self._text_list(texts, single_hint="use encode for a single text")
        batch_size = self._check_args(batch_size, normalize)
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out must be a float32 NumPy array of shape ({len(texts)}, {self.embedding_dim}), "
                            f"got {type(out).__name__}")
        if out.shape != (len(texts), self.embedding_dim) or out.dtype != np.float32:
            raise ValueError(f"out must be float32 of shape ({len(texts)}, {self.embedding_dim}), "
                             f"got {out.dtype} {out.shape}")
        if not out.flags.writeable:
            raise ValueError("out is read-only")
        _check_self_overlap(out, "out")  # (rows as_strided onto one another got each other's embeddings)
        return self._encode_into(texts, out, batch_size, normalize, progress)

    @staticmethod
    def _check_args(batch_size, normalize) -> int:
        """Check encode's options (before any work); returns batch_size as an int."""
        batch_size = _check_int(batch_size, "batch_size")
        _flag(normalize, "normalize")
        return batch_size

    @staticmethod
    def _text_list(texts, single_hint: Optional[str] = None) -> List[str]:
        """``texts`` (a str, or an iterable of str) as a list of valid str, checked before any work:
        a lone str is ``[texts]``, or a TypeError saying ``single_hint`` where one is given."""
        if isinstance(texts, str):
            if single_hint is None:
                return [texts]
            raise TypeError(f"texts must be an iterable of str, got str ({single_hint})")
        if isinstance(texts, (bytes, bytearray, memoryview)):
            raise TypeError(f"texts must be a str or an iterable of str, got {type(texts).__name__} "
                            "(decode it first)")
        try:
            texts = list(texts)
        except TypeError:
            raise TypeError(f"texts must be a str or an iterable of str, got {type(texts).__name__}") from None
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
            if not t.isascii():
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError as e:  # what the tokenizer cannot take
                    raise ValueError(f"texts[{i}] is not valid Unicode: it holds a lone surrogate "
                                     f"(U+{ord(t[e.start]):04X} at index {e.start})") from None
        return texts

    def _encode_into(self, texts: Sequence[str], out: np.ndarray, batch_size: int, normalize: bool,
                     progress: Optional[_Progress]) -> np.ndarray:
        """encode_into with its arguments checked."""
        with self._lock:  # Note [Workspace]
            return self._encode_into_locked(texts, out, batch_size, bool(normalize), progress)

    def _encode_into_locked(self, texts: Sequence[str], out: np.ndarray, batch_size: int, normalize: bool,
                            progress: Optional[_Progress]) -> np.ndarray:
        chunk_size = self.chunk_size
        for c0 in range(0, len(texts), chunk_size):
            chunk = self._tokenize(texts[c0:c0 + chunk_size])
            lengths = np.fromiter((len(e.ids) for e in chunk), np.int64, len(chunk))
            order = np.argsort(-lengths, kind="stable")  # longest first: the workspace grows once
            for b0 in range(0, len(chunk), batch_size):
                rows = order[b0:b0 + batch_size]
                pooled = self._embed_batch([chunk[r] for r in rows], lengths[rows], normalize)
                out[c0 + rows] = pooled
                if progress is not None:
                    progress.update(len(rows))
        return out

    def _embed_batch(self, encodings: list, lengths: np.ndarray, normalize: bool) -> np.ndarray:
        """Pooled (and maybe normalised) embeddings of one batch: (batch, embedding_dim) workspace view."""
        B, T = len(encodings), int(lengths.sum())
        cu = self._ws.take("cu", (B + 1,), np.int64)  # sequence b is tokens cu[b]:cu[b+1]
        cu[0] = 0
        np.cumsum(lengths, out=cu[1:])
        ids = self._ws.take("ids", (T,), np.int64)
        types = self._ws.take("types", (T,), np.int64)
        pos = self._ws.take("pos", (T,), np.int64)
        for e, a, b in zip(encodings, cu[:-1].tolist(), cu[1:].tolist()):
            ids[a:b] = e.ids
            types[a:b] = e.type_ids
        # position of each token within its text: t - cu[text of t]
        np.subtract(np.arange(T), np.repeat(cu[:-1], lengths), out=pos)
        if T and ids.max() >= self.config.vocab_size:
            raise ValueError(f"{self._tokenizer_path}: token id {ids.max()} is out of range "
                             f"for vocab_size={self.config.vocab_size}")
        if T and types.max() >= max(self.config.type_vocab_size, 1):
            raise ValueError(f"{self._tokenizer_path}: token type id {types.max()} is out of range "
                             f"for type_vocab_size={self.config.type_vocab_size}")
        h = self._forward(ids, types, pos, cu)
        pooled = self._pool(h, cu, lengths)
        if normalize or self.normalize_module:
            norm = np.sqrt(np.einsum("bd,bd->b", pooled, pooled))[:, None]
            np.maximum(norm, np.float32(1e-12), out=norm)
            pooled /= norm
        return pooled

    def _forward(self, ids: np.ndarray, types: np.ndarray, pos: np.ndarray, cu: np.ndarray) -> np.ndarray:
        """Token states of the last layer, (tokens, d_model), a workspace view.

        ids, types, pos: (tokens,) int64 of the packed texts (Note [Packed batches]);
        cu: (batch + 1,) offsets of the texts.
        """
        cfg, ws = self.config, self._ws
        d, H, dh, T = cfg.hidden_size, cfg.num_attention_heads, cfg.d_head, ids.size
        eps = cfg.layer_norm_eps
        x = ws.take("x", (T, d))  # layer input/output (and x + attention before the LayerNorm)
        a = ws.take("a", (T, d))  # the attention block's output (after its LayerNorm)
        qkv = ws.take("qkv", (3, 1, H, T, dh))  # head-major q, k, v
        ctx = ws.take("ctx", (T, H, dh))  # attention output, token-major
        inter = ws.take("inter", (T, cfg.intermediate_size))

        # embeddings: word + token type + position, then LayerNorm (BertEmbeddings' order)
        np.take(self._word_emb, ids, axis=0, out=x, mode="clip")  # ids checked < vocab_size
        if self._type_emb is not None:
            if types.any():
                np.take(self._type_emb, types, axis=0, out=a, mode="clip")
                x += a
            else:
                x += self._type_emb[0]
        np.take(self._pos_emb, pos, axis=0, out=a, mode="clip")  # pos < max_seq_length <= its rows
        x += a
        layer_norm(x, *self._emb_ln, eps, out=x)

        ctx2, x3 = ctx.reshape(T, d), x[None]
        q, k, v = qkv[0], qkv[1], qkv[2]
        # (tokens, heads, d_head) views of the head-major projections, as attention_varlen reads them
        qt, kt, vt = (t[0].transpose(1, 0, 2) for t in (q, k, v))
        scale = 1.0 / math.sqrt(dh)
        # The native core directly: every array here is built above with the right
        # dtype, shape and layout, so functional's per-call checks would only add
        # Python time to a latency-bound loop (the core still checks memory safety).
        for L in self._layers:
            _core.qkv_project_packed(x3, L.w_qkv, L.b_qkv, H, H, q, k, v)
            _core.attention_varlen(qt, kt, vt, cu, cu, False, scale, False, ctx)
            # the residual adds happen in the GEMMs' stores (beta = 1): x += ctx·W_O + b_O
            _core.linear(ctx2, L.w_o, L.b_o, "none", x, 1.0)
            _core.layer_norm(x, L.ln1_gamma, L.ln1_beta, eps, a)
            _core.linear(a, L.w_1, L.b_1, "gelu", inter)  # inter = GELU(a·W_1 + b_1)
            _core.linear(inter, L.w_2, L.b_2, "none", a, 1.0)  # a += inter·W_2 + b_2
            _core.layer_norm(a, L.ln2_gamma, L.ln2_beta, eps, x)
        return x

    def _pool(self, h: np.ndarray, cu: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Pool token states h (tokens, d_model) over each text's tokens cu[b]:cu[b+1].

        Returns (batch, len(pooling)·d_model), a workspace view, modes side by side;
        a text of no tokens pools to zeros.
        """
        T, d = h.shape
        B = lengths.size
        out = self._ws.take("pooled", (B, len(self.pooling) * d))
        nonempty = lengths > 0
        starts = cu[:-1][nonempty]  # reduceat needs non-empty segments
        count = lengths[nonempty].astype(np.float32)[:, None]  # (B', 1)
        for j, mode in enumerate(self.pooling):
            dst = out[:, j * d:(j + 1) * d]
            dst[~nonempty] = 0.0
            if not starts.size:
                continue
            if mode == "cls":
                dst[nonempty] = h[starts]
            elif mode == "lasttoken":
                dst[nonempty] = h[cu[1:][nonempty] - 1]
            elif mode == "max":
                dst[nonempty] = np.maximum.reduceat(h, starts, axis=0)
            elif mode == "weightedmean":  # weights 1, 2, ... by position in the text
                w = (np.arange(T) - np.repeat(cu[:-1], lengths) + 1).astype(np.float32)
                total = np.add.reduceat(h * w[:, None], starts, axis=0)
                dst[nonempty] = total / np.add.reduceat(w, starts)[:, None]
            else:
                total = np.add.reduceat(h, starts, axis=0)  # (B', d)
                dst[nonempty] = total / (count if mode == "mean" else np.sqrt(count))
        return out
