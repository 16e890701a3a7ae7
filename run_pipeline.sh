#!/usr/bin/env bash
# Run the whole AI-QS pipeline, stages 1-5, in order; stop at the first failure.
#
#   ./run_pipeline.sh --quick --dataset synthetic                 # offline demo, a few minutes on CPU
#   ./run_pipeline.sh --quick --dataset synthetic --arch mobilenetv2 --a-bits 8 6 4
#   ./run_pipeline.sh --data-dir ../shared/data/cifar10-jpeg.tar.gz --epochs 30
#   ./run_pipeline.sh --checkpoint pretrained/resnet20_cifar10jpeg_30ep.pt --a-bits 8 6 4   # stages 2-5 only
#
# Shared options go to every stage: --quick --dataset --data-dir --device --seed --val-size --results-dir
# --checkpoint-dir. Model: --arch --depth --shortcut (stage 1 builds it; stages 2-4 check it against the
# checkpoint); --checkpoint (a given checkpoint skips stage 1) --normalization --holdout --confirm-size
# (stages 2-4). Stage options: --epochs --batch-size --lr --warmup-epochs (stage 1), --bits --a-bits (stages
# 2-4), --cost-model --target (stage 2; stages 3-4 follow it), --max-drop --method --max-evaluations (stage 3),
# --qat-epochs (stage 4). PYTHON overrides the interpreter.
set -uo pipefail
cd "$(dirname "$0")"

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }
COMMON=(); MODEL=(); POST=(); S1=(); S2=(); BITS=(); S3=(); S4=(); RESULTS=results; CHECKPOINT=
need() { [ "$1" -ge 2 ] || { echo "run_pipeline.sh: $2 needs a value" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) COMMON+=("$1"); shift ;;
    --dataset|--data-dir|--device|--seed|--val-size|--checkpoint-dir)
      need $# "$1"; COMMON+=("$1" "$2"); shift 2 ;;
    --results-dir) need $# "$1"; COMMON+=("$1" "$2"); RESULTS=$2; shift 2 ;;
    --arch|--depth|--shortcut) need $# "$1"; MODEL+=("$1" "$2"); shift 2 ;;
    --checkpoint) need $# "$1"; CHECKPOINT=$2; POST+=("$1" "$2"); shift 2 ;;
    --normalization|--holdout|--confirm-size) need $# "$1"; POST+=("$1" "$2"); shift 2 ;;
    --cost-model|--target) need $# "$1"; S2+=("$1" "$2"); shift 2 ;;
    --epochs|--batch-size|--lr|--warmup-epochs) need $# "$1"; S1+=("$1" "$2"); shift 2 ;;
    --max-drop|--method|--max-evaluations) need $# "$1"; S3+=("$1" "$2"); shift 2 ;;
    --qat-epochs) need $# "$1"; S4+=("$1" "$2"); shift 2 ;;
    --bits|--a-bits)
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

if [ -z "$CHECKPOINT" ]; then
  stage "stage 1 (train)" 1_train_baseline.py "${COMMON[@]}" ${MODEL[@]+"${MODEL[@]}"} ${S1[@]+"${S1[@]}"}
else
  echo "=== stage 1 skipped: --checkpoint $CHECKPOINT given ==="
fi
POSTARGS=("${COMMON[@]}" ${MODEL[@]+"${MODEL[@]}"} ${POST[@]+"${POST[@]}"} ${BITS[@]+"${BITS[@]}"})
stage "stage 2 (per-layer sensitivity)" 2_per_layer_analysis.py "${POSTARGS[@]}" ${S2[@]+"${S2[@]}"}
stage "stage 3 (search)" 3_greedy_search.py "${POSTARGS[@]}" ${S3[@]+"${S3[@]}"}
stage "stage 4 (baselines)" 4_create_baselines.py "${POSTARGS[@]}" ${S4[@]+"${S4[@]}"}
stage "stage 5 (plots)" 5_generate_plots.py "${COMMON[@]}"
echo; echo "done in ${SECONDS} s. Plots: $RESULTS/plots/   table: $RESULTS/summary.md"
