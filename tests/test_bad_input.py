"""Bad input, every layer in one table: a new bad input is one row of BAD.

On the command line a bad input exits 2 with one line on stderr; through the Python API it raises
UsageError with a one-line message. Either way the message names the problem (the row's needle, a
regular expression) and nothing is written. Every case runs in an empty working directory that
holds only the bad files below, so a relative default (runs/...) written by mistake is seen too.
"""

import dataclasses
import gzip
import io
import json
import re

import pandas as pd
import pytest
import torch

from gvr_lab import Config, create_method, create_model, plots, train, train_grid
from gvr_lab.cli import main
from gvr_lab.errors import UsageError
from gvr_lab.results import load_checkpoint
from gvr_lab.runner import run_notebook
from gvr_lab.training import resolve_device

from helpers import BENCH_SMOKE

TRAIN = [
    "train",
    "--dataset",
    "synthetic",
    "--model",
    "tiny_cnn",
    "--device",
    "cpu",
    "--no-progress",
    "--train-subset",
    "512",
    "--out-dir",
    "run",
]
BENCH = [*BENCH_SMOKE, "--json", "bench.json"]


def write_bad_files(folder):
    """The files the rows below name, relative to the working directory."""
    (folder / "bad.yaml").write_text("lr: [0.1\n")
    (folder / "list.yaml").write_text("- 1\n- 2\n")
    (folder / "field.yaml").write_text("learning_rate: 0.1\n")
    (folder / "afile").write_text("x")
    fashion = folder / "fashion-mnist"  # ten images per split, each images file 100 bytes short
    fashion.mkdir()
    for prefix, n in (("train", 10), ("t10k", 10)):
        images = bytes([0, 0, 8, 3]) + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + bytes(n * 784)
        labels = bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + bytes(n)
        (fashion / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(images[:-100]))
        (fashion / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    # run directories whose checkpoint is cut short, or is not one
    buffer = io.BytesIO()
    torch.save({"model": create_model("tiny_cnn").state_dict()}, buffer)
    for name, checkpoint in (("truncated", buffer.getvalue()[:2000]), ("corrupt", b"not a checkpoint" * 50)):
        (folder / name).mkdir()
        config = dataclasses.asdict(Config(dataset="synthetic", model="tiny_cnn"))
        (folder / name / "config.json").write_text(json.dumps(config))
        (folder / name / "checkpoint.pt").write_bytes(checkpoint)
    # its body would fail: a run that got past the parameter checks would show
    (folder / "nb.py").write_text(
        '# %% tags=["parameters"]\npreset: str = "cpu"  # smoke | cpu\nepochs: int = 1  # passes\n'
        "seeds: list = [0]  # seeds\nrate: float = 0.1  # a rate\n\n# %%\nimport gvr_lab as gl\n"
        'study = gl.Study("nb", globals(), presets={"smoke": {}, "cpu": {}}, outputs={})\n'
        'raise RuntimeError("boom")\n'
    )


def tiny_cnn_and_optimizer(optimizer=torch.optim.SGD):
    model = create_model("tiny_cnn", in_channels=1)
    return model, optimizer(model.parameters(), lr=0.1)


# (what, a gvr-lab command line or a Python call, what the one-line message must contain)
BAD = [
    # names
    ("unknown method", [*TRAIN, "--method", "adamw"], r"unknown method 'adamw'; valid: .*sgd"),
    ("unknown method (api)", lambda: Config(method="adamw"), r"unknown method 'adamw'; valid: .*sgd"),
    (
        "unknown method (create_method)",
        lambda: create_method("lookahead", *tiny_cnn_and_optimizer()),
        r"unknown method 'lookahead'",
    ),
    ("unknown model", [*TRAIN, "--model", "resnet9"], r"unknown model 'resnet9'; valid: .*resnet18"),
    ("unknown model (api)", lambda: Config(model="resnet1000"), r"unknown model 'resnet1000'; valid: .*resnet18"),
    (
        "model import path of a missing module",
        [*TRAIN, "--model", "nowhere.nets:make"],
        r"model 'nowhere.nets:make': cannot import it \(ModuleNotFoundError",
    ),
    (
        "model import path of a missing callable (api)",
        lambda: Config(model="torchvision.models:resnet9000"),
        r"model 'torchvision.models:resnet9000': cannot import it \(AttributeError",
    ),
    (
        "model object's record rebuilt (api)",
        lambda: create_model("object:mypkg.Net"),
        r"model 'object:mypkg.Net' was handed to gvr_lab.train as an object: no other command can rebuild it",
    ),
    (
        "model keyword a torchvision model refuses (api)",
        lambda: create_model("torchvision.models:resnet18", depth=3),
        r"model 'torchvision.models:resnet18' refuses its keywords: .*unexpected keyword argument 'depth'",
    ),
    # the optimizer
    ("unknown optimizer", [*TRAIN, "--optimizer", "adamx"], r"unknown optimizer 'adamx'; valid: .*adamw.*sgd"),
    (
        "momentum for adamw",
        [*TRAIN, "--optimizer", "adamw", "--momentum", "0.5"],
        r"momentum=0.5 is SGD's setting and optimizer 'adamw' is not SGD: leave momentum and nesterov unset",
    ),
    (
        "nesterov for adam (api)",
        lambda: Config(optimizer="Adam", nesterov=True),
        r"nesterov=True is SGD's setting and optimizer 'adam' is not SGD",
    ),
    (
        "lr among the optimizer's own arguments",
        [*TRAIN, "--optimizer", "adamw", "--optimizer-arg", "lr=0.1"],
        r"optimizer_args 'lr' for optimizer 'adamw': that is the Config field of the same name",
    ),
    (
        "momentum among sgd's own arguments (api)",
        lambda: Config(optimizer_args={"momentum": 0.5}),
        r"optimizer_args 'momentum' for optimizer 'sgd': that is the Config field",
    ),
    (
        "unknown optimizer argument",
        [*TRAIN, "--optimizer", "adamw", "--optimizer-arg", "beta=0.9"],
        r"unknown optimizer_args 'beta' for optimizer 'adamw'; valid: betas, eps",
    ),
    (
        "optimizer argument the optimizer refuses (api)",
        lambda: Config(optimizer="adamw", optimizer_args={"betas": [0.9, 1.5]}),
        r"optimizer 'adamw' refuses its settings: Invalid beta parameter at index 1",
    ),
    ("optimizer-arg without =", [*TRAIN, "--optimizer-arg", "betas"], r"--optimizer-arg expects key=value"),
    (
        "optimizer that needs a closure",
        [*TRAIN, "--optimizer", "lbfgs"],
        r"optimizer 'lbfgs' cannot be a method's base optimizer: its step needs a closure",
    ),
    (
        "weight decay for an optimizer without it (api)",
        lambda: Config(optimizer="rprop"),
        r"optimizer 'rprop' takes no weight_decay: set weight_decay 0",
    ),
    (
        "optimizer import path that is no optimizer (api)",
        lambda: Config(optimizer="torch.nn:Linear"),
        r"optimizer 'torch.nn:Linear' is not a torch.optim.Optimizer subclass",
    ),
    (
        "grafting with adamw",
        [*TRAIN, "--method", "iter_graft", "--optimizer", "adamw", "--batch-size", "128"],
        r"method 'iter_graft' sets the step length itself and assumes plain SGD .* not 'adamw': use optimizer 'sgd'",
    ),
    (
        "ngd around an AdamW (create_method)",
        lambda: create_method("ngd", *tiny_cnn_and_optimizer(torch.optim.AdamW)),
        r"method 'ngd' sets the step length itself and assumes plain SGD .* not 'AdamW'",
    ),
    (
        "unknown dataset",
        [*TRAIN, "--dataset", "mnist"],
        r"unknown dataset 'mnist'; valid: cifar10, cifar100, fashion_mnist, synthetic",
    ),
    (
        "unknown dataset (api)",
        lambda: Config(dataset="imagenet"),
        r"unknown dataset 'imagenet'; valid: cifar10, cifar100, fashion_mnist, synthetic",
    ),
    ("unknown schedule", [*TRAIN, "--schedule", "linear"], r"unknown schedule 'linear'; valid:"),
    ("unknown schedule (api)", lambda: Config(schedule="linear"), r"unknown schedule"),
    ("unknown precision", [*TRAIN, "--precision", "fp8"], r"unknown precision 'fp8'; valid:"),
    ("unknown device", [*TRAIN, "--device", "tpu"], r"unknown device 'tpu'"),
    ("unknown device (api)", lambda: resolve_device("tpu"), r"unknown device"),
    ("cuda without cuda", [*TRAIN, "--device", "cuda"], r"CUDA is not available"),
    # method hyper-parameters
    (
        "unknown hyperparameter",
        [*TRAIN, "--method", "sam", "--method-arg", "radius=1"],
        r"unknown hyperparameter 'radius'",
    ),
    (
        "hyperparameter of a method without any",
        [*TRAIN, "--method", "sgd", "--method-arg", "rho=0.1"],
        r"unknown hyperparameter 'rho'",
    ),
    (
        "hyperparameter of a method without any (api)",
        lambda: Config(method="sgd", method_args={"rho": 0.1}),
        r"unknown hyperparameter 'rho' for method 'sgd'; valid: none",
    ),
    ("rho < 0", [*TRAIN, "--method", "sam", "--method-arg", "rho=-0.1"], r"rho for method 'sam' must be >= 0"),
    (
        "rho < 0 (create_method)",
        lambda: create_method("sam", *tiny_cnn_and_optimizer(), rho=-1.0),
        r"rho for method 'sam' must be >= 0",
    ),
    ("text for a float hyperparameter", [*TRAIN, "--method", "sam", "--method-arg", "rho=big"], r"must be float"),
    (
        "bool for a float hyperparameter (create_method)",
        lambda: create_method("sam", *tiny_cnn_and_optimizer(), rho=True),
        r"must be float",
    ),
    (
        "micro-batch not dividing batch",
        [*TRAIN, "--method", "reg_loss", "--batch-size", "64", "--method-arg", "micro_batch_size=48"],
        r"is not a multiple of micro_batch_size=48",
    ),
    ("method-arg without =", [*TRAIN, "--method-arg", "rho"], r"expects key=value"),
    # numbers
    ("negative lr", [*TRAIN, "--lr", "-0.1"], r"lr must be positive"),
    ("negative lr (api)", lambda: Config(lr=-0.1), r"lr must be positive"),
    ("zero lr", [*TRAIN, "--lr", "0"], r"lr must be positive"),
    ("zero epochs", [*TRAIN, "--epochs", "0"], r"epochs must be positive"),
    ("zero epochs (api)", lambda: Config(epochs=0), r"epochs must be positive"),
    ("negative batch", [*TRAIN, "--batch-size", "-8"], r"batch_size must be positive"),
    ("zero batch", [*TRAIN, "--batch-size", "0"], r"batch_size must be positive"),
    ("zero batch (api)", lambda: Config(batch_size=0), r"batch_size must be positive"),
    ("non-integer epochs", [*TRAIN, "--epochs", "two"], r"invalid int value"),
    ("non-integer batch", [*TRAIN, "--batch-size", "many"], r"invalid int value"),
    ("text for an int field (api)", lambda: Config(epochs="3"), r"config field 'epochs' must be int"),
    ("text for a float field (api)", lambda: Config(lr="fast"), r"config field 'lr' must be float"),
    ("quant bits < 2", [*TRAIN, "--quant-bits", "1"], r"quant_bits must be an integer in \[2, 16\]"),
    # counts that cannot mean what they say
    (
        "epochs together with steps",
        [*TRAIN, "--steps", "10", "--epochs", "7"],
        r"steps=10 and epochs=7 both given: .*leave epochs at its default \(3\)",
    ),
    ("epochs together with steps (api)", lambda: Config(steps=10, epochs=1), r"steps=10 and epochs=1 both given"),
    (
        "kept checkpoint beyond the evaluations",
        [*TRAIN, "--keep-checkpoints", "1000000000"],
        r"keep_checkpoints names evaluation 1000000000, but this run evaluates 3 times",
    ),
    (
        "kept checkpoint beyond the evaluations in steps mode (api)",
        lambda: train(
            Config(
                dataset="synthetic",
                model="tiny_cnn",
                device="cpu",
                progress=False,
                out_dir="run",
                steps=10,
                eval_every=4,
                keep_checkpoints=[4],
            )
        ),
        r"keep_checkpoints names evaluation 4, but this run evaluates 3 times: keep evaluations 1 to 3",
    ),
    (
        "diagnostic micro-batch not dividing the batch",
        [*TRAIN, "--diag-micro-batch", "50"],
        r"diag_micro_batch=50 does not divide batch_size=128",
    ),
    (
        "boolean evaluation number (api)",
        lambda: Config(keep_checkpoints=[True]),
        r"keep_checkpoints must list evaluation numbers as integers >= 1, got \[True\]",
    ),
    (
        "fractional milestone (api)",
        lambda: Config(schedule="multistep", milestones=[1.5]),
        r"milestones must list epochs as integers >= 0, got \[1.5\]",
    ),
    ("negative cutout", [*TRAIN, "--cutout", "-0.5"], r"cutout must be >= 0"),
    ("cutout > 1 (api)", lambda: Config(cutout=1.5), r"cutout must be <= 1"),
    ("batch larger than data", [*TRAIN, "--batch-size", "4096"], r"batch_size=4096 exceeds the 512 training examples"),
    (
        "val_split swallows the data (api)",
        lambda: train(Config(dataset="synthetic", val_split=5000.0, device="cpu", out_dir="run")),
        r"leaves no training examples",
    ),
    # the command line itself
    ("unknown flag", [*TRAIN, "--learning-rate", "0.1"], r"unrecognized arguments: --learning-rate"),
    # files
    ("corrupt YAML", ["train", "--config", "bad.yaml", "--out-dir", "run"], r"is not valid YAML"),
    ("YAML not a mapping", ["train", "--config", "list.yaml"], r"must hold a mapping"),
    ("unknown config field", ["train", "--config", "field.yaml"], r"unknown config field 'learning_rate'"),
    ("missing config file", ["train", "--config", "nope.yaml"], r"cannot read config file"),
    ("run dir is a file", [*TRAIN, "--out-dir", "afile"], r"is not a directory"),
    (
        "run dir under a file",
        [*TRAIN, "--out-dir", "afile/run"],
        r"cannot create the folder afile/run: not a directory; a part of the path is a file",
    ),
    (
        "truncated checkpoint",
        ["curvature", "truncated"],
        r"checkpoint truncated/checkpoint.pt is truncated or damaged .*: delete it to start the run again",
    ),
    (
        "corrupt checkpoint (api)",
        lambda: load_checkpoint("corrupt/checkpoint.pt"),
        r"checkpoint corrupt/checkpoint.pt is corrupt \(not a torch checkpoint\): delete it",
    ),
    (
        "run dir is a file (api)",
        lambda: train(Config(dataset="synthetic", model="tiny_cnn", device="cpu", progress=False, out_dir="afile")),
        r"not a directory",
    ),
    (
        "truncated dataset file",
        ["train", "--data-dir", ".", "--out-dir", "run", "--device", "cpu"],
        r"train-images-idx3-ubyte\.gz",
    ),
    (
        "cifar10 offline",
        [*TRAIN, "--dataset", "cifar10", "--data-dir", "/nonexistent"],
        r"cifar10 not found: put the extracted",
    ),
    ("cifar100 offline", [*TRAIN, "--dataset", "cifar100", "--data-dir", "/nonexistent"], r"cifar100 not found"),
    # notebooks
    (
        "unknown notebook parameter",
        ["run", "nb.py", "-p", "epoch", "2", "--runs-root", "runs"],
        r"unknown parameter 'epoch'",
    ),
    (
        "unknown notebook parameter (api)",
        lambda: run_notebook("nb.py", {"epoch": 2}, runs_root="runs"),
        r"unknown parameter 'epoch' .*declared: preset: str, epochs: int, seeds: list, rate: float",
    ),
    ("wrong notebook parameter type", ["run", "nb.py", "-p", "epochs", "two", "--runs-root", "runs"], r"must be int"),
    (
        "wrong notebook parameter type (api)",
        lambda: run_notebook("nb.py", {"seeds": "0,1"}, runs_root="runs"),
        r"parameter 'seeds' .* must be list, got '0,1'",
    ),
    (
        "preset the notebook lacks",
        ["run", "nb.py", "--preset", "paper"],
        r"unknown preset 'paper' for .*nb.py; its presets: smoke, cpu",
    ),
    ("missing notebook", ["run", "nb2.py"], r"notebook nb2.py not found"),
    # grids under Ray
    (
        "ray address nobody answers",
        ["run", "nb.py", "--executor", "ray", "--ray-address", "127.0.0.1:1"],
        r"cannot reach a Ray cluster at '127.0.0.1:1': Connection refused",
    ),
    (
        "ray address without a port",
        ["run", "nb.py", "--executor", "ray", "--ray-address", "headnode"],
        r"a Ray address is auto or HOST:PORT, got 'headnode'",
    ),
    ("ray resources without ray", ["run", "nb.py", "--run-gpus", "0.5"], r"need --executor ray"),
    ("fractional gpus above one", ["figures", "--executor", "ray", "--run-gpus", "1.5"], r"whole number, got 1.5"),
    (
        "unknown executor (api)",
        lambda: train_grid({}, [{}], [0], "runs", executor="dask"),
        r"unknown executor 'dask'; valid: processes, sequential, ray",
    ),
    ("bench-grid without seeds", ["bench-grid", "--seeds", "0"], r"--seeds must be positive"),
    ("bench-grid of an unknown preset", ["bench-grid", "--preset", "tpu"], r"registers no protocol for preset 'tpu'"),
    # the benchmark
    ("bench shape of 2 channels", [*BENCH, "--shape", "2x28"], r"--shape must be CxS"),
    ("bench shape of size 64", [*BENCH, "--shape", "3x64"], r"--shape must be CxS"),
    ("bench zero batch", [*BENCH, "--batch-size", "0"], r"--batch-size must be positive"),
    ("bench zero rounds", [*BENCH, "--rounds", "0"], r"--rounds must be positive"),
    ("bench unknown method", [*BENCH, "--methods", "nope"], r"unknown method 'nope'"),
    ("bench method spec without =", [*BENCH, "--methods", "sam:rho"], r"expected name:key=value"),
    (
        "bench micro-batch not dividing batch",
        [*BENCH, "--methods", "reg_loss:micro_batch_size=5"],
        r"is not a multiple of micro_batch_size=5",
    ),
    # watching runs: loggers, the runs of a folder, TensorBoard, figures' bands
    ("unknown logger", [*TRAIN, "--loggers", "tensorbord"], r"unknown logger 'tensorbord'; valid: tensorboard, csv"),
    ("runs of a missing folder", ["runs", "nowhere"], r"nowhere is not a folder: name a folder of runs"),
    ("runs of a folder without runs", ["runs", "fashion-mnist"], r"no runs under fashion-mnist: no folder holding"),
    ("tensorboard on a missing folder", ["tensorboard", "nowhere"], r"nowhere is not a folder: TensorBoard reads"),
    (
        "unknown band of curves",
        lambda: plots.curves(pd.DataFrame({"epoch": [0], "test_acc": [0.5]}), "epoch", "test_acc", band="sem"),
        r"unknown band 'sem'; valid: std, ci, None",
    ),
]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    write_bad_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def contents(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


def refusal(how, capsys) -> str:
    """The one-line message with which `how` is refused."""
    if callable(how):
        with pytest.raises(UsageError) as info:
            how()
        message = str(info.value)
        assert "\n" not in message, message
        return message
    assert main(how) == 2
    err = capsys.readouterr().err
    assert err.startswith("gvr-lab: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("what, how, needle", BAD, ids=[case[0] for case in BAD])
def test_bad_input_is_refused_in_one_line_and_nothing_is_written(workdir, capsys, what, how, needle):
    before = contents(workdir)
    message = refusal(how, capsys)
    assert re.search(needle, message), message
    assert contents(workdir) == before


def test_each_bad_input_gets_its_own_diagnosis(workdir, capsys):
    """Not a shared catch-all line: within a layer (command-line lines carry the "gvr-lab: error: "
    prefix, API messages do not) no two rows are refused with the same message."""
    messages = {what: refusal(how, capsys) for what, how, _ in BAD}
    shared = {m: [w for w in messages if messages[w] == m] for m in messages.values()}
    assert all(len(whats) == 1 for whats in shared.values()), {m: w for m, w in shared.items() if len(w) > 1}
