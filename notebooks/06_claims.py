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
# # 06 · Do the papers' headline claims hold here?
#
# **Question.** For each headline claim of the three seed papers, does it hold in this lab's
# setting, with enough seeds to tell? Every claim is a paired comparison over seeds (seed s gives
# every arm the same initial weights and data order): the mean difference to its baseline with a
# 95% Student t interval, and a verdict computed from that interval (`gvr_lab.stats`):
# **holds** (the interval excludes 0 in the claimed direction), **contradicted** (it excludes 0 in
# the other direction) or **not resolved**; a parity claim holds when its interval lies inside the
# stated margin. The paper's own number stands beside ours; our setting is smaller than the papers'
# at the `cpu` preset, so a verdict says what holds *here*, and the `gpu` and `paper` presets move
# towards their settings.
#
# Protocols, as the papers' code: GVR and the SAM arms train with momentum 0.9, weight decay 5e-4,
# lr 0.05 with a per-epoch cosine, Cutout 0.5 (the GVR code); Novack et al.'s arms train with plain
# SGD (momentum 0, weight decay 0, constant lr), crop and flip, SB and LB for the same number of
# optimizer steps (steps mode), LB = B / m micro-batches accumulated, penalties on micro-batches of
# size m. Label noise: symmetric, on the training labels only, seeded, the test set clean.
#
# **Scale of the Novack arms at the `cpu` preset, and what it cannot show.** Novack et al.'s claims
# are about runs that fit their training set: at equal steps SB and LB both reach it, and SB
# generalizes better. At 2 CPU cores, 5 seeds and ten Novack arms (four of them double-backward
# penalties at about 3x LB's cost) within 2 hours, we found no scale where SB fits its training set.
# Pilot runs, seed 0, Fashion-MNIST, 2,048 training images, lr 0.1 constant, B = 256, m = 32 (clean
# training accuracy on those 2,048 images / test accuracy, alone on 2 cores, 2 December 2026):
#
# | setting | SB | LB | SB seconds | LB seconds |
# |---|---|---|---|---|
# | tiny_cnn, crop + flip, 800 steps (this preset) | 80.5 / 77.9 | | 11 | |
# | tiny_cnn, no augmentation, 800 steps | 83.9 / 79.5 | 85.9 / 81.7 | 9 | 25 |
# | tiny_cnn, no augmentation, 2,400 steps | 94.0 / 83.7 | | 11 | |
# | small_cnn, crop + flip, 800 steps | 80.4 / 77.9 | | 18 | |
# | small_cnn, no augmentation, 800 steps | 93.3 / 83.2 | 97.3 / 83.8 | 19 | 64 |
#
# Short of a fitted training set, LB at equal steps has seen B/m = 8 times SB's examples and is
# ahead; a fitted SB (about 3x the steps of small_cnn without augmentation) would put the Novack
# arms at roughly 3 x 2 = 6 times this preset's cost. So at the `cpu` preset the Novack rows measure
# the protocol outside the regime the paper speaks about, and "SB beats LB" is not expected to
# hold; the claims that rest on that gap get no verdict unless it holds. The `gpu` and `paper`
# presets run the paper's setting (ResNet-18 on CIFAR-10, which SB fits).
#
# **Use.** Pick a preset in the first line of the parameters cell and run all; a value set in a
# cell below the parameters cell overrides the preset. Headless, with two runs at once:
# `gvr-lab run notebooks/06_claims.py --preset cpu --executor ray`.

# %% tags=["parameters"]
preset: str = "cpu"  # smoke | cpu | gpu | paper
dataset: str = "fashion_mnist"  # see gvr_lab.list_datasets()
seeds: list = [0, 1, 2, 3, 4]  # paired seeds; every arm runs every seed
device: str = "auto"  # auto, cpu or cuda
# GVR and SAM arms
model: str = "small_cnn"  # see gvr_lab.list_models()
epochs: int = 6  # passes over the training subset
batch_size: int = 128  # examples per step (and view)
lr: float = 0.05  # peak learning rate, cosine per epoch
cutout: float = 0.5  # Cutout probability
train_subset: int = 4096  # training examples drawn with the seed, 0 for all
alpha: float = 0.01  # GVR's penalty weight
gvr_target: str = "last_stage"  # parameters GVR's penalty acts on: fc, last_stage or all
label_noise: float = 0.4  # symmetric label noise of the robustness claim
rho: float = 0.05  # SAM's and vSAM's radius
vsam_args: dict = {"warmup_epochs": 1, "window": 10, "blocks": 2}  # vSAM's sampling at this length
parity_margin: float = 0.5  # accuracy points within which vSAM counts as comparable to SAM
min_speedup: float = 0.3  # vSAM's training time must be at most (1 - this) x SAM's
# Novack et al.'s arms
novack_model: str = "tiny_cnn"  # see gvr_lab.list_models()
sb_batch: int = 32  # small batch, also every LB method's micro-batch size m
lb_batch: int = 256  # large batch B
steps: int = 800  # optimizer steps of every SB and LB run
novack_lr: float = 0.1  # constant learning rate of SB, LB and the penalties
lam: dict = {"reg_loss": 0.01, "fish_loss": 0.01, "avg_jac_loss": 0.001, "unit_jac_loss": 0.001}  # lambdas
hvp: str = "exact"  # exact (double backward, the original code) or fd
large_m: int = 128  # the larger micro-batch of the GN claim about m
novack_subset: int = 2048  # training examples of the Novack arms, 0 for all
log_every: int = 4  # steps between logged gradient norms (ExterGraft reads SB's)
runs_root: str = ""  # training runs; empty: runs/<preset>/claims/<digest of the parameters>
fig_root: str = ""  # figures and tables; empty: figures/ at the cpu preset, else runs/<preset>/figures

# %%
import gvr_lab as gl
from gvr_lab import plots, stats

study = gl.Study(
    "claims",
    globals(),
    presets={
        "smoke": {
            "dataset": "synthetic",
            "seeds": [0, 1],
            "device": "cpu",
            "model": "tiny_cnn",
            "epochs": 2,
            "batch_size": 32,
            "train_subset": 128,
            "vsam_args": {"warmup_epochs": 1, "window": 2, "blocks": 1},
            "sb_batch": 16,
            "lb_batch": 64,
            "steps": 8,
            "large_m": 32,
            "novack_subset": 256,
            "log_every": 1,
        },
        "cpu": {"device": "cpu"},
        "gpu": {
            "dataset": "cifar10",
            "model": "resnet18",
            "epochs": 30,
            "train_subset": 0,
            "vsam_args": {"warmup_epochs": 3, "window": 50, "blocks": 5},
            "novack_model": "resnet18",
            "sb_batch": 128,
            "lb_batch": 5120,
            "steps": 2000,
            "large_m": 2560,
            "novack_subset": 0,
            "log_every": 20,
        },
        "paper": {
            "dataset": "cifar10",
            "model": "resnet18",
            "epochs": 200,
            "train_subset": 0,
            "vsam_args": {},
            "novack_model": "resnet18",
            "sb_batch": 128,
            "lb_batch": 5120,
            "steps": 5000,
            "large_m": 2560,
            "novack_subset": 0,
            "log_every": 20,
        },
    },
    outputs={
        "claims": "every claim: the paper's number, ours, the paired difference with its 95% CI, n, verdict",
        "claims_data": "the same with every seed's values, machine-readable",
        "forest": "paired differences and 95% CIs per claim, coloured by verdict",
        "arms": "every arm: runs, statuses, test accuracy and training time (mean and 95% CI over seeds)",
    },
    ablations=["two-view SGD (alpha 0)"],
)

# %% [markdown]
# Every grid is built, and so checked, before the first run trains. NGD's fixed step is SB's
# average step length (lr x mean ||g_SB||) and ExterGraft reads SB's logged gradient norms, so those
# two arms are built once SB has trained; their grid is checked first with stand-ins.

# %%
gvr_base = dict(
    dataset=dataset,
    model=model,
    epochs=epochs,
    batch_size=batch_size,
    lr=lr,
    schedule="cosine_epoch",
    momentum=0.9,
    weight_decay=5e-4,
    cutout=cutout,
    train_subset=train_subset,
    device=device,
)
gvr_args = dict(target=gvr_target, penalty="exact", subset=32, reduction="sum")
noisy = dict(label_noise=label_noise, label_noise_kind="symmetric")
sam_family = [
    dict(method="sgd", label="SGD"),
    dict(method="gvr", method_args={**gvr_args, "alpha": alpha}, label="GVR"),
    dict(method="gvr", method_args={**gvr_args, "alpha": 0.0}, label="two-view SGD (alpha 0)"),
    dict(method="sgd", label="SGD, noisy labels", **noisy),
    dict(method="gvr", method_args={**gvr_args, "alpha": alpha}, label="GVR, noisy labels", **noisy),
    dict(method="sam", method_args={"rho": rho}, label="SAM"),
    dict(method="vsam", method_args={"rho": rho, **vsam_args}, label="vSAM"),
]
novack = dict(
    dataset=dataset,
    model=novack_model,
    momentum=0.0,
    weight_decay=0.0,
    schedule="constant",
    lr=novack_lr,
    steps=steps,
    eval_every=max(1, steps // 4),
    train_subset=novack_subset,
    log_every=log_every,
    device=device,
)
micro = dict(micro_batch_size=sb_batch)
penalties = {"reg_loss": "LB+GN", "fish_loss": "LB+FT", "avg_jac_loss": "LB+AJ", "unit_jac_loss": "LB+UJ"}
lb_arms = (
    [dict(method="pseudo_gd", method_args=micro, label="LB")]
    + [dict(method=m, method_args=dict(micro, lam=lam[m], hvp=hvp), label=name) for m, name in penalties.items()]
    + [
        dict(
            method="reg_loss",
            method_args=dict(micro_batch_size=large_m, lam=lam["reg_loss"], hvp=hvp),
            label=f"LB+GN m={large_m}",
        ),
        dict(method="iter_graft", method_args=dict(micro, norm_source="random_micro"), label="IterGraft"),
    ]
)


def after_sb(ngd_lr: float, check_run_dirs: bool = True) -> list:
    ngd = gl.grid_configs(
        dict(novack, batch_size=lb_batch, lr=ngd_lr),
        [dict(method="ngd", method_args=micro, label="NGD")],
        seeds,
        study.runs_root,
        check_run_dirs,
    )
    exter = (
        [
            config
            for seed in seeds
            for config in gl.grid_configs(
                dict(novack, batch_size=lb_batch),
                [
                    dict(
                        method="exter_graft",
                        label="ExterGraft",
                        method_args=dict(micro, norms_path=f"{study.runs_root}/SB-s{seed}"),
                    )
                ],
                [seed],
                study.runs_root,
                check_run_dirs,
            )
        ]
        if check_run_dirs
        else []
    )
    return ngd + exter


first = (
    gl.grid_configs(gvr_base, sam_family, seeds, study.runs_root)
    + gl.grid_configs(dict(novack, batch_size=sb_batch), [dict(method="sgd", label="SB")], seeds, study.runs_root)
    + gl.grid_configs(dict(novack, batch_size=lb_batch), lb_arms, seeds, study.runs_root)
)
after_sb(novack_lr, check_run_dirs=False)
gl.train_configs(first)
ngd_lr = float(novack_lr * study.load_runs(steps=True).query("label == 'SB'")["grad_norm"].mean())
gl.train_configs(after_sb(ngd_lr))

# %% [markdown]
# Each arm, every run: how many seeds, how many runs completed (a diverged run is kept and counted,
# its accuracy is what it reached), test accuracy and training time as mean and 95% CI over seeds.

# %%
order = [v["label"] for v in sam_family] + ["SB"] + [v["label"] for v in lb_arms] + ["NGD", "ExterGraft"]
runs = plots.ordered(study.load_runs(), "label", order)
final = plots.with_best(runs)
# training time: the epochs' (epochs mode) or the evaluation intervals' (steps mode) time, evaluation excluded
timed = runs[[c for c in ("epoch_time_s", "interval_time_s") if c in runs]].sum(axis=1)
final["training_s"] = final["run_dir"].map(timed.groupby(runs["run_dir"]).sum())
arms = plots.mean_ci(final, ["label", "method"], ["test_acc", "training_s"], digits=4).rename(
    columns={"label": "arm", "seeds": "runs"}
)
arms["completed"] = final.groupby("label", sort=False)["status"].agg(lambda s: int((s == "completed").sum())).to_numpy()
arms = arms[["arm", "method", "runs", "completed", "test accuracy (%)", "training time (s)"]]
study.save_table(arms, "arms", "Every arm of the claims study", runs, spread="mean [95% Student t CI] over seeds")

# %% [markdown]
# The claims. "Recovers most of the SB-LB gap" is read as: beats the midpoint of SB and LB of the
# same seed (recovers more than half the gap); "does not" as: below it. The paper's recovered share
# is computed from its table. vSAM's speed is its training time over SAM's, seed by seed.

# %%
acc = {label: stats.by_seed(final, label) for label in final["label"].unique()}
secs = {label: stats.by_seed(final, label, "training_s", scale=1.0) for label in final["label"].unique()}
midpoint = stats.seedwise(lambda sb, lb: (sb + lb) / 2, acc["SB"], acc["LB"])
paper_novack = {
    "SB": 92.64,
    "LB": 89.83,
    "LB+GN": 91.75,
    "LB+FT": 91.50,
    "LB+AJ": 90.13,
    "LB+UJ": 90.15,
    "IterGraft": 92.12,
    "ExterGraft": 92.16,
    "NGD": 92.10,
}  # Novack et al., ResNet-18, CIFAR-10


def recovered(name: str) -> str:
    share = (paper_novack[name] - paper_novack["LB"]) / (paper_novack["SB"] - paper_novack["LB"])
    return f"{paper_novack[name]:.2f} ({100 * share:.0f}% of the gap)"


sb_beats_lb = stats.compare("SB beats LB at equal steps", acc["SB"], acc["LB"])
accuracy_claims = [
    (stats.compare("GVR beats SGD", acc["GVR"], acc["SGD"]), "79.09 vs 78.00 (CIFAR-100, 1 seed)"),
    (stats.compare("GVR beats two-view SGD (alpha 0)", acc["GVR"], acc["two-view SGD (alpha 0)"]), "not measured"),
    (
        stats.compare(
            f"GVR beats SGD under {100 * label_noise:.0f}% symmetric label noise",
            acc["GVR, noisy labels"],
            acc["SGD, noisy labels"],
        ),
        "robustness claimed, no number",
    ),
    (stats.compare("SAM beats SGD", acc["SAM"], acc["SGD"]), "gains reported (CIFAR), other setting"),
    (
        stats.compare(
            f"vSAM is comparable to SAM (within {parity_margin} points)",
            acc["vSAM"],
            acc["SAM"],
            "parity",
            parity_margin,
        ),
        "comparable",
    ),
    (sb_beats_lb, f"{paper_novack['SB']:.2f} vs {paper_novack['LB']:.2f}"),
    # recovering a gap presumes one: these verdicts count only where SB beats LB here
    *(
        (
            stats.compare(f"{name} recovers most of the SB-LB gap", acc[name], midpoint, premise=sb_beats_lb),
            recovered(name),
        )
        for name in ("LB+GN", "LB+FT")
    ),
    *(
        (
            stats.compare(f"{name} does not recover most of the gap", acc[name], midpoint, "less", premise=sb_beats_lb),
            recovered(name),
        )
        for name in ("LB+AJ", "LB+UJ")
    ),
    *(
        (
            stats.compare(f"{name} recovers part of the gap (beats LB)", acc[name], acc["LB"], premise=sb_beats_lb),
            recovered(name),
        )
        for name in ("IterGraft", "ExterGraft", "NGD")
    ),
    (
        stats.compare(
            f"LB+GN at m={sb_batch} beats m={large_m} (its gap grows with m)", acc["LB+GN"], acc[f"LB+GN m={large_m}"]
        ),
        "qualitative (figure)",
    ),
]
speed_claims = [
    (
        stats.compare(
            f"vSAM trains at least {100 * min_speedup:.0f}% faster than SAM",
            stats.seedwise(lambda v, s: v / s, secs["vSAM"], secs["SAM"]),
            {s: 1 - min_speedup for s in seeds},
            "less",
        ),
        "about 40% faster",
    ),
]
table = stats.claims_table(
    [(c, paper, 2) for c, paper in accuracy_claims] + [(c, paper, 3) for c, paper in speed_claims]
)
study.save_table(
    table,
    "claims",
    "Claims: accuracy in %, verdicts from the 95% CIs",
    runs,
    spread="differences paired by seed, 95% Student t CI",
)
study.save_data([{**c.as_dict(), "paper": paper} for c, paper in accuracy_claims + speed_claims], "claims_data")

# %%
fig = plots.forest(
    {
        "test accuracy difference (points), method - baseline": [c for c, _ in accuracy_claims],
        f"vSAM / SAM training time - {1 - min_speedup:g}": [c for c, _ in speed_claims],
    }
)
study.save_figure(fig, "forest", runs, spread="mean paired difference and its 95% Student t CI")
