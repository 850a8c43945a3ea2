"""evaluate.py as a user meets it: warm-up by default, its flags, Ctrl-C, and the wrong file."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

import evaluate as evaluate_script
from conftest import REPO, run_cli, train_tiny
from flipout_lstm.config import config_from_dict
from flipout_lstm.evaluation import eval_warmup


@pytest.fixture(autouse=True)
def _repo_cwd_and_cache(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("LM_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def run(tiny_ptb, tmp_path):
    """A word run of a few steps on the tiny corpus: its run directory."""
    out = tmp_path / "runs"
    assert train_tiny("word_ptb", tiny_ptb, out, **{"train.max_steps": 6,
                                                    "train.checkpoint_every": 3}) == 0
    return out / "word_ptb"


def evaluate(path, *flags, root):
    return evaluate_script.run(evaluate_script.parse_args([str(path), "--data-root", str(root),
                                                           "--no-progress", *flags]))


def test_default_is_the_recipes_batch_with_its_warmup(run, tiny_ptb):
    cfg = config_from_dict(torch.load(run / "best.pt", weights_only=True)["config"])
    default = evaluate(run / "best.pt", root=tiny_ptb)
    assert default["batch_size"] == cfg.data.eval_batch_size == 4
    assert default["warmup"] == eval_warmup(cfg.data) > 0 and default["reset_every"] == 0
    explicit = evaluate(run / "best.pt", "--warmup", str(eval_warmup(cfg.data)), root=tiny_ptb)
    assert explicit["loss"] == default["loss"]
    cold = evaluate(run / "best.pt", "--warmup", "0", root=tiny_ptb)
    exact = evaluate(run / "best.pt", "--batch-size", "1", root=tiny_ptb)
    assert cold["tokens"] == default["tokens"] == exact["tokens"]
    assert abs(default["loss"] - exact["loss"]) < abs(cold["loss"] - exact["loss"])


def test_reset_every_and_threads(run, tiny_ptb):
    exact = evaluate(run / "best.pt", "--batch-size", "1", root=tiny_ptb)
    reset = evaluate(run / "best.pt", "--reset-every", "5", "--threads", "1", root=tiny_ptb)
    assert torch.get_num_threads() == 1
    assert reset["reset_every"] == 5 and reset["warmup"] == 0 and reset["tokens"] == exact["tokens"]
    assert reset["loss"] != pytest.approx(exact["loss"], rel=1e-6)
    # The protocol does not depend on the batch: resets fall on the same tokens.
    reset1 = evaluate(run / "best.pt", "--reset-every", "5", "--batch-size", "1", root=tiny_ptb)
    assert reset1["loss"] == pytest.approx(reset["loss"], rel=1e-6)


@pytest.mark.parametrize("flag, value, message", [
    ("--warmup", "-1", "--warmup must be >= 0"), ("--reset-every", "0", "--reset-every must be positive"),
    ("--threads", "0", "--threads must be positive")])
def test_bad_flags(run, tiny_ptb, capsys, flag, value, message):
    assert evaluate_script.main([str(run / "best.pt"), "--data-root", str(tiny_ptb), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def one_line_error(argv, capsys):
    assert evaluate_script.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    return err


def test_a_recipe_is_named_as_such(capsys):
    err = one_line_error(["recipes/char_ptb.yaml"], capsys)
    assert "is a YAML recipe, not a checkpoint" in err and "python train.py recipes/char_ptb.yaml" in err
    assert "best.pt" in err and "pickled" not in err


def test_a_metrics_log_is_named_as_such(run, capsys):
    err = one_line_error([str(run / "metrics.jsonl")], capsys)
    assert "is a metrics log" in err and f"pass {run / 'best.pt'}" in err and "truncated" not in err


def test_best_before_the_first_validation_names_last(run, capsys):
    (run / "best.pt").unlink()  # as before the first validation
    err = one_line_error([str(run / "best.pt")], capsys)
    assert "best.pt is written at the run's first validation" in err and str(run / "last.pt") in err


def test_a_truncated_checkpoint_is_still_called_truncated(run, tmp_path, capsys):
    cut = tmp_path / "cut.pt"
    cut.write_bytes((run / "last.pt").read_bytes()[:5000])
    err = one_line_error([str(cut)], capsys)
    # One clause, not torch's 300 characters of advice about miniz and file transfers.
    assert f"checkpoint {cut} is truncated or corrupted (unexpected end of file); use an earlier" in err
    assert "miniz" not in err


def test_ctrl_c_is_one_line_and_exit_130(run, tiny_ptb):
    lines = (tiny_ptb / "ptb.test.txt").read_text().splitlines(keepends=True)
    (tiny_ptb / "ptb.test.txt").write_text("".join(lines * 300))  # long enough to be caught scoring
    proc = subprocess.Popen([sys.executable, "evaluate.py", str(run / "best.pt"),
                             "--data-root", str(tiny_ptb), "--batch-size", "1", "--bptt", "1"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            # Python turns SIGINT into KeyboardInterrupt only if SIGINT is not
                            # ignored when it starts, as it is under `nohup pytest &`.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen, deadline = b"", time.monotonic() + 120
    while b"scoring" not in seen and time.monotonic() < deadline:  # the bar is up: scoring has begun
        chunk = proc.stderr.read1(4096)
        if not chunk and proc.poll() is not None:
            break
        seen += chunk
    assert b"scoring" in seen, seen
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    err = (seen + err).decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.strip().splitlines()[-1].startswith("interrupted: scoring") and out == b""


def test_train_scores_with_the_same_warmup(run, tiny_ptb):
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = {line["split"]: line["loss"] for line in lines if line.get("best")}
    for split in ("valid", "test"):
        warm = evaluate(run / "best.pt", "--split", split, root=tiny_ptb)
        cold = evaluate(run / "best.pt", "--split", split, "--warmup", "0", root=tiny_ptb)
        assert final[split] == pytest.approx(warm["loss"], rel=1e-9)
        assert final[split] != pytest.approx(cold["loss"], rel=1e-9)
    # The per-evaluation validation that saved best.pt scored it the same way.
    during = [line["loss"] for line in lines if line["split"] == "valid" and not line.get("best")]
    assert min(during) == pytest.approx(final["valid"], rel=1e-9)


def test_the_device_defaults_to_auto_as_in_training(run, tiny_ptb, monkeypatch):
    """train.device's default is auto (CUDA when present); evaluate.py's was cpu."""
    asked, real = [], evaluate_script.resolve_device
    monkeypatch.setattr(evaluate_script, "resolve_device", lambda name: asked.append(name) or real(name))
    evaluate(run / "best.pt", root=tiny_ptb)
    assert asked == ["auto"]


@pytest.mark.parametrize("where, advice", [
    ("flag", "set --data-root (which takes precedence over $LM_DATA_ROOT) to the folder"),
    ("env", "set $LM_DATA_ROOT (or --data-root, which takes precedence) to the folder")])
def test_a_missing_corpus_is_advised_with_the_data_root_flag(run, tmp_path, monkeypatch, capsys,
                                                             where, advice):
    """The data layer advises the recipe key data.root; evaluate.py takes no recipe, and its
    option for the folder is --data-root."""
    nowhere = tmp_path / "nowhere"
    best = run / "best.pt"
    if where == "env":  # a recipe without data.root: the folder came from $LM_DATA_ROOT
        ckpt = torch.load(best, weights_only=True)
        ckpt["config"]["data"]["root"] = None
        best = tmp_path / "no_root.pt"
        torch.save(ckpt, best)
        monkeypatch.setenv("LM_DATA_ROOT", str(nowhere))
    flags = ["--data-root", str(nowhere)] if where == "flag" else []
    err = one_line_error([str(best), *flags], capsys)
    assert str(nowhere) in err and advice in err and "data.root" not in err and "data.download" not in err


def test_an_empty_file_is_called_empty(tmp_path, capsys):
    (tmp_path / "empty.pt").write_bytes(b"")
    err = one_line_error([str(tmp_path / "empty.pt")], capsys)
    assert "empty.pt is empty (0 bytes), not a checkpoint" in err and "text file" not in err


# \x80 is how a pickle (torch's legacy format) starts: such bytes go on to torch.load.
@pytest.mark.parametrize("first", [b"", b"\x80"], ids=["random", "pickle-like"])
def test_random_bytes_are_not_a_pytorch_checkpoint(tmp_path, first):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(first + bytes(torch.randint(0, 256, (5000,), dtype=torch.uint8).tolist()))
    proc = run_cli("evaluate.py", junk)  # a real stderr: torch's warnings would show there
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and err[0].startswith("error: "), proc.stderr
    assert "is not a PyTorch checkpoint (unrecognised bytes)" in err[0] and "pickled" not in err[0]
