"""qkv_native.nn: every layer's backward against central finite differences and,
when torch is installed, forward and backward against torch autograd with the
same weights; the NumPy kernels against float64 re-implementations; parameter
bookkeeping (names, save/load, accumulation, seeded init)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from qkv_native import nn, optim
from qkv_native.train import EarlyStopping, Trainer
from qkv_native import reference as ref

F32 = np.float32


from _helpers import torch_one_thread as _torch  # noqa: E402


def randn(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(F32)


# ----------------------------------------------------------------------------
# finite differences
# ----------------------------------------------------------------------------


def _objective(layer, inputs, r, kwargs):
    y = layer.forward(*inputs, **kwargs)
    return float(np.sum(y.astype(np.float64) * r))


def check_fd(layer, inputs, *, kwargs=None, eps=1e-2, rtol=2e-2, n_coords=6, seed=0, check_inputs=True):
    """Compare backward with central differences of f = Σ y·r (float32 forward).

    Checks up to ``n_coords`` random coordinates of every parameter and every
    float input; the error is measured as ‖fd - analytic‖ / ‖analytic‖ over them.
    """
    kwargs = kwargs or {}
    rng = np.random.default_rng(seed)
    layer.zero_grad()
    y = layer.forward(*inputs, **kwargs)
    r = rng.standard_normal(y.shape)
    dins = layer.backward(r.astype(F32))
    if not isinstance(dins, tuple):
        dins = (dins,)
    targets = [(f"param {n}", p.data, p.grad) for n, p in layer.named_parameters()]
    if check_inputs:
        targets += [(f"input {i}", x, d) for i, (x, d) in enumerate(zip(inputs, dins)) if x.dtype == F32]
    assert targets
    for name, arr, grad in targets:
        flat = arr.reshape(-1)
        idx = rng.choice(flat.size, size=min(n_coords, flat.size), replace=False)
        fd = []
        for i in idx:
            old = flat[i]
            flat[i] = old + F32(eps)
            fp = _objective(layer, inputs, r, kwargs)
            flat[i] = old - F32(eps)
            fm = _objective(layer, inputs, r, kwargs)
            flat[i] = old
            fd.append((fp - fm) / (2 * eps))
        fd = np.array(fd)
        an = grad.reshape(-1)[idx].astype(np.float64)
        # atol: the float32 rounding of f over 2·eps (some gradients are exactly 0, e.g. b_k)
        err = np.linalg.norm(fd - an)
        assert err < rtol * np.linalg.norm(an) + 1e-3, f"{type(layer).__name__} {name}: fd {fd} vs backward {an}"


def test_fd_linear():
    rng = np.random.default_rng(0)
    check_fd(nn.Linear(5, 7, rng=1), [randn(rng, 2, 3, 5)])
    check_fd(nn.Linear(5, 4, bias=False, rng=1), [randn(rng, 6, 5)])


def test_fd_embedding_and_positions():
    rng = np.random.default_rng(0)
    emb = nn.Embedding(11, 6, init="xavier_uniform", rng=2)
    ids = np.array([[1, 3, 3], [10, 0, 1]])  # repeated ids must add up
    check_fd(emb, [ids])
    check_fd(nn.LearnedPositionalEmbedding(5, 6, rng=3), [randn(rng, 2, 4, 6)])
    pe = nn.SinusoidalPositionalEncoding(9, 6)
    x = randn(rng, 2, 4, 6)
    check_fd(pe, [x])
    y = pe.forward(x)
    np.testing.assert_allclose(y[0, 3, 0] - x[0, 3, 0], math.sin(3.0), rtol=1e-6)
    np.testing.assert_allclose(y[1, 2, 3] - x[1, 2, 3], math.cos(2.0 / 10000 ** (2 / 6)), rtol=1e-5)


def test_fd_layernorm_activations():
    rng = np.random.default_rng(0)
    ln = nn.LayerNorm(6)
    ln.weight.data[:] = randn(rng, 6)
    ln.bias.data[:] = randn(rng, 6)
    check_fd(ln, [randn(rng, 3, 4, 6)])
    check_fd(nn.GELU(), [randn(rng, 4, 5)])
    check_fd(nn.GELU("tanh"), [randn(rng, 4, 5)])
    x = randn(rng, 4, 5)
    x[np.abs(x) < 0.1] = 0.5  # away from the kink
    check_fd(nn.ReLU(), [x])


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,causal,lengths",
    [(2, 2, False, None), (4, 2, True, None), (4, 1, False, [3, 5])],
)
def test_fd_self_attention(num_heads, num_kv_heads, causal, lengths):
    rng = np.random.default_rng(1)
    mha = nn.MultiHeadAttention(8, num_heads, num_kv_heads=num_kv_heads, causal=causal, rng=4)
    for _, p in mha.named_parameters():  # non-zero biases
        if p.data.ndim == 1:
            p.data[:] = randn(rng, *p.shape, scale=0.3)
    kl = None if lengths is None else np.array(lengths)
    check_fd(mha, [randn(rng, 2, 5, 8)], kwargs={"key_lengths": kl})


def test_fd_cross_attention():
    rng = np.random.default_rng(2)
    mha = nn.MultiHeadAttention(8, 4, num_kv_heads=2, rng=5)
    mha.b_k.data[:] = randn(rng, 4)
    mha.b_v.data[:] = randn(rng, 4)
    check_fd(mha, [randn(rng, 2, 3, 8), randn(rng, 2, 6, 8)], kwargs={"key_lengths": np.array([6, 2])})


@pytest.mark.parametrize("norm_first", [True, False])
def test_fd_encoder_block(norm_first):
    rng = np.random.default_rng(3)
    blk = nn.TransformerEncoderBlock(8, 2, 16, norm_first=norm_first, rng=6)
    check_fd(blk, [randn(rng, 2, 4, 8)], kwargs={"key_lengths": np.array([4, 3])}, n_coords=4)


def test_fd_pooling_and_sequential():
    rng = np.random.default_rng(4)
    check_fd(nn.MeanPool(), [randn(rng, 3, 4, 5)], kwargs={"key_lengths": np.array([4, 1, 2])})
    check_fd(nn.MeanPool(), [randn(rng, 3, 4, 5)])
    check_fd(nn.ClsPool(), [randn(rng, 3, 4, 5)])
    check_fd(nn.ClsToken(5, rng=1), [randn(rng, 2, 3, 5)])
    model = nn.Sequential(
        nn.Linear(3, 8, rng=1),
        nn.LearnedPositionalEmbedding(4, 8, rng=2),
        nn.ClsToken(8, init="xavier_uniform", rng=3),  # O(1) token: LayerNorm is smooth there
        nn.TransformerEncoderBlock(8, 2, 12, num_kv_heads=1, rng=4),
        nn.LayerNorm(8),
        nn.ClsPool(),
        nn.Linear(8, 3, rng=5),
    )
    check_fd(model, [randn(rng, 2, 4, 3)], n_coords=3)


def test_attention_mask_matches_key_lengths_and_grads_view():
    rng = np.random.default_rng(8)
    mha = nn.MultiHeadAttention(8, 2, num_kv_heads=1, rng=1)
    x, dy = randn(rng, 2, 5, 8), randn(rng, 2, 5, 8)
    kl = np.array([5, 2])
    mask = (np.arange(5)[None, :] < kl[:, None])[:, None, None, :]  # (batch, 1, 1, seq_k), True = attend
    mha.zero_grad()
    y1, dx1 = mha.forward(x, key_lengths=kl), mha.backward(dy)
    g1 = {n: g.copy() for n, g in mha.grads.items()}
    mha.zero_grad()
    y2, dx2 = mha.forward(x, mask=mask), mha.backward(dy)
    np.testing.assert_allclose(y2, y1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx2, dx1, rtol=1e-5, atol=1e-6)
    for n, g in mha.grads.items():
        np.testing.assert_allclose(g, g1[n], rtol=1e-4, atol=1e-6, err_msg=n)
    assert mha.grads["w_q"] is mha.w_q.grad


def test_sequential_refuses_a_layer_twice():
    """A layer keeps one input for its backward: used twice, its weight gradient would
    silently miss the first use."""
    lin = nn.Linear(6, 6, rng=0)
    with pytest.raises(ValueError, match="layer 1 appears twice"):
        nn.Sequential(lin, lin)
    # inside another layer too (was accepted: the first use's gradient silently wrong)
    with pytest.raises(ValueError, match="layer 1 holds a Linear that layer 0 also holds"):
        nn.Sequential(lin, nn.Sequential(nn.ReLU(), lin))
    block = nn.TransformerEncoderBlock(6, 2, 8)
    with pytest.raises(ValueError, match="layer 2 holds a TransformerEncoderBlock that layer 1 also holds"):
        nn.Sequential(lin, nn.Sequential(block), nn.Sequential(block))
    with pytest.raises(ValueError, match="layer 1 holds a MultiHeadAttention that layer 0 also holds"):
        nn.Sequential(block.attn, block)
    shared = nn.Linear(6, 6, rng=1)
    shared.weight = lin.weight  # sharing a Parameter is fine: each layer keeps its own input
    nn.Sequential(lin, nn.ReLU(), shared)


def test_sequential_layer_replacement_is_registered():
    """seq.layers was a list of its own: seq.layers[-1] = new_head ran the new head while
    named_parameters, checkpoints and optimizers kept the old one (the new never trained).
    Now layers is a tuple of the registered children and seq[i] = layer replaces one."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    head = nn.Linear(4, 5, rng=3)
    with pytest.raises(TypeError):
        model.layers[-1] = head
    model[-1] = head
    assert model.layers[2] is head and model[2] is head and len(model) == 3
    assert model.forward(np.ones((2, 3), F32)).shape == (2, 5)
    assert dict(model.named_parameters())["2.weight"] is head.weight
    with pytest.raises(ValueError, match="layer 1 appears twice"):
        model[0] = model[1]
    with pytest.raises(IndexError):
        model[3] = nn.ReLU()
    with pytest.raises(TypeError, match="^layer 1 must be a qkv_native.nn.Module"):
        model[1] = np.tanh


def test_mean_pool_ignores_padding():
    x = np.ones((2, 4, 3), F32)
    x[1, 2:] = 100.0  # padding positions
    y = nn.MeanPool().forward(x, key_lengths=np.array([4, 2]))
    np.testing.assert_allclose(y, 1.0)
    for bad in ([10, 4], [-1, 4]):  # a length past seq gave 0.4 for a mean of ones
        with pytest.raises(ValueError, match=r"key_lengths must lie in \[0, seq=4\]"):
            nn.MeanPool().forward(x, key_lengths=np.array(bad))
    np.testing.assert_array_equal(nn.MeanPool().forward(np.ones((2, 0, 3), F32)), 0.0)  # a mean of nothing
    with pytest.raises(ValueError, match="seq >= 1"):
        nn.ClsPool().forward(np.ones((2, 0, 3), F32))


# ----------------------------------------------------------------------------
# NumPy kernels vs float64
# ----------------------------------------------------------------------------


def test_gelu_erf_accuracy():
    x = np.linspace(-9, 9, 721).astype(F32)
    want = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    got = nn.gelu_forward(x)
    assert got.dtype == F32
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
    # relative accuracy deep in the left tail too: GELU(x)/x = Phi(x)
    cdf = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in x.astype(np.float64)])
    nz = x != 0
    np.testing.assert_allclose(got[nz] / x[nz], cdf[nz], rtol=1e-5)


def test_gelu_kernels_check_approximate():
    """gelu_forward(x, "Tanh") (or any other string) silently ran the erf form."""
    x = np.linspace(-3, 3, 7, dtype=F32)
    for bad in ("Tanh", "erf", None):
        with pytest.raises(ValueError, match="^approximate must be 'none' or 'tanh'"):
            nn.gelu_forward(x, bad)
        with pytest.raises(ValueError, match="^approximate must be 'none' or 'tanh'"):
            nn.gelu_backward(x, x, bad)
        with pytest.raises(ValueError, match="^approximate must be 'none' or 'tanh'"):
            nn.GELU(bad)


def test_layernorm_kernel_vs_float64():
    rng = np.random.default_rng(5)
    x, w, b, dy = randn(rng, 7, 33, scale=3.0) + 5, randn(rng, 33), randn(rng, 33), randn(rng, 7, 33)
    out, mean, rstd = nn.layernorm_forward(x, w, b, 1e-5)
    x64 = x.astype(np.float64)
    mu = x64.mean(1, keepdims=True)
    sd = np.sqrt(((x64 - mu) ** 2).mean(1, keepdims=True) + 1e-5)
    norm = (x64 - mu) / sd
    np.testing.assert_allclose(out, norm * w + b, rtol=1e-5, atol=1e-5)
    dw, db = np.zeros(33, F32), np.ones(33, F32)  # db starts at 1: backward must accumulate
    dx = nn.layernorm_backward(dy, x, mean, rstd, w, dw, db)
    dn = dy * w.astype(np.float64)
    want_dx = (dn - dn.mean(1, keepdims=True) - norm * (dn * norm).mean(1, keepdims=True)) / sd
    np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dw, (dy * norm).sum(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(db, 1 + dy.sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_softmax_cross_entropy_vs_float64(eps):
    rng = np.random.default_rng(6)
    logits = randn(rng, 9, 5, scale=4.0)
    logits[0] += 1e4  # stable with huge logits
    targets = rng.integers(0, 5, 9)
    targets[[2, 5]] = -1
    loss, grad = nn.softmax_cross_entropy(logits, targets, label_smoothing=eps, ignore_index=-1)
    want_loss, want_grad = ref.softmax_cross_entropy(logits, targets, label_smoothing=eps, ignore_index=-1)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)
    assert not grad[[2, 5]].any()
    loss0, grad0 = nn.softmax_cross_entropy(logits, np.full(9, -1), ignore_index=-1)
    assert loss0 == 0.0 and not grad0.any()


def test_losses_check_arguments_and_fd():
    rng = np.random.default_rng(7)
    ce = nn.CrossEntropyLoss(label_smoothing=0.1)
    logits = randn(rng, 2, 3, 4)
    t = rng.integers(0, 4, (2, 3))
    ce.forward(logits, t)
    g = ce.backward()
    i = (1, 2, 3)
    lp, lm = logits.copy(), logits.copy()
    lp[i] += 1e-2
    lm[i] -= 1e-2
    fd = (ce.forward(lp, t) - ce.forward(lm, t)) / 2e-2
    assert abs(fd - g[i]) < 1e-3
    with pytest.raises(ValueError, match="targets"):
        ce.forward(logits, np.full((2, 3), 4))
    with pytest.raises(TypeError, match="float32"):
        ce.forward(logits.astype(np.float64), t)
    mse = nn.MSELoss()
    p, y = randn(rng, 3, 4), randn(rng, 3, 4)
    assert abs(mse.forward(p, y) - np.mean((p.astype(np.float64) - y) ** 2)) < 1e-6
    np.testing.assert_allclose(mse.backward(), 2 * (p - y) / p.size, rtol=1e-6)
    # of nothing: 0 and an empty gradient (was NaN with a RuntimeWarning, then ZeroDivisionError)
    assert mse.forward(randn(rng, 0, 4), randn(rng, 0, 4)) == 0.0 and mse.backward().shape == (0, 4)


# ----------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------


def test_dropout_seeded_scaled_and_backward():
    x = np.ones((200, 50), F32)
    d1, d2 = nn.Dropout(0.25, rng=7), nn.Dropout(0.25, rng=7)
    y1, y2 = d1.forward(x), d2.forward(x)
    np.testing.assert_array_equal(y1, y2)  # same seed, same mask
    assert abs((y1 == 0).mean() - 0.25) < 0.02
    np.testing.assert_allclose(y1[y1 != 0], 1 / 0.75)
    dy = np.full_like(x, 3.0)
    np.testing.assert_array_equal(d1.backward(dy), 3.0 * y1)  # same mask
    assert not np.array_equal(d1.forward(x), y1)  # a fresh mask each call
    d1.eval()
    np.testing.assert_array_equal(d1.forward(x), x)
    np.testing.assert_array_equal(d1.backward(dy), dy)
    with pytest.raises(ValueError, match="p must"):
        nn.Dropout(1.0)


# ----------------------------------------------------------------------------
# parameters, accumulation, init, save/load, errors
# ----------------------------------------------------------------------------


def test_named_parameters_and_accumulation():
    model = nn.Sequential(nn.Linear(4, 6, rng=0), nn.GELU(), nn.TransformerEncoderBlock(6, 2, 8, rng=1))
    names = [n for n, _ in model.named_parameters()]
    assert names[:2] == ["0.weight", "0.bias"]
    assert "2.attn.w_q" in names and "2.ff.fc2.bias" in names and len(names) == len(set(names))
    assert model.num_parameters() == sum(p.data.size for p in model.parameters())
    rng = np.random.default_rng(0)
    x, dy = randn(rng, 2, 3, 4), randn(rng, 2, 3, 6)
    model.zero_grad()
    model.forward(x)
    model.backward(dy)
    once = {n: p.grad.copy() for n, p in model.named_parameters()}
    model.forward(x)
    model.backward(dy)
    for n, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, 2 * once[n], rtol=1e-5, atol=1e-6, err_msg=n)
    model.zero_grad()
    assert all(not p.grad.any() for p in model.parameters())


def test_reassigned_parameters_and_submodules_are_unregistered():
    """Setting a parameter or submodule attribute to None (or deleting it) left the old one
    registered: still listed, saved, counted and updated by an optimizer, though forward no
    longer used it; an array assigned over a parameter was silently ignored by named_parameters."""
    lin = nn.Linear(3, 4)
    lin.bias = None  # forward now adds no bias
    assert [n for n, _ in lin.named_parameters()] == ["weight"] and lin.num_parameters() == 12
    assert list(lin.state_dict()) == ["weight"]
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    model.extra = nn.Linear(4, 4)
    del model.extra
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias"]
    with pytest.raises(TypeError, match="^weight is a parameter of Linear: assign a Parameter or None, got ndarray"):
        lin.weight = np.zeros((3, 4), F32)
    with pytest.raises(TypeError, match="^0 is a submodule of Sequential: assign a Module or None, got int"):
        setattr(model, "0", 3)
    lin.weight = nn.Parameter(np.ones((3, 4), F32))  # a new Parameter replaces the old one
    assert lin.parameters() == [lin.weight]


def test_tied_parameters_are_listed_once_and_trained():
    """A Parameter shared by two layers was listed under both names: optimizers refused the
    model ('params lists the same Parameter twice'), checkpoints held it twice and
    num_parameters counted it twice. Its gradient is the sum of both uses'."""
    rng = np.random.default_rng(0)
    a, b = nn.Linear(4, 4, rng=1), nn.Linear(4, 4, rng=2)
    b.weight = a.weight
    tied = nn.Sequential(a, nn.GELU(), b)
    assert [n for n, _ in tied.named_parameters()] == ["0.weight", "0.bias", "2.bias"]
    assert tied.num_parameters() == 24 and list(tied.state_dict()) == ["0.weight", "0.bias", "2.bias"]
    untied = nn.Sequential(nn.Linear(4, 4, rng=1), nn.GELU(), nn.Linear(4, 4, rng=1))
    x, dy = randn(rng, 3, 4), randn(rng, 3, 4)
    for m in (tied, untied):
        m.zero_grad()
        m.forward(x)
        m.backward(dy)
    np.testing.assert_allclose(a.weight.grad, untied[0].weight.grad + untied[2].weight.grad, rtol=1e-6, atol=1e-6)
    opt = optim.SGD(tied, lr=0.5)
    w = a.weight.data - 0.5 * a.weight.grad
    opt.step()
    np.testing.assert_allclose(b.weight.data, w, rtol=1e-6, atol=1e-7)
    assert b.weight.data is a.weight.data


def test_init_is_explicit_and_seeded():
    a, b, c = nn.Linear(30, 20, rng=3), nn.Linear(30, 20, rng=3), nn.Linear(30, 20, rng=4)
    np.testing.assert_array_equal(a.weight.data, b.weight.data)
    assert not np.array_equal(a.weight.data, c.weight.data)
    bound = math.sqrt(6 / 50)
    assert np.abs(a.weight.data).max() <= bound and not a.bias.data.any()
    k = nn.Linear(30, 20, init="kaiming_uniform", rng=0)
    assert np.abs(k.weight.data).max() <= 1 / math.sqrt(30)
    mha = nn.MultiHeadAttention(8, 2, rng=0)
    assert not np.array_equal(mha.w_q.data, mha.w_k.data)  # one generator, drawn in turn
    with pytest.raises(ValueError, match="init"):
        nn.Linear(2, 2, init="nope")
    with pytest.raises(TypeError, match="rng"):
        nn.Linear(2, 2, rng="seed")


def test_save_load_roundtrip_and_rejections(tmp_path):
    model = nn.Sequential(nn.Linear(4, 6, rng=0), nn.LayerNorm(6), nn.Linear(6, 2, rng=1))
    path = str(tmp_path / "m.npz")
    model.save(path)
    other = nn.Sequential(nn.Linear(4, 6, rng=5), nn.LayerNorm(6), nn.Linear(6, 2, rng=6))
    other.load(path)
    for (n, p), (_, q) in zip(model.named_parameters(), other.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=n)
    wrong = nn.Sequential(nn.Linear(4, 5, rng=0), nn.LayerNorm(5), nn.Linear(5, 2, rng=1))
    with pytest.raises(nn.CheckpointError, match="0.weight"):
        wrong.load(path)
    fewer = nn.Sequential(nn.Linear(4, 6, rng=0))
    with pytest.raises(nn.CheckpointError, match="unexpected"):
        fewer.load(path)
    # flip one byte in the middle of the file: rejected (zip CRC or sha256)
    raw = bytearray((tmp_path / "m.npz").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(nn.CheckpointError):
        other.load(str(bad))
    trunc = tmp_path / "trunc.npz"
    trunc.write_bytes(bytes(raw[: len(raw) // 3]))
    with pytest.raises(nn.CheckpointError):
        other.load(str(trunc))
    junk = tmp_path / "junk.npz"
    np.savez(str(junk), a=np.zeros(3))
    with pytest.raises(nn.CheckpointError, match="not a qkv_native checkpoint"):
        other.load(str(junk))
    with pytest.raises(FileNotFoundError):
        other.load(str(tmp_path / "missing.npz"))
    assert sorted(os.listdir(tmp_path)) == ["bad.npz", "junk.npz", "m.npz", "trunc.npz"]  # no temp files


def test_arguments_are_checked():
    lin = nn.Linear(4, 3)
    with pytest.raises(TypeError, match="float32"):
        lin.forward(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="d_in=4"):
        lin.forward(np.zeros((2, 5), F32))
    with pytest.raises(ValueError, match="num_kv_heads"):
        nn.MultiHeadAttention(8, 4, num_kv_heads=3)
    mha = nn.MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match="key_lengths"):
        mha.forward(np.zeros((2, 3, 8), F32), key_lengths=np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="context"):
        mha.forward(np.zeros((2, 3, 8), F32), np.zeros((3, 3, 8), F32))
    with pytest.raises(ValueError, match="ids"):
        nn.Embedding(5, 2).forward(np.array([[5]]))


# every layer: a factory and its forward inputs (x is (batch=2, seq=3, d=4): distinct sizes, so
# a permuted dy has the right size but not the right shape)
_X = (2, 3, 4)
_LAYERS = {
    "Linear": (lambda: nn.Linear(4, 5), lambda r: [randn(r, *_X)], {}),
    "Embedding": (lambda: nn.Embedding(7, 4), lambda r: [r.integers(0, 7, (2, 3))], {}),
    "LearnedPositionalEmbedding": (lambda: nn.LearnedPositionalEmbedding(5, 4), lambda r: [randn(r, *_X)], {}),
    "SinusoidalPositionalEncoding": (lambda: nn.SinusoidalPositionalEncoding(5, 4), lambda r: [randn(r, *_X)], {}),
    "LayerNorm": (lambda: nn.LayerNorm(4), lambda r: [randn(r, *_X)], {}),
    "GELU": (lambda: nn.GELU(), lambda r: [randn(r, *_X)], {}),
    "GELU-tanh": (lambda: nn.GELU("tanh"), lambda r: [randn(r, *_X)], {}),
    "ReLU": (lambda: nn.ReLU(), lambda r: [randn(r, *_X)], {}),
    "Dropout": (lambda: nn.Dropout(0.5), lambda r: [randn(r, *_X)], {}),
    "Dropout-eval": (lambda: nn.Dropout(0.5).eval(), lambda r: [randn(r, *_X)], {}),
    "MultiHeadAttention": (lambda: nn.MultiHeadAttention(4, 2), lambda r: [randn(r, *_X)], {}),
    "MultiHeadAttention-cross": (
        lambda: nn.MultiHeadAttention(4, 2), lambda r: [randn(r, *_X), randn(r, 2, 5, 4)], {}
    ),
    "FeedForward": (lambda: nn.FeedForward(4, 8), lambda r: [randn(r, *_X)], {}),
    "TransformerEncoderBlock": (
        lambda: nn.TransformerEncoderBlock(4, 2, 8), lambda r: [randn(r, *_X)], {"key_lengths": np.array([3, 2])}
    ),
    "MeanPool": (lambda: nn.MeanPool(), lambda r: [randn(r, *_X)], {}),
    "ClsToken": (lambda: nn.ClsToken(4), lambda r: [randn(r, *_X)], {}),
    "ClsPool": (lambda: nn.ClsPool(), lambda r: [randn(r, *_X)], {}),
    "Sequential": (
        lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.MeanPool(), nn.Linear(6, 2)),
        lambda r: [randn(r, *_X)], {},
    ),
}


def _wrong_shapes(shape):
    """Shapes a wrong dy could have: permuted (same size), broadcastable (1, ...), other last axis."""
    cands = [shape[::-1], (1,) + shape[1:], shape[:-1] + (shape[-1] + 1,), shape + (1,)]
    return [s for i, s in enumerate(cands) if s != shape and s not in cands[:i]]


@pytest.mark.parametrize("name", sorted(_LAYERS))
def test_backward_checks_dy(name):
    """backward must refuse a dy that is not float32 of the forward output's shape (it used
    to reshape, broadcast or convert it silently: wrong gradients, dx of a wrong shape) and
    say plainly when there is no forward to differentiate."""
    make, inputs, kwargs = _LAYERS[name]
    rng = np.random.default_rng(0)
    with pytest.raises(RuntimeError, match="call forward before backward"):
        make().backward(np.ones(_X, F32))
    layer = make()
    y = layer.forward(*inputs(rng), **kwargs)
    grads = {n: g.copy() for n, g in layer.grads.items()}
    for shape in _wrong_shapes(y.shape):
        with pytest.raises(ValueError, match=rf"dy must have the shape of {type(layer).__name__}'s forward "
                                             rf"output \({y.shape[0]}, .*got \({shape[0]},"):
            layer.backward(np.ones(shape, F32))
    with pytest.raises(TypeError, match="dy must have dtype float32, got float64"):
        layer.backward(np.ones(y.shape))
    with pytest.raises(TypeError, match="dy must be a numpy.ndarray of float32, got list"):
        layer.backward(np.ones(y.shape, F32).tolist())
    for n, g in layer.grads.items():  # a refused dy accumulates nothing
        np.testing.assert_array_equal(g, grads[n], err_msg=n)
    out = layer.backward(randn(rng, *y.shape))  # the right dy still works
    dx = out[0] if isinstance(out, tuple) else out
    assert dx is None if name == "Embedding" else (dx.shape == _X and dx.dtype == F32)


def test_losses_backward_needs_forward_and_scalar_dloss():
    rng = np.random.default_rng(0)
    logits, t = randn(rng, 3, 4), np.array([0, 3, 1])
    for loss, args in ((nn.CrossEntropyLoss(), (logits, t)), (nn.MSELoss(), (logits, randn(rng, 3, 4)))):
        with pytest.raises(RuntimeError, match=rf"{type(loss).__name__}.backward.*call forward before backward"):
            loss.backward()
        loss.forward(*args)
        g = loss.backward()
        np.testing.assert_allclose(loss.backward(np.float32(2.0)), 2 * g, rtol=1e-6)
        with pytest.raises(TypeError, match="dloss must be a real scalar"):
            loss.backward(np.ones((3, 1), F32))  # used to broadcast into the gradient


@pytest.mark.parametrize(
    "make,arg",
    [
        (lambda: nn.MultiHeadAttention(8, 2, d_head=0), "d_head"),
        (lambda: nn.MultiHeadAttention(8, 2, d_head=-4), "d_head"),
        (lambda: nn.MultiHeadAttention(0, 2), "d_model"),
        (lambda: nn.MultiHeadAttention(8, 0), "num_heads"),
        (lambda: nn.MultiHeadAttention(8, 2, num_kv_heads=0), "num_kv_heads"),
        (lambda: nn.Linear(0, 3), "d_in"),
        (lambda: nn.Linear(3, -1), "d_out"),
        (lambda: nn.Embedding(0, 4), "num_embeddings"),
        (lambda: nn.Embedding(5, 0), "d_model"),
        (lambda: nn.LearnedPositionalEmbedding(0, 4), "max_seq"),
        (lambda: nn.SinusoidalPositionalEncoding(4, 0), "d_model"),
        (lambda: nn.LayerNorm(0), "d_model"),
        (lambda: nn.ClsToken(-1), "d_model"),
        (lambda: nn.FeedForward(4, 0), "d_ff"),
        (lambda: nn.TransformerEncoderBlock(8, 2, 0), "d_ff"),
    ],
)
def test_sizes_must_be_positive(make, arg):
    with pytest.raises(ValueError, match=rf"^{arg} must be a positive int"):
        make()


def test_sizes_must_be_ints():
    with pytest.raises(TypeError, match="d_head must be a positive integer, got float"):
        nn.MultiHeadAttention(8, 2, d_head=2.5)  # was truncated to 2
    with pytest.raises(TypeError, match="d_in must be a positive integer, got bool"):
        nn.Linear(True, 3)
    assert nn.Linear(np.int64(3), 2).d_in == 3


@pytest.mark.parametrize("make, error, message", [
    (lambda: nn.CrossEntropyLoss(ignore_index=3.7), TypeError, "^ignore_index must be an integer, got float"),
    (lambda: nn.CrossEntropyLoss(ignore_index=True), TypeError, "^ignore_index must be an integer, got bool"),
    (lambda: nn.CrossEntropyLoss(label_smoothing="0.1"), TypeError, "^label_smoothing must be a real number"),
    (lambda: nn.Dropout("0.1"), TypeError, "^p must be a real number"),
    (lambda: nn.LayerNorm(4, eps="1e-5"), TypeError, "^eps must be a real number"),
    (lambda: nn.LayerNorm(4, eps=-1.0), ValueError, "^eps must be a finite number > 0"),
    (lambda: nn.TransformerEncoderBlock(8, 2, 16, eps=float("nan")), ValueError, "^eps must be a finite number > 0"),
])
def test_layer_and_loss_settings_are_checked_at_construction(make, error, message):
    """ignore_index=3.7 ignored class 3; a string eps was converted, a negative one failed at
    the first forward; a string p or label_smoothing failed in a comparison naming neither."""
    with pytest.raises(error, match=message):
        make()
    assert nn.CrossEntropyLoss(ignore_index=np.int64(-1), label_smoothing=np.float32(0.1)).ignore_index == -1


@pytest.mark.parametrize("make, flag", [
    (lambda v: nn.MultiHeadAttention(8, 2, causal=v), "causal"),  # causal='no' was causal attention
    (lambda v: nn.MultiHeadAttention(8, 2, bias=v), "bias"),
    (lambda v: nn.Linear(3, 2, bias=v), "bias"),
    (lambda v: nn.TransformerEncoderBlock(8, 2, 16, norm_first=v), "norm_first"),
    (lambda v: nn.TransformerEncoderBlock(8, 2, 16, causal=v), "causal"),
    (lambda v: nn.Linear(3, 2).train(v), "mode"),
    (lambda v: optim.SGD(lr=0.1, momentum=0.9, nesterov=v), "nesterov"),
    (lambda v: EarlyStopping(restore_best=v), "restore_best"),
    (lambda v: Trainer(nn.Linear(3, 2), loss="mse", progress=v), "progress"),
    (lambda v: Trainer(nn.Linear(3, 2), loss="mse", progress=False).fit(
        np.zeros((2, 3), F32), np.zeros((2, 2), F32), epochs=1, shuffle=v), "shuffle"),
])
def test_flags_must_be_bools(make, flag):
    """Yes/no arguments of layers, optimizers and the trainer are bools, as functional's are:
    a truthy string ('no', 'False') turned the option on."""
    for bad in ("no", "False", 0, None):
        with pytest.raises(TypeError, match=f"^{flag} must be a bool, got"):
            make(bad)
    make(np.bool_(False))
    make(True)


# ----------------------------------------------------------------------------
# against torch autograd, same weights
# ----------------------------------------------------------------------------


def _t(a, grad=False):
    import torch

    return torch.tensor(np.asarray(a), dtype=torch.float32, requires_grad=grad)


def assert_close(got, want, tol=1e-4, name=""):
    """max |got - want| <= tol * max(max |want|, 0.1): the floor covers gradients that are 0 in exact math (b_k)."""
    want = want.detach().numpy() if hasattr(want, "detach") else np.asarray(want)
    got = np.asarray(got)
    assert got.shape == want.shape, f"{name}: {got.shape} vs {want.shape}"
    err = np.abs(got.astype(np.float64) - want).max()
    assert err <= tol * max(np.abs(want).max(), 0.1), f"{name}: max err {err:.3e}, scale {np.abs(want).max():.3e}"


def _torch_mha(x, ctx, mha, key_lengths, torch):
    """Plain torch multi-head attention with mha's weights (as tensors with grad)."""
    W = {n: _t(p.data, grad=True) for n, p in mha.named_parameters()}
    F = torch.nn.functional
    b, sq, _ = x.shape
    c = x if ctx is None else ctx
    sk = c.shape[1]
    h, hk, d = mha.num_heads, mha.num_kv_heads, mha.d_head
    q = (x @ W["w_q"] + W["b_q"]).reshape(b, sq, h, d).transpose(1, 2)
    k = (c @ W["w_k"] + W["b_k"]).reshape(b, sk, hk, d).transpose(1, 2).repeat_interleave(h // hk, dim=1)
    v = (c @ W["w_v"] + W["b_v"]).reshape(b, sk, hk, d).transpose(1, 2).repeat_interleave(h // hk, dim=1)
    allowed = torch.ones(b, 1, sq, sk, dtype=torch.bool)
    if mha.causal:
        allowed &= torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
    if key_lengths is not None:
        allowed &= (torch.arange(sk)[None, :] < torch.tensor(key_lengths)[:, None])[:, None, None, :]
    s = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    o = F.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1) @ v
    y = o.transpose(1, 2).reshape(b, sq, h * d) @ W["w_o"] + W["b_o"]
    return y, W


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("num_kv_heads,causal", [(4, False), (2, True), (1, False)])
def test_attention_vs_torch(cross, num_kv_heads, causal):
    torch = _torch()
    rng = np.random.default_rng(10)
    mha = nn.MultiHeadAttention(16, 4, num_kv_heads=num_kv_heads, causal=causal, rng=11)
    for _, p in mha.named_parameters():
        if p.data.ndim == 1:
            p.data[:] = randn(rng, *p.shape, scale=0.2)
    x = randn(rng, 3, 5, 16)
    ctx = randn(rng, 3, 7, 16) if cross else None
    kl = np.array([5, 2, 7]) if cross else np.array([5, 3, 4])
    dy = randn(rng, 3, 5, 16)
    mha.zero_grad()
    y = mha.forward(x, ctx, key_lengths=kl)
    d = mha.backward(dy)
    dx, dctx = d if cross else (d, None)
    tx, tc = _t(x, True), (_t(ctx, True) if cross else None)
    ty, W = _torch_mha(tx, tc, mha, kl, torch)
    ty.backward(_t(dy))
    assert_close(y, ty, name="y")
    assert_close(dx, tx.grad, name="dx")
    if cross:
        assert_close(dctx, tc.grad, name="dcontext")
    for n, p in mha.named_parameters():
        assert_close(p.grad, W[n].grad, name=n)


def _load_torch_block(tl, blk):
    """Copy a TransformerEncoderBlock's weights into torch.nn.TransformerEncoderLayer."""
    import torch

    a = blk.attn
    with torch.no_grad():
        tl.self_attn.in_proj_weight.copy_(_t(np.concatenate([a.w_q.data, a.w_k.data, a.w_v.data], 1).T))
        tl.self_attn.in_proj_bias.copy_(_t(np.concatenate([a.b_q.data, a.b_k.data, a.b_v.data])))
        tl.self_attn.out_proj.weight.copy_(_t(a.w_o.data.T))
        tl.self_attn.out_proj.bias.copy_(_t(a.b_o.data))
        tl.linear1.weight.copy_(_t(blk.ff.fc1.weight.data.T))
        tl.linear1.bias.copy_(_t(blk.ff.fc1.bias.data))
        tl.linear2.weight.copy_(_t(blk.ff.fc2.weight.data.T))
        tl.linear2.bias.copy_(_t(blk.ff.fc2.bias.data))
        for mine, theirs in ((blk.ln1, tl.norm1), (blk.ln2, tl.norm2)):
            theirs.weight.copy_(_t(mine.weight.data))
            theirs.bias.copy_(_t(mine.bias.data))


@pytest.mark.parametrize("norm_first,activation", [(True, "gelu"), (False, "relu")])
def test_encoder_block_vs_torch_transformer_encoder_layer(norm_first, activation):
    torch = _torch()
    rng = np.random.default_rng(12)
    blk = nn.TransformerEncoderBlock(16, 4, 32, norm_first=norm_first, activation=activation, rng=13)
    for _, p in blk.named_parameters():
        p.data += randn(rng, *p.shape, scale=0.1)  # non-trivial biases and norms
    tl = torch.nn.TransformerEncoderLayer(
        16, 4, 32, dropout=0.0, activation=activation, batch_first=True, norm_first=norm_first
    )
    _load_torch_block(tl, blk)
    x, dy = randn(rng, 2, 6, 16), randn(rng, 2, 6, 16)
    kl = np.array([6, 4])
    blk.zero_grad()
    y = blk.forward(x, key_lengths=kl)
    dx = blk.backward(dy)
    tx = _t(x, True)
    pad = torch.arange(6)[None, :] >= torch.tensor(kl)[:, None]
    ty = tl(tx, src_key_padding_mask=pad)
    ty.backward(_t(dy))
    assert_close(y, ty, name="y")
    assert_close(dx, tx.grad, name="dx")
    assert_close(blk.ff.fc1.weight.grad, tl.linear1.weight.grad.T, name="fc1")
    assert_close(blk.ln1.weight.grad, tl.norm1.weight.grad, name="ln1")
    dw_in = np.concatenate([blk.attn.w_q.grad, blk.attn.w_k.grad, blk.attn.w_v.grad], 1)
    assert_close(dw_in, tl.self_attn.in_proj_weight.grad.T, name="in_proj")
    assert_close(blk.attn.w_o.grad, tl.self_attn.out_proj.weight.grad.T, name="out_proj")


def test_small_layers_vs_torch():
    torch = _torch()
    F = torch.nn.functional
    rng = np.random.default_rng(14)

    def run(layer, x, torch_fn, params, **kw):
        dy = randn(rng, *layer.forward(x, **kw).shape)
        layer.zero_grad()
        y = layer.forward(x, **kw)
        dx = layer.backward(dy)
        tx = _t(x, True) if x.dtype == F32 else torch.tensor(x)
        tp = {n: _t(getattr(layer, n).data, True) for n in params}
        ty = torch_fn(tx, **tp)
        ty.backward(_t(dy))
        name = type(layer).__name__
        assert_close(y, ty, name=name + " y")
        if x.dtype == F32:
            assert_close(dx, tx.grad, name=name + " dx")
        for n in params:
            assert_close(getattr(layer, n).grad, tp[n].grad, name=f"{name} {n}")

    run(nn.Linear(6, 5, rng=1), randn(rng, 2, 3, 6), lambda x, weight, bias: x @ weight + bias, ["weight", "bias"])
    ln = nn.LayerNorm(6)
    ln.weight.data[:] = randn(rng, 6)
    run(ln, randn(rng, 4, 6) * 3, lambda x, weight, bias: F.layer_norm(x, (6,), weight, bias, 1e-5), ["weight", "bias"])
    run(nn.GELU(), randn(rng, 5, 7, scale=3), lambda x: F.gelu(x), [])
    run(nn.GELU("tanh"), randn(rng, 5, 7, scale=3), lambda x: F.gelu(x, approximate="tanh"), [])
    run(nn.ReLU(), randn(rng, 5, 7), F.relu, [])
    ids = rng.integers(0, 9, (3, 4))
    run(nn.Embedding(9, 5, rng=2), ids, lambda x, weight: F.embedding(x, weight), ["weight"])
    run(nn.LearnedPositionalEmbedding(6, 5, rng=3), randn(rng, 2, 4, 5), lambda x, weight: x + weight[:4], ["weight"])
    kl = np.array([4, 2])
    mask = _t((np.arange(4)[None, :] < kl[:, None]).astype(F32))
    run(
        nn.MeanPool(), randn(rng, 2, 4, 5),
        lambda x: (x * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True), [], key_lengths=kl,
    )
    # cross-entropy with smoothing and ignore_index
    logits, t = randn(rng, 8, 6, scale=3), rng.integers(0, 6, 8)
    t[3] = -100
    ce = nn.CrossEntropyLoss(label_smoothing=0.2)
    loss = ce.forward(logits, t)
    tl = _t(logits, True)
    tloss = F.cross_entropy(tl, torch.tensor(t), label_smoothing=0.2, ignore_index=-100)
    tloss.backward()
    assert abs(loss - tloss.item()) <= 1e-5 * abs(tloss.item())
    assert_close(ce.backward(), tl.grad, name="cross-entropy grad")
