"""Ray across machines, as far as one machine allows: a head and a second node started with
`ray start` (two raylets, one CPU each), a grid submitted to the head's address, its runs placed on
both nodes, and the second node stopped mid-grid: its run finishes on the head from its checkpoint,
as an uninterrupted run would have ended."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from gvr_lab import grid_configs, train_configs
from gvr_lab.cluster import RayOptions

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

ray = pytest.importorskip("ray")

BASE = dict(dataset="synthetic", model="tiny_cnn", epochs=6, batch_size=64, lr=0.05, train_subset=2048, device="cpu")
COLUMNS = ["train_loss", "train_acc", "test_loss", "test_acc", "lr"]
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_nodes():
    """A head and a worker node on this machine, 1 CPU each, in a Ray temp folder of their own (so
    another Ray instance on the machine neither blocks nor loses them). `ray start` turns Ray's token
    authentication on unless told otherwise, and a client then needs RAY_AUTH_MODE=token from before
    it imports Ray: on one machine's loopback the nodes start without it."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    address = f"127.0.0.1:{free_port()}"
    common = ["--num-cpus=1", "--disable-usage-stats", f"--temp-dir={temp}"]
    head = [RAY, "start", "--head", f"--port={address.split(':')[1]}", "--include-dashboard=false"]
    try:
        for start in (head, [RAY, "start", f"--address={address}"]):
            done = subprocess.run([*start, *common], capture_output=True, text=True, timeout=120, env=env)
            assert done.returncode == 0, done.stderr[-2000:]
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for proc in processes_mentioning(temp):
            os.kill(proc, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def summary_of(config) -> dict:
    try:
        return json.loads((config.run_dir() / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def stop_node(node_id: str) -> None:
    """SIGKILL the raylet of one node (its workers die with it), as a lost machine would."""
    [raylet] = [pid for pid in processes_mentioning(f"--node_id={node_id}")
                if b"raylet" in (Path("/proc") / str(pid) / "cmdline").read_bytes()]  # fmt: skip
    os.kill(raylet, signal.SIGKILL)


def test_a_grid_on_two_nodes_uses_both_and_survives_losing_one(two_nodes, tmp_path):
    configs = grid_configs(BASE, [dict(method="sgd"), dict(method="sam")], [0, 1], tmp_path / "ray")
    ray.init(address=two_nodes, log_to_driver=False, configure_logging=False)
    head = ray.get_runtime_context().get_node_id()
    worker = next(n["NodeID"] for n in ray.nodes() if n["NodeID"] != head)
    lost = {}

    def stop_the_worker_node_mid_run():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            for config in configs:
                summary = summary_of(config)
                if summary.get("node") == worker and summary.get("epochs_completed", 0) >= 2:
                    lost.update(config=config, node=summary["node"], epochs=summary["epochs_completed"])
                    stop_node(worker)
                    return
            time.sleep(0.1)

    stopper = threading.Thread(target=stop_the_worker_node_mid_run)
    stopper.start()
    runs = train_configs(configs, executor="ray", ray=RayOptions(address=two_nodes))
    stopper.join()
    assert lost, "no run was seen on the worker node"
    assert all(r.summary["status"] == "completed" for r in runs)
    # the lost run ended on the head, resumed from a checkpoint of its time on the worker node
    moved = next(r for r in runs if r.run_dir == lost["config"].run_dir())
    assert moved.summary["node"] == head
    [whole] = train_configs(grid_configs(BASE, [dict(method=lost["config"].method)], [lost["config"].seed],
                                         tmp_path / "seq"), executor="sequential")  # fmt: skip
    pd.testing.assert_frame_equal(moved.history[COLUMNS], whole.history[COLUMNS])
    # both nodes trained runs: the lost run was seen on the worker node (its summary names the node
    # it trains on) and ended on the head
    assert {lost["node"], moved.summary["node"]} == {worker, head}
