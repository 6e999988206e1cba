"""Unit tests of the pure pieces: config, environment contract, sampling, data checks."""

from __future__ import annotations

import dataclasses
import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.cli import parse_run
from trainer.core.collector import collector_paused
from trainer.core.config import TrainConfig, build_parser
from trainer.core.errors import UsageError
from trainer.core.weights import count_parameters, params_sha256
from trainer.distributed.env import DistEnv, read_dist_env
from trainer.engine.sampling import EpochPlan, epoch_permutation, split_indices
from trainer.tasks.mnist_data import FILES, MEAN, NORMALIZE_ROWS, STD, load_mnist, normalize
from trainer.tasks.mnist_mlp import default_model


def parse_config(argv: list[str]) -> TrainConfig:
    return parse_run(argv)[0]


def test_defaults_match_the_documented_ones() -> None:
    cfg, task = parse_run([])
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.optimizer) == (5, 32, 0.01, 0.9, "sgd")
    assert (cfg.task, task.name, cfg.seed, cfg.max_steps) == ("mnist-mlp", "mnist-mlp", 0, None)
    assert (task.options.hidden, task.options.val_fraction) == ((512, 256), 0.2)
    assert cfg.task_options == {"hidden": [512, 256], "val_fraction": 0.2, "data_dir": None, "download": False}


def test_config_is_frozen_and_round_trips_through_json() -> None:
    cfg = parse_config(["--hidden", "64,32", "--optimizer", "adam", "--max-steps", "7"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3  # type: ignore[misc]
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_every_field_has_a_documented_flag() -> None:
    help_text = build_parser().format_help()
    for field in dataclasses.fields(TrainConfig):
        if field.name == "task_options":  # the task's own flags, below
            continue
        assert "--" + field.name.replace("_", "-") in help_text
        assert field.metadata["help"]


def test_the_task_options_show_in_help_under_the_task() -> None:
    from trainer.tasks.mnist_mlp import MnistMLP, MnistOptions

    help_text = build_parser(MnistOptions, MnistMLP.name).format_help()
    assert "options of the task mnist-mlp" in help_text
    for field in dataclasses.fields(MnistOptions):
        assert "--" + field.name.replace("_", "-") in help_text


def test_hidden_widths_parse_and_reject_garbage() -> None:
    assert parse_run(["--hidden", "128"])[1].options.hidden == (128,)
    assert parse_run(["--hidden", ""])[1].options.hidden == ()
    with pytest.raises(SystemExit):
        parse_config(["--hidden", "12,x"])
    with pytest.raises(UsageError, match="--hidden"):
        parse_config(["--hidden", "0,5"])


def test_no_variables_means_one_process() -> None:
    assert read_dist_env({}) == DistEnv()


def test_torchrun_style_environment() -> None:
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
        "TORCHELASTIC_RESTART_COUNT": "2",
    }
    assert read_dist_env(env) == DistEnv(3, 4, 1, 2, "10.0.0.1", 29500, 2)


def test_local_rank_defaults_to_rank_on_one_node() -> None:
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1234"}
    dist_env = read_dist_env(env)
    assert (dist_env.local_rank, dist_env.local_world_size) == (1, 2)


def test_split_is_deterministic_disjoint_and_complete() -> None:
    train, val = split_indices(60_000, 0.2, seed=0)
    assert (len(train), len(val)) == (48_000, 12_000)
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(60_000))
    again, _ = split_indices(60_000, 0.2, seed=0)
    other, _ = split_indices(60_000, 0.2, seed=1)
    assert torch.equal(train, again) and not torch.equal(train, other)


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_ranks_take_disjoint_batches_and_equal_steps(world_size: int) -> None:
    n, batch = 1_000, 7
    perm = epoch_permutation(n, seed=0, epoch=2)
    plans = [EpochPlan(perm, 0, batch, world_size, rank) for rank in range(world_size)]
    per_rank = [torch.cat(list(plan.batches())) for plan in plans]
    steps = n // (batch * world_size)
    assert all(plan.steps == steps for plan in plans)
    seen = torch.cat(per_rank)
    assert len(seen) == steps * batch * world_size == len(seen.unique())
    # Together the ranks consume exactly the first steps*G positions of the epoch's order.
    assert torch.equal(seen.sort().values, perm[: len(seen)].sort().values)


def test_resuming_at_another_world_size_covers_the_rest_exactly() -> None:
    n, perm = 960, epoch_permutation(960, seed=3, epoch=0)
    first = [EpochPlan(perm, 0, 8, 2, r) for r in range(2)]
    done = [torch.cat(list(p.batches()))[: 8 * 10] for p in first]  # 10 steps at world size 2
    consumed = first[0].consumed_after(10)
    rest = [torch.cat(list(EpochPlan(perm, consumed, 16, 1, 0).batches()))]
    everything = torch.cat(done + rest)
    assert consumed == 160
    assert len(everything) == n == len(everything.unique())


def test_epochs_are_shuffled_differently() -> None:
    assert not torch.equal(epoch_permutation(100, 0, 0), epoch_permutation(100, 0, 1))


def test_bundled_mnist_loads_with_expected_shapes() -> None:
    data = load_mnist(None)
    assert data.train_x.shape == (60_000, 784) and data.train_x.dtype == torch.uint8
    assert data.test_x.shape == (10_000, 784)
    assert int(data.train_y.max()) == 9 and int(data.test_y.min()) == 0


def test_mnist_is_decoded_once_and_later_starts_read_the_kept_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first load keeps each decoded file (named by the gzip's SHA-256); the next reads that
    copy, whatever it holds, as long as its size is the one the gzip file records; a copy of
    another size is decoded again and replaced."""
    monkeypatch.setenv("TRAINER_CACHE_DIR", str(tmp_path))
    first = load_mnist(None)
    kept = {path.name.split(".")[0]: path for path in (tmp_path / "gunzipped").iterdir()}
    assert sorted(kept) == sorted(FILES.values())
    assert kept["train-images-idx3-ubyte"].stat().st_size == 16 + 60_000 * 784
    labels = kept["t10k-labels-idx1-ubyte"]
    marked = bytearray(labels.read_bytes())
    marked[8] = (marked[8] + 1) % 10  # the first test label, changed in the copy only
    labels.write_bytes(bytes(marked))
    second = load_mnist(None)
    assert torch.equal(second.train_x, first.train_x) and torch.equal(second.train_y, first.train_y)
    assert int(second.test_y[0]) == (int(first.test_y[0]) + 1) % 10  # read from the copy
    labels.write_bytes(bytes(marked[:-1]))  # a copy cut short is not read, and is replaced
    assert torch.equal(load_mnist(None).test_y, first.test_y)
    assert labels.stat().st_size == 8 + 10_000


def test_mnist_loads_where_no_decoded_copy_can_be_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("TRAINER_CACHE_DIR", str(blocker))
    data = load_mnist(None)
    assert data.train_x.shape == (60_000, 784) and blocker.read_text() == "not a folder"


@pytest.mark.parametrize("count", [1, NORMALIZE_ROWS, 3 * NORMALIZE_ROWS + 5])
def test_normalize_in_chunks_equals_the_formula_bit_for_bit(count: int) -> None:
    pixels = torch.randint(
        0, 256, (4 * NORMALIZE_ROWS, 784), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    rows = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(1))[:count]
    formula = pixels[rows].to(torch.float32).div(255.0).sub(MEAN).div(STD)
    assert torch.equal(normalize(pixels, rows), formula)
    assert torch.equal(normalize(pixels[rows]), formula)


def test_default_model_size_and_fingerprint() -> None:
    cfg = parse_config([])
    model = default_model(cfg.seed)
    assert count_parameters(model) == 535_818
    assert params_sha256(model) == params_sha256(default_model(cfg.seed))
    assert params_sha256(model) != params_sha256(default_model(parse_config(["--seed", "1"]).seed))


def test_the_gpt_attends_in_float32_under_a_cpu_autocast_and_matmuls_in_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU's bf16 attention backward is slower than its float32 one (docs/shakespeare.md)."""
    from trainer.tasks import gpt

    seen: list[torch.dtype] = []
    attend = gpt.F.scaled_dot_product_attention

    def recording(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append(q.dtype)
        return attend(q, *args, **kwargs)

    monkeypatch.setattr(gpt.F, "scaled_dot_product_attention", recording)
    model = gpt.GPT(gpt.GPTShape(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=False))
    ids = torch.randint(65, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
    assert seen == [torch.float32, torch.float32] and logits.dtype == torch.bfloat16
    seen.clear()
    model(ids)
    assert seen == [torch.float32, torch.float32]


def test_the_collector_pause_ends_with_the_block_and_freezes_only_when_asked() -> None:
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled() and gc.get_freeze_count() == frozen
    gc.disable()  # a caller's own pause outlives the block
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
    try:
        with collector_paused(freeze=True):
            made = [[] for _ in range(100)]
        assert gc.isenabled() and gc.get_freeze_count() >= frozen + len(made)
    finally:
        gc.unfreeze()


def test_importing_the_package_leaves_the_collector_as_it_was() -> None:
    """``import trainer`` imports no torch; its public names import it on first use with the collector
    paused, and leave it on again with nothing frozen (a user's script keeps its own collector);
    ``python -m trainer`` freezes its own start."""
    code = "import gc, sys, trainer; print('torch' in sys.modules); trainer.Task; "
    code += "print(gc.isenabled(), gc.get_freeze_count())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "True", "0"]
