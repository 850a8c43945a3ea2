"""What ``/proc/cpuinfo`` says about this machine's CPU, read in one place.

The compiled cell's build tag (``-march=native`` code is valid only on the CPU it was built
for), a run's provenance in ``run.json`` and the benchmarks' ``machine()`` line all name the
CPU from here, so they agree on what they call it. The first processor's entry stands for
all: the machines this runs on are not heterogeneous.
"""
from __future__ import annotations

import functools
import platform
from dataclasses import dataclass

# The instructions that set bfloat16's speed on a CPU, as /proc/cpuinfo spells them, with the
# names the benchmarks print: AVX512-BF16 alone (AMD EPYC) or with AMX's bfloat16 tiles (Intel).
BF16_FLAGS = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX"}


@dataclass(frozen=True)
class CPU:
    name: str              # "model name", or platform's guess where there is no /proc/cpuinfo
    family: str            # "cpu family" ("?" where unknown)
    model: str             # "model" ("?" where unknown)
    flags: frozenset[str]  # the instruction-set flags

    def bf16_flags(self) -> list[str]:
        """The flags of :data:`BF16_FLAGS` this CPU has, in that order."""
        return [f for f in BF16_FLAGS if f in self.flags]


@functools.cache
def cpu() -> CPU:
    """This machine's CPU, from the first processor's entry of ``/proc/cpuinfo``."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return CPU(name=fields.get("model name") or platform.processor() or platform.machine(),
               family=fields.get("cpu family", "?"), model=fields.get("model", "?"),
               flags=frozenset(fields.get("flags", "").split()))
