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
# # 00 · Quickstart: SGD vs GVR vs SAM on Fashion-MNIST
#
# **Question.** On a small CNN and real data, what do GVR's gradient-variance penalty and SAM's
# sharpness penalty buy over plain SGD, and at what cost per epoch?
#
# **Run.** `make demo`, or `gvr-lab run notebooks/00_quickstart.py --preset cpu`
# (measured: 122 s on 2 CPU cores); `--preset gpu` (ResNet-18, 10 epochs; aimed at a few minutes,
# not yet measured on one H100).
#
# **Writes.** `figures/quickstart/accuracy.png|pdf` (test accuracy per epoch),
# `figures/quickstart/summary.md|tex` (final and best test accuracy, time per epoch).

# %% tags=["parameters"]
dataset: str = "fashion_mnist"  # see gvr_lab.list_datasets()
model: str = "small_cnn"  # see gvr_lab.list_models()
methods: list = ["sgd", "gvr", "sam"]  # compared methods, default hyperparameters unless in method_args
method_args: dict = {"gvr": {"target": "fc", "penalty": "closed_form", "alpha": 0.01}}  # per method
epochs: int = 2  # passes over the training set
batch_size: int = 128  # examples per step (per view for gvr)
lr: float = 0.05  # peak learning rate of the cosine schedule
train_subset: int = 20000  # training examples drawn with the seed, 0 for all 60k
seeds: list = [0]  # one run per seed
device: str = "auto"  # auto | cpu | cuda
progress: bool = False  # progress bars inside the notebook
runs_root: str = "runs/cpu/00_quickstart"  # training runs; re-running skips finished runs
fig_root: str = "figures"  # figures go to <fig_root>/quickstart/

# %%
import gvr_lab as gl
from gvr_lab import plots

base = dict(dataset=dataset, model=model, epochs=epochs, batch_size=batch_size, lr=lr,
            train_subset=train_subset, device=device, progress=progress)
variants = [dict(method=m, method_args=method_args.get(m, {}), label=m) for m in methods]
gl.train_grid(base, variants, seeds, runs_root)

# %%
runs = plots.ordered(gl.load_runs(f"{runs_root}/*"), "label", methods)
out = plots.figure_dir(fig_root, "00_quickstart")
plots.set_style()
ax = plots.curves(runs, "epoch", "test_acc", title=f"{model} on {dataset}")
plots.savefig(ax.figure, out / "accuracy")

# %%
final = plots.final_rows(runs)
final = final.assign(best_test_acc=runs.groupby("run_dir")["test_acc"].transform("max").loc[final.index])
table = plots.mean_std(final, ["label"], ["test_acc", "best_test_acc"], scale=100)
table["s/epoch"] = final.groupby("label", sort=False)["epoch_time_s"].mean().round(1).values
plots.save_table(table, out / "summary", caption=f"Test accuracy (%) after {epochs} epochs, {model} on {dataset}")
table
