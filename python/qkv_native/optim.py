"""Optimizers, learning-rate schedules and gradient clipping.

An optimizer updates the :class:`qkv_native.nn.Parameter` s it is attached to,
in place, from their ``grad``. See Note [flat parameters]: on attach the
parameters move into one flat buffer (``data``) and one flat gradient buffer
(``grad``), and each step is one native call over all of them (one pass over w,
g and the state; :func:`qkv_native.functional.adam_update` / ``sgd_update``).
The formulas are PyTorch's (``torch.optim.SGD``, ``Adam``, ``AdamW``), so a
model trained with the same settings follows the same trajectory.

The learning rate of step t (t = 0, 1, ... counts the steps taken so far) is
``lr * schedule.factor(t)``; schedules are pure functions of t, so the step
count (saved in a checkpoint) is the whole schedule position.
"""

from __future__ import annotations

import math
import signal
import threading
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np

from . import functional as _F
from .nn import Module, Parameter

__all__ = [
    "Schedule",
    "Constant",
    "StepDecay",
    "Cosine",
    "LinearWarmup",
    "Optimizer",
    "SGD",
    "Adam",
    "AdamW",
    "clip_grad_norm",
    "decay_matrices_only",
]

F32 = np.float32


# ----------------------------------------------------------------------------
# Schedules: factor(step) multiplies the base learning rate
# ----------------------------------------------------------------------------


class Schedule:
    """Maps the number of steps taken so far to a factor of the base learning rate."""

    def factor(self, step: int) -> float:
        raise NotImplementedError

    def config(self) -> dict:
        return {"type": type(self).__name__, **{k: (v.config() if isinstance(v, Schedule) else v) for k, v in vars(self).items()}}


class Constant(Schedule):
    """factor = 1."""

    def factor(self, step: int) -> float:
        return 1.0


class StepDecay(Schedule):
    """factor = gamma ** (step // step_size) (torch's StepLR, counted in steps).
    step_size: a positive int; gamma: a finite number >= 0."""

    def __init__(self, step_size: int, gamma: float = 0.1):
        self.step_size = _F._positive_int(step_size, "step_size")
        _check_hyper("gamma", gamma)
        self.gamma = float(gamma)

    def factor(self, step: int) -> float:
        return self.gamma ** (step // self.step_size)


class Cosine(Schedule):
    """Cosine decay from 1 to ``min_factor`` over ``total_steps``, then flat:
    factor = min + (1 - min) · (1 + cos(π · min(step, total) / total)) / 2."""

    def __init__(self, total_steps: int, min_factor: float = 0.0):
        self.total_steps = _F._positive_int(total_steps, "total_steps")
        _check_hyper("min_factor", min_factor)
        self.min_factor = float(min_factor)

    def factor(self, step: int) -> float:
        t = min(step, self.total_steps) / self.total_steps
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))


class LinearWarmup(Schedule):
    """Linear warmup (step + 1) / warmup_steps for the first ``warmup_steps``
    steps, then ``after`` (default constant) counted from the end of the warmup."""

    def __init__(self, warmup_steps: int, after: Optional[Schedule] = None):
        _F._check_int(warmup_steps, "warmup_steps", 0, type_error=True)
        if after is not None and not isinstance(after, Schedule):
            raise TypeError(f"after must be a Schedule or None, got {type(after).__name__}")
        self.warmup_steps, self.after = int(warmup_steps), after if after is not None else Constant()

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return self.after.factor(step - self.warmup_steps)


# ----------------------------------------------------------------------------
# Signals held while an update and its bookkeeping happen
# ----------------------------------------------------------------------------


class _SignalsHeld:
    """Note [held signals]
    A signal's Python handler (Ctrl-C's KeyboardInterrupt) runs in the main thread between
    two bytecodes, and for a signal that arrives while a native op runs, that is as soon as
    the op returns. Right after an optimizer's native update, that was before the update
    was counted (``step_count``) and before the Trainer recorded its batch: a resumed run
    took the step a second time. Inside ``with _signals_held:`` (re-entrant) the handlers of
    SIGINT and SIGTERM that are Python functions run at the end of the block instead, in
    the order the signals came, so the block's statements happen all (or, if one raises, as
    far as they got). Only the main thread runs signal handlers: elsewhere it does nothing.
    Cost: a signal.getsignal and two signal.signal per signal per outermost block, 8.6 us on
    Zen 5: Trainer.fit takes it once per batch (its update and its record of the batch), beside
    a forward and a backward; Optimizer.step alone does not, as it would double the 16 us step
    of a small model (Adam over a 16 x 16 Linear): a loop of the caller's own that must resume
    exactly after a Ctrl-C holds the signals around its steps itself."""

    def __init__(self):
        self.depth, self.saved, self.caught = 0, {}, []

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            if self.depth == 0:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    handler = signal.getsignal(sig)
                    if callable(handler):
                        signal.signal(sig, self._catch)
                        self.saved[sig] = handler
            self.depth += 1
        return self

    def __exit__(self, *exc) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self.depth -= 1
        if self.depth == 0:
            saved, caught = self.saved, self.caught
            self.saved, self.caught = {}, []
            for sig, handler in saved.items():
                signal.signal(sig, handler)
            for sig, frame in caught:
                saved[sig](sig, frame)

    def _catch(self, sig, frame) -> None:
        self.caught.append((sig, frame))


_signals_held = _SignalsHeld()


# ----------------------------------------------------------------------------
# Gradient clipping
# ----------------------------------------------------------------------------


def clip_grad_norm(params: Union[Iterable[Parameter], Module, "Optimizer"], max_norm: float) -> float:
    """Scale all gradients by min(1, max_norm / (‖g‖ + 1e-6)), ‖g‖ the global L2
    norm over every parameter (torch.nn.utils.clip_grad_norm_). Returns ‖g‖
    before clipping. ``params``: Parameters, a Module (its parameters) or an
    :class:`Optimizer`: then its flat gradient buffer is used (two whole-buffer
    operations, no per-parameter loop)."""
    _check_hyper("max_norm", max_norm, allow_inf=True)  # (inf: no clipping, as in torch)
    max_norm = float(max_norm)
    if isinstance(params, Optimizer):
        grads = [params.flat_grad()]
    else:
        params = params.parameters() if isinstance(params, Module) else list(params)  # (a Sequential iterated its layers)
        for i, p in enumerate(params):
            if not isinstance(p, Parameter):
                raise TypeError(f"params must hold qkv_native.nn.Parameters, got {type(p).__name__} at {i}")
        grads = [p.grad.ravel() for p in params]
    total = math.sqrt(sum(float(np.dot(g, g)) for g in grads))
    coef = min(1.0, max_norm / (total + 1e-6))
    if coef < 1.0:
        for g in grads:
            g *= F32(coef)
    return total


def decay_matrices_only(name: str, param: Parameter) -> bool:
    """A ``decay`` filter: weight decay for matrices, none for biases, LayerNorm
    weights, embeddings' 1-D tokens (anything with fewer than 2 dimensions)."""
    return param.data.ndim >= 2


# ----------------------------------------------------------------------------
# Optimizers
# ----------------------------------------------------------------------------

ParamsLike = Union[Module, Mapping[str, Parameter], Iterable[Tuple[str, Parameter]], Iterable[Parameter]]


class _FlatParams:
    """Note [flat parameters]
    The parameters of an optimizer live back to back in one float32 buffer ``w`` and
    their gradients in ``g``; each ``Parameter.data`` / ``.grad`` is a view into them
    (same shape, C-contiguous), so layers, checkpoints and users see no difference,
    while an update, zero_grad or the gradient norm is one pass over one buffer. A
    parameter whose ``data`` or ``grad`` was replaced by another array since (a
    user's assignment, another optimizer attaching the same parameter) is noticed
    before every step (:meth:`intact`) and the buffers are rebuilt around the
    current arrays (their values are copied, nothing is lost). The new arrays must have
    the parameter's shape (a ValueError otherwise: a (1, n) grad was broadcast into an
    (m, n) parameter's, a new shape met the state's old layout).
    """

    def __init__(self, params: List[Parameter]):
        self.params = params
        sizes = [p.data.size for p in params]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # (n_params + 1,)
        self.w = np.empty(int(self.offsets[-1]), F32)  # (n,) all parameters
        self.g = np.empty_like(self.w)  # (n,) all gradients
        self._views = []
        for i, p in enumerate(params):
            w, g = self.view(self.w, i), self.view(self.g, i)
            np.copyto(w, p.data)
            np.copyto(g, p.grad)
            p.data, p.grad = w, g
            self._views.append((w, g))

    def intact(self) -> bool:
        """Whether every parameter still holds this buffer's views."""
        return all(p.data is w and p.grad is g for p, (w, g) in zip(self.params, self._views))

    def view(self, flat: np.ndarray, i: int) -> np.ndarray:
        """Parameter i's part of a flat (n,) buffer, in its shape."""
        return flat[self.offsets[i] : self.offsets[i + 1]].reshape(self.params[i].data.shape)


def _check_hyper(name: str, value: float, low: Optional[float] = 0.0, *, allow_inf: bool = False) -> None:
    """A hyperparameter must be a real number, not NaN, >= low unless low is None, and
    finite unless allow_inf (TypeError / ValueError naming it)."""
    value = _F._real(value, name)
    if math.isnan(value) or (math.isinf(value) and not allow_inf) or (low is not None and value < low):
        what = ("a number" if allow_inf else "a finite number") + ("" if low is None else f" >= {low:g}")
        raise ValueError(f"{name} must be {what}, got {value}")


class Optimizer:
    """Base: holds the named parameters, per-parameter state slots, the step
    count and the schedule.

    params: a Module, a {name: Parameter} dict, (name, Parameter) pairs or Parameters (named "0", "1", ...);
    may be left out and given later with :meth:`attach` (the Trainer does this).
    decay: ``f(name, param) -> bool`` choosing which parameters get weight decay
    (default: all, as in torch); asked once per parameter, at attach.
    Parameters and state live in flat buffers (Note [flat parameters]):
    ``state[name][slot]`` are views of the flat (n,) arrays ``flat_state[slot]``.
    """

    #: names of the per-parameter state arrays, created as zeros
    slots: Tuple[str, ...] = ()

    def __init__(
        self,
        params: Optional[ParamsLike] = None,
        *,
        lr: float,
        weight_decay: float = 0.0,
        schedule: Optional[Schedule] = None,
        decay: Optional[Callable[[str, Parameter], bool]] = None,
    ):
        _check_hyper("lr", lr)
        _check_hyper("weight_decay", weight_decay)
        if schedule is not None and not isinstance(schedule, Schedule):  # (a function failed at the first step)
            raise TypeError(f"schedule must be a qkv_native.optim.Schedule or None, got {type(schedule).__name__}")
        if decay is not None and not callable(decay):
            raise TypeError(f"decay must be a function f(name, param) -> bool or None, got {type(decay).__name__}")
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.schedule = schedule if schedule is not None else Constant()
        self.decay = decay
        self.step_count = 0
        self.params: List[Tuple[str, Parameter]] = []
        self.state: Dict[str, Dict[str, np.ndarray]] = {}
        self.flat_state: Dict[str, np.ndarray] = {}
        self._flat: Optional[_FlatParams] = None
        self._decay_mask = np.zeros(0, np.bool_)  # (n_params,) weight decay on
        if params is not None:
            self.attach(params)

    @property
    def attached(self) -> bool:
        return bool(self.params)

    def attach(self, params: ParamsLike) -> "Optimizer":
        """Bind the parameters to update (resets the state and the step count) and
        move them into the flat buffers (Note [flat parameters])."""
        if isinstance(params, Module):
            named = list(params.named_parameters())
        elif isinstance(params, Mapping):  # (iterating a dict gave its names, split into letters)
            named = [(str(n), p) for n, p in params.items()]
        else:
            named = []
            for i, p in enumerate(params):
                if not isinstance(p, (Parameter, tuple, list)) or (not isinstance(p, Parameter) and len(p) != 2):
                    raise TypeError(f"params must hold Parameters or (name, Parameter) pairs, got {type(p).__name__} at {i}")
                named.append((str(i), p) if isinstance(p, Parameter) else (str(p[0]), p[1]))
        for name, p in named:
            if not isinstance(p, Parameter):
                raise TypeError(f"parameter {name!r} must be a qkv_native.nn.Parameter, got {type(p).__name__}")
        if not named:
            raise ValueError("params is empty: nothing to optimize")
        if len({id(p) for _, p in named}) != len(named):
            raise ValueError("params lists the same Parameter twice")
        names = [n for n, _ in named]
        if len(set(names)) != len(names):  # (state and checkpoints are keyed by name)
            dups = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"params names two Parameters alike: {dups}")
        self.params = named
        self._decay_mask = np.array([self.decay is None or bool(self.decay(n, p)) for n, p in named], np.bool_)
        self._flat = _FlatParams([p for _, p in named])
        self.flat_state = {s: np.zeros_like(self._flat.w) for s in self.slots}
        self._bind_state()
        self.step_count = 0
        return self

    def __setstate__(self, state: dict) -> None:
        # A copy (copy.deepcopy, pickle: a spawn worker, a saved Trainer) holds each
        # parameter's data/grad and each state slot as standalone arrays, no longer views
        # of its flat buffers: an update would have gone to the buffers alone, and the
        # copy never trained. Bind them again (Note [flat parameters]).
        self.__dict__.update(state)
        if self.params:
            self._flat = _FlatParams(self._flat.params)
            self._bind_state()

    def _bind_state(self) -> None:
        """state[name][slot]: views of the flat state buffers, one per parameter."""
        self.state = {
            name: {s: self._flat.view(self.flat_state[s], i) for s in self.slots}
            for i, (name, _) in enumerate(self.params)
        }

    def _ready(self) -> _FlatParams:
        """The flat buffers, rebuilt first if a parameter's arrays were replaced."""
        if not self.params:
            raise RuntimeError("the optimizer has no parameters: pass params or call attach(model)")
        if not self._flat.intact():
            for (name, p), (w, _) in zip(self.params, self._flat._views):  # the state layout must still fit
                if np.shape(p.data) != w.shape or np.shape(p.grad) != w.shape:
                    raise ValueError(
                        f"parameter {name!r} must keep its shape {w.shape} (its data and grad were replaced: "
                        f"now {np.shape(p.data)} and {np.shape(p.grad)}); attach the optimizer again "
                        f"for new shapes (its state then starts afresh)")
            self._flat = _FlatParams(self._flat.params)
        return self._flat

    def flat_grad(self) -> np.ndarray:
        """All gradients as one flat (n,) float32 array (the live buffer, not a copy)."""
        return self._ready().g

    def current_lr(self) -> float:
        """The learning rate the next :meth:`step` uses (a finite number >= 0: a
        schedule that gives anything else raises ValueError here, before any update)."""
        try:
            lr = self.lr * float(self.schedule.factor(self.step_count))
        except OverflowError:
            lr = math.inf
        if not (math.isfinite(lr) and lr >= 0.0):
            raise ValueError(f"the schedule {self.schedule.config()} gives the learning rate {lr} at step {self.step_count}")
        return lr

    def zero_grad(self) -> None:
        self._ready().g.fill(0.0)

    def step(self) -> None:
        """One update of every attached parameter from its grad (one native call). On its own
        not atomic under Ctrl-C; Trainer.fit holds the signals around it (Note [held signals])."""
        flat = self._ready()
        self._update(flat, self.current_lr())
        self.step_count += 1

    def _update(self, flat: _FlatParams, lr: float) -> None:
        raise NotImplementedError

    def config(self) -> dict:
        return {
            "type": type(self).__name__,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "schedule": self.schedule.config(),
        }

    # -- checkpoint state ----------------------------------------------------
    def state_dict(self) -> Tuple[Dict[str, np.ndarray], dict]:
        """(arrays "slot/name" -> copy, meta with the type, step count and config)."""
        arrays = {f"{s}/{n}": a.copy() for n, st in self.state.items() for s, a in st.items()}
        return arrays, {"type": type(self).__name__, "step_count": self.step_count, "config": self.config()}

    def load_state_dict(self, arrays: Dict[str, np.ndarray], meta: dict) -> None:
        """Restore :meth:`state_dict` into an attached optimizer (attach resets the state); the
        type, slot names and shapes must match."""
        if not self.params:  # (the step count was taken, then reset by the attach to come)
            raise RuntimeError("the optimizer has no parameters to load a state into: attach it (or pass params) first")
        if meta.get("type") != type(self).__name__:
            raise ValueError(f"optimizer state is for {meta.get('type')!r}, this optimizer is {type(self).__name__}")
        want = {f"{s}/{n}": a for n, st in self.state.items() for s, a in st.items()}
        missing, unexpected = sorted(set(want) - set(arrays)), sorted(set(arrays) - set(want))
        if missing or unexpected:
            raise ValueError(f"optimizer state names differ: missing {missing}, unexpected {unexpected}")
        bad = [f"{k}: expected {want[k].shape}, got {arrays[k].shape}" for k in want if want[k].shape != arrays[k].shape]
        if bad:
            raise ValueError("optimizer state shapes differ: " + "; ".join(bad))
        step_count = meta.get("step_count")
        _F._check_int(step_count, "optimizer step_count", 0)
        values = {k: np.asarray(arrays[k], dtype=F32) for k in want}  # all converted before any is copied
        for k, a in want.items():
            np.copyto(a, values[k])
        self.step_count = int(step_count)


class SGD(Optimizer):
    """torch.optim.SGD: d = g + wd·w; buf = momentum·buf + (1 - dampening)·d
    (buf = d on the first step); d = d + momentum·buf (Nesterov) or buf;
    w -= lr·d."""

    def __init__(
        self,
        params: Optional[ParamsLike] = None,
        *,
        lr: float = 0.01,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        schedule: Optional[Schedule] = None,
        decay: Optional[Callable[[str, Parameter], bool]] = None,
    ):
        _check_hyper("momentum", momentum)
        _check_hyper("dampening", dampening, low=None)
        nesterov = _F._flag(nesterov, "nesterov")
        if nesterov and (momentum <= 0.0 or dampening != 0.0):
            raise ValueError("nesterov needs momentum > 0 and dampening = 0")
        self.momentum, self.dampening, self.nesterov = float(momentum), float(dampening), nesterov
        self.slots = ("momentum",) if momentum else ()
        super().__init__(params, lr=lr, weight_decay=weight_decay, schedule=schedule, decay=decay)

    def config(self):
        return {**super().config(), "momentum": self.momentum, "dampening": self.dampening, "nesterov": self.nesterov}

    def _update(self, flat, lr):
        _F.sgd_update(
            flat.w, flat.g, self.flat_state.get("momentum"), flat.offsets, self._decay_mask,
            lr=lr, momentum=self.momentum, dampening=self.dampening, nesterov=self.nesterov,
            weight_decay=self.weight_decay, first=self.step_count == 0,
        )


class Adam(Optimizer):
    """torch.optim.Adam (weight decay as L2: g += wd·w):
    m = β1·m + (1-β1)·g; v = β2·v + (1-β2)·g²;
    w -= lr/(1-β1^t) · m / (√v/√(1-β2^t) + eps)."""

    slots = ("exp_avg", "exp_avg_sq")
    decoupled = False

    def __init__(
        self,
        params: Optional[ParamsLike] = None,
        *,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        schedule: Optional[Schedule] = None,
        decay: Optional[Callable[[str, Parameter], bool]] = None,
    ):
        try:
            b1, b2 = betas
        except (TypeError, ValueError):
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
        b1, b2 = _F._real(b1, "betas[0]"), _F._real(b2, "betas[1]")
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        _check_hyper("eps", eps)
        self.betas, self.eps = (float(b1), float(b2)), float(eps)
        super().__init__(params, lr=lr, weight_decay=weight_decay, schedule=schedule, decay=decay)

    def config(self):
        return {**super().config(), "betas": list(self.betas), "eps": self.eps}

    def _update(self, flat, lr):
        _F.adam_update(
            flat.w, flat.g, self.flat_state["exp_avg"], self.flat_state["exp_avg_sq"], flat.offsets,
            self._decay_mask, lr=lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay,
            decoupled=self.decoupled, step=self.step_count + 1,
        )


class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay w *= 1 - lr·wd
    (default weight_decay 0.01, torch's)."""

    decoupled = True

    def __init__(self, params: Optional[ParamsLike] = None, *, weight_decay: float = 0.01, **kwargs):
        super().__init__(params, weight_decay=weight_decay, **kwargs)
