"""Cutting a 1-D token stream into (time, batch) training and evaluation batches.

All tensors are time-major: ``(T, B)``. A target is always the token that follows
its input token in the stream.

Training (:class:`TrainStream`) has two layouts:

* ``shuffle=False`` (word level; character level with the state carried): the
  stream ``x[0..N)`` is truncated to ``R * B`` tokens, ``R = N // B``, and laid out in
  ``B`` contiguous columns, column ``b`` holding ``x[b*R : (b+1)*R]``; row ``t`` is
  ``(x[t], x[R+t], x[2R+t], ...)``. Batch ``k`` covers rows ``[i, i+L)`` as input and
  rows ``[i+1, i+1+L)`` as target, consecutive batches following each other so the
  trainer can carry the hidden state across them. One epoch predicts ``(R-1) * B``
  tokens in ``ceil((R-1) / bptt)`` batches (fixed BPTT).
* ``shuffle=True`` (character level as in the paper, state not carried): the stream
  is cut into ``S = (N-1) // bptt`` non-overlapping sequences of ``bptt + 1`` tokens,
  sequence ``s`` being ``x[s*bptt : s*bptt + bptt + 1]`` (consecutive sequences share
  one boundary token), with input ``seq[:-1]`` and target ``seq[1:]``. Each epoch
  permutes the sequences and groups them ``B`` at a time, dropping the last incomplete
  batch: ``S // B`` batches of ``(bptt, B)``.

Variable BPTT (AWD-LSTM style, only with ``shuffle=False``): for each batch,
``base = bptt`` with probability 0.95 else ``bptt / 2``;
``L = max(5, int(base + 5 * z))`` with ``z ~ N(0, 1)``, capped at ``bptt + 20`` and at
the rows that remain; the batch's ``lr_scale = L / bptt`` (the trainer multiplies the
learning rate by it so that longer sequences do not get a larger effective step).

Every random draw comes from a private ``torch.Generator`` seeded from
``(seed, epoch)``, never the global RNG, so an epoch's batch schedule is a pure
function of ``(seed, epoch)`` and ``batches(epoch, start=k)`` resumes an epoch exactly.

Evaluation (:class:`EvalStream`) scores every token of a split exactly once, with an optional
warm-up that makes a large batch agree with batch size 1 (see its docstring).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from flipout_lstm.errors import ConfigError, DataError
from flipout_lstm.seeds import derived_seed

VAR_BPTT_LONG_PROB = 0.95
VAR_BPTT_STD = 5.0
VAR_BPTT_MIN = 5
VAR_BPTT_MAX_EXTRA = 20


@dataclass
class Batch:
    """One training batch: ``input`` and ``target`` are ``(T, B)`` LongTensors.

    ``lr_scale`` is ``T / bptt`` under variable BPTT and ``1.0`` otherwise.
    """

    input: torch.Tensor
    target: torch.Tensor
    lr_scale: float = 1.0


@dataclass
class EvalBatch:
    """One evaluation chunk: ``input``, ``target`` ``(T, B)`` LongTensors and a bool ``mask``.

    Only positions with ``mask`` True are scored targets; padding holds ``bos_id``. ``reset``,
    a ``(B,)`` bool or None, marks the columns whose state is zeroed before this chunk.
    """

    input: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor
    reset: Optional[torch.Tensor] = None

    @property
    def num_tokens(self) -> int:
        """How many targets this chunk scores."""
        return int(self.mask.sum())


def _check_stream(data: torch.Tensor) -> torch.Tensor:
    if not isinstance(data, torch.Tensor) or data.dim() != 1:
        raise TypeError("data must be a 1-D tensor of token ids")
    if data.dtype != torch.long:
        data = data.long()
    return data


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}; fix the recipe")


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A fresh CPU generator seeded from ``(seed, epoch)`` (SHA-256 of ``"seed:epoch"``)."""
    g = torch.Generator()
    g.manual_seed(derived_seed(int(seed), int(epoch)))
    return g


class TrainStream:
    """Training batches of one split; see the module docstring for the layouts.

    ``num_batches(epoch)`` and ``batches(epoch, start)`` depend only on the constructor
    arguments and ``epoch``.
    """

    def __init__(self, data: torch.Tensor, batch_size: int, bptt: int, *,
                 variable_bptt: bool = False, shuffle: bool = False, seed: int = 0):
        data = _check_stream(data)
        _check_positive(batch_size=batch_size, bptt=bptt)
        if variable_bptt and shuffle:
            raise ConfigError("variable_bptt needs the contiguous layout (shuffle=False); disable one of them")
        self.batch_size = batch_size
        self.bptt = bptt
        self.variable_bptt = bool(variable_bptt)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        n = data.numel()
        self._schedule_cache: tuple[int, list[tuple[int, int]]] | None = None
        if shuffle:
            self.num_sequences = (n - 1) // bptt if n > 0 else 0
            if self.num_sequences < batch_size:
                raise DataError(
                    f"a split of {n} tokens gives {self.num_sequences} sequences of {bptt}+1 tokens, fewer than "
                    f"batch_size {batch_size}; lower batch_size or bptt, or use a larger corpus"
                )
            used = self.num_sequences * bptt
            self._inputs = data[:used].view(self.num_sequences, bptt)
            self._targets = data[1:used + 1].view(self.num_sequences, bptt)
        else:
            self.rows = n // batch_size
            if self.rows < 2:
                raise DataError(
                    f"a split of {n} tokens is too short for batch_size {batch_size} (needs at least "
                    f"{2 * batch_size} tokens); lower batch_size or use a larger corpus"
                )
            self._cols = data[: self.rows * batch_size].view(batch_size, self.rows).t().contiguous()

    # --- schedule -----------------------------------------------------------
    def _schedule(self, epoch: int) -> list[tuple[int, int]]:
        """(first row, length) of each batch of a contiguous-layout epoch."""
        if self._schedule_cache is not None and self._schedule_cache[0] == epoch:
            return self._schedule_cache[1]
        last = self.rows - 1  # rows that can serve as inputs
        sched: list[tuple[int, int]] = []
        i = 0
        if self.variable_bptt:
            g = epoch_generator(self.seed, epoch)
            cap = self.bptt + VAR_BPTT_MAX_EXTRA
            while i < last:
                u = float(torch.rand((), generator=g, dtype=torch.float64))
                z = float(torch.randn((), generator=g, dtype=torch.float64))
                base = self.bptt if u < VAR_BPTT_LONG_PROB else self.bptt / 2
                length = min(max(VAR_BPTT_MIN, int(base + VAR_BPTT_STD * z)), cap, last - i)
                sched.append((i, length))
                i += length
        else:
            while i < last:
                length = min(self.bptt, last - i)
                sched.append((i, length))
                i += length
        self._schedule_cache = (epoch, sched)
        return sched

    def num_batches(self, epoch: int) -> int:
        """Number of batches in ``epoch`` (varies per epoch only under variable BPTT)."""
        if self.shuffle:
            return self.num_sequences // self.batch_size
        if not self.variable_bptt:
            return math.ceil((self.rows - 1) / self.bptt)
        return len(self._schedule(epoch))

    @property
    def tokens_per_epoch(self) -> int:
        """Targets predicted per epoch (the same every epoch)."""
        if self.shuffle:
            return (self.num_sequences // self.batch_size) * self.batch_size * self.bptt
        return (self.rows - 1) * self.batch_size

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` in order, skipping the first ``start`` (to resume)."""
        total = self.num_batches(epoch)
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= total:
            raise ValueError(f"start must be an integer in [0, {total}] for epoch {epoch}, got {start!r}")
        if self.shuffle:
            return self._shuffled(epoch, start)
        return self._contiguous(epoch, start)

    def _contiguous(self, epoch: int, start: int) -> Iterator[Batch]:
        for i, length in self._schedule(epoch)[start:]:
            scale = length / self.bptt if self.variable_bptt else 1.0
            yield Batch(self._cols[i:i + length], self._cols[i + 1:i + 1 + length], scale)

    def _shuffled(self, epoch: int, start: int) -> Iterator[Batch]:
        perm = torch.randperm(self.num_sequences, generator=epoch_generator(self.seed, epoch))
        perm = perm.to(self._inputs.device)
        B = self.batch_size
        for k in range(start, self.num_sequences // B):
            idx = perm[k * B:(k + 1) * B]
            yield Batch(self._inputs[idx].t().contiguous(), self._targets[idx].t().contiguous(), 1.0)

    def __len__(self) -> int:
        if self.variable_bptt:
            raise TypeError("the number of batches varies per epoch under variable BPTT; use num_batches(epoch)")
        return self.num_batches(0)


class EvalStream:
    """Chunks that score every token of ``data`` exactly once, ``B`` columns at a time.

    **The exact stream.** The scored stream is ``S = [bos_id] + data`` (the first token is
    predicted from an end-of-line context): input ``S[p]`` predicts target ``data[p]``,
    ``0 <= p < N``. At batch size 1 the state in front of ``S[p]`` has read ``S[0:p]``, the
    whole history: the exact figure.

    **Columns.** With ``L = ceil(N / B)`` column ``b`` scores the targets ``p`` in
    ``[s_b, s_b + L)``, ``s_b = b * L`` (positions ``>= N`` are padding). Started from a zero
    state, column ``b`` would predict ``data[s_b]`` from ``S[s_b]`` alone, which is what makes
    large batches pessimistic.

    **Warm-up.** Column ``b`` first reads ``S[a_b : s_b]``, ``a_b = max(0, s_b - W)``, through
    the model without scoring it, so its state in front of ``S[p]`` has read ``S[a_b : p]``:
    the last ``min(p, W + p - s_b)`` tokens of the exact history, at least ``W``. Column 0, and
    any column with ``s_b <= W``, reads from ``S[0]`` (the BOS context) and is exact. The
    layout puts every column's ``s_b`` on the same row ``D = max_b (s_b - a_b)``; column ``b``
    holds position ``p = s_b - D + t`` on row ``t``; rows before ``a_b`` are padding and the
    state of column ``b`` is zeroed (``reset``) on the row of ``a_b``. Sequential steps:
    ``D + L``; extra work: about ``B * W`` token steps.

    **Resets.** ``reset_every=N`` (``N > 0``) zeroes the state in front of every ``S[p]`` with
    ``p % N == 0``, so each target is predicted from the tokens since the last multiple of
    ``N`` only: with ``N`` the training window this is the condition character runs are
    trained in (windows of ``N + 1`` characters from a zero state; the first target of a window
    is predicted from one token). Columns are then ``L = N * ceil(ceil(N_tokens / B) / N)`` long,
    so every ``s_b`` is a reset point and no warm-up is needed (``warmup`` is ignored).

    Chunks of at most ``bptt`` rows are yielded in time order, cut where a reset falls; the
    caller carries the hidden state from one chunk to the next and, before a chunk, zeroes the
    columns its ``reset`` marks. ``batch_size=1`` is the whole split as one stream.
    """

    def __init__(self, data: torch.Tensor, batch_size: int, bptt: int, bos_id: int, *,
                 warmup: int = 0, reset_every: int = 0):
        data = _check_stream(data)
        _check_positive(batch_size=batch_size, bptt=bptt)
        for name, value in (("warmup", warmup), ("reset_every", reset_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        n = data.numel()
        if n == 0:
            raise DataError("cannot evaluate an empty split; check the corpus files")
        self.batch_size, self.bptt, self.tokens = batch_size, bptt, n
        length = math.ceil(n / batch_size)
        if reset_every:
            length = reset_every * math.ceil(length / reset_every)
            warmup = 0
        starts = torch.arange(batch_size, device=data.device) * length          # s_b
        begins = (starts - warmup).clamp(min=0)                                  # a_b
        lead = int((starts - begins).max())                                      # D
        self.rows = lead + length
        self.warmup_rows = lead
        # Position p of column b on row t, and what sits there.
        pos = starts.unsqueeze(0) - lead + torch.arange(self.rows, device=data.device).unsqueeze(1)
        real = (pos >= begins.unsqueeze(0)) & (pos < n)
        stream = torch.cat([torch.tensor([int(bos_id)], dtype=torch.long, device=data.device), data])
        safe = pos.clamp(0, n - 1)
        self._input = torch.where(real, stream[safe], int(bos_id))
        self._target = torch.where(real, data[safe], int(bos_id))
        self._mask = real & (pos >= starts.unsqueeze(0))
        reset = (pos == begins.unsqueeze(0)) & (begins.unsqueeze(0) < n)
        if reset_every:
            reset |= real & (pos % reset_every == 0)
        reset[0] = False  # the state starts at zero anyway
        self._reset = reset
        # Chunks of bptt rows counted from the start, from row D and from every reset row.
        anchors = sorted({0, lead} | set(reset.any(1).nonzero().flatten().tolist()) | {self.rows})
        cuts = [c for a, b in zip(anchors, anchors[1:]) for c in range(a, b, bptt)]
        self._chunks = list(zip(cuts, cuts[1:] + [self.rows]))

    def __len__(self) -> int:
        return len(self._chunks)

    def __iter__(self) -> Iterator[EvalBatch]:
        for i, j in self._chunks:
            reset = self._reset[i] if bool(self._reset[i].any()) else None
            yield EvalBatch(self._input[i:j], self._target[i:j], self._mask[i:j], reset)


__all__ = ["Batch", "EvalBatch", "EvalStream", "TrainStream", "epoch_generator"]
