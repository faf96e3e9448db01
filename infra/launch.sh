#!/usr/bin/env bash
# Start `python -m pipeline.train` on THIS node under `accelerate launch`, with the
# topology taken from the environment. One call per node. Used by the Docker image
# entrypoint, the Kubernetes manifests and infra/slurm/train.sbatch.
#
#   bash infra/launch.sh [training args...]          (default: --params params.yaml)
#
# Environment (PyTorchJob's PET_* variables are picked up automatically):
#   NNODES          nodes in the job                 (default $PET_NNODES or 1)
#   NODE_RANK       rank of this node, 0..NNODES-1   (default $PET_NODE_RANK or 0)
#   NPROC_PER_NODE  processes on this node, or auto = one per visible GPU, 1 without GPU
#                                                    (default $PET_NPROC_PER_NODE or auto)
#   MASTER_ADDR / MASTER_PORT   rendezvous host:port (default 127.0.0.1:29500)
#   RDZV_BACKEND    static | c10d                    (default static)
#   MIXED_PRECISION no | bf16 | fp16      (default: from ACCELERATE_CONFIG, else no);
#                   NOTE pipeline.train passes train.mixed_precision from params.yaml to
#                   Accelerator(), which takes precedence over this launcher setting
#   ACCELERATE_CONFIG  optional accelerate YAML (e.g. for bf16); the topology above
#                   always overrides what it says about machines/processes/rendezvous
#   DDGM_WORKDIR    optional directory to cd into first (outputs: models/, plots/, ...)
#   TRAIN_MODULE    python module to run             (default pipeline.train)
#   DDGM_LAUNCH_DRY_RUN=1   print the command instead of running it
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds the launcher lets ranks checkpoint after a
#                   stop signal before SIGKILL       (default here 300; torch's is 30)
#
# Exit status: the launcher's, except that when this script got SIGTERM/SIGUSR1/SIGUSR2/
# SIGINT/SIGHUP and training then stopped with a non-zero status it exits 75
# (EX_TEMPFAIL: "preempted, checkpoint requested, rerun me"). This is needed because
# torchrun/accelerate turn a rank's exit code 75 into 1. Every stop signal is forwarded
# to the launcher as SIGTERM: its agent passes SIGTERM on to all ranks and waits for them.
set -euo pipefail

NNODES="${NNODES:-${PET_NNODES:-1}}"
NODE_RANK="${NODE_RANK:-${PET_NODE_RANK:-0}}"
NPROC_PER_NODE="${NPROC_PER_NODE:-${PET_NPROC_PER_NODE:-auto}}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_BACKEND="${RDZV_BACKEND:-static}"
MIXED_PRECISION="${MIXED_PRECISION:-}"
TRAIN_MODULE="${TRAIN_MODULE:-pipeline.train}"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}"

if [[ $# -eq 0 ]]; then
  set -- --params params.yaml
fi
if [[ -n "${DDGM_WORKDIR:-}" ]]; then
  mkdir -p "$DDGM_WORKDIR"
  cd "$DDGM_WORKDIR"
fi
if ! [[ "$NNODES" =~ ^[0-9]+$ ]]; then
  echo "launch.sh: NNODES must be an integer (elastic ranges like 1:4 are not supported), got '$NNODES'" >&2
  exit 2
fi

# GPUs this node may use: nvidia-smi's list, narrowed by CUDA_VISIBLE_DEVICES when set
# (an empty CUDA_VISIBLE_DEVICES hides all GPUs).
gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if [[ -n "${CUDA_VISIBLE_DEVICES+set}" && "${CUDA_VISIBLE_DEVICES}" != all ]] && (( gpus > 0 )); then
  IFS=',' read -r -a _visible <<<"$CUDA_VISIBLE_DEVICES"
  gpus=${#_visible[@]}
fi
if [[ "$NPROC_PER_NODE" == auto || "$NPROC_PER_NODE" == gpu ]]; then
  NPROC_PER_NODE=$(( gpus > 0 ? gpus : 1 ))
fi
total=$(( NNODES * NPROC_PER_NODE ))

if (( total > 1 )); then
  cmd=(accelerate launch)
  if [[ -n "${ACCELERATE_CONFIG:-}" ]]; then
    cmd+=(--config_file "$ACCELERATE_CONFIG")
  fi
  # MULTI_GPU (--multi_gpu) selects accelerate's torchrun launcher, the only one that
  # forks several ranks (MULTI_CPU / --cpu start just one); without a GPU the ranks
  # must be told explicitly to use the CPU, then they pick MULTI_CPU with gloo.
  cmd+=(--multi_gpu --num_machines "$NNODES" --num_processes "$total" --machine_rank "$NODE_RANK"
        --rdzv_backend "$RDZV_BACKEND" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"
        --dynamo_backend no)
  if [[ -n "$MIXED_PRECISION" ]]; then
    cmd+=(--mixed_precision "$MIXED_PRECISION")
  fi
  if (( NNODES > 1 )) && [[ "$RDZV_BACKEND" == static ]]; then
    cmd+=(--same_network)
  fi
  if (( gpus == 0 )); then
    export ACCELERATE_USE_CPU=true
  fi
else
  # One process: run it directly (what `accelerate launch` would do, minus a wrapper
  # process that dies on SIGTERM without passing it on). Exit code 75 passes through.
  if [[ -n "$MIXED_PRECISION" ]]; then
    export ACCELERATE_MIXED_PRECISION="$MIXED_PRECISION"
  fi
  cmd=("${PYTHON:-python}")
fi
cmd+=(-m "$TRAIN_MODULE" "$@")

echo "launch.sh: node ${NODE_RANK}/${NNODES}, ${NPROC_PER_NODE} process(es) per node, rendezvous ${MASTER_ADDR}:${MASTER_PORT} (${RDZV_BACKEND})" >&2
if [[ "${DDGM_LAUNCH_DRY_RUN:-0}" == 1 ]]; then
  if [[ "${ACCELERATE_USE_CPU:-}" == true ]]; then
    printf 'ACCELERATE_USE_CPU=true '
  fi
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi

stop_signal=""
child=""
# shellcheck disable=SC2317  # invoked from the traps below
on_signal() {
  stop_signal="$1"
  echo "launch.sh: got SIG$1, asking training to checkpoint and stop" >&2
  if [[ -n "$child" ]]; then
    kill -TERM "$child" 2>/dev/null || true
  fi
}
trap 'on_signal TERM' TERM
trap 'on_signal USR1' USR1
trap 'on_signal USR2' USR2
trap 'on_signal INT' INT
trap 'on_signal HUP' HUP

"${cmd[@]}" &
child=$!
# `wait` returns early (status > 128) whenever a trapped signal arrives: keep waiting
# until the launcher is really gone, then collect its exit status.
while kill -0 "$child" 2>/dev/null; do
  wait "$child" || true
done
rc=0
wait "$child" || rc=$?

if [[ -n "$stop_signal" && $rc -ne 0 ]]; then
  echo "launch.sh: training stopped after SIG${stop_signal} (launcher status ${rc}); exiting 75 = requeue me" >&2
  exit 75
fi
exit "$rc"
