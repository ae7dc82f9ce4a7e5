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
# # 07 · Sharpness and loss landscapes: what each method does to the Hessian
#
# **Question.** SAM and vSAM minimize a sharpness proxy, GVR penalizes the gradient's variance
# over augmented views, large batches are said to find sharper minima than small ones and the
# gradient-norm penalty (LB+GN) to undo that. Measured on the same model and data: how do the top
# Hessian eigenvalue and the trace evolve in training, where does each method end (top-k
# eigenvalues, trace, gradient noise, test accuracy, with 95% intervals over paired seeds), is
# there a barrier on the line from SGD's weights to SAM's, how do their 2-D loss surfaces
# compare, and does vSAM's Lemma 1 (||PSF|| <= rho * lambda_max) hold at its final weights? And
# what does measuring cost?
#
# Two protocols, each with equal optimizer steps: SGD, GVR, SAM and vSAM at `batch_size` with
# momentum 0.9, weight decay and a cosine learning rate; SB, LB and LB+GN as Novack et al.
# (momentum 0, weight decay 0, constant learning rate, LB = `lb_batch / sb_batch` accumulated
# micro-batches with ghost batch norm). Seed s gives every run the same initial weights and
# data order, so methods are compared seed by seed. Every measurement is of the training loss on
# a fixed, seeded subset of the run's training rows with batch norm in eval mode (running
# statistics) and dropout off, in fp32 (gvr_lab/landscape.py).
#
# **Use.** Pick a preset in the first line of the parameters cell (`smoke`: seconds on synthetic
# data; `cpu`: Fashion-MNIST, tiny_cnn with batch norm, 3 seeds, the committed figures; `gpu`:
# CIFAR-10, ResNet-18, 10 epochs, not yet measured; `paper`: CIFAR-10, ResNet-18, 200 epochs, B =
# 5120 for LB) and run all; a parameter set in a cell below the parameters cell overrides the
# preset. Headless: `gvr-lab run notebooks/07_curvature.py --preset cpu`.

# %% tags=["parameters"]
preset: str = "cpu"  # smoke | cpu | gpu | paper
dataset: str = "fashion_mnist"  # see gvr_lab.list_datasets()
model: str = "tiny_cnn"  # see gvr_lab.list_models()
model_args: dict = {"bn": True}  # tiny_cnn with batch norm, measured in eval mode like a ResNet
train_subset: int = 8192  # training examples drawn with the seed, 0 for all
steps: int = 240  # optimizer steps of SGD, GVR, SAM and vSAM
novack_steps: int = 240  # optimizer steps of SB, LB and LB+GN
eval_every: int = 80  # steps between evaluations
curvature_every: int = 1  # evaluations between Hessian measurements in training (512 rows, 20 probes)
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
seeds: list = [0, 1, 2]  # paired: seed s is one initialization and data order for every method
rows: int = 512  # training rows of the final measurements (512: the rows measured during training)
top_k: int = 3  # top Hessian eigenvalues at the final weights
trace_probes: int = 30  # Hutchinson probes at the final weights
noise_micro_batch: int = 32  # micro-batch size m of the gradient noise tr Cov[g_m]
interp_points: int = 21  # points on t in [0, 1] between SGD's and SAM's weights
slice_points: int = 21  # points per axis of the 2-D slices, on [-1, 1]
slice_seed: int = 0  # the seed whose SGD and SAM runs are sliced
psf_batches: int = 6  # training batches of vSAM's Lemma 1 check, per seed
device: str = "auto"  # auto, cpu or cuda
runs_root: str = ""  # training runs; empty: runs/<preset>/curvature/<digest of the parameters>
fig_root: str = ""  # figures and tables; empty: figures/ at the cpu preset, else runs/<preset>/figures

# %%
import os

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

import gvr_lab as gl
from gvr_lab import measure, plots
from gvr_lab.training import CURVATURE_PROBES, CURVATURE_ROWS, resolve_device

study = gl.Study(
    "curvature",
    globals(),
    presets={
        "smoke": {
            "dataset": "synthetic",
            "train_subset": 64,
            "steps": 32,
            "novack_steps": 32,
            "eval_every": 16,
            "curvature_every": 2,
            "batch_size": 16,
            "lr": 0.02,
            "sb_batch": 8,
            "lb_batch": 32,
            "seeds": [0],
            "method_args": {
                "gvr": {"target": "fc", "penalty": "closed_form", "subset": 4},
                "vsam": {"warmup_epochs": 1, "window": 2, "blocks": 1},
            },
            "rows": 32,
            "top_k": 2,
            "trace_probes": 3,
            "noise_micro_batch": 4,
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
            "eval_every": 390,
            "curvature_every": 2,
            "lr": 0.1,
            "sb_batch": 128,
            "lb_batch": 1024,
            "method_args": {"gvr": {}, "sam": {}, "vsam": {"warmup_epochs": 1}},
            "rows": 2048,
            "trace_probes": 100,
            "noise_micro_batch": 128,
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
            "eval_every": 1560,
            "lr": 0.1,
            "sb_batch": 128,
            "lb_batch": 5120,
            "method_args": {"gvr": {}, "sam": {}, "vsam": {}},
            "rows": 4096,
            "top_k": 5,
            "trace_probes": 200,
            "noise_micro_batch": 128,
            "interp_points": 41,
            "slice_points": 51,
            "psf_batches": 50,
        },
    },
    outputs={
        "eigen_over_training": "top Hessian eigenvalue and trace against step, per method",
        "summary": "final weights: test accuracy, top-k eigenvalues, trace ± SE, gradient noise, paired "
        "differences, cost of measuring",
        "interpolation": "training loss and accuracy on the line from SGD's to SAM's weights, same seed",
        "slices": "2-D filter-normalized loss slices around SGD's and SAM's weights, shared levels",
        "psf_bound": "vSAM's Lemma 1: the PSF norm against rho times the batch Hessian's largest absolute eigenvalue",
    },
)

# %%
if slice_seed not in seeds:
    raise gl.UsageError(f"slice_seed {slice_seed} is not among the seeds {seeds}")
common = dict(
    dataset=dataset,
    model=model,
    model_args=model_args,
    train_subset=train_subset,
    eval_every=eval_every,
    curvature_every=curvature_every,
    device=device,
)
sam_family = dict(common, steps=steps, batch_size=batch_size, lr=lr)
novack = dict(common, steps=novack_steps, lr=novack_lr, momentum=0.0, weight_decay=0.0, schedule="constant")
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
# During training (`Config.curvature_every`) the loop measures the top eigenvalue (Lanczos) and
# the trace (Hutchinson, 20 probes) on 512 seeded training rows (all of them when the subset is
# smaller); its time is `curvature_time_s`, outside the training time.

# %%
order = [*names, "SB", "LB", "LB+GN"]
runs = plots.ordered(study.load_runs(), "label", order)
shown = study.plotted(runs)
measured_on = f"{min(CURVATURE_ROWS, train_subset or CURVATURE_ROWS)} training rows, batch norm in eval mode"
fig, axes = plt.subplots(2, 1, figsize=(7, 6.4), sharex=True)
plots.curves(shown, "step", "hessian_top", ax=axes[0], logy=True, title=f"top Hessian eigenvalue ({measured_on})")
plots.curves(
    shown,
    "step",
    "hessian_trace",
    ax=axes[1],
    logy=True,
    legend=False,
    title=f"Hessian trace (Hutchinson, {CURVATURE_PROBES} probes)",
)
for ax in axes:
    plots.plain_log_ticks(ax)
study.save_figure(fig, "eigen_over_training", shown)

# %% [markdown]
# At the final weights, each run on its own `rows` seeded training rows: the top-k eigenvalues,
# the trace with its standard error over probes, and the gradient noise, the trace of the
# covariance of micro-batch gradients at m = `noise_micro_batch`. With `rows` = 512 the first
# eigenvalue repeats, on the same rows and from the same Lanczos start, the last measurement made
# in training: the printed gap checks that the table and the figure measure one thing.

# %%
where = resolve_device(device)
final = plots.ordered(plots.with_best(runs), "label", order)
measured = pd.DataFrame(
    [
        measure.final_curvature(run_dir, rows, top_k, trace_probes, noise_micro_batch, device=where)
        for run_dir in final["run_dir"]
    ]
)
final = final.merge(measured, on="run_dir").merge(plots.curvature_cost(runs), on="run_dir")
last = final["hessian_top"].where(final["rows"] == min(CURVATURE_ROWS, train_subset or CURVATURE_ROWS))
print(
    f"λ1 at the final weights against the last one measured in training: largest relative gap "
    f"{(final['lambda_1'] / last - 1).abs().max():.1e}"
)

# %%
lambdas = [f"lambda_{i + 1}" for i in range(top_k)]
cost = ["curvature_s", "seconds", "train_s_per_epoch", "curvature_s_per_epoch", "curvature_overhead_pct"]
table = plots.mean_ci(final, ["label"], ["test_acc", *lambdas, "trace", "noise_trace_cov", *cost])
table.insert(
    2 + top_k + 1,
    "trace SE (one run)",
    table["label"].map(final.groupby("label")["trace_se"].mean().map(plots.significant)),
)
baselines = {"GVR": "SGD", "SAM": "SGD", "vSAM": "SGD", "LB": "SB", "LB+GN": "LB"}
table["Δλ1 (paired)"] = table["label"].map(plots.paired_difference(final, "lambda_1", baselines))
table["Δtrace (paired)"] = table["label"].map(plots.paired_difference(final, "trace", baselines))
study.save_table(
    study.term_column(runs, table),
    "summary",
    f"Final weights, mean [95% CI] over {len(seeds)} paired seeds. Hessian of the training loss on {rows} seeded "
    f"training rows, batch norm in eval mode, fp32: λ by Lanczos, trace by Hutchinson with {trace_probes} probes "
    f"('trace SE (one run)': the estimator's standard error, mean over seeds); tr Cov[g_m]: gradient noise at "
    f"m={noise_micro_batch}; Δ: the method minus its baseline seed by seed. Cost: curvature measured every "
    f"{curvature_every} evaluation(s) of {eval_every} steps ({CURVATURE_PROBES} probes), epochs of "
    f"steps_per_epoch steps; {torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f}",
    runs,
)

# %% [markdown]
# The line from SGD's final weights (t = 0) to SAM's (t = 1) of the same seed, batch-norm running
# statistics interpolated alike. Same initialization and data order, so a barrier would mean the
# two methods left for different basins. Not beyond the ends: there the interpolated running
# variances can turn negative, and the loss with them NaN.

# %%
pairs = final.pivot(index="seed", columns="label", values="run_dir")
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
