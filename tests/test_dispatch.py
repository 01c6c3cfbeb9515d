"""CPU detection, ISA dispatch (use_isa, QKV_NATIVE_ISA), threads, and GIL release."""

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import qkv_native as qn

from _helpers import randn

KNOWN_ISAS = ("scalar", "avx2", "avx512")


def run_python(code, **env_overrides):
    """Runs code in a fresh interpreter (QKV_NATIVE_ISA / OMP_NUM_THREADS unset unless given)."""
    env = dict(os.environ)
    for key in ("QKV_NATIVE_ISA", "OMP_NUM_THREADS"):
        env.pop(key, None)
    env.update(env_overrides)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return proc


def result_of(proc):
    """The JSON the subprocess printed after 'RESULT:' (an editable install may print
    build messages on import, hence the marker)."""
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT:")]
    assert lines, f"no RESULT line in:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len("RESULT:") :])


# ----------------------------------------------------------------------------
# cpu_info / supported_isas / use_isa
# ----------------------------------------------------------------------------


def test_gemm_kc_is_at_most_384_on_intel():
    # Note [kc on Intel]: at most 384 there; the variant's own kc elsewhere
    intel = qn.cpu_info()["vendor"] == "GenuineIntel"
    for isa in qn.supported_isas():
        with qn.use_isa(isa):
            kc = qn.cpu_info()["gemm_kc"]
        assert isinstance(kc, int) and kc >= 64, (isa, kc)
        if intel:
            assert kc <= 384, (isa, kc)


def test_cpu_info_keys_and_types():
    info = qn.cpu_info()
    assert {"vendor", "brand", "family", "gemv_prefetch", "gemm_kc", "features", "supported_isas", "isa", "num_threads"} <= set(info)
    assert isinstance(info["vendor"], str) and isinstance(info["brand"], str)
    assert isinstance(info["family"], int) and isinstance(info["gemv_prefetch"], bool)
    assert isinstance(info["features"], dict) and info["features"]
    assert all(isinstance(k, str) and isinstance(v, bool) for k, v in info["features"].items())
    assert isinstance(info["supported_isas"], list)
    assert info["isa"] in info["supported_isas"]
    assert isinstance(info["num_threads"], int) and info["num_threads"] >= 1
    assert info["num_threads"] == qn.get_num_threads()


def test_supported_isas():
    isas = qn.supported_isas()
    assert isas[0] == "scalar"
    assert len(set(isas)) == len(isas) and set(isas) <= set(KNOWN_ISAS)
    assert isas == sorted(isas, key=KNOWN_ISAS.index)  # best last
    assert qn.cpu_info()["supported_isas"] == isas
    feats = qn.cpu_info()["features"]
    if "avx2" in isas:
        assert feats["avx2"] and feats["fma"] and feats["os_saves_ymm"]
    if "avx512" in isas:
        assert feats["avx512f"] and feats["avx512bw"] and feats["avx512vl"] and feats["avx512dq"]
        assert feats["os_saves_zmm"]


def test_default_isa_is_the_best():
    """Without QKV_NATIVE_ISA a fresh process picks the last supported ISA."""
    proc = run_python("import json, qkv_native as qn; "
                      "print('RESULT:' + json.dumps([qn.cpu_info()['isa'], qn.supported_isas()]))")
    isa, isas = result_of(proc)
    assert isa == isas[-1]


@pytest.mark.parametrize("name", qn.supported_isas())
def test_use_isa_switches_and_restores(name):
    before = qn.cpu_info()["isa"]
    with qn.use_isa(name):
        assert qn.cpu_info()["isa"] == name
    assert qn.cpu_info()["isa"] == before
    with pytest.raises(RuntimeError, match="boom"):
        with qn.use_isa(name):
            raise RuntimeError("boom")
    assert qn.cpu_info()["isa"] == before


def test_use_isa_unknown_or_unsupported():
    before = qn.cpu_info()["isa"]
    with pytest.raises(ValueError, match="bogus"):
        with qn.use_isa("bogus"):
            pass
    assert qn.cpu_info()["isa"] == before
    for name in KNOWN_ISAS:
        if name not in qn.supported_isas():
            with pytest.raises(ValueError, match=name):
                with qn.use_isa(name):
                    pass
    assert qn.cpu_info()["isa"] == before


# ----------------------------------------------------------------------------
# QKV_NATIVE_ISA in a fresh process
# ----------------------------------------------------------------------------

PROBE = """
import json, numpy as np, qkv_native as qn
rng = np.random.default_rng(5)
q = rng.standard_normal((1, 2, 33, 24)).astype(np.float32)
k = rng.standard_normal((1, 2, 47, 24)).astype(np.float32)
o = qn.attention(q, k, k, causal=True)
print('RESULT:' + json.dumps({'isa': qn.cpu_info()['isa'], 'o': o.tobytes().hex()}))
"""


@pytest.mark.parametrize("name", qn.supported_isas())
def test_env_selects_isa(name):
    res = result_of(run_python(PROBE, QKV_NATIVE_ISA=name))
    assert res["isa"] == name
    # the kernels of that ISA really ran: the same bits as use_isa(name) here
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 2, 33, 24)).astype(np.float32)
    k = rng.standard_normal((1, 2, 47, 24)).astype(np.float32)
    with qn.use_isa(name):
        o = qn.attention(q, k, k, causal=True)
    assert o.tobytes().hex() == res["o"]


def test_gemv_prefetch_env_override_changes_no_bits():
    """QKV_NATIVE_GEMV_PREFETCH forces the one-row product's software prefetch on or
    off (by default on AMD family 19h only); it is a hint, so the bits are the same."""
    code = (
        "import json, numpy as np, qkv_native as qn\n"
        "rng = np.random.default_rng(5)\n"
        "x = rng.standard_normal((1, 300), dtype=np.float32)\n"
        "w = rng.standard_normal((300, 1000), dtype=np.float32)\n"
        "b = rng.standard_normal(1000, dtype=np.float32)\n"
        "outs = []\n"
        "for isa in qn.supported_isas():\n"
        "    with qn.use_isa(isa):\n"
        "        outs.append(qn.matmul(x, w).tobytes().hex())\n"
        "        outs.append(qn.linear(x, qn.pack_weight(w), b, activation='gelu').tobytes().hex())\n"
        "print('RESULT:' + json.dumps({'on': qn.cpu_info()['gemv_prefetch'], 'outs': outs}))\n"
    )
    on, off = (result_of(run_python(code, QKV_NATIVE_GEMV_PREFETCH=v)) for v in ("1", "0"))
    assert on["on"] is True and off["on"] is False
    assert on["outs"] == off["outs"]


def test_env_empty_means_default():
    res = result_of(run_python(PROBE, QKV_NATIVE_ISA=""))
    assert res["isa"] == qn.supported_isas()[-1]


def test_env_bogus_fails_at_import():
    proc = run_python("import qkv_native", QKV_NATIVE_ISA="bogus")
    assert proc.returncode != 0
    assert "QKV_NATIVE_ISA" in proc.stderr and "bogus" in proc.stderr
    assert "Error" in proc.stderr  # a Python exception, not a crash
    assert proc.returncode == 1


@pytest.mark.parametrize("name", [n for n in KNOWN_ISAS if n not in qn.supported_isas()] or ["none"])
def test_env_unsupported_fails_at_import(name):
    if name == "none":
        pytest.skip("this CPU supports every compiled ISA")
    proc = run_python("import qkv_native", QKV_NATIVE_ISA=name)
    assert proc.returncode == 1 and "QKV_NATIVE_ISA" in proc.stderr


# ----------------------------------------------------------------------------
# threads
# ----------------------------------------------------------------------------


def test_set_get_num_threads_round_trip(restore_threads):
    for n in (1, 2, 3, 1):
        qn.set_num_threads(n)
        assert qn.get_num_threads() == n
        assert qn.cpu_info()["num_threads"] == n


@pytest.mark.parametrize("bad", [0, -1])
def test_set_num_threads_invalid(restore_threads, bad):
    before = qn.get_num_threads()
    with pytest.raises(ValueError):
        qn.set_num_threads(bad)
    assert qn.get_num_threads() == before


def test_omp_num_threads_env():
    code = ("import json, qkv_native as qn; "
            "print('RESULT:' + json.dumps([qn.get_num_threads(), qn.cpu_info()['num_threads']]))")
    assert result_of(run_python(code, OMP_NUM_THREADS="1")) == [1, 1]


def test_threadpoolctl_sees_openmp():
    pytest.importorskip("threadpoolctl")
    code = (
        "import json, threadpoolctl, qkv_native as qn\n"
        "info = threadpoolctl.threadpool_info()\n"
        "print('RESULT:' + json.dumps([i['internal_api'] for i in info]))\n"
    )
    apis = result_of(run_python(code))
    assert "openmp" in apis


def test_threadpoolctl_limit_in_fresh_process():
    """threadpool_limits(1) reaches the OpenMP runtime the native ops use."""
    pytest.importorskip("threadpoolctl")
    code = (
        "import json, threadpoolctl, qkv_native as qn\n"
        "before = qn.get_num_threads()\n"
        "with threadpoolctl.threadpool_limits(limits=1, user_api='openmp'):\n"
        "    inside = qn.get_num_threads()\n"
        "print('RESULT:' + json.dumps([before, inside, qn.get_num_threads()]))\n"
    )
    before, inside, after = result_of(run_python(code, OMP_NUM_THREADS="2"))
    assert (before, inside, after) == (2, 1, 2)


def test_threadpool_limits_results_equal(rng):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    q, k, v = randn(rng, 1, 4, 129, 64), randn(rng, 1, 2, 129, 64), randn(rng, 1, 2, 129, 64)
    a, b = randn(rng, 129, 300), randn(rng, 300, 129)

    def run():
        o, lse = qn.attention(q, k, v, causal=True, return_lse=True)
        grads = qn.attention_backward(o, q, k, v, o, lse, causal=True)
        return (qn.matmul(a, b), o, lse) + tuple(grads)

    free = run()
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        limited = run()
    for x, y in zip(free, limited):
        np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------
# the GIL is released during native work
# ----------------------------------------------------------------------------


def test_concurrent_calls_from_python_threads(rng):
    q, k, v = randn(rng, 1, 4, 512, 64), randn(rng, 1, 4, 512, 64), randn(rng, 1, 4, 512, 64)
    inputs = [(q, k, v), (v, q, k)]
    serial = [qn.attention(*x, causal=True, return_lse=True) for x in inputs]
    results = [None, None]
    errors = []
    barrier = threading.Barrier(2)

    def work(i):
        try:
            barrier.wait()
            for _ in range(3):
                results[i] = qn.attention(*inputs[i], causal=True, return_lse=True)
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for (o, lse), (so, slse) in zip(results, serial):
        np.testing.assert_array_equal(o, so)
        np.testing.assert_array_equal(lse, slse)
