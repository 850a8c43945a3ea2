#!/usr/bin/env bash
# The PTB study at the anchor's scale (issue 18), resumable: a finished run is skipped, an
# interrupted one continues from its checkpoint. One thread per run; pin each part to its own
# core, e.g.
#   LM_DATA_ROOT=../shared/data/ptb taskset -c 1 bash results/ptb/study.sh anchor
# or, where a run on one core would not finish in a session, one part on both (THREADS=2):
#   LM_DATA_ROOT=../shared/data/ptb THREADS=2 bash results/ptb/study.sh word-key
# then `collect` copies the finished runs into results/ptb/ and writes the reports.
# Parts, in the order the issue asks for: anchor, the pilots, the key rows (seed 1, then the
# other seeds), the other rows, for words then characters; the large-batch pair.
set -euo pipefail
threads=${THREADS:-1}
export OMP_NUM_THREADS=$threads
out=${STUDY_OUT:-checkpoints/ptb}
common=(train.tensorboard=false train.threads=$threads)
sweep() { python -m flipout_lstm.sweep "$@" "${common[@]}"; }
# A new machine's $out lacks the runs committed here: copy their files in (never over a run
# dir already there), so that the sweep counts them done instead of training them again.
committed() {
  local run into
  for run in results/ptb/"$1"/runs/*/; do
    [ -d "$run" ] || continue
    into=$out/$1/$(basename "$run")
    [ -e "$into" ] || { mkdir -p "$into" && cp "$run"/* "$into"/; }
  done
}
r=recipes/ptb
word_key=($r/word_unregularized.yaml $r/word_wd.yaml $r/word_wd_flipout.yaml)
word_other=($r/word_gal.yaml $r/word_semeniuta.yaml $r/word_zaremba.yaml $r/word_zoneout.yaml)
char_key=($r/char_unregularized.yaml $r/char_mult_gauss.yaml $r/char_mult_gauss_flipout.yaml)
char_other=($r/char_semeniuta.yaml $r/char_zoneout.yaml $r/char_gal.yaml)
parts="anchor|pilots|word-key|word-other|char-key|char-other|large-batch|collect"
# The large-batch pair's scores to reach, fixed before its runs (recipes/ptb/large_batch_*.yaml).
reach=300,220,180
# The paper's claims as differences A:B: flipout against the shared perturbation, and every
# row against the unregularized one.
declare -A claims=(
  [word]="word_wd_flipout:word_wd $(for x in wd wd_flipout gal semeniuta zaremba zoneout; do echo word_$x:word_unregularized; done)"
  [char]="char_mult_gauss_flipout:char_mult_gauss $(for x in mult_gauss mult_gauss_flipout semeniuta zoneout gal; do echo char_$x:char_unregularized; done)"
  [large_batch]="large_batch_wd_flipout:large_batch_wd")
# The claims whose both rows have committed runs, as report's --compare argument.
compare() {
  local pairs=() pair
  for pair in ${claims[$1]:-}; do
    compgen -G "results/ptb/$1/runs/${pair%%:*}-s*" >/dev/null \
      && compgen -G "results/ptb/$1/runs/${pair##*:}-s*" >/dev/null && pairs+=("$pair")
  done
  if [ ${#pairs[@]} -gt 0 ]; then (IFS=,; echo "--compare ${pairs[*]}"); fi
}
case "${1:?usage: study.sh $parts}" in
  anchor)
    # Zaremba et al.'s small model, the published result the trainer is anchored to.
    committed anchor
    sweep recipes/zaremba_small.yaml --seeds "${SEEDS:-1}" --out "$out/anchor" ;;
  pilots)
    # The precision pilots: Table 2's unregularized and Mult. Gauss rows in float32, beside
    # their bfloat16 seeds. (The sizing pilot, $r/pilots/char_512_2m.yaml, is the first run's
    # first 13 epochs, patience aside.)
    committed pilots
    sweep $r/pilots/char_unregularized_fp32.yaml --seeds 1,2,3 --out "$out/pilots"
    sweep $r/pilots/char_mult_gauss_fp32.yaml --seeds 1 --out "$out/pilots" ;;
  word-key)
    # The key rows of Table 3: seed 1 of each, then seeds 2 and 3.
    committed word
    sweep "${word_key[@]}" --seeds 1 --out "$out/word"
    sweep "${word_key[@]}" --seeds 2,3 --out "$out/word" ;;
  word-other)
    committed word
    sweep "${word_other[@]}" --seeds 1,2 --out "$out/word" ;;
  char-key)
    # The key rows of Table 2 at the pilot's size: seed 1 of each, then seeds 2 and 3.
    committed char
    sweep "${char_key[@]}" --seeds 1 --out "$out/char"
    sweep "${char_key[@]}" --seeds 2,3 --out "$out/char" ;;
  char-other)
    committed char
    sweep "${char_other[@]}" --seeds 1,2 --out "$out/char" ;;
  large-batch)
    # The appendix's pair at batch 640, 3 seeds per arm. glibc's heap defaults: with the loss by
    # row blocks the step is as fast as with freed memory kept (flipout_lstm/heap.py), and the
    # peak is lower (3.5 against 5.1 GB, docs/performance.md); the numbers are the same either way.
    committed large_batch
    LM_KEEP_FREED_MEMORY=0 sweep $r/large_batch_wd.yaml $r/large_batch_wd_flipout.yaml --seeds 1,2,3 --out "$out/large_batch" ;;
  collect)
    # Each finished run's config, metrics and summary (never its checkpoints), then the reports.
    for part in anchor pilots word char large_batch; do
      for run in "$out/$part"/*/; do
        [ -d "$run" ] || continue
        grep -q '"split": "test".*"best": true' "$run/metrics.jsonl" 2>/dev/null || continue
        dst=results/ptb/$part/runs/$(basename "$run")
        mkdir -p "$dst" && cp "$run"/config.yaml "$run"/metrics.jsonl "$run"/run.json "$dst"/
      done
      if [ -d "results/ptb/$part/runs" ]; then
        python -m flipout_lstm.report "results/ptb/$part/runs" --out "results/ptb/$part" \
          $([ "$part" = large_batch ] && echo --reach $reach) $(compare "$part")
      fi
    done ;;
  *) echo "study.sh: unknown part '$1' (one of $parts)" >&2
     exit 2 ;;
esac
