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
# # 02 · Implicit regularization in SGD (Novack et al., ICLR 2023)
#
# **Question.** Large-batch SGD (LB) generalizes worse than small-batch SGD (SB). Which explicit
# penalty on micro-batches recovers SB: gradient norm (GN), Fisher trace (FT), average or unit
# Jacobian (AJ, UJ)? Does the effect vanish as the micro-batch grows? Do grafting (LB direction,
# SB step length) and normalized GD close the gap? And does each method's average micro-batch
# gradient-norm trajectory track SB's?
#
# Protocol as the paper's code: plain SGD (momentum 0, weight decay 0, constant learning rate), crop
# and flip, no Cutout; SB and LB run the same number of optimizer steps (SB trains for
# `lb_epochs * sb_batch / lb_batch` epochs); LB = `lb_batch / sb_batch` micro-batches accumulated
# (ghost batch norm on BN models).
#
# **Use.** Pick a preset in the first line of the parameters cell (`smoke`, `cpu`: the committed
# figures, `gpu`: CIFAR-10, ResNet-18, B = 5120, m = 128, exact penalties by double backward as the
# paper's code, since on a ReLU net fd is another, smoothed regularizer; `paper`: B = 5120, m = 128,
# the README's learning rates and lambdas) and run all; a parameter set in a cell below the
# parameters cell overrides the preset. Headless:
# `gvr-lab run notebooks/02_implicit_regularization.py --preset cpu`.

# %% tags=["parameters"]
preset: str = "cpu"  # smoke | cpu | gpu | paper
dataset: str = "fashion_mnist"  # see gvr_lab.list_datasets()
model: str = "tiny_cnn"  # see gvr_lab.list_models()
sb_batch: int = 64  # small batch, also the micro-batch size m of every LB method
lb_batch: int = 1024  # large batch B
lb_epochs: int = 16  # epochs of every LB run; SB runs the same number of steps
sb_lr: float = 0.1  # SB learning rate
lb_lr: float = 0.1  # LB and penalty learning rate
lam: dict = {"reg_loss": 0.01, "fish_loss": 0.01, "avg_jac_loss": 0.001, "unit_jac_loss": 0.001}  # lambdas
hvp: str = "fd"  # exact (double backward, the original code) or fd (finite differences)
micro_sizes: list = [16, 256]  # extra micro-batch sizes for the GN sweep; sb_batch itself is in the main table
train_subset: int = 4096  # training examples drawn with the seed, 0 for all
log_every: int = 4  # steps between logged gradient norms (ExterGraft reads the SB log)
seeds: list = [0]  # one run per seed and variant
device: str = "auto"  # auto, cpu or cuda
runs_root: str = ""  # training runs; empty: runs/<preset>/implicit_regularization/<digest of the parameters>
fig_root: str = ""  # figures and tables; empty: figures/ at the cpu preset, else runs/<preset>/figures

# %%
import matplotlib.pyplot as plt

import gvr_lab as gl
from gvr_lab import plots

study = gl.Study(
    "implicit_regularization",
    globals(),
    presets={
        "smoke": {
            "dataset": "synthetic",
            "model": "tiny_cnn",
            "sb_batch": 16,
            "lb_batch": 64,
            "lb_epochs": 4,
            "micro_sizes": [32],
            "train_subset": 512,
            "log_every": 1,
            "device": "cpu",
        },
        "cpu": {"device": "cpu"},
        "gpu": {
            "dataset": "cifar10",
            "model": "resnet18",
            "sb_batch": 128,
            "lb_batch": 5120,
            "lb_epochs": 40,
            "micro_sizes": [2560],
            "hvp": "exact",
            "train_subset": 0,
            "log_every": 20,
        },
        "paper": {
            "dataset": "cifar10",
            "model": "resnet18",
            "sb_batch": 128,
            "lb_batch": 5120,
            "lb_epochs": 640,
            "micro_sizes": [2560],
            "hvp": "exact",
            "train_subset": 40000,
            "log_every": 20,
            "seeds": [0, 1, 2],
        },
    },
    outputs={
        "main_table": "SB, LB and LB with each penalty: final and best test accuracy",
        "microbatch_sweep": "LB+GN test accuracy against the micro-batch size, SB and LB for reference",
        "grafting_table": "SB, LB, IterGraft, ExterGraft, NGD: final and best test accuracy",
        "trajectories": "mean micro-batch gradient norm against step",
    },
)

# %% [markdown]
# The grids are built, and so checked, before the first run trains, except two that depend on the SB
# runs. Grafting: IterGraft takes its step length from the current large batch's micro-batches;
# NGD uses the SB run's average step length lr * mean ||g_SB|| as its fixed step (the paper's
# non-round NGD learning rates are consistent with that), known once SB has trained, so its grid is
# checked first with SB's learning rate standing in; ExterGraft reads its step length, step-aligned,
# from the SB run's own gradient-norm log, which its configuration checks, so it is built after SB.

# %%
novack = dict(
    dataset=dataset,
    model=model,
    momentum=0.0,
    weight_decay=0.0,
    schedule="constant",
    augment=True,
    train_subset=train_subset,
    log_every=log_every,
    device=device,
)
sb = dict(novack, batch_size=sb_batch, lr=sb_lr, epochs=max(1, lb_epochs * sb_batch // lb_batch))
lb = dict(novack, batch_size=lb_batch, lr=lb_lr, epochs=lb_epochs)
micro = dict(micro_batch_size=sb_batch)
names = {"reg_loss": "LB+GN", "fish_loss": "LB+FT", "avg_jac_loss": "LB+AJ", "unit_jac_loss": "LB+UJ"}


def grafting_grid(ngd_lr: float, check_run_dirs: bool = True) -> list:
    variants = [
        dict(method="iter_graft", method_args=dict(micro, norm_source="random_micro"), label="IterGraft"),
        dict(method="iter_graft", method_args=dict(micro, norm_source="mean_micro"), label="IterGraft (mean)"),
        dict(method="ngd", method_args=micro, lr=ngd_lr, label="NGD"),
    ]
    return gl.grid_configs(dict(lb, lr=sb_lr), variants, seeds, study.runs_root, check_run_dirs)


main_grid = (
    gl.grid_configs(sb, [dict(method="sgd", label="SB")], seeds, study.runs_root)
    + gl.grid_configs(
        lb,
        [dict(method="pseudo_gd", method_args=micro, label="LB")]
        + [dict(method=m, method_args=dict(micro, lam=lam[m], hvp=hvp), label=names[m]) for m in names],
        seeds,
        study.runs_root,
    )
    + gl.grid_configs(
        lb,
        [
            dict(
                method="reg_loss",
                label=f"LB+GN m={m}",
                method_args=dict(micro_batch_size=m, lam=lam["reg_loss"], hvp=hvp),
            )
            for m in micro_sizes
        ],
        seeds,
        study.runs_root,
    )
)
grafting_grid(sb_lr, check_run_dirs=False)
gl.train_configs(main_grid)
ngd_lr = float(sb_lr * study.load_runs(steps=True).query("label == 'SB'")["grad_norm"].mean())
exter_graft = [
    config
    for seed in seeds
    for config in gl.grid_configs(
        dict(lb, lr=sb_lr),
        [
            dict(
                method="exter_graft",
                label="ExterGraft",
                method_args=dict(micro, norms_path=f"{study.runs_root}/SB-s{seed}"),
            )
        ],
        [seed],
        study.runs_root,
    )
]
gl.train_configs(grafting_grid(ngd_lr) + exter_graft)

# %%
order = [
    "SB",
    "LB",
    *names.values(),
    *(f"LB+GN m={m}" for m in micro_sizes),
    "IterGraft",
    "IterGraft (mean)",
    "ExterGraft",
    "NGD",
]
runs = plots.ordered(study.load_runs(), "label", order)
final = plots.with_best(runs)
main = final[final["label"].isin(["SB", "LB", *names.values()])]
table = plots.mean_std(main, ["label"], ["test_acc", "best_test_acc"])
study.save_table(
    study.term_column(runs, table),
    "main_table",
    f"Test accuracy, B={lb_batch}, m={sb_batch}, penalties hvp={hvp}",
    main,
)
graft = final[final["label"].isin(["SB", "LB", "IterGraft", "IterGraft (mean)", "ExterGraft", "NGD"])]
study.save_table(
    plots.mean_std(graft, ["label"], ["test_acc", "best_test_acc"]),
    "grafting_table",
    f"Grafting, B={lb_batch}, m={sb_batch} (NGD lr {ngd_lr:.4f})",
    graft,
)

# %%
gn = final[final["method"] == "reg_loss"].assign(m=lambda d: d["arg_micro_batch_size"])
by_m = 100 * gn.groupby("m")["test_acc"].agg(["mean", "std"])
fig, ax = plt.subplots(figsize=(6, 3.4))
ax.errorbar(
    by_m.index,
    by_m["mean"],
    yerr=by_m["std"].fillna(0),
    marker="o",
    capsize=3,
    color=plots.method_color("reg_loss"),
    label="LB+GN",
)
for name in ("SB", "LB"):
    rows = final[final["label"] == name]
    ax.axhline(100 * rows["test_acc"].mean(), ls="--", color=plots.method_color(rows["method"].iloc[0]), label=name)
ax.set_xscale("log", base=2)
plots.integer_ticks(ax.xaxis, by_m.index)
ax.xaxis.set_major_formatter(plt.ScalarFormatter())
ax.set_xlabel("micro-batch size m")
ax.set_ylabel(plots.label("test_acc"))
plots.legend_outside(ax)
study.save_figure(fig, "microbatch_sweep", final[final["label"].isin(["SB", "LB"]) | (final["method"] == "reg_loss")])

# %%
steps = plots.ordered(study.plotted(study.load_runs(steps=True)), "label", order)
traj = steps[steps["label"].isin(["SB", "LB", *names.values(), "IterGraft", "ExterGraft", "NGD"])]
ax = plots.curves(traj, "step", "micro_grad_norm", logy=True, title="average micro-batch gradient norm")
study.save_figure(ax.figure, "trajectories", traj)
