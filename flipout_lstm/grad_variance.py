"""Gradient variance of shared vs flipout weight noise over mini-batch sizes (Figure 1c).

The experiment (Wen et al. 2018, Figure 1c; Theorem 2): take a language model, switch its
recurrent regularizer to multiplicative Gaussian noise ``W = W̄ ∘ (1 + σ ε)`` on every
layer's hidden-to-hidden matrix (all other dropout off) and never update it. For each
mini-batch size N and each method (``shared``: one ``ΔW`` per mini-batch; ``flipout``: one
base ``ΔŴ`` with per-sequence sign vectors):

* one *repeat*: draw N windows of ``bptt + 1`` tokens at uniformly random offsets of the
  training stream (with replacement, zero initial state), sample the perturbation,
  forward + backward of the mean per-token loss, keep ``dL/dW̄`` of the first layer's
  ``weight_hh`` (4H × H);
* one *estimate*: the unbiased per-weight variance over R repeats, averaged over the H × H
  weights of each gate block (i, f, g, o) — and over all 4H × H weights ("avg");
* E estimates give a confidence interval: mean ± 1.96·sd/√E (for the mean), and the
  2.5 / 97.5 percentiles of the E values (for one estimate).

Theorem 2 predicts Var = α/N + (N-1)/N (β+γ) for shared and α/N + (N-1)/N γ for flipout:
equal at N = 1, flipout on slope -1 in log-log as long as γ ≪ α/N, shared levelling off.

Large batches are split into sub-batches of ``sub_batch`` sequences whose losses are summed
(gradients accumulated as the batch mean). They share one base perturbation: the first
sub-batch draws it, the others call ``sample_noise(n, base=first)``, which keeps ``ΔŴ`` and
draws fresh sign vectors (flipout), or is the very same perturbation (shared), so the result
equals one forward over the whole batch.

Why the R repeats are not batched into one forward: each repeat needs its own base
perturbation, while ``flipout_lstm.nn.LSTM`` applies one base (shared, or flipout's ``ΔŴ``) to the
whole call, and the weight gradient it returns is summed over the batch. Batching repeats
would need a second LSTM implementation with per-group weights; the experiment instead runs
the project's own layer, so it measures the code that trains the models. What is batched:
the N sequences of one repeat (up to ``sub_batch`` at once), and only the recorded weight
requires a gradient, so the backward skips every other parameter's gradient.

Randomness: every (N, estimate) cell has its own data generator seeded from
(seed, N, estimate), shared by both methods (common random numbers: both methods see the
same mini-batches, which sharpens their ratio), and its own noise seed from
(seed, N, method, estimate), so a cell's numbers do not depend on which other batch sizes
were run.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from flipout_lstm.config import (LSTMConfig, ModelConfig, build_section, read_with_overrides,
                       resolve_device, validate as validate_train_config, Config)
from flipout_lstm.errors import ConfigError, DataError, UserError

METHODS = ("shared", "flipout")
GATES = ("i", "f", "g", "o")
SUMMARY_GATES = GATES + ("avg",)
PAPER_BATCH_SIZES = [2 ** k for k in range(14)]  # 1 .. 8192


def _cpu_model() -> ModelConfig:
    """A small word model for runs without a checkpoint on a CPU."""
    return ModelConfig(embedding_size=100, hidden_size=100, num_layers=2)


@dataclass
class GradVarianceConfig:
    """Settings of the experiment; the defaults are the reduced CPU run.

    ``recipes/grad_variance.yaml`` holds the paper's settings.
    """

    checkpoint: Optional[str] = None   # None: a freshly initialized model from ``model``
    level: Literal["word", "char"] = "word"   # corpus level without a checkpoint
    data_root: Optional[str] = None    # None: the checkpoint's data.root, $LM_DATA_ROOT, data/ptb
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])  # paper 1..8192
    repeats: int = 30                  # R: gradients per variance estimate (paper 200)
    estimates: int = 4                 # E: variance estimates per point (paper 50)
    sigma: float = 1.0                 # multiplicative Gaussian noise, W̄ ∘ (1 + σ ε)
    sub_batch: int = 64                # sequences per forward; larger N is split
    bptt: int = 35                     # tokens per sequence
    seed: int = 1234
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    threads: int = 0                   # CPU threads for torch; 0: torch's default
    out_dir: str = "runs/grad_variance"
    model: ModelConfig = field(default_factory=_cpu_model)  # only without a checkpoint


# ----------------------------------------------------------------------------- config

def build_config(raw: Any) -> GradVarianceConfig:
    """Build and validate the config from a plain mapping; ConfigError names the bad key."""
    return validate(build_section(GradVarianceConfig, raw, ""))


def _check(cond: bool, path: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{path}: {msg}")


def validate(cfg: GradVarianceConfig) -> GradVarianceConfig:
    _check(all(n >= 1 for n in cfg.batch_sizes), "batch_sizes",
           f"every batch size must be >= 1, got {cfg.batch_sizes}")
    _check(len(set(cfg.batch_sizes)) == len(cfg.batch_sizes), "batch_sizes",
           f"batch sizes repeat: {cfg.batch_sizes}")
    cfg.batch_sizes = sorted(cfg.batch_sizes)
    _check(cfg.repeats >= 2, "repeats", f"a variance needs at least 2 repeats, got {cfg.repeats}")
    _check(cfg.estimates >= 1, "estimates", f"must be >= 1, got {cfg.estimates}")
    _check(math.isfinite(cfg.sigma) and cfg.sigma > 0, "sigma",
           f"must be a finite noise standard deviation > 0, got {cfg.sigma}")
    _check(cfg.sub_batch >= 1, "sub_batch", f"must be >= 1, got {cfg.sub_batch}")
    _check(cfg.bptt >= 1, "bptt", f"must be >= 1, got {cfg.bptt}")
    _check(cfg.threads >= 0, "threads", f"must be >= 0 (0: torch's default), got {cfg.threads}")
    _check(cfg.device in ("auto", "cpu") or cfg.device.startswith("cuda"), "device",
           f"{cfg.device!r} is not auto, cpu, cuda or cuda:N")
    if cfg.checkpoint is not None:
        _check(bool(cfg.checkpoint.strip()), "checkpoint",
               "is empty; give the path of a .pt file or null for a freshly initialized model")
    _check(bool(cfg.out_dir), "out_dir", "is empty; give a folder for results.json / results.csv")
    # The model section's own range checks (positive sizes, ...), reported as model.<key>.
    validate_train_config(Config(model=cfg.model))
    return cfg


def load_config(recipe: Optional[str], overrides=()) -> GradVarianceConfig:
    return build_config(read_with_overrides(recipe, overrides, GradVarianceConfig))


def config_dict(cfg: GradVarianceConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


# ----------------------------------------------------------------------------- model and data


def experiment_model_config(model_cfg: ModelConfig, method: str, sigma: float) -> ModelConfig:
    """The same architecture with σ-Gaussian noise on W_hh (shared or flipout), no dropout."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    return dataclasses.replace(
        model_cfg, embedding_dropout=0.0, input_dropout=0.0, layer_dropout=0.0,
        output_dropout=0.0, lstm=LSTMConfig(weight_noise=float(sigma), flipout=method == "flipout"))


def build_models(model_cfg: ModelConfig, state_dict: dict, vocab_size: int, sigma: float,
                 device) -> dict:
    """``{method: LanguageModel}`` with identical weights; only ``layers[0].weight_hh_l0``
    requires a gradient. Models are in training mode (the noise acts only there)."""
    from flipout_lstm.checkpoint import load_model_state
    from flipout_lstm.model import LanguageModel

    models = {}
    for method in METHODS:
        model = LanguageModel(experiment_model_config(model_cfg, method, sigma), vocab_size)
        load_model_state(model, state_dict, "the model weights")
        model.to(device)
        for p in model.parameters():
            p.requires_grad_(False)
        recorded_weight(model).requires_grad_(True)
        model.train()
        models[method] = model
    return models


def recorded_weight(model) -> torch.Tensor:
    """The first layer's hidden-to-hidden matrix, (4H, H), gate blocks i, f, g, o."""
    return model.layers[0].weight_hh_l0


def sample_windows(stream: torch.Tensor, n: int, bptt: int, gen: torch.Generator) -> torch.Tensor:
    """(bptt + 1, n) token ids: n windows at uniform random offsets (with replacement)."""
    if stream.numel() < bptt + 1:
        raise UserError(f"the training stream has {stream.numel()} tokens, fewer than "
                        f"bptt + 1 = {bptt + 1}; lower bptt")
    starts = torch.randint(0, stream.numel() - bptt, (n,), generator=gen)
    return stream[starts.unsqueeze(0) + torch.arange(bptt + 1).unsqueeze(1)]


def batch_gradient(model, windows: torch.Tensor, sub_batch: int) -> torch.Tensor:
    """``dL/dW̄`` of the recorded weight for one mini-batch with one fresh perturbation.

    ``L`` is the mean per-token loss of the whole batch; sub-batches of ``sub_batch``
    sequences share the first one's base perturbation (see the module docstring).
    """
    from flipout_lstm.model import cross_entropy_sum

    weight = recorded_weight(model)
    weight.grad = None
    inp, target = windows[:-1], windows[1:]
    T, N = inp.shape
    first = None
    for start in range(0, N, sub_batch):
        x, y = inp[:, start:start + sub_batch], target[:, start:start + sub_batch]
        n = x.size(1)
        if first is None:
            noise = first = [layer.sample_noise(n) for layer in model.layers]
        else:
            noise = [layer.sample_noise(n, base=b) for layer, b in zip(model.layers, first)]
        logits, _, _ = model(x, None, noise)
        loss = cross_entropy_sum(logits, y) / (T * N)
        loss.backward()
    grad = weight.grad
    weight.grad = None
    return grad


def _cell_seed(seed: int, *parts: int) -> int:
    """A deterministic 63-bit seed for one cell of the experiment."""
    h = seed & 0xFFFFFFFFFFFFFFFF
    for p in parts:
        h = (h * 6364136223846793005 + 1442695040888963407 + p * 0x9E3779B97F4A7C15) \
            & 0xFFFFFFFFFFFFFFFF
    return h >> 1


def gate_variances(model, stream: torch.Tensor, n: int, cfg: GradVarianceConfig,
                   data_seed: int, noise_seed: int, device) -> torch.Tensor:
    """One estimate: per-weight variance over R repeats, averaged per gate block -> (4,)."""
    gen = torch.Generator().manual_seed(data_seed)
    torch.manual_seed(noise_seed)
    s1 = s2 = shift = None
    for _ in range(cfg.repeats):
        windows = sample_windows(stream, n, cfg.bptt, gen).to(device)
        g = batch_gradient(model, windows, cfg.sub_batch).double()
        if shift is None:  # shifted sums: exact in float64 without storing R gradients
            shift = g.clone()
            s1, s2 = torch.zeros_like(g), torch.zeros_like(g)
        d = g.sub_(shift)
        s1.add_(d)
        s2.addcmul_(d, d)
    R = cfg.repeats
    var = (s2 - s1 * s1 / R) / (R - 1)
    return var.clamp_min_(0).view(4, -1).mean(1).cpu()


# ----------------------------------------------------------------------------- statistics


def summarize(values: list) -> dict:
    """Mean, sd, a 95% CI of the mean (mean ± 1.96 sd/√E) and 2.5/97.5 percentiles."""
    t = torch.tensor(values, dtype=torch.float64)
    E = t.numel()
    mean = t.mean().item()
    sd = t.std(unbiased=True).item() if E > 1 else float("nan")
    half = 1.96 * sd / math.sqrt(E) if E > 1 else float("nan")
    return {"mean": mean, "sd": sd, "ci_lo": mean - half, "ci_hi": mean + half,
            "p2_5": torch.quantile(t, 0.025).item(), "p97_5": torch.quantile(t, 0.975).item(),
            "n": E}


def loglog_slope(ns, vs) -> float:
    """Least-squares slope of log v against log N (nan with fewer than 2 usable points)."""
    pts = [(math.log(n), math.log(v)) for n, v in zip(ns, vs) if v > 0 and math.isfinite(v)]
    if len(pts) < 2 or len({x for x, _ in pts}) < 2:
        return float("nan")
    xm = sum(x for x, _ in pts) / len(pts)
    ym = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - xm) ** 2 for x, _ in pts)
    return sum((x - xm) * (y - ym) for x, y in pts) / sxx


def slopes(batch_sizes, raw: dict) -> dict:
    """Per method and gate: the slope fitted to the mean variances, and a CI from the E
    per-estimate slopes (estimates at different N are independent)."""
    out = {}
    for method in METHODS:
        out[method] = {}
        for k, gate in enumerate(SUMMARY_GATES):
            def value(n, e):
                est = raw[method][n][e]
                return sum(est) / 4 if gate == "avg" else est[k]
            E = min(len(raw[method][n]) for n in batch_sizes)
            means = [sum(value(n, e) for e in range(E)) / E for n in batch_sizes]
            per = [loglog_slope(batch_sizes, [value(n, e) for n in batch_sizes]) for e in range(E)]
            s = summarize(per) if all(math.isfinite(p) for p in per) else {}
            out[method][gate] = {"slope": loglog_slope(batch_sizes, means),
                                 "ci_lo": s.get("ci_lo", float("nan")),
                                 "ci_hi": s.get("ci_hi", float("nan"))}
    return out


# ----------------------------------------------------------------------------- running


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def prepare(cfg: GradVarianceConfig, device):
    """Model config, weights, vocabulary size, training stream and a description of the model."""
    from flipout_lstm.model import LanguageModel

    if cfg.checkpoint is not None:
        model_cfg, state, corpus, source = _from_checkpoint(cfg)
    else:
        model_cfg, state, corpus = cfg.model, None, _fresh_corpus(cfg)
        source = {"kind": "fresh-init", "path": None, "step": None,
                  "label": f"FRESHLY INITIALIZED model (checkpoint: null, seed {cfg.seed}); "
                           f"not the paper's partially trained model"}
        torch.manual_seed(cfg.seed)
        state = LanguageModel(model_cfg, len(corpus.vocab)).state_dict()
    source.update(level=corpus.level, corpus=corpus.description, vocab_size=len(corpus.vocab),
                  hidden_size=model_cfg.hidden_size, num_layers=model_cfg.num_layers,
                  embedding_size=model_cfg.embedding_size, train_tokens=corpus.train.numel())
    return model_cfg, state, len(corpus.vocab), corpus.train, source


def _from_checkpoint(cfg: GradVarianceConfig):
    """A trained model and the training split it was trained on.

    The corpus is the checkpoint's own (its ``data`` section: PTB, text files or a dataset)
    encoded by its own tokenizer, so the ids are the ones the weights were trained on; only
    ``data_root`` (PTB's folder) may move it.
    """
    from flipout_lstm.data import open_corpus
    from flipout_lstm.trained import load_trained

    trained = load_trained(cfg.checkpoint)
    ckpt, train_cfg = trained.ckpt, trained.config
    if cfg.data_root:
        train_cfg.data.root = cfg.data_root
    with _data_root_advice():
        corpus = open_corpus(train_cfg.data, saved=ckpt, source=cfg.checkpoint, splits=("train",))
    step = ckpt.get("progress", {}).get("step")
    source = {"kind": "checkpoint", "path": cfg.checkpoint, "step": step,
              "label": f"checkpoint {cfg.checkpoint}" + (f" (step {step})" if step else "")}
    return train_cfg.model, trained.model.state_dict(), corpus, source


def _fresh_corpus(cfg: GradVarianceConfig):
    """PTB at ``level``, for a freshly initialized model (no checkpoint to say otherwise)."""
    from flipout_lstm.config import DataConfig
    from flipout_lstm.data import open_corpus

    with _data_root_advice():
        return open_corpus(DataConfig(level=cfg.level, root=cfg.data_root, download=False))


@contextlib.contextmanager
def _data_root_advice():
    """A missing corpus is advised in this experiment's own key (``data_root``), not the
    training recipe's ``data.root``, which its config does not take (nor ``data.download``)."""
    from flipout_lstm.data.ptb import for_command

    try:
        yield
    except DataError as exc:
        raise for_command(exc, "data_root") from None


def run(cfg: GradVarianceConfig, *, quiet: bool = False) -> dict:
    """Run the experiment; return the results (also what results.json holds)."""
    device = resolve_device(cfg.device)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, device, quiet)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: GradVarianceConfig, device, quiet: bool) -> dict:
    model_cfg, state, vocab_size, stream, source = prepare(cfg, device)
    models = build_models(model_cfg, state, vocab_size, cfg.sigma, device)
    _log(f"model: {source['label']}; device {device}", quiet)
    raw = {m: {} for m in METHODS}
    timing = {}
    for n in cfg.batch_sizes:
        tic = time.perf_counter()
        for mi, method in enumerate(METHODS):
            raw[method][n] = []
            for e in range(cfg.estimates):
                v = gate_variances(models[method], stream, n, cfg,
                                   data_seed=_cell_seed(cfg.seed, n, e),
                                   noise_seed=_cell_seed(cfg.seed, n, e, mi + 1), device=device)
                raw[method][n].append(v.tolist())
        timing[n] = time.perf_counter() - tic
        _log(f"N={n}: {timing[n]:.1f}s", quiet)
    rows = []
    for n in cfg.batch_sizes:
        for k, gate in enumerate(SUMMARY_GATES):
            row = {"batch_size": n, "gate": gate}
            for method in METHODS:
                vals = [sum(est) / 4 if gate == "avg" else est[k] for est in raw[method][n]]
                for key, val in summarize(vals).items():
                    if key != "n":
                        row[f"{method}_{key}"] = val
            row["ratio"] = row["shared_mean"] / row["flipout_mean"]
            rows.append(row)
    return {"experiment": "gradient variance (Wen et al. 2018, Figure 1c)",
            "model": source, "recorded": "layers[0].weight_hh_l0 (4H x H; gates i, f, g, o)",
            "config": config_dict(cfg), "device": str(device),
            "estimates": cfg.estimates, "repeats": cfg.repeats,
            "rows": rows, "slopes": slopes(cfg.batch_sizes, raw),
            "raw": {m: {str(n): v for n, v in raw[m].items()} for m in METHODS},
            "seconds_per_batch_size": {str(n): t for n, t in timing.items()}}


# ----------------------------------------------------------------------------- output


def _fmt(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.3e}"


def _cell(row: dict, method: str) -> str:
    lo, hi = row[f"{method}_ci_lo"], row[f"{method}_ci_hi"]
    ci = f" [{_fmt(lo)}, {_fmt(hi)}]" if math.isfinite(lo) else " [n/a]"
    return _fmt(row[f"{method}_mean"]) + ci


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [f"# Gradient variance, {result['recorded']}",
             f"model: {result['model']['label']}",
             f"sigma={cfg['sigma']} (multiplicative Gaussian on W_hh), bptt={cfg['bptt']}, "
             f"R={cfg['repeats']} repeats per estimate, E={cfg['estimates']} estimates, "
             f"sub_batch={cfg['sub_batch']}; [95% CI of the mean over the E estimates]",
             "",
             "| batch size | gate | shared var mean [CI] | flipout var mean [CI] | shared/flipout |",
             "|---:|:---:|---|---|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['batch_size']} | {row['gate']} | {_cell(row, 'shared')} | "
                     f"{_cell(row, 'flipout')} | {row['ratio']:.2f} |")
    lines += ["", "Fitted log-log slopes (variance vs batch size; ideal 1/N is -1) "
              "[95% CI from per-estimate fits]:", ""]
    lines += ["| method | " + " | ".join(SUMMARY_GATES) + " |",
              "|---|" + "---|" * len(SUMMARY_GATES)]
    for method in METHODS:
        cells = []
        for gate in SUMMARY_GATES:
            s = result["slopes"][method][gate]
            ci = (f" [{s['ci_lo']:.2f}, {s['ci_hi']:.2f}]" if math.isfinite(s["ci_lo"]) else "")
            cells.append(f"{s['slope']:.3f}{ci}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _finite_or_none(obj):
    """NaN / inf (e.g. a CI from E = 1 estimate) become null: results.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def plot(result: dict, path: Path) -> None:
    """Figure 1c: variance against batch size on log-log axes, one panel per gate block,
    shared and flipout with their 95% CIs, and a slope -1 line through flipout at N = 1."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed, and never one picked up by accident
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(GATES), figsize=(3.6 * len(GATES), 3.4), sharey=True)
    for ax, gate in zip(axes, GATES):
        rows = [r for r in result["rows"] if r["gate"] == gate]
        ns = [r["batch_size"] for r in rows]
        for method, colour in zip(METHODS, ("tab:red", "tab:blue")):
            mean = [r[f"{method}_mean"] for r in rows]
            lo = [r[f"{method}_ci_lo"] for r in rows]
            hi = [r[f"{method}_ci_hi"] for r in rows]
            slope = result["slopes"][method][gate]["slope"]
            ax.plot(ns, mean, "o-", color=colour, ms=3, label=f"{method} (slope {slope:.2f})")
            if all(math.isfinite(x) for x in lo + hi):
                ax.fill_between(ns, lo, hi, color=colour, alpha=0.2)
        v1 = rows[0]["flipout_mean"]
        ax.plot(ns, [v1 * ns[0] / n for n in ns], "k:", lw=1, label="1/N")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"gate {gate}")
        ax.set_xlabel("mini-batch size N")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("gradient variance of W_hh (layer 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_outputs(result: dict, out_dir) -> tuple[Path, Path]:
    """results.json (everything, strict JSON), results.csv (the table rows) and variance.png."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        jpath, cpath = out / "results.json", out / "results.csv"
        jpath.write_text(json.dumps(_finite_or_none(result), indent=1, allow_nan=False) + "\n", encoding="utf-8")
        fields = list(result["rows"][0].keys())
        with open(cpath, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(result["rows"])
        plot(result, out / "variance.png")
    except OSError as exc:
        raise UserError(f"cannot write results to {out}: {exc.strerror or exc}; "
                        f"set out_dir=FOLDER to a writable folder") from None
    return jpath, cpath
