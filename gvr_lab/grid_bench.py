"""Runs per hour of a study-shaped grid: the old way against the lab's defaults, in one run of the tool.

The grid is the claims study's arms at a preset of its protocol (notebooks/claims_protocol.toml),
its first seeds; the arms that read another arm's runs (NGD, ExterGraft) are left out.

* The old way: one run at a time in this process, 2 torch threads per run, contiguous memory
  (Config threads=2, channels_last="false", the sequential executor): how grids ran before.
* The defaults: 1 thread per run, channels_last by its rule (on for convolutional models), as
  many runs at once as the machine has cores (the processes executor).

Both train every run of the grid (from empty folders: another identity each way). Their order is
ABBA (the old way on the first half of the runs, the defaults on it, the defaults on the second
half, the old way on it), so a drift of the machine's speed falls on both alike; runs per hour is
the runs over the summed wall time of each way's two blocks.

Where the time of a step goes: for each model of the grid, the FLOPs of one forward and backward
pass of a training batch (torch's flop counter) over its measured time, as a fraction of the
machine's fp32 matmul rate (2048 x 2048), at 1 and 2 threads, contiguous and channels_last.

    gvr-lab bench-grid --preset cpu --seeds 1 --json benchmarks/cpu-grid-claims.json --into BENCHMARKS.md
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import claims
from .bench import bench_loader
from .data import dataset_info
from .grid import train_configs
from .models import create_model
from .pools import cpu_seconds, stolen_share, stolen_since
from .results import SUMMARY, read_json
from .study import repo_relative
from .training import Config, DeviceSettings, build_model, torch_threads

TARGET = 1.4  # runs per hour, defaults over the old way: the lab's goal for a study-shaped grid
OLD_WAY = {"threads": 2, "channels_last": "false"}


def study_grid(protocol_path, preset: str, seeds: int, root) -> list:
    """The Configs of the study's arms for its first `seeds` seeds, under `root`."""
    protocol = claims.load_protocol(protocol_path, preset)
    first = dataclasses.replace(protocol, table={**protocol.table, "seeds": protocol.seeds[:seeds]})
    return claims.arm_configs(first, root)


def timed_block(configs: list, executor: str) -> tuple[float, float | None]:
    """The block's wall time, and the share of the machine's CPU time the host took meanwhile (None
    where the machine does not say): a block slowed by the host is then seen as such."""
    cpu_at_start, started = cpu_seconds(), time.perf_counter()
    train_configs(configs, executor=executor)
    wall, steal = time.perf_counter() - started, stolen_since(cpu_at_start)
    return wall, stolen_share(steal)


def run_grid_bench(protocol_path, preset: str, seeds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        new = study_grid(protocol_path, preset, seeds, Path(tmp, "defaults"))
        old = [
            dataclasses.replace(c, **OLD_WAY, out_dir=c.out_dir.replace(f"{tmp}/defaults", f"{tmp}/old")) for c in new
        ]
        half = len(new) // 2
        blocks = [
            ("old", old[:half], "sequential"),
            ("defaults", new[:half], "processes"),
            ("defaults", new[half:], "processes"),
            ("old", old[half:], "sequential"),
        ]
        seconds, stolen = {"old": [], "defaults": []}, {"old": [], "defaults": []}
        for way, configs, executor in blocks:
            wall, share = timed_block(configs, executor)
            seconds[way].append(wall)
            stolen[way].append(share)
        ended = {"old": run_endings(old), "defaults": run_endings(new)}
    wall = {way: sum(s) for way, s in seconds.items()}
    per_hour = {way: 3600 * len(new) / wall[way] for way in wall}
    models = sorted({(c.model, c.dataset, c.batch_size) for c in new})
    return {
        "setup": {
            "protocol": repo_relative(protocol_path),
            "preset": preset,
            "seeds": seeds,
            "runs": len(new),
            "arms": sorted({c.label for c in new}),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "load_average": list(os.getloadavg()),
        },
        "blocks_s": seconds,
        "blocks_stolen_share": stolen,
        "wall_s": wall,
        "runs_per_hour": per_hour,
        "speedup": per_hour["defaults"] / per_hour["old"],
        "runs": ended,
        "kernels": [kernel_rates(model, dataset, batch) for model, dataset, batch in models],
    }


def run_endings(configs: list) -> list[dict]:
    """How each run of a way ended: a run that diverged stopped early and took less time, so the
    two ways trained the same grid only where their runs ended alike."""
    ended = []
    for c in configs:
        summary = read_json(Path(c.out_dir) / SUMMARY)
        step = {"diverged_step": summary["diverged_step"]} if "diverged_step" in summary else {}
        ended.append({"run": f"{c.label} s{c.seed}", "status": summary["status"], **step})
    return ended


def matmul_gflops(threads: int, size: int = 2048, rounds: int = 5) -> float:
    with torch_threads(threads):
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - started)
    return 2 * size**3 / statistics.median(times) / 1e9


def median_seconds(work, rounds: int) -> float:
    work()  # warm-up
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def kernel_rates(model_name: str, dataset: str, batch_size: int, rounds: int = 7) -> dict:
    """One forward and backward of a training batch: its GFLOPs, and per (threads, layout) its median
    time and the fraction of the fp32 matmul rate at those threads it reaches; and the other parts
    of a step at the lab's defaults (1 thread, channels_last): a batch from the loader (indexing,
    crop, flip, Cutout) and the optimizer's update (SGD, momentum 0.9, weight decay)."""
    info = dataset_info(dataset)
    x = torch.randn(batch_size, info.channels, info.size, info.size)
    y = torch.randint(0, info.num_classes, (batch_size,))
    model = create_model(model_name, num_classes=info.num_classes, in_channels=info.channels)

    def step(m, inputs):
        torch.nn.functional.cross_entropy(m(inputs), y).backward()

    with FlopCounterMode(display=False) as counter:
        step(model, x)
    gflop = counter.get_total_flops() / 1e9
    rows = []
    for threads in (1, 2):
        rate = matmul_gflops(threads)
        for layout in ("contiguous", "channels_last"):
            form = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            m, inputs = model.to(memory_format=form), x.contiguous(memory_format=form)
            with torch_threads(threads):
                seconds = median_seconds(lambda m=m, inputs=inputs: step(m, inputs), rounds)
            rows.append(
                {
                    "threads": threads,
                    "layout": layout,
                    "ms": 1000 * seconds,
                    "gflops": gflop / seconds,
                    "matmul_gflops": rate,
                    "fraction": gflop / seconds / rate,
                }
            )
    return {
        "model": model_name,
        "dataset": dataset,
        "batch_size": batch_size,
        "gflop": gflop,
        "rates": rows,
        "parts_ms": step_parts(model_name, dataset, batch_size, rounds),
    }


def step_parts(model_name: str, dataset: str, batch_size: int, rounds: int) -> dict:
    """Milliseconds of each part of an SGD step at the defaults (1 thread, channels_last)."""
    info = dataset_info(dataset)
    config = Config(model=model_name, dataset=dataset, batch_size=batch_size, cutout=0.5, device="cpu")
    settings = DeviceSettings.of(config, torch.device("cpu"))
    with torch_threads(1):
        model, optimizer, _ = build_model(config, info.num_classes, info.channels, settings)
        loader = bench_loader(info.channels, info.size, info.num_classes, batch_size, settings, views=1, batches=8)
        batch = next(loader.epoch(0))
        forward_backward = median_seconds(
            lambda: torch.nn.functional.cross_entropy(model(batch.x), batch.y).backward(), rounds
        )
        update = median_seconds(optimizer.step, rounds)
        data = median_seconds(lambda: next(loader.epoch(0)), rounds)
    return {"data": 1000 * data, "forward_backward": 1000 * forward_backward, "optimizer": 1000 * update}


def steal_note(report: dict) -> str:
    """The host's share of the machine's CPU time during each block, in the blocks' order."""
    stolen = report.get("blocks_stolen_share")
    if stolen is None:
        return "The host's share of the machine's CPU time during the blocks was not recorded."

    def shares(way):
        return ", ".join("not reported" if v is None else f"{100 * v:.0f}%" for v in stolen[way])

    by_block = f"the old way {shares('old')}; the defaults {shares('defaults')}"
    return f"The host's share of the machine's CPU time, block by block: {by_block}."


def grid_markdown(report: dict, source: str) -> str:
    s = report["setup"]
    lines = [
        f"{s['runs']} runs: the claims study's arms at its `{s['preset']}` preset ({'; '.join(s['arms'])}), "
        f"{s['seeds']} seed{'s' if s['seeds'] > 1 else ''}, on {s['cores']} cores ({s['cpu']}), torch {s['torch']}; "
        f"1-minute load average {s['load_average'][0]:.2f} at the end.",
        "",
        "```bash",
        f"gvr-lab bench-grid --protocol {s['protocol']} --preset {s['preset']} --seeds {s['seeds']} --json {source} "
        "--into BENCHMARKS.md",
        "```",
        "",
        "| way | runs at once | threads per run | channels_last | blocks (s, ABBA) | wall (s) | runs per hour |",
        "|---|---|---|---|---|---|---|",
        f"| old: sequential | 1 | 2 | false | {', '.join(f'{b:.0f}' for b in report['blocks_s']['old'])} | "
        f"{report['wall_s']['old']:.0f} | {report['runs_per_hour']['old']:.1f} |",
        f"| defaults: processes | {s['cores']} | 1 | auto | "
        f"{', '.join(f'{b:.0f}' for b in report['blocks_s']['defaults'])} | {report['wall_s']['defaults']:.0f} | "
        f"{report['runs_per_hour']['defaults']:.1f} |",
        "",
        f"Runs per hour, defaults over the old way: {report['speedup']:.2f}x (target {TARGET}x: "
        f"{'met' if report['speedup'] >= TARGET else 'not met'}). {unfinished_note(report['runs'])} "
        f"{steal_note(report)}",
    ]
    lines += [
        "",
        "The other parts of a step at the defaults (1 thread, channels_last), ms:",
        "",
        "| model | batch | batch from the loader | forward + backward | optimizer step |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {k['model']} | {k['batch_size']} | {k['parts_ms']['data']:.2f} | {k['parts_ms']['forward_backward']:.1f} | "
        f"{k['parts_ms']['optimizer']:.2f} |"
        for k in report["kernels"]
    ]
    lines += [
        "",
        "| model | batch | GFLOP per forward+backward | threads | layout | ms | GFLOP/s | fp32 matmul GFLOP/s "
        "| share |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k in report["kernels"]:
        lines += [
            f"| {k['model']} | {k['batch_size']} | {k['gflop']:.3f} | {r['threads']} | {r['layout']} | {r['ms']:.1f} | "
            f"{r['gflops']:.1f} | {r['matmul_gflops']:.1f} | {100 * r['fraction']:.1f}% |"
            for r in k["rates"]
        ]
    return "\n".join(lines)


def unfinished_note(ended: dict) -> str:
    """The runs of each way that did not complete; a diverged run counts as a run, as in a study."""

    def ending(run: dict) -> str:
        at = f" at step {run['diverged_step']}" if "diverged_step" in run else ""
        return f"{run['run']} ({run['status']}{at})"

    parts = []
    for way, named in (("old", "the old way"), ("defaults", "the defaults")):
        runs = [ending(r) for r in ended[way] if r["status"] != "completed"]
        parts.append(f"{named}: {', '.join(runs) or 'none'}")
    return (
        f"Runs that did not complete ({'; '.join(parts)}): a diverged run stops early and counts as a run, "
        "as in a study, so where the ways differ here they did not train the same amount."
    )
