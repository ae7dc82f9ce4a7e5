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
epochs: int = 4  # passes over the training set
batch_size: int = 128  # examples per step
lr: float = 0.05  # peak learning rate, cosine per step
weight_decay: float = 0.0005  # coupled L2
label_smoothing: float = 0.0  # vSAM's script uses 0.1
train_subset: int = 20000  # training examples drawn with the seed, 0 for all
seeds: list = [0]  # one run per seed and method
device: str = "auto"  # auto, cpu or cuda
runs_root: str = ""  # training runs; empty: runs/<preset>/sam_efficiency/<digest of the parameters>
fig_root: str = ""  # figures and tables; empty: figures/ at the cpu preset, else runs/<preset>/figures

# %%
import gvr_lab as gl
from gvr_lab import plots

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
            "seeds": [0, 1, 2],
            "method_args": {"vsam": {}, "saf": {}},
        },
    },
    outputs={
        "accuracy_vs_throughput": "final test accuracy against training images per second",
        "summary": "test accuracy, images/s, time per epoch, share of steps each method's term acted on",
    },
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
    device=device,
)
gl.train_grid(
    base, [dict(method=m, method_args=method_args.get(m, {}), label=m) for m in methods], seeds, study.runs_root
)

# %% [markdown]
# Throughput is measured per epoch by the training loop (training steps only, evaluation excluded);
# the first epoch includes warm-up effects, so it is left out of the averages when there are more.

# %%
runs = plots.ordered(study.load_runs(), "label", methods)
steady = runs[runs["epoch"] > 0] if runs["epoch"].max() > 0 else runs
speed = steady.groupby(["label", "run_dir"], sort=False)[["images_per_s", "epoch_time_s"]].mean().reset_index()
final = plots.final_rows(runs).merge(speed, on=["label", "run_dir"], suffixes=("_last", ""))
shown = study.plotted(final)
ax = plots.points_with_bars(shown, "images_per_s", "test_acc", title=f"{model} on {dataset}")
study.save_figure(ax.figure, "accuracy_vs_throughput", shown)

# %%
table = plots.mean_std(final, ["label"], ["test_acc"])
table["images/s"] = final.groupby("label", sort=False)["images_per_s"].mean().round(0).values
table["s/epoch"] = final.groupby("label", sort=False)["epoch_time_s"].mean().round(2).values
study.save_table(study.term_column(runs, table), "summary", f"Test accuracy after {epochs} epochs", runs)
