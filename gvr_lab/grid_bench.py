"""Wall time of a whole grid, one run after another against Ray with several runs at once.

The grid is `runs` short Fashion-MNIST runs (methods x seeds). Sequentially they train in this
process with all of its torch threads; under Ray, on a local instance with this machine's cores,
each run is a task with `run_cpus` CPUs and as many torch threads. Both start from empty run
directories, so every run trains; Ray's start-up is inside the Ray time.

    gvr-lab bench-grid --json benchmarks/cpu-grid.json --into BENCHMARKS.md
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from . import cluster
from .grid import grid_configs, train_configs

METHODS = ("sgd", "gvr", "sam", "vsam")


def grid_variants(runs: int) -> tuple[list[dict], list[int]]:
    seeds = list(range(max(1, runs // len(METHODS))))
    methods = METHODS[: runs // len(seeds)]
    return [{"method": m} for m in methods], seeds


def run_grid_bench(runs: int, base: dict, run_cpus: float) -> dict:
    variants, seeds = grid_variants(runs)
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        sequential = train_configs(grid_configs(base, variants, seeds, Path(tmp, "sequential")), executor="sequential")
        timings["sequential"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        options = cluster.RayOptions(run_cpus=run_cpus)
        under_ray = train_configs(grid_configs(base, variants, seeds, Path(tmp, "ray")), executor="ray", ray=options)
        timings["ray"] = time.perf_counter() - t0
        cluster.import_ray().shutdown()
    cores = os.cpu_count()
    return {
        "setup": {
            "runs": len(sequential),
            "grid": f"{len(variants)} methods ({', '.join(v['method'] for v in variants)}) x {len(seeds)} seeds",
            "base": base,
            "cores": cores,
            "sequential_threads": torch.get_num_threads(),
            "run_cpus": run_cpus,
            "runs_at_once": int(cores // run_cpus),
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "load_average": list(os.getloadavg()),
        },
        "wall_s": timings,
        "speedup": timings["sequential"] / timings["ray"],
        "runs": [
            {
                "label": a.config.label,
                "seed": a.config.seed,
                "sequential_test_acc": a.summary["final_test_acc"],
                "ray_test_acc": b.summary["final_test_acc"],
                "sequential_run_s": a.summary["wall_time_s"],
                "ray_run_s": b.summary["wall_time_s"],
            }
            for a, b in zip(sequential, under_ray)
        ],
    }


def grid_markdown(report: dict, source: str) -> str:
    s = report["setup"]
    base = " ".join(f"{k}={v}" for k, v in s["base"].items())
    lines = [
        f"{s['runs']} runs ({s['grid']}; {base}) on {s['cores']} cores ({s['cpu']}), torch {s['torch']}, "
        f"1-minute load average {s['load_average'][0]:.2f} at the end.",
        "",
        "```bash",
        f"gvr-lab bench-grid --runs {s['runs']} --dataset {s['base']['dataset']} --model {s['base']['model']} "
        f"--epochs {s['base']['epochs']} --train-subset {s['base']['train_subset']} --batch-size "
        f"{s['base']['batch_size']} --run-cpus {s['run_cpus']:g} --json {source} --into BENCHMARKS.md",
        "```",
        "",
        "| executor | runs at once | torch threads per run | grid wall time (s) |",
        "|---|---|---|---|",
        f"| sequential | 1 | {s['sequential_threads']} | {report['wall_s']['sequential']:.1f} |",
        f"| ray | {s['runs_at_once']} | {int(s['run_cpus'])} | {report['wall_s']['ray']:.1f} |",
        "",
        f"Speed-up, sequential wall time / Ray wall time: {report['speedup']:.2f} "
        f"({'Ray faster' if report['speedup'] > 1 else 'Ray slower'}).",
        "",
        "| run | seed | test acc, sequential | test acc, ray | run time (s), sequential | run time (s), ray |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['label']} | {r['seed']} | {100 * r['sequential_test_acc']:.2f} | {100 * r['ray_test_acc']:.2f} | "
        f"{r['sequential_run_s']:.1f} | {r['ray_run_s']:.1f} |"
        for r in report["runs"]
    ]
    return "\n".join(lines)
