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
# A short run must still exercise each method: SAF compares logits with those of `lag` epochs ago
# and so acts only from epoch max(start_epoch, lag) + 1 on (lag 1 here, 3 in the paper); vSAM
# samples SAM steps per window of `window` steps after its warm-up (a window of 10 here, 50 in the
# paper, so it can take more than one in 50). The table's "term on" column says on what share of
# steps each method's own term acted; a run where it never did is not plotted.
#
# **Exploratory.** This notebook tests no claim: its figure and table describe what the runs did,
# accuracies with the 95% confidence interval of the mean over seeds. Whether SAM beats SGD, and
# whether vSAM keeps SAM's accuracy for less time, is decided in `notebooks/06_claims.py`, under a
# protocol registered before its runs.
#
# The cpu preset trains 2,048 Fashion-MNIST images for 30 epochs, 3 seeds per method; the figure and
# table say whether SGD's training had plateaued by then (doubling it raising the test accuracy by
# less than 0.5 points; the training loss, which keeps falling as the network memorizes its training
# set, is stated beside it), computed from the runs.
#
# **Use.** Pick a preset in the first line of the parameters cell (`smoke`, `cpu`: the committed
# figures, `gpu`: CIFAR-10, ResNet-18, 15 epochs, 2 seeds, `paper`: CIFAR-100, 200 epochs, the
# papers' hyperparameters) and run all; a parameter set in a cell below the parameters cell
# overrides the preset. Headless: `gvr-lab run notebooks/03_sam_efficiency.py --preset cpu`.

# %% tags=["parameters"]
preset: str = "cpu"  # smoke | cpu | gpu | paper
dataset: str = "fashion_mnist"  # see gvr_lab.list_datasets()
model: str = "small_cnn"  # see gvr_lab.list_models()
methods: list = ["sgd", "sam", "looksam", "esam", "saf", "vsam"]  # compared methods
method_args: dict = {
    "vsam": {"warmup_epochs": 1, "window": 10, "blocks": 2},
    "saf": {"kl_start_epoch": 0, "lag": 1},
}  # per method
epochs: int = 30  # passes over the training set
batch_size: int = 128  # examples per step
lr: float = 0.05  # peak learning rate, cosine per step
weight_decay: float = 0.0005  # coupled L2
label_smoothing: float = 0.0  # vSAM's script uses 0.1
train_subset: int = 2048  # training examples drawn with the seed, 0 for all
eval_every: int = 5  # epochs between evaluations (and the last), 0 for every epoch
seeds: list = [0, 1, 2]  # one run per seed and method
device: str = "auto"  # auto, cpu or cuda
runs_root: str = ""  # training runs; empty: runs/<preset>/sam_efficiency/<digest of the parameters>
fig_root: str = ""  # figures and tables; empty: figures/ at the cpu preset, else runs/<preset>/figures

# %%
import gvr_lab as gl
from gvr_lab import claims, plots

study = gl.Study(
    "sam_efficiency",
    globals(),
    presets={
        "smoke": {
            "model": "tiny_cnn",
            "epochs": 3,
            "train_subset": 2048,
            "batch_size": 64,
            "method_args": {
                "vsam": {"warmup_epochs": 1, "window": 2, "blocks": 1},
                "saf": {"kl_start_epoch": 0, "lag": 1},
            },
            "eval_every": 0,
            "seeds": [0],
            "device": "cpu",
        },
        "cpu": {"device": "cpu"},
        "gpu": {
            "dataset": "cifar10",
            "model": "resnet18",
            "epochs": 15,
            "train_subset": 0,
            "batch_size": 256,
            "lr": 0.1,
            "eval_every": 0,
            "seeds": [0, 1],
            "method_args": {"vsam": {"warmup_epochs": 3}, "saf": {"kl_start_epoch": 3}},
        },
        "paper": {
            "dataset": "cifar100",
            "model": "resnet18",
            "epochs": 200,
            "train_subset": 0,
            "lr": 0.05,
            "weight_decay": 0.001,
            "label_smoothing": 0.1,
            "eval_every": 0,
            "seeds": [0, 1, 2],
            "method_args": {"vsam": {}, "saf": {}},
        },
    },
    outputs={
        "accuracy_vs_throughput": "final test accuracy against training images per second, 95% CIs over seeds",
        "summary": "test accuracy (mean [95% CI]), images/s and time per epoch (mean ± std), share of steps "
        "each method's term acted on",
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
    weight_decay=weight_decay,
    label_smoothing=label_smoothing,
    train_subset=train_subset,
    eval_every=eval_every,
    device=device,
)
variants = [dict(method=m, method_args=method_args.get(m, {}), label=m) for m in methods]
gl.train_grid(base, variants, seeds, study.runs_root)

# %% [markdown]
# Throughput is measured per evaluation interval by the training loop (training steps only,
# evaluation excluded); the first interval includes warm-up effects, so it is left out of the averages
# when there are more. Runs train two at a time on shared cores, so a throughput is a measurement of
# this machine's load as much as of the method: the figure and the table give its mean ± std over
# seeds, no interval; accuracies carry the 95% CI.

# %%
runs = plots.ordered(study.load_runs(), "label", methods)
sgd = [v for v in variants if v["label"] == "sgd"]
plateau = claims.plateau_note(runs, "sgd", claims.half_budget_runs(base, sgd, seeds, study.runs_root))
first = runs.groupby("run_dir")["epoch"].transform("min")
steady = runs[runs["epoch"] > first] if (runs["epoch"] > first).any() else runs
speed = steady.groupby(["label", "run_dir"], sort=False)[["images_per_s", "epoch_time_s"]].mean().reset_index()
final = plots.final_rows(runs).merge(speed, on=["label", "run_dir"], suffixes=("_last", ""))
shown = study.plotted(final)
ax = plots.points_with_bars(shown, "images_per_s", "test_acc", title=f"{model} on {dataset}", band="ci", xband="std")
spread = f"{plots.ci_spread(shown)}; throughput bars: ± 1 std, runs shared the cores; {plateau}"
study.save_figure(ax.figure, "accuracy_vs_throughput", shown, spread=spread)

# %%
table = plots.mean_ci(final, ["label"], ["test_acc"])
timing = plots.mean_std(final, ["label"], ["images_per_s", "epoch_time_s"], digits=1)
table["images/s (mean ± std)"] = timing[plots.label("images_per_s")].values
table["s/epoch (mean ± std)"] = timing[plots.label("epoch_time_s")].values
caption = f"Test accuracy after {epochs} epochs; speeds as mean ± std, no interval: runs shared the cores"
study.save_table(study.term_column(runs, table), "summary", caption, runs, spread=f"{plots.ci_spread(runs)}; {plateau}")
