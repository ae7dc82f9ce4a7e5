"""CIFAR-style image classifiers behind a name registry, and any other model by import path or timm.

A model name is a registered builder (`register_model`), an import path `module:callable`
(`torchvision.models:resnet18`, `mypkg.nets:make`) or `timm/<name>` (timm's create_model, an optional
dependency); `create_model` builds each with the dataset's classes (`num_classes`) and, where the
callable takes it (`in_channels`, timm's `in_chans`), its channels. A model built for 3 channels
on 1-channel data gets each image's channel repeated to 3 by the loader (`input_channels`), so the
model stays what its builder made and its head reachable. The name is all a run records, so every
command rebuilds the model from a run's config.json; a model object handed to `gvr_lab.train` is
recorded as `object:<its class>` and cannot be rebuilt.

The regularizers that act on the classifier's head find it by the conventions of timm
(`get_classifier()`), the lab and torchvision (`fc`) and torchvision (`classifier`: a Linear or a
Sequential ending in one), `classifier_head`; its input, read by a forward hook (`head_calls`), is
the pre-logit features (for a timm model what `forward_head(x, pre_logits=True)` returns).

Every registered model follows one structural convention that the regularizers rely on:

* ``model.fc`` is the final ``nn.Linear`` that produces the logits;
* ``model.forward_features(x)`` returns exactly the tensor fed into ``model.fc``, so
  ``model(x) == model.fc(model.forward_features(x))`` (dropout before ``fc`` lives in there);
* ``model.last_stage`` is the module of the last body stage; its parameters plus ``fc``'s form the
  "last_stage" target set.

All models take 1- or 3-channel inputs of 28x28 or 32x32. Max-pools use ``ceil_mode`` and the heads
use adaptive pooling so that 28x28 inputs flow through nets designed for 32x32. Parameter counts in
the builders' docstrings are for 3-channel inputs unless stated otherwise.

``last_stage`` is a property rather than an attribute so the stage is not registered twice, which
would duplicate its keys in ``state_dict``.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gvr_lab.errors import UsageError, check_choice

ModelBuilder = Callable[..., nn.Module]

MODELS: dict[str, ModelBuilder] = {}


def register_model(fn: ModelBuilder) -> ModelBuilder:
    """Register a builder under its function name."""
    if fn.__name__ in MODELS:
        raise ValueError(f"model {fn.__name__!r} is already registered")
    MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(MODELS)


TIMM_PREFIX = "timm/"
OBJECT_PREFIX = "object:"  # a model object handed to gvr_lab.train, recorded by its class
OTHER_NAMES = "an import path module:callable (torchvision.models:resnet18) or timm/<name>"


def model_callable(name: str) -> tuple[Callable[..., nn.Module], str | None]:
    """The callable behind a model name and the keyword it takes the input channels by (None: it
    takes none); a one-line UsageError for a name that names no model."""
    if name in MODELS:
        return MODELS[name], "in_channels"
    if name.startswith(OBJECT_PREFIX):
        raise UsageError(
            f"model {name!r} was handed to gvr_lab.train as an object: no other command can rebuild it; load "
            "checkpoint.pt's 'model' weights into your own instance, or train a model given by name "
            f"(registered, {OTHER_NAMES})"
        )
    if name.startswith(TIMM_PREFIX):
        return functools.partial(import_timm().create_model, timm_name(name)), "in_chans"
    if ":" not in name:
        raise UsageError(f"unknown model {name!r}; valid: {', '.join(list_models())}, or {OTHER_NAMES}")
    module_name, _, attribute = name.partition(":")
    try:
        builder = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"model {name!r}: cannot import it ({type(e).__name__}: {e})") from None
    if not callable(builder):
        raise UsageError(f"model {name!r} is not callable: name a function or class that builds an nn.Module")
    parameters = inspect.signature(builder).parameters
    return builder, next((k for k in ("in_channels", "in_chans") if k in parameters), None)


def import_timm():
    try:
        import timm
    except ImportError:
        raise UsageError("timm models need timm: pip install timm (or the extra: pip install -e '.[timm]')") from None
    return timm


def timm_name(name: str) -> str:
    """timm's name of a `timm/<name>` model, refused in one line when timm has no such model."""
    model = name[len(TIMM_PREFIX) :]
    if not import_timm().is_model(model):
        raise UsageError(f"timm has no model {model!r} (see timm.list_models())")
    return model


def check_model_name(name: str) -> None:
    """Refuse, in one line, a name that names no model; an object's record passes (it is checked
    where something would rebuild it)."""
    if not name.startswith(OBJECT_PREFIX):
        model_callable(name)


def object_model_name(model: nn.Module) -> str:
    """What a run records for a model object: its class."""
    return f"{OBJECT_PREFIX}{type(model).__module__}.{type(model).__qualname__}"


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, **kw: Any) -> nn.Module:
    """Build a model by name (registered, `module:callable`, `timm/<name>`); raise a one-line
    ValueError for anything it cannot build. `num_classes` is always passed, `in_channels` where the
    callable takes the channels, the keywords `kw` as given."""
    builder, channels_keyword = model_callable(name)
    if num_classes < 2:
        raise UsageError(f"num_classes must be >= 2, got {num_classes}")
    if in_channels not in (1, 3):
        raise UsageError(f"in_channels must be 1 or 3, got {in_channels}")
    keywords = {"num_classes": num_classes, **({channels_keyword: in_channels} if channels_keyword else {}), **kw}
    parameters = inspect.signature(builder).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        if "num_classes" not in parameters:
            raise UsageError(f"model {name!r} takes no num_classes keyword: the lab builds it for the data's classes")
        unknown = sorted(set(kw) - set(parameters))
        if unknown:
            raise UsageError(
                f"unknown keyword {', '.join(map(repr, unknown))} for model {name!r}; valid: {', '.join(parameters)}"
            )
    try:
        model = builder(**keywords)
    except TypeError as e:
        if "unexpected keyword" not in str(e):
            raise
        raise UsageError(f"model {name!r} refuses its keywords: {e}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"model {name!r} built a {type(model).__name__}, not an nn.Module")
    return model


def input_channels(model: nn.Module) -> int | None:
    """The channels the model's first convolution takes (None for a model without one)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if conv is None else conv.in_channels


HEAD_CONVENTIONS = (
    "give the model `fc` (the nn.Linear that produces the logits), `classifier` (one, or an nn.Sequential "
    "ending in one) or timm's get_classifier()"
)


def classifier_head(model: nn.Module) -> nn.Linear | None:
    """The nn.Linear that produces the model's logits, by the conventions of timm
    (`get_classifier()`), the lab and torchvision (`fc`) and torchvision (`classifier`, or the last
    layer of a `classifier` Sequential); None where none of them holds one."""
    found = []
    if callable(getattr(model, "get_classifier", None)):
        found.append(model.get_classifier())
    found += [getattr(model, "fc", None), getattr(model, "classifier", None)]
    for head in found:
        if isinstance(head, nn.Sequential) and len(head):
            head = head[-1]
        if isinstance(head, nn.Linear):
            return head
    return None


@contextlib.contextmanager
def head_calls(head: nn.Module):
    """Inside, every call of `head` appends its (input, output) to the list the block gets: the
    pre-logit features and the logits of each forward, in the autograd graph."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = head.register_forward_hook(lambda module, args, output: calls.append((args[0], output)))
    try:
        yield calls
    finally:
        handle.remove()


class _Classifier(nn.Module, metaclass=abc.ABCMeta):
    """Defines ``forward`` once so the ``fc(forward_features(x))`` identity holds by construction."""

    fc: nn.Linear

    @abc.abstractmethod
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The tensor fed into ``fc``."""

    @property
    @abc.abstractmethod
    def last_stage(self) -> nn.Module:
        """The last body stage."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def _conv3x3(c_in: int, c_out: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


# --------------------------------------------------------------------------------------------------
# ResNet-18 (He et al.), CIFAR variant: 3x3 stem and no max-pool so 32x32 inputs keep resolution.


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        if stride != 1 or c_in != c_out:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(_Classifier):
    def __init__(self, num_classes: int, in_channels: int):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, 64)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = nn.Sequential(_BasicBlock(64, 64, 1), _BasicBlock(64, 64, 1))
        self.layer2 = nn.Sequential(_BasicBlock(64, 128, 2), _BasicBlock(128, 128, 1))
        self.layer3 = nn.Sequential(_BasicBlock(128, 256, 2), _BasicBlock(256, 256, 1))
        self.layer4 = nn.Sequential(_BasicBlock(256, 512, 2), _BasicBlock(512, 512, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    @property
    def last_stage(self) -> nn.Module:
        return self.layer4

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.pool(x), 1)


@register_model
def resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """CIFAR ResNet-18: 11,173,962 params (C=10), 11,220,132 (C=100); layer4 has 8,393,728."""
    return ResNet18(num_classes, in_channels)


# --------------------------------------------------------------------------------------------------
# VGG. The body is a Sequential of stages (convs + pool) so the last stage is a single module.

_VGG11_STAGES = [[64], [128], [256, 256], [512, 512], [512, 512]]
_VGG16_STAGES = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]


def _vgg_stage(c_in: int, widths: list[int], bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers.append(_conv3x3(c_in, width, bias=True))
        if bn:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU(inplace=True))
        c_in = width
    # ceil_mode takes 28 -> 14 -> 7 -> 4 -> 2 -> 1 and leaves the 32x32 path unchanged.
    layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
    return nn.Sequential(*layers)


class VGG(_Classifier):
    """VGG body of ``stages``, then ``neck`` (pooling/flatten/hidden layers before fc), then ``fc``."""

    def __init__(self, stages: list[list[int]], in_channels: int, bn: bool, neck: nn.Module, fc: nn.Linear):
        super().__init__()
        body = []
        for widths in stages:
            body.append(_vgg_stage(in_channels, widths, bn))
            in_channels = widths[-1]
        self.features = nn.Sequential(*body)
        self.neck = neck
        self.fc = fc
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                # He fan-out init: Novack et al.'s normal(0, sqrt(2 / (k*k*C_out))) and
                # torchvision's kaiming_normal_(mode="fan_out") are the same distribution.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    @property
    def last_stage(self) -> nn.Module:
        return self.features[-1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.features(x))


@register_model
def vgg11(num_classes: int = 10, in_channels: int = 3, bn: bool = False) -> nn.Module:
    """Novack et al.'s VGG-11 without dropout: 9,750,922 params (C=10), 9,797,092 (C=100), bn=False."""
    neck = nn.Sequential(
        nn.Flatten(), nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Linear(512, 512), nn.ReLU(inplace=True)
    )
    return VGG(_VGG11_STAGES, in_channels, bn, neck, nn.Linear(512, num_classes))


@register_model
def vgg16(num_classes: int = 10, in_channels: int = 3, bn: bool = True, classifier: str = "torchvision") -> nn.Module:
    """VGG-16. With bn=True: classifier="torchvision" is torchvision's vgg16_bn layout and init,
    134,309,962 params (C=10), 134,678,692 (C=100); classifier="linear" is the CIFAR VGG-16 (512 -> fc),
    14,728,266 (C=10), 14,774,436 (C=100).
    """
    check_choice("vgg16 classifier", classifier, ["torchvision", "linear"])
    if classifier == "linear":
        return VGG(_VGG16_STAGES, in_channels, bn, nn.Flatten(), nn.Linear(512, num_classes))
    # torchvision pools to 7x7 whatever the input; on CIFAR this replicates the 1x1 map 49 times.
    neck = nn.Sequential(
        nn.AdaptiveAvgPool2d((7, 7)),
        nn.Flatten(),
        nn.Linear(512 * 7 * 7, 4096),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(4096, 4096),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
    )
    model = VGG(_VGG16_STAGES, in_channels, bn, neck, nn.Linear(4096, num_classes))
    for m in [*neck.modules(), model.fc]:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
    return model


# --------------------------------------------------------------------------------------------------
# Wide-ResNet (Zagoruyko & Komodakis), pre-activation.


class _WideBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.dropout = nn.Dropout(dropout)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        needs_projection = stride != 1 or c_in != c_out
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False) if needs_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.dropout(self.conv1(act)))))
        # As in the reference implementation, a projection shortcut reads the pre-activated input,
        # an identity shortcut the raw one.
        return out + (self.shortcut(act) if self.shortcut is not None else x)


class WideResNet(_Classifier):
    def __init__(self, num_classes: int, in_channels: int, depth: int, widen_factor: int, dropout: float):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = _conv3x3(in_channels, 16)
        self.group1 = self._group(16, widths[0], 1, n, dropout)
        self.group2 = self._group(widths[0], widths[1], 2, n, dropout)
        # The final BN-ReLU completes the last pre-activation block's output, so it belongs to the
        # last stage (and hence to the "last_stage" target set).
        self.group3 = nn.Sequential(
            *self._group(widths[1], widths[2], 2, n, dropout), nn.BatchNorm2d(widths[2]), nn.ReLU(inplace=True)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)

    @staticmethod
    def _group(c_in: int, c_out: int, stride: int, n: int, dropout: float) -> nn.Sequential:
        blocks = [_WideBlock(c_in, c_out, stride, dropout)]
        blocks += [_WideBlock(c_out, c_out, 1, dropout) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    @property
    def last_stage(self) -> nn.Module:
        return self.group3

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.group3(self.group2(self.group1(self.conv1(x))))
        return torch.flatten(self.pool(x), 1)


@register_model
def wrn28_10(
    num_classes: int = 10, in_channels: int = 3, depth: int = 28, widen_factor: int = 10, dropout: float = 0.0
) -> nn.Module:
    """WRN-28-10: 36,479,194 params (C=10), 36,536,884 (C=100). last_stage = group3 incl. final BN-ReLU."""
    if depth < 10 or (depth - 4) % 6:
        raise UsageError(f"wrn depth must be 6n+4 with n >= 1, got {depth}")
    if widen_factor < 1:
        raise UsageError(f"wrn widen_factor must be >= 1, got {widen_factor}")
    if not 0.0 <= dropout < 1.0:
        raise UsageError(f"wrn dropout must be in [0, 1), got {dropout}")
    return WideResNet(num_classes, in_channels, depth, widen_factor, dropout)


# --------------------------------------------------------------------------------------------------
# PyramidNet (Han et al.), basic blocks with additive widening.


class _PyramidBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn3 = nn.BatchNorm2d(c_out)
        # Parameter-free shortcut; ceil_mode (as in the reference code) keeps it the size of the strided
        # conv's output should a map of odd size be downsampled.
        self.downsample = nn.AvgPool2d(2, 2, ceil_mode=True) if stride != 1 else nn.Identity()
        self.extra_channels = c_out - c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.bn1(x))
        out = self.bn3(self.conv2(F.relu(self.bn2(out))))
        shortcut = F.pad(self.downsample(x), (0, 0, 0, 0, 0, self.extra_channels))
        return out + shortcut


class PyramidNet(_Classifier):
    def __init__(self, num_classes: int, in_channels: int, depth: int, alpha: float):
        super().__init__()
        n = (depth - 2) // 6
        total = 3 * n
        # Block i (1-based) has width round(16 + alpha * i / total); the reference code accumulates
        # the same sum in floats, which rounds identically for the published alphas.
        widths = [16] + [int(round(16 + alpha * i / total)) for i in range(1, total + 1)]
        blocks = [_PyramidBlock(widths[i], widths[i + 1], 2 if i in (n, 2 * n) else 1) for i in range(total)]
        self.conv1 = _conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(*blocks[:n])
        self.layer2 = nn.Sequential(*blocks[n : 2 * n])
        # Final BN-ReLU kept in the last stage, as for the Wide-ResNet.
        self.layer3 = nn.Sequential(*blocks[2 * n :], nn.BatchNorm2d(widths[-1]), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)

    @property
    def last_stage(self) -> nn.Module:
        return self.layer3

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.pool(x), 1)


@register_model
def pyramidnet110(num_classes: int = 10, in_channels: int = 3, depth: int = 110, alpha: float = 270) -> nn.Module:
    """PyramidNet-110 (basic): 28,485,477 params (C=10), 28,511,307 (C=100); alpha=48: 1,772,706 (C=10).

    last_stage = layer3 incl. final BN-ReLU.
    """
    if depth < 8 or (depth - 2) % 6:
        raise UsageError(f"pyramidnet depth must be 6n+2 with n >= 1, got {depth}")
    if alpha < 0:
        raise UsageError(f"pyramidnet alpha must be >= 0, got {alpha}")
    return PyramidNet(num_classes, in_channels, depth, alpha)


# --------------------------------------------------------------------------------------------------
# Small nets for quick experiments.


class SmallCNN(_Classifier):
    def __init__(self, num_classes: int, in_channels: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            # 28 and 32 inputs reach 7x7 and 8x8 here; a fixed 7x7 keeps the hidden layer's size.
            nn.AdaptiveAvgPool2d(7),
            nn.Flatten(),
        )
        self.hidden = nn.Sequential(nn.Linear(64 * 7 * 7, 128), nn.ReLU(inplace=True))
        self.fc = nn.Linear(128, num_classes)

    @property
    def last_stage(self) -> nn.Module:
        return self.hidden

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(self.features(x))


@register_model
def small_cnn(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Two conv layers + one hidden linear: 421,642 params (1 channel, C=10), 422,218 (3 channels, C=10)."""
    return SmallCNN(num_classes, in_channels)


class TinyCNN(_Classifier):
    def __init__(self, num_classes: int, in_channels: int, bn: bool, dropout: float, smooth: bool):
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            norm = [nn.BatchNorm2d(c_out)] if bn else []
            act, pool = (nn.Softplus(), nn.AvgPool2d(2)) if smooth else (nn.ReLU(inplace=True), nn.MaxPool2d(2))
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), *norm, act, pool)

        self.block1 = block(in_channels, 16)
        self.block2 = block(16, 32)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc = nn.Linear(32 * 4 * 4, num_classes)

    @property
    def last_stage(self) -> nn.Module:
        return self.block2

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(torch.flatten(self.pool(self.block2(self.block1(x))), 1))


@register_model
def tiny_cnn(
    num_classes: int = 10, in_channels: int = 3, bn: bool = False, dropout: float = 0.0, smooth: bool = False
) -> nn.Module:
    """Two conv layers + linear head: 10,218 params (3 channels, C=10), 9,930 (1 channel, C=10).

    bn=True puts BatchNorm after each conv (+96 params), dropout > 0 drops features before fc: the
    layers a method must handle (BN statistics, dropout masks), in a model that trains in seconds.
    smooth=True swaps ReLU and max-pooling for softplus and average pooling: a twice
    differentiable net without kinks or ties, on which finite-difference penalties approximate the
    exact ones and two numerically different but equivalent computations stay close.
    """
    if not 0.0 <= dropout < 1.0:
        raise UsageError(f"tiny_cnn dropout must be in [0, 1), got {dropout}")
    return TinyCNN(num_classes, in_channels, bn, dropout, smooth)
