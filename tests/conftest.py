import os
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import TINY_RUN

# Tests never reach out for data; CIFAR tests build their own files in CIFAR's format.
os.environ["GVR_LAB_OFFLINE"] = "1"
# Two threads in one process; one per worker under `pytest -n 2`, whose two workers already fill two
# cores: two threads each oversubscribe them, and OpenMP's spin-waiting then cost test_methods' resume
# tests 5 times the CPU time (67 s of user time against 14 s, on the shared 2-core machine).
torch.set_num_threads(1 if "PYTEST_XDIST_WORKER" in os.environ else 2)
# A grid trains its runs one after another here (in notebooks and the CLI's processes too, which
# inherit the variable): a pool would start two more processes per grid, each importing torch, beside
# the workers that already fill the cores (the claims pilot's test took 433 s with pools, 114 s
# without, on the 2-core machine). The tests of the pool ask for it (workers=2, GVR_LAB_WORKERS=2).
os.environ["GVR_LAB_WORKERS"] = "1"


def pytest_collection_modifyitems(items):
    """The slow tests first. Under `pytest -n 2` the workers take tests in this order: long ones
    collected late (the notebooks' smoke figures, about 6 minutes) left one worker running alone at
    the end while the quick tests had all gone by."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def tiny_config(tmp_path):
    """A Config factory for seconds-long runs on the synthetic dataset."""
    from gvr_lab import Config

    def make(**overrides):
        fields = {**TINY_RUN, "out_dir": str(tmp_path / "run"), **overrides}
        if overrides.get("steps") and "epochs" not in overrides:  # steps mode leaves epochs at its default
            del fields["epochs"]
        return Config(**fields)

    return make


@pytest.fixture
def float64():
    """float64 as torch's default dtype during the test (references compared to 1e-10 and finer), the
    previous default after it. A module turns it on with pytestmark = pytest.mark.usefixtures("float64")."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


# What a child process that imports torch runs here: the CLI (python -m gvr_lab, gvr-lab) and torchrun.
TORCH_COMMANDS = {"gvr_lab", "gvr-lab", "torch.distributed.run", "torchrun"}


@pytest.fixture(autouse=True)
def fast_tests_neither_train_nor_start_torch_processes(request, monkeypatch):
    """The rule behind `make test-fast` (pytest -m "not slow"), kept true: a test not marked slow
    fails when it reaches the training loop (gvr_lab.train, train_grid, the CLI's train in this
    process) or starts the CLI or torchrun as a child process."""
    if request.node.get_closest_marker("slow"):
        return
    from gvr_lab import training

    def refuse(what):
        pytest.fail(
            f"{what} in a test not marked slow: mark it @pytest.mark.slow or make it a unit test", pytrace=False
        )

    monkeypatch.setattr(training, "run_loop", lambda *args, **kwargs: refuse("end-to-end training"))
    popen_init = subprocess.Popen.__init__

    def checked_popen_init(self, args, *rest, **kwargs):
        # on the class, not the module's name for it: libraries that imported Popen are seen too
        if not isinstance(args, (str, bytes)) and any(Path(str(a)).name in TORCH_COMMANDS for a in args):
            refuse(f"a child process {args[:4]}")
        popen_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", checked_popen_init)


@pytest.fixture
def method_registry():
    """The method registry as it is, put back after the test: a test may register methods of its own
    (docs' examples, a module outside the package), seen by every module that reads the registry."""
    from gvr_lab.methods import base

    methods, aliases = dict(base.METHODS), dict(base.ALIASES)
    yield base.METHODS
    base.METHODS.clear()
    base.METHODS.update(methods)
    base.ALIASES.clear()
    base.ALIASES.update(aliases)


@pytest.fixture
def registries(method_registry):
    """The method, model and dataset registries as they are, put back after the test (a plugin's
    import registers into all three)."""
    from gvr_lab import data, models

    saved = [(registry, dict(registry)) for registry in (models.MODELS, data.DATASETS)]
    yield
    for registry, before in saved:
        registry.clear()
        registry.update(before)
