"""Many runs on many workers: a grid's runs as Ray tasks, on this machine or a cluster.

Each run is one Ray task with its own resource request (`run_cpus`, `run_gpus`): fractional GPUs
pack several small runs on one GPU; a run sets its own torch threads (Config.threads), and asks for as
many CPUs unless `run_cpus` says otherwise. The run
directory stays the unit of truth, as in a sequential grid: a task trains (or resumes, or returns)
its run through `gvr_lab.train`, so a task whose worker dies or whose node is lost is retried by
Ray and resumes from the run's last checkpoint, and a finished run is not trained again. The
runs' folders must be on a filesystem every worker sees (one machine: always; a cluster: a shared
mount such as NFS; without one, give each node the same path and copy the run folders back).

Ray is an optional extra (`pip install -e ".[cluster]"`): nothing imports it until a grid asks for
the ray executor.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass

from .errors import UsageError
from .training import Config, train


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: a local instance on this machine's cores; "auto" or HOST:PORT: a cluster
    run_cpus: float = 0.0  # CPUs each run asks for; 0: its Config.threads
    run_gpus: float = 0.0  # GPUs each run asks for; 0.25 packs four runs on one GPU
    max_retries: int = 3  # a task whose worker or node dies is run again this many times

    def __post_init__(self):
        if self.run_cpus < 0 or self.run_gpus < 0 or self.max_retries < 0:
            raise UsageError(
                f"ray resources must be run_cpus >= 0, run_gpus >= 0, max_retries >= 0, got "
                f"{self.run_cpus}, {self.run_gpus}, {self.max_retries}"
            )
        if self.run_gpus > 1 and self.run_gpus != int(self.run_gpus):
            raise UsageError(f"run_gpus above 1 must be a whole number, got {self.run_gpus}")


def import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError('the ray executor needs Ray: pip install -e ".[cluster]"') from None
    return ray


def connect(options: RayOptions):
    """Ray, initialized once: a local instance on this machine's cores, or the cluster at the
    address; an address nobody answers at is one line, not a traceback."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    if options.address and options.address != "auto":
        check_reachable(options.address)
    try:
        if options.address:
            ray.init(address=options.address, **kwargs)
        else:
            ray.init(num_cpus=os.cpu_count(), **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot reach a Ray cluster at {options.address!r}: {first}") from None
    return ray


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Ray keeps retrying an address nobody answers at; one TCP connection tells at once."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"a Ray address is auto or HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise UsageError(f"cannot reach a Ray cluster at {address!r}: {e.strerror or e}") from None


def train_remote(fields: dict) -> dict:
    """One run, in a Ray worker: train (or resume, or return) it; its summary comes back."""
    return train(Config(**fields)).summary


def run_grid(configs: list, options: RayOptions, report) -> list[dict]:
    """Submit every run, then collect them as they finish while `report` (progress.GridStatus) reads
    the run directories for the running ones; returns each run's summary in grid order. A task
    that raises (the run's own error, not a lost worker: those are retried) fails its run only: the
    grid goes on, and the first failure is raised at the end."""
    ray = connect(options)
    remote = ray.remote(num_gpus=options.run_gpus, max_retries=options.max_retries, retry_exceptions=False)(
        train_remote
    )
    report.submitted()
    pending = {
        remote.options(num_cpus=options.run_cpus or c.threads).remote(dataclasses.asdict(c)): i
        for i, c in enumerate(configs)
    }
    summaries: list[dict | None] = [None] * len(configs)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
        for ref in ready:
            index = pending.pop(ref)
            try:
                summaries[index] = ray.get(ref)
                report.finished(index, summaries[index])
            except Exception as e:  # noqa: BLE001 - the run's own error, raised in its worker
                report.failed(index, e)
        report.poll()
    report.close()
    return summaries
