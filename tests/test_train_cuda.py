"""train.py and evaluate.py on a GPU, end to end: each precision trains, records itself and
writes float32 checkpoints that load on the CPU; a stopped run resumes to the uninterrupted
run's numbers; evaluate.py scores a GPU run's checkpoint on the CPU to the run's own figure.

The CUDA cases skip without a GPU (``benchmarks/device_check.sh`` runs them on a lent one);
the CPU case of each test runs everywhere, so the checks themselves are exercised here."""
import json
import math
import re

import pytest
import torch

import evaluate as evaluate_script
from conftest import REPO, metrics, train_tiny
from flipout_lstm import checkpoint

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
BF16 = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
                          reason="no CUDA device with bfloat16")
# (device, precision): the CPU in float32 here; on a GPU every precision it has.
CASES = [pytest.param("cpu", "fp32", id="cpu-fp32"),
         pytest.param("cuda", "fp32", id="cuda-fp32", marks=CUDA),
         pytest.param("cuda", "bf16", id="cuda-bf16", marks=BF16),
         pytest.param("cuda", "fp16", id="cuda-fp16", marks=CUDA)]
# word_unregularized: torch's fused LSTM (cuDNN on a GPU); word_ptb: WD + flipout, the custom
# recurrence.
RECIPES = ["word_unregularized", "word_ptb"]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("device, prec", CASES)
def test_a_run_stopped_and_resumed_equals_the_uninterrupted_run(tiny_ptb, tmp_path, device,
                                                               prec, recipe):
    """12 steps straight, and 6 steps then ``--resume`` to 12: the same metrics, line for
    line (model, optimizer, schedule, data position, carried state, fp16's scaler and the
    device's RNG all come back). The run records its device's precision, and its
    checkpoints hold float32 weights that load on the CPU."""
    settings = {"train.device": device, "train.precision": prec, "train.max_steps": 12,
                "train.checkpoint_every": 6, "train.eval_every": 6, "train.log_every": 1}
    assert train_tiny(recipe, tiny_ptb, tmp_path / "full", **settings) == 0
    assert train_tiny(recipe, tiny_ptb, tmp_path / "part", **{**settings, "train.max_steps": 6}) == 0
    assert train_tiny(recipe, tiny_ptb, tmp_path / "part", "--resume", **settings) == 0
    full, part = tmp_path / "full" / recipe, tmp_path / "part" / recipe
    got, want = metrics(part), metrics(full)
    assert [ln["step"] for ln in got] == [ln["step"] for ln in want]
    assert got == want, "the resumed run's metrics differ from the uninterrupted run's"
    train_losses = [ln["loss"] for ln in want if ln["split"] == "train"]
    assert len(train_losses) == 12 and all(map(math.isfinite, train_losses))
    assert f"precision: {prec}" in (full / "config.yaml").read_text()
    segments = json.loads((part / "run.json").read_text())["segments"]
    assert [s["precision"] for s in segments] == [prec, prec]
    ckpt = checkpoint.load(full / "last.pt")                 # map_location="cpu"
    assert all(t.device.type == "cpu" and t.dtype == torch.float32
               for t in ckpt["model"].values())
    if prec == "fp16":                                       # its scale comes back on resume
        assert ckpt["scaler"] and ckpt["scaler"]["scale"] > 0, ckpt.get("scaler")
    else:
        assert ckpt["scaler"] is None


@pytest.mark.parametrize("device, prec", CASES[:2])
def test_evaluate_scores_the_checkpoint_on_the_cpu_as_the_run_did(tiny_ptb, tmp_path, device,
                                                                 prec):
    """The run's own test figure (scored on its device at the end of training) against
    ``evaluate.py --device cpu`` on its best checkpoint: equal on the CPU, within float32's
    kernel differences (cuDNN may use TF32) for a GPU run."""
    settings = {"train.device": device, "train.precision": prec, "train.max_steps": 8,
                "train.eval_every": 4}
    assert train_tiny("word_ptb", tiny_ptb, tmp_path, **settings) == 0
    run_dir = tmp_path / "word_ptb"
    (own,) = [ln for ln in metrics(run_dir) if ln["split"] == "test" and ln.get("best")]
    args = evaluate_script.parse_args([str(run_dir / "best.pt"), "--data-root", str(tiny_ptb),
                                       "--device", "cpu", "--no-progress"])
    scored = evaluate_script.run(args)
    assert scored["split"] == "test" and scored["precision"] == prec
    assert scored["loss"] == pytest.approx(own["loss"], rel=1e-9 if device == "cpu" else 2e-3)


def test_device_check_runs_every_test_file_with_cuda_cases():
    """A GPU is lent rarely: benchmarks/device_check.sh must not miss a CUDA test."""
    script = (REPO / "benchmarks" / "device_check.sh").read_text()
    listed = set(re.findall(r"tests/(test_\w+\.py)", script))
    assert listed and all((REPO / "tests" / name).is_file() for name in listed), listed
    cuda_only = re.compile(r"skipif\(\s*not \(?torch\.cuda\.is_available\(\)")
    with_cuda = {p.name for p in (REPO / "tests").glob("test_*.py")
                 if cuda_only.search(p.read_text())}
    assert "test_train_cuda.py" in with_cuda and "test_lstm_precision.py" in with_cuda
    assert with_cuda <= listed, f"not run by device_check.sh: {sorted(with_cuda - listed)}"
