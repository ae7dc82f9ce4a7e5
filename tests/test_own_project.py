"""The lab's methods in a researcher's own work: any optimizer, any model (import path, timm, an
object), plugin packages, and the methods stepped in one's own loop.

Bad input of these (unknown optimizer, SGD's momentum for AdamW, grafting with AdamW, ...) is in
tests/test_bad_input.py's table.
"""

import copy
import dataclasses
import importlib.metadata
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import gvr_lab as gl
from gvr_lab import data, models, plugins, training
from gvr_lab.distributed import World
from gvr_lab.errors import UsageError
from gvr_lab.grid import worker_modules
from gvr_lab.measure import measure_run
from gvr_lab.models import classifier_head, create_model
from gvr_lab.results import load_checkpoint
from gvr_lab.training import Config, DeviceSettings, build_model

from helpers import BENCH_SMOKE, TINY_RUN, gvr_lab_process, install_package, mlp, write_idx

CPU = torch.device("cpu")


# ---------------------------------------------------------------------- a model with timm's interface


class TimmLike(nn.Module):
    """timm's interface on a small smooth conv net: forward_features gives the unpooled map,
    forward_head(x, pre_logits=True) the pooled features, get_classifier() the head, named `head`
    (not fc); no forward_features that `head` reads directly, no last_stage."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.Tanh()
        )
        self.head = nn.Linear(16, num_classes)

    def forward_features(self, x):
        return self.stem(x)

    def forward_head(self, x, pre_logits: bool = False):
        x = x.mean((2, 3))
        return x if pre_logits else self.head(x)

    def get_classifier(self):
        return self.head

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def timm_like(num_classes: int = 10, in_chans: int = 3) -> TimmLike:
    return TimmLike(num_classes, in_chans)


TIMM_LIKE = f"{__name__}:timm_like"  # its import path, as a Config names it


def images(n=16, channels=3, size=16, classes=10, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g, dtype=dtype)
    return x, torch.randint(0, classes, (n,), generator=g)


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ---------------------------------------------------------------------- any optimizer


def test_an_sgd_run_is_the_run_it_was():
    """Identities computed before the optimizer fields existed; an SGD config.json reads as it did."""
    assert Config().run_id() == "bf21a9e8fbc5"
    assert Config(method="sam", momentum=0.5, lr=0.1).run_id() == "374f61fb50e1"
    recorded = dataclasses.asdict(Config(momentum=0.5))
    assert (recorded["momentum"], recorded["nesterov"], recorded["optimizer"], recorded["optimizer_args"]) == (
        0.5,
        False,
        "sgd",
        {},
    )
    config = Config(dataset="synthetic", model="tiny_cnn", momentum=0.5, nesterov=True, weight_decay=1e-3)
    _, optimizer, _ = build_model(config, 10, 3, DeviceSettings.of(config, CPU))
    assert type(optimizer) is torch.optim.SGD
    assert {k: optimizer.defaults[k] for k in ("lr", "momentum", "nesterov", "weight_decay", "fused")} == {
        "lr": 0.05,
        "momentum": 0.5,
        "nesterov": True,
        "weight_decay": 1e-3,
        "fused": False,
    }


def test_another_optimizer_is_recorded_as_built():
    config = Config(dataset="synthetic", model="tiny_cnn", optimizer="AdamW", optimizer_args={"betas": [0.8, 0.99]})
    recorded = dataclasses.asdict(config)
    assert (recorded["optimizer"], recorded["momentum"], recorded["nesterov"]) == ("adamw", None, None)
    assert Config.from_dict(json.loads(json.dumps(recorded))) == config  # config.json rebuilds the run
    assert Config(optimizer="adamw", momentum=None, nesterov=None) == Config(optimizer="adamw")
    for fused in (False, True):
        _, optimizer, method = build_model(config, 10, 3, DeviceSettings(CPU, None, False, fused))
        assert type(optimizer) is torch.optim.AdamW and method.optimizer is optimizer
        assert optimizer.defaults["betas"] == (0.8, 0.99) and optimizer.defaults["fused"] is fused
        assert (optimizer.defaults["lr"], optimizer.defaults["weight_decay"]) == (config.lr, config.weight_decay)
    record = training.optimizer_record(optimizer)
    assert record["class"] == "torch.optim.adamw.AdamW" and record["betas"] == [0.8, 0.99] and record["eps"] == 1e-8
    assert json.loads(json.dumps(record)) == record  # config.json and summary.json take it as it is
    # RMSprop has no fused kernel: the CUDA settings leave it out; its own momentum is its own
    rms = Config(dataset="synthetic", model="tiny_cnn", optimizer="rmsprop", optimizer_args={"momentum": 0.5})
    _, optimizer, _ = build_model(rms, 10, 3, DeviceSettings(CPU, None, False, True))
    assert type(optimizer) is torch.optim.RMSprop and optimizer.defaults["momentum"] == 0.5
    assert "fused" not in optimizer.defaults


def test_an_optimizer_by_import_path():
    config = Config(dataset="synthetic", model="tiny_cnn", optimizer="torch.optim.adamax:Adamax")
    assert config.optimizer == "torch.optim.adamax:Adamax"
    _, optimizer, _ = build_model(config, 10, 3, DeviceSettings.of(config, CPU))
    assert type(optimizer) is torch.optim.Adamax


class ReferenceSAM:
    """The algorithm of davda54/sam's SAM wrapper, written from its description: first_step moves
    each weight by rho * g / ||g|| (the norm over every parameter, 1e-12 added), keeping w;
    second_step puts w back and lets the base optimizer step with the gradient taken at the moved
    weights."""

    def __init__(self, params, base_optimizer, rho):
        self.params, self.base, self.rho, self.kept = list(params), base_optimizer, rho, {}

    @torch.no_grad()
    def first_step(self):
        norm = torch.stack([p.grad.norm() for p in self.params]).norm()
        for p in self.params:
            self.kept[p] = p.clone()
            p.add_(p.grad * (self.rho / (norm + 1e-12)))
            p.grad = None

    @torch.no_grad()
    def second_step(self):
        for p in self.params:
            p.copy_(self.kept[p])
        self.base.step()
        for p in self.params:
            p.grad = None


@pytest.mark.usefixtures("float64")
def test_sam_with_adamw_is_the_original_sam_wrapper_around_adamw_step_by_step():
    """Tolerance: the lab takes g by autograd.grad and its norm by foreach norms, the wrapper by
    .backward() and a stack of norms: the same sums, possibly in another order (measured: bitwise
    equal)."""
    model = mlp(6, 8, 3)
    reference = copy.deepcopy(model)
    method = gl.create_method("sam", model, torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01), rho=0.05)
    base = torch.optim.AdamW(reference.parameters(), lr=0.01, weight_decay=0.01)
    wrapper = ReferenceSAM(reference.parameters(), base, rho=0.05)
    start = flat(model)
    for step in range(6):
        x, y = images(8, 6, 1, classes=3, seed=step, dtype=torch.float64)
        x = x.flatten(1)
        method.step(gl.Batch(x, y))
        F.cross_entropy(reference(x), y).backward()
        wrapper.first_step()
        F.cross_entropy(reference(x), y).backward()
        wrapper.second_step()
        torch.testing.assert_close(flat(model), flat(reference), rtol=1e-12, atol=1e-15)
        for p, q in zip(model.parameters(), reference.parameters()):
            state, ref_state = method.optimizer.state[p], base.state[q]
            torch.testing.assert_close(state["exp_avg_sq"], ref_state["exp_avg_sq"], rtol=1e-12, atol=1e-18)
    # AdamW's steps, not SGD's: each coordinate moved by about lr per step at first
    assert (flat(model) - start).abs().max() > 0.03


# ---------------------------------------------------------------------- any model


def test_a_model_by_import_path_is_built_for_the_data():
    model = create_model("torchvision.models:resnet18", num_classes=7, in_channels=1)
    assert type(model) is torchvision.models.ResNet and model.fc.out_features == 7
    assert models.input_channels(model) == 3  # torchvision takes no channels: grey data will be repeated
    like = create_model(TIMM_LIKE, num_classes=5, in_channels=1)  # timm's in_chans is passed
    assert models.input_channels(like) == 1 and like.head.out_features == 5
    config = Config(
        dataset="fashion_mnist", model="torchvision.models:resnet18", model_args={"zero_init_residual": True}
    )
    assert config.model == "torchvision.models:resnet18" and "torchvision.models_resnet18" in str(config.run_dir())


def test_heads_are_found_by_timm_and_torchvision_conventions():
    resnet = torchvision.models.resnet18(num_classes=4)
    vgg = torchvision.models.vgg11(num_classes=4)
    like = TimmLike(4)
    assert classifier_head(resnet) is resnet.fc
    assert classifier_head(vgg) is vgg.classifier[-1]
    assert classifier_head(like) is like.head
    tiny = create_model("tiny_cnn")
    assert classifier_head(tiny) is tiny.fc
    assert classifier_head(nn.Sequential(nn.Flatten(), nn.Linear(3, 2))) is None
    x, _ = images(4, classes=4)
    with models.head_calls(like.head) as calls:
        logits = like(x)
    [(features, output)] = calls
    assert output is logits
    torch.testing.assert_close(features, like.forward_head(like.forward_features(x), pre_logits=True), rtol=0, atol=0)


def gvr_update(model, batch, penalty):
    """One GVR step (target fc, plain SGD at lr 1) on a copy of `model`: the weights' change."""
    model = copy.deepcopy(model)
    method = gl.create_method(
        "gvr", model, torch.optim.SGD(model.parameters(), lr=1.0), alpha=0.5, target="fc", penalty=penalty, subset=8
    )
    before = flat(model)
    torch.manual_seed(3)
    out = method.step(batch)
    return before - flat(model), out["penalty"]


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize(
    "make",
    [
        lambda: TimmLike(5),
        # torchvision's resnet18 without BatchNorm (norm_layer is its keyword), where closed form = exact
        lambda: torchvision.models.resnet18(num_classes=5, norm_layer=lambda channels: nn.Identity()),
    ],
    ids=["timm_interface", "torchvision_resnet18"],
)
def test_gvr_fc_closed_form_is_the_exact_penalty_on_timm_and_torchvision_heads(make):
    """The head found by convention, its input read by a hook: GVR's closed form on the head is
    the exact (double-backward) penalty's update, BN- and dropout-free models, float64."""
    torch.manual_seed(0)
    model = make().double()
    x, y = images(16, size=32, classes=5, dtype=torch.float64)
    batch = gl.Batch(x, y, x2=x + 0.3 * images(16, size=32, classes=5, seed=1, dtype=torch.float64)[0])
    closed, closed_penalty = gvr_update(model, batch, "closed_form")
    exact, exact_penalty = gvr_update(model, batch, "exact")
    assert exact_penalty > 1e-6
    torch.testing.assert_close(closed_penalty, exact_penalty, rtol=1e-10, atol=0)
    torch.testing.assert_close(closed, exact, rtol=1e-9, atol=1e-12)


def test_a_model_built_for_three_channels_gets_grey_images_repeated():
    info = data.DatasetInfo("grey", 10, 1, 8, (0.5,), (0.25,))
    g = torch.Generator().manual_seed(0)
    split = data.Split(torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8, generator=g), torch.arange(32) % 10)
    common = dict(batch_size=8, device=CPU, augment=data.Augment(crop_pad=2, cutout_p=0.5, cutout_size=3), views=2)
    grey = next(data.DeviceLoader(split, info, **common).epoch(0))
    for channels_last in (False, True):
        rgb = next(data.DeviceLoader(split, info, **common, channels=3, channels_last=channels_last).epoch(0))
        for view, grey_view in ((rgb.x, grey.x), (rgb.x2, grey.x2)):
            assert view.shape == (8, 3, 8, 8) and view.is_contiguous(
                memory_format=torch.channels_last if channels_last else torch.contiguous_format
            )
            assert all(torch.equal(view[:, c : c + 1], grey_view) for c in range(3))
    with pytest.raises(UsageError, match="the model takes 1-channel images and dataset 'rgb' has 3 channels"):
        data.DeviceLoader(
            split, dataclasses.replace(info, name="rgb", channels=3), batch_size=8, device=CPU, channels=1
        )


def test_timm_is_an_optional_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # as if it were not installed
    with pytest.raises(UsageError, match=r"^timm models need timm: pip install timm \(or the extra"):
        Config(model="timm/resnet18")


def test_timm_models_where_installed():
    pytest.importorskip("timm")
    with pytest.raises(UsageError, match="timm has no model 'resnet1000'"):
        Config(model="timm/resnet1000")
    config = Config(dataset="fashion_mnist", model="timm/resnet18", method="gvr", method_args={"target": "fc"})
    model, _, method = build_model(config, 10, 1, DeviceSettings.of(config, CPU))
    assert models.input_channels(model) == 1  # timm takes in_chans
    assert method.head is model.get_classifier() is model.fc
    vit = create_model("timm/vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8)
    assert classifier_head(vit) is vit.head  # a ViT's classifier is `head`
    method = gl.create_method(
        "gvr", vit, torch.optim.AdamW(vit.parameters()), target="fc", penalty="closed_form", subset=4
    )
    x, y = images(8, size=32)
    assert torch.isfinite(method.step(gl.Batch(x, y, x2=x.flip(3)))["penalty"])


# ---------------------------------------------------------------------- plugins


PLUGIN_MODULE = '''
import torch
from torch import nn
import gvr_lab as gl


@gl.register_method
class ScaledLossSGD(gl.methods.METHODS["sgd"]):
    """SGD on `scale` times the loss: a method from another package."""

    name, aliases = "{prefix}_sgd", ()
    hparams = {{"scale": 1.0}}
    reference = "a plugin's method"

    def loss(self, logits, y):
        return self.hp.scale * super().loss(logits, y)


@gl.register_model
def {prefix}_net(num_classes=10, in_channels=3):
    """A plugin's model."""
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))


@gl.register_dataset(gl.DatasetInfo("{prefix}_data", 3, 1, 8, (0.5,), (0.25,)))
def load_{prefix}_data(data_dir=None):
    """A plugin's dataset: 96/32 grey 8x8 images of 3 classes."""
    g = torch.Generator().manual_seed(0)

    def split(n):
        labels = torch.arange(n) % 3
        images = (40 * labels[:, None, None, None] + torch.randint(0, 100, (n, 1, 8, 8), generator=g)).to(torch.uint8)
        return gl.Split(images, labels)

    return split(96), split(32)
'''


def install_plugin(root: Path, prefix: str) -> dict:
    """The throwaway package `<prefix>_plugin` installed into `root`: its module `.bring` registers
    a method, a model and a dataset; `.broken` fails to import; `.again` registers a taken name.
    Its entry points (group -> {name: module})."""
    package = f"{prefix}_plugin"
    entries = {
        "gvr_lab.methods": {prefix: f"{package}.bring"},
        "gvr_lab.models": {f"{prefix}_broken": f"{package}.broken", f"{prefix}_again": f"{package}.again"},
        "gvr_lab.datasets": {f"{prefix}_data": f"{package}.bring"},
    }
    files = {
        f"{package}/__init__.py": "",
        f"{package}/bring.py": PLUGIN_MODULE.format(prefix=prefix),
        f"{package}/broken.py": "raise RuntimeError('the plugin is broken\\nsecond line')\n",
        f"{package}/again.py": "import gvr_lab as gl\n\ngl.register_model(gl.models.MODELS['tiny_cnn'])\n",
    }
    install_package(root, package, files, entries)
    return entries


@pytest.mark.usefixtures("registries")
def test_plugins_register_and_a_broken_one_is_one_line(tmp_path, monkeypatch, capsys):
    entries = install_plugin(tmp_path, "inproc")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "LOADED", [])
    monkeypatch.setattr(plugins, "FAILED", [])
    points = importlib.metadata.EntryPoints(
        importlib.metadata.EntryPoint(name, module, group)
        for group, named in entries.items()
        for name, module in named.items()
    )
    monkeypatch.setattr(plugins.importlib.metadata, "entry_points", lambda: points)
    plugins.load_plugins()
    assert "inproc_sgd" in gl.list_methods() and "inproc_net" in gl.list_models()
    assert "inproc_data" in gl.list_datasets()
    assert plugins.LOADED == [
        "inproc (gvr_lab.methods = inproc_plugin.bring)",
        "inproc_data (gvr_lab.datasets = inproc_plugin.bring)",
    ]
    err = capsys.readouterr().err.splitlines()
    assert (
        err
        == plugins.FAILED
        == [
            "gvr_lab: plugin inproc_broken (gvr_lab.models = inproc_plugin.broken) not loaded: RuntimeError: the "
            "plugin is broken; the rest of the lab works",
            "gvr_lab: plugin inproc_again (gvr_lab.models = inproc_plugin.again) not loaded: ValueError: model "
            "'tiny_cnn' is already registered; the rest of the lab works",
        ]
    )
    config = Config(dataset="inproc_data", model="inproc_net", method="inproc_sgd", method_args={"scale": 2.0})
    assert config.method_args == {"scale": 2.0}
    # a grid's worker process imports gvr_lab, which loads the plugins, and the module named here
    assert worker_modules([config]) == (["inproc_plugin.bring"], "")


@pytest.mark.slow
def test_an_installed_plugin_package_lists_and_trains_through_the_cli(tmp_path):
    site = tmp_path / "site"
    install_plugin(site, "byo")
    listing = gvr_lab_process(["list"], tmp_path, [site])
    assert "byo_sgd: scale=1.0" in listing.stdout
    assert "byo_net" in listing.stdout.split("models:")[1] and "byo_data" in listing.stdout.split("datasets:")[1]
    assert "plugins:  byo (gvr_lab.methods = byo_plugin.bring)" in listing.stdout
    lines = listing.stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith("gvr_lab: plugin byo_") for line in lines), listing.stderr
    run = ["--dataset", "byo_data", "--model", "byo_net", "--method", "byo_sgd", "--method-arg", "scale=2"]
    trained = gvr_lab_process(
        ["train", *run, "--epochs", "2", "--batch-size", "16", "--device", "cpu", "--no-progress", "--out-dir", "r"],
        tmp_path,
        [site],
    )
    assert "final test accuracy" in trained.stdout
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps_completed"] == 12
    measured = gvr_lab_process(["curvature", "r", "--k", "1", "--trace-samples", "2", "--rows", "32"], tmp_path, [site])
    assert "top eigenvalues" in measured.stdout  # another process rebuilt the plugin's model


# ---------------------------------------------------------------------- commands rebuild any model


def fake_fashion_mnist(folder: Path) -> Path:
    """Fashion-MNIST's files with 256 training and 64 test images (random), in `folder`."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for part, n in (("train", 256), ("t10k", 64)):
        write_idx(folder / f"{part}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{part}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))
    return folder


@pytest.mark.slow
def test_cli_trains_with_adamw_and_a_torchvision_model_and_every_command_rebuilds_it(tmp_path):
    data_dir = fake_fashion_mnist(tmp_path / "data")
    common = ["--device", "cpu", "--no-progress", "--data-dir", str(data_dir), "--batch-size", "32"]
    adamw = ["--optimizer", "adamw", "--optimizer-arg", "betas=[0.8,0.99]", "--method", "sam", "--model", "tiny_cnn"]
    adamw += ["--epochs", "2", *common]
    gvr_lab_process(["train", *adamw, "--out-dir", "adamw"], tmp_path, [])
    for _ in range(2):  # stopped after its first epoch, then resumed from the checkpoint (AdamW's state in it)
        gvr_lab_process(["train", *adamw, "--out-dir", "adamw-resumed", "--stop-after", "1"], tmp_path, [])
    whole, resumed = (load_checkpoint(tmp_path / run / "checkpoint.pt") for run in ("adamw", "adamw-resumed"))
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])
    config = json.loads((tmp_path / "adamw" / "config.json").read_text())
    assert (config["optimizer"], config["optimizer_args"], config["momentum"], config["nesterov"]) == (
        "adamw",
        {"betas": [0.8, 0.99]},
        None,
        None,
    )
    summary = json.loads((tmp_path / "adamw" / "summary.json").read_text())
    assert summary["optimizer"]["class"] == "torch.optim.adamw.AdamW" and summary["optimizer"]["betas"] == [0.8, 0.99]

    gvr = ["--method", "gvr", "--method-arg", "target=fc", "--method-arg", "penalty=closed_form"]
    resnet = ["--model", "torchvision.models:resnet18", *gvr, "--epochs", "2", "--train-subset", "64"]
    resnet += ["--out-dir", "resnet", *common]
    first = gvr_lab_process(["train", *resnet, "--stop-after", "1"], tmp_path, [])
    assert first.stdout.count("the 1-channel images of fashion_mnist are repeated to 3") == 1
    gvr_lab_process(["train", *resnet, "--stop-after", "1"], tmp_path, [])  # resumed in another process
    summary = json.loads((tmp_path / "resnet" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["evaluations"] == 2 and summary["input_channels"] == 3
    assert json.loads((tmp_path / "resnet" / "config.json").read_text())["model"] == "torchvision.models:resnet18"
    measured = gvr_lab_process(
        ["curvature", "resnet", "--k", "1", "--trace-samples", "2", "--rows", "32"], tmp_path, []
    )
    assert "top eigenvalues" in measured.stdout
    bench = [*BENCH_SMOKE, "--model", "torchvision.models:resnet18", "--batch-size", "8", "--methods", "sgd"]
    assert "| sgd |" in gvr_lab_process(bench, tmp_path, []).stdout


@pytest.mark.slow
def test_gvr_fc_closed_form_trains_a_timm_interface_model_given_by_import_path(tiny_config):
    run = gl.train(tiny_config(model=TIMM_LIKE, method="gvr", method_args={"target": "fc", "penalty": "closed_form"}))
    assert run.summary["status"] == "completed" and (run.history["train_penalty"] > 0).all()


@pytest.mark.slow
def test_a_model_object_trains_and_is_said_not_to_be_rebuildable(tiny_config):
    run = gl.train(tiny_config(epochs=1), model=TimmLike(10))
    assert run.config.model == f"object:{__name__}.TimmLike" and run.summary["status"] == "completed"
    with pytest.raises(UsageError, match=r"was handed to gvr_lab.train as an object: no other command can rebuild"):
        measure_run(run.run_dir, k=1, trace_samples=2, rows=32)
    with pytest.raises(UsageError, match="model_args are keywords for a model's builder"):
        gl.train(tiny_config(model_args={"bn": True}), model=TimmLike(10))


# ---------------------------------------------------------------------- one's own loop


@pytest.mark.parametrize(
    "name, state",
    [
        ("vsam", "SAM steps throughout its warm-up"),
        ("saf", "each example's logits of `lag` epochs ago"),
        ("mesa", "its KL term from epoch kl_start_epoch"),
    ],
)
def test_a_method_with_per_epoch_state_refuses_a_step_before_start_epoch(name, state):
    model = TimmLike(10)
    method = gl.create_method(name, model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = images()
    batch = gl.Batch(x, y, torch.arange(len(y)))
    before = flat(model)
    with pytest.raises(UsageError) as refused:
        method.step(batch)
    message = str(refused.value)
    assert message.startswith(f"method {name!r} keeps per-epoch state ({state}") and "\n" not in message
    assert "call method.start_epoch(epoch) before each epoch's first step" in message
    assert torch.equal(flat(model), before)
    method.start_epoch(0)
    method.step(batch)
    assert not torch.equal(flat(model), before)


def test_gvr_draws_both_views_from_augment_or_refuses_a_batch_without_two():
    def augment(x):
        return x + 0.1 * torch.randn_like(x)

    x, y = images()
    model = TimmLike(10)
    method = gl.create_method("gvr", model, torch.optim.SGD(model.parameters(), lr=0.1), target="fc")
    with pytest.raises(UsageError, match=r"^method 'gvr' needs two views of each image: give batches a second view"):
        method.step(gl.Batch(x, y))
    drawn = copy.deepcopy(model)
    with_augment = gl.create_method(
        "gvr", drawn, torch.optim.SGD(drawn.parameters(), lr=0.1), target="fc", augment=augment
    )
    torch.manual_seed(0)
    out = with_augment.step(gl.Batch(x, y))
    torch.manual_seed(0)
    views = gl.Batch(augment(x), y, None, augment(x))  # the same two draws, then the subset's
    expected = method.step(views)
    assert torch.equal(flat(drawn), flat(model)) and out["penalty"] == expected["penalty"] > 0


def test_loss_fn_returns_one_loss_per_example_and_excludes_what_assumes_cross_entropy():
    model = TimmLike(10)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = images()
    with pytest.raises(UsageError, match=r"loss_fn of method 'sam' returned a tensor of shape \(\): it must return"):
        gl.create_method("sam", model, sgd, loss_fn=F.cross_entropy).step(gl.Batch(x, y))
    with pytest.raises(UsageError, match="label_smoothing applies to the default cross-entropy; with loss_fn"):
        gl.create_method("sam", model, sgd, loss_fn=F.cross_entropy, label_smoothing=0.1)
    with pytest.raises(UsageError, match="penalty 'closed_form' of method 'gvr' is cross-entropy's head gradient"):
        gl.create_method("gvr", model, sgd, loss_fn=F.cross_entropy, target="fc", penalty="closed_form")


def test_soft_targets_train_through_loss_fn_and_count_their_most_likely_class():
    """Mixup's targets: loss_fn gets them per row, ESAM selects rows of them, accuracy reads argmax."""
    model = TimmLike(10)
    method = gl.create_method(
        "esam",
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=lambda logits, targets: F.cross_entropy(logits, targets, reduction="none"),
        gamma=0.5,
    )
    x, y = images()
    soft = 0.7 * F.one_hot(y, 10) + 0.3 * F.one_hot(y.roll(1), 10)
    with torch.no_grad():
        logits = model(x)
    out = method.step(gl.Batch(x, soft.float()))
    assert out["selected"] == 0.5
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits, soft.float()), rtol=1e-6, atol=0)
    assert out["acc"] == (logits.argmax(1) == y).float().mean()


def test_process_pool_workers_import_what_the_runs_name():
    """A model given by import path or timm/<name> needs no module of its own in a worker: it is
    imported by name wherever it is built."""
    names = (TIMM_LIKE, "torchvision.models:resnet18", "tiny_cnn")
    configs = [Config(**{**TINY_RUN, "model": name}) for name in names]
    assert worker_modules(configs) == ([], "")


def test_training_builds_a_model_object_without_the_config_building_one(monkeypatch):
    """DeviceSettings and build look at the object; the Config's name is the object's record."""
    config = Config(**{**TINY_RUN, "model": "object:somewhere.Net"})
    monkeypatch.setattr(training, "create_model", lambda *a, **k: pytest.fail("a model was built by name"))
    settings = DeviceSettings.of(config, CPU, TimmLike(10))
    assert settings.channels_last  # it has convolutions
    parts = training.build(config, settings, World(), TimmLike(10))
    assert isinstance(parts.model, TimmLike) and parts.train_loader.channels == 3
