# Sourced by the GPU-window scripts (gpu_check.sh, repro_window.sh): one timed step at a time.
#
# run_step NAME LIMIT_SECONDS COMMAND...: runs COMMAND under `timeout` (SIGTERM at the limit,
# SIGKILL 10 s later), its output in $out/NAME.log, one line "NAME status seconds limit" in
# $out/steps.tsv. The limit is clipped to what is left of $budget seconds counted from $start
# (bash's SECONDS), less $reserve; with under 5 s left the step is recorded as "no time".
# A failed or timed-out step is recorded and the caller goes on. A step named in
# OCCAM_SKIP_STEPS (names separated by spaces or commas) is recorded as "skipped" and not run:
# a window that has already proven a step spends its minutes on the others.
# $limit_scale (default 1) multiplies every LIMIT_SECONDS: a CPU smoke mode runs the GPU's
# limits on a 2-core machine, whose speed varies from run to run.
run_step() {
  local name=$1 limit=$(( $2 * ${limit_scale:-1} )); shift 2
  local skip=${OCCAM_SKIP_STEPS:-}
  if [[ " ${skip//,/ } " == *" $name "* ]]; then
    printf '%s\tskipped\t0\t0\n' "$name" >> "$out/steps.tsv"
    echo "[$script_name] $name: skipped (OCCAM_SKIP_STEPS)"
    return
  fi
  local left=$(( budget - (SECONDS - start) - reserve ))
  if (( left < 5 )); then
    printf '%s\tno time\t0\t0\n' "$name" >> "$out/steps.tsv"
    echo "[$script_name] $name: skipped, the budget is spent"
    return
  fi
  (( limit > left )) && limit=$left
  local t0=$SECONDS status
  echo "[$script_name] $name (limit ${limit}s) ..."
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  case $? in
    0) status=pass ;;
    124|137) status=timeout ;;
    *) status=fail ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( SECONDS - t0 ))" "$limit" >> "$out/steps.tsv"
  echo "[$script_name] $name: $status in $(( SECONDS - t0 ))s (log: $out/$name.log)"
  [ $status = pass ] || tail -5 "$out/$name.log" | sed 's/^/    /'
}

# The exit status of a window script: 0 when every step passed or was skipped by name.
all_steps_passed() {
  ! grep -qvE $'\t(pass|skipped)\t' "$out/steps.tsv"
}
