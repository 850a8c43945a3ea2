"""Smoke test: the LSTM speed benchmark runs (tiny shapes) and prints its table."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_benchmark_quick_prints_table():
    env = dict(os.environ, MKL_ENABLE_INSTRUCTIONS="AVX2")
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "lstm_speed.py"), "--quick"],
                         capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "| variant | ms | ratio vs nn.LSTM | ratio IQR | target | pass/fail | kernels |" in out
    # Where it ran: CPU model, vector ISA, threads; and the kernels chosen per row.
    first = out.splitlines()[0]
    assert first.startswith("CPU: ") and "ISA: " in first
    assert re.search(r"torch \S+, \d+ threads?;", first)
    assert "| oneDNN (torch fused) |" in out                  # no-noise row: torch's kernel
    assert "cell=" in out and "products=" in out               # custom rows: their kernels
    for name in ("WD shared", "Gauss shared", "WD+flipout", "Gauss+flipout", "Gal", "zoneout",
                 "Semeniuta", "eval forward", "independent per-example W",
                 "flipout products only (GEMM floor)"):
        assert f"| {name}" in out, name
    assert "env: MKL_ENABLE_INSTRUCTIONS=AVX2" in out.splitlines()[0]       # recorded
