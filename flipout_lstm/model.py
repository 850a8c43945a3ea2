"""The language model: input lookup, a stack of regularized LSTM layers, a linear decoder.

    x_t = E[w_t]            (embedding, rows dropped whole by embedding dropout)
      or  one-hot(w_t)      (characters: a lookup into the first layer's input weight)
    h^1..h^L = LSTM layers  (recurrent regularizers live inside flipout_lstm.nn.LSTM)
    logits_t = D h^L_t + b  (D optionally tied to E)

Non-recurrent dropout (inputs, between layers, outputs) is either "locked" — one mask per
sequence, reused at every step (Gal; AWD-LSTM) — or "standard", a fresh mask per step
(Zaremba). Each layer is its own single-layer LSTM so that these masks, and tied weights
with a last layer of embedding size, fit between them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flipout_lstm.config import ModelConfig
from flipout_lstm.nn import LSTM


@dataclass(frozen=True)
class Columns:
    """A model that computes columns ``cols`` of a batch of ``total`` (a DDP rank's share).

    Every random draw that depends on the batch (dropout masks, flipout signs, per-sequence
    masks) is made for all ``total`` columns and cut to ``cols``, and the draws that do not
    (the base perturbation ΔŴ, embedding dropout's word mask) are the same on every rank, so
    that with one generator state on all ranks the ranks together compute what one process
    computes on the whole batch: ``W`` ranks perturb a batch with one shared ΔŴ, as the
    paper's baselines do, not with ``W`` independent ones.
    """

    cols: slice
    total: int


def embedding_dropout(weight: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Zero whole rows (word types) of the embedding matrix with probability p.

    ``E' = E ∘ (m / (1 - p))`` with ``m_v ~ Bernoulli(1 - p)`` per row v, one mask for the
    whole mini-batch, so every occurrence of a dropped word is dropped (Gal & Ghahramani).
    """
    if not training or p == 0.0:
        return weight
    mask = weight.new_empty(weight.size(0), 1).bernoulli_(1 - p) / (1 - p)
    return weight * mask


def sequence_dropout(x: torch.Tensor, p: float, training: bool, locked: bool,
                     columns: Columns | None = None) -> torch.Tensor:
    """Dropout on a (T, B, H) sequence: one mask per sequence if ``locked``, else per step.

    ``columns``: ``x`` holds these columns of a larger batch (a DDP rank's share); the mask is
    drawn for the whole batch and cut, so that it is the one a single process would draw.
    """
    if not training or p == 0.0:
        return x
    if columns is None and not locked:
        return F.dropout(x, p, training=True)
    T, B, H = x.shape
    if columns is not None:
        B = columns.total
    mask = x.new_empty(1 if locked else T, B, H).bernoulli_(1 - p)  # as F.dropout draws on CPU
    if columns is not None:
        mask = mask[:, columns.cols]
    return x * (mask / (1 - p))


def orthogonal_lstm_init_(lstm: nn.Module) -> None:
    """Each gate block of every LSTM matrix orthogonal, biases zero (the paper's char setup)."""
    for name, param in lstm.named_parameters():
        with torch.no_grad():
            if name.startswith("weight"):
                for block in param.chunk(4, dim=0):
                    nn.init.orthogonal_(block)
            else:
                param.zero_()


def uniform_init_(model: nn.Module, scale: float) -> None:
    """Every weight U(-scale, scale), the LSTM biases 0 (Zaremba et al. 2014, as in the
    TensorFlow PTB tutorial: its cells start with forget-gate bias 0, its softmax bias is drawn
    like the weights)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("layers.") and ".bias" in name:
                param.zero_()
            else:
                param.uniform_(-scale, scale)


class LanguageModel(nn.Module):
    """Word or character LSTM language model; ``forward`` maps (T, B) ids to (T, B, V) logits."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.columns: Columns | None = None  # set under DDP: this rank's share of each batch
        onehot = cfg.input == "onehot"
        self.embedding = None if onehot else nn.Embedding(vocab_size, cfg.embedding_size)
        in_size = vocab_size if onehot else cfg.embedding_size
        sizes = []
        for layer in range(cfg.num_layers):
            last = layer == cfg.num_layers - 1
            # A tied decoder reads the last layer, so that layer has the embedding's width.
            out = cfg.embedding_size if (last and cfg.tie_weights) else cfg.hidden_size
            sizes.append((in_size, out))
            in_size = out
        regularizers = vars(cfg.lstm)
        self.layers = nn.ModuleList(LSTM(i, h, **regularizers) for i, h in sizes)
        if cfg.init == "orthogonal":
            for layer in self.layers:
                orthogonal_lstm_init_(layer)
        self.decoder = nn.Linear(in_size, vocab_size)
        if cfg.tie_weights:
            self.decoder.weight = self.embedding.weight
        if self.embedding is not None:
            # AWD-LSTM's uniform init: small enough that dropped rows do not dominate.
            nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
            nn.init.zeros_(self.decoder.bias)
            if not cfg.tie_weights:
                nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        if cfg.init == "uniform":
            uniform_init_(self, cfg.init_scale)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, tokens: torch.Tensor, state=None, noise=None):
        """Return ``(logits, state, (raw, dropped))``.

        ``state`` is a list of per-layer ``(h, c)`` (or None for zeros); ``raw`` and ``dropped``
        are the last layer's output before and after output dropout, for AR/TAR. ``noise``, a
        list with one ``LSTM.sample_noise(...)`` result (or None) per layer, pins the recurrent
        noise instead of sampling it (the gradient-variance experiment shares base
        perturbations across sub-batches this way).
        """
        cfg, training, cols = self.cfg, self.training, self.columns
        locked = cfg.dropout_type == "locked"
        if self.embedding is None:
            x = tokens  # integer ids: flipout_lstm.nn.LSTM looks them up in the input weight's columns
        else:
            weight = embedding_dropout(self.embedding.weight, cfg.embedding_dropout, training)
            x = F.embedding(tokens, weight)
            x = sequence_dropout(x, cfg.input_dropout, training, locked, cols)
        new_state = []
        for k, layer in enumerate(self.layers):
            # Per-layer state is kept as (B, H); a one-layer LSTM wants (1, B, H).
            hx = None if state is None else (state[k][0].unsqueeze(0), state[k][1].unsqueeze(0))
            pinned = None if noise is None else noise[k]
            if pinned is None and cols is not None and training:  # the whole batch's draw, cut
                pinned = layer.sample_noise(cols.total, seq_len=tokens.size(0)).columns(cols.cols)
            x, (h, c) = layer(x, hx, noise=pinned)
            new_state.append((h.squeeze(0), c.squeeze(0)))
            if k < len(self.layers) - 1:
                x = sequence_dropout(x, cfg.layer_dropout, training, locked, cols)
        raw = x
        dropped = sequence_dropout(raw, cfg.output_dropout, training, locked, cols)
        return self.decoder(dropped), new_state, (raw, dropped)


def detach_state(state):
    """Truncated BPTT: keep the values of the carried state, cut its history."""
    if state is None:
        return None
    return [(h.detach(), c.detach()) for h, c in state]


# The loss's float32 intermediates (the logits' copy, the log-softmax, its gradient) are as big
# as the logits, so for the large-batch recipe (44,800 rows x 10,000 words: 1.8 GB each) they
# cost more than the decoder's products (their pages faulted in afresh every step, and the
# peak memory); above this many logits the loss runs by row blocks instead, measured in
# docs/performance.md ("The loss by row blocks"). Below it torch's own cross-entropy stays: at
# the paper's batch, heap kept, a step with blocks runs at 0.84x its speed; near the threshold
# the two are within 7%; and the word and char rows keep its numerics.
BLOCKED_LOSS_ABOVE = 1 << 26
BLOCK_ELEMENTS = 1 << 18  # a block's float32 logits: 1 MiB, about a core's L2 cache


class _BlockedNLL(torch.autograd.Function):
    """Per-row negative log-likelihood of 2-D ``logits`` (any float dtype) at ``target``:

        loss_i = lse_i − z_{i,y_i},   lse_i = log Σ_v exp z_{i,v}   (in float32)
        ∂loss_i/∂z_{i,v} = softmax(z_i)_v − [v = y_i]

    computed ``rows`` rows at a time, so nothing of the logits' size but the logits and their
    gradient (in the logits' dtype) is ever allocated. Saves the logits and ``lse``; the
    backward recomputes each block's softmax from them."""

    @staticmethod
    def forward(ctx, logits, target, rows):
        lse = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
        for start in range(0, logits.size(0), rows):
            lse[start:start + rows] = torch.logsumexp(logits[start:start + rows].float(), dim=1)
        ctx.save_for_backward(logits, target, lse)
        ctx.rows = rows
        return lse - logits.gather(1, target[:, None]).squeeze(1).float()

    @staticmethod
    def backward(ctx, grad_rows):
        logits, target, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.size(0), ctx.rows):
            end = min(start + ctx.rows, logits.size(0))
            block = torch.exp(logits[start:end].float() - lse[start:end, None])
            block[torch.arange(end - start, device=block.device), target[start:end]] -= 1
            grad[start:end] = block.mul_(grad_rows[start:end, None])
        return grad, None, None


def cross_entropy_sum(logits: torch.Tensor, target: torch.Tensor, mask=None) -> torch.Tensor:
    """Summed negative log-likelihood in nats over (optionally masked) positions.

    The log-softmax runs in float32 whatever the logits' dtype (bfloat16 under autocast): a
    sum over a 10,000-word vocabulary in bfloat16 would lose the loss's low digits. Above
    ``BLOCKED_LOSS_ABOVE`` logits it runs by row blocks (:class:`_BlockedNLL`), the same
    function to float32 rounding."""
    flat, flat_target = logits.reshape(-1, logits.size(-1)), target.reshape(-1)
    if flat.numel() > BLOCKED_LOSS_ABOVE:
        loss = _BlockedNLL.apply(flat, flat_target, max(1, BLOCK_ELEMENTS // flat.size(1)))
    else:
        loss = F.cross_entropy(flat.float(), flat_target, reduction="none")
    if mask is not None:
        loss = loss * mask.reshape(-1).to(loss.dtype)
    return loss.sum()


def training_loss(logits, target, raw, dropped, ar: float = 0.0, tar: float = 0.0):
    """The mean cross-entropy per token, and the objective the step minimises:

        total = loss + ar · mean(dropped²) + tar · mean((raw[t] − raw[t−1])²)

    AR penalises large activations after the output dropout, TAR fast-changing hidden states
    before it (Merity et al.'s AWD-LSTM); ``raw`` and ``dropped`` are the model's last-layer
    outputs. Returns ``(loss, total)``: the loss is what the run logs."""
    loss = cross_entropy_sum(logits, target) / target.numel()
    total = loss
    if ar:
        total = total + ar * dropped.float().pow(2).mean()
    if tar:
        total = total + tar * (raw[1:] - raw[:-1]).float().pow(2).mean()
    return loss, total
