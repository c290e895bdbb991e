set -u
export PYTHONUNBUFFERED=1 OCCAM_CUDA_ARCHS=9.0 MAX_JOBS=16 PYTHONPATH=$PWD
O=/tmp/d; mkdir -p $O; t0=$SECONDS
nvidia-smi --query-gpu=name,driver_version --format=csv > $O/smi.csv 2>&1
timeout 150 python3 -m pip install --no-build-isolation --no-deps -v -e . > $O/build.log 2>&1; echo "build rc $? at $((SECONDS-t0))s"
(PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 175 compute-sanitizer --tool racecheck --error-exitcode 1 python3 bench/gpu_check.py sanitize-target > $O/racecheck.log 2>&1; echo "racecheck rc $? at $((SECONDS-t0))s" | tee -a $O/racecheck.log) &
for f in test_exit_head test_exit_head_triton_raw test_compact test_early_exit test_models; do
  (timeout 175 python3 -m pytest -v -rfE -p no:cacheprovider tests/$f.py -k "not offsets_past_2_31 and not test_native_op_checks_inputs_itself" > $O/t_$f.log 2>&1; echo "$f rc $? at $((SECONDS-t0))s" | tee -a $O/t_$f.log) &
done
(timeout 220 python3 diag/segv.py > $O/segv.log 2>&1; echo "segv rc $?" >> $O/segv.log) &
(timeout 175 python3 diag/large.py > $O/large.log 2>&1; echo "large rc $? at $((SECONDS-t0))s" | tee -a $O/large.log) &
wait
tar czf $OUT/diag.tgz -C /tmp d
grep -h "FAILED\|passed\|failed\|error" $O/t_*.log | tail -30
cat $O/large.log | cut -c1-400
grep -h "^==\|Error\|#[0-9]" $O/segv.log | head -60
tail -3 $O/racecheck.log
