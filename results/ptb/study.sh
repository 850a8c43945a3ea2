#!/usr/bin/env bash
# The PTB study at the anchor's scale (issue 18), resumable: a finished run is skipped, an
# interrupted one continues from its checkpoint. One thread per run; pin each part to its own
# core, e.g.
#   LM_DATA_ROOT=../shared/data/ptb taskset -c 1 bash results/ptb/study.sh anchor
# then `collect` copies the finished runs into results/ptb/ and writes the reports.
set -euo pipefail
export OMP_NUM_THREADS=1
out=${STUDY_OUT:-checkpoints/ptb}
common=(train.tensorboard=false train.threads=1)
sweep() { python -m lm.sweep "$@" "${common[@]}"; }
case "${1:?usage: study.sh anchor|collect}" in
  anchor)
    # Zaremba et al.'s small model, the published result the trainer is anchored to.
    sweep recipes/zaremba_small.yaml --seeds "${SEEDS:-1}" --out "$out/anchor" ;;
  collect)
    # Each finished run's config, metrics and summary (never its checkpoints), then the reports.
    for part in anchor; do
      for run in "$out/$part"/*/; do
        [ -d "$run" ] || continue
        grep -q '"split": "test".*"best": true' "$run/metrics.jsonl" 2>/dev/null || continue
        dst=results/ptb/$part/runs/$(basename "$run")
        mkdir -p "$dst" && cp "$run"/config.yaml "$run"/metrics.jsonl "$run"/run.json "$dst"/
      done
      [ -d "results/ptb/$part/runs" ] && python -m lm.report "results/ptb/$part/runs" --out "results/ptb/$part"
    done ;;
  *) echo "study.sh: unknown part '$1' (anchor or collect)" >&2
     exit 2 ;;
esac
