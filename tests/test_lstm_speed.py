"""Smoke test: the LSTM speed benchmark runs (tiny shapes) and prints its table."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_benchmark_quick_prints_table():
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "lstm_speed.py"), "--quick"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "| variant | ms | ratio vs nn.LSTM | ratio IQR | target | pass/fail |" in out
    for name in ("WD shared", "Gauss shared", "WD+flipout", "Gauss+flipout", "Gal", "zoneout",
                 "Semeniuta", "eval forward", "independent per-example W"):
        assert f"| {name}" in out, name
