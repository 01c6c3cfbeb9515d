"""The ``qkv-native`` command: ``info`` (CPU and ISA) and ``bench`` (see :mod:`qkv_native.bench`)."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence

import qkv_native as qn


def _info_text() -> str:
    """cpu_info() as aligned lines."""
    info = qn.cpu_info()
    features = info["features"]
    have = [name for name, on in features.items() if on]
    lack = [name for name, on in features.items() if not on]
    rows = [
        ("qkv_native", qn.__version__),
        ("CPU", f"{info['brand']} ({info['vendor']}, family {info['family']:#x})"),
        ("features", " ".join(have) or "-"),
        ("missing", " ".join(lack) or "-"),
        ("supported ISAs", ", ".join(info["supported_isas"]) + "  (best last)"),
        ("active ISA", f"{info['isa']}  (override: QKV_NATIVE_ISA=scalar|avx2|avx512)"),
        ("threads", f"{info['num_threads']}  (OMP_NUM_THREADS or qkv_native.set_num_threads)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in rows)


def _build_parser() -> argparse.ArgumentParser:
    from . import bench

    parser = argparse.ArgumentParser(
        prog="qkv-native",
        description="qkv_native: fast, exact, trainable attention for CPUs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("info", help="print the CPU's features, the supported and chosen ISA, threads",
                   description="Print qkv_native.cpu_info(): features, supported ISAs, chosen ISA, threads.")
    b = sub.add_parser(
        "bench",
        help="benchmark against NumPy, PyTorch and ONNX Runtime",
        description="Time GEMM, the fused QKV projection, attention forward/backward and a multi-head "
        "attention layer against NumPy (always) and PyTorch / ONNX Runtime (when installed: "
        f'{bench.INSTALL_HINT}), with the same thread count on every side.',
    )
    size = b.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="a subset of the cases with a short time budget (default; about a minute on 2 cores)")
    size.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="every case, with a longer time budget")
    b.set_defaults(mode="quick")
    b.add_argument("--only", metavar="GROUPS",
                   help=f"comma-separated groups to run, from: {','.join(bench.GROUPS)}")
    b.add_argument("--threads", metavar="N,N,...",
                   help="thread counts to sweep, e.g. 1,2 (default: qkv_native's current count)")
    b.add_argument("--budget", type=float, metavar="SECONDS",
                   help="time budget per implementation and case (default: 0.25 quick, 1.0 full)")
    b.add_argument("--json", metavar="FILE", help="write every raw timing and the machine description as JSON")
    b.add_argument("--plot", metavar="FILE.png", help="plot GFLOP/s against seq (and threads); needs matplotlib")
    b.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress indicator on stderr")
    from . import embed_cli, train_cli

    train_cli.add_parser(sub)  # sets func=train_cli.run
    embed_cli.add_parser(sub)  # sets func=embed_cli.run
    return parser


def _bench(args, argv: Sequence[str]) -> int:
    from . import bench

    only = bench.parse_list(args.only, "only")
    threads = bench.parse_threads(args.threads)
    bench.check_output_path(args.json, "--json")
    bench.check_output_path(args.plot, "--plot", ".png")
    if args.plot:
        bench.require_matplotlib()  # fail before running, not after
    budget = None
    if args.budget is not None:
        if not args.budget > 0:
            raise bench.BenchError(f"--budget must be positive, got {args.budget}")
        base = bench.FULL if args.mode == "full" else bench.QUICK
        budget = bench.Budget(**{**vars(base), "seconds": args.budget})
    report = bench.run_bench(mode=args.mode, only=only, threads=threads, budget=budget,
                             progress=args.progress, argv=list(argv))
    # The files first: a reader of the table that is gone (`| head`) must not lose them.
    wrote, problems = [], []
    for flag, path, write in (("--json", args.json, bench.write_json), ("--plot", args.plot, bench.plot_report)):
        if path:
            try:
                write(report, path)
                wrote.append(f"wrote {path}")
            except OSError as exc:  # (a full disk: the table below is all there is)
                problems.append(f"{flag} {path}: could not be written ({exc})")
            except bench.BenchError as exc:  # (nothing to plot)
                problems.append(str(exc))
    print(bench.format_report(report), flush=True)
    if wrote:
        print("\n" + "\n".join(wrote))
    if problems:
        raise bench.BenchError("; ".join(problems))
    return 0


def output_path_problem(path: Optional[str], flag: str, suffix: Optional[str] = None) -> Optional[str]:
    """Why ``path``, the output file that option ``flag`` names, cannot be written (checked
    before any work): empty, ``-``, a directory, an existing file that is not a regular file
    (a device or pipe: outputs are written beside their file and renamed over it, which would
    replace the device, e.g. /dev/stdout, with a file), in a directory that does not exist
    or that this user cannot write, or without ``suffix``; None when it can (or when path
    is None). One check for every subcommand."""
    if path is None:
        return None
    if not path:
        return f"{flag} needs a file name"
    if path == "-":
        return f"{flag} -: writing to standard output is not supported; name a file (./- for a file named '-')"
    if os.path.isdir(path):
        return f"{flag} {path}: is a directory"
    if os.path.exists(path) and not os.path.isfile(path):
        return (f"{flag} {path}: not a regular file (a device or pipe such as standard output is not "
                "supported: the output is written beside it and renamed into place)")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return f"{flag} {path}: its directory does not exist ({parent})"
    if not os.access(parent, os.W_OK | os.X_OK):  # (the file is made there and renamed: found after the run)
        return f"{flag} {path}: its directory is not writable ({parent})"
    if suffix and not path.lower().endswith(suffix):
        return f"{flag} {path}: the file name must end in {suffix}"
    return None


@contextlib.contextmanager
def replacing(path: str) -> Iterator[Path]:
    """Yields a new, empty file beside the file ``path`` names (a symbolic link's file; with its
    mode when it exists: nn.new_file_beside) for the block to write; renamed over that file when
    the block completes, removed when it raises (a full disk, SIGTERM), so that no partial output
    is left and the previous file stays as it was."""
    from .nn import new_file_beside

    target = Path(os.path.realpath(path))
    fd, name = new_file_beside(str(target), ".partial")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_output(path: str, data: bytes) -> None:
    """Write ``data`` as the file ``path`` (:func:`replacing`). Raises OSError."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``qkv-native`` and ``python -m qkv_native``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "info":
        return run_interruptibly("info", lambda: print(_info_text()) or 0)
    if getattr(args, "func", None) is not None:  # subcommands that bring their own runner
        return run_interruptibly(args.command, lambda: args.func(args))
    return run_interruptibly("bench", lambda: _bench_or_error(args, argv))


def _bench_or_error(args, argv: Sequence[str]) -> int:
    from .bench import BenchError

    try:
        return _bench(args, argv)
    except BenchError as exc:
        print(f"qkv-native bench: error: {exc}", file=sys.stderr)
        return 2


class Terminated(BaseException):
    """SIGTERM arrived during a run (a BaseException: no ``except Exception`` on the way swallows it)."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Make SIGTERM raise :class:`Terminated` for the duration (main thread only: elsewhere a no-op).

    Python has no SIGTERM handler of its own, so ``kill``/``timeout`` would end the process
    without running the ``finally`` blocks and exit handlers that remove partial outputs and
    temporary files (embed's output, a checkpoint being saved, the encoder bench's ONNX export).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_interruptibly(command: str, run: Callable[[], int]) -> int:
    """run()'s exit status; Ctrl-C and SIGTERM give a line and the shell's status for the signal
    (130, 143) after the cleanups have run, not a traceback or a kill that leaves temporary files;
    a closed standard output (a pipe into ``head``) ends the run quietly with SIGPIPE's (141).
    Every entry point (qkv-native, python -m qkv_native.train_cli / .embed_cli) runs here."""
    try:
        with sigterm_raises():
            return run()
    except KeyboardInterrupt:
        print(f"qkv-native {command}: interrupted", file=sys.stderr)
        return 128 + int(signal.SIGINT)
    except Terminated:
        print(f"qkv-native {command}: terminated (SIGTERM)", file=sys.stderr)
        return 128 + int(signal.SIGTERM)
    except BrokenPipeError:  # stdout's reader is gone (`qkv-native info | head -1`): quietly, as SIGPIPE would
        try:  # (the interpreter's last flush of stdout would fail again, with an 'Exception ignored' message)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (AttributeError, OSError, ValueError):
            pass
        return 128 + int(getattr(signal, "SIGPIPE", 13))


if __name__ == "__main__":
    raise SystemExit(main())
