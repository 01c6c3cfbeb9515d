"""What the gradient of a learned attention bias costs: qkv_native.attention_backward
with and without ``bias_grad=True``, and torch's SDPA autograd with the bias as a
float ``attn_mask`` that requires grad (when torch is installed), same thread count.

Bias shapes: a learned position bias shared by the batch (1, heads, seq, seq), which
the backward sums as it runs (Note [bias gradient] in cpp/src/attention_bwd.cpp), and
one shared by the heads (batch, 1, 1, seq), which takes the recomputing pass.
Medians of calls in blocks taking turns (``qkv_native.bench.measure``, as in
``qkv-native bench``); torch's dbias is compared with ours first.

    python benchmarks/attention_bias_grad.py [--threads 2] [--reps 5]
"""

from __future__ import annotations

import argparse

import numpy as np

import qkv_native as qn
from qkv_native.bench import Budget, measure

CASES = [  # (batch, heads, seq, d_head, bias shape)
    (32, 12, 128, 32, (1, 12, 128, 128)),
    (8, 12, 512, 64, (1, 12, 512, 512)),
    (4, 16, 1024, 64, (1, 16, 1024, 1024)),
    (8, 12, 512, 64, (8, 1, 1, 512)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=qn.get_num_threads())
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    qn.set_num_threads(args.threads)
    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    # exactly 3 timed calls per block (max_runs caps them), each block after an untimed call
    budget = Budget(seconds=10.0 * args.reps, rounds=args.reps, min_runs=3 * args.reps, max_runs=3 * args.reps,
                    probe_seconds=0.0)
    print(f"threads {args.threads}; median ms of {3 * args.reps} calls each, in {args.reps} blocks taking turns")
    print(f"{'case':44} {'backward':>9} {'+ dbias':>9} {'extra':>7} {'torch':>9} {'vs torch':>9}")
    for batch, heads, seq, d_head, bias_shape in CASES:
        q, k, v, do = (rng.standard_normal((batch, heads, seq, d_head), dtype=np.float32) for _ in range(4))
        bias = rng.standard_normal(bias_shape, dtype=np.float32)
        o, lse = qn.attention(q, k, v, bias=bias, return_lse=True)
        fns = {
            "plain": lambda: qn.attention_backward(do, q, k, v, o, lse, bias=bias),
            "dbias": lambda: qn.attention_backward(do, q, k, v, o, lse, bias=bias, bias_grad=True),
        }
        if torch is not None:
            leaves = [torch.from_numpy(x).requires_grad_() for x in (q, k, v, bias)]
            to = torch.nn.functional.scaled_dot_product_attention(*leaves[:3], attn_mask=leaves[3])
            tdo = torch.from_numpy(do)
            fns["torch"] = lambda: torch.autograd.grad(to, leaves, tdo, retain_graph=True)
            mine = fns["dbias"]()[3]
            theirs = fns["torch"]()[3].numpy()
            err = float(np.abs(mine - theirs).max() / max(np.abs(theirs).max(), 1e-30))
            if err > 1e-3:
                raise SystemExit(f"dbias differs from torch's: max relative error {err:.2e}")
        times = measure(fns, budget)
        for t in times.values():
            if isinstance(t, Exception):
                raise t
        ms = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
        label = f"({batch}, {heads}, {seq}, {d_head}) bias {bias_shape}"
        tail = f" {ms['torch']:9.1f} {ms['torch'] / ms['dbias']:8.2f}x" if "torch" in ms else ""
        print(f"{label:44} {ms['plain']:9.1f} {ms['dbias']:9.1f} {100 * (ms['dbias'] / ms['plain'] - 1):+6.0f}%{tail}")


if __name__ == "__main__":
    main()
