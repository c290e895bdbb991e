set -u
export PYTHONUNBUFFERED=1 OCCAM_BUILD_CUDA=0 MAX_JOBS=16 PYTHONPATH=$PWD
O=/tmp/v; mkdir -p $O; t0=$SECONDS
timeout 60 python3 -m pip install --no-build-isolation --no-deps -e . > $O/build.log 2>&1; echo "build rc $? at $((SECONDS-t0))s"
(timeout 85 python3 -m pytest -v -p no:cacheprovider tests/test_compact.py -k "native_op or rejects" > $O/compact.log 2>&1; echo "compact rc $? at $((SECONDS-t0))s" >> $O/compact.log) &
(timeout 85 python3 -m pytest -v -p no:cacheprovider tests/test_exit_head.py -k "design_shape" > $O/head.log 2>&1; echo "head rc $? at $((SECONDS-t0))s" >> $O/head.log) &
(timeout 85 python3 -m pytest -v -p no:cacheprovider tests/test_models.py -k "agree" > $O/models.log 2>&1; echo "models rc $? at $((SECONDS-t0))s" >> $O/models.log) &
wait
cp $O/*.log $OUT/
grep -h "PASSED\|FAILED\|rc \|^E " $O/*.log | cut -c1-200 | head -40
