"""Run logs: ``metrics.jsonl`` (one JSON object per logged step and per evaluation) and
TensorBoard scalars.

``metrics.jsonl`` holds only values that are a pure function of the run's seed and data (no
wall-clock times), so a resumed run's lines equal an uninterrupted run's, value for value.
Throughput goes to TensorBoard, the progress bar and ``run.json``. On resume the file is cut
back to the number of lines the checkpoint recorded, dropping lines written after it.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import torch

from flipout_lstm.fileio import atomic_write_bytes
from flipout_lstm.nn import cpuinfo


def provenance(step: int, precision: str) -> dict:
    """What trains a run from ``step`` on: the code's git commit (``+`` if the work tree has
    changes), torch, the CPU (name, family and model numbers, torch's ISA level and the
    bfloat16 instructions it has, which set bf16's speed: AVX512-BF16 alone or with AMX) and
    the precision. ``run.json`` lists one such segment per start or resume, so a run resumed
    on other code or another machine says so."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, text=True,
                                  capture_output=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "--short=12", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "+"
    cpu = cpuinfo.cpu()
    isa = ", ".join([torch.backends.cpu.get_cpu_capability(), *cpu.bf16_flags()])
    return {"step": step, "code": commit or None, "torch": str(torch.__version__),
            "cpu": f"{cpu.name} (family {cpu.family}, model {cpu.model}, {isa})",
            "precision": precision}


def write_run_summary(run_dir: Path, progress: dict, parameters: int,
                      batches_per_epoch: int | None = None) -> None:
    """``run.json``: the run's size and wall-clock figures so far (``flipout_lstm.report`` reads them).

    ``wall_seconds`` is the whole loop, evaluations included; ``step_seconds`` only the
    training steps, so ``tokens_per_s = tokens_seen / step_seconds`` is training throughput.
    ``evals`` pairs each evaluation's step with the wall time at which it finished. Work a
    crash threw away is not counted: the figures are those of the checkpoint resumed from.
    """
    step_seconds = progress["step_seconds"]
    record = {"parameters": parameters, "batches_per_epoch": batches_per_epoch,
              "steps": progress["step"],
              "tokens_seen": progress["tokens_seen"],
              "wall_seconds": round(progress["wall_seconds"], 3),
              "step_seconds": round(step_seconds, 3),
              "tokens_per_s": round(progress["tokens_seen"] / step_seconds, 1) if step_seconds else None,
              "evals": progress["eval_walls"], "segments": progress.get("segments", [])}
    atomic_write_bytes(run_dir / "run.json", (json.dumps(record) + "\n").encode())


class MetricsLog:
    def __init__(self, run_dir: Path, *, tensorboard: bool, keep_lines: int | None = None,
                 purge_step: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        if keep_lines is None:
            self.path.write_text("")
            self.lines = 0
        else:
            kept = self.path.read_text().splitlines()[:keep_lines] if self.path.exists() else []
            self.path.write_text("".join(line + "\n" for line in kept))
            self.lines = len(kept)
        self._file = open(self.path, "a", encoding="utf-8")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step drops events past the resume point from the TensorBoard view too.
            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=purge_step)

    def log(self, step: int, split: str, **values) -> None:
        """Append one JSON line ``{"step", "split", ...values}``."""
        # Strict JSON has no NaN/Infinity: a non-finite value is written as null.
        record = {"step": step, "split": split,
                  **{k: None if isinstance(v, float) and not math.isfinite(v) else v
                     for k, v in values.items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        self.lines += 1
        self.scalars(step, split, **values)

    def scalars(self, step: int, split: str, **values) -> None:
        """TensorBoard only (for throughput and other wall-clock figures)."""
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{split}/{key}", value, step)

    def sync(self) -> None:
        """Make the lines so far durable before a checkpoint records their count."""
        self._file.flush()
        os.fsync(self._file.fileno())
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        self._file.close()
        if self.writer is not None:
            self.writer.close()


class NullLog:
    """The log of a DDP rank other than 0: the same calls, nothing written (rank 0 logs)."""

    lines = 0

    def log(self, step: int, split: str, **values) -> None:
        pass

    def scalars(self, step: int, split: str, **values) -> None:
        pass

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass
