"""shakespeare-char against nanoGPT's own train.py on the same recipe, side by side in one sitting.

    python -m benchmarks.nanogpt                  # 200 iterations: the speed table (a few minutes)
    python -m benchmarks.nanogpt --iters 2000     # the whole recipe: speed and validation losses
    python -m benchmarks.nanogpt --seeds 1337 1   # several seeds of each, for the losses' spread
    python -m benchmarks.nanogpt --gpu            # nanoGPT's GPU recipe on one GPU, 5000 iterations

The peer is nanoGPT's ``train.py`` and ``model.py`` (benchmarks/peers/nanogpt, MIT, three lines
patched to run on the CPU over gloo and to take its seed from the environment), run on the
recipe its README gives for a CPU: 4 layers, 4 heads, 128 wide, context 64, batch 12, dropout 0,
AdamW at 1e-3 with beta2 0.99, 100 warm-up steps (half the run if shorter), cosine to 1e-4 at the
last iteration, clipping at 1.0. At world size 2 it gets ``--gradient_accumulation_steps=2`` (it
divides that by the world size) and ``--batch_size=6``: one micro-batch of 6 per rank, a global
batch of 12, as the trainer's ``--global-batch-size 12`` gives. Every process has one thread.

Rows: ms per iteration (nanoGPT: the median of its own per-iteration times after 10; the trainer:
training time per step), and the validation loss of the final weights over the same fixed set
(shakespeare-char's validation windows, every 64th character: docs/shakespeare.md) for both, and
nanoGPT's own estimate (the mean of ``eval_iters`` random batches) beside it. The floor is the
bare forward, backward, clipping and AdamW step of the same model on random windows, one process
(world size 1) or two at once (world size 2, 6 windows each), with no exchange at all, at each
row's precision. The trainer runs once per ``--precisions`` (float32 and ``--precision bf16``
by default); nanoGPT runs its recipe in float32, and "speed vs nanoGPT" is always against that.

``--gpu``: nanoGPT's GPU recipe (``config/train_shakespeare_char.py``: 6 layers, 6 heads, 384
wide, context 256, batch 64, dropout 0.2, lr 1e-3 with 100 warm-up steps and cosine to 1e-4,
beta2 0.99, 5000 iterations; its README reports a validation loss of about 1.47) on one GPU.
nanoGPT runs as its recipe does, in bf16 autocast with ``torch.compile``, and once more without
compiling for ``--eager-iters`` (speed only); the trainer runs ``--precision bf16``, eager (it
has no compile option). Both read the loss each iteration (nanoGPT ``--log_interval=1``), so
both wait for the GPU once a step; nanoGPT evaluates only at its start and end.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import (
    REPO,
    child_env,
    machine,
    machine_line,
    markdown_table,
    publish,
    results_dir,
    run_checked,
    write_csv,
    write_json,
)

PEER = REPO / "benchmarks" / "peers" / "nanogpt" / "train.py"
RECIPE = [
    *("--device=cpu", "--compile=False", "--block_size=64", "--n_layer=4", "--n_head=4", "--n_embd=128"),
    *("--dropout=0.0", "--learning_rate=1e-3", "--min_lr=1e-4", "--beta2=0.99"),
    *("--grad_clip=1.0", "--log_interval=1", "--eval_iters=20", "--always_save_checkpoint=True"),
]
BATCH = 12
# nanoGPT's config/train_shakespeare_char.py, the recipe its README runs on a GPU.
GPU_SHAPE = {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256, "dropout": 0.2}
GPU_RECIPE = [
    *(f"--{k}={v}" for k, v in GPU_SHAPE.items()),
    *("--device=cuda", "--batch_size=64", "--gradient_accumulation_steps=1", "--learning_rate=1e-3"),
    *("--min_lr=1e-4", "--beta2=0.99", "--grad_clip=1.0", "--log_interval=1", "--eval_iters=200"),
    "--always_save_checkpoint=True",
]


def warmup(iters: int) -> int:
    """The recipe's 100 warm-up steps; fewer in a short run, so that the cosine still has steps to decay."""
    return min(100, iters // 2)


def prepare_data(directory: Path) -> Path:
    """nanoGPT's data/shakespeare_char files (train.bin, val.bin, meta.pkl) from the shipped corpus."""
    from trainer.tasks.shakespeare_data import load_corpus

    corpus = load_corpus()
    data = directory / "shakespeare_char"
    data.mkdir(parents=True)
    corpus.train.numpy().astype(np.uint16).tofile(data / "train.bin")
    corpus.val.numpy().astype(np.uint16).tofile(data / "val.bin")
    itos = dict(enumerate(corpus.vocabulary))
    meta = {"vocab_size": len(itos), "itos": itos, "stoi": {c: i for i, c in itos.items()}}
    (data / "meta.pkl").write_bytes(pickle.dumps(meta))
    return data


@torch.no_grad()
def fixed_set_loss(state: dict[str, torch.Tensor], shape: dict[str, Any] | None = None, device: str = "cpu") -> float:
    """The mean loss per character of shakespeare-char's validation windows, for weights ``state``
    of a model of ``shape`` (the task's options; default the CPU recipe's), in float32."""
    from trainer.tasks.shakespeare_char import ShakespeareChar

    task = ShakespeareChar(ShakespeareChar.Options(**(shape or {})))
    model = task.build_model().to(device)
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state.items()})
    model.eval()
    split = task.build_data(torch.device(device)).val
    assert split is not None
    total, count = 0.0, 0
    for begin in range(0, len(split), 256):
        inputs, targets = split.batch(torch.arange(begin, min(begin + 256, len(split)), device=device))
        total += F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
    return total / count


def run_nanogpt(
    world: int, iters: int, seed: int, data: Path, out: Path, gpu: str | None = None, every: int | None = None
) -> dict[str, Any]:
    """nanoGPT's train.py on the CPU recipe, or with ``gpu`` ("compiled" or "eager") on its GPU
    recipe in one process; it evaluates (its own estimate) every ``every`` iterations (default: at
    the start and the end only)."""
    recipe = RECIPE if gpu is None else [*GPU_RECIPE, f"--compile={gpu == 'compiled'}"]
    args = [*recipe, f"--dataset={data}", f"--out_dir={out}", f"--max_iters={iters}", f"--lr_decay_iters={iters}"]
    args += [f"--eval_interval={every or iters}", f"--warmup_iters={warmup(iters)}"]
    if gpu is not None:
        cmd = [sys.executable, str(PEER), *args]
    elif world == 1:
        cmd = [sys.executable, str(PEER), *args, f"--batch_size={BATCH}", "--gradient_accumulation_steps=1"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", str(PEER)]
        cmd += [*args, "--backend=gloo", f"--batch_size={BATCH // world}", f"--gradient_accumulation_steps={world}"]
    env = child_env(hide_gpus=gpu is None, OMP_NUM_THREADS="1", NANOGPT_SEED=str(seed))
    output, _ = run_checked(cmd, env, timeout=3600)
    logged = re.findall(r"^iter (\d+): loss \S+, time ([\d.]+)ms", output, re.M)
    times = [float(t) for i, t in logged if 10 <= int(i) < iters]  # warm-up and the final evaluation left out
    estimates = re.findall(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", output)
    state = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)["model"]
    return {
        "ms_per_iter": statistics.median(times),
        "val_loss": fixed_set_loss(state) if gpu is None else fixed_set_loss(state, GPU_SHAPE, "cuda"),
        "own_estimate": float(estimates[-1][2]) if estimates else None,
        "estimates": estimates,  # (iteration, train loss, val loss) of each evaluation, as logged
    }


def run_trainer(
    world: int,
    iters: int,
    seed: int,
    out: Path,
    precision: str = "fp32",
    gpu: bool = False,
    every: int | None = None,
) -> dict[str, Any]:
    """The trainer on the CPU recipe, or with ``gpu`` on nanoGPT's GPU recipe in one process; it
    keeps a checkpoint every ``every`` steps (default: the last step's only)."""
    args = ["-m", "trainer", "--task", "shakespeare-char", "--max-steps", str(iters), "--lr-decay-steps", str(iters)]
    args += [
        "--seed",
        str(seed),
        "--run-dir",
        str(out),
        "--checkpoint-every",
        str(every or iters),
        "--log-every",
        "100",
    ]
    args += ["--warmup-steps", str(warmup(iters)), "--precision", precision]
    if every:
        args += ["--keep-checkpoints", str(iters // every + 1)]
    if gpu:
        args += [f"--{k.replace('_', '-')}={v}" for k, v in GPU_SHAPE.items()]
        args += ["--global-batch-size", "64", "--device", "cuda"]
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *args[1:]]
    else:
        cmd = [sys.executable, *args]
    run_checked(cmd, child_env(hide_gpus=not gpu, OMP_NUM_THREADS="1"), timeout=3600)
    summary = json.loads((out / "summary.json").read_text())
    ms_per_iter = summary["train_seconds"] / summary["global_step"] * 1e3
    if not gpu:
        return {"ms_per_iter": ms_per_iter, "val_loss": summary["val_loss"]}
    # As nanoGPT's row: the final weights' loss in float32; the run's own (in bf16 autocast) beside it.
    from trainer.lifecycle.checkpoint import read_checkpoint

    state = read_checkpoint(out / "checkpoints" / f"step-{iters:08d}.pt")["model"]
    return {
        "ms_per_iter": ms_per_iter,
        "val_loss": fixed_set_loss(state, GPU_SHAPE, "cuda"),
        "own_estimate": summary["val_loss"],
    }


def floor_worker(iters: int, batch: int, precisions: Sequence[str]) -> None:
    """The bare step of the same model: forward, backward, clipping, AdamW; prints ms per step for
    each of ``precisions`` in turn, each on a fresh model. Under bf16 the forward and the loss run
    in autocast, as the trainer's ``--precision bf16``."""
    from trainer.core.config import TrainConfig
    from trainer.tasks.shakespeare_char import ShakespeareChar

    torch.set_num_threads(1)
    task = ShakespeareChar()
    split = task.build_data(torch.device("cpu")).train
    for precision in precisions:
        model = task.build_model()
        optimizer = task.build_optimizer(model, TrainConfig(**task.defaults))
        generator = torch.Generator().manual_seed(0)
        times = []
        for step in range(iters):
            started = time.perf_counter()
            inputs, targets = split.batch(torch.randint(len(split), (batch,), generator=generator))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if step >= 10:
                times.append((time.perf_counter() - started) * 1e3)
        print(f"floor_ms {precision} {statistics.median(times):.4f}", flush=True)


def run_floors(world: int, iters: int, precisions: Sequence[str]) -> dict[str, float]:
    """ms per step of the bare step in each of ``precisions``: ``world`` concurrent one-thread
    processes, each measuring the precisions in turn (one start-up for all); a job's step is its
    slowest rank's."""
    cmd = [sys.executable, "-m", "benchmarks.nanogpt", "--floor-worker", "--iters", str(iters)]
    cmd += ["--batch", str(BATCH // world), "--precisions", *precisions]
    procs = [
        subprocess.Popen(cmd, env=child_env(OMP_NUM_THREADS="1"), cwd=REPO, stdout=subprocess.PIPE, text=True)
        for _ in range(world)
    ]
    outputs = [p.communicate(timeout=3600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a floor process failed: exit codes {[p.returncode for p in procs]}")
    return {
        precision: max(float(v) for o in outputs for v in re.findall(rf"floor_ms {precision} ([\d.]+)", o))
        for precision in precisions
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.nanogpt", description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=None, help="iterations per run (default 200; the recipe has 2000)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337], help="one run of each trainer per seed")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="world sizes")
    parser.add_argument(
        "--precisions",
        nargs="+",
        choices=("fp32", "bf16"),
        default=["fp32", "bf16"],
        help="the trainer's --precision for its rows (nanoGPT runs float32, its recipe)",
    )
    parser.add_argument(
        "--gpu", action="store_true", help="nanoGPT's GPU recipe on one GPU (--iters 5000 unless given)"
    )
    parser.add_argument("--eager-iters", type=int, default=500, help="--gpu: iterations of nanoGPT's uncompiled run")
    parser.add_argument("--out", help="results folder (default benchmarks/results/nanogpt-<time>)")
    parser.add_argument("--floor-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=BATCH, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.iters is None:
        args.iters = 5000 if args.gpu else 200
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.floor_worker:
        floor_worker(args.iters, args.batch, args.precisions)
        return
    if args.gpu:
        gpu_main(args)
        return
    out = results_dir("nanogpt", args.out)
    info = machine()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        data = prepare_data(Path(scratch))
        for world in args.worlds:
            floors = run_floors(world, args.iters, list(dict.fromkeys(["fp32", *args.precisions])))
            for seed in args.seeds:
                peer = run_nanogpt(world, args.iters, seed, data, Path(scratch) / f"nanogpt-{world}-{seed}")
                runs = [("nanoGPT train.py", "fp32", peer)]
                for precision in args.precisions:
                    out_dir = Path(scratch) / f"trainer-{world}-{seed}-{precision}"
                    runs.append(("trainer", precision, run_trainer(world, args.iters, seed, out_dir, precision)))
                for name, precision, result in runs:
                    floor = floors[precision]
                    rows.append(
                        {
                            "world_size": world,
                            "seed": seed,
                            "trainer": name,
                            "precision": precision,
                            "ms_per_iter": result["ms_per_iter"],
                            "x_floor": result["ms_per_iter"] / floor,
                            "speed_vs_nanogpt": peer["ms_per_iter"] / result["ms_per_iter"],
                            "val_loss": result["val_loss"],
                            "own_estimate": result.get("own_estimate"),
                            "floor_ms": floor,
                        }
                    )
    columns = [
        ("world_size", "world size"),
        ("seed", "seed"),
        ("trainer", "trainer"),
        ("precision", "precision"),
        ("ms_per_iter", "ms/iter"),
        ("floor_ms", "floor ms"),
        ("x_floor", "x floor"),
        ("speed_vs_nanogpt", "speed vs nanoGPT"),
        ("val_loss", "val loss (fixed set)"),
        ("own_estimate", "nanoGPT's own estimate"),
    ]
    write_results(out, "nanogpt", rows, columns, info, f"{args.iters} iterations, one thread per process.")


def gpu_main(args: argparse.Namespace) -> None:
    """nanoGPT's GPU recipe: nanoGPT compiled (its recipe), nanoGPT eager (speed only), the trainer."""
    out = results_dir("nanogpt-gpu", args.out)
    info = {**machine(), "gpu": torch.cuda.get_device_name(0)}
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        data = prepare_data(Path(scratch))
        for seed in args.seeds:
            runs = [
                (
                    "nanoGPT train.py, torch.compile",
                    args.iters,
                    run_nanogpt(1, args.iters, seed, data, Path(scratch) / f"c{seed}", "compiled"),
                ),
                (
                    "nanoGPT train.py, eager",
                    args.eager_iters,
                    run_nanogpt(1, args.eager_iters, seed, data, Path(scratch) / f"e{seed}", "eager"),
                ),
                (
                    "trainer --precision bf16, eager",
                    args.iters,
                    run_trainer(1, args.iters, seed, Path(scratch) / f"t{seed}", "bf16", gpu=True),
                ),
            ]
            for name, iters, result in runs:
                rows.append(
                    {
                        "seed": seed,
                        "who": name,
                        "iters": iters,
                        "ms_per_iter": result["ms_per_iter"],
                        "val_loss": result["val_loss"],
                        "own_estimate": result.get("own_estimate"),
                    }
                )
    columns = [
        ("seed", "seed"),
        ("who", "who"),
        ("iters", "iterations"),
        ("ms_per_iter", "ms/iter"),
        ("val_loss", "val loss (fixed set, float32)"),
        ("own_estimate", "the run's own estimate"),
    ]
    write_results(out, "nanogpt-gpu", rows, columns, info, f"nanoGPT's GPU recipe on {info['gpu']}.")


def write_results(
    out: Path, name: str, rows: list[dict[str, Any]], columns: list[tuple[str, str]], info: dict[str, Any], title: str
) -> None:
    """``name``.csv, machine.json, and the table as ``name``.md (printed)."""
    write_csv(out / f"{name}.csv", rows)
    write_json(out / "machine.json", info)
    publish(out, name, f"{title} {machine_line(info)}\n\n{markdown_table(rows, columns)}\n")


if __name__ == "__main__":
    main()
