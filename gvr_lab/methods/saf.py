"""SAF and MESA: sharpness-aware training for free, by a trajectory loss on the outputs.

Du, Zhou, Feng, Tan, Zhou, "Sharpness-Aware Training for Free", NeurIPS 2022, arXiv 2205.14083;
official code AngusDujw/SAF (`SAF_train.py`, `MESA_train.py`).

Idea: SAM's sharpness term is about rho ||grad L||, and one SGD step lowers the loss of a batch by
about lr ||grad L||^2, so penalizing how fast the outputs move along the weight trajectory acts like
penalizing sharpness, with no extra gradient computation. A plain loss difference would cancel the
CE term, so the penalty is a temperature-softened KL divergence to outputs from the past:

    L = CE(f_w(x), y) + lam * tau^2 * (1/|B|) sum_i KL( softmax(t_i / tau) || softmax(f_w(x_i) / tau) )

(tau^2 is in the official code, not in the paper's eq. 8). The past outputs t_i are the target p and
the current ones q, i.e. sum_c p_c (log p_c - log q_c), as the code's F.kl_div(log q, p).

SAF: t_i are the logits sample i received `lag` epochs ago (E-tilde in the paper, `minus_epoch` in
the code), under that epoch's augmentation, read from a memory indexed by the sample's dataset
index (Batch.index). Each epoch e writes slot e mod (lag + 1) and reads slot (e - lag) mod (lag + 1).

MESA: t_i = f_v(x_i) on the current batch, from an exponential moving average of the weights,
v <- d v + (1 - d) w after every optimizer step (d = `ema_decay`), computed by one extra no-grad
forward (about 15% more compute in the paper).

The term applies at epochs e > kl_start_epoch (the code's strict `kl_start_epoch < epoch`, whose
name the hyper-parameter keeps); SAF's also needs stored logits of epoch e - lag, so it starts at
max(kl_start_epoch, lag) + 1 (see below).

Defaults: tau = 5, kl_start_epoch = 5 (paper section 4.1 and code); lam = 0.3 for SAF and 0.8 for MESA
(paper section 4.1; the code's defaults are 0.16 and 0.3); lag = 3 (paper and code; the ImageNet
run.sh uses 2); ema_decay = 0.9998 (the code's timm ModelEmaV2 default; the paper says d in (0.9, 1)).

SAF memory. Logits are kept on the training device in the dtype of the (upcast) logits: fp32, fp64
in tests. Size (N + 1) (lag + 1) C 4 bytes plus an int32 stamp per slot, N = largest dataset index
+ 1 (indices refer to the full split, also under train_subset): CIFAR-100 with lag = 3 is 76.3 MiB
(+0.8 MiB of stamps), with lag = 2 57.2 MiB, the paper's "57 MB"; CIFAR-10 with lag = 3 7.6 MiB.
The dataset size is not known to a method and reading the largest index on the host inside a step
would sync, so the largest index seen is tracked on the device and the memory grows to it in
start_epoch (one sync per epoch). Epoch 0 therefore stores nothing, and a sample whose index
exceeds every index seen in earlier epochs (possible when drop_last left it out) is written to a
scratch row that is never read. Each slot carries the epoch that wrote it, and a row enters the KL
only if its slot was written exactly `lag` epochs ago; other rows contribute 0 to the batch mean.

Deviations from the official code, and why:
* SAF's term starts at epoch max(kl_start_epoch, lag) + 1: the code starts it at kl_start_epoch + 1
  and, when kl_start_epoch < lag, reads never-written zero slots (uniform targets) for the first epochs, and
  reads epoch-0 logits, which are not stored here. Identical for the defaults (first at epoch 6,
  reading epoch 3).
* A row whose slot was not written `lag` epochs ago (left out by drop_last then, or first seen
  later) contributes 0; the code reads the stale slot from lag + 1 epochs earlier, or zeros.
* The code's memory is a CPU numpy array with a hard-coded 15,000,000 rows; here it is on the
  device, grown to the indices seen.
* Data parallelism (the code's DDP path shares nothing): every rank keeps the whole memory, and
  the rows each rank wrote are merged across ranks at the end of every epoch (end_epoch), so a
  sample finds its past whichever rank it lands on and the checkpoint holds every rank's rows.
* log_softmax instead of the code's softmax(...).log() (same value, stable for large tau-scaled gaps).
* No end epoch: the code's kl_end_epoch (300 for SAF, 360 for MESA) lies beyond every schedule the
  paper ran.
* MESA: the code computes the teacher forward at every step; here only when the term applies. The
  teacher is kept in eval mode, as timm's ModelEmaV2 is in the code: it normalizes with its EMA'd
  running BN statistics while the student uses batch statistics, so with BN layers the KL is not 0
  even when the weights agree. Floating-point parameters and buffers are averaged, as
  ModelEmaV2 does; integer buffers (num_batches_tracked) are copied rather than averaged and
  truncated.

Metrics: "loss" and "acc" (CE on batch.x), "penalty" (the tau^2 KL term before lam; 0 while
inactive), "grad_norm" (norm of the update gradient of CE + lam * penalty); SAF also "past_frac",
the fraction of the batch with a stored past (only while the term applies).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..distributed import all_reduce_, average_buffers
from ..errors import UsageError
from ..quant import adopt_activation_init
from .base import Method, register_method, upcast


def softened_kl(
    logits: torch.Tensor, target_logits: torch.Tensor, tau: float, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """tau^2 (1/B) sum_i w_i KL(softmax(target_i / tau) || softmax(logits_i / tau)); w_i = 1 by default."""
    log_q = F.log_softmax(upcast(logits) / tau, dim=1)
    log_p = F.log_softmax(upcast(target_logits) / tau, dim=1)
    per_row = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=1)
    if weight is not None:
        per_row = per_row * weight
    return tau**2 * per_row.mean()


class OutputTrajectoryMethod(Method):
    """What SAF and MESA share: a softened KL to past outputs, on from epoch kl_start_epoch + 1."""

    bounds = {"lam": ">= 0", "tau": "> 0"}

    @classmethod
    def term_share(cls, rows) -> float:
        """The term is on or off for a whole epoch, and logs a penalty of 0 while off: the share of
        the run's evaluations (epochs) whose mean penalty is > 0."""
        return float((rows["train_penalty"].fillna(0) > 0).mean())

    @property
    def kl_start(self) -> int:
        """The term applies at epochs > this (the code's strict `kl_start_epoch < epoch`)."""
        return self.hp.kl_start_epoch


@register_method
class SAF(OutputTrajectoryMethod):
    name = "saf"
    hparams = {"lam": 0.3, "tau": 5.0, "kl_start_epoch": 5, "lag": 3}
    reference = (
        "Du et al. NeurIPS 2022 (AngusDujw/SAF): KL to each sample's logits of `lag` epochs ago; memory on "
        "the device grown per epoch, rows without that past count 0, starts after max(kl_start_epoch, lag)"
    )
    bounds = {**OutputTrajectoryMethod.bounds, "lag": ">= 1"}
    term, color = "KL to logits of `lag` epochs ago", "#cc78bc"
    epoch_state = "each example's logits of `lag` epochs ago, its KL term from epoch kl_start_epoch + 1"

    def __init__(self, model, optimizer, **kw):
        super().__init__(model, optimizer, **kw)
        self.max_index: torch.Tensor | None = None  # largest Batch.index seen, on the device
        self.rows = 0  # rows the memory should have: max_index + 1 as of the last start_epoch
        # (rows + 1, lag + 1, C) logits and (rows + 1, lag + 1) writing epochs (-1: never); the
        # last row is scratch for indices beyond the rows allocated so far.
        self.memory: torch.Tensor | None = None
        self.stamp: torch.Tensor | None = None

    def start_epoch(self, epoch: int) -> None:
        super().start_epoch(epoch)
        if self.max_index is not None:
            self.rows = int(self.max_index) + 1  # the once-per-epoch sync

    def end_epoch(self, epoch: int) -> None:
        """Under data parallelism, give every rank the rows the others wrote this epoch.

        Each rank sees its own slice of every batch, and a sample lands on another rank `lag`
        epochs later, so per-rank memories would hold a past for about 1/world_size of a batch.
        Every sample is in at most one rank's slice per epoch, so a sum of the rows each rank
        wrote, masked to those rows, is the merged slot; rows nobody wrote were merged when they
        were written and agree already. The largest index is agreed on too, so the memories grow
        to the same shape. One collective per epoch for the indices, two for the slot.
        """
        if not self.world.active:
            return
        if self.max_index is not None:
            all_reduce_([self.max_index], self.world, "max")
        if self.memory is None:
            return
        slot = epoch % (self.hp.lag + 1)
        written = self.stamp[:, slot] == epoch
        logits = self.memory[:, slot] * written.unsqueeze(1).to(self.memory.dtype)
        writers = written.to(torch.int32)
        all_reduce_([logits], self.world, "sum")
        all_reduce_([writers], self.world, "sum")
        merged = writers > 0
        self.memory[merged, slot] = logits[merged]
        self.stamp[merged, slot] = epoch

    def grow(self, logits: torch.Tensor) -> None:
        """Memory for self.rows rows (plus scratch), keeping what the old one held."""
        kept = 0 if self.memory is None else self.memory.shape[0] - 1
        memory = logits.new_zeros(self.rows + 1, self.hp.lag + 1, logits.shape[1], dtype=upcast(logits).dtype)
        stamp = torch.full((self.rows + 1, self.hp.lag + 1), -1, dtype=torch.int32, device=logits.device)
        if kept:
            memory[:kept], stamp[:kept] = self.memory[:kept], self.stamp[:kept]
        self.memory, self.stamp = memory, stamp

    def step(self, batch):
        self.require_epoch()
        if batch.index is None:
            raise UsageError(
                f"method {self.name!r} needs Batch.index, the dataset index of each row (Batch(x, y, index=...)): "
                "it keeps each example's logits under its index"
            )
        self.zero_grad()
        logits = self.forward(batch.x)
        loss = self.loss(logits, batch.y)
        batch_max = batch.index.max()
        self.max_index = batch_max if self.max_index is None else torch.maximum(self.max_index, batch_max)
        if self.rows > (0 if self.memory is None else self.memory.shape[0] - 1):
            self.grow(logits)
        total, extra = loss, {"penalty": 0.0}
        if self.memory is not None:
            scratch = self.memory.shape[0] - 1
            rows = batch.index.clamp(max=scratch)
            if self.epoch > max(self.kl_start, self.hp.lag):
                read = (self.epoch - self.hp.lag) % (self.hp.lag + 1)
                valid = (self.stamp[rows, read] == self.epoch - self.hp.lag).to(self.memory.dtype)
                penalty = softened_kl(logits, self.memory[rows, read], self.hp.tau, valid)
                total = loss + self.hp.lam * penalty
                extra = {"penalty": penalty, "past_frac": valid.mean()}
            write = self.epoch % (self.hp.lag + 1)
            self.memory[rows, write] = upcast(logits.detach())
            self.stamp[rows, write] = self.epoch
            self.stamp[scratch] = -1  # the scratch row never holds a past
        total.backward()
        grad_norm = self.update_norm()
        self.optimizer.step()
        return self.metrics(logits, batch.y, loss, grad_norm=grad_norm, **extra)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "max_index": self.max_index,
            "rows": self.rows,
            "memory": self.memory,
            "stamp": self.stamp,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("epoch", "max_index", "rows", "memory", "stamp"):
            setattr(self, key, state[key])


@register_method
class MESA(OutputTrajectoryMethod):
    name = "mesa"
    hparams = {"lam": 0.8, "tau": 5.0, "kl_start_epoch": 5, "ema_decay": 0.9998}
    bounds = {**OutputTrajectoryMethod.bounds, "ema_decay": "in [0, 1]"}
    passes = "1 + a no-grad teacher forward"
    reference = (
        "Du et al. NeurIPS 2022 (AngusDujw/SAF MESA_train.py): KL to an EMA teacher in eval mode "
        "(running BN statistics, as timm's ModelEmaV2); teacher forward only while the term applies"
    )
    term, color = "KL to the EMA teacher", "#f0a6d8"
    epoch_state = "its KL term from epoch kl_start_epoch + 1"

    def __init__(self, model, optimizer, **kw):
        super().__init__(model, optimizer, **kw)
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        self.quantizers_adopted = False

    def end_epoch(self, epoch: int) -> None:
        """The teacher's running BN statistics are EMAs of each rank's own; averaged across ranks
        here, as the loop averages the student's, so every rank (and the checkpoint) holds one teacher."""
        average_buffers(self.teacher, self.world)

    def step(self, batch):
        self.require_epoch()
        self.zero_grad()
        logits = self.forward(batch.x)
        loss = self.loss(logits, batch.y)
        if not self.quantizers_adopted:
            # LSQ initializes the student's activation step sizes in its first forward, just now;
            # the teacher, copied before, starts from them (a no-op without LSQ or after a resume).
            adopt_activation_init(self.teacher, self.model)
            self.quantizers_adopted = True
        total, penalty = loss, 0.0
        if self.epoch > self.kl_start:
            with torch.no_grad(), self.autocast():
                target = self.teacher(batch.x)
            penalty = softened_kl(logits, target, self.hp.tau)
            total = loss + self.hp.lam * penalty
        total.backward()
        grad_norm = self.update_norm()
        self.optimizer.step()
        self.update_teacher()
        return self.metrics(logits, batch.y, loss, grad_norm=grad_norm, penalty=penalty)

    @torch.no_grad()
    def update_teacher(self) -> None:
        """v <- d v + (1 - d) w over parameters and floating-point buffers; other buffers copied."""
        pairs = list(
            zip(
                [*self.teacher.parameters(), *self.teacher.buffers()], [*self.model.parameters(), *self.model.buffers()]
            )
        )
        floats = [(v, w) for v, w in pairs if v.is_floating_point()]
        others = [(v, w) for v, w in pairs if not v.is_floating_point()]
        if floats:
            torch._foreach_lerp_([v for v, _ in floats], [w for _, w in floats], 1.0 - self.hp.ema_decay)
        if others:
            torch._foreach_copy_([v for v, _ in others], [w for _, w in others])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.teacher.load_state_dict(state["teacher"])
