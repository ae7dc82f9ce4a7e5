"""Measurements of run directories: the curvature instruments (landscape.py) applied to a run's
checkpoint, on the run's own seeded evaluation rows (training.evaluation_batches), for
`gvr-lab curvature RUN_DIR` and the curvature study (notebooks/07_curvature.py).

`measure_run` is the command's measurement (eigenvalues, trace, a filter-normalized slice, the line
toward another run). For a study: `checkpoint_curvature` measures one checkpoint of a run in one
batch-norm mode, "eval" (running statistics: the function the trained model computes at test time)
or "train" (each batch's own statistics on batches of the rows one training forward pass
normalizes over: the loss the optimizer descended), on the same seeded training rows either way;
`curvature_over_training` measures every checkpoint a run kept (Config.keep_checkpoints) both ways,
keeping the records in the run directory, and `measure_runs` does so for many runs, a process per
core on a CPU. `interpolate_runs`, `slice_run` and `psf_check_run` measure a finished run's final
weights.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from concurrent.futures import as_completed
from pathlib import Path

import numpy as np
import torch

from .data import dataset_info
from .errors import UsageError, check_choice
from .landscape import (
    BN_MODES,
    Objective,
    curvature,
    filter_normalized_direction,
    interpolate,
    loss_slice,
    psf_bound_check,
)
from .methods import method_class
from .pools import SpawnedPool, pool_size
from .results import CHECKPOINT, CONFIG, SUMMARY, kept_checkpoint, load_checkpoint, read_json, write_json
from .training import (
    Config,
    DeviceSettings,
    build_model,
    evaluation_batches,
    identity_digest,
    mixed_run,
    torch_threads,
)

CPU = torch.device("cpu")
MEASURES = "measures-{}.json"  # curvature_over_training's records in a run directory
INSTRUMENTS = (Path(__file__), Path(__file__).with_name("landscape.py"))


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


def forward_rows(config: Config) -> int:
    """The rows of one of the run's training forward passes, over which batch norm takes its batch
    statistics (Method.forward_rows: the batch, a micro-batch, an m-sharpness group)."""
    return method_class(config.method).forward_rows(config.method_args, config.batch_size)


def measured_batches(config: Config, rows: int, bn: str, device: torch.device) -> list:
    """The run's `rows` seeded training rows (evaluation_batches), batched as the batch-norm mode
    needs: by eval_batch_size in eval mode, where the batching changes nothing, and in train mode
    in batches of forward_rows, so that batch norm normalizes each with the statistics of as many
    rows as in the run's own steps; the same rows either way."""
    check_choice("bn mode", bn, BN_MODES)
    if bn == "eval":
        return evaluation_batches(config, rows, device)
    size = forward_rows(config)
    batches = evaluation_batches(config, rows, device, batch_size=size)
    count = sum(len(y) for _, y in batches)
    if count % size:
        raise UsageError(
            f"{count} measured rows are not a multiple of {size}, the rows of one training forward pass of the run "
            f"(batch norm's batch in train mode): choose rows = k * {size}"
        )
    return batches


def checkpoint_curvature(
    run_dir,
    evaluation: int | None = None,
    rows: int = 512,
    bn: str = "eval",
    k: int = 1,
    trace_samples: int = 20,
    sharpness: bool = True,
    rho: float = 0.1,
    sharpness_steps: int = 10,
    directions: int = 10,
    max_iter: int = 100,
    tol: float = 1e-10,
    device: torch.device = CPU,
) -> dict:
    """A record of a run's weights after evaluation `evaluation` (the checkpoint keep_checkpoints
    kept; None: the final checkpoint.pt) in batch-norm mode `bn`, from landscape.curvature on the
    run's `rows` seeded training rows (measured_batches), in fp32: the loss L and the accuracy
    there, the top-k eigenvalues lambda_1 >= ... >= lambda_k (top_eigenvalues at max_iter and tol)
    with `converged` (all of them within tolerance), the Hutchinson trace with its standard error
    and, with sharpness, the adaptive sharpness at rho and the filter-normalized curvature with its
    standard error; with the Hessian-vector products and seconds it took."""
    checkpoint = None if evaluation is None else Path(run_dir) / kept_checkpoint(evaluation)
    config, model = load_run_model(run_dir, checkpoint, device)
    batches = measured_batches(config, rows, bn, device)
    out = curvature(
        model,
        batches,
        k,
        trace_samples,
        bn=bn,
        sharpness=sharpness,
        rho=rho,
        sharpness_steps=sharpness_steps,
        directions=directions,
        max_iter=max_iter,
        tol=tol,
    )
    record = {
        "run_dir": str(run_dir),
        "evaluation": evaluation,
        "bn": bn,
        "rows": out["rows"],
        "loss": out["loss"],
        "acc": out["acc"],
        **{f"lambda_{i + 1}": v for i, v in enumerate(out["top_eigenvalues"])},
        "converged": out["all_converged"],
        "trace": out["trace"],
        "trace_se": out["trace_se"],
    }
    if sharpness:
        record.update(
            adaptive_sharpness=out["adaptive_sharpness"],
            fn_curvature=out["fn_curvature"],
            fn_curvature_se=out["fn_curvature_se"],
        )
    return {**record, "hvps": out["hvps"], "seconds": out["seconds"]}


@functools.cache
def instruments_digest() -> str:
    """A digest of the instruments' source (this module and landscape.py): records measured by
    other code are measured again."""
    return hashlib.sha1(b"".join(path.read_bytes() for path in INSTRUMENTS)).hexdigest()[:12]


def curvature_over_training(run_dir, device: torch.device = CPU, **settings) -> list[dict]:
    """checkpoint_curvature (its keywords in `settings`) of every checkpoint the run kept
    (Config.keep_checkpoints; those that exist: a run that diverged kept fewer), in both batch-norm
    modes. The records are kept in the run directory (MEASURES, named by a digest of the run's
    identity, the settings, the device, the checkpoints and instruments_digest) and read back from
    there while none of these changed."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise UsageError(f"{run_dir} is not a run directory (no {CONFIG})")
    stored = read_json(run_dir / CONFIG)
    kept = [n for n in stored.get("keep_checkpoints", []) if (run_dir / kept_checkpoint(n)).is_file()]
    asked = {
        "run": identity_digest(stored),
        "settings": settings,
        "device": str(device),
        "kept": kept,
        "instruments": instruments_digest(),
    }
    path = run_dir / MEASURES.format(hashlib.sha1(json.dumps(asked, sort_keys=True).encode()).hexdigest()[:12])
    if path.is_file():
        return read_json(path)
    records = [checkpoint_curvature(run_dir, n, bn=bn, device=device, **settings) for n in kept for bn in BN_MODES]
    write_json(path, records)
    return records


def measured_in_worker(run_dir: str, settings: dict) -> list[dict]:
    """curvature_over_training in a worker process of measure_runs, on one torch thread."""
    with torch_threads(1):
        return curvature_over_training(run_dir, CPU, **settings)


def measuring_processes(runs: int, device: torch.device = CPU, workers: int = 0) -> int:
    """The processes measure_runs measures `runs` runs in: on a CPU `workers` (0: the size `gvr-lab
    run --workers` set, else one per core), at most one per run; on another device, this one."""
    return min(runs, pool_size(workers, os.cpu_count() or 1)) if device.type == "cpu" else 1


def measure_runs(run_dirs, device: torch.device = CPU, workers: int = 0, **settings) -> list[dict]:
    """curvature_over_training of each run (`settings`: checkpoint_curvature's keywords), the records
    in the order of the runs: in measuring_processes processes of one torch thread each, as the grid
    trains runs, or one run after another in this one. A line per run as it is done."""
    run_dirs = [str(r) for r in run_dirs]
    workers = measuring_processes(len(run_dirs), device, workers)
    done = {}

    def report(index: int, records: list[dict]) -> None:
        done[index] = records
        seconds = sum(r["seconds"] for r in records)
        print(
            f"measured {len(done)}/{len(run_dirs)}: {Path(run_dirs[index]).name}, {len(records)} measurements "
            f"({seconds:.0f} s when measured)",
            flush=True,
        )

    if workers <= 1:
        for index, run_dir in enumerate(run_dirs):
            report(index, curvature_over_training(run_dir, device, **settings))
    else:
        with SpawnedPool(workers) as pool:
            futures = {pool.submit(measured_in_worker, run_dir, settings): i for i, run_dir in enumerate(run_dirs)}
            for future in as_completed(futures):
                report(futures[future], future.result())
    return [record for index in range(len(run_dirs)) for record in done[index]]


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
