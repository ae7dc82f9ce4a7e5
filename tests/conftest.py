import os
import subprocess
from pathlib import Path

import pytest
import torch

# Tests never reach out for data; CIFAR tests build their own files in CIFAR's format.
os.environ["GVR_LAB_OFFLINE"] = "1"
# Two threads in one process; one per worker under `pytest -n 2`, whose two workers already fill two
# cores: two threads each oversubscribe them, and OpenMP's spin-waiting then cost test_methods' resume
# tests 5 times the CPU time (67 s of user time against 14 s, on the shared 2-core machine).
torch.set_num_threads(1 if "PYTEST_XDIST_WORKER" in os.environ else 2)


@pytest.fixture
def tiny_config(tmp_path):
    """A Config factory for seconds-long runs on the synthetic dataset."""
    from gvr_lab import Config

    def make(**overrides):
        base = dict(
            dataset="synthetic",
            model="tiny_cnn",
            epochs=2,
            batch_size=64,
            lr=0.05,
            train_subset=512,
            device="cpu",
            progress=False,
            out_dir=str(tmp_path / "run"),
        )
        if overrides.get("steps"):  # steps mode leaves epochs at its default
            del base["epochs"]
        base.update(overrides)
        return Config(**base)

    return make


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
