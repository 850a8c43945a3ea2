"""TrainStream and EvalStream: layouts, determinism, resuming, exact evaluation coverage."""
import math

import pytest
import torch

from flipout_lstm.data import Batch, EvalBatch, EvalStream, TrainStream
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


@pytest.mark.parametrize("n,batch_size,bptt", [(1, 1, 5), (10, 1, 3), (10, 3, 2), (17, 4, 3), (5, 4, 2),
                                               (9, 4, 100), (1000, 7, 35), (3, 8, 1)])
def test_eval_stream_covers_every_token_once(n, batch_size, bptt):
    data = torch.randint(1, 50, (n,), generator=torch.Generator().manual_seed(n)) * 1000 + torch.arange(n)
    bos = 0
    chunks = list(EvalStream(data, batch_size, bptt, bos_id=bos))
    assert all(isinstance(c, EvalBatch) for c in chunks)
    rows = math.ceil(n / batch_size)
    assert [c.input.shape[0] for c in chunks] == [min(bptt, rows - i) for i in range(0, rows, bptt)]
    inputs = torch.cat([c.input for c in chunks])
    targets = torch.cat([c.target for c in chunks])
    mask = torch.cat([c.mask for c in chunks])
    assert inputs.shape == targets.shape == mask.shape == (rows, batch_size) and mask.dtype == torch.bool
    assert int(mask.sum()) == n == sum(c.num_tokens for c in chunks)
    # Column-major order of the masked targets is exactly the data.
    assert torch.equal(targets.t()[mask.t()], data)
    # Each input is the token preceding its target in [bos] + data.
    prev = torch.cat([torch.tensor([bos]), data[:-1]])
    assert torch.equal(inputs.t()[mask.t()], prev)
    # Within a column, the input at t+1 is the target at t (the caller can carry the state).
    assert torch.equal(inputs[1:][mask[1:]], targets[:-1][mask[1:]])


def test_eval_batch_size_one_is_whole_stream():
    data = torch.arange(1, 11)
    (c,) = list(EvalStream(data, 1, 100, bos_id=0))
    assert c.input[:, 0].tolist() == list(range(0, 10)) and c.target[:, 0].tolist() == list(range(1, 11))
    assert bool(c.mask.all())


def test_eval_empty():
    with pytest.raises(DataError):
        list(EvalStream(torch.zeros(0, dtype=torch.long), 2, 5, bos_id=0))


def test_word_corpus_batches(ptb_root):
    from flipout_lstm.data import load_corpus

    c = load_corpus("word", ptb_root)
    ts = TrainStream(c.train, 20, 35)
    assert ts.num_batches(0) == math.ceil((929_589 // 20 - 1) / 35) == 1328
    assert sum(ch.num_tokens for ch in EvalStream(c.test, 10, 35, c.vocab.eos_id)) == 82_430
