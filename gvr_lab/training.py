"""Config -> run directory: the one training loop, evaluation, logging, checkpoints and resume.

The loop knows nothing about methods beyond the Method contract: it sets the learning rate, calls
`method.start_epoch`, `method.step` and `method.end_epoch`, and averages the 0-dim tensors `step` returns on the device,
syncing with the host once per evaluation; the logged steps' values reach the host without a sync
(StepFeed) and go to the loggers (loggers.py: steps.jsonl, TensorBoard, ...) as they arrive.

What it prints: on a terminal (or in a notebook) a progress bar with a line per evaluation above it;
elsewhere (a log file on a cluster) one plain line per evaluation; nothing with progress off (a
grid reports its runs itself). What it writes while it trains (tables, checkpoints, summaries,
loggers) is timed: summary.json's write_time_s.

The device decides the numerics (DeviceSettings): on CUDA fused SGD, channels_last and bf16
autocast; Config.cuda_settings applies the same on a CPU. Under torchrun every rank runs this loop
on its slice of each batch (distributed.py).

Resume follows big_vision: rerunning the same Config into the same run directory continues from
its last checkpoint (written atomically after every epoch), and a finished run is returned as is.
Every epoch reseeds the global RNG and the loader from (seed, epoch), so a resumed run computes
exactly what an uninterrupted one does.

A run's identity is the digest of the Config fields that change what it computes (Config.run_id):
its checkpoints and summaries record it, and a run directory whose files were written by another
run (a config.json edited by hand) is refused, never resumed as this one.

Random streams: each rank draws dropout masks and the methods' per-row draws (FishLoss's labels,
UnitJacLoss's directions, GVR's subset) from torch's global RNG, seeded from (seed, epoch, rank),
so ranks differ and one process is rank 0; the decisions every rank must make alike (ESAM's kept
tensors, IterGraft's micro-batch) come from Method.shared_rng, seeded from (seed, epoch) alone.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy
import pandas as pd
import torch
import torchvision
from tqdm.auto import tqdm

from . import results
from .data import (
    NOISE_KINDS,
    Augment,
    DeviceLoader,
    dataset_info,
    list_datasets,
    load_dataset,
    split_indices,
    with_label_noise,
)
from .distributed import GradSync, World, average_buffers, gather_to_main, init_world, rank_mean, reduce_means
from .errors import TYPE_NAMES, FilesystemError, UsageError, check_choice, coerce
from .landscape import curvature
from .loggers import Loggers, check_available, check_names, create_loggers
from .methods import Method, create_method, method_class
from .methods.base import rng_state
from .models import check_model_name, create_model, input_channels, object_model_name
from .optim import (
    SGD,
    SGD_FIELDS,
    build_optimizer,
    check_builds,
    check_optimizer_args,
    optimizer_class,
    optimizer_keywords,
    optimizer_record,
)
from .quant import check_bits, quantize_model

SCHEDULES = ("constant", "cosine", "cosine_epoch", "multistep")
CURVATURE_ROWS, CURVATURE_PROBES = 512, 20  # what curvature_every measures
PRECISIONS = ("auto", "fp32", "bf16")
CHANNELS_LAST = ("auto", "true", "false")
NODE_ENV = "GVR_LAB_NODE"  # the cluster node a run trains on, set by its executor
FINAL_STATUSES = ("completed", "diverged")  # "running", "stopped" (by stop_after) and "failed: ..." runs resume
# Fields that do not change what is computed: a run may be resumed with other values.
NON_IDENTITY_FIELDS = ("out_dir", "data_dir", "progress", "label", "stop_after", "loggers")
# Fields added to Config whose value in a run recorded before them was not their default: such a
# run computed with other values, so it is another run (check_run_dir), never reused under them.
# (A field added with the behaviour of its default is absent from here: the old run had it.)
FIELDS_NEW_IN_BEHAVIOUR = ("threads", "channels_last")


@dataclass
class Config:
    """Every setting of a training run. Defaults: SGD on Fashion-MNIST with a small CNN on the CPU."""

    dataset: str = "fashion_mnist"  # see list_datasets()
    # see list_models(); or an import path module:callable (torchvision.models:resnet18), or timm/<name>
    model: str = "small_cnn"
    method: str = "sgd"  # see list_methods(); aliases such as "RegLoss" are accepted
    method_args: dict = field(default_factory=dict)  # the method's hyper-parameters
    model_args: dict = field(default_factory=dict)  # extra keywords for create_model (e.g. bn=False)
    epochs: int = 3
    # Train exactly this many optimizer steps instead of `epochs` (0: epochs; epochs then stays at its
    # default): Novack et al.'s equal-steps protocol.
    steps: int = 0
    # Evaluate (and checkpoint) every this many steps in steps mode, epochs in epochs mode, and at
    # the last; 0: at every epoch's end. A run of a few seconds spends most of it evaluating otherwise.
    eval_every: int = 0
    batch_size: int = 128  # examples per update (per view)
    lr: float = 0.05  # peak learning rate
    # SGD's (momentum and nesterov): for another optimizer left unset (None or their defaults) and
    # recorded as None; its own settings go in optimizer_args
    momentum: float = 0.9
    weight_decay: float = 5e-4  # the optimizer's: coupled L2 for SGD and Adam, decoupled for AdamW
    nesterov: bool = False
    # sgd | adamw | adam | rmsprop | any torch.optim class by name | package.module:Class (optim.py)
    optimizer: str = "sgd"
    optimizer_args: dict = field(default_factory=dict)  # the optimizer's own keywords (betas, eps, ...)
    schedule: str = "cosine"  # constant | cosine (per step) | cosine_epoch | multistep
    milestones: list = field(default_factory=list)  # multistep epochs; default 50% and 75% of epochs
    lr_gamma: float = 0.1  # multistep decay factor
    label_smoothing: float = 0.0
    label_noise: float = 0.0  # fraction of the training labels corrupted, seeded; test and val stay clean
    label_noise_kind: str = "symmetric"  # symmetric (to a uniform other class) | asymmetric (data.ASYMMETRIC)
    augment: bool = True  # random crop (padding 4) and horizontal flip
    cutout: float = 0.0  # probability of a 16x16 Cutout patch (the GVR code uses 0.5)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    # The CUDA configuration on any device: fused SGD and bf16 autocast under precision "auto".
    # CUDA always gets it; on a CPU it reproduces a GPU run's numerics (tests use it to prove every
    # method right in the configuration users train in).
    cuda_settings: bool = False
    # Model and batches in NHWC: auto = on for a model with convolutions, on the CPU as on CUDA,
    # where it was measured faster (1.5x forward and backward on the CPU); true | false. The value
    # it resolved to is in summary.json.
    channels_last: str = "auto"
    # torch threads of the run, set before it builds anything whichever executor runs it: part of
    # the run's identity, since sums over other thread counts round differently. One thread per run
    # and as many runs as cores is the fastest use of a CPU for grids of small runs.
    threads: int = 1
    compile: bool = False  # torch.compile the model when the method allows it
    quant_bits: int = 0  # LSQ quantization-aware training bit width (2-16); 0 = full precision
    quant_first_last: bool = False  # also quantize the first layer and fc (LSQ keeps them full precision)
    quant_first_last_bits: int = 0  # the first layer and fc at this many bits (the LSQ paper: 8); 0 = full precision
    train_subset: int = 0  # train on this many examples (0 = all), drawn with the seed
    val_split: float = 0.0  # held-out validation part of the training set: fraction < 1 or count
    eval_batch_size: int = 1000
    # Also evaluate the training rows as the test set is evaluated (no augmentation, eval mode, the
    # labels trained on): train_eval_loss and train_eval_acc, whether a run fits its training set.
    eval_train: bool = False
    log_every: int = 10  # steps between sampled per-step metrics
    # On logged steps, also the mean gradient norm over micro-batches of this size at the step's
    # weights (0: off): one m for every method, so trajectories compare (Novack et al.: 128).
    diag_micro_batch: int = 0
    # Every N evaluations, the Hessian's top eigenvalue and trace (gvr_lab.curvature on 512 seeded
    # training rows, 20 probes) into the history (0: off); its time is in curvature_time_s.
    curvature_every: int = 0
    # Also keep checkpoint-<n>.pt after evaluation n (1-based, at most the run's number of evaluations).
    keep_checkpoints: list = field(default_factory=list)
    out_dir: str = ""  # the run directory; empty = runs/<dataset>-<model>-<method>-s<seed>-<hash>
    data_dir: str = ""  # where datasets are looked up first
    # A progress bar and a line per evaluation on a terminal, a plain line per evaluation elsewhere; False: quiet
    progress: bool = True
    stop_after: int = 0  # end this call after this many epochs (0: at `epochs`); the same call again continues
    label: str = ""  # a name for plots and tables (e.g. "LB+GN"); does not change the run
    # Where the metrics also go as the run trains (loggers.py): tensorboard, csv, wandb; steps.jsonl always
    loggers: list = field(default_factory=lambda: ["tensorboard"], metadata={"items": str})

    def __post_init__(self):
        if isinstance(self.channels_last, bool):  # the API's True and False mean "true" and "false"
            self.channels_last = str(self.channels_last).lower()
        for name in SGD_FIELDS:  # None: unset, as a run of another optimizer records them
            if getattr(self, name) is None:
                setattr(self, name, Config.__dataclass_fields__[name].default)
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce(getattr(self, f.name), TYPE_NAMES[f.type], f"config field {f.name!r}"))
        check_choice("dataset", self.dataset, list_datasets())
        check_model_name(self.model)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("channels_last", self.channels_last, CHANNELS_LAST)
        check_choice("label_noise_kind", self.label_noise_kind, NOISE_KINDS)
        check_names(self.loggers)
        if not 0 <= self.label_noise < 1:
            raise UsageError(f"label_noise must be in [0, 1), got {self.label_noise}")
        for name in ("epochs", "batch_size", "eval_batch_size", "log_every", "threads"):
            if getattr(self, name) <= 0:
                raise UsageError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UsageError(f"lr must be positive, got {self.lr}")
        for name in (
            "momentum",
            "weight_decay",
            "label_smoothing",
            "cutout",
            "train_subset",
            "val_split",
            "stop_after",
            "steps",
            "eval_every",
            "diag_micro_batch",
            "curvature_every",
        ):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.cutout > 1 or self.label_smoothing >= 1 or self.momentum >= 1:
            raise UsageError("cutout must be <= 1, label_smoothing and momentum < 1")
        if self.diag_micro_batch > self.batch_size:
            raise UsageError(f"diag_micro_batch={self.diag_micro_batch} exceeds batch_size={self.batch_size}")
        if self.diag_micro_batch and self.batch_size % self.diag_micro_batch:
            raise UsageError(
                f"diag_micro_batch={self.diag_micro_batch} does not divide batch_size={self.batch_size}: the "
                "diagnostic would leave the batch's last rows out"
            )
        default_epochs = Config.__dataclass_fields__["epochs"].default
        if self.steps and self.epochs != default_epochs:
            raise UsageError(
                f"steps={self.steps} and epochs={self.epochs} both given: a run trains either `epochs` epochs or "
                f"exactly `steps` steps; leave epochs at its default ({default_epochs}) in steps mode"
            )
        for name, what, least in (("keep_checkpoints", "evaluation numbers", 1), ("milestones", "epochs", 0)):
            numbers = getattr(self, name)
            if any(isinstance(n, bool) or not isinstance(n, int) or n < least for n in numbers):
                raise UsageError(f"{name} must list {what} as integers >= {least}, got {numbers}")
        if self.nesterov and self.momentum == 0:
            raise UsageError("nesterov needs momentum > 0")
        if self.quant_bits:
            check_bits(self.quant_bits)
        if self.quant_first_last_bits:
            check_bits(self.quant_first_last_bits, "quant_first_last_bits")
            if not self.quant_bits or self.quant_first_last:
                raise UsageError(
                    "quant_first_last_bits needs quant_bits and excludes quant_first_last (which "
                    "quantizes the first layer and fc at quant_bits)"
                )
        self.check_optimizer()
        cls = method_class(self.method)
        self.method = cls.name
        self.method_args = cls.resolve_hparams(self.method_args)
        cls.check_batch_size(self.method_args, self.batch_size)
        cls.check_optimizer(self.optimizer)

    def check_optimizer(self) -> None:
        """The optimizer's name as the run records it and its own arguments, checked by building it
        over a stand-in parameter; SGD's momentum and nesterov, for another optimizer, left unset and
        recorded as None."""
        self.optimizer, cls = optimizer_class(self.optimizer)
        check_optimizer_args(self.optimizer, cls, self.optimizer_args)
        if self.optimizer != SGD:
            given = [n for n in SGD_FIELDS if getattr(self, n) != Config.__dataclass_fields__[n].default]
            if given:
                raise UsageError(
                    f"{given[0]}={getattr(self, given[0])!r} is SGD's setting and optimizer {self.optimizer!r} is not "
                    "SGD: leave momentum and nesterov unset (its own settings go in optimizer_args)"
                )
            self.momentum = self.nesterov = None
        keywords = optimizer_keywords(
            self.optimizer, cls, self.optimizer_args, self.lr, self.weight_decay, self.momentum, self.nesterov, None
        )
        check_builds(self.optimizer, cls, keywords)

    def identity(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in NON_IDENTITY_FIELDS}

    def run_id(self) -> str:
        """The run's identity, recorded in its checkpoints and summary (identity_digest)."""
        return identity_digest(dataclasses.asdict(self))

    def run_dir(self) -> Path:
        if self.out_dir:
            return Path(self.out_dir)
        digest = hashlib.sha1(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:8]
        model = re.sub(r"[^\w.-]", "_", self.model)  # timm/vit..., module:callable: one folder name
        return Path("runs") / f"{self.dataset}-{model}-{self.method}-s{self.seed}-{digest}"

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UsageError(f"unknown config field {unknown[0]!r}; valid: {', '.join(sorted(names))}")
        return cls(**d)


@functools.cache
def default_identity() -> dict:
    return Config().identity()


def identity_digest(fields: dict) -> str:
    """12 hex digits of the digest of a run's identity fields (Config.identity) that differ from
    their defaults, from a Config's fields or a config.json. A field missing from `fields` counts as
    its default, so a field added to Config later leaves older runs' identities as they were."""
    defaults = default_identity()
    differing = {k: fields[k] for k in defaults if k in fields and fields[k] != defaults[k]}
    return hashlib.sha1(json.dumps(differing, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class Run:
    run_dir: Path
    config: Config
    history: pd.DataFrame  # one row per epoch
    summary: dict
    steps: pd.DataFrame  # sampled per-step metrics


# ---------------------------------------------------------------------- pieces of the loop


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} requested but CUDA is not available; valid here: auto, cpu")
    return device


def total_steps(config: Config, steps_per_epoch: int) -> int:
    return config.steps or config.epochs * steps_per_epoch


def total_epochs(config: Config, steps_per_epoch: int) -> int:
    """Epochs the run starts: `epochs`, or in steps mode those its steps reach into."""
    return -(-config.steps // steps_per_epoch) if config.steps else config.epochs


def lr_at(config: Config, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "cosine":
        t = (epoch * steps_per_epoch + step_in_epoch) / total_steps(config, steps_per_epoch)
        return 0.5 * config.lr * (1 + math.cos(math.pi * t))
    epochs = total_epochs(config, steps_per_epoch)
    if config.schedule == "cosine_epoch":  # stepped once per epoch, as the GVR code's CosineAnnealingLR
        return 0.5 * config.lr * (1 + math.cos(math.pi * epoch / epochs))
    milestones = config.milestones or [epochs // 2, (3 * epochs) // 4]
    return config.lr * config.lr_gamma ** sum(epoch >= m for m in milestones)


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """torch's global RNG at the start of an epoch: each rank its own stream (one process: rank 0's,
    seeded as it always was)."""
    torch.manual_seed(seed * 1_000_003 + epoch + 1 if rank == 0 else stream_seed(seed, epoch, f"rank {rank}"))


def seed_shared(generator: torch.Generator, seed: int, epoch: int) -> None:
    """Method.shared_rng at the start of an epoch: the same on every rank."""
    generator.manual_seed(stream_seed(seed, epoch, "shared"))


def stream_seed(seed: int, epoch: int, stream: str) -> int:
    """The seed of a named random stream, a digest of (seed, epoch, stream): torch's CPU generator
    keeps only a seed's low 32 bits, so streams must differ there (seed + rank * 2**48 would not)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{epoch}/{stream}".encode()).digest()[:4], "big")


def set_rng_state(state: tuple, device: torch.device) -> None:
    """Put torch's RNG back to a state rng_state took (a run resumed inside an epoch)."""
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DeviceLoader, amp_dtype) -> dict:
    model.eval()
    loss_sum = torch.zeros((), device=loader.device)
    correct = torch.zeros((), device=loader.device)
    for batch in loader.epoch(0):
        with torch.autocast(loader.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(batch.x)
        loss_sum += torch.nn.functional.cross_entropy(logits.float(), batch.y, reduction="sum")
        correct += (logits.argmax(1) == batch.y).sum()
    model.train()
    n = len(loader.labels)
    return {"loss": loss_sum.item() / n, "acc": correct.item() / n}


@dataclass(frozen=True)
class DeviceSettings:
    """How a run uses its device. One place decides it, for training and for the benchmark."""

    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype; None = fp32
    channels_last: bool  # model and batches in NHWC, as cuDNN's fast convolutions want them
    # fused optimizer kernels (SGD(fused=True): one kernel for the whole update), for an optimizer that takes `fused`
    fused: bool

    @classmethod
    def of(cls, config: Config, device: torch.device, model: torch.nn.Module | None = None) -> DeviceSettings:
        """The settings of a Config on `device`; `model`: the model object a run trains, if one was
        handed to train (else the Config's model is looked at)."""
        cuda = device.type == "cuda" or config.cuda_settings
        bf16 = config.precision == "bf16" or (config.precision == "auto" and cuda)
        channels_last = config.channels_last == "true" or (
            config.channels_last == "auto" and convolutional(config, model)
        )
        return cls(device, torch.bfloat16 if bf16 else None, channels_last=channels_last, fused=cuda)


def described_model(config: Config) -> torch.nn.Module:
    """The Config's model on the meta device, which allocates nothing: to be looked at."""
    info = dataset_info(config.dataset)
    with torch.device("meta"):
        return create_model(config.model, num_classes=info.num_classes, in_channels=info.channels, **config.model_args)


def convolutional(config: Config, model: torch.nn.Module | None = None) -> bool:
    """Whether the run's model (`model`, else the Config's) has 2-D convolutions."""
    model = described_model(config) if model is None else model
    return any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def loader_channels(model: torch.nn.Module, info) -> int:
    """The channels of the batches the model gets: those its first convolution takes (a model built
    for 3 channels gets 1-channel images repeated to 3, data.DeviceLoader), else the dataset's."""
    return input_channels(model) or info.channels


def build_model(
    config: Config,
    num_classes: int,
    channels: int,
    settings: DeviceSettings,
    world: World = World(),
    model: torch.nn.Module | None = None,
):
    """Model, optimizer and method of a Config, on the device as `settings` say (training and bench);
    `model`: a model object to train instead of building the Config's."""
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    if model is None:
        model = create_model(config.model, num_classes=num_classes, in_channels=channels, **config.model_args)
    if config.quant_bits:  # before the optimizer and the method, which capture the parameter list
        quantize_model(
            model,
            config.quant_bits,
            keep_first_last=not config.quant_first_last,
            first_last_bits=config.quant_first_last_bits or None,
        )
    model = model.to(
        settings.device, memory_format=torch.channels_last if settings.channels_last else torch.preserve_format
    )
    optimizer = build_optimizer(
        config.optimizer,
        model.parameters(),
        config.optimizer_args,
        config.lr,
        config.weight_decay,
        config.momentum,
        config.nesterov,
        settings.fused,
    )
    method = create_method(
        config.method,
        model,
        optimizer,
        label_smoothing=config.label_smoothing,
        amp_dtype=settings.amp_dtype,
        **config.method_args,
    )
    method.sync_grads = GradSync(optimizer, world).now
    method.world = world
    method.shared_rng = torch.Generator()  # seeded by the loop at every epoch (seed_shared)
    if config.compile and method.compilable:
        if not callable(getattr(model, "forward_features", None)):
            raise UsageError(
                f"compile compiles model.forward_features (the body: the lab's models and timm's have it), which "
                f"{type(model).__name__} lacks; leave compile off"
            )
        # forward = head(forward_features): compiling the body serves methods that call either
        model.forward_features = torch.compile(model.forward_features)
    return model, optimizer, method


@dataclass
class Parts:
    """What `build` makes of a Config: the data loaders, the model, its optimizer and the method."""

    train_loader: DeviceLoader
    eval_loaders: dict  # split name ("test", "val") -> its loader
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    method: Method


def build(config: Config, settings: DeviceSettings, world: World, model: torch.nn.Module | None = None) -> Parts:
    """Data loaders, model, optimizer and method for a Config (`model`: a model object to train)."""
    info = dataset_info(config.dataset)
    train_split, test_split = load_dataset(config.dataset, config.data_dir or None)
    train_idx, val_idx = split_indices(len(train_split.labels), config.train_subset, config.val_split, config.seed)
    if config.label_noise:
        train_split = with_label_noise(
            train_split,
            train_idx,
            config.label_noise,
            config.label_noise_kind,
            config.dataset,
            info.num_classes,
            config.seed,
        )
    model, optimizer, method = build_model(config, info.num_classes, info.channels, settings, world, model)
    augment = Augment(crop_pad=4 if config.augment else 0, flip=config.augment, cutout_p=config.cutout)
    channels = loader_channels(model, info)
    if channels != info.channels and world.main:
        print(
            f"model {config.model} takes {channels}-channel images: the 1-channel images of {config.dataset} are "
            f"repeated to {channels}",
            flush=True,
        )
    common = dict(device=settings.device, channels_last=settings.channels_last, channels=channels)
    train_loader = DeviceLoader(
        train_split,
        info,
        batch_size=config.batch_size,
        indices=train_idx,
        augment=augment,
        views=method.views,
        seed=config.seed,
        rank=world.rank,
        world_size=world.size,
        **common,
    )
    evaluation = dict(batch_size=config.eval_batch_size, shuffle=False, drop_last=False, **common)
    eval_loaders = {"test": DeviceLoader(test_split, info, **evaluation)}
    if len(val_idx):
        eval_loaders["val"] = DeviceLoader(train_split, info, indices=val_idx, **evaluation)
    if config.eval_train:
        eval_loaders["train_eval"] = DeviceLoader(train_split, info, indices=train_idx, **evaluation)
    evaluations = evaluation_count(config, len(train_loader))
    beyond = [n for n in config.keep_checkpoints if n > evaluations]
    if beyond:
        raise UsageError(
            f"keep_checkpoints names evaluation {beyond[0]}, but this run evaluates {evaluations} times: "
            f"keep evaluations 1 to {evaluations}"
        )
    return Parts(train_loader, eval_loaders, model, optimizer, method)


def evaluation_count(config: Config, steps_per_epoch: int) -> int:
    """How many evaluations a run makes (evaluation_due): in epochs mode one every `eval_every`
    epochs (every epoch without it) and one at the last; in steps mode one every `eval_every` steps
    (at each epoch's end without it) and one at the last step."""
    if not config.steps:
        return -(-config.epochs // max(1, config.eval_every))
    return -(-config.steps // (config.eval_every or steps_per_epoch))


def evaluation_batches(
    config,
    rows: int,
    device: torch.device,
    seed: int = 0,
    batch_size: int = 0,
    model: torch.nn.Module | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`rows` examples of the run's training rows, drawn with `seed` (the same whenever the run is
    measured), normalized and not augmented, in batches of `batch_size` (0: the run's
    eval_batch_size), with the channels the run's model (`model`, else the Config's) takes; the
    same rows in the same order whatever the batch size."""
    info = dataset_info(config.dataset)
    train_split, _ = load_dataset(config.dataset, config.data_dir or None)
    train_idx, _ = split_indices(len(train_split.labels), config.train_subset, config.val_split, config.seed)
    if rows < 1:
        raise UsageError(f"rows must be >= 1, got {rows}")
    pick = train_idx[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed))[:rows]]
    loader = DeviceLoader(
        train_split,
        info,
        batch_size=batch_size or config.eval_batch_size,
        device=device,
        indices=pick.sort().values,
        shuffle=False,
        drop_last=False,
        channels=loader_channels(described_model(config) if model is None else model, info),
    )
    return [(b.x, b.y) for b in loader.epoch(0)]


def check_run_dir(run_dir: Path, config: Config) -> dict | None:
    """The stored config of an existing run directory, after checking it is this run's: config.json
    holds this Config (fields that change nothing aside), and the results beside it were written by
    this run (the identity summary.json records)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"run directory {run_dir} exists and is not a directory")
    path = run_dir / results.CONFIG
    if not path.is_file():
        return None
    stored = results.read_json(path)
    new = config.identity()
    # a field added to Config after the run was made is absent there: the run had its default,
    # unless the field came with a behaviour the old runs did not have (FIELDS_NEW_IN_BEHAVIOUR)
    defaults = {k: v for k, v in Config().identity().items() if k not in FIELDS_NEW_IN_BEHAVIOUR}
    changed = sorted(k for k in new if k not in NON_IDENTITY_FIELDS and stored.get(k, defaults.get(k)) != new[k])
    if changed:
        k = changed[0]
        there = repr(stored[k]) if k in stored else "absent, from before the field existed"
        raise UsageError(
            f"run directory {run_dir} holds a different run ({k}: {there} there, {new[k]!r} now); "
            "choose another out_dir"
        )
    summary = run_dir / results.SUMMARY
    written_by = results.read_json(summary).get("run_id") if summary.is_file() else None
    if written_by is not None and written_by != config.run_id():
        raise mixed_run(run_dir / results.CONFIG, summary, written_by, config.run_id())
    return stored


def mixed_run(config_file: Path, written: Path, written_by: str, described: str) -> UsageError:
    """The refusal of a run directory whose results another run wrote than its config.json describes."""
    return UsageError(
        f"{written} was written by run {written_by}, but {config_file} describes run {described}: config.json "
        "was changed after the run wrote its results; put it back, or train this run in another out_dir"
    )


def holds_finished_run(run_dir: Path, config: Config) -> bool:
    """Whether `run_dir` holds `config`'s run, finished (completed or diverged); a directory holding
    another run raises UsageError (check_run_dir)."""
    summary = run_dir / results.SUMMARY
    return (
        check_run_dir(run_dir, config) is not None
        and summary.is_file()
        and results.read_json(summary).get("status") in FINAL_STATUSES
    )


def load_run(run_dir: Path, config: Config) -> Run:
    """The run as its directory holds it, one consistent state even while a writer is busy (read_run)."""
    files = results.read_run(run_dir)
    return Run(run_dir, config, files.tables[results.EPOCHS], files.summary, files.tables[results.STEPS])


def summarize(history: list[dict], status: str, wall_time_s: float, extra: dict) -> dict:
    summary = {"status": status, "wall_time_s": wall_time_s, "evaluations": len(history), **extra}
    summary["epochs_completed"] = extra["steps_completed"] // extra["steps_per_epoch"]
    if history:
        best = max(history, key=lambda r: r.get("val_acc", r["test_acc"]))
        summary.update(
            final_test_acc=history[-1]["test_acc"],
            best_test_acc=max(r["test_acc"] for r in history),
            best_epoch=best["epoch"],
            selected_test_acc=best["test_acc"],
        )
        if "val_acc" in history[-1]:
            summary.update(final_val_acc=history[-1]["val_acc"], best_val_acc=best["val_acc"])
    return summary


# ---------------------------------------------------------------------- the loop, phase by phase
#
# train: build, then run_loop under the run's lock. run_loop: resume, then until the last step
# (or stop_after evaluations) train_interval -> evaluation_row -> divergence -> checkpoint; finish.


class CurvatureHook:
    """Config.curvature_every: every N evaluations, the Hessian's top eigenvalue and trace of the
    training loss on CURVATURE_ROWS seeded training rows (landscape.curvature, CURVATURE_PROBES
    probes), with what it took. An evaluation hook: called on rank 0 with the evaluation's row, the
    model and the evaluation's number (1-based), it returns the columns it adds."""

    def __init__(self, config: Config, device: torch.device):
        self.config, self.device, self.batches = config, device, None

    def __call__(self, row: dict, model: torch.nn.Module, evaluation: int) -> dict:
        if evaluation % self.config.curvature_every:
            return {}
        self.batches = self.batches or evaluation_batches(self.config, CURVATURE_ROWS, self.device, model=model)
        measured = curvature(model, self.batches, k=1, trace_samples=CURVATURE_PROBES)
        model.train()
        return {
            "hessian_top": measured["top_eigenvalues"][0],
            "hessian_trace": measured["trace"],
            "curvature_time_s": measured["seconds"],
        }


def evaluation_hooks(config: Config, device: torch.device) -> list:
    return [CurvatureHook(config, device)] if config.curvature_every else []


@dataclass
class Context:
    """What one call of the loop holds fixed."""

    config: Config
    run_dir: Path
    world: World
    settings: DeviceSettings
    parts: Parts
    hooks: list  # evaluation hooks (CurvatureHook): row, model, evaluation number -> extra columns
    feed: StepFeed  # the logged steps' values on their way to the host
    loggers: Loggers = field(default_factory=lambda: Loggers([]))  # rank 0's: start_loggers
    started: float = 0.0  # perf_counter when this call began training

    @property
    def device(self) -> torch.device:
        return self.settings.device

    @property
    def steps_per_epoch(self) -> int:
        return len(self.parts.train_loader)

    @property
    def total(self) -> int:
        return total_steps(self.config, self.steps_per_epoch)

    def facts(self) -> dict:
        """What summary.json says about the run besides its results."""
        loader = self.parts.train_loader
        return {
            "run_id": self.config.run_id(),
            "provenance": provenance(),
            "num_params": sum(p.numel() for p in self.parts.model.parameters()),
            "optimizer": optimizer_record(self.parts.optimizer),  # what was built, torch's defaults included
            "input_channels": loader.channels,  # > the dataset's: its images repeated to the model's channels
            "device": str(self.device),
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.world.size,
            "total_steps": self.total,
            # an epoch's last len % batch_size examples of the shuffled order (others each epoch) are not trained on
            "dropped_per_epoch": len(loader.labels) % self.config.batch_size,
            "label_noise_realized": loader.noisy_fraction,
            "channels_last": self.settings.channels_last,
            "threads": torch.get_num_threads(),
            # where it trained: the Ray node of a task (cluster.train_remote sets it), else the host
            "node": os.environ.get(NODE_ENV) or platform.node(),
        }


@functools.cache
def provenance() -> dict:
    """What made a run, for its summary: the package version, the git commit of the package's
    checkout with a dirty flag (where it is one), and the versions of Python and the libraries."""
    try:
        version = importlib.metadata.version("gvr_lab")
    except importlib.metadata.PackageNotFoundError:  # imported from a checkout that was never installed
        version = None
    return {
        "gvr_lab": version,
        **git_state(Path(__file__).resolve().parent.parent),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
    }


def git_state(checkout: Path) -> dict:
    """{"git_commit", "git_dirty"} of `checkout` when it is the root of a git checkout, else {}
    (an installed package, or one inside another project's repository, has no commit of its own)."""

    def git(*args) -> str:
        return subprocess.run(
            ["git", "-C", str(checkout), *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != Path(checkout).resolve():
            return {}
        return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):  # no git, not a checkout, or no commit yet
        return {}


@dataclass
class LoopState:
    """Where a run stands: a checkpoint holds it, and a resumed run starts from it."""

    done: int = 0  # optimizer steps taken
    history: list = field(default_factory=list)  # one row per evaluation
    steps: list = field(default_factory=list)  # the logged steps' metrics
    wall_before: float = 0.0  # seconds trained by earlier calls (a resumed run)
    write_time_s: float = 0.0  # seconds spent writing (writing()), earlier calls' included
    # Where a steps-mode run stopped inside an epoch: this rank's torch RNG and the shared generator's state.
    resume_rng: tuple | None = None
    resume_shared_rng: torch.Tensor | None = None
    batches: Iterator | None = None  # the current epoch's batches; None: an epoch starts (or resumes) next


@dataclass
class Interval:
    """The steps since the previous evaluation: their metrics summed on the device (no host sync
    until the evaluation), the logged steps' metrics, each step's loss for the divergence check,
    and where the interval ended."""

    started: float
    sums: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    logged: list = field(default_factory=list)  # logged steps' rows (StepFeed), metrics averaged over ranks
    losses: list = field(default_factory=list)
    epoch: int = 0
    lr: float = 0.0
    epoch_ends: bool = False

    def add(self, out: dict, device: torch.device) -> None:
        self.losses.append(out["loss"])
        for k, v in out.items():
            previous = self.sums.get(k)
            self.sums[k] = torch.as_tensor(v, dtype=torch.float32, device=device) if previous is None else previous + v
            self.counts[k] = self.counts.get(k, 0) + 1


class StepFeed:
    """The logged steps' values on their way to the host without a sync: at a logged step they are
    stacked (float64: every value exactly) and, on CUDA, copied to pinned host memory without
    blocking, an event recorded after the copy; a step's row is handed over once its copy is done
    (every step asks; on the CPU at once), and all of them at an evaluation."""

    def __init__(self, device: torch.device):
        self.device, self.pending = device, collections.deque()

    def put(self, step: int, epoch: int, lr: float, values: dict) -> None:
        keys = sorted(values)
        stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=self.device) for k in keys])
        event = None
        if self.device.type == "cuda":
            stacked, event = stacked.to("cpu", non_blocking=True), torch.cuda.Event()
            event.record()
        self.pending.append(({"step": step, "epoch": epoch, "lr": lr}, keys, stacked, event))

    def ready(self, wait: bool = False) -> list[dict]:
        """The rows whose values are on the host, in step order (all of them with wait)."""
        rows = []
        while self.pending:
            place, keys, values, event = self.pending[0]
            if event is not None and not event.query():
                if not wait:
                    break
                event.synchronize()
            self.pending.popleft()
            rows.append({**place, **dict(zip(keys, values.tolist()))})
        return rows


def train(config: Config, on_evaluation=None, model: torch.nn.Module | None = None) -> Run:
    """Run (or resume, or just return) the training run described by `config`.

    Under torchrun every rank calls this with the same Config; rank 0 alone writes files.
    `on_evaluation(row)`, if given, is called on rank 0 with each evaluation's history row (one per epoch,
    or per `eval_every` steps in steps mode). `model`, a model object, is trained instead of the
    Config's model: the run records it as `object:<its class>` (Run.config.model), and no other
    command (curvature, bench, a resume in another process without the object) can rebuild it.
    """
    if model is not None:
        if config.model_args:
            raise UsageError("model_args are keywords for a model's builder; a model object handed to train has none")
        config = dataclasses.replace(config, model=object_model_name(model))
    run_dir = config.run_dir()
    if holds_finished_run(run_dir, config):
        return load_run(run_dir, config)
    check_available(config.loggers)

    with torch_threads(config.threads):
        return train_here(config, run_dir, on_evaluation, model)


@contextlib.contextmanager
def torch_threads(threads: int):
    """torch's intra-op threads for the block, put back after (a notebook's kernel keeps its own)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_here(config: Config, run_dir: Path, on_evaluation, model: torch.nn.Module | None = None) -> Run | None:
    """train's work in this process, with the run's threads set."""
    device = resolve_device(config.device)
    world = init_world(device.type)
    if world.active and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    settings = DeviceSettings.of(config, device, model)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    parts = build(config, settings, world, model)  # reads the data: bad input fails before any write
    hooks = evaluation_hooks(config, device)
    if world.main:
        results.make_dir(run_dir)
        with results.RunLock(run_dir):
            try:
                return run_loop(config, run_dir, world, settings, parts, hooks, on_evaluation)
            except FilesystemError as e:
                record_failure(run_dir, e)
                raise
    run_loop(config, run_dir, world, settings, parts, hooks)
    return None


def record_failure(run_dir: Path, error: FilesystemError) -> None:
    """The run's summary says that it failed and why (status "failed: no space left on device"),
    not "running"; the same command continues the run once the cause is gone. On a full disk,
    where no new file can be made, the summary is rewritten in place; where nothing can be written
    (a read-only filesystem) it stays as it was."""
    path = run_dir / results.SUMMARY
    if not path.is_file():
        return
    summary = {**results.read_json(path), "status": f"failed: {error.reason}", "error": str(error)}
    data = (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode()
    try:
        results.write_atomic(path, data)
    except FilesystemError:
        try:
            results.rewrite_in_place(path, data)
        except FilesystemError:
            pass  # the error itself still reaches the user


def run_loop(
    config: Config,
    run_dir: Path,
    world: World,
    settings: DeviceSettings,
    parts: Parts,
    hooks: list = (),
    on_evaluation=None,
) -> Run | None:
    """Steps until the run's last (or `stop_after` evaluations in this call). An evaluation closes
    each epoch (or every `eval_every` epochs) in epochs mode, every `eval_every` steps (or each
    epoch) in steps mode, and the last step: it writes the
    history row of the steps since the previous one, the logged steps and a checkpoint, and hands
    the row to `on_evaluation`."""
    ctx = Context(config, run_dir, world, settings, parts, list(hooks), StepFeed(settings.device))
    state = resume(ctx)  # before any write: a checkpoint of another run is refused
    if world.main:
        with writing(state):
            results.write_json(run_dir / results.CONFIG, dataclasses.asdict(config))
    write_summary(ctx, state, "running", state.wall_before)
    start_loggers(ctx, state)
    ctx.started = time.perf_counter()
    bar = make_progress(config, state.done, ctx.total) if world.main else None
    status, diverged, evaluations_left = "completed", {}, config.stop_after or math.inf
    parts.model.train()
    try:
        while state.done < ctx.total and evaluations_left > 0:
            interval = train_interval(ctx, state, bar)
            row = evaluation_row(ctx, state, interval)
            report(ctx, state, row, bar)
            if on_evaluation is not None:
                on_evaluation(row)
            diverged = divergence(state, interval, row)
            if diverged:
                status = "diverged"
                break
            checkpoint(ctx, state, interval)
            evaluations_left -= 1
    finally:
        if bar is not None:
            bar.close()
        with writing(state):
            ctx.loggers.close()
    return finish(ctx, state, status, diverged)


@contextlib.contextmanager
def writing(state: LoopState):
    """What the block takes counts as the run's writing time (summary.json's write_time_s)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        state.write_time_s += time.perf_counter() - started


def start_loggers(ctx: Context, state: LoopState) -> None:
    """Rank 0's loggers (Config.loggers, after steps.jsonl), started at the resumed step with the
    checkpoint's evaluation; none on the other ranks."""
    if ctx.world.main:
        ctx.loggers = create_loggers(ctx.config.loggers)
        config, last = dataclasses.asdict(ctx.config), state.history[-1] if state.history else None
        with writing(state):
            ctx.loggers.start(ctx.run_dir, config, state.done, last)


def report(ctx: Context, state: LoopState, row: dict, bar) -> None:
    """An evaluation to the loggers and, with progress on, as a line: above the bar where one
    shows, else plain (a log file gets no carriage returns)."""
    with writing(state):
        ctx.loggers.evaluation(state.done, row)
    if not (ctx.world.main and ctx.config.progress):
        return
    line = format_row(row, ctx.total, total_epochs(ctx.config, ctx.steps_per_epoch))
    if bar is not None:
        bar.write(line)
    else:
        print(line, flush=True)


def resume(ctx: Context) -> LoopState:
    """The state of the run's last checkpoint, loaded into model, optimizer and method; a new state
    for a run without one. A checkpoint that another run wrote is refused before anything is loaded
    (one without an identity predates them and is taken as this run's)."""
    path = ctx.run_dir / results.CHECKPOINT
    if not path.is_file():
        return LoopState()
    saved = results.load_checkpoint(path, map_location=ctx.device)
    written_by = saved.get("run_id")
    if written_by is not None and written_by != ctx.config.run_id():
        raise mixed_run(ctx.run_dir / results.CONFIG, path, written_by, ctx.config.run_id())
    ctx.parts.model.load_state_dict(saved["model"])
    ctx.parts.optimizer.load_state_dict(saved["optimizer"])
    # Each rank its own method state (LookSAM's direction, vSAM's PSF are per rank); under
    # another world size, rank r takes that of the old rank r mod the old world size.
    per_rank = saved.get("method_ranks") or [saved["method"]]
    ctx.parts.method.load_state_dict(per_rank[ctx.world.rank % len(per_rank)])
    # Mid-epoch (steps mode) every rank's RNG state; at an epoch's start the streams are reseeded.
    rng_ranks = saved.get("rng_ranks") or [saved.get("rng")]
    return LoopState(
        done=saved.get("step", saved["epoch"] * ctx.steps_per_epoch),
        history=saved["history"],
        steps=saved["steps"],
        wall_before=saved["wall_time_s"],
        write_time_s=saved.get("write_time_s", 0.0),
        resume_rng=rng_ranks[ctx.world.rank % len(rng_ranks)],
        resume_shared_rng=saved.get("shared_rng"),
    )


def start_epoch(ctx: Context, state: LoopState, epoch: int, step_in_epoch: int) -> None:
    """An epoch starts (the RNG streams reseeded from seed, epoch and rank), or a resumed run goes on
    inside one (the streams put back, the batches already trained on drawn again, in order)."""
    shared = ctx.parts.method.shared_rng
    if step_in_epoch == 0:
        seed_epoch(ctx.config.seed, epoch, ctx.world.rank)
        seed_shared(shared, ctx.config.seed, epoch)
    else:
        set_rng_state(state.resume_rng, ctx.device)
        if state.resume_shared_rng is None:  # a checkpoint from before the shared generator: its epoch's start
            seed_shared(shared, ctx.config.seed, epoch)
        else:
            shared.set_state(state.resume_shared_rng)
    ctx.parts.method.start_epoch(epoch)
    state.batches = ctx.parts.train_loader.epoch(epoch)
    for _ in range(step_in_epoch):
        next(state.batches)


def train_interval(ctx: Context, state: LoopState, bar) -> Interval:
    """Optimizer steps until an evaluation is due (evaluation_due) or the last step."""
    config, method = ctx.config, ctx.parts.method
    interval = Interval(started=time.perf_counter())
    while True:
        epoch, i = divmod(state.done, ctx.steps_per_epoch)
        if state.batches is None:
            start_epoch(ctx, state, epoch, i)
        batch = next(state.batches)
        lr = lr_at(config, epoch, i, ctx.steps_per_epoch)
        for group in ctx.parts.optimizer.param_groups:
            group["lr"] = lr
        method.diagnose = i % config.log_every == 0
        diagnostic = None
        if method.diagnose and config.diag_micro_batch:
            diagnostic = method.micro_batch_gradient_norm(batch, config.diag_micro_batch)
        out = method.step(batch)
        if diagnostic is not None:
            out["diag_micro_grad_norm"] = diagnostic
        interval.add(out, ctx.device)
        if method.diagnose:  # the global batch's values: averaged over the ranks
            ctx.feed.put(state.done, epoch, lr, rank_mean(out, ctx.world, ctx.device))
        hand_over(ctx, state, interval, ctx.feed.ready(), bar)
        if bar is not None:
            bar.update()
        state.done += 1
        interval.epoch, interval.lr, interval.epoch_ends = epoch, lr, i == ctx.steps_per_epoch - 1
        if interval.epoch_ends:
            method.end_epoch(epoch)
            state.batches = None
        if state.done == ctx.total or evaluation_due(config, state.done, epoch, interval.epoch_ends):
            return interval


def hand_over(ctx: Context, state: LoopState, interval: Interval, rows: list[dict], bar) -> None:
    """Logged steps whose values reached the host: into the interval's logged steps, to the loggers
    (rank 0) and into the bar's postfix."""
    interval.logged.extend(rows)
    if rows and ctx.world.main:
        with writing(state):
            for row in rows:
                ctx.loggers.step(row)
        if bar is not None:
            bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}", refresh=False)


def evaluation_due(config: Config, done: int, epoch: int, epoch_ends: bool) -> bool:
    """Whether the step just taken closes an evaluation interval (the run's last step always does)."""
    if config.steps and config.eval_every:
        return done % config.eval_every == 0
    every_epochs = 1 if config.steps else max(1, config.eval_every)
    return epoch_ends and (epoch + 1) % every_epochs == 0


def evaluation_row(ctx: Context, state: LoopState, interval: Interval) -> dict:
    """The history row of an interval, appended to the history: the training metrics' means (the
    interval's one host sync), its time, each evaluation split's loss and accuracy, and what the
    evaluation hooks add; the interval's logged steps join the state's."""
    config, model = ctx.config, ctx.parts.model
    means = reduce_means({k: (v / interval.counts[k]).item() for k, v in interval.sums.items()}, ctx.world)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    elapsed = time.perf_counter() - interval.started
    hand_over(ctx, state, interval, ctx.feed.ready(wait=True), None)
    state.steps.extend(interval.logged)
    if config.steps:
        row = {"step": state.done, "epoch": interval.epoch, "lr": interval.lr, "interval_time_s": elapsed}
    else:  # an interval of whole epochs: the time per epoch and the interval's
        first_lr = lr_at(config, interval.epoch, 0, ctx.steps_per_epoch)
        epochs = len(interval.losses) / ctx.steps_per_epoch
        row = {"epoch": interval.epoch, "lr": first_lr, "epoch_time_s": elapsed / epochs, "interval_time_s": elapsed}
    row["images_per_s"] = len(interval.losses) * config.batch_size / elapsed
    row.update({f"train_{k}": v for k, v in means.items()})
    average_buffers(model, ctx.world)
    t_eval = time.perf_counter()
    if ctx.world.main:
        for split, loader in ctx.parts.eval_loaders.items():
            row.update({f"{split}_{k}": v for k, v in evaluate(model, loader, ctx.settings.amp_dtype).items()})
    row["eval_time_s"] = time.perf_counter() - t_eval
    if ctx.world.main:
        for hook in ctx.hooks:
            row.update(hook(row, model, len(state.history) + 1))
    state.history.append(row)
    return row


def divergence(state: LoopState, interval: Interval, row: dict) -> dict:
    """Where the run diverged ({} if it did not): the first non-finite training loss of the
    interval, else (a non-finite evaluation loss) the interval's last step."""
    losses = torch.stack(interval.losses)
    bad = (~torch.isfinite(losses)).nonzero()
    if not len(bad) and all(math.isfinite(v) for k, v in row.items() if k.endswith("_loss")):
        return {}
    j = int(bad[0]) if len(bad) else len(losses) - 1
    value = float(losses[j]) if len(bad) else row.get("test_loss", float("nan"))
    return {"diverged_step": state.done - len(losses) + j, "diverged_value": value}


def checkpoint(ctx: Context, state: LoopState, interval: Interval) -> None:
    """The history, the logged steps, the checkpoint (and a kept copy when keep_checkpoints names
    this evaluation) and the summary, each written atomically by rank 0 (their time: writing)."""
    wall = state.wall_before + time.perf_counter() - ctx.started
    write_metrics(ctx, state)
    parts = ctx.parts
    rng = None if interval.epoch_ends else rng_state(ctx.device)  # an epoch's start reseeds the streams
    ranks = gather_to_main({"method": parts.method.state_dict(), "rng": rng}, ctx.world)  # a collective: every rank
    if ctx.world.main:
        saved = {
            "run_id": ctx.config.run_id(),
            "model": parts.model.state_dict(),
            "optimizer": parts.optimizer.state_dict(),
            "method": parts.method.state_dict(),
            "method_ranks": ranks and [r["method"] for r in ranks],
            "epoch": state.done // ctx.steps_per_epoch,
            "step": state.done,
            "rng": rng,
            "rng_ranks": ranks and [r["rng"] for r in ranks],
            "shared_rng": None if rng is None else parts.method.shared_rng.get_state(),
            "history": state.history,
            "steps": state.steps,
            "wall_time_s": wall,
            "write_time_s": state.write_time_s,
        }
        with writing(state):
            results.save_checkpoint(ctx.run_dir / results.CHECKPOINT, saved)
            if len(state.history) in ctx.config.keep_checkpoints:
                results.save_checkpoint(ctx.run_dir / results.kept_checkpoint(len(state.history)), saved)
    write_summary(ctx, state, "running", wall)


def finish(ctx: Context, state: LoopState, status: str, diverged: dict) -> Run | None:
    """The final summary: completed, stopped (by stop_after) or diverged (its history kept up to
    the failure; the last checkpoint stays the last good one). The run, on rank 0."""
    if status == "completed" and state.done < ctx.total:
        status = "stopped"
    if status == "diverged":
        write_metrics(ctx, state)
    write_summary(ctx, state, status, state.wall_before + time.perf_counter() - ctx.started, **diverged)
    return load_run(ctx.run_dir, ctx.config) if ctx.world.main else None


def write_metrics(ctx: Context, state: LoopState) -> None:
    if ctx.world.main:
        with writing(state):
            results.write_parquet(ctx.run_dir / results.EPOCHS, state.history)
            results.write_parquet(ctx.run_dir / results.STEPS, state.steps)


def write_summary(ctx: Context, state: LoopState, status: str, wall: float, **more) -> None:
    if ctx.world.main:
        facts = {**ctx.facts(), "steps_completed": state.done, "write_time_s": state.write_time_s, **more}
        summary = summarize(state.history, status, wall, facts)
        with writing(state):
            results.write_json(ctx.run_dir / results.SUMMARY, summary)


def make_progress(config: Config, initial: int, total: int):
    """tqdm's bar where it draws in place (a terminal; a notebook, where tqdm.auto chose its
    widget); None elsewhere or with progress off."""
    widget = any(cls.__module__ == "tqdm.notebook" for cls in tqdm.__mro__)
    if not config.progress or not (sys.stderr.isatty() or widget):
        return None
    return tqdm(
        total=total, initial=initial, desc=f"{config.method} {config.model}", unit="step", leave=False, mininterval=1.0
    )


def format_row(row: dict, total_steps: int, total_epochs: int) -> str:
    """An evaluation's line: where the run is (step or epoch, of how many), the training and evaluation
    metrics, the time."""
    where = f"step {row['step']}/{total_steps}" if "step" in row else f"epoch {row['epoch'] + 1}/{total_epochs}"
    parts = [
        where,
        f"lr {row['lr']:.4f}",
        f"train loss {row['train_loss']:.4f}",
        f"acc {row['train_acc']:.4f}",
        f"test loss {row['test_loss']:.4f}",
        f"acc {row['test_acc']:.4f}",
    ]
    if "val_acc" in row:
        parts.append(f"val acc {row['val_acc']:.4f}")
    if "hessian_top" in row:
        parts.append(f"lambda_max {row['hessian_top']:.3g} (+{row['curvature_time_s']:.1f}s)")
    parts.append(f"{row.get('epoch_time_s', row.get('interval_time_s')):.1f}s")
    return " | ".join(parts)
