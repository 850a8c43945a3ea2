"""Compare runs: a table of scores over seeds, beside the paper's, and their curves.

    python -m flipout_lstm.report RUN_DIR [RUN_DIR ...] [--out DIR] [--x epochs|steps|wall[,...]]
                        [--reach SCORE[,SCORE...]] [--compare A:B[,C:D...]]

Each argument is a run directory or a folder holding run directories (searched recursively).
Runs whose resolved configs differ only in ``train.seed`` (and in where they were written or
how they reported progress) form one group, one table row:

    recipe | parameters | seeds | steps | epochs | valid | test | paper row, valid, test | last 3 valid | tokens/s | wall

``valid`` and ``test`` are the best checkpoint's end-of-run scores, as mean ± sample standard
deviation over the group's seeds (``s = sqrt(Σ(x - x̄)² / (n - 1))``; no sd for one seed): bits
per character for character runs, perplexity for word runs (one table each). A run that has
not finished shows its best validation so far, no test score, and a ``*`` after its seed.
The paper's figures come from the recipe's optional ``paper:`` section. ``last 3 valid`` is
how flat each run's validation curve ended (``Run.last_spread``, the largest over the seeds):
at most 1% is a plateau, the sign that the row's epoch budget was enough.

``--reach SCORE[,SCORE...]`` adds how fast each group got there: for each score, the step and
the wall time of the first evaluation whose validation score is at most it, mean ± sd over the
seeds that reached it (and how many did), which is how the large-batch claim (flipout reaches
a given validation loss in fewer steps than a shared perturbation) is read off, at several
losses rather than one picked after the fact.

``--compare A:B[,C:D...]`` adds a table of differences between groups named A and B (their
recipe names as the table shows them), over the finished seeds of each: the difference of the
mean validation and test scores, A − B, and its standard error (Welch's), so that each claim
of the paper can be read with the seed spread beside it.

Writes ``results.md``, ``results.csv``, ``results.json`` and ``curves.png`` (validation score
against each ``--x`` axis, one colour per group, the seeds' min-max spread shaded; a last panel
of training loss) into ``--out`` (default: the current directory).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from flipout_lstm import scores
from flipout_lstm.config import as_current, fields_with
from flipout_lstm.errors import UserError, exit_status
from flipout_lstm.runs import Run, find_runs, fmt_duration

# Runs that differ only in these (the bookkeeping fields of flipout_lstm.config, and the seed) are one group.
NOT_IDENTITY = fields_with("bookkeeping") | {"train.seed"}
AXES = ("epochs", "steps", "wall")
# A run whose last three validation scores lie within this fraction of their minimum has
# reached its plateau: its epoch budget sufficed (the PTB study's rule).
PLATEAU = 0.01


def identity(config: dict) -> str:
    """The group key of a config: everything but the seed and where/how it was written.

    The config is read as the current schema reads it (defaults for fields newer than the run,
    renamed keys migrated), so a run written before a field existed groups with a run that
    holds its default.
    """
    return json.dumps({k: v for k, v in as_current(config).items() if k not in NOT_IDENTITY},
                      sort_keys=True)


def mean_sd(values: list) -> tuple:
    """Mean and sample standard deviation (None for fewer than two values)."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


@dataclass
class Group:
    runs: list = field(default_factory=list)
    label: str = ""  # what tells it apart from other groups of the same recipe name

    @property
    def first(self) -> Run:
        return self.runs[0]

    @property
    def name(self) -> str:
        names = sorted({r.recipe_name for r in self.runs})
        name = names[0] if len(names) == 1 else " / ".join(names)
        return f"{name} ({self.label})" if self.label else name

    @property
    def metric(self) -> str:
        return self.first.metric

    @property
    def paper(self) -> dict:
        return self.first.config.get("paper") or {}

    def summary(self, reach: Sequence[float] = ()) -> dict:
        """The group's row: every figure the table, CSV and JSON show."""
        valid = [r.score(r.best_valid()) for r in self.runs]
        test = [r.score(r.final("test")) for r in self.runs]
        v_mean, v_sd = mean_sd(valid)
        t_mean, t_sd = mean_sd(test)
        # Bits per character of the raw text: one scale across tokenizers (flipout_lstm.evaluation.raw_bpc).
        valid_raw = [(r.best_valid() or {}).get("bpc_raw") for r in self.runs]
        test_raw = [(r.final("test") or {}).get("bpc_raw") for r in self.runs]
        rate = [r.summary.get("tokens_per_s") for r in self.runs]
        wall = [r.summary.get("wall_seconds") for r in self.runs]
        epochs = [r.epochs for r in self.runs]
        reached = [[r.reached(score) for r in self.runs] for score in reach]
        spreads = [r.last_spread() for r in self.runs]
        known = [x for x in spreads if x is not None]
        return {
            "recipe": self.name, "level": self.first.level, "metric": self.metric,
            "parameters": self.first.summary.get("parameters"),
            "seeds": [r.seed for r in self.runs], "finished": [r.done for r in self.runs],
            "steps": [r.steps for r in self.runs],
            "epochs": [e for e in epochs],
            "valid_mean": v_mean, "valid_sd": v_sd, "test_mean": t_mean, "test_sd": t_sd,
            "valid_bpc_raw": mean_sd(valid_raw)[0], "test_bpc_raw": mean_sd(test_raw)[0],
            "paper_row": self.paper.get("row"), "paper_valid": self.paper.get("valid"),
            "paper_test": self.paper.get("test"),
            "last3_spread": max(known) if known else None,
            "tokens_per_s": mean_sd(rate)[0], "wall_seconds": mean_sd(wall)[0],
            # Per score in `reach`, per run: the step and wall time it got there (or None).
            "reach": list(reach), "reach_steps": [[s for s, _ in per] for per in reached],
            "reach_wall": [[w for _, w in per] for per in reached],
            "runs": [{"name": r.name, "path": str(r.path), "seed": r.seed, "finished": r.done,
                      "steps": r.steps, "epochs": r.epochs, "valid": v, "test": t,
                      "last3_spread": spread,
                      "tokens_per_s": r.summary.get("tokens_per_s"),
                      "wall_seconds": r.summary.get("wall_seconds")}
                     for r, v, t, spread in zip(self.runs, valid, test, spreads)],
        }


def label_namesakes(groups: list) -> None:
    """Groups that share a recipe name (the same recipe with other overrides) are labelled
    with the settings that differ between them, e.g. ``char_gal (data.train_tokens=100000)``."""
    by_name: dict = {}
    for g in groups:
        by_name.setdefault(g.name, []).append(g)
    for same in by_name.values():
        if len(same) < 2:
            continue
        configs = [json.loads(identity(g.first.config)) for g in same]  # flat, defaults filled
        # Fields a newer trainer added are absent (or null) in older runs: not a difference.
        keys = sorted({k for c in configs for k in c
                       if all(o.get(k) is not None for o in configs)
                       and any(c[k] != o[k] for o in configs)})
        for g, c in zip(same, configs):
            g.label = ", ".join(f"{k}={c.get(k)}" for k in keys[:3]) + (", ..." if len(keys) > 3 else "")


def group_runs(runs: list) -> list:
    """Groups of runs that differ only in seed; a seed seen twice in one group is an error."""
    groups: dict = {}
    for run in runs:
        groups.setdefault(identity(run.config), Group()).runs.append(run)
    label_namesakes(list(groups.values()))
    for g in groups.values():
        g.runs.sort(key=lambda r: (r.seed is None, r.seed))
        seeds = [r.seed for r in g.runs]
        if len(set(seeds)) != len(seeds):
            dup = sorted({str(r.path) for r in g.runs if seeds.count(r.seed) > 1})
            raise UserError(f"runs {', '.join(dup)} have the same config and seed; pass one of them")
    return list(groups.values())


def difference(a: dict, b: dict) -> dict:
    """Group row ``a`` against ``b`` over their finished seeds, per split:

        d = x̄_A − x̄_B,    se = √(s_A² / n_A + s_B² / n_B)

    (Welch's standard error; ``s`` the sample standard deviation over seeds), so ``d / se``
    says how many standard errors apart the two rows are. ``se`` is None unless both rows
    have two finished seeds or more; an unfinished run's best-so-far score is not counted.
    """
    out = {"a": a["recipe"], "b": b["recipe"], "metric": a["metric"]}
    for split in ("valid", "test"):
        sides = [[r[split] for r in row["runs"] if r["finished"] and r[split] is not None]
                 for row in (a, b)]
        (ma, sa), (mb, sb) = (mean_sd(v) for v in sides)
        d = None if ma is None or mb is None else ma - mb
        se = None if sa is None or sb is None else math.sqrt(sa ** 2 / len(sides[0])
                                                             + sb ** 2 / len(sides[1]))
        out[split] = {"a_mean": ma, "a_sd": sa, "a_n": len(sides[0]), "b_mean": mb, "b_sd": sb,
                      "b_n": len(sides[1]), "diff": d, "se": se}
    return out


def parse_pairs(text: Optional[str], rows: dict) -> list:
    """``--compare``'s ``A:B`` pairs, each name a key of ``rows`` (the groups' recipe names),
    both of a pair scored alike (bpc or ppl)."""
    if text is None:
        return []
    pairs = [tuple(x.strip() for x in item.split(":")) for item in text.split(",") if item.strip()]
    if not pairs or any(len(p) != 2 or not all(p) for p in pairs):
        raise UserError(f"--compare {text!r}: give pairs A:B of group names separated by commas, "
                        f"e.g. --compare word_wd_flipout:word_wd")
    for name in (n for p in pairs for n in p):
        if name not in rows:
            raise UserError(f"--compare: no group named {name!r} among these runs; the groups "
                            f"are {', '.join(rows)}")
    for a, b in pairs:
        if rows[a]["metric"] != rows[b]["metric"]:
            raise UserError(f"--compare {a}:{b}: {a} is scored in {rows[a]['metric']} and {b} in "
                            f"{rows[b]['metric']}; compare character runs with character runs")
    return pairs


# ----------------------------------------------------------------------------- formatting


def fmt_mean_sd(mean, sd, metric: str) -> str:
    if mean is None:
        return "–"
    return scores.fmt(mean, metric) + (f" ± {scores.fmt(sd, metric)}" if sd is not None else "")


def fmt_range(values: list, fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    lo, hi = min(values), max(values)
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}–{fmt.format(hi)}"


def fmt_reached(values: list, fmt: str) -> str:
    """Mean ± sd over the seeds that reached the score, and how many of all did."""
    got = [v for v in values if v is not None]
    if not got:
        return f"not reached (0/{len(values)})"
    mean, sd = mean_sd(got)
    return (fmt.format(mean) + (f" ± {fmt.format(sd)}" if sd is not None else "")
            + (f" ({len(got)}/{len(values)})" if len(got) < len(values) else ""))


def fmt_spread(spread: Optional[float]) -> str:
    """``within 0.4%`` for a spread of at most ``PLATEAU``, else ``2.9% apart``."""
    if spread is None:
        return "–"
    return f"within {100 * spread:.1f}%" if spread <= PLATEAU else f"{100 * spread:.1f}% apart"


def markdown(rows: list) -> str:
    """One table per headline metric (bpc, then ppl), in the order given."""
    out = []
    for metric, title in (("bpc", "bits per character"), ("ppl", "perplexity")):
        mine = [r for r in rows if r["metric"] == metric]
        if not mine:
            continue
        raw = any(r["valid_bpc_raw"] is not None for r in mine)
        reach = mine[0]["reach"]
        out.append(f"### {title} ({metric}), mean ± sd over seeds\n")
        out.append("| recipe | parameters | seeds | steps | epochs | valid | test "
                   + ("| valid bpc (raw text) | test bpc (raw text) " if raw else "")
                   + "| paper row | paper valid | paper test | last 3 valid | tokens/s | wall |"
                   + "".join(f" steps to valid ≤ {scores.fmt(x, metric)} | wall to valid ≤ "
                             f"{scores.fmt(x, metric)} |" for x in reach))
        out.append("|---|---:|---|---:|---:|---:|---:|" + ("---:|---:|" if raw else "")
                   + "---|---:|---:|---:|---:|---:|" + "---:|---:|" * len(reach))
        for r in mine:
            seeds = ",".join(f"{s}{'' if done else '*'}" for s, done in zip(r["seeds"], r["finished"]))
            params = f"{r['parameters']:,}" if r["parameters"] else "–"
            rate = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "–"
            out.append(
                f"| {r['recipe']} | {params} | {seeds} | {fmt_range(r['steps'], '{:,}')} "
                f"| {fmt_range(r['epochs'], '{:g}')} "
                f"| {fmt_mean_sd(r['valid_mean'], r['valid_sd'], metric)} "
                f"| {fmt_mean_sd(r['test_mean'], r['test_sd'], metric)} "
                + (f"| {scores.fmt(r['valid_bpc_raw'], 'bpc')} | {scores.fmt(r['test_bpc_raw'], 'bpc')} "
                   if raw else "")
                + f"| {r['paper_row'] or '–'} | {scores.fmt(r['paper_valid'], metric)} "
                f"| {scores.fmt(r['paper_test'], metric)} | {fmt_spread(r['last3_spread'])} "
                f"| {rate} | {fmt_duration(r['wall_seconds'])} |"
                + "".join(f" {fmt_reached(steps, '{:,.0f}')} | {fmt_reached(wall, '{:,.0f} s')} |"
                          for steps, wall in zip(r["reach_steps"], r["reach_wall"])))
        out.append("")
    if any(not all(r["finished"]) for r in rows):
        out.append("`*`: the run has not finished; its best validation so far is counted, its test is not.\n")
    return "\n".join(out)


def differences_markdown(diffs: list) -> str:
    """The ``--compare`` table: each side's mean ± sd (n finished seeds), then A − B ± se."""
    if not diffs:
        return ""

    def side(mean, sd, n, metric):
        return f"{fmt_mean_sd(mean, sd, metric)} ({n})" if mean is not None else "– (0)"

    out = ["### Differences A − B over finished seeds (mean ± sd (seeds); A − B ± its standard error)\n",
           "| A | B | valid A | valid B | valid A − B | test A | test B | test A − B |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for d in diffs:
        cells = []
        for split in ("valid", "test"):
            x, m = d[split], d["metric"]
            diff = "–" if x["diff"] is None else \
                ("+" if x["diff"] >= 0 else "−") + scores.fmt(abs(x["diff"]), m) \
                + ("" if x["se"] is None else f" ± {scores.fmt(x['se'], m)}")
            cells += [side(x["a_mean"], x["a_sd"], x["a_n"], m),
                      side(x["b_mean"], x["b_sd"], x["b_n"], m), diff]
        out.append(f"| {d['a']} | {d['b']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


CSV_FIELDS = ("recipe", "level", "metric", "parameters", "seeds", "n", "steps_min", "steps_max",
              "epochs_max", "valid_mean", "valid_sd", "test_mean", "test_sd", "valid_bpc_raw",
              "test_bpc_raw", "paper_row",
              "paper_valid", "paper_test", "last3_spread", "tokens_per_s", "wall_seconds")


def reach_fields(score: float) -> tuple:
    """The CSV columns of one ``--reach`` score: mean steps, mean wall seconds, seeds that got
    there."""
    return (f"steps_to_valid_le_{score:g}", f"wall_to_valid_le_{score:g}",
            f"reached_valid_le_{score:g}")


def to_csv(rows: list) -> str:
    buf = io.StringIO()
    reach = rows[0]["reach"] if rows else []
    fields = CSV_FIELDS + sum((reach_fields(x) for x in reach), ())
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        steps = [s for s in r["steps"] if s is not None]
        epochs = [e for e in r["epochs"] if e is not None]
        row = {**{k: r[k] for k in CSV_FIELDS if k in r},
               "seeds": " ".join(map(str, r["seeds"])), "n": len(r["seeds"]),
               "steps_min": min(steps) if steps else None,
               "steps_max": max(steps) if steps else None,
               "epochs_max": max(epochs) if epochs else None}
        for score, to_steps, to_wall in zip(reach, r["reach_steps"], r["reach_wall"]):
            row.update(zip(reach_fields(score), (mean_sd(to_steps)[0], mean_sd(to_wall)[0],
                                                 sum(s is not None for s in to_steps))))
        writer.writerow(row)
    return buf.getvalue()


# ----------------------------------------------------------------------------- curves


def curve(run: Run, split: str, x_axis: str) -> tuple:
    """(x, y) of a run's validation score or training loss against epochs, steps or wall time."""
    lines = [m for m in run.lines(split) if m.get("loss") is not None]
    steps = np.array([m["step"] for m in lines], dtype=float)
    y = np.array([m[run.metric] if split == "valid" else m["loss"] for m in lines], dtype=float)
    if x_axis == "steps" or not len(steps):
        return steps, y
    if x_axis == "epochs":
        known = [(m["step"], m["epoch"]) for m in run.lines("valid") if "epoch" in m]
    else:
        known = [tuple(pair) for pair in run.summary.get("evals", [])]
    known = [(0.0, 0.0)] + [k for k in known if k[0] > 0]
    if len(known) < 2:
        raise UserError(f"{run.path} has no {x_axis} information for its curves; use --x steps")
    ks, kx = np.array(known).T
    slope = kx[-1] / ks[-1]  # beyond the last evaluation, extend at the mean rate
    return np.where(steps <= ks[-1], np.interp(steps, ks, kx), steps * slope), y


AXIS_LABEL = {"epochs": "epoch", "steps": "step", "wall": "wall time (s)"}


# Up to this many points a curve also shows its points as dots: a line needs two points to be
# drawn at all (a run that logged once would leave its panel blank), and a handful of dots
# shows where the evaluations fell; on longer curves they would hide the line.
MARKED_POINTS = 30


def plot(groups: list, axes: tuple, path: Path) -> None:
    """``curves.png``: :func:`figure`, saved."""
    fig = figure(groups, axes)
    import matplotlib.pyplot as plt  # after figure() has chosen the Agg backend

    fig.savefig(path, dpi=90)
    plt.close(fig)


def figure(groups: list, axes: tuple):
    """Rows: headline metrics present; columns: validation against each axis, then train loss."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed, and never one picked up by accident
    import matplotlib.pyplot as plt

    metrics = [m for m in ("bpc", "ppl") if any(g.metric == m for g in groups)]
    cols = len(axes) + 1
    fig, grid = plt.subplots(len(metrics), cols, figsize=(5.2 * cols, 4.0 * len(metrics)),
                             squeeze=False)
    colours = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    for row, metric in enumerate(metrics):
        mine = [g for g in groups if g.metric == metric]
        for col in range(cols):
            ax = grid[row][col]
            split = "valid" if col < len(axes) else "train"
            x_axis = axes[col] if col < len(axes) else axes[0]
            for i, g in enumerate(mine):
                colour = colours(i % colours.N)
                xs, ys = zip(*(curve(r, split, x_axis) for r in g.runs))
                n = min(len(x) for x in xs)
                if n == 0:
                    continue
                # Seeds share evaluation steps; early stopping may end some sooner: plot the
                # steps all seeds reached, mean line and min-max band.
                x = np.mean([x[:n] for x in xs], axis=0)
                stack = np.array([y[:n] for y in ys])
                dots = {"marker": "o", "markersize": 3} if n <= MARKED_POINTS else {}
                ax.plot(x, stack.mean(axis=0), color=colour, label=f"{g.name} (n={len(g.runs)})",
                        **dots)
                if len(g.runs) > 1:
                    ax.fill_between(x, stack.min(axis=0), stack.max(axis=0), color=colour, alpha=0.2)
            ax.set_xlabel(AXIS_LABEL[x_axis])
            ax.set_ylabel(f"validation {metric}" if split == "valid" else "training loss (nats/token)")
            if metric == "ppl" and split == "valid":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            if col == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- CLI


def parse_scores(text: Optional[str]) -> list:
    """``--reach``'s comma-separated scores, in the order given."""
    if text is None:
        return []
    try:
        scores = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        scores = []
    if not scores or not all(math.isfinite(x) and x > 0 for x in scores):
        raise UserError(f"--reach {text!r}: give one or more positive scores separated by commas, "
                        f"e.g. --reach 1000,800")
    return scores


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m flipout_lstm.report", description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", metavar="RUN_DIR", help="run directories or folders holding them")
    p.add_argument("--out", default=".", help="folder for results.{md,csv,json} and curves.png (default .)")
    p.add_argument("--x", default="epochs",
                   help="comma-separated x axes of the validation curves: epochs, steps, wall (default epochs)")
    p.add_argument("--reach", default=None, metavar="SCORE[,SCORE...]",
                   help="add the steps and wall time each group took to a validation score <= "
                        "each SCORE (comma-separated)")
    p.add_argument("--compare", default=None, metavar="A:B[,C:D...]",
                   help="add the difference of group A's scores from group B's, with its "
                        "standard error over seeds (comma-separated pairs of recipe names)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        axes = tuple(a.strip() for a in args.x.split(",") if a.strip())
        bad = [a for a in axes if a not in AXES]
        if bad or not axes:
            raise UserError(f"--x {args.x!r}: each axis must be one of {', '.join(AXES)}")
        reach = parse_scores(args.reach)
        groups = group_runs(find_runs(args.paths))
        if reach and len({g.metric for g in groups}) > 1:
            raise UserError(f"--reach {args.reach} gives scores of one kind, but these runs mix "
                            f"bpc and ppl; report character and word runs separately")
        pairs = [(g, g.summary(reach)) for g in groups]
        # Worst first, as the paper's tables run: by level, then mean validation score.
        pairs.sort(key=lambda gr: (gr[1]["metric"] != "bpc", -(gr[1]["valid_mean"] or math.inf)))
        groups, rows = [g for g, _ in pairs], [r for _, r in pairs]
        by_name = {r["recipe"]: r for r in rows}
        diffs = [difference(by_name[a], by_name[b])
                 for a, b in parse_pairs(args.compare, by_name)]
        out = Path(args.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            table = markdown(rows) + ("\n" + differences_markdown(diffs) if diffs else "")
            (out / "results.md").write_text(table, encoding="utf-8")
            (out / "results.csv").write_text(to_csv(rows), encoding="utf-8")
            (out / "results.json").write_text(
                json.dumps({"groups": rows, **({"differences": diffs} if diffs else {})},
                           indent=1) + "\n", encoding="utf-8")
            plot(groups, axes, out / "curves.png")
        except OSError as exc:
            raise UserError(f"cannot write the report to {out}: {exc.strerror or exc}; pass "
                            f"--out a writable folder") from None
    except UserError as exc:
        return exit_status(exc)
    print(table, end="")
    print(f"wrote {out / 'results.md'}, results.csv, results.json, curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
