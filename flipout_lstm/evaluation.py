"""Scoring a split: mean negative log-likelihood, bits per character, perplexity.

For N scored tokens with summed loss L (nats): mean loss ``ℓ = L / N``, bits per character
``bpc = ℓ / ln 2`` and perplexity ``ppl = exp(ℓ)``. The stream is scored with the hidden state
carried from chunk to chunk; with batch size 1 it is one unbroken stream (the exact figure).
A larger batch splits it into columns; each column first reads, unscored, the ``W`` tokens
that precede its start (``data.eval_warmup``), which brings the figure to that of batch size 1
(a column started from a zero state instead is slightly pessimistic).
"""
from __future__ import annotations

import math

import torch
from tqdm import tqdm

from flipout_lstm import distributed
from flipout_lstm.data import EvalStream
from flipout_lstm.distributed import Context
from flipout_lstm.model import cross_entropy_sum, detach_state


# Default warm-up (tokens) when ``data.eval_warmup`` is null, per level. Measured (README,
# "Exact scores at batch speed"): on a 256-unit character model at 2.49 bpc (PTB valid), batch
# 1024 is 0.006 bpc above batch 1 with no warm-up, 5e-6 with 10 characters, 1e-7 with 50; the
# defaults leave a wide margin for stronger models, whose memory is longer, at a cost of about
# B * W extra token steps (6% of a character split at B = 128, 8% of a word split at B = 64).
DEFAULT_WARMUP = {"char": 200, "word": 100}


def eval_warmup(data_cfg) -> int:
    """The warm-up of a recipe's evaluation: ``data.eval_warmup``, or the level's default."""
    if data_cfg.eval_warmup is not None:
        return data_cfg.eval_warmup
    return DEFAULT_WARMUP.get(data_cfg.level, DEFAULT_WARMUP["word"])


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: torch.Tensor, *, batch_size: int, bptt: int,
             bos_id: int, device: torch.device, ctx: Context = Context(), warmup: int = 0,
             reset_every: int = 0, progress: bool = False) -> dict:
    """Score every token of ``data``; returns ``{"loss": mean nats, "tokens": N}``.

    ``warmup`` W: each column first reads the W tokens before its start, unscored, so a
    batch of columns scores (nearly) what batch size 1 does; ``reset_every`` N: the state is
    zeroed every N tokens (the training condition of windowed runs). The layout and its math:
    :class:`flipout_lstm.data.EvalStream`. ``progress`` shows a tqdm bar over the sequential steps.

    Under DDP (``ctx``) each rank scores its share of the ``batch_size`` columns (each column
    is its own stream, so the split changes nothing) and the summed nats and token counts are
    added over ranks: every rank returns the one-process figure.
    """
    was_training = model.training
    model.eval()
    total, count, state = 0.0, 0, None
    cols = ctx.share(batch_size)
    chunks = EvalStream(data, batch_size, bptt, bos_id, warmup=warmup, reset_every=reset_every)
    bar = tqdm(total=chunks.rows, unit="step", desc="scoring", disable=not progress, leave=False,
               dynamic_ncols=True)
    try:
        for batch in chunks:
            if cols.start == cols.stop:
                break  # more ranks than columns: this one scores nothing
            if batch.reset is not None and state is not None:  # these columns start afresh
                reset = batch.reset[cols].to(device).unsqueeze(1)
                state = [(h.masked_fill(reset, 0.0), c.masked_fill(reset, 0.0)) for h, c in state]
            logits, state, _ = model(batch.input[:, cols].to(device), state)
            state = detach_state(state)
            mask = batch.mask[:, cols].to(device)
            total += cross_entropy_sum(logits, batch.target[:, cols].to(device), mask).item()
            count += int(mask.sum())
            bar.update(batch.input.shape[0])
            if count and bar.n % (10 * bptt) < batch.input.shape[0]:  # a running figure now and then
                bar.set_postfix_str(f"loss {total / count:.4f}", refresh=False)
    finally:
        bar.close()
        model.train(was_training)
    if ctx.enabled:
        total, count = distributed.sum_over_ranks(total, count)
        count = int(count)
    return {"loss": total / count, "tokens": count}


@torch.no_grad()
def evaluate_mc(model: torch.nn.Module, data: torch.Tensor, *, samples: int, batch_size: int,
                bptt: int, bos_id: int, device: torch.device, warmup: int = 0,
                reset_every: int = 0, progress: bool = False) -> dict:
    """Score ``data`` under the predictive distribution averaged over ``samples`` noise draws.

    With K draws ``ε_k`` of the model's noise (dropout masks, weight perturbations, zoneout),
    each token's probability is averaged, not its loss:

        p̄(w_t) = (1/K) Σ_k p(w_t | w_<t, ε_k),   log p̄(w_t) = logsumexp_k log p_k(w_t) − log K

    and the figure is ``−mean_t log p̄(w_t)`` (by Jensen at most the mean of the K losses).
    The model runs in training mode for the noise only (no gradient); draw k keeps its own
    hidden state from chunk to chunk and, as in training, fresh noise in every chunk. The
    columns, warm-up and resets are :func:`evaluate`'s. With no noise in the model every draw
    is the deterministic prediction, so the figure is :func:`evaluate`'s. Returns
    ``{"loss": mean nats, "tokens": N, "samples": K}``.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    was_training = model.training
    model.train()  # the noise on; no_grad keeps it a pure evaluation
    total, count, states = 0.0, 0, [None] * samples
    chunks = EvalStream(data, batch_size, bptt, bos_id, warmup=warmup, reset_every=reset_every)
    bar = tqdm(total=chunks.rows * samples, unit="step", desc=f"scoring x{samples}",
               disable=not progress, leave=False, dynamic_ncols=True)
    try:
        for batch in chunks:
            inp, target = batch.input.to(device), batch.target.to(device)
            logps = []
            for k in range(samples):
                state = states[k]
                if batch.reset is not None and state is not None:  # these columns start afresh
                    reset = batch.reset.to(device).unsqueeze(1)
                    state = [(h.masked_fill(reset, 0.0), c.masked_fill(reset, 0.0)) for h, c in state]
                logits, state, _ = model(inp, state)
                states[k] = detach_state(state)
                logps.append(torch.log_softmax(logits.float(), dim=-1)
                             .gather(-1, target.unsqueeze(-1)).squeeze(-1))
                bar.update(inp.shape[0])
            mixed = torch.logsumexp(torch.stack(logps), dim=0) - math.log(samples)
            mask = batch.mask.to(device)
            total -= mixed.masked_select(mask).sum().item()
            count += int(mask.sum())
    finally:
        bar.close()
        model.train(was_training)
    return {"loss": total / count, "tokens": count, "samples": samples}


def raw_bpc(loss: float, tokens: int, chars: int | None) -> dict:
    """Bits per character of the raw text, one scale for every tokenizer: ``{"bpc_raw": ...}``.

    ``bpc_raw = ℓ · N / ln 2 / C``: the split's total loss in nats (mean ``ℓ`` over its ``N``
    tokens, every ``<eos>`` included) in bits, over ``C``, its raw character count (each
    line's characters plus one for its end; :mod:`flipout_lstm.data.cache`). Empty when ``C`` is unknown.
    """
    if not chars:
        return {}
    return {"bpc_raw": loss * tokens / math.log(2.0) / chars}
