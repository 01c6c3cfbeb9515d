"""``qkv-native train``: train a small attention classifier on the digits dataset.

The dataset is ``sklearn.datasets.load_digits`` (ships inside scikit-learn, read
offline): each 8x8 image becomes 8 tokens of 8 pixels (``--tokens rows``) or 16
tokens of 2x2 patches (``--tokens patches``), with a stratified held-out test
split. Prints one line per epoch (loss, accuracy, throughput, time) and the
final test accuracy with the mean time per epoch.

Wired into ``qkv_native.cli`` through :func:`add_parser` / :func:`run`; also
runnable alone: ``python -m qkv_native.train_cli --epochs 30``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

__all__ = ["add_parser", "run", "main"]


def _add_arguments(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data")
    d.add_argument("--tokens", choices=("rows", "patches"), default="rows",
                   help="8 tokens of 8 pixels (rows) or 16 tokens of 2x2 patches (default: rows)")
    d.add_argument("--test-fraction", type=float, default=0.2, help="held-out test share, stratified (default: 0.2)")
    m = p.add_argument_group("model")
    m.add_argument("--d-model", type=int, default=64)
    m.add_argument("--num-heads", type=int, default=4)
    m.add_argument("--num-kv-heads", type=int, default=None, help="grouped-query attention (default: num_heads)")
    m.add_argument("--num-layers", type=int, default=2)
    m.add_argument("--d-ff", type=int, default=128)
    m.add_argument("--dropout", type=float, default=0.1)
    m.add_argument("--pool", choices=("mean", "cls"), default="mean")
    m.add_argument("--post-norm", action="store_true", help="post-norm blocks (default: pre-norm)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: 2e-3; try 0.05 for sgd)")
    t.add_argument("--weight-decay", type=float, default=0.05)
    t.add_argument("--momentum", type=float, default=0.9, help="sgd only (Nesterov)")
    t.add_argument("--warmup", type=float, default=0.05, help="linear warmup share of all steps, then cosine decay")
    t.add_argument("--label-smoothing", type=float, default=0.1)
    t.add_argument("--clip-grad-norm", type=float, default=None)
    t.add_argument("--seed", type=int, default=0, help="initialisation, split, batch order and dropout")
    t.add_argument("--threads", type=int, default=None, help="native threads (default: all cores)")
    t.add_argument("--checkpoint", default=None, help="save the trainer here after every epoch (atomic)")
    t.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    t.add_argument("--no-progress", action="store_true", help="no progress bar and no per-epoch lines")
    t.add_argument("--min-accuracy", type=float, default=None,
                   help="exit with status 1 below this test accuracy (a fraction: 0.97)")


_OUT_OF_MEMORY = ("out of memory: the model (--d-model, --d-ff, --num-layers) or --batch-size is too large "
                  "for this machine")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand to an ``argparse`` subparsers object; sets ``func=run``."""
    p = subparsers.add_parser(
        "train",
        help="train an attention classifier on the digits dataset (needs scikit-learn)",
        description=__doc__.split("\n\n")[1],
    )
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the ``train`` subcommand; returns the exit status."""
    import numpy as np

    import qkv_native as qn
    from qkv_native import nn, optim
    from qkv_native.cli import output_path_problem
    from qkv_native.data import load_digits_tokens
    from qkv_native.nn import CheckpointError
    from qkv_native.train import ModelCheckpoint, Trainer, attention_classifier

    def fail(msg: str) -> int:
        print(f"qkv-native train: error: {msg}", file=sys.stderr)
        return 2

    problem = output_path_problem(args.checkpoint, "--checkpoint")
    if problem is not None:
        return fail(problem)
    if args.resume and not args.checkpoint:
        return fail("--resume needs --checkpoint")
    for name in ("d_model", "num_heads", "num_layers", "d_ff", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            return fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0.0 < args.test_fraction < 1.0:
        return fail(f"--test-fraction must lie in (0, 1), got {args.test_fraction}")
    if not 0.0 <= args.warmup <= 1.0:
        return fail(f"--warmup must lie in [0, 1], got {args.warmup}")
    if args.seed < 0:
        return fail(f"--seed must be an integer >= 0, got {args.seed}")
    if args.min_accuracy is not None and not 0.0 <= args.min_accuracy <= 1.0:  # (97 for 97% always failed)
        return fail(f"--min-accuracy must be a fraction in [0, 1] (0.97 for 97%), got {args.min_accuracy}")
    try:
        x_train, y_train, x_test, y_test = load_digits_tokens(args.tokens, args.test_fraction, args.seed)
    except ImportError as e:
        return fail(str(e))
    except ValueError as e:  # e.g. a test fraction that leaves no train or no test sample
        msg = str(e)
        return fail("--test-fraction" + msg[len("test_fraction"):] if msg.startswith("test_fraction") else msg)
    try:
        if args.threads is not None:
            qn.set_num_threads(args.threads)
        model = attention_classifier(
            x_train.shape[2], x_train.shape[1], 10,
            d_model=args.d_model, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
            num_layers=args.num_layers, d_ff=args.d_ff, dropout=args.dropout, pool=args.pool,
            norm_first=not args.post_norm, rng=args.seed,
        )
        steps = args.epochs * -(-len(x_train) // args.batch_size)
        warmup = int(args.warmup * steps)
        schedule = optim.LinearWarmup(warmup, optim.Cosine(max(steps - warmup, 1)))
        if args.optimizer == "adamw":
            opt = optim.AdamW(lr=args.lr, weight_decay=args.weight_decay, schedule=schedule,
                              decay=optim.decay_matrices_only)
        else:
            opt = optim.SGD(lr=args.lr, momentum=args.momentum, nesterov=args.momentum > 0,
                            weight_decay=args.weight_decay, schedule=schedule, decay=optim.decay_matrices_only)
        # (a symbolic link's file: Trainer.save renames over the path it is given, which replaced the link)
        callbacks = [ModelCheckpoint(os.path.realpath(args.checkpoint))] if args.checkpoint else []
        trainer = Trainer(
            model, nn.CrossEntropyLoss(label_smoothing=args.label_smoothing), opt,
            clip_grad_norm=args.clip_grad_norm, callbacks=callbacks, progress=not args.no_progress,
        )
    except (ImportError, ValueError, TypeError) as e:  # an option the model, optimizer or data refuse
        return fail(str(e))
    except MemoryError:
        return fail(_OUT_OF_MEMORY)
    if args.resume and os.path.exists(args.checkpoint):
        try:
            trainer.load(args.checkpoint)
        except (CheckpointError, OSError) as e:  # corrupt, unreadable, or another model or optimizer
            return fail(f"--resume: {e}")
        print(f"resumed from {args.checkpoint} at epoch {trainer.epoch}")
    print(
        f"digits: {len(x_train)} train / {len(x_test)} test, {x_train.shape[1]} tokens of {x_train.shape[2]} pixels; "
        f"model: {model.num_parameters()} parameters, {args.num_layers} layers, d_model {args.d_model}, "
        f"{args.num_heads} heads; {qn.get_num_threads()} threads, isa {qn.cpu_info()['isa']}",
        flush=True,
    )
    t0 = time.perf_counter()
    try:
        history = trainer.fit(x_train, y_train, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    except MemoryError:
        return fail(_OUT_OF_MEMORY)
    except OSError as e:  # the only file written: the checkpoint after an epoch (a full disk)
        if not args.checkpoint or isinstance(e, BrokenPipeError):  # (the epoch lines' reader is gone)
            raise
        return fail(f"--checkpoint {args.checkpoint}: could not be written ({e})")
    total = time.perf_counter() - t0
    result = trainer.evaluate(x_test, y_test)
    times = history.get("time", [])
    per_epoch = float(np.mean(times)) if times else 0.0
    n_right = int(round(result["accuracy"] * len(x_test)))
    print(
        f"test accuracy {result['accuracy']:.4f} ({n_right}/{len(x_test)})  test loss {result['loss']:.4f}  "
        f"time per epoch {per_epoch:.3f} s (median {float(np.median(times)) if times else 0.0:.3f} s)  "
        f"this run {total:.1f} s",
        flush=True,
    )
    if args.min_accuracy is not None and result["accuracy"] < args.min_accuracy:
        print(f"error: test accuracy {result['accuracy']:.4f} < --min-accuracy {args.min_accuracy}", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Standalone entry point: ``python -m qkv_native.train_cli [options]``."""
    parser = argparse.ArgumentParser(prog="qkv-native train", description=__doc__.split("\n\n")[1])
    _add_arguments(parser)
    args = parser.parse_args(argv)
    from .cli import run_interruptibly

    return run_interruptibly("train", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
