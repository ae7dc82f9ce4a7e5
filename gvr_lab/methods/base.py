"""The Method contract, the toolkit methods build their steps from, and the registry.

A method owns its whole update, as davda54/sam's SAM class does: `step(batch)` runs every forward
and backward pass it needs and calls `optimizer.step()` itself. The training loop only sets the
learning rate, calls `start_epoch`, `step` and `end_epoch`, and averages what `step` returns. It
never knows a method by name.

Adding a method is one new file in this package: subclass `Method` (or a family's class), give it a
`name`, its hyper-parameter defaults in `hparams`, a `reference` and `passes` for the method table,
and decorate it with `@register_method`. Every module here is imported by the package, so nothing
else needs editing; docs/adding_a_method.md walks through a SAM variant.

Hyper-parameters live in `self.hp` (read as `self.hp.rho`), never as instance attributes, so no
name can shadow a part of the contract (`step`, `start_epoch`, `world`, ...).

Outside the loop (docs/own_loop.md) a method is created around any model and optimizer and stepped
on the caller's batches. The loss is cross-entropy (with `label_smoothing`) unless `loss_fn(logits,
targets)` is given: per-example losses, which the method reduces (their mean, or a selection of
rows, ESAM's). A method with per-epoch state (`epoch_state`) refuses to step before
`start_epoch`, and one whose definition assumes plain SGD (`sgd_only`) refuses another optimizer.

The toolkit, one piece per idea:
* two-pass steps (the SAM family): `clean_pass` (pass 1 at w: logits, loss, its gradient by
  autograd.grad, the RNG state) and `perturbed_pass` (pass 2 at w + eps with pass 1's dropout masks,
  its gradient into .grad); `moved` (weights at w + eps, batch-norm statistics frozen, w restored
  by copy) serves them and every finite-difference probe; `replayed_rng` replays dropout masks.
* gradients: `grad` (autograd.grad, zeros where a parameter is not reached) for a gradient that is
  an ingredient, `.backward()` for the one the optimizer applies; `set_grads` hands a computed one
  to the optimizer laid out like its parameter; `global_norm`, `global_dot` over parameter lists.
* logging: `update_norm` (norm of the applied gradient, only on logged steps), `metrics`.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..data import Batch
from ..distributed import World, average_
from ..errors import UsageError, check_choice, coerce

BOUNDS = {
    ">= 0": lambda v: v >= 0,
    "> 0": lambda v: v > 0,
    ">= 1": lambda v: v >= 1,
    "in (0, 1]": lambda v: 0 < v <= 1,
    "in [0, 1]": lambda v: 0 <= v <= 1,
}


class HParams(dict):
    """A method's resolved hyper-parameters, read as attributes: `self.hp.rho`."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


# The row a two-view method's step time is read against in `gvr-lab bench`: plain sgd stepping on
# both views at once (2B images), the same images a two-view method computes with.
TWO_VIEW_SGD = "sgd on both views (2B images)"


@dataclass(frozen=True)
class SpeedTarget:
    """A method's speed goal for `gvr-lab bench`: the median time of its benchmark row with these
    hyper-parameters (the rest at their defaults) at most `bound` times that of the `reference` row
    (a method name, timed at its first benchmark row, or TWO_VIEW_SGD). `bound` is a number or a
    function of the row's resolved hyper-parameters and its measured two-pass fraction p."""

    what: str  # as BENCHMARKS.md names it: "sam <= 2.05x sgd"
    hparams: dict
    reference: str
    bound: float | Callable[[dict, float], float]


@dataclass
class CleanPass:
    """Pass 1 of a two-pass step (Method.clean_pass)."""

    logits: torch.Tensor
    loss: torch.Tensor
    grads: list[torch.Tensor]  # d loss / d params, not in .grad
    rng: tuple  # torch's RNG state before the pass, for the perturbed pass to replay


class Method(abc.ABC):
    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    # Hyper-parameter name -> default. Types follow the default (an int is accepted for a float);
    # a None default means "optional number".
    hparams: ClassVar[dict[str, Any]] = {}
    # Hyper-parameter name -> allowed values, for the string-valued ones.
    choices: ClassVar[dict[str, tuple]] = {}
    # Hyper-parameter name -> the range it must lie in, one of BOUNDS (validate() checks the rest).
    bounds: ClassVar[dict[str, str]] = {}
    # For `gvr-lab list` and README's method table: the reference and known deviations, and the
    # forward-backward passes per step.
    reference: ClassVar[str] = ""
    passes: ClassVar[str] = "1"
    # Hyper-parameter -> the value whose step needs double backward, which torch.compile's
    # AOTAutograd refuses (see `compilable`).
    double_backward: ClassVar[dict[str, Any]] = {}
    views: int = 1
    # What the method's defining term is, in a few words ("" for a method without one, such as
    # sgd or grafting): figures refuse runs where it never acted (term_share).
    term: ClassVar[str] = ""
    # The hyper-parameter whose value > 0 switches the term on at every step (alpha, lam, rho); a
    # method whose term acts on some steps only overrides term_share instead.
    term_weight: ClassVar[str] = ""
    # The method's colour in every figure (hex); "" draws one from its name.
    color: ClassVar[str] = ""
    # `gvr-lab bench --methods all`: the hyper-parameters of each row timed for this method (none:
    # not benchmarked, e.g. it needs a file), and the speed goals read against them.
    bench_rows: ClassVar[tuple[dict, ...]] = ({},)
    speed_targets: ClassVar[tuple[SpeedTarget, ...]] = ()
    # Set by the loop before each step: True on steps whose metrics are logged. Diagnostics that
    # cost extra work (norms of the update gradient, per-micro-batch data-gradient norms) are
    # computed only then; the loop averages each metric over the steps that returned it.
    diagnose: bool = True
    # The data-parallel group, set by the loop under torchrun: one process by default. Methods
    # reach the other ranks only through it (all_mean_, distributed.all_reduce_).
    world: World = World()
    # What a method keeps per epoch, in a few words ("" for none): such a method refuses to step
    # before start_epoch, which would leave it in its first epoch's behaviour (vSAM's warm-up).
    epoch_state: ClassVar[str] = ""
    # True for a method whose definition assumes plain SGD as its base optimizer (it sets the step
    # length itself): another optimizer is refused, in the Config and when the method is created.
    sgd_only: ClassVar[bool] = False
    # The epoch of the last start_epoch (None before any).
    epoch: int | None = None
    # The CPU generator of the random decisions every rank must make alike (ESAM's kept tensors,
    # IterGraft's micro-batch), seeded by the loop from (seed, epoch) alike on every rank; None
    # outside the loop: torch's global generator. Per-row randomness (dropout masks, sampled labels)
    # comes from the global RNG, which the loop seeds per rank.
    shared_rng: torch.Generator | None = None
    # Set by __init__ (declared here so that register_method sees their names too).
    hp: HParams
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    params: list[torch.Tensor]
    label_smoothing: float
    amp_dtype: torch.dtype | None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        label_smoothing: float = 0.0,
        amp_dtype: torch.dtype | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        **hparams,
    ):
        self.hp = HParams(self.resolve_hparams(hparams))
        self.check_optimizer("sgd" if isinstance(optimizer, torch.optim.SGD) else type(optimizer).__name__)
        if loss_fn is not None and label_smoothing:
            raise UsageError(
                f"method {self.name!r}: label_smoothing applies to the default cross-entropy; with loss_fn, smooth "
                "the targets inside it"
            )
        self.model, self.optimizer = model, optimizer
        self.label_smoothing, self.amp_dtype, self.loss_fn = label_smoothing, amp_dtype, loss_fn
        self.params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self._saved: dict[int, torch.Tensor] = {}  # w while `moved`, per parameter, kept across steps

    def __getattr__(self, name: str):
        """Hyper-parameters are readable as attributes from outside (`method.rho`); inside, methods
        use self.hp, which no attribute of the contract can shadow."""
        hp = self.__dict__.get("hp")
        if hp is not None and name in hp:
            return hp[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def compilable(self) -> bool:
        """False when this instance's step needs double backward."""
        return not any(self.hp[key] == value for key, value in self.double_backward.items())

    # ------------------------------------------------------------------ hyper-parameters

    @classmethod
    def resolve_hparams(cls, given: dict) -> dict:
        """Defaults overridden by `given`, type-checked; unknown names raise a UsageError."""
        unknown = sorted(set(given) - set(cls.hparams))
        if unknown:
            valid = ", ".join(cls.hparams) or "none"
            raise UsageError(f"unknown hyperparameter {unknown[0]!r} for method {cls.name!r}; valid: {valid}")
        resolved = dict(cls.hparams)
        for key, value in given.items():
            default = cls.hparams[key]
            resolved[key] = coerce(
                value, None if default is None else type(default), f"hyperparameter {key!r} of method {cls.name!r}"
            )
            if key in cls.choices:
                check_choice(f"{key} for method {cls.name!r}", resolved[key], cls.choices[key])
        for key, bound in cls.bounds.items():
            if resolved[key] is not None and not BOUNDS[bound](resolved[key]):
                raise UsageError(f"{key} for method {cls.name!r} must be {bound}, got {resolved[key]}")
        cls.validate(resolved)
        return resolved

    @classmethod
    def term_share(cls, rows) -> float | None:
        """The fraction of a run's training steps on which the defining term entered the update,
        from the run's load_runs() rows (one per evaluation, config columns as arg_<name>); None
        for a method without such a term. By default the term acts at every step when its weight
        is > 0."""
        if not cls.term:
            return None
        return float(rows[f"arg_{cls.term_weight}"].iloc[0] > 0)

    @classmethod
    def term_note(cls, rows) -> str:
        """What a table adds after the share of steps (vSAM: its share after the warm-up)."""
        return ""

    @classmethod
    def validate(cls, hp: dict) -> None:
        """Checks on resolved hyper-parameters beyond `bounds`; raise UsageError."""

    @classmethod
    def check_batch_size(cls, hp: dict, batch_size: int) -> None:
        """Checks that need the batch size (micro-batch divisibility)."""

    @classmethod
    def check_optimizer(cls, optimizer: str) -> None:
        """Refuse, in one line, a base optimizer the method's definition does not admit (`sgd_only`)."""
        if cls.sgd_only and optimizer != "sgd":
            raise UsageError(
                f"method {cls.name!r} sets the step length itself and assumes plain SGD (momentum 0, weight decay 0) "
                f"as its base optimizer, not {optimizer!r}: use optimizer 'sgd'"
            )

    def require_epoch(self) -> None:
        """A method with per-epoch state refuses a step before any start_epoch, in one line naming it."""
        if self.epoch is None:
            raise UsageError(
                f"method {self.name!r} keeps per-epoch state ({self.epoch_state}): call method.start_epoch(epoch) "
                "before each epoch's first step (and method.end_epoch(epoch) after its last)"
            )

    @classmethod
    def forward_rows(cls, hp: dict, batch_size: int) -> int:
        """The rows of one training forward pass, over which batch norm takes its batch statistics:
        the whole batch (each view's, for a method of two views) unless the method splits it."""
        return batch_size

    # ------------------------------------------------------------------ helpers for steps

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        device_type = next(self.model.parameters()).device.type
        return torch.autocast(device_type, dtype=self.amp_dtype)

    @contextlib.contextmanager
    def fp32(self):
        """Passes inside compute in true fp32, whatever the run's bf16 autocast and CUDA's TF32
        convolutions (cuDNN's default): a finite difference of two gradients taken a step of norm
        ~1e-3 apart needs both ends far more precise than bf16's 3 digits (fd under bf16 gave a
        penalty update 106% off) or TF32's. Host-side flags only: no sync."""
        amp, tf32 = self.amp_dtype, (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        self.amp_dtype = None
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        device_type = self.params[0].device.type
        off = (
            torch.autocast(device_type, enabled=False)
            if torch.amp.is_autocast_available(device_type)
            else contextlib.nullcontext()
        )  # a device without autocast (meta) computes in its own dtype
        try:
            with off:
                yield
        finally:
            self.amp_dtype = amp
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model(x)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean loss, at least in fp32 (logits may be bf16 under autocast): cross-entropy, or
        the mean of loss_fn's per-example losses."""
        if self.loss_fn is None:
            return F.cross_entropy(upcast(logits), y, label_smoothing=self.label_smoothing)
        return self.sample_losses(logits, y).mean()

    def sample_losses(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example losses, at least in fp32; their mean is `self.loss`."""
        if self.loss_fn is None:
            return F.cross_entropy(upcast(logits), y, label_smoothing=self.label_smoothing, reduction="none")
        losses = self.loss_fn(upcast(logits), y)
        if losses.shape != logits.shape[:1]:
            raise UsageError(
                f"loss_fn of method {self.name!r} returned a tensor of shape {tuple(losses.shape)}: it must return one "
                f"loss per example, shape ({logits.shape[0]},) (e.g. reduction='none')"
            )
        return losses

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @staticmethod
    def metrics(logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor, **extra) -> dict:
        """Step metrics as detached 0-dim tensors: no host sync inside the step. A None (a
        diagnostic not computed on this step) is left out. Soft targets (one row of class
        probabilities per example, mixup's) count as their most likely class."""
        labels = y if y.dim() == 1 else y.argmax(1)
        out = {"loss": loss.detach(), "acc": (logits.detach().argmax(1) == labels).float().mean()}
        out.update({k: v.detach() if torch.is_tensor(v) else v for k, v in extra.items() if v is not None})
        return out

    # ------------------------------------------------------------------ the contract

    def sync_grads(self) -> None:
        """Average .grad across data-parallel ranks now, for methods that transform the global
        gradient before the step (normalized GD, grafting). Otherwise gradients are averaged in a
        pre-hook of optimizer.step(). A no-op in one process; the loop installs the real one."""

    def update_norm(self) -> torch.Tensor | None:
        """||.grad||: the norm of the gradient the optimizer is about to apply, on logged steps
        (None otherwise). Called right before optimizer.step(), after everything rank-local is
        done: it averages .grad across ranks now (the step's pre-hook then does not again), so
        every rank logs the global value, and it is measured before the step, which may change
        .grad (foreach SGD adds Nesterov momentum in)."""
        if not self.diagnose:
            return None
        self.sync_grads()
        return global_norm(grads_of(self.params))

    def micro_batch_gradient_norm(self, batch: Batch, m: int) -> torch.Tensor:
        """Mean over the batch's micro-batches of m rows of ||grad L_i|| at the current weights:
        the diagnostic on which every method's trajectory is compared at one m (Novack et al.).
        Without side effects: .grad untouched, batch-norm statistics frozen, the RNG replayed."""
        x, y = batch.x, batch.y
        state = rng_state(x.device)
        norms = []
        with frozen_bn_stats(self.model), replayed_rng(state, x.device):
            for start in range(0, len(y) - m + 1, m):
                loss = self.loss(self.forward(x[start : start + m]), y[start : start + m])
                norms.append(global_norm(grad(loss, self.params)))
        return torch.stack(norms).mean()

    def all_mean_(self, tensors: list[torch.Tensor]) -> None:
        """Replace tensors by their mean across data-parallel ranks, in place; a no-op in one
        process. For methods whose globally synced variant averages something before the step
        (the ascent gradient of SAM-type methods with sync_ascent=True)."""
        average_(tensors, self.world)

    def start_epoch(self, epoch: int) -> None:
        """Called by the loop before each epoch (a subclass that overrides it calls this one)."""
        self.epoch = epoch

    def end_epoch(self, epoch: int) -> None:
        """Called by the loop on every rank after the epoch's last step, before evaluation and the
        checkpoint: the place to merge per-rank state (SAF's memory) so the checkpoint holds it all."""

    @abc.abstractmethod
    def step(self, batch: Batch) -> dict:
        """One complete update, optimizer.step() included; returns at least "loss" and "acc"."""

    def state_dict(self) -> dict:
        """Tensors and plain Python a resumed run needs (weights_only-safe)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def backward_pass(self, x: torch.Tensor, y: torch.Tensor, all_reduce: bool = False):
        """One forward and backward at w, the gradient into .grad (all-reduced across ranks now
        when `all_reduce`, for an update built on the global gradient): (logits, loss, the .grad
        tensors, zeros where a parameter got none), for steps that add to the gradient in place."""
        logits = self.forward(x)
        loss = self.loss(logits, y)
        loss.backward()
        if all_reduce:
            self.sync_grads()
        return logits, loss, grads_of(self.params)

    # ------------------------------------------------------------------ two-pass steps

    @contextlib.contextmanager
    def moved(self, eps: list[torch.Tensor], params: list[torch.Tensor] | None = None):
        """The weights `params` (all by default) at w + eps inside the block, batch norm
        normalizing with batch statistics but its running statistics frozen (they advance once per
        step, on the clean pass); w is put back by copy on exit, not by subtracting eps (no drift).
        SAM's second pass and every finite-difference probe run inside it. The copies of w live in
        buffers kept across steps: allocating parameter-sized tensors every step costs as much as
        copying."""
        params = self.params if params is None else params
        if not params:  # ESAM's weight perturbation may keep no tensor; foreach ops refuse empty lists
            yield
            return
        saved = [self._saved.get(id(p)) for p in params]
        if any(t is None for t in saved):
            self._saved.update((id(p), p.detach().clone()) for p in params if id(p) not in self._saved)
            saved = [self._saved[id(p)] for p in params]
        with torch.no_grad():
            torch._foreach_copy_(saved, params)
            torch._foreach_add_(params, eps)
        try:
            with frozen_bn_stats(self.model):
                yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, saved)

    def clean_pass(self, x: torch.Tensor, y: torch.Tensor, params: list[torch.Tensor] | None = None) -> CleanPass:
        """Pass 1 of a two-pass step, at w in train mode: the logits, the mean loss, its gradient
        with respect to `params` (all by default) by autograd.grad, so .grad is left to the update
        gradient, and the RNG state the pass started from."""
        params = self.params if params is None else params
        rng = rng_state(x.device)
        logits = self.forward(x)
        loss = self.loss(logits, y)
        return CleanPass(logits, loss, grad(loss, params) if params else [], rng)

    def perturbed_pass(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        eps: list[torch.Tensor],
        rng: tuple,
        params: list[torch.Tensor] | None = None,
        weight: float = 1.0,
    ) -> torch.Tensor:
        """Pass 2: the mean loss at w + eps (`moved`) with the dropout masks of the pass that
        started at `rng`; weight times its gradient accumulates into .grad (where the data-parallel
        all-reduce will find it). Returns the loss, detached."""
        with self.moved(eps, params), replayed_rng(rng, x.device):
            loss = self.loss(self.forward(x), y)
            (loss * weight if weight != 1.0 else loss).backward()
        return loss.detach()


# ---------------------------------------------------------------------- shared tensor helpers
# Methods build on these rather than writing their own: all work on lists of tensors with the
# foreach kernels (one launch per op instead of one per parameter) and never sync with the host.


def upcast(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32 for losses and penalties; fp32 and fp64 pass through (tests run in fp64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def grad(output: torch.Tensor, params: list[torch.Tensor], **kw) -> list[torch.Tensor]:
    """d output / d params by autograd.grad, without touching .grad; zeros for parameters the
    output does not reach. Keywords go to autograd.grad (create_graph, retain_graph)."""
    return list(torch.autograd.grad(output, params, materialize_grads=True, **kw))


def grads_of(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The .grad of each parameter, zeros where a parameter got none."""
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]


def set_grads(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """Hand `grads` to the optimizer as .grad, each laid out like its parameter.

    autograd.grad may return a gradient with other strides than its parameter: a conv weight's
    double-backward gradient comes back transposed, a channels_last weight can get a contiguous
    one. Fused optimizers walk .grad in memory order, so such a gradient would silently update
    the wrong elements (fused SGD on the CPU) or be refused (CUDA). `.backward()` needs no help:
    it accumulates into the parameter's layout itself. The check is on host metadata, no sync.
    """
    for p, g in zip(params, grads):
        p.grad = g if g.stride() == p.stride() else torch.empty_like(p).copy_(g)


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Euclidean norm over the concatenation of the tensors, as a 0-dim fp32 tensor."""
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([upcast(t) for t in tensors])))


def global_dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Inner product over the concatenation of the tensors (no foreach kernel exists for it)."""
    return torch.stack([torch.vdot(x.flatten(), y.flatten()) for x, y in zip(a, b)]).sum()


def clone_all(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def rng_state(device: torch.device) -> tuple:
    """torch's global RNG state (CPU, plus `device`'s CUDA generator on a GPU); reading the CUDA
    state does not sync: the Philox seed and offset live on the host."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def replayed_rng(state: tuple, device: torch.device):
    """Run the block with torch's RNG as it was at `state` (so dropout draws the same masks), then
    put the RNG back where it was before the block: the replay consumes nothing."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=[device] if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


def tracks_bn_stats(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


@contextlib.contextmanager
def frozen_bn_stats(model: torch.nn.Module):
    """Batch norm keeps normalizing with batch statistics but leaves its running statistics alone.

    For the extra passes of SAM-like and finite-difference methods, so the running statistics
    advance once per step, on the clean pass. With track_running_stats off, training-mode BN
    receives no buffers, so nothing (not even num_batches_tracked) changes.
    """
    layers = [
        m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


# ---------------------------------------------------------------------- registry

METHODS: dict[str, type[Method]] = {}
ALIASES: dict[str, str] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Add a method under its name and aliases (case-insensitive). Refused: a name already taken,
    and a hyper-parameter named like an attribute or method of the class, which `method.<name>`
    would read instead of the hyper-parameter (a method reads its own as self.hp.<name>)."""
    attributes = set(dir(cls)).union(*(vars(k).get("__annotations__", {}) for k in cls.__mro__))
    shadowed = sorted(set(cls.hparams) & attributes)
    if shadowed:
        raise ValueError(
            f"method {cls.name!r} ({cls.__name__}): hyper-parameter {shadowed[0]!r} has the name of an attribute "
            "of the method; rename the hyper-parameter"
        )
    for key in (cls.name, *cls.aliases):
        if key.lower() in ALIASES:
            raise ValueError(
                f"method name {key!r} of {cls.__name__} is already registered "
                f"(by {METHODS[ALIASES[key.lower()]].__name__})"
            )
    for key in (cls.name, *cls.aliases):
        ALIASES[key.lower()] = cls.name
    METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    return sorted(METHODS)


def method_class(name: str) -> type[Method]:
    """The class behind a canonical name or an alias (case-insensitive)."""
    canonical = ALIASES.get(str(name).lower())
    if canonical is None:
        check_choice("method", name, list_methods())
    return METHODS[canonical]


def create_method(name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, **hparams) -> Method:
    """Build a method; unknown name or hyper-parameter raises ValueError listing the valid ones.

    Besides the method's own hyper-parameters, `label_smoothing` and `amp_dtype` (the autocast
    dtype, None for fp32) are accepted, which the training loop passes from its Config, and
    `loss_fn(logits, targets)` (per-example losses in place of cross-entropy; GVR also takes
    `augment`, docs/own_loop.md).
    """
    return method_class(name)(model, optimizer, **hparams)
