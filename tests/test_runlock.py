"""One process per run directory: the lock, who holds it, and that a killed holder frees it."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_cli, tiny_overrides
from flipout_lstm import runlock
from flipout_lstm.errors import UserError

HOLD = """
import sys, time
from flipout_lstm import runlock
with runlock.hold(sys.argv[1]):
    print("holding", flush=True)
    time.sleep(120)
"""


def hold_in_child(run_dir):
    """A process that holds ``run_dir`` until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_held_run_directory_names_its_holder_and_frees_when_the_holder_is_killed(tmp_path):
    run = tmp_path / "run"
    child = hold_in_child(run)
    try:
        with pytest.raises(UserError) as e:
            with runlock.hold(run):
                pass
        assert str(e.value) == (f"{run} is in use by process {child.pid} (it holds {run / 'train.lock'}); "
                                f"wait for it to finish or stop it, or choose another train.run_name=NAME")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (run / "train.lock").read_text() == f"{child.pid}\n"  # left behind, but not locked
    with runlock.hold(run):
        assert (run / "train.lock").read_text() == f"{os.getpid()}\n"
    assert list(run.iterdir()) == []  # the lock file is removed (the folder was there before)
    fresh = tmp_path / "out" / "fresh"
    with runlock.hold(fresh):
        assert (fresh / "train.lock").is_file()
    assert not fresh.exists()  # a folder it created and nothing else was written to: removed


def test_releasing_keeps_a_run_directory_with_files(tmp_path):
    run = tmp_path / "run"
    with runlock.hold(run):
        (run / "config.yaml").write_text("train: {}\n")
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with runlock.hold(empty):
        pass
    assert empty.is_dir()  # it was there before: not ours to remove


def test_a_run_that_fails_before_writing_leaves_no_run_directory(tmp_path):
    proc = run_cli("train.py", "recipes/word_ptb.yaml", *tiny_overrides(tmp_path / "no-corpus", tmp_path / "out"))
    assert proc.returncode == 2 and "PTB files missing" in proc.stderr
    assert not (tmp_path / "out" / "word_ptb").exists()


def test_an_unwritable_out_dir_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot write the run directory .*set train.out_dir"):
        with runlock.hold(blocker / "run"):
            pass


def test_the_lock_waits_for_nobody(tmp_path):
    """A second taker fails at once (non-blocking), not after the holder ends."""
    run = tmp_path / "run"
    child = hold_in_child(run)
    try:
        tic = time.perf_counter()
        with pytest.raises(UserError, match=f"in use by process {child.pid}"):
            with runlock.hold(run):
                pass
        assert time.perf_counter() - tic < 5
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
