"""ESAM: SAM with stochastic weight perturbation (SWP) and sharpness-sensitive data selection (SDS).

Du, Yan, Feng, Zhou, Zhen, Goh, Tan, "Efficient Sharpness-aware Minimization for Improved Training
of Neural Networks", ICLR 2022. Mechanics follow the official code (dydjw9/Efficient_SAM,
utils/Esam.py).

SWP, per parameter tensor as in the official code: each tensor is kept with probability beta
(K = the kept tensors, drawn first in the step from Method.shared_rng: keep_i = U_i < beta,
U = torch.rand(number of tensors); nothing is drawn when beta = 1). Pass 1 computes the gradient of
the kept tensors only (autograd.grad with those inputs, so the other tensors' weight gradients are
never computed: the saving the official code gets by switching their requires_grad off), and

    eps_K = (rho / beta) * g_K / (||g_K|| + xi),     eps = 0 on the other tensors.

SDS: per-sample sharpness s_i = l_i(w + eps) - l_i(w) from a no-grad forward of the whole batch at
w + eps; pass 2 (forward and backward at w + eps) runs on the n = ceil(gamma * B) samples with the
largest s_i, and its gradient (mean over those samples) is the update gradient for every tensor.
The ranking uses a stable sort, so ties go to the earlier sample; the selected rows keep their
batch order. With n = B (gamma = 1) the selection and its forward are skipped.

Deviations from the official code, all deliberate:
- Count: exactly ceil(gamma * B) samples. The official code keeps the samples strictly above the
  int(gamma * B)-th largest value (one fewer), and all of them when gamma >= 0.99.
- xi = 1e-12 as in `sam` (official 1e-7), so that beta = gamma = 1 is SAM exactly.
- BN running statistics advance only on pass 1 (the official code lets all three passes move
  them); the no-grad forward and pass 2 normalize with batch statistics under frozen statistics.
- Dropout: the no-grad forward at w + eps replays pass 1's RNG, so s_i compares the same masks.
  Pass 2 replays them too when it runs on the whole batch (gamma = 1, so beta = gamma = 1 is SAM).
  On a selection (gamma < 1) it draws fresh masks, as the official code does in every pass:
  dropout draws masks for a tensor's shape, so the selected rows cannot be given the masks they
  had in pass 1, and replaying the RNG would hand them the masks of rows 0..n-1 instead.
- The mask is drawn at the start of each step; the official code draws it after each update, so
  its very first step perturbs every tensor, where this one draws a mask there too. From the second
  step on both draw one mask per step from the same law.

Mixed precision: under bf16 autocast s_i is a difference of two bf16-computed losses (2.4% off
fp32's at one step on a smooth conv net, 30 of the 32 selected rows the same): the selection near
the cut follows rounding, as it follows any perturbation of the weights.

Data parallelism: pass 1's ascent is per rank (as the official code sets it up under DDP) and
only the update gradient of pass 2 is averaged; every tensor gets a pass-2 gradient. With
`sync_ascent=True`, g_K is averaged across ranks before eps (one extra all-reduce), so every rank
perturbs alike; the SWP mask is the same on every rank (drawn from the shared generator), and SDS
still ranks each rank's own samples (ceil(gamma * local batch) per rank).

Metrics: "loss", "acc" (pass 1, whole batch), "grad_norm" (||g_K||: the norm of the part of g that
pass 1 computes, the whole ||g|| when beta = 1), "sam_grad_norm" (the update gradient),
"selected" (fraction of the batch in pass 2), "perturbed" (fraction of tensors kept by SWP),
"sharpness" (mean over the batch of l_i(w + eps) - l_i(w)).
"""

from __future__ import annotations

import math

import torch

from .base import Method, global_norm, register_method, replayed_rng
from .sam import sam_scale


def selected_count(gamma: float, batch_size: int) -> int:
    """ceil(gamma * B), where 0.3 * 10 = 3.0000000000000004 still gives 3."""
    return max(1, math.ceil(round(gamma * batch_size, 9)))


@register_method
class ESAM(Method):
    name = "esam"
    hparams = {"rho": 0.05, "beta": 0.6, "gamma": 0.5, "sync_ascent": False}
    bounds = {"rho": ">= 0", "beta": "in (0, 1]", "gamma": "in (0, 1]"}
    passes = "2 (SWP/SDS reduce the second)"
    reference = (
        "Du et al. ICLR 2022 (dydjw9/Efficient_SAM: per-tensor SWP, SDS); ceil(gamma*B) samples "
        "(official: one fewer), BN stats only on the clean pass, xi 1e-12"
    )
    term, term_weight, color = "ESAM ascent", "rho", "#d55e00"

    def kept_params(self) -> list[torch.Tensor]:
        """The parameters SWP perturbs this step."""
        if self.hp.beta == 1:
            return self.params
        keep = (torch.rand(len(self.params), generator=self.shared_rng) < self.hp.beta).tolist()  # CPU: no sync
        return [p for p, k in zip(self.params, keep) if k]

    def step(self, batch):
        self.zero_grad()
        x, y = batch.x, batch.y
        kept = self.kept_params()
        first = self.clean_pass(x, y, kept)
        eps = first.grads
        if self.hp.sync_ascent:
            self.all_mean_(eps)
        grad_norm = torch.zeros((), device=x.device)
        if kept:
            grad_norm = global_norm(eps)
            torch._foreach_mul_(eps, sam_scale(self.hp.rho / self.hp.beta, grad_norm))  # g_K -> eps in place
        size = x.shape[0]
        count = selected_count(self.hp.gamma, size)
        if count == size:  # the whole batch again, with pass 1's masks
            sharpness = self.perturbed_pass(x, y, eps, first.rng, kept) - first.loss.detach()
        else:
            with self.moved(eps, kept):
                with torch.no_grad(), replayed_rng(first.rng, x.device):
                    sharp = self.sample_losses(self.forward(x), y) - self.sample_losses(first.logits.detach(), y)
                rows = sharp.argsort(descending=True, stable=True)[:count].sort().values
                # Fresh masks: a subset cannot be given its rows' masks of pass 1.
                self.loss(self.forward(x[rows]), y[rows]).backward()
            sharpness = sharp.mean()
        sam_grad_norm = self.update_norm()
        self.optimizer.step()
        return self.metrics(
            first.logits,
            y,
            first.loss,
            grad_norm=grad_norm,
            sam_grad_norm=sam_grad_norm,
            selected=torch.full((), count / size, device=x.device),
            perturbed=torch.full((), len(kept) / len(self.params), device=x.device),
            sharpness=sharpness,
        )
