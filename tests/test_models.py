import functools
import itertools
import math

import pytest
import torch
from torch import nn

from gvr_lab.models import MODELS, create_model, list_models

NUM_CLASSES = 7


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_model(name: str, num_classes: int = 10, **kw) -> nn.Module:
    # Meta tensors skip allocation and init, so counting 134M-parameter models costs nothing.
    with torch.device("meta"):
        return create_model(name, num_classes=num_classes, **kw)


@functools.lru_cache(maxsize=1)
def cached_model(name: str, in_channels: int) -> nn.Module:
    # The big nets take seconds to build on CPU; cases are ordered so each (name, in_channels) pair is
    # built once and only one model is kept alive at a time.
    torch.manual_seed(0)
    return create_model(name, num_classes=NUM_CLASSES, in_channels=in_channels)


# The nets that take seconds per case on the 2-core machine (build, then forward and backward): make
# test-fast checks them at CIFAR's shape, make test at every shape.
DEEP_OR_WIDE = {"pyramidnet110", "vgg16", "wrn28_10"}
SHAPES = [
    pytest.param(
        name, channels, size, marks=[pytest.mark.slow] if name in DEEP_OR_WIDE and (channels, size) != (3, 32) else []
    )
    for name, channels, size in itertools.product(list_models(), (1, 3), (28, 32))
]


@pytest.mark.parametrize("name, in_channels, size", SHAPES)
def test_forward_backward_and_structure(name, in_channels, size):
    model = cached_model(name, in_channels)
    x = torch.randn(2, in_channels, size, size, generator=torch.Generator().manual_seed(size))

    model.train()
    # Zeroing in place spares re-allocating vgg16's 0.5 GB of gradients; a parameter left out of the
    # graph still shows up, as a None gradient, in the first case run on each cached model.
    model.zero_grad(set_to_none=False)
    logits = model(x)
    assert logits.shape == (2, NUM_CLASSES)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, pname
            assert torch.isfinite(p.grad).all(), pname

    model.eval()
    with torch.inference_mode():
        feats = model.forward_features(x)
        assert feats.shape == (2, model.fc.in_features)
        torch.testing.assert_close(model.fc(feats), model(x))

    assert isinstance(model.fc, nn.Linear)
    assert model.fc.out_features == NUM_CLASSES
    assert isinstance(model.last_stage, nn.Module)
    stage_ids = {id(p) for p in model.last_stage.parameters()}
    assert stage_ids and stage_ids <= {id(p) for p in model.parameters()}
    assert not stage_ids & {id(p) for p in model.fc.parameters()}


@pytest.mark.parametrize(
    "name, num_classes, kw, expected",
    [
        ("resnet18", 100, {}, 11_220_132),
        ("resnet18", 10, {}, 11_173_962),
        ("vgg11", 10, {}, 9_750_922),
        ("vgg11", 100, {}, 9_797_092),
        ("vgg16", 10, {}, 134_309_962),
        ("vgg16", 100, {}, 134_678_692),
        ("vgg16", 10, {"classifier": "linear"}, 14_728_266),
        ("vgg16", 100, {"classifier": "linear"}, 14_774_436),
        ("wrn28_10", 10, {}, 36_479_194),
        ("wrn28_10", 100, {}, 36_536_884),
        ("pyramidnet110", 10, {}, 28_485_477),
        ("pyramidnet110", 100, {}, 28_511_307),
        ("pyramidnet110", 10, {"alpha": 48}, 1_772_706),
        ("small_cnn", 10, {"in_channels": 1}, 421_642),
        ("small_cnn", 10, {}, 422_218),
        ("tiny_cnn", 10, {}, 10_218),
    ],
)
def test_parameter_counts(name, num_classes, kw, expected):
    assert n_params(meta_model(name, num_classes, **kw)) == expected


def test_published_counts_to_significant_digits():
    # Published figures: WRN-28-10 36.48M; PyramidNet-110 28.49M (alpha=270) and 1.77M (alpha=48).
    assert round(n_params(meta_model("wrn28_10")), -4) == 36_480_000
    assert round(n_params(meta_model("pyramidnet110")), -4) == 28_490_000
    assert round(n_params(meta_model("pyramidnet110", alpha=48)), -4) == 1_770_000


def test_resnet18_stage_counts():
    model = meta_model("resnet18", 100)
    assert model.last_stage is model.layer4
    assert n_params(model.layer4) == 8_393_728
    assert n_params(model.fc) == 51_300
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


def test_vgg16_matches_torchvision_layout():
    tv = pytest.importorskip("torchvision")
    with torch.device("meta"):
        reference = tv.models.vgg16_bn(num_classes=10)
    ours = meta_model("vgg16", 10)
    assert [p.shape for p in ours.parameters()] == [p.shape for p in reference.parameters()]
    assert [b.shape for b in ours.buffers()] == [b.shape for b in reference.buffers()]


def test_vgg_init():
    torch.manual_seed(0)
    convs = [m for m in create_model("vgg11").modules() if isinstance(m, nn.Conv2d)]
    conv = convs[-1]
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * conv.out_channels)), rel=0.02)
    assert torch.all(conv.bias == 0)


def test_last_stage_contents():
    wrn = meta_model("wrn28_10")
    assert wrn.last_stage is wrn.group3
    assert isinstance(wrn.last_stage[-2], nn.BatchNorm2d)
    pyramid = meta_model("pyramidnet110")
    assert pyramid.last_stage is pyramid.layer3
    vgg = meta_model("vgg11")
    assert [m.out_channels for m in vgg.last_stage if isinstance(m, nn.Conv2d)] == [512, 512]
    assert isinstance(vgg.last_stage[-1], nn.MaxPool2d)
    assert [m.out_channels for m in meta_model("vgg16").last_stage if isinstance(m, nn.Conv2d)] == [512] * 3
    small = meta_model("small_cnn")
    assert isinstance(small.last_stage[0], nn.Linear) and small.last_stage[0].in_features == 64 * 7 * 7
    tiny = meta_model("tiny_cnn")
    assert [m.out_channels for m in tiny.last_stage if isinstance(m, nn.Conv2d)] == [32]


def test_state_dict_has_no_duplicate_stage():
    keys = list(meta_model("resnet18").state_dict())
    assert not any(k.startswith("last_stage.") for k in keys)


def test_registry():
    assert list_models() == sorted(MODELS)
    assert {"resnet18", "vgg11", "vgg16", "wrn28_10", "pyramidnet110", "small_cnn", "tiny_cnn"} <= set(MODELS)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError) as err:
        create_model("foo")
    message = str(err.value)
    assert "\n" not in message
    assert "'foo'" in message
    for name in list_models():
        assert name in message


def test_unknown_keyword_lists_valid_keywords():
    with pytest.raises(ValueError, match=r"'depth'.*valid: num_classes, in_channels, bn"):
        create_model("vgg11", depth=3)
    with pytest.raises(ValueError, match="'bn'"):
        create_model("resnet18", bn=True)


@pytest.mark.parametrize(
    "kw",
    [
        {"in_channels": 2},
        {"num_classes": 1},
        {"name": "vgg16", "classifier": "foo"},
        {"name": "wrn28_10", "depth": 27},
        {"name": "pyramidnet110", "depth": 111},
    ],
)
def test_invalid_arguments(kw):
    kw = {"name": "resnet18", **kw}
    with pytest.raises(ValueError):
        meta_model(**kw)
