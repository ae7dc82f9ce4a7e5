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

from ..errors import UsageError
from .base import Method, clone_all, frozen_bn_stats, global_norm, grads_of, perturbed, register_method, set_grads
from .sam import RngReplay, check_rho, sam_scale

PARALLEL_TOL = 1e-5  # ||g_v|| / ||g_S|| at or below this counts as g_S parallel to g


def global_dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Inner product over the concatenation of the tensors (no foreach kernel exists for it)."""
    return torch.stack([torch.vdot(x.flatten(), y.flatten()) for x, y in zip(a, b)]).sum()


@register_method
class LookSAM(Method):
    name = "looksam"
    hparams = {"rho": 0.05, "k": 5, "alpha": 0.7, "sync_ascent": False}
    reference = ("Liu et al. CVPR 2022 (no official code): global decomposition as MarlonBecker/MSAM, SAM at "
                 "t % k == 0 from t = 0, g_S parallel to g -> plain SGD")

    @classmethod
    def validate(cls, hp: dict) -> None:
        check_rho(cls.name, hp["rho"])
        if hp["k"] < 1:
            raise UsageError(f"k for method {cls.name!r} must be >= 1, got {hp['k']}")
        if hp["alpha"] < 0:
            raise UsageError(f"alpha for method {cls.name!r} must be >= 0, got {hp['alpha']}")

    def __init__(self, model, optimizer, **kw):
        super().__init__(model, optimizer, **kw)
        self.saved = clone_all(self.params)
        self.t = 0
        self.direction: list[torch.Tensor] | None = None  # u = g_v / ||g_v||, or zeros

    def state_dict(self) -> dict:
        return {"t": self.t, "direction": self.direction}

    def load_state_dict(self, state: dict) -> None:
        self.t, self.direction = state["t"], state["direction"]

    def step(self, batch):
        self.zero_grad()
        refresh = self.t % self.k == 0
        self.t += 1
        rng = RngReplay(self.params[0].device) if refresh else None
        logits = self.forward(batch.x)
        loss = self.loss(logits, batch.y)
        loss.backward()
        g = grads_of(self.params)
        if self.sync_ascent and refresh:
            self.all_mean_(g)  # pass 2's gradient is the update: its own sync comes below
        elif self.sync_ascent:
            self.sync_grads()  # g is the update gradient's base: synced once, here
        g_norm = global_norm(g)
        if refresh:
            self.zero_grad()
            rng.replay()
            eps = torch._foreach_mul(g, sam_scale(self.rho, g_norm))
            with perturbed(self.params, eps, self.saved), frozen_bn_stats(self.model):
                loss_s = self.loss(self.forward(batch.x), batch.y)
                loss_s.backward()
            if self.sync_ascent:
                self.sync_grads()
            self.direction = self.orthogonal_direction(g, grads_of(self.params))
        elif self.direction is not None:
            torch._foreach_add_(g, torch._foreach_mul(self.direction, self.alpha * g_norm))
            set_grads(self.params, g)
        update_norm = self.update_norm()
        self.optimizer.step()
        extra = {"sharpness": loss_s.detach() - loss.detach()} if refresh else {}
        return self.metrics(logits, batch.y, loss, grad_norm=g_norm, sam_grad_norm=update_norm,
                            sampled=torch.full((), float(refresh), device=loss.device), **extra)

    @torch.no_grad()
    def orthogonal_direction(self, g: list[torch.Tensor], g_s: list[torch.Tensor]) -> list[torch.Tensor]:
        """u = g_v / ||g_v|| with g_v = g_S - (<g, g_S> / ||g||^2) g; zeros when g_v is negligible."""
        g_sq = global_dot(g, g)
        coef = global_dot(g, g_s) / g_sq.clamp_min(torch.finfo(g_sq.dtype).tiny)
        g_v = torch._foreach_sub(g_s, torch._foreach_mul(g, coef))
        v_norm = global_norm(g_v)
        scale = torch.where(v_norm > PARALLEL_TOL * global_norm(g_s), 1 / v_norm, 0.0)
        return torch._foreach_mul(g_v, scale)
