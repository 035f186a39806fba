#!/bin/bash
# The container command of every pod: one torchrun per pod (node), one training process per GPU.
#
#   cluster/k8s/launch.sh CONFIG [--set key=value ...]
#
# The node count, this pod's node rank and the rendezvous address come from the environment the orchestrator sets:
# - Kubeflow PyTorchJob (training operator): PET_NNODES, PET_NODE_RANK, PET_NPROC_PER_NODE, MASTER_ADDR and
#   MASTER_PORT (the master pod's service), injected into every replica;
# - JobSet / Kubernetes indexed Jobs: NNODES, GPUS_PER_NODE and MASTER_ADDR from the manifest (cluster.render
#   fills them in), the node rank from JOB_COMPLETION_INDEX.
# After a restart (pod preempted or failed, restarted by the operator's policy) pretrain/run.py resumes from the
# newest checkpoint, which must be on storage that outlives the pod (checkpoint.dir on s3:// or a volume).
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: cluster/k8s/launch.sh CONFIG [--set key=value ...]" >&2
    exit 2
fi
config=$1
shift

nnodes=${PET_NNODES:-${NNODES:?set PET_NNODES (PyTorchJob) or NNODES}}
node_rank=${PET_NODE_RANK:-${JOB_COMPLETION_INDEX:?set PET_NODE_RANK (PyTorchJob) or JOB_COMPLETION_INDEX}}
nproc_per_node=${PET_NPROC_PER_NODE:-${GPUS_PER_NODE:-1}}
master_addr=${MASTER_ADDR:?set MASTER_ADDR}
master_port=${MASTER_PORT:-29500}
python=${PYTHON:-python}

echo "node $node_rank of $nnodes: $nproc_per_node process(es), rendezvous $master_addr:$master_port"
exec "$python" -m torch.distributed.run --nnodes "$nnodes" --node_rank "$node_rank" \
    --nproc_per_node "$nproc_per_node" --master_addr "$master_addr" --master_port "$master_port" \
    pretrain/run.py --config "$config" --resume auto "$@"
