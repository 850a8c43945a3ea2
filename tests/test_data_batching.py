"""TrainStream and EvalStream: layouts, determinism, resuming (EvalStream's token-by-token
coverage, with and without warm-up: tests/test_eval_warmup.py)."""
import math

import pytest
import torch

from flipout_lstm.data import Batch, EvalStream, TrainStream
from flipout_lstm.errors import ConfigError, DataError


def stream(n=1000):
    return torch.arange(n, dtype=torch.long)


def as_lists(batches):
    return [(b.input.tolist(), b.target.tolist(), b.lr_scale) for b in batches]


def test_contiguous_layout():
    data = stream(103)
    ts = TrainStream(data, batch_size=4, bptt=7)
    rows = 103 // 4  # 25; 3 tokens truncated
    batches = list(ts.batches(0))
    assert ts.num_batches(0) == len(batches) == math.ceil((rows - 1) / 7)
    assert all(isinstance(b, Batch) and b.lr_scale == 1.0 for b in batches)
    assert [b.input.shape for b in batches] == [(7, 4)] * 3 + [(3, 4)]
    inputs = torch.cat([b.input for b in batches])
    targets = torch.cat([b.target for b in batches])
    cols = data[: rows * 4].view(4, rows).t()
    assert torch.equal(inputs, cols[:-1]) and torch.equal(targets, cols[1:])
    assert torch.equal(targets, inputs + 1)  # targets are the next tokens of each column
    assert ts.tokens_per_epoch == targets.numel() == (rows - 1) * 4
    assert as_lists(ts.batches(0)) == as_lists(ts.batches(5))  # no randomness without shuffle/variable


def test_shuffled_sequences():
    data = stream(1001)
    ts = TrainStream(data, batch_size=3, bptt=10, shuffle=True, seed=7)
    assert ts.num_batches(0) == 100 // 3 == 33
    batches = list(ts.batches(0))
    assert len(batches) == 33 and all(b.input.shape == (10, 3) for b in batches)
    starts = []
    for b in batches:
        assert torch.equal(b.target, b.input + 1)
        col_starts = b.input[0].tolist()
        assert all(s % 10 == 0 for s in col_starts)  # non-overlapping, aligned sequences
        assert torch.equal(b.input, torch.tensor(col_starts)[None, :] + torch.arange(10)[:, None])
        starts += col_starts
    assert len(set(starts)) == 99 and max(starts) <= 990  # each sequence at most once, last one ends at 1000
    assert ts.tokens_per_epoch == 33 * 3 * 10
    assert starts != sorted(starts)


def test_determinism_and_epochs_differ():
    data = stream(5000)
    a = TrainStream(data, 8, 20, shuffle=True, seed=3)
    b = TrainStream(data, 8, 20, shuffle=True, seed=3)
    assert as_lists(a.batches(2)) == as_lists(b.batches(2))
    assert as_lists(a.batches(2)) != as_lists(a.batches(3))
    assert as_lists(a.batches(2)) != as_lists(TrainStream(data, 8, 20, shuffle=True, seed=4).batches(2))
    # The same epoch again, after other epochs were drawn, is identical (pure function of (seed, epoch)).
    first = as_lists(a.batches(1))
    list(a.batches(9))
    assert as_lists(a.batches(1)) == first


@pytest.mark.parametrize("kw", [dict(), dict(shuffle=True), dict(variable_bptt=True)])
def test_resume_with_start(kw):
    ts = TrainStream(stream(3000), 5, 13, seed=11, **kw)
    for epoch in (0, 4):
        full = as_lists(ts.batches(epoch))
        assert len(full) == ts.num_batches(epoch)
        for k in (0, 1, len(full) // 2, len(full)):
            assert as_lists(TrainStream(stream(3000), 5, 13, seed=11, **kw).batches(epoch, start=k)) == full[k:]
    with pytest.raises(ValueError):
        list(ts.batches(0, start=ts.num_batches(0) + 1))


def test_variable_bptt():
    data = stream(200_000)
    bptt = 70
    ts = TrainStream(data, 4, bptt, variable_bptt=True, seed=1)
    lengths = []
    for epoch in range(3):
        batches = list(ts.batches(epoch))
        assert len(batches) == ts.num_batches(epoch)
        inputs = torch.cat([b.input for b in batches])
        assert inputs.shape[0] == 200_000 // 4 - 1  # all rows covered exactly once, in order
        assert torch.equal(inputs[:, 0], torch.arange(inputs.shape[0]))
        for b in batches:
            length = b.input.shape[0]
            assert b.target.shape == b.input.shape and torch.equal(b.target, b.input + 1)
            assert b.lr_scale == pytest.approx(length / bptt)
            assert length <= bptt + 20
        lengths += [b.input.shape[0] for b in batches[:-1]]
        assert min(lengths) >= 5
    assert ts.num_batches(0) != ts.num_batches(1) or as_lists(ts.batches(0)) != as_lists(ts.batches(1))
    short = sum(1 for n in lengths if n < 50) / len(lengths)
    assert 0.01 < short < 0.12  # about 5% of batches draw base bptt/2
    long = [n for n in lengths if n >= 50]
    assert abs(sum(long) / len(long) - bptt) < 1.0
    assert len(set(lengths)) > 10


def test_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.get_rng_state().clone()
    for kw in (dict(), dict(shuffle=True), dict(variable_bptt=True)):
        ts = TrainStream(stream(4000), 4, 16, seed=5, **kw)
        list(ts.batches(0))
        ts.num_batches(1)
    list(EvalStream(stream(100), 3, 7, bos_id=0))
    assert torch.equal(torch.get_rng_state(), before)


def test_train_stream_errors():
    with pytest.raises(DataError, match="batch_size"):
        TrainStream(stream(5), 4, 3)
    with pytest.raises(DataError, match="batch_size"):
        TrainStream(stream(30), 4, 10, shuffle=True)
    with pytest.raises(ConfigError):
        TrainStream(stream(100), 4, 10, shuffle=True, variable_bptt=True)
    with pytest.raises(ConfigError):
        TrainStream(stream(100), 0, 10)


def test_eval_batch_size_one_is_whole_stream():
    data = torch.arange(1, 11)
    (c,) = list(EvalStream(data, 1, 100, bos_id=0))
    assert c.input[:, 0].tolist() == list(range(0, 10)) and c.target[:, 0].tolist() == list(range(1, 11))
    assert bool(c.mask.all())


def test_eval_empty():
    with pytest.raises(DataError):
        list(EvalStream(torch.zeros(0, dtype=torch.long), 2, 5, bos_id=0))


def test_word_corpus_batches(ptb_root):
    from flipout_lstm.config import DataConfig
    from flipout_lstm.data import open_corpus

    c = open_corpus(DataConfig(level="word", root=str(ptb_root), download=False))
    ts = TrainStream(c.train, 20, 35)
    assert ts.num_batches(0) == math.ceil((929_589 // 20 - 1) / 35) == 1328
    assert sum(ch.num_tokens for ch in EvalStream(c.test, 10, 35, c.vocab.eos_id)) == 82_430
