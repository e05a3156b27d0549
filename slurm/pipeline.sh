#!/usr/bin/env bash
# Submit the whole pipeline: shards (train and val, each an array plus a merge), then
# training, then evaluation, chained with --dependency=afterok. Prints the job ids and the
# MLflow run to look at. Run it on a login node from anywhere:
#
#   GPUS_PER_NODE=8 NODES=4 PARTITION=gpu \
#   TRAIN_ANNOTATIONS=data/coco/annotations/instances_train2017.json TRAIN_IMAGES=data/coco/train2017 \
#   VAL_ANNOTATIONS=data/coco/annotations/instances_val2017.json VAL_IMAGES=data/coco/val2017 \
#       slurm/pipeline.sh --config configs/coco_r50_fpn_1x.yaml
#   GPUS_PER_NODE=0 NPROC_PER_NODE=2 slurm/pipeline.sh --config configs/tiny.yaml train.max_steps=20
#   slurm/pipeline.sh --dry-run --config ...     # print the sbatch commands, submit nothing
#
# Every setting is an environment variable; slurm/README.md lists them. The config (and its
# key=value overrides) gives the shards (data.*_shards), the output directory and the MLflow
# experiment; the sources default to data.root's annotations/instances_{train,val}.json and
# images/{train,val} (make_shapes' layout): set TRAIN_/VAL_ANNOTATIONS and _IMAGES for others.
set -euo pipefail

REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
cd "$REPO_DIR"  # the config's relative paths are relative to the repository, as in the jobs
PYTHON=${PYTHON:-$REPO_DIR/.venv/bin/python}
[[ -x "$PYTHON" ]] || PYTHON=$(command -v python3)

DRY_RUN=0
CONFIG_ARGS=()
for arg in "$@"; do
    case $arg in
        --dry-run) DRY_RUN=1 ;;
        -h | --help) sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) CONFIG_ARGS+=("$arg") ;;
    esac
done
if ((${#CONFIG_ARGS[@]} == 0)); then
    echo "usage: slurm/pipeline.sh [--dry-run] --config FILE [key=value ...]" >&2
    exit 2
fi
# Before anything is read or created: without sbatch the first submission would fail after
# the log folder exists, with bash's "command not found".
if ((!DRY_RUN)) && ! command -v sbatch >/dev/null; then
    echo "slurm/pipeline.sh: error: sbatch is not on the PATH: run it where Slurm is (a login" \
        "node), or add --dry-run to print the sbatch commands" >&2
    exit 2
fi

# --- what the config says ------------------------------------------------------------------------
mapfile -t VALUES < <("$PYTHON" slurm/config_value.py \
    train.output_dir,data.root,data.train_shards,data.val_shards,tracking.experiment,tracking.run_name,tracking.uri \
    "${CONFIG_ARGS[@]}")
if ((${#VALUES[@]} != 7)); then
    echo "error: could not read the config ${CONFIG_ARGS[*]}" >&2
    exit 2
fi
abspath() { [[ "$1" == /* ]] && echo "$1" || echo "$REPO_DIR/$1"; }
OUT=$(abspath "${VALUES[0]}")
DATA_ROOT=$(abspath "${DATA_ROOT:-${VALUES[1]}}")
TRAIN_SHARDS=$(abspath "${VALUES[2]}")
VAL_SHARDS=$(abspath "${VALUES[3]}")
EXPERIMENT=${VALUES[4]}
RUN_NAME=${VALUES[5]:-${RUN_NAME:-$(basename "$OUT")-$(date +%Y%m%d-%H%M%S)}}
TRACKING_URI=${VALUES[6]}

# --- settings (see slurm/README.md) --------------------------------------------------------------
export GPUS_PER_NODE=${GPUS_PER_NODE:-8}
if ((GPUS_PER_NODE > 0)); then NPROC_PER_NODE=${NPROC_PER_NODE:-$GPUS_PER_NODE}; fi
export NPROC_PER_NODE=${NPROC_PER_NODE:-1}
export LAUNCHER=${LAUNCHER:-torchrun}
export REPO_DIR PYTHON
NODES=${NODES:-1}
EVAL_NODES=${EVAL_NODES:-1}
if ((GPUS_PER_NODE > 0)); then CPUS_PER_PROC=${CPUS_PER_PROC:-8}; else CPUS_PER_PROC=${CPUS_PER_PROC:-1}; fi
SHARD_JOBS=${SHARD_JOBS:-4}
VAL_SHARD_JOBS=${VAL_SHARD_JOBS:-$SHARD_JOBS}
SHARD_CPUS=${SHARD_CPUS:-4}
SHARD_SIZE=${SHARD_SIZE:-1000}
TRAIN_ANNOTATIONS=${TRAIN_ANNOTATIONS:-$DATA_ROOT/annotations/instances_train.json}
TRAIN_IMAGES=${TRAIN_IMAGES:-$DATA_ROOT/images/train}
VAL_ANNOTATIONS=${VAL_ANNOTATIONS:-$DATA_ROOT/annotations/instances_val.json}
VAL_IMAGES=${VAL_IMAGES:-$DATA_ROOT/images/val}
LOG_DIR=${LOG_DIR:-$OUT/slurm}
# One MLflow store for every stage: the config's tracking.uri, else MLFLOW_TRACKING_URI, else
# a SQLite file in the output directory (what training alone would use too).
if [[ -z "$TRACKING_URI" ]]; then
    export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$OUT/mlflow.db}
    TRACKING_URI=$MLFLOW_TRACKING_URI
fi

# Options of every job: where it runs, under which account, where its log goes.
# --kill-on-invalid-dep: when a stage fails, the stages after it are cancelled instead of
# waiting forever (DependencyNeverSatisfied).
COMMON=(--parsable --export=ALL --chdir="$REPO_DIR" --kill-on-invalid-dep=yes)
[[ -n "${PARTITION:-}" ]] && COMMON+=(--partition="$PARTITION")
[[ -n "${ACCOUNT:-}" ]] && COMMON+=(--account="$ACCOUNT")
[[ -n "${QOS:-}" ]] && COMMON+=(--qos="$QOS")
# shellcheck disable=SC2206  # SBATCH_ARGS is a list of options, e.g. "--constraint=a100"
COMMON+=(${SBATCH_ARGS:-})

# Resources of the train and eval jobs: one task per node (torchrun) or per process (srun).
stage_resources() {  # stage_resources NODES
    local per_node=$((NPROC_PER_NODE * CPUS_PER_PROC))
    if [[ "$LAUNCHER" == srun ]]; then
        echo "--nodes=$1 --ntasks-per-node=$NPROC_PER_NODE --cpus-per-task=$CPUS_PER_PROC"
    else
        echo "--nodes=$1 --ntasks-per-node=1 --cpus-per-task=$per_node"
    fi
    if ((GPUS_PER_NODE > 0)); then echo "--gpus-per-node=$GPUS_PER_NODE"; fi
}

FAKE_ID=1000
SUMMARY=()
submit() {  # submit NAME SBATCH_ARGS...: submits, sets JOB to the new job's id
    local name=$1 log="%x-%j.out"
    shift
    if [[ "$*" == *--array=* ]]; then log="%x-%A_%a.out"; fi
    if ((DRY_RUN)); then
        JOB=$((FAKE_ID++))
        echo "sbatch ${COMMON[*]@Q} --job-name=$name --output=$LOG_DIR/$log ${*@Q}"
    else
        JOB=$(sbatch "${COMMON[@]}" --job-name="$name" --output="$LOG_DIR/$log" "$@")
        JOB=${JOB%%;*}  # --parsable prints "id" or "id;cluster"
    fi
    SUMMARY+=("$name $JOB")
}

submit_shards() {  # submit_shards SPLIT ANNOTATIONS IMAGES OUT TASKS [AFTER]: sets JOB to the
    # job that writes the manifest (the merge, or a one-task array itself)
    local split=$1 tasks=$5 after=${6:-}
    local args=(--annotations "$2" --images "$3" --out "$4" --shard-size "$SHARD_SIZE"
        --experiment "$EXPERIMENT")
    local time=--time=${SHARD_TIME:-04:00:00}
    if ((tasks == 1)); then
        submit "shards-$split" ${after:+--dependency=afterok:$after} --cpus-per-task="$SHARD_CPUS" \
            "$time" slurm/build_shards.sbatch "${args[@]}"
        return
    fi
    submit "shards-$split" --array="0-$((tasks - 1))" --cpus-per-task="$SHARD_CPUS" "$time" \
        slurm/build_shards.sbatch "${args[@]}"
    submit "merge-$split" --dependency="afterok:$JOB${after:+:$after}" --cpus-per-task=1 "$time" \
        slurm/build_shards.sbatch --merge-only "${args[@]}"
}

((DRY_RUN)) || mkdir -p "$LOG_DIR"
AFTER_SHARDS=()
if [[ "${SKIP_SHARDS:-0}" != 1 ]]; then
    submit_shards train "$TRAIN_ANNOTATIONS" "$TRAIN_IMAGES" "$TRAIN_SHARDS" "$SHARD_JOBS"
    TRAIN_SHARDS_JOB=$JOB
    # The val manifest waits for the train manifest: two first writers of a new SQLite
    # MLflow store at once can collide.
    submit_shards val "$VAL_ANNOTATIONS" "$VAL_IMAGES" "$VAL_SHARDS" "$VAL_SHARD_JOBS" "$JOB"
    AFTER_SHARDS=(--dependency="afterok:$TRAIN_SHARDS_JOB:$JOB")
fi
# shellcheck disable=SC2046  # word splitting of the resource options is intended
submit train "${AFTER_SHARDS[@]}" $(stage_resources "$NODES") --time="${TRAIN_TIME:-24:00:00}" \
    slurm/train.sbatch "${CONFIG_ARGS[@]}" "tracking.run_name=$RUN_NAME"
TRAIN=$JOB
if [[ "${WATCH_EVAL:-0}" == 1 ]]; then  # beside training, once it has started
    EVAL_WHAT=(--dependency="after:$TRAIN" slurm/eval.sbatch --watch "$OUT")
else
    EVAL_WHAT=(--dependency="afterok:$TRAIN" slurm/eval.sbatch --checkpoint "$OUT")
fi
# shellcheck disable=SC2046
submit eval $(stage_resources "$EVAL_NODES") --time="${EVAL_TIME:-04:00:00}" \
    "${EVAL_WHAT[@]}" --out "$OUT/eval" "${CONFIG_ARGS[@]}"

echo "jobs (name id):"
printf '  %s\n' "${SUMMARY[@]}"
echo "logs:   $LOG_DIR/"
echo "output: $OUT"
echo "mlflow: experiment '$EXPERIMENT', run '$RUN_NAME' at $TRACKING_URI"
echo "        (its run id is in $OUT/run.json once training has started;"
echo "        mlflow ui --backend-store-uri $TRACKING_URI)"
