"""Grafting and normalized GD from Novack et al. (ICLR 2023): the large-batch direction with another
step length.

With g_B = (1/k) sum_i grad L_i the large-batch gradient, accumulated over micro-batches exactly as
pseudo_gd does (implicit.py), each step is

    iter_graft, exter_graft   theta <- theta - lr * nu_t * g_B / ||g_B||
    ngd                       theta <- theta - lr * g_B / (||g_B|| + eps)

Grafting (Agarwal et al. 2020, "Disentangling Adaptive Gradient Methods from Learning Rates") takes
the magnitude from one optimizer and the direction from another: here the direction of large-batch
GD and the step length lr * nu_t of small-batch SGD, where nu_t is a small-batch gradient norm:

    iter_graft, norm_source="random_micro"   nu_t = ||grad L_j||, j uniform over the k micro-batches
                                             of the current large batch (Method.shared_rng, a
                                             CPU generator: a host int, no device sync)
    iter_graft, norm_source="mean_micro"     nu_t = (1/k) sum_i ||grad L_i||
    exter_graft                              nu_t = the "grad_norm" an earlier small-batch sgd run
                                             logged at step s(t), the latest logged step <= t

The step is taken by handing .grad = nu_t * g_B / ||g_B|| (ngd: g_B / (||g_B|| + eps)) to the base
optimizer, so ||delta theta|| = lr * nu_t (ngd: lr) holds only with momentum 0 and weight decay 0,
Novack's settings: put them in the Config (with a constant lr schedule, as in the paper). A warning
says so when the optimizer has either; another optimizer than SGD is refused (Method.sgd_only).

Reference: Novack, Kaur, Marwah, Garg, Lipton, arXiv 2211.15853.
**None of the three was released** (the public code rejects IterGraft, ExterGraft and NGD as an
"Invalid test type"); they are reconstructed from the README and code remnants:
* the two norm sources of iter_graft follow the `graft_idx` and `denoise` paths of the remnant
  `GraftCollect`; which one the paper used is unverified, so "random_micro" (default) and
  "mean_micro" are both offered.
* exter_graft's lookup follows the remnant `get_exter_reg`, which reads the table at step
  20 * floor(t / 20) (the original logged every 20 steps): step-aligned, held constant within a
  logging window. Here the table is our own sgd run's steps.parquet (sgd logs "grad_norm", the norm
  of its 128-example step gradient), `norms_path` its run directory or the file. The window is the
  log's stride (config.json's log_every next to the file, else the most common spacing of the
  logged steps); LB step t reads the latest logged step s <= t and needs t < s + stride, so on a
  regular log this is exactly stride * floor(t / stride), and our loop's epoch-boundary spacing
  (logging restarts at every epoch) stays covered. A step the log does not cover (before its first
  row, past its last window, or in a gap) is a UsageError naming the file and the step. The step
  counter t is the method's own (state_dict keeps it, so resume is exact).
* ngd's eps guards the denominator (the README's NGD learning rates, e.g. 0.2626, look like the
  small-batch run's mean step length lr * mean ||g_SB||; unverified).
* Deviation shared with implicit.py: batch_size must be a multiple of micro_batch_size.

Data parallelism: g_B is all-reduced before it is normalized, and the micro-batch norms of every
rank are gathered in the global batch's order, so all ranks take the step length one process
takes with the whole batch (j ranges over the micro-batches of all ranks). ExterGraft refuses a
log from a data-parallel run or from an sgd run whose batch is not micro_batch_size: what it
grafts is the norm of single-process gradients of m examples.

Metrics: "loss", "acc", "grad_norm" (norm of the .grad handed to the optimizer: nu_t for grafting,
~1 for ngd), "lb_grad_norm" (||g_B||), "graft_norm" (nu_t, grafting only), "micro_grad_norm" and
"micro_grad_sq" (mean over micro-batches of ||grad L_i|| and its square).
"""

from __future__ import annotations

import abc
import bisect
import collections
import json
import warnings
from pathlib import Path

import pandas as pd
import torch

from ..data import Batch
from ..distributed import gather_ranks
from ..errors import UsageError
from .base import global_norm, register_method, set_grads
from .implicit import NOVACK, MicroBatchMethod

RECONSTRUCTED = "never released, reconstructed from the README and code remnants"


class NormalizedMethod(MicroBatchMethod):
    """theta <- theta - lr * scale * g_B / denominator(||g_B||), `scale` from `step_length`."""

    sgd_only = True

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, **kwargs):
        super().__init__(model, optimizer, **kwargs)
        if any(g.get("momentum", 0) or g.get("weight_decay", 0) for g in optimizer.param_groups):
            warnings.warn(
                f"method {self.name!r} sets the step length itself and assumes momentum 0 and "
                "weight_decay 0 (Novack et al.); with either, ||delta theta|| is not what it grafts",
                stacklevel=3,
            )

    @abc.abstractmethod
    def step_length(self, lb_norm: torch.Tensor, micro_norms: torch.Tensor) -> dict:
        """{"scale": the norm the handed-over .grad gets, ...extra metrics}."""

    def step(self, batch: Batch) -> dict:
        lb = self.large_batch_gradient(batch)
        # Normalize the global g_B: under data parallelism average it across ranks first.
        set_grads(self.params, lb.grad)
        self.sync_grads()
        lb.grad = [p.grad for p in self.params]
        lb_norm = global_norm(lb.grad)
        # Every rank's micro-batch norms, in the global batch's order: ranks take the same step
        # length, the one a single process takes with the whole batch.
        if lb.micro_norms is not None:
            lb.micro_norms = gather_ranks(lb.micro_norms, self.world)
        extra = self.step_length(lb_norm, lb.micro_norms)
        direction = torch._foreach_mul(lb.grad, extra.pop("scale") / self.denominator(lb_norm))
        set_grads(self.params, direction)
        grad_norm = self.update_norm()  # .grad is the global direction already: no second all-reduce
        self.optimizer.step()
        return self.metrics(
            lb.logits, batch.y, lb.loss, grad_norm=grad_norm, lb_grad_norm=lb_norm, **extra, **lb.diagnostics()
        )

    def denominator(self, lb_norm: torch.Tensor) -> torch.Tensor:
        # A zero g_B gives a zero step rather than 0/0.
        return lb_norm.clamp_min(torch.finfo(lb_norm.dtype).tiny)


@register_method
class IterGraft(NormalizedMethod):
    name = "iter_graft"
    aliases = ("IterGraft",)
    hparams = {"micro_batch_size": 128, "norm_source": "random_micro"}
    choices = {"norm_source": ("random_micro", "mean_micro")}
    uses_micro_norms = True
    reference = (
        f"{NOVACK} IterGraft ({RECONSTRUCTED}; norm source unverified: random_micro or mean_micro); "
        "assumes momentum 0, wd 0"
    )
    color = "#e6ab02"

    def step_length(self, lb_norm, micro_norms):
        if self.hp.norm_source == "mean_micro":
            nu = micro_norms.mean()
        else:  # j from the shared CPU generator: a host int, so indexing does not sync with the device
            nu = micro_norms[int(torch.randint(len(micro_norms), (), generator=self.shared_rng))]
        return {"scale": nu, "graft_norm": nu}


@register_method
class NGD(NormalizedMethod):
    name = "ngd"
    aliases = ("NGD",)
    hparams = {"micro_batch_size": 128, "eps": 1e-12}
    reference = f"{NOVACK} NGD ({RECONSTRUCTED}); eps guards ||g_B||; assumes momentum 0, wd 0"
    color = "#17becf"

    bounds = {**NormalizedMethod.bounds, "eps": ">= 0"}

    def denominator(self, lb_norm):
        return super().denominator(lb_norm + self.hp.eps)

    def step_length(self, lb_norm, micro_norms):
        return {"scale": 1.0}


# ---------------------------------------------------------------------- external grafting


class NormLog:
    """An sgd run's logged gradient norms, looked up step-aligned (see the module docstring)."""

    def __init__(self, norms_path: str, micro_batch_size: int):
        path = Path(norms_path)
        file = path / "steps.parquet" if path.is_dir() else path
        if not file.is_file():
            raise UsageError(
                f"norms_path {norms_path!r} for method 'exter_graft': no {file}; give the run "
                "directory of an earlier sgd run (it holds steps.parquet) or that file"
            )
        self.check_origin(file, micro_batch_size)
        try:
            table = pd.read_parquet(file)
        except Exception as e:  # pyarrow raises a variety of types for a file that is not parquet
            raise UsageError(
                f"norms log {file} for method 'exter_graft' is not a readable parquet file ({type(e).__name__})"
            ) from None
        missing = sorted({"step", "grad_norm"} - set(table.columns))
        if missing:
            raise UsageError(
                f"norms log {file} for method 'exter_graft' lacks the column {missing[0]!r}; "
                "it needs 'step' and 'grad_norm' (an sgd run's steps.parquet has both)"
            )
        table = table[["step", "grad_norm"]].dropna().drop_duplicates("step", keep="last").sort_values("step")
        if len(table) == 0:
            raise UsageError(f"norms log {file} for method 'exter_graft' holds no logged grad_norm")
        self.file = file
        self.steps = [int(s) for s in table["step"]]
        self.norms = [float(v) for v in table["grad_norm"]]
        self.stride = self._stride(file)

    @staticmethod
    def check_origin(file: Path, micro_batch_size: int) -> None:
        """The log must hold what is grafted: norms of single-process gradients of m examples. Its
        run's config.json and summary.json, where they lie next to it, say so or not."""
        config, summary = (file.parent / name for name in ("config.json", "summary.json"))
        if summary.is_file():
            world = json.loads(summary.read_text()).get("world_size", 1)
            if world != 1:
                raise UsageError(
                    f"norms log {file} for method 'exter_graft' comes from a run on {world} "
                    "data-parallel ranks; graft from a single-process sgd run"
                )
        if config.is_file():
            batch = json.loads(config.read_text()).get("batch_size")
            if batch is not None and batch != micro_batch_size:
                raise UsageError(
                    f"norms log {file} for method 'exter_graft' holds gradient norms of batches of "
                    f"{batch}, not of micro_batch_size={micro_batch_size}; graft from an sgd run with "
                    f"batch_size {micro_batch_size}"
                )

    def _stride(self, file: Path) -> int:
        config = file.parent / "config.json"
        if config.is_file():
            log_every = json.loads(config.read_text()).get("log_every")
            if isinstance(log_every, int) and log_every > 0:
                return log_every
        gaps = collections.Counter(b - a for a, b in zip(self.steps, self.steps[1:]))
        if not gaps:
            raise UsageError(
                f"norms log {self.file} for method 'exter_graft' has a single logged step and no "
                "config.json next to it, so its logging stride is unknown"
            )
        top = max(gaps.values())
        return max(gap for gap, count in gaps.items() if count == top)

    def row(self, t: int) -> int:
        """Index of the row LB step t uses; UsageError where the log does not cover t."""
        j = bisect.bisect_right(self.steps, t) - 1
        if j < 0 or t - self.steps[j] >= self.stride:
            have = f"steps {self.steps[0]}..{self.steps[-1]} every {self.stride}"
            raise UsageError(
                f"norms log {self.file} has no grad_norm for step {t} (exter_graft reads the "
                f"latest logged step <= t within one stride; the log has {have}): use a log of a "
                "run at least as long as this one"
            )
        return j


@register_method
class ExterGraft(NormalizedMethod):
    name = "exter_graft"
    aliases = ("ExterGraft",)
    hparams = {"micro_batch_size": 128, "norms_path": ""}
    reference = (
        f"{NOVACK} ExterGraft ({RECONSTRUCTED}); norms from our sgd run's steps.parquet, "
        "step-aligned; assumes momentum 0, wd 0"
    )
    color = "#8c564b"
    bench_rows = ()  # it reads an earlier run's norms file

    @classmethod
    def validate(cls, hp: dict) -> None:
        super().validate(hp)
        if not hp["norms_path"]:
            raise UsageError(
                "method 'exter_graft' needs norms_path: the run directory of an earlier sgd run "
                "(or its steps.parquet), whose logged grad_norm sets the step length"
            )
        NormLog(hp["norms_path"], hp["micro_batch_size"])

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, **kwargs):
        super().__init__(model, optimizer, **kwargs)
        self.log = NormLog(self.hp.norms_path, self.hp.micro_batch_size)
        p = self.params[0]
        self.norm_table = torch.tensor(self.log.norms, dtype=p.dtype, device=p.device)
        self.t = 0

    def step(self, batch: Batch) -> dict:
        # Checked on host ints before anything moves; indexing the device table by an int does not sync.
        self.row = self.log.row(self.t)
        out = super().step(batch)
        self.t += 1
        return out

    def step_length(self, lb_norm, micro_norms):
        nu = self.norm_table[self.row]
        return {"scale": nu, "graft_norm": nu}

    def state_dict(self) -> dict:
        return {"step": self.t}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["step"])
