"""The qkv-native command line: info, bench options and errors, python -m qkv_native."""

import json
import subprocess
import sys

import pytest

import qkv_native as qn
from qkv_native import bench, cli

from test_bench import TINY_CASES


def test_info_prints_the_cpu(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    info = qn.cpu_info()
    assert info["brand"] in out
    assert f"active ISA:     {info['isa']}" in out
    assert ", ".join(info["supported_isas"]) in out
    assert f"threads:        {info['num_threads']}" in out


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "info" in out and "bench" in out


def test_bench_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = capsys.readouterr().out
    for option in ("--quick", "--full", "--threads", "--only", "--json", "--plot"):
        assert option in out


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "usage: qkv-native" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--only", "nope"], "unknown group"),
        (["--threads", "x"], "--threads"),
        (["--budget", "0"], "--budget"),
        (["--threads", "1,2000"], "--threads needs integers in [1, 1024]"),
        # output paths are checked before the run, not after it
        (["--json", "/nonexistent-dir/x.json"], "does not exist"),
        (["--json", ""], "--json needs a file name"),
        (["--json", "."], "is a directory"),
        (["--plot", "x.svg"], "must end in .png"),
    ],
)
def test_bench_option_errors_exit_2(args, message, capsys):
    assert cli.main(["bench", *args]) == 2
    assert message in capsys.readouterr().err


def test_quick_and_full_are_exclusive(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--quick", "--full"])
    assert exit_.value.code == 2


def test_bench_runs_and_writes_json(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "CASES", tuple(TINY_CASES))
    monkeypatch.setattr(bench, "QUICK", bench.Budget(seconds=0.001, rounds=1, min_runs=1, max_runs=2,
                                                     probe_seconds=0.005))
    path = tmp_path / "out.json"
    argv = ["bench", "--only", "gemm,attention", "--threads", "1", "--json", str(path), "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert bench.OPS["gemm"].title in out and bench.OPS["attention"].title in out
    assert bench.OPS["mha"].title not in out
    data = json.loads(path.read_text())
    assert data["argv"] == argv
    assert {r["group"] for r in data["results"]} == {"gemm", "attention"}


def test_plot_without_matplotlib_fails_before_running(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["bench", "--plot", str(tmp_path / "p.png")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_python_dash_m():
    done = subprocess.run([sys.executable, "-m", "qkv_native", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "qkv-native" in done.stdout and "bench" in done.stdout
