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
# **Run.** `gvr-lab run notebooks/04_gradient_dynamics.py --preset cpu` (measured: 62 s on 2 CPU
# cores); `--preset gpu` (ResNet-18 and VGG-16 on CIFAR-10, 10 epochs: aimed at about 10 minutes,
# not yet measured on one H100).
#
# **Writes.** `figures/gradient_dynamics/norms.png|pdf` (gradient and PSF norm against step, per
# model), `variation.png|pdf` (relative change of the PSF norm per epoch), `sampling.png|pdf`
# (vSAM's fraction of SAM steps per epoch), `summary.md|tex`.

# %% tags=["parameters"]
dataset: str = "fashion_mnist"  # see gvr_lab.list_datasets()
models: list = ["tiny_cnn", "small_cnn"]  # one vSAM run per model
epochs: int = 4  # passes over the training set
batch_size: int = 128  # examples per step
lr: float = 0.05  # peak learning rate, cosine per step
vsam_args: dict = {"warmup_epochs": 1, "window": 20}  # vSAM hyperparameters
train_subset: int = 10000  # training examples drawn with the seed, 0 for all
log_every: int = 1  # log every step, so every sampled PSF is kept
seeds: list = [0]  # one run per seed and model
device: str = "auto"  # auto, cpu or cuda
progress: bool = False  # progress bars inside the notebook
runs_root: str = "runs/cpu/04_gradient_dynamics"  # training runs; re-running skips finished runs
fig_root: str = "figures"  # figures go to <fig_root>/gradient_dynamics/

# %%
import matplotlib.pyplot as plt

import gvr_lab as gl
from gvr_lab import plots

base = dict(dataset=dataset, method="vsam", method_args=vsam_args, epochs=epochs, batch_size=batch_size, lr=lr,
            train_subset=train_subset, log_every=log_every, device=device, progress=progress)
gl.train_grid(base, [dict(model=m, label=m) for m in models], seeds, runs_root)

# %% [markdown]
# On sampling steps `psf_norm` is the freshly measured ||PSF||; between them vSAM adds a decayed copy,
# so the curves below keep only the sampled steps for the PSF.

# %%
steps = gl.load_runs(f"{runs_root}/*", steps=True)
sampled = steps[steps["sampled"] == 1]
out = plots.figure_dir(fig_root, "04_gradient_dynamics")
plots.set_style()
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
plots.curves(steps, "step", "grad_norm", ax=axes[0], logy=True, title="SGD gradient norm")
plots.curves(sampled, "step", "psf_norm", ax=axes[1], logy=True, title="PSF norm (sampled steps)")
plots.savefig(fig, out / "norms")

# %%
per_epoch = sampled.groupby(["label", "seed", "epoch"])["psf_norm"].mean().reset_index()
per_epoch["psf_change"] = per_epoch.groupby(["label", "seed"])["psf_norm"].pct_change().abs()
ax = plots.curves(per_epoch.dropna(), "epoch", "psf_change", title="relative change of the PSF norm per epoch")
ax.set_ylabel("|relative change| of mean PSF norm")
plots.savefig(ax.figure, out / "variation")

# %%
runs = gl.load_runs(f"{runs_root}/*")
ax = plots.curves(runs, "epoch", "train_sampled", title="vSAM: fraction of two-pass (SAM) steps")
ax.set_ylabel("fraction of SAM steps")
plots.savefig(ax.figure, out / "sampling")
final = plots.final_rows(runs)
table = plots.mean_std(final, ["label"], ["test_acc"], scale=100)
table["SAM-step fraction"] = runs.groupby("label", sort=False)["train_sampled"].mean().round(2).values
plots.save_table(table, out / "summary", caption=f"vSAM on {dataset}, {epochs} epochs")
table
