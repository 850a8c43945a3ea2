"""The product-kernel benchmark (benchmarks/product_kernels.py): its rule pinning really moves
the layer's products between oneDNN and ``mm``, and its ``--quick`` table, in process."""
import re
import sys
from pathlib import Path

import pytest
import torch

from flipout_lstm.nn import products

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
ONEDNN_RUNS = products.onednn_available(torch.float32)
ROWS = ["per-step forward pair", "per-step backward pair", "weight gradients of the pair",
        "input projection", "its input gradient", "its weight gradient"]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("product_kernels", None)
    import product_kernels
    return product_kernels


@pytest.mark.skipif(not ONEDNN_RUNS, reason="oneDNN's matmul does not run in this torch build")
def test_pinned_moves_every_product_and_restores_the_rule(bench):
    cpu, f32 = torch.device("cpu"), torch.float32
    rule = products.kernel_name(cpu, f32)
    w = torch.randn(2, 12, 3)
    for onednn, name in ((True, "onednn"), (False, "mm")):
        with bench.pinned(onednn):
            assert products.kernel_name(cpu, f32) == name
            assert products.kernel_name(cpu, torch.bfloat16) == (
                name if products.onednn_available(torch.bfloat16) else "mm")
            assert products.kernel_name(cpu, torch.float64) == "mm"       # never oneDNN
            assert products.Pair(w, 4).onednn is onednn
            assert products.uses_onednn(cpu, f32, step_weight=10 ** 7) is onednn
        assert products.kernel_name(cpu, f32) == rule
    with pytest.raises(RuntimeError), bench.pinned(True):
        raise RuntimeError("a failing product")
    assert products.kernel_name(cpu, f32) == rule                         # restored on error


@pytest.mark.skipif(not ONEDNN_RUNS, reason="oneDNN's matmul does not run in this torch build")
def test_quick_prints_the_rule_and_a_table_whose_ratios_are_its_columns(bench, capsys,
                                                                          monkeypatch):
    # As on AVX2 with the quick shape's weight (4 x 128 x 128 floats, 256 KiB) at the
    # threshold: the per-step products on oneDNN, the rest on mm, so the rule's total mixes
    # the two columns.
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(products, "STEP_WEIGHT_BYTES", 1 << 18)
    assert bench.main(["--quick", "--rounds", "2",
                       "--threads", str(torch.get_num_threads())]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("CPU: ") and "; ISA: " in lines[0]
    assert lines[1] == ("The rule here (torch's CPU kernels: AVX2): float32 products through "
                        "oneDNN where it is AVX-512; elsewhere the per-step products against a "
                        "weight of 0.25 MiB or more too, the rest through mm")
    head = re.fullmatch(r"### quick: batch 8, 10 steps, 64 -> 128, one layer's products "
                        r"\(median ms; torch.nn.LSTM fwd\+bwd ([\d.]+) ms\)", lines[3])
    assert head, lines[3]
    assert lines[4:7] == ["", "| product | oneDNN | mm/bmm | oneDNN / mm |", "|---|---:|---:|---:|"]
    rows = [[c.strip() for c in ln[1:-1].split("|")] for ln in lines[7:] if ln.startswith("|")]
    assert [r[0] for r in rows] == ROWS + ["**all, vs torch.nn.LSTM**"]
    for name, a, b, ratio in rows[:-1]:          # the ratio is its two columns' (2 dp rounding)
        a, b, ratio = float(a), float(b), float(ratio)
        assert a >= 0.01 and b >= 0.01, (name, a, b)
        assert abs(ratio * b - a) <= 0.005 * (1 + ratio) + 0.005 * b, (name, a, b, ratio)
    one, mm = (float(c.strip("*x")) for c in rows[-1][1:3])
    assert one > 0 and mm > 0
    assert float(rows[-1][3]) == pytest.approx(one / mm, abs=0.02 + 0.02 * one / mm)
    # The rule's total: the per-step rows from the column of the per-step kernel, the rest
    # from the other's; (1.00x torch.nn.LSTM = the reference's median ms from the header).
    cpu, f32 = torch.device("cpu"), torch.float32
    step, rest = (products.uses_onednn(cpu, f32, n) for n in (4 * 128 * 128, 0))  # H = 128
    assert (step, rest) == (True, False)
    kind = lambda k: "oneDNN" if k else "mm"  # noqa: E731
    tail = [ln for ln in lines[7:] if ln and not ln.startswith("|")][0]
    got = re.fullmatch(rf"The rule here \(per-step {kind(step)}, the rest {kind(rest)}\): "
                       r"([\d.]+)x torch.nn.LSTM", tail)
    assert got, tail
    ms = sum(float(r[1] if (step if r[0].startswith("per-step") else rest) else r[2])
             for r in rows[:-1])
    ref = float(head.group(1))                   # each figure rounded: 2 dp, the reference 1
    assert float(got.group(1)) == pytest.approx(
        ms / ref, abs=0.006 + ms / ref * (0.005 * (len(rows) - 1) / ms + 0.05 / ref))


def test_rounds_below_one_is_a_one_line_error(bench, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick", "--rounds", "0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("error: --rounds must be at least 1, got 0"), err


@pytest.mark.skipif(not ONEDNN_RUNS, reason="oneDNN's matmul does not run in this torch build")
def test_study_shapes_fall_on_either_side_of_the_per_step_threshold(bench, capsys, monkeypatch):
    # The study's two sizes are the evidence for products.STEP_WEIGHT_BYTES: as on AVX2, the
    # char size's per-step products take oneDNN, the word size's stay on mm with the rest.
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert bench.main(["--shape", "study", "--rounds", "1",
                       "--threads", str(torch.get_num_threads())]) == 0
    out = capsys.readouterr().out
    for shape, head, step in (
            ("study-char", "batch 32, 100 steps, 50 -> 512", "oneDNN"),    # 4 MiB
            ("study-word", "batch 40, 35 steps, 200 -> 200", "mm")):       # 625 KiB
        part = out.split(f"### {shape}: ")[1].split("###")[0]
        assert part.startswith(f"{head}, one layer's products"), part[:80]
        assert f"The rule here (per-step {step}, the rest mm): " in part
