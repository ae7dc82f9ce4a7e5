"""The base optimizer of a run, by name: any torch.optim class, or a class of another package.

A Config names it (`optimizer`: "sgd" by default, "adamw", "adam", "rmsprop", any torch.optim
class by name in any case, or an import path "package.module:Class" of a torch.optim.Optimizer
subclass) and gives what is its own in `optimizer_args` (betas, eps, ...). `lr` and
`weight_decay` are Config fields whatever the optimizer (the optimizer applies weight decay its
own way: coupled L2 for SGD and Adam, decoupled for AdamW); `momentum` and `nesterov` are SGD's
Config fields, so for SGD they cannot also come in `optimizer_args` (RMSprop's own `momentum`
can). `fused` is the device's decision (DeviceSettings), passed to the optimizers that take it.

A method takes the optimizer as it is built: its step computes the gradient and calls
`optimizer.step()`, so SAM with AdamW is davda54/sam's SAM wrapping AdamW.
"""

from __future__ import annotations

import importlib
import inspect

import torch

from .errors import UsageError

SGD = "sgd"
# Config fields every optimizer gets, and those only SGD gets: neither may come in optimizer_args.
COMMON_FIELDS = ("lr", "weight_decay")
SGD_FIELDS = ("momentum", "nesterov")
# Arguments the lab passes itself.
RESERVED = ("params", *COMMON_FIELDS, "fused")
# torch.optim classes a method cannot step with.
UNSUITABLE = {
    "lbfgs": "its step needs a closure, and a method calls optimizer.step() without one",
    "sparseadam": "it takes sparse gradients only",
}


def torch_optimizers() -> dict[str, type[torch.optim.Optimizer]]:
    """torch.optim's optimizer classes by lower-case name."""
    return {
        name.lower(): cls
        for name, cls in vars(torch.optim).items()
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer
    }


def optimizer_class(spec: str) -> tuple[str, type[torch.optim.Optimizer]]:
    """(the name a run records, the class) of an optimizer name or import path; a one-line
    UsageError for anything else."""
    if ":" in spec:
        module_name, _, attribute = spec.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as e:
            raise UsageError(f"optimizer {spec!r}: cannot import it ({type(e).__name__}: {e})") from None
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            raise UsageError(f"optimizer {spec!r} is not a torch.optim.Optimizer subclass")
        return spec, cls
    known = torch_optimizers()
    name = spec.lower()
    if name in UNSUITABLE:
        raise UsageError(f"optimizer {spec!r} cannot be a method's base optimizer: {UNSUITABLE[name]}")
    if name not in known:
        valid = ", ".join(n for n in sorted(known) if n not in UNSUITABLE)
        raise UsageError(f"unknown optimizer {spec!r}; valid: {valid}, or an import path package.module:Class")
    return name, known[name]


def check_optimizer_args(name: str, cls: type, args: dict) -> None:
    """Refuse, in one line, optimizer_args the Config sets elsewhere or the class does not take."""
    taken = [k for k in args if k in RESERVED or (name == SGD and k in SGD_FIELDS)]
    if taken:
        raise UsageError(
            f"optimizer_args {taken[0]!r} for optimizer {name!r}: that is the Config field of the same name "
            "(or the device's decision, for fused); set it there"
        )
    parameters = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    own = [k for k in parameters if k not in RESERVED]
    unknown = sorted(set(args) - set(own))
    if unknown:
        raise UsageError(f"unknown optimizer_args {unknown[0]!r} for optimizer {name!r}; valid: {', '.join(own)}")


def optimizer_keywords(
    name: str, cls: type, args: dict, lr: float, weight_decay: float, momentum, nesterov, fused: bool | None
) -> dict:
    """The keywords the optimizer is built with: lr and weight_decay, SGD's momentum and Nesterov,
    `fused` where the class takes it (None: leave it out), and its own arguments (JSON's lists as
    the tuples torch documents, e.g. betas)."""
    parameters = inspect.signature(cls).parameters
    keywords = {"lr": lr}
    if "weight_decay" in parameters:
        keywords["weight_decay"] = weight_decay
    elif weight_decay:
        raise UsageError(f"optimizer {name!r} takes no weight_decay: set weight_decay 0")
    if name == SGD:
        keywords.update(momentum=momentum, nesterov=nesterov)
    if fused is not None and "fused" in parameters:
        keywords["fused"] = fused
    keywords.update({k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
    return keywords


def check_builds(name: str, cls: type, keywords: dict) -> None:
    """Build the optimizer over one stand-in parameter, so that a value it refuses (betas outside
    [0, 1), a negative eps) is one line before anything trains."""
    try:
        cls([torch.zeros(1, 1, requires_grad=True)], **keywords)
    except (ValueError, TypeError) as e:
        raise UsageError(f"optimizer {name!r} refuses its settings: {e}") from None


def build_optimizer(
    spec: str,
    params,
    args: dict,
    lr: float,
    weight_decay: float,
    momentum=None,
    nesterov=None,
    fused: bool = False,
) -> torch.optim.Optimizer:
    """The optimizer a Config describes over `params` (fused where the class takes it)."""
    name, cls = optimizer_class(spec)
    return cls(params, **optimizer_keywords(name, cls, args, lr, weight_decay, momentum, nesterov, fused))


def optimizer_record(optimizer: torch.optim.Optimizer) -> dict:
    """What was built, for a run's summary: the class and its defaults (every setting, the torch
    defaults of those the Config left alone included)."""
    cls = type(optimizer)

    def plain(value):
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value if value is None or isinstance(value, (bool, int, float, str)) else repr(value)

    return {"class": f"{cls.__module__}.{cls.__qualname__}", **{k: plain(v) for k, v in optimizer.defaults.items()}}
