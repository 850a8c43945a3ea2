#!/usr/bin/env bash
# The reduced-scale study (issue 8), resumable: a finished run is skipped, an interrupted one
# continues from its checkpoint. One thread per run; pin each part to its own core, e.g.
#   LM_DATA_ROOT=../shared/data/ptb taskset -c 1 bash results/cpu/study.sh char
#   LM_DATA_ROOT=../shared/data/ptb taskset -c 0 bash results/cpu/study.sh word
#   (then the parts large-batch and grad-variance; `collect` copies the finished runs into
#   results/cpu/study and writes the report)
# Seed 1 of every row first, then seed 2, then the third seed of the key pairs, so that a
# study cut short still covers every row.
set -euo pipefail
export OMP_NUM_THREADS=1
out=${STUDY_OUT:-checkpoints/cpu/study}
common=(train.tensorboard=false)
sweep() { python -m flipout_lstm.sweep "$@" --out "$out" "${common[@]}"; }
c=recipes/cpu
# Seed 1 of every recipe, then seed 2, then seed 3 of the first $2 recipes (the key pairs).
staged() {
  local keys=$1; shift
  sweep "$@" --seeds 1
  sweep "$@" --seeds 2
  sweep "${@:1:$keys}" --seeds 3
}
case "${1:?usage: study.sh char|word|large-batch|grad-variance|collect}" in
  char)
    staged 3 $c/char_unregularized.yaml $c/char_mult_gauss.yaml $c/char_mult_gauss_flipout.yaml \
      $c/char_gal.yaml $c/char_zoneout.yaml $c/char_semeniuta.yaml ;;
  word)
    staged 3 $c/word_unregularized.yaml $c/word_wd.yaml $c/word_wd_flipout.yaml \
      $c/word_gal.yaml $c/word_semeniuta.yaml $c/word_zaremba.yaml $c/word_zoneout.yaml ;;
  large-batch)
    staged 2 $c/large_batch_wd.yaml $c/large_batch_wd_flipout.yaml ;;
  grad-variance)
    # Figure 1c on a partially trained word model: the study's WD + Flipout seed-1 run at its
    # best checkpoint. Batch sizes as large as one core computes in about 10 minutes.
    python grad_variance.py recipes/grad_variance.yaml checkpoint="$out/word_wd_flipout-s1/best.pt" \
      threads=1 "batch_sizes=[1,2,4,8,16,32,64]" repeats=24 estimates=3 \
      out_dir=results/cpu/grad_variance ;;
  collect)
    # Each finished run's config, metrics and summary (never its checkpoints) into
    # results/cpu/study, then the tables and figures from them.
    for run in "$out"/*/; do
      grep -q '"split": "test".*"best": true' "$run/metrics.jsonl" 2>/dev/null || continue
      dst=results/cpu/study/$(basename "$run")
      mkdir -p "$dst" && cp "$run"/config.yaml "$run"/metrics.jsonl "$run"/run.json "$dst"/
    done
    python -m flipout_lstm.report results/cpu/study --out results/cpu
    if compgen -G "results/cpu/study/large_batch_*" > /dev/null; then
      # Validation perplexities at which "steps to get there" is read: a fixed grid from early
      # to late in the epoch, not one score picked from the curves.
      python -m flipout_lstm.report results/cpu/study/large_batch_* --x steps,wall \
        --reach "${REACH:-2000,1000,800,700}" --out results/cpu/large_batch
    fi ;;
  *) echo "study.sh: unknown part '$1' (char, word, large-batch, grad-variance or collect)" >&2
     exit 2 ;;
esac
