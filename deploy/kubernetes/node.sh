#!/bin/bash
# One worker pod of deploy/kubernetes/pytorchjob.yaml, run from the repository on the shared volume.
#
# Worker 0 drives DVC (pull, repro stage by stage, push); DVC runs each GPU stage as
# `python -m vlmpipe.loop.launch stages/<stage>.py`, which joins the c10d rendezvous at launch.rdzv_endpoint.
# The other workers must join the same stages, and only those: a stage DVC skips (up to date) has no
# rendezvous, and a worker waiting in one would time out. So worker 0 decides each GPU stage just before
# running it (`dvc status`) and writes the decision to a file on the shared volume; the others read it and
# run their share with `python -m vlmpipe.loop.launch --node`.
#
# Environment (pytorchjob.yaml): PET_RDZV_ENDPOINT, PET_NNODES ("min:max"), PET_NPROC_PER_NODE from the
# training operator; POD_UID (downward API); VLMPIPE_SYNC_DIR, a folder on the shared volume.
set -euo pipefail
cd "$(dirname "$0")/../.."

# The stages dvc.yaml runs through vlmpipe.loop.launch, in DAG order (checked against dvc.yaml below).
STAGES="train_siglip precompute_embeddings train_phi2_qlora train_gpt2_captioner train_gpt2_chat"
SYNC=$VLMPIPE_SYNC_DIR
NODES=${PET_NNODES##*:}
INDEX=${HOSTNAME##*-}          # pods are named <job>-worker-<index>
mkdir -p "$SYNC"

fail() { echo "node.sh: $*" >&2; exit 2; }

if [ "$INDEX" = 0 ]; then
    # Files of an earlier run of this job. Only worker 0 writes these; the others write hello-* only.
    rm -f "$SYNC"/ack-* "$SYNC"/decision-* "$SYNC/done" "$SYNC/failed"
    touch "$SYNC/start"
    trap '[ -e "$SYNC/done" ] || touch "$SYNC/failed"' EXIT

    # Handshake: each other worker keeps writing its pod UID to hello-<i> until acknowledged. Only a hello
    # written after this run's start counts, and a worker only trusts an ack holding its own UID, so no
    # file left by an earlier run is ever taken for this one's.
    for i in $(seq 1 $((NODES - 1))); do
        until [ "$SYNC/hello-$i" -nt "$SYNC/start" ]; do sleep 2; done
        cp "$SYNC/hello-$i" "$SYNC/ack-$i"
    done

    # The launchers read nnodes, nproc_per_node and the endpoint from params.yaml (shared by all pods);
    # they must say what this job is. One line if not.
    python - "$NODES" "$PET_NPROC_PER_NODE" "$PET_RDZV_ENDPOINT" "$STAGES" <<'PY'
import sys
import yaml
nodes, nproc, endpoint, stages = sys.argv[1:]
launch = (yaml.safe_load(open("params.yaml")) or {}).get("launch") or {}
want = {"nnodes": int(nodes), "nproc_per_node": int(nproc), "rdzv_endpoint": endpoint, "fanout": "none"}
bad = [f"launch.{k} is {launch.get(k)!r}, this job needs {v!r}" for k, v in want.items() if launch.get(k) != v]
if bad:
    sys.exit("node.sh: params.yaml: " + "; ".join(bad) + " (set them in the checkout on the volume)")
found = [s for s, d in yaml.safe_load(open("dvc.yaml"))["stages"].items() if "vlmpipe.loop.launch" in d.get("cmd", "")]
if found != stages.split():
    sys.exit(f"node.sh: dvc.yaml runs {found} through vlmpipe.loop.launch; STAGES in node.sh says {stages.split()}")
PY

    dvc pull --allow-missing                      # a fresh volume: what earlier runs pushed
    # CPU stages, this pod only: the data, the conversations and the QA base the GPU stages read.
    dvc repro download_coco build_cifar_qa_csv build_conversations prepare_qa_base
    for s in $STAGES; do
        # Exactly what `dvc repro --single-item` is about to decide: its upstream stages are done by now.
        if [ "$(dvc status --json "$s")" = "{}" ]; then d=skip; else d=run; fi
        echo "$d" > "$SYNC/decision-$s.tmp" && mv "$SYNC/decision-$s.tmp" "$SYNC/decision-$s"
        if [ "$d" = run ]; then dvc repro --single-item "$s"; fi
    done
    dvc repro                                     # the evaluations, report, explore_data: one process each
    dvc push
    touch "$SYNC/done"
else
    until [ "$(cat "$SYNC/ack-$INDEX" 2>/dev/null)" = "$POD_UID" ]; do
        echo "$POD_UID" > "$SYNC/hello-$INDEX"
        sleep 2
    done
    wait_for() {
        until [ -e "$SYNC/$1" ]; do
            [ ! -e "$SYNC/failed" ] || fail "worker 0 stopped with an error (its log says why)"
            sleep 2
        done
    }
    for s in $STAGES; do
        wait_for "decision-$s"
        if [ "$(cat "$SYNC/decision-$s")" = run ]; then
            python -m vlmpipe.loop.launch --node --rdzv-endpoint "$PET_RDZV_ENDPOINT" "stages/$s.py"
        fi
    done
    # Stay until worker 0 has evaluated and pushed: the operator marks an elastic job Succeeded as soon
    # as any worker exits successfully.
    wait_for done
fi
