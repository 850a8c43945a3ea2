"""Smoke tests of the trainer-step benchmarks: train_step.py times train.py's step per precision
and thread count (one small recipe, three steps, the real corpus; about 15 s on one core);
blocked_loss.py times the step with the loss by row blocks against torch's."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_main
from flipout_lstm import heap, precision

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "train_step.py"


def _run(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


@pytest.mark.skipif(not precision.native_bf16(torch.device("cpu")),
                    reason="this CPU has no native bfloat16 (AVX512-BF16 or AMX)")
def test_train_step_fp32_bf16_tokens_and_ratio(ptb_root):
    env = dict(os.environ, LM_DATA_ROOT=str(ptb_root))
    res = _run("--threads", "1", "--precision", "fp32", "bf16", "--recipes",
               "recipes/zaremba_small.yaml", "--steps", "2", "--warmup", "1", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert out.splitlines()[1].startswith("Device: cpu; precision: fp32 bf16; threads: 1;")
    for prec in ("fp32", "bf16"):
        row = re.search(rf"^\| recipes/zaremba_small\.yaml \| {prec} \| 1 \| [\d.]+ \| [\d.]+ \| "
                        r"[-+][\d.]+% \| [-+][\d.]+% \| <= 5% \((pass|FAIL)\) "
                        r"\| [\d,]+ \| [\d,]+ \|$", out, re.M)
        assert row, (prec, out)
    assert "| recipe | fp32 tokens/s | bf16 tokens/s | bf16/fp32 speed |" in out
    assert re.search(r"^\| recipes/zaremba_small\.yaml \| [\d,]+ \| [\d,]+ \| [\d.]+x \|$", out,
                     re.M), out


def test_train_step_times_each_thread_count_in_one_process(ptb_root):
    """``--threads 1 2``: a row per thread count, and 2 threads' speed against 1's."""
    env = dict(os.environ, LM_DATA_ROOT=str(ptb_root))
    res = _run("--threads", "1", "2", "--recipes", "recipes/zaremba_small.yaml", "--steps", "2",
               "--warmup", "1", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert out.splitlines()[1].startswith("Device: cpu; precision: fp32; threads: 1 2;")
    for th in (1, 2):
        assert re.search(rf"^\| recipes/zaremba_small\.yaml \| fp32 \| {th} \| [\d.]+ \|", out,
                         re.M), (th, out)
    assert "| recipe | 1 thread tokens/s | 2 threads tokens/s | 2 threads/1 thread speed |" in out
    assert re.search(r"^\| recipes/zaremba_small\.yaml \| [\d,]+ \| [\d,]+ \| [\d.]+x \|$", out,
                     re.M), out


def test_speed_table_names_what_varies_against_the_base(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from train_step import speed_table
    tokens = {("bf16", 1): 300.0, ("bf16", 2): 450.0, ("fp32", 1): 150.0, ("fp32", 2): 200.0}
    speed = {("r.yaml", p, t): v for (p, t), v in tokens.items()}
    table = speed_table(speed, ["r.yaml"], ["bf16", "fp32"], [1, 2]).splitlines()
    # The base is fp32 at the first thread count, wherever fp32 stands in the list.
    assert table[0] == ("| recipe | bf16 1 thread tokens/s | bf16 2 threads tokens/s "
                        "| fp32 1 thread tokens/s | fp32 2 threads tokens/s "
                        "| bf16 1 thread/fp32 1 thread speed | bf16 2 threads/fp32 1 thread speed "
                        "| fp32 2 threads/fp32 1 thread speed |")
    assert table[2] == "| r.yaml | 300 | 450 | 150 | 200 | 2.00x | 3.00x | 1.33x |"
    # One thread count: the columns name the precision alone.
    one = speed_table({("r.yaml", "fp32", 2): 100.0, ("r.yaml", "bf16", 2): 150.0},
                      ["r.yaml"], ["fp32", "bf16"], [2]).splitlines()
    assert one[0] == "| recipe | fp32 tokens/s | bf16 tokens/s | bf16/fp32 speed |"
    assert one[2] == "| r.yaml | 100 | 150 | 1.50x |"


def test_train_step_refuses_fp16_and_missing_recipes(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    res = run_main("train_step.py", "--precision", "fp16")
    assert res.returncode == 2 and "invalid choice: 'fp16'" in res.stderr
    res = run_main("train_step.py", "--recipes", "recipes/no_such.yaml")
    assert res.returncode == 2
    assert res.stderr.strip() == "train_step.py: error: no such recipe: recipes/no_such.yaml"
    res = run_main("train_step.py", "--steps", "1")
    assert res.returncode == 2
    assert res.stderr.strip() == "train_step.py: error: --steps must be at least 2, got 1"
    res = run_main("train_step.py", "--threads", "2", "0")
    assert res.returncode == 2
    assert res.stderr.strip() == ("train_step.py: error: --threads takes positive numbers of "
                                  "threads, got 2 0")


def test_blocked_loss_benchmark_table(tiny_ptb, monkeypatch, capsys):
    """benchmarks/blocked_loss.py: a row per recipe and heap setting, both arms, their ratios
    and which one the rule takes; the rule and glibc's settings back afterwards."""
    from flipout_lstm import model as lm_model
    monkeypatch.chdir(REPO)
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import blocked_loss
    rule, kept = lm_model.BLOCKED_LOSS_ABOVE, heap.kept()
    try:
        rc = blocked_loss.main(["--recipes", "recipes/zaremba_small.yaml", "--precision", "fp32",
                                "--heap", "kept", "glibc", "--steps", "1", "--warmup", "0",
                                "--set", "data.batch_size=4", "--data-root", str(tiny_ptb)])
        after = heap.kept()
    finally:
        heap.keep_freed_memory(kept)
    assert rc == 0
    out = capsys.readouterr().out
    assert "| recipe | heap | logits a step | rule takes | torch step (ms) | blocks step (ms)" in out
    for setting in ("kept", "glibc"):
        assert re.search(rf"^\| recipes/zaremba_small\.yaml data\.batch_size=4 \| {setting} "
                         r"\| [\d,]+ \| torch"
                         r"( \| \d+){2}( \| [\d.]+x){2} \|$", out, re.M), out
    assert lm_model.BLOCKED_LOSS_ABOVE == rule and not after


def test_blocked_loss_benchmark_refuses_bad_arguments(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    res = run_main("blocked_loss.py", "--recipes", "recipes/no_such.yaml")
    assert res.returncode == 2
    assert res.stderr.strip() == "blocked_loss.py: error: no such recipe: recipes/no_such.yaml"
    res = run_main("blocked_loss.py", "--set", "data.batch_size=-1")
    assert res.returncode == 2
    assert res.stderr.startswith("blocked_loss.py: error: ") and "batch_size" in res.stderr
    res = run_main("blocked_loss.py", "--steps", "0")
    assert res.returncode == 2
    assert res.stderr.strip() == "blocked_loss.py: error: --steps and --repeats must be at least 1"
