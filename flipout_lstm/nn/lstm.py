"""``LSTM``: ``torch.nn.LSTM`` with weight noise, flipout and the recurrent-dropout baselines.

Two execution paths, chosen per call:

* **Fused** (``torch._VF.lstm``: cuDNN on GPU, the native/oneDNN kernel on CPU): no noise,
  shared-mask DropConnect (WD) and shared multiplicative Gaussian noise, and eval. The
  perturbed weight ``W̄ ∘ (1 + e)`` is computed as a differentiable function of the
  parameter and handed to the kernel functionally, so autograd gives
  ``dL/dW̄ = (1 + e) ∘ dL/dW``; the module's parameters are never replaced or patched.
* **Custom** (:class:`flipout_lstm.nn.recurrence.LSTMRecurrence`): flipout and the noise that acts
  inside the recurrence per sequence or per step (Gal, zoneout, Semeniuta), and zoneout's
  expectation in eval. Set ``lstm.force_custom = True`` to use it for every call (tests).

A :class:`torch.nn.utils.rnn.PackedSequence` input runs through either path with
``torch.nn.LSTM``'s semantics (``LSTM._forward_packed``): the fused path calls the kernel's
packed overload; the custom one pads, freezes finished sequences (``h_t = m_t ∘ h'_t +
(1 - m_t) ∘ h_{t-1}``, likewise ``c_t``) and packs the output again.

Mixed precision: under ``torch.autocast`` (bfloat16, or float16 on CUDA) the layer's matrix
products run in the autocast dtype and the rest in float32, on every path; ``output``,
``h_n``, ``c_n`` come back float32 (a carried state stays float32), parameters and their
gradients are float32, and noise is drawn as outside autocast (float32, the same RNG draws).

* Custom path: the input projection, the per-step products (flipout's second one too), the
  backward products and the weight gradients in the autocast dtype; the cell state, the
  gate math, the ``δ`` recursions and the sum of the weight-gradient terms in float32.
* On the CPU every call takes the custom path under autocast. torch would run its fused
  kernel as oneDNN's bfloat16 LSTM (``mkldnn_rnn_layer`` is on the CPU autocast list), which
  keeps the cell state in bfloat16: over 1000 steps of small increments it stalls at 2.0
  where float32 reaches 6.6 (tests/test_lstm_precision.py), and a language model carries
  its state across the whole stream. The custom path keeps it in float32 and, measured on an
  AVX-512 EPYC (1 thread, fwd+bwd, no noise), is also faster in training: 0.56x / 0.51x of
  ``torch.nn.LSTM``'s float32 time at the word / character shape against 0.80x / 0.67x for
  the fused bfloat16 kernel (eval forward: 0.57x / 0.57x against 0.51x / 0.44x).
* CUDA: the fused path stays cuDNN, which torch's autocast runs in float16 / bfloat16
  (state precision cuDNN's); its outputs are cast back to float32.

Parameters, their names, shapes and initialization are ``torch.nn.LSTM``'s (this class is
a subclass), so state dicts move both ways.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .noise import LayerNoise, LSTMNoise, bernoulli, relative_delta, signs
from .products import linear
from .recurrence import lstm_recurrence


class LSTMArgumentError(ValueError):
    """A bad ``LSTM`` argument; ``argument`` names it (a command line shows it as one line)."""

    def __init__(self, message: str, argument: Optional[str] = None):
        super().__init__(message)
        self.argument = argument


# The regularizer arguments, by kind; check_regularizers() holds every rule they obey.
PROBABILITIES = ("weight_drop", "input_weight_drop", "hidden_dropout", "zoneout_cell",
                 "zoneout_hidden", "cell_dropout")
SIGMAS = ("weight_noise", "input_weight_noise")


def check_regularizers(args: dict, name: Callable[[str], str] = str) -> None:
    """Raise :class:`LSTMArgumentError` unless the regularizer arguments ``args`` (keyword
    arguments of :class:`LSTM`; absent ones are 0/False) fit together.

    The layer's own rules, which a config asks too (``flipout_lstm.config`` passes
    ``name=lambda a: f"model.lstm.{a}"`` so that its messages name its keys): rates are
    probabilities in [0, 1), noise scales finite and >= 0, one perturbation per matrix, and
    flipout needs a perturbation that is symmetric about zero (Gaussian, or DropConnect at
    exactly p = 0.5: ``m/(1-p) - 1 = ±1`` only then).
    """
    def fail(arg: str, message: str):
        raise LSTMArgumentError(f"{name(arg)}: {message}", arg)

    value = {k: args.get(k, 0.0) for k in PROBABILITIES + SIGMAS}
    for arg in PROBABILITIES:
        p = float(value[arg])
        if not 0.0 <= p < 1.0:  # NaN fails too
            fail(arg, f"{p!r} is not a probability in [0, 1) (0 disables it)")
    for arg in SIGMAS:
        sigma = float(value[arg])
        if not sigma >= 0.0 or math.isinf(sigma):
            fail(arg, f"{sigma!r} must be a finite standard deviation >= 0 (0 disables the noise)")
    for drop, sigma, matrix in (("weight_drop", "weight_noise", "hidden-to-hidden"),
                                ("input_weight_drop", "input_weight_noise", "input-to-hidden")):
        if value[drop] and value[sigma]:
            fail(drop, f"cannot be combined with {name(sigma)}: choose one perturbation of the "
                       f"{matrix} matrix and set the other to 0")
    if args.get("flipout"):
        if not any(value[k] for k in ("weight_drop", "weight_noise", "input_weight_drop",
                                      "input_weight_noise")):
            fail("flipout", f"flipout needs a weight perturbation to decorrelate; set "
                            f"{name('weight_drop')}=0.5 or {name('weight_noise')}>0 (or their "
                            f"input_ counterparts)")
        for drop, sigma in (("weight_drop", "weight_noise"), ("input_weight_drop", "input_weight_noise")):
            if value[drop] and value[drop] != 0.5:
                fail(drop, f"flipout DropConnect needs exactly 0.5 (only p=0.5 is symmetric "
                           f"about the mean), got {value[drop]}; use 0.5, or {name(sigma)} for "
                           f"Gaussian flipout")


class LSTM(nn.LSTM):
    """Multi-layer LSTM, a drop-in for ``torch.nn.LSTM`` with regularizing noise.

    ``LSTM(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
    *, weight_drop=0.0, weight_noise=0.0, input_weight_drop=0.0, input_weight_noise=0.0,
    flipout=False, hidden_dropout=0.0, zoneout_cell=0.0, zoneout_hidden=0.0,
    cell_dropout=0.0, cell_dropout_per_step=True, device=None, dtype=None)``

    * ``weight_drop`` / ``input_weight_drop``: DropConnect rate on every layer's
      hidden-to-hidden / input-to-hidden matrix, inverted scaling ``W ∘ m/(1-p)``. One mask
      per call shared by the batch (WD, Merity et al.), or with ``flipout=True``
      ``W̄ + ΔŴ ∘ (r_n s_nᵀ)`` with ``ΔŴ = W̄ ∘ ξ``, which needs ``p = 0.5`` exactly.
    * ``weight_noise`` / ``input_weight_noise``: σ of multiplicative Gaussian noise
      ``W̄ ∘ (1 + σ ε)``, shared or (``flipout=True``) ``ΔŴ = σ W̄ ∘ ε`` with per-example signs.
    * ``hidden_dropout``: Gal's variational mask on ``h(t-1)`` inside the recurrence, one per
      sequence (the returned ``h_t`` is not masked).
    * ``zoneout_cell`` / ``zoneout_hidden``: Krueger's zoneout, per-step masks; eval uses
      the expectation ``p·old + (1-p)·new``.
    * ``cell_dropout``: Semeniuta's dropout on ``g(t)``, a new mask per step if
      ``cell_dropout_per_step`` else one per sequence.
    * ``dropout``: between layers, as in ``torch.nn.LSTM``.

    ``forward(input, hx=None, *, noise=None)`` returns ``output, (h_n, c_n)`` shaped as
    ``torch.nn.LSTM``'s. An integer ``input`` of shape (T, B) (or (B, T), or (T,) unbatched)
    holds one-hot indices into ``input_size`` classes. A ``PackedSequence`` (float data
    (N, input_size) or integer (N,)) gives a ``PackedSequence`` output and each sequence's
    ``h_n``, ``c_n`` at its own last step, in the caller's batch order; noise rows index
    that order too, with B = ``batch_sizes[0]`` and T = ``len(batch_sizes)``. ``noise``
    (from :meth:`sample_noise`) replaces the call's own draw; noise only acts in training
    mode.

    ``force_custom`` (attribute, default ``False``): run the custom recurrence even where
    the fused kernel would do.
    """

    force_custom: bool = False

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, *, weight_drop: float = 0.0,
                 weight_noise: float = 0.0, input_weight_drop: float = 0.0,
                 input_weight_noise: float = 0.0, flipout: bool = False,
                 hidden_dropout: float = 0.0, zoneout_cell: float = 0.0,
                 zoneout_hidden: float = 0.0, cell_dropout: float = 0.0,
                 cell_dropout_per_step: bool = True, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None):
        if bidirectional:
            raise LSTMArgumentError("bidirectional=True is not supported by flipout_lstm.nn.LSTM; "
                                    "use torch.nn.LSTM or two LSTMs")
        if proj_size:
            raise LSTMArgumentError("proj_size is not supported by flipout_lstm.nn.LSTM; pass proj_size=0")
        if int(num_layers) < 1:
            raise LSTMArgumentError(f"num_layers={num_layers!r} must be >= 1")
        dropout = float(dropout)
        if not 0.0 <= dropout < 1.0:
            raise LSTMArgumentError(f"dropout: {dropout!r} is not a probability in [0, 1) "
                                    f"(0 disables it)", "dropout")
        regularizers = dict(weight_drop=weight_drop, weight_noise=weight_noise,
                            input_weight_drop=input_weight_drop,
                            input_weight_noise=input_weight_noise, flipout=flipout,
                            hidden_dropout=hidden_dropout, zoneout_cell=zoneout_cell,
                            zoneout_hidden=zoneout_hidden, cell_dropout=cell_dropout)
        check_regularizers(regularizers)
        for arg in PROBABILITIES + SIGMAS:
            setattr(self, arg, float(regularizers[arg]))
        self.flipout = bool(flipout)
        self.cell_dropout_per_step = bool(cell_dropout_per_step)
        super().__init__(input_size, hidden_size, num_layers, bias=bias, batch_first=batch_first,
                         dropout=dropout, device=device, dtype=dtype)

    # ------------------------------------------------------------------ configuration
    @property
    def _hh_perturbed(self) -> bool:
        return bool(self.weight_drop or self.weight_noise)

    @property
    def _ih_perturbed(self) -> bool:
        return bool(self.input_weight_drop or self.input_weight_noise)

    @property
    def _recurrent_noise(self) -> bool:
        """Noise the fused kernel cannot express: it must run the custom recurrence."""
        return bool(self.flipout or self.hidden_dropout or self.zoneout_cell
                    or self.zoneout_hidden or self.cell_dropout)

    @property
    def _has_noise(self) -> bool:
        return self._recurrent_noise or self._hh_perturbed or self._ih_perturbed

    def extra_repr(self) -> str:
        s = super().extra_repr()
        for name in ("weight_drop", "weight_noise", "input_weight_drop", "input_weight_noise",
                     "hidden_dropout", "zoneout_cell", "zoneout_hidden", "cell_dropout"):
            if getattr(self, name):
                s += f", {name}={getattr(self, name)}"
        if self.cell_dropout and not self.cell_dropout_per_step:
            s += ", cell_dropout_per_step=False"
        if self.flipout:
            s += ", flipout=True"
        return s

    # ------------------------------------------------------------------ noise
    def _layer_weights(self, layer: int):
        w_ih = getattr(self, f"weight_ih_l{layer}")
        w_hh = getattr(self, f"weight_hh_l{layer}")
        if self.bias:
            return w_ih, w_hh, getattr(self, f"bias_ih_l{layer}"), getattr(self, f"bias_hh_l{layer}")
        return w_ih, w_hh, None, None

    def sample_noise(self, batch_size: int, *, base: Optional[LSTMNoise] = None, device=None,
                     dtype=None, seq_len: Optional[int] = None) -> LSTMNoise:
        """Draw the noise of one forward call for ``batch_size`` sequences.

        ``base``: reuse its base perturbations ``ΔŴ`` (``hh_delta``, ``ih_delta``) and draw
        fresh sign vectors and masks (sub-batches sharing one perturbation). ``seq_len``:
        also draw the per-step masks (zoneout, per-step Semeniuta) for that many steps;
        without it the forward call draws them.
        """
        ref = self.weight_hh_l0
        device = ref.device if device is None else torch.device(device)
        dtype = ref.dtype if dtype is None else dtype
        if base is not None and len(base.layers) != self.num_layers:
            raise LSTMArgumentError(f"base noise has {len(base.layers)} layers but the LSTM has "
                                    f"{self.num_layers}; pass noise sampled from this LSTM")
        B, H = int(batch_size), self.hidden_size
        kw = dict(device=device, dtype=dtype)
        layers = []
        for layer in range(self.num_layers):
            in_size = self.input_size if layer == 0 else H
            if base is not None:
                hh = base.layers[layer].hh_delta
                ih = base.layers[layer].ih_delta
                hh = None if hh is None else hh.to(**kw)
                ih = None if ih is None else ih.to(**kw)
            else:
                hh = relative_delta((4 * H, H), drop=self.weight_drop, sigma=self.weight_noise, **kw)
                ih = relative_delta((4 * H, in_size), drop=self.input_weight_drop,
                                    sigma=self.input_weight_noise, **kw)
            ln = LayerNoise(hh_delta=hh, ih_delta=ih)
            upd = {}
            if self.flipout and hh is not None:
                upd.update(hh_r=signs((B, 4 * H), **kw), hh_s=signs((B, H), **kw))
            if self.flipout and ih is not None:
                upd.update(ih_r=signs((B, 4 * H), **kw), ih_s=signs((B, in_size), **kw))
            if self.hidden_dropout:
                upd["hidden_mask"] = bernoulli((B, H), 1 - self.hidden_dropout, scale=True, **kw)
            if self.cell_dropout and not self.cell_dropout_per_step:
                upd["cell_mask"] = bernoulli((B, H), 1 - self.cell_dropout, scale=True, **kw)
            layers.append(dataclasses.replace(ln, **upd))
        noise = LSTMNoise(layers=tuple(layers), batch_size=B, seq_len=None)
        if seq_len is not None:
            noise = self._with_step_masks(noise, int(seq_len), device=device, dtype=dtype)
        return noise

    def _with_step_masks(self, noise: LSTMNoise, steps: int, *, device, dtype) -> LSTMNoise:
        """``noise`` with per-step masks covering ``steps`` (drawn where missing, else cut)."""
        B, H = noise.batch_size, self.hidden_size
        kw = dict(device=device, dtype=dtype)
        if noise.seq_len is not None and noise.seq_len < steps:
            raise LSTMArgumentError(f"noise was sampled for seq_len={noise.seq_len} but the input "
                                    f"has {steps} steps; sample it with seq_len>={steps}")
        layers = []
        for ln in noise.layers:
            upd = {}
            for name, p in (("zoneout_cell", self.zoneout_cell),
                            ("zoneout_hidden", self.zoneout_hidden)):
                if p:
                    cur = getattr(ln, name)
                    upd[name] = (bernoulli((steps, B, H), p, scale=False, **kw) if cur is None
                                 else cur[:steps])
            if self.cell_dropout and self.cell_dropout_per_step:
                cur = ln.cell_mask
                upd["cell_mask"] = (bernoulli((steps, B, H), 1 - self.cell_dropout, scale=True, **kw)
                                    if cur is None else cur[:steps])
            layers.append(dataclasses.replace(ln, **upd))
        return LSTMNoise(layers=tuple(layers), batch_size=B, seq_len=steps)

    # ------------------------------------------------------------------ forward
    def forward(self, input: Union[Tensor, PackedSequence],
                hx: Optional[Tuple[Tensor, Tensor]] = None, *,
                noise: Optional[LSTMNoise] = None):
        """``output, (h_n, c_n)`` as ``torch.nn.LSTM``; ``noise`` replaces this call's draw.

        Training draws (or takes) one :class:`LSTMNoise` for the whole call, so sign vectors
        and per-sequence masks hold over its steps; eval uses the mean weights (and zoneout's
        expectation) and ignores ``noise``. A :class:`PackedSequence` input gives a
        :class:`PackedSequence` output (see :meth:`_forward_packed`).
        """
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx, noise)
        index = not (input.is_floating_point() or input.is_complex())
        batched = input.dim() == (2 if index else 3)
        if input.dim() != (2 if index else 3) - (0 if batched else 1):
            raise ValueError(f"LSTM: expected {'1-D or 2-D index' if index else '2-D or 3-D'} "
                             f"input, got shape {tuple(input.shape)}")
        if not index and input.size(-1) != self.input_size:
            raise ValueError(f"LSTM: input.size(-1) must be {self.input_size}, got {input.size(-1)}")
        if index:
            input = input.long()
        bdim = 0 if self.batch_first else 1
        if not batched:
            input = input.unsqueeze(bdim)
            if hx is not None:
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        B, T = input.size(bdim), input.size(1 - bdim)
        hx = self._initial_state(hx, B)
        noise = self._call_noise(noise, B, T)
        if self._use_custom():
            out, h_n, c_n = self._forward_custom(input, hx, noise, index)
        else:
            out, h_n, c_n = self._forward_fused(input, hx, noise, index)
        if not batched:
            out, h_n, c_n = out.squeeze(bdim), h_n.squeeze(1), c_n.squeeze(1)
        return out, (h_n, c_n)

    def _initial_state(self, hx, B: int):
        """``hx`` checked against (L, B, H), or zeros."""
        ref = self.weight_hh_l0
        L, H = self.num_layers, self.hidden_size
        if hx is None:
            z = torch.zeros(L, B, H, device=ref.device, dtype=ref.dtype)
            return (z, z)
        if hx[0].shape != (L, B, H) or hx[1].shape != (L, B, H):
            raise ValueError(f"LSTM: expected h0 and c0 of shape {(L, B, H)}, got "
                             f"{tuple(hx[0].shape)} and {tuple(hx[1].shape)}")
        return hx

    def _call_noise(self, noise: Optional[LSTMNoise], B: int, T: int) -> Optional[LSTMNoise]:
        """This call's noise for B sequences of T steps: drawn, or ``noise`` checked and its
        per-step masks drawn or cut to T; ``None`` where no noise acts (eval, none set)."""
        if not (self.training and self._has_noise):
            return None
        if noise is None:
            return self.sample_noise(B, seq_len=T)
        if noise.batch_size != B:
            raise ValueError(f"LSTM: noise was sampled for batch_size={noise.batch_size} "
                             f"but the input has batch size {B}")
        ref = self.weight_hh_l0
        return self._with_step_masks(noise, T, device=ref.device, dtype=ref.dtype)

    def _autocast_dtype(self) -> Optional[torch.dtype]:
        """The lower-precision dtype autocast has in force for this module's device, or
        ``None`` (autocast off, or a module not in float32, which autocast leaves alone)."""
        ref = self.weight_hh_l0
        dev = ref.device.type
        if ref.dtype != torch.float32 or not torch.is_autocast_enabled(dev):
            return None
        dtype = torch.get_autocast_dtype(dev)
        return None if dtype == torch.float32 else dtype

    def _use_custom(self) -> bool:
        """The custom recurrence: for the noise that needs it, zoneout's eval, when forced,
        and for every call under autocast on the CPU (see the module docstring)."""
        if self.force_custom or (self.weight_hh_l0.device.type == "cpu"
                                 and self._autocast_dtype() is not None):
            return True
        return self._recurrent_noise if self.training else bool(self.zoneout_cell
                                                                or self.zoneout_hidden)

    def _forward_packed(self, seq: PackedSequence, hx, noise):
        """A :class:`PackedSequence` through either path, with ``torch.nn.LSTM``'s semantics.

        ``seq.data`` (N, I) (or (N,) indices) holds, step by step, the still running
        sequences in *sorted* order (longest first): column ``j`` of step ``t`` is example
        ``b = sorted_indices[j]`` of the caller's batch, present while ``j < batch_sizes[t]``.
        ``hx``, ``h_n``, ``c_n`` and the noise's per-example rows (flipout signs, Gal and
        Semeniuta masks, zoneout masks ``[t, b]``) are in the caller's order, as for a plain
        (T, B, ·) tensor with T = ``len(batch_sizes)`` and B = ``batch_sizes[0]``, so a
        packed batch whose sequences all have T steps computes what the plain tensor does
        (the same draws from the same RNG state). ``batch_first`` plays no part.

        * Fused: ``torch._VF.lstm``'s packed overload with the (shared-perturbed) weights;
          ``hx`` is put into sorted order and ``h_n``, ``c_n`` back, as torch does.
        * Custom: the data are scattered into a zero-padded (T, B, ·) tensor in the caller's
          order, with the validity mask ``m_t[b] = [t < len_b]``, and the recurrence
          freezes finished sequences (:meth:`_forward_custom`); the output is gathered back
          at the valid positions. Padded steps get no gradient and give none (the gather's
          backward is zero there, and a frozen step's gate gradient ``δa_t`` is zero).
        """
        data, batch_sizes, sorted_indices, unsorted_indices = seq
        index = not (data.is_floating_point() or data.is_complex())
        if data.dim() != (1 if index else 2):
            want = "(N,) indices" if index else "(N, input_size)"
            raise ValueError(f"LSTM: expected packed data of shape {want}, got {tuple(data.shape)}")
        if not index and data.size(-1) != self.input_size:
            raise ValueError(f"LSTM: input.size(-1) must be {self.input_size}, got {data.size(-1)}")
        if index:
            data = data.long()
        T, B = batch_sizes.numel(), int(batch_sizes[0])
        hx = self._initial_state(hx, B)
        noise = self._call_noise(noise, B, T)
        if self._use_custom():
            dev = data.device
            bs = batch_sizes.to(dev)
            cols = torch.arange(B, device=dev)
            example = cols if sorted_indices is None else sorted_indices
            # pos[k]: the flat (t, b) position, b in the caller's order, of packed row k.
            pos = (torch.arange(T, device=dev).unsqueeze(1) * B + example)[cols < bs.unsqueeze(1)]
            x = data.new_zeros((T * B,) + data.shape[1:]).index_copy(0, pos, data)
            x = x.view((T, B) + data.shape[1:])
            valid = None
            if int(batch_sizes[-1]) != B:        # some sequences end early: freeze them
                valid = torch.zeros(T * B, dtype=torch.bool, device=dev).index_fill_(0, pos, True)
                valid = valid.view(T, B)
            out, h_n, c_n = self._forward_custom(x, hx, noise, index, time_major=True,
                                                 valid=valid)
            out = out.reshape(T * B, self.hidden_size).index_select(0, pos)
        else:
            if sorted_indices is not None:
                hx = (hx[0].index_select(1, sorted_indices), hx[1].index_select(1, sorted_indices))
            out, h_n, c_n = self._forward_fused(data, hx, noise, index, batch_sizes=batch_sizes)
            if unsorted_indices is not None:
                h_n = h_n.index_select(1, unsorted_indices)
                c_n = c_n.index_select(1, unsorted_indices)
        return PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices), (h_n, c_n)

    def _forward_fused(self, input, hx, noise, index, batch_sizes: Optional[Tensor] = None):
        """One ``torch._VF.lstm`` call over all layers with (possibly perturbed) weights;
        with ``batch_sizes``, ``input`` is a PackedSequence's data and the packed overload
        runs (``hx`` in sorted order)."""
        if index:
            # The fused kernel wants dense input; input_size is small wherever indices are used.
            input = F.one_hot(input, self.input_size).to(self.weight_ih_l0.dtype)
        if noise is None:
            weights = self._flat_weights
        else:
            weights = []
            for layer, ln in enumerate(noise.layers):
                w_ih, w_hh, b_ih, b_hh = self._layer_weights(layer)
                if ln.ih_delta is not None:
                    w_ih = torch.addcmul(w_ih, w_ih, ln.ih_delta)    # W̄ ∘ (1 + e)
                if ln.hh_delta is not None:
                    w_hh = torch.addcmul(w_hh, w_hh, ln.hh_delta)
                weights += [w_ih, w_hh] + ([b_ih, b_hh] if self.bias else [])
        h0, c0 = hx
        if batch_sizes is None:
            args = (input, (h0, c0), weights, self.bias, self.num_layers, self.dropout,
                    self.training, False, self.batch_first)
        else:
            args = (input, batch_sizes, (h0, c0), weights, self.bias, self.num_layers,
                    self.dropout, self.training, False)
        if input.is_cuda and noise is not None:
            # Perturbed weights are fresh tensors, so cuDNN must pack them each call: expected.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*contiguous chunk of memory.*")
                res = torch._VF.lstm(*args)
        else:
            res = torch._VF.lstm(*args)
        out, h_n, c_n = res[0], res[1], res[2]
        if self._autocast_dtype() is not None:
            # Under autocast (CUDA here: the CPU takes the custom path) torch runs cuDNN in
            # the autocast dtype and returns it; the interface's dtype is float32 whatever
            # the kernel computed in.
            dtype = self.weight_hh_l0.dtype
            out, h_n, c_n = out.to(dtype), h_n.to(dtype), c_n.to(dtype)
        return out, h_n, c_n

    def _input_projection(self, layer: int, x: Tensor, ln: Optional[LayerNoise], index: bool,
                          dtype: Optional[torch.dtype] = None):
        """``x W_ihᵀ + b_ih + b_hh`` for all steps at once, (T, B, 4H), under autograd, the
        products by :func:`flipout_lstm.nn.products.linear` in ``dtype`` (mixed precision; default
        the weight's), the result in the weight's dtype.

        Input-weight noise: shared ``W̄ ∘ (1 + e)``, or flipout
        ``x W̄ᵀ + ((x ∘ s) ΔŴᵀ) ∘ r``. Index input (one-hot ``x``) turns each product into a
        column lookup: ``x W̄ᵀ = W̄[:, idx]ᵀ`` and ``(x ∘ s) ΔŴᵀ = s[idx] ΔŴ[:, idx]ᵀ``.
        """
        w_ih, _, b_ih, b_hh = self._layer_weights(layer)
        T, B = x.shape[:2]
        G = 4 * self.hidden_size
        flip = ln is not None and ln.ih_delta is not None and ln.ih_r is not None
        w = w_ih
        if ln is not None and ln.ih_delta is not None and not flip:
            w = torch.addcmul(w_ih, w_ih, ln.ih_delta)
        bias = b_ih + b_hh if self.bias else None
        if index:
            # One-hot rows pick one column each, so the bias folds into the lookup table.
            table = w.t().contiguous()
            if bias is not None:
                table = table + bias
            xp = F.embedding(x, table)
            if flip:
                s = ln.ih_s.gather(1, x.t()).t().unsqueeze(-1)           # s_n[idx_tn], (T, B, 1)
                xp = xp + F.embedding(x, (w_ih * ln.ih_delta).t().contiguous()) * s * ln.ih_r
            return xp
        x2 = x.reshape(T * B, x.size(-1))
        xp = linear(x2, w, bias, dtype).view(T, B, G)
        if flip:
            xs = (x * ln.ih_s).reshape(T * B, x.size(-1))
            xp = xp + linear(xs, w_ih * ln.ih_delta, None, dtype).view(T, B, G) * ln.ih_r
        return xp

    def _forward_custom(self, input, hx, noise, index, *, time_major: bool = False,
                        valid: Optional[Tensor] = None):
        """Layer by layer through :class:`LSTMRecurrence`, time-major inside.

        ``time_major``: ``input`` is (T, B, ·) whatever ``batch_first`` says, and so is the
        output (a packed input's padded form). ``valid`` (T, B) bool, ``m_t[b]``: whether
        step t of sequence b is real; finished sequences keep their state::

            h_t = m_t ∘ h'_t + (1 - m_t) ∘ h_{t-1},    c_t = m_t ∘ c'_t + (1 - m_t) ∘ c_{t-1}

        with ``h'_t``, ``c'_t`` the step's result (zoneout included). That is zoneout with
        weight ``z'_t = z_t`` where ``m_t = 1`` and ``z'_t = 1`` where ``m_t = 0`` (``z = 0``
        without zoneout, ``p`` for its eval expectation), so the recurrence runs unchanged
        on ``z'``. Its backward then gives ``δĥ = (1 - z'^h) ∘ δh_t = 0`` and
        ``δĉ = (1 - z'^c) ∘ δc_t + δĥ ∘ … = 0`` at a frozen step, hence ``δa_t = 0``: no
        gradient reaches the input projection (so the input) or ``W_hh`` there, while
        ``δh_{t-1} = δh_t``, ``δc_{t-1} = δc_t`` carry the state's gradient through. The
        returned ``h_n``, ``c_n`` are then each sequence's state at its last real step.

        Under autocast (bfloat16 or float16; :meth:`_autocast_dtype`) the matrix products,
        here and in the recurrence, run in the autocast dtype and everything else in
        float32 (see :class:`LSTMRecurrence`); autocast itself is off inside, so no op is
        recast behind the code's back. ``hx`` is taken to float32, the outputs are float32.
        """
        amp = self._autocast_dtype()
        if amp is None:
            return self._forward_layers(input, hx, noise, index, time_major, valid, None)
        ref = self.weight_hh_l0
        hx = (hx[0].to(ref.dtype), hx[1].to(ref.dtype))
        with torch.autocast(ref.device.type, enabled=False):
            return self._forward_layers(input, hx, noise, index, time_major, valid, amp)

    def _forward_layers(self, input, hx, noise, index, time_major, valid, amp):
        """:meth:`_forward_custom`'s layers, products in ``amp`` (``None``: the weights')."""
        time_major = time_major or not self.batch_first
        x = input if time_major else input.transpose(0, 1)
        if not index:
            x = x.contiguous()
        h0, c0 = hx
        T, B = x.shape[:2]
        H = self.hidden_size
        eval_zc = eval_zh = None
        if not self.training:
            ref = self.weight_hh_l0
            # Zoneout in eval: the expectation p·old + (1-p)·new, a constant "mask" p.
            if self.zoneout_cell:
                eval_zc = torch.full((1, 1, 1), self.zoneout_cell, dtype=ref.dtype,
                                     device=ref.device).expand(T, B, H)
            if self.zoneout_hidden:
                eval_zh = torch.full((1, 1, 1), self.zoneout_hidden, dtype=ref.dtype,
                                     device=ref.device).expand(T, B, H)
        if valid is not None:
            keep = valid.unsqueeze(-1)                                  # m_t, (T, B, 1)
            # z' without zoneout (z = 0): 1 - m_t, one (T, B, H) tensor for every layer.
            frozen = (~keep).to(self.weight_hh_l0.dtype).expand(T, B, H).contiguous()

            def freeze(z):
                return frozen if z is None else torch.where(keep, z, 1.0)
        hs, cs = [], []
        for layer in range(self.num_layers):
            ln = noise.layers[layer] if noise is not None else None
            xp = self._input_projection(layer, x, ln, index and layer == 0, amp)
            _, w_hh, _, _ = self._layer_weights(layer)
            w, e, r, s = w_hh, None, None, None
            m = zc = zh = cm = None
            if ln is not None:
                if ln.hh_delta is not None:
                    if ln.hh_r is not None:
                        e, r, s = ln.hh_delta, ln.hh_r, ln.hh_s
                    else:
                        w = torch.addcmul(w_hh, w_hh, ln.hh_delta)
                m, zc, zh, cm = ln.hidden_mask, ln.zoneout_cell, ln.zoneout_hidden, ln.cell_mask
            else:
                zc, zh = eval_zc, eval_zh
            if valid is not None:
                zc, zh = freeze(zc), freeze(zh)
            out, h_n, c_n = lstm_recurrence(xp, h0[layer], c0[layer], w, e, r, s, m, zc, zh, cm,
                                            dtype=amp)
            hs.append(h_n)
            cs.append(c_n)
            if layer < self.num_layers - 1 and self.dropout and self.training:
                out = F.dropout(out, self.dropout, True)
            x = out
        out = x if time_major else x.transpose(0, 1)
        return out, torch.stack(hs), torch.stack(cs)
