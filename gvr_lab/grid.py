"""Grids of runs: every variant of a study for every seed, checked before any trains, then trained
by an executor.

An executor decides where the runs train; the run directory stays the unit of truth whichever it
is (a finished run is returned as is, a stopped one resumes):
* "sequential": one run after the other in this process, progress live in a notebook and printed
  elsewhere (progress.py);
* "ray": every run a Ray task, on this machine or a cluster (cluster.py), progress read from the
  run directories.
`gvr-lab run --executor` chooses one for a notebook's grids through the environment
(ENVIRONMENT), so the notebooks themselves need no executor parameter.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from . import cluster
from .errors import UsageError, check_choice
from .progress import GridStatus, grid_report
from .training import Config, check_run_dir, load_run, train

EXECUTORS = ("sequential", "ray")
# What `gvr-lab run --executor ...` hands to the notebook's kernel: train_grid reads these when it is
# not given an executor.
ENVIRONMENT = {
    "executor": "GVR_LAB_EXECUTOR",
    "address": "GVR_LAB_RAY_ADDRESS",
    "run_cpus": "GVR_LAB_RUN_CPUS",
    "run_gpus": "GVR_LAB_RUN_GPUS",
}


class GridRuns(list):
    """The runs of a grid in grid order, as a list; its repr is one line, so a notebook cell that ends
    with a grid shows a summary, not every run's history."""

    def __repr__(self) -> str:
        statuses = Counter(run.summary.get("status", "?") for run in self)
        folders = {str(run.run_dir.parent) for run in self}
        where = f" in {folders.pop()}" if len(folders) == 1 else ""
        return f"<{len(self)} runs{where}: {', '.join(f'{n} {s}' for s, n in statuses.items())}>"


def resolve_executor(executor: str | None, options: cluster.RayOptions | None) -> tuple[str, cluster.RayOptions | None]:
    """The executor and Ray options a grid runs with: the arguments, else what `gvr-lab run
    --executor` put in the environment, else sequential."""
    env = os.environ
    if executor is None:
        executor = env.get(ENVIRONMENT["executor"]) or "sequential"
    check_choice("executor", executor, EXECUTORS)
    if executor == "sequential":
        if options is not None:
            raise UsageError('ray options given for the sequential executor: pass executor="ray"')
        return executor, None
    if options is None:
        try:
            options = cluster.RayOptions(
                address=env.get(ENVIRONMENT["address"]) or None,
                run_cpus=float(env.get(ENVIRONMENT["run_cpus"]) or 1.0),
                run_gpus=float(env.get(ENVIRONMENT["run_gpus"]) or 0.0),
            )
        except ValueError as e:
            raise UsageError(f"bad Ray resources in the environment: {e}") from None
    cluster.import_ray()  # a missing extra is one line before anything is submitted
    return executor, options


def executor_environment(executor: str, options: cluster.RayOptions | None) -> dict[str, str]:
    """The environment variables that make a notebook kernel's grids run this way."""
    if executor == "sequential":
        return {ENVIRONMENT["executor"]: executor}
    values = {
        "executor": executor,
        "address": options.address or "",
        "run_cpus": str(options.run_cpus),
        "run_gpus": str(options.run_gpus),
    }
    return {ENVIRONMENT[k]: v for k, v in values.items()}


def grid_configs(
    base: dict, variants: list[dict], seeds: list[int], runs_dir, check_run_dirs: bool = True
) -> list[Config]:
    """The Config of every variant (a dict of Config fields, with a "label") for every seed, with
    out_dir runs_dir/<label>-s<seed>, all checked before any trains: a bad field, method or
    hyper-parameter anywhere, two variants with one label, or (unless check_run_dirs is False, for a
    grid built with a stand-in value to be checked early) a run directory that holds another run
    raises a UsageError naming the variant."""
    configs, owners = [], {}
    for variant in variants:
        name = variant.get("label") or variant.get("method") or base.get("method", "sgd")
        for seed in seeds:
            out_dir = str(Path(runs_dir) / f"{name.replace('/', '_').replace(' ', '_')}-s{seed}")
            if out_dir in owners:
                raise UsageError(
                    f"grid variants {owners[out_dir]!r} and {name!r} share the run directory {out_dir}: "
                    "give them different labels"
                )
            owners[out_dir] = name
            # progress off: the grid reports its own (train_configs)
            fields = {**base, **variant, "label": name, "seed": seed, "out_dir": out_dir, "progress": False}
            try:
                config = Config.from_dict(fields)
                if check_run_dirs:
                    check_run_dir(Path(out_dir), config)
            except UsageError as e:
                raise UsageError(f"grid variant {name!r}, seed {seed}: {e}") from None
            configs.append(config)
    return configs


def train_configs(configs: list[Config], executor: str | None = None, ray=None) -> GridRuns:
    """Train (or resume, or return the finished) run of each Config and return them in order. A
    diverged run is recorded as such and the grid goes on. `executor` as the module says (None: what
    `gvr-lab run --executor` set for this notebook, else sequential); `ray` a cluster.RayOptions
    (address, CPUs and GPUs per run)."""
    executor, options = resolve_executor(executor, ray)
    if executor == "ray":
        where = options.address or "a local Ray instance"
        cluster.run_grid(configs, options, GridStatus(configs, where))
        return GridRuns(load_run(c.run_dir(), c) for c in configs)
    report = grid_report(len(configs))
    runs = GridRuns()
    for index, config in enumerate(configs):
        report.start(index, config)
        run = train(config, on_evaluation=report.evaluation)
        if run is not None:  # None on data-parallel ranks other than 0
            report.finish(run)
            runs.append(run)
    return runs


def train_grid(
    base: dict, variants: list[dict], seeds: list[int], runs_dir, executor: str | None = None, ray=None
) -> GridRuns:
    """grid_configs then train_configs: every Config (and the executor) is checked before the first
    run trains or is submitted."""
    resolve_executor(executor, ray)
    return train_configs(grid_configs(base, variants, seeds, runs_dir), executor, ray)
