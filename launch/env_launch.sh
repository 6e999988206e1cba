#!/usr/bin/env bash
# No torchrun: export the trainer's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
# MASTER_ADDR, MASTER_PORT) and start the processes here. Two modes:
#   all ranks on this machine:  NPROC=2 launch/env_launch.sh [TRAINER_ARGS...]
#   one rank (per terminal/node): RANK=1 WORLD_SIZE=2 MASTER_ADDR=node0 MASTER_PORT=29500 launch/env_launch.sh ...
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if wants_help "$@"; then
  cat <<HELP
usage: launch/env_launch.sh [TRAINER_ARGS...]

Without RANK: starts NPROC ranks of "\$PYTHON -m trainer TRAINER_ARGS" on this machine, prefixes
each output line with its rank, forwards SIGINT/SIGTERM to all of them, and if one fails stops
the others (SIGTERM, then SIGKILL after STOP_GRACE seconds) and exits with its status.
With RANK: runs that one rank in the foreground (start one per terminal or node).

environment:
  NPROC             ranks to start without RANK (default: the CPUs available, here $(cpu_count))
  RANK              this process's rank, 0..WORLD_SIZE-1: one-rank mode
  WORLD_SIZE        total processes in the job (needed with RANK; default NPROC otherwise)
  LOCAL_RANK        with RANK: index on this node (default 0)
  LOCAL_WORLD_SIZE  with RANK: processes on this node (default 1)
  MASTER_ADDR       address of rank 0's host (default 127.0.0.1)
  MASTER_PORT       free TCP port on rank 0's host (default: a free one below the ephemeral
                    range without RANK, else 29500)
  STOP_GRACE        seconds a stopped rank gets to checkpoint before SIGKILL (default 30)
  PYTHON            interpreter (default: python3 from PATH)

Trainer options: \$PYTHON -m trainer --help
HELP
  exit 0
fi

export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
[[ -n $MASTER_ADDR ]] || die "MASTER_ADDR is empty; export the address of rank 0's host"

if [[ -n ${RANK:-} ]]; then
  [[ -n ${WORLD_SIZE:-} ]] || die "RANK is set but WORLD_SIZE is not; export the total number of processes"
  require_int WORLD_SIZE 1
  require_int RANK 0 $((WORLD_SIZE - 1))
  export MASTER_PORT=${MASTER_PORT:-29500} LOCAL_RANK=${LOCAL_RANK:-0} LOCAL_WORLD_SIZE=${LOCAL_WORLD_SIZE:-1}
  require_int MASTER_PORT 1 65535
  exec "$PYTHON" -m trainer "$@"
fi

((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 501)) || die "starting several ranks needs bash 5.1 or newer (wait -p)"
command -v setsid >/dev/null || die "starting several ranks needs setsid (util-linux)"
NPROC=${NPROC:-$(cpu_count)}
require_int NPROC 1
if [[ -n ${WORLD_SIZE:-} && $WORLD_SIZE != "$NPROC" ]]; then
  die "WORLD_SIZE=$WORLD_SIZE but NPROC=$NPROC ranks would start here; set RANK to start one rank, or NPROC"
fi
# A program that picks the same port in the seconds before rank 0 binds it still wins; the
# trainer then says so in one line.
MASTER_PORT=${MASTER_PORT:-$(quiet_port)}
[[ -n $MASTER_PORT ]] || die "found no free port for the rendezvous; export MASTER_PORT"
require_int MASTER_PORT 1 65535
STOP_GRACE=${STOP_GRACE:-30}
require_int STOP_GRACE 0
export MASTER_PORT WORLD_SIZE=$NPROC LOCAL_WORLD_SIZE=$NPROC
echo "${0##*/}: starting $NPROC ranks, rendezvous at $MASTER_ADDR:$MASTER_PORT" >&2

# Each rank runs in a session of its own (setsid, which execs in place: a child of this script
# leads no process group), so a Ctrl-C reaches it once, through the trap below, and not also
# straight from the terminal. The output prefixers ignore INT/TERM:
# they must outlive their rank to pass on its last words.
declare -A rank_of=()
for ((r = 0; r < NPROC; r++)); do
  RANK=$r LOCAL_RANK=$r setsid "$PYTHON" -m trainer "$@" \
    > >(trap '' INT TERM; exec awk -v p="[rank$r]: " '{ print p $0; fflush() }') \
    2> >(trap '' INT TERM; exec awk -v p="[rank$r]: " '{ print p $0; fflush() }' >&2) &
  rank_of[$!]=$r
done

# shellcheck disable=SC2317 # called by the traps below
forward() {
  echo "${0##*/}: got SIG$1, passing it to ranks ${rank_of[*]}" >&2
  kill "-$1" "${!rank_of[@]}" 2>/dev/null || true
}
trap 'forward INT' INT
trap 'forward TERM' TERM

status=0
killer=
while ((${#rank_of[@]})); do
  pid=
  wait -n -p pid "${!rank_of[@]}" && rc=0 || rc=$?
  [[ -n ${pid:-} ]] || continue # woken by a trapped signal
  r=${rank_of[$pid]}
  unset "rank_of[$pid]"
  if ((rc != 0 && status == 0)); then
    status=$rc
    if ((${#rank_of[@]})); then
      echo "${0##*/}: rank $r exited with status $rc; stopping ranks ${rank_of[*]}" >&2
      kill -TERM "${!rank_of[@]}" 2>/dev/null || true
      # shellcheck disable=SC2016 # expanded by that sh
      setsid sh -c 'sleep "$0" && kill -KILL "$@" 2>/dev/null' "$STOP_GRACE" "${!rank_of[@]}" &
      killer=$! # a process group of its own, so its sleep goes with it
    fi
  fi
done
[[ -z $killer ]] || kill -- "-$killer" 2>/dev/null || true
wait # the output prefixers
exit "$status"
