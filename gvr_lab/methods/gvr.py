"""GVR: gradient-variance regularization on two augmented views (Habibu-Ahmad, 2025).

Every image of the batch comes as two independently augmented views, a (`batch.x`) and b
(`batch.x2`), with one label. With S a random subset of s = min(subset, n) rows, the same rows for
both views, and T the target parameters,

    J = La + Lb + alpha * P            reduction="sum"  (the original code)
    J = (La + Lb) / 2 + alpha * P      reduction="mean"
    P = || grad_T L^a_S - grad_T L^b_S ||^2

La, Lb are the mean cross-entropies of the two views over all n rows, L^a_S, L^b_S those over the
rows in S. The step applies the base optimizer to grad J. The penalty's part of it,
alpha * grad P = 2 alpha (H^a_S - H^b_S) d~ (d = g_a - g_b zero-padded outside T, H the Hessians of
the subset losses), reaches every layer, not only T. For i.i.d. views E[P] = 2 tr Var[grad_T L_S]:
P/2 is a one-sample estimate of the augmentation variance of the subset gradient.

Reference: README and code of github.com/Habibu-Ahmad/Gradient-Variance-Reduction (final
src/utils.py, commit 4260a2f). What the code does, where the
README says otherwise, and what is reproduced here by default:

* target: the README says "only the last layer"; the code takes the gradient w.r.t. every
  parameter whose name contains "conv5_x" or "fc", i.e. the whole last residual stage plus the
  classifier: 8,445,028 of ResNet-18's 11,220,132 parameters (75%, C=100). target="last_stage"
  (default) is that set, chosen by module reference (model.last_stage, model.fc), never by name.
  "fc" (51,300 for C=100) is the README's reading; "all" is every trainable parameter.
* the two mean data losses are summed, so alpha=0 is SGD on both views at about twice the
  effective learning rate of single-view SGD (and half its weight-decay-to-data ratio), not the
  SGD baseline. reduction="mean" is the fair alpha=0 ablation, which the repo does not report.
* one subset per step (a fresh randperm), shared by both views (README: "subsampled
  independently"); only the penalty uses it, the data losses use all n rows.
* create_graph: the first upload (17f1e8e) took the view gradients without create_graph, so the
  penalty changed nothing (it also averaged the losses and used subset 16); the final code uses
  create_graph=True, subset 32 and summed losses, which penalty="exact" reproduces. Whether the
  released logs came from the create_graph=True version cannot be verified.
* alpha = 0.01 is the run scripts' value (train.py's argparse default is 0.001).

Penalty implementations. On a BN-free, dropout-free model all three give the same P and their
updates agree (closed_form = exact to rounding, fd = exact to O(fd_eps) on smooth nets).

* exact: the original's double backward. The subset rows of each view get their own forward (BN
  normalizes them with the subset's statistics), g = autograd.grad(L_S, T, create_graph=True), and
  one backward of J. Not compilable: AOTAutograd has no double backward.
* fd: grad P by a forward difference of D = grad L^a_S - grad L^b_S (all parameters) along d~:
  grad P ~ (2/h) [D(theta + h d~) - D(theta)], h = fd_eps / ||d||, so the weights move by exactly
  fd_eps in parameter space. Four first-order passes on the subset (each view at theta and at the
  moved point, BN as in exact), weights restored by copy, then the data backward. Compilable:
  first-order passes only.
  fd_eps = 1e-3: on a smooth (tanh) net fd's penalty gradient is within 1e-4..5e-4 (float64,
  truncation error, linear in fd_eps) and ~7e-4 (float32, near its optimum: rounding takes over
  below, 1e-2 at fd_eps = 1e-4) of exact's. On ReLU/max-pool bodies with a target beyond fc the
  moved point crosses activation kinks that the exact Hessian ignores, so fd is a kink-smoothed
  estimate that differs from exact by more than exact's own size (relative difference 4 to 40 on
  tiny_cnn for fd_eps from 1e-1 to 1e-3); it is then another regularizer, not an approximation of
  exact. The four probe passes compute in fp32 whatever the autocast, with TF32 off
  (base.Method.fp32): in bf16 their difference drowned in rounding (the update was 106% off); in
  fp32 fd under a bf16 run agrees with exact as well as in an fp32 run. They replay the dropout
  masks of the clean difference, so the moved point differs from it only by h d (new masks made
  the penalty gradient 1e2..1e4 x exact's, growing like 1/fd_eps).
* closed_form (target "fc" only, a UsageError otherwise): for a linear head on mean CE,
  grad_W L_S = delta^T h and grad_bias L_S = sum_j delta_j with delta_j = (softmax(z_j) - q_j) / s,
  h the penultimate features (the head's input, read by a forward hook on it), z the logits and q
  the loss's target distribution (one-hot or the given soft targets, smoothed under label
  smoothing; another loss_fn is refused). P is then an ordinary function of the
  subset rows of the two full-batch forwards, computed in at least fp32: no extra forward, no
  double backward, one backward, compilable. With BatchNorm in the body those rows are normalized
  with the full-batch statistics (exact and fd: the subset's), and with dropout they keep the
  full-batch masks, so closed_form equals exact only for BN- and dropout-free bodies.

A model needs only what its target uses: a classifier head for target "fc" (models.classifier_head:
timm's get_classifier(), `fc`, or torchvision's `classifier`), `last_stage` and the head for
"last_stage", nothing for "all"; closed_form also needs the head's output to be the model's
(one head call per forward). A model without them is refused in one line naming what to add.

Own loop (docs/own_loop.md): a batch without a second view gets both views from the `augment`
callable the method was created with (view a = augment(batch.x), view b = augment(batch.x): two
draws, so give it the un-augmented images); without one such a batch is refused.

Under data parallelism the penalty is each rank's own, on a subset of the rank's rows, and the
update gradients are averaged: not what one process computes with the whole batch.

BN running statistics advance exactly once per step, in the forward of view a over all n rows (the
clean pass); view b's forward and every penalty pass run with them frozen. Deviation: the original
froze them in every pass of the GVR step (BN momentum 0) and updated them only through the
training-accuracy forward of view a that its train.py runs after optimizer.step(), i.e. with the
post-step weights; we fold that update into the clean pass to save a forward.

Metrics: "loss" = La, "loss2" = Lb, "acc" (view a), "penalty" = P, "grad_diff_norm" = sqrt(P) =
||g_a - g_b|| over T, "grad_norm" = ||grad J|| over all parameters (before the optimizer's weight
decay and momentum).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import Batch
from ..errors import UsageError
from ..models import HEAD_CONVENTIONS, classifier_head, head_calls
from .base import (
    TWO_VIEW_SGD,
    Method,
    SpeedTarget,
    frozen_bn_stats,
    global_norm,
    grad,
    register_method,
    replayed_rng,
    rng_state,
    set_grads,
    upcast,
)

TARGETS = ("fc", "last_stage", "all")


def target_parameters(model: torch.nn.Module, target: str, who: str = "") -> list[torch.Tensor]:
    """The parameters of a GVR target set: the classifier head (models.classifier_head),
    `last_stage` and the head, or the whole model. A model without what the target names is
    refused in one line, which starts with `who` (what asked for the target)."""
    if target == "all":
        return list(model.parameters())
    who, name = who or f"target {target!r}", type(model).__name__
    head = classifier_head(model)
    if head is None:
        raise UsageError(f"{who} needs the model's classifier head, which {name} lacks: {HEAD_CONVENTIONS}")
    if target == "fc":
        return list(head.parameters())
    if not hasattr(model, "last_stage"):
        raise UsageError(
            f"{who} needs model.last_stage, which {name} lacks; use target 'all' (any model) or 'fc', or give "
            "the model 'last_stage' (its last body stage)"
        )
    return [*model.last_stage.parameters(), *head.parameters()]


@register_method
class GVR(Method):
    name = "gvr"
    views = 2
    hparams = {
        "alpha": 0.01,
        "target": "last_stage",
        "subset": 32,
        "reduction": "sum",
        "penalty": "exact",
        "fd_eps": 1e-3,
    }
    choices = {"target": TARGETS, "reduction": ("sum", "mean"), "penalty": ("closed_form", "exact", "fd")}
    reference = (
        "Habibu-Ahmad 2025 (GVR repo code: last stage + fc target, summed view losses, shared "
        "subset, double backward); BN stats updated on the clean pass, not a post-step forward"
    )
    double_backward = {"penalty": "exact"}
    passes = "closed_form: 2 views (= SGD on 2B); exact: + double backward on the subset; fd: + 4 subset passes"

    bounds = {"alpha": ">= 0", "subset": ">= 1", "fd_eps": "> 0"}
    term, term_weight, color = "gradient-variance penalty", "alpha", "#0173b2"
    bench_rows = ({"penalty": "closed_form", "target": "fc"}, {}, {"penalty": "fd"})
    speed_targets = (
        SpeedTarget("gvr closed_form <= 1.05x sgd on both views", {"penalty": "closed_form"}, TWO_VIEW_SGD, 1.05),
    )

    @classmethod
    def validate(cls, hp: dict) -> None:
        if hp["penalty"] == "closed_form" and hp["target"] != "fc":
            raise UsageError(
                f"penalty 'closed_form' of method 'gvr' needs target 'fc', got {hp['target']!r}; "
                "use penalty 'exact' or 'fd' for it"
            )

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, augment=None, **kwargs):
        """`augment`: for batches without a second view, a callable drawing one augmented view of
        a batch of images (see the module's docstring)."""
        super().__init__(model, optimizer, **kwargs)
        self.augment = augment
        if self.hp.penalty == "closed_form" and self.loss_fn is not None:
            raise UsageError(
                "penalty 'closed_form' of method 'gvr' is cross-entropy's head gradient in closed form; with "
                "loss_fn use penalty 'exact' or 'fd'"
            )
        who = f"method 'gvr' with target {self.hp.target!r} and penalty {self.hp.penalty!r}"
        wanted = {id(p) for p in target_parameters(model, self.hp.target, who)}
        self.head = classifier_head(model)
        # Kept in optimizer order; the fd step needs the mask to cut d out of all-parameter gradients.
        self.in_target = [id(p) in wanted for p in self.params]
        self.target_params = [p for p, t in zip(self.params, self.in_target) if t]
        if not self.target_params:
            raise UsageError(f"target {self.hp.target!r} of method 'gvr' has no trainable parameters")

    # ------------------------------------------------------------------ the step

    def step(self, batch: Batch) -> dict:
        if batch.x2 is None:
            if self.augment is None:
                raise UsageError(
                    "method 'gvr' needs two views of each image: give batches a second view (Batch(x, y, x2=...)) "
                    "or create the method with augment=<a callable drawing one augmented view of a batch>"
                )
            batch = Batch(self.augment(batch.x), batch.y, batch.index, self.augment(batch.x))
        self.zero_grad()
        n = batch.y.shape[0]
        rows = torch.randperm(n, device=batch.y.device)[: min(self.hp.subset, n)]
        run = {"closed_form": self._step_closed_form, "exact": self._step_exact, "fd": self._step_fd}[self.hp.penalty]
        logits_a, loss_a, loss_b, penalty = run(batch, rows)
        grad_norm = self.update_norm()
        self.optimizer.step()
        return self.metrics(
            logits_a,
            batch.y,
            loss_a,
            loss2=loss_b,
            penalty=penalty,
            grad_diff_norm=penalty.detach().sqrt(),
            grad_norm=grad_norm,
        )

    def _data_loss(self, loss_a: torch.Tensor, loss_b: torch.Tensor) -> torch.Tensor:
        return loss_a + loss_b if self.hp.reduction == "sum" else (loss_a + loss_b) / 2

    def _view_forwards(self, batch: Batch):
        """Both views over all n rows, each with its own BN batch statistics; the running statistics
        advance in view a's forward only."""
        logits_a = self.forward(batch.x)
        with frozen_bn_stats(self.model):
            logits_b = self.forward(batch.x2)
        return logits_a, self.loss(logits_a, batch.y), self.loss(logits_b, batch.y)

    def _step_exact(self, batch: Batch, rows: torch.Tensor):
        y = batch.y[rows]
        with frozen_bn_stats(self.model):
            g_a = grad(self.loss(self.forward(batch.x[rows]), y), self.target_params, create_graph=True)
            g_b = grad(self.loss(self.forward(batch.x2[rows]), y), self.target_params, create_graph=True)
        penalty = global_norm(torch._foreach_sub(g_a, g_b)).square()
        logits_a, loss_a, loss_b = self._view_forwards(batch)
        (self._data_loss(loss_a, loss_b) + self.hp.alpha * penalty).backward()
        return logits_a, loss_a, loss_b, penalty

    def _grad_difference(self, x_a: torch.Tensor, x_b: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """D = grad L^a_S - grad L^b_S over all parameters (one backward through both views' graphs)."""
        difference = self.loss(self.forward(x_a), y) - self.loss(self.forward(x_b), y)
        return grad(difference, self.params)

    def _step_fd(self, batch: Batch, rows: torch.Tensor):
        x_a, x_b, y = batch.x[rows], batch.x2[rows], batch.y[rows]
        # Both ends of the difference in fp32 (base.Method.fp32), and the moved end with the
        # dropout masks of the clean end: fresh masks would make D(theta + h d) - D(theta) a
        # difference of two networks, divided by h (a penalty gradient 1e2..1e4 x exact's).
        with frozen_bn_stats(self.model), self.fp32():
            state = rng_state(x_a.device)
            difference = self._grad_difference(x_a, x_b, y)
            d = [g for g, t in zip(difference, self.in_target) if t]
            penalty = global_norm(d).square()
            # ||h d|| = fd_eps; the clamp keeps h finite when the views agree (d = 0, grad P = 0).
            h = self.hp.fd_eps / penalty.sqrt().clamp_min(torch.finfo(penalty.dtype).tiny)
            with self.moved(torch._foreach_mul(d, h), self.target_params), replayed_rng(state, x_a.device):
                moved = self._grad_difference(x_a, x_b, y)
        penalty_grad = torch._foreach_sub(moved, difference)
        torch._foreach_mul_(penalty_grad, 2 * self.hp.alpha / h)
        # The data backward accumulates onto alpha * grad P.
        set_grads(self.params, penalty_grad)
        logits_a, loss_a, loss_b = self._view_forwards(batch)
        self._data_loss(loss_a, loss_b).backward()
        return logits_a, loss_a, loss_b, penalty

    def _step_closed_form(self, batch: Batch, rows: torch.Tensor):
        with head_calls(self.head) as calls:
            logits_a = self.forward(batch.x)
            with frozen_bn_stats(self.model):
                logits_b = self.forward(batch.x2)
        if len(calls) != 2 or calls[0][1] is not logits_a or calls[1][1] is not logits_b:
            raise UsageError(
                f"penalty 'closed_form' of method 'gvr' reads the input of the classifier head, but the output of "
                f"{type(self.model).__name__} is not that head's, of one call per forward: use penalty 'exact' or 'fd'"
            )
        (features_a, _), (features_b, _) = calls
        loss_a, loss_b = self.loss(logits_a, batch.y), self.loss(logits_b, batch.y)
        penalty = self._fc_penalty(features_a[rows], logits_a[rows], features_b[rows], logits_b[rows], batch.y[rows])
        (self._data_loss(loss_a, loss_b) + self.hp.alpha * penalty).backward()
        return logits_a, loss_a, loss_b, penalty

    def _fc_penalty(
        self, h_a: torch.Tensor, z_a: torch.Tensor, h_b: torch.Tensor, z_b: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """||grad_fc L^a_S - grad_fc L^b_S||^2 of `self.loss` from the head's inputs and outputs."""
        z_a, z_b, h_a, h_b = upcast(z_a), upcast(z_b), upcast(h_a), upcast(h_b)
        s, num_classes = z_a.shape
        smoothing = self.label_smoothing
        targets = F.one_hot(y, num_classes).to(z_a.dtype) if y.dim() == 1 else y.to(z_a.dtype)
        q = targets * (1 - smoothing) + smoothing / num_classes
        delta_a = (torch.softmax(z_a, 1) - q) / s
        delta_b = (torch.softmax(z_b, 1) - q) / s
        weight_diff = delta_a.T @ h_a - delta_b.T @ h_b
        penalty = weight_diff.square().sum()
        if self.head.bias is not None:
            penalty = penalty + (delta_a.sum(0) - delta_b.sum(0)).square().sum()
        return penalty
