"""Every benchmark runs end to end in its quick mode and leaves its files (figures are not judged here)."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.conftest import SESSION_TMP, assert_ok, clean_env, run_process

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def bench(module: str, out: Path, *args: str) -> str:
    result = run_process(
        [sys.executable, "-m", f"benchmarks.{module}", "--quick", "--out", str(out), *args], clean_env()
    )
    assert_ok(result)
    assert json.loads((out / "machine.json").read_text())["torch"]
    return result.stdout


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_scaling_quick(tmp_path: Path) -> None:
    stdout = bench("scaling", tmp_path, "--comm", "auto")
    rows = read_csv(tmp_path / "scaling.csv")
    assert [(r["world_size"], r["comm"]) for r in rows] == [("1", "none"), ("2", "shm")]
    for row in rows:
        assert float(row["samples_per_second"]) > 0
        assert float(row["cpu_percent_total"]) > 0 and float(row["rss_mb_total"]) > 0
        assert int(float(row["os_threads_per_rank"])) >= 1
    assert float(rows[1]["sync_ms_per_batch"]) > 0 and float(rows[0]["sync_ms_per_batch"]) == 0
    assert float(rows[0]["speedup"]) == 1.0
    assert "| world |" in stdout and (tmp_path / "scaling.md").read_text().count("\n| ") == 3
    assert len(read_csv(tmp_path / "raw.csv")) == 2
    assert (tmp_path / "scaling.png").exists() == HAVE_MATPLOTLIB


def test_compare_quick(tmp_path: Path) -> None:
    bench("compare", tmp_path)
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    floor = "compute floor (bare step, no exchange)"
    assert [r["who"] for r in rows] == ["baseline, torchrun threads", "plain DDP, data in memory", "trainer", floor]
    assert all(r["train_seconds"] > 0 and 0 < r["test_accuracy"] <= 1 for r in rows[:-1])
    assert all(r["ceiling"] == r["train_seconds"] / rows[-1]["train_seconds"] for r in rows)


def test_floor_quick(tmp_path: Path) -> None:
    stdout = bench("floor", tmp_path)
    result = json.loads((tmp_path / "floor.json").read_text())
    assert [r["what"] for r in result["rows"]] == ["floor ws1", "trainer ws1", "floor ws2", "trainer ws2"]
    assert all(r["ms_per_step"] > 0 for r in result["rows"])
    assert all(r["whole_run_ms_per_step"] > 0 for r in result["rows"] if r["what"].startswith("trainer"))
    assert result["ratios"]["ws1"] > 0 and result["ratios"]["ws2"] > 0
    # Two concurrent floor processes per round, one two-thread process, and one run of each world size.
    assert [r["what"] for r in read_csv(tmp_path / "raw.csv")].count("floor ws2") == 2
    assert "trainer/floor" in stdout


def test_breakdown_quick(tmp_path: Path) -> None:
    scratch = SESSION_TMP  # the workers' TMPDIR (clean_env)
    before = set(scratch.glob("breakdown-*"))
    stdout = bench("breakdown", tmp_path)
    assert set(scratch.glob("breakdown-*")) == before, "a worker left its run directory behind"
    rows = json.loads((tmp_path / "breakdown.json").read_text())["rows"]
    by_world = {world: [r["what"] for r in rows if r["world_size"] == world] for world in (1, 2)}
    assert by_world[1] == ["bare step", "+ guard, accuracy", "train_step", "train loop", "grads read", "gradient copy"]
    assert by_world[2] == [*by_world[1][:2], "+ gradient sync", *by_world[1][2:4], "sync alone", *by_world[1][4:]]
    assert all(r["ms"] > 0 for r in rows)
    assert "added ms" in stdout


def test_startup_quick(tmp_path: Path) -> None:
    """One round at world size 1, each way (world size 2 starts the same command under torchrun)."""
    bench("startup", tmp_path, "--worlds", "1")
    rows = read_csv(tmp_path / "startup.csv")
    variants = ["as shipped", "collector on", "MNIST decoded each start"]
    assert [(r["world_size"], r["variant"]) for r in rows] == [("1", variant) for variant in variants]
    assert all(float(r["cpu_s"]) > 0 and float(r["wall_s"]) > 0 for r in rows)
    assert float(rows[0]["cpu_vs_shipped"]) == 1.0
    assert len(read_csv(tmp_path / "raw.csv")) == 3


def test_sync_quick(tmp_path: Path) -> None:
    bench("sync", tmp_path)
    sizes = read_csv(tmp_path / "sync-sizes.csv")
    assert {r["method"] for r in sizes} == {"gloo", "shm", "gloo fp16", "gloo bf16"}
    ddp = read_csv(tmp_path / "sync-ddp.csv")
    assert {"gloo", "shm", "bf16", "fp16", "powersgd", "localsgd"} <= {r["comm"] for r in ddp}
    lines = read_csv(tmp_path / "sync-cross-core.csv")
    assert len(lines) == 3 and all(float(r["median_ms"]) > 0 for r in lines)
    assert "floor under a shared-memory exchange" in (tmp_path / "sync.md").read_text()


def test_overhead_quick(tmp_path: Path) -> None:
    bench("overhead", tmp_path, "--threads", "1")  # one thread: two stall whenever the test machine is busy
    rows = read_csv(tmp_path / "overhead.csv")
    assert [r["loop"] for r in rows] == ["floor", "train_step", "run_epoch"]
    assert all(float(r["ms_per_step"]) > 0 for r in rows)


def test_checkpoint_quick(tmp_path: Path) -> None:
    bench("checkpoint", tmp_path)
    rows = read_csv(tmp_path / "checkpoint.csv")
    assert {r["what"] for r in rows} >= {"save", "load restore"}
    assert len(read_csv(tmp_path / "raw.csv")) == 3


def test_algorithms_quick(tmp_path: Path) -> None:
    bench("algorithms", tmp_path)
    rows = read_csv(tmp_path / "algorithms.csv")
    assert [r["comm"] for r in rows] == ["shm", "localsgd"]
    assert all(0 < float(r["test_accuracy"]) <= 1 for r in rows)


def test_hierarchical_quick(tmp_path: Path) -> None:
    """Two test hosts (root needed; skipped with the benchmark's reason otherwise): part 1 for the
    hierarchical option (flat gloo's runs go through the same function, and tests/test_multinode.py
    trains both on two hosts), part 2 for both methods."""
    cmd = [sys.executable, "-m", "benchmarks.hierarchical", "--quick", "--comms", "hierarchical"]
    cmd += ["--out", str(tmp_path)]
    result = run_process(cmd, clean_env(), timeout=600)
    if result.returncode != 0 and "cannot make test hosts" in result.stderr:
        pytest.skip(result.stderr.strip())
    assert_ok(result)
    rows = read_csv(tmp_path / "hierarchical.csv")
    assert [r["comm"] for r in rows] == ["hierarchical"]
    for row in rows:
        assert float(row["sync_ms_per_batch"]) > 0 and float(row["ms_per_step"]) > 0
        assert float(row["link_bytes_per_step_per_host"]) > 0
    assert len(read_csv(tmp_path / "raw.csv")) == 2  # a short and a long run
    assert {r["method"] for r in read_csv(tmp_path / "allreduce.csv")} == {"gloo", "hierarchical"}
    assert "link bytes/step/host" in (tmp_path / "hierarchical.md").read_text()


def test_nanogpt_quick(tmp_path: Path) -> None:
    """nanoGPT's own train.py and the trainer (float32 and bf16) on the same recipe, 24 iterations,
    both world sizes."""
    cmd = [sys.executable, "-m", "benchmarks.nanogpt", "--iters", "24", "--out", str(tmp_path)]
    assert_ok(run_process(cmd, clean_env(), timeout=600))
    rows = read_csv(tmp_path / "nanogpt.csv")
    assert [(r["world_size"], r["trainer"], r["precision"]) for r in rows] == [
        ("1", "nanoGPT train.py", "fp32"),
        ("1", "trainer", "fp32"),
        ("1", "trainer", "bf16"),
        ("2", "nanoGPT train.py", "fp32"),
        ("2", "trainer", "fp32"),
        ("2", "trainer", "bf16"),
    ]
    for row in rows:
        assert float(row["ms_per_iter"]) > 0 and float(row["floor_ms"]) > 0
        assert 2.0 < float(row["val_loss"]) < 4.2, row  # below a uniform guess (ln 65 = 4.17) after 24 steps
    assert float(rows[0]["own_estimate"]) > 0  # nanoGPT's own 20-batch estimate, read from its log
