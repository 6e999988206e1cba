"""The failure drill (benchmarks/drills.py) in CI: two random node kills, one of them the node
holding rank 0, on three test hosts with no shared checkpoint storage and an etcd rendezvous."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import clean_env, run_process


def test_two_random_node_kills_lose_no_sample_and_no_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "drills.json"
    cmd = [sys.executable, "-m", "benchmarks.drills", "--kills", "2", "--seed", "3", "--quick", "--out", str(out)]
    result = run_process(cmd, clean_env(), timeout=400)
    if result.returncode == 2:
        pytest.skip(result.stdout.strip())  # the drill's reason: no test hosts or no etcd
    print(result.stdout)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    found = json.loads(out.read_text())
    assert found["checks"] == {
        "completed": True,
        "samples_once": True,
        "checkpoints_kept": True,
        "recovery_measured": True,
    }, found["problems"]
    kills = found["kills"]
    assert len(kills) == 2 and any(kill["held_rank_0"] for kill in kills), kills
    assert all(kill["processes_killed"] >= 2 for kill in kills), kills  # the agent and its worker at least
    assert all(0 < kill["recovery_s"] < 120 for kill in kills), kills
    # Every node ends holding the last checkpoint, the ones that were killed and came back too.
    assert sorted(found["final_checkpoints"]) == ["node0", "node1", "node2"], found["final_checkpoints"]
