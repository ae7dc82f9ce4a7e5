# One-command setup and the project's entry points. Every target sets up what is missing first:
# a virtual environment in .venv, the package with its dependencies, Fashion-MNIST, the Jupyter
# kernel "gvr_lab" and JupyterLab's settings (both inside .venv, see gvr_lab/lab.py).
# Override the interpreter with `make PYTHON=python3.12 ...`.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.gvr_lab-installed
DATA_STAMP := $(VENV)/.gvr_lab-data

.PHONY: setup venv demo test test-fast lint fmt lab figures bench tensorboard clean

setup: $(STAMP) $(DATA_STAMP)

# The environment alone, without the data (.ci/run installs system packages meanwhile).
venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml gvr_lab/lab.py | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,notebooks,cluster]"
	$(PY) -m gvr_lab.lab install
	touch $(STAMP)

# Fashion-MNIST: found locally, else Debian's package where apt-get and root are available, else
# torchvision's download (needs internet).
$(DATA_STAMP): $(STAMP)
	@if ! $(PY) -c "import sys; from gvr_lab.data import find_fashion_dir; sys.exit(find_fashion_dir(None) is None)"; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  fi; \
	fi
	$(PY) -c "from gvr_lab.data import load_dataset; tr, te = load_dataset('fashion_mnist'); print(f'Fashion-MNIST: {len(tr.labels)} train, {len(te.labels)} test images')"
	touch $(DATA_STAMP)

# The quickstart notebook at the cpu preset: SGD, GVR and SAM on real Fashion-MNIST, a few minutes
# on 2 cores; it prints its result table and the files it wrote (figures/quickstart/). Rerunning
# reuses the finished runs.
demo: setup
	$(VENV)/bin/gvr-lab run notebooks/00_quickstart.py --preset cpu

# Every notebook at PRESET, then every figure and table with an index README.md: under figures/ for
# cpu (the committed ones), under runs/<PRESET>/figures/ for the others.
PRESET ?= cpu
figures: setup
	$(VENV)/bin/gvr-lab figures --preset $(PRESET)

# Every test: what CI runs, 13 min 32 s on 2 cores (measured; the slow tests start first, tests/conftest.py).
# --dist loadgroup runs the tests of one xdist_group on one worker (its module fixtures once:
# test_data_parallel's torchrun launch, the CUDA tier's reference runs); pyproject pins pytest below
# 9.2, which ignores the groups. The 15 slowest tests are listed at the end: where the time went when
# a run takes longer than it should.
test: setup lint
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15

# The tests to run after each edit (1 min 45 s on 2 cores, measured; the goal is 2): all but those marked slow (end-to-end
# training, notebooks, the CLI or torchrun as a process, the non-default variants of the CUDA-configuration tier, the deep
# nets at their second shapes; tests/conftest.py keeps the marker honest for the first three).
test-fast: setup lint
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not slow"

# ruff's linter and formatter, configured in pyproject.toml: `make lint` checks (test and test-fast
# run it first), `make fmt` rewrites the files in place.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# CPU benchmark of every method's benchmark rows (Method.bench_rows) on the Fashion-MNIST shape
# (BENCHMARKS.md's table); BENCHMARKS.md has the GPU commands too.
bench: setup
	$(VENV)/bin/gvr-lab bench --model small_cnn --shape 1x28 --batch-size 128 --rounds 9 --steps 4 --warmup 2 \
	  --hvp --json benchmarks/cpu-small_cnn.json --into BENCHMARKS.md --methods all

# JupyterLab on notebooks/ with this checkout's kernel; extra flags: make lab LAB_ARGS="--port 9999"
LAB_ARGS ?=
lab: setup
	$(PY) -m gvr_lab.lab $(LAB_ARGS)

# TensorBoard on a folder of runs (every run writes its event files): make tensorboard RUNS=runs/cpu
RUNS ?= runs
tensorboard: setup
	$(VENV)/bin/gvr-lab tensorboard $(RUNS)

# Every run made here; the committed records of a study in progress (under runs/cpu/claims/) stay.
clean:
	if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then git clean -fdqX -- runs; else rm -rf runs; fi
	rm -rf .pytest_cache
