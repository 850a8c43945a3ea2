"""The non-monotonic decay rule on a fixed sequence of validation losses, both readings of it."""
import io

import pytest
import torch

from flipout_lstm.config import OptimConfig
from flipout_lstm.optim import Schedule

# nonmono n = 2. Losses improve, stall above the best (3.0) from evaluation 5 on, fall to 2.0,
# then rise again: the evaluations where each rule fires, worked out by hand from
#   fires at k  iff  len(h) > n  and  v_k > min(h[:-n])
# with h = every earlier loss (every_eval) or those since the last firing, the firing one
# included (once_per_window).
LOSSES = [5.0, 4.0, 3.0, 3.5, 3.6, 3.7, 3.8, 3.9, 2.0, 2.5, 2.6, 2.7, 2.8, 2.9, 3.0]
FIRES = {
    # 5, 6, 7: each compared with the same old best 3.0, so the rate falls by 4**3 in a row.
    "every_eval": [5, 6, 7, 11, 12, 13, 14],
    # After 5 the window is [3.7, ...]: 6 and 7 cannot fire (fewer than n new evaluations),
    # 8-10 beat 3.7; 11 is worse than 2.0 (evaluation 8); 14 is worse than 2.7 (evaluation 11).
    "once_per_window": [5, 11, 14],
}


def make_schedule(rule):
    weight = torch.nn.Parameter(torch.zeros(1))
    cfg = OptimConfig(name="sgd", lr=1.0, schedule="decay", nonmono=2, lr_decay=4.0, decay_rule=rule)
    return Schedule(cfg, torch.optim.SGD([weight], lr=1.0), torch.nn.Linear(1, 1))


def feed(schedule, losses, first=0):
    """The evaluations (numbered from ``first``) at which the schedule divided the rate."""
    fired = []
    for k, loss in enumerate(losses, start=first):
        before = schedule.lr
        message = schedule.after_eval(loss)
        assert (message is not None) == (schedule.lr != before)
        if message:
            assert schedule.lr == before / 4 and "divided by 4" in message
            fired.append(k)
    return fired


@pytest.mark.parametrize("rule", ["every_eval", "once_per_window"])
def test_decay_rule_on_a_fixed_sequence(rule):
    schedule = make_schedule(rule)
    assert feed(schedule, LOSSES) == FIRES[rule]
    assert schedule.fired == len(FIRES[rule]) and schedule.lr == 4.0 ** -len(FIRES[rule])


@pytest.mark.parametrize("rule", ["every_eval", "once_per_window"])
@pytest.mark.parametrize("cut", [6, 9, 12])
def test_decay_rule_resumes_exactly(rule, cut):
    """A schedule saved mid-sequence (as a checkpoint holds it) fires where an unbroken one does."""
    first = make_schedule(rule)
    before = feed(first, LOSSES[:cut])
    buffer = io.BytesIO()
    torch.save({"schedule": first.state_dict(), "optimizer": first.optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    second = make_schedule(rule)
    second.load_state_dict(saved["schedule"])
    second.optimizer.load_state_dict(saved["optimizer"])
    assert before + feed(second, LOSSES[cut:], first=cut) == FIRES[rule]
    assert second.history == LOSSES


def test_a_schedule_state_without_a_window_start_reads_as_the_start():
    """Checkpoints written before optim.decay_rule existed hold no ``start``."""
    schedule = make_schedule("once_per_window")
    schedule.load_state_dict({"history": LOSSES[:5], "fired": 0, "averaged": None})
    assert schedule.start == 0 and feed(schedule, LOSSES[5:], first=5) == FIRES["once_per_window"]


def test_step_schedule_is_zarembas_rule():
    """decay_start=4, lr_decay=2: epochs 1-4 at lr, then halved after every epoch (the TF PTB
    tutorial's lr * 0.5 ** max(i + 1 - 4, 0) for epoch i from 0)."""
    weight = torch.nn.Parameter(torch.zeros(1))
    cfg = OptimConfig(name="sgd", lr=1.0, schedule="step", decay_start=4, decay_every=1, lr_decay=2.0)
    schedule = Schedule(cfg, torch.optim.SGD([weight], lr=1.0), torch.nn.Linear(1, 1))
    rates, messages = [], []
    for epoch in range(13):
        messages.append(schedule.start_epoch(epoch))
        rates.append(schedule.optimizer.param_groups[0]["lr"])
    assert rates == [0.5 ** max(i + 1 - 4, 0) for i in range(13)]
    assert messages[:4] == [None] * 4 and all(m and "optim.lr / 2^" in m for m in messages[4:])
    assert schedule.start_epoch(12) is None  # a resumed epoch: the rate is already right
    assert schedule.after_eval(5.0) is None and schedule.after_eval(9.0) is None  # no loss-driven decay


def test_step_schedule_every_k_epochs_and_other_schedules_untouched():
    weight = torch.nn.Parameter(torch.zeros(1))
    cfg = OptimConfig(name="sgd", lr=8.0, schedule="step", decay_start=2, decay_every=3, lr_decay=2.0)
    schedule = Schedule(cfg, torch.optim.SGD([weight], lr=8.0), torch.nn.Linear(1, 1))
    rates = []
    for epoch in range(9):
        schedule.start_epoch(epoch)
        rates.append(schedule.lr)
    assert rates == [8, 8, 4, 4, 4, 2, 2, 2, 1]
    for name in ("constant", "decay", "ntasgd"):
        other = Schedule(OptimConfig(name="sgd", lr=8.0, schedule=name), torch.optim.SGD([weight], lr=8.0),
                         torch.nn.Linear(1, 1))
        assert other.start_epoch(7) is None and other.lr == 8.0


@pytest.mark.parametrize("override, message", [
    ("optim.decay_start=-1", r"optim.decay_start: must be >= 0 epochs"),
    ("optim.decay_every=0", r"optim.decay_every: must be a positive number of epochs"),
    ("optim.schedule=steps", r"optim.schedule: 'steps' is not one of .*'step' \(did you mean 'step'\?\)"),
])
def test_step_schedule_config_errors(override, message):
    from flipout_lstm.config import load_config
    from flipout_lstm.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
