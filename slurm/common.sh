# Shared by the sbatch scripts (sourced, not run): where the code is, which Python, how many
# processes per node, and how to start a stage on every node of the job and forward signals
# to it. Every setting comes from the environment; see slurm/README.md.

set -euo pipefail

# sbatch runs a copy of the script from its spool directory, so the repository cannot be
# found from $0: it is REPO_DIR, else the directory the job was submitted from.
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
if [[ ! -f "$REPO_DIR/slurm/common.sh" ]]; then
    echo "error: REPO_DIR=$REPO_DIR is not the repository root; submit from there or set REPO_DIR" >&2
    exit 2
fi
cd "$REPO_DIR"
PYTHON=${PYTHON:-$REPO_DIR/.venv/bin/python}
[[ -x "$PYTHON" ]] || PYTHON=$(command -v python3)
export REPO_DIR PYTHON PYTHONUNBUFFERED=1

# --- processes per node ------------------------------------------------------------------------
# GPUS_PER_NODE: what the job asked for (pipeline.sh passes --gpus-per-node), else what Slurm
# allocated. 0 runs on the CPU with gloo, and hides any GPU so that nothing picks NCCL.
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    if ((GPUS_PER_NODE > 0)); then NPROC_PER_NODE=$GPUS_PER_NODE; else NPROC_PER_NODE=1; fi
fi
if ((GPUS_PER_NODE == 0)); then export CUDA_VISIBLE_DEVICES=""; fi
NNODES=${SLURM_JOB_NUM_NODES:-1}
# torchrun: one srun task per node starts NPROC_PER_NODE workers (elastic agent, c10d).
# srun: one srun task per process; pipeline/distributed.py reads SLURM_PROCID and friends.
LAUNCHER=${LAUNCHER:-torchrun}
# Seconds torchrun's agent gives its workers to checkpoint after a forwarded signal before it
# kills them. Keep it below the lead time of `#SBATCH --signal` (and of a preemption's grace).
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-240}
export GPUS_PER_NODE NPROC_PER_NODE NNODES LAUNCHER SHUTDOWN_TIMEOUT

first_host() {  # the first host of the job's node list; rank 0 and the rendezvous live there
    local nodelist=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-$(hostname -s)}} host
    host=$(scontrol show hostnames "$nodelist" 2>/dev/null | head -n 1 || true)
    if [[ -z "$host" ]]; then  # no scontrol here: the project's own parser
        host=$("$PYTHON" -c 'import sys; from pipeline.distributed import expand_hostlist
print(expand_hostlist(sys.argv[1])[0])' "$nodelist")
    fi
    echo "$host"
}
MASTER_HOST=${MASTER_HOST:-$(first_host)}
# The same per-job port as pipeline.distributed.port_for_job: two jobs on a node rarely meet.
RDZV_PORT=${RDZV_PORT:-$((10000 + ${SLURM_JOB_ID:-0} % 20000))}
export MASTER_HOST RDZV_PORT

config_value() {  # config_value KEYS CONFIG_ARGS...: resolved values, one a line
    "$PYTHON" "$REPO_DIR/slurm/config_value.py" "$@"
}

# --- start a stage and pass signals on -----------------------------------------------------------
STAGE_PID=""
STAGE_SIGNAL=""

run_stage() {  # run_stage SCRIPT ARGS...: start SCRIPT on all nodes in the background
    local tasks cpus
    if [[ "$LAUNCHER" == srun ]]; then tasks=$NPROC_PER_NODE; else tasks=1; fi
    cpus=$((${SLURM_CPUS_ON_NODE:-1} / tasks))
    ((cpus >= 1)) || cpus=1
    echo "$(date '+%F %T') ${SLURM_JOB_ID:-}: $LAUNCHER on $NNODES node(s) x $NPROC_PER_NODE" \
        "process(es), $GPUS_PER_NODE GPU(s) per node, rank 0 on $MASTER_HOST:" "$@"
    # shellcheck disable=SC2086  # SRUN_ARGS is a list of options
    if [[ "$LAUNCHER" == srun ]]; then
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$cpus}
        srun --nodes="$NNODES" --ntasks-per-node="$NPROC_PER_NODE" --cpus-per-task="$cpus" \
            --kill-on-bad-exit=1 ${SRUN_ARGS:-} "$PYTHON" "$@" &
    elif [[ "$LAUNCHER" == torchrun ]]; then
        srun --nodes="$NNODES" --ntasks-per-node=1 --cpus-per-task="$cpus" \
            --kill-on-bad-exit=1 ${SRUN_ARGS:-} bash "$REPO_DIR/slurm/torchrun_node.sh" "$@" &
    else
        echo "error: LAUNCHER=$LAUNCHER; use torchrun or srun" >&2
        exit 2
    fi
    STAGE_PID=$!
}

forward_signal() {  # the batch shell got SIG$1: pass it to every task of the stage
    STAGE_SIGNAL=$1
    echo "$(date '+%F %T') ${SLURM_JOB_ID:-}: batch shell got SIG$1; forwarding it to the stage" >&2
    # srun passes the signal on to its tasks: the python processes (LAUNCHER=srun) or the
    # torchrun agents, which forward it to their workers because torchrun_node.sh lists it in
    # --signals-to-handle. (A signal outside that list would kill the agent and orphan them.)
    if [[ -n "$STAGE_PID" ]]; then kill -s "$1" "$STAGE_PID" 2>/dev/null || true; fi
}
trap 'forward_signal USR1' USR1
trap 'forward_signal TERM' TERM

wait_stage() {  # wait for the stage through any signals; its exit status in STAGE_RC
    STAGE_RC=0
    while true; do
        wait "$STAGE_PID" && STAGE_RC=0 || STAGE_RC=$?
        # a trapped signal interrupts `wait` (status > 128) while the stage still runs
        kill -0 "$STAGE_PID" 2>/dev/null || break
    done
    echo "$(date '+%F %T') ${SLURM_JOB_ID:-}: stage exited with $STAGE_RC"
}

requeue_job() {  # put this job back in the queue; Slurm keeps its id, environment and log
    local restarts=${SLURM_RESTART_COUNT:-0}
    if ((restarts >= ${MAX_REQUEUES:-20})); then
        echo "error: requeued $restarts times already (MAX_REQUEUES=${MAX_REQUEUES:-20}); giving up" >&2
        exit 75
    fi
    echo "$(date '+%F %T') ${SLURM_JOB_ID:-}: requeueing (restart $((restarts + 1)))"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}
