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

.PHONY: setup system bytecode train test lint bench mutants clean

# pip would compile the installed files one by one; compileall does it on every core (about 7 s
# sooner on two). Files that do not compile (torch ships a Python 3.12 test file) are left, as pip
# leaves them.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile -e '.[test,bench,report,tensorboard,etcd]'
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true
	touch $(STAMP)

setup: $(STAMP)

# The Debian packages the tests need (shellcheck, iproute2, chromium, Slurm, munge, etcd): installed
# as root with apt-get, else the tests that need them skip and say why. CI runs this same step.
system:
	.ci/system-packages

# The checkout's own modules compiled up front: where PYTHONDONTWRITEBYTECODE is set, every
# process started (each rank, each test's job) would compile them again, about 0.05 CPU-s each.
bytecode: $(STAMP)
	$(BIN)/python -m compileall -qq trainer tests benchmarks examples

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
