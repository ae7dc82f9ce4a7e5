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
# learned step-size quantization (LSQ) of weights and activations at 4 and 2 bits (also 3 at the gpu
# and paper presets; first and last layer at full precision), how do SGD, SAM and vSAM compare in
# accuracy and time, and how far is each from its own full-precision run?
#
# **Exploratory.** This notebook tests no claim: its figure and table describe what the runs did,
# accuracies with the 95% confidence interval of the mean over seeds. The papers' claims about SAM and
# vSAM are tested in `notebooks/06_claims.py`, under a protocol registered before its runs.
#
# The cpu preset trains 2,048 Fashion-MNIST images for 20 epochs at 4 and 2 bits and at full
# precision, 3 seeds per method and bit width; the figure and table say whether full-precision SGD's
# training had plateaued by then (doubling it raising the test accuracy by less than 0.5 points; the
# training loss, which keeps falling as the network memorizes its training set, is stated beside
# it), computed from the runs.
#
# **Use.** Pick a preset in the first line of the parameters cell (`smoke`, `cpu`: the committed
# figures, `gpu`: CIFAR-10, ResNet-18, 10 epochs, `paper`: CIFAR-100, 200 epochs) and run all; a
# parameter set in a cell below the parameters cell overrides the preset. Headless:
# `gvr-lab run notebooks/05_quantization.py --preset cpu`.

# %% tags=["parameters"]
preset: str = "cpu"  # smoke | cpu | gpu | paper
dataset: str = "fashion_mnist"  # see gvr_lab.list_datasets()
model: str = "small_cnn"  # see gvr_lab.list_models()
bits: list = [4, 2]  # LSQ bit widths of weights and activations; every method also trains at full precision
methods: list = ["sgd", "sam", "vsam"]  # compared methods
method_args: dict = {"vsam": {"warmup_epochs": 1, "window": 10, "blocks": 2}}  # per-method hyperparameters
epochs: int = 20  # passes over the training set
batch_size: int = 128  # examples per step
lr: float = 0.05  # peak learning rate, cosine per step
train_subset: int = 2048  # training examples drawn with the seed, 0 for all
eval_every: int = 5  # epochs between evaluations (and the last), 0 for every epoch
seeds: list = [0, 1, 2]  # one run per seed, method and bit width
device: str = "auto"  # auto, cpu or cuda
runs_root: str = ""  # training runs; empty: runs/<preset>/quantization/<digest of the parameters>
fig_root: str = ""  # figures and tables; empty: figures/ at the cpu preset, else runs/<preset>/figures

# %%
import gvr_lab as gl
from gvr_lab import claims, plots

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
            "eval_every": 0,
            "seeds": [0],
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
            "bits": [4, 3, 2],
            "eval_every": 0,
            "seeds": [0],
            "method_args": {"vsam": {"warmup_epochs": 2}},
        },
        "paper": {
            "dataset": "cifar100",
            "model": "resnet18",
            "epochs": 200,
            "train_subset": 0,
            "bits": [4, 3, 2],
            "eval_every": 0,
            "seeds": [0, 1, 2],
            "method_args": {"vsam": {}},
        },
    },
    outputs={
        "accuracy_vs_bits": "test accuracy against bit width per method, its full-precision runs dashed; 95% CIs",
        "summary": "test accuracy (mean [95% CI] over seeds) and time per epoch (mean ± std) per method and bit width",
    },
    exploratory=True,
)

# %%
base = dict(
    dataset=dataset,
    model=model,
    epochs=epochs,
    batch_size=batch_size,
    lr=lr,
    train_subset=train_subset,
    eval_every=eval_every,
    device=device,
)
variants = [
    dict(
        method=m, method_args=method_args.get(m, {}), quant_bits=b, label=f"{m} {b}-bit" if b else f"{m} full precision"
    )
    for b in [0, *bits]
    for m in methods
]
gl.train_grid(base, variants, seeds, study.runs_root)

# %%
runs = study.load_runs()
plateau = claims.plateau_note(
    runs, variants[0]["label"], claims.half_budget_runs(base, variants[:1], seeds, study.runs_root)
)
final = plots.ordered(plots.final_rows(runs).sort_values("quant_bits", ascending=False), "method", methods)
shown = study.plotted(final)
quantized = shown[shown["quant_bits"] > 0]
ax = plots.curves(
    quantized, "quant_bits", "test_acc", hue="method", title=f"LSQ, {model} on {dataset}", legend=False, band="ci"
)
for method, rows in shown[shown["quant_bits"] == 0].groupby("method", sort=False):
    plots.level_with_ci(ax, rows, "test_acc", f"{method} full precision", plots.method_color(method))
plots.integer_ticks(ax.xaxis, quantized["quant_bits"])
ax.set_xlabel("bits (weights and activations)")
plots.legend_outside(ax)
study.save_figure(ax.figure, "accuracy_vs_bits", shown, spread=f"{plots.ci_spread(shown)}; {plateau}")

# %%
table = plots.mean_ci(final, ["label"], ["test_acc"])
timing = plots.mean_std(final, ["label"], ["epoch_time_s"], digits=1)
table["s/epoch (mean ± std)"] = timing[plots.label("epoch_time_s")].values
caption = f"LSQ test accuracy after {epochs} epochs; time per epoch as mean ± std, no interval: runs shared the cores"
study.save_table(study.term_column(runs, table), "summary", caption, runs, spread=f"{plots.ci_spread(runs)}; {plateau}")
