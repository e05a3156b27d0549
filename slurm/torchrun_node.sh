#!/usr/bin/env bash
# One srun task per node runs this (see run_stage in common.sh): torchrun starts the node's
# NPROC_PER_NODE workers and joins the other nodes by c10d rendezvous on MASTER_HOST.
# Usage (by run_stage only): torchrun_node.sh SCRIPT ARGS...
set -euo pipefail

# The first node of the job (SLURM_NODEID 0, the first host of the node list: MASTER_HOST)
# hosts the rendezvous store. Said explicitly, because torchrun's own guess compares host
# names and addresses, which fails where a node's name resolves to another address.
if [[ "${SLURM_NODEID:-0}" == 0 ]]; then is_host=1; else is_host=0; fi

# --signals-to-handle: the agent forwards these to its workers. SIGUSR1 is the checkpoint-and-
# requeue signal of train.sbatch; outside this list it would kill the agent and orphan the
# workers. --shutdown-timeout: how long the workers get to checkpoint before SIGKILL.
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --nproc-per-node="$NPROC_PER_NODE" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$MASTER_HOST:$RDZV_PORT" \
    --rdzv-id="${SLURM_JOB_ID:-local}" \
    --rdzv-conf="is_host=$is_host" \
    --max-restarts="${MAX_RESTARTS:-0}" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --shutdown-timeout="$SHUTDOWN_TIMEOUT" \
    ${TORCHRUN_ARGS:-} \
    "$@"
