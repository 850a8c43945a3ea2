"""Shared test fixtures: where the real corpus is, and small deterministic defaults."""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_PTB = REPO.parent / "shared" / "data" / "ptb"


def _real_ptb_root():
    """The folder with the real PTB files: LM_DATA_ROOT if set, else ../shared/data/ptb."""
    env = os.environ.get("LM_DATA_ROOT")
    for cand in ([Path(env)] if env else []) + [SHARED_PTB, REPO / "data" / "ptb"]:
        if (cand / "ptb.train.txt").is_file():
            return cand
    return None


@pytest.fixture(scope="session")
def ptb_root():
    """Path to the real PTB word files; tests that need them skip when they are absent."""
    root = _real_ptb_root()
    if root is None:
        pytest.skip("real PTB files not found (set LM_DATA_ROOT or provide ../shared/data/ptb)")
    return root


@pytest.fixture(scope="session")
def shared_ptb():
    """Path to ../shared/data/ptb, which also holds the reference character files."""
    if not (SHARED_PTB / "ptb.char.train.txt").is_file():
        pytest.skip("../shared/data/ptb with the character files is absent")
    return SHARED_PTB


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def write_tiny_ptb(root: Path, seed: int = 0) -> Path:
    """A small corpus in PTB's format (leading space, one sentence per line, <unk>, N)."""
    import random as _random

    rng = _random.Random(seed)
    words = ["the", "a", "cat", "dog", "sat", "on", "mat", "N", "<unk>", "ran", "and", "big"]
    root.mkdir(parents=True, exist_ok=True)
    for split, lines in (("train", 400), ("valid", 40), ("test", 40)):
        text = "".join(" " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + " \n"
                       for _ in range(lines))
        (root / f"ptb.{split}.txt").write_text(text)
    return root


@pytest.fixture
def tiny_ptb(tmp_path):
    """Folder with a tiny synthetic PTB-format corpus (fast trainer tests)."""
    return write_tiny_ptb(tmp_path / "tiny_ptb")


def run_cli(*args, cwd=REPO, env=None, timeout=300):
    """Run ``python <script> args...`` from the repo root; returns the CompletedProcess."""
    import subprocess
    import sys

    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def tiny_overrides(data_root, out_dir, **extra):
    """Overrides that make any recipe a seconds-long run on the tiny corpus."""
    base = {
        "data.root": str(data_root), "data.download": "false", "data.batch_size": "4",
        "data.bptt": "10", "data.eval_batch_size": "4", "model.hidden_size": "16",
        "model.embedding_size": "16", "train.out_dir": str(out_dir), "train.progress": "false",
        "train.log_every": "2", "train.tensorboard": "false",
    }
    base.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def metrics(run_dir):
    """A run's metrics.jsonl, one dict a line."""
    import json
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_tiny(recipe, root, out, *extra, **settings):
    """``train.py recipes/<recipe>.yaml`` in this process, made tiny by :func:`tiny_overrides`
    (``settings`` on top, then the ``extra`` arguments): its exit status."""
    import train as train_script
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        return train_script.main([f"recipes/{recipe}.yaml", *tiny_overrides(root, out, **settings),
                                  *extra])
    finally:
        os.chdir(cwd)


def run_main(script, *args, env=None):
    """``python <script> args...`` in this process, for the tests of what a command prints and
    returns (errors, mostly): its ``main(argv)`` with stdout and stderr captured, as a
    CompletedProcess like :func:`run_cli`'s, without an interpreter's start (seconds a call).
    What needs a process of its own (signals, exit at interpreter shutdown) uses run_cli."""
    import contextlib
    import importlib
    import io
    import subprocess

    module = importlib.import_module(Path(script).stem)
    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in (env or {})}
    cwd = os.getcwd()
    os.environ.update(env or {})
    os.chdir(REPO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = module.main([str(a) for a in args])
            except SystemExit as exc:  # argparse's errors and --help
                code = exc.code
    finally:
        os.chdir(cwd)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())
