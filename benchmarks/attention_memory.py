"""Peak resident memory of qkv_native.attention / attention_backward at a long sequence.

One head, seq 16384, d_head 64, causal; the forward returns lse. A naive attention
would hold the (seq_q, seq_k) score matrix: 16384² · 4 B = 1 GiB per head. The
flash kernels should need only O(threads · block²) on top of inputs and outputs.

Each op is measured in a fresh child process (so ``ru_maxrss`` is its own): the
inputs are made and touched, one small call warms up the thread pool, the peak
(VmHWM in /proc/self/status) is reset to the current RSS through
/proc/self/clear_refs where the kernel allows it, the op runs once, and the script
prints how far the peak rose above the resident inputs, less the outputs' bytes.

    python benchmarks/attention_memory.py [--seq 16384] [--d-head 64] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

MB = 1024.0 * 1024.0


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, needs write access to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(op: str, seq: int, d_head: int, threads: int) -> dict:
    """Run one op once and return its memory figures (sizes in bytes)."""
    import numpy as np

    import qkv_native as qn

    if threads:
        qn.set_num_threads(threads)
    rng = np.random.default_rng(0)
    shape = (1, 1, seq, d_head)  # (batch, num_heads, seq, d_head)
    q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
    warm = [t[:, :, :256] for t in (q, k, v)]
    o_warm, lse_warm = qn.attention(*warm, causal=True, return_lse=True)  # thread pool, workspaces
    qn.attention_backward(o_warm, *warm, o_warm, lse_warm, causal=True)
    if op == "forward":
        inputs = (q, k, v)

        def run():
            return qn.attention(q, k, v, causal=True, return_lse=True)  # o: (1, 1, seq, d_head), lse: (1, 1, seq)
    else:
        o, lse = qn.attention(q, k, v, causal=True, return_lse=True)
        do = rng.standard_normal(shape, dtype=np.float32)
        inputs = (do, q, k, v, o, lse)

        def run():
            return qn.attention_backward(do, q, k, v, o, lse, causal=True)  # dq, dk, dv like q, k, v

    reset = _reset_peak()
    rss_kb, hwm_before_kb = _status_kb("VmRSS"), _status_kb("VmHWM")
    maxrss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outputs = run()
    hwm_after_kb = _status_kb("VmHWM")
    maxrss_after_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    base_kb = max(rss_kb, hwm_before_kb)  # without a reset the old peak is the floor
    out_bytes = sum(t.nbytes for t in outputs)
    return {
        "op": op,
        "threads": qn.get_num_threads(),
        "isa": qn.cpu_info()["isa"],
        "peak_reset": reset,
        "input_bytes": sum(t.nbytes for t in inputs),
        "output_bytes": out_bytes,
        "rss_before": rss_kb * 1024,
        "hwm_before": hwm_before_kb * 1024,
        "hwm_after": hwm_after_kb * 1024,
        "maxrss_before": maxrss_before_kb * 1024,
        "maxrss_after": maxrss_after_kb * 1024,
        "extra": (hwm_after_kb - base_kb) * 1024 - out_bytes,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--d-head", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="default: qkv_native's own default")
    parser.add_argument("--child", choices=("forward", "backward"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.seq, args.d_head, args.threads)))
        return 0

    naive = 4.0 * args.seq * args.seq
    print(f"attention memory: batch 1, 1 head, seq {args.seq}, d_head {args.d_head}, causal; "
          f"a materialised score matrix would be {naive / MB:.0f} MB")
    for op in ("forward", "backward"):
        cmd = [sys.executable, __file__, "--child", op, "--seq", str(args.seq), "--d-head", str(args.d_head),
               "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        name = "attention (return_lse=True)" if op == "forward" else "attention_backward"
        print(f"\n{name}  [{r['threads']} threads, {r['isa']}, peak reset: {'yes' if r['peak_reset'] else 'no'}]")
        print(f"  inputs {r['input_bytes'] / MB:.2f} MB, outputs {r['output_bytes'] / MB:.2f} MB")
        print(f"  VmHWM   {r['hwm_before'] / MB:8.1f} MB -> {r['hwm_after'] / MB:8.1f} MB  (VmRSS before {r['rss_before'] / MB:.1f} MB)")
        print(f"  maxrss  {r['maxrss_before'] / MB:8.1f} MB -> {r['maxrss_after'] / MB:8.1f} MB")
        print(f"  peak above inputs + outputs: {r['extra'] / MB:+.2f} MB "
              f"({100 * r['extra'] / naive:.2f}% of the score matrix)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
