"""Everything random in one LSTM forward call, as plain tensors.

The noise of a call is drawn up front into an :class:`LSTMNoise` (one :class:`LayerNoise`
per layer) so that it can be inspected, reused and fixed: tests pin it to check gradients,
and the gradient-variance experiment splits a large batch into sub-batches that share one
base perturbation ``ΔŴ`` but draw their own sign vectors (``sample_noise(..., base=...)``).

Conventions (row convention, as ``torch.nn.LSTM``: ``gates = x W_ihᵀ + h W_hhᵀ + b``):

* A weight perturbation is stored *relative* to the parameter: ``delta`` is a tensor ``e``
  of the weight's shape with ``ΔŴ = W̄ ∘ e``.

  - DropConnect with rate ``p`` (inverted scaling): ``W̄ ∘ m/(1-p) = W̄ + W̄ ∘ e`` with
    ``e = m/(1-p) - 1``, ``m ~ Bernoulli(1-p)``. At ``p = 0.5`` this is ``e = ξ = ±1``,
    the symmetric case flipout needs.
  - Multiplicative Gaussian: ``W̄ ∘ (1 + σ ε)``, so ``e = σ ε``, ``ε ~ N(0, 1)``.

  Shared mode uses ``W = W̄ ∘ (1 + e)`` for the whole batch. Flipout gives example ``n``
  ``W_n = W̄ + ΔŴ ∘ (r_n s_nᵀ)``, vectorized as
  ``Y = X W̄ᵀ + ((X ∘ S) ΔŴᵀ) ∘ R`` with ``R`` (B, 4H) and ``S`` (B, in) of ±1 entries.
* Masks are stored already scaled (inverted dropout: kept units are ``1/(1-p)``), except
  zoneout masks, which are 0/1 with 1 meaning "keep the previous value".
* Per-step masks have a leading time dimension; they are only drawn when ``seq_len`` is
  known, otherwise the forward call draws them (see ``LSTM.forward``).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class LayerNoise:
    """The random quantities of one layer for one forward call (``None`` where unused).

    Fields (B = batch, H = hidden, I = this layer's input size, T = steps):

    * ``hh_delta`` (4H, H), ``ih_delta`` (4H, I): relative base perturbations ``e``
      (``ΔŴ = W̄ ∘ e``) of the hidden-to-hidden / input-to-hidden matrices.
    * ``hh_r`` (B, 4H), ``hh_s`` (B, H), ``ih_r`` (B, 4H), ``ih_s`` (B, I): flipout sign
      vectors (±1), fixed over the steps of the call.
    * ``hidden_mask`` (B, H): Gal's variational mask on ``h(t-1)``, scaled by ``1/(1-p)``.
    * ``zoneout_cell``, ``zoneout_hidden`` (T, B, H): 0/1, 1 keeps the previous value.
    * ``cell_mask`` (T, B, H) per step or (B, H) per sequence: Semeniuta's mask on ``g``,
      scaled by ``1/(1-p)``.
    """

    hh_delta: Optional[Tensor] = None
    ih_delta: Optional[Tensor] = None
    hh_r: Optional[Tensor] = None
    hh_s: Optional[Tensor] = None
    ih_r: Optional[Tensor] = None
    ih_s: Optional[Tensor] = None
    hidden_mask: Optional[Tensor] = None
    zoneout_cell: Optional[Tensor] = None
    zoneout_hidden: Optional[Tensor] = None
    cell_mask: Optional[Tensor] = None


@dataclass(frozen=True)
class LSTMNoise:
    """Noise for one forward call of a whole :class:`flipout_lstm.nn.LSTM`.

    ``batch_size`` is the batch the sign vectors and masks were drawn for; ``seq_len`` is
    the number of steps the per-step masks cover (``None``: per-step masks are drawn by
    the forward call). Between-layer dropout (``dropout=``) is not part of it: as in
    ``torch.nn.LSTM`` it is drawn by the forward call.
    """

    layers: Tuple[LayerNoise, ...]
    batch_size: int
    seq_len: Optional[int] = None

    def columns(self, cols: slice) -> "LSTMNoise":
        """The noise of examples ``cols`` of the batch: the base perturbations whole, the
        per-example sign vectors and masks cut (their batch dimension is the first of a
        (B, ·) tensor, the second of a per-step (T, B, H) one)."""
        def cut(t):
            if t is None:
                return None
            return t[cols] if t.dim() == 2 else t[:, cols]
        per_example = ("hh_r", "hh_s", "ih_r", "ih_s", "hidden_mask", "zoneout_cell",
                       "zoneout_hidden", "cell_mask")
        layers = tuple(replace(ln, **{k: cut(getattr(ln, k)) for k in per_example})
                       for ln in self.layers)
        return LSTMNoise(layers=layers, batch_size=len(range(self.batch_size)[cols]),
                         seq_len=self.seq_len)


def bernoulli(shape, keep: float, *, device, dtype, scale: bool) -> Tensor:
    """0/1 draws with P(1) = keep, optionally divided by keep (inverted dropout)."""
    # rand < keep rather than bernoulli_: on CPU bernoulli_ is ~3x slower for large tensors.
    m = (torch.rand(shape, device=device, dtype=dtype) < keep).to(dtype)
    return m.div_(keep) if scale else m


def signs(shape, *, device, dtype) -> Tensor:
    """Independent ±1 entries, each with probability 1/2.

    Drawn as the 8 bits of uniform random bytes (one random number per 8 signs): entry
    ``8j + k`` is ``+1`` where bit ``k`` of byte ``j`` is set, else ``-1``. Each byte is
    turned into its 8 signs by a lookup in a 256 x 8 table, one pass that writes the output
    once; on CPU this is about 2x faster than shifting and rescaling the bits and about 6x
    faster than one draw per entry, for the (4H, H) matrices flipout draws every call.
    """
    n = math.prod(shape)
    octets = torch.randint(0, 256, ((n + 7) // 8,), device=device, dtype=torch.uint8)
    return F.embedding(octets.long(), _sign_table(torch.device(device), dtype)).view(-1)[:n] \
        .view(shape)


@functools.lru_cache(maxsize=None)
def _sign_table(device: torch.device, dtype: torch.dtype) -> Tensor:
    """(256, 8): row ``j`` holds the signs of byte ``j``, +1 where bit ``k`` is set."""
    bits = (torch.arange(256, device=device).unsqueeze(1) >> torch.arange(8, device=device)) & 1
    return bits.to(dtype).mul_(2).sub_(1)


def relative_delta(shape, *, drop: float, sigma: float, device, dtype) -> Optional[Tensor]:
    """``e`` with ``ΔŴ = W̄ ∘ e``: ``m/(1-p) - 1`` for DropConnect, ``σ ε`` for Gaussian."""
    if drop == 0.5:
        return signs(shape, device=device, dtype=dtype)            # m/(1/2) - 1 = ξ = ±1
    if drop > 0:
        return bernoulli(shape, 1.0 - drop, device=device, dtype=dtype, scale=True).sub_(1)
    if sigma > 0:
        return torch.empty(shape, device=device, dtype=dtype).normal_(0.0, sigma)
    return None
