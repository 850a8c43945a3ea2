"""Run recipes over seeds, one run after another, resuming whatever was interrupted.

    python -m flipout_lstm.sweep RECIPE [RECIPE ...] --seeds 1,2,3 [--out DIR] [key.path=value ...]
    python -m flipout_lstm.sweep RECIPE ... --seeds 1,2 --print-commands   # for SLURM arrays, job queues

Each (recipe, seed) is its own run directory ``DIR/<recipe-name>-s<seed>`` (``DIR`` defaults
to ``checkpoints/sweep``), trained by ``train.py`` in a child process with ``train.seed``,
``train.out_dir`` and ``train.run_name`` set. Before anything runs, every run's config is
loaded and validated, so a typo fails the whole sweep at once rather than hours in. Then:

- a finished run (its best checkpoint scored on the test split) is skipped;
- an interrupted one (checkpoints, not finished) continues with ``--resume``;
- a failed one is reported with its error line and the sweep goes on; the sweep exits 1 at
  the end with the list of failures.

Each run's own output goes to ``DIR/<run>/train.log``; the sweep prints one status line per
run: queued, running (step and ETA), done (best validation and test score) or failed (the
error). Running the same command again picks up where it stopped. Ctrl-C is passed to the
running child, which saves a checkpoint; the sweep then stops and says how to continue. A
SIGINT does the same to a sweep started in the background (``&``, nohup), and so does SIGTERM.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from flipout_lstm import checkpoint, scores
from flipout_lstm.config import load_config
from flipout_lstm.errors import CheckpointError, ConfigError, UserError, exit_status
from flipout_lstm.runs import Run, fmt_duration

TRAIN_SCRIPT = Path(__file__).resolve().parent.parent / "train.py"
DEFAULT_OUT = "checkpoints/sweep"


@dataclass
class Job:
    recipe: str
    seed: int
    out: Path
    overrides: list
    max_steps: int = 0
    epochs: int = 0
    batches: int = 0  # per epoch, from the run's run.json
    status: str = "queued"
    detail: str = ""
    log: list = field(default_factory=list)  # the child's output lines, newest last

    @property
    def name(self) -> str:
        return f"{Path(self.recipe).stem}-s{self.seed}"

    @property
    def run_dir(self) -> Path:
        return self.out / self.name

    def train_args(self) -> list:
        # No progress bar: the child's output is a log file, and the sweep shows progress.
        return [self.recipe, *self.overrides, f"train.seed={self.seed}",
                f"train.out_dir={self.out}", f"train.run_name={self.name}", "train.progress=false"]

    def state(self) -> str:
        """``done``, ``interrupted`` (resume it) or ``new``."""
        if (self.run_dir / "config.yaml").is_file() and Run.load(self.run_dir).done:
            return "done"
        try:
            if checkpoint.resumable(self.run_dir):
                return "interrupted"
        except CheckpointError:
            pass  # every checkpoint unreadable: train.py refuses the run with the way out
        return "new"

    def command(self) -> list:
        resume = ["--resume"] if self.state() == "interrupted" else []
        return [sys.executable, str(TRAIN_SCRIPT), *self.train_args(), *resume]


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {text!r} is not a comma-separated list of integers, e.g. "
                        f"--seeds 1,2,3") from None
    if not seeds:
        raise UserError("--seeds is empty; give at least one seed, e.g. --seeds 1")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r} repeats a seed; each seed is one run")
    return seeds


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m flipout_lstm.sweep", description=__doc__.splitlines()[0])
    p.add_argument("items", nargs="+", metavar="RECIPE | key.path=value",
                   help="recipes to run, and overrides applied to every run")
    p.add_argument("--seeds", required=True, help="comma-separated seeds, e.g. 1,2,3")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"folder of the run directories (default {DEFAULT_OUT})")
    p.add_argument("--print-commands", action="store_true",
                   help="print the train.py command of every unfinished run and exit")
    return p.parse_intermixed_args(argv)


def plan(args) -> list[Job]:
    """Every (recipe, seed) as a job, each config validated before anything runs."""
    recipes = [i for i in args.items if "=" not in i]
    overrides = [i for i in args.items if "=" in i]
    if not recipes:
        raise UserError("no recipe given; pass one or more YAML recipes, e.g. recipes/char_ptb.yaml")
    for o in overrides:
        if o.split("=", 1)[0].strip() in ("train.seed", "train.out_dir", "train.run_name"):
            raise UserError(f"{o!r}: the sweep sets train.seed, train.out_dir and train.run_name "
                            f"itself; use --seeds and --out")
    stems = {}
    for r in recipes:
        stem = Path(r).stem
        if stem in stems and stems[stem] != r:
            raise UserError(f"recipes {stems[stem]} and {r} would share the run names {stem}-s*; "
                            f"run them in separate sweeps with different --out folders")
        stems[stem] = r
    out = Path(args.out)
    jobs = []
    for recipe in dict.fromkeys(recipes):
        for seed in parse_seeds(args.seeds):
            job = Job(recipe, seed, out, overrides)
            cfg = validated(job)
            job.max_steps, job.epochs = cfg.train.max_steps, cfg.train.epochs
            jobs.append(job)
    return jobs


def validated(job: Job):
    """The job's config as train.py will load it; an error names the recipe it is in.

    The overrides apply to every recipe, and one may fit some recipes only
    (``model.input_dropout`` is an error in a one-hot recipe alone), so among several recipes
    an error says nothing of which one failed unless the recipe is named; errors that already
    name it (a YAML syntax error) are left as they are. The seed is not named: ``train.seed``
    takes any integer, so no error depends on it.
    """
    try:
        return load_config(job.recipe, job.train_args()[1:])
    except ConfigError as exc:
        if str(Path(job.recipe)) in str(exc):
            raise
        raise ConfigError(f"recipe {job.recipe!r}: {exc}") from None


def shell_line(job: Job) -> str:
    """The command as a user would type it from the repository root."""
    args = [*job.train_args(), *(["--resume"] if job.state() == "interrupted" else [])]
    return " ".join(["python", "train.py", *map(shlex.quote, args)])


class StatusLine:
    """One line per run: rewritten in place on a terminal, printed at intervals otherwise."""

    def __init__(self, stream=None, interval: float = 60.0):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.interval = interval
        self.last = 0.0

    def update(self, job: Job, final: bool = False) -> None:
        text = f"{job.name:<32} {job.status:<8} {job.detail}"
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        elif final or time.monotonic() - self.last >= self.interval:
            self.stream.write(text + "\n")
            self.last = time.monotonic()
        self.stream.flush()


def progress_detail(job: Job, started: float, start_step: int) -> str:
    """``step N/M, ETA`` from the run's metrics so far and its batches per epoch (run.json)."""
    run = Run.load(job.run_dir) if (job.run_dir / "config.yaml").is_file() else None
    step = run.steps if run else 0
    if not job.batches and run is not None:
        job.batches = run.summary.get("batches_per_epoch") or 0  # run.json, written at the start
    total = job.max_steps or None
    if job.batches:
        total = min(total or job.batches * job.epochs, job.batches * job.epochs)
    text = f"step {step:,}" + (f"/{total:,}" if total else "")
    rate = (step - start_step) / max(time.monotonic() - started, 1e-9)
    if total and rate > 0 and step > start_step:
        text += f", ETA {fmt_duration((total - step) / rate)} at most"  # early stopping may end it sooner
    return text


def done_detail(job: Job) -> str:
    run = Run.load(job.run_dir)
    valid, test = run.score(run.final("valid")), run.score(run.final("test"))
    wall = run.summary.get("wall_seconds")
    return (f"valid {run.metric} {scores.fmt(valid, run.metric)}, "
            f"test {run.metric} {scores.fmt(test, run.metric)} "
            f"({run.steps:,} steps" + (f", {fmt_duration(wall)})" if wall else ")"))


def run_job(job: Job, status: StatusLine) -> bool:
    """Train one run in a child process; True if it finished (False: failed or interrupted)."""
    job.run_dir.mkdir(parents=True, exist_ok=True)
    resume = job.state() == "interrupted"
    start_step = Run.load(job.run_dir).steps if resume else 0
    job.status, job.detail = "running", "resuming" if resume else "starting"
    status.update(job)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(job.run_dir / "train.log", "a", encoding="utf-8") as log_file:
        log_file.write(f"$ {shell_line(job)}\n")
        # Its own session: a Ctrl-C at the terminal reaches the sweep only, which passes on
        # exactly one SIGINT (finish the step, save), not two (stop at once).
        child = subprocess.Popen(job.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, env=env, start_new_session=True)

        def pump():
            for line in child.stdout:
                log_file.write(line)
                log_file.flush()
                job.log.append(line.rstrip("\n"))
                del job.log[:-200]

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        started = time.monotonic()
        try:
            while child.poll() is None:
                time.sleep(1.0)
                job.detail = progress_detail(job, started, start_step)
                status.update(job)
        except KeyboardInterrupt:
            child.send_signal(signal.SIGINT)
            print(f"\nstopping {job.name}: it finishes its step and saves a checkpoint "
                  f"(Ctrl-C again to stop it at once)", file=sys.stderr)
            while True:
                try:
                    child.wait()
                    break
                except KeyboardInterrupt:
                    child.send_signal(signal.SIGINT)
            reader.join()
            job.status, job.detail = "stopped", "interrupted; the same command resumes it"
            status.update(job, final=True)
            raise
        reader.join()
    if child.returncode == 0 and job.state() == "done":
        job.status, job.detail = "done", done_detail(job)
    elif child.returncode == 0:
        job.status, job.detail = "stopped", "stopped before the end; the same command resumes it"
    else:
        # Why it failed is train.py's one-line error, the command's contract (exit status 2 and
        # `error: ...` on stderr), as the child printed it into its train.log. The run's own
        # files cannot say it: most failures (a missing corpus, a refused checkpoint or resume)
        # come before the run writes anything, and a crash writes nothing at all.
        errors = [line for line in job.log if line.startswith("error:")]
        last = errors[-1] if errors else next((line for line in reversed(job.log) if line.strip()),
                                              f"exit status {child.returncode}")
        job.status, job.detail = "failed", f"{last} (log: {job.run_dir / 'train.log'})"
    status.update(job, final=True)
    return job.status == "done"


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        jobs = plan(args)
    except UserError as exc:
        return exit_status(exc)
    if args.print_commands:
        for job in jobs:
            print(f"# {job.name}: done" if job.state() == "done" else shell_line(job))
        return 0
    # Explicitly, SIGINT too: started in the background (`&`, nohup) the sweep inherits an
    # ignored SIGINT, which Python then leaves ignored, and a Ctrl-C or `kill -INT` would not
    # reach the running child. A scheduler's SIGTERM stops it the same way.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    status = StatusLine()
    for job in jobs:
        if job.state() == "done":
            job.status, job.detail = "done", done_detail(job) + ", skipped"
        else:
            job.detail = "resume" if job.state() == "interrupted" else ""
        status.update(job, final=True)
    print(f"sweep: {len(jobs)} runs in {args.out}")
    try:
        for job in jobs:
            if job.status != "done":
                run_job(job, status)
                if job.status == "stopped":
                    break  # a signal stopped the child: stop the sweep too
    except KeyboardInterrupt:
        print("sweep interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    failed = [j for j in jobs if j.status == "failed"]
    unfinished = [j for j in jobs if j.status not in ("done", "failed")]
    if failed:
        print(f"{len(failed)} of {len(jobs)} runs failed:", file=sys.stderr)
        for job in failed:
            print(f"  {job.name}: {job.detail}", file=sys.stderr)
        return 1
    if unfinished:
        print(f"{len(unfinished)} runs not finished; run the same command again to continue",
              file=sys.stderr)
        return 1
    print(f"all {len(jobs)} runs done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
