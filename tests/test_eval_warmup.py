"""Batched evaluation with warm-up scores what batch size 1 does; resets every N tokens.

The layout (flipout_lstm.data.EvalStream) is checked token by token; the agreement with batch size 1 on
small character and word models trained here, on synthetic corpora with strong structure, until
they use their context.
"""
import math

import pytest
import torch

from flipout_lstm.config import ModelConfig, load_config
from flipout_lstm.data import EvalBatch, EvalStream
from flipout_lstm.errors import ConfigError
from flipout_lstm.evaluation import DEFAULT_WARMUP, eval_warmup, evaluate
from flipout_lstm.model import LanguageModel, cross_entropy_sum

CPU = torch.device("cpu")


def numbered_stream(n):
    """Distinct ids 1..n, so that every position of the layout can be traced to the stream."""
    return torch.arange(1, n + 1)


def columns(stream):
    """The whole layout, rows of every chunk stacked: inputs, targets, mask; and the chunks."""
    chunks = list(stream)
    inputs = torch.cat([c.input for c in chunks])
    targets = torch.cat([c.target for c in chunks])
    mask = torch.cat([c.mask for c in chunks])
    return inputs, targets, mask, chunks


# ----------------------------------------------------------------------------- the layout


@pytest.mark.parametrize("n,batch_size,bptt,warmup", [
    (1, 1, 5, 10), (10, 1, 3, 4), (17, 4, 3, 2), (17, 4, 3, 100), (5, 4, 2, 3), (1000, 7, 35, 50),
    (1000, 64, 7, 200), (3, 8, 1, 5), (500, 1024, 100, 64),
    # without warm-up (the default): the plain layout
    (1, 1, 5, 0), (10, 1, 3, 0), (10, 3, 2, 0), (17, 4, 3, 0), (5, 4, 2, 0), (9, 4, 100, 0),
    (1000, 7, 35, 0), (3, 8, 1, 0)])
def test_every_token_is_scored_once_after_its_warmup(n, batch_size, bptt, warmup):
    data = numbered_stream(n)
    stream = EvalStream(data, batch_size, bptt, bos_id=0, warmup=warmup)
    inputs, targets, mask, chunks = columns(stream)
    assert all(isinstance(c, EvalBatch) for c in chunks)
    assert all(c.input.shape[0] <= bptt for c in chunks) and len(chunks) == len(stream)
    assert inputs.shape == targets.shape == mask.shape == (stream.rows, batch_size)
    assert mask.dtype == torch.bool
    if warmup == 0:              # ceil(n / B) rows in chunks of bptt, no state reset
        rows = math.ceil(n / batch_size)
        assert stream.rows == rows and all(c.reset is None for c in chunks)
        assert [c.input.shape[0] for c in chunks] == [min(bptt, rows - i) for i in range(0, rows, bptt)]
    # Every token once, in order (column-major), each input the token before its target.
    assert int(mask.sum()) == n == sum(c.num_tokens for c in chunks)
    assert torch.equal(targets.t()[mask.t()], data)
    assert torch.equal(inputs.t()[mask.t()], torch.cat([torch.tensor([0]), data[:-1]]))
    # Within a column, the input at t+1 is the target at t (the caller can carry the state).
    assert torch.equal(inputs[1:][mask[1:]], targets[:-1][mask[1:]])
    # Column b first reads S[a_b : s_b], a_b = max(0, s_b - W), unscored, from a zero state.
    length = math.ceil(n / batch_size)
    for b in range(batch_size):
        start = b * length
        if start >= n:
            assert not mask[:, b].any()
            continue
        first = int(mask[:, b].nonzero()[0])
        begin = max(0, start - warmup)
        assert first - (start - begin) >= 0
        read = inputs[first - (start - begin):first, b]
        assert torch.equal(read, torch.arange(begin, start))  # S[p] = p for this stream (S[0] = bos = 0)
        # The state is zero where the column begins: row 0, or a chunk starting there resets it.
        row = first - (start - begin)
        if row > 0:
            starts = [sum(c.input.shape[0] for c in chunks[:i]) for i in range(len(chunks))]
            assert row in starts
            chunk = chunks[starts.index(row)]
            assert chunk.reset is not None and bool(chunk.reset[b])


def test_without_warmup_the_layout_is_the_plain_one():
    data = numbered_stream(1000)
    plain = list(EvalStream(data, 7, 35, bos_id=0))
    assert all(c.reset is None for c in plain) and [c.input.shape[0] for c in plain] == [35] * 4 + [3]
    padded = torch.cat([data, torch.zeros(1, dtype=torch.long)])  # 7 columns of 143
    assert torch.equal(torch.cat([c.target for c in plain]), padded.view(7, 143).t())


def test_bad_warmup_and_reset_values():
    with pytest.raises(ConfigError, match="warmup"):
        EvalStream(numbered_stream(10), 2, 5, 0, warmup=-1)
    with pytest.raises(ConfigError, match="reset_every"):
        EvalStream(numbered_stream(10), 2, 5, 0, reset_every=-3)
    with pytest.raises(ConfigError, match="data.eval_warmup"):
        load_config("recipes/char_ptb.yaml", ["data.eval_warmup=-1"])


def test_warmup_default_per_level_and_override():
    char = load_config("recipes/char_ptb.yaml")
    word = load_config("recipes/word_ptb.yaml")
    assert char.data.eval_warmup is None and eval_warmup(char.data) == DEFAULT_WARMUP["char"] > 0
    assert eval_warmup(word.data) == DEFAULT_WARMUP["word"] > 0
    assert eval_warmup(load_config("recipes/char_ptb.yaml", ["data.eval_warmup=7"]).data) == 7
    assert eval_warmup(load_config("recipes/char_ptb.yaml", ["data.eval_warmup=0"]).data) == 0


@pytest.mark.parametrize("n,batch_size,bptt,every", [(100, 1, 7, 10), (100, 3, 10, 10), (103, 4, 6, 25),
                                                     (50, 16, 5, 7), (9, 2, 4, 100)])
def test_reset_every_layout(n, batch_size, bptt, every):
    data = numbered_stream(n)
    inputs, targets, mask, chunks = columns(EvalStream(data, batch_size, bptt, 0, reset_every=every,
                                                         warmup=50))
    assert int(mask.sum()) == n and torch.equal(targets.t()[mask.t()], data)
    # The state is zero in front of exactly the positions p with p % every == 0.
    row = 0
    for chunk in chunks:
        for t in range(chunk.input.shape[0]):
            for b in range(batch_size):
                if not chunk.mask[t, b]:
                    continue
                p = int(chunk.target[t, b]) - 1  # target data[p] = p + 1
                starts_here = (row + t == 0) or (t == 0 and chunk.reset is not None and bool(chunk.reset[b]))
                assert starts_here == (p % every == 0), (p, b)
        row += chunk.input.shape[0]
    assert not (~mask & (inputs != 0)).any()  # no warm-up: nothing is read that is not scored


# ----------------------------------------------------------------------------- exactness on a model


def random_model(vocab, onehot=True, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(input="onehot" if onehot else "embedding", embedding_size=16, hidden_size=24,
                      num_layers=2)
    model = LanguageModel(cfg, vocab)
    with torch.no_grad():  # larger recurrent weights: a long memory, so that warm-up matters
        for p in model.parameters():
            p.mul_(3.0)
    return model.eval()


def score(model, data, **kw):
    kw.setdefault("bptt", 13)
    return evaluate(model, data, bos_id=0, device=CPU, **kw)


@pytest.mark.parametrize("onehot", [True, False])
def test_warmup_reaching_the_start_is_exact(onehot):
    """With W at least the longest history, every column reads from S[0]: batch 1 to rounding."""
    data = torch.randint(1, 20, (301,), generator=torch.Generator().manual_seed(1))
    model = random_model(20, onehot)
    exact = score(model, data, batch_size=1)
    for batch_size in (2, 7, 64):
        full = score(model, data, batch_size=batch_size, warmup=301)
        assert full["tokens"] == exact["tokens"] == 301
        assert full["loss"] == pytest.approx(exact["loss"], rel=1e-6, abs=1e-7)
    cold = score(model, data, batch_size=64, warmup=0)
    assert abs(cold["loss"] - exact["loss"]) > 1e-3  # this model's memory is long enough to matter


def test_reset_every_scores_each_window_from_a_zero_state():
    data = torch.randint(1, 20, (257,), generator=torch.Generator().manual_seed(2))
    model = random_model(20)
    every = 20
    stream = torch.cat([torch.tensor([0]), data])
    total = 0.0
    with torch.no_grad():
        for k in range(0, 257, every):  # window k: inputs S[k:k+N] predict data[k:k+N], zero state
            logits, _, _ = model(stream[k:min(k + every, 257)].unsqueeze(1))
            total += cross_entropy_sum(logits, data[k:k + every].unsqueeze(1)).item()
    expected = total / 257
    for batch_size in (1, 3, 16, 1000):
        for bptt in (7, 20, 100):
            r = score(model, data, batch_size=batch_size, bptt=bptt, reset_every=every, warmup=5)
            assert r["tokens"] == 257 and r["loss"] == pytest.approx(expected, rel=1e-6)
    assert score(model, data, batch_size=1)["loss"] != pytest.approx(expected, rel=1e-4)


# ----------------------------------------------------------------------------- trained models


def markov_words(n, seed, vocab=40, branch=3):
    """A second-order Markov chain over ``vocab`` words: each pair of words has ``branch``
    equally likely successors (a fixed table), so the next word needs two words of context."""
    table = torch.randint(0, vocab, (vocab, vocab, branch), generator=torch.Generator().manual_seed(99)).tolist()
    picks = torch.randint(0, branch, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    words = [0, 1]
    for k in range(n - 2):
        words.append(table[words[-2]][words[-1]][picks[k]])
    return words


def spelling(vocab=40):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(1, 27, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
            for _ in range(vocab)]


def char_stream(n_words, seed):
    """The words spelt out in letters 1..26, separated by spaces (27); 0 is the BOS id."""
    spelt = spelling()
    out = []
    for w in markov_words(n_words, seed):
        out += spelt[w] + [27]
    return torch.tensor(out)


def word_stream(n_words, seed):
    return torch.tensor(markov_words(n_words, seed, vocab=20, branch=2)) + 1  # 0 is the BOS id


def train_quickly(model, data, steps, lr, batch=32, length=40):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = (data.numel() - 1) // length
    inputs, targets = data[:n * length].view(n, length), data[1:n * length + 1].view(n, length)
    model.train()
    for _ in range(steps):  # windows from a zero state, as the paper's character runs
        idx = torch.randint(0, n, (batch,))
        logits, _, _ = model(inputs[idx].t())
        loss = cross_entropy_sum(logits, targets[idx].t()) / targets[idx].numel()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def char_model():
    torch.set_num_threads(1)
    model = LanguageModel(ModelConfig(input="onehot", hidden_size=64, num_layers=1), 28)
    return train_quickly(model, char_stream(20_000, 1), steps=120, lr=0.01), char_stream(3_000, 2)


def bpc(result):
    return result["loss"] / math.log(2)


def test_trained_char_model_batched_with_warmup_matches_batch_one(char_model):
    model, valid = char_model
    exact = bpc(score(model, valid, batch_size=1, bptt=100))
    assert exact < 1.5  # well below 3: the model predicts letters from the word they are in
    for batch_size in (64, 1024):
        warm = score(model, valid, batch_size=batch_size, bptt=100, warmup=DEFAULT_WARMUP["char"])
        assert warm["tokens"] == valid.numel()
        assert abs(bpc(warm) - exact) < 0.002, batch_size
    cold = bpc(score(model, valid, batch_size=1024, bptt=100, warmup=0))
    assert cold - exact > 0.02  # each of 1024 columns starts without the word it is in


def test_trained_word_model_batched_with_warmup_matches_batch_one():
    torch.set_num_threads(1)
    model = LanguageModel(ModelConfig(embedding_size=32, hidden_size=64, num_layers=1), 21)
    model = train_quickly(model, word_stream(20_000, 1), steps=150, lr=0.01, length=20)
    valid = word_stream(5_000, 2)
    ppl = lambda r: math.exp(r["loss"])  # noqa: E731
    exact = ppl(score(model, valid, batch_size=1, bptt=35))
    assert exact < 4  # of 20 words: it uses the two words of context (the chain's own ppl is 2)
    for batch_size in (64, 1024):
        warm = ppl(score(model, valid, batch_size=batch_size, bptt=35, warmup=DEFAULT_WARMUP["word"]))
        assert abs(warm / exact - 1) < 0.002, batch_size
    cold = ppl(score(model, valid, batch_size=1024, bptt=35, warmup=0))
    assert cold / exact - 1 > 0.01
