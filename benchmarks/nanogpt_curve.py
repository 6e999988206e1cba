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
import re
import subprocess
import sys
from pathlib import Path

from benchmarks import nanogpt as ng
from trainer.lifecycle.checkpoint import read_checkpoint

ITERS, EVERY = 5000, 250


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.nanogpt_curve", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="results folder")
    out = Path(parser.parse_args().out)
    scratch = out / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    data = ng.prepare_data(scratch)
    env = ng.child_env(hide_gpus=False, OMP_NUM_THREADS="1", NANOGPT_SEED="1337")
    cmd = [
        sys.executable,
        str(ng.PEER),
        *ng.GPU_RECIPE,
        "--compile=True",
        f"--dataset={data}",
        f"--out_dir={scratch}/n",
    ]
    cmd += [f"--max_iters={ITERS}", f"--lr_decay_iters={ITERS}", f"--eval_interval={EVERY}", "--warmup_iters=100"]
    cmd += ["--log_interval=10"]
    peer = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    lines = re.findall(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", peer.stdout)
    (out / "nanogpt-curve.txt").write_text(
        "iteration train_loss val_loss\n" + "\n".join(" ".join(x) for x in lines) + "\n"
    )
    print("nanoGPT (iteration, train loss, val loss):", lines, flush=True)

    run = scratch / "trainer"
    args = [sys.executable, "-m", "trainer", "--task", "shakespeare-char", "--max-steps", str(ITERS)]
    args += ["--lr-decay-steps", str(ITERS), "--seed", "1337", "--run-dir", str(run), "--checkpoint-every", str(EVERY)]
    args += ["--keep-checkpoints", str(ITERS // EVERY + 1), "--log-every", "100", "--warmup-steps", "100"]
    args += ["--precision", "bf16", "--global-batch-size", "64", "--device", "cuda"]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in ng.GPU_SHAPE.items()]
    subprocess.run(args, env=ng.child_env(hide_gpus=False), capture_output=True, text=True, check=True)
    losses = [
        f"{p.name} {ng.fixed_set_loss(read_checkpoint(p)['model'], ng.GPU_SHAPE, 'cuda'):.4f}"
        for p in sorted((run / "checkpoints").glob("step-*.pt"))
    ]
    (out / "trainer-curve.txt").write_text("checkpoint val_loss\n" + "\n".join(losses) + "\n")
    print("trainer (checkpoint, fixed-set val loss):", losses, flush=True)


if __name__ == "__main__":
    main()
