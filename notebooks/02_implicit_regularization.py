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
# and flip (`augment`), no Cutout; SB and LB run the same number of optimizer steps (`steps`); LB =
# `lb_batch / sb_batch` micro-batches accumulated (ghost batch norm on BN models).
#
# **Exploratory.** This notebook tests no claim: its figures and tables describe what the runs did,
# with the 95% confidence interval of the mean over seeds. Whether SB beats LB, and which penalty
# recovers the gap, is decided in `notebooks/06_claims.py`, under a protocol registered before its
# runs.
#
# The cpu preset trains where the claims study's pilot found that SB fits its training set: 512
# Fashion-MNIST images, 1,600 steps, SB batch 32, no augmentation (SB's lowest clean training
# accuracy over the pilot's 3 seeds: 99.6%), with LB at 128 (4 micro-batches of 32) to fit the time;
# 3 seeds. Every table and figure says whether SB fitted its training set, computed from the runs.
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
sb_batch: int = 32  # small batch, also the micro-batch size m of every LB method
lb_batch: int = 128  # large batch B
steps: int = 1600  # optimizer steps of every run, SB and LB alike
eval_every: int = 200  # steps between evaluations (and the last)
augment: bool = False  # random crop and flip (the paper's code); off where SB is to fit its training set
sb_lr: float = 0.1  # SB learning rate
lb_lr: float = 0.1  # LB and penalty learning rate
lam: dict = {"reg_loss": 0.01, "fish_loss": 0.01, "avg_jac_loss": 0.001, "unit_jac_loss": 0.001}  # lambdas
hvp: str = "fd"  # exact (double backward, the original code) or fd (finite differences)
micro_sizes: list = [16, 128]  # extra micro-batch sizes for the GN sweep; sb_batch itself is in the main table
train_subset: int = 512  # training examples drawn with the seed, 0 for all
log_every: int = 4  # steps between logged gradient norms (ExterGraft reads the SB log)
seeds: list = [0, 1, 2]  # one run per seed and variant
device: str = "auto"  # auto, cpu or cuda
runs_root: str = ""  # training runs; empty: runs/<preset>/implicit_regularization/<digest of the parameters>
fig_root: str = ""  # figures and tables; empty: figures/ at the cpu preset, else runs/<preset>/figures

# %%
import matplotlib.pyplot as plt

import gvr_lab as gl
from gvr_lab import claims, plots

study = gl.Study(
    "implicit_regularization",
    globals(),
    presets={
        "smoke": {
            "dataset": "synthetic",
            "model": "tiny_cnn",
            "sb_batch": 16,
            "lb_batch": 64,
            "steps": 32,
            "eval_every": 8,
            "augment": True,
            "micro_sizes": [32],
            "train_subset": 512,
            "log_every": 1,
            "seeds": [0],
            "device": "cpu",
        },
        "cpu": {"device": "cpu"},
        "gpu": {
            "dataset": "cifar10",
            "model": "resnet18",
            "sb_batch": 128,
            "lb_batch": 5120,
            "steps": 360,
            "eval_every": 9,
            "augment": True,
            "micro_sizes": [2560],
            "hvp": "exact",
            "train_subset": 0,
            "log_every": 20,
            "seeds": [0],
        },
        "paper": {
            "dataset": "cifar10",
            "model": "resnet18",
            "sb_batch": 128,
            "lb_batch": 5120,
            "steps": 4480,
            "eval_every": 70,
            "augment": True,
            "micro_sizes": [2560],
            "hvp": "exact",
            "train_subset": 40000,
            "log_every": 20,
            "seeds": [0, 1, 2],
        },
    },
    outputs={
        "main_table": "SB, LB and LB with each penalty: final and best test accuracy, mean [95% CI] over seeds",
        "microbatch_sweep": "LB+GN test accuracy against the micro-batch size, SB and LB for reference, 95% CIs",
        "grafting_table": "SB, LB, IterGraft, ExterGraft, NGD: final and best test accuracy, mean [95% CI]",
        "trajectories": "mean micro-batch gradient norm against step, mean and 95% CI over seeds",
    },
    exploratory=True,
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
    augment=augment,
    steps=steps,
    eval_every=eval_every,
    eval_train=True,  # whether SB fits its training set
    train_subset=train_subset,
    log_every=log_every,
    device=device,
)
sb = dict(novack, batch_size=sb_batch, lr=sb_lr)
lb = dict(novack, batch_size=lb_batch, lr=lb_lr)
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
fit = claims.fit_note(runs, "SB")
final = plots.with_best(runs)
main = final[final["label"].isin(["SB", "LB", *names.values()])]
table = plots.mean_ci(main, ["label"], ["test_acc", "best_test_acc"])
study.save_table(
    study.term_column(runs, table),
    "main_table",
    f"Test accuracy, B={lb_batch}, m={sb_batch}, penalties hvp={hvp}",
    main,
    spread=f"{plots.ci_spread(main)}; {fit}",
)
graft = final[final["label"].isin(["SB", "LB", "IterGraft", "IterGraft (mean)", "ExterGraft", "NGD"])]
study.save_table(
    plots.mean_ci(graft, ["label"], ["test_acc", "best_test_acc"]),
    "grafting_table",
    f"Grafting, B={lb_batch}, m={sb_batch} (NGD lr {ngd_lr:.4f})",
    graft,
    spread=f"{plots.ci_spread(graft)}; {fit}",
)

# %%
gn = final[final["method"] == "reg_loss"].assign(m=lambda d: d["arg_micro_batch_size"])
by_m = gn.groupby("m")["test_acc"]
fig, ax = plt.subplots(figsize=(6, 3.4))
ax.errorbar(
    by_m.mean().index,
    100 * by_m.mean(),
    yerr=[100 * (plots.half_width(values, "ci") or 0.0) for _, values in by_m],
    marker="o",
    capsize=3,
    color=plots.method_color("reg_loss"),
    label="LB+GN",
)
for name in ("SB", "LB"):
    rows = final[final["label"] == name]
    plots.level_with_ci(ax, rows, "test_acc", name, plots.method_color(rows["method"].iloc[0]))
ax.set_xscale("log", base=2)
plots.integer_ticks(ax.xaxis, by_m.mean().index)
ax.xaxis.set_major_formatter(plt.ScalarFormatter())
ax.set_xlabel("micro-batch size m")
ax.set_ylabel(plots.label("test_acc"))
plots.legend_outside(ax)
swept = final[final["label"].isin(["SB", "LB"]) | (final["method"] == "reg_loss")]
study.save_figure(fig, "microbatch_sweep", swept, spread=f"{plots.ci_spread(swept)}; {fit}")

# %%
steps = plots.ordered(study.plotted(study.load_runs(steps=True)), "label", order)
traj = steps[steps["label"].isin(["SB", "LB", *names.values(), "IterGraft", "ExterGraft", "NGD"])]
ax = plots.curves(traj, "step", "micro_grad_norm", logy=True, title="average micro-batch gradient norm", band="ci")
study.save_figure(ax.figure, "trajectories", traj, spread=f"{plots.ci_spread(traj)}; {fit}")
