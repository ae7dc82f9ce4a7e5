"""Curvature and loss-landscape instruments: what GVR, the implicit-regularization penalties and the
SAM family all claim to change, measured.

Everything is a function of the training loss on a fixed, seeded evaluation subset of the
training set (the same rows whenever a run is measured), the model in a stated mode:

    L(w) = (1/N) sum_j CE(f_w(x_j), y_j)

over the parameters w with requires_grad=True (frozen ones are constants of L).

* bn="eval" (default): batch norm normalizes with its running statistics and dropout is off, so
  L is a deterministic function of w, the one the trained model computes at test time.
* bn="train": batch norm uses each evaluation batch's own statistics (running statistics left
  alone), dropout still off: the loss the optimizer's steps see, up to dropout.

Either way every module's train/eval mode is put back after each pass (`Objective`).

The rows (`as_batches`): one (x, y) batch (a tuple or list of two tensors), a gvr_lab.Batch, a list
of either, or any other iterable of them (a torch DataLoader, a generator), read once up to `rows`
rows: every row of a batch or a list when rows is None, the first ITERABLE_ROWS (1000) rows of an
iterable, which may be endless. Anything else is refused in one line.

Instruments, each from Hessian-vector products H v by double backward (fp32 or fp64, never bf16:
a product of second derivatives in 8 significant bits is noise):

* `top_eigenvalues`: the k largest eigenvalues of H, repeated ones as often as they repeat, by
  Lanczos with full reorthogonalization, restarted with locking. Single-vector Lanczos sees one
  direction of each eigenspace (its Krylov space holds one vector per distinct eigenvalue), so a
  double top eigenvalue shows up once, and on a Hessian with few distinct eigenvalues the
  iteration stops early on an invariant subspace. Every converged Ritz pair is locked, and the
  next round starts Lanczos from a new random vector orthogonal to all locked vectors, on H
  deflated against them (as PyHessian deflates its power iteration), until a round's largest Ritz
  value is no larger than the k-th locked one: nothing above it is left in the complement. A
  round stops when its wanted Ritz pairs' residual estimates |beta_m s_mi| fall below tol times
  the largest |Ritz value| seen (an estimate of ||H||), at an invariant subspace, or after
  `max_iter` steps. Each returned pair then gets its residual ||H v - lambda v||, measured with one
  more H v per vector (the Ritz estimate is of the deflated operator, not of H), and `converged`:
  residual <= max(tol, sqrt(machine epsilon)) * ||H|| estimate, which puts lambda within that of
  an eigenvalue of H. Restarting rather than a block Lanczos keeps one H v per step (the unit of
  the SLQ density and the trace), needs no block size to guess (a multiplicity of any order is
  found, a copy per round), and its last round proves the list complete. Cost: one round for
  k = 1 (the largest Ritz value of a random start is lambda_max, multiplicity aside), at least
  two for k >= 2 (the second checks the complement), at most k + 1; max_iter H v per round, plus
  k.
* `extreme_eigenvalues`: (smallest, largest, converged) from one Lanczos run, stopped when both
  ends' residual estimates are below tol * ||H||; `converged` says whether they were.
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

Scale-invariant sharpness. lambda_max and tr H change when a ReLU network's layer is multiplied by
c and the next one by 1/c, which leaves the function alone (Dinh et al., ICML 2017); these two do
not:

* `adaptive_sharpness`: the worst-case adaptive sharpness of Kwon et al. (ASAM, ICML 2021) in the
  elementwise form of Andriushchenko et al. ("A modern look at the relationship between sharpness
  and generalization", ICML 2023), with the l2 ball, on the whole measured subset at once:
      S_rho(w) = max over ||eps / |w| ||_2 <= rho of L(w + eps) - L(w)
  (|w| elementwise, without ASAM's offset eta: a weight equal to 0 cannot move). In scaled
  coordinates u = eps / |w| it is estimated by projected gradient ascent on the ball ||u|| <= rho:
  the start is the ASAM step
  u = rho g_u / ||g_u||, g_u = |w| * grad L (a seeded random direction when g_u = 0), then `steps`
  steps u <- P(u + h g_u / ||g_u||), P the projection onto the ball, h = rho at first and halved
  whenever a step does not raise L (the step is then not taken). Every iterate lies in the ball, and
  so does u = 0, so the value, L at the best of them minus L(w), is a lower bound of S_rho (and
  >= 0). Cost: steps + 2 gradients. On L = 0.5 w^T A w + b^T w it is the trust-region problem
  max_{||u|| <= rho} g_u^T u + 0.5 u^T D A D u, D = diag(|w|), which at a minimum (b = -A w) is
  0.5 rho^2 lambda_max(D A D); there the steps are a shifted power iteration on D A D, the
  value's relative error shrinking by about ((1 + lambda_2 / lambda_1) / 2)^2 per step.
* `filter_normalized_curvature`: the mean over n filter-normalized directions d (Li et al. 2018,
  `filter_normalized_direction`, seeds seed .. seed + n - 1) of d^T H d, the second derivative of
  the 1-D slice L(w + a d) at a = 0, with its standard error over the directions. Cost: one H v
  per direction.

`gvr_lab.curvature(model, data, ...)` (this module's `curvature`) runs the eigenvalues and the trace
(and the density, and the two sharpness measures, when asked) on a copy of the model in the asked
precision and returns a plain dict. This module knows models and batches only; gvr_lab/measure.py
applies it to run directories (`gvr-lab curvature RUN_DIR`, the curvature study).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .data import Batch
from .errors import UsageError, check_choice
from .methods.base import frozen_bn_stats, grad
from .methods.gvr import target_parameters

BN_MODES = ("eval", "train")
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}

# ---------------------------------------------------------------------- the rows

ITERABLE_ROWS = 1000  # rows read from an iterable of batches when `rows` is not given

ACCEPTED = (
    "data must be an (x, y) batch of two tensors, a gvr_lab.Batch, a list of them, "
    "or an iterable of them such as a DataLoader"
)


def described(thing) -> str:
    """What a refused argument was, in a few words."""
    if isinstance(thing, torch.Tensor):
        return f"a tensor of shape {tuple(thing.shape)}"
    if isinstance(thing, (list, tuple)):
        kinds = sorted({type(item).__name__ for item in thing})
        return f"a {type(thing).__name__} of {len(thing)} items ({', '.join(kinds) or 'empty'})"
    name = type(thing).__name__
    return f"{'an' if name[0] in 'aeiouAEIOU' else 'a'} {name}"


def as_pair(thing) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x, y) of a Batch or of a tuple or list of two tensors; None for anything else."""
    if isinstance(thing, Batch):
        x, y = thing.x, thing.y
    elif isinstance(thing, (list, tuple)) and len(thing) == 2 and all(isinstance(t, torch.Tensor) for t in thing):
        x, y = thing
    else:
        return None
    if x.dim() == 0 or y.dim() == 0 or len(x) != len(y):
        raise UsageError(
            f"an (x, y) batch needs one label per input row, got x of shape {tuple(x.shape)} "
            f"and y of shape {tuple(y.shape)}"
        )
    return x, y


def as_batches(data, rows: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (x, y) batches of `data`, in order, cut after `rows` rows: all rows of a batch or a
    list when rows is None, the first ITERABLE_ROWS of any other iterable (which is read once)."""
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        raise UsageError(f"rows must be a positive int or None, got {rows!r}")
    single = as_pair(data)
    if single is not None:
        items, bound = [single], rows
    elif isinstance(data, (list, tuple)):
        items, bound = data, rows
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, dict, torch.Tensor)):
        items, bound = data, rows or ITERABLE_ROWS
    else:
        raise UsageError(f"{ACCEPTED}; got {described(data)}")
    batches, count = [], 0
    for i, item in enumerate(items):
        pair = as_pair(item)
        if pair is None:
            raise UsageError(f"{ACCEPTED}; got {described(data)} whose item {i} is {described(item)}")
        x, y = pair
        if bound is not None:
            x, y = x[: bound - count], y[: bound - count]
        batches.append((x, y))
        count += len(y)
        if bound is not None and count >= bound:
            break
    if count == 0:
        raise UsageError(f"{ACCEPTED}; got {described(data)} holding no rows")
    return batches


# ---------------------------------------------------------------------- the loss on a fixed subset


@dataclass
class Objective:
    """L(w) on fixed batches, and its derivatives, for a model in a stated mode. `batches` takes
    any form `as_batches` does (and holds the list of (x, y) pairs afterwards), on the model's
    device and in its dtype; `rows` bounds them."""

    model: torch.nn.Module
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    bn: str = "eval"
    rows: int | None = None

    def __post_init__(self):
        check_choice("bn mode", self.bn, BN_MODES)
        self.batches = as_batches(self.batches, self.rows)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.count = sum(len(y) for _, y in self.batches)

    @contextlib.contextmanager
    def _mode(self):
        """Dropout off always; batch norm in eval mode, or in train mode with its running
        statistics left alone; every module's mode put back afterwards."""
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        if self.bn == "train":
            for m in self.model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.train()
        try:
            with frozen_bn_stats(self.model):
                yield
        finally:
            for m, training in modes:
                m.training = training

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

    def loss_and_gradient(self) -> tuple[float, list[torch.Tensor]]:
        """(L, its gradient) at the current weights, from one pass."""
        loss, total = 0.0, None
        for part, _, _ in self.batch_losses():
            g = grad(part, self.params)
            loss += float(part.detach())
            total = g if total is None else torch._foreach_add(total, g)
        return loss, total

    def gradient(self) -> list[torch.Tensor]:
        return self.loss_and_gradient()[1]

    def hvp(self, v: list[torch.Tensor]) -> list[torch.Tensor]:
        """H v by double backward, batch by batch (one graph alive at a time)."""
        total = None
        for part, _, _ in self.batch_losses():
            g = grad(part, self.params, create_graph=True)
            hv = grad(sum((a * b).sum() for a, b in zip(g, v)), self.params)
            total = hv if total is None else torch._foreach_add(total, hv)
        return total

    def quadratic_form(self, v: list[torch.Tensor]) -> float:
        """v^T H v."""
        return float(sum((a * b).sum() for a, b in zip(v, self.hvp(v))))


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vector: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [part.view_as(t) for part, t in zip(vector.split([t.numel() for t in like]), like)]


@contextlib.contextmanager
def weights_restored(params: list[torch.Tensor]):
    """Yields copies of the weights `params` hold; the block may move them, they are put back by
    copy on exit."""
    saved = [p.detach().clone() for p in params]
    try:
        yield saved
    finally:
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)


# ---------------------------------------------------------------------- eigenvalues, trace, density


def orthogonalized(w: torch.Tensor, against: list[torch.Tensor]) -> torch.Tensor:
    """w less its components along the orthonormal vectors `against`; twice is enough (Kahan)."""
    w = w.clone()
    for _ in range(2):
        for q in against:
            w -= (w @ q) * q
    return w


@dataclass
class Krylov:
    """A Lanczos run: the tridiagonal matrix (alphas, betas), its orthonormal basis, the norm of the
    last residual (beta_m), and whether the run stopped on an invariant subspace."""

    alphas: list[float]
    betas: list[float]
    basis: list[torch.Tensor]
    beta: float
    invariant: bool

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(Ritz values ascending, eigenvectors of the tridiagonal matrix, residual estimates
        |beta_m s_mi|)."""
        theta, s = np.linalg.eigh(tridiagonal(self.alphas, self.betas))
        return theta, s, np.abs(self.beta * s[-1])

    def vector(self, s: np.ndarray) -> torch.Tensor:
        """The Ritz vector sum_j s_j q_j."""
        return sum(float(c) * q for c, q in zip(s, self.basis))


def lanczos(
    objective: Objective,
    steps: int,
    start: torch.Tensor,
    tol: float = 0.0,
    top: int = 0,
    bottom: int = 0,
    locked: list[torch.Tensor] = (),
    scale: float = 0.0,
) -> Krylov:
    """Lanczos with full reorthogonalization from `start`, on H deflated against the orthonormal
    vectors `locked` (every basis vector is kept orthogonal to them). It stops after `steps` steps,
    on an invariant subspace (beta_m <= 100 eps ||H||), or, with tol > 0, once the `top` largest
    and `bottom` smallest Ritz pairs have residual estimates <= tol * ||H||, ||H|| estimated by
    the largest of `scale` and the |Ritz values|."""
    params = objective.params
    eps = torch.finfo(start.dtype).eps
    first = orthogonalized(start, locked)
    basis = [first / first.norm()]
    alphas, betas = [], []
    for j in range(steps):
        w = flat(objective.hvp(unflat(basis[-1], params)))
        alphas.append(float(w @ basis[-1]))
        w = w - alphas[-1] * basis[-1] - (betas[-1] * basis[-2] if betas else 0)
        w = orthogonalized(w, [*locked, *basis])
        beta = float(w.norm())
        run = Krylov(alphas, betas, basis, beta, False)
        theta, _, estimate = run.ritz()
        norm = max(scale, float(np.abs(theta).max()))
        run.invariant = beta <= 100 * eps * norm
        ends = np.concatenate([estimate[: min(bottom, len(theta))], estimate[len(theta) - min(top, len(theta)) :]])
        settled = tol > 0 and len(theta) >= max(top, bottom) and bool(np.all(ends <= tol * norm))
        if run.invariant or settled or j + 1 == steps:
            return run
        betas.append(beta)
        basis.append(w / beta)


def tridiagonal(alphas: list[float], betas: list[float]) -> np.ndarray:
    return np.diag(alphas) + np.diag(betas[: len(alphas) - 1], 1) + np.diag(betas[: len(alphas) - 1], -1)


def random_vector(objective: Objective, generator: torch.Generator) -> torch.Tensor:
    """N(0, I) over the flattened parameters, drawn on the CPU (the same on every device)."""
    reference = objective.params[0]
    dim = sum(p.numel() for p in objective.params)
    return torch.randn(dim, generator=generator, dtype=reference.dtype).to(reference.device)


@dataclass
class Eigenpairs:
    """The k largest eigenvalues of H, largest first, repeated ones as often as they repeat."""

    values: list[float]
    residuals: list[float]  # ||H v - lambda v|| for the unit Ritz vector v, measured with one H v
    converged: list[bool]  # residual <= max(tol, sqrt(eps)) * ||H|| estimate
    complete: bool  # a last round, orthogonal to every vector found, saw nothing above values[-1]
    rounds: int

    @property
    def all_converged(self) -> bool:
        return self.complete and all(self.converged)


def top_eigenvalues(
    objective: Objective, k: int = 3, max_iter: int = 100, tol: float = 1e-10, seed: int = 0
) -> Eigenpairs:
    """The k largest eigenvalues of the Hessian of L with their multiplicities, residuals and
    convergence, by Lanczos restarted with locking (see the module docstring)."""
    dim = sum(p.numel() for p in objective.params)
    if k < 1:
        raise UsageError(f"k must be >= 1, got {k}")
    if k > dim:
        raise UsageError(f"k={k} asks for more eigenvalues than the Hessian has: it is over {dim} parameters")
    if max_iter < k or not tol > 0:
        raise UsageError(f"top_eigenvalues needs max_iter >= k and tol > 0, got max_iter={max_iter}, tol={tol}")
    accuracy = max(tol, math.sqrt(torch.finfo(objective.params[0].dtype).eps))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    found, unconverged = [], []  # (value, unit vector); the found ones are locked
    scale, complete, rounds = 0.0, False, 0
    while not complete and rounds <= k and len(found) < dim:
        start = random_vector(objective, generator)
        wanted = k if not found else max(1, k - len(found))
        locked = [v for _, v in found]
        run = lanczos(objective, min(max_iter, dim - len(found)), start, tol, wanted, 0, locked, scale)
        rounds += 1
        theta, s, estimate = run.ritz()
        scale = max(scale, float(np.abs(theta).max()))
        settled = (estimate <= tol * scale) | run.invariant
        if len(found) >= k and settled[-1]:
            kth = sorted((value for value, _ in found), reverse=True)[k - 1]
            if theta[-1] <= kth + accuracy * scale:  # the complement holds nothing above the k-th found
                complete = True
                break
        new = []
        for i in reversed(range(len(theta))):
            if not settled[i] or len(new) == k:
                break
            new.append((float(theta[i]), run.vector(s[:, i])))
        if not new:  # not even the round's largest Ritz pair converged in max_iter steps
            unconverged = [(float(theta[i]), run.vector(s[:, i])) for i in reversed(range(len(theta)))][:k]
            break
        found += new
        if k == 1:  # a first round's largest Ritz value is lambda_max
            complete = True
    pairs = sorted(found + unconverged, key=lambda pair: -pair[0])[:k]
    residuals = [float((flat(objective.hvp(unflat(v, objective.params))) - value * v).norm()) for value, v in pairs]
    return Eigenpairs(
        values=[value for value, _ in pairs],
        residuals=residuals,
        converged=[r <= accuracy * scale for r in residuals],
        complete=(complete or len(found) == dim) and not unconverged,
        rounds=rounds,
    )


def hutchinson_trace(objective: Objective, probes: int = 100, seed: int = 0) -> tuple[float, float]:
    """(tr H estimate, its standard error) from Rademacher probes."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    values = []
    for _ in range(probes):
        z = [(torch.randint(0, 2, p.shape, generator=g) * 2 - 1).to(p) for p in objective.params]
        values.append(objective.quadratic_form(z))
    values = np.array(values)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(probes)) if probes > 1 else math.nan


def eigen_density(objective: Objective, probes: int = 4, steps: int = 40, seed: int = 0) -> dict:
    """Stochastic Lanczos quadrature: per probe, Ritz values (nodes) and weights summing to 1."""
    dim = sum(p.numel() for p in objective.params)
    g = torch.Generator(device="cpu").manual_seed(seed)
    nodes, weights = [], []
    for _ in range(probes):
        start = (torch.randint(0, 2, (dim,), generator=g) * 2 - 1).to(objective.params[0])
        theta, s, _ = lanczos(objective, min(steps, dim), start).ritz()
        nodes.append(theta.tolist())
        weights.append((s[0] ** 2).tolist())
    return {"nodes": nodes, "weights": weights}


def extreme_eigenvalues(
    objective: Objective, max_iter: int = 100, tol: float = 1e-8, seed: int = 0
) -> tuple[float, float, bool]:
    """(smallest, largest, converged): the extreme eigenvalues of the Hessian of L from one Lanczos
    run (a random start sees every distinct eigenvalue, so multiplicities do not matter here),
    stopped once both ends' residual estimates are <= tol * ||H||; converged says whether both
    were, or the run ended on an invariant subspace, by then."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dim = sum(p.numel() for p in objective.params)
    run = lanczos(objective, min(max_iter, dim), random_vector(objective, g), tol, 1, 1)
    theta, _, estimate = run.ritz()
    settled = run.invariant or bool(max(estimate[0], estimate[-1]) <= tol * np.abs(theta).max())
    return float(theta[0]), float(theta[-1]), settled


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
    shape = [len(grid)] * len(directions)
    loss, acc = np.zeros(shape), np.zeros(shape)
    with weights_restored(params) as saved:
        for index in np.ndindex(*shape):
            for p, w, *ds in zip(params, saved, *directions):
                p.copy_(w + sum(grid[i] * d for i, d in zip(index, ds)))
            loss[index], acc[index] = objective.value()
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


# ---------------------------------------------------------------------- scale-invariant sharpness


def adaptive_sharpness(objective: Objective, rho: float = 0.1, steps: int = 10, seed: int = 0) -> dict:
    """A lower bound of max over ||eps / |w| ||_2 <= rho of L(w + eps) - L(w), by projected gradient
    ascent in the scaled coordinates u = eps / |w| (the start, the steps and the step size are in
    the module docstring); the weights are put back afterwards."""
    if not rho > 0 or steps < 0:
        raise UsageError(f"adaptive sharpness needs rho > 0 and steps >= 0, got rho={rho}, steps={steps}")
    params = objective.params
    with weights_restored(params) as w:
        size = [t.abs() for t in w]

        def scaled_gradient(g):
            g_u = torch._foreach_mul(g, size)
            return g_u, float(flat(g_u).norm())

        def at(u):
            with torch.no_grad():
                for p, t, s, part in zip(params, w, size, u):
                    p.copy_(t + s * part)
            return objective.loss_and_gradient()

        base, g = objective.loss_and_gradient()
        g_u, norm = scaled_gradient(g)
        if norm == 0:
            generator = torch.Generator(device="cpu").manual_seed(seed)
            g_u = [
                torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device) * (s > 0) for t, s in zip(w, size)
            ]
            norm = float(flat(g_u).norm())
        best, gradients = base, 1
        if norm > 0:  # else every weight is 0: nothing can move
            u = [rho / norm * t for t in g_u]
            best, g = at(u)
            h, gradients = rho, 2
            for _ in range(steps):
                g_u, norm = scaled_gradient(g)
                if norm == 0:
                    break
                moved = [a + h / norm * b for a, b in zip(u, g_u)]
                length = float(flat(moved).norm())
                if length > rho:
                    moved = [rho / length * t for t in moved]
                loss, moved_g = at(moved)
                gradients += 1
                if loss > best:
                    u, best, g = moved, loss, moved_g
                else:
                    h /= 2
    return {"rho": rho, "sharpness": max(best, base) - base, "steps": steps, "gradients": gradients}


def filter_normalized_curvature(objective: Objective, directions: int = 10, seed: int = 0) -> dict:
    """The mean over `directions` filter-normalized directions d (seeds seed, seed + 1, ...) of
    d^T H d, the second derivative of L(w + a d) at a = 0, with its standard error."""
    if directions < 2:
        raise UsageError(f"filter-normalized curvature needs directions >= 2 (a standard error), got {directions}")
    trainable = [p.requires_grad for p in objective.model.parameters()]
    values = []
    for i in range(directions):
        d = filter_normalized_direction(objective.model, seed + i)
        values.append(objective.quadratic_form([t for t, keep in zip(d, trainable) if keep]))
    return {
        "directions": directions,
        "curvature": float(np.mean(values)),
        "se": float(np.std(values, ddof=1) / math.sqrt(directions)),
        "values": values,
    }


# ---------------------------------------------------------------------- what the methods act on


def augmentation_variance(
    model: torch.nn.Module,
    views: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    target: str = "last_stage",
    bn: str = "eval",
) -> dict:
    """GVR's quantity: 0.5 mean over pairs of ||grad_T L^a_S - grad_T L^b_S||^2, for (x_a, x_b, y)
    subsets S seen through two independently augmented views, T the target's parameters."""
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


def psf_bound_check(model: torch.nn.Module, batches, rho: float, bn: str = "eval") -> dict:
    """vSAM's Lemma 1 on each batch of `batches` (any form `as_batches` takes): ||PSF|| =
    ||g(w + rho g/||g||) - g(w)|| against rho times the batch Hessian's largest |eigenvalue| (with
    whether both ends of its spectrum converged), and the fraction of batches where it holds."""
    rows = []
    for x, y in as_batches(batches):
        objective = Objective(model, [(x, y)], bn)
        g = objective.gradient()
        scale = rho / float(flat(g).norm())
        with weights_restored(objective.params):
            with torch.no_grad():
                torch._foreach_add_(objective.params, g, alpha=scale)
            psf = float((flat(objective.gradient()) - flat(g)).norm())
        low, high, converged = extreme_eigenvalues(objective)
        bound = rho * max(abs(low), abs(high))
        rows.append({"psf_norm": psf, "bound": bound, "holds": psf <= bound, "converged": converged})
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
    rows: int | None = None,
    sharpness: bool = False,
    rho: float = 0.1,
    sharpness_steps: int = 20,
    directions: int = 10,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> dict:
    """The top-k Hessian eigenvalues (with their residuals and convergence) and the Hutchinson
    trace of the training loss of `model` on `data` (any form `as_batches` takes, at most `rows`
    rows), with what they cost: a plain, JSON-ready dict. density=True adds the SLQ density;
    sharpness=True the adaptive sharpness at `rho` (`sharpness_steps` ascent steps; the ball's
    radius has no value right for every model: compare runs at one rho) and the filter-normalized
    curvature over `directions` directions. `max_iter` and `tol` are top_eigenvalues': a study
    that measures many checkpoints trades digits for time with a looser tol (each eigenvalue's
    `converged` then says whether its residual is within max(tol, sqrt(eps)) of ||H||).

    The model is measured on a copy in `dtype` (fp32 or fp64), the batches moved to its device:
    the caller's model (weights, modes, requires_grad, buffers, .grad) is left as it was."""
    check_choice("dtype", dtype, tuple(DTYPES))
    if k < 1:
        raise UsageError(f"k must be >= 1, got {k}")
    if trace_samples < 2:
        raise UsageError(f"trace_samples must be >= 2 (a standard error needs two), got {trace_samples}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise UsageError("the model has no parameter with requires_grad=True: its loss has no Hessian to measure")
    batches = as_batches(data, rows)
    measured = copy.deepcopy(model).to(DTYPES[dtype])
    for p in measured.parameters():
        p.grad = None  # the copy's .grad would only hold memory: the instruments use autograd.grad
    device = trainable[0].device
    batches = [
        (x.to(device, DTYPES[dtype]) if x.is_floating_point() else x.to(device), y.to(device)) for x, y in batches
    ]
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
    eigen = top_eigenvalues(objective, k, max_iter, tol, seed)
    out["top_eigenvalues"], out["residuals"], out["converged"] = eigen.values, eigen.residuals, eigen.converged
    out["all_converged"], out["lanczos_rounds"] = eigen.all_converged, eigen.rounds
    out["eigenvalue_hvps"] = calls["hvp"]
    out["trace"], out["trace_se"] = hutchinson_trace(objective, trace_samples, seed=seed)
    out["trace_samples"] = trace_samples
    if density:
        out["density"] = eigen_density(objective, seed=seed)
    if sharpness:
        adaptive = adaptive_sharpness(objective, rho, sharpness_steps, seed)
        fn = filter_normalized_curvature(objective, directions, seed)
        out.update(
            adaptive_sharpness=adaptive["sharpness"],
            adaptive_sharpness_rho=rho,
            adaptive_sharpness_gradients=adaptive["gradients"],
            fn_curvature=fn["curvature"],
            fn_curvature_se=fn["se"],
            fn_curvature_directions=directions,
        )
    out["hvps"], out["seconds"] = calls["hvp"], time.perf_counter() - started
    return out
