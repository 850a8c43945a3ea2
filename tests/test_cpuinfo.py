"""flipout_lstm.nn.cpuinfo against /proc/cpuinfo read here independently, and its readers'
agreement: the benchmarks' ISA line and run.json's CPU name the same bfloat16 instructions."""
import sys
from pathlib import Path

import pytest

from flipout_lstm.metrics import provenance
from flipout_lstm.nn import cpuinfo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lstm_speed  # noqa: E402

CPUINFO = Path("/proc/cpuinfo")
pytestmark = pytest.mark.skipif(not CPUINFO.exists(), reason="no /proc/cpuinfo")


def first_entry():
    fields = {}
    for line in CPUINFO.read_text().splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def test_cpu_is_the_first_processors_entry():
    fields, this = first_entry(), cpuinfo.cpu()
    assert (this.name, this.family, this.model) == (fields["model name"], fields["cpu family"], fields["model"])
    assert this.flags == frozenset(fields["flags"].split())
    assert this.bf16_flags() == [f for f in ("avx512_bf16", "amx_bf16") if f in this.flags]


def test_benchmark_line_and_provenance_name_the_same_bf16_instructions():
    this = cpuinfo.cpu()
    isa = lstm_speed.machine().split("; ISA: ", 1)[1].split(";", 1)[0].split(" + ")
    record = provenance(0, "fp32")["cpu"]
    assert record.startswith(f"{this.name} (family {this.family}, model {this.model}, ")
    for flag, label in cpuinfo.BF16_FLAGS.items():
        assert (label in isa) == (flag in this.flags) == (f", {flag}" in record), (flag, isa, record)
