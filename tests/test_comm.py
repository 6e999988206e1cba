"""Every ``--comm`` option against plain DDP over gloo, the shared-memory path's failure modes, and cleanup.

Tolerances, elementwise, with ``m = mean over ranks of |local gradient|`` (the summed magnitudes):

- gloo, shm, auto at world size 2: bit for bit equal to DDP's own all-reduce.
- shm at world size 4: ``|shm - gloo| <= 2 (W - 1) 2^-24 W m`` (two float32 sums of W terms in
  different orders, each off by at most ``(W - 1) 2^-24`` of the summed magnitudes), and every
  rank holds the same bits.
- bf16: ``|bf16 - exact| <= 2^-7 m``: the input and the sum are each rounded to 8 significant
  bits (half an ulp is ``2^-8``).
- fp16: ``|fp16 - exact| <= 2^-10 m + 2^-23``: two roundings to 11 bits, plus fp16's subnormal
  spacing (``2^-24``) for the tiny gradients that underflow.
- powersgd: exact during warm-up; then biases exact and each weight matrix the orthogonal
  projection of the exact average onto a rank-4 subspace (residual orthogonal to the result).
- localsgd: exact during warm-up; then each rank keeps exactly its own local gradient, and
  ``sync_replicas`` leaves identical parameters on every rank.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, assert_ok, clean_env, free_port, read_summary, run_process, run_torchrun
from trainer import shm
from trainer.comm import COMM_OPTIONS
from trainer.jobs import torchrun_command

WORKER = "tests.comm_worker"  # a module, as torchrun_command starts it
WARMUP = 2  # matches comm_worker.WARMUP: passes 0 and 1 are exact for every option, pass 2 is not


def shm_entries() -> set[str]:
    return {p.name for p in shm.SHM_DIR.glob(f"{shm.NAME_PREFIX}*")} if shm.SHM_DIR.is_dir() else set()


def run_worker(mode: str, tmp_path: Path, nproc: int, gpu: bool = False) -> None:
    """``comm_worker.py MODE`` under torchrun (GPUs visible if ``gpu``); it must succeed and leave no
    shared memory behind."""
    before = shm_entries()
    cmd = torchrun_command(nproc, WORKER, [mode, str(tmp_path)])
    assert_ok(run_process(cmd, clean_env(gpu), timeout=120))
    assert shm_entries() - before == set(), "shared memory left behind"


def run_grads(tmp_path: Path, nproc: int) -> list[dict]:
    run_worker("grads", tmp_path, nproc)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(nproc)]


@pytest.fixture(scope="module")
def world2(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_grads(tmp_path_factory.mktemp("world2"), 2)


def mean_local_magnitude(ranks: list[dict], pass_index: int) -> list[torch.Tensor]:
    per_rank = [r["local"][pass_index] for r in ranks]
    return [torch.stack([g[i].abs() for g in per_rank]).mean(0) for i in range(len(per_rank[0]))]


def assert_same_on_every_rank(ranks: list[dict], option: str) -> None:
    for other in ranks[1:]:
        for mine, theirs in zip(ranks[0][option][-1], other[option][-1], strict=True):
            assert torch.equal(mine, theirs), f"{option}: replicas received different gradients"


@pytest.mark.parametrize("option", ["gloo", "shm", "auto"])
def test_exact_options_equal_gloo_bit_for_bit(world2: list[dict], option: str) -> None:
    for rank in world2:
        for step in range(len(rank["reference"])):
            for got, want in zip(rank[option][step], rank["reference"][step], strict=True):
                assert torch.equal(got, want), f"{option} differs from gloo DDP at pass {step}"
    expected = "gloo" if option == "gloo" else "shm"
    assert world2[0][f"{option}:resolved"] == expected
    if expected == "shm":
        assert world2[0][f"{option}:shm_file_left"] is False, "the shared file must be unlinked once mapped"


@pytest.mark.parametrize(("option", "rtol", "atol"), [("bf16", 2**-7, 0.0), ("fp16", 2**-10, 2**-23)])
def test_compressed_options_within_rounding_bound(world2: list[dict], option: str, rtol: float, atol: float) -> None:
    assert_same_on_every_rank(world2, option)
    assert not torch.equal(world2[0][option][0][0], world2[0]["reference"][0][0]), "no rounding happened"
    for step in range(len(world2[0]["reference"])):
        scale = mean_local_magnitude(world2, step)
        for got, want, m in zip(world2[0][option][step], world2[0]["reference"][step], scale, strict=True):
            excess = (got - want).abs() - (rtol * m + atol)
            assert excess.max() <= 0, f"{option}: error exceeds the stated bound by {excess.max():.3g}"


def test_powersgd_exact_in_warmup_then_a_projection(world2: list[dict]) -> None:
    assert_same_on_every_rank(world2, "powersgd")
    rank0 = world2[0]
    for step in range(WARMUP):
        for got, want in zip(rank0["powersgd"][step], rank0["reference"][step], strict=True):
            assert torch.equal(got, want)
    compressed = 0
    for got, want in zip(rank0["powersgd"][WARMUP], rank0["reference"][WARMUP], strict=True):
        if got.dim() == 1:
            assert torch.equal(got, want), "PowerSGD all-reduces vectors uncompressed"
            continue
        compressed += 1
        residual = want - got
        assert not torch.equal(got, want)
        assert residual.norm() <= want.norm()
        # Orthogonal projection: the residual is orthogonal to what was kept.
        assert abs(float((got * residual).sum())) <= 1e-3 * float(want.norm()) ** 2
    assert compressed == 3


def test_localsgd_exact_in_warmup_then_local_and_averaged(world2: list[dict]) -> None:
    for rank in world2:
        for step in range(WARMUP):
            for got, want in zip(rank["localsgd"][step], rank["reference"][step], strict=True):
                assert torch.equal(got, want)
        for got, local in zip(rank["localsgd"][WARMUP], rank["local"][WARMUP], strict=True):
            assert torch.equal(got, local), "after warm-up each rank steps on its own gradient"
    for mine, theirs in zip(world2[0]["localsgd:synced_params"], world2[1]["localsgd:synced_params"], strict=True):
        assert torch.equal(mine, theirs)


def test_every_option_has_a_test_above() -> None:
    """A new --comm option fails here until it gets its own comparison against gloo."""
    tested = {"gloo", "shm", "auto", "bf16", "fp16", "powersgd", "localsgd"}
    assert set(COMM_OPTIONS) == tested


def test_shm_at_world_size_4_within_summation_order_bound(tmp_path: Path) -> None:
    ranks = run_grads(tmp_path, 4)
    world = len(ranks)
    assert ranks[0]["shm:resolved"] == "shm"
    assert_same_on_every_rank(ranks, "shm")
    for step in range(len(ranks[0]["reference"])):
        scale = mean_local_magnitude(ranks, step)
        for got, want, m in zip(ranks[0]["shm"][step], ranks[0]["reference"][step], scale, strict=True):
            bound = 2 * (world - 1) * 2**-24 * world * m
            assert ((got - want).abs() - bound).max() <= 0


def run_peer_failure(tmp_path: Path, mode: str) -> dict:
    """Two plain processes (no torchrun, which would kill the survivor itself); rank 1 misbehaves."""
    before = shm_entries()
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", WORKER, mode, str(tmp_path)],
            env=clean_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        outputs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 0, outputs[0][-3000:]
    assert shm_entries() - before == set(), "shared memory left behind"
    return json.loads((tmp_path / "rank0.json").read_text())


def test_shm_raises_when_a_peer_dies(tmp_path: Path) -> None:
    outcome = run_peer_failure(tmp_path, "die")
    assert outcome["error"] is not None and "exited" in outcome["error"]
    assert outcome["shm_file_left"] is False


def test_shm_raises_when_a_peer_stalls_past_the_timeout(tmp_path: Path) -> None:
    outcome = run_peer_failure(tmp_path, "stall")
    assert outcome["error"] is not None and "did not reach" in outcome["error"]


def test_shm_refuses_to_accumulate_into_shared_gradients(tmp_path: Path) -> None:
    run_worker("accumulate", tmp_path, 2)
    for rank in (0, 1):
        error = json.loads((tmp_path / f"rank{rank}.json").read_text())["error"]
        assert error is not None and "zero_grad(set_to_none=True)" in error


def test_chunks_cover_the_vector_on_cache_line_boundaries() -> None:
    for total, world in [(535_818, 2), (535_818, 4), (10, 4), (1, 3)]:
        bounds = shm.chunk_bounds(total, world)
        assert bounds[0][0] == 0 and bounds[-1][1] == total
        assert all(hi == next_lo for (_, hi), (next_lo, _) in itertools.pairwise(bounds))
        assert all(lo % shm.CHUNK_ALIGN == 0 or lo == total for lo, _ in bounds)


def test_spans_cut_every_tensor_at_the_owners_chunks() -> None:
    """Each element of each tensor lies in exactly one span, inside the chunk of the span's owner."""
    for sizes, world in [((200_704, 256, 131_072, 128, 2_560, 10), 2), ((7, 1, 40), 3), ((5,), 4), ((16, 16, 16), 4)]:
        bounds = shm.chunk_bounds(sum(sizes), world)
        spans = shm.plan_spans(sizes, bounds)
        covered = [[0] * size for size in sizes]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        for span in spans:
            lo, hi = bounds[span.owner]
            assert span.offset == starts[span.index] + span.begin
            assert lo <= span.offset and span.offset + span.end - span.begin <= hi
            for element in range(span.begin, span.end):
                covered[span.index][element] += 1
        assert all(count == 1 for tensor in covered for count in tensor)


def test_unsupported_reasons() -> None:
    cpu = torch.device("cpu")
    assert "float32" in (shm.unsupported_reason(cpu, ["a"], machine="x86_64", dtypes={torch.float64}) or "")
    assert shm.unsupported_reason(cpu, ["a", "a"], machine="x86_64") is None
    assert "hosts" in (shm.unsupported_reason(cpu, ["a", "b"], machine="x86_64") or "")
    assert "x86-64" in (shm.unsupported_reason(cpu, ["a", "a"], machine="aarch64") or "")
    assert "cuda" in (shm.unsupported_reason(torch.device("cuda"), ["a", "a"], machine="x86_64") or "")


def test_trainer_logs_the_sync_choice_and_matches_gloo(tmp_path: Path) -> None:
    """End to end: the default picks shm, says so, and trains to the same bits as --comm gloo."""
    hashes = {}
    for option in ("auto", "gloo"):
        run_dir = tmp_path / option
        result = run_torchrun(2, ["--epochs", "1", "--max-steps", "60", "--comm", option, "--run-dir", str(run_dir)])
        assert_ok(result)
        resolved = "shm" if option == "auto" else "gloo"
        assert f"gradient sync: {resolved}" in result.stderr
        hashes[option] = read_summary(run_dir)["params_sha256"]
    assert hashes["auto"] == hashes["gloo"]
