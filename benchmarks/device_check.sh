#!/usr/bin/env bash
# One call on a lent GPU machine (under 8 minutes): the CUDA tests (the layer, and train.py /
# evaluate.py end to end per precision), then the LSTM speed benchmark on the GPU in float32
# and in bf16, all written to ${OUT:-.}/device_check.md.
#
#     bash benchmarks/device_check.sh          # from anywhere; runs in the repository root
#
# It installs nothing: torch with CUDA (and pytest) must already be there. Each step is
# bounded by `timeout` and a failing step does not stop the next; the exit status is the
# number of failed steps (0: all passed). Budget: 20 + 40 + 210 + 2 x 100 s = 470 s at most.
set -u
cd "$(dirname "$0")/.." || exit 1
out_dir="${OUT:-.}"
mkdir -p "$out_dir"
report="$out_dir/device_check.md"
py="${PYTHON:-python}"
failed=0

step() {  # step SECONDS TITLE CMD...: run CMD under timeout, its output fenced in the report
    local secs=$1 title=$2 rc start
    shift 2
    start=$(date +%s)
    {
        echo "## $title"
        echo
        echo '```'
        echo "\$ $*"
    } >>"$report"
    timeout --kill-after=10 "$secs" "$@" >>"$report" 2>&1
    rc=$?
    {
        echo '```'
        echo
        echo "exit status $rc after $(( $(date +%s) - start )) s (limit ${secs} s)$( \
            [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo ': TIMED OUT')"
        echo
    } >>"$report"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
    echo "$title: exit $rc"
}

{
    echo "# Device check"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
    echo
} >"$report"

step 20 "nvidia-smi" nvidia-smi
step 40 "torch and CUDA versions" "$py" -c 'import torch; print(torch.__version__, torch.version.cuda); print("cuda available:", torch.cuda.is_available(), "devices:", torch.cuda.device_count()); torch.cuda.is_available() and print(torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))'
step 210 "CUDA tests (skipped without a GPU)" "$py" -m pytest -q -rs \
    tests/test_lstm_precision.py tests/test_lstm_equivalence.py tests/test_lstm_noise.py \
    tests/test_lstm_kernels.py tests/test_lstm_packed.py \
    tests/test_precision.py tests/test_train_cuda.py
for prec in fp32 bf16; do
    step 100 "lstm_speed.py --device cuda --precision $prec" "$py" benchmarks/lstm_speed.py \
        --device cuda --precision "$prec" --shape both --no-independent --bayesian-steps 0 \
        --repeats 5
done

echo "**$failed step(s) failed.**" >>"$report"
echo "report: $report ($failed step(s) failed)"
exit "$failed"
