"""Train an LSTM language model on Penn Treebank from a YAML recipe.

    python train.py recipes/char_ptb.yaml [key.path=value ...] [--dry-run] [--resume]
    torchrun --nproc_per_node=N train.py recipes/char_ptb.yaml [...]   # data-parallel (DDP)

The loop below reads top to bottom: config, data, model, optimizer and schedule, (resume),
then epochs of truncated-BPTT steps with periodic evaluation and checkpoints, and at the end
the best weights scored on the test split. SIGINT/SIGTERM finish the current step, save a
checkpoint and exit 0 (a second one stops at once, exit 128+N, the newest checkpoint whole);
one process at a time holds a run directory (flipout_lstm/runlock.py); ``--resume`` continues from the
newest good checkpoint exactly (on CPU the resumed run's losses equal an uninterrupted run's,
step for step). Under torchrun the same
loop runs in every process, each on its share of the global batch (see flipout_lstm/distributed.py).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from flipout_lstm import (checkpoint, distributed, fileio, heap, precision, resume, runlock,
                          training_state)
from flipout_lstm.config import Config, load_config, resolve_device
from flipout_lstm.data import TrainStream, open_corpus
from flipout_lstm.errors import UserError, exit_status
from flipout_lstm.evaluation import eval_warmup, evaluate, raw_bpc
from flipout_lstm.metrics import MetricsLog, NullLog, provenance, write_run_summary
from flipout_lstm.model import Columns, LanguageModel, detach_state, training_loss
from flipout_lstm.optim import EarlyStopping, Schedule, build_optimizer
from flipout_lstm.scores import figures, headline
from flipout_lstm.seeds import seed_everything
from flipout_lstm.signals import StopNow, StopSignal
from flipout_lstm.training_state import TrainingState, as_cpu

# Vocabulary sizes of Mikolov's PTB, so that --dry-run can count parameters without the data.
PTB_VOCAB_SIZE = {"word": 10_000, "char": 50}


class NonFiniteError(UserError):
    pass


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/char_ptb.yaml")
    p.add_argument("overrides", nargs="*", default=[], metavar="key.path=value",  # optional
                   help="override recipe fields, e.g. train.epochs=2 model.hidden_size=256")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in <out_dir>/<run_name> from its newest checkpoint")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and the parameter count, then exit")
    return p.parse_intermixed_args(argv)


def dry_run_parameters(cfg: Config) -> str:
    """The parameter count before any data is read. PTB's vocabulary sizes are known and a
    sentencepiece vocabulary has ``data.vocab_size`` entries; any other vocabulary is built from
    the training split, so the count is given as ``a + b per vocabulary entry`` (it is affine
    in the vocabulary size V: the embedding and decoder rows)."""
    dc = cfg.data
    if dc.level == "subword":
        size = dc.vocab_size
    elif dc.source == "ptb" and dc.min_count is None:
        size = PTB_VOCAB_SIZE[dc.level]
    else:
        one, two = (LanguageModel(cfg.model, v).num_parameters() for v in (1, 2))
        return (f"{2 * one - two:,} + {two - one:,} per vocabulary entry (the vocabulary is "
                f"built from the training split when the run starts)")
    return f"{LanguageModel(cfg.model, size).num_parameters():,}"


@contextlib.contextmanager
def quiet_unless(speak: bool):
    """Under DDP rank 0 alone prints; the other ranks' stdout and stderr go nowhere (their
    errors are still printed, after this block restores stderr)."""
    if speak:
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), \
            contextlib.redirect_stderr(null):
        yield


def main(argv=None) -> int:
    args = parse_args(argv)
    stop = StopSignal()
    ended = False  # train() returned on this rank, so it returns on every rank
    try:
        ctx = distributed.from_env()  # rank 0 of 1 unless started by torchrun
        # `held`: what the run holds until it ends, however it ends (the run directory's lock).
        with stop.installed(), contextlib.ExitStack() as held, quiet_unless(ctx.main):
            status = train(args, stop, ctx, held)
        ended = True
        return status
    except UserError as exc:
        return exit_status(exc)
    except BrokenPipeError:  # the reader went away (`--dry-run | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
        return 1
    except StopNow as exc:  # a second Ctrl-C: no traceback, and say what survives
        if distributed.from_env().main:  # under torchrun every rank stops; rank 0 says so
            print(f"{signal.Signals(exc.signum).name} received again: stopped at once; "
                  f"{stop.explain()}", file=sys.stderr)
        return 128 + exc.signum
    finally:
        distributed.shutdown(together=ended)


def train(args, stop: StopSignal, ctx: distributed.Context = distributed.Context(),
          held: contextlib.ExitStack | None = None) -> int:
    signals = stop  # this process's own handler (under DDP `stop` becomes the ranks' agreement)
    # ---- configuration ------------------------------------------------------------------
    cfg = load_config(args.recipe, args.overrides)
    tc, dc = cfg.train, cfg.data
    if args.dry_run:
        print(cfg.to_yaml(), end="")
        print(f"# parameters: {dry_run_parameters(cfg)}")
        return 0
    if tc.threads:  # CPU threads for this process's ops (null: torch's default)
        torch.set_num_threads(tc.threads)
    heap.keep_freed_memory()  # every step's big CPU blocks reused, not faulted in anew (heap.py)
    device = resolve_device(tc.device)
    if ctx.enabled:  # torchrun: join the other ranks (nccl on cuda:LOCAL_RANK, else gloo)
        distributed.check_batch(ctx, dc.batch_size)
        device = distributed.init(ctx, device)
        stop = distributed.AgreedStop(stop)  # every rank stops after the same step
    tc.precision = precision.resolve(tc.precision, device)  # auto decided here, and recorded
    amp = lambda: precision.autocast(tc.precision, device)  # noqa: E731 (forward and loss)
    cols = ctx.share(dc.batch_size)  # this rank's columns of every batch (all of them alone)
    run_dir = Path(tc.out_dir) / tc.run_name
    resume_cmd = " ".join([distributed.launcher(ctx), "train.py", args.recipe, *args.overrides,
                           "--resume"])
    signals.explain = lambda: resume.stopped_at_once(run_dir, resume_cmd,
                                                     resume_cmd[:-len(" --resume")])
    if ctx.main and held is not None:  # one process at a time per run directory, until the end
        held.enter_context(runlock.hold(run_dir))

    saved, changed = None, []
    if args.resume:
        saved, path = checkpoint.load_latest(run_dir, training_state.KEYS,
                                             warn=lambda m: print(m, file=sys.stderr))
        changed = resume.check_config(cfg, saved["config"], path)
        print(f"resuming from {path} (step {saved['progress']['step']})"
              + (f" with {', '.join(changed)} (recorded in config.yaml)" if changed else ""))
    elif checkpoint.resumable(run_dir):
        raise UserError(f"{run_dir} already holds checkpoints; pass --resume to continue that run "
                        f"or choose another train.run_name=NAME")
    elif (run_dir / "best.pt").exists():
        raise UserError(checkpoint.stopped_before_first_checkpoint(run_dir))

    # ---- data ---------------------------------------------------------------------------
    seed_everything(tc.seed)
    with distributed.local_zero_first(ctx):  # one process per node fills the corpus caches
        corpus = open_corpus(dc, saved=saved, source=str(path) if saved else "")
    train_data = corpus.train
    if dc.train_tokens:  # a prefix of the training split (reduced-scale studies)
        if dc.train_tokens > train_data.numel():
            raise UserError(f"data.train_tokens={dc.train_tokens:,} exceeds the training split's "
                            f"{train_data.numel():,} tokens; lower it or set 0 for all of them")
        train_data = train_data[:dc.train_tokens]
    stream = TrainStream(train_data, dc.batch_size, dc.bptt, variable_bptt=dc.variable_bptt,
                         shuffle=dc.shuffle, seed=tc.seed)
    eval_bptt = dc.eval_bptt or dc.bptt
    warmup = eval_warmup(dc)  # batched scores that match batch size 1 (flipout_lstm.data.EvalStream)

    # ---- model, optimizer, schedule -----------------------------------------------------
    model = LanguageModel(cfg.model, len(corpus.vocab)).to(device)
    # Training steps run through `step_model`: under DDP the wrapper averages the gradients over
    # the ranks in backward. `model` stays the plain module (state dicts, evaluation, averaging).
    step_model = model
    if ctx.enabled:
        step_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None)
        if tc.ddp_noise == "per_rank":
            seed_everything(distributed.noise_seed(tc.seed, ctx.rank))  # each rank its own noise
        else:  # one stream on every rank, each keeping its columns of the batch's draws
            model.columns = Columns(cols, dc.batch_size)
    optimizer = build_optimizer(cfg.optim, model.parameters())
    schedule = Schedule(cfg.optim, optimizer, model)
    run = TrainingState(model, optimizer, schedule, EarlyStopping(tc.patience),
                        precision.grad_scaler(tc.precision, device), cfg.optim.lr)  # scaler: fp16
    if saved is not None:
        run.restore(saved, path, cols, device)
        note = run.restore_rng(saved, ctx, tc.ddp_noise, tc.seed, path)
        if note:
            print(note, file=sys.stderr)
    progress = run.progress  # the loop's counters (restore() replaced them with the saved ones)
    ended = None if saved is None else resume.finished_because(tc, progress.step, progress.epoch,
                                                               run.stopper)
    if ended and resume.scored_on_test(run_dir, progress.metrics_lines):  # it stays finished
        print(f"{run_dir} is finished at step {progress.step}: {ended}")
        return 0
    try:
        if ctx.main and (saved is None or changed):  # rank 0 alone writes files
            run_dir.mkdir(parents=True, exist_ok=True)
            # config.yaml says what the run does: a resumed run's applied changes included.
            fileio.atomic_write_bytes(run_dir / "config.yaml", cfg.to_yaml().encode())
        if ctx.main and saved is None:
            corpus.tokenizer.save(run_dir)  # vocab.json (+ tokenizer.model for sentencepiece)
        log = NullLog() if not ctx.main else MetricsLog(
            run_dir, tensorboard=tc.tensorboard,
            keep_lines=progress.metrics_lines if saved else None,
            purge_step=progress.step + 1 if saved else None)
    except OSError as exc:
        raise UserError(f"cannot write the run directory {run_dir}: {exc.strerror or exc}; set "
                        f"train.out_dir to a writable folder") from None
    progress.segments.append(provenance(progress.step, tc.precision))  # code, CPU, precision
    print(f"run {run_dir}: {corpus.description}, {model.num_parameters():,} parameters, "
          f"{stream.num_batches(progress.epoch)} batches/epoch, device {device}"
          + (f", {ctx.world} processes of {dc.batch_size // ctx.world} columns" if ctx.enabled else ""))
    # What every checkpoint of the run holds besides the training state (flipout_lstm.training_state).
    header = {"format": checkpoint.FORMAT, "config": cfg.to_dict(), "vocab": corpus.vocab.to_dict(),
              "tokenizer": corpus.tokenizer.state()}

    def record_time() -> None:
        """Wall-clock time goes to run.json, never metrics.jsonl (which must be exact)."""
        run.tick()
        if ctx.main:
            write_run_summary(run_dir, dataclasses.asdict(progress), model.num_parameters(),
                              stream.num_batches(progress.epoch))

    record_time()  # run.json from the start: flipout_lstm.sweep reads the epoch's size there

    def save_checkpoint() -> None:
        with signals.deferred():  # a second Ctrl-C waits for the write: the newest one is whole
            log.sync()
            snap = run.checkpoint(header, log.lines)
            record_time()
            if ctx.enabled:  # every rank's RNG state, and the carried state of all the columns
                snap["rng_ranks"] = distributed.gather_objects(snap["rng"])
                snap["hidden"] = as_cpu(distributed.gather_columns(run.hidden))
            if ctx.main:
                checkpoint.save_training(snap, run_dir, progress.step, tc.keep_checkpoints)
        run.saved_at = time.perf_counter()

    def minutes_due(step: int) -> bool:
        """train.checkpoint_minutes have passed since the last checkpoint. The ranks' clocks
        differ, so under DDP they agree (one small all-reduce) at log steps only."""
        if not tc.checkpoint_minutes:
            return False
        due = time.perf_counter() - run.saved_at >= 60 * tc.checkpoint_minutes
        if ctx.enabled:
            return step % tc.log_every == 0 and distributed.sum_over_ranks(float(due))[0] > 0
        return due

    def validate() -> bool:
        """Score the validation split; update best.pt, the schedule and early stopping."""
        with amp():
            result = evaluate(schedule.eval_model(), corpus.valid, batch_size=dc.eval_batch_size,
                              bptt=eval_bptt, bos_id=corpus.vocab.eos_id, device=device, ctx=ctx,
                              warmup=warmup)
        loss = result["loss"]
        progress.last_eval = progress.step
        progress.eval_walls.append([progress.step, round(run.wall(), 3)])
        epochs_done = progress.epoch + progress.batch / stream.num_batches(progress.epoch)
        log.log(progress.step, "valid", loss=loss, **figures(loss, corpus.level),
                **raw_bpc(loss, result["tokens"], corpus.chars.get("valid")), epoch=round(epochs_done, 4))
        if not math.isfinite(loss):  # never a best: it counts as an evaluation without one
            if tc.on_nonfinite == "error":
                raise NonFiniteError(
                    f"non-finite validation loss at step {progress.step} ({loss}): the weights "
                    f"have diverged; last good checkpoint: {resume.last_good(run_dir)}; lower "
                    f"optim.lr, set optim.clip, or set train.on_nonfinite=skip")
            tqdm.write(f"warning: step {progress.step}: non-finite validation loss ({loss}); "
                       f"not a best", file=sys.stderr)
        improved = run.stopper.update(loss)
        if improved and ctx.main:
            checkpoint.save(run.best(header, loss), run_dir / "best.pt")
        message = schedule.after_eval(loss)
        run.base_lr = schedule.lr
        tqdm.write(f"step {progress.step}: valid loss {loss:.4f}, {headline(loss, corpus.level)}"
                   f"{' (best)' if improved else ''}" + (f"; {message}" if message else ""))
        return run.stopper.should_stop

    # ---- training loop ------------------------------------------------------------------
    done = bool(ended)  # early stopping or max_steps (a resumed run may have ended, unscored)
    clip = cfg.optim.clip if cfg.optim.clip > 0 else float("inf")
    params = [p for p in model.parameters() if p.requires_grad]
    scaler = run.scaler
    shown = {"loss": 0.0, "steps": 0}  # the progress bar's running loss (display only)
    while progress.epoch < tc.epochs and not done and stop.signum is None:
        epoch = progress.epoch
        message = schedule.start_epoch(epoch)  # optim.schedule=step: the epoch's rate
        if message:
            run.base_lr = schedule.lr
            tqdm.write(message)
        bar = tqdm(total=stream.num_batches(epoch), initial=progress.batch, desc=f"epoch {epoch + 1}",
                   disable=not tc.progress, leave=False, dynamic_ncols=True)
        tic, tokens = time.perf_counter(), 0
        for batch in stream.batches(epoch, start=progress.batch):
            step_tic = time.perf_counter()
            model.train()
            inp, target = batch.input[:, cols].to(device), batch.target[:, cols].to(device)
            run.hidden = detach_state(run.hidden) if dc.carry_state else None
            with amp():
                logits, run.hidden, (raw, dropped) = step_model(inp, run.hidden)
                loss, total = training_loss(logits, target, raw, dropped, tc.ar, tc.tar)
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                total.backward()
            else:  # fp16: a scaled loss, the gradients unscaled before clipping
                scaler.scale(total).backward()
                scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
            loss_value, grad_norm = torch.stack([loss.detach(), norm]).tolist()  # one device sync
            if ctx.enabled:  # the global batch's mean loss; a signal on any rank stops them all
                loss_value = stop.agree(loss_value)
            progress.batch += 1
            progress.step += 1
            step = progress.step
            # fp16's scaler overflowed: it skips this update and lowers the scale, as designed.
            overflow = scaler is not None and math.isfinite(loss_value)
            if not (math.isfinite(loss_value) and (math.isfinite(grad_norm) or overflow)):
                if tc.on_nonfinite == "error":
                    raise NonFiniteError(
                        f"non-finite loss or gradient at step {step} (loss {loss_value}, grad norm "
                        f"{grad_norm}); last good checkpoint: {resume.last_good(run_dir)}; lower "
                        f"optim.lr, set optim.clip, or set train.on_nonfinite=skip")
                progress.skipped += 1
                optimizer.zero_grad(set_to_none=True)
                run.hidden = None  # the carried state may hold the same non-finite values
                tqdm.write(f"warning: step {step} skipped: non-finite loss or gradient "
                           f"({progress.skipped} skipped so far)", file=sys.stderr)
            else:
                for group in optimizer.param_groups:  # variable BPTT: lr scaled by length
                    group["lr"] = run.base_lr * batch.lr_scale
                if scaler is None:
                    optimizer.step()
                else:
                    scaler.step(optimizer)
                    scaler.update()
                for group in optimizer.param_groups:
                    group["lr"] = run.base_lr
                schedule.after_step()
                progress.window_loss += loss_value
                progress.window_steps += 1
                # Running mean of the losses so far, an average over about log_every steps
                # once there are that many: shown from the first step, with no extra sync.
                shown["steps"] += 1
                shown["loss"] += (loss_value - shown["loss"]) / min(shown["steps"], tc.log_every)
            tokens += target.numel() * ctx.world
            progress.tokens_seen += target.numel() * ctx.world
            progress.step_seconds += time.perf_counter() - step_tic
            if tc.progress and shown["steps"]:
                rate = tokens / max(time.perf_counter() - tic, 1e-9)
                bar.set_postfix_str(f"loss {shown['loss']:.3f} {headline(shown['loss'], corpus.level)} "
                                    f"lr {run.base_lr:.3g} {rate:,.0f} tok/s", refresh=False)
            bar.update(1)  # redraws at most every 0.1 s (tqdm's mininterval), new figures included
            if tc.progress and shown["steps"] == 1:
                bar.refresh()  # the first step's figures at once

            if step % tc.log_every == 0 and progress.window_steps:
                mean = progress.window_loss / progress.window_steps
                progress.window_loss, progress.window_steps = 0.0, 0
                log.log(step, "train", loss=mean, **figures(mean, corpus.level), lr=run.base_lr,
                        grad_norm=grad_norm, skipped=progress.skipped)
                rate = tokens / max(time.perf_counter() - tic, 1e-9)
                log.scalars(step, "train", tokens_per_s=rate)
            if tc.eval_every and step % tc.eval_every == 0:
                done = validate() or done
            if tc.max_steps and step >= tc.max_steps:
                done = True
            if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or stop.signum is not None \
                    or minutes_due(step):
                save_checkpoint()
            if done or stop.signum is not None:
                break
        bar.close()
        if stop.signum is not None:
            break
        if progress.batch >= stream.num_batches(epoch):  # the epoch ran to its end
            progress.epoch, progress.batch, run.hidden = epoch + 1, 0, None
            if not tc.eval_every:
                done = validate() or done
            if not tc.checkpoint_every:
                save_checkpoint()

    if stop.signum is not None:
        if progress.last_ckpt != progress.step:
            save_checkpoint()
        log.close()
        name = signal.Signals(stop.signum).name
        print(f"{name} received: stopped after step {progress.step}; checkpoint saved to "
              f"{run_dir / 'last.pt'}. Resume with: {resume_cmd}")
        return 0

    # ---- the end: final validation if the last steps were not scored, then test ---------
    if progress.last_eval != progress.step:
        validate()
    if progress.last_ckpt != progress.step:
        save_checkpoint()
    if ctx.enabled:
        distributed.barrier()  # rank 0 has written best.pt before anyone reads it
    if not (run_dir / "best.pt").is_file():
        raise NonFiniteError(f"no validation of {run_dir} had a finite loss, so there is no best.pt "
                             f"to score; the last checkpoint {resume.last_good(run_dir)} is kept; "
                             f"lower optim.lr or set optim.clip and start a new run")
    best = checkpoint.load(run_dir / "best.pt", map_location=device)
    checkpoint.load_model_state(model, best["model"], run_dir / "best.pt")
    results = {}
    for split in ("valid", "test"):
        with amp():
            r = evaluate(model, corpus.split(split), batch_size=dc.eval_batch_size, bptt=eval_bptt,
                         bos_id=corpus.vocab.eos_id, device=device, ctx=ctx, warmup=warmup)
        results[split] = r
        log.log(progress.step, split, loss=r["loss"], tokens=r["tokens"], best=True,
                **figures(r["loss"], corpus.level),
                **raw_bpc(r["loss"], r["tokens"], corpus.chars.get(split)))
    record_time()
    log.close()
    print(f"done after {progress.step} steps. best checkpoint {run_dir / 'best.pt'}: "
          f"valid {headline(results['valid']['loss'], corpus.level)}, "
          f"test {headline(results['test']['loss'], corpus.level)} "
          f"({results['test']['tokens']:,} test tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
