# Sourced by the sbatch templates: run the launcher on every task, restart the job step after a
# failure (MAX_RESTARTS times, default 0), requeue on a preemption exit.
#
# SLURM copies a batch script before running it, so the templates find this file relative to the
# directory sbatch was called from (the repository root) when their own directory is not it.
#
# Exit codes (launcher/errors.py): 0 done; 2 bad input, 74 storage refusing writes and 78 out of
# memory (never restarted); 75 saved on a preemption notice (requeued); anything else a failure, restarted
# inside the allocation.

run_launcher() {
  local python="${LAUNCHER_PYTHON:-python3}"
  local max_restarts="${MAX_RESTARTS:-0}" restarts=0 rc first_rc=""
  echo "job ${SLURM_JOB_ID} (requeue ${SLURM_RESTART_COUNT:-0}): ${SLURM_NTASKS} tasks on ${SLURM_JOB_NODELIST}"
  while true; do
    # --kill-on-bad-exit: one failed task ends the step instead of leaving the rest hanging.
    # --label: every line says which task (= launcher process) printed it.
    srun --kill-on-bad-exit=1 --label "$python" -m launcher "$@"
    rc=$?
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
