"""The LSTM speed benchmark (benchmarks/lstm_speed.py) at its tiny ``--quick`` shape: the table
it promises, row by row, and its one-line errors."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_main
from flipout_lstm import precision
from flipout_lstm.nn import products

REPO = Path(__file__).resolve().parent.parent

HEADER = "| variant | ms | ratio vs nn.LSTM | ratio IQR | target | pass/fail | kernels |"
ALIGN = "|---|---:|---:|---:|---:|---|---|"
# The rows of the quick table, in order, with their targets (benchmarks/lstm_speed.py VARIANTS,
# then the GEMM floor, eval forward and independent rows; no bayesian-torch row: not the char
# shape). None: no target.
ROWS = [("torch.nn.LSTM (fwd+bwd)", None), ("none", 1.1), ("WD shared", 1.1),
        ("Gauss shared", 1.1), ("WD+flipout", 2.0), ("Gauss+flipout", 2.0), ("Gal", 1.3),
        ("zoneout", 1.3), ("Semeniuta", 1.3), ("flipout products only (GEMM floor)", None),
        ("eval forward (vs nn.LSTM eval fwd)", 1.0),
        ("independent per-example W (bmm, layer 1 only)", None)]
# float32: the rows without recurrent noise run torch's fused kernel, the others the custom
# recurrence (flipout_lstm.nn.LSTM._use_custom); under CPU autocast every row is custom.
FUSED_FP32 = {"none", "WD shared", "Gauss shared", "eval forward (vs nn.LSTM eval fwd)"}
CUSTOM = {"WD+flipout", "Gauss+flipout", "Gal", "zoneout", "Semeniuta"}


def _run(*args, timeout=120, env=None):
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "lstm_speed.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=env)


def _number(cell, suffix=""):
    assert cell.endswith(suffix), cell
    value = float(cell[:len(cell) - len(suffix)] if suffix else cell)
    assert math.isfinite(value), cell
    return value


def check_quick_output(out, prec):
    """Everything ``--quick`` prints: where it ran, the table's rows and cells, the notes."""
    lines = out.splitlines()
    first = lines[0]
    assert re.fullmatch(r"CPU: .+ \(\d+ logical CPUs\); ISA: [^;]+; torch \S+, \d+ threads?; "
                        r"compiled cell (available|unavailable \(.*\)); "
                        r"(freed memory kept|glibc heap defaults)(; env: .+)?", first), first
    cell = "fused" if "; compiled cell available" in first else "torch"
    assert lines[1] == f"Device: cpu; precision: {prec}"
    assert lines[2] == ""
    where = {"fp32": "float32", "bf16": "bf16 autocast"}[prec]
    assert re.fullmatch(rf"### quick: batch 4, 6 steps, 5 -> 8, 2 layers \(median of 2, "
                        rf"\d+ threads?, {where}\)", lines[3]), lines[3]
    assert lines[4:7] == ["", HEADER, ALIGN]
    table = []
    for line in lines[7:]:
        if not line.startswith("|"):
            break
        assert line.endswith(" |"), line
        table.append([c.strip() for c in line[1:-1].split("|")])
    assert [r[0] for r in table] == [name for name, _ in ROWS]
    assert all(len(r) == 7 for r in table), table
    dtype = torch.float32 if prec == "fp32" else torch.bfloat16
    kind = products.kernel_name(torch.device("cpu"), dtype)
    custom = f"products={kind}{'' if prec == 'fp32' else ' bfloat16'} cell={cell}"
    for (name, target), (_, ms, ratio, iqr, tgt, verdict, kernels) in zip(ROWS, table):
        assert _number(ms) >= 0, (name, ms)
        r = _number(ratio, "x")
        assert r > 0, (name, ratio)
        if name.startswith("torch.nn.LSTM"):                 # the reference row
            assert (ratio, iqr, tgt, verdict, kernels) == ("1.00x", "-", "-", "-", "oneDNN")
            continue
        if name.startswith("independent"):                   # timed once: no spread
            assert iqr == "-" and kernels == "-", (name, iqr, kernels)
        else:                                                # paired repeats: an IQR around it
            lo, hi = re.fullmatch(r"([\d.]+)-([\d.]+)", iqr).groups()  # quartiles of ratios > 0
            lo, hi = _number(lo), _number(hi)
            assert 0 < lo <= r + 0.005 and r <= hi + 0.005, (name, iqr, ratio)
        if target is None:
            assert (tgt, verdict) == ("-", "-"), (name, tgt, verdict)
        else:                                                # quick: no verdict on timings
            assert (tgt, verdict) == (f"<= {target:.1f}x", "n/a (tiny shape: overhead only)")
        if name.startswith("independent"):
            pass                                             # "-", checked above
        elif name.startswith("flipout products only"):
            assert kernels in ("products only: torch mm/bmm",
                               f"products only: flipout_lstm.nn.products ({kind})"), kernels
        elif name in CUSTOM or prec != "fp32":
            assert kernels == custom, (name, kernels)
        else:
            assert name in FUSED_FP32 and kernels == "oneDNN (torch fused)", (name, kernels)
    rest = lines[7 + len(table):]
    assert rest[:3] == ["", "- independent per-example W runs the first layer only (a lower bound).",
                        "- independent per-example W is timed once, without warm-up."], rest
    assert all(not ln.strip() for ln in rest[3:]), rest


def test_benchmark_quick_prints_table():
    env = dict(os.environ, MKL_ENABLE_INSTRUCTIONS="AVX2")
    res = _run("--quick", env=env)
    assert res.returncode == 0, res.stderr
    check_quick_output(res.stdout, "fp32")
    assert "env: MKL_ENABLE_INSTRUCTIONS=AVX2" in res.stdout.splitlines()[0]  # recorded


@pytest.mark.skipif(not precision.native_bf16(torch.device("cpu")),
                    reason="this CPU has no native bfloat16 (AVX512-BF16 or AMX)")
def test_benchmark_quick_bf16_prints_table():
    res = _run("--quick", "--precision", "bf16")
    assert res.returncode == 0, res.stderr
    check_quick_output(res.stdout, "bf16")


def test_benchmark_cuda_without_cuda_is_one_line_error(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    res = run_main("lstm_speed.py", "--quick", "--device", "cuda")
    assert res.returncode == 2
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lstm_speed.py: error: --device cuda"), lines


def test_benchmark_fp16_on_cpu_is_one_line_error(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    res = run_main("lstm_speed.py", "--quick", "--precision", "fp16")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--precision=fp16 needs a CUDA device" in lines[0], lines
