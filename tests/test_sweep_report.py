"""flipout_lstm.sweep (recipes x seeds, skip / resume / fail and go on) and flipout_lstm.report (tables, curves)."""
import csv
import json
import math
import shlex
import signal
import statistics
import struct
import subprocess
import sys
import time

import pytest

import train as train_script
from conftest import REPO, run_cli
from flipout_lstm import checkpoint, report, sweep
from test_train import Crash, crash_at


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)


def tiny(data_root, **extra):
    """Overrides for a seconds-long run (the sweep sets out_dir, run_name and seed itself)."""
    base = {"data.root": data_root, "data.download": "false", "data.batch_size": 4,
            "data.bptt": 10, "data.eval_batch_size": 4, "model.hidden_size": 16,
            "model.embedding_size": 16, "train.log_every": 2, "train.tensorboard": "false",
            "train.progress": "false", "train.max_steps": 6, "train.eval_every": 3}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def lines(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


SWEEP_NAMES = ["char_gal-s3", "char_gal-s4", "word_wd-s3", "word_wd-s4"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """Two recipes (one character, one word) over two seeds, swept once for several tests."""
    from conftest import write_tiny_ptb
    root = tmp_path_factory.mktemp("swept")
    data = write_tiny_ptb(root / "tiny_ptb")
    args = ["recipes/char_gal.yaml", "recipes/word_wd.yaml", "--seeds", "3,4", "--out",
            str(root / "sweep"), *tiny(data)]
    proc = run_cli("-m", "flipout_lstm.sweep", *args)
    return root / "sweep", args, proc


def test_sweep_runs_each_recipe_and_seed_then_skips_them(swept, capsys):
    out, args, proc = swept
    assert proc.returncode == 0, proc.stderr
    for name in SWEEP_NAMES:
        run = out / name
        assert lines(run)[-1]["split"] == "test"
        assert f"train.seed={name[-1]}" in (run / "train.log").read_text()
        metric = "bpc" if name.startswith("char") else "ppl"
        assert f"{name:<32} done     valid {metric}" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == SWEEP_NAMES
    # Different seeds really are different runs.
    assert lines(out / "word_wd-s3") != lines(out / "word_wd-s4")
    before = {n: (out / n / "metrics.jsonl").stat().st_mtime_ns for n in SWEEP_NAMES}
    assert sweep.main(args) == 0
    assert capsys.readouterr().out.count(", skipped") == 4
    assert before == {n: (out / n / "metrics.jsonl").stat().st_mtime_ns for n in SWEEP_NAMES}


def test_sweep_resumes_an_interrupted_run_exactly(tiny_ptb, tmp_path, monkeypatch):
    over = tiny(tiny_ptb, **{"train.checkpoint_every": 2, "train.log_every": 1, "train.max_steps": 9})
    reference = tmp_path / "ref"
    # The uninterrupted run, trained in this process with exactly the arguments a sweep's child
    # gets (the resumed run below is a real sweep, its child a process of its own).
    (ref_job,) = sweep.plan(sweep.parse_args(["recipes/word_ptb.yaml", "--seeds", "5", "--out", str(reference),
                                              *over]))
    assert ref_job.train_args() == ["recipes/word_ptb.yaml", *over, "train.seed=5", f"train.out_dir={reference}",
                                    "train.run_name=word_ptb-s5", "train.progress=false"]
    assert train_script.main(ref_job.train_args()) == 0
    out = tmp_path / "sweep"
    with monkeypatch.context() as m:  # a machine that dies at step 5, as train.py would run it
        crash_at(m, 5)
        with pytest.raises(Crash):
            train_script.main(["recipes/word_ptb.yaml", *over, "train.seed=5", f"train.out_dir={out}",
                               "train.run_name=word_ptb-s5"])
    job = sweep.plan(sweep.parse_args(["recipes/word_ptb.yaml", "--seeds", "5", "--out", str(out), *over]))[0]
    assert job.state() == "interrupted" and job.command()[-1] == "--resume"
    assert checkpoint.load(out / "word_ptb-s5" / "last.pt")["progress"]["step"] == 4
    assert sweep.main(["recipes/word_ptb.yaml", "--seeds", "5", "--out", str(out), *over]) == 0
    assert lines(out / "word_ptb-s5") == lines(reference / "word_ptb-s5")


def test_a_failed_run_is_reported_and_the_sweep_goes_on(tiny_ptb, tmp_path, capsys):
    out = tmp_path / "sweep"
    (tmp_path / "bad.yaml").write_text(f"base: {REPO / 'recipes/word_wd.yaml'}\n"
                                       f"data:\n  root: {tmp_path / 'no_corpus_here'}\n")
    (tmp_path / "good.yaml").write_text(f"base: {REPO / 'recipes/word_wd.yaml'}\n"
                                        f"data:\n  root: {tiny_ptb}\n")
    over = [o for o in tiny(tiny_ptb) if not o.startswith("data.root=")]
    code = sweep.main([str(tmp_path / "bad.yaml"), str(tmp_path / "good.yaml"), "--seeds", "1",
                       "--out", str(out), *over])
    assert code == 1
    captured = capsys.readouterr()
    assert "bad-s1                           failed   error: PTB files missing" in captured.out
    assert "good-s1                          done" in captured.out  # the sweep went on
    assert "1 of 2 runs failed:\n  bad-s1: error: PTB files missing" in captured.err
    assert lines(out / "good-s1")[-1]["split"] == "test"


def test_sweep_rejects_bad_plans_before_running(tiny_ptb, tmp_path, capsys):
    from flipout_lstm import sweep
    for args, message in [
        (["recipes/word_ptb.yaml", "--seeds", "1,a"], "is not a comma-separated list of integers"),
        (["recipes/word_ptb.yaml", "--seeds", "1,1"], "repeats a seed"),
        (["recipes/word_ptb.yaml", "--seeds", "1", "train.seed=3"], "use --seeds and --out"),
        (["recipes/word_ptb.yaml", "--seeds", "1", "model.hiden_size=3"], "did you mean 'model.hidden_size'"),
        (["recipes/char_gal.yaml", "recipes/cpu/char_gal.yaml", "--seeds", "1"], "would share the run names"),
        (["--seeds", "1", "a=b"], "no recipe given"),
        # An override that fits one recipe only (char_gal's input is one-hot): say which.
        (["recipes/word_wd.yaml", "recipes/char_gal.yaml", "--seeds", "1", "model.input_dropout=0.1"],
         "error: recipe 'recipes/char_gal.yaml': model.input_dropout: one-hot input"),
        (["recipes/nope.yaml", "--seeds", "1"], "error: recipe file 'recipes/nope.yaml' not found"),
    ]:
        assert sweep.main([*args, "--out", str(tmp_path / "x")]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (args, err)
    assert not (tmp_path / "x").exists()
    # The same from the command line: exit status 2 and the one line.
    proc = run_cli("-m", "flipout_lstm.sweep", "recipes/word_ptb.yaml", "--seeds", "1,1")
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "repeats a seed" in err[0], proc.stderr


def test_print_commands(tiny_ptb, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["recipes/word_ptb.yaml", "--seeds", "1,2", "--out", str(out), "--print-commands", *tiny(tiny_ptb)]
    assert sweep.main(argv) == 0
    cmds = capsys.readouterr().out.strip().splitlines()
    assert len(cmds) == 2 and all(c.startswith("python train.py recipes/word_ptb.yaml ") for c in cmds)
    assert "train.seed=2" in cmds[1] and f"train.run_name=word_ptb-s2" in cmds[1]
    assert not out.exists()  # printing runs nothing
    # The printed command is the real one: run it, and the sweep counts the run as done.
    # (train.py's main() in this process: `python train.py ARGS` is `sys.exit(main(ARGS))`.)
    args = shlex.split(cmds[0])[2:]
    assert train_script.main(args) == 0
    capsys.readouterr()
    assert sweep.main(argv) == 0
    again = capsys.readouterr().out.splitlines()
    assert again[0] == "# word_ptb-s1: done" and again[1] == cmds[1]


def test_a_sweep_started_with_sigint_ignored_still_stops_on_sigint(tiny_ptb, tmp_path):
    """`python -m flipout_lstm.sweep ... &` or nohup starts it with SIGINT ignored, which Python leaves
    ignored unless the sweep installs its own handler: a SIGINT must still do what Ctrl-C does
    (the child finishes its step and saves, the sweep stops, exit 130, how to continue)."""
    out = tmp_path / "sweep"
    proc = subprocess.Popen(
        [sys.executable, "-m", "flipout_lstm.sweep", "recipes/word_ptb.yaml", "--seeds", "1", "--out", str(out),
         *tiny(tiny_ptb, **{"train.max_steps": 5000, "train.eval_every": 0})],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # as `&` leaves it
    run = out / "word_ptb-s1"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:  # the child is training
            if (run / "metrics.jsonl").is_file() and '"train"' in (run / "metrics.jsonl").read_text():
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, (stdout, stderr)
    assert "stopping word_ptb-s1: it finishes its step and saves a checkpoint" in stderr
    assert stderr.strip().splitlines()[-1] == "sweep interrupted; run the same command again to continue"
    assert "SIGINT received" in (run / "train.log").read_text()
    steps = checkpoint.load(run / "last.pt")["progress"]["step"]
    assert 0 < steps < 5000  # stopped by the signal, with a checkpoint to resume from
    job = sweep.plan(sweep.parse_args(["recipes/word_ptb.yaml", "--seeds", "1", "--out", str(out),
                                       *tiny(tiny_ptb, **{"train.max_steps": 5000, "train.eval_every": 0})]))[0]
    assert job.state() == "interrupted"


def test_a_run_with_only_unreadable_checkpoints_goes_to_train_py_without_resume(tmp_path):
    """--resume could only refuse it; train.py run afresh refuses it with the way out (move
    the folder aside), and the sweep reports that as the run's failure."""
    job = sweep.Job("recipes/word_ptb.yaml", 1, tmp_path, [])
    job.run_dir.mkdir()
    (job.run_dir / "last.pt").write_bytes(b"")
    assert job.state() == "new" and "--resume" not in job.command()


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_two_groups_of_two_seeds(swept, tmp_path, capsys):
    runs = swept[0]
    out = tmp_path / "report"
    assert report.main([str(runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    expected = {}
    for recipe, metric in (("char_gal", "bpc"), ("word_wd", "ppl")):
        valid = [lines(runs / f"{recipe}-s{s}")[-2][metric] for s in (3, 4)]
        test = [lines(runs / f"{recipe}-s{s}")[-1][metric] for s in (3, 4)]
        expected[recipe] = (statistics.mean(valid), statistics.stdev(valid),
                            statistics.mean(test), statistics.stdev(test))
    md = (out / "results.md").read_text()
    assert md in printed
    rows = [line for line in md.splitlines() if line.startswith("| char_gal") or line.startswith("| word_wd")]
    assert len(rows) == 2
    vm, vs, tm, ts = expected["char_gal"]
    assert f"| 3,4 |" in rows[0] and f"{vm:.3f} ± {vs:.3f}" in rows[0] and f"{tm:.3f} ± {ts:.3f}" in rows[0]
    assert "Table 2: Gal (2016)" in rows[0] and "1.277" in rows[0]
    vm, vs, tm, ts = expected["word_wd"]
    assert f"{vm:.2f} ± {vs:.2f}" in rows[1] and f"{tm:.2f} ± {ts:.2f}" in rows[1]
    assert "Table 3: WD (2017)" in rows[1] and "78.82" in rows[1]

    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    as_json = json.loads((out / "results.json").read_text())["groups"]
    assert [r["recipe"] for r in table] == [g["recipe"] for g in as_json] == ["char_gal", "word_wd"]
    for row, group in zip(table, as_json):
        e = expected[row["recipe"]]
        assert float(row["valid_mean"]) == pytest.approx(e[0]) == group["valid_mean"]
        assert float(row["valid_sd"]) == pytest.approx(e[1]) == group["valid_sd"]
        assert float(row["test_mean"]) == pytest.approx(e[2]) == group["test_mean"]
        assert float(row["test_sd"]) == pytest.approx(e[3]) == group["test_sd"]
        assert row["seeds"] == "3 4" and [r["seed"] for r in group["runs"]] == [3, 4]
        assert int(row["parameters"]) == group["parameters"] > 0
        assert float(row["tokens_per_s"]) > 0
    width, height = png_size(out / "curves.png")
    assert width > 600 and height > 500 and (out / "curves.png").stat().st_size > 20_000


def test_report_reach_gives_the_first_evaluation_at_or_below_a_score(swept, tmp_path, capsys):
    runs = swept[0]
    valid = {s: [m for m in lines(runs / f"word_wd-s{s}") if m["split"] == "valid" and "best" not in m]
             for s in (3, 4)}
    # A score between the first and the best evaluation of seed 3: reached at a known step.
    first, best = valid[3][0]["ppl"], min(m["ppl"] for m in valid[3])
    target = (first + best) / 2 if first > best else best
    step3 = next(m["step"] for m in valid[3] if m["ppl"] <= target)
    step4 = next((m["step"] for m in valid[4] if m["ppl"] <= target), None)
    out = tmp_path / "report"
    # Several scores at once, each its own pair of columns; nobody reaches a perplexity of 1.
    assert report.main([str(runs / "word_wd-s3"), str(runs / "word_wd-s4"), "--out", str(out),
                        "--reach", f"{target},1"]) == 0
    row = json.loads((out / "results.json").read_text())["groups"][0]
    assert row["reach"] == [target, 1.0]
    assert row["reach_steps"] == [[step3, step4], [None, None]]
    walls = dict(json.loads((runs / "word_wd-s3" / "run.json").read_text())["evals"])
    assert row["reach_wall"][0][0] == walls[step3] > 0
    md = (out / "results.md").read_text()
    assert f"steps to valid ≤ {target:.2f}" in md and "steps to valid ≤ 1.00" in md
    assert "not reached (0/2)" in md
    if step4 is None:
        assert f"| {step3:,} (1/2) |" in md
    with open(out / "results.csv") as fh:
        csv_row = next(csv.DictReader(fh))
    assert float(csv_row[f"steps_to_valid_le_{target:g}"]) == statistics.mean(
        s for s in (step3, step4) if s is not None)
    assert csv_row["reached_valid_le_1"] == "0" and csv_row["steps_to_valid_le_1"] == ""
    # One score cannot serve bits per character and perplexity at once; scores must be scores.
    capsys.readouterr()
    for reach, message in (("2", "mix bpc and ppl"), ("800,abc", "positive scores separated"),
                           ("-5", "positive scores separated")):
        code = report.main([str(runs), "--out", str(tmp_path / "r"), "--reach", reach])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (reach, err)


def test_report_groups_ignore_seed_but_not_settings(tiny_ptb, tmp_path):
    runs = tmp_path / "sweep"
    for lr, ppl in ((1.0, 130.0), (2.0, 120.0)):
        # The run directory such a sweep leaves (grouping reads config.yaml and metrics.jsonl),
        # written here rather than trained: the config is the one train.py would resolve and
        # save for that sweep's run, and the metrics a finished run's lines.
        (job,) = sweep.plan(sweep.parse_args(["recipes/word_wd.yaml", "--seeds", "1", "--out",
                                              str(runs / f"lr{lr}"), *tiny(tiny_ptb), f"optim.lr={lr}"]))
        cfg = sweep.validated(job)
        assert cfg.optim.lr == lr and cfg.train.run_name == "word_wd-s1"
        job.run_dir.mkdir(parents=True)
        (job.run_dir / "config.yaml").write_text(cfg.to_yaml())
        metrics = [{"step": 3, "split": "train", "loss": 5.2, "ppl": 181.3},
                   {"step": 3, "split": "valid", "loss": math.log(ppl), "ppl": ppl, "epoch": 0.5},
                   {"step": 6, "split": "valid", "loss": math.log(ppl - 5), "ppl": ppl - 5, "epoch": 1.0},
                   {"step": 6, "split": "valid", "loss": math.log(ppl - 5), "ppl": ppl - 5, "best": True},
                   {"step": 6, "split": "test", "loss": math.log(ppl - 8), "ppl": ppl - 8, "best": True}]
        (job.run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        assert job.state() == "done"
    groups = report.group_runs(report.find_runs([runs]))
    assert len(groups) == 2 and all(len(g.runs) == 1 for g in groups)
    row = groups[0].summary()
    assert row["valid_sd"] is None and "±" not in report.fmt_mean_sd(row["valid_mean"], None, "ppl")


def test_a_curve_of_one_point_is_drawn_with_a_marker(tmp_path):
    """A line needs two points: a run that logged once left its training-loss panel blank."""
    run = tmp_path / "one"
    run.mkdir()
    (run / "config.yaml").write_text("data: {level: word}\ntrain: {run_name: one, seed: 1}\n")
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 2, "split": "train", "loss": 5.0, "ppl": 148.4}) + "\n"
        + json.dumps({"step": 2, "split": "valid", "loss": 5.1, "ppl": 164.0, "epoch": 0.5}) + "\n")
    import matplotlib.pyplot as plt
    fig = report.figure(report.group_runs(report.find_runs([run])), ("steps",))
    try:
        for ax in fig.axes:  # validation against steps, then the training loss
            (line,) = ax.lines
            assert len(line.get_xdata()) == 1
            assert line.get_marker() not in (None, "None", "", " ") and line.get_markersize() > 0
    finally:
        plt.close(fig)


def test_report_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for args, message in [([str(tmp_path / "nope")], "does not exist"),
                          ([str(tmp_path / "empty")], "holds no run directories"),
                          ([str(tmp_path / "empty"), "--x", "time"], "must be one of epochs, steps, wall")]:
        code = report.main([*args, "--out", str(tmp_path / "r")])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (args, err)
        assert len(err.strip().splitlines()) == 1
    # The same from the command line: exit status 2 and the one line.
    proc = run_cli("-m", "flipout_lstm.report", tmp_path / "nope", "--out", tmp_path / "r")
    assert proc.returncode == 2 and "does not exist" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_report_groups_a_run_older_than_a_field_with_one_holding_its_default():
    """A run written before train.precision existed (and with data.tokenizer, since renamed)
    is the same experiment as one written after with the defaults: one group, two seeds."""
    from flipout_lstm.config import Config
    from flipout_lstm.report import identity

    now = Config().to_dict()
    old = Config().to_dict()
    del old["train"]["precision"], old["train"]["ddp_noise"]
    old["data"]["tokenizer"] = None
    old["train"]["seed"], old["data"]["url"] = 2, "http://example.org/ptb.tgz"  # seed, bookkeeping
    assert identity(old) == identity(now)
    changed = Config().to_dict()
    changed["train"]["precision"] = "bf16"
    assert identity(changed) != identity(now)


def test_last_spread_is_how_flat_the_validation_curve_ends(tmp_path):
    """The plateau check of the study's epoch budget: the last three validation scores within
    1% of their minimum; the end-of-run re-scores are not evaluations and do not count."""
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("data: {level: word}\ntrain: {run_name: r-s1, seed: 1}\n")
    valid = [150.0, 120.0, 100.0, 100.5, 100.2]
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i, "split": "valid", "ppl": p, "loss": math.log(p)}) + "\n"
        for i, p in enumerate(valid, 1))
        + json.dumps({"step": 5, "split": "valid", "ppl": 90.0, "best": True}) + "\n")
    loaded = report.find_runs([run])[0]
    assert loaded.last_spread() == pytest.approx(0.005)
    assert loaded.last_spread(4) == pytest.approx(0.2)
    assert loaded.last_spread(6) is None
    row = report.group_runs([loaded])[0].summary()
    assert row["last3_spread"] == pytest.approx(0.005)
    md = report.markdown([row])
    assert "| last 3 valid |" in md and "| within 0.5% |" in md
    assert report.fmt_spread(0.029) == "2.9% apart" and report.fmt_spread(None) == "–"


def write_scored_run(root, name, seed, drop, valid, test=None):
    """A word run directory: one evaluation, then (if ``test``) the end-of-run re-scores."""
    run = root / f"{name}-s{seed}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"data: {{level: word}}\nmodel: {{lstm: {{weight_drop: {drop}}}}}\n"
                                     f"train: {{run_name: {name}-s{seed}, seed: {seed}}}\n")
    lines = [{"step": 10, "split": "valid", "ppl": valid, "loss": math.log(valid), "epoch": 1.0}]
    if test is not None:
        lines += [{"step": 10, "split": split, "ppl": x, "loss": math.log(x), "best": True}
                  for split, x in (("valid", valid), ("test", test))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))


def test_compare_gives_the_difference_and_its_standard_error_over_finished_seeds(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed, (v, t) in enumerate([(100.0, 96.0), (102.0, 97.0), (104.0, 101.0)], 1):
        write_scored_run(runs, "flip", seed, 0.5, v, t)
    write_scored_run(runs, "shared", 1, 0.4, 110.0, 105.0)
    write_scored_run(runs, "shared", 2, 0.4, 111.0, 107.0)
    write_scored_run(runs, "shared", 3, 0.4, 90.0)  # unfinished: its best so far is not counted
    out = tmp_path / "report"
    assert report.main([str(runs), "--out", str(out), "--compare", "flip:shared"]) == 0
    (d,) = json.loads((out / "results.json").read_text())["differences"]
    assert (d["a"], d["b"], d["metric"]) == ("flip", "shared", "ppl")
    v = d["valid"]
    assert (v["a_n"], v["b_n"]) == (3, 2) and v["diff"] == pytest.approx(102.0 - 110.5)
    assert v["se"] == pytest.approx(math.sqrt(4.0 / 3 + 0.5 / 2))  # s_A = 2, s_B = √0.5
    assert d["test"]["diff"] == pytest.approx(98.0 - 106.0)
    md = (out / "results.md").read_text()
    assert "| flip | shared | 102.00 ± 2.00 (3) | 110.50 ± 0.71 (2) | −8.50 ± 1.26 |" in md
    assert md in capsys.readouterr().out
    # One seed a side: a difference, no standard error.
    one = report.difference(*(report.group_runs(report.find_runs([runs / f"{n}-s1"]))[0].summary()
                              for n in ("flip", "shared")))
    assert one["valid"]["diff"] == pytest.approx(-10.0) and one["valid"]["se"] is None
    for compare, message in (("flip:nope", "no group named 'nope'"), ("flip", "pairs A:B"),
                             ("flip:", "pairs A:B")):
        assert report.main([str(runs), "--out", str(out), "--compare", compare]) == 2
        assert message in capsys.readouterr().err, compare
