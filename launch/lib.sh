# shellcheck shell=bash
# Helpers sourced by the launch scripts (not run on its own).
# PYTHON and TORCHRUN pick the interpreter and launcher; the defaults use whatever is on PATH,
# i.e. the activated virtual environment.
PYTHON=${PYTHON:-python3}
# shellcheck disable=SC2034 # used by the scripts that source this file
read -r -a TORCHRUN_CMD <<<"${TORCHRUN:-$PYTHON -m torch.distributed.run}"

die() {
  echo "${0##*/}: error: $*" >&2
  exit 2
}

# wants_help ARGS...: true when the user asked for this script's help.
wants_help() {
  local arg
  for arg in "$@"; do
    [[ $arg == -h || $arg == --help ]] && return 0
  done
  return 1
}

# require_int NAME MIN [MAX]: the variable NAME holds an integer in MIN..MAX, or the script stops.
require_int() {
  local name=$1 min=$2 max=${3:-} value=${!1-}
  [[ $value =~ ^[0-9]+$ ]] || die "$name='$value' is not a whole number"
  ((value >= min)) || die "$name=$value is below $min"
  [[ -z $max ]] || ((value <= max)) || die "$name=$value is above $max"
}

# The CPUs this shell may use (respects taskset and cgroup limits).
cpu_count() {
  nproc 2>/dev/null || getconf _NPROCESSORS_ONLN
}

# quiet_port: a TCP port nothing on this host listens on, below the kernel's ephemeral range, so
# that in the seconds before rank 0 binds it no socket that asks the kernel for a port (a client's
# source port, another program binding port 0) can take it. Where the range leaves no room below
# it, a port the kernel hands out.
quiet_port() {
  "$PYTHON" - <<'PY'
import random, socket
try:
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
except (OSError, ValueError, IndexError):
    low = 32768
below = range(max(1024, low - 8192), low)
for port in [*random.sample(below, min(64, len(below))), 0]:
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except OSError:
            continue
        print(sock.getsockname()[1])
        break
PY
}
