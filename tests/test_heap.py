"""Freed memory kept in the heap (flipout_lstm/heap.py): the big blocks of a training step,
freed and allocated again, cost no page faults once the heap has grown, the environment turns it off, and train.py and evaluate.py turn it on."""
import re
import resource
import subprocess
import sys

import pytest
import torch

import evaluate as evaluate_script
from conftest import REPO, run_main, train_tiny
from flipout_lstm import heap

pytestmark = pytest.mark.skipif(not heap.available(), reason="glibc's malloc only")

@pytest.fixture
def restore():
    """Whatever this process had before, back after the test."""
    before = heap.kept()
    yield
    heap.keep_freed_memory(before)


# A training step's pattern, in a fresh process as train.py is one: logits of 1400 x 10,000
# (56 MB, above glibc's largest mmap threshold) and their gradient, made and freed each step.
# Kept, the heap needs a few steps to reach the size the step needs, then hands the same pages
# back; so the faults of the last steps are counted.
STEPS = """
import resource, sys, torch
from flipout_lstm import heap
heap.keep_freed_memory(sys.argv[1] == "kept")
torch.manual_seed(0)
x, w = torch.randn(1400, 200), torch.randn(10000, 200, requires_grad=True)
target = torch.zeros(1400, dtype=torch.long)
for step in range(10):
    if step == 7:
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.nn.functional.cross_entropy(x @ w.t(), target).backward()
    w.grad = None
print(heap.kept(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""
LOGITS_PAGES = 1400 * 10000 * 4 / resource.getpagesize()


def last_steps_faults(arm: str) -> tuple[bool, int]:
    """Whether freed memory is kept, and the minor page faults of the last 3 of 10 steps, in a
    new process (``arm``: glibc or kept)."""
    res = subprocess.run([sys.executable, "-c", STEPS, arm], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    kept, faults = res.stdout.split()
    return kept == "True", int(faults)


def test_freed_blocks_are_reused_without_page_faults():
    glibc, kept = last_steps_faults("glibc"), last_steps_faults("kept")
    # glibc maps the logits and their gradient afresh every step, so their pages fault again
    # (at least once a step each); kept, the heap hands back pages already present.
    assert glibc[0] is False and glibc[1] > 3 * 2 * 0.9 * LOGITS_PAGES, glibc
    assert kept[0] is True and kept[1] < 0.25 * glibc[1], (kept, glibc)


def test_environment_turns_it_off(monkeypatch, restore):
    heap.keep_freed_memory(False)
    monkeypatch.setenv(heap.ENV, "0")
    assert heap.keep_freed_memory() is False and not heap.kept()
    monkeypatch.setenv(heap.ENV, "1")
    assert heap.keep_freed_memory() is True and heap.kept()


def test_train_and_evaluate_keep_freed_memory(tiny_ptb, tmp_path, monkeypatch, restore):
    calls = []
    monkeypatch.setattr(heap, "keep_freed_memory", lambda keep=True: calls.append(keep) or keep)
    assert train_tiny("word_ptb", tiny_ptb, tmp_path, **{"train.max_steps": 2}) == 0
    assert calls == [True]
    monkeypatch.chdir(REPO)
    evaluate_script.run(evaluate_script.parse_args(
        [str(tmp_path / "word_ptb" / "best.pt"), "--data-root", str(tiny_ptb), "--no-progress"]))
    assert calls == [True, True]


def test_freed_memory_benchmark_table(tiny_ptb, monkeypatch, capsys, restore):
    """benchmarks/freed_memory.py: a row per recipe, both arms and their ratios, and glibc's
    settings back afterwards."""
    monkeypatch.chdir(REPO)
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import freed_memory
    heap.keep_freed_memory(False)
    assert freed_memory.main(["--recipes", "recipes/zaremba_small.yaml", "--steps", "1",
                              "--warmup", "0", "--repeats", "2", "--data-root", str(tiny_ptb)]) == 0
    out = capsys.readouterr().out
    assert "| recipe | glibc step (ms) | kept step (ms) | speed-up | speed-up per repeat" in out
    assert re.search(r"^\| recipes/zaremba_small\.yaml( \| \d+){2}( \| [\d.]+x){2} \|$", out,
                     re.M), out
    assert not heap.kept()


def test_freed_memory_benchmark_refuses_a_missing_recipe(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    res = run_main("freed_memory.py", "--recipes", "recipes/no_such.yaml")
    assert res.returncode == 2
    assert res.stderr.strip() == "freed_memory.py: error: no such recipe: recipes/no_such.yaml"
