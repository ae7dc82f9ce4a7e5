"""Grids of runs: every variant of a study for every seed, checked before any trains, then trained
by an executor.

An executor decides where the runs train; the run directory stays the unit of truth whichever it
is (a finished run is returned as is, a stopped one resumes), and one configuration gives one
history whichever it is (a run sets its own torch threads, Config.threads, before it builds):
* "processes" (the default on a machine without CUDA): a pool of `workers` processes on this
  machine, by default as many as its cores hold runs of `threads` threads each, every run in one
  of them; progress read from the run directories. A worker that dies is replaced and its runs
  resume from their checkpoints. A method, model or dataset defined in a notebook's own cells
  (module __main__) cannot be rebuilt by a worker: such a grid runs in this process, saying so;
  one defined in an importable module is imported by every worker.
* "sequential" (the default with CUDA): one run after the other in this process, progress live in
  a notebook and printed elsewhere (progress.py);
* "ray": every run a Ray task, on this machine or a cluster (cluster.py), progress read from the
  run directories.
`gvr-lab run --executor` chooses one for a notebook's grids through the environment
(ENVIRONMENT), so the notebooks themselves need no executor parameter.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch

from . import cluster, results
from .data import DATASETS
from .errors import UsageError, check_choice
from .loggers import check_available
from .methods import method_class
from .models import MODELS
from .pools import WORKERS_ENV, SpawnedPool, pool_size
from .progress import GridStatus, grid_report
from .training import Config, check_run_dir, load_run, train

EXECUTORS = ("processes", "sequential", "ray")
# What `gvr-lab run --executor ...` hands to the notebook's kernel: train_grid reads these when it is
# not given an executor.
ENVIRONMENT = {
    "executor": "GVR_LAB_EXECUTOR",
    "address": "GVR_LAB_RAY_ADDRESS",
    "run_cpus": "GVR_LAB_RUN_CPUS",
    "run_gpus": "GVR_LAB_RUN_GPUS",
    "workers": WORKERS_ENV,
}
WORKER_RETRIES = 3  # a pool whose worker died is started again this many times, its runs resumed


class GridRuns(list):
    """The runs of a grid in grid order, as a list; its repr is one line, so a notebook cell that ends
    with a grid shows a summary, not every run's history."""

    def __repr__(self) -> str:
        statuses = Counter(run.summary.get("status", "?") for run in self)
        folders = {str(run.run_dir.parent) for run in self}
        where = f" in {folders.pop()}" if len(folders) == 1 else ""
        return f"<{len(self)} runs{where}: {', '.join(f'{n} {s}' for s, n in statuses.items())}>"


def default_executor() -> str:
    """Processes where runs share CPU cores; one run after another where they would share a GPU."""
    return "sequential" if torch.cuda.is_available() else "processes"


def resolve_executor(executor: str | None, options: cluster.RayOptions | None) -> tuple[str, cluster.RayOptions | None]:
    """The executor and Ray options a grid runs with: the arguments, else what `gvr-lab run
    --executor` put in the environment, else the default (default_executor)."""
    env = os.environ
    if executor is None:
        executor = env.get(ENVIRONMENT["executor"]) or default_executor()
    check_choice("executor", executor, EXECUTORS)
    if executor != "ray":
        if options is not None:
            raise UsageError(f'ray options given for the {executor} executor: pass executor="ray"')
        return executor, None
    if options is None:
        try:
            options = cluster.RayOptions(
                address=env.get(ENVIRONMENT["address"]) or None,
                run_cpus=float(env.get(ENVIRONMENT["run_cpus"]) or 0.0),
                run_gpus=float(env.get(ENVIRONMENT["run_gpus"]) or 0.0),
            )
        except ValueError as e:
            raise UsageError(f"bad Ray resources in the environment: {e}") from None
    cluster.import_ray()  # a missing extra is one line before anything is submitted
    return executor, options


def executor_environment(executor: str, options: cluster.RayOptions | None, workers: int = 0) -> dict[str, str]:
    """The environment variables that make a notebook kernel's grids run this way; without
    `workers`, the pool size the environment already sets (if any) stays."""
    if executor != "ray":
        return {ENVIRONMENT["executor"]: executor, **({ENVIRONMENT["workers"]: str(workers)} if workers else {})}
    values = {
        "executor": executor,
        "address": options.address or "",
        "run_cpus": str(options.run_cpus),
        "run_gpus": str(options.run_gpus),
    }
    return {ENVIRONMENT[k]: v for k, v in values.items()}


def run_dir_name(label: str, seed: int) -> str:
    """The folder of a grid's run of `label` on `seed`: the label with spaces and slashes made safe."""
    return f"{label.replace('/', '_').replace(' ', '_')}-s{seed}"


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
            out_dir = str(Path(runs_dir) / run_dir_name(name, seed))
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
    check_available({name for config in configs for name in config.loggers})
    return configs


def record_grid(configs: list[Config]) -> None:
    """grid.json in each folder holding the grid's runs: their run directories, labels and seeds in
    grid order (after those of earlier grids there), so `gvr-lab runs` lists a run not started yet
    as queued."""
    folders: dict[Path, list] = {}
    for config in configs:
        run_dir = config.run_dir()
        entry = {"run_dir": run_dir.name, "label": config.label, "seed": config.seed}
        folders.setdefault(run_dir.parent, []).append(entry)
    for folder, entries in folders.items():
        path = folder / results.GRID
        names = {entry["run_dir"] for entry in entries}
        earlier = [e for e in results.read_json(path)["runs"] if e["run_dir"] not in names] if path.is_file() else []
        results.make_dir(folder)
        results.write_json(path, {"runs": earlier + entries})


def train_configs(configs: list[Config], executor: str | None = None, ray=None, workers: int = 0) -> GridRuns:
    """Train (or resume, or return the finished) run of each Config and return them in order. A
    diverged run is recorded as such and the grid goes on. `executor` as the module says (None: what
    `gvr-lab run --executor` set for this notebook, else default_executor()); `ray` a
    cluster.RayOptions (address, CPUs and GPUs per run); `workers` the processes executor's pool
    size (0: as many as this machine's cores hold runs of the grid's threads)."""
    executor, options = resolve_executor(executor, ray)
    record_grid(configs)
    if executor == "ray":
        where = options.address or "a local Ray instance"
        cluster.run_grid(configs, options, GridStatus(configs, where))
        return GridRuns(load_run(c.run_dir(), c) for c in configs)
    workers = min(pool_size(workers, default_workers(configs)), len(configs))
    if executor == "processes" and workers > 1:  # one worker would only add a process's start to one after another
        modules, reason = worker_modules(configs)
        if not reason:
            run_in_pool(configs, workers, modules)
            return GridRuns(load_run(c.run_dir(), c) for c in configs)
        print(f"the grid trains in this process, one run after another: {reason}", flush=True)
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


# ---------------------------------------------------------------------- the processes executor


def definitions(config: Config) -> list[tuple[str, str, str]]:
    """(kind, name, module defining it) of the run's method, model and dataset; a model given by
    import path or timm/<name> is imported by name wherever it is built."""
    registered_model = [("model", config.model, MODELS[config.model].__module__)] if config.model in MODELS else []
    return [
        ("method", config.method, method_class(config.method).__module__),
        *registered_model,
        ("dataset", config.dataset, DATASETS[config.dataset][1].__module__),
    ]


def worker_modules(configs: list[Config]) -> tuple[list[str], str]:
    """The modules outside the package that a worker process imports to rebuild the grid's runs
    (their import registers what the runs use), and, when one cannot be imported by another
    process, why ("" otherwise)."""
    modules = set()
    for config in configs:
        for kind, name, module in definitions(config):
            if module.split(".")[0] == "gvr_lab":
                continue
            if module == "__main__" or not getattr(sys.modules.get(module), "__file__", None):
                where = "the notebook's own cells" if module == "__main__" else f"module {module!r}"
                return [], (
                    f"{kind} {name!r} is defined in {where}, which a worker process cannot import; define it in a "
                    "module on the path (or a plugin package) to train the grid in parallel"
                )
            modules.add(module)
    return sorted(modules), ""


def import_modules(modules: list[str]) -> None:
    """A worker's start: the modules that register the grid's methods, models and datasets."""
    for module in modules:
        importlib.import_module(module)


def train_in_worker(fields: dict) -> dict:
    """One run in a worker process: train (or resume, or return) it; its summary comes back."""
    return train(Config(**fields)).summary


def default_workers(configs: list[Config]) -> int:
    """As many runs at once as this machine's cores hold, each with its Config.threads."""
    return max(1, (os.cpu_count() or 1) // max(c.threads for c in configs))


def run_in_pool(configs: list[Config], workers: int, modules: list[str]) -> None:
    """Every run of the grid in a pool of worker processes (pools.py), progress read from the run
    directories. A run that raises fails alone, the grid goes on, and the first failure is raised at
    the end (GridStatus); a worker that dies (killed, out of memory) breaks the pool, which starts
    again with the runs not finished, each resuming from its checkpoint, up to WORKER_RETRIES times."""
    report = GridStatus(configs, f"{workers} worker process{'es' if workers > 1 else ''} on this machine")
    pending = set(range(len(configs)))
    for _ in range(WORKER_RETRIES + 1):
        broken = False
        with SpawnedPool(workers, initializer=import_modules, initargs=(modules,)) as pool:
            futures = {pool.submit(train_in_worker, dataclasses.asdict(configs[i])): i for i in sorted(pending)}
            report.submitted()
            while futures:
                done, _ = wait(futures, timeout=2.0, return_when=FIRST_COMPLETED)
                for future in done:
                    index = futures.pop(future)
                    try:
                        summary = future.result()
                    except BrokenProcessPool:
                        broken = True  # the run stays pending: the next pool resumes it
                        continue
                    except Exception as e:  # noqa: BLE001 - the run's own error, raised in its worker
                        report.failed(index, e)
                    else:
                        report.finished(index, summary)
                    pending.discard(index)
                report.poll()
        if not broken:
            break
    for index in sorted(pending):  # still not finished after every retry
        report.failed(index, RuntimeError(f"its worker process died {WORKER_RETRIES + 1} times"))
    report.close()
