import os
import subprocess
import sys
from pathlib import Path

import pytest

from gvr_lab.cli import build_parser, config_from_args, main, reader_gone

from helpers import REPO

TINY = [
    "train",
    "--dataset",
    "synthetic",
    "--model",
    "tiny_cnn",
    "--epochs",
    "1",
    "--batch-size",
    "64",
    "--train-subset",
    "256",
    "--device",
    "cpu",
    "--no-progress",
]


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "sgd (alias: vanilla)" in out and "resnet18" in out and "fashion_mnist" in out


@pytest.mark.slow
def test_config_file_with_flag_overrides(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: synthetic\nmodel: tiny_cnn\nepochs: 5\nlr: 0.1\nmethod: Vanilla\n")
    out_dir = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                str(cfg),
                "--epochs",
                "1",
                "--train-subset",
                "256",
                "--batch-size",
                "64",
                "--device",
                "cpu",
                "--no-progress",
                "--out-dir",
                str(out_dir),
            ]
        )
        == 0
    )
    import json

    stored = json.loads((out_dir / "config.json").read_text())
    assert stored["epochs"] == 1 and stored["lr"] == 0.1 and stored["method"] == "sgd"
    assert "final test accuracy" in capsys.readouterr().out


def test_gvr_lab_run_sets_the_pool_size_only_when_workers_is_given():
    """Without --workers the pool size GVR_LAB_WORKERS sets stays (the tests' conftest sets 1), and
    run and figures, which put their executor in this process's environment, do not undo it."""
    from gvr_lab.cli import executor_environment
    from gvr_lab.pools import WORKERS_ENV

    def parsed(*flags):
        return build_parser().parse_args(["run", "nb.py", "--executor", "processes", *flags])

    assert executor_environment(parsed()) == {"GVR_LAB_EXECUTOR": "processes"}
    assert executor_environment(parsed("--workers", "3")) == {"GVR_LAB_EXECUTOR": "processes", WORKERS_ENV: "3"}


@pytest.mark.slow
def test_python_dash_m_entry_point(tmp_path):
    out_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "gvr_lab"] + TINY + ["--out-dir", str(out_dir)],
        capture_output=True,
        text=True,
        env={"GVR_LAB_OFFLINE": "1", "PATH": ""},
    )
    assert proc.returncode == 0, proc.stderr
    assert (out_dir / "summary.json").is_file()


@pytest.mark.slow
def test_a_reader_that_went_away_ends_the_command_quietly():
    """`gvr-lab list | head -1` where head has exited: no traceback, the shell's status for SIGPIPE."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gvr_lab", "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO
    )
    proc.stdout.close()  # before the command has written anything: it starts in about a second
    assert (proc.stderr.read(), proc.wait()) == (b"", 141)


def test_a_pipe_counts_as_gone_only_once_its_reader_has_closed():
    read, write = os.pipe()
    with os.fdopen(write, "w") as stream:
        assert not reader_gone(stream)
        os.close(read)
        assert reader_gone(stream)
    assert not reader_gone(sys.stderr)


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("configs/*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    config = config_from_args(build_parser().parse_args(["train", "--config", str(path)]))
    assert config.out_dir == f"runs/{path.stem}"  # each example writes a run directory named after it
