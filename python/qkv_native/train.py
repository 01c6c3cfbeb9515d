"""A gradient-descent trainer: fit / evaluate / predict, callbacks, checkpoints.

    model = attention_classifier(d_in=8, seq=8, num_classes=10)
    trainer = Trainer(model, loss="cross_entropy", optimizer=AdamW(lr=3e-3))
    history = trainer.fit(x_train, y_train, epochs=20, batch_size=64,
                          validation=(x_val, y_val), seed=0)
    trainer.save("run.ckpt.npz")          # weights, optimizer, schedule, RNG, epoch

Determinism: the batch order of epoch e is a permutation drawn from
``numpy.random.default_rng((seed, e))`` and dropout draws from generators whose
states are checkpointed, so ``load`` + ``fit`` continues exactly where an
uninterrupted run with the same seed would be. That holds for a fit stopped part-way
through an epoch too (Ctrl-C, an exception): the next ``fit``, or a checkpoint saved then,
continues that epoch with its next batch (Note [stopped part-way]).
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import nn as qnn
from .nn import CheckpointError, CrossEntropyLoss, Module, MSELoss, load_arrays, save_arrays
from .functional import _check_int, _flag, _real
from .optim import AdamW, Optimizer, _check_hyper, clip_grad_norm, _signals_held

__all__ = [
    "Trainer",
    "Callback",
    "EarlyStopping",
    "ModelCheckpoint",
    "attention_classifier",
]

F32 = np.float32
_LOSSES = {"cross_entropy": CrossEntropyLoss, "mse": MSELoss}


class Callback:
    """Hooks called by :meth:`Trainer.fit`. Set ``trainer.stop_training = True``
    to stop after the current epoch. ``state``/``load_state`` (JSON-able dicts)
    are saved in trainer checkpoints."""

    def on_train_begin(self, trainer: "Trainer") -> None:
        pass

    def on_batch_end(self, trainer: "Trainer", step: int, logs: dict) -> None:
        pass

    def on_epoch_end(self, trainer: "Trainer", epoch: int, logs: dict) -> None:
        pass

    def on_train_end(self, trainer: "Trainer") -> None:
        pass

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass


class EarlyStopping(Callback):
    """Stop when ``monitor`` (a key of the epoch logs, e.g. "val_loss",
    "val_accuracy") has not improved by more than ``min_delta`` for ``patience``
    epochs. mode "min"/"max" ("auto": max for names containing "acc").
    patience: an integer >= 0; min_delta: a finite number >= 0. A NaN value never improves.

    ``restore_best``: when training stops early (``trainer.stop_training`` set at the
    end of :meth:`Trainer.fit`, by this or another callback), put back the weights of
    the best epoch seen in this process. When ``fit`` ends because its ``epochs`` ran
    out, the last epoch's weights stay (as Keras' ``restore_best_weights``), so that
    ``fit(epochs=3)`` then ``fit(epochs=6)`` trains exactly as ``fit(epochs=6)``.
    The best weights live in memory, not in checkpoints: after :meth:`Trainer.load`
    there is nothing to restore until an epoch improves on the restored ``best``."""

    def __init__(self, monitor: str = "val_loss", *, patience: int = 5, min_delta: float = 0.0,
                 mode: str = "auto", restore_best: bool = True):
        if not isinstance(monitor, str):  # (a key of the epoch logs)
            raise TypeError(f"monitor must be a str, got {type(monitor).__name__}")
        if mode == "auto":
            mode = "max" if "acc" in monitor else "min"
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min', 'max' or 'auto', got {mode!r}")
        _check_int(patience, "patience", 0)
        _check_hyper("min_delta", min_delta)
        self.monitor, self.patience, self.min_delta = monitor, int(patience), float(min_delta)
        self.mode, self.restore_best = mode, _flag(restore_best, "restore_best")
        self.best: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.wait = 0
        self._best_weights = None

    def on_epoch_end(self, trainer, epoch, logs):
        if self.monitor not in logs:
            raise KeyError(f"EarlyStopping monitors {self.monitor!r}, but the epoch logs hold {sorted(logs)}")
        value = float(logs[self.monitor])
        better = not math.isnan(value) and (  # (a NaN is no improvement: it was the best for good)
            self.best is None
            or (self.mode == "min" and value < self.best - self.min_delta)
            or (self.mode == "max" and value > self.best + self.min_delta)
        )
        if better:
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best:
                self._best_weights = trainer.model.state_dict()
        else:
            self.wait += 1
            if self.wait >= self.patience:
                trainer.stop_training = True

    def on_train_end(self, trainer):
        if self.restore_best and self._best_weights is not None and trainer.stop_training:
            trainer.model.load_state_dict(self._best_weights)

    def state(self):
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait}

    def load_state(self, state):
        self.best, self.best_epoch, self.wait = state["best"], state["best_epoch"], int(state["wait"])


class ModelCheckpoint(Callback):
    """Save the trainer to ``path`` every ``every`` epochs (atomic writes); every: an integer >= 1.
    At an epoch's end it runs after the other callbacks, wherever it stands in the list, so
    that the file holds their states after that epoch (an EarlyStopping listed after it had
    its update for the epoch left out, and a resumed run stopped an epoch late)."""

    def __init__(self, path: str, every: int = 1):
        _check_int(every, "every", 1)
        if not isinstance(path, (str, os.PathLike)):  # (None failed at the end of the first epoch)
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        self.path, self.every = path, int(every)

    def on_epoch_end(self, trainer, epoch, logs):
        if (epoch + 1) % self.every == 0:
            trainer.save(self.path)


def _progress_bar(total: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    # the bar lives on stderr while the epoch runs and is removed at its end,
    # leaving the one summary line per epoch that fit() prints
    return tqdm(total=total, desc=desc, unit="sample", leave=False, dynamic_ncols=True, file=sys.stderr)


class Trainer:
    """Mini-batch training of ``model`` (a :class:`qkv_native.nn.Module`).

    loss: "cross_entropy", "mse" or a loss object (``forward(pred, target) -> float``,
    ``backward() -> dpred``); the reported losses are means over what the loss
    averages (see :meth:`evaluate`). optimizer: an :class:`qkv_native.optim.Optimizer`
    (attached to the model's parameters here if it is not yet); default AdamW(lr=1e-3).
    clip_grad_norm: clip the global gradient norm to this (a number >= 0) before each step.
    progress: per-epoch progress (tqdm when installed, else one printed line per epoch).
    """

    def __init__(
        self,
        model: Module,
        loss: Union[str, object] = "cross_entropy",
        optimizer: Optional[Optimizer] = None,
        *,
        clip_grad_norm: Optional[float] = None,
        callbacks: Sequence[Callback] = (),
        progress: bool = True,
    ):
        if not isinstance(model, Module):
            raise TypeError(f"model must be a qkv_native.nn.Module, got {type(model).__name__}")
        if isinstance(loss, str):
            if loss not in _LOSSES:
                raise ValueError(f"loss must be one of {sorted(_LOSSES)} or a loss object, got {loss!r}")
            loss = _LOSSES[loss]()
        elif isinstance(loss, type) or not (callable(getattr(loss, "forward", None))
                                            and callable(getattr(loss, "backward", None))):
            # (a class such as CrossEntropyLoss has both as functions, and failed at the first batch)
            raise TypeError(f"loss must be one of {sorted(_LOSSES)} or a loss object with forward(pred, target) "
                            f"and backward() methods, got {'the class ' + loss.__name__ if isinstance(loss, type) else type(loss).__name__}")
        if optimizer is not None and not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a qkv_native.optim.Optimizer or None, got {type(optimizer).__name__}")
        if clip_grad_norm is not None:
            _check_hyper("clip_grad_norm", clip_grad_norm, allow_inf=True)
        self.model, self.loss = model, loss
        self.optimizer = optimizer if optimizer is not None else AdamW(lr=1e-3)
        self._attached_here = None  # the optimizer this trainer attached: it must keep to the model's parameters
        if not self.optimizer.attached:
            self._attached_here = self.optimizer.attach(model)
        self.clip_grad_norm = clip_grad_norm
        self._flat_grads = self._check_optimizer()
        self.callbacks = list(callbacks)
        self.progress = _flag(progress, "progress")
        self.epoch = 0  # epochs completed
        self._partial: Optional[dict] = None  # epoch self.epoch so far (Note [stopped part-way])
        self.seed = 0
        self.stop_training = False
        self.history: Dict[str, List[float]] = {}

    @property
    def _classifies(self) -> bool:
        return isinstance(self.loss, CrossEntropyLoss)

    def _check_optimizer(self) -> bool:
        """Whether the optimizer updates exactly the model's parameters: then zeroing and
        clipping the gradients are one pass over its flat gradient buffer (Note [flat parameters]).
        An optimizer that updates none of them (attached to another model) is a ValueError:
        the model never trained; so is one the trainer attached whose parameters are no
        longer the model's (a layer replaced since: the new layer never trained)."""
        opt, model = {id(p) for _, p in self.optimizer.params}, {id(p) for p in self.model.parameters()}
        if model and not opt & model:
            raise ValueError("optimizer is attached to none of the model's parameters (to another model?): "
                             "pass an optimizer without parameters, or attached to this model's")
        if self._attached_here is self.optimizer and opt != model:  # (a replaced layer: never trained)
            new = [n for n, p in self.model.named_parameters() if id(p) not in opt]
            gone = [n for n, p in self.optimizer.params if id(p) not in model]
            raise ValueError(
                f"the model's parameters changed since the trainer attached its optimizer to them (new {new}, "
                f"gone {gone}): attach it again, trainer.optimizer.attach(trainer.model), to train them all "
                f"(its state then starts afresh)")
        return opt == model

    # -- one step --------------------------------------------------------------
    def train_step(self, xb: np.ndarray, yb: np.ndarray) -> Tuple[float, np.ndarray]:
        """forward, loss, zero_grad, backward, clip, optimizer step. Returns (loss, output)."""
        loss, out = self._gradients(xb, yb)
        self.optimizer.step()
        return loss, out

    def _gradients(self, xb: np.ndarray, yb: np.ndarray) -> Tuple[float, np.ndarray]:
        """:meth:`train_step` up to the optimizer step."""
        self.model.train()
        out = self.model.forward(xb)
        loss = self.loss.forward(out, yb)
        self.optimizer.zero_grad()
        if not self._flat_grads:  # (parameters of the model's that the optimizer leaves alone)
            self.model.zero_grad()
        self.model.backward(self.loss.backward())
        if self.clip_grad_norm is not None:
            clip_grad_norm(self.optimizer if self._flat_grads else self.model.parameters(), self.clip_grad_norm)
        return loss, out

    def _correct(self, out: np.ndarray, yb: np.ndarray) -> Tuple[int, int]:
        valid = yb != self.loss.ignore_index
        return int(np.sum((out.argmax(axis=-1) == yb) & valid)), int(valid.sum())

    def _loss_count(self, out: np.ndarray, yb: np.ndarray) -> int:
        """How many terms the loss of this batch is the mean of, so that batch losses
        weighted by it sum to the loss of the whole data as one batch: the targets
        that are not ``ignore_index`` (cross-entropy), the elements (MSE), else the samples."""
        if isinstance(self.loss, CrossEntropyLoss):
            return int(np.count_nonzero(np.asarray(yb) != self.loss.ignore_index))
        if isinstance(self.loss, MSELoss):
            return int(np.size(out))
        return len(yb)

    # -- fit / evaluate / predict -----------------------------------------------
    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        epochs: int,
        batch_size: int = 32,
        *,
        validation: Optional[Tuple[np.ndarray, np.ndarray]] = None,
        shuffle: bool = True,
        seed: Optional[int] = None,
    ) -> Dict[str, List[float]]:
        """Train until ``epochs`` epochs are completed (a trainer restored with
        :meth:`load` continues from its checkpoint's epoch). x: (n, ...) float32
        inputs, y: (n, ...) targets. Returns the history: per-epoch lists of
        "loss", "accuracy" (classification), "val_loss", "val_accuracy",
        "time" (s), "samples_per_s", "lr". "loss" is the mean of the batch losses
        weighted by what each averages (non-ignored targets for cross-entropy, see
        :meth:`evaluate`), so it does not depend on how the data is cut into batches.
        epochs: an integer >= 0; seed: an integer >= 0, the batch order (default: the
        trainer's, 0 or the one restored by :meth:`load`). After a fit stopped part-way
        through an epoch, fit continues that epoch with its next batch (x of as many
        samples, shuffle and seed as they were; Note [stopped part-way])."""
        x, y = _check_data(x, y, "x", "y")
        if validation is not None:  # (checked now: after an epoch's training, its weights would be lost to the error)
            if not isinstance(validation, (tuple, list)) or len(validation) != 2:
                raise TypeError(f"validation must be a pair (x_val, y_val), got {type(validation).__name__}"
                                + (f" of length {len(validation)}" if isinstance(validation, (tuple, list)) else ""))
            validation = _check_data(*validation, "validation[0]", "validation[1]")
            if len(validation[0]) == 0:
                raise ValueError("validation[0] holds no samples: nothing to validate on")
        _check_int(epochs, "epochs", 0)
        _check_int(batch_size, "batch_size", 1)
        shuffle = _flag(shuffle, "shuffle")
        if seed is not None:
            _check_int(seed, "seed", 0)
        n = len(x)
        if n == 0:
            raise ValueError("x holds no samples: nothing to train on")
        if seed is not None:
            self.seed = int(seed)
        self._flat_grads = self._check_optimizer()  # the model may have changed since
        self.stop_training = False
        for cb in self.callbacks:
            cb.on_train_begin(self)
        step = 0
        drops = [(path, m) for path, m in qnn._named_modules(self.model) if isinstance(m, qnn.Dropout)]
        while self.epoch < epochs and not self.stop_training:
            e = self.epoch
            part = self._epoch_part(n, shuffle)
            order = np.random.default_rng((self.seed, e)).permutation(n) if shuffle else np.arange(n)
            bar = _progress_bar(n, f"epoch {e + 1}/{epochs}") if self.progress else None
            if bar is not None:
                bar.update(part["samples"])
            t0 = time.perf_counter() - part["time"]
            for start in range(part["samples"], n, batch_size):
                idx = order[start : start + batch_size]
                yb = y[idx]
                loss, out = self._gradients(x[idx], yb)
                terms = self._loss_count(out, yb)
                c, k = self._correct(out, yb) if self._classifies else (0, 0)
                done = dict(  # the record once this batch's update is in
                    part, samples=start + len(idx), loss_sum=part["loss_sum"] + float(loss) * terms,
                    loss_count=part["loss_count"] + terms, correct=part["correct"] + c, counted=part["counted"] + k,
                    time=time.perf_counter() - t0, rng={path: m.rng.bit_generator.state for path, m in drops},
                )
                with _signals_held:  # the update and its record, as one (Note [held signals])
                    self.optimizer.step()
                    self._partial = part = done
                logs = {"loss": loss}
                for cb in self.callbacks:
                    cb.on_batch_end(self, step, logs)
                step += 1
                if bar is not None:
                    bar.update(len(idx))
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            dt, lr = time.perf_counter() - t0, part["lr"]
            logs = {"loss": part["loss_sum"] / max(part["loss_count"], 1)}
            if self._classifies:
                logs["accuracy"] = part["correct"] / max(part["counted"], 1)
            if validation is not None:
                val = self.evaluate(*validation)
                logs.update({"val_" + k: v for k, v in val.items()})
            logs.update({"time": dt, "samples_per_s": n / dt if dt > 0 else float("inf"), "lr": lr})
            with _signals_held:  # the epoch's count and its history, as one
                self.epoch, self._partial = self.epoch + 1, None
                for k, v in logs.items():
                    self.history.setdefault(k, []).append(float(v))
            if bar is not None:
                bar.close()
            if self.progress:
                print(_format_logs(e + 1, epochs, logs), flush=True)
            for cb in sorted(self.callbacks, key=lambda cb: isinstance(cb, ModelCheckpoint)):  # (stable)
                cb.on_epoch_end(self, e, logs)
        for cb in self.callbacks:
            cb.on_train_end(self)
        return self.history

    def _epoch_part(self, n: int, shuffle: bool) -> dict:
        """The record of epoch ``self.epoch`` so far (Note [stopped part-way]): a new one, or that
        of a fit stopped in this epoch, whose dropout generators are then put back as they were
        after its last completed batch.

        Note [stopped part-way]
        A fit stopped by an exception or Ctrl-C between or inside batches leaves weights and
        optimizer updated by the epoch's completed batches. The epoch's batch order is a
        function of (seed, epoch) alone, so the next fit (or a save and load) continues with
        the batch after the last completed one, with the dropout states and loss sums it left:
        as an uninterrupted run would, not running those batches a second time."""
        part = self._partial
        if part is not None:
            if part["samples"] and (part["n"], part["shuffle"], part["seed"]) != (n, shuffle, self.seed):
                raise ValueError(
                    f"epoch {self.epoch + 1} stopped part-way ({part['samples']} of {part['n']} samples done, "
                    f"shuffle={part['shuffle']}, seed={part['seed']}): fit continues it, so x must hold "
                    f"{part['n']} samples and shuffle and seed must be as they were (got {n} samples, "
                    f"shuffle={shuffle}, seed={self.seed}; a new Trainer of this model and optimizer starts an "
                    f"epoch afresh)"
                )
            self.model.set_rng_states(part["rng"])
            if part["samples"]:
                return part
            # (no batch done: the epoch starts afresh, on any data)
        self._partial = part = {
            "n": n, "shuffle": shuffle, "seed": self.seed, "samples": 0, "loss_sum": 0.0, "loss_count": 0,
            "correct": 0, "counted": 0, "time": 0.0, "lr": self.optimizer.current_lr(), "rng": self.model.rng_states(),
        }
        return part

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> Dict[str, float]:
        """Mean loss (and accuracy for classification) in eval mode (no dropout).

        The loss is that of all of x, y as one batch, whatever ``batch_size``: each
        batch's loss is weighted by how many terms it averages (for cross-entropy the
        targets that are not ``ignore_index``; all ignored: 0). x: (n, ...) with n >= 1."""
        x, y = _check_data(x, y, "x", "y")
        _check_int(batch_size, "batch_size", 1)
        if len(x) == 0:
            raise ValueError("x holds no samples: nothing to evaluate")
        was_training = self.model.training
        self.model.eval()
        try:
            loss_sum, loss_count, correct, counted = 0.0, 0, 0, 0
            for start in range(0, len(x), batch_size):
                xb, yb = x[start : start + batch_size], y[start : start + batch_size]
                out = self.model.forward(xb)
                loss = float(self.loss.forward(out, yb))
                terms = self._loss_count(out, yb)
                loss_sum, loss_count = loss_sum + loss * terms, loss_count + terms
                if self._classifies:
                    c, k = self._correct(out, yb)
                    correct, counted = correct + c, counted + k
        finally:
            self.model.train(was_training)
        result = {"loss": loss_sum / max(loss_count, 1)}
        if self._classifies:
            result["accuracy"] = correct / max(counted, 1)
        return result

    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """The model's outputs for x in eval mode, batch by batch, concatenated."""
        x = _check_inputs(x, "x")
        _check_int(batch_size, "batch_size", 1)
        if len(x) == 0:
            raise ValueError("x holds no samples: nothing to predict")
        was_training = self.model.training
        self.model.eval()
        try:
            outs = [self.model.forward(x[s : s + batch_size]) for s in range(0, len(x), batch_size)]
        finally:
            self.model.train(was_training)
        return np.concatenate(outs, axis=0)

    # -- checkpoints -------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write weights, optimizer state (incl. the step count = schedule position),
        dropout RNG states, seed, epoch, history and callback states to ``path``
        (an .npz with a JSON header and sha256; written atomically)."""
        arrays = {"model/" + n: a for n, a in self.model.state_dict().items()}
        opt_arrays, opt_meta = self.optimizer.state_dict()
        arrays.update({"optim/" + n: a for n, a in opt_arrays.items()})
        meta = {
            "kind": "trainer",
            "model": type(self.model).__name__,
            "epoch": self.epoch,
            "seed": self.seed,
            "optimizer": opt_meta,
            "rng": self.model.rng_states(),
            "history": self.history,
            "callbacks": [{"type": type(cb).__name__, "state": cb.state()} for cb in self.callbacks],
            "partial": self._partial,  # (an epoch stopped part-way: Note [stopped part-way])
        }
        save_arrays(path, arrays, meta)

    def load(self, path: str) -> None:
        """Restore a :meth:`save` d state into this trainer (same architecture and
        optimizer type). Raises CheckpointError on a corrupt file or any mismatch
        of names or shapes; nothing is changed then."""
        arrays, meta = load_arrays(path)
        if meta.get("kind") != "trainer":
            raise CheckpointError(f"{path}: not a trainer checkpoint (kind {meta.get('kind')!r})")
        # Every field is read and checked before anything is changed.
        try:
            epoch, seed = meta["epoch"], meta.get("seed", 0)
            for name, v in (("epoch", epoch), ("seed", seed)):
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
            history = {str(k): [float(x) for x in v] for k, v in dict(meta.get("history", {})).items()}
            saved_cbs = list(meta.get("callbacks", []))
            cb_types = [c["type"] for c in saved_cbs]
            optimizer_meta = meta["optimizer"]
            rng_states = meta.get("rng", {})
            partial = _check_partial(meta.get("partial"))
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as err:
            raise CheckpointError(f"{path}: malformed trainer metadata ({type(err).__name__}: {err})") from None
        model_state = {n[len("model/") :]: a for n, a in arrays.items() if n.startswith("model/")}
        opt_state = {n[len("optim/") :]: a for n, a in arrays.items() if n.startswith("optim/")}
        backup_model = self.model.state_dict()
        backup_opt = self.optimizer.state_dict()
        backup_rng = self.model.rng_states()
        backup_cbs = [cb.state() for cb in self.callbacks]
        try:
            self.model.load_state_dict(model_state)
            self.optimizer.load_state_dict(opt_state, optimizer_meta)
            self.model.set_rng_states(rng_states)
            if partial is not None:
                self.model.set_rng_states(partial["rng"])
            if cb_types == [type(cb).__name__ for cb in self.callbacks]:
                for cb, c in zip(self.callbacks, saved_cbs):
                    cb.load_state(c["state"])
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as err:
            self.model.load_state_dict(backup_model)
            self.optimizer.load_state_dict(*backup_opt)
            self.model.set_rng_states(backup_rng)
            for cb, st in zip(self.callbacks, backup_cbs):
                cb.load_state(st)
            raise CheckpointError(f"{path}: does not match this trainer: {err}") from None
        self.epoch, self.seed, self.history, self._partial = epoch, seed, history, partial


def _check_partial(partial) -> Optional[dict]:
    """A checkpoint's record of an epoch stopped part-way (None: none), checked field by field."""
    if partial is None:
        return None
    fields = {"n": int, "shuffle": bool, "seed": int, "samples": int, "loss_sum": float, "loss_count": int,
              "correct": int, "counted": int, "time": float, "lr": float, "rng": dict}
    if not isinstance(partial, dict) or set(partial) != set(fields):
        raise ValueError(f"partial must be an object with the fields {sorted(fields)}")
    for name, kind in fields.items():
        v = partial[name]
        if isinstance(v, bool) != (kind is bool) or not isinstance(v, (int, float) if kind is float else kind):
            raise ValueError(f"partial.{name} must be a {kind.__name__}, got {v!r}")
    if not 0 <= partial["samples"] <= partial["n"]:
        raise ValueError(f"partial.samples must lie in [0, n={partial['n']}], got {partial['samples']}")
    return dict(partial, loss_sum=float(partial["loss_sum"]), time=float(partial["time"]), lr=float(partial["lr"]))


def _check_inputs(x, name: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if x.dtype.kind == "f" and x.dtype != F32:
        raise TypeError(f"{name} must have dtype float32, got {x.dtype} (convert explicitly with .astype(np.float32))")
    if x.ndim == 0:
        raise ValueError(f"{name} must have a first axis of samples, got a 0-d array")
    return x


def _check_data(x, y, x_name: str, y_name: str) -> Tuple[np.ndarray, np.ndarray]:
    """Inputs and targets: x an ndarray (float32 if floating), y as long as x."""
    x, y = _check_inputs(x, x_name), np.asarray(y)
    if y.ndim == 0 or len(y) != len(x):
        raise ValueError(f"{x_name} and {y_name} must have the same length, got {len(x)} and "
                         f"{len(y) if y.ndim else 'a scalar'}")
    return x, y


def _format_logs(epoch: int, epochs: int, logs: dict) -> str:
    parts = [f"epoch {epoch:>{len(str(epochs))}}/{epochs}", f"loss {logs['loss']:.4f}"]
    if "accuracy" in logs:
        parts.append(f"acc {logs['accuracy']:.4f}")
    if "val_loss" in logs:
        parts.append(f"val_loss {logs['val_loss']:.4f}")
    if "val_accuracy" in logs:
        parts.append(f"val_acc {logs['val_accuracy']:.4f}")
    parts.append(f"{logs['samples_per_s']:.0f} samples/s")
    parts.append(f"{logs['time']:.3f} s/epoch")
    return "  ".join(parts)


def attention_classifier(
    d_in: int,
    seq: int,
    num_classes: int,
    *,
    d_model: int = 64,
    num_heads: int = 4,
    num_kv_heads: Optional[int] = None,
    num_layers: int = 2,
    d_ff: int = 128,
    dropout: float = 0.0,
    norm_first: bool = True,
    pool: str = "mean",
    positional: str = "learned",
    activation: str = "gelu",
    rng: qnn.RngLike = 0,
) -> qnn.Sequential:
    """A small transformer classifier: (batch, seq, d_in) float32 -> (batch, num_classes) logits.

    Linear(d_in, d_model) token embedding, positional encoding ("learned" or
    "sinusoidal"), [CLS token when pool="cls"], num_layers encoder blocks,
    final LayerNorm (pre-norm), mean or CLS pooling, Linear(d_model, num_classes).
    """
    if pool not in ("mean", "cls"):
        raise ValueError(f"pool must be 'mean' or 'cls', got {pool!r}")
    num_layers = _check_int(num_layers, "num_layers", 0)  # (-1 built a model without blocks)
    if not 0.0 <= _real(dropout, "dropout") < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
    if positional not in ("learned", "sinusoidal"):
        raise ValueError(f"positional must be 'learned' or 'sinusoidal', got {positional!r}")
    g = qnn._rng(rng)
    layers: List[Module] = [qnn.Linear(d_in, d_model, rng=g)]
    layers.append(
        qnn.LearnedPositionalEmbedding(seq, d_model, rng=g)
        if positional == "learned"
        else qnn.SinusoidalPositionalEncoding(seq, d_model)
    )
    if pool == "cls":
        layers.append(qnn.ClsToken(d_model, rng=g))
    if dropout:
        layers.append(qnn.Dropout(dropout, rng=g))
    for _ in range(num_layers):
        layers.append(
            qnn.TransformerEncoderBlock(
                d_model, num_heads, d_ff, num_kv_heads=num_kv_heads, norm_first=norm_first,
                activation=activation, dropout=dropout, rng=g,
            )
        )
    if norm_first:
        layers.append(qnn.LayerNorm(d_model))
    layers.append(qnn.MeanPool() if pool == "mean" else qnn.ClsPool())
    layers.append(qnn.Linear(d_model, num_classes, rng=g))
    return qnn.Sequential(*layers)
