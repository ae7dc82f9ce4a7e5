"""gvr_lab: gradient-based regularizers (GVR, Novack et al.'s implicit-regularization suite, the SAM
family) on one device-resident training loop. See README.md."""

from .cluster import RayOptions
from .data import Batch, list_datasets
from .errors import UsageError
from .landscape import curvature
from .methods import Method, create_method, list_methods, register_method
from .models import create_model, list_models
from .results import load_runs
from .training import Config, GridRuns, Run, grid_configs, train, train_configs, train_grid

__all__ = [
    "Batch",
    "Config",
    "GridRuns",
    "Method",
    "RayOptions",
    "Run",
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
    "register_method",
    "train",
    "train_configs",
    "train_grid",
]


def __getattr__(name: str):
    # Study is for notebooks and pulls in matplotlib, which the command line's training should not load.
    if name == "Study":
        from .study import Study

        return Study
    raise AttributeError(f"module 'gvr_lab' has no attribute {name!r}")
