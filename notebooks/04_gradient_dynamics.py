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
# **Exploratory.** This notebook tests no claim: its figures and table describe what the runs did,
# with the 95% confidence interval of the mean over seeds. Whether vSAM keeps SAM's accuracy for less
# time is decided in `notebooks/06_claims.py`, under a protocol registered before its runs.
#
# The cpu preset trains vSAM on 4,096 Fashion-MNIST images for 20 epochs, 3 seeds per model; every
# figure and table says whether each model's training had plateaued by then (doubling it raising the
# test accuracy by less than 0.5 points; the training loss, which keeps falling as the network
# memorizes its training set, is stated beside it), computed from the runs.
#
# **Use.** Pick a preset in the first line of the parameters cell (`smoke`, `cpu`: the committed
# figures, `gpu`: ResNet-18 and VGG-16 on CIFAR-10, 10 epochs, `paper`: CIFAR-100, 200 epochs) and
# run all; a parameter set in a cell below the parameters cell overrides the preset. Headless:
# `gvr-lab run notebooks/04_gradient_dynamics.py --preset cpu`.

# %% tags=["parameters"]
preset: str = "cpu"  # smoke | cpu | gpu | paper
dataset: str = "fashion_mnist"  # see gvr_lab.list_datasets()
models: list = ["tiny_cnn", "small_cnn"]  # one vSAM run per model
epochs: int = 20  # passes over the training set
batch_size: int = 128  # examples per step
lr: float = 0.05  # peak learning rate, cosine per step
vsam_args: dict = {"warmup_epochs": 1, "window": 10, "blocks": 2}  # vSAM hyperparameters (paper: window 50)
train_subset: int = 4096  # training examples drawn with the seed, 0 for all
log_every: int = 1  # log every step, so every sampled PSF is kept
seeds: list = [0, 1, 2]  # one run per seed and model
device: str = "auto"  # auto, cpu or cuda
runs_root: str = ""  # training runs; empty: runs/<preset>/gradient_dynamics/<digest of the parameters>
fig_root: str = ""  # figures and tables; empty: figures/ at the cpu preset, else runs/<preset>/figures

# %%
import matplotlib.pyplot as plt

import gvr_lab as gl
from gvr_lab import claims, plots

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
            "seeds": [0],
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
            "seeds": [0],
        },
        "paper": {
            "dataset": "cifar100",
            "models": ["resnet18", "wrn28_10", "pyramidnet110"],
            "epochs": 200,
            "train_subset": 0,
            "log_every": 10,
            "vsam_args": {},
            "seeds": [0],
        },
    },
    outputs={
        "norms": "SGD gradient norm at every step (mean and 95% CI over seeds) and PSF norm at the sampled steps",
        "variation": "relative change of the mean PSF norm from one epoch to the next, mean and 95% CI over seeds",
        "sampling": "vSAM's share of SAM (two-pass) steps per epoch, mean and 95% CI over seeds",
        "summary": "test accuracy (mean [95% CI] over seeds) and share of SAM steps per model",
    },
    exploratory=True,
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
variants = [dict(model=m, label=m) for m in models]
gl.train_grid(base, variants, seeds, study.runs_root)

# %% [markdown]
# On sampling steps `psf_norm` is the freshly measured ||PSF||; between them vSAM adds a decayed copy,
# so the PSF panel shows only the sampled steps, as points: a line would join samples tens of steps apart.

# %%
runs = study.load_runs()
half = claims.half_budget_runs(base, variants, seeds, study.runs_root)
plateau = "; ".join(claims.plateau_note(runs, m, half) for m in models)
steps = study.plotted(study.load_runs(steps=True))
sampled = steps[steps["sampled"] == 1]
fig, axes = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
plots.curves(steps, "step", "grad_norm", ax=axes[0], logy=True, title="SGD gradient norm (every step)", band="ci")
plots.curves(sampled, "step", "psf_norm", ax=axes[1], logy=True, title="PSF norm (sampled steps)", points=True)
study.save_figure(fig, "norms", steps, spread=f"{plots.ci_spread(steps)}; every sampled PSF norm a point; {plateau}")

# %%
per_epoch = sampled.groupby(["label", "method", "seed", "epoch", "run_dir"])["psf_norm"].mean().reset_index()
per_epoch["psf_change"] = per_epoch.groupby(["label", "seed"])["psf_norm"].pct_change().abs()
ax = plots.curves(
    per_epoch.dropna(), "epoch", "psf_change", title="relative change of the PSF norm per epoch", band="ci"
)
ax.set_ylabel("|relative change| of mean PSF norm")
study.save_figure(ax.figure, "variation", per_epoch, spread=f"{plots.ci_spread(per_epoch)}; {plateau}")

# %%
shown = study.plotted(runs).assign(sam_steps=lambda d: 100 * d["train_sampled"])
ax = plots.curves(shown, "epoch", "sam_steps", title="vSAM: share of two-pass (SAM) steps", band="ci")
ax.set_ylabel("SAM steps (% of the epoch)")
study.save_figure(ax.figure, "sampling", shown, spread=f"{plots.ci_spread(shown)}; {plateau}")

# %%
table = plots.mean_ci(plots.final_rows(runs), ["label"], ["test_acc"])
spread = f"{plots.ci_spread(runs)}; {plateau}"
study.save_table(study.term_column(runs, table), "summary", f"vSAM after {epochs} epochs", runs, spread=spread)
