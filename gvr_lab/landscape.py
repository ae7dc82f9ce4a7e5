"""Curvature and loss-landscape instruments: what GVR, the implicit-regularization penalties and the
SAM family all claim to change, measured.

Everything is a function of the training loss on a fixed, seeded evaluation subset of the
training set (the same rows whenever a run is measured), the model in a stated mode:

    L(w) = (1/N) sum_j CE(f_w(x_j), y_j)

* bn="eval" (default): batch norm normalizes with its running statistics and dropout is off, so
  L is a deterministic function of w, the one the trained model computes at test time.
* bn="train": batch norm uses each evaluation batch's own statistics (running statistics left
  alone), dropout still off: the loss the optimizer's steps see, up to dropout.

Instruments, each from Hessian-vector products H v by double backward (fp32 or fp64, never bf16:
a product of second derivatives in 8 significant bits is noise):

* `top_eigenvalues`: the k largest eigenvalues of H by Lanczos with full reorthogonalization,
  stopped when every wanted Ritz pair's residual |beta_m s_m| is below tol * |theta| (or at
  `max_iter`); exact to rounding when the iteration reaches the dimension. Cost: one H v per
  iteration.
* `hutchinson_trace`: tr H = E[z^T H z] over Rademacher z, with its standard error
  sd(z^T H z) / sqrt(probes). Cost: one H v per probe.
* `eigen_density`: stochastic Lanczos quadrature (Ghorbani et al. 2019, as PyHessian): per probe,
  the tridiagonal matrix's eigenvalues (nodes) and squared first eigenvector components
  (weights); the weights of a probe sum to 1, the density is their average over probes.
* `gradient_noise`: at micro-batch size m, the trace of the covariance of micro-batch gradients,
  tr Cov[g_M] = (1/(K-1)) sum_i ||g_i - mean g||^2 over the K micro-batches of the subset, and m
  times it (the per-example covariance's trace, which the penalties of Novack et al. scale by
  1/m).
* `augmentation_variance`: GVR's quantity, 0.5 E||grad_T L^a_S - grad_T L^b_S||^2 over pairs of
  independently augmented views of subsets S of `subset` rows, for a target set T (fc, last stage
  and fc, all).
* `filter_normalized_direction`, `loss_slice`, `interpolate`: Li et al. (NeurIPS 2018) loss
  surfaces. A direction draws N(0, 1) entries and rescales each filter (each output row of a conv
  or linear weight) to the norm of the weight's filter; 1-D parameters (biases, batch-norm
  affine) get 0, as in the paper. Slices evaluate L and the accuracy at w + a d (1-D) or
  w + a d1 + b d2 (2-D); `interpolate` at (1 - t) w_A + t w_B, buffers (running statistics)
  interpolated alike.
* `psf_bound_check`: vSAM's Lemma 1 (see methods/vsam.py), PSF = g_S - g ~ rho H g / ||g||, so
  ||PSF|| <= rho * lambda_max on a batch whose loss has a PSD Hessian: per batch, the measured PSF
  norm against rho times that batch's largest |eigenvalue|, and the fraction of batches where
  the bound holds.

`gvr_lab.curvature(model, data, ...)` (this module's `curvature`) runs the eigenvalues and the trace
(and the density when asked) and returns a plain dict. This module knows models and batches only;
gvr_lab/measure.py applies it to run directories (`gvr-lab curvature RUN_DIR`, the curvature study).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UsageError, check_choice
from .methods.base import frozen_bn_stats, grad

BN_MODES = ("eval", "train")
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


# ---------------------------------------------------------------------- the loss on a fixed subset


@dataclass
class Objective:
    """L(w) on fixed batches, and its derivatives, for a model in a stated mode."""

    model: torch.nn.Module
    batches: list[tuple[torch.Tensor, torch.Tensor]]  # on the model's device, in the model's dtype
    bn: str = "eval"

    def __post_init__(self):
        check_choice("bn mode", self.bn, BN_MODES)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.count = sum(len(y) for _, y in self.batches)

    def _mode(self):
        """Dropout off always; batch norm in eval mode, or in train mode with its running
        statistics left alone."""
        self.model.eval()
        if self.bn == "train":
            for m in self.model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.train()
        return frozen_bn_stats(self.model)

    def batch_losses(self):
        """(loss of a batch weighted by its share of the rows, logits, labels), batch by batch."""
        with self._mode():
            for x, y in self.batches:
                logits = self.model(x)
                yield F.cross_entropy(logits, y, reduction="sum") / self.count, logits, y

    @torch.no_grad()
    def value(self) -> tuple[float, float]:
        """(L, accuracy) at the current weights."""
        loss, correct = 0.0, 0
        for part, logits, y in self.batch_losses():
            loss += float(part)
            correct += int((logits.argmax(1) == y).sum())
        return loss, correct / self.count

    def gradient(self) -> list[torch.Tensor]:
        total = None
        for part, _, _ in self.batch_losses():
            g = grad(part, self.params)
            total = g if total is None else torch._foreach_add(total, g)
        return total

    def hvp(self, v: list[torch.Tensor]) -> list[torch.Tensor]:
        """H v by double backward, batch by batch (one graph alive at a time)."""
        total = None
        for part, _, _ in self.batch_losses():
            g = grad(part, self.params, create_graph=True)
            hv = grad(sum((a * b).sum() for a, b in zip(g, v)), self.params)
            total = hv if total is None else torch._foreach_add(total, hv)
        return total


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vector: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [part.view_as(t) for part, t in zip(vector.split([t.numel() for t in like]), like)]


# ---------------------------------------------------------------------- eigenvalues, trace, density


def lanczos(objective: Objective, steps: int, start: torch.Tensor, tol: float = 0.0, wanted: int = 0):
    """Lanczos with full reorthogonalization from `start`: (alphas, betas) of the tridiagonal
    matrix. With tol > 0 it stops once the `wanted` largest Ritz values have converged."""
    params = objective.params
    basis = [start / start.norm()]
    alphas, betas = [], []
    for j in range(steps):
        w = flat(objective.hvp(unflat(basis[-1], params)))
        alphas.append(float(w @ basis[-1]))
        w = w - alphas[-1] * basis[-1] - (betas[-1] * basis[-2] if betas else 0)
        for q in basis:  # full reorthogonalization, twice is enough (Kahan)
            w -= (w @ q) * q
        for q in basis:
            w -= (w @ q) * q
        beta = float(w.norm())
        if tol and wanted and j + 1 >= wanted:
            theta, s = np.linalg.eigh(tridiagonal(alphas, betas))
            residual = np.abs(beta * s[-1, -wanted:])
            if np.all(residual <= tol * np.maximum(np.abs(theta[-wanted:]), 1e-300)):
                break
        if beta <= 1e-14 * max(1.0, abs(alphas[-1])) or j + 1 == steps:  # an invariant subspace: exact
            break
        betas.append(beta)
        basis.append(w / beta)
    return alphas, betas[: len(alphas) - 1]


def tridiagonal(alphas: list[float], betas: list[float]) -> np.ndarray:
    return np.diag(alphas) + np.diag(betas[: len(alphas) - 1], 1) + np.diag(betas[: len(alphas) - 1], -1)


def top_eigenvalues(
    objective: Objective, k: int = 3, max_iter: int = 100, tol: float = 1e-10, seed: int = 0
) -> list[float]:
    """The k largest eigenvalues of the Hessian of L, largest first."""
    if k < 1:
        raise UsageError(f"k must be >= 1, got {k}")
    dim = sum(p.numel() for p in objective.params)
    g = torch.Generator(device="cpu").manual_seed(seed)
    start = torch.randn(dim, generator=g, dtype=objective.params[0].dtype).to(objective.params[0].device)
    alphas, betas = lanczos(objective, min(max_iter, dim), start, tol, min(k, dim))
    theta = np.linalg.eigvalsh(tridiagonal(alphas, betas))
    return [float(t) for t in theta[::-1][:k]]


def hutchinson_trace(objective: Objective, probes: int = 100, seed: int = 0) -> tuple[float, float]:
    """(tr H estimate, its standard error) from Rademacher probes."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    values = []
    for _ in range(probes):
        z = [(torch.randint(0, 2, p.shape, generator=g) * 2 - 1).to(p) for p in objective.params]
        values.append(float(sum((a * b).sum() for a, b in zip(z, objective.hvp(z)))))
    values = np.array(values)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(probes)) if probes > 1 else math.nan


def eigen_density(objective: Objective, probes: int = 4, steps: int = 40, seed: int = 0) -> dict:
    """Stochastic Lanczos quadrature: per probe, Ritz values (nodes) and weights summing to 1."""
    dim = sum(p.numel() for p in objective.params)
    g = torch.Generator(device="cpu").manual_seed(seed)
    nodes, weights = [], []
    for _ in range(probes):
        start = (torch.randint(0, 2, (dim,), generator=g) * 2 - 1).to(objective.params[0])
        alphas, betas = lanczos(objective, min(steps, dim), start)
        theta, s = np.linalg.eigh(tridiagonal(alphas, betas))
        nodes.append(theta.tolist())
        weights.append((s[0] ** 2).tolist())
    return {"nodes": nodes, "weights": weights}


# ---------------------------------------------------------------------- gradient noise


def gradient_noise(objective: Objective, micro_batch_size: int) -> dict:
    """The trace of the covariance of micro-batch gradients at micro-batch size m, over the
    subset's K = N // m micro-batches (the rest of the rows left out), and m times it."""
    rows = [(x[i : i + 1], y[i : i + 1]) for x, y in objective.batches for i in range(len(y))]
    k = len(rows) // micro_batch_size
    if k < 2:
        raise UsageError(
            f"micro_batch_size {micro_batch_size} leaves fewer than 2 micro-batches of the {len(rows)} measured rows"
        )
    grads = []
    for i in range(k):
        part = rows[i * micro_batch_size : (i + 1) * micro_batch_size]
        micro = Objective(
            objective.model, [(torch.cat([x for x, _ in part]), torch.cat([y for _, y in part]))], objective.bn
        )
        grads.append(flat(micro.gradient()))
    stacked = torch.stack(grads)
    trace = float((stacked - stacked.mean(0)).square().sum() / (k - 1))
    return {
        "micro_batch_size": micro_batch_size,
        "micro_batches": k,
        "trace_cov": trace,
        "trace_cov_per_example": micro_batch_size * trace,
    }


# ---------------------------------------------------------------------- loss surfaces


def filter_normalized_direction(model: torch.nn.Module, seed: int = 0) -> list[torch.Tensor]:
    """A random direction, one tensor per parameter: each filter (row along dim 0) of a weight
    with 2 or more dimensions has the norm of that filter of the weight; 1-D parameters get 0."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    direction = []
    for p in model.parameters():
        d = torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device)
        if p.dim() <= 1:
            direction.append(torch.zeros_like(p))
            continue
        d_norm = d.flatten(1).norm(dim=1).clamp_min(torch.finfo(d.dtype).tiny)
        scale = p.detach().flatten(1).norm(dim=1) / d_norm
        direction.append(d * scale.view(-1, *[1] * (p.dim() - 1)))
    return direction


@torch.no_grad()
def loss_slice(objective: Objective, directions: list[list[torch.Tensor]], grid: list[float]) -> dict:
    """L and the accuracy at w + a d (one direction) or w + a d1 + b d2 (two), a and b on `grid`;
    the weights are put back afterwards."""
    params = list(objective.model.parameters())
    saved = [p.detach().clone() for p in params]
    shape = [len(grid)] * len(directions)
    loss, acc = np.zeros(shape), np.zeros(shape)
    try:
        for index in np.ndindex(*shape):
            for p, w, *ds in zip(params, saved, *directions):
                p.copy_(w + sum(grid[i] * d for i, d in zip(index, ds)))
            loss[index], acc[index] = objective.value()
    finally:
        for p, w in zip(params, saved):
            p.copy_(w)
    return {"grid": list(grid), "loss": loss.tolist(), "acc": acc.tolist()}


@torch.no_grad()
def interpolate(objective: Objective, state_a: dict, state_b: dict, ts: list[float]) -> dict:
    """L and the accuracy along (1 - t) w_A + t w_B (parameters and floating-point buffers)."""
    model = objective.model
    keep = copy.deepcopy(model.state_dict())
    # Copies: a state_dict's tensors are the model's own, which loading the line's points overwrites.
    state_a, state_b = copy.deepcopy(state_a), copy.deepcopy(state_b)
    loss, acc = [], []
    try:
        for t in ts:
            model.load_state_dict(
                {k: (1 - t) * v + t * state_b[k] if v.is_floating_point() else v for k, v in state_a.items()}
            )
            value = objective.value()
            loss.append(value[0])
            acc.append(value[1])
    finally:
        model.load_state_dict(keep)
    return {"t": list(ts), "loss": loss, "acc": acc}


def extreme_eigenvalues(
    objective: Objective, max_iter: int = 100, tol: float = 1e-8, seed: int = 0
) -> tuple[float, float]:
    """(smallest, largest) eigenvalue of the Hessian of L, from one Lanczos run."""
    dim = sum(p.numel() for p in objective.params)
    g = torch.Generator(device="cpu").manual_seed(seed)
    start = torch.randn(dim, generator=g, dtype=objective.params[0].dtype).to(objective.params[0].device)
    alphas, betas = lanczos(objective, min(max_iter, dim), start, tol, 1)
    theta = np.linalg.eigvalsh(tridiagonal(alphas, betas))
    return float(theta[0]), float(theta[-1])


# ---------------------------------------------------------------------- what the methods act on


def augmentation_variance(
    model: torch.nn.Module,
    views: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    target: str = "last_stage",
    bn: str = "eval",
) -> dict:
    """GVR's quantity: 0.5 mean over pairs of ||grad_T L^a_S - grad_T L^b_S||^2, for (x_a, x_b, y)
    subsets S seen through two independently augmented views, T the target's parameters."""
    from .methods.gvr import target_parameters

    wanted = {id(p) for p in target_parameters(model, target)}
    halves = []
    for x_a, x_b, y in views:
        objective = Objective(model, [(x_a, y)], bn)
        in_target = [id(p) in wanted for p in objective.params]
        g_a = flat([g for g, t in zip(objective.gradient(), in_target) if t])
        g_b = flat([g for g, t in zip(Objective(model, [(x_b, y)], bn).gradient(), in_target) if t])
        halves.append(0.5 * float((g_a - g_b).square().sum()))
    return {
        "target": target,
        "pairs": len(views),
        "subset": len(views[0][2]),
        "variance": float(np.mean(halves)),
        "se": float(np.std(halves, ddof=1) / math.sqrt(len(halves))) if len(halves) > 1 else math.nan,
    }


def psf_bound_check(
    model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], rho: float, bn: str = "eval"
) -> dict:
    """vSAM's Lemma 1 on each batch: ||PSF|| = ||g(w + rho g/||g||) - g(w)|| against rho times the
    batch Hessian's largest |eigenvalue|, and the fraction of batches where it holds."""
    rows = []
    for x, y in batches:
        objective = Objective(model, [(x, y)], bn)
        g = objective.gradient()
        scale = rho / float(flat(g).norm())
        with torch.no_grad():
            for p, gi in zip(objective.params, g):
                p.add_(gi, alpha=scale)
        try:
            psf = float((flat(objective.gradient()) - flat(g)).norm())
        finally:
            with torch.no_grad():
                for p, gi in zip(objective.params, g):
                    p.sub_(gi, alpha=scale)
        low, high = extreme_eigenvalues(objective)
        bound = rho * max(abs(low), abs(high))
        rows.append({"psf_norm": psf, "bound": bound, "holds": psf <= bound})
    return {"rho": rho, "batches": rows, "fraction_holding": float(np.mean([r["holds"] for r in rows]))}


# ---------------------------------------------------------------------- the public entry


def curvature(
    model: torch.nn.Module,
    data,
    k: int = 3,
    trace_samples: int = 100,
    density: bool = False,
    bn: str = "eval",
    dtype: str = "fp32",
    seed: int = 0,
) -> dict:
    """The top-k Hessian eigenvalues and the Hutchinson trace of the training loss of `model` on
    `data` (a list of (x, y) batches), with what they cost: a plain, JSON-ready dict. The model is
    measured on a copy in `dtype` (fp32 or fp64), so the caller's model is left as it was."""
    check_choice("dtype", dtype, tuple(DTYPES))
    if k < 1:
        raise UsageError(f"k must be >= 1, got {k}")
    if trace_samples < 2:
        raise UsageError(f"trace_samples must be >= 2 (a standard error needs two), got {trace_samples}")
    measured = copy.deepcopy(model).to(DTYPES[dtype])
    batches = [(x.to(DTYPES[dtype]), y) for x, y in data]
    objective = Objective(measured, batches, bn)
    calls = {"hvp": 0}
    hvp = objective.hvp

    def counted(v):
        calls["hvp"] += 1
        return hvp(v)

    objective.hvp = counted
    started = time.perf_counter()
    out = {"bn": bn, "dtype": dtype, "rows": objective.count, "parameters": sum(p.numel() for p in objective.params)}
    out["loss"], out["acc"] = objective.value()
    out["top_eigenvalues"] = top_eigenvalues(objective, k, seed=seed)
    out["eigenvalue_hvps"] = calls["hvp"]
    out["trace"], out["trace_se"] = hutchinson_trace(objective, trace_samples, seed=seed)
    out["trace_samples"] = trace_samples
    if density:
        out["density"] = eigen_density(objective, seed=seed)
    out["hvps"], out["seconds"] = calls["hvp"], time.perf_counter() - started
    return out
