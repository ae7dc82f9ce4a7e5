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
# layer at full precision), how do SGD, SAM and vSAM compare in accuracy and time, and how far is
# each from its own full-precision run?
#
# **Use.** Pick a preset in the first line of the parameters cell (`smoke`, `cpu`: the committed
# figures, `gpu`: CIFAR-10, ResNet-18, 10 epochs, `paper`: CIFAR-100, 200 epochs) and run all; a
# parameter set in a cell below the parameters cell overrides the preset. Headless:
# `gvr-lab run notebooks/05_quantization.py --preset cpu`.

# %% tags=["parameters"]
preset: str = "cpu"  # smoke | cpu | gpu | paper
dataset: str = "fashion_mnist"  # see gvr_lab.list_datasets()
model: str = "small_cnn"  # see gvr_lab.list_models()
bits: list = [4, 3, 2]  # LSQ bit widths of weights and activations; every method also trains at full precision
methods: list = ["sgd", "sam", "vsam"]  # compared methods
method_args: dict = {"vsam": {"warmup_epochs": 1, "window": 10, "blocks": 2}}  # per-method hyperparameters
epochs: int = 3  # passes over the training set
batch_size: int = 128  # examples per step
lr: float = 0.05  # peak learning rate, cosine per step
train_subset: int = 10000  # training examples drawn with the seed, 0 for all
seeds: list = [0]  # one run per seed, method and bit width
device: str = "auto"  # auto, cpu or cuda
runs_root: str = ""  # training runs; empty: runs/<preset>/quantization/<digest of the parameters>
fig_root: str = ""  # figures and tables; empty: figures/ at the cpu preset, else runs/<preset>/figures

# %%
import gvr_lab as gl
from gvr_lab import plots

study = gl.Study(
    "quantization",
    globals(),
    presets={
        "smoke": {
            "dataset": "synthetic",
            "model": "tiny_cnn",
            "bits": [4, 2],
            "epochs": 4,
            "train_subset": 512,
            "batch_size": 64,
            "method_args": {"vsam": {"warmup_epochs": 1, "window": 2, "blocks": 1}},
            "device": "cpu",
        },
        "cpu": {"device": "cpu"},
        "gpu": {
            "dataset": "cifar10",
            "model": "resnet18",
            "epochs": 10,
            "train_subset": 0,
            "batch_size": 256,
            "lr": 0.1,
            "method_args": {"vsam": {"warmup_epochs": 2}},
        },
        "paper": {
            "dataset": "cifar100",
            "model": "resnet18",
            "epochs": 200,
            "train_subset": 0,
            "seeds": [0, 1, 2],
            "method_args": {"vsam": {}},
        },
    },
    outputs={
        "accuracy_vs_bits": "test accuracy against bit width per method, its full-precision run dashed",
        "summary": "test accuracy and time per epoch per method and bit width",
    },
)

# %%
base = dict(
    dataset=dataset, model=model, epochs=epochs, batch_size=batch_size, lr=lr, train_subset=train_subset, device=device
)
gl.train_grid(
    base,
    [
        dict(
            method=m,
            method_args=method_args.get(m, {}),
            quant_bits=b,
            label=f"{m} {b}-bit" if b else f"{m} full precision",
        )
        for b in [0, *bits]
        for m in methods
    ],
    seeds,
    study.runs_root,
)

# %%
runs = study.load_runs()
final = plots.ordered(plots.final_rows(runs).sort_values("quant_bits", ascending=False), "method", methods)
shown = study.plotted(final)
quantized = shown[shown["quant_bits"] > 0]
ax = plots.curves(quantized, "quant_bits", "test_acc", hue="method", title=f"LSQ, {model} on {dataset}", legend=False)
for method, rows in shown[shown["quant_bits"] == 0].groupby("method", sort=False):
    ax.axhline(
        100 * rows["test_acc"].mean(), ls="--", lw=1, color=plots.method_color(method), label=f"{method} full precision"
    )
plots.integer_ticks(ax.xaxis, quantized["quant_bits"])
ax.set_xlabel("bits (weights and activations)")
plots.legend_outside(ax)
study.save_figure(ax.figure, "accuracy_vs_bits", shown)

# %%
table = plots.mean_std(final, ["label"], ["test_acc"])
table["s/epoch"] = final.groupby("label", sort=False)["epoch_time_s"].mean().round(1).values
study.save_table(study.term_column(runs, table), "summary", f"LSQ test accuracy after {epochs} epochs", runs)
