"""The qkv-native command line: info, bench options and errors, python -m qkv_native."""

import io
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


def test_outputs_in_a_read_only_directory_fail_before_the_run(tmp_path, monkeypatch, capsys):
    """A directory this user cannot write (as root no directory is one: os.access is faked):
    the bench ran for minutes, train for an epoch, and only then failed to write."""
    import os

    real_access = os.access
    locked = str(tmp_path / "locked")
    os.mkdir(locked)
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == locked else real_access(p, mode, **kw))
    monkeypatch.setattr(bench, "run_bench", lambda **kw: pytest.fail("the bench ran"))
    for argv in (["bench", "--json", f"{locked}/b.json"], ["bench", "--plot", f"{locked}/b.png"]):
        assert cli.main(argv) == 2
        assert f"its directory is not writable ({locked})" in capsys.readouterr().err
    if __import__("importlib").util.find_spec("sklearn"):
        assert _train(["--checkpoint", f"{locked}/ck.npz"]) == 2
        captured = capsys.readouterr()
        assert "its directory is not writable" in captured.err and "test accuracy" not in captured.out


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


def test_bench_output_that_cannot_be_written_is_an_error_and_leaves_no_file(tmp_path):
    """A full disk (here a file size limit) when --json is written after the run: one 'error:'
    line and no file, where json.dump's OSError was a traceback and half a JSON file was left."""
    pytest.importorskip("resource")
    script = f"""
import resource, signal, sys
sys.path.insert(0, {str(__import__("os").path.dirname(__file__))!r})
from qkv_native import bench, cli
from test_bench import TINY_CASES
bench.CASES = tuple(c for c in TINY_CASES if c.group == "gemm")
bench.QUICK = bench.Budget(seconds=0.001, rounds=1, min_runs=1, max_runs=1, probe_seconds=0.002)
bench.detect_baselines = bench.Baselines  # NumPy only: importing torch takes seconds
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
sys.exit(cli.main(["bench", "--threads", "1", "--no-progress", "--json", {str(tmp_path / "out.json")!r}]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("qkv-native bench: error: --json") and "Traceback" not in done.stderr
    assert "GEMM" in done.stdout  # the table was printed
    assert list(tmp_path.iterdir()) == []


def test_bench_writes_its_json_when_stdout_is_closed(tmp_path):
    """`qkv-native bench --json out.json | head -3`: the table's reader left, and the JSON of the
    whole run was lost with a BrokenPipeError traceback (the table was printed first)."""
    script = f"""
import sys, time
sys.path.insert(0, {str(__import__("os").path.dirname(__file__))!r})
from qkv_native import bench, cli
from test_bench import TINY_CASES
bench.CASES = tuple(c for c in TINY_CASES if c.group == "gemm")
bench.QUICK = bench.Budget(seconds=0.001, rounds=1, min_runs=1, max_runs=1, probe_seconds=0.002)
bench.detect_baselines = bench.Baselines  # NumPy only: importing torch takes seconds
time.sleep(1)  # (the reader is gone by now)
sys.exit(cli.main(["bench", "--threads", "1", "--no-progress", "--json", {str(tmp_path / "out.json")!r}]))
"""
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        proc.stdout.close()
        err = proc.stderr.read()
    assert proc.wait(timeout=300) == 141, err
    assert json.loads((tmp_path / "out.json").read_text())["results"]
    assert list(tmp_path.iterdir()) == [tmp_path / "out.json"]


def test_plot_without_matplotlib_fails_before_running(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["bench", "--plot", str(tmp_path / "p.png")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_a_closed_stdout_ends_quietly():
    """`qkv-native info | head -0`: a BrokenPipeError traceback before; now SIGPIPE's status, no message."""
    proc = subprocess.Popen([sys.executable, "-m", "qkv_native", "info"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    with proc:
        proc.stdout.close()  # (before the child, still importing, prints)
        err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, err
    assert err == ""


def test_train_with_a_closed_stdout_is_not_a_checkpoint_error(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    from qkv_native import train

    def reader_gone(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(train.Trainer, "fit", reader_gone)
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # (no fileno: the process's stdout stays as it is)
    assert cli.main(["train", *TINY_TRAIN, "--checkpoint", str(tmp_path / "ck.npz")]) == 141
    assert "--checkpoint" not in capsys.readouterr().err


def test_python_dash_m():
    done = subprocess.run([sys.executable, "-m", "qkv_native", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "qkv-native" in done.stdout and "bench" in done.stdout


# ----------------------------------------------------------------------------
# qkv-native train: option values that used to crash later with a traceback
# ----------------------------------------------------------------------------

TINY_TRAIN = ["--epochs", "1", "--d-model", "8", "--num-heads", "2", "--d-ff", "8", "--num-layers", "1",
              "--batch-size", "256", "--no-progress", "--threads", "1"]


def _train(argv):
    from qkv_native import train_cli

    return train_cli.main([*TINY_TRAIN, *argv])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--test-fraction", "0.001"], "--test-fraction 0.001 leaves no test sample"),
        (["--test-fraction", "0.999"], "--test-fraction 0.999 leaves no train sample"),
        (["--checkpoint", ""], "--checkpoint needs a file name"),
        (["--checkpoint", "", "--resume"], "--checkpoint needs a file name"),
        (["--checkpoint", "{tmp}"], "is a directory"),
        (["--checkpoint", "{tmp}/no-such-dir/ck.npz"], "its directory does not exist"),
        (["--min-accuracy", "nan"], "--min-accuracy must be a fraction in [0, 1]"),
        (["--min-accuracy", "inf"], "--min-accuracy must be a fraction in [0, 1]"),
        (["--min-accuracy", "97"], "--min-accuracy must be a fraction in [0, 1] (0.97 for 97%), got 97.0"),
        (["--min-accuracy", "-0.5"], "--min-accuracy must be a fraction in [0, 1]"),
        (["--seed", "-1"], "--seed must be an integer >= 0"),
    ],
)
def test_train_option_errors_exit_2_before_training(args, message, tmp_path, capsys):
    pytest.importorskip("sklearn")
    assert _train([a.replace("{tmp}", str(tmp_path)) for a in args]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("qkv-native train: error:") and message in captured.err
    assert "Traceback" not in captured.err and "test accuracy" not in captured.out


def test_train_resume_from_a_bad_checkpoint_exits_2(tmp_path, capsys):
    pytest.importorskip("sklearn")
    garbage = tmp_path / "garbage.ck"
    garbage.write_text("garbage\n")
    assert _train(["--checkpoint", str(garbage), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkv-native train: error: --resume:") and "corrupt" in err

    good = str(tmp_path / "good.ck")
    assert _train(["--checkpoint", good]) == 0
    capsys.readouterr()
    for other in (["--d-model", "16"], ["--optimizer", "sgd"]):  # another architecture, another optimizer
        assert _train(["--checkpoint", good, "--resume", *other]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith("qkv-native train: error: --resume:"), captured.err
        assert "does not match this trainer" in captured.err and "test accuracy" not in captured.out


def test_train_checkpoint_that_cannot_be_written_is_an_error(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    from qkv_native import train

    def disk_full(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train.Trainer, "save", disk_full)
    assert _train(["--checkpoint", str(tmp_path / "ck.npz")]) == 2  # (was a traceback after the epoch)
    err = capsys.readouterr().err
    assert err.startswith("qkv-native train: error: --checkpoint") and "No space left" in err, err


@pytest.mark.parametrize("where", ["attention_classifier", "Trainer.fit"])
def test_train_out_of_memory_is_an_error_line(where, monkeypatch, capsys):
    """--d-model 100000000 (or a batch too large): the MemoryError was a traceback."""
    pytest.importorskip("sklearn")
    from qkv_native import train

    def too_big(*args, **kwargs):
        raise MemoryError

    if where == "Trainer.fit":
        monkeypatch.setattr(train.Trainer, "fit", too_big)
    else:
        monkeypatch.setattr(train, where, too_big)
    assert _train([]) == 2
    assert capsys.readouterr().err.startswith("qkv-native train: error: out of memory")


def test_train_checkpoint_through_a_symbolic_link_keeps_the_link(tmp_path, capsys):
    pytest.importorskip("sklearn")
    link = tmp_path / "latest.ck"
    link.symlink_to("run1.ck")
    assert _train(["--checkpoint", str(link)]) == 0
    assert link.is_symlink()  # (was replaced by a regular file)
    assert (tmp_path / "run1.ck").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["latest.ck", "run1.ck"]
    assert _train(["--checkpoint", str(link), "--resume", "--epochs", "2"]) == 0
    assert "resumed from" in capsys.readouterr().out and link.is_symlink()


# ----------------------------------------------------------------------------
# qkv-native embed: paths checked up front, a collision-free temporary file, SIGTERM
# ----------------------------------------------------------------------------


def _embed_setup(tmp_path):
    from test_encoder import write_tiny_model  # (the tiny BERT its tests build; nothing is downloaded)

    model = tmp_path / "model"
    write_tiny_model(model)
    src = tmp_path / "texts.txt"
    src.write_text("the cat\nsat on the mat\n")
    return model, src


def _embed(model, src, dst, *more):
    return cli.main(["embed", "--model", str(model), "--input", str(src), "--output", str(dst),
                     "--no-progress", *more])


def test_embed_path_errors_exit_2_before_any_work(tmp_path, monkeypatch, capsys):
    import os

    from qkv_native import encoder

    model, src = _embed_setup(tmp_path)
    (tmp_path / "a_dir").mkdir()
    link = tmp_path / "link.txt"
    link.symlink_to(src)

    def no_work(*a, **kw):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(encoder.SentenceEncoder, "from_pretrained", no_work)
    cases = [
        (src, src, "is the input file"),
        (src, link, "is the input file"),
        (src, "", "--output needs a file name"),
        (src, tmp_path / "a_dir", "a_dir: is a directory"),
        (src, tmp_path / "nowhere" / "x.npy", "directory does not exist"),
        ("-", tmp_path / "e.npy", "standard input is not supported"),
        (tmp_path / "a_dir", tmp_path / "e.npy", "is a directory, not an input file"),
        (tmp_path / "missing.txt", tmp_path / "e.npy", "input file not found"),
    ]
    if os.path.exists("/dev/null"):
        cases.append(("/dev/null", tmp_path / "e.npy", "not a regular file"))
    # standard output and pipes: the .npy is renamed over its file, which replaced a pipe (or
    # /dev/stdout, for root) with a regular file; "-" wrote a file named "-"
    cases.append((src, "-", "--output -: writing to standard output is not supported"))
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe")
        cases.append((src, tmp_path / "pipe", "pipe: not a regular file"))
    for s, d, message in cases:
        assert _embed(model, s, d) == 2, (s, d)
        err = capsys.readouterr().err
        assert err.startswith("qkv-native embed: error: ") and message in err, err
        assert "Traceback" not in err and "PosixPath" not in err
    assert src.read_text() == "the cat\nsat on the mat\n"


def test_embed_keeps_a_users_partial_file(tmp_path, capsys):
    import numpy as np

    model, src = _embed_setup(tmp_path)
    dst = tmp_path / "emb.npy"
    mine = tmp_path / "emb.npy.partial"
    mine.write_text("keep me\n")
    assert _embed(model, src, dst) == 0
    assert mine.read_text() == "keep me\n"
    assert np.load(dst).shape[0] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.npy", "emb.npy.partial", "model", "texts.txt"]


def test_embed_without_the_embed_extra_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    model, src = _embed_setup(tmp_path)
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `pip install .` without [embed]
    assert _embed(model, src, tmp_path / "e.npy") == 2  # (was an ImportError traceback)
    err = capsys.readouterr().err
    assert err.startswith("qkv-native embed: error: ") and "qkv_native[embed]" in err, err
    assert not (tmp_path / "e.npy").exists()


def test_embed_out_of_memory_is_an_error_line(tmp_path, monkeypatch, capsys):
    """--batch-size 100000 on long texts: the workspace's MemoryError was a traceback."""
    from qkv_native import encoder

    model, src = _embed_setup(tmp_path)

    def too_big(self, texts, out, **kw):
        raise MemoryError

    monkeypatch.setattr(encoder.SentenceEncoder, "encode_into", too_big)
    assert _embed(model, src, tmp_path / "e.npy", "--batch-size", "100000") == 2
    err = capsys.readouterr().err
    assert err.startswith("qkv-native embed: error: out of memory with --batch-size 100000"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "texts.txt"]


def test_embed_names_the_line_that_is_not_utf8(tmp_path, capsys):
    model, src = _embed_setup(tmp_path)
    src.write_bytes(b"the cat\n" * 5000 + b"sat on \xff the mat\n")  # (the decoder said "position 7239")
    assert _embed(model, src, tmp_path / "e.npy") == 2
    err = capsys.readouterr().err
    assert err.startswith("qkv-native embed: error: ") and "line 5001 is not UTF-8 text" in err, err
    assert "byte 8 of the line" in err and not (tmp_path / "e.npy").exists()


def test_embed_ignores_a_byte_order_mark(tmp_path, capsys):
    """A file saved as 'UTF-8 with BOM' (Windows editors): the mark was embedded as part of the
    first text, which this model's tokenizer (no BERT normalizer) made an unknown word."""
    import numpy as np

    from qkv_native.encoder import SentenceEncoder

    model, src = _embed_setup(tmp_path)
    src.write_bytes(b"\xef\xbb\xbfthe cat\nsat on the mat\n")
    assert _embed(model, src, tmp_path / "e.npy") == 0
    want = SentenceEncoder.from_pretrained(model).encode(["the cat", "sat on the mat"])
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), want, rtol=0, atol=1e-6)


def test_embed_through_a_symbolic_link_keeps_the_link(tmp_path, capsys):
    import numpy as np

    model, src = _embed_setup(tmp_path)
    (tmp_path / "real.npy").write_text("old\n")
    link = tmp_path / "link.npy"
    link.symlink_to("real.npy")
    assert _embed(model, src, link) == 0
    assert link.is_symlink()  # (was replaced by a regular file, the link's file left as it was)
    assert np.load(tmp_path / "real.npy").shape[0] == 2


def test_embed_sigterm_removes_the_partial_output(tmp_path, monkeypatch, capsys):
    import os
    import signal
    import time

    from qkv_native import encoder

    model, src = _embed_setup(tmp_path)
    dst = tmp_path / "emb.npy"
    seen = []

    def terminated(self, texts, out, **kw):  # as `kill` or `timeout` would, mid-run
        seen.extend(p.name for p in tmp_path.iterdir() if p.name.endswith(".partial"))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # interrupted by the handler's exception
        raise AssertionError("SIGTERM did not stop the run")

    def fallback(signum, frame):  # (so that without embed's handler this test fails, not pytest dies)
        raise RuntimeError("embed installed no SIGTERM handler")

    previous = signal.signal(signal.SIGTERM, fallback)
    try:
        monkeypatch.setattr(encoder.SentenceEncoder, "encode_into", terminated)
        rc = _embed(model, src, dst)
        assert signal.getsignal(signal.SIGTERM) is fallback  # the handler is restored
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert rc == 128 + signal.SIGTERM and "terminated" in err, err
    assert len(seen) == 1  # the temporary file existed ...
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "texts.txt"]  # ... and is gone


def test_train_sigterm_during_a_checkpoint_save_leaves_no_temporary_file(tmp_path, monkeypatch, capsys):
    """`timeout`/`kill` while train saves its checkpoint: the save's cleanup runs (Python's default
    SIGTERM ended the process there, leaving CHECKPOINT.<random>.tmp) and the exit status is 143."""
    import os
    import signal
    import time

    pytest.importorskip("sklearn")

    def fsync_then_killed(fd):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # interrupted by the handler's exception
        raise AssertionError("SIGTERM did not stop the run")

    def fallback(signum, frame):  # (so that without a handler this test fails, not pytest dies)
        raise RuntimeError("train installed no SIGTERM handler")

    previous = signal.signal(signal.SIGTERM, fallback)
    try:
        monkeypatch.setattr(os, "fsync", fsync_then_killed)
        rc = cli.main(["train", *TINY_TRAIN, "--checkpoint", str(tmp_path / "ck.npz")])
        monkeypatch.undo()
        assert signal.getsignal(signal.SIGTERM) is fallback  # the handler is restored
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert rc == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip() == "qkv-native train: terminated (SIGTERM)"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["train", "embed"])
def test_ctrl_c_in_a_subcommand_is_one_line_and_status_130(command, monkeypatch, capsys):
    """Ctrl-C during train or embed: a line and exit 130 as bench gives, not a 28-line
    KeyboardInterrupt traceback (the subcommands' runners were called outside main's
    handler)."""
    from qkv_native import cli, embed_cli, train_cli

    def interrupted(args):
        raise KeyboardInterrupt

    module = train_cli if command == "train" else embed_cli
    monkeypatch.setattr(module, "run", interrupted)
    argv = [command] if command == "train" else [command, "--model", "m", "--input", "x.txt", "--output", "y.npy"]
    assert cli.main(argv) == 130
    assert capsys.readouterr().err.strip() == f"qkv-native {command}: interrupted"
    # the same from `python -m qkv_native.train_cli` / `.embed_cli` (was a traceback)
    try:
        assert module.main(argv[1:]) == 130
    except KeyboardInterrupt:  # (not to pytest, which would end the session)
        pytest.fail(f"python -m qkv_native.{command}_cli let KeyboardInterrupt through")
    assert capsys.readouterr().err.strip() == f"qkv-native {command}: interrupted"
