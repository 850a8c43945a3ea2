"""Crashes, signals, broken checkpoints and bad inputs: nothing is lost, every mistake is one line.

Each test drives the real entry point (a subprocess where a process has to be signalled or
killed; ``train.main`` / ``evaluate.main`` in-process otherwise, which skips an interpreter's
start) and checks the exit code and the message.
"""
import errno
import http.server
import io
import json
import os
import signal
import stat
import subprocess
import sys
import tarfile
import threading
import time

import pytest
import torch

import train as train_script
from conftest import REPO, metrics, run_main, tiny_overrides, write_tiny_ptb
from flipout_lstm import checkpoint, fileio
from flipout_lstm.errors import CheckpointError


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)


def one_error_line(proc_or_text):
    text = proc_or_text if isinstance(proc_or_text, str) else proc_or_text.stderr
    lines = [line for line in text.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, text
    return lines[0]


# ----------------------------------------------------------------------------- crashes

LONG = {"train.max_steps": 150, "train.checkpoint_every": 10, "train.log_every": 1,
        "train.eval_every": 50, "model.hidden_size": 48, "model.embedding_size": 48}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models run fastest on one thread


def train_one_thread(*args):
    """train.py on word_ptb.yaml in this process, on one thread like the interrupted runs'
    processes (so their numbers are the same), restoring this process's thread count."""
    threads = torch.get_num_threads()
    try:
        return run_main("train.py", "recipes/word_ptb.yaml", *args, "train.threads=1")
    finally:
        torch.set_num_threads(threads)


def start_training(data_root, out_dir):
    args = ["train.py", "recipes/word_ptb.yaml", *tiny_overrides(data_root, out_dir, **LONG)]
    return subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **ONE_THREAD})


def wait_for_steps(run_dir, steps, proc, timeout=120):
    """Block until metrics.jsonl has logged ``steps`` training steps."""
    path, deadline = run_dir / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "training finished before it could be interrupted"
        if path.exists() and sum('"train"' in line for line in path.read_text().splitlines()) >= steps:
            return
        time.sleep(0.02)
    raise AssertionError("training made no progress")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted run; the interrupted ones must reproduce its metrics exactly."""
    root = write_tiny_ptb(tmp_path_factory.mktemp("corpus") / "ptb")
    out = tmp_path_factory.mktemp("reference")
    proc = train_one_thread(*tiny_overrides(root, out, **LONG))
    assert proc.returncode == 0, proc.stderr
    return root, metrics(out / "word_ptb")


def test_sigkill_mid_epoch_then_resume_loses_at_most_one_interval(reference_run, tmp_path):
    root, expected = reference_run
    proc = start_training(root, tmp_path)
    wait_for_steps(tmp_path / "word_ptb", 37, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = tmp_path / "word_ptb"
    killed_at = max(line["step"] for line in metrics(run))
    resumed = train_one_thread(*tiny_overrides(root, tmp_path, **LONG), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    start = int(resumed.stdout.split("(step ")[1].split(")")[0])
    assert 0 <= killed_at - start <= LONG["train.checkpoint_every"]
    assert metrics(run) == expected


def test_signal_saves_a_checkpoint_and_exits_0(reference_run, tmp_path):
    """SIGTERM (a scheduler's); a first SIGINT takes the same path (lm.signals: the second
    Ctrl-C test below, and test_train's test of the handler)."""
    sig = signal.SIGTERM
    root, expected = reference_run
    proc = start_training(root, tmp_path)
    wait_for_steps(tmp_path / "word_ptb", 23, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"{signal.Signals(sig).name} received: stopped after step" in out and "--resume" in out
    run = tmp_path / "word_ptb"
    stopped_at = int(out.split("stopped after step ")[1].split(";")[0])
    assert checkpoint.load(run / "last.pt")["progress"]["step"] == stopped_at  # nothing redone
    resumed = train_one_thread(*tiny_overrides(root, tmp_path, **LONG), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert metrics(run) == expected


# train.py with its training step number SLOW_AT made long: it touches SLOW_MARKER, then sleeps.
SLOW_STEP = """
import os, sys, time
import train
from flipout_lstm.model import LanguageModel
forward, calls = LanguageModel.forward, [0]
def slow(self, *args, **kwargs):
    if self.training:
        calls[0] += 1
        if calls[0] == int(os.environ["SLOW_AT"]):
            open(os.environ["SLOW_MARKER"], "w").close()
            time.sleep(120)
    return forward(self, *args, **kwargs)
LanguageModel.forward = slow
sys.exit(train.main(sys.argv[1:]))
"""


def start_slow_training(data_root, out_dir, slow_at):
    """Training (the LONG settings) that is inside its long step ``slow_at`` when this returns."""
    marker = out_dir / "in-the-long-step"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_STEP, "recipes/word_ptb.yaml",
                             *tiny_overrides(data_root, out_dir, **LONG)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ONE_THREAD, "SLOW_AT": str(slow_at), "SLOW_MARKER": str(marker)})
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else ""
        time.sleep(0.05)
    return proc


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(reference_run, tmp_path):
    root, expected = reference_run
    proc = start_slow_training(root, tmp_path, 25)
    proc.send_signal(signal.SIGINT)
    # Said at once, while step 25 still has two minutes to go:
    assert proc.stderr.readline() == "\n"
    assert proc.stderr.readline().startswith("SIGINT received: stopping after the current step and "
                                             "saving a checkpoint (press Ctrl-C again to stop at once")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err
    run = tmp_path / "word_ptb"
    assert err.strip().splitlines() == [
        f"SIGINT received again: stopped at once; the step in progress is not saved; the newest "
        f"checkpoint {run / 'ckpt-00000020.pt'} (step 20) is intact. Resume with: python train.py "
        f"recipes/word_ptb.yaml {' '.join(tiny_overrides(root, tmp_path, **LONG))} --resume"]
    assert checkpoint.load(run / "last.pt")["progress"]["step"] == 20
    assert not (run / "train.lock").exists()
    # What --resume does with ckpt-00000020.pt is the test above: steps 21-25 are redone exactly.
    assert [l for l in metrics(run) if l["step"] <= 20] == [l for l in expected if l["step"] <= 20]


def test_two_processes_cannot_train_one_run_directory(reference_run, tmp_path, capsys):
    root, _ = reference_run
    proc = start_slow_training(root, tmp_path, 15)  # it holds the run, busy in step 15
    run = tmp_path / "word_ptb"
    for resume in ([], ["--resume"]):  # this test's process is the second one
        assert train_script.main(["recipes/word_ptb.yaml", *tiny_overrides(root, tmp_path, **LONG), *resume]) == 2
        assert one_error_line(capsys.readouterr().err) == (
            f"error: {run} is in use by process {proc.pid} (it holds {run / 'train.lock'}); wait for it "
            f"to finish or stop it, or choose another train.run_name=NAME")
    proc.send_signal(signal.SIGKILL)  # the lock goes with the process; its file stays behind
    proc.communicate()
    assert (run / "train.lock").read_text() == f"{proc.pid}\n"
    # A new process takes the run over (a few steps suffice: exact resume is tested above).
    resumed = train_one_thread(*tiny_overrides(root, tmp_path, **LONG), "train.max_steps=12", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and "(step 10)" in resumed.stdout
    assert checkpoint.load(run / "last.pt")["progress"]["step"] == 12
    assert not (run / "train.lock").exists()


def short_run(root, out, **extra):
    settings = {"train.max_steps": 9, "train.checkpoint_every": 3, **extra}
    return train_script.main(["recipes/word_ptb.yaml", *tiny_overrides(root, out, **settings)])


def test_only_the_newest_k_checkpoints_are_kept(tiny_ptb, tmp_path):
    assert short_run(tiny_ptb, tmp_path, **{"train.keep_checkpoints": 2}) == 0
    assert [p.name for p in checkpoint.numbered(tmp_path / "word_ptb")] == ["ckpt-00000006.pt", "ckpt-00000009.pt"]


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tiny_ptb, tmp_path, capsys):
    assert short_run(tiny_ptb, tmp_path) == 0
    run = tmp_path / "word_ptb"
    newest = run / "ckpt-00000009.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated; last.pt is the same file
    capsys.readouterr()
    code = train_script.main(["recipes/word_ptb.yaml", "--resume",
                              *tiny_overrides(tiny_ptb, tmp_path, **{"train.max_steps": 12, "train.checkpoint_every": 3})])
    assert code == 0
    out = capsys.readouterr()
    assert "last.pt is truncated or corrupted" in out.err and "trying an older checkpoint" in out.err
    # One readable clause, not torch's 300 characters about miniz and file transfers.
    warning = next(line for line in out.err.splitlines() if "last.pt is truncated" in line)
    assert warning == (f"warning: checkpoint {run / 'last.pt'} is truncated or corrupted (unexpected "
                       f"end of file); use an earlier checkpoint; trying an older checkpoint")
    assert "resuming from" in out.out and "ckpt-00000006.pt (step 6)" in out.out
    assert checkpoint.load(run / "last.pt")["progress"]["step"] == 12


def test_failing_write_stops_with_a_message_and_keeps_the_previous_checkpoint(tiny_ptb, tmp_path, monkeypatch, capsys):
    real_write = fileio.atomic_write_bytes

    def failing_write(path, data):
        if path.name.startswith("ckpt-") and path.name != "ckpt-00000003.pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(fileio, "atomic_write_bytes", failing_write)
    assert short_run(tiny_ptb, tmp_path) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "could not write checkpoint" in line and "ckpt-00000006.pt" in line
    assert "No space left on device" in line and "--resume" in line
    run = tmp_path / "word_ptb"
    assert checkpoint.load(run / "last.pt")["progress"]["step"] == 3
    assert [p.name for p in checkpoint.numbered(run)] == ["ckpt-00000003.pt"]
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary files left


def nan_at(monkeypatch, step):
    calls, real = {"n": 0}, train_script.training_loss

    def poisoned(*args):
        loss, total = real(*args)
        calls["n"] += 1
        bad = float("nan") if calls["n"] == step else 1.0
        return loss * bad, total * bad

    monkeypatch.setattr(train_script, "training_loss", poisoned)


def test_nonfinite_loss_is_an_error_naming_the_step_and_checkpoint(tiny_ptb, tmp_path, monkeypatch, capsys):
    nan_at(monkeypatch, 5)
    assert short_run(tiny_ptb, tmp_path) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "non-finite loss or gradient at step 5" in line
    assert "last good checkpoint: " in line and "ckpt-00000003.pt" in line and "train.on_nonfinite=skip" in line
    # The bad step never reached the weights: the checkpoint is the one before it.
    assert checkpoint.load(tmp_path / "word_ptb" / "last.pt")["progress"]["step"] == 3


def test_nonfinite_loss_can_be_skipped_and_counted(tiny_ptb, tmp_path, monkeypatch, capsys):
    nan_at(monkeypatch, 5)
    assert short_run(tiny_ptb, tmp_path, **{"train.on_nonfinite": "skip"}) == 0
    assert "step 5 skipped" in capsys.readouterr().err
    train_lines = [l for l in metrics(tmp_path / "word_ptb") if l["split"] == "train"]
    assert train_lines[-1]["skipped"] == 1
    last = checkpoint.load(tmp_path / "word_ptb" / "last.pt")
    assert last["progress"]["skipped"] == 1
    assert all(torch.isfinite(t).all() for t in last["model"].values())


# ----------------------------------------------------------------------------- untrusted files


def test_checkpoint_with_a_pickled_callable_is_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": 1, "model": {}, "config": {}, "payload": os.system}, evil)
    proc = run_main("evaluate.py", evil)
    assert proc.returncode == 2
    assert "refusing to load" in one_error_line(proc) and "pickled Python objects" in proc.stderr


def test_checkpoint_that_is_not_ours(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    proc = run_main("evaluate.py", other)
    assert proc.returncode == 2 and "is not a checkpoint of this trainer" in one_error_line(proc)


def test_missing_checkpoint_path(tmp_path):
    proc = run_main("evaluate.py", tmp_path / "nope.pt")
    assert proc.returncode == 2 and "not found" in one_error_line(proc)


def test_evaluate_a_checkpoint_of_another_shape_or_vocabulary(tiny_ptb, tmp_path):
    assert short_run(tiny_ptb, tmp_path, **{"train.max_steps": 3}) == 0
    best = checkpoint.load(tmp_path / "word_ptb" / "best.pt")
    best["config"]["model"]["hidden_size"] = 32
    torch.save(best, tmp_path / "shape.pt")
    proc = run_main("evaluate.py", tmp_path / "shape.pt", "--data-root", tiny_ptb)
    assert proc.returncode == 2
    assert "does not fit this model" in one_error_line(proc) and "(64, 16) in the checkpoint" in proc.stderr
    best = checkpoint.load(tmp_path / "word_ptb" / "best.pt")
    best["vocab"]["itos"] = best["vocab"]["itos"] + ["zebra"]
    torch.save(best, tmp_path / "vocab.pt")
    proc = run_main("evaluate.py", tmp_path / "vocab.pt", "--data-root", tiny_ptb)
    assert proc.returncode == 2
    assert "different vocabulary or model size" in one_error_line(proc)


def test_resume_into_another_model_shape(tiny_ptb, tmp_path, capsys):
    assert short_run(tiny_ptb, tmp_path, **{"train.max_steps": 3}) == 0
    capsys.readouterr()
    code = train_script.main(["recipes/word_ptb.yaml", "--resume",
                              *tiny_overrides(tiny_ptb, tmp_path, **{"model.hidden_size": 32})])
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert "model.hidden_size (checkpoint 16, now 32)" in line


def test_resume_with_nothing_to_resume(tiny_ptb, tmp_path):
    proc = run_main("train.py", "recipes/word_ptb.yaml", *tiny_overrides(tiny_ptb, tmp_path), "--resume")
    assert proc.returncode == 2 and "nothing to resume" in one_error_line(proc)


def test_a_run_that_failed_before_its_first_checkpoint_says_how_to_start_again(
        tiny_ptb, tmp_path, capsys):
    """best.pt alone (a crash after the first validation, before the first ckpt-*.pt): with
    or without --resume, the one error names the way out, and best.pt is left alone."""
    assert short_run(tiny_ptb, tmp_path, **{"train.max_steps": 3}) == 0
    run = tmp_path / "word_ptb"
    for p in [run / "last.pt", *checkpoint.numbered(run)]:
        p.unlink()
    best = (run / "best.pt").read_bytes()
    capsys.readouterr()
    for resume in ([], ["--resume"]):
        assert train_script.main(["recipes/word_ptb.yaml", *resume,
                                  *tiny_overrides(tiny_ptb, tmp_path)]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "holds a best.pt but no last.pt or ckpt-*.pt" in line and "move or delete" in line
    assert (run / "best.pt").read_bytes() == best


# ----------------------------------------------------------------------------- bad data


def train_cli(root, tmp_path, recipe="word_ptb", **extra):
    return run_main("train.py", f"recipes/{recipe}.yaml", *tiny_overrides(root, tmp_path / "out", **extra))


def test_missing_corpus_without_download(tmp_path):
    proc = train_cli(tmp_path / "empty", tmp_path)
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert str(tmp_path / "empty") in line and "LM_DATA_ROOT" in line


def test_empty_and_undecodable_files(tiny_ptb, tmp_path):
    (tiny_ptb / "ptb.valid.txt").write_text("")
    proc = train_cli(tiny_ptb, tmp_path)
    assert proc.returncode == 2 and "ptb.valid.txt" in one_error_line(proc) and "empty" in proc.stderr
    (tiny_ptb / "ptb.valid.txt").write_bytes(b" caf\xe9 \xff\n")
    proc = train_cli(tiny_ptb, tmp_path)
    assert proc.returncode == 2 and "ptb.valid.txt" in one_error_line(proc) and "UTF-8" in proc.stderr


def test_unknown_words_map_to_unk_and_unknown_characters_are_an_error(tiny_ptb, tmp_path):
    with open(tiny_ptb / "ptb.valid.txt", "a") as f:
        f.write(" the zebra sat # \n")
    assert train_cli(tiny_ptb, tmp_path, **{"train.max_steps": 1}).returncode == 0  # zebra -> <unk>
    proc = train_cli(tiny_ptb, tmp_path, recipe="char_ptb", **{"train.max_steps": 1})
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "token 'z'" in line and "ptb.valid.txt line 41" in line


@pytest.fixture
def tarball_server(tmp_path):
    """Serve one file on 127.0.0.1; yields (set_payload, url)."""
    payload = {"bytes": b""}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload["bytes"])))
            self.end_headers()
            self.wfile.write(payload["bytes"])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield (lambda b: payload.__setitem__("bytes", b)), f"http://127.0.0.1:{server.server_port}/simple-examples.tgz"
    finally:
        server.shutdown()
        server.server_close()


def test_download_with_a_wrong_checksum(tiny_ptb, tmp_path, tarball_server):
    set_payload, url = tarball_server
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for split in ("train", "valid", "test"):
            tar.add(tiny_ptb / f"ptb.{split}.txt", arcname=f"simple-examples/data/ptb.{split}.txt")
    set_payload(buffer.getvalue())
    target = tmp_path / "fresh"
    proc = run_main("train.py", "recipes/word_ptb.yaml",
                   *tiny_overrides(target, tmp_path / "out", **{"data.download": "true", "data.url": url}))
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "SHA-256" in line or "checksum" in line
    assert not list(target.glob("ptb.*.txt"))  # nothing half-verified is left behind


def test_resume_skips_a_checkpoint_without_training_state(tiny_ptb, tmp_path, capsys):
    assert short_run(tiny_ptb, tmp_path) == 0
    run = tmp_path / "word_ptb"
    weights_only = {k: v for k, v in checkpoint.load(run / "last.pt").items() if k != "optimizer"}
    (run / "last.pt").unlink()
    torch.save(weights_only, run / "ckpt-00000009.pt")
    capsys.readouterr()
    code = train_script.main(["recipes/word_ptb.yaml", "--resume",
                              *tiny_overrides(tiny_ptb, tmp_path, **{"train.max_steps": 12, "train.checkpoint_every": 3})])
    assert code == 0
    out = capsys.readouterr()
    assert "ckpt-00000009.pt lacks the training state (optimizer)" in out.err
    assert "ckpt-00000006.pt (step 6)" in out.out


@pytest.mark.parametrize("override", ["data.batch_size=8", "data.bptt=1000", "train.seed=7",
                                      "data.variable_bptt=true"])
def test_resume_with_another_data_layout_or_seed(tiny_ptb, tmp_path, capsys, override):
    assert short_run(tiny_ptb, tmp_path, **{"train.max_steps": 3}) == 0
    capsys.readouterr()
    code = train_script.main(["recipes/word_ptb.yaml", "--resume", *tiny_overrides(tiny_ptb, tmp_path), override])
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert "cannot resume" in line and override.split("=")[0] in line


def test_a_stale_last_checkpoint_is_not_overwritten(tiny_ptb, tmp_path, capsys):
    (tmp_path / "word_ptb").mkdir()
    (tmp_path / "word_ptb" / "last.pt").write_bytes(b"an older run")
    assert short_run(tiny_ptb, tmp_path) == 2
    # Not a checkpoint --resume could load: the way out is another folder, not --resume.
    line = one_error_line(capsys.readouterr().err)
    assert "no usable checkpoint" in line and "move or delete" in line and "--resume" not in line
    assert (tmp_path / "word_ptb" / "last.pt").read_bytes() == b"an older run"


@pytest.mark.parametrize("keep_best", [True, False])
def test_a_run_whose_checkpoints_are_all_unreadable_says_to_move_it_aside(tiny_ptb, tmp_path, capsys,
                                                                         keep_best):
    """--resume used to answer 'start the run again without --resume', and starting it again
    'already holds checkpoints; pass --resume': a circle. Both now name the way out, with or
    without a best.pt, and write over nothing."""
    assert short_run(tiny_ptb, tmp_path) == 0
    run = tmp_path / "word_ptb"
    last, *older = checkpoint.numbered(run)[::-1]
    last.write_bytes(last.read_bytes()[:1000])  # cut short; last.pt is the same file
    older[0].write_bytes(b"")
    for p in older[1:]:
        p.write_bytes(os.urandom(3000))
    if not keep_best:
        (run / "best.pt").unlink()
    before = {p.name: p.read_bytes() for p in run.glob("*.pt")}
    with pytest.raises(CheckpointError, match=f"no usable checkpoint in {run}"):
        checkpoint.resumable(run)  # what train.py's guard asks before "pass --resume"
    capsys.readouterr()
    for resume in (["--resume"], []):
        assert train_script.main(["recipes/word_ptb.yaml", *resume, *tiny_overrides(tiny_ptb, tmp_path)]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"no usable checkpoint in {run}" in line and f"move or delete {run}" in line, resume
        assert "--resume" not in line, resume
    assert {p.name: p.read_bytes() for p in run.glob("*.pt")} == before


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["022", "077"])
def test_run_files_honour_the_umask(tiny_ptb, tmp_path, umask):
    """Files written atomically came out -rw------- whatever the umask (tempfile.mkstemp's
    mode); they get 0o666 & ~umask, as any file open() creates."""
    old = os.umask(umask)
    try:
        assert short_run(tiny_ptb, tmp_path, **{"train.max_steps": 3}) == 0
        fileio.atomic_write_bytes(tmp_path / "direct.bin", b"x")
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "word_ptb").iterdir() if p.is_file()] + [tmp_path / "direct.bin"]
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert {"config.yaml", "vocab.json", "run.json", "best.pt", "last.pt"} <= modes.keys()
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


def test_unwritable_run_directory(tiny_ptb, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = run_main("train.py", "recipes/word_ptb.yaml", *tiny_overrides(tiny_ptb, blocker))
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "cannot write the run directory" in line and "train.out_dir" in line


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs a read-only /proc")
def test_unwritable_data_folder(tmp_path):
    proc = run_main("train.py", "recipes/word_ptb.yaml",
                   *tiny_overrides("/proc", tmp_path / "out", **{"data.download": "true"}))
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "cannot write to the data folder /proc" in line and "LM_DATA_ROOT" in line


@pytest.mark.parametrize("device, message", [("foo", "cuda or cuda:N"),
                                             ("meta", "cuda or cuda:N"),
                                             ("cuda:7", "CUDA device(s) are available")])
def test_bad_device_names(tiny_ptb, tmp_path, device, message):
    assert short_run(tiny_ptb, tmp_path, **{"train.max_steps": 2}) == 0
    proc = run_main("evaluate.py", tmp_path / "word_ptb" / "best.pt", "--device", device,
                   "--data-root", tiny_ptb)
    assert proc.returncode == 2 and message in one_error_line(proc)
    proc = run_main("train.py", "recipes/word_ptb.yaml",
                   *tiny_overrides(tiny_ptb, tmp_path / "other", **{"train.device": device}))
    assert proc.returncode == 2 and message in one_error_line(proc)


def test_metrics_lines_stay_strict_json(tmp_path):
    from flipout_lstm.metrics import MetricsLog

    log = MetricsLog(tmp_path, tensorboard=False)
    log.log(3, "train", loss=float("nan"), grad_norm=float("inf"), lr=0.5)
    log.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == \
        {"step": 3, "split": "train", "loss": None, "grad_norm": None, "lr": 0.5}
