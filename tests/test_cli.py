import subprocess
import sys
from pathlib import Path

import pytest

from gvr_lab.cli import build_parser, config_from_args, main

TINY = ["train", "--dataset", "synthetic", "--model", "tiny_cnn", "--epochs", "1", "--batch-size", "64",
        "--train-subset", "256", "--device", "cpu", "--no-progress"]


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "sgd (alias: vanilla)" in out and "resnet18" in out and "fashion_mnist" in out


@pytest.mark.parametrize("argv, needle", [
    (["--method", "nope"], "unknown method 'nope'; valid:"),
    (["--model", "nope"], "unknown model 'nope'; valid:"),
    (["--dataset", "nope"], "unknown dataset 'nope'; valid:"),
    (["--lr", "-1"], "lr must be positive"),
    (["--epochs", "0"], "epochs must be positive"),
    (["--batch-size", "0"], "batch_size must be positive"),
    (["--batch-size", "many"], "invalid int value"),
    (["--method-arg", "rho=0.1"], "unknown hyperparameter 'rho'"),
    (["--method-arg", "rho"], "expects key=value"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--config", "/nonexistent.yaml"], "cannot read config file"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent"], "cifar10 not found: put the extracted"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, argv, needle):
    out_dir = tmp_path / "run"
    code = main(TINY + ["--out-dir", str(out_dir)] + argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("gvr-lab: error: ") and needle in err
    assert not out_dir.exists()


def test_corrupt_yaml_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\nlr: 0.1\n")
    assert main(TINY + ["--config", str(bad)]) == 2
    assert "is not valid YAML" in capsys.readouterr().err


def test_config_file_with_flag_overrides(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: synthetic\nmodel: tiny_cnn\nepochs: 5\nlr: 0.1\nmethod: Vanilla\n")
    out_dir = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--epochs", "1", "--train-subset", "256", "--batch-size", "64",
                 "--device", "cpu", "--no-progress", "--out-dir", str(out_dir)]) == 0
    import json

    stored = json.loads((out_dir / "config.json").read_text())
    assert stored["epochs"] == 1 and stored["lr"] == 0.1 and stored["method"] == "sgd"
    assert "final test accuracy" in capsys.readouterr().out


def test_python_dash_m_entry_point(tmp_path):
    out_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "gvr_lab"] + TINY + ["--out-dir", str(out_dir)],
                          capture_output=True, text=True, env={"GVR_LAB_OFFLINE": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stderr
    assert (out_dir / "summary.json").is_file()


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("configs/*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    config = config_from_args(build_parser().parse_args(["train", "--config", str(path)]))
    assert config.out_dir == f"runs/{path.stem}"  # each example writes a run directory named after it
