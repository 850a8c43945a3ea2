"""Data-parallel training under torchrun: 2 CPU processes, gloo, on 127.0.0.1.

The same global batch trained by one process and by two must give the same losses, noise
included (train.ddp_noise=global: both ranks draw what one process draws); a DDP run
interrupted by SIGTERM checkpoints once and resumes into the losses of an uninterrupted DDP
run, and its checkpoint continues in one process; rank 0 alone writes the run's files.

A torchrun costs seconds (a launcher and two workers, each importing torch), so the runs are
shared: one uninterrupted DDP run with noise (the `shared_wd` fixture) is checked for its files,
against one process, and as the reference of the interrupted one; the interrupted run (the
`interrupted` fixture) is resumed by torchrun and, copied, by one process. Five torchruns in all.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch

from conftest import REPO, metrics, run_main, tiny_overrides, write_tiny_ptb
from flipout_lstm import checkpoint, distributed
from test_reliability import wait_for_steps

# One thread per process (tiny models run fastest so); a crash prints its stack.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
SHORT = {"train.max_steps": 12, "train.checkpoint_every": 5, "train.eval_every": 6,
         "train.log_every": 1}
# Shared WD (one DropConnect mask per batch, flipout off) with every locked dropout of
# word_ptb.yaml on, long enough to be interrupted part-way (a SIGTERM after step 13). The last
# step is no multiple of checkpoint_every, so the run's end writes a checkpoint of its own.
LONG = {"train.max_steps": 32, "train.checkpoint_every": 10, "train.log_every": 1,
        "train.eval_every": 25, "model.lstm.flipout": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_args(root, out, *extra, **settings):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", "train.py",
            "recipes/word_ptb.yaml", *tiny_overrides(root, out, **settings), *extra]


def failed(proc) -> str:
    """Both streams of a failed torchrun: a rank's abort shows on stderr, how far it got on stdout."""
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"


def torchrun(root, out, *extra, **settings):
    return subprocess.run(torchrun_args(root, out, *extra, **settings), cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **WORKER_ENV})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_ptb(tmp_path_factory.mktemp("corpus") / "ptb")


def one_process(corpus, out, *extra, **settings):
    """train.py in this process on the tiny corpus: the run's metrics and what it printed."""
    proc = run_main("train.py", "recipes/word_ptb.yaml", *tiny_overrides(corpus, out, **settings),
                    *extra)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return metrics(out / "word_ptb"), proc


@pytest.fixture(scope="module")
def shared_wd(corpus, tmp_path_factory):
    """One process and two (train.ddp_noise=global), the same global batch of 4, LONG (noise
    on), uninterrupted: (one, two, DDP stdout), the run directories."""
    out = tmp_path_factory.mktemp("shared_wd")
    proc = torchrun(corpus, out / "two", **LONG)
    assert proc.returncode == 0, failed(proc)
    one_process(corpus, out / "one", **LONG)
    return out / "one" / "word_ptb", out / "two" / "word_ptb", proc.stdout


def test_ddp_run_completes_and_rank_0_alone_writes(shared_wd):
    _, run, stdout = shared_wd
    assert stdout.count("done after 32 steps") == 1 and "2 processes of 2 columns" in stdout
    for name in ("config.yaml", "vocab.json", "last.pt", "best.pt", "metrics.jsonl", "run.json"):
        assert (run / name).is_file(), name
    assert [p.name for p in checkpoint.numbered(run)] == \
        ["ckpt-00000020.pt", "ckpt-00000030.pt", "ckpt-00000032.pt"]  # train.keep_checkpoints=3
    lines = metrics(run)  # each line once: no second writer
    assert [l["step"] for l in lines if l["split"] == "train"] == list(range(1, 33))
    assert [l["step"] for l in lines if l["split"] != "train"] == [25, 32, 32, 32]
    assert json.loads((run / "run.json").read_text())["tokens_seen"] == 32 * 4 * 10  # global batch
    last = checkpoint.load(run / "last.pt")
    # The carried state of all 4 columns (both ranks'), and one generator state per rank.
    assert [tuple(h.shape) for h, _ in last["hidden"]] == [(4, 16), (4, 16)]
    assert len(last["rng_ranks"]) == 2
    # train.ddp_noise=global: one stream on every rank, each keeping its columns of the draws
    # (after 32 steps of dropout and DropConnect draws, the streams are still in step).
    assert torch.equal(last["rng"]["torch"], last["rng_ranks"][0]["torch"])
    assert torch.equal(last["rng_ranks"][0]["torch"], last["rng_ranks"][1]["torch"])


def test_ddp_losses_equal_one_process_of_the_same_global_batch(shared_wd):
    """DDP's averaged gradient is the global batch's, and with one noise stream on every rank
    the draws are one process's too: the losses, the validation and the weights agree."""
    one, two, _ = shared_wd
    a, b = metrics(one), metrics(two)
    assert [(l["step"], l["split"]) for l in a] == [(l["step"], l["split"]) for l in b]
    rel = [abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(a, b)]
    print("one process:", [round(l["loss"], 7) for l in a])
    print("two processes:", [round(l["loss"], 7) for l in b])
    print(f"max relative difference {max(rel):.3g} over {len(rel)} losses")
    assert max(rel) < 1e-5
    # Validation is split across the ranks and summed: every token scored once.
    assert [l["tokens"] for l in a if "tokens" in l] == [l["tokens"] for l in b if "tokens" in l]
    # The weights end up the same too.
    wa, wb = checkpoint.load(one / "last.pt")["model"], checkpoint.load(two / "last.pt")["model"]
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.parametrize("noise", [
    # Shared WD (one DropConnect mask per batch) with every locked dropout of word_ptb.yaml on:
    # the `shared_wd` runs (LONG).
    "shared_wd",
    # Gauss + flipout: one shared ΔŴ, signs per example; the dropouts off, standard dropout on.
    {"model.lstm.weight_drop": 0, "model.lstm.weight_noise": 0.5, "model.embedding_dropout": 0,
     "model.input_dropout": 0, "model.layer_dropout": 0.3, "model.dropout_type": "standard"},
], ids=["shared_wd", "gauss_flipout"])
def test_ddp_with_noise_equals_one_process_of_the_same_global_batch(corpus, tmp_path, request,
                                                                    noise):
    """The default train.ddp_noise=global: two ranks draw what one process draws for the whole
    batch, so a shared perturbation stays shared and the losses agree (per_rank would not)."""
    if noise == "shared_wd":
        settings = LONG
        one_dir, two_dir, _ = request.getfixturevalue("shared_wd")
        one, two = metrics(one_dir), metrics(two_dir)
    else:
        settings = {**SHORT, **noise}
        proc = torchrun(corpus, tmp_path / "two", **settings)
        assert proc.returncode == 0, failed(proc)
        two = metrics(tmp_path / "two" / "word_ptb")
        one, _ = one_process(corpus, tmp_path / "one", **settings)
    rel = max(abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(one, two))
    assert len(one) == len(two) and rel < 1e-5, rel
    if settings.get("model.lstm.flipout") == "false":  # a shared mask: per_rank would not share it
        independent = torchrun(corpus, tmp_path / "per_rank", "train.ddp_noise=per_rank", **settings)
        assert independent.returncode == 0, failed(independent)
        apart = metrics(tmp_path / "per_rank" / "word_ptb")
        assert len(apart) == len(one)
        assert max(abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(one, apart)) > 1e-3


@pytest.fixture(scope="module")
def interrupted(corpus, tmp_path_factory):
    """A LONG DDP run that torchrun's SIGTERM stopped part-way: (its out_dir, the launcher's
    stdout and stderr, a copy of its run directory as the signal left it, in another out_dir)."""
    out = tmp_path_factory.mktemp("interrupted")
    proc = subprocess.Popen(torchrun_args(corpus, out, **LONG), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **WORKER_ENV})
    try:
        wait_for_steps(out / "word_ptb", 13, proc)
        proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both workers
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # a failed wait: leave no launcher behind
            proc.kill()
            proc.communicate()
    copy = tmp_path_factory.mktemp("interrupted_copy")
    shutil.copytree(out / "word_ptb", copy / "word_ptb")  # before anything resumes it
    return out, stdout, stderr, copy


def test_ddp_checkpoint_resumes_in_one_process_exactly(corpus, shared_wd, interrupted):
    """With one noise stream on every rank, a run written by two processes continues in one (or
    any number) exactly: the losses after the resume are an uninterrupted run's (one process's,
    which two ranks' equal: the tests above)."""
    _, _, _, copy = interrupted
    saved = checkpoint.load(copy / "word_ptb" / "last.pt")
    assert len(saved["rng_ranks"]) == 2  # written by two processes
    stopped = saved["progress"]["step"]
    assert 13 <= stopped < LONG["train.max_steps"]
    b, proc = one_process(corpus, copy, "--resume", **LONG)
    out, err = proc.stdout, proc.stderr
    assert f"(step {stopped})" in out and "streams restart" not in err, out + err
    a = metrics(shared_wd[0])  # one process, uninterrupted
    assert [(l["step"], l["split"]) for l in a] == [(l["step"], l["split"]) for l in b]
    assert max(abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(a, b)) < 1e-5


def test_sigterm_to_torchrun_checkpoints_once_and_resume_continues_the_losses(corpus, shared_wd,
                                                                            interrupted):
    tmp_path, out, err, _ = interrupted
    reference = metrics(shared_wd[1])  # the same LONG run by torchrun, uninterrupted
    run = tmp_path / "word_ptb"
    assert out.count("SIGTERM received") == 1, out + err  # rank 0 alone speaks
    stopped = int(out.split("stopped after step ")[1].split(";")[0])
    assert 13 <= stopped < LONG["train.max_steps"]
    assert "Resume with: torchrun --nproc_per_node=2 train.py" in out
    # One checkpoint for the signal, at the step where both ranks stopped, besides the periodic ones.
    names = [p.name for p in checkpoint.numbered(run)]
    assert names[-1] == f"ckpt-{stopped:08d}.pt"
    assert all(int(n[5:13]) % LONG["train.checkpoint_every"] == 0 for n in names[:-1])
    assert checkpoint.load(run / "last.pt")["progress"]["step"] == stopped
    assert "exitcode  : " not in err  # no worker failed (torchrun lists failed workers so)

    resumed = torchrun(corpus, tmp_path, "--resume", **LONG)
    assert resumed.returncode == 0, failed(resumed)
    assert f"(step {stopped})" in resumed.stdout
    assert metrics(run) == reference


def test_noise_seeds_differ_per_rank_and_step():
    seeds = {distributed.noise_seed(1111, r, s) for r in range(4) for s in (0, 10)}
    assert len(seeds) == 8 and 1111 not in seeds
    assert distributed.noise_seed(1111, 1) == distributed.noise_seed(1111, 1, 0)


def test_context_from_the_environment_and_column_shares():
    assert distributed.from_env({}) == distributed.Context()
    ctx = distributed.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                                "LOCAL_WORLD_SIZE": "2"})
    assert (ctx.rank, ctx.world, ctx.local_rank, ctx.enabled, ctx.main) == (3, 4, 1, True, False)
    assert distributed.launcher(ctx).startswith("torchrun --nnodes=2 --nproc_per_node=2")
    shares = [distributed.Context(rank=r, world=3).share(10) for r in range(3)]
    assert [(s.start, s.stop) for s in shares] == [(0, 3), (3, 6), (6, 10)]
    with pytest.raises(distributed.ConfigError, match="RANK=5 is not in"):
        distributed.from_env({"RANK": "5", "WORLD_SIZE": "2"})


def test_global_batch_must_split_evenly():
    distributed.check_batch(distributed.Context(rank=1, world=2), 4)
    with pytest.raises(distributed.ConfigError, match=r"data.batch_size=5 is the global batch .* "
                                                      r"multiple of 2"):
        distributed.check_batch(distributed.Context(rank=1, world=2), 5)


def test_ranks_leave_together_after_a_normal_end_and_at_once_after_an_error(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append("destroy"))
    distributed.shutdown(together=True)
    assert calls == ["barrier", "destroy"]
    calls.clear()
    distributed.shutdown(together=False)  # a peer that failed may never reach a barrier
    assert calls == ["destroy"]


def test_train_py_leaves_together_only_when_the_run_ended(monkeypatch, tmp_path):
    left = []
    monkeypatch.setattr(distributed, "shutdown", lambda together: left.append(together))
    assert run_main("train.py", "recipes/word_ptb.yaml", "--dry-run",
                    *tiny_overrides(write_tiny_ptb(tmp_path / "ptb"), tmp_path / "out")).returncode == 0
    assert run_main("train.py", "recipes/word_ptb.yaml", "optim.lr=-1").returncode == 2
    assert left == [True, False]
