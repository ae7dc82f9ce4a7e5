"""Data parallelism, crash safety, locking, divergence and bad input (issue: scale out and survive)."""

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
from gvr_lab.errors import UsageError
from gvr_lab.results import load_checkpoint, write_atomic

ENV = {**os.environ, "GVR_LAB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TINY = ["--dataset", "synthetic", "--model", "tiny_cnn", "--device", "cpu", "--no-progress", "--train-subset", "512"]


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "gvr_lab", *args], env=ENV, capture_output=True, text=True, **kw)


def torchrun(nproc, *args):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "gvr_lab", *args], env=ENV, capture_output=True, text=True, timeout=300)


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
    common = ["train", *TINY, "--train-subset", "2048", "--epochs", "8", "--batch-size", "64", "--no-augment",
              "--out-dir"]
    reference = cli(*common, str(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "run"
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "-m", "gvr_lab", *common, str(out)], env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
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
        proc = subprocess.Popen([sys.executable, "-m", "gvr_lab", *args, "--out-dir", str(out)], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    pd.testing.assert_frame_equal(pd.read_parquet(out / "epochs.parquet")[cols],
                                  pd.read_parquet(tmp_path / "ref" / "epochs.parquet")[cols])
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


def test_second_process_on_the_same_run_directory_exits_2(tmp_path):
    out = tmp_path / "run"
    # many one-step epochs: the first process is still running when the second arrives
    args = ["train", *TINY, "--train-subset", "128", "--batch-size", "128", "--epochs", "300", "--out-dir", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "gvr_lab", *args], env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out / "summary.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    second = cli(*args)
    assert second.returncode == 2
    assert second.stderr.strip().endswith("is in use by another training process; wait for it to finish or "
                                          "choose another out_dir")
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


# ---------------------------------------------------------------------- divergence


def test_divergence_stops_keeps_history_and_exits_nonzero(tmp_path):
    out = tmp_path / "run"
    proc = cli("train", *TINY, "--epochs", "3", "--batch-size", "32", "--lr", "1e6", "--out-dir", str(out))
    assert proc.returncode == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert f"diverged at step {summary['diverged_step']}: loss" in proc.stderr
    history = pd.read_parquet(out / "epochs.parquet")
    assert len(history) == summary["epochs_completed"] >= 1


def test_a_sweep_records_divergence_and_goes_on(tmp_path):
    base = dict(dataset="synthetic", model="tiny_cnn", epochs=2, batch_size=32, train_subset=256, device="cpu",
                progress=False)
    runs = train_grid(base, [dict(lr=1e6, label="too-hot"), dict(lr=0.05, label="fine")], [0], tmp_path)
    assert [r.summary["status"] for r in runs] == ["diverged", "completed"]
    again = train(Config(**base, lr=1e6, label="too-hot", seed=0, out_dir=str(tmp_path / "too-hot-s0")))
    assert again.summary == runs[0].summary  # a diverged run is final, not retried


# ---------------------------------------------------------------------- bad input, tried and counted


def bad_fashion(tmp_path, truncate):
    import gzip

    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for prefix, n in (("train", 10), ("t10k", 10)):
        img = bytes([0, 0, 8, 3]) + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + bytes(n * 784)
        lbl = bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + bytes(n)
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(img[:-truncate] if truncate else img))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(lbl))
    return folder


def notebook_with_params(tmp_path):
    nb = tmp_path / "nb.py"
    nb.write_text('# %% tags=["parameters"]\nepochs: int = 1  # epochs\nname: str = "x"  # a name\n\n# %%\n'
                  'raise RuntimeError("boom")\n')
    return nb


# (what, how to trigger it, the text the one-line message must contain)
CLI_BAD = [
    ("unknown method", ["--method", "adamw"], "unknown method 'adamw'; valid:"),
    ("unknown model", ["--model", "resnet9"], "unknown model 'resnet9'; valid:"),
    ("unknown dataset", ["--dataset", "mnist"], "unknown dataset 'mnist'; valid:"),
    ("unknown schedule", ["--schedule", "linear"], "unknown schedule 'linear'; valid:"),
    ("unknown precision", ["--precision", "fp8"], "unknown precision 'fp8'; valid:"),
    ("unknown hyperparameter", ["--method", "sam", "--method-arg", "radius=1"], "unknown hyperparameter 'radius'"),
    ("rho < 0", ["--method", "sam", "--method-arg", "rho=-0.1"], "rho"),
    ("wrong hyperparameter type", ["--method", "sam", "--method-arg", "rho=big"], "must be float"),
    ("micro-batch not dividing batch", ["--method", "reg_loss", "--batch-size", "64", "--method-arg",
                                        "micro_batch_size=48"], "micro_batch_size"),
    ("negative lr", ["--lr", "-0.1"], "lr must be positive"),
    ("zero lr", ["--lr", "0"], "lr must be positive"),
    ("zero epochs", ["--epochs", "0"], "epochs must be positive"),
    ("negative batch", ["--batch-size", "-8"], "batch_size must be positive"),
    ("zero batch", ["--batch-size", "0"], "batch_size must be positive"),
    ("non-integer epochs", ["--epochs", "two"], "invalid int value"),
    ("quant bits < 2", ["--quant-bits", "1"], "quant_bits"),
    ("unknown flag", ["--learning-rate", "0.1"], "unrecognized arguments"),
    ("method-arg without =", ["--method-arg", "rho"], "expects key=value"),
    ("batch larger than data", ["--batch-size", "4096"], "exceeds"),
    ("unknown device", ["--device", "tpu"], "unknown device 'tpu'"),
    ("cuda without cuda", ["--device", "cuda"], "CUDA is not available"),
    ("cifar offline", ["--dataset", "cifar100", "--data-dir", "/nonexistent"], "cifar100 not found"),
    ("negative cutout", ["--cutout", "-0.5"], "cutout must be >= 0"),
]


@pytest.mark.parametrize("what, argv, needle", CLI_BAD, ids=[c[0] for c in CLI_BAD])
def test_bad_cli_input(tmp_path, capsys, what, argv, needle):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out-dir", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gvr-lab: error: ") and err.count("\n") == 1 and needle in err, err
    assert not out.exists()


def test_bad_files_and_other_layers(tmp_path, capsys):
    """File-level bad input and the other layers; each case: exit 2 or UsageError, one line, nothing written."""
    out = tmp_path / "run"
    cases = []
    corrupt_yaml = tmp_path / "bad.yaml"
    corrupt_yaml.write_text("lr: [0.1\n")
    cases.append(("corrupt YAML", lambda: main(["train", "--config", str(corrupt_yaml), "--out-dir", str(out)]),
                  "is not valid YAML"))
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    cases.append(("YAML not a mapping", lambda: main(["train", "--config", str(not_mapping)]), "must hold a mapping"))
    unknown_field = tmp_path / "field.yaml"
    unknown_field.write_text("learning_rate: 0.1\n")
    cases.append(("unknown config field", lambda: main(["train", "--config", str(unknown_field)]),
                  "unknown config field 'learning_rate'"))
    cases.append(("missing config file", lambda: main(["train", "--config", str(tmp_path / "nope.yaml")]),
                  "cannot read config file"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases.append(("run dir is a file", lambda: main(["train", *TINY, "--out-dir", str(afile)]), "is not a directory"))
    truncated = bad_fashion(tmp_path, truncate=100)
    cases.append(("truncated dataset file", lambda: main(["train", "--data-dir", str(truncated.parent), "--out-dir",
                                                            str(out), "--device", "cpu"]), "train-images-idx3-ubyte.gz"))
    nb = notebook_with_params(tmp_path)
    cases.append(("unknown notebook parameter", lambda: main(["run", str(nb), "-p", "epoch", "2", "--runs-root",
                                                              str(out)]), "unknown parameter 'epoch'"))
    cases.append(("wrong notebook parameter type", lambda: main(["run", str(nb), "-p", "epochs", "two",
                                                                 "--runs-root", str(out)]), "must be int"))
    cases.append(("unknown preset", lambda: main(["run", str(nb), "--preset", "huge"]), "invalid choice: 'huge'"))
    cases.append(("missing notebook", lambda: main(["run", str(tmp_path / "nb2.py")]), "not found"))
    messages = {}
    for what, call, needle in cases:
        assert call() == 2, what
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, (what, err)
        assert not out.exists(), what
        messages[what] = err

    from gvr_lab import create_method, create_model

    model = create_model("tiny_cnn", in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    api_cases = [
        ("create_method unknown name", lambda: create_method("lookahead", model, opt), "unknown method 'lookahead'"),
        ("create_method rho < 0", lambda: create_method("sam", model, opt, rho=-1.0), "rho"),
        ("create_method bool for float", lambda: create_method("sam", model, opt, rho=True), "must be float"),
        ("Config wrong type", lambda: Config(lr="fast"), "config field 'lr' must be float"),
        ("Config val_split swallows data", lambda: train(Config(dataset="synthetic", val_split=5000.0, device="cpu",
                                                                 out_dir=str(out))), "leaves no training examples"),
    ]
    for what, call, needle in api_cases:
        with pytest.raises(UsageError, match=needle) as info:
            call()
        assert not out.exists(), what
        messages[what] = str(info.value)
    # each bad input gets its own diagnosis, not a shared catch-all line
    assert len(set(messages.values())) == len(messages), messages
    print(f"{len(CLI_BAD) + len(messages)} bad inputs tried")
