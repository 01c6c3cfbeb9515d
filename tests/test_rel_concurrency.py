"""Threads and processes: concurrent calls give the serial results, the GIL is released
inside every op, and the ops run in a spawn-started multiprocessing pool.

fork(): GNU libgomp keeps no thread pool across fork, so a child forked after qkv_native
ran an op on several threads runs its ops on one thread (Note [fork]); a child forked
before keeps its threads. Pools with several threads per worker use "spawn", tested here.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

import qkv_native as qn

F32 = np.float32


def every_op(seed, scale=1):
    """A closure that runs all 8 public ops on inputs drawn from ``seed``; returns a dict."""
    rng = np.random.default_rng(seed)

    def r(*shape):
        return rng.standard_normal(shape).astype(F32)

    s = scale
    a, b = r(33 * s, 40), r(40, 29 * s)
    x, w = r(2, 17 * s, 48), r(48, (4 + 2 * 2) * 16)
    q, k, v = r(2, 4, 33 * s, 32), r(2, 2, 40 * s, 32), r(2, 2, 40 * s, 24)
    key_lengths = np.array([40 * s, 7])
    bias = r(33 * s, 40 * s)
    do = r(2, 4, 33 * s, 24)
    qv, kv = r(50 * s, 4, 16), r(61 * s, 2, 16)
    cu_q, cu_k = np.array([0, 20, 50 * s]), np.array([0, 31, 61 * s])
    dov = r(50 * s, 4, 16)

    def run():
        out = {"matmul": qn.matmul(a, b, trans_b=False, alpha=0.5)}
        pq, pk, pv = qn.qkv_project_packed(x, w, num_heads=4, num_kv_heads=2)
        out["packed"] = np.concatenate([pq.ravel(), pk.ravel(), pv.ravel()])
        sq, sk, sv = qn.qkv_project(x, w[:, :64], w[:, 64:96], w[:, 96:], num_heads=4, num_kv_heads=2)
        out["project"] = np.concatenate([sq.ravel(), sk.ravel(), sv.ravel()])
        grads = qn.qkv_project_backward(x, w[:, :64], w[:, 64:96], w[:, 96:], pq, pk, pv)
        out["project_backward"] = np.concatenate([g.ravel() for g in grads])
        o, lse = qn.attention(q, k, v, causal=True, key_lengths=key_lengths, bias=bias, return_lse=True)
        out["attention"] = np.concatenate([o.ravel(), lse.ravel()])
        grads = qn.attention_backward(do, q, k, v, o, lse, causal=True, key_lengths=key_lengths, bias=bias)
        out["attention_backward"] = np.concatenate([g.ravel() for g in grads])
        ov, lv = qn.attention_varlen(qv, kv, kv, cu_q, cu_k, causal=True, return_lse=True)
        out["attention_varlen"] = np.concatenate([ov.ravel(), lv.ravel()])
        grads = qn.attention_varlen_backward(dov, qv, kv, kv, ov, lv, cu_q, cu_k, causal=True)
        out["attention_varlen_backward"] = np.concatenate([g.ravel() for g in grads])
        return out

    return run


def assert_same(got, want, label=""):
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"{label}{name}")


# ----------------------------------------------------------------------------
# 8 Python threads at once
# ----------------------------------------------------------------------------


def test_eight_threads_give_the_serial_results(isa):
    """8 threads, each on its own data, all ops, 3 rounds, released together by a barrier:
    every result is bit-identical to the same call made alone."""
    runs = [every_op(seed) for seed in range(8)]
    serial = [run() for run in runs]
    barrier = threading.Barrier(8)
    results, errors = [None] * 8, []

    def work(i):
        try:
            barrier.wait(timeout=60)
            for _ in range(3):
                got = runs[i]()
                assert_same(got, serial[i], f"thread {i}: ")
            results[i] = got
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append((i, e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread did not finish (deadlock?)"
    assert not errors, errors
    for i in range(8):
        assert_same(results[i], serial[i], f"thread {i}: ")


def test_threads_with_different_thread_limits(restore_threads):
    """set_num_threads from one thread while others compute: results unchanged (the ops are
    bit-identical at any thread count), no crash."""
    runs = [every_op(seed) for seed in range(4)]
    serial = [run() for run in runs]
    stop = threading.Event()
    errors = []

    def flip():
        n = 1
        while not stop.is_set():
            qn.set_num_threads(n)
            n = 3 - n

    def work(i):
        try:
            for _ in range(3):
                assert_same(runs[i](), serial[i], f"thread {i}: ")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    flipper = threading.Thread(target=flip)
    workers = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    flipper.start()
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=300)
    stop.set()
    flipper.join(timeout=30)
    assert not errors, errors


# ----------------------------------------------------------------------------
# the GIL is released inside every op (a non-timing proof)
# ----------------------------------------------------------------------------


def _long_calls(rng):
    """Each public op on inputs big enough for tens of milliseconds on one thread."""
    def r(*shape):
        return rng.standard_normal(shape).astype(F32)

    a, b = r(400, 400), r(400, 400)
    x, w = r(2, 256, 256), r(256, 3 * 256)
    q = r(1, 4, 512, 64)
    o, lse = qn.attention(q, q, q, return_lse=True)
    qv = r(1024, 4, 64)
    cu = np.array([0, 512, 1024])
    ov, lv = qn.attention_varlen(qv, qv, qv, cu, cu, return_lse=True)
    pq, pk, pv = qn.qkv_project_packed(x, w, num_heads=4)
    return {
        "matmul": lambda: qn.matmul(a, b),
        "qkv_project": lambda: qn.qkv_project(x, w[:, :256], w[:, 256:512], w[:, 512:], num_heads=4),
        "qkv_project_packed": lambda: qn.qkv_project_packed(x, w, num_heads=4),
        "qkv_project_backward": lambda: qn.qkv_project_backward(x, w[:, :256], w[:, 256:512], w[:, 512:], pq, pk, pv),
        "attention": lambda: qn.attention(q, q, q),
        "attention_backward": lambda: qn.attention_backward(o, q, q, q, o, lse),
        "attention_varlen": lambda: qn.attention_varlen(qv, qv, qv, cu, cu),
        "attention_varlen_backward": lambda: qn.attention_varlen_backward(ov, qv, qv, qv, ov, lv, cu, cu),
    }


def test_gil_is_released_inside_every_op(rng, restore_threads):
    """A Python thread counts while the main thread is inside one op call.

    With the switch interval set to an hour, the main thread never gives the GIL away by
    itself, so the counter thread can only run while the main thread has released the GIL
    (inside the native op). The control (a pure-Python loop of similar length in the main
    thread, then a long C call that keeps the GIL) shows that the counter does not move
    otherwise. The counter thread gives the
    GIL back every 1000 counts, so the main thread resumes soon after each call."""
    qn.set_num_threads(1)  # leave a core for the counter thread
    calls = _long_calls(rng)
    count = [0]
    stop = threading.Event()

    def counter():
        i = 0
        while not stop.is_set():
            count[0] += 1
            i += 1
            if i % 1000 == 0:
                os.sched_yield()  # a syscall with the GIL held: only ends the time slice
                threading.Event().wait(0)  # releases the GIL briefly so the main thread can take it back

    old = sys.getswitchinterval()
    t = threading.Thread(target=counter, daemon=True)
    progress = {}
    try:
        t.start()
        while count[0] == 0:  # the counter runs
            threading.Event().wait(0.001)
        sys.setswitchinterval(3600.0)
        # let the counter thread take and give back the GIL once, so that its next wait
        # for the GIL uses the new interval (a wait begun earlier could still force a switch)
        threading.Event().wait(0.02)
        before = count[0]
        acc = 0
        for i in range(300_000):  # tens of ms of Python bytecode
            acc += i
        acc += sum(range(3_000_000))  # tens of ms inside a C function that keeps the GIL
        control = count[0] - before
        for name, call in calls.items():
            # up to 20 calls: on a loaded machine the counter thread may not be scheduled
            # during one call; an op that held the GIL would never let it count
            for _ in range(20):
                before = count[0]
                call()
                progress[name] = count[0] - before
                if progress[name]:
                    break
    finally:
        sys.setswitchinterval(old)
        stop.set()
        t.join(timeout=30)
    assert control == 0, f"the counter moved while the main thread held the GIL ({control}): the test is unsound"
    stuck = {name: n for name, n in progress.items() if n == 0}
    assert not stuck, f"no Python thread ran while these ops computed (GIL held?): {stuck}; all: {progress}"


# ----------------------------------------------------------------------------
# processes
# ----------------------------------------------------------------------------


def _worker_from_seed(seed):
    # runs in a fresh interpreter (spawn): inputs made here, results sent back
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return every_op(seed)()


def _worker_with_arrays(args):
    # the arrays arrive pickled, as with any multiprocessing/joblib/dask user
    a, b = args
    return qn.matmul(a, b)


@pytest.fixture(scope="module")
def spawn_pool():
    ctx = multiprocessing.get_context("spawn")
    env_before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the workers: 2 workers on 2 cores
    try:
        with ctx.Pool(2) as pool:
            yield pool
    finally:
        if env_before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_before


def test_ops_in_a_spawn_pool(spawn_pool):
    """Every op in 2 spawn-started workers (after this process has run OpenMP work): the
    results equal this process's, bit for bit (they do not depend on the thread count)."""
    every_op(99)()  # the OpenMP pool of the parent is running
    seeds = [0, 1, 2, 3]
    got = spawn_pool.map(_worker_from_seed, seeds, chunksize=1)
    for seed, res in zip(seeds, got):
        assert_same(res, every_op(seed)(), f"seed {seed}: ")


def test_arrays_sent_to_a_spawn_pool(spawn_pool, rng):
    """float32 arrays that went through pickle (how a pool sends them) are float32 arrays.
    Bug: the binding compares dtype objects by identity, and an unpickled float32 dtype is
    another object, so every op raises 'must have dtype float32, got float32'."""
    a, b = rng.standard_normal((33, 17)).astype(F32), rng.standard_normal((17, 9)).astype(F32)
    got = spawn_pool.map(_worker_with_arrays, [(a, b)])[0]
    np.testing.assert_array_equal(got, qn.matmul(a, b))


def _run_forking(code):
    """Runs ``code`` in a fresh interpreter (a hang ends at the timeout); returns the result."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_child_forked_after_threads_ran_runs_on_one_thread():
    """Note [fork]. Bug: after a 2-thread matmul in the parent, the same matmul in a forked
    child (a multiprocessing 'fork' pool worker) waited forever for the parent's OpenMP
    workers, which fork() does not copy."""
    code = """
        import os, sys
        import numpy as np
        import qkv_native as qn
        qn.set_num_threads(2)
        a = (np.arange(256 * 256, dtype=np.float32).reshape(256, 256) % 97) / 97
        q = (np.arange(2 * 4 * 200 * 32, dtype=np.float32).reshape(2, 4, 200, 32) % 13) / 13
        want, want_o = qn.matmul(a, a), qn.attention(q, q, q, causal=True)  # teams of 2 threads
        pid = os.fork()
        if pid == 0:
            code = 0
            if not (np.array_equal(qn.matmul(a, a), want) and np.array_equal(qn.attention(q, q, q, causal=True), want_o)):
                code = 3
            if qn.get_num_threads() != 1:
                code = 4
            try:
                qn.set_num_threads(2)
                code = 5
            except RuntimeError as e:
                if "spawn" not in str(e):
                    code = 6
            qn.set_num_threads(1)  # allowed
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert qn.get_num_threads() == 2, "the parent keeps its threads"
        assert np.array_equal(qn.matmul(a, a), want)
        sys.exit(os.waitstatus_to_exitcode(status))
    """
    r = _run_forking(code)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_child_forked_before_threads_ran_keeps_them():
    """Note [fork]: a parent that ran its ops on one thread has no OpenMP pool to lose, so
    its forked child may use several threads."""
    code = """
        import os, sys
        import numpy as np
        import qkv_native as qn
        qn.set_num_threads(1)
        a = (np.arange(256 * 256, dtype=np.float32).reshape(256, 256) % 97) / 97
        want = qn.matmul(a, a)
        pid = os.fork()
        if pid == 0:
            qn.set_num_threads(2)
            ok = qn.get_num_threads() == 2 and np.array_equal(qn.matmul(a, a), want)
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
    """
    r = _run_forking(code)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
@pytest.mark.parametrize("probe", ["fma_probe(0.05)", "stream_read(np.ones(1 << 20, np.float32))"])
def test_child_forked_after_a_probe_runs(probe):
    """Note [fork]. Bug: the bench's probes opened their parallel regions without going
    through team_size, so a child forked after them alone believed no team had run and
    hung in its first op."""
    code = f"""
        import os, sys
        import numpy as np
        import qkv_native as qn
        from qkv_native import _core
        qn.set_num_threads(2)
        _core.{probe}
        a = np.ones((256, 256), np.float32)
        pid = os.fork()
        if pid == 0:
            os._exit(0 if qn.get_num_threads() == 1 and qn.matmul(a, a)[0, 0] == 256 else 3)
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
    """
    r = _run_forking(code)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])


@pytest.mark.parametrize("threads", [1, 2])
def test_exit_while_a_daemon_thread_is_inside_an_op(threads):
    """Note [exit during an op]. Bug: the interpreter ending a daemon thread that was
    inside an op (as it asked for the GIL back) unwound through the GIL guard's
    destructor: std::terminate, and the process aborted at exit (SIGABRT, 'terminate
    called without an active exception') instead of exiting with status 0."""
    code = f"""
        import threading, time
        import numpy as np
        import qkv_native as qn
        qn.set_num_threads({threads})
        a = np.ones((400, 400), np.float32)
        q = np.ones((1, 4, 700, 64), np.float32)
        started = threading.Event()

        def loop():
            while True:
                qn.matmul(a, a)
                o, lse = qn.attention(q, q, q, return_lse=True)
                started.set()
                qn.attention_backward(o, q, q, q, o, lse)

        for _ in range(2):
            threading.Thread(target=loop, daemon=True).start()
        started.wait(60)
        time.sleep(0.05)
        print("exiting", flush=True)
    """
    for _ in range(3):  # the abort was certain; the timing of the exit varies
        r = _run_forking(code)
        assert r.returncode == 0 and "exiting" in r.stdout, (r.returncode, r.stderr[-2000:])


def test_readme_says_how_to_fork():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert "fork" in readme and "spawn" in readme


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc/self/task")
def test_ops_of_alternating_sizes_create_no_threads():
    """Note [whole teams]: ops that warrant different thread counts (3 and 4 of 4 here)
    run on the same team, so the OpenMP runtime keeps its threads instead of ending
    and recreating some at every switch (GNU libgomp did: one clone per thread)."""
    code = textwrap.dedent("""
        import os
        import numpy as np
        import qkv_native as qn
        rng = np.random.default_rng(0)
        r = lambda *s: rng.standard_normal(s).astype(np.float32)
        x, w_big, w_small = r(13, 384), r(384, 1152), r(384, 384)
        a, b = r(200, 384), r(384, 384)
        q, k, v = r(1, 2, 64, 32), r(1, 2, 64, 32), r(1, 2, 64, 32)
        g = np.ones(384, np.float32)
        ops = [lambda: qn.matmul(x, w_big),    # 11.5 MFLOP: 4 threads
               lambda: qn.matmul(x, w_small),  # 3.8 MFLOP: 3 threads
               lambda: qn.matmul(a, b),
               lambda: qn.attention_backward(o, q, k, v, o, lse),
               lambda: qn.layer_norm(a, g, 0 * g)]
        o, lse = qn.attention(q, k, v, return_lse=True)
        seen = set()
        for rnd in range(33):
            if rnd == 3:
                before = set(os.listdir("/proc/self/task"))
                seen = set(before)
            for op in ops:
                op()
                seen |= set(os.listdir("/proc/self/task"))
        print(len(before), len(seen - before))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="4")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    threads, created = map(int, proc.stdout.split())
    assert threads >= 4
    assert created == 0, f"{created} threads created while ops of different sizes took turns"
