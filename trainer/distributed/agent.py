"""torchrun, with a lost rendezvous said in one line: ``python -m trainer.distributed.agent ARGS``.

launch/multinode.sh starts each node's agent through this module. It takes torchrun's arguments
and runs torchrun itself; the one difference is the end of a job whose rendezvous has gone away.
Under ``--rdzv-backend=c10d`` the rendezvous store lives inside the agent on the node that
``--rdzv-endpoint`` names, so when that node dies every other agent ends with a chained
``RendezvousConnectionError`` traceback (pytorch/pytorch#67742) that names neither the node nor
what to do. Here it ends with one line that does, and exit status 1.
"""

from __future__ import annotations

import sys

from trainer.core.collector import collector_paused

# Run as the agent, this is the process's own start: paused and frozen (trainer/core/collector.py).
with collector_paused(freeze=__name__ == "__main__"):
    from torch.distributed.elastic.multiprocessing.errors import record
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError
    from torch.distributed.run import parse_args, run

EXIT_LOST = 1


def lost_rendezvous_line(backend: str, endpoint: str, error: BaseException) -> str:
    """The one line that ends an agent whose rendezvous at ``endpoint`` cannot be reached."""
    cause = error.__cause__ or error.__context__
    detail = str(cause or error).strip().splitlines()[0] if str(cause or error).strip() else type(error).__name__
    if backend == "c10d":
        advice = (
            "the node that hosts a c10d rendezvous is gone or unreachable, and the job cannot go on "
            "without it; RDZV_BACKEND=etcd-v2 keeps the rendezvous off the nodes (docs/multinode.md)"
        )
    else:
        advice = f"the {backend} rendezvous server is gone or unreachable"
    return f"multinode.sh: error: lost the {backend} rendezvous at {endpoint} ({detail}): {advice}"


@record
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except RendezvousConnectionError as exc:
        print(lost_rendezvous_line(args.rdzv_backend, args.rdzv_endpoint, exc), file=sys.stderr, flush=True)
        return EXIT_LOST
    return 0


if __name__ == "__main__":
    sys.exit(main())
