"""Measurements of run directories: the curvature instruments (landscape.py) applied to a run's
checkpoint, on the run's own seeded evaluation rows (training.evaluation_batches), for
`gvr-lab curvature RUN_DIR` and the curvature study (notebooks/07_curvature.py).

`measure_run` is the command's measurement (eigenvalues, trace, a filter-normalized slice, the line
toward another run); `final_curvature`, `interpolate_runs`, `slice_run` and `psf_check_run` measure
a finished run's final weights for a study's tables and figures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data import dataset_info
from .errors import UsageError
from .landscape import (
    Objective,
    curvature,
    filter_normalized_direction,
    gradient_noise,
    interpolate,
    loss_slice,
    psf_bound_check,
)
from .results import CHECKPOINT, CONFIG, SUMMARY, load_checkpoint, read_json
from .training import Config, DeviceSettings, build_model, evaluation_batches, identity_digest, mixed_run

CPU = torch.device("cpu")


def load_run_model(run_dir, checkpoint=None, device: torch.device = CPU):
    """(Config, model with the checkpoint's weights) of a run directory; a checkpoint that another
    run wrote than config.json describes is refused."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise UsageError(f"{run_dir} is not a run directory (no {CONFIG})")
    path = Path(checkpoint) if checkpoint else run_dir / CHECKPOINT
    if not path.is_file():
        raise UsageError(f"checkpoint {path} not found" if checkpoint else no_checkpoint(run_dir))
    stored = read_json(run_dir / CONFIG)
    config = Config.from_dict(
        {**stored, "device": str(device), "compile": False, "cuda_settings": False, "precision": "fp32"}
    )
    saved = load_checkpoint(path, map_location=device)
    written_by = saved.get("run_id")
    if written_by is not None and written_by != identity_digest(stored):
        raise mixed_run(run_dir / CONFIG, path, written_by, identity_digest(stored))
    info = dataset_info(config.dataset)
    model, _, _ = build_model(config, info.num_classes, info.channels, DeviceSettings.of(config, device))
    model.load_state_dict(saved["model"])
    return config, model


def no_checkpoint(run_dir: Path) -> str:
    """Why a run directory has no checkpoint.pt: it diverged before its first evaluation, or it has
    not reached one yet."""
    summary = read_json(run_dir / SUMMARY) if (run_dir / SUMMARY).is_file() else {}
    if summary.get("status") == "diverged":
        return (
            f"run {run_dir} diverged at step {summary['diverged_step']} (loss {summary['diverged_value']}) before "
            "its first checkpoint: it has no weights to measure"
        )
    return f"no checkpoint {run_dir / CHECKPOINT}: the run has not reached its first evaluation yet"


def measure_run(
    run_dir,
    checkpoint=None,
    k: int = 3,
    trace_samples: int = 100,
    rows: int = 1000,
    slice_dims: int = 0,
    toward=None,
    bn: str = "eval",
    dtype: str = "fp32",
    density: bool = False,
    device: torch.device = CPU,
) -> dict:
    """`curvature` of a run's checkpoint on its evaluation subset, with a filter-normalized slice
    (1-D: 21 points on [-1, 1], 2-D: 11 x 11) and the line toward another run's weights, as asked."""
    config, model = load_run_model(run_dir, checkpoint, device)
    batches = evaluation_batches(config, rows, device)  # at most the run's training rows
    out = {
        "run_dir": str(run_dir),
        "checkpoint": str(checkpoint or "checkpoint.pt"),
        **curvature(model, batches, k, trace_samples, density, bn, dtype),
    }
    objective = Objective(model, batches, bn)
    if slice_dims:
        grid = np.linspace(-1, 1, 21 if slice_dims == 1 else 11).tolist()
        directions = [filter_normalized_direction(model, seed) for seed in range(slice_dims)]
        out["slice"] = {"dims": slice_dims, **loss_slice(objective, directions, grid)}
    if toward:
        _, other = load_run_model(toward, None, device)
        out["toward"] = {
            "run_dir": str(toward),
            **interpolate(objective, model.state_dict(), other.state_dict(), np.linspace(-0.25, 1.25, 31).tolist()),
        }
    return out


# ---------------------------------------------------------------------- finished runs, for a study


def final_curvature(
    run_dir,
    rows: int = 512,
    k: int = 3,
    trace_samples: int = 30,
    micro_batch_size: int = 32,
    bn: str = "eval",
    dtype: str = "fp32",
    device: torch.device = CPU,
) -> dict:
    """A table row for a run's final weights on its evaluation subset: L and the accuracy there, the
    top-k eigenvalues (lambda_1 >= ... >= lambda_k) and the Hutchinson trace with its standard error
    in `dtype`, with what they cost, and the gradient noise at `micro_batch_size` (fp32). With
    rows=512 and 20 probes it repeats, on the same rows and probes, the last measurement of
    `curvature_every`."""
    config, model = load_run_model(run_dir, None, device)
    batches = evaluation_batches(config, rows, device)
    out = curvature(model, batches, k, trace_samples, False, bn, dtype)
    noise = gradient_noise(Objective(model, batches, bn), micro_batch_size)
    return {
        "run_dir": str(run_dir),
        "rows": out["rows"],
        "loss": out["loss"],
        "acc": out["acc"],
        **{f"lambda_{i + 1}": v for i, v in enumerate(out["top_eigenvalues"])},
        "trace": out["trace"],
        "trace_se": out["trace_se"],
        "trace_samples": trace_samples,
        "noise_micro_batch": micro_batch_size,
        "noise_trace_cov": noise["trace_cov"],
        "noise_per_example": noise["trace_cov_per_example"],
        "hvps": out["hvps"],
        "seconds": out["seconds"],
    }


def interpolate_runs(run_a, run_b, rows: int = 512, ts=None, bn: str = "eval", device: torch.device = CPU) -> dict:
    """L and the accuracy along (1 - t) w_A + t w_B between two runs' final weights (buffers alike),
    on run A's evaluation subset; ts defaults to 21 points on [0, 1]. Beyond the ends, batch norm's
    interpolated running variances can turn negative and the loss NaN."""
    config_a, model_a = load_run_model(run_a, None, device)
    config_b, model_b = load_run_model(run_b, None, device)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    shapes_a, shapes_b = ({k: tuple(v.shape) for k, v in s.items()} for s in (state_a, state_b))
    if config_a.dataset != config_b.dataset or shapes_a != shapes_b:
        raise UsageError(
            f"cannot interpolate {run_a} ({config_a.dataset}, {config_a.model}) and {run_b} "
            f"({config_b.dataset}, {config_b.model}): the line needs one model's weights on one dataset"
        )
    ts = np.linspace(0, 1, 21).tolist() if ts is None else list(ts)
    objective = Objective(model_a, evaluation_batches(config_a, rows, device), bn)
    return {"run_a": str(run_a), "run_b": str(run_b), **interpolate(objective, state_a, state_b, ts)}


def slice_run(
    run_dir,
    rows: int = 512,
    points: int = 21,
    radius: float = 1.0,
    direction_seeds=(0, 1),
    bn: str = "eval",
    device: torch.device = CPU,
) -> dict:
    """A 1-D or 2-D filter-normalized slice (one direction per seed in `direction_seeds`) around a
    run's final weights, `points` per axis on [-radius, radius]: the same seeds give every run
    directions drawn alike, each rescaled to that run's own filters."""
    if points < 2 or radius <= 0 or len(direction_seeds) not in (1, 2):
        raise UsageError(
            f"a slice needs points >= 2, radius > 0 and one or two direction seeds, got points={points}, "
            f"radius={radius}, direction_seeds={list(direction_seeds)}"
        )
    config, model = load_run_model(run_dir, None, device)
    objective = Objective(model, evaluation_batches(config, rows, device), bn)
    directions = [filter_normalized_direction(model, seed) for seed in direction_seeds]
    return {
        "run_dir": str(run_dir),
        "direction_seeds": list(direction_seeds),
        **loss_slice(objective, directions, np.linspace(-radius, radius, points).tolist()),
    }


def psf_check_run(
    run_dir, batches: int = 8, rho: float | None = None, bn: str = "eval", device: torch.device = CPU
) -> dict:
    """psf_bound_check at a run's final weights on `batches` disjoint batches of its training batch
    size, drawn from its training rows, at its own rho unless one is given."""
    config, model = load_run_model(run_dir, None, device)
    rho = config.method_args.get("rho") if rho is None else rho
    if rho is None:
        raise UsageError(f"{run_dir}: method {config.method!r} has no rho; pass rho")
    if batches < 1:
        raise UsageError(f"batches must be >= 1, got {batches}")
    wanted = batches * config.batch_size
    drawn = evaluation_batches(config, wanted, device)
    x, y = torch.cat([x for x, _ in drawn]), torch.cat([y for _, y in drawn])
    if len(y) < wanted:
        raise UsageError(
            f"{run_dir}: {batches} batches of {config.batch_size} need {wanted} training rows, the run has {len(y)}"
        )
    parts = list(zip(x.split(config.batch_size), y.split(config.batch_size)))
    return {"run_dir": str(run_dir), "batch_size": config.batch_size, **psf_bound_check(model, parts, rho, bn)}
