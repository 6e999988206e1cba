"""Tasks of one's own: the CNN example under the real launcher, a task started from a script,
hyper-parameters on resume, and one-line errors for a wrong task."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    REPO,
    Launched,
    assert_ok,
    clean_env,
    read_summary,
    run_process,
    run_torchrun,
    run_trainer,
    wait_until,
)
from faults import assert_one_epoch_trained_once, latest_step, metrics_rows, workers
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.distributed.jobs import torchrun_command
from trainer.lifecycle.checkpoint import read_checkpoint

CNN = "examples/cnn.py:Task"
CNN_TRAIN = 50_000  # the example's training split: 60k images less 10k held out
# 1000 samples a step over the ranks: 50 steps an epoch; checkpoints every 10 steps, so a kill
# lands with steps to redo. Four channels keep the convolutions quick; dropout stays on.
CNN_ARGS = ("--task", CNN, "--channels", "4", "--global-batch-size", "1000", "--epochs", "1")
CNN_ARGS += ("--log-every", "5", "--checkpoint-every", "10", "--record-samples", "--tensorboard")


def cnn_args(run_dir: Path, *extra: str) -> list[str]:
    return [*CNN_ARGS, "--run-dir", str(run_dir), *extra]


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The run's error: exit status 2 and one ``trainer: error:`` line, the last it wrote (no traceback)."""
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    errors = [line for line in result.stderr.splitlines() if line.startswith("trainer: error: ")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


def assert_every_sample_once(run_dir: Path) -> None:
    assert_one_epoch_trained_once(run_dir, CNN_TRAIN, "samples")


@pytest.fixture(scope="module")
def cnn_baseline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted two-process run of the CNN example, under the default --comm."""
    run_dir = tmp_path_factory.mktemp("cnn") / "run"
    assert_ok(run_torchrun(2, cnn_args(run_dir), timeout=300))
    return {"dir": run_dir, "summary": read_summary(run_dir), "metrics": metrics_rows(run_dir)}


def test_cnn_example_trains_every_sample_once_and_records_its_task(cnn_baseline: dict[str, Any]) -> None:
    run_dir, summary = cnn_baseline["dir"], cnn_baseline["summary"]
    assert_every_sample_once(run_dir)
    assert summary["global_step"] == 50 and summary["test_accuracy"] > 0.5
    config = json.loads((run_dir / "config.json").read_text())
    assert config["task"] == f"{REPO / 'examples' / 'cnn.py'}:Task"
    assert config["task_options"] == {"channels": 4, "dropout": 0.25}
    card = json.loads((run_dir / "model.json").read_text())
    assert (card["task"], card["classes"], card["tensors"]["0.weight"]) == ("mnist-cnn", 10, [4, 1, 3, 3])


def test_the_report_and_tensorboard_show_the_tasks_own_figures(cnn_baseline: dict[str, Any]) -> None:
    run_dir = cnn_baseline["dir"]
    assert_ok(run_process([sys.executable, "-m", "trainer", "report", str(run_dir)], clean_env()))
    page = (run_dir / "report.html").read_text()
    assert "val_accuracy" in page and "mnist-cnn" in page
    assert (run_dir / "report" / "epochs.png").stat().st_size > 0
    reader = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    reader.Reload()
    tags = set(reader.Tags()["scalars"])
    assert {"train/loss", "epoch/val_loss", "epoch/val_accuracy", "epoch/train_accuracy"} <= tags, tags
    accuracy = {step: value for step, value in ((e.step, e.value) for e in reader.Scalars("epoch/val_accuracy"))}
    assert accuracy == pytest.approx({50: float(cnn_baseline["metrics"][-1]["val_accuracy"])}, rel=1e-6)


def test_cnn_example_resumes_bit_for_bit_after_sigkill(tmp_path: Path, cnn_baseline: dict[str, Any]) -> None:
    """Dropout (each rank's own random streams), BatchNorm's buffers and the default sync all resume exactly."""
    run_dir = tmp_path / "run"
    job = Launched(
        torchrun_command(2, "trainer", cnn_args(run_dir), ["--max-restarts=2"]), clean_env(), tmp_path / "log"
    )
    wait_until(lambda: latest_step(run_dir) >= 15, 180, "step 15", job)
    workers(job.pid)[0].send_signal(signal.SIGKILL)  # rank 0, the checkpoint writer
    assert job.wait(300) == 0, job.output()[-6000:]
    summary = read_summary(run_dir)
    assert summary["restarts"] == 1 and summary["resumed_from_step"] in (10, 20, 30, 40)
    assert summary["params_sha256"] == cnn_baseline["summary"]["params_sha256"]
    assert metrics_rows(run_dir) == cnn_baseline["metrics"]
    assert_every_sample_once(run_dir)


def test_cnn_example_resized_from_two_processes_to_one_trains_every_sample_once(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert_ok(run_torchrun(2, cnn_args(run_dir, "--max-steps", "20"), timeout=300))
    result = run_trainer(cnn_args(run_dir), timeout=300)
    assert_ok(result)
    summary = read_summary(run_dir)
    assert (summary["world_size"], summary["resumed_from_step"], summary["global_step"]) == (1, 20, 50)
    assert "random streams (dropout, augmentation) restart from --seed, rank and step 20" in result.stderr
    assert_every_sample_once(run_dir)


# Rebuilds the CNN in plain torch from the export and scores the test images read from the gzip
# files with numpy: no import of this package anywhere.
STANDALONE = """
import gzip, json, sys
import numpy as np, torch
from safetensors.torch import load_file
from torch import nn
run, mnist = sys.argv[1], sys.argv[2]
card = json.load(open(f"{run}/model.json"))
c = card["task_options"]["channels"]
model = nn.Sequential(
    nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Dropout(0.0), nn.Linear(2 * c * 7 * 7, 10))
model.load_state_dict(load_file(f"{run}/model.safetensors"))
images = np.frombuffer(gzip.open(f"{mnist}/t10k-images-idx3-ubyte.gz").read(), np.uint8, offset=16)
labels = np.frombuffer(gzip.open(f"{mnist}/t10k-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
x = (torch.tensor(images, dtype=torch.float32).view(-1, 1, 28, 28) / 255 - 0.1307) / 0.3081
with torch.no_grad():
    right = (model.eval()(x).argmax(1) == torch.tensor(labels.astype(np.int64))).sum().item()
assert not any(name == "trainer" or name.startswith("trainer.") for name in sys.modules)
print(json.dumps({"accuracy": right / len(labels)}))
"""


def test_cnn_export_loads_without_the_package(tmp_path: Path, cnn_baseline: dict[str, Any]) -> None:
    script = tmp_path / "standalone.py"
    script.write_text(STANDALONE)
    env = {k: v for k, v in clean_env().items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, str(script), str(cnn_baseline["dir"]), str(REPO / "trainer" / "tasks" / "mnist")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    # The run's own evaluation: the same weights, the same test images, so the same predictions
    # (within one image of 10,000 for a rounding difference between evaluation chunkings).
    accuracy = json.loads(result.stdout)["accuracy"]
    assert abs(accuracy - cnn_baseline["summary"]["test_accuracy"]) <= 1e-4


def test_trainer_evaluate_finds_the_task_of_a_run_from_anywhere(cnn_baseline: dict[str, Any], tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "evaluate", str(cnn_baseline["dir"])],
        env=clean_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["task"] == "mnist-cnn" and figures["test_samples"] == 10_000
    assert abs(figures["test_accuracy"] - cnn_baseline["summary"]["test_accuracy"]) <= 1e-4


# -- a task started from a script: trainer.fit --------------------------------------------------
SCRIPT = """
import torch
import torch.nn.functional as F
from torch import nn

import trainer


class Squares(trainer.Task):
    name = "squares"

    def build_model(self):
        return nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))

    def build_data(self, device):
        x = torch.linspace(-1, 1, 512).unsqueeze(1)
        return trainer.Splits(train=trainer.TensorSplit(x, x * x, device=device))

    def loss(self, model, batch):
        inputs, targets = batch
        return F.mse_loss(model(inputs), targets), {}


if __name__ == "__main__":
    summary = trainer.fit(Squares())
    if summary is not None:
        print("final train loss", summary["val_loss"], flush=True)
"""


def test_a_script_trains_its_own_task_with_fit_under_torchrun(tmp_path: Path) -> None:
    script = tmp_path / "squares.py"
    script.write_text(textwrap.dedent(SCRIPT))
    run_dir = tmp_path / "run"
    args = ["--epochs", "3", "--batch-size", "16", "--optimizer", "adam", "--lr", "0.01", "--run-dir", str(run_dir)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *args]
    assert_ok(run_process(cmd, clean_env(), timeout=240))
    summary = read_summary(run_dir)
    assert (summary["world_size"], summary["global_step"]) == (2, 3 * 16)  # 512 samples / (16 x 2) a step
    rows = metrics_rows_any(run_dir)
    assert len(rows) == 3 and float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    config = json.loads((run_dir / "config.json").read_text())
    assert config["task"] == f"{script.resolve()}:Squares"
    # No validation or test split: their figures are left out, not made up.
    assert "test_loss" not in summary and summary["val_loss"] is None
    # A task with no metric and no validation split still gets its report.
    assert_ok(run_process([sys.executable, "-m", "trainer", "report", str(run_dir)], clean_env()))
    assert "squares" in (run_dir / "report.html").read_text()


def metrics_rows_any(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


# -- hyper-parameters on resume -----------------------------------------------------------------
MLP = ("--hidden", "32", "--batch-size", "64", "--epochs", "1", "--log-every", "5", "--checkpoint-every", "10")


def test_a_changed_learning_rate_applies_on_resume_and_the_log_says_so(tmp_path: Path) -> None:
    first = tmp_path / "first"
    assert_ok(run_trainer([*MLP, "--run-dir", str(first), "--max-steps", "10"]))
    continued = {}
    for lr in ("0.01", "0.5"):
        run_dir = tmp_path / f"lr-{lr}"
        run_process(["cp", "-r", str(first), str(run_dir)], clean_env())
        result = run_trainer([*MLP, "--run-dir", str(run_dir), "--max-steps", "20", "--lr", lr])
        assert_ok(result)
        continued[lr] = (result.stderr, read_checkpoint(run_dir / "checkpoints" / "step-00000020.pt"))
    log, saved = continued["0.5"]
    assert "lr: 0.01 in the checkpoint, 0.5 now" in log
    assert saved["optimizer"]["param_groups"][0]["lr"] == 0.5
    # The steps after the resume ran with it: other weights than at the checkpoint's rate.
    same_log, same = continued["0.01"]
    assert "optimiser settings that differ" not in same_log and same["optimizer"]["param_groups"][0]["lr"] == 0.01
    assert not all(torch.equal(same["model"][k], saved["model"][k]) for k in same["model"])


# -- the wrong task -----------------------------------------------------------------------------
def test_a_task_that_does_not_exist_gets_one_line(tmp_path: Path) -> None:
    error = one_line_error(run_trainer(["--task", "no-such-task", "--run-dir", str(tmp_path / "run")]))
    assert "--task no-such-task: no such task" in error and "mnist-mlp" in error
    assert not (tmp_path / "run").exists()


def test_a_file_that_does_not_define_the_task_gets_one_line(tmp_path: Path) -> None:
    error = one_line_error(run_trainer(["--task", "examples/cnn.py:Nope", "--run-dir", str(tmp_path / "run")]))
    assert "examples/cnn.py defines no Nope" in error
    error = one_line_error(run_trainer(["--task", "examples/cnn.py:Options", "--run-dir", str(tmp_path / "run")]))
    assert "is not a subclass of trainer.Task" in error
    error = one_line_error(run_trainer(["--task", "examples/missing.py:Task", "--run-dir", str(tmp_path / "run")]))
    assert "examples/missing.py does not exist" in error


def test_a_checkpoint_of_another_task_is_refused_with_one_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert_ok(run_trainer([*MLP, "--run-dir", str(run_dir), "--max-steps", "10"]))
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    error = one_line_error(run_trainer([*CNN_ARGS, "--run-dir", str(run_dir), "--max-steps", "20"]))
    assert "is of the task 'mnist-mlp', not 'mnist-cnn'" in error
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_the_task_options_show_in_help() -> None:
    result = run_trainer(["--task", CNN, "--help"])
    assert_ok(result)
    assert "options of the task mnist-cnn" in result.stdout and "--channels" in result.stdout


# -- a task that breaks a sync's assumptions ----------------------------------------------------
# Frozen, unused and tied parameters, a BatchNorm buffer, two parameter groups, dropout and a
# map-style training split that augments from the global generator (tests/tasks/adversarial.py).
# 2400 training samples at 2 x 50 a step: 24 steps an epoch, 48 in all.
ADVERSARIAL = ("--task", "tests/tasks/adversarial.py:Task", "--batch-size", "50", "--epochs", "2")
ADVERSARIAL += ("--log-every", "8", "--checkpoint-every", "12")


@pytest.fixture(scope="module")
def adversarial_auto(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    run_dir = tmp_path_factory.mktemp("adversarial") / "auto"
    result = run_torchrun(2, [*ADVERSARIAL, "--run-dir", str(run_dir)], timeout=300)
    assert_ok(result)
    return {"dir": run_dir, "summary": read_summary(run_dir), "log": result.stderr}


def test_adversarial_task_under_the_default_sync_ends_with_gloos_weights(
    tmp_path: Path, adversarial_auto: dict[str, Any]
) -> None:
    run_dir = tmp_path / "gloo"
    assert_ok(run_torchrun(2, [*ADVERSARIAL, "--comm", "gloo", "--run-dir", str(run_dir)], timeout=300))
    assert read_summary(run_dir)["params_sha256"] == adversarial_auto["summary"]["params_sha256"]
    assert metrics_rows(run_dir) == metrics_rows(adversarial_auto["dir"])


def test_adversarial_task_stopped_and_continued_ends_where_the_uninterrupted_run_does(
    tmp_path: Path, adversarial_auto: dict[str, Any]
) -> None:
    run_dir = tmp_path / "run"
    assert_ok(run_torchrun(2, [*ADVERSARIAL, "--max-steps", "18", "--run-dir", str(run_dir)], timeout=300))
    assert_ok(run_torchrun(2, [*ADVERSARIAL, "--run-dir", str(run_dir)], timeout=300))
    summary = read_summary(run_dir)
    assert summary["continued_from_step"] == 18
    assert summary["params_sha256"] == adversarial_auto["summary"]["params_sha256"]
    assert metrics_rows(run_dir) == metrics_rows(adversarial_auto["dir"])
