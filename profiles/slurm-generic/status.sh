#!/usr/bin/env bash
# Job status for Snakemake's cluster-generic executor: `status.sh <slurm job id>` prints exactly one
# of running | success | failed.
#
# sacct first (accounting keeps finished jobs); when sacct is unavailable or does not know the job
# yet (just submitted, slurmdbd lagging), squeue, then scontrol (both only see jobs that finished
# less than MinJobAge ago). A job nobody knows after a few tries is reported failed, so Snakemake
# does not wait forever. Requeued/preempted jobs (sbatch --requeue) count as running.
set -u
jobid=${1:?usage: status.sh JOBID}

state_of() {
  local s=""
  if command -v sacct >/dev/null 2>&1; then
    # -X: the allocation only (not .batch/.0 steps); the most recent record if requeued
    s=$(sacct -j "$jobid" -X -n -P -o State 2>/dev/null | tail -n 1 | awk '{print $1}')
  fi
  if [ -z "$s" ] && command -v squeue >/dev/null 2>&1; then
    s=$(squeue -h -j "$jobid" -o %T 2>/dev/null | head -n 1)
  fi
  if [ -z "$s" ] && command -v scontrol >/dev/null 2>&1; then
    s=$(scontrol show job "$jobid" -o 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' | head -n 1)
  fi
  echo "$s"
}

state=""
for try in 1 2 3; do
  state=$(state_of)
  [ -n "$state" ] && break
  sleep 2
done

case "$state" in
  COMPLETED)
    echo success ;;
  PENDING | CONFIGURING | RUNNING | COMPLETING | SUSPENDED | REQUEUED | REQUEUE_FED | REQUEUE_HOLD | \
    RESIZING | SIGNALING | STAGE_OUT | STOPPED | PREEMPTED | RESV_DEL_HOLD | SPECIAL_EXIT | POWER_UP_NODE)
    echo running ;;
  "")
    echo "status.sh: Slurm does not know job $jobid (sacct/squeue/scontrol); reporting failed" >&2
    echo failed ;;
  *)  # FAILED CANCELLED TIMEOUT OUT_OF_MEMORY NODE_FAIL BOOT_FAIL DEADLINE ...
    echo failed ;;
esac
