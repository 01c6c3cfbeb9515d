"""qkv_native: fast, exact, trainable attention for CPUs.

The native core (``qkv_native._core``) is compiled once per instruction set
(scalar, AVX2+FMA, AVX-512) and picks the best one the CPU supports at import;
``QKV_NATIVE_ISA=scalar|avx2|avx512`` forces one. See :func:`cpu_info`.
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Iterator

from . import _core, nn, optim, train
from .functional import (
    PackedWeight,
    attention,
    attention_backward,
    attention_varlen,
    attention_varlen_backward,
    gelu,
    gelu_backward,
    layer_norm,
    layer_norm_backward,
    linear,
    matmul,
    pack_weight,
    pack_weights,
    qkv_project,
    qkv_project_backward,
    qkv_project_packed,
    softmax_cross_entropy,
)

__version__ = "0.1.0"

__all__ = [
    "attention",
    "attention_backward",
    "attention_varlen",
    "attention_varlen_backward",
    "matmul",
    "pack_weight",
    "pack_weights",
    "PackedWeight",
    "linear",
    "layer_norm",
    "layer_norm_backward",
    "gelu",
    "gelu_backward",
    "softmax_cross_entropy",
    "qkv_project",
    "qkv_project_backward",
    "qkv_project_packed",
    "cpu_info",
    "set_num_threads",
    "get_num_threads",
    "set_cache_limit",
    "cache_info",
    "supported_isas",
    "use_isa",
    "nn",
    "optim",
    "train",
]


def cpu_info() -> dict:
    """The CPU's features, the ISA variants it can run, the chosen one and the thread count.

    Keys: ``vendor``, ``brand``, ``family`` (CPUID display family), ``gemv_prefetch``
    (whether one-row products prefetch their weight rows in software: AMD family 19h;
    ``QKV_NATIVE_GEMV_PREFETCH=0|1`` overrides), ``gemm_kc`` (the active variant's GEMM K
    block on this CPU: the variant's own, at most 384 on Intel), ``features`` (dict of bools),
    ``supported_isas`` (list, best last), ``isa`` (the active variant), ``num_threads``.
    """
    return _core.cpu_info()


def set_cache_limit(nbytes: int) -> int:
    """Keep at most ``nbytes`` of the memory of freed result arrays for reuse; returns the old limit.

    The large arrays (>= ``cache_info()["min_array_bytes"]``, 64 KiB) that native ops
    return when called without ``out=`` take their memory from a cache; when such an
    array is freed its memory goes back to the cache, and the next result of the same
    size reuses it instead of fresh pages that the OS must map and zero (a loop calling
    ``attention_backward`` at (32, 12, 128, 32) spends about 12% of its time on that
    without the cache). The default keeps up to 256 MiB (and 64 blocks); past that the
    oldest blocks are returned to the OS. ``set_cache_limit(0)`` returns every cached
    block now and keeps none from then on. Such arrays have a capsule as ``.base``
    (they are not views of another array) and cannot be resized in place.
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, numbers.Integral):
        raise TypeError(f"set_cache_limit: nbytes must be an int, got {type(nbytes).__name__}")
    if not 0 <= nbytes < 2**63:
        raise ValueError(f"set_cache_limit: nbytes must lie in [0, 2**63), got {nbytes}")
    return int(_core.set_cache_limit(int(nbytes)))


def cache_info() -> dict:
    """The result-array cache of :func:`set_cache_limit`: ``bytes`` and ``blocks`` kept now,
    ``limit`` (bytes) and ``min_array_bytes`` (smaller arrays come from NumPy)."""
    return _core.cache_info()


def set_num_threads(n: int) -> None:
    """Limit the OpenMP threads every native op uses (default: OMP_NUM_THREADS or all
    cores; at most ``_core.MAX_THREADS`` = 1024 either way). n: an int in [1, 1024].

    In a process forked after qkv_native ran an op on several threads, ops run on one
    thread and n > 1 raises RuntimeError: OpenMP's threads do not survive ``fork()``
    (use the ``spawn`` or ``forkserver`` start method for multi-threaded workers)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"set_num_threads: n must be an int, got {type(n).__name__}")
    if not 1 <= n <= _core.MAX_THREADS:
        raise ValueError(f"set_num_threads: n must lie in [1, {_core.MAX_THREADS}], got {n}")
    _core.set_num_threads(int(n))


def get_num_threads() -> int:
    """The number of threads native ops called from this thread use: the
    :func:`set_num_threads` ceiling, lowered by an OpenMP limit in force here
    (threadpoolctl, OMP_NUM_THREADS)."""
    return _core.get_num_threads()


def supported_isas() -> list:
    """The ISA variants compiled in and runnable on this CPU, best last."""
    return list(_core.supported_isas())


@contextlib.contextmanager
def use_isa(isa: str) -> Iterator[None]:
    """Run the ops inside the ``with`` block on one ISA variant (``scalar``, ``avx2``, ``avx512``).

    Process-wide (not thread-local): meant for tests and benchmarks. Raises
    ValueError for a variant this CPU cannot run.
    """
    if not isinstance(isa, str):  # (pybind11's 'incompatible function arguments'; bytes were taken)
        raise TypeError(f"use_isa: isa must be a str (one of {', '.join(supported_isas())}), got {type(isa).__name__}")
    previous = _core.get_isa()
    _core.set_isa(isa)
    try:
        yield
    finally:
        _core.set_isa(previous)


# Fail at import, not at first use, when QKV_NATIVE_ISA names a variant this CPU lacks.
_core.get_isa()
