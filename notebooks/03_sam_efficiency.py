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
# # 03 · The SAM family: accuracy against training throughput
#
# **Question.** SAM costs two passes per step. LookSAM, ESAM, SAF and vSAM each claim most of its
# gain for less. Measured on the same model, data and machine, where does each land on
# accuracy against images per second?
#
# **Run.** `gvr-lab run notebooks/03_sam_efficiency.py --preset cpu` (measured: 281 s on 2 CPU
# cores); `--preset gpu` (CIFAR-10, ResNet-18, 15 epochs, 2 seeds: aimed at about 10 minutes, not
# yet measured on one H100);
# `--preset paper` (CIFAR-100, 200 epochs, the papers' hyperparameters).
#
# **Writes.** `figures/sam_efficiency/accuracy_vs_throughput.png|pdf` (mean ± std over seeds, both
# axes), `figures/sam_efficiency/summary.md|tex` (accuracy, images/s, wall time per epoch, vSAM's
# fraction of two-pass steps).

# %% tags=["parameters"]
dataset: str = "fashion_mnist"  # see gvr_lab.list_datasets()
model: str = "small_cnn"  # see gvr_lab.list_models()
methods: list = ["sgd", "sam", "looksam", "esam", "saf", "vsam"]  # compared methods
method_args: dict = {"vsam": {"warmup_epochs": 1}, "saf": {"start_epoch": 0}}  # per-method hyperparameters
epochs: int = 3  # passes over the training set
batch_size: int = 128  # examples per step
lr: float = 0.05  # peak learning rate, cosine per step
weight_decay: float = 0.0005  # coupled L2
label_smoothing: float = 0.0  # vSAM's script uses 0.1
train_subset: int = 20000  # training examples drawn with the seed, 0 for all
seeds: list = [0]  # one run per seed and method
device: str = "auto"  # auto, cpu or cuda
progress: bool = False  # progress bars inside the notebook
runs_root: str = "runs/cpu/03_sam_efficiency"  # training runs; re-running skips finished runs
fig_root: str = "figures"  # figures go to <fig_root>/sam_efficiency/

# %%
import matplotlib.pyplot as plt

import gvr_lab as gl
from gvr_lab import plots

base = dict(dataset=dataset, model=model, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
            label_smoothing=label_smoothing, train_subset=train_subset, device=device, progress=progress)
gl.train_grid(base, [dict(method=m, method_args=method_args.get(m, {}), label=m) for m in methods], seeds, runs_root)

# %% [markdown]
# Throughput is measured per epoch by the training loop (training steps only, evaluation excluded);
# the first epoch includes warm-up effects, so it is left out of the averages when there are more.

# %%
runs = plots.ordered(gl.load_runs(f"{runs_root}/*"), "label", methods)
steady = runs[runs["epoch"] > 0] if runs["epoch"].max() > 0 else runs
speed = steady.groupby(["label", "run_dir"], sort=False)[["images_per_s", "epoch_time_s"]].mean().reset_index()
final = plots.final_rows(runs).merge(speed, on=["label", "run_dir"], suffixes=("_last", ""))
out = plots.figure_dir(fig_root, "03_sam_efficiency")
plots.set_style()
fig, ax = plt.subplots(figsize=(5.5, 3.8))
for name, g in final.groupby("label", sort=False):
    ax.errorbar(g["images_per_s"].mean(), 100 * g["test_acc"].mean(),
                xerr=g["images_per_s"].std() if len(g) > 1 else None,
                yerr=100 * g["test_acc"].std() if len(g) > 1 else None, marker="o", capsize=3, label=name)
ax.set_xlabel(plots.label("images_per_s"))
ax.set_ylabel("test accuracy (%)")
ax.legend(fontsize=8)
plots.savefig(fig, out / "accuracy_vs_throughput")

# %%
table = plots.mean_std(final, ["label"], ["test_acc"], scale=100)
table["images/s"] = final.groupby("label", sort=False)["images_per_s"].mean().round(0).values
table["s/epoch"] = final.groupby("label", sort=False)["epoch_time_s"].mean().round(2).values
if "train_sampled" in final:
    # methods that sample their second pass log it; the others run a fixed number of passes
    table["two-pass fraction"] = final.groupby("label", sort=False)["train_sampled"].mean().round(2).fillna("—").values
plots.save_table(table, out / "summary", caption=f"{model} on {dataset}, {epochs} epochs, test accuracy (%)")
table
