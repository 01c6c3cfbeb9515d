"""qkv_native.train: fit/evaluate/predict, callbacks, checkpoints (atomic, verified,
exact resume), the 20-step loss trajectory against the same model in PyTorch, the
``train`` subcommand and the digits accuracy target."""

from __future__ import annotations

import argparse
import math
import os
import signal

import numpy as np
import pytest

from qkv_native import nn, optim
from qkv_native.torch_twin import to_torch
from qkv_native.train import Callback, EarlyStopping, ModelCheckpoint, Trainer, attention_classifier

F32 = np.float32


from _helpers import torch_one_thread as _torch  # noqa: E402


def toy_data(n=96, seq=4, d_in=3, classes=3, seed=0):
    """Learnable: the class is the argmax over the first 3 features of the token mean."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, seq, d_in)).astype(F32)
    y = x.mean(axis=1)[:, :classes].argmax(axis=1).astype(np.int64)
    return x, y


def small_model(dropout=0.0, rng=0, num_kv_heads=None):
    return attention_classifier(3, 4, 3, d_model=8, num_heads=2, num_kv_heads=num_kv_heads, num_layers=1,
                                d_ff=16, dropout=dropout, rng=rng)


class StepLosses(Callback):
    def __init__(self):
        self.losses = []

    def on_batch_end(self, trainer, step, logs):
        self.losses.append(logs["loss"])


def test_fit_evaluate_predict(capsys):
    x, y = toy_data()
    trainer = Trainer(small_model(), "cross_entropy", optim.AdamW(lr=1e-2), progress=True)
    hist = trainer.fit(x, y, epochs=6, batch_size=16, validation=(x[:32], y[:32]), seed=1)
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "time", "samples_per_s", "lr"} <= set(hist)
    assert all(len(v) == 6 for v in hist.values()) and trainer.epoch == 6
    assert hist["loss"][-1] < 0.7 * hist["loss"][0]
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch")]
    assert len(lines) == 6 and "samples/s" in lines[0] and "acc" in lines[0]
    ev = trainer.evaluate(x, y)
    assert set(ev) == {"loss", "accuracy"} and ev["accuracy"] > 0.6
    out = trainer.predict(x, batch_size=40)
    assert out.shape == (96, 3) and out.dtype == F32
    assert abs(ev["accuracy"] - np.mean(out.argmax(1) == y)) < 1e-12
    assert trainer.fit(x, y, epochs=6) is hist  # already at epoch 6: nothing to do
    with pytest.raises(TypeError, match="float32"):
        trainer.fit(x.astype(np.float64), y, epochs=7)
    with pytest.raises(ValueError, match="same length"):
        trainer.evaluate(x, y[:5])


def test_mse_regression():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 5)).astype(F32)
    w = rng.standard_normal((5, 2)).astype(F32)
    y = x @ w
    model = nn.Sequential(nn.Linear(5, 16, rng=1), nn.GELU(), nn.Linear(16, 2, rng=2))
    trainer = Trainer(model, "mse", optim.SGD(lr=0.05, momentum=0.9), progress=False, clip_grad_norm=5.0)
    hist = trainer.fit(x, y, epochs=30, batch_size=16)
    assert "accuracy" not in hist and hist["loss"][-1] < 0.1 * hist["loss"][0]


def test_early_stopping_and_callbacks():
    x, y = toy_data()
    es = EarlyStopping("val_loss", patience=2, min_delta=0.0)
    steps = StepLosses()
    trainer = Trainer(small_model(), optimizer=optim.SGD(lr=0.0), callbacks=[es, steps], progress=False)
    hist = trainer.fit(x, y, epochs=20, batch_size=32, validation=(x, y))
    assert trainer.epoch == 3 and len(hist["loss"]) == 3  # no improvement with lr = 0
    assert len(steps.losses) == 9 and es.best_epoch == 0
    with pytest.raises(KeyError, match="val_accuracy"):
        Trainer(small_model(), callbacks=[EarlyStopping("val_accuracy")], progress=False).fit(x, y, epochs=1)


def _make_trainer(tmp_path=None, rng=0):
    model = small_model(dropout=0.2, rng=rng)
    opt = optim.AdamW(lr=5e-3, schedule=optim.LinearWarmup(3, optim.Cosine(20)))
    cbs = [EarlyStopping("loss", patience=100)]
    return Trainer(model, nn.CrossEntropyLoss(label_smoothing=0.1), opt, progress=False, callbacks=cbs,
                   clip_grad_norm=1.0)


def test_resume_is_exact(tmp_path):
    x, y = toy_data()
    ckpt = str(tmp_path / "run.npz")
    full = _make_trainer()
    h_full = full.fit(x, y, epochs=4, batch_size=16, seed=7)
    first = _make_trainer()
    first.fit(x, y, epochs=2, batch_size=16, seed=7)
    first.save(ckpt)
    resumed = _make_trainer(rng=99)  # other initial weights: all must come from the file
    resumed.load(ckpt)
    assert resumed.epoch == 2 and resumed.optimizer.step_count == 12
    assert resumed.seed == 7
    h_res = resumed.fit(x, y, epochs=4, batch_size=16)  # the seed comes from the checkpoint
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=n)
    np.testing.assert_array_equal(h_full["loss"], h_res["loss"])
    assert resumed.callbacks[0].best == full.callbacks[0].best


def test_checkpoint_holds_the_callbacks_state_after_the_epoch_whatever_their_order(tmp_path):
    """A ModelCheckpoint listed before an EarlyStopping saved the latter's state from before
    the epoch's update: a resumed run skipped that epoch's value and stopped an epoch late."""
    x, y = toy_data()
    ckpt = str(tmp_path / "run.npz")
    trainer = Trainer(small_model(), progress=False,
                      callbacks=[ModelCheckpoint(ckpt), EarlyStopping("loss", patience=3)])
    trainer.fit(x, y, epochs=3, batch_size=16)
    resumed = Trainer(small_model(rng=1), progress=False,
                      callbacks=[ModelCheckpoint(ckpt), EarlyStopping("loss", patience=3)])
    resumed.load(ckpt)
    assert resumed.callbacks[1].state() == trainer.callbacks[1].state()
    assert resumed.callbacks[1].best_epoch == 2


class _InterruptOnce(nn.CrossEntropyLoss):
    """Ctrl-C inside the train step of call number `at` (after the model's forward drew its
    dropout bits, before the backward and the update)."""

    def __init__(self, at):
        super().__init__(label_smoothing=0.1)
        self.at, self.calls = at, 0

    def forward(self, logits, targets):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return super().forward(logits, targets)


def _continue_as(full, h_full, stopped, x, y, epochs, ckpt_dir):
    """Continues the stopped trainer to `epochs` (through a checkpoint in ckpt_dir, loaded by a
    fresh trainer, unless None) and checks that its weights and history are those of `full`, the
    uninterrupted run (history h_full). Returns the trainer that continued."""
    if ckpt_dir is not None:
        stopped.save(str(ckpt_dir / "run.npz"))
        stopped = _make_trainer(rng=99)
        stopped.load(str(ckpt_dir / "run.npz"))
    h = stopped.fit(x, y, epochs=epochs, batch_size=16)
    for (n, p), (_, q) in zip(full.model.named_parameters(), stopped.model.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=n)
    for k in ("loss", "accuracy", "lr"):
        np.testing.assert_array_equal(h_full[k], h[k], err_msg=k)
    return stopped


@pytest.mark.parametrize("via_checkpoint", [False, True])
def test_fit_stopped_part_way_continues_the_epoch(tmp_path, via_checkpoint):
    """Ctrl-C in the middle of an epoch left its completed batches in the weights and optimizer
    but the epoch uncounted: the next fit (or a checkpoint saved then) ran the epoch from its
    first batch again. Now it continues with the next batch, dropout states and loss sums as
    they were: the same weights and history as an uninterrupted run."""
    x, y = toy_data()
    full = _make_trainer()
    h_full = full.fit(x, y, epochs=3, batch_size=16, seed=7)
    stopped = _make_trainer()
    stopped.loss = _InterruptOnce(at=6 + 4)  # epoch 2 (of 6 batches), its fifth batch
    with pytest.raises(KeyboardInterrupt):
        stopped.fit(x, y, epochs=3, batch_size=16, seed=7)
    assert stopped.epoch == 1 and stopped.optimizer.step_count == 6 + 3
    stopped = _continue_as(full, h_full, stopped, x, y, 3, tmp_path if via_checkpoint else None)
    assert stopped.optimizer.step_count == full.optimizer.step_count == 18
    t = _interrupted(x, y)  # continuing needs the same data and order
    with pytest.raises(ValueError, match=r"^epoch 1 stopped part-way \(32 of 96 samples done.*got 95 samples"):
        t.fit(x[:-1], y[:-1], epochs=1)
    with pytest.raises(ValueError, match="^epoch 1 stopped part-way"):
        t.fit(x, y, epochs=1, shuffle=False)
    t.fit(x, y, epochs=1, batch_size=5)  # another batch size may finish it
    assert t.epoch == 1 and t.optimizer.step_count == 2 + 13
    t = _make_trainer()  # stopped in its first batch: nothing done, any data may start the epoch
    t.loss = _InterruptOnce(at=1)
    with pytest.raises(KeyboardInterrupt):
        t.fit(x, y, epochs=1, batch_size=16)
    t.fit(x[:50], y[:50], epochs=1, batch_size=16)
    fresh = _make_trainer()
    fresh.fit(x[:50], y[:50], epochs=1, batch_size=16)
    for (n, p), (_, q) in zip(fresh.model.named_parameters(), t.model.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=n)


@pytest.mark.parametrize("via_checkpoint", [False, True])
def test_ctrl_c_as_an_optimizer_step_returns(tmp_path, monkeypatch, via_checkpoint):
    """A Ctrl-C that arrives while the native update runs is raised as it returns: the update
    was in, but the optimizer had not counted it nor fit recorded its batch, and a resumed run
    applied that batch a second time with the same bias correction. Now the handler runs once
    the step is counted and recorded (Note [held signals])."""
    from qkv_native import functional

    x, y = toy_data()
    full = _make_trainer()
    h_full = full.fit(x, y, epochs=2, batch_size=16, seed=7)
    real, calls = functional.adam_update, []

    def update_then_ctrl_c(*args, **kwargs):
        real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 8:  # epoch 2, its second batch
            signal.raise_signal(signal.SIGINT)  # (Python runs the handler at the next bytecode)

    monkeypatch.setattr(functional, "adam_update", update_then_ctrl_c)
    stopped = _make_trainer()
    with pytest.raises(KeyboardInterrupt):
        stopped.fit(x, y, epochs=2, batch_size=16, seed=7)
    monkeypatch.undo()
    assert stopped.optimizer.step_count == 8 and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    stopped = _continue_as(full, h_full, stopped, x, y, 2, tmp_path if via_checkpoint else None)
    assert stopped.optimizer.step_count == 12


def _interrupted(x, y):
    t = _make_trainer()
    t.loss = _InterruptOnce(at=3)
    with pytest.raises(KeyboardInterrupt):
        t.fit(x, y, epochs=1, batch_size=16)
    return t


def test_checkpoint_callback_and_atomic_write(tmp_path, monkeypatch):
    x, y = toy_data()
    ckpt = str(tmp_path / "ck.npz")
    trainer = _make_trainer()
    trainer.callbacks.append(ModelCheckpoint(ckpt))
    trainer.fit(x, y, epochs=1, batch_size=32)
    good = (tmp_path / "ck.npz").read_bytes()

    def crash(f, **arrays):  # a crash halfway through writing
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(x, y, epochs=2, batch_size=32)
    monkeypatch.undo()
    assert (tmp_path / "ck.npz").read_bytes() == good  # the previous checkpoint is intact
    assert os.listdir(tmp_path) == ["ck.npz"]  # and no temporary file is left
    restored = _make_trainer(rng=5)
    restored.load(ckpt)
    assert restored.epoch == 1


def test_load_rejects_mismatch_and_corruption(tmp_path):
    x, y = toy_data()
    ckpt = str(tmp_path / "ck.npz")
    trainer = _make_trainer()
    trainer.fit(x, y, epochs=1, batch_size=32)
    trainer.save(ckpt)

    other = Trainer(small_model(dropout=0.2, num_kv_heads=1), optimizer=optim.AdamW(lr=1e-3), progress=False)
    before = other.model.state_dict()
    with pytest.raises(nn.CheckpointError, match="w_k"):
        other.load(ckpt)
    for n, a in other.model.state_dict().items():  # unchanged after a rejected load
        np.testing.assert_array_equal(a, before[n])
    with pytest.raises(nn.CheckpointError, match="SGD"):
        Trainer(small_model(dropout=0.2), optimizer=optim.SGD(lr=0.1, momentum=0.9), progress=False).load(ckpt)
    mod = str(tmp_path / "model.npz")
    trainer.model.save(mod)
    with pytest.raises(nn.CheckpointError, match="kind"):
        _make_trainer().load(mod)
    raw = bytearray((tmp_path / "ck.npz").read_bytes())
    for pos in (len(raw) // 4, len(raw) // 2, len(raw) - 30):
        bad = bytearray(raw)
        bad[pos] ^= 0x55
        (tmp_path / "bad.npz").write_bytes(bytes(bad))
        with pytest.raises(nn.CheckpointError):
            _make_trainer().load(str(tmp_path / "bad.npz"))
    (tmp_path / "short.npz").write_bytes(bytes(raw[:100]))
    with pytest.raises(nn.CheckpointError):
        _make_trainer().load(str(tmp_path / "short.npz"))


# ----------------------------------------------------------------------------
# 20 steps against the same model in PyTorch
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["sgd", "adamw"])
def test_loss_trajectory_matches_torch(which):
    torch = _torch()
    x, y = toy_data(n=80)
    model = small_model(num_kv_heads=1, rng=3)
    twin = to_torch(model, torch)  # same layers and weights, same parameter names
    P = dict(twin.named_parameters())
    assert list(P) == [n for n, _ in model.named_parameters()]
    clip = None
    if which == "sgd":
        opt = optim.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
        topt = torch.optim.SGD(P.values(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
        sched = None
    else:
        schedule = optim.LinearWarmup(4, optim.Cosine(16, min_factor=0.1))
        opt = optim.AdamW(lr=1e-2, weight_decay=0.05, schedule=schedule)
        topt = torch.optim.AdamW(P.values(), lr=1e-2, weight_decay=0.05)
        sched = torch.optim.lr_scheduler.LambdaLR(topt, schedule.factor)
        clip = 0.5
    losses = StepLosses()
    trainer = Trainer(model, nn.CrossEntropyLoss(label_smoothing=0.1), opt, clip_grad_norm=clip,
                      callbacks=[losses], progress=False)
    trainer.fit(x, y, epochs=4, batch_size=16, seed=11)  # 5 batches x 4 epochs = 20 steps
    assert len(losses.losses) == 20
    tlosses = []
    for e in range(4):  # the trainer's batch order: default_rng((seed, epoch)).permutation(n)
        order = np.random.default_rng((11, e)).permutation(len(x))
        for s in range(0, len(x), 16):
            idx = order[s : s + 16]
            logits = twin(torch.tensor(x[idx]))
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor(y[idx]), label_smoothing=0.1)
            topt.zero_grad()
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(P.values(), clip)
            topt.step()
            if sched:
                sched.step()
            tlosses.append(loss.item())
    rel = np.abs(np.array(losses.losses) - tlosses) / np.abs(tlosses)
    assert rel.max() < 1e-4, f"relative loss differences {rel}"
    assert tlosses[-1] < tlosses[0]
    for n, p in model.named_parameters():
        if n.endswith("b_k"):
            continue  # its exact gradient is 0 (softmax ignores a shift of all scores); Adam amplifies the noise
        np.testing.assert_allclose(p.data, P[n].detach().numpy(), rtol=1e-3, atol=1e-4, err_msg=n)


# ----------------------------------------------------------------------------
# the train subcommand and the digits target
# ----------------------------------------------------------------------------


def _parse(argv):
    from qkv_native import train_cli

    parser = argparse.ArgumentParser(prog="qkv-native")
    sub = parser.add_subparsers(dest="command")
    train_cli.add_parser(sub)
    return parser.parse_args(argv)


def test_digits_tokens():
    pytest.importorskip("sklearn")
    from qkv_native.data import load_digits_tokens, tokenize_images

    xtr, ytr, xte, yte = load_digits_tokens("rows", 0.2, seed=0)
    assert xtr.shape[1:] == (8, 8) and len(xtr) + len(xte) == 1797 and xtr.dtype == F32
    assert 0.0 <= xtr.min() and xtr.max() <= 1.0 and set(np.unique(yte)) == set(range(10))
    img = np.arange(64, dtype=F32).reshape(1, 8, 8)
    p = tokenize_images(img, "patches")
    assert p.shape == (1, 16, 4) and p[0, 0].tolist() == [0, 1, 8, 9] and p[0, 5].tolist() == [18, 19, 26, 27]


def test_stratified_split_checks_its_arguments():
    from qkv_native.data import stratified_split

    labels = np.array([0, 1, 0, 1, 2, 2, 0, 1], np.int64)
    train, test = stratified_split(labels, 0.5, seed=np.int64(3))
    assert len(train) + len(test) == len(labels) and set(train).isdisjoint(test)
    assert test.max() < len(labels) and np.bincount(labels[test]).tolist() == [2, 2, 1]
    with pytest.raises(ValueError, match="^labels must be a non-empty 1-D array, got shape \\(4, 2\\)"):
        stratified_split(np.zeros((4, 2), np.int64), 0.5, 0)  # used to give test indices past the end
    with pytest.raises(ValueError, match="^labels must be a non-empty 1-D array, got shape \\(0,\\)"):
        stratified_split(np.array([], np.int64), 0.5, 0)
    with pytest.raises(ValueError, match="^test_fraction 0.01 leaves no test sample"):
        stratified_split(np.array([0] * 3 + [1] * 50), 0.01, 0)
    with pytest.raises(ValueError, match="^test_fraction 0.99 leaves no train sample"):
        stratified_split(labels, 0.99, 0)
    for seed in (-1, 1.5, True, None):
        with pytest.raises(ValueError, match="^seed must be an integer >= 0"):
            stratified_split(labels, 0.5, seed)
    with pytest.raises(ValueError, match="^test_fraction must lie in"):
        stratified_split(labels, float("nan"), 0)
    with pytest.raises(TypeError, match="^test_fraction must be a real number, got str"):
        stratified_split(labels, "0.2", 0)  # (was a failed comparison naming nothing)


def test_tokenize_images_rejects_a_list():
    from qkv_native.data import tokenize_images

    with pytest.raises(TypeError, match="^images must be a numpy.ndarray, got list"):
        tokenize_images(np.zeros((2, 8, 8)).tolist())


def test_train_subcommand_quick(tmp_path, capsys):
    pytest.importorskip("sklearn")
    ckpt = str(tmp_path / "digits.npz")
    argv = ["train", "--epochs", "1", "--d-model", "16", "--d-ff", "32", "--num-layers", "1", "--no-progress",
            "--checkpoint", ckpt, "--batch-size", "64"]
    args = _parse(argv)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "time per epoch" in out and os.path.exists(ckpt)
    args = _parse(argv[:2] + ["2"] + argv[3:] + ["--resume", "--tokens", "rows"])
    assert args.func(args) == 0
    assert "resumed from" in capsys.readouterr().out
    args = _parse(["train", "--resume"])
    assert args.func(args) == 2


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--threads", "0"], "set_num_threads"),
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--d-model", "0"], "--d-model must be positive"),
        (["--epochs", "-1"], "--epochs must be positive"),
        (["--num-heads", "0"], "--num-heads must be positive"),
        (["--test-fraction", "2"], "--test-fraction must lie in (0, 1)"),
        (["--dropout", "1.5"], "dropout must lie in [0, 1)"),
        (["--checkpoint", "/nonexistent-dir/ck.npz"], "its directory does not exist"),
    ],
)
def test_train_subcommand_option_errors_exit_2(flags, message, capsys):
    """Bad option values end in a one-line error and status 2, before any training."""
    pytest.importorskip("sklearn")
    args = _parse(["train", "--no-progress", *flags])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkv-native train: error:") and message in err


@pytest.mark.slow
def test_digits_reaches_97_percent(capsys):
    pytest.importorskip("sklearn")
    args = _parse(["train", "--no-progress", "--min-accuracy", "0.97"])
    assert args.func(args) == 0, capsys.readouterr()


def test_no_samples_and_bad_batch_sizes():
    x, y = toy_data()
    trainer = Trainer(small_model(), optimizer=optim.AdamW(lr=1e-3), progress=False)
    with pytest.raises(ValueError, match="^x holds no samples"):
        trainer.fit(x[:0], y[:0], epochs=1)
    with pytest.raises(ValueError, match="^x holds no samples"):
        trainer.predict(x[:0])
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="^batch_size must be a positive integer"):
            trainer.fit(x, y, epochs=1, batch_size=bad)
        with pytest.raises(ValueError, match="^batch_size must be a positive integer"):
            trainer.predict(x, batch_size=bad)
        with pytest.raises(ValueError, match="^batch_size must be a positive integer"):
            trainer.evaluate(x, y, batch_size=bad)


def _ce_reference(logits, y, ignore_index=-100, eps=0.0):
    """float64 mean over the non-ignored rows of torch's label-smoothed cross-entropy."""
    z = logits.astype(np.float64)
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    valid = y != ignore_index
    rows = np.arange(len(y))[valid]
    per_row = (1 - eps) * (lse[valid] - z[rows, y[valid]]) + eps * (lse[valid] - z[valid].mean(1))
    return float(per_row.mean()) if len(rows) else 0.0


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_losses_with_ignore_index_do_not_depend_on_batch_size(eps):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 4)).astype(F32)
    y = np.array([0, 1, -100, -100, -100, 2, 1, -100, 0, 2])
    loss = nn.CrossEntropyLoss(ignore_index=-100, label_smoothing=eps)
    trainer = Trainer(nn.Linear(4, 3), loss=loss, optimizer=optim.SGD(lr=0.0), progress=False)
    want = _ce_reference(trainer.predict(x), y, eps=eps)
    for bs in (1, 2, 3, 4, 10):
        assert trainer.evaluate(x, y, batch_size=bs)["loss"] == pytest.approx(want, rel=1e-6)
    # lr = 0: the epoch loss is the loss of the whole data set as one batch, whatever the batches
    for bs in (1, 3, 10):
        hist = Trainer(trainer.model, loss=loss, optimizer=optim.SGD(lr=0.0), progress=False).fit(
            x, y, epochs=1, batch_size=bs, seed=3)
        assert hist["loss"][0] == pytest.approx(want, rel=1e-6)
    # every target ignored: a mean of nothing, 0 (as the loss itself)
    assert trainer.evaluate(x, np.full(10, -100), batch_size=3)["loss"] == 0.0


def test_mse_losses_unchanged_by_batch_size():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, 3)).astype(F32)
    y = rng.standard_normal((7, 2)).astype(F32)
    trainer = Trainer(nn.Linear(3, 2), loss="mse", optimizer=optim.SGD(lr=0.0), progress=False)
    want = float(np.mean((trainer.predict(x).astype(np.float64) - y) ** 2))
    for bs in (1, 2, 7):
        assert trainer.evaluate(x, y, batch_size=bs)["loss"] == pytest.approx(want, rel=1e-6)
    assert trainer.fit(x, y, epochs=1, batch_size=3)["loss"][0] == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"loss": 3}, TypeError, "^loss must be one of"),
    ({"loss": "hinge"}, ValueError, "^loss must be one of"),
    ({"loss": nn.CrossEntropyLoss}, TypeError, "^loss must be one of .* got the class CrossEntropyLoss"),
    ({"optimizer": "adam"}, TypeError, "^optimizer must be a qkv_native.optim.Optimizer"),
    ({"clip_grad_norm": -1.0}, ValueError, "^clip_grad_norm must be a number >= 0"),
    ({"clip_grad_norm": float("nan")}, ValueError, "^clip_grad_norm must be a number >= 0"),
    ({"clip_grad_norm": "1"}, TypeError, "^clip_grad_norm must be a real number"),
    ({"clip_grad_norm": True}, TypeError, "^clip_grad_norm must be a real number"),
])
def test_trainer_rejects_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        Trainer(nn.Linear(3, 2), progress=False, **kwargs)


def test_trainer_accepts_good_arguments():
    for clip in (0, 0.5, np.float32(2.0), float("inf")):
        Trainer(nn.Linear(3, 2), progress=False, clip_grad_norm=clip)
    x, y = toy_data(n=8)
    trainer = Trainer(small_model(), progress=False)
    trainer.fit(x, y, epochs=np.int64(1), batch_size=np.int32(4), seed=np.uint8(2))
    assert trainer.epoch == 1 and trainer.seed == 2
    assert trainer.fit(x, y, epochs=0)["loss"] == trainer.history["loss"]


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": 2.5}, "^epochs must be an integer >= 0, got 2.5"),
    ({"epochs": "3"}, "^epochs must be an integer >= 0, got '3'"),
    ({"epochs": True}, "^epochs must be an integer >= 0"),
    ({"epochs": -1}, "^epochs must be an integer >= 0"),
    ({"epochs": 1, "seed": -1}, "^seed must be an integer >= 0, got -1"),
    ({"epochs": 1, "seed": 1.0}, "^seed must be an integer >= 0"),
    ({"epochs": 1, "seed": False}, "^seed must be an integer >= 0"),
])
def test_fit_rejects_bad_epochs_and_seed_before_training(kwargs, message):
    x, y = toy_data(n=8)
    trainer = Trainer(small_model(), progress=False)
    w0 = trainer.model.state_dict()
    with pytest.raises(ValueError, match=message):
        trainer.fit(x, y, **kwargs)
    assert trainer.epoch == 0 and trainer.seed == 0 and trainer.history == {}
    assert all(np.array_equal(a, trainer.model.state_dict()[k]) for k, a in w0.items())


@pytest.mark.parametrize("validation, error, message", [
    (lambda x, y: (x.astype(np.float64), y), TypeError, r"^validation\[0\] must have dtype float32"),
    (lambda x, y: (x, y[:-1]), ValueError, r"^validation\[0\] and validation\[1\] must have the same length"),
    (lambda x, y: (x,), TypeError, r"^validation must be a pair \(x_val, y_val\), got tuple of length 1"),
    (lambda x, y: x, TypeError, r"^validation must be a pair"),
    (lambda x, y: (x[:0], y[:0]), ValueError, r"^validation\[0\] holds no samples"),
])
def test_fit_checks_validation_before_training(validation, error, message):
    """A bad validation set was found by the evaluation after the first epoch: the error
    came with an epoch's updates in the weights and optimizer but the epoch not counted."""
    x, y = toy_data(n=8)
    trainer = Trainer(small_model(), progress=False)
    w0 = trainer.model.state_dict()
    with pytest.raises(error, match=message):
        trainer.fit(x, y, epochs=1, validation=validation(x, y))
    assert trainer.optimizer.step_count == 0 and trainer.history == {}
    assert all(np.array_equal(a, trainer.model.state_dict()[k]) for k, a in w0.items())
    with pytest.raises(ValueError, match="^x and y must have the same length, got 8 and a scalar"):
        trainer.fit(x, 3, epochs=1)  # (was len() of unsized object)


def test_trainer_and_an_optimizer_over_other_parameters():
    """An optimizer attached to another model was taken, and the model never trained; the
    gradients of parameters the optimizer updates beyond the model's (a loss's own, here a
    counter that every backward adds 1 to) were never zeroed, so each step used their sum
    over all batches so far."""
    x, y = toy_data(n=20)
    with pytest.raises(ValueError, match="^optimizer is attached to none of the model's parameters"):
        Trainer(small_model(), optimizer=optim.SGD(small_model(rng=1), lr=0.1), progress=False)

    class CountingLoss(nn.CrossEntropyLoss):
        def __init__(self):
            super().__init__()
            self.count = nn.Parameter(np.zeros(1, F32))

        def backward(self, dloss=1.0):
            self.count.grad += 1.0
            return super().backward(dloss)

    model, loss = small_model(), CountingLoss()
    opt = optim.SGD(list(model.named_parameters()) + [("count", loss.count)], lr=1.0)
    Trainer(model, loss, opt, progress=False).fit(x, y, epochs=1, batch_size=5)
    assert loss.count.data[0] == -4.0  # one per batch (was -1 - 2 - 3 - 4)


def test_attention_classifier_checks_its_arguments():
    """num_layers=-1 built a model without encoder blocks, 2.5 failed in range() naming
    nothing; dropout=-0.1 was reported as Dropout's p."""
    for num_layers in (-1, 2.5, True):
        with pytest.raises(ValueError, match="^num_layers must be an integer >= 0"):
            attention_classifier(3, 4, 3, num_layers=num_layers)
    with pytest.raises(ValueError, match=r"^dropout must lie in \[0, 1\), got -0.1"):
        attention_classifier(3, 4, 3, dropout=-0.1)
    assert len(attention_classifier(3, 4, 3, num_layers=np.int64(0))) == 5


def test_a_replaced_layer_is_not_left_untrained():
    """model[-1] = new_head after the trainer attached its optimizer: fit trained the rest and
    left the new head as it was (the optimizer still held the old one), silently."""
    x, y = toy_data(n=20)
    model = small_model()
    trainer = Trainer(model, progress=False)
    trainer.fit(x, y, epochs=1, batch_size=10)
    head = nn.Linear(8, 3, rng=5)
    w0 = head.weight.data.copy()
    model[-1] = head
    with pytest.raises(ValueError, match=r"^the model's parameters changed since the trainer attached its optimizer "
                                         r"to them \(new \['\d+.weight', '\d+.bias'\], gone \['\d+.weight'"):
        trainer.fit(x, y, epochs=2, batch_size=10)
    trainer.optimizer.attach(model)
    trainer.fit(x, y, epochs=2, batch_size=10)
    assert not np.array_equal(head.weight.data, w0)
    # an optimizer the caller attached is theirs to keep (here: the head alone, the rest frozen)
    frozen = small_model()
    Trainer(frozen, optimizer=optim.SGD(frozen[-1], lr=0.1), progress=False).fit(x, y, epochs=1)
    trainer.optimizer = optim.SGD(model[-1], lr=0.1)
    trainer.fit(x, y, epochs=3, batch_size=10)


def test_evaluate_rejects_no_samples():
    x, y = toy_data()
    trainer = Trainer(small_model(), progress=False)
    with pytest.raises(ValueError, match="^x holds no samples"):
        trainer.evaluate(x[:0], y[:0])


def test_callback_arguments_are_checked_at_construction(tmp_path):
    for every in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="^every must be a positive integer"):
            ModelCheckpoint(str(tmp_path / "a.npz"), every=every)
    ModelCheckpoint(str(tmp_path / "a.npz"), every=np.int64(2))
    for patience in (-1, 2.5, None):
        with pytest.raises(ValueError, match="^patience must be an integer >= 0"):
            EarlyStopping(patience=patience)
    for min_delta, error, says in ((float("nan"), ValueError, "a finite number >= 0"),
                                   (-0.1, ValueError, "a finite number >= 0"),
                                   (float("inf"), ValueError, "a finite number >= 0"), ("0", TypeError, "a real number")):
        with pytest.raises(error, match=f"^min_delta must be {says}"):
            EarlyStopping(min_delta=min_delta)
    EarlyStopping(patience=0, min_delta=0)
    with pytest.raises(TypeError, match="^path must be a str or os.PathLike, got NoneType"):
        ModelCheckpoint(None)  # (failed after the first epoch's training)
    with pytest.raises(TypeError, match="^monitor must be a str, got int"):
        EarlyStopping(3)
    ModelCheckpoint(tmp_path / "a.npz")


def test_early_stopping_never_takes_nan_for_the_best():
    """A NaN first value became the best for good (nothing compares better than NaN): the
    improving epochs after it counted as no improvement, training stopped after `patience`
    epochs and restore_best put back the weights of the NaN epoch."""
    model = small_model()
    trainer = Trainer(model, progress=False)
    es = EarlyStopping("val_loss", patience=2)
    for epoch, value in enumerate([float("nan"), 1.0, 0.5, float("nan"), 0.4]):
        model[0].weight.data[...] = epoch
        es.on_epoch_end(trainer, epoch, {"val_loss": value})
    assert (es.best, es.best_epoch, es.wait) == (0.4, 4, 0) and not trainer.stop_training
    for epoch, value in ((5, float("nan")), (6, 0.45)):
        model[0].weight.data[...] = epoch
        es.on_epoch_end(trainer, epoch, {"val_loss": value})
    assert trainer.stop_training
    es.on_train_end(trainer)
    assert (model[0].weight.data == 4).all()


def test_early_stopping_restores_best_only_when_stopped_early():
    # mode "max" on a falling loss: the best epoch is the first one
    x, y = toy_data(n=32)

    def run(patience):
        es = EarlyStopping("loss", mode="max", patience=patience)
        trainer = Trainer(small_model(), optimizer=optim.SGD(lr=0.5), progress=False, callbacks=[es])
        trainer.fit(x, y, epochs=4, batch_size=8)
        best = es._best_weights
        now = trainer.model.state_dict()
        return trainer.epoch, es.best_epoch, all(np.array_equal(best[k], now[k]) for k in best)

    assert run(patience=1) == (2, 0, True)  # stopped early: the best epoch's weights are back
    assert run(patience=100) == (4, 0, False)  # the epochs ran out: the last epoch's weights stay
