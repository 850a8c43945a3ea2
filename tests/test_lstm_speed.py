"""Smoke test: the LSTM speed benchmark runs (tiny shapes) and prints its table."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flipout_lstm import precision

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
    assert out.splitlines()[1] == "Device: cpu; precision: fp32"
    assert re.search(r"^### quick: .*, \d+ threads?, float32\)$", out, re.M)  # the default


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "lstm_speed.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.mark.skipif(not precision.native_bf16(torch.device("cpu")),
                    reason="this CPU has no native bfloat16 (AVX512-BF16 or AMX)")
def test_benchmark_quick_bf16_prints_table():
    res = _run("--quick", "--precision", "bf16")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "Device: cpu; precision: bf16" in out.splitlines()[1]
    assert "| variant | ms | ratio vs nn.LSTM | ratio IQR | target | pass/fail | kernels |" in out
    assert re.search(r"^### quick: .*, bf16 autocast\)$", out, re.M)
    assert "| torch.nn.LSTM (fwd+bwd) |" in out and "| WD+flipout |" in out
    assert "bfloat16" in out                                    # the custom rows' products


def test_benchmark_cuda_without_cuda_is_one_line_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    res = _run("--quick", "--device", "cuda", timeout=60)
    assert res.returncode == 2
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lstm_speed.py: error: --device cuda"), lines


def test_benchmark_fp16_on_cpu_is_one_line_error():
    res = _run("--quick", "--precision", "fp16", timeout=60)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--precision=fp16 needs a CUDA device" in lines[0], lines
