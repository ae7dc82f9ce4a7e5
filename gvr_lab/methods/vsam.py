"""vSAM: SAM whose second-order component is sampled adaptively and reused in between.

Deng, Pang, Zhang, Wang, "Effectively Estimating Gradient Sample Size to Speed Up Sharpness Aware
Minimization", arXiv 2403.08821 (2024). The paper text was not available; this follows the
first author's official code (ajiaaa/vSAM, commit 895e0e5, `vsam/vsam.py` and `train_vsam.py`).
Reimplemented, not copied (that repository has no licence).

Decomposition. With g = grad L_B(w) and the SAM gradient g_S = grad L_B(w + eps),
eps = rho g / (||g|| + xi), the norm over ALL parameters and xi = 1e-12,

    g_S = g + PSF,      PSF = g_S - g  ~=  rho H g / ||g||

("Projection of the Second-order gradient onto the First-order gradient"). PSF is not a
Hessian-vector product: it is this finite difference on the same batch, exact for a quadratic.

Algorithm (our reading of the code), K = `window`, n_b = `blocks`:

    b <- 1;  q <- 0.5;  n_s <- 0;  c <- 1;  P, R, V <- K zeros each;  PSF_last <- none
    every step, epoch e:
      if e < warmup_epochs:  SAM step;  n_s <- 1;  next step      (c does not advance)
      if c mod K == 0:  b <- clip(b (1 + a_r dR + a_v dV), 1, floor(K p_max));  q <- b / K;  n_s <- 0
      if (n_s < floor(b) and U >= 1 - q) or (K - (c mod K) <= floor(b) - n_s):  SAM step;  n_s += 1
      else:  reuse step
      c <- c + 1

    SAM step:   pass 1 at w gives g;  pass 2 at w + eps gives g_S (BN running statistics frozen);
                w restored by copy;  PSF_last <- g_S - g;  the base optimizer steps with g_S;  j <- 0;
                append to the rings p = ||PSF||_N, r = p / ||g||_N and v = mean over the n_b
                contiguous chunks of the sorted P of each chunk's unbiased variance, where ||.||_N
                is the norm over the last `last_n` parameter tensors (model.parameters() order).
    reuse step: one pass gives g;  j <- j + 1;  the base optimizer steps with
                g + beta^j PSF_last  while j <= 6  (0.7, 0.49, ..., 0.117649 for beta = 0.7),
                else plain g.  PSF_last is the full-model vector.

with U ~ Uniform[0, 1) and dR, dV the mean relative change of consecutive entries of R and V
(oldest first), each clipped to [-1, 1]. Rule (b) forces the remaining quota into the end of the
window, so every complete window of K post-warm-up steps holds exactly floor(b) SAM steps.

Quirks of the code, kept because they are what the published runs did (the first looks unintended):
* The first post-warm-up window is partial and has no SAM step at all: warm-up leaves n_s = 1 and
  b = 1, so rule (a) never fires and rule (b) asks for floor(b) - n_s = 0, until c first reaches K
  (K - 1 steps of reuse and then plain SGD). With warmup_epochs = 0, n_s starts at 0 instead.
* The rings start as K zeros, not empty, and R and V enter the trend only at window ends. Until K
  SAM steps have filled them, relative changes divide by zero; see the NaN rule below.
* The warm-up length was hard-coded (`epoch < 3`); here it is `warmup_epochs` (default 3).

Deviations from the code, and why:
* A trend that comes out NaN (0/0 from zero-filled rings, or the NaN variance of one-value chunks
  when window == blocks) counts as 0. The code compares the NaN, does not clip it, and then
  crashes on int(NaN); +-inf it clips to +-1, and so does this.
* U comes from a `random.Random` seeded with torch.initial_seed() at construction (the run's seed
  under the training loop) and saved in state_dict, not from the unseeded global `random`: runs are
  reproducible and resume exactly. As in the code, U is drawn only when n_s < floor(b).
* b is a Python float (float64); the code keeps it as a float32 CUDA tensor. Ring statistics are
  float32 as there.
* Reuse steps before the first SAM step (warmup_epochs = 0) are plain SGD; the code would fail on
  the missing PSF.
* The reuse bound is counted in integers: at most 6 reuse steps after each SAM step. The code
  writes the rule as beta^(j-1) > beta^6 on a running product in floating point, where six
  multiplications can round below beta**6's value or above it: for beta = 0.6 or 0.9 (in float64)
  it admits a 7th reuse, for 0.7 it does not. Counting keeps the rule's evident intent, j <= 6.
* Both passes of a SAM step draw the same dropout masks (pass 2 replays the RNG state pass 1 started from),
  as the lab's SAM and the JAX reference do; the code draws fresh masks in pass 2.
* Defaults are train_vsam.py's: a_r = a_v = 0.13 (the class default is 0.01) and last_n = 10 (the
  class default is 2). The code's `adaptive` flag was accepted but unused and is not offered.

Batch norm: pass 1 (and the single pass of reuse steps) advances the running statistics; pass 2
runs under base.frozen_bn_stats, as the code's momentum-0 trick intends. Weight decay lives in the
base optimizer, at w, as in the code.

Data parallelism: by default everything before optimizer.step() is rank-local, as in the lab's
SAM: each rank perturbs with its own g and keeps its own PSF_last, and the ranks' update
gradients are averaged; since the update gradient is linear in g and PSF, the replicas stay
identical. The rings then hold per-rank statistics, so at each window end the two trends are
averaged across ranks (riding on the once-per-window sync) and every rank takes the same quota
and, with the same seeded U, the same SAM/reuse decisions. `sync_ascent=True` is the global
variant, as the code's DDP runs (its DDP helpers are unused, so its perturbation is global): g is
averaged before eps, g_S and the reuse steps' g as they are computed (replacing the step's own
all-reduce), so PSF_last, the rings and every decision are those of one process with the whole
batch.

Host syncs: none per step. The decision logic runs on the host in Python ints and floats; the rings
P, R, V are device tensors written in place at a host-side pointer, and are read on the host once
per window (two floats, at c mod K == 0), i.e. one sync every K = 50 steps.

Metrics (besides "loss" and "acc" of pass 1): "sampled" (1.0 on SAM steps, 0.0 otherwise);
"psf_norm" (full-model ||PSF||: the fresh one on SAM steps, on reuse steps the norm of the
component actually added, beta^j ||PSF_last||, and 0 on plain steps); "grad_norm" (||g||, the
SGD gradient at w); "quota" (floor(b)); "b"; "reuse_weight" (beta^j on reuse steps, else 0).
"""

from __future__ import annotations

import math
import random

import torch

from ..errors import UsageError
from .base import Method, SpeedTarget, clone_all, global_norm, grads_of, register_method, set_grads
from .sam import sam_gradient

MAX_REUSE = 6  # PSF_last serves at most this many reuse steps after its SAM step (j = 1..6)


def window_trends(rings: torch.Tensor, oldest: int) -> torch.Tensor:
    """Mean relative change of consecutive entries, oldest first, of each row of `rings` (R; V).

    `oldest` is the ring position of the oldest entry. Stays on the device; +-inf and NaN pass
    through (next_quota decides what they mean).
    """
    chrono = torch.roll(rings, -oldest, dims=1)
    return ((chrono[:, 1:] - chrono[:, :-1]) / chrono[:, :-1]).mean(dim=1)


def next_quota(b: float, d_ratio: float, d_disp: float, a_r: float, a_v: float, b_max: int) -> float:
    """b (1 + a_r dR + a_v dV) with dR, dV clipped to [-1, 1] (NaN counts as 0), then bounded to
    [1, b_max]; the lower bound wins when b_max < 1, as in the code's order of the two clips."""
    d_ratio, d_disp = (0.0 if math.isnan(d) else max(-1.0, min(1.0, d)) for d in (d_ratio, d_disp))
    return max(1.0, min(float(b_max), b * (1.0 + a_r * d_ratio + a_v * d_disp)))


@register_method
class VSAM(Method):
    name = "vsam"
    hparams = {
        "rho": 0.05,
        "window": 50,
        "blocks": 5,
        "p_max": 0.8,
        "a_r": 0.13,
        "a_v": 0.13,
        "beta": 0.7,
        "last_n": 10,
        "warmup_epochs": 3,
        "sync_ascent": False,
    }
    reference = (
        "Deng et al. arXiv 2403.08821, after the official code ajiaaa/vSAM: SAM steps sampled per window "
        "from PSF-ratio and dispersion trends, beta^j PSF reuse; seeded sampling, NaN trends count as 0"
    )
    passes = "1 + p (p = sampled fraction)"
    term, color = "SAM steps, sampled per window after the warm-up", "#56b4e9"
    epoch_state = "SAM steps throughout its warm-up of warmup_epochs epochs, sampled after it"
    bench_rows = ({"window": 5, "blocks": 1, "warmup_epochs": 0},)  # several windows in a short benchmark
    speed_targets = (SpeedTarget("vsam <= 1 + p + 0.05", {}, "sgd", lambda hp, p: 1 + p + 0.05),)

    @classmethod
    def term_share(cls, rows) -> float:
        """The share of SAM (two-pass) steps: `sampled` is 1.0 on them, and a history row holds its
        mean over the steps since the previous evaluation."""
        return float(rows["train_sampled"].mean())

    @classmethod
    def term_note(cls, rows) -> str:
        after = cls.share_after_warmup(rows)
        return "" if after is None else f"{100 * after:.0f}% after warm-up"

    @classmethod
    def share_after_warmup(cls, rows) -> float | None:
        """The share of SAM steps after the warm-up, where the sampling acts (None if the run never
        left it). A history row holds the mean of `sampled` since the previous evaluation: over an
        epoch, or in steps mode (Config.steps) over the steps up to `step`, an interval that can
        straddle the warm-up's end; every warm-up step is a SAM step, so the warm-up's part of such
        an interval is known."""
        warmup = rows["arg_warmup_epochs"].iloc[0]
        if "step" not in rows.columns or rows["step"].isna().any():
            after = rows[rows["epoch"] >= warmup]
            return after["train_sampled"].mean() if len(after) else None
        ends = rows["step"].astype(int)
        warmup_steps = min(warmup * int(rows["steps_per_epoch"].iloc[0]), ends.iloc[-1])
        if warmup_steps == ends.iloc[-1]:
            return None
        sam_steps = (rows["train_sampled"] * (ends - ends.shift(fill_value=0))).sum() - warmup_steps
        return sam_steps / (ends.iloc[-1] - warmup_steps)

    @classmethod
    def validate(cls, hp: dict) -> None:
        problems = [
            (hp["rho"] < 0, f"rho must be >= 0, got {hp['rho']}"),
            (hp["window"] < 1, f"window must be >= 1, got {hp['window']}"),
            (
                hp["blocks"] < 1 or hp["window"] % hp["blocks"],
                f"blocks must be >= 1 and divide window={hp['window']}, got {hp['blocks']}",
            ),
            (not 0 < hp["p_max"] <= 1, f"p_max must be in (0, 1], got {hp['p_max']}"),
            (not 0 <= hp["beta"] < 1, f"beta must be in [0, 1), got {hp['beta']}"),
            (hp["last_n"] < 1, f"last_n must be >= 1, got {hp['last_n']}"),
            (hp["warmup_epochs"] < 0, f"warmup_epochs must be >= 0, got {hp['warmup_epochs']}"),
        ]
        for bad, message in problems:
            if bad:
                raise UsageError(f"{message} (method {cls.name!r})")

    def __init__(self, model, optimizer, **kw):
        super().__init__(model, optimizer, **kw)
        self.b_max = int(self.hp.window * self.hp.p_max)
        self.b, self.q, self.n_s, self.c = 1.0, 0.5, 0, 1
        # j: reuse steps since the last SAM step, an int so the bound is exact; MAX_REUSE until
        # the first SAM step, so there is nothing to reuse.
        self.reuses = MAX_REUSE
        self.psf: list[torch.Tensor] | None = None
        self.psf_norm = torch.zeros((), device=self.params[0].device)
        # Rows P, R, V; `ptr` is where the next SAM step writes, i.e. the oldest entry.
        self.rings = torch.zeros(3, self.hp.window, device=self.params[0].device)
        self.ptr = 0
        self.rng = random.Random(torch.initial_seed())

    # ------------------------------------------------------------------ the step

    def step(self, batch):
        self.require_epoch()
        if self.epoch < self.hp.warmup_epochs:
            out = self.sam_step(batch)
            self.n_s = 1
            return out
        if self.c % self.hp.window == 0:
            trends = window_trends(self.rings[1:], self.ptr)
            if not self.hp.sync_ascent:
                self.all_mean_([trends])  # per-rank rings: every rank takes the same quota
            d_ratio, d_disp = trends.tolist()  # the once-per-window sync
            self.b = next_quota(self.b, d_ratio, d_disp, self.hp.a_r, self.hp.a_v, self.b_max)
            self.q, self.n_s = self.b / self.hp.window, 0
        quota = int(self.b)
        sample = (
            self.n_s < quota and self.rng.random() >= 1 - self.q
        ) or self.hp.window - self.c % self.hp.window <= quota - self.n_s
        if sample:
            out = self.sam_step(batch)
            self.n_s += 1
        else:
            out = self.reuse_step(batch)
        self.c += 1
        return out

    def sam_step(self, batch) -> dict:
        self.zero_grad()
        first, grad_norm, _ = sam_gradient(self, batch.x, batch.y)
        self.psf = torch._foreach_sub(grads_of(self.params), first.grads)
        self.psf_norm = global_norm(self.psf)
        self.record(first.grads)
        self.reuses = 0
        self.optimizer.step()
        return self.metrics(
            first.logits,
            batch.y,
            first.loss,
            sampled=1.0,
            psf_norm=self.psf_norm,
            grad_norm=grad_norm,
            quota=int(self.b),
            b=self.b,
            reuse_weight=0.0,
        )

    def record(self, g: list[torch.Tensor]) -> None:
        """Append ||PSF||_N, ||PSF||_N / ||g||_N and the sorted-chunk dispersion of P to the rings."""
        psf_tail = global_norm(self.psf[-self.hp.last_n :])
        self.rings[0, self.ptr] = psf_tail
        self.rings[1, self.ptr] = psf_tail / global_norm(g[-self.hp.last_n :])
        if self.hp.window > self.hp.blocks:
            chunks = torch.sort(self.rings[0]).values.view(self.hp.blocks, -1)
            self.rings[2, self.ptr] = chunks.var(dim=1).mean()
        else:  # one value per chunk has no variance (the code's torch.var gives NaN, with a warning)
            self.rings[2, self.ptr] = math.nan
        self.ptr = (self.ptr + 1) % self.hp.window

    def reuse_step(self, batch) -> dict:
        self.zero_grad()
        logits, loss, g = self.backward_pass(batch.x, batch.y, all_reduce=self.hp.sync_ascent)
        grad_norm = global_norm(g) if self.diagnose else None
        weight, added_norm = 0.0, 0.0
        if self.reuses < MAX_REUSE:
            self.reuses += 1
            weight = self.hp.beta**self.reuses
            added_norm = self.psf_norm * weight
            torch._foreach_add_(g, self.psf, alpha=weight)
            set_grads(self.params, g)
        self.optimizer.step()
        return self.metrics(
            logits,
            batch.y,
            loss,
            sampled=0.0,
            psf_norm=added_norm,
            grad_norm=grad_norm,
            quota=int(self.b),
            b=self.b,
            reuse_weight=weight,
        )

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "b": self.b,
            "q": self.q,
            "n_s": self.n_s,
            "c": self.c,
            "reuses": self.reuses,
            "psf": self.psf,
            "psf_norm": self.psf_norm,
            "rings": self.rings,
            "ptr": self.ptr,
            "rng": self.rng.getstate(),
        }

    def load_state_dict(self, state: dict) -> None:
        if "reuse_scale" in state:  # a checkpoint from before the integer count: beta^j, 0 before any SAM step
            scale = state["reuse_scale"]
            state = {
                **state,
                "reuses": round(math.log(scale, self.hp.beta)) if 0 < scale and 0 < self.hp.beta else MAX_REUSE,
            }
        for key in ("epoch", "b", "q", "n_s", "c", "reuses", "ptr"):
            setattr(self, key, state[key])
        # Copies, so that a method loaded from another's live state does not share its rings.
        self.psf = None if state["psf"] is None else clone_all(state["psf"])
        self.psf_norm, self.rings = state["psf_norm"].clone(), state["rings"].clone()
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
