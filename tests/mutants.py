"""Mutation check: deliberate one-line bugs, each applied alone to a copy of this checkout, and the tests
that should catch it run against the copy. A mutant is caught when those tests fail (pytest exit 1);
one that leaves them green, or breaks the copy in some other way (exit 2 and up: a collection
error, an interrupted run), is reported as such.

    python -m tests.mutants [NAME ...] [--out FILE]    # or: make mutants

Slow (each mutant starts real trainers) and not part of ``make test`` or CI. The checkout itself is
never changed: each mutant gets a fresh copy under a temporary directory.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What a copy needs to run the tests: the package, the tests, the launch scripts, the config.
COPIED = ("trainer", "tests", "launch", "benchmarks", "pyproject.toml")


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # file, relative to the checkout
    old: str  # one line's text, found exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments: the tests that should catch it


MUTANTS = (
    Mutant(
        "skip restoring numpy's RNG",
        "trainer/core/rng.py",
        '    np.random.set_state(numpy_rng_from_plain(state["numpy"]))',
        "    pass",
        ("tests/test_checkpoint.py::test_rng_states_survive_weights_only_loading",),
    ),
    Mutant(
        "off-by-one in the sample position",
        "trainer/engine/sampling.py",
        "        return self.start + step * self.global_batch",
        "        return self.start + step * self.global_batch + 1",
        ("tests/test_units.py", "-k", "disjoint or covers_the_rest"),
    ),
    Mutant(
        "every epoch shuffled alike",
        "trainer/engine/sampling.py",
        "    generator = torch.Generator().manual_seed((seed * 1_000_003 + _EPOCH_STREAM) * 1_000 + epoch)",
        "    generator = torch.Generator().manual_seed((seed * 1_000_003 + _EPOCH_STREAM) * 1_000)",
        ("tests/test_units.py::test_epochs_are_shuffled_differently",),
    ),
    Mutant(
        "wrong summation order in the shm reduce",
        "trainer/sync/shm.py",
        "        for slot in plan.own_from_peers:",
        "        for slot in reversed(plan.own_from_peers):",
        ("tests/test_comm.py::test_shm_sums_in_the_documented_fixed_order[3]",),
    ),
    Mutant(
        "a sum's chunk scaled by 7 float32 ulps in the shm reduce",
        "trainer/sync/shm.py",
        "            plan.own_result.add_(slot)",
        "            plan.own_result.add_(slot).mul_(1 + 4e-7)",
        ("tests/test_comm.py::test_shm_equals_gloo_on_changing_weights[3-shm]",),
    ),
    Mutant(
        "no fsync before rename",
        "trainer/core/fileio.py",
        "            os.fsync(handle.fileno())",
        "            pass",
        ("tests/test_checkpoint.py::test_every_file_is_fsynced_before_its_rename_and_its_directory_after",),
    ),
    Mutant(
        "the run directory's lock not taken",
        "trainer/lifecycle/runlock.py",
        "            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)",
        "            pass",
        ("tests/test_lifecycle.py::test_a_second_launch_into_a_live_run_dir_is_refused_and_changes_nothing[1]",),
    ),
    Mutant(
        "the non-finite guard inverted",
        "trainer/lifecycle/guard.py",
        "    return torch.isfinite(torch.stack(sums).sum())",
        "    return ~torch.isfinite(torch.stack(sums).sum())",
        ("tests/test_lifecycle.py::test_divergence_stops_with_the_step_and_the_newest_good_checkpoint[1]",),
    ),
    Mutant(
        "a checkpoint's checksum not verified",
        "trainer/lifecycle/checkpoint.py",
        "    if hashlib.sha256(data).hexdigest() != expected_sha:",
        "    if False:",
        ("tests/test_checkpoint.py", "-k", "damaged"),
    ),
    Mutant(
        "pruning deletes the best checkpoint",
        "trainer/lifecycle/checkpoint.py",
        '        if best is not None and path.name == best["file"]:',
        "        if False:",
        ("tests/test_export.py::test_pruning_keeps_the_best_and_the_pointers_name_newest_and_best",),
    ),
    Mutant(
        "a stop signal's exit status not 128 + N",
        "trainer/lifecycle/signals.py",
        '        return 128 + self.signum  # the shell\'s convention for "ended by signal N"',
        "        return 1",
        ("tests/test_elastic.py::test_sigint_stop_writes_a_checkpoint_and_exits_130",),
    ),
    Mutant(
        "a rank steps its chunk of the shared weights with another momentum",
        "trainer/sync/shared_step.py",
        "                momentum=momentum,",
        '                momentum=momentum * (1 + 1e-4 * (__import__("os").environ.get("RANK") == "1")),',
        ("tests/test_train.py::test_all_ranks_end_with_identical_parameters",),
    ),
)


def copy_checkout(into: Path) -> None:
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, into / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, into / name)


def apply(mutant: Mutant, root: Path) -> None:
    path = root / mutant.path
    text = path.read_text()
    count = text.count(mutant.old + "\n")
    if count != 1:
        raise SystemExit(f"{mutant.name}: the line to change occurs {count} times in {mutant.path}, not once")
    path.write_text(text.replace(mutant.old + "\n", mutant.new + "\n"))


def run(mutant: Mutant) -> tuple[str, float, str]:
    """(verdict, seconds, the tests' last lines) for one mutant in a fresh copy."""
    with tempfile.TemporaryDirectory(prefix="trainer-mutant-") as tmp:
        root = Path(tmp)
        copy_checkout(root)
        apply(mutant, root)
        started = time.monotonic()
        # The copy's conftest makes every process it starts import the copy (PYTHONPATH), and
        # ``python -m pytest`` from the copy imports it first in this process too.
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests]
        result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=1800)
        seconds = time.monotonic() - started
    verdict = {0: "SURVIVED", 1: "caught"}.get(result.returncode, f"error (pytest exit {result.returncode})")
    failures = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR", "E  "))]
    tail = "\n".join(failures[:3] or result.stdout.splitlines()[-3:])
    return verdict, seconds, tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="run only the mutants whose name contains one of these")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.names or any(n in m.name for n in args.names)]
    lines = [f"mutation check, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {len(chosen)} mutants"]
    print(lines[0], flush=True)
    caught = 0
    for mutant in chosen:
        verdict, seconds, tail = run(mutant)
        caught += verdict == "caught"
        entry = [f"{verdict:>8}  {mutant.name}  ({mutant.path}; {seconds:.0f} s; {' '.join(mutant.tests)})"]
        entry += [f"          {line[:200]}" for line in tail.splitlines()]
        print("\n".join(entry), flush=True)
        lines += entry
    lines.append(f"{caught} of {len(chosen)} caught")
    print(lines[-1])
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    sys.exit(0 if caught == len(chosen) else 1)


if __name__ == "__main__":
    main()
