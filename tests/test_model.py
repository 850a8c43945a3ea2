"""The language model's pieces: embedding dropout, locked dropout, init, tying, one-hot input."""
import pytest
import torch

from flipout_lstm.config import LSTMConfig, ModelConfig
from flipout_lstm.model import LanguageModel, embedding_dropout, orthogonal_lstm_init_, sequence_dropout
from flipout_lstm.nn import LSTM


def test_embedding_dropout_drops_whole_word_types():
    torch.manual_seed(0)
    weight = torch.randn(1000, 8)
    dropped = embedding_dropout(weight, 0.3, training=True)
    zero_rows = (dropped == 0).all(dim=1)
    kept = ~zero_rows
    # Rows are either entirely zero or entirely scaled by 1/(1-p): every occurrence of a
    # dropped word type is dropped.
    assert torch.allclose(dropped[kept], weight[kept] / 0.7)
    # 1000 Bernoulli(0.3) draws: 300 ± 4.3 standard deviations (sd = 14.5).
    assert 237 < int(zero_rows.sum()) < 363
    assert embedding_dropout(weight, 0.3, training=False) is weight


def test_locked_dropout_mask_is_fixed_over_time_standard_is_not():
    torch.manual_seed(0)
    x = torch.ones(20, 4, 50)
    locked = sequence_dropout(x, 0.5, training=True, locked=True)
    assert torch.equal(locked, locked[0].expand_as(locked))
    assert set(locked.unique().tolist()) == {0.0, 2.0}
    standard = sequence_dropout(x, 0.5, training=True, locked=False)
    assert not torch.equal(standard, standard[0].expand_as(standard))
    assert torch.equal(sequence_dropout(x, 0.5, training=False, locked=True), x)


def test_orthogonal_init_makes_each_gate_block_orthogonal():
    lstm = LSTM(30, 20)
    orthogonal_lstm_init_(lstm)
    for block in lstm.weight_hh_l0.chunk(4, dim=0):
        assert torch.allclose(block @ block.t(), torch.eye(20), atol=1e-5)
    for block in lstm.weight_ih_l0.chunk(4, dim=0):  # 20 x 30: orthonormal rows
        assert torch.allclose(block @ block.t(), torch.eye(20), atol=1e-5)
    assert (lstm.bias_hh_l0 == 0).all() and (lstm.bias_ih_l0 == 0).all()


def test_tied_weights_share_storage_and_size_the_last_layer():
    cfg = ModelConfig(embedding_size=12, hidden_size=20, num_layers=3, tie_weights=True)
    model = LanguageModel(cfg, vocab_size=50)
    assert model.decoder.weight is model.embedding.weight
    assert [layer.hidden_size for layer in model.layers] == [20, 20, 12]
    untied = LanguageModel(ModelConfig(embedding_size=12, hidden_size=20, num_layers=3), 50)
    assert untied.num_parameters() - model.num_parameters() == 50 * 12 + (
        # the untied last layer is 20 wide instead of 12
        4 * 20 * (20 + 20) + 8 * 20 - (4 * 12 * (20 + 12) + 8 * 12)) + 50 * (20 - 12)


def test_onehot_input_is_a_lookup_into_the_input_weight():
    torch.manual_seed(0)
    cfg = ModelConfig(input="onehot", hidden_size=16, num_layers=1)
    model = LanguageModel(cfg, vocab_size=50).eval()
    assert model.embedding is None and model.layers[0].input_size == 50
    tokens = torch.randint(0, 50, (7, 3))
    logits, _, _ = model(tokens)
    dense, _ = model.layers[0](torch.nn.functional.one_hot(tokens, 50).float())
    assert torch.allclose(logits, model.decoder(dense), atol=1e-6)


def test_state_is_carried_and_eval_is_deterministic():
    torch.manual_seed(0)
    cfg = ModelConfig(embedding_size=8, hidden_size=8, num_layers=2, embedding_dropout=0.1,
                      input_dropout=0.4, layer_dropout=0.3, output_dropout=0.4,
                      lstm=LSTMConfig(weight_drop=0.5, flipout=True))
    model = LanguageModel(cfg, vocab_size=30)
    tokens = torch.randint(0, 30, (12, 5))
    model.eval()
    full, _, _ = model(tokens)
    first, state, _ = model(tokens[:5])
    second, _, _ = model(tokens[5:], state)
    assert torch.allclose(torch.cat([first, second]), full, atol=1e-6)
    assert torch.equal(model(tokens)[0], full)
    model.train()
    assert not torch.equal(model(tokens)[0], model(tokens)[0])  # noise is on in training


@pytest.mark.parametrize("field", ["weight_drop", "cell_dropout", "zoneout_cell", "hidden_dropout"])
def test_recipe_regularizers_reach_the_layer(field):
    cfg = ModelConfig(embedding_size=8, hidden_size=8, num_layers=2, lstm=LSTMConfig(**{field: 0.25}))
    model = LanguageModel(cfg, vocab_size=30)
    assert all(getattr(layer, field) == 0.25 for layer in model.layers)


def test_uniform_init_draws_every_weight_in_range_and_zeroes_the_lstm_biases():
    """model.init=uniform (Zaremba et al.): every weight U(-s, s), the LSTM biases (forget gate
    included) 0, the decoder bias drawn like the weights (as the TF PTB tutorial does)."""
    from flipout_lstm.config import ModelConfig

    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(init="uniform", init_scale=0.05, embedding_size=24,
                                      hidden_size=32, num_layers=2), vocab_size=300)
    for name, p in model.named_parameters():
        if name.startswith("layers.") and "bias" in name:
            assert torch.count_nonzero(p) == 0, name
        else:
            assert p.abs().max() <= 0.05 and p.abs().max() > 0.045, name  # the whole range is used
            assert abs(p.mean().item()) < 0.01 and abs(p.std().item() - 0.05 / 3 ** 0.5) < 0.005, name


def _torch_nll(logits, target):
    return torch.nn.functional.cross_entropy(logits.float(), target, reduction="none")


@pytest.mark.parametrize("rows", [1, 3, 7, 50])  # 7 leaves a ragged last block of 20 rows
def test_blocked_nll_is_torch_cross_entropy_in_float64(rows):
    from flipout_lstm.model import _BlockedNLL
    torch.manual_seed(0)
    logits = (3 * torch.randn(20, 11, dtype=torch.float64)).requires_grad_()
    target = torch.randint(0, 11, (20,))
    weights = torch.rand(20, dtype=torch.float64)  # a row-dependent upstream gradient
    ref = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), logits)
    got = _BlockedNLL.apply(logits, target, rows)
    (grad,) = torch.autograd.grad((got * weights).sum(), logits)
    assert torch.allclose(got.double(), ref, rtol=1e-6, atol=1e-6)  # lse is kept in float32
    assert torch.allclose(grad, ref_grad, rtol=1e-6, atol=1e-7)
    assert grad.dtype == logits.dtype


def test_blocked_nll_passes_gradcheck():
    from flipout_lstm.model import _BlockedNLL
    torch.manual_seed(1)
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 5, (6,))
    # lse is float32, so the loss is exact to about 1e-7: gradcheck's steps must see past that.
    assert torch.autograd.gradcheck(lambda z: _BlockedNLL.apply(z, target, 4), (logits,),
                                     eps=1e-3, atol=1e-4, rtol=1e-3)


def test_cross_entropy_sum_takes_blocks_above_the_threshold_with_the_same_numbers(monkeypatch):
    """Above BLOCKED_LOSS_ABOVE logits (lowered here to 100) the loss runs by blocks: the same
    loss to float32 rounding, masks applied, and bfloat16 logits get a bfloat16 gradient
    within bfloat16 rounding of torch's, with no float32 copy of the logits on the graph."""
    from flipout_lstm import model as lm_model
    torch.manual_seed(2)
    logits = (2 * torch.randn(5, 4, 30)).to(torch.bfloat16).requires_grad_()
    target = torch.randint(0, 30, (5, 4))
    mask = torch.rand(5, 4) > 0.3
    ref = lm_model.cross_entropy_sum(logits, target, mask)  # 600 logits: torch's path
    (ref_grad,) = torch.autograd.grad(ref, logits)
    monkeypatch.setattr(lm_model, "BLOCKED_LOSS_ABOVE", 100)
    monkeypatch.setattr(lm_model, "BLOCK_ELEMENTS", 64)  # 2 rows a block
    got = lm_model.cross_entropy_sum(logits, target, mask)
    (grad,) = torch.autograd.grad(got, logits)
    names = set()
    todo = [got.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None:
            names.add(type(fn).__name__)
            todo.extend(f for f, _ in fn.next_functions)
    assert "_BlockedNLLBackward" in names and "ToCopyBackward0" not in names
    assert torch.allclose(got, ref, rtol=1e-6)
    assert grad.dtype == torch.bfloat16
    assert torch.allclose(grad.float(), ref_grad.float(), rtol=1e-2, atol=1e-4)
    assert (grad.float().abs().sum(-1)[~mask] == 0).all()  # masked positions get no gradient
