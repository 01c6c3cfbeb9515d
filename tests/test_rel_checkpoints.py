"""Checkpoints (Trainer.save/load) and model files (Module.save/load): truncated,
corrupted or mismatched files raise CheckpointError (a ValueError) and leave the model
exactly as it was; a save killed at any moment leaves the previous file loadable.
"""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import qkv_native as qn
from qkv_native import nn as qnn
from qkv_native.nn import CheckpointError
from qkv_native.train import Trainer, attention_classifier

F32 = np.float32


def small_model(seed=0, d_model=16):
    return attention_classifier(4, 6, 3, d_model=d_model, num_heads=2, num_layers=1, d_ff=32, rng=seed)


def params(model):
    return {n: p.data.copy() for n, p in model.named_parameters()}


def assert_params_equal(model, expected, what):
    got = params(model)
    assert got.keys() == expected.keys(), what
    for n in expected:
        np.testing.assert_array_equal(got[n], expected[n], err_msg=f"{what}: parameter {n} changed")


def trained_trainer(seed=0):
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((32, 6, 4)).astype(F32), rng.integers(0, 3, 32)
    t = Trainer(small_model(seed), optimizer=qn.optim.AdamW(lr=1e-2), progress=False)
    t.fit(x, y, epochs=1, batch_size=16)
    return t


def trainer_state(t):
    arrays, meta = t.optimizer.state_dict()
    return params(t.model), {k: a.copy() for k, a in arrays.items()}, json.dumps(meta, sort_keys=True), t.epoch


def restore(target, state):
    """Put back a state taken with params() / trainer_state()."""
    if isinstance(target, Trainer):
        p, opt, meta, epoch = state
        target.model.load_state_dict(p)
        target.optimizer.load_state_dict(opt, json.loads(meta))
        target.epoch = epoch
    else:
        target.load_state_dict(state)


def assert_trainer_unchanged(t, before, what):
    p, opt, meta, epoch = before
    assert_params_equal(t.model, p, what)
    arrays, m = t.optimizer.state_dict()
    assert arrays.keys() == opt.keys() and json.dumps(m, sort_keys=True) == meta, f"{what}: optimizer changed"
    for k in opt:
        np.testing.assert_array_equal(arrays[k], opt[k], err_msg=f"{what}: optimizer state {k} changed")
    assert t.epoch == epoch, f"{what}: epoch changed"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved model file and trainer checkpoint (bytes), and what they hold."""
    d = tmp_path_factory.mktemp("ckpt")
    model = small_model(seed=1)
    model.save(str(d / "model.npz"))
    t = trained_trainer(seed=2)
    t.save(str(d / "trainer.npz"))
    return dict(model=(d / "model.npz").read_bytes(), model_params=params(model),
                trainer=(d / "trainer.npz").read_bytes(), trainer_state=trainer_state(t))


def test_round_trips(tmp_path, files):
    p = tmp_path / "m.npz"
    p.write_bytes(files["model"])
    m = small_model(seed=5)
    m.load(str(p))
    assert_params_equal(m, files["model_params"], "model load")
    p.write_bytes(files["trainer"])
    t = trained_trainer(seed=7)
    t.load(str(p))
    assert_trainer_unchanged(t, files["trainer_state"], "trainer load")


def _cut_points(n, rng):
    fixed = [0, 1, 4, 8, 21, 30, 64, n // 3, n // 2, n - 22, n - 21, n - 1]
    return sorted({c for c in fixed + rng.integers(1, n, 40).tolist() if 0 <= c < n})


@pytest.mark.parametrize("kind", ["model", "trainer"])
def test_truncated_file(tmp_path, files, kind):
    data = files[kind]
    rng = np.random.default_rng(0)
    p = tmp_path / "f.npz"
    target = small_model(seed=9) if kind == "model" else trained_trainer(seed=9)
    before = params(target) if kind == "model" else trainer_state(target)
    for cut in _cut_points(len(data), rng):
        p.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="f.npz"):
            target.load(str(p))
        if kind == "model":
            assert_params_equal(target, before, f"truncated at {cut}")
        else:
            assert_trainer_unchanged(target, before, f"truncated at {cut}")


@pytest.mark.parametrize("kind", ["model", "trainer"])
def test_corrupted_byte(tmp_path, files, kind):
    """One byte flipped anywhere (all of the first and last 160 bytes: zip and array headers,
    the central directory; 150 positions in between): CheckpointError and nothing changed, or
    (a byte no reader depends on, e.g. a timestamp) a load of exactly the saved state."""
    data = files[kind]
    n = len(data)
    rng = np.random.default_rng(1)
    positions = sorted(set(range(min(160, n))) | set(range(max(0, n - 160), n)) | set(rng.integers(0, n, 150).tolist()))
    p = tmp_path / "f.npz"
    target = small_model(seed=9) if kind == "model" else trained_trainer(seed=9)
    initial = params(target) if kind == "model" else trainer_state(target)
    loaded_ok, wrong = 0, {}
    for pos in positions:
        before = params(target) if kind == "model" else trainer_state(target)
        bad = bytearray(data)
        bad[pos] ^= 0xFF
        p.write_bytes(bytes(bad))
        try:
            target.load(str(p))
        except CheckpointError:
            if kind == "model":
                assert_params_equal(target, before, f"byte {pos} flipped")
            else:
                assert_trainer_unchanged(target, before, f"byte {pos} flipped")
            continue
        except Exception as e:  # noqa: BLE001 - any other exception is the failure reported
            wrong.setdefault(type(e).__name__, []).append(pos)
            if kind == "model":
                assert_params_equal(target, before, f"byte {pos} flipped")
            else:
                assert_trainer_unchanged(target, before, f"byte {pos} flipped")
            continue
        loaded_ok += 1
        if kind == "model":
            assert_params_equal(target, files["model_params"], f"byte {pos} flipped but the load succeeded")
        else:
            assert_trainer_unchanged(target, files["trainer_state"], f"byte {pos} flipped but the load succeeded")
        # back to a different state for the next position
        restore(target, initial)
    assert not wrong, "flipped bytes raised other exceptions than CheckpointError: " + "; ".join(
        f"{name} at {pos[:6]}{'...' if len(pos) > 6 else ''} ({len(pos)} positions)" for name, pos in wrong.items())
    # A flip in zip metadata no reader checks (timestamps, "version made by", attributes)
    # loads the saved state exactly (checked above); about a quarter of these positions
    # are such bytes, the rest must be detected.
    assert loaded_ok < len(positions) // 2


def _rewrite(data, edit_header=None, edit_arrays=None):
    """A checkpoint re-packed with an edited JSON header and/or arrays (no checksum update)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {n: z[n] for n in z.files}
    header = json.loads(arrays["__header__"].tobytes().decode())
    if edit_header:
        edit_header(header)
    if edit_arrays:
        edit_arrays(arrays)
    arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def _resum(header, arrays):
    from qkv_native.nn import _checksum

    header["sha256"] = _checksum({n: a for n, a in arrays.items() if n != "__header__"})


MISMATCHED = {
    "empty_file": lambda f: b"",
    "text_file": lambda f: b"not a checkpoint\n" * 10,
    "plain_npz": lambda f: _npz(w=np.zeros(3, F32)),
    "object_array": lambda f: _npz_pickled(),
    "other_format_tag": lambda f: _rewrite(f, lambda h: h.update(format="something.else")),
    "future_version": lambda f: _rewrite(f, lambda h: h.update(version=2)),
    "header_not_json": lambda f: _rewrite_raw_header(f, b"{not json"),
    "header_lists_other_arrays": lambda f: _rewrite(f, lambda h: h["arrays"].update(extra={"shape": [1],
                                                                                           "dtype": "float32"})),
    "checksum_mismatch": lambda f: _rewrite(f, lambda h: h.update(sha256="0" * 64)),
    "meta_not_an_object": lambda f: _rewrite(f, lambda h: h.update(meta=None)),
    "arrays_listed_as_a_list": lambda f: _rewrite(f, lambda h: h.update(arrays=list(h["arrays"]))),
    # a member's .npy header claiming 2**40 floats: refused before numpy allocates 4 TiB
    "forged_member_shape": lambda f: _forge_first_member_shape(f, (2**40,)),
    # well formed (the checksum matches) but a parameter holds strings: nothing is copied
    "string_parameter": lambda f: _string_parameter(f),
}


def _forge_first_member_shape(data, shape):
    """The checkpoint with its first array's .npy header claiming `shape` (same data)."""
    import zipfile

    src, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    forged = False
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            raw = src.read(info)
            if not forged and info.filename != "__header__.npy":
                m = io.BytesIO(raw)
                assert np.lib.format.read_magic(m) == (1, 0)
                _, fortran, dtype = np.lib.format.read_array_header_1_0(m)
                h = io.BytesIO()
                np.lib.format.write_array_header_1_0(
                    h, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": fortran, "shape": shape})
                raw, forged = h.getvalue() + raw[m.tell():], True
            dst.writestr(info.filename, raw)
    return out.getvalue()


def _string_parameter(data):
    """The checkpoint with its first parameter as a string array, listed and checksummed."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {n: z[n] for n in z.files}
    header = json.loads(arrays.pop("__header__").tobytes().decode())
    n = next(k for k in sorted(arrays) if k.startswith(("param/", "model/")))
    arrays[n] = np.full(arrays[n].shape, "1", dtype="<U1")
    header["arrays"][n] = {"shape": list(arrays[n].shape), "dtype": str(arrays[n].dtype)}
    _resum(header, arrays)
    return _npz(__header__=np.frombuffer(json.dumps(header).encode(), np.uint8), **arrays)


def _npz(**arrays):
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def _npz_pickled():
    out = io.BytesIO()
    np.savez(out, __header__=np.array([{"format": "x"}], dtype=object))
    return out.getvalue()


def _rewrite_raw_header(data, raw):
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {n: z[n] for n in z.files}
    arrays["__header__"] = np.frombuffer(raw, np.uint8)
    return _npz(**arrays)


@pytest.mark.parametrize("case", list(MISMATCHED))
@pytest.mark.parametrize("kind", ["model", "trainer"])
def test_not_a_checkpoint(tmp_path, files, kind, case):
    p = tmp_path / "f.npz"
    p.write_bytes(MISMATCHED[case](files[kind]))
    target = small_model(seed=9) if kind == "model" else trained_trainer(seed=9)
    before = params(target) if kind == "model" else trainer_state(target)
    with pytest.raises(CheckpointError, match="f.npz"):
        target.load(str(p))
    if kind == "model":
        assert_params_equal(target, before, case)
    else:
        assert_trainer_unchanged(target, before, case)


def test_other_architecture_or_kind(tmp_path, files):
    p = tmp_path / "f.npz"
    p.write_bytes(files["model"])
    wider = small_model(seed=3, d_model=24)
    before = params(wider)
    with pytest.raises(CheckpointError, match="does not match"):
        wider.load(str(p))
    assert_params_equal(wider, before, "other architecture")
    t = trained_trainer(seed=4)
    st = trainer_state(t)
    with pytest.raises(CheckpointError, match="not a trainer checkpoint"):
        t.load(str(p))  # a model file given to a trainer
    assert_trainer_unchanged(t, st, "model file into trainer")
    p.write_bytes(files["trainer"])
    m = small_model(seed=4)
    before = params(m)
    with pytest.raises(CheckpointError, match="not a module file"):
        m.load(str(p))  # a trainer checkpoint given to a model
    assert_params_equal(m, before, "trainer file into model")
    sgd = Trainer(small_model(seed=4), optimizer=qn.optim.SGD(lr=0.1, momentum=0.9), progress=False)
    st = trainer_state(sgd)
    with pytest.raises(CheckpointError, match="does not match"):
        sgd.load(str(p))  # AdamW state into SGD
    assert_trainer_unchanged(sgd, st, "AdamW checkpoint into an SGD trainer")


def test_missing_file_and_directory(tmp_path):
    m = small_model()
    with pytest.raises(FileNotFoundError):
        m.load(str(tmp_path / "nowhere.npz"))
    with pytest.raises(CheckpointError):
        m.load(str(tmp_path))


def test_a_named_pipe_is_refused_not_waited_on(tmp_path):
    """open() of a named pipe waits for a writer: loading one hung forever. (A thread opens
    its write end for a while, so that the old code ends instead of hanging this test.)"""
    fifo = str(tmp_path / "ckpt.npz")
    os.mkfifo(fifo)

    def writer():
        for _ in range(200):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # (ENXIO while no reader)
                return
            except OSError:
                time.sleep(0.05)

    threading.Thread(target=writer, daemon=True).start()
    for load in (small_model().load, trained_trainer().load, qnn.load_arrays):
        with pytest.raises(CheckpointError, match="not a regular file"):
            load(fifo)


@pytest.mark.parametrize("edit", ["epoch_missing", "epoch_not_int", "history_not_a_dict", "rng_for_no_layer",
                                  "epoch_negative", "epoch_infinite", "step_count_infinite", "step_count_negative",
                                  "partial_not_a_dict", "partial_samples_past_n", "partial_rng_for_no_layer"])
def test_trainer_meta_mismatch_loads_nothing(tmp_path, files, edit):
    """A checkpoint whose arrays are intact (valid sha256) but whose metadata does not fit this
    trainer (another version or tool wrote it). Bug: the trainer's meta fields are read after
    the model and optimizer were already overwritten, so a bad 'epoch' or 'history' raises a
    bare KeyError/ValueError/AttributeError and leaves a half-loaded trainer."""
    def change(h):
        meta = h["meta"]
        if edit == "epoch_missing":
            del meta["epoch"]
        elif edit == "epoch_not_int":
            meta["epoch"] = "three"
        elif edit == "history_not_a_dict":
            meta["history"] = [1, 2]
        elif edit == "rng_for_no_layer":
            meta["rng"] = {"no.such.layer": {}}
        elif edit.startswith("partial"):  # an epoch stopped part-way (Note [stopped part-way])
            meta["partial"] = dict(n=32, shuffle=True, seed=0, samples=16, loss_sum=1.0, loss_count=16, correct=3,
                                   counted=16, time=0.5, lr=0.01, rng={})
            if edit == "partial_not_a_dict":
                meta["partial"] = [16]
            elif edit == "partial_samples_past_n":
                meta["partial"]["samples"] = 33
            else:
                meta["partial"]["rng"] = {"no.such.layer": {}}
        elif edit.startswith("epoch"):  # (json writes inf as Infinity; int() of it overflowed)
            meta["epoch"] = -3 if edit.endswith("negative") else float("inf")
        else:
            meta["optimizer"]["step_count"] = -5 if edit.endswith("negative") else float("inf")

    p = tmp_path / "f.npz"
    p.write_bytes(_rewrite(files["trainer"], change))
    t = trained_trainer(seed=9)
    before = trainer_state(t)
    with pytest.raises(CheckpointError):
        t.load(str(p))
    assert_trainer_unchanged(t, before, edit)


def test_bad_random_state_sets_none():
    """set_rng_states is all or nothing: a state numpy refuses (after others were set) left
    some dropout layers restored and others not."""
    m = attention_classifier(4, 6, 3, d_model=16, num_heads=2, num_layers=2, d_ff=32, dropout=0.1, rng=0)
    good = m.rng_states()
    assert len(good) >= 2
    bad = json.loads(json.dumps(good))
    for st in bad.values():
        st["state"]["state"] += 1
    bad[sorted(bad)[-1]]["state"]["state"] = -1
    with pytest.raises(ValueError, match="bad random state"):
        m.set_rng_states(bad)
    assert json.dumps(m.rng_states(), sort_keys=True) == json.dumps(good, sort_keys=True)


# ----------------------------------------------------------------------------
# a save killed at a random moment
# ----------------------------------------------------------------------------

_SAVER = """
import sys
import numpy as np
from qkv_native import nn
path = sys.argv[1]
m = nn.Sequential(nn.Linear(1024, 1024, rng=0), nn.Linear(1024, 1024, rng=1))  # 8 MiB
def fill(g):
    for p in m.parameters():
        p.data[...] = g
fill(0)
m.save(path)
print("ready", flush=True)
g = 1
while True:
    fill(g)
    m.save(path)
    print("saved", g, flush=True)
    g += 1
"""


def test_killed_save_leaves_a_complete_checkpoint(tmp_path):
    """SIGKILL a process that saves an 8 MiB model in a loop (generation g: every parameter
    filled with g) at random moments: the file always loads, and holds one complete
    generation (the last one saved or the one being saved), never a mix."""
    rng = np.random.default_rng(3)
    path = tmp_path / "model.npz"
    fresh = qnn.Sequential(qnn.Linear(1024, 1024, rng=5), qnn.Linear(1024, 1024, rng=6))
    for trial in range(4):
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_SAVER), str(path)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        try:
            for line in proc.stdout:  # (an editable install may print build messages first)
                if line.strip() == "ready":
                    break
            else:
                pytest.fail("the saving process did not start")
            time.sleep(float(rng.uniform(0.0, 0.4)))
            proc.send_signal(signal.SIGKILL)
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        saved = [int(line.split()[1]) for line in out.splitlines() if line.startswith("saved")]
        last = saved[-1] if saved else 0
        fresh.load(str(path))
        values = {float(v) for p in fresh.parameters() for v in np.unique(p.data)}
        assert len(values) == 1, f"trial {trial}: a mix of generations {sorted(values)[:5]} (last saved {last})"
        g = values.pop()
        assert g in (last, last + 1), f"trial {trial}: generation {g}, the last saved was {last}"


def test_saved_files_get_the_usual_permissions(tmp_path):
    """A new checkpoint gets 0666 less the umask, as open() gives (it was 0600 whatever the
    umask: tempfile.mkstemp's mode); saving over a file keeps that file's mode."""
    model = qnn.Linear(2, 3)
    old = os.umask(0o022)
    try:
        model.save(str(tmp_path / "a.npz"))
        assert stat.S_IMODE(os.stat(tmp_path / "a.npz").st_mode) == 0o644
        os.umask(0o027)
        trained_trainer().save(str(tmp_path / "t.npz"))
        assert stat.S_IMODE(os.stat(tmp_path / "t.npz").st_mode) == 0o640
        os.chmod(tmp_path / "a.npz", 0o600)  # a file the user made private stays so
        model.save(str(tmp_path / "a.npz"))
        assert stat.S_IMODE(os.stat(tmp_path / "a.npz").st_mode) == 0o600
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path)) == ["a.npz", "t.npz"]


def test_model_files_of_the_encoder(tmp_path):
    """The encoder's model directory: truncated or corrupted model.safetensors raise the
    encoder's CheckpointError naming the file (never a crash)."""
    pytest.importorskip("safetensors")
    pytest.importorskip("tokenizers")
    enc = pytest.importorskip("qkv_native.encoder")
    try:
        from test_encoder import write_tiny_model
    except ImportError:
        pytest.skip("test_encoder's tiny model writer is not available")
    model = tmp_path / "model"
    write_tiny_model(model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    rng = np.random.default_rng(4)
    for cut in sorted({0, 7, 8, 9, 50, len(data) // 2, len(data) - 1} | set(rng.integers(1, len(data), 6).tolist())):
        weights.write_bytes(data[:cut])
        with pytest.raises((enc.CheckpointError, CheckpointError), match="model.safetensors"):
            enc.SentenceEncoder.from_pretrained(model)
    for pos in sorted(set(range(0, 40)) | set(rng.integers(0, 200, 10).tolist())):
        bad = bytearray(data)
        bad[pos] ^= 0xFF
        weights.write_bytes(bytes(bad))
        try:
            enc.SentenceEncoder.from_pretrained(model)
        except (enc.CheckpointError, CheckpointError) as e:
            assert "model.safetensors" in str(e)
