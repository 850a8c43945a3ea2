#!/usr/bin/env bash
# The reduced-scale study (issue 8), resumable: a finished run is skipped, an interrupted one
# continues from its checkpoint. One thread per run; pin each part to its own core, e.g.
#   LM_DATA_ROOT=../shared/data/ptb taskset -c 1 bash results/cpu/study.sh char
#   LM_DATA_ROOT=../shared/data/ptb taskset -c 0 bash results/cpu/study.sh word
# Seed 1 of every row first, then seed 2, then the third seed of the key pairs, so that a
# study cut short still covers every row.
set -euo pipefail
export OMP_NUM_THREADS=1
out=${STUDY_OUT:-checkpoints/cpu/study}
common=(train.tensorboard=false)
sweep() { python -m lm.sweep "$@" --out "$out" "${common[@]}"; }
c=recipes/cpu
case "${1:?usage: study.sh char|word|large-batch}" in
  char)
    all=($c/char_unregularized.yaml $c/char_mult_gauss.yaml $c/char_mult_gauss_flipout.yaml
         $c/char_gal.yaml $c/char_zoneout.yaml $c/char_semeniuta.yaml)
    sweep "${all[@]}" --seeds 1
    sweep "${all[@]}" --seeds 2
    sweep "${all[@]:0:3}" --seeds 3 ;;
  word)
    all=($c/word_unregularized.yaml $c/word_wd.yaml $c/word_wd_flipout.yaml
         $c/word_gal.yaml $c/word_semeniuta.yaml $c/word_zaremba.yaml $c/word_zoneout.yaml)
    sweep "${all[@]}" --seeds 1
    sweep "${all[@]}" --seeds 2
    sweep "${all[@]:0:3}" --seeds 3 ;;
  large-batch)
    sweep $c/large_batch_wd.yaml $c/large_batch_wd_flipout.yaml --seeds 1,2,3 ;;
  *) echo "study.sh: unknown part '$1' (char, word or large-batch)" >&2; exit 2 ;;
esac
