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
# # 05 · Quantization-aware training (LSQ) with SGD, SAM and vSAM
#
# **Question.** vSAM reports that its speed-up carries over to quantization-aware training. With
# learned step-size quantization (LSQ) of weights and activations at 4, 3 and 2 bits (first and last
# layer at full precision), how do SGD, SAM and vSAM compare in accuracy and time?
#
# **Run.** `gvr-lab run notebooks/05_quantization.py --preset cpu` (measured: 292 s on 2 CPU
# cores); `--preset gpu` (CIFAR-10, ResNet-18, 10 epochs: aimed at about 10 minutes, not yet
# measured on one H100).
#
# **Writes.** `figures/quantization/accuracy_vs_bits.png|pdf`, `figures/quantization/summary.md|tex`.

# %% tags=["parameters"]
dataset: str = "fashion_mnist"  # see gvr_lab.list_datasets()
model: str = "small_cnn"  # see gvr_lab.list_models()
bits: list = [4, 3, 2]  # LSQ bit widths of weights and activations
methods: list = ["sgd", "sam", "vsam"]  # compared methods
method_args: dict = {"vsam": {"warmup_epochs": 1}}  # per-method hyperparameters
epochs: int = 3  # passes over the training set
batch_size: int = 128  # examples per step
lr: float = 0.05  # peak learning rate, cosine per step
train_subset: int = 10000  # training examples drawn with the seed, 0 for all
seeds: list = [0]  # one run per seed, method and bit width
device: str = "auto"  # auto, cpu or cuda
progress: bool = False  # progress bars inside the notebook
runs_root: str = "runs/cpu/05_quantization"  # training runs; re-running skips finished runs
fig_root: str = "figures"  # figures go to <fig_root>/quantization/

# %%
import gvr_lab as gl
from gvr_lab import plots

base = dict(dataset=dataset, model=model, epochs=epochs, batch_size=batch_size, lr=lr, train_subset=train_subset,
            device=device, progress=progress)
gl.train_grid(base, [dict(method=m, method_args=method_args.get(m, {}), quant_bits=b, label=f"{m} {b}-bit")
                     for b in bits for m in methods], seeds, runs_root)

# %%
runs = gl.load_runs(f"{runs_root}/*")
final = plots.ordered(plots.final_rows(runs).sort_values("quant_bits", ascending=False), "method", methods)
out = plots.figure_dir(fig_root, "05_quantization")
plots.set_style()
ax = plots.curves(final.assign(test_acc=100 * final["test_acc"]), "quant_bits", "test_acc", hue="method",
                  title=f"LSQ, {model} on {dataset}")
ax.set_xlabel("bits (weights and activations)")
ax.set_ylabel("test accuracy (%)")
plots.savefig(ax.figure, out / "accuracy_vs_bits")

# %%
table = plots.mean_std(final, ["method", "quant_bits"], ["test_acc"], scale=100)
table["s/epoch"] = final.groupby(["method", "quant_bits"], sort=False)["epoch_time_s"].mean().round(1).values
plots.save_table(table, out / "summary", caption=f"LSQ test accuracy (%), {model} on {dataset}, {epochs} epochs")
table
