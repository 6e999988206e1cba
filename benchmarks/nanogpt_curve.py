"""The validation curves of nanoGPT and the trainer on nanoGPT's GPU recipe (one GPU).

    python -m benchmarks.nanogpt_curve --out DIR

nanoGPT's ``train.py`` runs its recipe as its README does (``torch.compile``, an evaluation every
250 iterations: its own 200-batch estimate); the trainer runs the same recipe with
``--precision bf16`` and a checkpoint every 250 steps, and each checkpoint's loss over
shakespeare-char's fixed validation set is computed afterwards in float32. nanoGPT's reported
1.47 is the best of its evaluations, not its loss at the end: the recipe overfits after about
1,750 iterations (docs/gpu.md). Writes ``nanogpt-curve.txt`` and ``trainer-curve.txt`` (iteration
or checkpoint, then loss) and prints both.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks import nanogpt as ng
from trainer.lifecycle.checkpoint import read_checkpoint

ITERS, EVERY, SEED = 5000, 250, 1337


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.nanogpt_curve", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="results folder")
    out = Path(parser.parse_args().out)
    scratch = out / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    data = ng.prepare_data(scratch)
    peer = ng.run_nanogpt(1, ITERS, SEED, data, scratch / "nanogpt", "compiled", every=EVERY)
    lines = [" ".join(estimate) for estimate in peer["estimates"]]
    (out / "nanogpt-curve.txt").write_text("iteration train_loss val_loss\n" + "\n".join(lines) + "\n")
    print("nanoGPT (iteration, train loss, val loss):", lines, flush=True)

    run = scratch / "trainer"
    ng.run_trainer(1, ITERS, SEED, run, "bf16", gpu=True, every=EVERY)
    losses = [
        f"{p.name} {ng.fixed_set_loss(read_checkpoint(p)['model'], ng.GPU_SHAPE, 'cuda'):.4f}"
        for p in sorted((run / "checkpoints").glob("step-*.pt"))
    ]
    (out / "trainer-curve.txt").write_text("checkpoint val_loss\n" + "\n".join(losses) + "\n")
    print("trainer (checkpoint, fixed-set val loss):", losses, flush=True)


if __name__ == "__main__":
    main()
