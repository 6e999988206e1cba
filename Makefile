# One command each: `make train` sets up and runs the main job, `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NPROC ?= 2
# Three test processes on two cores: much of the suite's time is spent waiting (on timeouts,
# on Slurm, on a rendezvous), so the others fill it. One file stays on one process
# (--dist loadfile), so the runs a file's tests share are trained once; the order is
# tests/conftest.py's.
TEST_WORKERS ?= 3
# Python writes a module's bytecode the first time a process imports it, and every later process
# reads it. make's commands allow that even where PYTHONDONTWRITEBYTECODE is set; otherwise each
# rank and each test's job would compile what it imports again, seconds of CPU each.
export PYTHONDONTWRITEBYTECODE :=
# Two recipes at once where nothing orders them: `make test` installs the Debian packages and the
# Python ones side by side on a fresh machine.
MAKEFLAGS += --jobs=2

.PHONY: setup system bytecode train test lint bench mutants clean

# pip would compile every installed file, one by one. Most are never imported (test suites,
# tools, the parts of torch a run does not use), so Python compiles what is imported instead
# (above, and `bytecode`): 13 s sooner from a fresh clone here.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile -e '.[test,bench,report,tensorboard,etcd]'
	touch $(STAMP)

setup: $(STAMP)

# The Debian packages the tests need (shellcheck, iproute2, chromium, Slurm, munge, etcd): installed
# as root with apt-get, else the tests that need them skip and say why. CI runs this same step.
system:
	.ci/system-packages

# What every rank imports, compiled by one process before the ranks or the test processes start
# side by side and each compile it at once.
bytecode: $(STAMP)
	$(BIN)/python -c 'import torch._dynamo, torch.distributed.run, trainer.cli'

train: $(STAMP) bytecode
	$(BIN)/torchrun --standalone --nproc_per_node=$(NPROC) -m trainer $(ARGS)

test: $(STAMP) system bytecode
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks.compare
	$(BIN)/python -m benchmarks.floor
	$(BIN)/python -m benchmarks.breakdown
	$(BIN)/python -m benchmarks.scaling
	$(BIN)/python -m benchmarks.startup
	@# Two test hosts in network namespaces: needs root, else it says so and make goes on.
	-$(BIN)/python -m benchmarks.hierarchical

# Deliberate one-line bugs, one at a time in a copy of the checkout, each against the tests that
# should catch it (tests/mutants.py; slow, not part of `make test`); the result in tests/mutants.txt.
mutants: $(STAMP) system
	$(BIN)/python -m tests.mutants --out tests/mutants.txt $(MUTANTS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs benchmarks/results .pytest_cache
