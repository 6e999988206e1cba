#!/usr/bin/env bash
# One machine: torchrun starts NPROC trainer processes. The standalone rendezvous runs a private
# store on a free port, so several jobs can share the machine without choosing ports.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if wants_help "$@"; then
  cat <<HELP
usage: launch/local.sh [TRAINER_ARGS...]

Runs: torchrun --standalone --nproc-per-node=\$NPROC -m trainer TRAINER_ARGS

environment:
  NPROC     processes to start (default: the CPUs available, here $(cpu_count))
  PYTHON    interpreter (default: python3 from PATH)
  TORCHRUN  launcher command (default: "\$PYTHON -m torch.distributed.run")

Trainer options: \$PYTHON -m trainer --help
HELP
  exit 0
fi

NPROC=${NPROC:-$(cpu_count)}
require_int NPROC 1
exec "${TORCHRUN_CMD[@]}" --standalone --nproc-per-node="$NPROC" -m trainer "$@"
