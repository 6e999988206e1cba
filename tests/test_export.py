"""Best and latest checkpoints, the safetensors export, and ``trainer evaluate``: real files and processes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, assert_ok, clean_env, read_summary, run_process, run_trainer

from trainer.core.config import build_parser
from trainer.lifecycle.checkpoint import BEST, FORMAT, LATEST, remove_all, save_checkpoint, set_aside_newer

# 6,000 training images (--val-fraction 0.9) in batches of 500: 12 steps an epoch, 36 in all, a
# checkpoint every 5 steps and at each epoch end, only the newest one kept besides the best.
RUN = ("--hidden", "64", "--batch-size", "500", "--val-fraction", "0.9", "--epochs", "3")
RUN += ("--checkpoint-every", "5", "--keep-checkpoints", "1", "--log-every", "5")
DOC = REPO / "docs" / "using-the-model.md"
MNIST = REPO / "trainer" / "tasks" / "mnist"


def payload(step: int) -> dict[str, Any]:
    return {"format": FORMAT, "train_state": {"epoch": 0, "consumed": step, "global_step": step}, "world_size": 1}


def accuracy(value: float | None) -> dict[str, Any] | None:
    """An epoch-end checkpoint's score, as the MNIST task gives it (None: a mid-epoch checkpoint)."""
    return None if value is None else {"name": "val_accuracy", "value": value, "mode": "max"}


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def step_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("step-*.pt"))


# -- the checkpoint directory, in process -------------------------------------------------
def test_pruning_keeps_the_best_and_the_pointers_name_newest_and_best(tmp_path: Path) -> None:
    # (step, validation accuracy at an epoch end, or None mid-epoch): the best is step 20.
    for step, val in [(10, 0.80), (15, None), (20, 0.90), (25, None), (30, 0.85), (35, None), (40, 0.90)]:
        save_checkpoint(tmp_path, step, payload(step), keep=1, best=accuracy(val))
        assert read_json(tmp_path / LATEST)["file"] == f"step-{step:08d}.pt"
    # Step 40 ties step 20; the earlier one stays the best.
    assert step_files(tmp_path) == ["step-00000020.pt", "step-00000040.pt"]
    best = read_json(tmp_path / BEST)
    assert (best["file"], best["step"], best["val_accuracy"]) == ("step-00000020.pt", 20, 0.90)
    assert read_json(tmp_path / "step-00000040.json")["val_accuracy"] == 0.90


def test_pointers_follow_a_resume_that_sets_newer_checkpoints_aside_and_overwrite_clears_them(tmp_path: Path) -> None:
    for step, val in [(10, 0.80), (20, 0.90), (30, None)]:
        save_checkpoint(tmp_path, step, payload(step), keep=3, best=accuracy(val))
    assert read_json(tmp_path / BEST)["step"] == 20
    # Resuming from step 10: the best (20) is from the abandoned timeline.
    assert set_aside_newer(tmp_path, 10) == [
        "step-00000030.json",
        "step-00000030.pt",
        "step-00000020.json",
        "step-00000020.pt",
    ]
    assert (read_json(tmp_path / LATEST)["step"], read_json(tmp_path / BEST)["step"]) == (10, 10)
    save_checkpoint(tmp_path, 15, payload(15), keep=1, best=accuracy(0.85))  # the resumed run goes on
    assert step_files(tmp_path) == ["step-00000015.pt"] and read_json(tmp_path / BEST)["step"] == 15
    remove_all(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in tmp_path.glob("*.stale"))


# -- a real run ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("export") / "run"
    assert_ok(run_trainer([*RUN, "--run-dir", str(run_dir)]))
    return run_dir


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    header, *rows = (line.split(",") for line in (run_dir / "metrics.csv").read_text().splitlines())
    return [dict(zip(header, row, strict=True)) for row in rows]


def test_a_run_keeps_newest_and_best_and_exports_both(trained: Path) -> None:
    summary, card, rows = read_summary(trained), read_json(trained / "model.json"), metrics_rows(trained)
    ckpt = trained / "checkpoints"
    best_row = max(reversed(rows), key=lambda r: float(r["val_accuracy"]))
    best_step = int(best_row["global_step"])
    assert step_files(ckpt) == sorted({f"step-{s:08d}.pt" for s in (36, best_step)})
    assert read_json(ckpt / LATEST)["step"] == 36
    assert (read_json(ckpt / BEST)["step"], read_json(ckpt / BEST)["val_accuracy"]) == (
        best_step,
        float(best_row["val_accuracy"]),
    )
    assert card["layer_widths"] == [784, 64, 10] and card["classes"] == 10
    assert [(layer["weight"], layer["activation"]) for layer in card["layers"]] == [
        ("0.weight", "relu"),
        ("2.weight", None),
    ]
    final, best = card["models"]["final"], card["models"]["best"]
    assert (final["step"], final["test_accuracy"], final["val_accuracy"]) == (
        36,
        summary["test_accuracy"],
        summary["val_accuracy"],
    )
    assert (best["step"], best["val_accuracy"]) == (best_step, read_json(ckpt / BEST)["val_accuracy"])
    for entry in (final, best):
        assert hashlib.sha256((trained / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]


def loading_snippet() -> str:
    """The loading example of docs/using-the-model.md, exactly as the reader sees it."""
    text = DOC.read_text()
    match = re.search(r"<!-- loading-snippet[^>]*-->\n```python\n(.*?)```", text, re.DOTALL)
    assert match, f"{DOC} lost its loading snippet"
    return match.group(1)


# Appended to the snippet: score ``predict`` on the test images, read from the gzip files as data.
SCORE = """
import gzip, sys
import numpy as np

def idx(name, header):
    return np.frombuffer(gzip.open(f"{mnist}/{name}.gz").read(), np.uint8, offset=header)

images = torch.from_numpy(idx("t10k-images-idx3-ubyte", 16).reshape(-1, 28, 28).copy())
labels = torch.from_numpy(idx("t10k-labels-idx1-ubyte", 8).astype(np.int64))
assert "trainer" not in sys.modules, "the example imported the package"
print(json.dumps({"accuracy": float((predict(images) == labels).sum()) / len(labels)}))
"""


def test_the_documented_snippet_loads_the_export_without_the_package_and_reaches_the_test_accuracy(
    trained: Path,
) -> None:
    snippet = loading_snippet()
    assert 'run_dir = "runs/mnist-mlp"' in snippet
    code = snippet.replace('run_dir = "runs/mnist-mlp"', f"run_dir = {str(trained)!r}")
    code += f"\nmnist = {str(MNIST)!r}\n" + SCORE
    env = clean_env()
    env.pop("PYTHONPATH")
    # -I: isolated mode, so neither PYTHONPATH nor the working directory can supply the package.
    result = run_process([sys.executable, "-I", "-c", code], env)
    assert_ok(result)
    assert json.loads(result.stdout)["accuracy"] == read_summary(trained)["test_accuracy"]


def evaluate(path: Path) -> dict[str, Any]:
    result = run_trainer(["evaluate", str(path)])
    assert_ok(result)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


@pytest.mark.parametrize("kind", ["run-dir", "checkpoint", "export"])
def test_evaluate_reproduces_the_summary_from_each_kind_of_path(trained: Path, kind: str) -> None:
    path = {
        "run-dir": trained,
        "checkpoint": trained / "checkpoints" / read_json(trained / "checkpoints" / LATEST)["file"],
        "export": trained / "model.safetensors",
    }[kind]
    summary, result = read_summary(trained), evaluate(path)
    # One process on the CPU, the same evaluation code and chunks: the same figures, to the bit.
    assert (result["test_accuracy"], result["test_loss"]) == (summary["test_accuracy"], summary["test_loss"])
    assert result["val_accuracy"] == summary["val_accuracy"]
    assert (result["step"], result["test_samples"], result["val_samples"]) == (36, 10_000, 54_000)


def test_evaluate_of_the_best_export_matches_its_model_card(trained: Path) -> None:
    best = read_json(trained / "model.json")["models"]["best"]
    result = evaluate(trained / "best.safetensors")
    assert (result["kind"], result["step"]) == ("export", best["step"])
    assert (result["test_accuracy"], result["val_accuracy"]) == (best["test_accuracy"], best["val_accuracy"])


def damage(kind: str, trained: Path, where: Path) -> tuple[Path, str]:
    """A bad PATH of the given kind, and what the error line must say."""
    where.mkdir()
    if kind == "truncated-safetensors":
        shutil.copy(trained / "model.json", where)
        (where / "model.safetensors").write_bytes((trained / "model.safetensors").read_bytes()[:-100])
        return where / "model.safetensors", "is not a readable safetensors file"
    if kind == "export-without-model-json":
        shutil.copy(trained / "model.safetensors", where)
        return where / "model.safetensors", "has no model.json beside it"
    if kind == "garbage-checkpoint":
        garbage = b"not a checkpoint\n" * 300
        manifest = {"bytes": len(garbage), "sha256": hashlib.sha256(garbage).hexdigest()}  # vouches for the garbage
        (where / "step-00000007.pt").write_bytes(garbage)
        (where / "step-00000007.json").write_text(json.dumps(manifest))
        return where / "step-00000007.pt", "refused by the safe loader"
    if kind == "missing":
        return where / "no-such-run", "does not exist"
    return where, "holds no run"  # an empty directory


@pytest.mark.parametrize(
    "kind", ["truncated-safetensors", "export-without-model-json", "garbage-checkpoint", "missing", "not-a-run"]
)
def test_evaluate_refuses_a_bad_path_with_one_line(trained: Path, tmp_path: Path, kind: str) -> None:
    path, expected = damage(kind, trained, tmp_path / "bad")
    result = run_trainer(["evaluate", str(path)])
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trainer evaluate: error: "), result.stderr
    assert str(path) in lines[0] and expected in lines[0]


def test_trainer_help_names_the_evaluate_command() -> None:
    assert "trainer evaluate PATH" in " ".join(build_parser().format_help().split())
