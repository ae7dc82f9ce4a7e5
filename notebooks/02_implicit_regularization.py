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
# **Run.** `gvr-lab run notebooks/02_implicit_regularization.py --preset cpu` (measured: 458 s on
# 2 CPU cores); `--preset gpu` (CIFAR-10, ResNet-18, B = 5120, m = 128, exact penalties by double
# backward, as the paper's code: on a ReLU net fd is another, smoothed regularizer; aimed at about
# 10 minutes per seed, not yet measured on a GPU); `--preset paper` (B = 5120, m = 128, the README's
# learning rates and lambdas).
#
# **Writes.** `figures/implicit_regularization/main_table.md|tex`, `microbatch_sweep.png|pdf`,
# `grafting_table.md|tex`, `trajectories.png|pdf` (mean micro-batch gradient norm against step).

# %% tags=["parameters"]
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
progress: bool = False  # progress bars inside the notebook
runs_root: str = "runs/cpu/02_implicit_regularization"  # training runs; re-running skips finished runs
fig_root: str = "figures"  # figures go to <fig_root>/implicit_regularization/

# %%
import matplotlib.pyplot as plt

import gvr_lab as gl
from gvr_lab import plots

novack = dict(dataset=dataset, model=model, momentum=0.0, weight_decay=0.0, schedule="constant", augment=True,
              train_subset=train_subset, log_every=log_every, device=device, progress=progress)
sb = dict(novack, batch_size=sb_batch, lr=sb_lr, epochs=max(1, lb_epochs * sb_batch // lb_batch))
lb = dict(novack, batch_size=lb_batch, lr=lb_lr, epochs=lb_epochs)
micro = dict(micro_batch_size=sb_batch)
names = {"reg_loss": "LB+GN", "fish_loss": "LB+FT", "avg_jac_loss": "LB+AJ", "unit_jac_loss": "LB+UJ"}

gl.train_grid(sb, [dict(method="sgd", label="SB")], seeds, runs_root)
gl.train_grid(lb, [dict(method="pseudo_gd", method_args=micro, label="LB")]
              + [dict(method=m, method_args=dict(micro, lam=lam[m], hvp=hvp), label=names[m]) for m in names],
              seeds, runs_root)
gl.train_grid(lb, [dict(method="reg_loss", method_args=dict(micro_batch_size=m, lam=lam["reg_loss"], hvp=hvp),
                        label=f"LB+GN m={m}") for m in micro_sizes], seeds, runs_root)

# %% [markdown]
# Grafting: IterGraft takes its step length from the current large batch's micro-batches; ExterGraft
# reads it, step-aligned, from the SB run's own gradient-norm log; NGD uses the SB run's average
# step length lr * mean ||g_SB|| as its fixed step (the paper's non-round NGD learning rates are
# consistent with that).

# %%
sb_steps = gl.load_runs(f"{runs_root}/SB-s*", steps=True)
ngd_lr = float(sb_lr * sb_steps["grad_norm"].mean())
grafting = [dict(method="iter_graft", method_args=dict(micro, norm_source="random_micro"), label="IterGraft"),
            dict(method="iter_graft", method_args=dict(micro, norm_source="mean_micro"), label="IterGraft (mean)"),
            dict(method="ngd", method_args=micro, lr=ngd_lr, label="NGD")]
gl.train_grid(dict(lb, lr=sb_lr), grafting, seeds, runs_root)
for seed in seeds:
    gl.train_grid(dict(lb, lr=sb_lr), [dict(method="exter_graft", label="ExterGraft",
                                            method_args=dict(micro, norms_path=f"{runs_root}/SB-s{seed}"))],
                  [seed], runs_root)

# %%
runs = gl.load_runs(f"{runs_root}/*")
final = plots.final_rows(runs)
final = final.assign(best_test_acc=runs.groupby("run_dir")["test_acc"].transform("max").loc[final.index])
out = plots.figure_dir(fig_root, "02_implicit_regularization")
main = final[final["label"].isin(["SB", "LB", *names.values()])]
table = plots.mean_std(main, ["label"], ["test_acc", "best_test_acc"], scale=100)
plots.save_table(table, out / "main_table",
                 caption=f"Test accuracy (%), {model} on {dataset}, B={lb_batch}, m={sb_batch}, penalties hvp={hvp}")
graft = final[final["label"].isin(["SB", "LB", "IterGraft", "IterGraft (mean)", "ExterGraft", "NGD"])]
plots.save_table(plots.mean_std(graft, ["label"], ["test_acc", "best_test_acc"], scale=100), out / "grafting_table",
                 caption=f"Grafting, {model} on {dataset} (NGD lr {ngd_lr:.4f})")
table

# %%
plots.set_style()
gn = final[final["method"] == "reg_loss"].assign(m=lambda d: d["arg_micro_batch_size"])
fig, ax = plt.subplots(figsize=(5, 3.4))
ax.errorbar(*zip(*[(m, g["test_acc"].mean()) for m, g in gn.groupby("m")]),
            yerr=[g["test_acc"].std() if len(g) > 1 else 0 for _, g in gn.groupby("m")], marker="o", label="LB+GN")
for name in ("SB", "LB"):
    ax.axhline(final[final["label"] == name]["test_acc"].mean(), ls="--", color="k" if name == "SB" else "gray",
               label=name)
ax.set_xscale("log", base=2)
ax.set_xlabel("micro-batch size m")
ax.set_ylabel(plots.label("test_acc"))
ax.legend()
plots.savefig(fig, out / "microbatch_sweep")

# %%
steps = gl.load_runs(f"{runs_root}/*", steps=True)
traj = steps[steps["label"].isin(["SB", "LB", *names.values(), "IterGraft", "ExterGraft", "NGD"])]
ax = plots.curves(traj, "step", "micro_grad_norm", logy=True, title="average micro-batch gradient norm")
plots.savefig(ax.figure, out / "trajectories")
