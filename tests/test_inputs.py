"""Bad input ends with one clear line naming the problem and the fix, and a non-zero exit."""

from __future__ import annotations

import gzip
import re
import shutil
from pathlib import Path

import pytest
from conftest import REPO, run_trainer

SHORT = ("--max-steps", "5", "--epochs", "1")


# Python lists every import on stderr: bad input must end before the compiler stack that building
# an optimiser imports (about 1 CPU-s), and after torch itself.
IMPORT_TIMES = {"PYTHONPROFILEIMPORTTIME": "1"}


def assert_ended_before_the_compiler_stack(result) -> None:
    assert re.search(r"\|\s+torch$", result.stderr, re.M), "no import times listed"
    assert not re.search(r"\|\s+torch\._dynamo$", result.stderr, re.M), "torch._dynamo imported before the error"


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("trainer: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.mark.parametrize(
    ("env", "fragments"),
    [
        ({"WORLD_SIZE": "2"}, ("WORLD_SIZE is set but RANK is not",)),
        ({"RANK": "0"}, ("RANK is set but WORLD_SIZE is not",)),
        ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, ("RANK=2", "0..1")),
        ({"RANK": "zero", "WORLD_SIZE": "2"}, ("RANK='zero' is not an integer",)),
        ({"RANK": "0", "WORLD_SIZE": "two"}, ("WORLD_SIZE='two' is not an integer",)),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, ("MASTER_PORT is not set", "e.g.")),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "29500"}, ("MASTER_ADDR is not set",)),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "70000"}, ("MASTER_PORT=70000",)),
        ({"MASTER_ADDR": "127.0.0.1"}, ("without RANK and WORLD_SIZE",)),
        (
            {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h"}
            | {"MASTER_PORT": "1"},
            ("LOCAL_RANK=3",),
        ),
    ],
)
def test_bad_environment_is_one_line(tmp_path: Path, env: dict[str, str], fragments: tuple[str, ...]) -> None:
    result = run_trainer([*SHORT, "--run-dir", str(tmp_path / "run")], timeout=60, **env, **IMPORT_TIMES)
    assert_one_line_error(result, *fragments)
    assert_ended_before_the_compiler_stack(result)
    assert not (tmp_path / "run").exists(), "nothing may be written before the input is validated"


@pytest.mark.parametrize(
    ("args", "fragment", "before_the_job"),
    [
        (["--val-fraction", "1.5"], "--val-fraction", True),
        (["--download"], "--download needs --data-dir", True),
        (["--backend", "nccl", "--device", "cpu"], "nccl needs CUDA", True),
        # These two need the data and the model, so they come once the job has started.
        (["--batch-size", "50000"], "exceeds the 48000 training samples", False),
        (["--cuda-graph", "on", "--device", "cpu"], "--cuda-graph on needs one process on a CUDA device", False),
        (
            ["--batch-size", "50", "--grad-accum-steps", "3"],
            "--grad-accum-steps 3 does not divide --batch-size 50",
            True,
        ),
        (["--grad-accum-steps", "0"], "--grad-accum-steps must be at least 1", True),
        (["--precision", "fp16"], "invalid choice: 'fp16'", True),
    ],
)
def test_bad_options_are_one_line(tmp_path: Path, args: list[str], fragment: str, before_the_job: bool) -> None:
    result = run_trainer([*SHORT, "--run-dir", str(tmp_path / "run"), *args], timeout=60, **IMPORT_TIMES)
    assert_one_line_error(result, fragment)
    if before_the_job:
        assert_ended_before_the_compiler_stack(result)


def test_unknown_choice_is_rejected_by_argparse(tmp_path: Path) -> None:
    result = run_trainer(["--optimizer", "lbfgs", "--run-dir", str(tmp_path)], timeout=60)
    assert result.returncode == 2
    assert "invalid choice: 'lbfgs'" in result.stderr


def make_data_dir(root: Path, compress: bool) -> Path:
    """A torchvision-layout MNIST copy made from the package's own files."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for source in (REPO / "trainer" / "tasks" / "mnist").glob("*.gz"):
        if compress:
            shutil.copy(source, raw / source.name)
        else:
            (raw / source.stem).write_bytes(gzip.decompress(source.read_bytes()))
    return raw


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "plain"])
def test_data_dir_in_torchvision_layout_trains(tmp_path: Path, compress: bool) -> None:
    make_data_dir(tmp_path / "data", compress)
    run_dir = tmp_path / "run"
    result = run_trainer([*SHORT, "--data-dir", str(tmp_path / "data"), "--run-dir", str(run_dir)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "summary.json").exists()


def test_missing_data_dir(tmp_path: Path) -> None:
    result = run_trainer([*SHORT, "--data-dir", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "run")])
    assert_one_line_error(result, "MNIST/raw does not exist", "--download")


def test_missing_data_file(tmp_path: Path) -> None:
    raw = make_data_dir(tmp_path / "data", compress=True)
    (raw / "t10k-labels-idx1-ubyte.gz").unlink()
    result = run_trainer([*SHORT, "--data-dir", str(tmp_path / "data"), "--run-dir", str(tmp_path / "run")])
    assert_one_line_error(result, "t10k-labels-idx1-ubyte[.gz] is missing")


def test_truncated_gzip(tmp_path: Path) -> None:
    raw = make_data_dir(tmp_path / "data", compress=True)
    path = raw / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100_000])
    result = run_trainer([*SHORT, "--data-dir", str(tmp_path / "data"), "--run-dir", str(tmp_path / "run")])
    assert_one_line_error(result, "train-images-idx3-ubyte.gz is truncated or not valid gzip")


def test_truncated_plain_file(tmp_path: Path) -> None:
    raw = make_data_dir(tmp_path / "data", compress=False)
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-784])
    result = run_trainer([*SHORT, "--data-dir", str(tmp_path / "data"), "--run-dir", str(tmp_path / "run")])
    assert_one_line_error(result, "train-images-idx3-ubyte holds", "truncated")


def test_wrong_shaped_file(tmp_path: Path) -> None:
    raw = make_data_dir(tmp_path / "data", compress=False)
    # Test labels where training labels belong: the header says 10000 items, not 60000.
    shutil.copy(raw / "t10k-labels-idx1-ubyte", raw / "train-labels-idx1-ubyte")
    result = run_trainer([*SHORT, "--data-dir", str(tmp_path / "data"), "--run-dir", str(tmp_path / "run")])
    assert_one_line_error(result, "train-labels-idx1-ubyte has header", "shape=(10000,)", "expected")


def test_images_in_place_of_labels(tmp_path: Path) -> None:
    raw = make_data_dir(tmp_path / "data", compress=False)
    shutil.copy(raw / "t10k-images-idx3-ubyte", raw / "t10k-labels-idx1-ubyte")
    result = run_trainer([*SHORT, "--data-dir", str(tmp_path / "data"), "--run-dir", str(tmp_path / "run")])
    assert_one_line_error(result, "t10k-labels-idx1-ubyte has header magic=2051", "expected magic=2049")
