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
# # 01 · GVR against SGD, and against two-view SGD (alpha = 0)
#
# **Question.** GVR reports +1.09 points over SGD on CIFAR-100/ResNet-18 (79.09 vs 78.00, one seed).
# Its loss sums two views' mean losses, so at alpha = 0 it is two-view SGD at about twice the
# effective learning rate, an ablation the original lacks. How much of the gain is the penalty?
#
# **Exploratory.** This notebook tests no claim: its figures and tables describe what the runs did,
# with the 95% confidence interval of the mean over seeds. Whether GVR beats SGD, or two-view SGD, is
# decided in `notebooks/06_claims.py`, under a protocol registered before its runs.
#
# The cpu preset trains 4,096 images for 40 epochs, 3 seeds per variant (the claims pilot's
# setting); every figure and table says whether SGD's training had plateaued by then (doubling it
# raising the test accuracy by less than 0.5 points; the training loss, which keeps falling as the
# network memorizes its training set, is stated beside it), computed from the runs.
#
# **Use.** Pick a preset in the first line of the parameters cell (`smoke`, `cpu`: the committed
# figures, `gpu`: CIFAR-100, ResNet-18, 30 epochs, 2 seeds, `paper`: the GVR repository's settings:
# 200 epochs, lr 0.05, cosine per epoch, Cutout 0.5, alpha 0.01, last stage + fc, double backward)
# and run all; a parameter set in a cell below the parameters cell overrides the preset. Headless:
# `gvr-lab run notebooks/01_gvr_vs_sgd.py --preset cpu`.

# %% tags=["parameters"]
preset: str = "cpu"  # smoke | cpu | gpu | paper
dataset: str = "fashion_mnist"  # see gvr_lab.list_datasets()
model: str = "small_cnn"  # see gvr_lab.list_models()
epochs: int = 40  # passes over the training set
batch_size: int = 128  # examples per step and view
lr: float = 0.05  # peak learning rate, as the GVR scripts
schedule: str = "cosine_epoch"  # the GVR code steps its cosine once per epoch
momentum: float = 0.9  # heavy-ball momentum
weight_decay: float = 0.0005  # coupled L2 on every parameter
cutout: float = 0.5  # Cutout probability, as the GVR code
alpha: float = 0.01  # penalty weight of GVR
target: str = "last_stage"  # fc, last_stage (the original code) or all
penalty: str = "exact"  # closed_form (fc only), exact (double backward) or fd
subset: int = 32  # examples of the batch the penalty uses
train_subset: int = 4096  # training examples drawn with the seed, 0 for all
eval_every: int = 5  # epochs between evaluations (and the last), 0 for every epoch
seeds: list = [0, 1, 2]  # one run per seed and variant
device: str = "auto"  # auto, cpu or cuda
runs_root: str = ""  # training runs; empty: runs/<preset>/gvr_vs_sgd/<digest of the parameters>
fig_root: str = ""  # figures and tables; empty: figures/ at the cpu preset, else runs/<preset>/figures

# %%
import matplotlib.pyplot as plt

import gvr_lab as gl
from gvr_lab import claims, plots

study = gl.Study(
    "gvr_vs_sgd",
    globals(),
    presets={
        "smoke": {
            "model": "tiny_cnn",
            "epochs": 2,
            "train_subset": 2048,
            "batch_size": 64,
            "subset": 16,
            "seeds": [0],
            "eval_every": 0,
            "device": "cpu",
        },
        "cpu": {"device": "cpu"},
        "gpu": {
            "dataset": "cifar100",
            "model": "resnet18",
            "epochs": 30,
            "train_subset": 0,
            "eval_every": 0,
            "seeds": [0, 1],
        },
        "paper": {
            "dataset": "cifar100",
            "model": "resnet18",
            "epochs": 200,
            "train_subset": 0,
            "eval_every": 0,
            "seeds": [42, 0, 1],
        },
    },
    outputs={
        "accuracy": "test accuracy per evaluation, mean and 95% CI over seeds",
        "penalty": "GVR's penalty and the two views' gradient difference over steps, mean and 95% CI over seeds",
        "summary": "final and best test accuracy (mean [95% CI] over seeds), time per epoch (mean ± std)",
    },
    ablations=["two-view SGD (alpha 0)"],
    exploratory=True,
)

# %%
base = dict(
    dataset=dataset,
    model=model,
    epochs=epochs,
    batch_size=batch_size,
    lr=lr,
    schedule=schedule,
    momentum=momentum,
    weight_decay=weight_decay,
    cutout=cutout,
    train_subset=train_subset,
    eval_every=eval_every,
    device=device,
)
gvr_args = dict(target=target, penalty=penalty, subset=subset, reduction="sum")
variants = [
    dict(method="sgd", label="SGD"),
    dict(method="gvr", method_args={**gvr_args, "alpha": 0.0}, label="two-view SGD (alpha 0)"),
    dict(method="gvr", method_args={**gvr_args, "alpha": alpha}, label=f"GVR (alpha {alpha})"),
]
gl.train_grid(base, variants, seeds, study.runs_root)

# %% [markdown]
# Bands, bars and [low, high] are the 95% Student t interval of the mean over seeds; every footer says
# whether the baseline (SGD) had stopped learning, by the claims study's plateau rule: SGD trained again
# for half the epochs (its own cosine schedule) against the whole budget.

# %%
labels = [v["label"] for v in variants]
runs = plots.ordered(study.load_runs(), "label", labels)
plateau = claims.plateau_note(runs, "SGD", claims.half_budget_runs(base, variants[:1], seeds, study.runs_root))
shown = study.plotted(runs)
ax = plots.curves(shown, "epoch", "test_acc", title=f"{model} on {dataset}", band="ci")
study.save_figure(ax.figure, "accuracy", shown, spread=f"{plots.ci_spread(shown)}; {plateau}")

# %%
steps = plots.ordered(study.plotted(study.load_runs(steps=True)), "label", labels)
two_view = steps[steps["method"] == "gvr"]
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
plots.curves(two_view, "step", "penalty", ax=axes[0], logy=True, legend=False, band="ci")
plots.curves(two_view, "step", "grad_diff_norm", ax=axes[1], logy=True, band="ci")
study.save_figure(fig, "penalty", two_view, spread=f"{plots.ci_spread(two_view)}; {plateau}")

# %%
final = plots.with_best(runs)
table = plots.mean_ci(final, ["label"], ["test_acc", "best_test_acc"])
speed = plots.mean_std(final, ["label"], ["epoch_time_s"], digits=1)
table["s/epoch (mean ± std)"] = speed[plots.label("epoch_time_s")].values
caption = f"Test accuracy after {epochs} epochs; time per epoch as mean ± std, no interval: runs shared the cores"
study.save_table(study.term_column(runs, table), "summary", caption, runs, spread=f"{plots.ci_spread(runs)}; {plateau}")
