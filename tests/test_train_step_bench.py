"""Smoke test: the trainer-step benchmark times train.py's step per precision (one small
recipe, three steps, the real corpus; about 15 s on one core)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_main
from flipout_lstm import precision

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
    assert out.splitlines()[1].startswith("Device: cpu; precision: fp32 bf16;")
    for prec in ("fp32", "bf16"):
        row = re.search(rf"^\| recipes/zaremba_small\.yaml \| {prec} \| [\d.]+ \| [\d.]+ \| "
                        r"[-+][\d.]+% \| [-+][\d.]+% \| <= 5% \((pass|FAIL)\) "
                        r"\| [\d,]+ \| [\d,]+ \|$", out, re.M)
        assert row, (prec, out)
    assert "| recipe | fp32 tokens/s | bf16 tokens/s | bf16/fp32 speed |" in out
    assert re.search(r"^\| recipes/zaremba_small\.yaml \| [\d,]+ \| [\d,]+ \| [\d.]+x \|$", out,
                     re.M), out


def test_train_step_refuses_fp16_and_missing_recipes(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    res = run_main("train_step.py", "--precision", "fp16")
    assert res.returncode == 2 and "invalid choice: 'fp16'" in res.stderr
    res = run_main("train_step.py", "--recipes", "recipes/no_such.yaml")
    assert res.returncode == 2
    assert res.stderr.strip() == "train_step.py: error: no such recipe: recipes/no_such.yaml"
