"""Reading a finished or unfinished run directory: its config, metrics, timing and state.

A run directory written by ``train.py`` holds ``config.yaml`` (the resolved recipe),
``metrics.jsonl`` (train/valid lines as it goes; at the very end one ``valid`` and one
``test`` line marked ``"best": true``, the best checkpoint re-scored), ``run.json``
(parameters, steps, wall-clock figures) and checkpoints. :mod:`flipout_lstm.sweep` uses this to decide
whether a run is done, interrupted or new; :mod:`flipout_lstm.report` to tabulate and plot runs.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from flipout_lstm import scores
from flipout_lstm.errors import UserError

SEED_SUFFIX = re.compile(r"-s\d+$")




def fmt_duration(seconds) -> str:
    """A wall time as tables and status lines show it: ``42 s``, ``54.7 min``, ``2.1 h``."""
    if seconds is None:
        return "–"
    seconds = max(seconds, 0)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    return f"{minutes:.1f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


@dataclass
class Run:
    """What a run directory says about itself; fields are None where it does not say yet."""

    path: Path
    config: dict
    metrics: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> "Run":
        path = Path(path)
        cfg_file = path / "config.yaml"
        try:
            config = yaml.safe_load(cfg_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path} is not a run directory (no config.yaml); pass a folder "
                            f"written by train.py or flipout_lstm.sweep") from None
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise UserError(f"{cfg_file} is not readable YAML ({type(exc).__name__}); the run "
                            f"directory is damaged") from None
        if not isinstance(config, dict):
            raise UserError(f"{cfg_file} does not hold a resolved recipe; the run directory is damaged")
        metrics = []
        metrics_file = path / "metrics.jsonl"
        if metrics_file.is_file():
            text = metrics_file.read_text(encoding="utf-8").splitlines()
            for number, line in enumerate(text, 1):
                if not line.strip():
                    continue
                try:
                    metrics.append(json.loads(line))
                except json.JSONDecodeError:
                    if number == len(text):  # a line cut short by a kill is the last one
                        break
                    raise UserError(f"{metrics_file}:{number} is not a JSON line; the run "
                                    f"directory is damaged") from None
        summary = {}
        summary_file = path / "run.json"
        if summary_file.is_file():
            try:
                summary = json.loads(summary_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                summary = {}  # written atomically, so only a foreign file gets here: ignore it
        return cls(path, config, metrics, summary)

    # ---------------------------------------------------------------- identity
    @property
    def name(self) -> str:
        return str(self.config.get("train", {}).get("run_name") or self.path.name)

    @property
    def recipe_name(self) -> str:
        """The run name without its sweep seed suffix (``char_gal-s2`` -> ``char_gal``)."""
        return SEED_SUFFIX.sub("", self.name)

    @property
    def seed(self) -> Optional[int]:
        return self.config.get("train", {}).get("seed")

    @property
    def level(self) -> str:
        data = self.config.get("data", {})
        return data.get("tokenizer") or data.get("level") or "char"

    @property
    def metric(self) -> str:
        return scores.metric(self.level)

    # ---------------------------------------------------------------- progress
    @property
    def done(self) -> bool:
        """Finished: the best checkpoint was scored on the test split at the end."""
        return any(m.get("split") == "test" and m.get("best") for m in self.metrics)

    @property
    def steps(self) -> int:
        return max([m.get("step", 0) for m in self.metrics] + [self.summary.get("steps", 0)])

    def lines(self, split: str) -> list:
        """The metrics lines of one split, in order, without the end-of-run re-scores."""
        return [m for m in self.metrics if m.get("split") == split and not m.get("best")]

    @property
    def epochs(self) -> Optional[float]:
        valid = [m["epoch"] for m in self.lines("valid") if "epoch" in m]
        return valid[-1] if valid else None

    def final(self, split: str) -> Optional[dict]:
        """The end-of-run score of the best checkpoint on ``split``, if the run finished."""
        found = [m for m in self.metrics if m.get("split") == split and m.get("best")]
        return found[-1] if found else None

    def best_valid(self) -> Optional[dict]:
        """The final re-score of the best checkpoint, else the best validation line so far."""
        final = self.final("valid")
        if final is not None:
            return final
        valid = [m for m in self.lines("valid") if m.get("loss") is not None]
        return min(valid, key=lambda m: m["loss"]) if valid else None

    def reached(self, target: float) -> tuple:
        """(step, wall seconds) of the first evaluation whose validation score is at most
        ``target``; (None, None) if none is. Wall time comes from run.json's ``evals``."""
        for m in self.lines("valid"):
            score = self.score(m)
            if score is not None and score <= target:
                walls = dict((int(s), w) for s, w in self.summary.get("evals", []))
                return m["step"], walls.get(m["step"])
        return None, None

    def last_spread(self, n: int = 3) -> Optional[float]:
        """How flat the end of the validation curve is: ``(max − min) / min`` of the headline
        score over the last ``n`` evaluations (0.004 = 0.4%); None before ``n`` evaluations."""
        last = [self.score(m) for m in self.lines("valid")][-n:]
        if len(last) < n or any(x is None for x in last):
            return None
        return (max(last) - min(last)) / min(last)

    def score(self, line: Optional[dict]) -> Optional[float]:
        """The headline figure (bpc or ppl) of a metrics line."""
        if line is None:
            return None
        return line.get(self.metric)


def find_runs(paths) -> list[Run]:
    """Run directories among ``paths``: each path is a run directory or a folder holding them
    (searched recursively). Raises a one-line error when a path holds none."""
    runs = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise UserError(f"{p} does not exist; pass run directories or folders holding them")
        if (p / "config.yaml").is_file():
            runs.append(Run.load(p))
            continue
        found = sorted(c.parent for c in p.rglob("config.yaml") if (c.parent / "metrics.jsonl").exists())
        if not found:
            raise UserError(f"{p} holds no run directories (folders with config.yaml and "
                            f"metrics.jsonl written by train.py)")
        runs.extend(Run.load(c) for c in found)
    return runs
