# Sourced by the sbatch templates: run the launcher on every task, restart the job step after a
# failure (MAX_RESTARTS times, default 0), requeue on a preemption exit.
#
# SLURM copies a batch script before running it, so the templates find this file relative to the
# directory sbatch was called from (the repository root) when their own directory is not it.
#
# Exit codes (launcher/errors.py): 0 done; 2 bad input, 74 storage refusing writes and 78 out of
# memory (never restarted); 75 saved on a preemption notice (requeued); anything else a failure, restarted
# inside the allocation.
#
# Elastic (MIN_NODES=M, in an allocation submitted with `sbatch --no-kill`, docs/elastic.md):
# before each job step the allocation's nodes are judged by `scontrol show node` (DOWN, DRAIN,
# FAIL are lost; NOT_RESPONDING alone when a job step cannot start there) and the step runs on
# the most usable ones, at least M, that keep the global batch (scripts/slurm/elastic.py), with
# the microbatches that keep the per-device batch. A failed step that lost a node restarts on
# fewer without counting; a lost node usable again (checked every ELASTIC_CHECK_SECONDS, default
# 30) makes the step save (SIGUSR1, the preemption notice) and restart on more, at most once per
# RESIZE_INTERVAL_SECONDS (600).

run_launcher() {
  local python="${LAUNCHER_PYTHON:-python3}"
  local max_restarts="${MAX_RESTARTS:-0}" restarts=0 rc first_rc=""
  local elastic_py
  elastic_py="$(dirname "${BASH_SOURCE[0]}")/elastic.py"
  [[ -f "$elastic_py" ]] || elastic_py=scripts/slurm/elastic.py
  local min_nodes="${MIN_NODES:-}" count=0 full_count="${SLURM_JOB_NUM_NODES:-1}" grew shape
  local tasks_per_node=$(( ${SLURM_NTASKS:-1} / ${SLURM_JOB_NUM_NODES:-1} ))
  local devices_per_node="${DEVICES_PER_NODE:-${SLURM_GPUS_ON_NODE:-$((tasks_per_node * ${DEVICES_PER_TASK:-1}))}}"
  local last_resize=$SECONDS step_args extra_args srun_pid
  local NODES="" COUNT=0 GRAD_ACCUM=1 LOST="" LINE=""
  echo "job ${SLURM_JOB_ID} (requeue ${SLURM_RESTART_COUNT:-0}): ${SLURM_NTASKS} tasks on ${SLURM_JOB_NODELIST}"
  while true; do
    step_args=() extra_args=() grew=""
    if [[ -n "$min_nodes" ]]; then
      shape="$("$python" "$elastic_py" shape --min_nodes="$min_nodes" \
        --devices_per_node="$devices_per_node" --last_count="$count" -- "$@")"
      rc=$?
      if [[ $rc -eq 2 ]]; then
        echo "job ${SLURM_JOB_ID}: bad input (exit 2; the line above says what to change); not starting"
        exit 2
      elif [[ $rc -ne 0 ]]; then
        echo "job ${SLURM_JOB_ID}: not enough usable nodes (exit ${rc}); see the line above"
        exit "$rc"
      fi
      eval "$shape"
      [[ -n "$LINE" ]] && echo "job ${SLURM_JOB_ID}: ${LINE}"
      [[ $count -ne 0 && $COUNT -ne $count ]] && last_resize=$SECONDS
      count=$COUNT
      step_args=(--nodes="$COUNT" --nodelist="$NODES" --ntasks=$((COUNT * tasks_per_node)))
      [[ $COUNT -ne $full_count ]] && extra_args=(--config.grad_accum_steps="$GRAD_ACCUM")
    fi
    # --kill-on-bad-exit: one failed task ends the step instead of leaving the rest hanging.
    # --label: every line says which task (= launcher process) printed it.
    srun --kill-on-bad-exit=1 --label "${step_args[@]}" "$python" -m launcher "$@" "${extra_args[@]}" &
    srun_pid=$!
    while [[ -n "$min_nodes" && -n "$LOST" ]] && kill -0 "$srun_pid" 2>/dev/null; do
      sleep "${ELASTIC_CHECK_SECONDS:-30}"
      if (( SECONDS - last_resize >= ${RESIZE_INTERVAL_SECONDS:-600} )) \
          && "$python" "$elastic_py" back --lost="$LOST"; then
        echo "job ${SLURM_JOB_ID}: node(s) of ${LOST} usable again: the job step saves, then continues on more nodes"
        grew=1
        last_resize=$SECONDS  # Even when the next shape finds the node lost again (a flapping node).
        kill -USR1 "$srun_pid"  # srun passes it to every task: the preemption notice.
        break
      fi
    done
    wait "$srun_pid"
    rc=$?
    if [[ -n "$grew" && ( $rc -eq 75 || $rc -eq 0 ) ]]; then
      continue
    fi
    if [[ $rc -eq 0 ]]; then
      echo "job ${SLURM_JOB_ID}: finished after ${restarts} restart(s)"
      exit 0
    elif [[ $rc -eq 75 ]]; then
      # The launcher saved a checkpoint on a notice (USR1 from --signal, or SIGTERM); the
      # requeued job resumes from it.
      echo "job ${SLURM_JOB_ID}: saved on a preemption notice; requeueing"
      scontrol requeue "${SLURM_JOB_ID}"
      exit 75
    elif [[ $rc -eq 2 ]]; then
      echo "job ${SLURM_JOB_ID}: bad input (exit 2), which a restart cannot fix; not restarting"
      exit 2
    elif [[ $rc -eq 74 ]]; then
      echo "job ${SLURM_JOB_ID}: the workdir's storage refused to write (exit 74: full, quota, read-only or permission), which a restart cannot fix; not restarting"
      exit 74
    elif [[ $rc -eq 78 ]]; then
      echo "job ${SLURM_JOB_ID}: out of memory (exit 78; the launcher's line above says what to change), which a restart cannot fix; not restarting"
      exit 78
    fi
    if [[ -n "$min_nodes" ]] && ! "$python" "$elastic_py" usable --nodes="$NODES"; then
      continue  # A node of the step is lost: the next step runs on fewer, not counted.
    fi
    first_rc="${first_rc:-$rc}"
    if [[ $restarts -ge $max_restarts ]]; then
      echo "job ${SLURM_JOB_ID}: the job step failed with exit ${rc}; giving up after ${restarts} restart(s) (MAX_RESTARTS=${max_restarts}); first failure: exit ${first_rc}"
      exit "$first_rc"
    fi
    restarts=$((restarts + 1))
    echo "job ${SLURM_JOB_ID}: restart ${restarts}/${max_restarts} after the job step exited with ${rc}; resuming from the last checkpoint"
    sleep $((restarts < 6 ? 1 << (restarts - 1) : 60))
  done
}
