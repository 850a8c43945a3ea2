"""The gradient-variance experiment (Figure 1c): config, sub-batching, statistics, CLI.

The statistical tests run one small experiment (tiny synthetic corpus, a freshly
initialized 1-layer LSTM with 16 units, fixed seeds) and check Theorem 2's predictions:
equal variance at N = 1, slope -1 for flipout, shared levelling off above flipout.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flipout_lstm import checkpoint
from flipout_lstm import grad_variance as gv
from flipout_lstm.errors import ConfigError
from conftest import run_main

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = {"embedding_size": 16, "hidden_size": 16, "num_layers": 1}


def tiny_cfg(root, **kw):
    raw = dict(checkpoint=None, data_root=str(root), batch_sizes=[1, 2, 4], repeats=5,
               estimates=2, sub_batch=8, bptt=20, seed=0, device="cpu", model=dict(TINY_MODEL))
    raw.update(kw)
    return gv.build_config(raw)


# ----------------------------------------------------------------------------- config


def test_defaults_and_recipe_validate():
    cfg = gv.load_config(str(REPO / "recipes" / "grad_variance.yaml"))
    assert cfg.batch_sizes == [2 ** k for k in range(14)]
    assert (cfg.repeats, cfg.estimates, cfg.sigma, cfg.sub_batch, cfg.bptt) == (200, 50, 1.0, 64, 35)
    assert cfg.checkpoint is not None
    cfg = gv.load_config(str(REPO / "recipes" / "grad_variance.yaml"),
                         ["checkpoint=null", "batch_sizes=[8,1,2]", "repeats=20",
                          "model.hidden_size=32"])
    assert cfg.checkpoint is None and cfg.batch_sizes == [1, 2, 8] and cfg.repeats == 20
    assert cfg.model.hidden_size == 32


@pytest.mark.parametrize("raw, words", [
    ({"repeat": 3}, ["repeat", "repeats"]),
    ({"repeats": "many"}, ["repeats", "integer"]),
    ({"repeats": 1}, ["repeats"]),
    ({"sigma": 0}, ["sigma"]),
    ({"batch_sizes": [1, "2"]}, ["batch_sizes[1]"]),
    ({"batch_sizes": [0, 2]}, ["batch_sizes"]),
    ({"model": {"hiden_size": 3}}, ["model.hiden_size", "hidden_size"]),
    ({"model": {"hidden_size": -3}}, ["model.hidden_size"]),
    ({"device": "tpu"}, ["device"]),
])
def test_bad_config_is_one_line_naming_the_key(raw, words):
    with pytest.raises(ConfigError) as info:
        gv.build_config(raw)
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_bad_override_names_the_key():
    with pytest.raises(ConfigError, match="estimatez"):
        gv.load_config(None, ["estimatez=3"])
    with pytest.raises(ConfigError, match="model.lstm.flipot"):
        gv.load_config(None, ["model.lstm.flipot=true"])


def test_experiment_model_has_only_the_weight_noise():
    cfg = gv.experiment_model_config(gv._cpu_model(), "flipout", 1.0)
    assert cfg.lstm.weight_noise == 1.0 and cfg.lstm.flipout
    assert cfg.lstm.weight_drop == 0 and cfg.output_dropout == 0 and cfg.embedding_dropout == 0
    assert not gv.experiment_model_config(gv._cpu_model(), "shared", 1.0).lstm.flipout


# ----------------------------------------------------------------------------- mechanics


def _tiny_models(tiny_ptb, layers=2):
    model_cfg = gv.ModelConfig(**{**TINY_MODEL, "num_layers": layers})
    from flipout_lstm.config import DataConfig
    from flipout_lstm.data import open_corpus
    from flipout_lstm.model import LanguageModel
    corpus = open_corpus(DataConfig(level="word", root=str(tiny_ptb), download=False))
    state = LanguageModel(model_cfg, len(corpus.vocab)).state_dict()
    models = gv.build_models(model_cfg, state, len(corpus.vocab), 1.0, torch.device("cpu"))
    return models, corpus.train


def test_only_the_recorded_weight_gets_a_gradient(tiny_ptb):
    models, stream = _tiny_models(tiny_ptb)
    model = models["flipout"]
    windows = gv.sample_windows(stream, 5, 10, torch.Generator().manual_seed(0))
    assert windows.shape == (11, 5)
    g = gv.batch_gradient(model, windows, 64)
    assert g.shape == (64, 16) and torch.isfinite(g).all() and g.abs().sum() > 0
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["layers.0.weight_hh_l0"]


def test_shared_sub_batches_equal_one_batch(tiny_ptb):
    # Shared noise: the sub-batches reuse the first one's perturbation and draw nothing
    # else, so with the same seed the split batch gives the one-forward gradient.
    models, stream = _tiny_models(tiny_ptb)
    windows = gv.sample_windows(stream, 12, 10, torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    whole = gv.batch_gradient(models["shared"], windows, 64)
    torch.manual_seed(5)
    split = gv.batch_gradient(models["shared"], windows, 5)  # 5 + 5 + 2
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-9)


def test_flipout_sub_batches_share_the_base_with_fresh_signs(tiny_ptb, monkeypatch):
    models, stream = _tiny_models(tiny_ptb)
    model = models["flipout"]
    drawn = []
    for layer in model.layers:
        original = layer.sample_noise

        def record(n, *, base=None, _orig=original, **kw):
            noise = _orig(n, base=base, **kw)
            drawn.append((noise, base))
            return noise
        monkeypatch.setattr(layer, "sample_noise", record)
    windows = gv.sample_windows(stream, 12, 10, torch.Generator().manual_seed(2))
    gv.batch_gradient(model, windows, 4)
    assert len(drawn) == 3 * 2  # 3 sub-batches x 2 layers
    firsts = [noise for noise, base in drawn[:2]]
    assert all(base is None for _, base in drawn[:2])
    for k, (noise, base) in enumerate(drawn[2:]):
        assert base is firsts[k % 2]
        ln, ln0 = noise.layers[0], base.layers[0]
        assert torch.equal(ln.hh_delta, ln0.hh_delta)          # one base perturbation
        assert not torch.equal(ln.hh_r, ln0.hh_r)              # fresh signs per sub-batch


def test_variance_estimate_matches_a_direct_computation(tiny_ptb, monkeypatch):
    # gate_variances' shifted float64 sums == torch.var over the stored gradients.
    models, stream = _tiny_models(tiny_ptb, layers=1)
    cfg = gv.build_config(dict(repeats=6, bptt=8, sub_batch=64))
    grads = []
    real = gv.batch_gradient
    monkeypatch.setattr(gv, "batch_gradient",
                        lambda *a: grads.append(real(*a).double()) or grads[-1].clone())
    v = gv.gate_variances(models["flipout"], stream, 3, cfg, 1, 2, torch.device("cpu"))
    direct = torch.stack(grads).var(0, unbiased=True).view(4, -1).mean(1)
    torch.testing.assert_close(v, direct, rtol=1e-9, atol=0)


def test_loglog_slope():
    assert gv.loglog_slope([1, 2, 4, 8], [8, 4, 2, 1]) == pytest.approx(-1)
    assert math.isnan(gv.loglog_slope([1], [1.0]))


# ----------------------------------------------------------------------------- statistics


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """N = 1, 4, 16, 64, R = 40 repeats, E = 8 estimates, sub-batches of 32 (N = 64 is split: the
    largest batch's variance is measured through sub-batches, as the real experiment's are).

    One thread: these tiny matrices are faster without intra-op parallelism.
    """
    from conftest import write_tiny_ptb
    root = write_tiny_ptb(tmp_path_factory.mktemp("gv") / "ptb")
    cfg = tiny_cfg(root, batch_sizes=[1, 4, 16, 64], repeats=40, estimates=8,
                   sub_batch=32, bptt=12, threads=1)
    return gv.run(cfg, quiet=True)


def _row(result, n, gate):
    return next(r for r in result["rows"] if r["batch_size"] == n and r["gate"] == gate)


@pytest.mark.parametrize("gate", gv.SUMMARY_GATES)
def test_equal_variance_at_batch_size_one(experiment, gate):
    # At N = 1 flipout's ΔŴ∘(r sᵀ) has exactly ΔŴ's distribution, so both methods estimate
    # the same variance. Each mean is over E = 8 independent estimates; its standard error is
    # sd/√E. The methods see the same mini-batches (common random numbers), which correlates
    # them positively, so sqrt(se_s² + se_f²) over-states the sd of the difference: a
    # 4-standard-error bound has a false-alarm rate well under 1% (t with ~14 dof: ~0.1%).
    r = _row(experiment, 1, gate)
    E = experiment["estimates"]
    se = math.sqrt((r["shared_sd"] ** 2 + r["flipout_sd"] ** 2) / E)
    assert abs(r["shared_mean"] - r["flipout_mean"]) <= 4 * se
    assert 0.75 < r["ratio"] < 1.33  # and the bound is not vacuous


def test_flipout_slope_is_minus_one(experiment):
    # Theorem 2: Var_flipout = α/N + (N-1)/N γ, with γ ≪ α/64 here, so the log-log slope
    # over N = 1..64 is -1 up to estimation noise. Noise: one estimate from R = 40 repeats
    # has a relative sd of about sqrt(2/(R-1)) ≈ 0.23 (Gaussian gradients; heavier tails add
    # some), the mean of E = 8 about 0.08, i.e. 0.08 in log; with 4 points at
    # log N = 0, ln 4, ln 16, ln 64 (Sxx ≈ 9.6) the fitted slope's sd is about
    # 0.08/√9.6 ≈ 0.026 (the per-estimate fits put it nearer 0.01). ±0.1 (±0.12 for one gate)
    # is about 4 sd or more, so it does not fail by chance, yet excludes shared's slope
    # (about -0.86). (How sub-batches draw, one base ΔŴ and fresh signs, is tested directly
    # above.) Jensen's bias of the log is the same at every N (same R), so it shifts the
    # intercept, not the slope.
    s = experiment["slopes"]["flipout"]
    assert abs(s["avg"]["slope"] + 1) < 0.1
    for gate in gv.GATES:
        assert abs(s[gate]["slope"] + 1) < 0.12
    assert experiment["slopes"]["shared"]["avg"]["slope"] > -0.92


def test_shared_levels_off_above_flipout(experiment):
    # Shared keeps a (N-1)/N β term that flipout removes: at the largest N its variance is
    # clearly (CIs disjoint, factor > 1.5) above flipout's.
    r = _row(experiment, 64, "avg")
    assert r["shared_ci_lo"] > r["flipout_ci_hi"]
    assert r["ratio"] > 1.5
    for gate in gv.GATES:
        assert _row(experiment, 64, gate)["ratio"] > 1.3


# ----------------------------------------------------------------------------- CLI


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "grad_variance.py"), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_writes_results_and_prints_table(tiny_ptb, tmp_path):
    out = tmp_path / "out"
    p = run_main("grad_variance.py", str(REPO / "recipes" / "grad_variance.yaml"), "checkpoint=null",
             f"data_root={tiny_ptb}", f"out_dir={out}", "batch_sizes=[1,4]", "repeats=3",
             "estimates=2", "bptt=10", "sub_batch=2", "model.embedding_size=8",
             "model.hidden_size=8", "model.num_layers=1", "threads=1", "--quiet")
    assert p.returncode == 0, p.stderr
    assert "| batch size | gate | shared var mean [CI] | flipout var mean [CI] | shared/flipout |" \
        in p.stdout
    assert "FRESHLY INITIALIZED" in p.stdout and "Fitted log-log slopes" in p.stdout
    result = json.loads((out / "results.json").read_text())
    assert result["model"]["kind"] == "fresh-init"
    assert len(result["rows"]) == 2 * len(gv.SUMMARY_GATES)
    assert len(result["raw"]["flipout"]["4"]) == 2
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("batch_size,gate,shared_mean")
    assert len(csv_lines) == 1 + 2 * len(gv.SUMMARY_GATES)
    png = (out / "variance.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert f"wrote {out / 'results.json'}" in p.stdout and "variance.png" in p.stdout


def test_cli_reads_a_checkpoint(tiny_ptb, tmp_path):
    from flipout_lstm.config import Config, DataConfig, ModelConfig
    from flipout_lstm.data import open_corpus
    from flipout_lstm.model import LanguageModel
    corpus = open_corpus(DataConfig(level="word", root=str(tiny_ptb), download=False))
    cfg = Config()
    cfg.data.level, cfg.data.root = "word", str(tiny_ptb)
    cfg.model = ModelConfig(embedding_size=8, hidden_size=8, num_layers=2)
    cfg.model.lstm.weight_drop, cfg.model.lstm.flipout = 0.5, True  # trained as WD+flipout
    model = LanguageModel(cfg.model, len(corpus.vocab))
    path = tmp_path / "best.pt"
    checkpoint.save({"format": checkpoint.FORMAT, "config": cfg.to_dict(),
                     "vocab": corpus.vocab.to_dict(), "model": model.state_dict(),
                     "progress": {"step": 7}}, path)
    out = tmp_path / "out"
    p = run_main("grad_variance.py", str(REPO / "recipes" / "grad_variance.yaml"), f"checkpoint={path}",
             f"out_dir={out}", "batch_sizes=[1,2]", "repeats=3", "estimates=1", "bptt=6",
             "threads=1", "--quiet")
    assert p.returncode == 0, p.stderr
    assert f"checkpoint {path} (step 7)" in p.stdout
    result = json.loads((out / "results.json").read_text())
    assert result["model"]["kind"] == "checkpoint" and result["model"]["hidden_size"] == 8
    assert "n/a" in p.stdout  # E = 1: no confidence interval


def test_a_checkpoint_is_measured_on_its_own_corpus_and_tokenizer(tmp_path, monkeypatch):
    """A run on text files at the character level is measured on those files, with its own
    character vocabulary, not on PTB (which is nowhere to be found here)."""
    import train as train_script
    from test_corpora import raw_chars, text_overrides, write_text_corpus

    files = write_text_corpus(tmp_path / "corpus")
    settings = {"data.level": "char", "data.batch_size": 4, "data.bptt": 10,
                "data.eval_batch_size": 4, "model.hidden_size": 8, "model.embedding_size": 8,
                "train.max_steps": 2, "train.eval_every": 2, "train.progress": "false",
                "train.tensorboard": "false", "train.out_dir": tmp_path / "runs", "train.run_name": "text"}
    assert train_script.main([str(REPO / "recipes" / "word_ptb.yaml"),
                              *text_overrides(files, tmp_path / "cache", **settings)]) == 0
    monkeypatch.setenv("LM_DATA_ROOT", str(tmp_path / "no_ptb_here"))
    monkeypatch.chdir(tmp_path)  # no data/ptb either
    best = tmp_path / "runs" / "text" / "best.pt"
    cfg = gv.build_config(dict(checkpoint=str(best), batch_sizes=[1, 2], repeats=2, estimates=1,
                               bptt=5, sub_batch=2, device="cpu", seed=0))
    model = gv.run(cfg, quiet=True)["model"]
    itos = checkpoint.load(best)["vocab"]["itos"]
    assert model["vocab_size"] == len(itos) and model["level"] == "char"
    assert model["train_tokens"] == raw_chars(files["train"])  # one token per character and line end
    assert "text files" in model["corpus"]


def test_a_missing_corpus_is_advised_with_the_data_root_key(tmp_path, capsys):
    """The experiment's own key for PTB's folder is data_root, not the recipe's data.root."""
    rc = _main(str(REPO / "recipes" / "grad_variance.yaml"), "checkpoint=null",
               f"data_root={tmp_path / 'nowhere'}", f"out_dir={tmp_path / 'out'}")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert "set data_root (which takes precedence over $LM_DATA_ROOT)" in err and "data.root" not in err


def _main(*args):
    """grad_variance.main() in this process (no interpreter start-up per call)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("grad_variance_cli", REPO / "grad_variance.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli.main(list(args))


@pytest.mark.parametrize("override, words", [
    ("repeatz=3", "repeatz"),
    ("repeats=abc", "repeats"),
    ("batch_sizes=[1,-2]", "batch_sizes"),
    ("model.hidden_size=0", "model.hidden_size"),
    ("checkpoint=/nonexistent/best.pt", "not found"),
])
def test_bad_config_exits_2_with_one_line(tmp_path, capsys, override, words):
    rc = _main(str(REPO / "recipes" / "grad_variance.yaml"), override, f"out_dir={tmp_path}")
    out, err = capsys.readouterr()
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0]
    assert out == ""


def test_cli_bad_config_exit_status_2(tmp_path):
    p = _cli(str(REPO / "recipes" / "grad_variance.yaml"), "repeatz=3", f"out_dir={tmp_path}")
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [
        "error: override of unknown config key 'repeatz' (did you mean 'repeats'?)"]
    rc = _main(str(tmp_path / "nope.yaml"))
    assert rc == 2
