# Sourced by the sbatch templates: run the launcher on every task, requeue on a preemption exit.
#
# SLURM copies a batch script before running it, so the templates find this file relative to the
# directory sbatch was called from (the repository root) when their own directory is not it.

run_launcher() {
  local python="${LAUNCHER_PYTHON:-python3}"
  echo "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}): ${SLURM_NTASKS} tasks on ${SLURM_JOB_NODELIST}"
  # --kill-on-bad-exit: one failed task ends the step instead of leaving the rest hanging.
  # --label: every line says which task (= launcher process) printed it.
  srun --kill-on-bad-exit=1 --label "$python" -m launcher "$@"
  local rc=$?
  # 75 (EX_TEMPFAIL): the launcher saved a checkpoint on a notice (USR1 from --signal, or
  # SIGTERM) and wants to be run again; the requeued job resumes from that checkpoint.
  if [[ $rc -eq 75 ]]; then
    echo "job ${SLURM_JOB_ID}: saved on a preemption notice; requeueing"
    scontrol requeue "${SLURM_JOB_ID}"
  fi
  exit $rc
}
