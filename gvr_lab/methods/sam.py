"""Sharpness-aware minimization (SAM) and adaptive SAM (ASAM).

SAM (Foret, Kleiner, Mobahi, Neyshabur, ICLR 2021) minimizes max_{||eps||_2 <= rho} L_B(w + eps).
Linearizing the inner maximum gives, with g = grad L_B(w) and the norm over ALL parameters together,

    eps = rho * d / (||d|| + xi),            d = g,  xi = 1e-12
    g_S = grad L_B(w')  at  w' = w + eps     (the Hessian term of d eps / d w is dropped, as in the paper)

and the base optimizer (torch.optim.SGD with the run's momentum, Nesterov and weight decay) takes its
step with g_S at the restored weights w.

ASAM (Kwon, Kim, Park, Choi, ICML 2021) measures the ball in weight-scaled coordinates,
T_w = |w| + eta elementwise:

    eps = rho * T_w^2 d / (||T_w d|| + xi),  so that ||T_w^-1 eps|| = rho.

As in the official code (SamsungLabs/ASAM), T_w scales only the parameters whose name contains
"weight" (conv and linear weights, and BN's gamma); biases and BN's beta keep T = 1. davda54/sam's
`adaptive=True` instead scales every tensor with eta = 0 (its issue #81).

One step, owned by the method (davda54's first_step / second_step without a closure):

1. Pass 1 at w, in train mode: the clean pass. Its loss and accuracy are the logged "loss" and
   "acc", and batch-norm running statistics advance here, once per step, as in the JAX reference.
   g comes from autograd.grad, so `.grad` only ever accumulates the update gradient, and under data
   parallelism each rank perturbs with its own gradient (gradients are averaged only before
   optimizer.step(), see distributed.py): the paper's multi-accelerator setting, m = local batch. With
   `sync_ascent=True`, g is averaged across ranks first (one extra all-reduce of a gradient), so
   every rank perturbs by the same eps of the global batch: what one process computes with the
   whole batch (for models without BN, whose batch statistics stay per rank).
2. eps from g as above; w += eps (foreach).
3. Pass 2 at w + eps on the same batch, BN normalizing with batch statistics but its running
   statistics frozen (base.frozen_bn_stats, the davda54 #17 fix), and with the same dropout masks as
   pass 1: the global RNG is snapshotted before pass 1 and replayed before pass 2 (the JAX reference
   reuses the PRNG key). Its backward is the synchronized one under data parallelism.
4. w restored by copy (no drift from subtracting eps) from a buffer the method keeps between steps
   (one parameter-sized copy, as davda54's "old_p"; reusing it spares an allocation per step), then
   optimizer.step() with g_S.

m-sharpness (`m`, paper section 4.1): the local batch is split into B/m groups of m consecutive
examples; group j gets its own g_j, eps_j and g_S,j, and the update gradient is mean_j g_S,j (each
group loss is a group mean, so this is the full-batch mean when every group is the same size).
With more than one group, every pass runs with BN running statistics frozen and, when the model
has BN layers that track them, one extra no-grad forward of the whole batch at w in train mode
advances them once per step (as a single clean pass would). "loss" and "acc" are then the group
means of pass 1, "grad_norm" the norm of mean_j g_j. Under data parallelism every group is the
rank's own and the accumulated update gradient is averaged once, before the step.

Weight decay: by default (`wd_in_perturbation=False`, davda54 and most
ports) it lives only in the base optimizer, at the unperturbed w. With `wd_in_perturbation=True`
the step computes what the JAX reference does with the L2 term inside the loss: d = g + lambda w
(lambda = the weight_decay of the parameter's optimizer group) and update gradient
grad[L + lambda/2 ||.||^2](w + eps) = g_S + lambda (w + eps). The base optimizer adds lambda w
itself, so the method adds lambda * eps (mean over groups) to .grad before the synchronized
backward, which keeps data-parallel ranks identical.

Mixed precision: bf16 autocast needs nothing (eps is invariant to the loss scale, the loss is fp32,
the gradients are those of fp32 parameters); 6 steps in the CUDA settings (fused SGD,
channels_last, bf16) end 6e-3 (relative) from fp32's update for sam and asam, as sgd does
(tests/test_cuda_config.py). fp16 with a GradScaler is not offered: the loop has no fp16 mode.

Metrics: "loss", "acc" (pass 1), "grad_norm" (||g|| at w), "sam_grad_norm" (norm of the gradient
handed to the base optimizer, before its own weight decay), "sharpness" (L(w + eps) - L(w) on the
batch, group mean: the SAM sharpness proxy).

Deviations from davda54/sam: no closure (the method runs both passes); BN running statistics and
dropout masks handled inside the step rather than by the user; ASAM follows the official code's
bias handling and eta (see above), not davda54's.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import UsageError
from .base import (
    CleanPass,
    Method,
    SpeedTarget,
    frozen_bn_stats,
    global_norm,
    grads_of,
    register_method,
    set_grads,
    tracks_bn_stats,
)

XI = 1e-12  # added to the norm in eps: a zero gradient gives a zero perturbation, not NaN


def sam_scale(radius: float, norm: torch.Tensor) -> torch.Tensor:
    """radius / (norm + XI): the factor that turns a direction of norm `norm` into SAM's eps."""
    return radius / (norm + XI)


def sam_gradient(method: Method, x: torch.Tensor, y: torch.Tensor) -> tuple[CleanPass, torch.Tensor, torch.Tensor]:
    """The plain SAM step's passes, for the families that take some SAM steps (LookSAM, vSAM):
    g at w, eps = rho g / (||g|| + xi), g_S at w + eps into .grad; with sync_ascent, g and g_S are
    all-reduced. Returns pass 1 (its grads: g), ||g|| and the loss at w + eps."""
    first = method.clean_pass(x, y)
    if method.hp.sync_ascent:
        method.all_mean_(first.grads)  # g_S is the update: the step's own all-reduce follows
    g_norm = global_norm(first.grads)
    eps = torch._foreach_mul(first.grads, sam_scale(method.hp.rho, g_norm))
    loss_s = method.perturbed_pass(x, y, eps, first.rng)
    if method.hp.sync_ascent:
        method.sync_grads()
    return first, g_norm, loss_s


@register_method
class SAM(Method):
    name = "sam"
    hparams = {
        "rho": 0.05,
        "adaptive": False,
        "m": None,
        "wd_in_perturbation": False,
        "eta": 0.01,
        "sync_ascent": False,
    }
    reference = (
        "Foret et al. ICLR 2021 (davda54/sam step without closure); BN stats from the clean pass, "
        "same dropout masks in both passes; adaptive=True is ASAM with the official bias handling"
    )
    passes = "2"
    bounds = {"rho": ">= 0", "eta": ">= 0"}
    term, term_weight, color = "SAM ascent", "rho", "#de8f05"
    speed_targets = (SpeedTarget("sam <= 2.05x sgd", {}, "sgd", 2.05),)

    @classmethod
    def validate(cls, hp: dict) -> None:
        m = hp["m"]
        if m is not None and (m != int(m) or m < 1):
            raise UsageError(f"m for method {cls.name!r} must be a positive integer or None, got {m}")
        if m is not None and hp["sync_ascent"]:
            raise UsageError(
                f"method {cls.name!r}: m-sharpness groups perturb per group and sync_ascent "
                "perturbs with the all-rank gradient; set one of m, sync_ascent"
            )

    @classmethod
    def check_batch_size(cls, hp: dict, batch_size: int) -> None:
        if hp["m"] is not None and batch_size % int(hp["m"]):
            raise UsageError(f"m={hp['m']} for method {cls.name!r} must divide the batch size {batch_size}")

    @classmethod
    def forward_rows(cls, hp: dict, batch_size: int) -> int:
        """Each m-sharpness group of m rows is forwarded alone."""
        return batch_size if hp["m"] is None else int(hp["m"])

    def __init__(self, model, optimizer, **kw):
        super().__init__(model, optimizer, **kw)
        if self.hp.adaptive:
            names = {id(p): n for n, p in model.named_parameters()}
            is_weight = ["weight" in names.get(id(p), "") for p in self.params]
            # T_w = |w| * scale + offset: |w| + eta on weights, 1 elsewhere.
            self.t_scale = [1.0 if w else 0.0 for w in is_weight]
            self.t_offset = [self.hp.eta if w else 1.0 for w in is_weight]

    # ------------------------------------------------------------------ the perturbation

    def weight_decays(self) -> list[float]:
        return [g["weight_decay"] for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]

    @torch.no_grad()
    def perturbation(self, g: list[torch.Tensor], g_norm: torch.Tensor) -> list[torch.Tensor]:
        """eps for the ascent gradient g, whose norm is g_norm (new tensors; g stays as it is)."""
        if self.hp.wd_in_perturbation:
            g = torch._foreach_add(g, torch._foreach_mul(self.params, self.weight_decays()))
            g_norm = global_norm(g)
        if not self.hp.adaptive:
            return torch._foreach_mul(g, sam_scale(self.hp.rho, g_norm))
        t = torch._foreach_abs(self.params)
        torch._foreach_mul_(t, self.t_scale)
        torch._foreach_add_(t, self.t_offset)
        eps = torch._foreach_mul(g, t)  # T_w d
        td_norm = global_norm(eps)
        torch._foreach_mul_(eps, t)  # T_w^2 d
        torch._foreach_mul_(eps, sam_scale(self.hp.rho, td_norm))
        return eps

    def descend(self, g: list[torch.Tensor]) -> None:
        """Called once the perturbed passes are done, with .grad holding the SAM gradient and `g`
        the clean gradient at w (mean over m-sharpness groups): the place for a variant that
        reshapes the update before the step (docs/adding_a_method.md builds GSAM on it)."""

    # ------------------------------------------------------------------ the step

    def step(self, batch):
        self.zero_grad()
        size = batch.x.shape[0]
        m = size if self.hp.m is None else int(self.hp.m)
        if size % m:
            raise UsageError(f"m={m} for method {self.name!r} must divide the batch size {size}")
        groups = size // m
        if groups > 1 and tracks_bn_stats(self.model):
            with torch.no_grad():
                self.forward(batch.x)
        logits, losses, sharpness, g_sum = [], [], [], None
        for j, (x, y) in enumerate(zip(batch.x.split(m), batch.y.split(m))):
            # One group: pass 1 is the clean pass and moves the running statistics itself.
            with frozen_bn_stats(self.model) if groups > 1 else contextlib.nullcontext():
                first = self.clean_pass(x, y)
            g = first.grads
            if self.hp.sync_ascent:
                self.all_mean_(g)
            g_norm = global_norm(g)
            g_sum = g if j == 0 else torch._foreach_add(g_sum, g)
            eps = self.perturbation(g, g_norm)
            if self.hp.wd_in_perturbation:
                wd_eps = torch._foreach_mul(eps, [wd / groups for wd in self.weight_decays()])
                if j == 0:
                    set_grads(self.params, wd_eps)
                else:
                    torch._foreach_add_(grads_of(self.params), wd_eps)
            loss_s = self.perturbed_pass(x, y, eps, first.rng, weight=1.0 / groups)
            logits.append(first.logits)
            losses.append(first.loss.detach())
            sharpness.append(loss_s - first.loss.detach())
        g_mean = g_sum if groups == 1 else torch._foreach_div(g_sum, groups)
        self.descend(g_mean)
        sam_grad_norm = self.update_norm()
        self.optimizer.step()
        logits = torch.cat(logits) if groups > 1 else logits[0]
        return self.metrics(
            logits,
            batch.y,
            torch.stack(losses).mean(),
            grad_norm=g_norm if groups == 1 else global_norm(g_mean),
            sam_grad_norm=sam_grad_norm,
            sharpness=torch.stack(sharpness).mean(),
        )


@register_method
class ASAM(SAM):
    name = "asam"
    hparams = {**SAM.hparams, "rho": 0.5, "adaptive": True}
    reference = (
        "Kwon et al. ICML 2021 (SamsungLabs/ASAM: T_w = |w| + eta on 'weight' tensors only); "
        "rho 0.5 as its CIFAR-10 README; the sam step otherwise"
    )
    term, color = "ASAM ascent", "#a6761d"
    speed_targets = ()
