#!/usr/bin/env bash
# End to end on a GPU host with torch preinstalled: build, CUDA tests, benchmarks.
# Usage: bash bench/gpu_run.sh OUTDIR   (results and logs land in OUTDIR)
set -uo pipefail
out=${1:?usage: bash bench/gpu_run.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
status=0
python3 -m pip install --no-build-isolation --no-deps -v -e . > "$out/build.log" 2>&1 \
  || { echo "build failed: see build.log"; tail -30 "$out/build.log"; exit 1; }
python3 - > "$out/environment.json" <<'PY'
import datetime, json, torch, triton, occam_kernels
info = occam_kernels.build_info()
info.update(device=torch.cuda.get_device_name(), triton=triton.__version__,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat())
print(json.dumps(info, indent=1))
PY
cat "$out/environment.json"
python3 -m pytest tests -q -x -p no:cacheprovider --junitxml="$out/tests.xml" 2>&1 \
  | tee "$out/tests.log" | tail -15 || status=1
python3 -m pytest bench -q -p no:cacheprovider --benchmark-json="$out/bench.json" \
  --benchmark-min-rounds=20 --benchmark-warmup=on 2>&1 | tee "$out/bench.log" | tail -15 || status=1
if [ -f bench/report.py ]; then
  python3 bench/report.py "$out/bench.json" --out "$out" 2>&1 | tail -5 || status=1
fi
exit $status
