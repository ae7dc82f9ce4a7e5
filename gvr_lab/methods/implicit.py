"""The implicit-regularization suite of Novack et al. (ICLR 2023): large batches by micro-batch
accumulation, plus explicit per-micro-batch penalties that mimic small-batch SGD.

Reference: Novack, Kaur, Marwah, Garg, Lipton, "Disentangling the Mechanisms Behind Implicit
Regularization in SGD", ICLR 2023, arXiv 2211.15853; code github.com/acmi-lab/imp-regularizers
(`src/train_class.py`).

The batch the loop hands over is the large batch B (Novack: 5120). It is cut into k = B/m
consecutive micro-batches M_1..M_k of m = micro_batch_size rows (views of batch.x, no copies), each
forwarded on its own in train mode, so batch norm normalizes with the micro-batch's statistics
(ghost batch norm, as in the original) and its running statistics advance k times per step. With
L_i the mean cross-entropy on M_i and R_i a penalty, the step minimizes

    J = (1/k) sum_i [ L_i + lam * R_i ],     R_i = || grad_theta s_i(theta) ||^2

over all trainable parameters (BN affine included): averaged over micro-batches, not summed, and
the squared norm, not the norm. The source s_i is

    pseudo_gd      no penalty                      (PseudoGD: large-batch SGD)
    reg_loss       s_i = L_i                       (RegLoss, "GN": micro-batch gradient norm)
    fish_loss      s_i = (1/m) sum_x CE(f(x), yhat_x),  yhat_x ~ softmax(f(x)), detached, drawn
                   fresh per micro-batch and step  (FishLoss, "FT": Fisher trace, Jastrzebski et al.
                   2021); E_yhat R_i = (1/m) * mean_x tr F(x), the mean per-example Fisher trace / m
    avg_jac_loss   s_i = (1/m) sum_x sum_c f_c(x)  (AvgJacLoss, "AJ", after Lee et al. 2022):
                   R_i = ||Jbar_i^T 1||^2, Jbar_i the micro-batch mean of the logits' Jacobian
                   w.r.t. the parameters (not the inputs)
    unit_jac_loss  s_i = u_i^T (1/m) sum_x f(x),   u_i = z/||z||, z ~ N(0, I_C) fresh per
                   micro-batch (UnitJacLoss, "UJ"); E_u R_i = ||Jbar_i||_F^2 / C, and AJ = C * UJ
                   at u = 1/sqrt(C)

The data term always uses the true labels; the penalty is computed on the same forward as L_i (same
BN statistics, same dropout mask). The step gradient is

    g = (1/k) sum_i [ grad L_i + 2 lam H_i grad s_i ],   H_i the Hessian of s_i (BN terms included)

followed by one optimizer.step(). Novack's runs use momentum 0, weight decay 0 and a constant
learning rate (set those in the Config); the methods do not force them.

Two ways to get H_i grad s_i (hyper-parameter hvp):

* "exact" (the original): grad s_i with create_graph=True, R_i its squared norm, and one backward
  of L_i + lam R_i through the double-backward graph. One micro-batch graph alive at a time. Not
  compilable (AOTAutograd has no double backward).
* "fd": a forward difference along v = grad s_i(theta),
  H_i v ~ [grad s_i(theta + h v) - grad s_i(theta)] / h with h = fd_eps / ||v||, so the weights
  move by exactly fd_eps in parameter space. The moved pass reuses the same micro-batch, the same
  sampled labels / u and the same dropout mask (torch's RNG is replayed), runs with BN running
  statistics frozen (it still normalizes with batch statistics, like the clean pass), and the
  weights are restored by copy. Cost: two first-order passes per micro-batch for reg_loss, plus one
  backward for fish/avg_jac/unit_jac (their data gradient and source gradient differ).
  fd_eps = 1e-3: on a smooth conv net (tanh/softplus, average pooling) the relative error of H g
  against double backward was, for fd_eps = 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 1e-5: fp32 1.5e-2,
  4.4e-3, 1.5e-3, 5.4e-4, 7.6e-4, 6.7e-3 (rounding takes over below ~3e-4) and fp64 1.5e-2, 4.4e-3,
  1.5e-3, 4.4e-4, 1.5e-4, 1.5e-5 (truncation, linear in fd_eps). 1e-3 is within 3x of the fp32
  optimum and keeps a margin from the rounding cliff, which moves up for larger nets.
  **On ReLU / max-pool nets fd is a different regularizer.** A step of norm fd_eps flips the sign
  of some ReLU inputs (78 + 168 units in tiny_cnn's two blocks on 128 images at 1e-3), so fd
  measures the curvature of a locally smoothed loss, while double backward gives the
  almost-everywhere Hessian, blind to kinks. At initialization, relative error of H g against
  exact at fd_eps = 1e-3: tiny_cnn 1.2, small_cnn 6 (128 images), ResNet-18 25 (16 images; still
  50 at 1e-6 in fp64: the crossing noise grows like fd_eps^-1/2). Agreement needs a step that
  crosses no kink (1e-5 to 1e-7 for tiny_cnn, fp64 only). hvp="exact" (the default) is the
  faithful reproduction of Novack; "fd" approximates it only on smooth models. fd computes each
  micro-batch in fp32 whatever the run's autocast, with CUDA's TF32 convolutions off
  (base.Method.fp32): in bf16 (or TF32) the two ends of the difference round to ~3 digits, which
  swamps a step of norm 1e-3. The penalty's update under a bf16 run then equals the fp32 one.
  hvp="exact" under bf16 is double backward in bf16: its Hessian-vector product was 9% off fp32's
  for reg_loss (measured on a smooth conv net), 0.1-3% for the other sources.

Deviations from the original code:
* batch_size must be a multiple of micro_batch_size (check_batch_size raises). The original took
  k = ceil(B/m) micro-batches from a shuffled stream, so B=5120, m=1000 trained on 6000 examples
  per step, and it ran the last, short step of each epoch divided by the full k anyway; the loop
  here drops the epoch's last partial batch instead.
* The micro-batch data-gradient norms are measured on the training passes themselves (free) or,
  where that costs an extra backward, only on logged steps (`diagnose`); the original spent k extra
  train-mode forward/backward passes every 20 steps, which also moved BN running statistics.
* The FT penalty's cross-entropy has no label smoothing (it would bias E[score] away from 0); the
  data loss keeps the Config's label smoothing.
* hvp="fd" is our addition.

Data parallelism: each rank runs the micro-batches of its slice of the batch, and the averaged
step gradient is (1/k) sum over all k of them, what one process computes (tested for pseudo_gd,
reg_loss and avg_jac_loss). The draws of fish_loss (labels) and unit_jac_loss (u) come from each
rank's RNG, seeded alike, so they are not one process's draws.

Metrics: "loss" (mean of L_i = the large-batch loss), "acc", "grad_norm" (||g||, penalty included,
after the all-reduce of the ranks, before the step),
"micro_grad_norm" (mean_i ||grad L_i||, the trajectory the paper compares with small-batch SGD) and
"micro_grad_sq" (mean_i ||grad L_i||^2, which the original logs as "avg_sgd_norm"), "penalty"
(mean_i R_i, without lam). fish/avg_jac/unit_jac with hvp="exact" report the micro_grad_* pair only
on logged steps (one extra backward per micro-batch).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data import Batch
from ..errors import UsageError
from .base import Method, SpeedTarget, global_norm, grad, register_method, replayed_rng, rng_state, set_grads, upcast

NOVACK = "Novack et al. 2023 (arXiv 2211.15853)"


# ---------------------------------------------------------------------- micro-batch machinery


@dataclass
class MicroResult:
    """One micro-batch's share of the step: its gradient contribution and what it measured."""

    grad: list[torch.Tensor]  # grad (L_i + lam R_i), not yet divided by k
    logits: torch.Tensor  # detached
    loss: torch.Tensor  # L_i, detached
    data_grad_norm: torch.Tensor | None = None  # ||grad L_i|| where it came for free (or diagnose)
    penalty: torch.Tensor | None = None  # R_i, detached


@dataclass
class LargeBatch:
    """The accumulated step: g = (1/k) sum_i MicroResult.grad, and the step's diagnostics."""

    grad: list[torch.Tensor]
    logits: torch.Tensor
    loss: torch.Tensor
    micro_norms: torch.Tensor | None  # (k,) data-gradient norms, on the device
    penalty: torch.Tensor | None

    def diagnostics(self) -> dict:
        out = {}
        if self.micro_norms is not None:
            out.update(micro_grad_norm=self.micro_norms.mean(), micro_grad_sq=self.micro_norms.square().mean())
        if self.penalty is not None:
            out["penalty"] = self.penalty
        return out


class MicroBatchMethod(Method):
    """Large batch by micro-batches: split, run `micro_step` on each, average the gradients.

    Subclasses override `micro_step`; this base's is the plain data gradient (PseudoGD). Also the
    machinery of the grafting methods (grafting.py).
    """

    hparams = {"micro_batch_size": 128}
    passes = "k micro-batches (1 pass total)"
    # True where the step itself reads the micro-batch norms (IterGraft); else they are diagnostics.
    uses_micro_norms = False
    bounds = {"micro_batch_size": ">= 1"}
    # four micro-batches of the benchmark's batch of 128
    bench_rows = ({"micro_batch_size": 32},)

    @classmethod
    def check_batch_size(cls, hp: dict, batch_size: int) -> None:
        m = hp["micro_batch_size"]
        if batch_size % m:
            raise UsageError(
                f"batch_size={batch_size} is not a multiple of micro_batch_size={m} for method "
                f"{cls.name!r}; use a batch_size that is k * {m}"
            )

    @classmethod
    def forward_rows(cls, hp: dict, batch_size: int) -> int:
        """Each micro-batch is forwarded alone: ghost batch norm of size m."""
        return hp["micro_batch_size"]

    def micro_batches(self, batch: Batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
        self.check_batch_size({"micro_batch_size": self.hp.micro_batch_size}, batch.y.shape[0])
        return list(zip(batch.x.split(self.hp.micro_batch_size), batch.y.split(self.hp.micro_batch_size)))

    def micro_step(self, x: torch.Tensor, y: torch.Tensor) -> MicroResult:
        logits = self.forward(x)
        loss = self.loss(logits, y)
        g = grad(loss, self.params)
        norm = global_norm(g) if self.diagnose or self.uses_micro_norms else None
        return MicroResult(g, logits.detach(), loss.detach(), data_grad_norm=norm)

    def large_batch_gradient(self, batch: Batch) -> LargeBatch:
        parts = self.micro_batches(batch)
        k = len(parts)
        acc, logits, losses, norms, penalties = None, [], [], [], []
        for x, y in parts:
            r = self.micro_step(x, y)
            if acc is None:
                acc = torch._foreach_mul(r.grad, 1.0 / k)
            else:
                torch._foreach_add_(acc, r.grad, alpha=1.0 / k)
            logits.append(r.logits)
            losses.append(r.loss)
            norms.append(r.data_grad_norm)
            penalties.append(r.penalty)
        return LargeBatch(
            acc,
            torch.cat(logits),
            torch.stack(losses).mean(),
            None if any(n is None for n in norms) else torch.stack(norms),
            None if any(p is None for p in penalties) else torch.stack(penalties).mean(),
        )

    def step(self, batch: Batch) -> dict:
        lb = self.large_batch_gradient(batch)
        set_grads(self.params, lb.grad)
        grad_norm = self.update_norm()
        self.optimizer.step()
        return self.metrics(lb.logits, batch.y, lb.loss, grad_norm=grad_norm, **lb.diagnostics())


@register_method
class PseudoGD(MicroBatchMethod):
    """theta <- theta - lr * (1/k) sum_i grad L_i. Exactly one step on the whole batch for a model
    without BN or dropout; with BN it is ghost-BN large-batch SGD (ghost size m)."""

    name = "pseudo_gd"
    aliases = ("PseudoGD",)
    reference = f"{NOVACK} PseudoGD; BN = ghost BN of size m; batch_size must be a multiple of m"
    color = "#9a9a9a"


# ---------------------------------------------------------------------- penalties


def penalty_targets(name: str) -> tuple[SpeedTarget, ...]:
    """A penalty's speed goals: against the large-batch gradient of the same micro-batches."""
    return (
        SpeedTarget(f"{name} fd <= 2.1x pseudo_gd", {"hvp": "fd"}, "pseudo_gd", 2.1),
        SpeedTarget(f"{name} exact <= 3.5x pseudo_gd", {"hvp": "exact"}, "pseudo_gd", 3.5),
    )


class PenaltyMethod(MicroBatchMethod):
    """(1/k) sum_i [L_i + lam ||grad s_i||^2]; subclasses define the source s_i (and its draws)."""

    hparams = {"lam": 0.01, "micro_batch_size": 128, "hvp": "exact", "fd_eps": 1e-3}
    choices = {"hvp": ("exact", "fd")}
    double_backward = {"hvp": "exact"}
    passes = "exact ~3, fd 3"
    bounds = {**MicroBatchMethod.bounds, "lam": ">= 0", "fd_eps": "> 0"}
    # True when s_i is the data loss itself, whose gradient then serves as both.
    source_is_loss = False
    term_weight = "lam"
    bench_rows = ({"micro_batch_size": 32}, {"micro_batch_size": 32, "hvp": "fd"})

    def draw(self, logits: torch.Tensor):
        """The randomness of s_i (sampled labels, a direction), drawn once per micro-batch."""
        return None

    @abc.abstractmethod
    def source(self, logits: torch.Tensor, y: torch.Tensor, draw) -> torch.Tensor:
        """The scalar s_i whose parameter gradient's squared norm is the penalty R_i."""

    def micro_step(self, x: torch.Tensor, y: torch.Tensor) -> MicroResult:
        return self._exact(x, y) if self.hp.hvp == "exact" else self._fd(x, y)

    def _exact(self, x: torch.Tensor, y: torch.Tensor) -> MicroResult:
        logits = self.forward(x)
        loss = self.loss(logits, y)
        src = loss if self.source_is_loss else self.source(logits, y, self.draw(logits))
        penalty = global_norm(grad(src, self.params, create_graph=True)).square()
        data_grad_norm = None
        if self.source_is_loss:
            data_grad_norm = penalty.detach().sqrt()
        elif self.diagnose:
            data_grad_norm = global_norm(grad(loss, self.params, retain_graph=True))
        total = grad(loss + self.hp.lam * penalty, self.params)
        return MicroResult(total, logits.detach(), loss.detach(), data_grad_norm, penalty.detach())

    def _fd(self, x: torch.Tensor, y: torch.Tensor) -> MicroResult:
        # Both ends of the difference in fp32 (base.Method.fp32); the clean end is also the data
        # gradient, so the whole micro-batch computes in fp32.
        with self.fp32():
            state = rng_state(x.device)
            logits = self.forward(x)
            loss = self.loss(logits, y)
            draw = self.draw(logits)
            if self.source_is_loss:
                g_data = g_src = grad(loss, self.params)
            else:
                g_src = grad(self.source(logits, y, draw), self.params, retain_graph=True)
                g_data = grad(loss, self.params)
            penalty = global_norm(g_src).square()
            # ||h v|| = fd_eps; the clamp keeps h finite when v = 0 (then H v = 0 and the step adds 0).
            h = self.hp.fd_eps / penalty.sqrt().clamp_min(torch.finfo(penalty.dtype).tiny)
            with self.moved(torch._foreach_mul(g_src, h)), replayed_rng(state, x.device):
                moved = grad(self.source(self.forward(x), y, draw), self.params)
        # grad L_i + 2 lam H v  with  H v ~ (moved - g_src) / h
        total = torch._foreach_sub(moved, g_src)
        torch._foreach_mul_(total, 2 * self.hp.lam / h)
        torch._foreach_add_(total, g_data)
        return MicroResult(
            total, logits.detach(), loss.detach(), global_norm(g_data) if self.diagnose else None, penalty
        )


@register_method
class RegLoss(PenaltyMethod):
    """GN: R_i = ||grad L_i||^2, the squared micro-batch gradient norm."""

    name = "reg_loss"
    aliases = ("RegLoss",)
    reference = f"{NOVACK} RegLoss (GN); batch_size must be a multiple of m; hvp='fd' is our addition"
    passes = "exact: ~3 (double backward), fd: 2"
    source_is_loss = True
    term, color, speed_targets = "gradient-norm penalty", "#1b9e77", penalty_targets(name)

    def source(self, logits, y, draw):
        return self.loss(logits, y)


@register_method
class FishLoss(PenaltyMethod):
    """FT: R_i = ||grad (1/m) sum_x CE(f(x), yhat_x)||^2 with yhat_x ~ softmax(f(x)), detached."""

    name = "fish_loss"
    aliases = ("FishLoss",)
    reference = (
        f"{NOVACK} FishLoss (FT, after Jastrzebski et al. 2021); no label smoothing in the penalty; "
        "batch_size must be a multiple of m"
    )
    term, color, speed_targets = "Fisher-trace penalty", "#7570b3", penalty_targets(name)

    def draw(self, logits):
        return torch.multinomial(torch.softmax(upcast(logits.detach()), dim=1), 1).squeeze(1)

    def source(self, logits, y, draw):
        return F.cross_entropy(upcast(logits), draw)


@register_method
class AvgJacLoss(PenaltyMethod):
    """AJ: R_i = ||grad_theta (1/m) sum_x sum_c f_c(x)||^2."""

    name = "avg_jac_loss"
    aliases = ("AvgJacLoss",)
    reference = f"{NOVACK} AvgJacLoss (AJ, after Lee et al. 2022); batch_size must be a multiple of m"
    term, color, speed_targets = "average-Jacobian penalty", "#e7298a", penalty_targets(name)

    def source(self, logits, y, draw):
        return upcast(logits).sum(1).mean()


@register_method
class UnitJacLoss(PenaltyMethod):
    """UJ: R_i = ||grad_theta u^T (1/m) sum_x f(x)||^2, u uniform on the unit sphere of R^C."""

    name = "unit_jac_loss"
    aliases = ("UnitJacLoss",)
    term, color, speed_targets = "unit-Jacobian penalty", "#66a61e", penalty_targets(name)
    reference = f"{NOVACK} UnitJacLoss (UJ); u fresh per micro-batch; batch_size must be a multiple of m"

    def draw(self, logits):
        z = torch.randn(logits.shape[1], device=logits.device, dtype=upcast(logits).dtype)
        return z / torch.linalg.vector_norm(z)

    def source(self, logits, y, draw):
        return upcast(logits).mean(0) @ draw
