"""The trainer end to end on a tiny corpus: files on disk, exact resume, schedules, evaluate."""
import json
import re
from pathlib import Path

import pytest
import torch

import train as train_script
from flipout_lstm.signals import StopNow, StopSignal
from conftest import run_cli, run_main, tiny_overrides
from flipout_lstm import checkpoint
from flipout_lstm.model import LanguageModel


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_train(recipe, data_root, out_dir, **extra):
    return train_script.main([f"recipes/{recipe}.yaml", *tiny_overrides(data_root, out_dir, **extra)])


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    from conftest import REPO
    monkeypatch.chdir(REPO)


def test_tiny_run_writes_every_file(tiny_ptb, tmp_path):
    out = tmp_path / "runs"
    assert run_train("word_ptb", tiny_ptb, out, **{"train.max_steps": 7, "train.checkpoint_every": 3,
                                                   "train.eval_every": 5, "train.tensorboard": "true"}) == 0
    run = out / "word_ptb"
    for name in ("config.yaml", "vocab.json", "last.pt", "best.pt", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in checkpoint.numbered(run)) == \
        ["ckpt-00000003.pt", "ckpt-00000006.pt", "ckpt-00000007.pt"]
    assert list((run / "tb").glob("events.out.tfevents.*"))
    lines = metrics(run)
    assert all({"step", "split", "loss"} <= set(line) for line in lines)
    assert [line["step"] for line in lines if line["split"] == "train"] == [2, 4, 6]
    assert [line["step"] for line in lines if line["split"] == "valid"] == [5, 7, 7]
    assert lines[-1]["split"] == "test" and "ppl" in lines[-1]
    last = checkpoint.load(run / "last.pt")
    assert last["progress"]["step"] == 7
    assert (run / "last.pt").stat().st_ino == (run / "ckpt-00000007.pt").stat().st_ino


def test_existing_run_is_not_overwritten(tiny_ptb, tmp_path, capsys):
    assert run_train("word_ptb", tiny_ptb, tmp_path, **{"train.max_steps": 2}) == 0
    assert run_train("word_ptb", tiny_ptb, tmp_path, **{"train.max_steps": 2}) == 2
    assert "already holds checkpoints; pass --resume" in capsys.readouterr().err


class Crash(RuntimeError):
    pass


def crash_at(monkeypatch, step):
    """Make the model's training forward pass blow up at a given step, as a dying machine would."""
    calls = {"n": 0}
    original = LanguageModel.forward

    def forward(self, *args, **kwargs):
        if self.training:
            calls["n"] += 1
            if calls["n"] == step:
                raise Crash(f"simulated crash at step {step}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LanguageModel, "forward", forward)


@pytest.mark.parametrize("recipe, extra", [
    ("word_ptb", {"optim.schedule": "ntasgd", "optim.nonmono": 1, "train.eval_every": 4}),  # carried state, ASGD
    ("char_ptb", {"model.hidden_size": 12}),  # shuffled sequences, flipout Gaussian noise, AMSGrad
    ("word_zoneout", {"data.variable_bptt": "true"}),  # variable BPTT, custom recurrence
])
def test_resume_after_crash_equals_uninterrupted(tiny_ptb, tmp_path, monkeypatch, recipe, extra):
    settings = {"train.max_steps": 23, "train.checkpoint_every": 5, "train.log_every": 1, **extra}
    if recipe == "word_ptb":
        settings["optim.name"] = "sgd"
    assert run_train(recipe, tiny_ptb, tmp_path / "a", **settings) == 0
    expected = metrics(tmp_path / "a" / recipe)

    with monkeypatch.context() as m:
        crash_at(m, 13)
        with pytest.raises(Crash):
            run_train(recipe, tiny_ptb, tmp_path / "b", **settings)
    run_b = tmp_path / "b" / recipe
    assert checkpoint.load(run_b / "last.pt")["progress"]["step"] == 10
    assert train_script.main([f"recipes/{recipe}.yaml",
                              *tiny_overrides(tiny_ptb, tmp_path / "b", **settings), "--resume"]) == 0
    assert metrics(run_b) == expected


def test_decay_schedule_divides_the_learning_rate(tiny_ptb, tmp_path):
    # An absurd learning rate makes validation worse, so the non-monotonic trigger fires.
    assert run_train("word_ptb", tiny_ptb, tmp_path, **{"optim.lr": 1000.0, "optim.nonmono": 1,
                     "train.eval_every": 2, "train.max_steps": 12, "optim.clip": 0}) == 0
    run = tmp_path / "word_ptb"
    lrs = [line["lr"] for line in metrics(run) if line["split"] == "train"]
    assert lrs[0] == 1000.0 and min(lrs) < 1000.0
    assert all(b in (a, a / 4) for a, b in zip(lrs, lrs[1:]))
    assert checkpoint.load(run / "last.pt")["schedule"]["fired"] >= 1


def test_ntasgd_evaluates_and_saves_the_average(tiny_ptb, tmp_path):
    assert run_train("word_ptb", tiny_ptb, tmp_path, **{"optim.schedule": "ntasgd", "optim.lr": 1000.0,
                     "optim.nonmono": 1, "train.eval_every": 2, "train.max_steps": 12}) == 0
    last = checkpoint.load(tmp_path / "word_ptb" / "last.pt")
    averaged = last["schedule"]["averaged"]
    assert averaged is not None and int(averaged["n_averaged"]) > 0
    assert not torch.equal(averaged["module.decoder.weight"], last["model"]["decoder.weight"])


def test_early_stopping(tiny_ptb, tmp_path):
    assert run_train("word_ptb", tiny_ptb, tmp_path, **{"optim.lr": 1000.0, "train.patience": 2,
                     "train.eval_every": 1, "train.max_steps": 50, "optim.clip": 0}) == 0
    lines = metrics(tmp_path / "word_ptb")
    valid = [line["loss"] for line in lines if line["split"] == "valid" and not line.get("best")]
    assert len(valid) < 50
    best_at = valid.index(min(valid))
    assert len(valid) - 1 - best_at == 2  # stopped after exactly `patience` evaluations without a new best


def test_evaluate_char_run_on_real_ptb(ptb_root, tmp_path):
    out = tmp_path / "runs"
    proc = run_main("train.py", "recipes/char_ptb.yaml", "train.max_steps=20", "model.hidden_size=64",
                   f"train.out_dir={out}", "train.progress=false", "data.eval_batch_size=200",
                   env={"LM_DATA_ROOT": str(ptb_root)})
    assert proc.returncode == 0, proc.stderr
    run = out / "char_ptb"
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert "442,423 test tokens" in proc.stdout
    proc = run_main("evaluate.py", run / "best.pt", "--json", "--batch-size", "200",
                   env={"LM_DATA_ROOT": str(ptb_root)})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["split"] == "test" and result["tokens"] == 442_423
    assert 0 < result["bpc"] < 8 and abs(result["bpc"] - result["loss"] / 0.6931471805599453) < 1e-9
    test_line = metrics(run)[-1]
    assert test_line["split"] == "test" and test_line["bpc"] == pytest.approx(result["bpc"], rel=1e-9)


def test_evaluate_batch_size_one_is_the_exact_stream(tiny_ptb, tmp_path):
    """evaluate.py --batch-size 1 is the split read as one stream: the model run once over
    [<eos>] + split with the state carried, every token scored once (here by hand)."""
    assert run_train("word_ptb", tiny_ptb, tmp_path, **{"train.max_steps": 3}) == 0
    import evaluate as evaluate_script
    from flipout_lstm.data import open_corpus
    from flipout_lstm.model import cross_entropy_sum
    from flipout_lstm.trained import load_trained

    best = tmp_path / "word_ptb" / "best.pt"
    results = {bs: evaluate_script.run(evaluate_script.parse_args(
        [str(best), "--batch-size", bs, "--data-root", str(tiny_ptb), "--warmup", "0"])) for bs in ("1", "3")}
    trained = load_trained(best)
    data = open_corpus(trained.config.data, saved=trained.ckpt).test
    stream = torch.cat([torch.tensor([trained.tokenizer.eos_id]), data])
    with torch.no_grad():
        logits, _, _ = trained.model(stream[:-1].unsqueeze(1))
        by_hand = cross_entropy_sum(logits, stream[1:].unsqueeze(1)).item() / data.numel()
    assert results["1"]["tokens"] == results["3"]["tokens"] == data.numel()
    assert results["1"]["loss"] == pytest.approx(by_hand, rel=1e-6)
    # Three columns that start from a zero state (no warm-up) lose their context: not exact.
    assert abs(results["3"]["loss"] - by_hand) > 1e-6 * by_hand


def test_evaluating_an_ntasgd_training_checkpoint_scores_the_average(tiny_ptb, tmp_path):
    assert run_train("word_ptb", tiny_ptb, tmp_path, **{"optim.name": "sgd", "optim.schedule": "ntasgd",
                     "optim.lr": 1000.0, "optim.nonmono": 1, "train.eval_every": 2, "train.max_steps": 12}) == 0
    last = checkpoint.load(tmp_path / "word_ptb" / "last.pt")
    weights = checkpoint.eval_weights(last)
    assert weights.keys() == last["model"].keys()
    assert torch.equal(weights["decoder.weight"], last["schedule"]["averaged"]["module.decoder.weight"])
    import evaluate as evaluate_script
    from flipout_lstm.config import config_from_dict
    from flipout_lstm.data import open_corpus
    from flipout_lstm.evaluation import eval_warmup, evaluate

    def loss_with(state):
        cfg = config_from_dict(last["config"])
        model = LanguageModel(cfg.model, len(last["vocab"]["itos"]))
        model.load_state_dict(state)
        corpus = open_corpus(cfg.data, saved=last)  # the run's own data.root: tiny_ptb
        return evaluate(model, corpus.valid, batch_size=cfg.data.eval_batch_size, bptt=cfg.data.bptt,
                        bos_id=corpus.vocab.eos_id, device=torch.device("cpu"),
                        warmup=eval_warmup(cfg.data))["loss"]

    result = evaluate_script.run(evaluate_script.parse_args(
        [str(tmp_path / "word_ptb" / "last.pt"), "--split", "valid", "--data-root", str(tiny_ptb)]))
    assert result["loss"] == pytest.approx(loss_with(weights), rel=1e-12)
    assert result["loss"] != pytest.approx(loss_with(last["model"]), rel=1e-6)


def test_progress_bar_shows_loss_and_speed_from_the_first_step(tiny_ptb, tmp_path, capsys):
    # log_every far beyond the run: the figures on the bar do not wait for a log line
    assert run_train("word_ptb", tiny_ptb, tmp_path, **{"train.progress": "true", "train.log_every": 1000,
                                                        "train.max_steps": 2}) == 0
    err = capsys.readouterr().err
    assert re.search(r"epoch 1: .* 1/\d+ .*loss \d+\.\d{3} ppl \d+\.\d+ lr 30 [\d,]+ tok/s", err), err
    assert not [line for line in metrics(tmp_path / "word_ptb") if line["split"] == "train"]


def test_checkpoint_minutes_adds_checkpoints_and_resume_stays_exact(tiny_ptb, tmp_path, monkeypatch):
    """A checkpoint after every step (a deadline of 1e-9 minutes), none by step count; a crash
    at step 8 resumes from step 7 and ends where a run without them does, line for line."""
    settings = {"train.max_steps": 12, "train.log_every": 1, "train.eval_every": 5,
                "train.keep_checkpoints": 20}
    assert run_train("word_ptb", tiny_ptb, tmp_path / "a", **settings, **{"train.checkpoint_minutes": 0}) == 0
    run_a = tmp_path / "a" / "word_ptb"
    assert [p.name for p in checkpoint.numbered(run_a)] == ["ckpt-00000012.pt"]  # 0: off
    often = {**settings, "train.checkpoint_minutes": 1e-9}
    with monkeypatch.context() as m:
        crash_at(m, 8)
        with pytest.raises(Crash):
            run_train("word_ptb", tiny_ptb, tmp_path / "b", **often)
    run_b = tmp_path / "b" / "word_ptb"
    assert [p.name for p in checkpoint.numbered(run_b)] == [f"ckpt-{s:08d}.pt" for s in range(1, 8)]
    assert train_script.main(["recipes/word_ptb.yaml", *tiny_overrides(tiny_ptb, tmp_path / "b", **often),
                              "--resume"]) == 0
    assert metrics(run_b) == metrics(run_a)


def test_threads_sets_torchs_cpu_threads(tiny_ptb, tmp_path):
    before = torch.get_num_threads()
    try:
        assert run_train("word_ptb", tiny_ptb, tmp_path, **{"train.max_steps": 1,
                                                            "train.threads": before + 1}) == 0
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)


def test_no_arguments_names_only_the_recipe_as_required():
    proc = run_cli("train.py")
    assert proc.returncode == 2
    assert "usage: train.py [-h] [--resume] [--dry-run] recipe [key.path=value ...]" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("the following arguments are required: recipe")


def test_a_second_signal_waits_for_a_checkpoint_write(capsys):
    """The handler itself: the first signal is a flag and a message; a second one stops at
    once, except inside ``deferred()`` (a checkpoint being written), which it waits for."""
    import signal

    stop = StopSignal()
    stop(signal.SIGINT, None)
    assert stop.signum == signal.SIGINT
    assert "SIGINT received: stopping after the current step" in capsys.readouterr().err
    with pytest.raises(StopNow) as e:
        with stop.deferred():
            stop(signal.SIGINT, None)  # does not raise here: the write goes on
            written = True
    assert written and e.value.signum == signal.SIGINT
    with pytest.raises(StopNow):
        stop(signal.SIGTERM, None)  # outside a write: at once


# ----------------------------------------------------------------------------- finished runs, resume


def nan_validation(monkeypatch):
    """Every validation scores NaN, as a model whose weights diverged only on held-out text."""
    real = train_script.evaluate

    def diverged(model, data, **kw):
        result = real(model, data, **kw)
        return {**result, "loss": float("nan")} if data is not None and kw.get("bptt") else result

    monkeypatch.setattr(train_script, "evaluate", diverged)


def error_lines(text):
    return [line for line in text.splitlines() if line.startswith("error: ")]


def test_nonfinite_first_validation_is_an_error_and_keeps_the_checkpoint(tiny_ptb, tmp_path,
                                                                         monkeypatch, capsys):
    nan_validation(monkeypatch)
    settings = {"train.max_steps": 9, "train.checkpoint_every": 3, "train.eval_every": 4}
    assert run_train("word_ptb", tiny_ptb, tmp_path, **settings) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "non-finite validation loss at step 4" in line and "ckpt-00000003.pt" in line
    assert "train.on_nonfinite=skip" in line
    assert checkpoint.load(tmp_path / "word_ptb" / "last.pt")["progress"]["step"] == 3


def test_skipped_nonfinite_validations_end_with_their_own_message(tiny_ptb, tmp_path, monkeypatch, capsys):
    nan_validation(monkeypatch)
    settings = {"train.max_steps": 9, "train.checkpoint_every": 3, "train.eval_every": 4,
                "train.on_nonfinite": "skip"}
    assert run_train("word_ptb", tiny_ptb, tmp_path, **settings) == 2
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert "no validation of" in line and "had a finite loss" in line and "ckpt-00000009.pt" in line
    assert "last.pt" not in line.replace("ckpt-00000009.pt", "")  # not evaluate.py's advice
    assert "step 4: non-finite validation loss" in err
    assert checkpoint.load(tmp_path / "word_ptb" / "last.pt")["progress"]["step"] == 9


@pytest.mark.parametrize("bound, raised", [
    ({"train.max_steps": 6}, {"train.max_steps": 9}),
    ({"train.max_steps": 60, "train.eval_every": 2, "train.patience": 1, "optim.lr": 1000.0},
     {"train.patience": 3}),
])
def test_a_finished_run_stays_finished_unless_its_bound_is_raised(tiny_ptb, tmp_path, capsys, bound, raised):
    settings = {"train.checkpoint_every": 3, **bound}
    assert run_train("word_ptb", tiny_ptb, tmp_path, **settings) == 0
    run = tmp_path / "word_ptb"
    before, best = (run / "metrics.jsonl").read_bytes(), (run / "best.pt").read_bytes()
    step = checkpoint.load(run / "last.pt")["progress"]["step"]
    capsys.readouterr()
    for _ in range(2):  # the same arguments: nothing trains, nothing is rewritten
        assert train_script.main(["recipes/word_ptb.yaml", *tiny_overrides(tiny_ptb, tmp_path, **settings),
                                  "--resume"]) == 0
        out = capsys.readouterr().out
        assert f"is finished at step {step}" in out and "raise train." in out
        assert (run / "metrics.jsonl").read_bytes() == before and (run / "best.pt").read_bytes() == best
    # Raising the bound that ended it trains on, and config.yaml records the new bound.
    assert train_script.main(["recipes/word_ptb.yaml", *tiny_overrides(tiny_ptb, tmp_path, **{**settings, **raised}),
                              "--resume"]) == 0
    assert checkpoint.load(run / "last.pt")["progress"]["step"] > step
    key, value = next(iter(raised.items()))
    assert f"{key.split('.')[1]}: {value}" in (run / "config.yaml").read_text()


def test_resume_refuses_a_changed_experiment_and_applies_a_changed_bound(tiny_ptb, tmp_path, capsys):
    settings = {"train.max_steps": 4, "train.checkpoint_every": 2}
    assert run_train("word_ptb", tiny_ptb, tmp_path, **{**settings, "train.max_steps": 2}) == 0
    capsys.readouterr()
    for field, value in (("optim.lr", 0.01), ("model.lstm.flipout", "false"), ("train.ar", 1.0),
                         ("data.eval_batch_size", 8), ("train.eval_every", 1)):
        code = train_script.main(["recipes/word_ptb.yaml", "--resume",
                                  *tiny_overrides(tiny_ptb, tmp_path, **{**settings, field: value})])
        (line,) = error_lines(capsys.readouterr().err)
        assert code == 2 and f"the recipe differs in {field} (checkpoint" in line, line
    run = tmp_path / "word_ptb"
    assert checkpoint.load(run / "last.pt")["progress"]["step"] == 2
    assert train_script.main(["recipes/word_ptb.yaml", "--resume",
                              *tiny_overrides(tiny_ptb, tmp_path, **{**settings, "train.log_every": 1})]) == 0
    out = capsys.readouterr().out
    assert "with train.max_steps 2 -> 4, train.log_every 2 -> 1 (recorded in config.yaml)" in out
    recorded = (run / "config.yaml").read_text()
    assert "max_steps: 4" in recorded and "log_every: 1" in recorded
    assert checkpoint.load(run / "last.pt")["config"]["train"]["max_steps"] == 4
    # run.json says what trained each part of the run: one segment per start or resume.
    segments = json.loads((run / "run.json").read_text())["segments"]
    assert [s["step"] for s in segments] == [0, 2]
    assert all(s["precision"] == "fp32" and s["torch"] == torch.__version__ and s["cpu"] for s in segments)


def test_zaremba_small_recipe_steps_its_rate_per_epoch(tiny_ptb, tmp_path):
    """The anchor recipe's schedule through train.py: the logged rate of every step of epoch e
    is 20 / 2^max(0, e - 4) (e from 1), and a resume mid-epoch keeps it."""
    settings = {"train.epochs": 6, "train.log_every": 1, "train.checkpoint_every": 20, "data.bptt": 40}
    assert run_train("zaremba_small", tiny_ptb, tmp_path, **{**settings, "train.max_steps": 50}) == 0
    assert train_script.main(["recipes/zaremba_small.yaml", *tiny_overrides(tiny_ptb, tmp_path, **settings),
                              "--resume"]) == 0
    lines = metrics(tmp_path / "zaremba_small")
    per_epoch = {}
    for line in lines:
        if line["split"] == "valid" and "epoch" in line:
            per_epoch[round(line["epoch"])] = line["step"]
    bounds = [0] + [per_epoch[e] for e in sorted(per_epoch)]
    for line in (l for l in lines if l["split"] == "train"):
        epoch = next(e for e in range(1, len(bounds)) if line["step"] <= bounds[e])
        assert line["lr"] == 20.0 / 2 ** max(0, epoch - 4), (line["step"], epoch)


# ----------------------------------------------------------------------------- options end to end


def test_ar_and_tar_penalize_the_activations(tiny_ptb, tmp_path, monkeypatch):
    """train.ar / train.tar (AWD-LSTM): the loss minimized adds ar * mean(dropped^2) and
    tar * mean((raw_t - raw_{t-1})^2); the logged loss stays the cross-entropy alone."""
    seen = []
    real = torch.Tensor.backward

    def record(tensor, *args, **kwargs):
        seen.append(tensor.item())
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", record)
    settings = {"train.max_steps": 3, "train.log_every": 1, "optim.lr": 1e-9}
    assert run_train("word_ptb", tiny_ptb, tmp_path / "plain", **settings) == 0
    plain, seen[:] = list(seen), []
    assert run_train("word_ptb", tiny_ptb, tmp_path / "ar", **settings, **{"train.ar": 2.0, "train.tar": 1.0}) == 0
    logged = [l["loss"] for l in metrics(tmp_path / "ar" / "word_ptb") if l["split"] == "train"]
    plain_logged = [l["loss"] for l in metrics(tmp_path / "plain" / "word_ptb") if l["split"] == "train"]
    assert logged == pytest.approx(plain_logged, rel=1e-5)  # the same model: lr ~ 0 and one seed
    assert all(a > p + 1e-4 for a, p in zip(seen, plain))  # the penalties were minimized too


def test_tied_weights_survive_a_checkpoint_round_trip(tiny_ptb, tmp_path):
    """model.tie_weights: the decoder is the embedding, in training and after reloading."""
    from flipout_lstm.trained import load_trained

    assert run_train("word_ptb", tiny_ptb, tmp_path, **{"train.max_steps": 4, "model.tie_weights": "true"}) == 0
    model = load_trained(tmp_path / "word_ptb" / "best.pt").model
    assert model.decoder.weight is model.embedding.weight
    saved = checkpoint.load(tmp_path / "word_ptb" / "last.pt")["model"]
    assert torch.equal(saved["decoder.weight"], saved["embedding.weight"])
    with torch.no_grad():
        model.embedding.weight[0, 0] += 1.0
    assert model.decoder.weight[0, 0] == model.embedding.weight[0, 0]


def test_standard_dropout_draws_a_mask_per_step(tiny_ptb, tmp_path):
    """model.dropout_type=standard (Zaremba): a new dropout mask at every step, unlike locked."""
    from flipout_lstm.config import ModelConfig
    from flipout_lstm.model import LanguageModel, sequence_dropout

    model = LanguageModel(ModelConfig(embedding_size=8, hidden_size=8, num_layers=1, input_dropout=0.5,
                                      dropout_type="standard"), vocab_size=5)
    model.train()
    tokens = torch.zeros(6, 2, dtype=torch.long)  # the same word at every step
    x = torch.nn.functional.embedding(tokens, model.embedding.weight)
    torch.manual_seed(0)
    standard = sequence_dropout(x, 0.5, True, locked=False)
    locked = sequence_dropout(x, 0.5, True, locked=True)
    assert not all(torch.equal(standard[0] != 0, standard[t] != 0) for t in range(1, 6))
    assert all(torch.equal(locked[0] != 0, locked[t] != 0) for t in range(1, 6))
    assert run_train("word_zaremba", tiny_ptb, tmp_path, **{"train.max_steps": 3}) == 0


def test_eval_bptt_changes_the_chunks_not_the_score(tiny_ptb, tmp_path):
    """data.eval_bptt: validation in chunks of another length scores the same stream."""
    assert run_train("word_ptb", tiny_ptb, tmp_path / "a", **{"train.max_steps": 3}) == 0
    assert run_train("word_ptb", tiny_ptb, tmp_path / "b", **{"train.max_steps": 3, "data.eval_bptt": 7}) == 0
    a, b = (metrics(tmp_path / d / "word_ptb") for d in ("a", "b"))
    assert [l["loss"] for l in a if l["split"] == "train"] == [l["loss"] for l in b if l["split"] == "train"]
    for x, y in zip([l for l in a if l["split"] != "train"], [l for l in b if l["split"] != "train"]):
        assert x.get("tokens") == y.get("tokens")
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
