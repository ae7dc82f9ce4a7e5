"""Grids as Ray tasks (gvr_lab/cluster.py) on a local Ray instance with 2 CPUs: the same runs as the
sequential grid, a killed worker retried and resumed, a diverged run that does not stop the grid,
and the package without Ray."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
import torch

from gvr_lab import grid_configs, train_configs, train_grid
from gvr_lab.cluster import RayOptions, check_reachable
from gvr_lab.errors import UsageError

from helpers import lock_holder

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

ray = pytest.importorskip("ray")

BASE = dict(
    dataset="synthetic", model="tiny_cnn", epochs=2, batch_size=64, lr=0.05, train_subset=512, device="cpu", cutout=0.5
)
COLUMNS = ["train_loss", "train_acc", "test_loss", "test_acc", "lr"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield RayOptions(run_cpus=1)
    ray.shutdown()


def sequential_one_thread(configs):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_configs(configs, executor="sequential")
    finally:
        torch.set_num_threads(threads)


def test_a_ray_grid_equals_the_sequential_grid_run_for_run(local_ray, tmp_path):
    variants = [dict(method="sgd"), dict(method="sam")]
    under_ray = train_grid(BASE, variants, [0, 1], tmp_path / "ray", executor="ray", ray=local_ray)
    sequential = sequential_one_thread(grid_configs(BASE, variants, [0, 1], tmp_path / "seq"))
    assert [r.config.label for r in under_ray] == ["sgd", "sgd", "sam", "sam"]
    assert [r.config.seed for r in under_ray] == [0, 1, 0, 1]
    for a, b in zip(under_ray, sequential):
        assert a.summary["status"] == b.summary["status"] == "completed"
        assert a.summary["final_test_acc"] == b.summary["final_test_acc"]
        pd.testing.assert_frame_equal(a.history[COLUMNS], b.history[COLUMNS])
    # a finished grid is read back, not trained again
    stamps = [(r.run_dir / "summary.json").stat().st_mtime_ns for r in under_ray]
    again = train_grid(BASE, variants, [0, 1], tmp_path / "ray", executor="ray", ray=local_ray)
    assert [(r.run_dir / "summary.json").stat().st_mtime_ns for r in again] == stamps


def test_a_ray_clusters_gcs_passes_the_address_check(local_ray):
    """The check's own GCS call (tests/test_robustness.py: what no Ray answers) is answered as a
    cluster answers it, token authentication on, as Ray starts clusters by default."""
    check_reachable(ray.get_runtime_context().gcs_address)


def test_a_killed_worker_is_retried_and_its_run_resumes_to_the_uninterrupted_end(local_ray, tmp_path):
    long = dict(BASE, epochs=6, train_subset=2048)
    [config] = grid_configs(long, [dict(method="sgd")], [0], tmp_path / "ray")
    summary_path = config.run_dir() / "summary.json"
    killed = {}

    def kill_after_two_epochs():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                summary = json.loads(summary_path.read_text())
            except (OSError, ValueError):
                summary = {}
            if summary.get("epochs_completed", 0) >= 2:
                pid = lock_holder((config.run_dir() / ".lock").resolve())
                if pid is not None:
                    killed["epochs"] = summary["epochs_completed"]
                    killed["history"] = pd.read_parquet(config.run_dir() / "epochs.parquet")
                    os.kill(pid, signal.SIGKILL)
                    return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_after_two_epochs)
    killer.start()
    [run] = train_configs([config], executor="ray", ray=local_ray)
    killer.join()
    assert 2 <= killed["epochs"] < 6, killed  # killed mid-run, not after it
    [whole] = sequential_one_thread(grid_configs(long, [dict(method="sgd")], [0], tmp_path / "seq"))
    assert run.summary["status"] == "completed"
    pd.testing.assert_frame_equal(run.history[COLUMNS], whole.history[COLUMNS])
    # resumed, not restarted: the epochs before the kill keep the times measured before it
    before = killed["history"]
    assert run.history["epoch_time_s"][: len(before)].tolist() == before["epoch_time_s"].tolist()


def test_a_diverged_run_is_recorded_and_the_grid_goes_on(local_ray, tmp_path):
    variants = [dict(method="sgd", label="exploding", lr=1e6, momentum=0.9), dict(method="sgd", label="fine")]
    runs = train_grid(dict(BASE, augment=False), variants, [0], tmp_path, executor="ray", ray=local_ray)
    assert [r.summary["status"] for r in runs] == ["diverged", "completed"]
    assert runs[0].summary["diverged_step"] >= 0


def test_a_failing_run_fails_only_itself_and_is_named_at_the_end(local_ray, tmp_path):
    configs = grid_configs(BASE, [dict(method="sgd", label="a"), dict(method="sgd", label="b")], [0], tmp_path)
    configs[0].run_dir().mkdir(parents=True)
    (configs[0].run_dir() / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="1 run\\(s\\) of the grid failed; first: a seed 0"):
        train_configs(configs, executor="ray", ray=local_ray)
    assert json.loads((configs[1].run_dir() / "summary.json").read_text())["status"] == "completed"


def test_the_package_works_without_ray(tmp_path):
    script = f"""
import sys
sys.modules["ray"] = None  # as if Ray were not installed
import gvr_lab
from gvr_lab.errors import UsageError
runs = gvr_lab.train_grid({dict(BASE, epochs=1)!r}, [dict(method="sgd")], [0], {str(tmp_path)!r})
assert runs[0].summary["status"] == "completed"
try:
    gvr_lab.train_grid({BASE!r}, [dict(method="sgd")], [0], {str(tmp_path / "r")!r}, executor="ray")
except UsageError as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert 'the ray executor needs Ray: pip install -e ".[cluster]"' in out
    assert not (tmp_path / "r").exists()


def test_executor_choices_are_checked_before_anything_is_built(tmp_path):
    with pytest.raises(UsageError, match="unknown executor 'dask'; valid: processes, sequential, ray"):
        train_grid(BASE, [dict(method="sgd")], [0], tmp_path, executor="dask")
    with pytest.raises(UsageError, match="ray options given for the sequential executor"):
        train_grid(BASE, [dict(method="sgd")], [0], tmp_path, executor="sequential", ray=RayOptions())
    with pytest.raises(UsageError, match="run_gpus above 1 must be a whole number"):
        RayOptions(run_gpus=1.5)
    assert not any(tmp_path.iterdir())
