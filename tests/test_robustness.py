"""Data parallelism, crash safety, locking and divergence (issue: scale out and survive); bad input:
tests/test_bad_input.py."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from gvr_lab import Config, train, train_grid
from gvr_lab.cli import main
from gvr_lab.results import RunLock, load_checkpoint, write_atomic

ENV = {**os.environ, "GVR_LAB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TINY = ["--dataset", "synthetic", "--model", "tiny_cnn", "--device", "cpu", "--no-progress", "--train-subset", "512"]


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "gvr_lab", *args], env=ENV, capture_output=True, text=True, **kw)


def kill_tree(pid):
    """SIGKILL a process and all its descendants, found through /proc before any of them dies."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    family, todo = [], [pid]
    while todo:
        family.append(todo.pop())
        todo += children.get(family[-1], [])
    for member in family:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for member in family[1:]:  # wait until the ranks are gone, so their lock is released
        while True:
            try:
                if "zombie" in Path(f"/proc/{member}/status").read_text():
                    break
            except FileNotFoundError:
                break
            time.sleep(0.01)


def weights(run_dir):
    return load_checkpoint(Path(run_dir) / "checkpoint.pt")["model"]


# ---------------------------------------------------------------------- data parallel (gloo, CPU)
# Every method on 2 ranks: tests/test_data_parallel.py. Here: a 2-rank run killed, finished by one process.


@pytest.mark.slow
def test_a_checkpoint_of_two_ranks_resumes_in_one_process(tmp_path):
    """Checkpoints hold the whole state, not a rank's: killed under 2 ranks, finished by 1 process,
    the run ends where an uninterrupted single-process run does (BN-free sgd, as above)."""
    common = [
        "train",
        *TINY,
        "--train-subset",
        "2048",
        "--epochs",
        "8",
        "--batch-size",
        "64",
        "--no-augment",
        "--out-dir",
    ]
    reference = cli(*common, str(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "run"
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "gvr_lab",
            *common,
            str(out),
        ],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    summary = out / "summary.json"
    deadline = time.time() + 120
    while time.time() < deadline and launcher.poll() is None:
        if summary.exists() and json.loads(summary.read_text())["epochs_completed"] >= 2:
            break
        time.sleep(0.05)
    assert launcher.poll() is None, "the 2-rank run ended before it could be killed"
    kill_tree(launcher.pid)  # the launcher and both ranks (which torchrun starts in sessions of their own)
    launcher.wait()
    killed_at = json.loads(summary.read_text())
    assert killed_at["status"] == "running" and killed_at["world_size"] == 2
    resumed = cli(*common, str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(summary.read_text())["world_size"] == 1
    for k, v in weights(tmp_path / "ref").items():
        torch.testing.assert_close(weights(out)[k], v, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------- crash safety


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tmp_path):
    args = ["train", *TINY, "--epochs", "40", "--batch-size", "32", "--cutout", "0.5"]
    reference = cli(*args, "--out-dir", str(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr
    training_s = json.loads((tmp_path / "ref" / "summary.json").read_text())["wall_time_s"]
    out = tmp_path / "killed"
    rng = random.Random(0)
    kills = []
    summary = out / "summary.json"
    while len(kills) < 5:  # each kill lands at a random moment within the first ~5/8 of the training time
        proc = subprocess.Popen(
            [sys.executable, "-m", "gvr_lab", *args, "--out-dir", str(out)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started = time.time()  # wait until this process has written its first summary: training is under way
        while proc.poll() is None and (not summary.exists() or summary.stat().st_mtime < started):
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, training_s / 8))
        if proc.poll() is None:
            kills.append(json.loads(summary.read_text())["epochs_completed"])
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert json.loads(summary.read_text())["status"] != "completed", f"finished before 5 kills: {kills}"
    final = cli(*args, "--out-dir", str(out))
    assert final.returncode == 0, final.stderr
    cols = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc"]
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "epochs.parquet")[cols], pd.read_parquet(tmp_path / "ref" / "epochs.parquet")[cols]
    )
    assert all(torch.equal(a, b) for a, b in zip(weights(out).values(), weights(tmp_path / "ref").values()))
    assert not list(out.glob(".*.tmp"))
    # every process went on from the last checkpoint, none started over: the kills came later and later
    assert kills == sorted(kills) and kills[-1] > kills[0], kills
    print("kill points (epochs completed when killed):", kills)


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    write_atomic(path, b"old complete checkpoint")

    def crash(*a, **k):
        raise OSError("disk died mid-write")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError):
        write_atomic(path, b"new" * 1000)
    assert path.read_bytes() == b"old complete checkpoint"
    assert list(tmp_path.iterdir()) == [path]


def test_an_atomically_written_file_has_the_mode_a_plain_write_gives(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "atomic", b"x")
        (tmp_path / "plain").write_bytes(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "atomic").stat().st_mode == (tmp_path / "plain").stat().st_mode  # 0644, not mkstemp's 0600


@pytest.mark.slow
def test_a_run_directory_in_use_exits_2_until_its_lock_is_released(tmp_path, capsys):
    """The lock is held here as a training process holds it. flock locks belong to an open file,
    not to a process: the CLI's own open of .lock is refused exactly as another process's would be."""
    out = tmp_path / "run"
    out.mkdir()
    args = ["train", *TINY, "--train-subset", "128", "--batch-size", "128", "--epochs", "1", "--out-dir", str(out)]
    with RunLock(out):
        assert main(args) == 2
        assert capsys.readouterr().err == (
            f"gvr-lab: error: run directory {out} is in use by another training "
            "process; wait for it to finish or choose another out_dir\n"
        )
        assert [p.name for p in out.iterdir()] == [".lock"]  # refused before writing anything
    assert main(args) == 0
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


# ---------------------------------------------------------------------- divergence


@pytest.mark.slow
def test_divergence_stops_keeps_history_and_exits_nonzero(tmp_path):
    out = tmp_path / "run"
    proc = cli("train", *TINY, "--epochs", "3", "--batch-size", "32", "--lr", "1e6", "--out-dir", str(out))
    assert proc.returncode == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert f"diverged at step {summary['diverged_step']}: loss" in proc.stderr
    history = pd.read_parquet(out / "epochs.parquet")
    assert len(history) == summary["epochs_completed"] >= 1


@pytest.mark.slow
def test_a_sweep_records_divergence_and_goes_on(tmp_path):
    base = dict(
        dataset="synthetic", model="tiny_cnn", epochs=2, batch_size=32, train_subset=256, device="cpu", progress=False
    )
    runs = train_grid(base, [dict(lr=1e6, label="too-hot"), dict(lr=0.05, label="fine")], [0], tmp_path)
    assert [r.summary["status"] for r in runs] == ["diverged", "completed"]
    again = train(Config(**base, lr=1e6, label="too-hot", seed=0, out_dir=str(tmp_path / "too-hot-s0")))
    assert again.summary == runs[0].summary  # a diverged run is final, not retried
