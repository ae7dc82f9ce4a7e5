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
# # 00 · Quickstart: SGD vs GVR vs SAM on Fashion-MNIST
#
# **Question.** On a small CNN and real data, what do GVR's gradient-variance penalty and SAM's
# sharpness penalty buy over plain SGD, and at what cost per epoch?
#
# **Use.** Pick a preset in the first line of the parameters cell (`smoke`: seconds on 2,048
# Fashion-MNIST images, where the three already differ; `cpu`: 20,000 images, minutes on 2 cores,
# the committed figures; `gpu`; `paper`) and run all. A parameter set in a cell below the
# parameters cell overrides the preset. Headless: `make demo` or `gvr-lab run
# notebooks/00_quickstart.py --preset cpu`. Finished runs are reused, so rerunning only redraws;
# the study cell prints where runs and figures go.

# %% tags=["parameters"]
preset: str = "cpu"  # smoke | cpu | gpu | paper
dataset: str = "fashion_mnist"  # see gvr_lab.list_datasets()
model: str = "small_cnn"  # see gvr_lab.list_models()
methods: list = ["sgd", "gvr", "sam"]  # compared methods, default hyperparameters unless in method_args
method_args: dict = {"gvr": {"target": "fc", "penalty": "closed_form", "alpha": 0.01}}  # per method
epochs: int = 2  # passes over the training set
batch_size: int = 128  # examples per step (per view for gvr)
lr: float = 0.05  # peak learning rate of the cosine schedule
train_subset: int = 20000  # training examples drawn with the seed, 0 for all 60k
seeds: list = [0]  # one run per seed
device: str = "auto"  # auto | cpu | cuda
runs_root: str = ""  # training runs; empty: runs/<preset>/quickstart/<digest of the parameters>
fig_root: str = ""  # figures and tables; empty: figures/ at the cpu preset, else runs/<preset>/figures

# %%
import gvr_lab as gl
from gvr_lab import plots

study = gl.Study(
    "quickstart",
    globals(),
    presets={
        "smoke": {
            "model": "tiny_cnn",
            "train_subset": 2048,
            "batch_size": 64,
            "method_args": {"gvr": {"target": "fc", "penalty": "closed_form", "subset": 16}},
            "device": "cpu",
        },
        "cpu": {"device": "cpu"},
        "gpu": {"model": "resnet18", "epochs": 10, "train_subset": 0, "batch_size": 256, "lr": 0.1},
        "paper": {
            "dataset": "cifar10",
            "model": "resnet18",
            "epochs": 200,
            "train_subset": 0,
            "lr": 0.1,
            "seeds": [0, 1, 2],
        },
    },
    outputs={"accuracy": "test accuracy per epoch", "summary": "final and best test accuracy, time per epoch"},
)

# %%
base = dict(
    dataset=dataset, model=model, epochs=epochs, batch_size=batch_size, lr=lr, train_subset=train_subset, device=device
)
gl.train_grid(
    base, [dict(method=m, method_args=method_args.get(m, {}), label=m) for m in methods], seeds, study.runs_root
)

# %%
runs = plots.ordered(study.load_runs(), "label", methods)
shown = study.plotted(runs)
ax = plots.curves(shown, "epoch", "test_acc", title=f"{model} on {dataset}")
study.save_figure(ax.figure, "accuracy", shown)

# %%
final = plots.with_best(runs)
table = plots.mean_std(final, ["label"], ["test_acc", "best_test_acc"])
table["s/epoch"] = final.groupby("label", sort=False)["epoch_time_s"].mean().round(1).values
study.save_table(study.term_column(runs, table), "summary", f"Test accuracy after {epochs} epochs", runs)
