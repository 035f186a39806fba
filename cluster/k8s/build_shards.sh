#!/bin/bash
# The container command of the build-shards Jobs (cluster/k8s/build-shards.yaml):
#
#   cluster/k8s/build_shards.sh INPUT --output OUT [build-shards options]
#
# In a pod of the indexed Job it builds part JOB_COMPLETION_INDEX (set by Kubernetes) of NUM_PARTS with WORKERS
# encoding processes. In the one-pod Job applied after it, which has no completion index, it is the finalize step:
# build-shards checks that all NUM_PARTS parts are complete and were built with the same options, then writes
# index.json, classes.json and errors.jsonl for the whole dataset.
# One part is the whole build (build-shards without --num-parts), which writes index.json itself: its finalize step
# has nothing left to do. A retried pod (failed, evicted) continues its part after the shards it had committed:
# build-shards resumes on its own.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: cluster/k8s/build_shards.sh INPUT --output OUT [build-shards options]" >&2
    exit 2
fi
num_parts=${NUM_PARTS:?set NUM_PARTS, the number of parts}
python=${PYTHON:-python}

# exec: build-shards becomes the container's main process, so the SIGTERM of an eviction reaches it (bash as PID 1
# would neither act on it nor pass it on) and it stops cleanly within the grace period.
if [ -z "${JOB_COMPLETION_INDEX:-}" ]; then
    if [ "$num_parts" -eq 1 ]; then
        echo "one part, built whole with its index.json; nothing to finalize"
        exit 0
    fi
    echo "finalizing the build of $num_parts parts"
    exec "$python" -m data_pipeline.build.cli "$@" --num-parts "$num_parts" --finalize
fi
workers=${WORKERS:-1}
echo "part $JOB_COMPLETION_INDEX of $num_parts, $workers worker(s)"
if [ "$num_parts" -gt 1 ]; then
    set -- "$@" --num-parts "$num_parts" --part "$JOB_COMPLETION_INDEX"
fi
exec "$python" -m data_pipeline.build.cli --workers "$workers" "$@"
