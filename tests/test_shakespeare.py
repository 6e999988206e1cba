"""The built-in shakespeare-char task under the real launcher: it learns, resumes bit for bit after
kill -9 with dropout and AdamW, trains every window once across a change of world size, and
``trainer generate`` samples from it deterministically and refuses bad input with one line."""

from __future__ import annotations

import csv
import html
import json
import math
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Launched, assert_ok, clean_env, read_summary, run_process, run_torchrun, run_trainer, wait_until
from faults import assert_one_epoch_trained_once, latest_step, records, workers

from trainer.cli import parse_run
from trainer.core.schedule import lr_at
from trainer.distributed.jobs import torchrun_command
from trainer.lifecycle.checkpoint import read_checkpoint
from trainer.tasks.shakespeare_char import ShakespeareChar
from trainer.tasks.shakespeare_data import load_text

# A one-block GPT on 16-character contexts. A stride of 1046 characters keeps 960 of the training
# text's windows: 80 steps of 12 (the task's default global batch), which divides at 1 and 2 processes.
WINDOWS = 960
SMALL = ("--task", "shakespeare-char", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "16")
SMALL += ("--window-stride", "1046", "--dropout", "0.1", "--log-every", "10", "--checkpoint-every", "20")
SMALL += ("--record-samples",)
# Larger, so that a run lasts long enough to be killed in the middle of its first epoch: two
# blocks, 32-character contexts, 163 steps an epoch, 2 epochs; checkpoints every 50 steps leave
# steps to redo, and the restarted run crosses into the second epoch.
KILLED = ("--task", "shakespeare-char", "--n-layer", "2", "--n-embd", "64", "--n-head", "4", "--block-size", "32")
KILLED += ("--window-stride", "512", "--dropout", "0.1", "--epochs", "2", "--log-every", "10")
KILLED += ("--checkpoint-every", "50")
# The task's cosine learning-rate schedule, warmed up in 20 steps and decayed by step 250 (of 326).
KILLED += ("--warmup-steps", "20", "--lr-decay-steps", "250")
# Each rank's 6 windows a step as two micro-batches of 3: one gradient exchange per step.
KILLED += ("--grad-accum-steps", "2")
EXACT = ("epoch", "global_step", "train_loss", "val_loss")


def exact_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as handle:
        return [{k: row[k] for k in EXACT} for row in csv.DictReader(handle)]


def assert_every_window_once(run_dir: Path) -> None:
    assert_one_epoch_trained_once(run_dir, WINDOWS, "windows")


def generate(*args: str) -> subprocess.CompletedProcess[str]:
    return run_process([sys.executable, "-m", "trainer", "generate", *args], clean_env(), timeout=120)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trainer generate: error: "), result.stderr[-3000:]
    return lines[0]


def test_a_window_is_the_text_at_its_start_and_the_vocabulary_is_the_texts_characters() -> None:
    text = load_text()
    task = ShakespeareChar(ShakespeareChar.Options(block_size=16, window_stride=1046))
    assert task.vocabulary == "".join(sorted(set(text))) and len(task.vocabulary) == 65
    splits = task.build_data(torch.device("cpu"))
    assert (len(splits.train), len(splits.val)) == (WINDOWS, (len(text) - int(len(text) * 0.9) - 17) // 16 + 1)
    inputs, targets = splits.train.batch(torch.tensor([0, 5, WINDOWS - 1]))
    for row, position in enumerate((0, 5, WINDOWS - 1)):
        start = position * 1046
        assert task.decode(inputs[row].tolist()) == text[start : start + 16]
        assert task.decode(targets[row].tolist()) == text[start + 1 : start + 17]
    val_inputs, _ = splits.val.batch(torch.tensor([3]))  # the validation windows start every 16 characters
    assert task.decode(val_inputs[0].tolist()) == text[int(len(text) * 0.9) + 48 :][:16]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch at world size 2 with the task's default recipe, the learning rate given on the command line."""
    run_dir = tmp_path_factory.mktemp("shakespeare") / "run"
    assert_ok(run_torchrun(2, [*SMALL, "--lr", "0.002", "--run-dir", str(run_dir)], timeout=300))
    return run_dir


def test_trains_at_world_size_two_with_the_tasks_recipe(trained: Path) -> None:
    summary = read_summary(trained)
    assert (summary["task"], summary["world_size"], summary["global_step"]) == ("shakespeare-char", 2, 80)
    # From ln(65) = 4.17 nats per character for a uniform guess.
    assert summary["val_loss"] < math.log(65) - 0.5, summary["val_loss"]
    assert_every_window_once(trained)
    assert sorted(p.name for p in (trained / "checkpoints").glob("step-*.pt"))[-1] == "step-00000080.pt"
    config = json.loads((trained / "config.json").read_text())
    recipe = {k: config[k] for k in ("optimizer", "beta2", "weight_decay", "global_batch_size", "clip_grad_norm")}
    assert recipe == {
        "optimizer": "adamw",
        "beta2": 0.99,
        "weight_decay": 0.1,
        "global_batch_size": 12,
        "clip_grad_norm": 1.0,
    }
    assert config["lr"] == 0.002  # the command line wins over the task's default
    card = json.loads((trained / "model.json").read_text())
    assert len(card["vocabulary"]) == 65 and card["block_size"] == 16 and card["n_layer"] == 1


def test_resumes_bit_for_bit_after_sigkill(tmp_path: Path) -> None:
    """Dropout (each rank's random streams), AdamW's two groups, the clipped step, the learning-rate
    schedule and gradient accumulation resume exactly; accumulation exchanges gradients once a step."""
    baseline = tmp_path / "baseline"
    assert_ok(run_torchrun(2, [*KILLED, "--run-dir", str(baseline)], timeout=300))
    run_dir = tmp_path / "run"
    job = Launched(
        torchrun_command(2, "trainer", [*KILLED, "--run-dir", str(run_dir)], ["--max-restarts=2"]),
        clean_env(),
        tmp_path / "log",
    )
    # Step 70 is logged after step 50's checkpoint committed, and 93 steps before the epoch's end
    # (whose checkpoint, at step 163, would be no --checkpoint-every one).
    wait_until(lambda: latest_step(run_dir) >= 70, 180, "step 70", job)
    workers(job.pid)[0].send_signal(signal.SIGKILL)  # rank 0, the checkpoint writer
    assert job.wait(300) == 0, job.output()[-6000:]
    summary = read_summary(run_dir)
    assert summary["restarts"] == 1 and summary["resumed_from_step"] in (50, 100, 150), summary["resumed_from_step"]
    assert summary["params_sha256"] == read_summary(baseline)["params_sha256"]
    assert exact_rows(run_dir) == exact_rows(baseline)
    # No exchange on the micro-batch before the last: one per step this launch trained.
    assert read_summary(baseline)["gradient_exchanges"] == 326
    assert summary["gradient_exchanges"] == 326 - summary["resumed_from_step"]
    # Every window, before the kill and after, ran at the rate the schedule gives its last step.
    cfg = parse_run([*KILLED, "--run-dir", str(run_dir)])[0]
    windows = [r for r in records(run_dir / "rank0.jsonl") if "lr" in r]
    assert {r["step"] for r in windows} >= set(range(10, 326, 10))
    assert all(r["lr"] == pytest.approx(lr_at(cfg, r["step"] - 1), rel=1e-12) for r in windows)
    # Checkpoints hold the configured rate of each group; the schedule derives the step's from it.
    saved = read_checkpoint(sorted((run_dir / "checkpoints").glob("step-*.pt"))[-1])
    assert [g["lr"] for g in saved["optimizer"]["param_groups"]] == [1e-3, 1e-3]


def test_resized_from_two_processes_to_one_trains_every_window_once(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert_ok(run_torchrun(2, [*SMALL, "--max-steps", "30", "--run-dir", str(run_dir)], timeout=300))
    assert_ok(run_trainer([*SMALL, "--run-dir", str(run_dir)], timeout=300))
    summary = read_summary(run_dir)
    assert (summary["world_size"], summary["resumed_from_step"], summary["global_step"]) == (1, 30, 80)
    assert_every_window_once(run_dir)
    # The task's warm-up (100 steps) went on across the resize: each window at its step's rate.
    cfg = parse_run([*SMALL, "--run-dir", str(run_dir)])[0]
    windows = [r for r in records(run_dir / "rank0.jsonl") if "lr" in r]
    assert [r["step"] for r in windows] == list(range(10, 81, 10))
    assert all(r["lr"] == pytest.approx(lr_at(cfg, r["step"] - 1), rel=1e-12) for r in windows)


def test_generate_is_deterministic_for_a_seed(trained: Path) -> None:
    runs: dict[str, Any] = {}
    for name, seed in (("first", "1"), ("again", "1"), ("other", "2")):
        result = generate(str(trained), "--prompt", "ROMEO:", "--tokens", "200", "--seed", seed)
        assert_ok(result)
        runs[name] = result.stdout
    assert runs["first"] == runs["again"] and runs["first"] != runs["other"]
    assert runs["first"].startswith("ROMEO:") and len(runs["first"]) == len("ROMEO:") + 200 + 1  # print's newline


def test_generate_refuses_a_character_outside_the_vocabulary(trained: Path) -> None:
    error = one_line(generate(str(trained), "--prompt", "ROMEO: 5 €"))
    assert "the character '5' is not in the vocabulary" in error and "remove or replace it" in error


def test_generate_refuses_a_run_of_another_task(tmp_path: Path) -> None:
    run_dir = tmp_path / "mnist"
    assert_ok(run_trainer(["--hidden", "8", "--max-steps", "2", "--run-dir", str(run_dir)]))
    error = one_line(generate(str(run_dir), "--prompt", "ROMEO:"))
    assert "a run of the task mnist-mlp" in error and "needs a language-model task" in error


def test_a_task_default_that_is_not_an_engine_option_gets_one_line(tmp_path: Path) -> None:
    task = tmp_path / "task.py"
    task.write_text("import trainer\n\nclass Task(trainer.Task):\n    defaults = {'learning_rate': 0.1}\n")
    result = run_trainer(["--task", f"{task}:Task", "--run-dir", str(tmp_path / "run")])
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "trainer: error: Task.defaults names no option of the engine: ['learning_rate']; see TrainConfig"
    ], result.stderr[-3000:]


def test_trainer_evaluate_reproduces_the_runs_validation_loss(trained: Path) -> None:
    result = run_process([sys.executable, "-m", "trainer", "evaluate", str(trained)], clean_env(), timeout=120)
    assert_ok(result)
    figures = json.loads(result.stdout)
    assert (figures["task"], figures["val_samples"]) == ("shakespeare-char", (111_540 - 17) // 16 + 1)
    assert figures["val_loss"] == pytest.approx(read_summary(trained)["val_loss"], rel=1e-6)


def test_bf16_trains_keeps_float32_state_and_resumes_bit_for_bit(tmp_path: Path, trained: Path) -> None:
    """``--precision bf16`` at world size 2: the loss falls, the weights and AdamW's moments stay
    float32, and a run stopped at step 40 and continued to 80 ends with the weights of one run to 80."""
    bf16 = (*SMALL, "--precision", "bf16", "--lr", "0.002")
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    assert_ok(run_torchrun(2, [*bf16, "--run-dir", str(whole)], timeout=300))
    assert_ok(run_torchrun(2, [*bf16, "--max-steps", "40", "--run-dir", str(halves)], timeout=300))
    continued = run_torchrun(2, [*bf16, "--run-dir", str(halves)], timeout=300)
    assert_ok(continued)
    assert "resuming from" in continued.stderr
    summary = read_summary(halves)
    assert summary["global_step"] == 80 and summary["val_loss"] < math.log(65) - 0.5, summary
    assert summary["params_sha256"] == read_summary(whole)["params_sha256"]
    assert exact_rows(halves) == exact_rows(whole)
    saved = read_checkpoint(sorted((halves / "checkpoints").glob("step-*.pt"))[-1])
    assert {t.dtype for t in saved["model"].values()} == {torch.float32}
    moments = [v for state in saved["optimizer"]["state"].values() for k, v in state.items() if k != "step"]
    assert moments and {t.dtype for t in moments} == {torch.float32}
    # The same run in float32 (the module's trained run): bf16 really changed the arithmetic.
    assert summary["params_sha256"] != read_summary(trained)["params_sha256"]
    # trainer evaluate scores it in its own precision (float32 reads about 1e-5 apart).
    evaluated = run_process([sys.executable, "-m", "trainer", "evaluate", str(halves)], clean_env(), timeout=120)
    assert_ok(evaluated)
    figures = json.loads(evaluated.stdout)
    assert figures["precision"] == "bf16" and figures["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-6)


def test_summary_gives_tokens_per_second_and_mfu_and_the_report_a_sample(trained: Path) -> None:
    """tokens/s is samples/s times the context; the MFU is the task's FLOPs (nanoGPT's 6 N + 12 L H Q T
    per token) at that rate over world size x rank 0's measured matmul rate; the trained model's
    sample is in sample.txt (as trainer generate prints it for that prompt and seed) and in the report."""
    summary = read_summary(trained)
    assert summary["tokens_per_second"] == pytest.approx(summary["samples_per_second"] * 16, rel=1e-9)
    task = ShakespeareChar(ShakespeareChar.Options(n_layer=1, n_embd=32, n_head=2, block_size=16))
    model = task.build_model()
    weights = sum(p.numel() for p in model.parameters()) - 16 * 32
    assert summary["model_flops_per_sample"] == (6 * weights + 12 * 1 * 2 * 16 * 16) * 16
    rate = summary["matmul_gflops_per_rank"] * 1e9
    expected = summary["model_flops_per_sample"] * summary["samples_per_second"] / (2 * rate)
    assert 0 < summary["mfu"] < 1 and summary["mfu"] == pytest.approx(expected, rel=1e-9)
    sample = (trained / "sample.txt").read_text()
    assert len(sample) == 200 and set(sample) <= set(task.vocabulary)
    printed = generate(str(trained), "--prompt", "\n", "--tokens", "200", "--seed", "0")
    assert printed.returncode == 0 and printed.stdout == "\n" + sample + "\n", printed.stdout[-500:]
    report = run_process([sys.executable, "-m", "trainer", "report", str(trained)], clean_env(), timeout=120)
    assert_ok(report)
    page = (trained / "report.html").read_text()
    assert "A sample from the trained model" in page and html.escape(sample) in page
    assert "tokens/s" in page and "MFU" in page


def test_wsd_continued_from_its_stable_phase_equals_the_larger_budget(tmp_path: Path) -> None:
    """Continuing under warm-up-stable-decay: a run budgeted for 40 steps (decay over steps 32-40),
    resumed from its step-30 checkpoint (still in the stable phase) with a budget of 80, ends with
    the weights of a run budgeted for 80 from the start, bit for bit."""
    wsd = (*SMALL, "--lr-schedule", "wsd", "--warmup-steps", "5", "--checkpoint-every", "10", "--keep-checkpoints", "9")
    short, larger = tmp_path / "short", tmp_path / "larger"
    assert_ok(run_trainer([*wsd, "--max-steps", "40", "--lr-decay-steps", "40", "--run-dir", str(short)], timeout=300))
    assert_ok(run_trainer([*wsd, "--max-steps", "80", "--lr-decay-steps", "80", "--run-dir", str(larger)], timeout=300))
    step30 = str(short / "checkpoints" / "step-00000030.pt")
    args = [*wsd, "--max-steps", "80", "--lr-decay-steps", "80", "--run-dir", str(short), "--resume", step30]
    continued = run_trainer(args, timeout=300)
    assert_ok(continued)
    assert "resuming from" in continued.stderr and "step 30" in continued.stderr
    assert read_summary(short)["global_step"] == 80
    assert read_summary(short)["params_sha256"] == read_summary(larger)["params_sha256"]
