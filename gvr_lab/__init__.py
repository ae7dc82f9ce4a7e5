"""gvr_lab: gradient-based regularizers (GVR, Novack et al.'s implicit-regularization suite, the SAM
family) on one device-resident training loop. See README.md.

The names of the layers above the training loop (grids, studies, statistics) load on first use: they
pull in matplotlib, seaborn and scipy (2 s), which `gvr-lab train` and a script that trains one run
never need. The methods, models and datasets of installed plugin packages (plugins.py) are
registered at the end of this import.
"""

import importlib

from .cluster import RayOptions
from .collect import load_runs
from .data import Batch, DatasetInfo, Split, list_datasets, register_dataset
from .errors import UsageError
from .landscape import curvature
from .methods import Method, create_method, list_methods, register_method
from .models import create_model, list_models, register_model
from .plugins import load_plugins
from .training import Config, Run, train

# name -> the module of this package that defines it, imported when the name is first used
LAZY = {
    "GridRuns": "grid",
    "grid_configs": "grid",
    "train_configs": "grid",
    "train_grid": "grid",
    "Study": "study",
    "select": "stats",
}

__all__ = [
    "Batch",
    "Config",
    "DatasetInfo",
    "GridRuns",
    "Method",
    "RayOptions",
    "Run",
    "Split",
    "Study",
    "UsageError",
    "create_method",
    "create_model",
    "curvature",
    "grid_configs",
    "list_datasets",
    "list_methods",
    "list_models",
    "load_runs",
    "register_dataset",
    "register_method",
    "register_model",
    "select",
    "train",
    "train_configs",
    "train_grid",
]


def __getattr__(name: str):
    if name in LAZY:
        return getattr(importlib.import_module(f".{LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'gvr_lab' has no attribute {name!r}")


load_plugins()  # last: a plugin's module imports the names above
