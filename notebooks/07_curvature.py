# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python (gvr_lab)
#     language: python
#     name: gvr_lab
# ---

# %% [markdown]
# # 07 · Sharpness and loss landscapes: what each method does to the Hessian, and does it explain generalization?
#
# **Question.** SAM and vSAM minimize a sharpness proxy, GVR penalizes the gradient's variance
# over augmented views, large batches are said to find sharper minima than small ones and the
# gradient-norm penalty (LB+GN) to undo that. Measured on the same model and data:
#
# 1. *Which loss?* The Hessian of the loss the optimizer descended (batch norm with batch
#    statistics, `bn="train"`) or of the function the trained model computes at test time (running
#    statistics, `bn="eval"`)? Both are measured; for SGD without momentum at a constant learning
#    rate, linear stability bounds the top eigenvalue of the loss it trains on by about 2/lr.
# 2. *Lower curvature, or just a different training loss?* Each method against its baseline at the
#    first checkpoint where its training loss falls below a common level L* (`matched_loss`), and at
#    the end, seed by seed.
# 3. *Does sharpness predict generalization here?* Kendall's tau between each measure and the
#    generalization gap over every run and checkpoint, with a bootstrap interval over runs (Jiang et
#    al. 2019; Andriushchenko et al. 2023 found adaptive sharpness a weak predictor on modern nets).
#
# Four measures (docs/curvature.md defines each, with its reference): the top Hessian eigenvalue
# λ1, the trace, the adaptive (|w|-scaled) worst-case sharpness in a rho ball, and the
# filter-normalized curvature; the last two do not change when a ReLU network's layers are
# rescaled against each other, which moves λ1 and the trace without changing the function. Then, at
# the final weights: the line from SGD's weights to SAM's, their 2-D loss surfaces, and vSAM's
# Lemma 1 (||PSF|| <= rho * lambda_max).
#
# Two protocols, each with equal optimizer steps: SGD, GVR, SAM and vSAM at `batch_size` with
# momentum 0.9, weight decay and a cosine learning rate; SB, LB and LB+GN as Novack et al.
# (momentum 0, weight decay 0, constant learning rate, LB = `lb_batch / sb_batch` accumulated
# micro-batches with ghost batch norm). Seed s gives every run the same initial weights and data
# order, so methods are compared seed by seed. Every run evaluates `checkpoints` times, evenly over
# its steps, and keeps each checkpoint; each is measured in both batch-norm modes on the same
# `rows` seeded training rows (unaugmented), in fp32 (gvr_lab/landscape.py, gvr_lab/measure.py).
#
# **Use.** Pick a preset in the first line of the parameters cell (`smoke`: seconds on synthetic
# data; `cpu`: Fashion-MNIST, tiny_cnn with batch norm, 5 seeds, the committed figures; `gpu`:
# CIFAR-10, ResNet-18, 10 epochs, not yet measured; `paper`: CIFAR-10, ResNet-18, 200 epochs, B =
# 5120 for LB) and run all; a parameter set in a cell below the parameters cell overrides the
# preset. Headless: `gvr-lab run notebooks/07_curvature.py --preset cpu`. The measurements are kept
# in each run's directory: a rerun with other tables' parameters (`matched_loss`, `bootstrap`)
# and `--runs-root` pointing at the same runs reads them back instead of measuring again.

# %% tags=["parameters"]
preset: str = "cpu"  # smoke | cpu | gpu | paper
dataset: str = "fashion_mnist"  # see gvr_lab.list_datasets()
model: str = "tiny_cnn"  # see gvr_lab.list_models()
model_args: dict = {"bn": True}  # tiny_cnn with batch norm, the layer whose two modes give two losses
train_subset: int = 8192  # training examples drawn with the seed, 0 for all
steps: int = 240  # optimizer steps of SGD, GVR, SAM and vSAM
novack_steps: int = 240  # optimizer steps of SB, LB and LB+GN
checkpoints: int = 10  # evaluations of each run, evenly over its steps; each checkpoint kept and measured
batch_size: int = 128  # SGD, GVR, SAM, vSAM
lr: float = 0.05  # their peak learning rate, cosine per step, momentum 0.9, weight decay 5e-4
method_args: dict = {
    "gvr": {"target": "fc", "penalty": "closed_form", "alpha": 0.01},
    "sam": {"rho": 0.05},
    "vsam": {"rho": 0.05, "warmup_epochs": 1, "window": 10, "blocks": 2},
}  # per method
sb_batch: int = 32  # SB's batch, also the micro-batch size m of LB and LB+GN
lb_batch: int = 256  # LB's and LB+GN's batch
novack_lr: float = 0.1  # SB, LB and LB+GN: constant, momentum 0, weight decay 0
gn_lam: float = 0.01  # LB+GN's lambda
gn_hvp: str = "exact"  # LB+GN's Hessian-vector product: exact (double backward, Novack's) or fd
seeds: list = [0, 1, 2, 3, 4]  # paired: seed s is one initialization and data order for every method
matched_loss: float = 1.0  # L*, compared at each run's first checkpoint whose training loss is below it
# seeded training rows of every measurement, a multiple of each run's forward batch; a measurement's
# time is about proportional to its rows, and at 256 the cpu preset needed about 2.5 hours of the
# 2-core machine (5,210 s of training and 12,517 s of measuring, summed), over its 2-hour budget
rows: int = 128
lanczos_steps: int = 30  # Lanczos steps at most for the top eigenvalue
lanczos_tol: float = 1e-3  # Lanczos stops once the residual estimate is below this times the spectral norm
trace_probes: int = 16  # Hutchinson probes of the trace
rho: float = 0.1  # radius of the adaptive sharpness ball, in |w|-scaled coordinates
sharpness_steps: int = 8  # projected gradient ascent steps of the adaptive sharpness
directions: int = 8  # filter-normalized directions of the filter-normalized curvature
bootstrap: int = 2000  # bootstrap resamples (of runs) of Kendall's tau
interp_points: int = 21  # points on t in [0, 1] between SGD's and SAM's weights
slice_points: int = 21  # points per axis of the 2-D slices, on [-1, 1]
slice_seed: int = 0  # the seed whose SGD and SAM runs are sliced
psf_batches: int = 6  # training batches of vSAM's Lemma 1 check, per seed
device: str = "auto"  # auto, cpu or cuda
runs_root: str = ""  # training runs; empty: runs/<preset>/curvature/<digest of the parameters>
fig_root: str = ""  # figures and tables; empty: figures/ at the cpu preset, else runs/<preset>/figures

# %%
import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

import gvr_lab as gl
from gvr_lab import measure, plots, stats
from gvr_lab.training import resolve_device

study = gl.Study(
    "curvature",
    globals(),
    presets={
        "smoke": {
            "dataset": "synthetic",
            "train_subset": 64,
            "steps": 32,
            "novack_steps": 32,
            "checkpoints": 2,
            "batch_size": 16,
            "lr": 0.02,
            "sb_batch": 8,
            "lb_batch": 32,
            "seeds": [0],
            "method_args": {
                "gvr": {"target": "fc", "penalty": "closed_form", "subset": 4},
                "vsam": {"warmup_epochs": 1, "window": 2, "blocks": 1},
            },
            "matched_loss": 100.0,
            "rows": 16,
            "lanczos_steps": 4,
            "trace_probes": 2,
            "sharpness_steps": 1,
            "directions": 2,
            "bootstrap": 20,
            "interp_points": 5,
            "slice_points": 5,
            "psf_batches": 2,
            "device": "cpu",
        },
        "cpu": {"device": "cpu"},
        "gpu": {
            "dataset": "cifar10",
            "model": "resnet18",
            "model_args": {},
            "train_subset": 0,
            "steps": 3900,
            "novack_steps": 1000,
            "lr": 0.1,
            "sb_batch": 128,
            "lb_batch": 1024,
            "method_args": {"gvr": {}, "sam": {}, "vsam": {"warmup_epochs": 1}},
            "rows": 2048,
            "lanczos_steps": 60,
            "trace_probes": 50,
            "directions": 20,
            "sharpness_steps": 20,
            "slice_points": 31,
            "psf_batches": 16,
        },
        "paper": {
            "dataset": "cifar10",
            "model": "resnet18",
            "model_args": {},
            "train_subset": 0,
            "steps": 78000,
            "novack_steps": 6250,
            "lr": 0.1,
            "sb_batch": 128,
            "lb_batch": 5120,
            "method_args": {"gvr": {}, "sam": {}, "vsam": {}},
            "rows": 4096,
            "lanczos_steps": 100,
            "trace_probes": 100,
            "directions": 20,
            "sharpness_steps": 20,
            "bootstrap": 10000,
            "interp_points": 41,
            "slice_points": 51,
            "psf_batches": 50,
        },
    },
    outputs={
        "curvature_over_training": "λ1, trace, adaptive sharpness and filter-normalized curvature against step, "
        "batch norm in train and in eval mode, with 2/lr of the runs without momentum",
        "measures": "every run, checkpoint, measure and batch-norm mode, with the run's training and test loss and "
        "accuracy there (tidy)",
        "summary": "each method minus its baseline at matched training loss L* and at the end: paired differences "
        "of each measure and of test accuracy",
        "kendall": "Kendall's tau of each measure with the generalization gaps over every run and checkpoint, "
        "95% CI resampling runs",
        "measure_vs_gap": "each measure against train − test accuracy at every run and checkpoint",
        "interpolation": "training loss and accuracy on the line from SGD's to SAM's weights, same seed",
        "slices": "2-D filter-normalized loss slices around SGD's and SAM's weights, shared levels",
        "psf_bound": "vSAM's Lemma 1: the PSF norm against rho times the batch Hessian's largest absolute eigenvalue",
    },
)

# %%
if slice_seed not in seeds:
    raise gl.UsageError(f"slice_seed {slice_seed} is not among the seeds {seeds}")
if checkpoints < 2:
    raise gl.UsageError(f"checkpoints must be >= 2 (curvature over training), got {checkpoints}")


def evenly(total: int) -> dict:
    """Evaluations every ceil(total / checkpoints) steps and at the last, each checkpoint kept."""
    every = -(-total // checkpoints)
    return dict(steps=total, eval_every=every, keep_checkpoints=list(range(1, -(-total // every) + 1)))


# eval_train: the clean training loss and accuracy on all training rows at each evaluation, which
# the matching and the generalization gaps read
common = dict(dataset=dataset, model=model, model_args=model_args, train_subset=train_subset, eval_train=True)
common["device"] = device
sam_family = dict(common, **evenly(steps), batch_size=batch_size, lr=lr)
novack = dict(common, **evenly(novack_steps), lr=novack_lr, momentum=0.0, weight_decay=0.0, schedule="constant")
micro = dict(micro_batch_size=sb_batch)
names = {"SGD": "sgd", "GVR": "gvr", "SAM": "sam", "vSAM": "vsam"}
configs = gl.grid_configs(
    sam_family,
    [dict(method=m, method_args=method_args.get(m, {}), label=name) for name, m in names.items()],
    seeds,
    study.runs_root,
) + gl.grid_configs(
    novack,
    [
        dict(method="sgd", batch_size=sb_batch, label="SB"),
        dict(method="pseudo_gd", batch_size=lb_batch, method_args=micro, label="LB"),
        dict(method="reg_loss", batch_size=lb_batch, label="LB+GN", method_args=dict(micro, lam=gn_lam, hvp=gn_hvp)),
    ],
    seeds,
    study.runs_root,
)
gl.train_configs(configs)

# %% [markdown]
# Every kept checkpoint of every run, measured twice on the same `rows` seeded training rows: with
# batch norm in train mode, on batches of as many rows as one of the run's training forward passes
# (the batch; LB's and LB+GN's micro-batch, ghost batch norm), so each batch is normalized with its
# own statistics as in the run's steps; and in eval mode, with the running statistics. Dropout is
# off in both, and the rows are not augmented. On a CPU the runs are measured a process per core;
# the records stay in each run's directory (`measures-*.json`).

# %%
where = resolve_device(device)
order = [*names, "SB", "LB", "LB+GN"]
runs = plots.ordered(study.load_runs(), "label", order)
settings = dict(
    rows=rows,
    trace_samples=trace_probes,
    rho=rho,
    sharpness_steps=sharpness_steps,
    directions=directions,
    max_iter=lanczos_steps,
    tol=lanczos_tol,
)
records = pd.DataFrame(measure.measure_runs(list(dict.fromkeys(runs["run_dir"])), device=where, **settings))
history = runs.sort_values("step", kind="stable")
history = history.assign(evaluation=history.groupby("run_dir").cumcount() + 1)
wide = study.plotted(plots.ordered(records.merge(history, on=["run_dir", "evaluation"]), "label", order))
wide = wide.assign(
    acc_gap=100 * (wide["train_eval_acc"] - wide["test_acc"]), loss_gap=wide["test_loss"] - wide["train_eval_loss"]
)
accuracy = max(lanczos_tol, math.sqrt(torch.finfo(torch.float32).eps))
print(
    f"{len(records)} measurements of {records['rows'].iloc[0]} rows: median {records['seconds'].median():.1f} s and "
    f"{records['hvps'].median():.0f} Hessian-vector products each, {records['seconds'].sum() / 60:.1f} min in all; "
    f"λ1 converged (residual <= {accuracy:.1e} ||H||) in {100 * records['converged'].mean():.0f}% of them"
)

# %%
measures = ["lambda_1", "trace", "adaptive_sharpness", "fn_curvature"]
renamed = {"label": "method", "train_eval_loss": "train_loss", "train_eval_acc": "train_acc"}
tidy = wide.drop(columns=["method", "train_loss", "train_acc"]).rename(columns=renamed)
tidy = tidy.melt(
    id_vars=["method", "seed", "step", "train_loss", "train_acc", "test_loss", "test_acc", "bn"],
    value_vars=["loss", *measures],
    var_name="measure",
)
columns = ["method", "seed", "step", "train_loss", "train_acc", "test_loss", "test_acc", "measure", "bn", "value"]
study.save_data(tidy[columns].to_dict("records"), "measures")

# %% [markdown]
# `measures.csv`, one row per run, checkpoint, measure and batch-norm mode: `method` is the run's
# label (SB and SGD are both the sgd method), `train_loss` and `train_acc` the clean training loss
# and accuracy on all the run's training rows in eval mode (`train_eval_loss`, `train_eval_acc`:
# no augmentation, unlike the running loss the optimizer logs), `test_loss` and `test_acc` the test
# set's, and `measure` one of `loss` (L on the measured rows in that mode), `lambda_1`, `trace`,
# `adaptive_sharpness`, `fn_curvature`.
#
# Over training, in both modes. The dashed line is 2/lr for the runs trained by SGD without
# momentum at a constant learning rate (SB, LB, LB+GN): a top eigenvalue of the loss they descend
# far above it would make their steps diverge along that direction, so the mode whose λ1 respects
# it is the loss they trained on.

# %%
momentum_free = wide[(wide["momentum"] == 0) & (wide["schedule"] == "constant")]
bounds = {2 / rate: list(dict.fromkeys(group["label"])) for rate, group in momentum_free.groupby("lr")}
titles = {
    "lambda_1": "λ1 (top Hessian eigenvalue)",
    "trace": f"Hessian trace (Hutchinson, {trace_probes} probes)",
    "adaptive_sharpness": f"adaptive sharpness (rho {rho:g})",
    "fn_curvature": f"filter-normalized curvature ({directions} directions)",
}
modes = {"train": "batch norm in train mode: the loss trained", "eval": "batch norm in eval mode: the function tested"}
fig, axes = plt.subplots(len(measures), 2, figsize=(11, 3.1 * len(measures)), sharex=True)
axes[0, 1].sharey(axes[0, 0])  # λ1 of both modes on one scale, against 2/lr
for i, name in enumerate(measures):
    logy = bool((wide[name] > 0).all())
    for j, bn in enumerate(modes):
        ax = axes[i, j]
        if name == "lambda_1":
            for bound, labels in bounds.items():
                shown = f"2/lr = {bound:g} ({', '.join(labels)})"
                ax.axhline(bound, color="0.3", linestyle="--", linewidth=1, label=shown)
        plots.curves(wide[wide["bn"] == bn], "step", name, ax=ax, logy=logy, legend=(i, j) == (0, 1))
        ax.set_ylabel(titles[name] if j == 0 else "", fontsize=9)
        ax.set_title(modes[bn] if i == 0 else "")
        if i < len(measures) - 1:
            ax.set_xlabel("")
        if logy:
            plots.plain_log_ticks(ax)
fig.suptitle(f"on {rows} seeded training rows at each kept checkpoint")
study.save_figure(fig, "curvature_over_training", wide)
for bn in modes:
    ratio = (momentum_free["lambda_1"] * momentum_free["lr"] / 2)[momentum_free["bn"] == bn]
    if len(ratio):
        print(
            f"batch norm in {bn} mode: λ1 above 2/lr at {100 * (ratio > 1).mean():.0f}% of the {len(ratio)} "
            f"checkpoints of the runs without momentum (median λ1 / (2/lr) = {ratio.median():.2f})"
        )

# %% [markdown]
# **Matched training loss.** Each method against its baseline (GVR, SAM and vSAM against SGD; LB
# against SB; LB+GN against LB), seed by seed: at the first checkpoint at which the run's training
# loss (`train_eval_loss`: all its training rows, eval mode, no augmentation, the clean loss rather
# than the running average the optimizer logs) is below L* = `matched_loss`, and at the end. A pair
# where either run never falls below L* is left out (the `at` column counts the pairs).

# %%
baselines = {"GVR": "SGD", "SAM": "SGD", "vSAM": "SGD", "LB": "SB", "LB+GN": "LB"}
reached = plots.first_below(wide, "train_eval_loss", matched_loss, by=["run_dir", "bn"])
final = wide.sort_values("step", kind="stable").groupby(["run_dir", "bn"], sort=False).tail(1)
last_losses = final.groupby("label", sort=False)["train_eval_loss"].max()
below = reached[reached["bn"] == "eval"].groupby("label", sort=False)
print(
    f"the largest final training loss of a run: {last_losses.max():.3f} ({last_losses.idxmax()}); below L* = "
    f"{matched_loss:g} by their end, and the mean step where they first were: "
    + ", ".join(f"{label} {len(r)}/{len(seeds)} at {r['step'].mean():.0f}" for label, r in below)
)


def paired(frame: pd.DataFrame, label: str, baseline: str, column: str, scale: float = 1.0):
    """(seeds, method's values, baseline's values) of `column` on the seeds both have."""

    def values(name):
        arm = frame[frame["label"] == name]
        return dict(zip(arm["seed"], scale * arm[column]))

    return stats.paired_differences(values(label), values(baseline))


compared = {**{name: (name, 1.0) for name in measures}, "test_acc": ("test_acc", 100.0)}
summary = []
for label, baseline in baselines.items():
    for point, frame in ((f"L* = {matched_loss:g}", reached), ("end", final)):
        for bn in modes:
            here = frame[frame["bn"] == bn]
            paired_seeds, method_steps, baseline_steps = paired(here, label, baseline, "step")
            n = len(paired_seeds)
            at = f"step {method_steps.mean():.0f} vs {baseline_steps.mean():.0f} ({n} pair{'s' if n > 1 else ''})"
            row = {"comparison": f"{label} − {baseline}", "at": f"{point}: {at if paired_seeds else 'no pair'}"}
            row["bn"] = bn
            for name, (column, scale) in compared.items():
                _, m, b = paired(here, label, baseline, column, scale)
                text = plots.interval_text(*stats.mean_ci(m - b)) if len(m) else "—"
                row["Δtest accuracy (points)" if name == "test_acc" else f"Δ{plots.label(name)}"] = text
            summary.append(row)
cost = (
    f"{len(records)} measurements, median {records['seconds'].median():.1f} s and {records['hvps'].median():.0f} "
    "Hessian-vector products each, "
    + (
        f"in {measure.measuring_processes(records['run_dir'].nunique(), where)} process(es) of one torch thread each"
        if where.type == "cpu"
        else f"on {where}"
    )
)
study.save_table(
    pd.DataFrame(summary),
    "summary",
    f"Each method minus its baseline, seed by seed: mean [95% CI] (Student t) over the paired seeds, at the first "
    f"checkpoint at which each run's training loss (all {train_subset or 'its'} training rows, eval mode, no "
    f"augmentation) is below L* = {matched_loss:g}, and at the end; 'at' gives the mean steps of the two and the "
    f"pairs. Measured on {rows} seeded training rows in fp32, batch norm in train mode (batch statistics over the "
    f"rows of one training forward pass: the loss the optimizer descended) or in eval mode (running statistics): λ1 "
    f"by Lanczos (at most {lanczos_steps} steps, tolerance {lanczos_tol:g}), trace by Hutchinson ({trace_probes} "
    f"probes), adaptive sharpness at rho {rho:g} ({sharpness_steps} ascent steps, a lower bound), "
    f"filter-normalized curvature over {directions} directions; test accuracy in points. Cost: {cost}",
    wide,
)

# %% [markdown]
# **Does sharpness predict generalization here?** Kendall's tau-b between each measure and each
# generalization gap (training minus test accuracy; test minus training loss, both on the clean
# training loss and accuracy) over every run and checkpoint, the interval the 2.5% and 97.5%
# percentiles of `bootstrap` resamples of whole runs (a run's checkpoints share its initialization
# and data order: resampling them one by one would make the interval too narrow). Reported as it
# falls.

# %%
gaps = {"acc_gap": "train − test accuracy", "loss_gap": "test − train loss"}
taus, kendall = {}, []
for name in measures:
    for bn in modes:
        here = wide[wide["bn"] == bn]
        row = {"measure": plots.label(name), "bn": bn}
        for gap, title in gaps.items():
            taus[name, bn, gap] = stats.kendall_tau(here[name], here[gap], here["run_dir"], bootstrap)
            row[f"τ with {title} [95% CI]"] = plots.interval_text(*taus[name, bn, gap])
        kendall.append({**row, "points": len(here), "runs": here["run_dir"].nunique()})
study.save_table(
    pd.DataFrame(kendall),
    "kendall",
    f"Kendall's tau-b of each measure with each generalization gap over every run and checkpoint (points), "
    f"[95% CI]: percentile bootstrap over {bootstrap} resamples of whole runs (their checkpoints together, not "
    f"rows one by one). Gaps on the clean training loss and accuracy (all training rows, eval mode); measures as "
    f"in the summary table, on {rows} seeded training rows",
    wide,
)

# %%
fig, axes = plt.subplots(len(measures), 2, figsize=(11, 3.1 * len(measures)), sharey=True)
for i, name in enumerate(measures):
    for j, bn in enumerate(modes):
        ax = axes[i, j]
        plots.curves(wide[wide["bn"] == bn], name, "acc_gap", ax=ax, points=True, legend=(i, j) == (0, 1))
        if (wide[name] > 0).all():
            ax.set_xscale("log")
            plots.plain_log_ticks(ax, "x")
        ax.set_xlabel(f"{titles[name]}, batch norm in {bn} mode", fontsize=9)
        ax.set_title(f"τ = {plots.interval_text(*taus[name, bn, 'acc_gap'])}", fontsize=9)
fig.suptitle("the accuracy gap against each measure, every run and checkpoint (Kendall's tau, 95% CI over runs)")
study.save_figure(fig, "measure_vs_gap", wide, spread="one point per run and checkpoint")

# %% [markdown]
# The line from SGD's final weights (t = 0) to SAM's (t = 1) of the same seed, batch-norm running
# statistics interpolated alike. Same initialization and data order, so a barrier would mean the
# two methods left for different basins. Not beyond the ends: there the interpolated running
# variances can turn negative, and the loss with them NaN.

# %%
pairs = plots.final_rows(runs).pivot(index="seed", columns="label", values="run_dir")
lines = pd.concat(
    [
        pd.DataFrame(
            measure.interpolate_runs(
                pairs.at[s, "SGD"], pairs.at[s, "SAM"], rows, np.linspace(0, 1, interp_points), device=where
            )
        ).assign(seed=s)
        for s in seeds
    ]
)
lines = lines.rename(columns={"loss": "train_loss", "acc": "train_acc"}).assign(label="SGD → SAM", method="sam")
axes = plots.interpolation(lines, ("SGD", "SAM"))
axes[0].figure.suptitle(f"on {rows} training rows, along the line between the final weights (batch norm in eval mode)")
study.save_figure(axes[0].figure, "interpolation", runs[runs["label"].isin(["SGD", "SAM"])])

# %% [markdown]
# Li et al. (2018) slices: L(w + a d1 + b d2) with d1, d2 drawn alike for both runs and each
# filter rescaled to the norm of that run's filter (biases and batch-norm parameters not moved),
# so the two panels are on one relative scale and share their contour levels.

# %%
sliced = {
    f"{label}, seed {slice_seed}": measure.slice_run(pairs.at[slice_seed, label], rows, slice_points, device=where)
    for label in ("SGD", "SAM")
}
fig = plots.loss_contours(sliced)
fig.suptitle(f"training loss on {rows} rows around the final weights (batch norm in eval mode)")
study.save_figure(fig, "slices", runs[runs["run_dir"].isin(pairs.loc[slice_seed, ["SGD", "SAM"]])])

# %% [markdown]
# vSAM rests on PSF = g(w + rho g/||g||) - g(w) ~ rho H g/||g||, so ||PSF|| <= rho times the
# largest |eigenvalue| of the batch Hessian (lambda_max where it is positive semi-definite). Per
# batch of vSAM's training batch size at its final weights: the measured ||PSF|| against that
# bound (the eigenvalue by Lanczos), batch norm in eval mode. The lemma is first order in rho: on a
# ReLU and max-pool net such as tiny_cnn the step rho g/||g|| crosses kinks the (almost
# everywhere) Hessian does not see, so a batch above the line is the remainder showing, not a
# contradiction at rho -> 0.

# %%
checks = pd.concat(
    [
        pd.DataFrame(measure.psf_check_run(run_dir, psf_batches, device=where)["batches"]).assign(seed=s, method="vsam")
        for s, run_dir in pairs["vSAM"].items()
    ]
)
ax = plots.psf_bound(
    checks,
    title=f"vSAM's Lemma 1 at the final weights: {100 * checks['holds'].mean():.0f}% of {len(checks)} batches hold",
)
study.save_figure(ax.figure, "psf_bound", runs[runs["label"] == "vSAM"])
