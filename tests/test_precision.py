"""train.precision: what auto picks, what is refused, and that it is recorded."""
import pytest
import torch

from flipout_lstm import precision
from flipout_lstm.errors import ConfigError

CPU = torch.device("cpu")


def test_auto_picks_bf16_exactly_where_the_cpu_computes_it(monkeypatch):
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(precision, "native_bf16", lambda device, n=native: n)
        assert precision.resolve("auto", CPU) == expected
    assert precision.resolve("fp32", CPU) == "fp32"


def test_bf16_without_native_support_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not precision.native_bf16(CPU)
    with pytest.raises(ConfigError, match=r"^train.precision=bf16: this CPU has no AVX512-BF16 or AMX, "
                                          r"so bfloat16 would be emulated .*use fp32, or auto"):
        precision.resolve("bf16", CPU)
    assert precision.resolve("auto", CPU) == "fp32"


def test_fp16_is_cuda_only():
    with pytest.raises(ConfigError, match=r"train.precision=fp16 needs a CUDA device"):
        precision.resolve("fp16", CPU)
    assert precision.grad_scaler("bf16", CPU) is None and precision.grad_scaler("fp32", CPU) is None


def test_autocast_context_per_precision():
    with precision.autocast("fp32", CPU):
        assert not torch.is_autocast_enabled("cpu")
    with precision.autocast("bf16", CPU):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_fp16_on_cuda_has_a_scaler():
    device = torch.device("cuda")
    assert precision.resolve("fp16", device) == "fp16"
    assert isinstance(precision.grad_scaler("fp16", device), torch.amp.GradScaler)


# ----------------------------------------------------------------------------- train.py in bf16

import json  # noqa: E402

from conftest import metrics, train_tiny  # noqa: E402
from flipout_lstm import checkpoint  # noqa: E402

needs_bf16 = pytest.mark.skipif(not precision.native_bf16(CPU), reason="this CPU has no native bfloat16")


def losses(run_dir, split="train"):
    return [l["loss"] for l in metrics(run_dir) if l["split"] == split]


@needs_bf16
@pytest.mark.parametrize("recipe", ["word_unregularized", "word_ptb"])  # fused path; flipout (custom)
def test_bf16_training_follows_fp32(tiny_ptb, tmp_path, recipe):
    """300 steps of a tiny model in bf16 and in fp32 from one seed: the same run up to bf16's
    rounding. The bounds: the final validation losses within 2% and every train window within
    5% (measured: under 1e-4 relative for both recipes; the noise, the data and the schedule
    are the same), and the runs are not identical (bf16 really ran)."""
    # Adam at a modest rate: SGD at the recipes' 30 is chaotic on a 16-unit model, and any two
    # runs whose rounding differs (bf16 or not) part ways.
    settings = {"train.max_steps": 300, "train.eval_every": 100, "train.log_every": 25,
                "optim.name": "adam", "optim.lr": 0.003, "optim.schedule": "constant"}
    for p in ("fp32", "bf16"):
        assert train_tiny(recipe, tiny_ptb, tmp_path / p, **settings, **{"train.precision": p}) == 0
    a, b = (tmp_path / p / recipe for p in ("fp32", "bf16"))
    va, vb = losses(a, "valid"), losses(b, "valid")
    assert abs(va[-1] - vb[-1]) / va[-1] < 0.02, (va, vb)
    ta, tb = losses(a), losses(b)
    assert ta != tb and max(abs(x - y) / x for x, y in zip(ta, tb)) < 0.05
    assert "precision: bf16" in (b / "config.yaml").read_text()
    assert json.loads((b / "run.json").read_text())["segments"][0]["precision"] == "bf16"
    ckpt = checkpoint.load(b / "last.pt")
    assert all(t.dtype == torch.float32 for t in ckpt["model"].values())  # weights stay float32


@needs_bf16
def test_bf16_resume_is_exact_within_bf16(tiny_ptb, tmp_path, monkeypatch):
    """A bf16 run stopped at step 9 and resumed equals an uninterrupted bf16 run; resuming it
    in fp32 is refused (train.precision fixes the numbers)."""
    settings = {"train.max_steps": 18, "train.checkpoint_every": 9, "train.log_every": 1,
                "train.precision": "bf16"}
    assert train_tiny("word_ptb", tiny_ptb, tmp_path / "full", **settings) == 0
    assert train_tiny("word_ptb", tiny_ptb, tmp_path / "part", **{**settings, "train.max_steps": 9}) == 0
    assert train_tiny("word_ptb", tiny_ptb, tmp_path / "part", "--resume",
                      **{**settings, "train.precision": "fp32"}) == 2
    assert train_tiny("word_ptb", tiny_ptb, tmp_path / "part", "--resume", **settings) == 0
    assert (tmp_path / "part" / "word_ptb" / "metrics.jsonl").read_text() == \
        (tmp_path / "full" / "word_ptb" / "metrics.jsonl").read_text()


def test_auto_records_fp32_where_bf16_is_not_native_and_bf16_is_refused(tiny_ptb, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert train_tiny("word_ptb", tiny_ptb, tmp_path, **{"train.max_steps": 2, "train.precision": "auto"}) == 0
    assert "precision: fp32" in (tmp_path / "word_ptb" / "config.yaml").read_text()
    capsys.readouterr()
    assert train_tiny("word_ptb", tiny_ptb, tmp_path / "b", **{"train.max_steps": 2, "train.precision": "bf16"}) == 2
    (line,) = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error: ")]
    assert "train.precision=bf16" in line and "use fp32, or auto" in line


@needs_bf16
def test_evaluate_follows_the_runs_precision_unless_told(tiny_ptb, tmp_path):
    import evaluate as evaluate_script

    assert train_tiny("word_ptb", tiny_ptb, tmp_path, **{"train.max_steps": 3, "train.precision": "bf16"}) == 0
    best = str(tmp_path / "word_ptb" / "best.pt")
    base = [best, "--data-root", str(tiny_ptb), "--no-progress"]
    own = evaluate_script.run(evaluate_script.parse_args(base))
    fp32 = evaluate_script.run(evaluate_script.parse_args([*base, "--precision", "fp32"]))
    assert own["precision"] == "bf16" and fp32["precision"] == "fp32"
    assert own["loss"] != fp32["loss"] and own["loss"] == pytest.approx(fp32["loss"], rel=0.01)
