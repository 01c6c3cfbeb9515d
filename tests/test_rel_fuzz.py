"""Runs the binding fuzz target (tests/fuzz_binding.py) for a short fixed budget.

It runs in a child process, so a crash (segfault, abort) fails this test instead of
killing pytest. QKV_FUZZ_SECONDS sets the budget (default 8 s here); run the target
directly for longer: ``QKV_FUZZ_SECONDS=600 python tests/fuzz_binding.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

TARGET = Path(__file__).with_name("fuzz_binding.py")


def test_fuzz_binding_layer():
    seconds = float(os.environ.get("QKV_FUZZ_SECONDS", "8"))
    proc = subprocess.run([sys.executable, str(TARGET), "--seconds", str(seconds)], capture_output=True, text=True,
                          timeout=seconds + 300)
    out = proc.stdout + proc.stderr
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        chunks = [ln for ln in proc.stdout.splitlines() if ln.startswith("chunk ")]
        raise AssertionError(f"the fuzz target crashed ({sig}) in {chunks[-1] if chunks else 'startup'}; rerun it "
                             f"with --first-chunk N --verbose to see the call.\n{out[-6000:]}")
    assert proc.returncode == 0, f"the fuzz target failed (exit {proc.returncode}):\n{out[-8000:]}"
    # under .ci/sanitize, UBSan reports and carries on: its reports fail the test here
    reports = [i for i, ln in enumerate(out.splitlines()) if "runtime error:" in ln or "Sanitizer" in ln]
    assert not reports, "sanitizer reports:\n" + "\n".join(out.splitlines()[reports[0]:reports[0] + 40])
    assert "no crash and no unexpected exception" in proc.stdout, out[-4000:]
