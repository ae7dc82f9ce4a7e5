"""Process pools for a grid's runs and a study's measurements on the CPU.

Workers are spawned, not forked: a forked copy of a process whose OpenMP threads already ran can
hang. Spawn, by default, imports the parent's `__main__` file in every worker, so a script calling
`train_grid` without an `if __name__ == "__main__":` guard would start the grid again in each one;
a worker here needs only gvr_lab and the modules it is told to import, so the caller's script is
hidden from spawn while workers start (they start as work is submitted). A worker whose parent
dies (a killed notebook or script) ends itself: otherwise it would wait on the pool's queue forever,
holding its memory.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

from .errors import UsageError

# `gvr-lab run --workers N` hands the notebook's kernel its pools' size here: a grid's runs and a
# study's measurements alike.
WORKERS_ENV = "GVR_LAB_WORKERS"


def pool_size(workers: int, default: int) -> int:
    """`workers` where given, else the size the environment sets (WORKERS_ENV), else `default`."""
    value = os.environ.get(WORKERS_ENV) or "0"
    if not value.isdigit():
        raise UsageError(f"{WORKERS_ENV} must be a whole number of processes (0: the default), got {value!r}")
    return workers or int(value) or default


@contextlib.contextmanager
def caller_script_hidden():
    """The caller's __main__ without the file and spec spawn would re-import in a worker."""
    main = sys.modules["__main__"]
    saved = {name: main.__dict__[name] for name in ("__file__", "__spec__") if name in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None  # spawn reads the attribute: a module run by name is found through it
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


def end_with_parent(parent: int) -> None:
    """A worker's watch: once its parent process is gone (it is re-parented), it exits."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def start_worker(parent: int, initializer, initargs) -> None:
    threading.Thread(target=end_with_parent, args=(parent,), daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


class SpawnedPool(ProcessPoolExecutor):
    """A ProcessPoolExecutor of spawned workers that never run the caller's script and end with
    their parent."""

    def __init__(self, workers: int, initializer=None, initargs=()):
        super().__init__(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=start_worker,
            initargs=(os.getpid(), initializer, initargs),
        )

    def submit(self, fn, /, *args, **kwargs):
        with caller_script_hidden():
            return super().submit(fn, *args, **kwargs)


# A virtual machine's cores are shared with the host's other guests: the time the hypervisor gave
# them ("steal") makes every wall time on this machine longer than its own speed, so measured
# executions record it beside their wall time.
PROC_STAT = "/proc/stat"


def cpu_seconds() -> tuple[float, float] | None:
    """(all CPU time since boot, the part of it stolen by the host) in core-seconds, from the first
    line of Linux's /proc/stat (user nice system idle iowait irq softirq steal; guest time is already
    in user); None where the file is missing or unreadable."""
    try:
        with open(PROC_STAT) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:9]]
    hz = os.sysconf("SC_CLK_TCK")
    return sum(ticks) / hz, ticks[7] / hz


def stolen_since(start: tuple[float, float] | None) -> dict:
    """{"cpu_s", "stolen_s"}: the machine's CPU time since `start` (a cpu_seconds() reading) and the
    part the host took; {} where either reading is missing."""
    now = cpu_seconds()
    if start is None or now is None:
        return {}
    return {"cpu_s": round(now[0] - start[0], 1), "stolen_s": round(now[1] - start[1], 1)}


def stolen_share(steal: dict) -> float | None:
    """The host's share of the CPU time in a stolen_since record (or a sum of them); None without one."""
    return steal["stolen_s"] / steal["cpu_s"] if steal.get("cpu_s") else None
