"""The training loop's parts, tested directly: the state that saves and restores itself
(flipout_lstm.training_state), resume matching (flipout_lstm.resume) and the objective with AR/TAR (flipout_lstm.model)."""
import dataclasses
import json

import pytest
import torch

from flipout_lstm import checkpoint, distributed, training_state
from flipout_lstm.config import load_config
from flipout_lstm.errors import CheckpointError
from flipout_lstm.model import LanguageModel, cross_entropy_sum, training_loss
from flipout_lstm.optim import EarlyStopping, Schedule, build_optimizer
from flipout_lstm.resume import check_config, finished_because, scored_on_test
from flipout_lstm.training_state import Progress, TrainingState

HEADER = {"format": checkpoint.FORMAT, "config": {}, "vocab": {}, "tokenizer": None}
VOCAB = 30


def tiny_run(recipe="recipes/word_ptb.yaml", *overrides):
    """A 2 x 16 model of ``recipe``'s kind (its regularizers, optimizer and schedule)."""
    cfg = load_config(recipe, ["model.hidden_size=16", "model.embedding_size=16", *overrides])
    model = LanguageModel(cfg.model, VOCAB)
    optimizer = build_optimizer(cfg.optim, model.parameters())
    return cfg, TrainingState(model, optimizer, Schedule(cfg.optim, optimizer, model),
                              EarlyStopping(cfg.train.patience), None, cfg.optim.lr)


def step(run, tokens, carry=True):
    """One training step as train.py takes it (carried state, clipping); returns the loss."""
    run.model.train()
    hidden = training_state.as_cpu(run.hidden) if carry else None
    logits, run.hidden, (raw, dropped) = run.model(tokens[:-1], hidden)
    run.hidden = [(h.detach(), c.detach()) for h, c in run.hidden]
    loss, total = training_loss(logits, tokens[1:], raw, dropped, 1.0, 1.0)
    run.optimizer.zero_grad()
    total.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), 0.25)
    run.optimizer.step()
    run.schedule.after_step()
    run.progress.step += 1
    return loss.item()


@pytest.mark.parametrize("recipe", ["recipes/word_ptb.yaml", "recipes/char_ptb.yaml"])
def test_a_restored_state_continues_exactly(recipe):
    """checkpoint() then restore() into freshly built objects: the next steps' losses are those
    of the run that never stopped, bit for bit (noise, dropout, optimizer moments, carried state
    and, once NT-ASGD has fired, the average)."""
    torch.manual_seed(1)
    data = torch.randint(0, VOCAB, (6, 11, 4))
    cfg, run = tiny_run(recipe)
    for batch in data[:3]:
        step(run, batch)
    run.stopper.update(4.0)
    for loss in (5.0, 4.0, 4.5, 4.6, 4.7, 4.8, 4.9):  # the non-monotonic trigger fires (nonmono 5)
        run.schedule.after_eval(loss)
    snap = torch.load(_roundtrip(run.checkpoint(HEADER, metrics_lines=7)), weights_only=True)
    expected = [step(run, batch) for batch in data[3:]]

    _, fresh = tiny_run(recipe)
    torch.manual_seed(99)  # the generators come from the checkpoint, not from here
    fresh.restore(snap, "ckpt")
    assert fresh.restore_rng(snap, distributed.Context(), "global", 1, "ckpt") is None
    assert fresh.progress == Progress.from_dict(snap["progress"])
    assert (fresh.progress.step, fresh.progress.metrics_lines, fresh.progress.last_ckpt) == (3, 7, 3)
    assert fresh.stopper.state_dict() == {"best": 4.0, "bad": 0}
    assert fresh.schedule.state_dict()["fired"] == run.schedule.state_dict()["fired"]
    assert [step(fresh, batch) for batch in data[3:]] == expected


def _roundtrip(obj):
    import io
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def test_the_checkpoint_holds_what_resume_requires_and_best_holds_the_eval_weights():
    _, run = tiny_run()
    snap = run.checkpoint(HEADER, metrics_lines=0)
    assert training_state.KEYS | HEADER.keys() | {"scaler"} == snap.keys()
    assert checkpoint.REQUIRED <= snap.keys()
    best = run.best(HEADER, 4.25)
    assert checkpoint.REQUIRED <= best.keys() and best["valid_loss"] == 4.25
    assert all(torch.equal(best["model"][k], v) for k, v in run.model.state_dict().items())


def test_resume_skips_a_file_without_the_training_state(tmp_path):
    _, run = tiny_run()
    checkpoint.save_training(run.checkpoint(HEADER, 0), tmp_path, 2, keep=3)
    checkpoint.save_training(run.best(HEADER, 1.0), tmp_path, 4, keep=3)  # weights only
    warnings = []
    saved, path = checkpoint.load_latest(tmp_path, training_state.KEYS, warn=warnings.append)
    assert path.name == "ckpt-00000002.pt"
    assert "lacks the training state (base_lr, early_stopping" in warnings[0]


def test_progress_from_an_older_checkpoint_fills_the_counters_it_lacks():
    old = {"epoch": 2, "batch": 5, "step": 77, "skipped": 0, "window_loss": 1.5, "window_steps": 3,
           "last_eval": 70, "last_ckpt": 77, "metrics_lines": 12, "wall_seconds": 9.0,
           "tokens_seen": 1000}  # before step_seconds, eval_walls and segments existed
    progress = Progress.from_dict(old)
    assert progress.step == 77 and progress.segments == [] and progress.step_seconds == 0.0
    assert dataclasses.asdict(progress).keys() >= old.keys()


def test_a_per_rank_checkpoint_resumed_by_another_world_size_says_its_noise_restarts():
    _, run = tiny_run()
    snap = run.checkpoint(HEADER, 0)
    snap["rng_ranks"] = [snap["rng"], snap["rng"]]
    note = run.restore_rng(snap, distributed.Context(), "per_rank", 1, "ckpt-1.pt")
    assert note.startswith("note: ckpt-1.pt was written by 2 process(es) and is resumed by 1")
    assert run.restore_rng(snap, distributed.Context(), "global", 1, "ckpt-1.pt") is None


def test_training_loss_adds_ar_and_tar_to_the_mean_cross_entropy():
    torch.manual_seed(0)
    logits, target = torch.randn(5, 3, 7), torch.randint(0, 7, (5, 3))
    raw, dropped = torch.randn(5, 3, 4), torch.randn(5, 3, 4)
    plain, total = training_loss(logits, target, raw, dropped)
    assert plain is total and torch.allclose(plain, cross_entropy_sum(logits, target) / 15)
    _, total = training_loss(logits, target, raw, dropped, ar=2.0, tar=3.0)
    ar = (dropped ** 2).mean()
    tar = ((raw[1:] - raw[:-1]) ** 2).mean()
    assert torch.allclose(total, plain + 2.0 * ar + 3.0 * tar)


def test_ar_and_tar_change_the_update_but_not_the_logged_loss(tmp_path):
    """train.ar / train.tar (five recipes use them): the same batch, the same logged loss, other
    gradients; with both 0 the objective is the loss itself."""
    torch.manual_seed(0)
    batch = torch.randint(0, VOCAB, (11, 4))
    grads, losses = [], []
    for ar, tar in ((0.0, 0.0), (2.0, 0.0), (0.0, 1.0)):
        torch.manual_seed(1)  # the same weights, dropout masks and flipout signs each time
        _, run = tiny_run()
        logits, _, (raw, dropped) = run.model(batch[:-1])
        loss, total = training_loss(logits, batch[1:], raw, dropped, ar, tar)
        total.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in run.model.parameters()
                                if p.grad is not None]))
    assert losses[0] == losses[1] == losses[2]
    assert not torch.allclose(grads[0], grads[1]) and not torch.allclose(grads[0], grads[2])


# ----------------------------------------------------------------------------- flipout_lstm.resume


def test_resume_refuses_a_changed_experiment_and_applies_a_changed_bound():
    cfg = load_config("recipes/word_ptb.yaml")
    saved = load_config("recipes/word_ptb.yaml", ["optim.lr=20", "train.epochs=3"]).to_dict()
    with pytest.raises(CheckpointError, match=r"the recipe differs in optim.lr \(checkpoint 20.0, now 30.0\)"):
        check_config(cfg, saved, "ckpt")
    saved = load_config("recipes/word_ptb.yaml", ["train.epochs=3"]).to_dict()
    assert check_config(cfg, saved, "ckpt") == [f"train.epochs 3 -> {cfg.train.epochs}"]


def test_finished_because_names_the_bound_that_ended_the_run():
    tc = load_config("recipes/word_ptb.yaml", ["train.max_steps=20", "train.patience=2"]).train
    stopper = EarlyStopping(2)
    assert finished_because(tc, 19, 0, stopper) is None
    assert "reached train.max_steps=20" in finished_because(tc, 20, 0, stopper)
    stopper.update(1.0), stopper.update(2.0), stopper.update(3.0)
    assert "early stopping ended it (2 evaluations" in finished_because(tc, 5, 0, stopper)
    tc.max_steps, tc.patience, stopper.patience = 0, 0, 0
    assert f"trained train.epochs={tc.epochs}" in finished_because(tc, 5, tc.epochs, stopper)


def test_a_test_line_counts_only_after_the_lines_the_checkpoint_accounts_for(tmp_path):
    lines = [{"step": 5, "split": "valid", "loss": 1.0},
             {"step": 5, "split": "test", "loss": 1.0, "best": True}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert scored_on_test(tmp_path, 1)
    assert not scored_on_test(tmp_path, 2)  # the test line predates the checkpoint
    assert not scored_on_test(tmp_path / "missing", 0)
