"""Gradient variance of shared vs flipout weight noise against batch size (Figure 1c).

    python grad_variance.py recipes/grad_variance.yaml [key=value ...] [--quiet]

Overrides are ``key=value`` with YAML values, e.g. ``batch_sizes=[1,2,4,8] repeats=20
estimates=3 checkpoint=null model.hidden_size=64``. Prints a markdown table (batch size,
gate, shared and flipout variance with 95% CIs, their ratio) and the fitted log-log slopes,
and writes results.json, results.csv and variance.png (the figure) into ``out_dir``. See flipout_lstm/grad_variance.py for the
method and recipes/grad_variance.yaml for the paper's settings and a reduced CPU run.
"""
from __future__ import annotations

import argparse
import sys

from flipout_lstm.errors import UserError


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/grad_variance.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override recipe fields, e.g. batch_sizes=[1,2,4,8] repeats=20 estimates=3")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from flipout_lstm import grad_variance as gv

        cfg = gv.load_config(args.recipe, args.overrides)
        result = gv.run(cfg, quiet=args.quiet)
        jpath, cpath = gv.write_outputs(result, cfg.out_dir)
    except UserError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(gv.markdown(result), end="")
    print(f"\nwrote {jpath}, {cpath} and {jpath.parent / 'variance.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
