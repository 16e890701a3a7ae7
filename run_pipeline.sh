#!/usr/bin/env bash
# Run the whole AI-QS pipeline, stages 1-5, in order; stop at the first failure.
#
#   ./run_pipeline.sh --quick --dataset synthetic           # offline demo, a few minutes on CPU
#   ./run_pipeline.sh --data-dir ../shared/data/cifar10-jpeg.tar.gz --epochs 30
#
# Shared options go to every stage: --quick --dataset --data-dir --device --seed --val-size
# --results-dir --checkpoint-dir. Stage options: --epochs --batch-size --lr --warmup-epochs
# (stage 1), --bits (stages 2-4), --max-drop --method (stage 3). PYTHON overrides the interpreter.
set -uo pipefail
cd "$(dirname "$0")"

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }
COMMON=(); S1=(); BITS=(); S3=(); RESULTS=results
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) COMMON+=("$1"); shift ;;
    --dataset|--data-dir|--device|--seed|--val-size|--checkpoint-dir)
      [ $# -ge 2 ] || { echo "run_pipeline.sh: $1 needs a value" >&2; exit 2; }
      COMMON+=("$1" "$2"); shift 2 ;;
    --results-dir)
      [ $# -ge 2 ] || { echo "run_pipeline.sh: $1 needs a value" >&2; exit 2; }
      COMMON+=("$1" "$2"); RESULTS=$2; shift 2 ;;
    --epochs|--batch-size|--lr|--warmup-epochs)
      [ $# -ge 2 ] || { echo "run_pipeline.sh: $1 needs a value" >&2; exit 2; }
      S1+=("$1" "$2"); shift 2 ;;
    --max-drop|--method)
      [ $# -ge 2 ] || { echo "run_pipeline.sh: $1 needs a value" >&2; exit 2; }
      S3+=("$1" "$2"); shift 2 ;;
    --bits)
      BITS+=("$1"); shift
      while [ $# -gt 0 ] && [[ "$1" != --* ]]; do BITS+=("$1"); shift; done ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run_pipeline.sh: unknown option '$1'. Run ./run_pipeline.sh --help for the options." >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python}
stage() {
  local name=$1; shift
  echo; echo "=== $name: $PY $* ==="
  local start=$SECONDS
  "$PY" "$@"
  local rc=$?
  if [ $rc -ne 0 ]; then
    echo "pipeline stopped: $name failed with exit code $rc (its message is above)." >&2
    exit $rc
  fi
  echo "--- $name done in $((SECONDS - start)) s"
}

stage "stage 1 (train)" 1_train_baseline.py "${COMMON[@]}" ${S1[@]+"${S1[@]}"}
stage "stage 2 (per-layer sensitivity)" 2_per_layer_analysis.py "${COMMON[@]}" ${BITS[@]+"${BITS[@]}"}
stage "stage 3 (search)" 3_greedy_search.py "${COMMON[@]}" ${BITS[@]+"${BITS[@]}"} ${S3[@]+"${S3[@]}"}
stage "stage 4 (baselines)" 4_create_baselines.py "${COMMON[@]}" ${BITS[@]+"${BITS[@]}"}
stage "stage 5 (plots)" 5_generate_plots.py "${COMMON[@]}"
echo; echo "done in ${SECONDS} s. Plots: $RESULTS/plots/   table: $RESULTS/summary.md"
