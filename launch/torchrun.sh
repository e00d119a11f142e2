#!/usr/bin/env bash
# Launch rlx RL training with torchrun, on one node or on several.
#
#   launch/torchrun.sh CONFIG.toml [--section.key=value ...]
#
# One node (default): one process per GPU (NPROC_PER_NODE defaults to the number of visible GPUs,
# or 1 without GPUs), rendezvous on a free local port:
#   launch/torchrun.sh train_configs/qwen2.5_0.5b_gsm8k_grpo.toml --train.steps=10
#
# Several nodes: run the same command on every node with NNODES, NODE_RANK (0 on the node at
# MASTER_ADDR, 1..NNODES-1 elsewhere), MASTER_ADDR and MASTER_PORT set:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 launch/torchrun.sh CONFIG.toml   # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 MASTER_PORT=29500 launch/torchrun.sh CONFIG.toml   # on node1
# or, without node ranks, with the elastic c10d rendezvous (what launch/slurm.sbatch uses):
#   RDZV_BACKEND=c10d RDZV_ID=myjob NNODES=2 MASTER_ADDR=node0 launch/torchrun.sh CONFIG.toml  # on each node
#
# Separate generator ranks (generator.placement = "separate"): the same launch; the last
# generator.num_ranks ranks of the world generate, the others train (README "Asynchronous generation").
#
# Environment:
#   NPROC_PER_NODE  processes (= GPUs) per node; default: visible GPUs, else 1
#   NNODES          number of nodes (1)
#   NODE_RANK       this node's rank for the static rendezvous (0)
#   MASTER_ADDR     address of node 0 / the rendezvous host (127.0.0.1; single node: a local port is chosen)
#   MASTER_PORT     its port (29500)
#   RDZV_BACKEND    static (default: NODE_RANK decides ranks) or c10d (ranks assigned at rendezvous)
#   RDZV_ID         job id shared by the nodes of one c10d rendezvous (rlx)
#   PYTHON          interpreter with rlx installed (python3); torchrun runs as `$PYTHON -m torch.distributed.run`
#   RLX_LAUNCH_DRY_RUN=1  print the command instead of running it
set -euo pipefail

usage() {
    sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

[[ $# -ge 1 ]] || usage
CONFIG=$1
shift
case "$CONFIG" in
    -h | --help) usage ;;
esac
if [[ ! -f "$CONFIG" ]]; then
    echo "launch/torchrun.sh: config file '$CONFIG' not found" >&2
    exit 2
fi

# Visible GPUs: CUDA_VISIBLE_DEVICES when set (empty means none), else nvidia-smi's list.
num_gpus() {
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        local ids
        IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"
        echo "${#ids[@]}"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        nvidia-smi -L | grep -c '^GPU'
    else
        echo 0
    fi
}

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$(num_gpus)
    [[ "$NPROC_PER_NODE" -ge 1 ]] || NPROC_PER_NODE=1
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_BACKEND=${RDZV_BACKEND:-static}
PYTHON=${PYTHON:-python3}

# The colocated vLLM engine runs inside the trainer's processes (external_launcher).
export VLLM_ENABLE_V1_MULTIPROCESSING=${VLLM_ENABLE_V1_MULTIPROCESSING:-0}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

cmd=("$PYTHON" -m torch.distributed.run --nproc_per_node="$NPROC_PER_NODE" --max_restarts=0)
if [[ "$NNODES" -eq 1 && -z "${MASTER_ADDR:-}" ]]; then
    cmd+=(--standalone)  # single node: a free local port, no address to agree on
    RDZV_BACKEND=standalone
elif [[ "$RDZV_BACKEND" == "c10d" ]]; then
    : "${MASTER_ADDR:?MASTER_ADDR (the rendezvous host) must be set for RDZV_BACKEND=c10d}"
    cmd+=(--nnodes="$NNODES" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT"
        --rdzv_id="${RDZV_ID:-rlx}")
elif [[ "$RDZV_BACKEND" == "static" ]]; then
    cmd+=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="${MASTER_ADDR:-127.0.0.1}"
        --master_port="$MASTER_PORT")
else
    echo "launch/torchrun.sh: RDZV_BACKEND must be static or c10d, got '$RDZV_BACKEND'" >&2
    exit 2
fi
cmd+=(-m rlx.train --config "$CONFIG" "$@")

echo "launch/torchrun.sh: $(hostname) nnodes=$NNODES nproc_per_node=$NPROC_PER_NODE rdzv=$RDZV_BACKEND" >&2
if [[ "${RLX_LAUNCH_DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
