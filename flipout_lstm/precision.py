"""Training and evaluation precision: float32, or mixed precision under ``torch.autocast``.

``train.precision`` (and ``evaluate.py --precision``):

* ``fp32``: everything in float32 (the default, so published numbers stay float32).
* ``bf16``: the forward pass and the loss under ``torch.autocast(dtype=torch.bfloat16)``;
  weights, optimizer state, gradients and checkpoints stay float32, and ``flipout_lstm.nn.LSTM`` keeps
  its cell state and gate math in float32 (its products run in bfloat16). Only where the
  hardware computes bfloat16 natively: a CPU with AVX512-BF16 or AMX, a CUDA device of
  compute capability 8.0 or more. Elsewhere it would be emulated and slower than float32, so
  asking for it is an error.
* ``fp16``: as bf16 with float16, CUDA only, with a gradient scaler (float16's range is too
  small for unscaled gradients).
* ``auto``: bf16 where it is native, else fp32. The run records what it picked.
"""
from __future__ import annotations

import contextlib

import torch

from flipout_lstm.errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 products in hardware."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def resolve(name: str, device: torch.device, where: str = "train.precision") -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``device``: ``auto`` decided, impossible asks refused."""
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ConfigError(f"{where}=fp16 needs a CUDA device (float16 on the CPU is emulated); use "
                          f"bf16 where the CPU has AVX512-BF16 or AMX, fp32, or auto")
    if name == "bf16" and not native_bf16(device):
        what = "this CPU has no AVX512-BF16 or AMX" if device.type == "cpu" else \
            f"{device} has compute capability below 8.0"
        raise ConfigError(f"{where}=bf16: {what}, so bfloat16 would be emulated and slower than "
                          f"float32; use fp32, or auto (bf16 where it is native)")
    return name


def autocast(precision: str, device: torch.device):
    """The context the forward pass and the loss run in (nothing for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device):
    """A gradient scaler for fp16, else None (bf16 has float32's range)."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)
