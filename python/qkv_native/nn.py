"""Layers with explicit forward/backward pairs, named parameters and gradients.

Every layer is a :class:`Module` with ``forward(x) -> y`` and ``backward(dy) -> dx``.
``forward`` keeps what ``backward`` needs (the cache of the *last* forward call);
``backward`` *accumulates* (``+=``) into each parameter's ``grad`` and returns the
gradient of the input. Gradients keep accumulating until :meth:`Module.zero_grad`.
``backward`` takes a float32 ``dy`` of exactly the shape of the last ``forward``'s
output (TypeError, ValueError otherwise; RuntimeError before any ``forward``).
The cache holds references, not copies, as torch's saved tensors do: an input changed
in place between ``forward`` and ``backward`` gives the gradient of the changed input
(torch raises there; :class:`qkv_native.train.Trainer` passes each batch as a fresh
array), and after a ``forward`` that raised, ``backward`` belongs to no forward call:
run ``forward`` again first.

Shapes use the project's names: ``batch``, ``seq`` (``seq_q``/``seq_k``),
``d_model``, ``num_heads``, ``num_kv_heads``, ``d_head``, ``d_ff``. Everything is
float32. Weights are stored ``(d_in, d_out)`` (y = x·W + b), the layout of
``qkv_native.matmul`` and ``qkv_project``; ``torch.nn.Linear.weight`` is the
transpose.

The hot paths run native: GEMMs go through :func:`qkv_native.matmul` and
:func:`qkv_native.linear` (bias in the GEMM's store); the Q/K/V projections are
one GEMM against [W_Q | W_K | W_V] whose token-major result attention
(:func:`qkv_native.attention`, flash style) reads through head-major strided
views; LayerNorm, GELU, dropout and softmax cross-entropy (loss and gradient in
one pass) have native kernels. The ``*_forward`` / ``*_backward`` pairs below
adapt them to the layers (only the tanh form of GELU is vectorised NumPy).

Initialisation is explicit and seeded: every layer with parameters takes
``init`` (a name from :data:`INITS`) and ``rng`` (an int seed or a
``numpy.random.Generator``; composite layers draw their children's seeds from
it in a fixed order).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import secrets
import stat
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from .functional import (
    attention,
    attention_backward,
    dropout,
    gelu,
    layer_norm,
    layer_norm_backward,
    linear,
    matmul,
    softmax_cross_entropy,
)
from .functional import _check_int, _flag, _real
from .functional import gelu_backward as gelu_backward_native

__all__ = [
    # the layer kernels' forward/backward pairs
    "layernorm_forward",
    "layernorm_backward",
    "gelu_forward",
    "gelu_backward",
    "softmax_cross_entropy",  # qkv_native.functional's, re-exported
    # infrastructure
    "Parameter",
    "Module",
    "Sequential",
    "INITS",
    "CheckpointError",
    "save_arrays",
    "load_arrays",
    # layers
    "Linear",
    "Embedding",
    "LearnedPositionalEmbedding",
    "SinusoidalPositionalEncoding",
    "LayerNorm",
    "GELU",
    "ReLU",
    "Dropout",
    "MultiHeadAttention",
    "FeedForward",
    "TransformerEncoderBlock",
    "MeanPool",
    "ClsToken",
    "ClsPool",
    # losses
    "CrossEntropyLoss",
    "MSELoss",
]

F32 = np.float32
RngLike = Union[int, np.random.Generator, None]


# ----------------------------------------------------------------------------
# The layer kernels: thin adapters of the native ops to the layers' caches.
# ----------------------------------------------------------------------------


def layernorm_forward(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float):
    """out = (x - mean) * rstd * weight + bias over the last axis (native).

    x: (N, C); weight, bias: (C,). Returns out (N, C), mean (N, 1), rstd (N, 1)
    (mean and rstd are the cache the backward needs).
    """
    out, mean, rstd = layer_norm(x, weight, bias, eps)
    return out, mean[..., None], rstd[..., None]


def layernorm_backward(
    dout: np.ndarray,
    x: np.ndarray,
    mean: np.ndarray,
    rstd: np.ndarray,
    weight: np.ndarray,
    dweight: np.ndarray,
    dbias: np.ndarray,
) -> np.ndarray:
    """Backward of :func:`layernorm_forward` (native); accumulates into dweight, dbias.

    dout, x: (N, C); mean, rstd: (N, 1); weight, dweight, dbias: (C,).
    Returns dx (N, C).
    """
    dx, dw, db = layer_norm_backward(dout, x, weight, mean[..., 0], rstd[..., 0])
    dweight += dw
    dbias += db
    return dx


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _approximate(approximate: str) -> str:
    """GELU's form: "none" (erf) or "tanh" (any other value ran the erf form)."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return approximate


def gelu_forward(x: np.ndarray, approximate: str = "none") -> np.ndarray:
    """GELU(x) = x * Phi(x) (``approximate="none"``, torch's default; native) or the tanh
    form 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (``"tanh"``, GPT-2). Any shape."""
    if _approximate(approximate) == "tanh":
        u = F32(_SQRT_2_OVER_PI) * (x + F32(0.044715) * x * x * x)
        return F32(0.5) * x * (F32(1.0) + np.tanh(u))
    return gelu(x)


def gelu_backward(dy: np.ndarray, x: np.ndarray, approximate: str = "none") -> np.ndarray:
    """Backward of :func:`gelu_forward`: dx = dy * GELU'(x) (native for the erf form). dy, x: same shape."""
    if _approximate(approximate) == "tanh":
        # forward: y = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3)
        u = F32(_SQRT_2_OVER_PI) * (x + F32(0.044715) * x * x * x)
        t = np.tanh(u)
        du = F32(_SQRT_2_OVER_PI) * (F32(1.0) + F32(3 * 0.044715) * x * x)
        return dy * (F32(0.5) * (F32(1.0) + t) + F32(0.5) * x * (F32(1.0) - t * t) * du)
    # forward: y = x * Phi(x)  ->  y' = Phi(x) + x * phi(x)
    return gelu_backward_native(x, dy)


# ----------------------------------------------------------------------------
# Parameters, modules, initialisation, checkpoint files
# ----------------------------------------------------------------------------


def _rng(rng: RngLike) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        rng = 0
    if isinstance(rng, bool) or not isinstance(rng, (int, np.integer)):
        raise TypeError(f"rng must be an int seed or a numpy.random.Generator, got {type(rng).__name__}")
    return np.random.default_rng(int(rng))


def _child_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**63 - 1))


def _init_xavier_uniform(rng, shape, fan_in, fan_out):
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, shape)


def _init_kaiming_uniform(rng, shape, fan_in, fan_out):
    # torch.nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, shape)


def _init_normal(rng, shape, fan_in, fan_out):
    return rng.normal(0.0, 0.02, shape)  # BERT/GPT-2


def _init_zeros(rng, shape, fan_in, fan_out):
    return np.zeros(shape)


#: Initialisation schemes by name: ``f(rng, shape, fan_in, fan_out) -> array``.
INITS: Dict[str, Callable] = {
    "xavier_uniform": _init_xavier_uniform,
    "kaiming_uniform": _init_kaiming_uniform,
    "normal": _init_normal,  # N(0, 0.02)
    "zeros": _init_zeros,
}


def _init(init: str, rng: np.random.Generator, shape, fan_in: int, fan_out: int) -> np.ndarray:
    if init not in INITS:
        raise ValueError(f"init must be one of {sorted(INITS)}, got {init!r}")
    return np.asarray(INITS[init](rng, shape, fan_in, fan_out), dtype=F32)


class Parameter:
    """A float32 array (``data``) and its gradient (``grad``, same shape, starts at 0).

    Optimizers update ``data`` in place, so layers may keep references to it.
    """

    __slots__ = ("data", "grad")

    def __init__(self, data: np.ndarray):
        self.data = np.ascontiguousarray(data, dtype=F32)
        self.grad = np.zeros_like(self.data)

    @property
    def shape(self) -> Tuple[int, ...]:
        return self.data.shape

    def __repr__(self) -> str:
        return f"Parameter(shape={self.data.shape})"


class Module:
    """Base of all layers: named parameters, children, train/eval mode, save/load.

    Assigning a :class:`Parameter` or a :class:`Module` to an attribute registers
    it under that name (assigning None or ``del`` unregisters it; anything else over a
    registered name is a TypeError); :meth:`named_parameters` lists them depth-first as
    dotted names (``"1.attn.w_q"``).
    """

    #: layers that take ``key_lengths`` in forward (Sequential passes it on)
    uses_key_lengths = False

    def __init__(self):
        object.__setattr__(self, "_params", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_out_shape", None)  # set by _output, checked by _check_dy

    def __setattr__(self, name, value):
        if "_params" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() first")
        params, modules = self._params, self._modules
        if isinstance(value, Parameter):
            modules.pop(name, None)
            params[name] = value
        elif isinstance(value, Module):
            params.pop(name, None)
            modules[name] = value
        elif name in params or name in modules:  # (the old one stayed registered: saved, counted, updated)
            what = "parameter" if name in params else "submodule"
            if value is not None:
                raise TypeError(f"{name} is a {what} of {type(self).__name__}: assign a "
                                f"{'Parameter' if what == 'parameter' else 'Module'} or None, got {type(value).__name__}")
            params.pop(name, None)
            modules.pop(name, None)
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        self._params.pop(name, None)
        self._modules.pop(name, None)
        object.__delattr__(self, name)

    # -- the layer interface -------------------------------------------------
    def forward(self, x, **kwargs):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def _output(self, y: np.ndarray) -> np.ndarray:
        """forward's last step: remember the shape of the output y (the shape backward's
        dy must have) and return y."""
        object.__setattr__(self, "_out_shape", y.shape)
        return y

    def _check_dy(self, dy) -> np.ndarray:
        """backward's first step: dy must be a float32 ndarray of the shape of the last
        forward's output (see :func:`_check_grad`). Returns dy, C-contiguous."""
        return _check_grad(dy, self._out_shape, self)

    # -- parameters ----------------------------------------------------------
    def named_parameters(self, prefix: str = "") -> Iterator[Tuple[str, Parameter]]:
        """(dotted name, Parameter) depth-first. A Parameter that several layers share (tied
        weights: ``b.weight = a.weight``; their backwards add into its one grad) is listed
        once, under its first name, so that optimizers, checkpoints and counts see it once."""
        seen = set()
        for path, m in _named_modules(self, prefix):
            for name, p in m._params.items():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield (path + "." if path else "") + name, p

    @property
    def grads(self) -> Dict[str, np.ndarray]:
        """The gradient arrays by parameter name (the live arrays, not copies)."""
        return {name: p.grad for name, p in self.named_parameters()}

    def parameters(self) -> List[Parameter]:
        return [p for _, p in self.named_parameters()]

    def modules(self) -> Iterator["Module"]:
        yield self
        for m in self._modules.values():
            yield from m.modules()

    def num_parameters(self) -> int:
        return sum(p.data.size for p in self.parameters())

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad.fill(0.0)

    def train(self, mode: bool = True) -> "Module":
        mode = _flag(mode, "mode")
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    # -- state ---------------------------------------------------------------
    def state_dict(self) -> Dict[str, np.ndarray]:
        """Copies of all parameters by name."""
        return {name: p.data.copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state: Dict[str, np.ndarray]) -> None:
        """Copy ``state`` into the parameters (in place). The names must match exactly
        and every shape must agree; otherwise a ValueError lists the differences."""
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise ValueError(f"parameter names differ: missing {missing}, unexpected {unexpected}")
        bad = [
            f"{n}: expected {params[n].shape}, got {np.shape(state[n])}"
            for n in params
            if tuple(np.shape(state[n])) != params[n].shape
        ]
        if bad:
            raise ValueError("parameter shapes differ: " + "; ".join(bad))
        values = {n: np.asarray(state[n]) for n in params}
        not_real = [f"{n}: {a.dtype}" for n, a in values.items() if a.dtype.kind not in "fiu"]
        if not_real:  # (checked for all first: no copy below can fail halfway)
            raise ValueError("parameters must hold real numbers: " + "; ".join(not_real))
        for n, p in params.items():
            np.copyto(p.data, values[n], casting="unsafe")

    def rng_states(self) -> Dict[str, dict]:
        """The states of the random generators inside (dropout), by module path."""
        out = {}
        for path, m in _named_modules(self):
            if isinstance(m, Dropout):
                out[path] = m.rng.bit_generator.state
        return out

    def set_rng_states(self, states: Dict[str, dict]) -> None:
        """Restore :meth:`rng_states` (all or nothing: the paths are checked first)."""
        mods = dict(_named_modules(self))
        for path, st in states.items():
            if path not in mods or not isinstance(mods[path], Dropout):
                raise ValueError(f"no Dropout layer named {path!r} to restore the random state of")
            try:  # tried on a scratch generator of the same kind first
                type(mods[path].rng.bit_generator)().state = st
            except (TypeError, ValueError, KeyError, OverflowError) as e:
                raise ValueError(f"bad random state for {path!r}: {type(e).__name__}: {e}") from None
        for path, st in states.items():
            mods[path].rng.bit_generator.state = st

    def save(self, path: str) -> None:
        """Write the parameters to ``path`` (atomic; see :func:`save_arrays`)."""
        save_arrays(path, {"param/" + n: a for n, a in self.state_dict().items()}, {"kind": "module"})

    def load(self, path: str) -> None:
        """Read parameters written by :meth:`save`; names and shapes must match."""
        arrays, meta = load_arrays(path)
        if meta.get("kind") != "module":
            raise CheckpointError(f"{path}: not a module file (kind {meta.get('kind')!r})")
        try:
            self.load_state_dict({n[len("param/") :]: a for n, a in arrays.items() if n.startswith("param/")})
        except ValueError as e:
            raise CheckpointError(f"{path}: does not match this model: {e}") from None

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()})"]
        for name, m in self._modules.items():
            lines.append(f"  ({name}): " + repr(m).replace("\n", "\n  "))
        return "\n".join(lines)


def _named_modules(m: Module, prefix: str = "") -> Iterator[Tuple[str, Module]]:
    yield prefix.rstrip("."), m
    for name, c in m._modules.items():
        yield from _named_modules(c, prefix + name + ".")


class CheckpointError(ValueError):
    """A checkpoint file is corrupt, truncated, of another format or does not match."""


_MAGIC = "qkv_native.checkpoint"
_HEADER_KEY = "__header__"


def _checksum(arrays: Dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_arrays(path: str, arrays: Dict[str, np.ndarray], meta: dict) -> None:
    """Write named arrays and a JSON ``meta`` dict to an ``.npz`` file, atomically.

    The file holds the arrays plus ``__header__`` (UTF-8 JSON as uint8): format
    tag, version, names/shapes/dtypes, the sha256 of the array contents and
    ``meta``. It is written to a temporary file in the same folder, fsynced and
    renamed over ``path``, so a crash mid-write leaves the previous file intact.
    No pickles: only numeric arrays.
    """
    for name, a in arrays.items():
        if name == _HEADER_KEY or not isinstance(a, np.ndarray) or a.dtype == object:
            raise TypeError(f"cannot save {name!r}: need a numeric numpy array")
    header = {
        "format": _MAGIC,
        "version": 1,
        "arrays": {n: {"shape": list(a.shape), "dtype": str(a.dtype)} for n, a in arrays.items()},
        "sha256": _checksum(arrays),
        "meta": meta,
    }
    blob = np.frombuffer(json.dumps(header, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = new_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{_HEADER_KEY: blob}, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def new_file_beside(path: str, suffix: str = ".tmp") -> Tuple[int, str]:
    """(fd, name) of a new empty file in path's folder, open for writing, that becomes path
    (renamed over it when complete), named path.<random>.suffix. Its mode is path's if path
    exists (a save keeps the file's permissions), else 0666 less the umask, as open() gives
    (tempfile.mkstemp's 0600 made every checkpoint private). Every file this package writes
    (checkpoints, model files, the CLI's outputs) goes through here."""
    for _ in range(100):
        tmp = f"{path}.{secrets.token_hex(4)}{suffix}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            os.chmod(fd, stat.S_IMODE(os.stat(path).st_mode))
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        return fd, tmp
    raise FileExistsError(f"{path}: could not create a temporary file beside it")


def load_arrays(path: str) -> Tuple[Dict[str, np.ndarray], dict]:
    """Read a file written by :func:`save_arrays`; returns (arrays, meta).

    Raises :class:`CheckpointError` when the file is not such a checkpoint, is
    truncated or corrupt (zip CRC or sha256 mismatch), or its header disagrees
    with its contents. FileNotFoundError passes through.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        with _open_regular(path) as f, np.load(f, allow_pickle=False) as z:
            if _HEADER_KEY not in z.files:
                raise CheckpointError(f"{path}: not a qkv_native checkpoint (no {_HEADER_KEY})")
            for info in z.zip.infolist():  # before numpy allocates what a member's header claims
                _check_member_size(z.zip, info, path)
            header = json.loads(z[_HEADER_KEY].tobytes().decode("utf-8"))
            arrays = {n: z[n] for n in z.files if n != _HEADER_KEY}
    except CheckpointError:
        raise
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # a corrupt file can fail anywhere in zipfile/numpy/json parsing
        raise CheckpointError(f"{path}: corrupt or not a qkv_native checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict) or header.get("format") != _MAGIC:
        fmt = header.get("format") if isinstance(header, dict) else None
        raise CheckpointError(f"{path}: not a qkv_native checkpoint (format {fmt!r})")
    if header.get("version") != 1:
        raise CheckpointError(f"{path}: unsupported checkpoint version {header.get('version')!r}")
    listed, meta = header.get("arrays", {}), header.get("meta", {})
    if not isinstance(listed, dict) or not isinstance(meta, dict):
        raise CheckpointError(f"{path}: malformed header (arrays and meta must be objects)")
    if set(listed) != set(arrays):
        raise CheckpointError(f"{path}: header lists {sorted(listed)} but the file holds {sorted(arrays)}")
    for n, spec in listed.items():
        a = arrays[n]
        if not isinstance(spec, dict) or list(a.shape) != spec.get("shape") or str(a.dtype) != spec.get("dtype"):
            raise CheckpointError(f"{path}: array {n!r} is {a.dtype}{a.shape}, header says {spec}")
    if _checksum(arrays) != header.get("sha256"):
        raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt")
    return arrays, meta


def _open_regular(path: str):
    """path opened for reading if it is a regular file, else CheckpointError: open() of a
    named pipe waited for a writer, forever (it is opened without blocking, then checked)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"{path}: not a regular file (a directory, pipe or device), not a checkpoint")
        return open(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _check_member_size(zf, info, path: str) -> None:
    """A member's .npy header must not claim more data than the member holds (a forged
    shape would have numpy allocate it, terabytes, before any CRC or checksum)."""
    with zf.open(info) as m:
        version = np.lib.format.read_magic(m)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(m)
        data_start = m.tell()
    claimed = math.prod(shape) * dtype.itemsize
    if claimed > info.file_size - data_start:
        raise CheckpointError(f"{path}: member {info.filename!r} claims {claimed} bytes of data but holds "
                              f"{info.file_size - data_start}: the file is corrupt")


# ----------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------


def _as_f32(x, name: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of float32, got {type(x).__name__}")
    if x.dtype != F32:
        raise TypeError(f"{name} must have dtype float32, got {x.dtype} (convert explicitly with .astype(np.float32))")
    return np.ascontiguousarray(x)


def _require_forward(saved, owner) -> None:
    """RuntimeError unless ``owner`` (a layer or loss) holds a forward to differentiate
    (``saved``: what its forward kept, None before the first forward)."""
    if saved is None:
        raise RuntimeError(f"{type(owner).__name__}.backward: no saved forward (call forward before backward)")


def _check_grad(dy, out_shape: Optional[Tuple[int, ...]], owner) -> np.ndarray:
    """The check of every backward's incoming gradient: the forward ran (out_shape, the
    shape of its output, is not None), dy is a float32 ndarray (no silent conversion)
    and has exactly that shape (no reshape, no broadcast). Returns dy, C-contiguous."""
    _require_forward(out_shape, owner)
    dy = _as_f32(dy, "dy")
    if dy.shape != out_shape:
        raise ValueError(
            f"dy must have the shape of {type(owner).__name__}'s forward output {out_shape}, got {dy.shape}"
        )
    return dy


def _size(value, name: str) -> int:
    """A layer size (d_model, num_heads, ...): an integer >= 1 (TypeError, ValueError otherwise)."""
    return _check_int(value, name, type_error=True)


def _key_lengths(key_lengths, batch: int, seq: Optional[int] = None):
    """key_lengths as int64 (batch,), each in [0, seq] when seq is given (attention checks its own)."""
    if key_lengths is None:
        return None
    kl = np.asarray(key_lengths)
    if kl.dtype.kind not in "iu" or kl.shape != (batch,):
        raise ValueError(f"key_lengths must be an int array of shape (batch={batch},), got {kl.dtype}{kl.shape}")
    if seq is not None and batch and (kl.min() < 0 or kl.max() > seq):
        raise ValueError(f"key_lengths must lie in [0, seq={seq}], got {kl.tolist()}")
    return kl.astype(np.int64, copy=False)


class Sequential(Module):
    """Chains layers: forward in order, backward in reverse. Children are named
    "0", "1", ... . ``key_lengths`` is passed to the layers that use it.
    ``seq[i] = layer`` replaces a layer (``layers`` is a tuple of the registered ones)."""

    uses_key_lengths = True

    def __init__(self, *layers: Module):
        super().__init__()
        _check_layers(layers)
        for i, layer in enumerate(layers):
            setattr(self, str(i), layer)
        self._n = len(layers)

    @property
    def layers(self) -> Tuple[Module, ...]:
        """The layers in order: the registered children "0", "1", ... (a list of its own let
        ``seq.layers[i] = new`` run the new layer while parameters, checkpoints and
        optimizers kept the old one)."""
        return tuple(self._modules[str(i)] for i in range(self._n))

    def forward(self, x, key_lengths=None):
        for layer in self.layers:
            x = layer.forward(x, key_lengths=key_lengths) if layer.uses_key_lengths else layer.forward(x)
        return self._output(x)

    def backward(self, dy):
        dy = self._check_dy(dy)
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def __len__(self):
        return self._n

    def __getitem__(self, i):
        return self.layers[i]

    def __setitem__(self, i, layer):
        layers = list(self.layers)
        layers[i] = layer  # (IndexError when out of range)
        _check_layers(layers)
        setattr(self, str(range(self._n)[i]), layer)


def _check_layers(layers) -> None:
    """Sequential's layers: Modules, none of them (nor any module inside one) in two layers."""
    holder: Dict[int, int] = {}  # id of every module inside the layers -> the layer holding it
    for i, layer in enumerate(layers):
        if not isinstance(layer, Module):
            raise TypeError(f"layer {i} must be a qkv_native.nn.Module, got {type(layer).__name__}")
        inner = {id(m): m for m in layer.modules()}
        for key, m in inner.items():  # its backward would see only its last input
            if key in holder:
                what = "appears twice" if m is layer else f"holds a {type(m).__name__} that layer {holder[key]} also holds"
                raise ValueError(f"layer {i} {what}: a layer keeps one input for its backward, "
                                 f"so its weight gradient would miss the first use (use two layers)")
        holder.update(dict.fromkeys(inner, i))


class Linear(Module):
    """y = x·W + b on the last axis.

    x: (..., d_in) -> y: (..., d_out); weight: (d_in, d_out); bias: (d_out,).
    init: weight scheme (bias starts at 0).
    """

    def __init__(self, d_in: int, d_out: int, *, bias: bool = True, init: str = "xavier_uniform", rng: RngLike = 0):
        super().__init__()
        g = _rng(rng)
        self.d_in, self.d_out = _size(d_in, "d_in"), _size(d_out, "d_out")
        self.weight = Parameter(_init(init, g, (self.d_in, self.d_out), self.d_in, self.d_out))
        self.bias = Parameter(np.zeros(self.d_out, F32)) if _flag(bias, "bias") else None
        self._x = None

    def extra_repr(self):
        return f"d_in={self.d_in}, d_out={self.d_out}, bias={self.bias is not None}"

    def forward(self, x):
        x = _as_f32(x, "x")
        if x.shape[-1] != self.d_in:
            raise ValueError(f"x must have shape (..., d_in={self.d_in}), got {x.shape}")
        x2 = x.reshape(-1, self.d_in)  # (N, d_in)
        self._x = x2
        y = linear(x2, self.weight.data, self.bias.data if self.bias is not None else None)  # (N, d_out)
        return self._output(y.reshape(*x.shape[:-1], self.d_out))

    def backward(self, dy):
        dy = self._check_dy(dy)  # (..., d_out)
        x2 = self._x  # (N, d_in)
        dy2 = dy.reshape(-1, self.d_out)  # (N, d_out)
        # forward: y = x · W + b
        matmul(x2, dy2, trans_a=True, beta=1.0, out=self.weight.grad)  # dW += xᵀ · dy
        if self.bias is not None:
            self.bias.grad += dy2.sum(axis=0)  # db += Σ_rows dy
        dx = matmul(dy2, self.weight.data, trans_b=True)  # dx = dy · Wᵀ
        return dx.reshape(*dy.shape[:-1], self.d_in)


class Embedding(Module):
    """Lookup: ids (batch, seq) ints in [0, num_embeddings) -> (batch, seq, d_model).
    backward returns None (ids have no gradient)."""

    def __init__(self, num_embeddings: int, d_model: int, *, init: str = "normal", rng: RngLike = 0):
        super().__init__()
        self.num_embeddings, self.d_model = _size(num_embeddings, "num_embeddings"), _size(d_model, "d_model")
        self.weight = Parameter(_init(init, _rng(rng), (self.num_embeddings, self.d_model), 1, self.d_model))
        self._ids = None

    def extra_repr(self):
        return f"num_embeddings={self.num_embeddings}, d_model={self.d_model}"

    def forward(self, ids):
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"ids must be integers, got {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_embeddings):
            raise ValueError(f"ids must lie in [0, num_embeddings={self.num_embeddings}), got [{ids.min()}, {ids.max()}]")
        self._ids = ids
        return self._output(self.weight.data[ids])

    def backward(self, dy):
        dy = self._check_dy(dy)  # (*ids.shape, d_model)
        # forward: y[b, s] = W[ids[b, s]]  ->  dW[ids[b, s]] += dy[b, s] (repeated ids add up)
        np.add.at(self.weight.grad, self._ids.reshape(-1), dy.reshape(-1, self.d_model))
        return None


class LearnedPositionalEmbedding(Module):
    """y = x + P[:seq]. x: (batch, seq, d_model), seq <= max_seq; P: (max_seq, d_model)."""

    def __init__(self, max_seq: int, d_model: int, *, init: str = "normal", rng: RngLike = 0):
        super().__init__()
        self.max_seq, self.d_model = _size(max_seq, "max_seq"), _size(d_model, "d_model")
        self.weight = Parameter(_init(init, _rng(rng), (self.max_seq, self.d_model), 1, self.d_model))
        self._seq = 0

    def forward(self, x):
        x = _as_f32(x, "x")
        if x.ndim != 3 or x.shape[1] > self.max_seq or x.shape[2] != self.d_model:
            raise ValueError(f"x must have shape (batch, seq <= {self.max_seq}, d_model={self.d_model}), got {x.shape}")
        self._seq = x.shape[1]
        return self._output(x + self.weight.data[: self._seq])

    def backward(self, dy):
        dy = self._check_dy(dy)  # (batch, seq, d_model)
        # forward: y = x + P[:seq]
        self.weight.grad[: self._seq] += dy.sum(axis=0)
        return dy


def sinusoidal_table(max_seq: int, d_model: int) -> np.ndarray:
    """(max_seq, d_model): PE[p, 2i] = sin(p / 10000^(2i/d_model)), PE[p, 2i+1] = cos(...)."""
    pos = np.arange(max_seq, dtype=np.float64)[:, None]
    inv = np.exp(-math.log(10000.0) * np.arange(0, d_model, 2, dtype=np.float64) / d_model)
    pe = np.zeros((max_seq, d_model))
    pe[:, 0::2] = np.sin(pos * inv)
    pe[:, 1::2] = np.cos(pos * inv[: d_model // 2])
    return pe.astype(F32)


class SinusoidalPositionalEncoding(Module):
    """y = x + PE[:seq] with the fixed sinusoidal table (no parameters).
    x: (batch, seq, d_model)."""

    def __init__(self, max_seq: int, d_model: int):
        super().__init__()
        self.max_seq, self.d_model = _size(max_seq, "max_seq"), _size(d_model, "d_model")
        self.table = sinusoidal_table(self.max_seq, self.d_model)

    def forward(self, x):
        x = _as_f32(x, "x")
        if x.ndim != 3 or x.shape[1] > self.max_seq or x.shape[2] != self.d_model:
            raise ValueError(f"x must have shape (batch, seq <= {self.max_seq}, d_model={self.d_model}), got {x.shape}")
        return self._output(x + self.table[: x.shape[1]])

    def backward(self, dy):
        return self._check_dy(dy)  # forward: y = x + PE


class LayerNorm(Module):
    """Normalise the last axis: x: (..., d_model) -> same shape. weight = 1, bias = 0 at init."""

    def __init__(self, d_model: int, *, eps: float = 1e-5):
        super().__init__()
        self.d_model, self.eps = _size(d_model, "d_model"), _real(eps, "eps")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {eps}")
        self.weight = Parameter(np.ones(self.d_model, F32))
        self.bias = Parameter(np.zeros(self.d_model, F32))
        self._cache = None

    def extra_repr(self):
        return f"d_model={self.d_model}, eps={self.eps}"

    def forward(self, x):
        x = _as_f32(x, "x")
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (..., d_model={self.d_model}), got {x.shape}")
        x2 = x.reshape(-1, self.d_model)
        out, mean, rstd = layernorm_forward(x2, self.weight.data, self.bias.data, self.eps)
        self._cache = (x2, mean, rstd)
        return self._output(out.reshape(x.shape))

    def backward(self, dy):
        dy = self._check_dy(dy)  # (..., d_model)
        x2, mean, rstd = self._cache
        dx = layernorm_backward(
            dy.reshape(-1, self.d_model), x2, mean, rstd, self.weight.data, self.weight.grad, self.bias.grad
        )
        return dx.reshape(dy.shape)


class GELU(Module):
    """Elementwise GELU, any shape; ``approximate`` is "none" (erf) or "tanh"."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = _approximate(approximate)
        self._x = None

    def forward(self, x):
        self._x = _as_f32(x, "x")
        return self._output(gelu_forward(self._x, self.approximate))

    def backward(self, dy):
        return gelu_backward(self._check_dy(dy), self._x, self.approximate)


class ReLU(Module):
    """Elementwise max(x, 0), any shape."""

    def __init__(self):
        super().__init__()
        self._pos = None

    def forward(self, x):
        x = _as_f32(x, "x")
        self._pos = x > 0
        return self._output(np.where(self._pos, x, F32(0.0)))

    def backward(self, dy):
        dy = self._check_dy(dy)
        return np.where(self._pos, dy, F32(0.0))  # forward: y = x if x > 0 else 0


class Dropout(Module):
    """Inverted dropout, seeded: in training each element is zeroed with
    probability p and the rest scaled by 1/(1-p); identity in eval mode (or p=0).
    Each call draws one seed from the layer's generator (whose state is part of a
    trainer checkpoint) for the native :func:`qkv_native.functional.dropout`."""

    def __init__(self, p: float = 0.1, *, rng: RngLike = 0):
        super().__init__()
        if not 0.0 <= _real(p, "p") < 1.0:
            raise ValueError(f"p must lie in [0, 1), got {p}")
        self.p = float(p)
        self.rng = np.random.default_rng(_child_seed(_rng(rng)))
        self._mask = None

    def extra_repr(self):
        return f"p={self.p}"

    def forward(self, x):
        x = _as_f32(x, "x")
        if not self.training or self.p == 0.0:
            self._mask = None
            return self._output(x)
        # one draw from the checkpointed generator seeds the native counter-based bits
        y, self._mask = dropout(x, self.p, int(self.rng.integers(0, 2**63)))
        return self._output(y)

    def backward(self, dy):
        dy = self._check_dy(dy)
        return dy if self._mask is None else dy * self._mask  # forward: y = x * mask


class MultiHeadAttention(Module):
    """Multi-head attention with W_Q, W_K, W_V, W_O and biases.

    Self-attention: ``forward(x)`` with x: (batch, seq, d_model). Cross-attention:
    ``forward(x, context)`` with context: (batch, seq_k, d_model) giving K and V.
    q = x·W_Q + b_Q split into num_heads heads of d_head; k, v likewise with
    num_kv_heads heads (grouped-query attention when num_kv_heads < num_heads);
    o = softmax(q·kᵀ/√d_head [causal, key_lengths]) · v; y = merge(o)·W_O + b_O.

    w_q: (d_model, num_heads·d_head); w_k, w_v: (d_model, num_kv_heads·d_head);
    w_o: (num_heads·d_head, d_model). Returns y: (batch, seq_q, d_model).
    key_lengths: (batch,) ints, keys j >= key_lengths[b] are padding.
    """

    uses_key_lengths = True

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        num_kv_heads: Optional[int] = None,
        d_head: Optional[int] = None,
        causal: bool = False,
        bias: bool = True,
        init: str = "xavier_uniform",
        rng: RngLike = 0,
    ):
        super().__init__()
        self.d_model, self.num_heads = _size(d_model, "d_model"), _size(num_heads, "num_heads")
        self.num_kv_heads = self.num_heads if num_kv_heads is None else _size(num_kv_heads, "num_kv_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
        if d_head is None:
            if self.d_model % self.num_heads:
                raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads}), or pass d_head")
            d_head = self.d_model // self.num_heads
        self.d_head, self.causal = _size(d_head, "d_head"), _flag(causal, "causal")
        self.has_bias = _flag(bias, "bias")
        d_q, d_kv = self.num_heads * self.d_head, self.num_kv_heads * self.d_head
        g = _rng(rng)
        self.w_q = Parameter(_init(init, g, (self.d_model, d_q), self.d_model, d_q))
        self.w_k = Parameter(_init(init, g, (self.d_model, d_kv), self.d_model, d_kv))
        self.w_v = Parameter(_init(init, g, (self.d_model, d_kv), self.d_model, d_kv))
        self.w_o = Parameter(_init(init, g, (d_q, self.d_model), d_q, self.d_model))
        if self.has_bias:
            self.b_q = Parameter(np.zeros(d_q, F32))
            self.b_k = Parameter(np.zeros(d_kv, F32))
            self.b_v = Parameter(np.zeros(d_kv, F32))
            self.b_o = Parameter(np.zeros(self.d_model, F32))
        self._cache = None

    def extra_repr(self):
        return (
            f"d_model={self.d_model}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"d_head={self.d_head}, causal={self.causal}"
        )

    def _split(self, y2, batch, seq, heads):
        """(batch·seq, heads·d_head) token-major -> view (batch, heads, seq, d_head) (last axis contiguous)."""
        return y2.reshape(batch, seq, heads, self.d_head).transpose(0, 2, 1, 3)

    def _width(self, name: str) -> int:
        return (self.num_heads if name == "q" else self.num_kv_heads) * self.d_head

    def _packed(self, names: str):
        """The weights and biases (or None) of ``names`` (e.g. "qkv", "q", "kv") side by side:
        (d_model, Σ widths), (Σ widths,). One GEMM then projects onto all of them."""
        w = np.concatenate([getattr(self, "w_" + n).data for n in names], axis=1)
        b = np.concatenate([getattr(self, "b_" + n).data for n in names]) if self.has_bias else None
        return w, b

    def forward(self, x, context=None, *, key_lengths=None, mask=None):
        x = _as_f32(x, "x")
        if x.ndim != 3 or x.shape[2] != self.d_model:
            raise ValueError(f"x must have shape (batch, seq_q, d_model={self.d_model}), got {x.shape}")
        batch, seq_q, _ = x.shape
        kl = _key_lengths(key_lengths, batch)
        x2 = x.reshape(-1, self.d_model)
        if context is None:
            seq_k, groups = seq_q, [("qkv", x2)]
        else:
            context = _as_f32(context, "context")
            if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != self.d_model:
                raise ValueError(
                    f"context must have shape (batch={batch}, seq_k, d_model={self.d_model}), got {context.shape}"
                )
            seq_k, groups = context.shape[1], [("q", x2), ("kv", context.reshape(-1, self.d_model))]
        # Q, K and V token-major from one GEMM per input, bias in its store: (B·S, d_q | d_kv | d_kv);
        # q, k, v are head-major strided views of it (no copy)
        projections = []  # (names, input (N, d_model), packed weight, output (N, Σ widths))
        for names, inp in groups:
            w, b = self._packed(names)
            projections.append((names, inp, w, linear(inp, w, b)))
        q2, kv2 = projections[0][3][:, : self._width("q")], projections[-1][3][:, -2 * self._width("k") :]
        d_kv = self._width("k")
        q = self._split(q2, batch, seq_q, self.num_heads)
        k = self._split(kv2[:, :d_kv], batch, seq_k, self.num_kv_heads)
        v = self._split(kv2[:, d_kv:], batch, seq_k, self.num_kv_heads)
        # attention writes o straight into the token-major buffer (B, Sq, H, D) through a
        # head-major strided view, so merging the heads for W_O needs no copy
        o_buf = np.empty((batch, seq_q, self.num_heads, self.d_head), F32)
        o = o_buf.transpose(0, 2, 1, 3)  # (B, H, Sq, D) view
        _, lse = attention(q, k, v, causal=self.causal, key_lengths=kl, mask=mask, return_lse=True, out=o)
        o2 = o_buf.reshape(batch * seq_q, self.num_heads * self.d_head)  # (B·Sq, H·D), no copy
        y = linear(o2, self.w_o.data, self.b_o.data if self.has_bias else None)  # (B·Sq, d_model)
        self._cache = (projections, q, k, v, o, lse, o2, kl, mask, context)
        return self._output(y.reshape(batch, seq_q, self.d_model))

    def backward(self, dy):
        """dy: (batch, seq_q, d_model). Accumulates into all weights; returns dx, or
        (dx, dcontext) for cross-attention."""
        dy = self._check_dy(dy)
        projections, q, k, v, o, lse, o2, kl, mask, context = self._cache
        batch, _, seq_q, _ = q.shape
        seq_k = k.shape[2]
        dy2 = dy.reshape(-1, self.d_model)  # (B·Sq, d_model)
        # forward: y = o2 · W_O + b_O
        matmul(o2, dy2, trans_a=True, beta=1.0, out=self.w_o.grad)  # dW_O += o2ᵀ · dy
        if self.has_bias:
            self.b_o.grad += dy2.sum(axis=0)
        do2 = matmul(dy2, self.w_o.data, trans_b=True)  # (B·Sq, H·D) = dy · W_Oᵀ
        do = self._split(do2, batch, seq_q, self.num_heads)  # (B, H, Sq, D) view
        # forward: o, lse = attention(q, k, v, ...); the gradients land token-major, in
        # buffers shaped like the projections' outputs ([dQ | dK | dV], or dQ and [dK | dV])
        douts = [np.empty_like(out) for _, _, _, out in projections]
        d_q, d_kv = self._width("q"), self._width("k")
        dq2, dkv2 = douts[0][:, :d_q], douts[-1][:, -2 * d_kv :]
        grads = (self._split(dq2, batch, seq_q, self.num_heads), self._split(dkv2[:, :d_kv], batch, seq_k, self.num_kv_heads),
                 self._split(dkv2[:, d_kv:], batch, seq_k, self.num_kv_heads))
        attention_backward(do, q, k, v, o, lse, causal=self.causal, key_lengths=kl, mask=mask, out=grads)
        # forward: out = inp · [W_names] + [b_names] per projection
        dinputs = []
        for (names, inp, w, _), dout in zip(projections, douts):
            dw = matmul(inp, dout, trans_a=True)  # (d_model, Σ widths): one GEMM for all the weights
            db = dout.sum(axis=0) if self.has_bias else None
            col = 0
            for n in names:
                width = self._width(n)
                getattr(self, "w_" + n).grad += dw[:, col : col + width]
                if db is not None:
                    getattr(self, "b_" + n).grad += db[col : col + width]
                col += width
            dinputs.append(matmul(dout, w, trans_b=True))  # d inp = dout · [W_names]ᵀ
        if context is None:
            return dinputs[0].reshape(batch, seq_q, self.d_model)
        return dinputs[0].reshape(batch, seq_q, self.d_model), dinputs[1].reshape(context.shape)


class FeedForward(Module):
    """y = W_2·act(W_1·x + b_1) + b_2 with dropout after the activation.
    x: (..., d_model) -> (..., d_model); hidden width d_ff."""

    def __init__(
        self, d_model: int, d_ff: int, *, activation: str = "gelu", dropout: float = 0.0,
        init: str = "xavier_uniform", rng: RngLike = 0,
    ):
        super().__init__()
        d_model, d_ff = _size(d_model, "d_model"), _size(d_ff, "d_ff")  # named as such, not as fc1's d_in/d_out
        g = _rng(rng)
        acts = {"gelu": lambda: GELU(), "gelu_tanh": lambda: GELU("tanh"), "relu": ReLU}
        if activation not in acts:
            raise ValueError(f"activation must be one of {sorted(acts)}, got {activation!r}")
        self.fc1 = Linear(d_model, d_ff, init=init, rng=g)
        self.act = acts[activation]()
        self.drop = Dropout(dropout, rng=g)
        self.fc2 = Linear(d_ff, d_model, init=init, rng=g)

    def forward(self, x):
        return self._output(self.fc2.forward(self.drop.forward(self.act.forward(self.fc1.forward(x)))))

    def backward(self, dy):
        dy = self._check_dy(dy)
        return self.fc1.backward(self.act.backward(self.drop.backward(self.fc2.backward(dy))))


class TransformerEncoderBlock(Module):
    """One encoder block, x: (batch, seq, d_model) -> same shape.

    Pre-norm (``norm_first=True``):  h = x + drop(attn(ln1(x)));  y = h + drop(ff(ln2(h)))
    Post-norm:                       h = ln1(x + drop(attn(x)));  y = ln2(h + drop(ff(h)))
    The same structure as ``torch.nn.TransformerEncoderLayer(batch_first=True)``.
    """

    uses_key_lengths = True

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        d_ff: int,
        *,
        num_kv_heads: Optional[int] = None,
        causal: bool = False,
        norm_first: bool = True,
        activation: str = "gelu",
        dropout: float = 0.0,
        eps: float = 1e-5,
        init: str = "xavier_uniform",
        rng: RngLike = 0,
    ):
        super().__init__()
        g = _rng(rng)
        self.norm_first = _flag(norm_first, "norm_first")
        self.attn = MultiHeadAttention(d_model, num_heads, num_kv_heads=num_kv_heads, causal=causal, init=init, rng=g)
        self.ln1 = LayerNorm(d_model, eps=eps)
        self.drop1 = Dropout(dropout, rng=g)
        self.ff = FeedForward(d_model, d_ff, activation=activation, dropout=dropout, init=init, rng=g)
        self.ln2 = LayerNorm(d_model, eps=eps)
        self.drop2 = Dropout(dropout, rng=g)

    def extra_repr(self):
        return f"norm_first={self.norm_first}"

    def forward(self, x, key_lengths=None):
        if self.norm_first:
            h = x + self.drop1.forward(self.attn.forward(self.ln1.forward(x), key_lengths=key_lengths))
            return self._output(h + self.drop2.forward(self.ff.forward(self.ln2.forward(h))))
        h = self.ln1.forward(x + self.drop1.forward(self.attn.forward(x, key_lengths=key_lengths)))
        return self._output(self.ln2.forward(h + self.drop2.forward(self.ff.forward(h))))

    def backward(self, dy):
        dy = self._check_dy(dy)  # (batch, seq, d_model)
        if self.norm_first:
            # forward: y = h + drop2(ff(ln2(h)))
            dh = dy + self.ln2.backward(self.ff.backward(self.drop2.backward(dy)))
            # forward: h = x + drop1(attn(ln1(x)))
            return dh + self.ln1.backward(self.attn.backward(self.drop1.backward(dh)))
        # forward: y = ln2(h + drop2(ff(h)))
        dr = self.ln2.backward(dy)
        dh = dr + self.ff.backward(self.drop2.backward(dr))
        # forward: h = ln1(x + drop1(attn(x)))
        dr = self.ln1.backward(dh)
        return dr + self.attn.backward(self.drop1.backward(dr))


class MeanPool(Module):
    """Mean over the sequence, ignoring padding: x: (batch, seq, d) -> (batch, d).
    With key_lengths (batch,) only the first key_lengths[b] positions count
    (a row of length 0 gives 0)."""

    uses_key_lengths = True

    def __init__(self):
        super().__init__()
        self._w = None

    def forward(self, x, key_lengths=None):
        x = _as_f32(x, "x")
        if x.ndim != 3:
            raise ValueError(f"x must have shape (batch, seq, d_model), got {x.shape}")
        batch, seq, _ = x.shape
        kl = _key_lengths(key_lengths, batch, seq)
        if kl is None:
            w = np.full((batch, seq), F32(1.0 / max(seq, 1)), F32)  # (seq 0: a mean of nothing, 0)
        else:
            valid = np.arange(seq)[None, :] < kl[:, None]
            w = valid.astype(F32) / np.maximum(kl, 1).astype(F32)[:, None]  # (batch, seq)
        self._w = w
        return self._output(np.einsum("bs,bsd->bd", w, x))

    def backward(self, dy):
        dy = self._check_dy(dy)  # (batch, d_model)
        return self._w[:, :, None] * dy[:, None, :]  # forward: y[b] = Σ_s w[b, s] x[b, s]


class ClsToken(Module):
    """Prepend a learned token: x: (batch, seq, d_model) -> (batch, 1 + seq, d_model).
    (key_lengths of later layers must count it.)"""

    def __init__(self, d_model: int, *, init: str = "normal", rng: RngLike = 0):
        super().__init__()
        self.d_model = _size(d_model, "d_model")
        self.token = Parameter(_init(init, _rng(rng), (self.d_model,), 1, self.d_model))

    def forward(self, x):
        x = _as_f32(x, "x")
        if x.ndim != 3 or x.shape[2] != self.d_model:
            raise ValueError(f"x must have shape (batch, seq, d_model={self.d_model}), got {x.shape}")
        tok = np.broadcast_to(self.token.data, (x.shape[0], 1, self.d_model))
        return self._output(np.concatenate([tok, x], axis=1))

    def backward(self, dy):
        dy = self._check_dy(dy)  # (batch, 1 + seq, d_model)
        self.token.grad += dy[:, 0].sum(axis=0)  # forward: y[:, 0] = token
        return dy[:, 1:]


class ClsPool(Module):
    """Take the first position: x: (batch, seq, d) -> (batch, d)."""

    def __init__(self):
        super().__init__()
        self._shape = None

    def forward(self, x):
        x = _as_f32(x, "x")
        if x.ndim != 3 or x.shape[1] == 0:
            raise ValueError(f"x must have shape (batch, seq >= 1, d_model), got {x.shape}")
        self._shape = x.shape
        return self._output(x[:, 0].copy())

    def backward(self, dy):
        dy = self._check_dy(dy)  # (batch, d_model)
        dx = np.zeros(self._shape, F32)
        dx[:, 0] = dy  # forward: y = x[:, 0]
        return dx


# ----------------------------------------------------------------------------
# Losses: forward(prediction, target) -> float; backward() -> d loss / d prediction
# ----------------------------------------------------------------------------


def _dloss(dloss) -> float:
    """A loss's backward seed: a real scalar (an array would broadcast into the gradient)."""
    d = np.asarray(dloss)
    if d.ndim != 0 or d.dtype.kind not in "fiu":
        raise TypeError(f"dloss must be a real scalar, got {type(dloss).__name__} {d.dtype}{d.shape}")
    return float(d)


class CrossEntropyLoss:
    """Mean softmax cross-entropy of logits (..., C) against int targets (...),
    with label smoothing and an ignored target value (see :func:`softmax_cross_entropy`)."""

    def __init__(self, *, label_smoothing: float = 0.0, ignore_index: int = -100):
        if not 0.0 <= _real(label_smoothing, "label_smoothing") < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        if isinstance(ignore_index, (bool, np.bool_)) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be an integer, got {type(ignore_index).__name__}")  # (3.7 ignored class 3)
        self.label_smoothing, self.ignore_index = float(label_smoothing), int(ignore_index)
        self._grad = None

    def forward(self, logits, targets) -> float:
        logits = _as_f32(logits, "logits")
        targets = np.asarray(targets)
        if targets.dtype.kind not in "iu":
            raise TypeError(f"targets must be integer class indices, got {targets.dtype}")
        if logits.shape[:-1] != targets.shape:
            raise ValueError(f"targets must have shape {logits.shape[:-1]} (logits {logits.shape}), got {targets.shape}")
        c = logits.shape[-1]
        t = targets.reshape(-1).astype(np.int64, copy=False)  # the range is checked natively
        loss, grad = softmax_cross_entropy(
            logits.reshape(-1, c), t, label_smoothing=self.label_smoothing, ignore_index=self.ignore_index
        )
        self._grad = grad.reshape(logits.shape)
        return loss

    __call__ = forward

    def backward(self, dloss: float = 1.0) -> np.ndarray:
        """d (dloss·loss) / d logits, (..., C), of the last forward."""
        _require_forward(self._grad, self)
        dloss = _dloss(dloss)
        return self._grad if dloss == 1.0 else self._grad * F32(dloss)


class MSELoss:
    """Mean squared error over all elements: mean((prediction - target)^2); of no elements
    0 with a zero gradient (as :class:`CrossEntropyLoss` with every target ignored)."""

    def __init__(self):
        self._diff = None

    def forward(self, prediction, target) -> float:
        prediction = _as_f32(prediction, "prediction")
        target = np.asarray(target, dtype=F32)
        if target.shape != prediction.shape:
            raise ValueError(f"target must have shape {prediction.shape}, got {target.shape}")
        self._diff = prediction - target
        return float(np.sum(np.square(self._diff, dtype=np.float64)) / max(self._diff.size, 1))

    __call__ = forward

    def backward(self, dloss: float = 1.0) -> np.ndarray:
        """d (dloss·loss) / d prediction, the shape of prediction, of the last forward."""
        _require_forward(self._diff, self)
        dloss = _dloss(dloss)
        # forward: loss = Σ diff² / n
        return self._diff * F32(2.0 * dloss / max(self._diff.size, 1))
