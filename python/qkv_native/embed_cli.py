"""``qkv-native embed``: embed a text file, one text per line, into a .npy file.

    qkv-native embed --model DIR --input texts.txt --output emb.npy

The input is streamed: it is read twice (once to count the lines, once to embed
them a chunk at a time) and the embeddings go straight into a memory-mapped
.npy, so memory does not grow with the file. The output is written under a
temporary name beside it (OUTPUT.<random>.partial) and renamed when complete; on
an error or SIGTERM the temporary file is removed (an --output that is a symbolic
link: its file is replaced, the link kept). --input and --output must be regular
files (not standard input, which is read twice, nor standard output). Lines end at "\\n" (a trailing "\\r"
is dropped, and a UTF-8 byte order mark at the start); every line, empty ones
included, gives one row.

Wiring: ``add_parser(subparsers)`` adds the sub-command to an argparse parser
(and sets ``func=run``); ``run(args)`` returns the exit status. ``python -m
qkv_native.embed_cli ...`` runs it on its own.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import numpy as np

__all__ = ["add_parser", "run", "main"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``embed`` sub-command to ``subparsers`` (from ``ArgumentParser.add_subparsers()``)."""
    p = subparsers.add_parser(
        "embed",
        help="embed a text file (one text per line) with a BERT sentence encoder",
        description="Embed each line of --input with the sentence encoder in --model and save a "
                    "float32 (lines, dim) array to --output (.npy). Nothing is downloaded.",
    )
    p.add_argument("--model", required=True, metavar="DIR",
                   help="model directory: config.json, model.safetensors, tokenizer.json "
                        "[, modules.json, 1_Pooling/config.json]")
    p.add_argument("--input", required=True, metavar="FILE", help="UTF-8 text file, one text per line")
    p.add_argument("--output", required=True, metavar="FILE", help="output .npy file")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default: 32)")
    p.add_argument("--chunk-size", type=int, default=8192,
                   help="lines read, sorted by length and embedded together (default: 8192)")
    p.add_argument("--max-seq-length", type=int, default=None,
                   help="truncate texts to this many tokens (default: the model's)")
    p.add_argument("--threads", type=int, default=None, help="native threads (default: all cores)")
    p.add_argument("--no-normalize", action="store_true",
                   help="do not L2-normalise (a Normalize module in modules.json still applies)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)
    return p


def _read_lines(path: Path) -> Iterator[str]:
    with open(path, "r", encoding="utf-8-sig", newline="\n") as f:  # (a byte order mark is not text)
        for line in f:
            if line.endswith("\n"):
                line = line[:-1]
            if line.endswith("\r"):
                line = line[:-1]
            yield line


def _count_lines(path: Path) -> int:
    """The number of lines _read_lines gives; a ValueError names the first that is not UTF-8
    (the decoder's own message gave a position in its buffer, not in the file)."""
    n = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):  # (split at b"\n", as _read_lines splits)
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: line {n} is not UTF-8 text ({e.reason} at byte {e.start + 1} "
                                 f"of the line: {raw[e.start:e.start + 4]!r})") from None
    return n


def _chunks(lines: Iterator[str], size: int) -> Iterator[List[str]]:
    chunk: List[str] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _embed_file(enc, src: Path, tmp: Path, n: int, args: argparse.Namespace) -> None:
    """Embed the n lines of src into the .npy file tmp, chunk by chunk, through a memory map."""
    from .encoder import _Progress

    if n == 0:  # an empty memory map cannot be created
        with open(tmp, "wb") as f:
            np.save(f, np.empty((0, enc.embedding_dim), np.float32), allow_pickle=False)
        return
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, enc.embedding_dim))
    progress = _Progress(n, not args.no_progress, desc="embed")
    try:
        row = 0
        for chunk in _chunks(_read_lines(src), args.chunk_size):
            if row + len(chunk) > n:
                raise RuntimeError(f"{src} changed while it was read (it had {n} lines)")
            enc.encode_into(chunk, out[row:row + len(chunk)], batch_size=args.batch_size,
                            normalize=not args.no_normalize, progress=progress)
            row += len(chunk)
        if row != n:
            raise RuntimeError(f"{src} changed while it was read ({n} lines, then {row})")
        out.flush()
    finally:
        progress.close()
        del out


def _check_paths(src: Path, dst: Path, raw_input: str, raw_output: str) -> Optional[str]:
    """The problem with --input/--output, or None; checked before any work."""
    if raw_input == "-":
        return ("--input -: reading standard input is not supported (the input is read twice: "
                "once to count the lines, once to embed them); save it to a file first")
    if not src.exists():
        return f"{src}: input file not found"
    if src.is_dir():
        return f"{src}: is a directory, not an input file"
    if not src.is_file():
        return (f"{src}: not a regular file (a pipe or device such as standard input is not "
                "supported: the input is read twice); save it to a file first")
    from .cli import output_path_problem

    problem = output_path_problem(raw_output, "--output")
    if problem is not None:
        return problem
    if dst.exists():
        try:
            same = os.path.samefile(src, dst)
        except OSError:
            same = False
        if same:
            return f"--output {dst} is the input file (it would be replaced)"
    return None


def run(args: argparse.Namespace) -> int:
    """Run ``embed`` with parsed arguments; returns the exit status (0, or 2 on a user error).
    Under cli.run_interruptibly (every entry point) SIGTERM raises: the partial output is
    removed on the way out, and the status is 143."""
    import qkv_native

    from .cli import replacing
    from .encoder import CheckpointError, SentenceEncoder

    def fail(msg: str) -> int:
        print(f"qkv-native embed: error: {msg}", file=sys.stderr)
        return 2

    for name in ("batch_size", "chunk_size"):
        if getattr(args, name) < 1:
            return fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.threads is not None:
        try:
            qkv_native.set_num_threads(args.threads)
        except ValueError as e:
            return fail(f"--threads: {e}")
    src, dst = Path(args.input), Path(args.output)
    problem = _check_paths(src, dst, args.input, args.output)
    if problem is not None:
        return fail(problem)
    try:
        enc = SentenceEncoder.from_pretrained(args.model, max_seq_length=args.max_seq_length)
        enc.chunk_size = args.chunk_size
        n = _count_lines(src)
        with replacing(args.output) as tmp:  # (SIGTERM: run_interruptibly's exception removes it)
            _embed_file(enc, src, tmp, n, args)
    except MemoryError:  # a batch's activations: --batch-size (x the texts' tokens) too large for this machine
        return fail(f"out of memory with --batch-size {args.batch_size} (a batch's activations grow with it); "
                    "try a smaller one")
    except (ImportError, OSError, CheckpointError, ValueError, RuntimeError) as e:  # ImportError: no [embed] extra
        return fail(str(e))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m qkv_native.embed_cli --model DIR --input FILE --output FILE``."""
    parser = argparse.ArgumentParser(prog="qkv-native")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "embed":
        argv = ["embed", *argv]
    args = parser.parse_args(argv)
    from .cli import run_interruptibly

    return run_interruptibly("embed", lambda: args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
