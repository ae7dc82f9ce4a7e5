"""One configuration, one history, whichever executor trains it (gvr_lab/grid.py): the same grid in
this process, in a pool of worker processes and under Ray; what a worker cannot rebuild trains
here, saying why; a worker that dies is replaced and its run resumes."""

import os
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest

from gvr_lab import grid_configs, train_configs
from gvr_lab.cluster import RayOptions
from gvr_lab.grid import default_workers, worker_modules

from helpers import lock_holder

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

BASE = dict(
    dataset="synthetic", model="tiny_cnn", epochs=2, batch_size=64, lr=0.05, train_subset=512, device="cpu", cutout=0.5
)
COLUMNS = ["train_loss", "train_acc", "test_loss", "test_acc", "lr"]
VARIANTS = [dict(method="sgd"), dict(method="sam")]


def same_histories(runs_a, runs_b) -> None:
    assert [(r.config.label, r.config.seed) for r in runs_a] == [(r.config.label, r.config.seed) for r in runs_b]
    for a, b in zip(runs_a, runs_b):
        assert a.summary["status"] == b.summary["status"] == "completed"
        assert a.summary["threads"] == b.summary["threads"] == 1
        pd.testing.assert_frame_equal(a.history[COLUMNS], b.history[COLUMNS])


def test_a_grid_gives_identical_histories_sequentially_in_the_pool_and_under_ray(tmp_path):
    ray = pytest.importorskip("ray")
    sequential = train_configs(grid_configs(BASE, VARIANTS, [0, 1], tmp_path / "seq"), executor="sequential")
    pooled = train_configs(grid_configs(BASE, VARIANTS, [0, 1], tmp_path / "pool"), executor="processes", workers=2)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        under_ray = train_configs(
            grid_configs(BASE, VARIANTS, [0, 1], tmp_path / "ray"), executor="ray", ray=RayOptions()
        )
    finally:
        ray.shutdown()
    same_histories(sequential, pooled)
    same_histories(sequential, under_ray)
    assert len({r.summary["final_test_acc"] for r in sequential}) > 1  # four runs, not one run four times


def test_the_pool_size_is_the_cores_over_the_threads_per_run():
    configs = grid_configs(BASE, VARIANTS, [0], "unused", check_run_dirs=False)
    assert default_workers(configs) == os.cpu_count()
    configs[0].threads = 2
    assert default_workers(configs) == max(1, os.cpu_count() // 2)


OUTSIDE = '''"""A method of a module on the path: the pool's workers import it."""

from gvr_lab.methods import register_method
from gvr_lab.methods.sgd import SGD


@register_method
class PooledSGD(SGD):
    name, aliases = "pooled_sgd", ()
'''


def test_a_method_of_a_module_trains_in_the_pool_and_one_of_a_notebook_cell_here(
    tmp_path, monkeypatch, method_registry, capsys
):
    (tmp_path / "pooled_methods.py").write_text(OUTSIDE)
    monkeypatch.syspath_prepend(str(tmp_path))
    __import__("pooled_methods")
    try:
        configs = grid_configs(BASE, [dict(method="pooled_sgd")], [0, 1], tmp_path / "module")
        assert worker_modules(configs) == (["pooled_methods"], "")
        runs = train_configs(configs, executor="processes", workers=2)
        out = capsys.readouterr().out
        assert [r.summary["status"] for r in runs] == ["completed"] * 2 and "2 worker processes" in out
        assert "trains in this process" not in out
    finally:
        sys.modules.pop("pooled_methods", None)

    class CellSGD(method_registry["sgd"]):
        name, aliases = "cell_sgd", ()

    CellSGD.__module__ = "__main__"  # what a class defined in a notebook's cell has
    method_registry["cell_sgd"] = CellSGD
    __import__("gvr_lab.methods.base").methods.base.ALIASES["cell_sgd"] = "cell_sgd"
    runs = train_configs(
        grid_configs(BASE, [dict(method="cell_sgd")], [0, 1], tmp_path / "cell"), executor="processes", workers=2
    )
    out = capsys.readouterr().out
    assert [r.summary["status"] for r in runs] == ["completed"] * 2
    assert (
        "the grid trains in this process, one run after another: method 'cell_sgd' is defined in the notebook's" in out
    )


def test_a_killed_worker_is_replaced_and_its_run_resumes_to_the_uninterrupted_end(tmp_path):
    long = dict(BASE, epochs=6, train_subset=2048)
    config, other = grid_configs(long, [dict(method="sgd")], [0, 1], tmp_path / "pool")
    killed = []

    def kill_after_the_second_epoch():
        summary = config.run_dir() / "summary.json"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if summary.is_file() and '"epochs_completed": 2' in summary.read_text():
                pid = lock_holder(config.run_dir() / ".lock")
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_the_second_epoch)
    killer.start()
    runs = train_configs([config, other], executor="processes", workers=2)
    killer.join()
    assert killed and killed[0] != os.getpid(), "the worker was never killed"
    wholes = train_configs(grid_configs(long, [dict(method="sgd")], [0, 1], tmp_path / "seq"), executor="sequential")
    for run, whole in zip(runs, wholes):
        assert run.summary["status"] == "completed"
        pd.testing.assert_frame_equal(run.history[COLUMNS], whole.history[COLUMNS])


SCRIPT = """import gvr_lab

print("the script's top level ran")
runs = gvr_lab.train_grid({base!r}, [dict(method="sgd")], [0, 1], {runs!r}, executor="processes")
print(repr(runs))
"""


def test_a_script_without_a_main_guard_trains_its_grid_in_the_pool_once(tmp_path):
    """Spawned workers would import the calling script (spawn's default): without an
    `if __name__ == "__main__":` guard each would start the grid again."""
    script = tmp_path / "grid_script.py"
    script.write_text(SCRIPT.format(base=dict(BASE, epochs=1), runs=str(tmp_path / "runs")))
    env = {**os.environ, "GVR_LAB_WORKERS": "2"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("the script's top level ran") == 1
    assert "2 worker processes" in done.stdout and done.stdout.strip().endswith("2 completed>")


POOL_SCRIPT = """import os, time
from gvr_lab.pools import SpawnedPool

with SpawnedPool(2) as pool:
    futures = [pool.submit(time.sleep, 600) for _ in range(2)]
    print(" ".join(str(pid) for pid in pool._processes), flush=True)
    time.sleep(600)
"""


def test_the_workers_of_a_killed_caller_end_themselves(tmp_path):
    """A caller killed outright (a notebook's kernel, a script) leaves no worker waiting forever."""
    script = tmp_path / "pool_script.py"
    script.write_text(POOL_SCRIPT)
    caller = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(pid) for pid in caller.stdout.readline().split()]
        assert len(workers) == 2 and all(os.path.exists(f"/proc/{pid}") for pid in workers)
    finally:
        caller.kill()
        caller.wait()
    deadline = time.monotonic() + 30
    while any(os.path.exists(f"/proc/{pid}") for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")], "workers outlived their caller"
