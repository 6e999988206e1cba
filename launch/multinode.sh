#!/usr/bin/env bash
# Several machines: run this once on every node; torchrun's agents meet at a c10d or etcd
# rendezvous (or, with NODE_RANK, a static one) and start NPROC_PER_NODE trainer processes each.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if wants_help "$@"; then
  cat <<HELP
usage: launch/multinode.sh [TRAINER_ARGS...]     (once per node)

c10d rendezvous (elastic; nodes may join, leave and restart, except the one that hosts it):
  RDZV_ENDPOINT=node0:29400 NNODES=2 launch/multinode.sh --run-dir /shared/runs/job1
etcd rendezvous (elastic; any node may be lost, the first one too; needs python-etcd):
  RDZV_BACKEND=etcd-v2 RDZV_ENDPOINT=etcdhost:2379 RDZV_ID=job1 NNODES=2:4 launch/multinode.sh ...
static rendezvous (fixed nodes, each told its rank):
  NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 NNODES=2 launch/multinode.sh ...

environment:
  NNODES          nodes: N, or MIN:MAX for an elastic job (default 1)
  NPROC_PER_NODE  trainer processes per node (default: the CPUs available, here $(cpu_count))
  RDZV_BACKEND    c10d (default): the rendezvous lives on the node RDZV_ENDPOINT names, and the
                  job ends if that node is lost; etcd-v2: it lives in an etcd server (v2 API,
                  etcd --enable-v2) outside the job, and the job survives losing any node
  RDZV_ENDPOINT   host:port of the rendezvous, the same on every node: under c10d, the node
                  whose address it names hosts it (port 0 picks a free one: single node only);
                  under etcd-v2, the etcd server's client address
  RDZV_ID         job id, the same on every node (default trainer); under etcd-v2 it names the
                  job's keys, so two jobs on one etcd need different ids
  RDZV_CONF       extra rendezvous settings, e.g. join_timeout=900,last_call_timeout=30;
                  is_host=true on the node named by RDZV_ENDPOINT when that name is an address
                  torchrun does not recognise as its own (it compares with the host name)
  NODE_RANK       static rendezvous instead: this node's index 0..NNODES-1 (needs MASTER_ADDR)
  MASTER_ADDR     static rendezvous: node 0's address
  MASTER_PORT     static rendezvous: free port on node 0 (default 29500)
  MAX_RESTARTS    worker group restarts after a failure or a membership change (default 3)
  LOCAL_ADDR      this node's address as the others reach it (default: torchrun looks it up)
  PYTHON          interpreter (default: python3 from PATH)
  TORCHRUN        launcher command (default: "\$PYTHON -m trainer.distributed.agent", which is
                  torchrun but ends with one line when the rendezvous is lost)

Trainer options: \$PYTHON -m trainer --help
HELP
  exit 0
fi

# torchrun itself, except that an agent whose rendezvous is lost ends with one line that says so.
[[ -n ${TORCHRUN:-} ]] || TORCHRUN_CMD=("$PYTHON" -m trainer.distributed.agent)

NNODES=${NNODES:-1}
[[ $NNODES =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]] || die "NNODES='$NNODES' must be a node count like 2, or MIN:MAX like 1:4"
if [[ $NNODES == *:* ]] && ((${NNODES%:*} > ${NNODES#*:})); then
  die "NNODES=$NNODES has MIN above MAX"
fi
NPROC_PER_NODE=${NPROC_PER_NODE:-$(cpu_count)}
require_int NPROC_PER_NODE 1
MAX_RESTARTS=${MAX_RESTARTS:-3}
require_int MAX_RESTARTS 0

args=(--nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" --max-restarts="$MAX_RESTARTS")
if [[ -n ${NODE_RANK:-} ]]; then
  [[ $NNODES != *:* ]] || die "NODE_RANK (static rendezvous) needs a fixed NNODES, not $NNODES; use RDZV_ENDPOINT"
  require_int NODE_RANK 0 $((NNODES - 1))
  [[ -n ${MASTER_ADDR:-} ]] || die "NODE_RANK is set but MASTER_ADDR is not; export node 0's address"
  MASTER_PORT=${MASTER_PORT:-29500}
  require_int MASTER_PORT 1 65535
  args+=(--node-rank="$NODE_RANK" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT")
else
  [[ -n ${RDZV_ENDPOINT:-} ]] || die "set RDZV_ENDPOINT=host:port (c10d rendezvous on one node's address, or etcd's with RDZV_BACKEND=etcd-v2), or NODE_RANK with MASTER_ADDR (static)"
  [[ $RDZV_ENDPOINT =~ ^[^:]+:[0-9]+$ || $RDZV_ENDPOINT =~ ^\[.+\]:[0-9]+$ ]] ||
    die "RDZV_ENDPOINT='$RDZV_ENDPOINT' must be host:port, e.g. node0:29400"
  RDZV_BACKEND=${RDZV_BACKEND:-c10d}
  case $RDZV_BACKEND in
    c10d) ;;
    etcd-v2)
      # The workers' process group meets at a store on the node of rank 0. By default torchrun
      # keeps that store inside the agent that first held rank 0 and lets the other agents reuse
      # its address in later rounds, so losing that node would leave them knocking at a dead
      # address; with sharing off, every round's rank 0 opens a fresh store and says where.
      export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
      "$PYTHON" -c 'import etcd' 2>/dev/null ||
        die "RDZV_BACKEND=etcd-v2 needs the python-etcd package (pip install 'trainer[etcd]')"
      ;;
    *) die "RDZV_BACKEND='$RDZV_BACKEND' must be c10d or etcd-v2" ;;
  esac
  args+=(--rdzv-backend="$RDZV_BACKEND" --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-trainer}")
  [[ -z ${RDZV_CONF:-} ]] || args+=(--rdzv-conf="$RDZV_CONF")
fi
[[ -z ${LOCAL_ADDR:-} ]] || args+=(--local-addr="$LOCAL_ADDR")

exec "${TORCHRUN_CMD[@]}" "${args[@]}" -m trainer "$@"
