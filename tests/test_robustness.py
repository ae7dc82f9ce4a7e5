"""Data parallelism, crash safety, locking and divergence (issue: scale out and survive); runs bound to
their identity, readers beside writers, failures of the filesystem, what the messages say, provenance
(issue: runs that cannot be mixed or misread); bad input: tests/test_bad_input.py."""

import errno
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from gvr_lab import Config, load_runs, train, train_grid, training
from gvr_lab.cli import main
from gvr_lab.cluster import check_reachable
from gvr_lab.errors import FilesystemError, UsageError
from gvr_lab.measure import load_run_model
from gvr_lab.results import (
    CONFIG,
    EPOCHS,
    STEPS,
    SUMMARY,
    RunLock,
    load_checkpoint,
    make_dir,
    write_atomic,
    write_json,
    write_parquet,
)

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
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(FilesystemError, match=f"cannot write {path}: input/output error; choose another location"):
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


# ---------------------------------------------------------------------- a run's identity

TINY_FIELDS = dict(dataset="synthetic", model="tiny_cnn", device="cpu", progress=False, train_subset=512)
# config.json edited as a user might (a whole method: with its resolved arguments, as the file holds them)
EDITS = {
    "method": dict(method="sgd", method_args={}),
    "method_args": dict(method_args={**Config(method="sam").method_args, "rho": 0.1}),
    "seed": dict(seed=1),
    "dataset": dict(dataset="fashion_mnist"),
}


def contents(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.mark.slow
def test_a_run_directory_whose_config_was_edited_is_refused_never_resumed_as_another_run(tmp_path, capsys):
    """A stopped sam run's config.json edited in each way a user might, then the run the edited file
    describes asked for: refused in one line naming both runs (by the identity summary.json
    records, and without summary.json by the checkpoint's), nothing written; load_runs marks the
    directory, and measuring its checkpoint is refused too."""
    base = Config(**TINY_FIELDS, method="sam", epochs=3, stop_after=1, out_dir=str(tmp_path / "stopped"))
    run = train(base)
    assert run.summary["status"] == "stopped" and run.summary["run_id"] == base.run_id()
    assert load_checkpoint(run.run_dir / "checkpoint.pt")["run_id"] == base.run_id()
    for name, edit in EDITS.items():
        folder = tmp_path / name
        shutil.copytree(run.run_dir, folder)
        stored = json.loads((folder / CONFIG).read_text())
        (folder / CONFIG).write_text(json.dumps({**stored, **edit}))
        edited = Config(**{**stored, **edit, "out_dir": str(folder), "stop_after": 0})
        assert edited.run_id() != base.run_id()
        assert load_runs(folder)["status"].unique().tolist() == ["mismatched"]
        before = contents(folder)
        for written in ("summary.json", "checkpoint.pt"):
            refusal = (
                f"{folder / written} was written by run {base.run_id()}, but {folder / CONFIG} describes run "
                f"{edited.run_id()}: config.json was changed after the run wrote its results; put it back, or "
                "train this run in another out_dir"
            )
            with pytest.raises(UsageError) as info:
                train(edited)
            assert str(info.value) == refusal, name
            assert contents(folder) == before, name
            if written == "summary.json":  # without it, the checkpoint alone still tells
                (folder / SUMMARY).unlink()
                before = contents(folder)
        with pytest.raises(UsageError, match=re.escape(f"{folder / 'checkpoint.pt'} was written by run")):
            load_run_model(folder)
    # the command line the issue met: exit 0 and a sam run made of an sgd checkpoint, before
    args = ["train", *TINY, "--method", "sgd", "--epochs", "3", "--out-dir", str(tmp_path / "method")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was written by run" in err, err


@pytest.mark.slow
def test_a_run_directory_edited_in_what_changes_nothing_still_resumes(tmp_path):
    """The identity is what changes the computation: a label, out_dir or progress changed by hand
    is the same run, which resumes and ends as the uninterrupted one."""
    whole = train(Config(**TINY_FIELDS, epochs=2, out_dir=str(tmp_path / "whole")))
    folder = tmp_path / "part"
    train(Config(**TINY_FIELDS, epochs=2, stop_after=1, out_dir=str(folder)))
    stored = json.loads((folder / CONFIG).read_text())
    (folder / CONFIG).write_text(json.dumps({**stored, "label": "renamed", "progress": True}))
    resumed = train(Config(**TINY_FIELDS, epochs=2, label="renamed", out_dir=str(folder)))
    assert resumed.summary["status"] == "completed"
    assert resumed.history["test_acc"].tolist() == whole.history["test_acc"].tolist()


def test_the_identity_ignores_fields_at_their_defaults_and_what_changes_nothing():
    """A field added to Config after a run was made is absent from its config.json and had its
    default: the run keeps its identity. Out_dir, label and progress change nothing."""
    config = Config(method="sam", lr=0.1)
    fields = config.identity()
    older = {k: v for k, v in fields.items() if k != "curvature_every"}
    assert training.identity_digest(older) == config.run_id()
    assert Config(method="sam", lr=0.1, out_dir="elsewhere", label="x", progress=False).run_id() == config.run_id()
    assert Config(method="sam", lr=0.2).run_id() != config.run_id()
    assert re.fullmatch(r"[0-9a-f]{12}", config.run_id())


# ---------------------------------------------------------------------- readers beside a writer


def test_readers_beside_a_writer_never_fail_and_read_one_write_at_a_time(tmp_path):
    """A writer as the loop writes (a summary, then per evaluation the tables and then the summary
    that counts their rows) and a reader polling load_runs (evaluations and steps) and load_run for
    3 s: no read fails, and each read holds one state: as many rows as that state's summary counts,
    each the row written for it. The summary's steps_per_epoch carries the write's number here, as
    load_runs puts it on every row (before: 4 pyarrow errors and 309 mixed reads of 313)."""
    run = tmp_path / "run"
    run.mkdir()
    write_json(run / CONFIG, {"method": "sgd", "seed": 0})

    def summary(n):
        return {"status": "running", "epochs_completed": n, "steps_completed": 2 * n, "steps_per_epoch": n}

    write_json(run / SUMMARY, summary(0))
    stop, written = threading.Event(), []

    def writer():
        while not stop.is_set():
            n = len(written) + 1
            write_parquet(run / EPOCHS, [{"epoch": i, "test_acc": i / 1000} for i in range(n)])
            write_parquet(run / STEPS, [{"step": i, "loss": i / 1000} for i in range(2 * n)])
            write_json(run / SUMMARY, summary(n))
            written.append(n)

    thread = threading.Thread(target=writer)
    thread.start()
    reads, failures, mixed = 0, [], 0
    deadline = time.monotonic() + 3
    try:
        while time.monotonic() < deadline:
            try:
                epochs, steps = load_runs(run), load_runs(run, steps=True)
                loaded = training.load_run(run, Config())
            except Exception as e:  # noqa: BLE001 - every failure counts
                failures.append(repr(e))
                continue
            reads += 1
            for table, column, per in ((epochs, "epoch", 1), (steps, "step", 2)):
                if len(table) and table[column].tolist() != list(range(per * table["steps_per_epoch"].iloc[0])):
                    mixed += 1
            if list(loaded.history.get("epoch", [])) != list(range(loaded.summary["epochs_completed"])):
                mixed += 1
    finally:
        stop.set()
        thread.join()
    assert failures == [] and mixed == 0
    assert reads >= 20 and len(written) >= 20, (reads, len(written))  # both were busy all along


def test_a_file_rewritten_in_place_meanwhile_is_read_again_and_a_damaged_one_named(tmp_path, monkeypatch):
    from gvr_lab import results

    path = tmp_path / "summary.json"
    path.write_text('{"status": "run')  # a writer that does not rename, caught mid-write
    real_loads, calls = json.loads, []

    def finish_the_write(data):
        calls.append(data)
        if len(calls) == 1:
            time.sleep(0.01)
            path.write_text('{"status": "running"}')
        return real_loads(data)

    monkeypatch.setattr(json, "loads", finish_the_write)
    assert results.read_json(path) == {"status": "running"} and len(calls) == 2
    monkeypatch.setattr(json, "loads", real_loads)
    path.write_text('{"status": ')
    with pytest.raises(UsageError, match=f"^{re.escape(str(path))} is damaged .*: it was edited by hand or written"):
        results.read_json(path)


# ---------------------------------------------------------------------- failures of the filesystem
# This machine and CI run as root, past every permission bit: a read-only bind mount and a small
# tmpfs where mounting is allowed, and the same failures injected (the OSError the kernel gives) in
# every case, so the injected variant runs wherever the mounted one is skipped.


def run_mount(*args) -> bool:
    return subprocess.run(["mount", *map(str, args)], capture_output=True).returncode == 0


def refuse_writes(monkeypatch, folder: Path, code: int, when=lambda: True) -> None:
    """Opening a file for writing and making a folder under `folder` fail with errno `code` (while
    `when()`), as the kernel fails them; reading goes on."""
    real_open, real_mkdir = os.open, os.mkdir

    def refused(path) -> bool:
        return when() and Path(os.path.abspath(path)).is_relative_to(folder)

    def failure(path):
        return OSError(code, os.strerror(code), str(path))

    def open_(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and refused(path):
            raise failure(path)
        return real_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if refused(path) and not os.path.isdir(path):  # an existing folder: EEXIST first, as the kernel
            raise failure(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir)


@pytest.fixture(params=["mounted", "injected"])
def read_only(request, tmp_path, monkeypatch):
    """freeze(folder): `folder` seen read-only from now on, at the path it returns."""
    views = []

    def freeze(folder: Path) -> Path:
        if request.param == "injected":
            refuse_writes(monkeypatch, folder, errno.EROFS)
            return folder
        view = tmp_path / f"read-only-{len(views)}"
        view.mkdir()
        if not run_mount("--bind", folder, view):
            pytest.skip("mounting is not allowed here: the injected variant stands in")
        views.append(view)
        assert run_mount("-o", "remount,bind,ro", view)
        return view

    yield freeze
    for view in views:
        subprocess.run(["umount", "-l", str(view)], check=True)


class SmallDisk:
    """A folder on a small filesystem that fill() makes full and free() frees again: a tmpfs where
    mounting is allowed, else writes failing with ENOSPC between the two."""

    def __init__(self, folder: Path, mounted: bool, monkeypatch):
        self.folder, self.mounted, self.full = folder, mounted, False
        folder.mkdir()
        if mounted and not run_mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", folder):
            pytest.skip("mounting is not allowed here: the injected variant stands in")
        if not mounted:
            refuse_writes(monkeypatch, folder, errno.ENOSPC, when=lambda: self.full)

    def fill(self) -> None:
        self.full = True
        if self.mounted:
            with open(self.folder / "filler", "wb", buffering=0) as f:
                for chunk in (1 << 16, 1 << 12, 1):
                    try:
                        while True:
                            f.write(bytes(chunk))
                    except OSError as e:
                        assert e.errno == errno.ENOSPC

    def free(self) -> None:
        self.full = False
        (self.folder / "filler").unlink(missing_ok=True)


@pytest.fixture(params=["mounted", "injected"])
def small_disk(request, tmp_path, monkeypatch):
    disk = SmallDisk(tmp_path / "disk", request.param == "mounted", monkeypatch)
    yield disk
    if disk.mounted:
        subprocess.run(["umount", "-l", str(disk.folder)], check=True)


READ_ONLY = "read-only file system; the filesystem is mounted read-only: choose a location on a writable one"


@pytest.mark.slow
def test_a_read_only_filesystem_is_one_line_and_exit_2(tmp_path, read_only, capsys, monkeypatch):
    """A new out_dir there, a stopped run resumed there, the default out_dir with the working
    directory there: one line naming the path, exit 2, nothing changed; the API raises a
    FilesystemError (a UsageError). A finished run there is still returned as it is."""
    folder = tmp_path / "runs"
    args = ["train", *TINY, "--epochs", "2"]
    assert main([*args, "--stop-after", "1", "--out-dir", str(folder / "stopped")]) == 0
    assert main([*args, "--out-dir", str(folder / "finished")]) == 0
    frozen = read_only(folder)
    capsys.readouterr()
    before = contents(folder)
    default_dir = Config(**TINY_FIELDS, epochs=2).run_dir()
    for out_dir, refused in [
        (["--out-dir", str(frozen / "new")], f"create the folder {frozen / 'new'}"),
        (["--out-dir", str(frozen / "stopped")], f"create the lock file {frozen / 'stopped' / '.lock'}"),
        ([], f"create the folder {default_dir}"),
    ]:
        monkeypatch.chdir(frozen if not out_dir else tmp_path)
        assert main([*args, *out_dir]) == 2
        assert capsys.readouterr().err == f"gvr-lab: error: cannot {refused}: {READ_ONLY}\n"
    with pytest.raises(FilesystemError, match=f"cannot create the folder {frozen / 'api'}: read-only"):
        train(Config(**TINY_FIELDS, out_dir=str(frozen / "api")))
    assert train(Config(**TINY_FIELDS, epochs=2, out_dir=str(frozen / "finished"))).summary["status"] == "completed"
    assert contents(folder) == before


@pytest.mark.slow
def test_a_full_disk_is_one_line_exit_2_and_a_failed_summary_then_the_run_continues(
    tmp_path, small_disk, capsys, monkeypatch
):
    """The disk fills after the first evaluation: the next write fails in one line naming it, exit
    2, and summary.json says `failed: no space left on device` (rewritten in place: no new file
    can be made), not `running`. With space again, the same command continues the run to its end."""
    out = small_disk.folder / "run"
    args = ["train", *TINY, "--epochs", "3", "--out-dir", str(out)]
    real_checkpoint, evaluations = training.checkpoint, []

    def fill_after_the_first(*checkpoint_args):
        evaluations.append(1)
        if len(evaluations) == 2:
            small_disk.fill()
        real_checkpoint(*checkpoint_args)

    monkeypatch.setattr(training, "checkpoint", fill_after_the_first)
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"gvr-lab: error: cannot write {out / 'epochs.parquet'}: no space left on device; free some space there "
        "or choose another location\n"
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed: no space left on device" and summary["epochs_completed"] == 1
    assert summary["error"].startswith(f"cannot write {out / 'epochs.parquet'}")
    assert not list(out.glob(".*.tmp"))
    small_disk.free()
    monkeypatch.setattr(training, "checkpoint", real_checkpoint)
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == 3 and "error" not in summary


@pytest.mark.slow
def test_curvature_of_a_read_only_run_prints_its_result_and_where_it_could_not_write(tmp_path, read_only, capsys):
    train(Config(**TINY_FIELDS, epochs=1, out_dir=str(tmp_path / "runs" / "run")))
    frozen = read_only(tmp_path / "runs")
    argv = ["curvature", str(frozen / "run"), "--k", "1", "--trace-samples", "2", "--rows", "32"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    summary_line, result = out.splitlines()
    assert summary_line.startswith("top eigenvalues ")
    assert len(json.loads(result)["top_eigenvalues"]) == 1 and json.loads(result)["rows"] == 32
    assert err == (
        f"gvr-lab: error: cannot write {frozen / 'run' / 'curvature.json'}: {READ_ONLY} (--out); the result is "
        "printed above\n"
    )


@pytest.mark.parametrize(
    "code, says",
    [
        (errno.EROFS, READ_ONLY),
        (errno.ENOSPC, "no space left on device; free some space there or choose another location"),
        (errno.EACCES, "permission denied; choose a location you may write to, or change its permissions"),
        (errno.ENOTDIR, "not a directory; a part of the path is a file, not a folder: move it away or choose"),
    ],
)
def test_each_failure_of_the_filesystem_is_one_line_naming_the_path_and_what_to_do(tmp_path, monkeypatch, code, says):
    refuse_writes(monkeypatch, tmp_path, code)
    for attempt, doing in [
        (lambda: write_atomic(tmp_path / "f", b"x"), "write"),
        (lambda: make_dir(tmp_path / "d"), "create the folder"),
    ]:
        with pytest.raises(FilesystemError) as info:
            attempt()
        assert str(info.value).startswith(f"cannot {doing} {tmp_path}/") and says in str(info.value)
        assert info.value.errno == code and "\n" not in str(info.value)


# ---------------------------------------------------------------------- messages that say what happened


@pytest.mark.slow
def test_a_damaged_checkpoint_is_called_so_and_the_way_on_is_named(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *TINY, "--epochs", "2", "--out-dir", str(out)]
    assert main([*args, "--stop-after", "1"]) == 0
    checkpoint = out / "checkpoint.pt"
    whole = checkpoint.read_bytes()
    for damaged, what in [
        (whole[: len(whole) - 10], "is truncated or damaged (an incomplete zip archive)"),
        (whole[:100], "is truncated or damaged (an incomplete zip archive)"),
        (b"not a checkpoint" * 50, "is corrupt (not a torch checkpoint)"),
        (b"", "is empty"),
    ]:
        checkpoint.write_bytes(damaged)
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err == (
            f"gvr-lab: error: checkpoint {checkpoint} {what}: delete it to start the run again from its beginning, "
            "or put back a complete copy\n"
        )
    checkpoint.unlink()
    assert main(args) == 0 and json.loads((out / "summary.json").read_text())["status"] == "completed"


def test_measuring_a_run_that_diverged_before_its_first_checkpoint_says_so(tmp_path):
    write_json(tmp_path / CONFIG, Config(**TINY_FIELDS).identity())
    write_json(tmp_path / SUMMARY, {"status": "diverged", "diverged_step": 2, "diverged_value": float("inf")})
    with pytest.raises(UsageError) as info:
        load_run_model(tmp_path)
    assert str(info.value) == (
        f"run {tmp_path} diverged at step 2 (loss inf) before its first checkpoint: it has no weights to measure"
    )


# ---------------------------------------------------------------------- a Ray address where no Ray answers

HTTP2_NOT_FOUND = (
    bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # SETTINGS
    + bytes([0, 0, 1, 1, 0x5, 0, 0, 0, 1, 0x8D])  # HEADERS, stream 1, END_STREAM | END_HEADERS: :status 404
)


@pytest.mark.parametrize(
    "reply, why",
    [
        (None, "it sent no answer to a Ray GCS call in time"),
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "it does not speak HTTP/2, as a Ray GCS does"),
        (HTTP2_NOT_FOUND, "it answered a Ray GCS call with HTTP status 404"),
    ],
    ids=["silent", "http/1", "http/2 404"],
)
def test_an_address_where_no_ray_gcs_answers_is_one_line_within_seconds_and_quiet(reply, why, capfd):
    """Something that accepts connections but is no Ray cluster (here: holds them silently, answers
    in HTTP/1, answers 404 as a proxy did): Ray's client retried for 25 s printing 20 lines of log;
    the check says so in one line within its 3 s, printing nothing. A real GCS: tests/test_cluster.py."""
    server = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{server.getsockname()[1]}"
    done = threading.Event()

    def serve():
        connection, _ = server.accept()
        with connection:
            connection.recv(65536)
            if reply:
                connection.sendall(reply)
            done.wait(10)

    thread = threading.Thread(target=serve)
    thread.start()
    started = time.monotonic()
    try:
        with pytest.raises(UsageError) as info:
            check_reachable(address)
    finally:
        done.set()
        thread.join()
        server.close()
    assert time.monotonic() - started < 5
    assert str(info.value) == f"cannot reach a Ray cluster at {address!r}: something answers there, but {why}"
    assert capfd.readouterr() == ("", "")


# ---------------------------------------------------------------------- provenance


def test_git_state_names_the_commit_of_a_checkout_and_whether_it_is_dirty(tmp_path):
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    (repo / "sub" / "code.py").write_text("x = 1\n")

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    assert training.git_state(repo) == {}  # no commit yet
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    head = git("rev-parse", "HEAD").strip()
    assert training.git_state(repo) == {"git_commit": head, "git_dirty": False}
    (repo / "sub" / "code.py").write_text("x = 2\n")
    assert training.git_state(repo) == {"git_commit": head, "git_dirty": True}
    assert training.git_state(repo / "sub") == {}  # inside a checkout, not its root: not this code's commit
    assert training.git_state(tmp_path) == {}


def test_provenance_names_the_code_and_the_library_versions():
    import numpy
    import torchvision

    made_by = training.provenance()
    assert made_by["torch"] == torch.__version__ and made_by["numpy"] == numpy.__version__
    assert made_by["torchvision"] == torchvision.__version__
    assert made_by["python"] == ".".join(map(str, sys.version_info[:3]))
    assert made_by["gvr_lab"] is None or re.fullmatch(r"\d+\.\d+\.\d+.*", made_by["gvr_lab"])
    # the commit of this checkout (CI's and ours) or none; whether it is dirty may change while tests run
    checkout = training.git_state(Path(training.__file__).resolve().parent.parent)
    assert made_by.get("git_commit") == checkout.get("git_commit") and ("git_dirty" in made_by) == bool(checkout)


# ---------------------------------------------------------------------- random streams


def test_each_rank_and_the_shared_generator_draw_their_own_stream():
    """Rank 0 (one process) draws as it always did; every other rank and the shared generator draw
    streams of their own, different in what they draw (torch's CPU generator keeps a seed's low
    32 bits only, so seeds that differ above them draw alike)."""

    def draws(rank=None):
        if rank is None:
            generator = torch.Generator()
            training.seed_shared(generator, 3, 1)
            return torch.rand(8, generator=generator)
        training.seed_epoch(3, 1, rank)
        return torch.rand(8)

    torch.manual_seed(3 * 1_000_003 + 1 + 1)  # the seed of (seed 3, epoch 1) before ranks had streams
    before = torch.rand(8)
    assert torch.equal(draws(0), before)
    streams = [draws(rank) for rank in range(4)] + [draws()]
    assert all(not torch.equal(a, b) for i, a in enumerate(streams) for b in streams[i + 1 :])
    assert torch.equal(draws(2), streams[2]) and torch.equal(draws(), streams[-1])  # each a function of its seed
