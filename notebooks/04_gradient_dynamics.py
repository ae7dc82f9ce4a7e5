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
# # 04 · Gradient norm and PSF over training, and vSAM's sampling
#
# **Question.** vSAM rests on two observations: the SGD gradient norm and the norm of SAM's
# second-order component (PSF = SAM gradient minus SGD gradient) follow similar trends, and the
# PSF changes slowly early in training and faster later, so it can be sampled rarely at first.
# Do both hold on our models, and how does vSAM's fraction of two-pass steps evolve?
#
# vSAM samples SAM steps per window of `window` steps after its warm-up, at least one per window:
# a window of 10 here (50 in the paper) so a few epochs hold enough sampled PSF norms to plot.
#
# **Use.** Pick a preset in the first line of the parameters cell (`smoke`, `cpu`: the committed
# figures, `gpu`: ResNet-18 and VGG-16 on CIFAR-10, 10 epochs, `paper`: CIFAR-100, 200 epochs) and
# run all; a parameter set in a cell below the parameters cell overrides the preset. Headless:
# `gvr-lab run notebooks/04_gradient_dynamics.py --preset cpu`.

# %% tags=["parameters"]
preset: str = "cpu"  # smoke | cpu | gpu | paper
dataset: str = "fashion_mnist"  # see gvr_lab.list_datasets()
models: list = ["tiny_cnn", "small_cnn"]  # one vSAM run per model
epochs: int = 4  # passes over the training set
batch_size: int = 128  # examples per step
lr: float = 0.05  # peak learning rate, cosine per step
vsam_args: dict = {"warmup_epochs": 1, "window": 10, "blocks": 2}  # vSAM hyperparameters (paper: window 50)
train_subset: int = 10000  # training examples drawn with the seed, 0 for all
log_every: int = 1  # log every step, so every sampled PSF is kept
seeds: list = [0]  # one run per seed and model
device: str = "auto"  # auto, cpu or cuda
runs_root: str = ""  # training runs; empty: runs/<preset>/gradient_dynamics/<digest of the parameters>
fig_root: str = ""  # figures and tables; empty: figures/ at the cpu preset, else runs/<preset>/figures

# %%
import matplotlib.pyplot as plt

import gvr_lab as gl
from gvr_lab import plots

study = gl.Study(
    "gradient_dynamics",
    globals(),
    presets={
        "smoke": {
            "models": ["tiny_cnn"],
            "epochs": 2,
            "train_subset": 2048,
            "batch_size": 64,
            "vsam_args": {"warmup_epochs": 1, "window": 2, "blocks": 1},
            "device": "cpu",
        },
        "cpu": {"device": "cpu"},
        "gpu": {
            "dataset": "cifar10",
            "models": ["resnet18", "vgg16"],
            "epochs": 10,
            "train_subset": 0,
            "batch_size": 256,
            "lr": 0.1,
            "log_every": 5,
            "vsam_args": {"warmup_epochs": 3},
        },
        "paper": {
            "dataset": "cifar100",
            "models": ["resnet18", "wrn28_10", "pyramidnet110"],
            "epochs": 200,
            "train_subset": 0,
            "log_every": 10,
            "vsam_args": {},
        },
    },
    outputs={
        "norms": "SGD gradient norm at every step and PSF norm at the sampled steps, per model",
        "variation": "relative change of the mean PSF norm from one epoch to the next",
        "sampling": "vSAM's share of SAM (two-pass) steps per epoch",
        "summary": "test accuracy and share of SAM steps per model",
    },
)

# %%
base = dict(
    dataset=dataset,
    method="vsam",
    method_args=vsam_args,
    epochs=epochs,
    batch_size=batch_size,
    lr=lr,
    train_subset=train_subset,
    log_every=log_every,
    device=device,
)
gl.train_grid(base, [dict(model=m, label=m) for m in models], seeds, study.runs_root)

# %% [markdown]
# On sampling steps `psf_norm` is the freshly measured ||PSF||; between them vSAM adds a decayed copy,
# so the PSF panel shows only the sampled steps, as points: a line would join samples tens of steps apart.

# %%
steps = study.plotted(study.load_runs(steps=True))
sampled = steps[steps["sampled"] == 1]
fig, axes = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
plots.curves(steps, "step", "grad_norm", ax=axes[0], logy=True, title="SGD gradient norm (every step)")
plots.curves(sampled, "step", "psf_norm", ax=axes[1], logy=True, title="PSF norm (sampled steps)", points=True)
study.save_figure(fig, "norms", steps)

# %%
per_epoch = sampled.groupby(["label", "method", "seed", "epoch", "run_dir"])["psf_norm"].mean().reset_index()
per_epoch["psf_change"] = per_epoch.groupby(["label", "seed"])["psf_norm"].pct_change().abs()
ax = plots.curves(per_epoch.dropna(), "epoch", "psf_change", title="relative change of the PSF norm per epoch")
ax.set_ylabel("|relative change| of mean PSF norm")
study.save_figure(ax.figure, "variation", per_epoch)

# %%
runs = study.load_runs()
shown = study.plotted(runs).assign(sam_steps=lambda d: 100 * d["train_sampled"])
ax = plots.curves(shown, "epoch", "sam_steps", title="vSAM: share of two-pass (SAM) steps")
ax.set_ylabel("SAM steps (% of the epoch)")
study.save_figure(ax.figure, "sampling", shown)

# %%
table = plots.mean_std(plots.final_rows(runs), ["label"], ["test_acc"])
study.save_table(study.term_column(runs, table), "summary", f"vSAM after {epochs} epochs", runs)
