"""Time per step, throughput and memory of methods, with ratios to sgd measured in the same process.

Every method gets its own model (same seed), optimizer and a fixed device-resident batch of the
requested shape, made by the training loader (random uint8 images, crop, flip, Cutout); the loader
alone is timed too (the "data" row: its ratio is the data share of an sgd step). After warm-up,
rounds of `steps` steps are timed per method with the order shuffled each round (a shared CPU
drifts; interleaving spreads the drift over all methods), using CUDA events on a GPU and
perf_counter on the CPU, and the median over rounds is reported. Methods that log "sampled" (vsam,
looksam) also report the measured fraction p of two-pass steps (and each round's, beside each
round's time: `round_sampled`, `round_ms`), and their ratio is to be read against 1 + p (vSAM
samples per window of `window` steps and its first window after warm-up has no SAM step, so give
it several windows: rounds x steps >> window).

    gvr-lab bench --model resnet18 --shape 3x32 --batch-size 128 --device cuda \
        --methods sgd sam vsam gvr:penalty=closed_form,target=fc reg_loss:hvp=fd
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from torch.profiler import ProfilerActivity, profile

from .data import Augment, Batch, DatasetInfo, DeviceLoader, Split
from .landscape import Objective
from .methods import METHODS as METHOD_NAMES
from .methods import in_table_order, method_class
from .methods.base import TWO_VIEW_SGD, SpeedTarget
from .models import create_model, input_channels
from .results import write_atomic
from .training import Config, DeviceSettings, build_model

EPOCH_IMAGES = 50_000  # per-epoch figures are for a CIFAR-sized epoch
SEED = 0  # of every method's initial weights, the batch and the shuffled timing order
# Warm-up steps run in this epoch and every timed round in the next one, past every method's warm-up
# or start epoch: per-epoch state (SAF's memory of the batch's logits, grown at an epoch start) is
# then in place and the timed steps do all the work of a steady-state step.
STEADY_EPOCH = 10_000


@dataclass
class Result:
    label: str
    ms_per_step: float
    ms_min: float
    images_per_s: float
    s_per_epoch: float
    ratio_to_sgd: float
    peak_mem_mb: float
    sampled_fraction: float | None
    # Each timed round's ms per step and, for methods that log "sampled", its fraction of two-pass
    # steps: a round's time depends on how many two-pass steps it held, which the median hides.
    round_ms: list[float] = field(default_factory=list)
    round_sampled: list[float] | None = None


def fit_to_batch(name: str, hp: dict, batch_size: int) -> dict:
    """Give micro-batch methods a micro-batch that divides the batch when none was asked for."""
    cls = method_class(name)
    if "micro_batch_size" in cls.hparams and "micro_batch_size" not in hp:
        hp = {**hp, "micro_batch_size": min(cls.hparams["micro_batch_size"], batch_size)}
    cls.check_batch_size(cls.resolve_hparams(hp), batch_size)
    return hp


DATA_LABEL = "data (crop, flip, cutout 0.5)"
HVP_LABEL = "hvp (one Hessian-vector product)"


class HessianVectorProduct:
    """One H v on the batch by double backward, the unit every curvature measurement is counted in
    (gvr_lab.landscape), timed like a method's step."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.objective = model, Objective
        self.v = [torch.randn_like(p) for p in model.parameters()]

    def start_epoch(self, epoch: int) -> None:
        pass

    def step(self, batch: Batch) -> dict:
        self.objective(self.model, [(batch.x, batch.y)]).hvp(self.v)
        self.model.train()
        return {}


def bench_loader(
    channels: int,
    size: int,
    num_classes: int,
    batch_size: int,
    settings: DeviceSettings,
    views: int,
    batches: int = 1,
    model_channels: int | None = None,
) -> DeviceLoader:
    """The training loader over random uint8 images of the shape, with the GVR code's augmentation:
    what feeds a real run, device-resident (1-channel images repeated to `model_channels`)."""
    g = torch.Generator().manual_seed(SEED)
    n = batches * batch_size
    split = Split(
        torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g),
        torch.randint(0, num_classes, (n,), generator=g),
    )
    info = DatasetInfo("bench", num_classes, channels, size, (0.5,) * channels, (0.25,) * channels)
    return DeviceLoader(
        split,
        info,
        batch_size=batch_size,
        device=settings.device,
        augment=Augment(cutout_p=0.5),
        views=views,
        seed=SEED,
        channels_last=settings.channels_last,
        channels=model_channels,
    )


class Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            self.begin = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.t0 = time.perf_counter()

    def stop_ms(self) -> float:
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            return self.begin.elapsed_time(self.end)
        return 1000 * (time.perf_counter() - self.t0)


def run_bench(
    model: str,
    shape: tuple[int, int],
    num_classes: int,
    batch_size: int,
    methods: list[tuple[str, dict]],
    device: str = "cpu",
    precision: str = "auto",
    compile: bool = False,
    steps: int = 5,
    warmup: int = 3,
    rounds: int = 5,
    profile: bool = False,
    cuda_settings: bool = False,
    hvp: bool = False,
) -> dict:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    load_before = os.getloadavg()[0]  # other work on the machine inflates CPU figures: recorded with them
    channels, size = shape
    parsed = [(method_class(name).name, hp) for name, hp in methods]
    if all(name != "sgd" or hp for name, hp in parsed):
        parsed.insert(0, ("sgd", {}))

    def config_of(name: str, hp: dict) -> Config:
        # The optimizer settings of a CIFAR run; model, optimizer and method are built as training builds them.
        return Config(
            model=model,
            method=name,
            method_args=hp,
            batch_size=batch_size,
            lr=0.01,
            momentum=0.9,
            weight_decay=5e-4,
            seed=SEED,
            device=device,
            precision=precision,
            compile=compile,
            cuda_settings=cuda_settings,
        )

    settings = DeviceSettings.of(config_of("sgd", {}), dev)
    with torch.device("meta"):  # a model built for 3 channels gets 1-channel images repeated
        model_channels = input_channels(create_model(model, num_classes=num_classes, in_channels=channels))
    # Every method steps on this one batch (two views, for gvr), so data time is not in its figure.
    batch = next(bench_loader(channels, size, num_classes, batch_size, settings, 2, 1, model_channels).epoch(0))

    def make_entry(name: str, hp: dict, label: str, batch: Batch) -> dict:
        _, _, method = build_model(config_of(name, hp), num_classes, channels, settings)
        method.start_epoch(STEADY_EPOCH)
        return {"label": label, "method": method, "batch": batch, "times": [], "sampled": []}

    entries = []
    for name, hp in parsed:
        hp = fit_to_batch(name, hp, batch_size)
        entries.append(
            make_entry(name, hp, name + (":" + ",".join(f"{k}={v}" for k, v in hp.items()) if hp else ""), batch)
        )
    if any(e["method"].views == 2 for e in entries):
        # Two-view methods (gvr) pass 2B images per step: their fair reference is sgd on both views.
        both = Batch(torch.cat([batch.x, batch.x2]), torch.cat([batch.y, batch.y]), torch.cat([batch.index] * 2))
        entries.append(make_entry("sgd", {}, TWO_VIEW_SGD, both))
    if hvp:
        entry = make_entry("sgd", {}, HVP_LABEL, batch)
        entry["method"] = HessianVectorProduct(entry["method"].model)
        entries.append(entry)

    clock = Clock(dev)
    for entry in entries:
        for _ in range(warmup):
            entry["method"].step(entry["batch"])
    if dev.type == "cuda":
        torch.cuda.synchronize()
    order = random.Random(SEED)
    for r in range(rounds):
        for entry in order.sample(entries, len(entries)):
            entry["method"].start_epoch(STEADY_EPOCH + 1 + r)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            clock.start()
            sampled = []
            for _ in range(steps):
                out = entry["method"].step(entry["batch"])
                if "sampled" in out:
                    sampled.append(torch.as_tensor(out["sampled"], dtype=torch.float32))
            entry["times"].append(clock.stop_ms() / steps)
            if sampled:
                entry["sampled"].append(torch.stack(sampled).mean())
            entry["peak"] = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else float("nan")

    data_times, loader = [], bench_loader(channels, size, num_classes, batch_size, settings, 1, steps, model_channels)
    for r in range(rounds):  # the loader alone: what an sgd step waits for its batch
        batches = loader.epoch(r)
        clock.start()
        for _ in range(steps):
            next(batches)
        data_times.append(clock.stop_ms() / steps)

    # Ratios are to plain sgd wherever it stands in the list (it is added first when not asked for).
    sgd_ms = statistics.median(next(e for e in entries if e["label"] == "sgd")["times"])

    def result(label: str, times: list[float], peak: float, sampled: list[torch.Tensor]) -> Result:
        ms = statistics.median(times)
        return Result(
            label,
            ms,
            min(times),
            1000 * batch_size / ms,
            ms / 1000 * EPOCH_IMAGES / batch_size,
            ms / sgd_ms,
            peak,
            float(torch.stack(sampled).mean()) if sampled else None,  # every round has `steps` steps
            list(times),
            [float(s) for s in sampled] if sampled else None,
        )

    results = [result(e["label"], e["times"], e["peak"], e["sampled"]) for e in entries]
    results.append(result(DATA_LABEL, data_times, float("nan"), []))
    profiles = {e["label"]: profile_steps(e["method"], e["batch"], steps, dev) for e in entries} if profile else {}
    return {
        "setup": {
            "model": model,
            "shape": f"{channels}x{size}",
            "batch_size": batch_size,
            "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev)
            if dev.type == "cuda"
            else (platform.processor() or platform.machine()),
            "threads": torch.get_num_threads(),
            "precision": "bf16" if settings.amp_dtype is not None else "fp32",
            "channels_last": settings.channels_last,
            "fused_sgd": settings.fused,
            "compile": compile,
            "steps": steps,
            "warmup": warmup,
            "rounds": rounds,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        },
        "results": [asdict(r) for r in results],
        "profiles": profiles,
    }


def profile_steps(method, batch, steps: int, device: torch.device) -> str:
    """torch.profiler's table of the ops of `steps` steps, by self time: where a ratio comes from
    (how many backward passes, which kernels, what Python overhead between them)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            method.step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=12)


def format_table(report: dict) -> str:
    s = report["setup"]
    lines = [
        f"# {s['model']} {s['shape']} batch {s['batch_size']} on {s['device']} ({s['device_name']}, "
        f"{s['threads']} threads), {s['precision']}, compile={s['compile']}, torch {s['torch']}; "
        f"median of {s['rounds']} rounds x {s['steps']} steps",
        "| method | ms/step (median) | ms/step (min) | img/s | s per 50k epoch | x sgd | peak MiB | p (two-pass) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        p = "" if r["sampled_fraction"] is None else f"{r['sampled_fraction']:.2f}"
        lines.append(
            f"| {r['label']} | {r['ms_per_step']:.1f} | {r['ms_min']:.1f} | {r['images_per_s']:.0f} | "
            f"{r['s_per_epoch']:.2f} | {r['ratio_to_sgd']:.2f} | {r['peak_mem_mb']:.0f} | {p} |"
        )
    for label, table in report.get("profiles", {}).items():
        lines += ["", f"## profile: {label} ({s['steps']} steps)", table]
    return "\n".join(lines)


def write_report(report: dict, path: str) -> None:
    write_atomic(Path(path), (json.dumps(report, indent=2) + "\n").encode())


# ---------------------------------------------------------------------- BENCHMARKS.md, written by the tool

# Speed targets (ours; set for a GPU) of rows that are no method's: the loader and the curvature
# instruments' unit. A method's own are in its class (Method.speed_targets).
OTHER_TARGETS = (
    SpeedTarget("data < 5% of an sgd step", {}, "sgd", 0.05),
    SpeedTarget("one Hessian-vector product ~ 2x an sgd step", {}, "sgd", 2.0),
)


def targets() -> list[tuple[str, tuple[str, dict], tuple[str, dict], object]]:
    """(what, the row's (name, hyper-parameters), its reference row's, bound) of every speed target:
    every registered method's, in the method table's order, then the loader's and the HVP's."""
    out = [
        (t.what, (cls.name, t.hparams), (t.reference, {}), t.bound)
        for cls in in_table_order()
        for t in cls.speed_targets
    ]
    for target, label in zip(OTHER_TARGETS, (DATA_LABEL, HVP_LABEL)):
        out.append((target.what, (label, {}), (target.reference, {}), target.bound))
    return out


def all_bench_rows() -> list[tuple[str, dict]]:
    """`--methods all`: every registered method's benchmark rows (Method.bench_rows), in the method
    table's order."""
    return [(cls.name, dict(hp)) for cls in in_table_order() for hp in cls.bench_rows]


# A CPU's kernels and noise differ from the GPU the targets were set for: there a target counts as
# met within this factor.
CPU_SLACK = 1.1


def label_spec(label: str) -> tuple[str, dict]:
    """'reg_loss:hvp=fd,micro_batch_size=32' -> ('reg_loss', {'hvp': 'fd', 'micro_batch_size': 32}),
    the values typed as YAML reads them."""
    name, _, args = label.partition(":")
    pairs = (item.split("=", 1) for item in filter(None, args.split(",")))
    return name, {key: yaml.safe_load(value) for key, value in pairs}


def find_row(rows: list[dict], spec: tuple[str, dict]) -> dict | None:
    name, wanted = spec
    for row in rows:
        row_name, hp = label_spec(row["label"])
        # A hyper-parameter not in the label has its default: hvp 'exact', penalty 'exact', ...
        if row_name == name and all(
            hp.get(k, method_class(name).hparams.get(k) if name in METHOD_NAMES else None) == v
            for k, v in wanted.items()
        ):
            return row
    return None


def verdicts(report: dict) -> list[tuple[str, str, str]]:
    """(target, measured median / min ratio against its bound, verdict) for every target whose rows
    were measured."""
    cpu = report["setup"]["device"] == "cpu"
    out = []
    for what, spec, reference_spec, bound in targets():
        row, reference = find_row(report["results"], spec), find_row(report["results"], reference_spec)
        if row is None or reference is None:
            continue
        if callable(bound):
            name, hp = label_spec(row["label"])
            bound = bound(method_class(name).resolve_hparams(hp), row["sampled_fraction"] or 0.0)
        median = row["ms_per_step"] / reference["ms_per_step"]
        least = row["ms_min"] / reference["ms_min"]
        if median <= bound:
            verdict = "met"
        elif least <= bound:
            verdict = "met by the minimum, not by the median"
        elif cpu and median <= CPU_SLACK * bound:
            verdict = f"met within {CPU_SLACK - 1:.0%} (a CPU)"
        else:
            verdict = "not met"
        out.append((what, f"{median:.2f} / {least:.2f} (bound {bound:.2f})", verdict))
    return out


def markdown_report(report: dict, source: str) -> str:
    """The block BENCHMARKS.md holds for a bench JSON: setup, command, table, verdicts."""
    s = report["setup"]
    specs = [r["label"] for r in report["results"] if r["label"] not in (DATA_LABEL, TWO_VIEW_SGD, HVP_LABEL)]
    command = (
        f"gvr-lab bench --model {s['model']} --shape {s['shape']} --batch-size {s['batch_size']} "
        f"--device {s['device']} --precision {s['precision']}{' --compile' if s['compile'] else ''} "
        f"--rounds {s['rounds']} --steps {s['steps']} --warmup {s['warmup']}"
        f"{' --hvp' if any(r['label'] == HVP_LABEL for r in report['results']) else ''}"
        f"{' --profile' if report.get('profiles') else ''} --json {source} "
        f"--into BENCHMARKS.md --methods {' '.join(specs)}"
    )
    load = s.get("load_average")
    lines = [
        f"Measured on {s['device_name']} ({s['device']}, {s['threads']} threads), torch {s['torch']}, "
        f"Python {s['python']}; median and minimum over {s['rounds']} rounds of {s['steps']} steps"
        + (f"; 1-minute load average {load[0]} before, {load[1]} after." if load else "."),
        "",
        "```bash",
        command,
        "```",
        "",
        *format_table({**report, "profiles": {}}).splitlines()[1:],
    ]
    for label, table in report.get("profiles", {}).items():
        lines += ["", f"torch.profiler, {label} ({s['steps']} steps):", "", "```text", table.strip("\n"), "```"]
    rows = [] if report.get("profiles") else verdicts(report)  # a profiled run's times carry the profiler
    if rows:
        lines += ["", "| target | measured x (median / min) | verdict |", "|---|---|---|"]
        lines += [f"| {what} | {measured} | {verdict} |" for what, measured, verdict in rows]
    return "\n".join(lines)


def block_markers(source: str, tool: str = "gvr-lab bench") -> tuple[str, str]:
    return f"<!-- written by {tool} from {source}; do not edit by hand -->", f"<!-- end of {source} -->"


def write_markdown_block(markdown_file: str, source: str, render=markdown_report, tool: str = "gvr-lab bench") -> None:
    """Put the block `render` makes of the JSON `source` (written by `tool`) into `markdown_file`: in
    place of its previous block, or appended; the rest of the file is kept (written atomically)."""
    report = json.loads(Path(source).read_text())
    begin, end = block_markers(source, tool)
    path = Path(markdown_file)
    text = path.read_text() if path.is_file() else ""
    block = f"{begin}\n{render(report, source)}\n{end}"
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        text = head + block + rest.partition(end)[2]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    write_atomic(path, text.encode())
