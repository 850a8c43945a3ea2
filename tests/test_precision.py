"""train.precision: what auto picks, what is refused, and that it is recorded."""
import pytest
import torch

from lm import precision
from lm.errors import ConfigError

CPU = torch.device("cpu")


def test_auto_picks_bf16_exactly_where_the_cpu_computes_it(monkeypatch):
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(precision, "native_bf16", lambda device, n=native: n)
        assert precision.resolve("auto", CPU) == expected
    assert precision.resolve("fp32", CPU) == "fp32"


def test_bf16_without_native_support_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not precision.native_bf16(CPU)
    with pytest.raises(ConfigError, match=r"^train.precision=bf16: this CPU has no AVX512-BF16 or AMX, "
                                          r"so bfloat16 would be emulated .*use fp32, or auto"):
        precision.resolve("bf16", CPU)
    assert precision.resolve("auto", CPU) == "fp32"


def test_fp16_is_cuda_only():
    with pytest.raises(ConfigError, match=r"train.precision=fp16 needs a CUDA device"):
        precision.resolve("fp16", CPU)
    assert precision.grad_scaler("bf16", CPU) is None and precision.grad_scaler("fp32", CPU) is None


def test_autocast_context_per_precision():
    with precision.autocast("fp32", CPU):
        assert not torch.is_autocast_enabled("cpu")
    with precision.autocast("bf16", CPU):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_fp16_on_cuda_has_a_scaler():
    device = torch.device("cuda")
    assert precision.resolve("fp16", device) == "fp16"
    assert isinstance(precision.grad_scaler("fp16", device), torch.amp.GradScaler)
