"""LookSAM: a SAM step every k steps, reusing SAM's extra direction in between.

Liu, Mai, Chen, Hsieh, You, "Towards Efficient and Scalable Sharpness-Aware Minimization", CVPR 2022.
With g = grad L_B(w) and the SAM gradient g_S = grad L_B(w + rho g/||g||) (see sam.py), split g_S
into its part along g and the part orthogonal to it (norms and inner products over ALL parameters):

    g_h = (<g, g_S> / ||g||^2) g,        g_v = g_S - g_h,        <g_v, g> = 0.

The step counter t (the method's own, starting at 0 and kept in state_dict) decides each step:

    t % k == 0 (refresh):  a full SAM step with g_S; store u = g_v / ||g_v||
    otherwise (reuse):     one pass; update gradient g + alpha * ||g|| * u
                           = g + alpha * (||g|| / ||g_v||) * g_v, so ||update - g|| = alpha ||g||.

Cost: 1 + 1/k forward-backward passes per step. "sampled" is 1.0 on refresh steps, 0.0 otherwise.

Choices where the implementations differ, none of them the authors' (no
official code is public):
- Global scope (MarlonBecker/MSAM, the paper's vector notation), not per tensor (rollovd, kozistr).
  Per-tensor is not offered: no source shows it is the paper's rule.
- The first step (t = 0) is a refresh step, so there is always a stored direction to reuse.
- Degenerate g_S parallel to g: g_v is then rounding noise, and rescaling it to alpha ||g|| would
  inject a random direction. A g_v with ||g_v|| <= 1e-5 ||g_S|| (rounding in fp32 is ~1e-7, real
  training gives orders of magnitude more) is stored as u = 0, so the reuse steps are plain SGD.
  The test happens on the device (torch.where), without a host sync.
- Data parallelism: by default everything before optimizer.step() is rank-local, as in `sam`:
  each rank perturbs with its own g and keeps its own u, and the ranks' update gradients are
  averaged (the replicas stay identical; the method is LookSAM with m = the local batch).
  `sync_ascent=True` is the global variant: g is averaged before eps, g_S before the
  decomposition and, on reuse steps, g before it is combined with u, so every rank holds the same
  u and the step is what one process computes with the whole batch (one extra all-reduce on
  refresh steps; the others replace the step's own).

Everything else as in `sam` (rho = 0.05 default, eps = rho g / (||g|| + 1e-12), BN running
statistics advance only on the clean pass, the same dropout masks in both passes, weights restored
by copy, weight decay only in the base optimizer).
"""

from __future__ import annotations

import torch

from .base import Method, SpeedTarget, global_dot, global_norm, grads_of, register_method, set_grads
from .sam import sam_gradient

PARALLEL_TOL = 1e-5  # ||g_v|| / ||g_S|| at or below this counts as g_S parallel to g


@register_method
class LookSAM(Method):
    name = "looksam"
    hparams = {"rho": 0.05, "k": 5, "alpha": 0.7, "sync_ascent": False}
    reference = (
        "Liu et al. CVPR 2022 (no official code): global decomposition as MarlonBecker/MSAM, SAM at "
        "t % k == 0 from t = 0, g_S parallel to g -> plain SGD"
    )
    passes = "1 + 1/k"
    bounds = {"rho": ">= 0", "k": ">= 1", "alpha": ">= 0"}
    term, term_weight, color = "SAM direction (refreshed every k steps)", "rho", "#029e73"
    speed_targets = (SpeedTarget("looksam ~ 1 + 1/k", {}, "sgd", lambda hp, p: 1 + 1 / hp["k"]),)

    def __init__(self, model, optimizer, **kw):
        super().__init__(model, optimizer, **kw)
        self.t = 0
        self.direction: list[torch.Tensor] | None = None  # u = g_v / ||g_v||, or zeros

    def state_dict(self) -> dict:
        return {"t": self.t, "direction": self.direction}

    def load_state_dict(self, state: dict) -> None:
        self.t, self.direction = state["t"], state["direction"]

    def step(self, batch):
        self.zero_grad()
        refresh = self.t % self.hp.k == 0
        self.t += 1
        extra = {}
        if refresh:  # a SAM step, which stores the direction
            first, g_norm, loss_s = sam_gradient(self, batch.x, batch.y)
            logits, loss = first.logits, first.loss
            extra["sharpness"] = loss_s - loss.detach()
            self.direction = self.orthogonal_direction(first.grads, grads_of(self.params))
        else:  # one pass; the stored direction added, scaled to alpha ||g|| (of the global g when synced)
            logits, loss, g = self.backward_pass(batch.x, batch.y, all_reduce=self.hp.sync_ascent)
            g_norm = global_norm(g)
            if self.direction is not None:
                torch._foreach_add_(g, torch._foreach_mul(self.direction, self.hp.alpha * g_norm))
                set_grads(self.params, g)
        update_norm = self.update_norm()
        self.optimizer.step()
        return self.metrics(
            logits,
            batch.y,
            loss,
            grad_norm=g_norm,
            sam_grad_norm=update_norm,
            sampled=torch.full((), float(refresh), device=loss.device),
            **extra,
        )

    @torch.no_grad()
    def orthogonal_direction(self, g: list[torch.Tensor], g_s: list[torch.Tensor]) -> list[torch.Tensor]:
        """u = g_v / ||g_v|| with g_v = g_S - (<g, g_S> / ||g||^2) g; zeros when g_v is negligible."""
        g_sq = global_dot(g, g)
        coef = global_dot(g, g_s) / g_sq.clamp_min(torch.finfo(g_sq.dtype).tiny)
        g_v = torch._foreach_sub(g_s, torch._foreach_mul(g, coef))
        v_norm = global_norm(g_v)
        scale = torch.where(v_norm > PARALLEL_TOL * global_norm(g_s), 1 / v_norm, 0.0)
        return torch._foreach_mul(g_v, scale)
