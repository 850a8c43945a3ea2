"""Train an LSTM language model on Penn Treebank from a YAML recipe.

    python train.py recipes/char_ptb.yaml [key.path=value ...] [--dry-run] [--resume]

The loop below reads top to bottom: config, data, model, optimizer and schedule, (resume),
then epochs of truncated-BPTT steps with periodic evaluation and checkpoints, and at the end
the best weights scored on the test split. SIGINT/SIGTERM finish the current step, save a
checkpoint and exit 0; ``--resume`` continues from the newest good checkpoint exactly (on CPU
the resumed run's losses equal an uninterrupted run's, step for step).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lm import checkpoint, fileio
from lm.config import Config, load_config, resolve_device
from lm.data import TrainStream, Vocab, load_corpus, prepare_ptb
from lm.errors import CheckpointError, UserError
from lm.evaluation import evaluate, figures, headline
from lm.metrics import MetricsLog
from lm.model import LanguageModel, cross_entropy_sum, detach_state
from lm.optim import EarlyStopping, Schedule, build_optimizer

# Vocabulary sizes of Mikolov's PTB, so that --dry-run can count parameters without the data.
PTB_VOCAB_SIZE = {"word": 10_000, "char": 50}
# Fields that fix the model, its data layout and the batch schedule (a pure function of the
# seed): a checkpoint resumes only into the same ones.
MUST_MATCH = ("data.level", "data.batch_size", "data.bptt", "data.shuffle", "data.carry_state",
              "data.variable_bptt", "model", "optim.name", "train.seed")


class NonFiniteError(UserError):
    pass


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step."""

    def __init__(self):
        self.signum = None

    def __call__(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C: the user wants out now
            raise KeyboardInterrupt
        self.signum = signum

    @contextlib.contextmanager
    def installed(self):
        """Catch SIGINT/SIGTERM while training; put the previous handlers back afterwards."""
        previous = {sig: signal.signal(sig, self) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/char_ptb.yaml")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="override recipe fields, e.g. train.epochs=2 model.hidden_size=256")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in <out_dir>/<run_name> from its newest checkpoint")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and the parameter count, then exit")
    return p.parse_intermixed_args(argv)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def check_resumable(cfg: Config, saved: dict, path: Path) -> None:
    """A checkpoint resumes only into the same model and data; name every field that differs."""
    now, then = flat(cfg.to_dict()), flat(saved)
    diffs = [f"{k} (checkpoint {then.get(k)!r}, now {now.get(k)!r})" for k in sorted(now)
             if any(k == m or k.startswith(m + ".") for m in MUST_MATCH) and now.get(k) != then.get(k)]
    if diffs:
        raise CheckpointError(f"cannot resume from {path}: the recipe differs in "
                              f"{'; '.join(diffs)}; resume with the run's own config.yaml")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        with StopSignal().installed() as stop:
            return train(args, stop)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def train(args, stop: StopSignal) -> int:
    # ---- configuration ------------------------------------------------------------------
    cfg = load_config(args.recipe, args.overrides)
    tc, dc = cfg.train, cfg.data
    if args.dry_run:
        model = LanguageModel(cfg.model, PTB_VOCAB_SIZE[dc.level])
        print(cfg.to_yaml(), end="")
        print(f"# parameters: {model.num_parameters():,}")
        return 0
    device = resolve_device(tc.device)
    run_dir = Path(tc.out_dir) / tc.run_name
    resume_cmd = " ".join(["python train.py", args.recipe, *args.overrides, "--resume"])

    saved, vocab = None, None
    if args.resume:
        saved, path = checkpoint.load_latest(run_dir, warn=lambda m: print(m, file=sys.stderr))
        check_resumable(cfg, saved["config"], path)
        vocab = Vocab.from_dict(saved["vocab"], source=str(path))
        print(f"resuming from {path} (step {saved['progress']['step']})")
    elif checkpoint.numbered(run_dir) or any((run_dir / n).exists() for n in ("last.pt", "best.pt")):
        raise UserError(f"{run_dir} already holds checkpoints; pass --resume to continue that run "
                        f"or choose another train.run_name=NAME")

    # ---- data ---------------------------------------------------------------------------
    seed_everything(tc.seed)
    root = prepare_ptb(dc.root, dc.url, download=dc.download)
    corpus = load_corpus(dc.level, root, vocab=vocab)
    stream = TrainStream(corpus.train, dc.batch_size, dc.bptt, variable_bptt=dc.variable_bptt,
                         shuffle=dc.shuffle, seed=tc.seed)
    eval_bptt = dc.eval_bptt or dc.bptt

    # ---- model, optimizer, schedule -----------------------------------------------------
    model = LanguageModel(cfg.model, len(corpus.vocab)).to(device)
    optimizer = build_optimizer(cfg.optim, model.parameters())
    schedule = Schedule(cfg.optim, optimizer, model)
    stopper = EarlyStopping(tc.patience)
    base_lr = cfg.optim.lr
    progress = {"epoch": 0, "batch": 0, "step": 0, "skipped": 0, "window_loss": 0.0,
                "window_steps": 0, "last_eval": -1, "last_ckpt": -1, "metrics_lines": 0}
    state = None
    if saved is not None:
        checkpoint.load_model_state(model, saved["model"], path)
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        stopper.load_state_dict(saved["early_stopping"])
        progress.update(saved["progress"])
        base_lr = saved["base_lr"]
        state = None if saved["hidden"] is None else [(h.to(device), c.to(device)) for h, c in saved["hidden"]]
        checkpoint.set_rng_state(saved["rng"])
    try:
        if saved is None:
            run_dir.mkdir(parents=True, exist_ok=True)
            fileio.atomic_write_bytes(run_dir / "config.yaml", cfg.to_yaml().encode())
            corpus.vocab.save(run_dir / "vocab.json")
        log = MetricsLog(run_dir, tensorboard=tc.tensorboard,
                         keep_lines=progress["metrics_lines"] if saved else None,
                         purge_step=progress["step"] + 1 if saved else None)
    except OSError as exc:
        raise UserError(f"cannot write the run directory {run_dir}: {exc.strerror or exc}; set "
                        f"train.out_dir to a writable folder") from None
    print(f"run {run_dir}: {dc.level}-level PTB, {model.num_parameters():,} parameters, "
          f"{stream.num_batches(progress['epoch'])} batches/epoch, device {device}")

    def snapshot() -> dict:
        """Everything needed to continue exactly where the loop stands now."""
        log.sync()
        progress["metrics_lines"] = log.lines
        progress["last_ckpt"] = progress["step"]
        return {"format": checkpoint.FORMAT, "config": cfg.to_dict(), "vocab": corpus.vocab.to_dict(),
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "early_stopping": stopper.state_dict(),
                "progress": dict(progress), "base_lr": base_lr, "rng": checkpoint.rng_state(),
                "hidden": None if state is None else [(h.cpu(), c.cpu()) for h, c in state]}

    def save_checkpoint() -> Path:
        return checkpoint.save_training(snapshot(), run_dir, progress["step"], tc.keep_checkpoints)

    def validate() -> bool:
        """Score the validation split; update best.pt, the schedule and early stopping."""
        nonlocal base_lr
        result = evaluate(schedule.eval_model(), corpus.valid, batch_size=dc.eval_batch_size,
                          bptt=eval_bptt, bos_id=corpus.vocab.eos_id, device=device)
        loss = result["loss"]
        progress["last_eval"] = progress["step"]
        log.log(progress["step"], "valid", loss=loss, **figures(loss, dc.level))
        improved = stopper.update(loss)
        if improved:
            checkpoint.save({"format": checkpoint.FORMAT, "config": cfg.to_dict(),
                             "vocab": corpus.vocab.to_dict(),
                             "model": schedule.eval_model().state_dict(),
                             "progress": dict(progress), "valid_loss": loss}, run_dir / "best.pt")
        message = schedule.after_eval(loss)
        base_lr = schedule.lr
        tqdm.write(f"step {progress['step']}: valid loss {loss:.4f}, {headline(loss, dc.level)}"
                   f"{' (best)' if improved else ''}" + (f"; {message}" if message else ""))
        return stopper.should_stop

    def last_good() -> str:
        found = checkpoint.numbered(run_dir)
        return str(found[-1]) if found else "none yet"

    # ---- training loop ------------------------------------------------------------------
    done = False  # early stopping or max_steps
    clip = cfg.optim.clip if cfg.optim.clip > 0 else float("inf")
    params = [p for p in model.parameters() if p.requires_grad]
    while progress["epoch"] < tc.epochs and not done and stop.signum is None:
        epoch = progress["epoch"]
        bar = tqdm(total=stream.num_batches(epoch), initial=progress["batch"], desc=f"epoch {epoch + 1}",
                   disable=not tc.progress, leave=False, dynamic_ncols=True)
        tic, tokens = time.perf_counter(), 0
        for batch in stream.batches(epoch, start=progress["batch"]):
            model.train()
            inp, target = batch.input.to(device), batch.target.to(device)
            state = detach_state(state) if dc.carry_state else None
            logits, state, (raw, dropped) = model(inp, state)
            loss = cross_entropy_sum(logits, target) / target.numel()
            total = loss
            if tc.ar:  # AR: large activations are penalized, after output dropout (AWD-LSTM)
                total = total + tc.ar * dropped.pow(2).mean()
            if tc.tar:  # TAR: fast-changing hidden states are penalized, before dropout
                total = total + tc.tar * (raw[1:] - raw[:-1]).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
            loss_value, grad_norm = torch.stack([loss.detach(), norm]).tolist()  # one device sync
            progress["batch"] += 1
            progress["step"] += 1
            step = progress["step"]
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                if tc.on_nonfinite == "error":
                    raise NonFiniteError(
                        f"non-finite loss or gradient at step {step} (loss {loss_value}, grad norm "
                        f"{grad_norm}); last good checkpoint: {last_good()}; lower optim.lr, set "
                        f"optim.clip, or set train.on_nonfinite=skip")
                progress["skipped"] += 1
                optimizer.zero_grad(set_to_none=True)
                state = None  # the carried state may hold the same non-finite values
                tqdm.write(f"warning: step {step} skipped: non-finite loss or gradient "
                           f"({progress['skipped']} skipped so far)", file=sys.stderr)
            else:
                for group in optimizer.param_groups:  # variable BPTT: lr scaled by length
                    group["lr"] = base_lr * batch.lr_scale
                optimizer.step()
                for group in optimizer.param_groups:
                    group["lr"] = base_lr
                schedule.after_step()
                progress["window_loss"] += loss_value
                progress["window_steps"] += 1
            tokens += target.numel()
            bar.update(1)

            if step % tc.log_every == 0 and progress["window_steps"]:
                mean = progress["window_loss"] / progress["window_steps"]
                progress["window_loss"], progress["window_steps"] = 0.0, 0
                log.log(step, "train", loss=mean, **figures(mean, dc.level), lr=base_lr,
                        grad_norm=grad_norm, skipped=progress["skipped"])
                rate = tokens / max(time.perf_counter() - tic, 1e-9)
                log.scalars(step, "train", tokens_per_s=rate)
                bar.set_postfix_str(f"loss {mean:.3f} {headline(mean, dc.level)} lr {base_lr:.3g} "
                                    f"{rate:,.0f} tok/s")
            if tc.eval_every and step % tc.eval_every == 0:
                done = validate() or done
            if tc.max_steps and step >= tc.max_steps:
                done = True
            if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or stop.signum is not None:
                save_checkpoint()
            if done or stop.signum is not None:
                break
        bar.close()
        if stop.signum is not None:
            break
        if progress["batch"] >= stream.num_batches(epoch):  # the epoch ran to its end
            progress["epoch"], progress["batch"], state = epoch + 1, 0, None
            if not tc.eval_every:
                done = validate() or done
            if not tc.checkpoint_every:
                save_checkpoint()

    if stop.signum is not None:
        if progress["last_ckpt"] != progress["step"]:
            save_checkpoint()
        log.close()
        name = signal.Signals(stop.signum).name
        print(f"{name} received: stopped after step {progress['step']}; checkpoint saved to "
              f"{run_dir / 'last.pt'}. Resume with: {resume_cmd}")
        return 0

    # ---- the end: final validation if the last steps were not scored, then test ---------
    if progress["last_eval"] != progress["step"]:
        validate()
    if progress["last_ckpt"] != progress["step"]:
        save_checkpoint()
    best = checkpoint.load(run_dir / "best.pt", map_location=device)
    checkpoint.load_model_state(model, best["model"], run_dir / "best.pt")
    results = {}
    for split in ("valid", "test"):
        r = evaluate(model, corpus.split(split), batch_size=dc.eval_batch_size, bptt=eval_bptt,
                     bos_id=corpus.vocab.eos_id, device=device)
        results[split] = r
        log.log(progress["step"], split, loss=r["loss"], tokens=r["tokens"], best=True,
                **figures(r["loss"], dc.level))
    log.close()
    print(f"done after {progress['step']} steps. best checkpoint {run_dir / 'best.pt'}: "
          f"valid {headline(results['valid']['loss'], dc.level)}, "
          f"test {headline(results['test']['loss'], dc.level)} "
          f"({results['test']['tokens']:,} test tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
