"""What a training grid shows while it runs, and how the package shows things in a notebook.

A grid reports which run of how many it is on, the run's label and seed, and one line per evaluation
(per epoch, or per `eval_every` steps in steps mode) that names the run. In a Jupyter kernel the
report is one text display updated in place (a line per run: the finished ones' results, the running
one's latest evaluation) above a learning-curve plot redrawn after evaluations; elsewhere each line is
printed.

`gvr-lab runs DIR` (runs_report) shows the same from any terminal, read from the run directories
while their runs write: a line per run with its status, progress, last metrics and time.
"""

from __future__ import annotations

import io
import json
import sys
import time
from collections import Counter
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from . import results
from .collect import run_status
from .errors import UsageError
from .plots import LINESTYLES, legend_outside, method_color


def in_kernel() -> bool:
    """True inside a Jupyter kernel (JupyterLab, papermill), where outputs can be displayed and updated."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython else None
    return shell is not None and hasattr(shell, "kernel")


def show(obj, metadata: dict | None = None):
    """Display a figure or a table (without its row index) in a kernel; elsewhere print a table."""
    table = hasattr(obj, "to_string")
    if in_kernel():
        from IPython.display import display

        display(obj.style.hide(axis="index") if table else obj, metadata=metadata)
    elif table:
        print(obj.to_string(index=False))


def show_text(text: str, metadata: dict | None = None) -> None:
    """A line of text; in a kernel with `metadata` attached to its output, for the runner to read back."""
    if in_kernel():
        from IPython.display import display

        display({"text/plain": text}, raw=True, metadata=metadata)
    else:
        print(text)


def percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def evaluation_line(row: dict, config) -> str:
    """Where the run is (epoch i/n, or step i/n in steps mode), its training loss, its validation
    accuracy where it has a validation split (what settings are chosen on), else its test accuracy,
    and the interval's time."""
    if "step" in row:
        where = f"step {row['step']}/{config.steps}"
    else:
        where = f"epoch {row['epoch'] + 1}/{config.epochs}"
    split = "val" if "val_acc" in row else "test"
    return (
        f"{where} · train loss {row['train_loss']:.3f} · {split} acc {percent(row[f'{split}_acc'])} · "
        f"{row['interval_time_s']:.1f} s"
    )


def run_length(summary: dict, config) -> str:
    """How far a run trained: its steps in steps mode, else its epochs."""
    n, noun = (
        (summary.get("steps_completed", 0), "step") if config.steps else (summary.get("epochs_completed", 0), "epoch")
    )
    return f"{n} {noun}{'' if n == 1 else 's'}"


def progress_x(row: dict) -> int:
    """The learning curve's x: the epoch count, or the step in steps mode."""
    return row["step"] if "step" in row else row["epoch"] + 1


def history_curve(history) -> tuple[str, list, list]:
    """A run's learning curve from its evaluations: the split it shows ("val" where the run holds
    a validation split, else "test"), the epochs or steps, and the accuracies in %."""
    split = "val" if "val_acc" in history else "test"
    xs = [progress_x(row) for row in history.to_dict("records")]
    return split, xs, list(100 * history[f"{split}_acc"]) if len(history) else []


def run_line(run, trained: bool) -> str:
    s = run.summary
    if s["status"] == "diverged":
        return f"diverged at step {s['diverged_step']} (loss {s['diverged_value']}); the grid goes on"
    length = run_length(s, run.config)
    done = f"{length} · test acc {percent(s['final_test_acc'])} · {s['wall_time_s']:.0f} s"
    status = "" if s["status"] == "completed" else f" ({s['status']})"
    return done + status + ("" if trained else " · finished earlier: reused")


class TextReport:
    """Printed lines: one per evaluation and one per finished run, each beginning `[i/n] label sSEED`."""

    def __init__(self, total: int):
        self.total = total
        self.prefix, self.config, self.trained = "", None, False

    def start(self, index: int, config) -> None:
        self.prefix = f"[{index + 1}/{self.total}] {config.label} s{config.seed}"
        self.config, self.trained = config, False

    def evaluation(self, row: dict) -> None:
        self.trained = True
        print(f"{self.prefix} · {evaluation_line(row, self.config)}", flush=True)

    def finish(self, run) -> None:
        print(f"{self.prefix} · {run_line(run, self.trained)}", flush=True)


class LiveReport(TextReport):
    """In a kernel: the lines in one display updated in place, and the accuracy per evaluation of every
    run so far (validation accuracy where runs hold a validation split, else test accuracy), redrawn
    after each evaluation (colours by method, as every figure), at most once a second (a drawing
    costs a good part of one) and always after the grid's last run."""

    def __init__(self, total: int):
        from IPython.display import display

        super().__init__(total)
        self.lines: list[str] = []
        self.curves: dict[str, tuple[str, list, list]] = {}  # run -> (method, epochs or steps, accuracies)
        self.text = display({"text/plain": f"training {total} runs"}, raw=True, display_id=True)
        self.plot = None
        self.drawn_at = 0.0
        self.display = display
        self.split = "test"  # "val" once a run brings a validation split

    def start(self, index: int, config) -> None:
        super().start(index, config)
        self.last = index == self.total - 1
        self.key = f"{config.label} s{config.seed}"
        self.curves[self.key] = (config.method, [], [])
        self.lines.append(f"{self.prefix} · starting")
        self.refresh()

    def evaluation(self, row: dict) -> None:
        self.trained = True
        self.lines[-1] = f"{self.prefix} · {evaluation_line(row, self.config)}"
        _, xs, accs = self.curves[self.key]
        self.split = "val" if "val_acc" in row else self.split
        xs.append(progress_x(row))
        accs.append(100 * row[f"{self.split}_acc"] if f"{self.split}_acc" in row else float("nan"))
        self.refresh(draw=time.monotonic() - self.drawn_at >= 1.0)

    def finish(self, run) -> None:
        if not self.trained:  # reused: its whole history at once
            _, xs, accs = self.curves[self.key]
            split, run_xs, run_accs = history_curve(run.history)
            self.split = "val" if split == "val" else self.split
            xs.extend(run_xs)
            accs.extend(run_accs if split == self.split else [float("nan")] * len(run_xs))
        self.lines[-1] = f"{self.prefix} · {run_line(run, self.trained)}"
        self.refresh(draw=self.last or time.monotonic() - self.drawn_at >= 1.0)

    def refresh(self, draw: bool = False) -> None:
        self.text.update({"text/plain": "\n".join(self.lines)}, raw=True)
        if draw:
            self.drawn_at = time.monotonic()
            image = self.draw()
            if self.plot is None:
                self.plot = self.display(image, display_id=True)
            else:
                self.plot.update(image)

    def draw(self):
        return curves_image(self.curves, self.config.steps, self.split, f"training: {self.prefix}")


def curves_image(curves: dict, steps: bool, split: str, title: str):
    """The learning curves of a grid's runs (run -> (method, epochs or steps, accuracies in %)) as a
    PNG image for a kernel's display: colours by method, as every figure, line styles by run."""
    from IPython.display import Image

    fig = Figure(figsize=(6.5, 3))
    ax = fig.add_subplot()
    per_method: dict[str, int] = {}
    for key, (method, xs, accs) in curves.items():
        rank = per_method[method] = per_method.get(method, -1) + 1
        ax.plot(
            xs,
            accs,
            marker="o",
            markersize=3,
            color=method_color(method),
            linestyle=LINESTYLES[rank % len(LINESTYLES)],
            label=key,
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step" if steps else "epoch")
    ax.set_ylabel(f"{'validation' if split == 'val' else 'test'} accuracy (%)")
    ax.set_title(title, fontsize=9, loc="left")
    legend_outside(ax)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return Image(data=buf.getvalue())


def run_fraction(config) -> float:
    """How much of a run its directory says is done (0 without a summary), read while it trains."""
    path = config.run_dir() / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):  # not started, or being replaced this instant
        return 0.0
    if summary.get("status") in ("completed", "diverged"):
        return 1.0
    if config.steps:
        return min(1.0, summary.get("steps_completed", 0) / config.steps)
    return min(1.0, summary.get("epochs_completed", 0) / config.epochs)


class GridStatus:
    """A grid whose runs train in parallel (the ray executor): runs done / running / queued /
    failed with their labels, and the time left, read from the run directories (the unit of truth,
    on whichever node a run trains). In a kernel one display updated in place; elsewhere a status
    line when the counts change (at least every 30 s) and a line per finished run.

    The time left is the work left (runs not done, less what the running ones have done) over the
    rate at which this grid has done work so far; runs found finished cost nothing and count nothing."""

    def __init__(self, configs: list, where: str):
        self.configs, self.where = configs, where
        self.state = ["queued"] * len(configs)
        self.detail = [""] * len(configs)
        self.start_fraction = [run_fraction(c) for c in configs]
        self.fraction = list(self.start_fraction)
        self.t0, self.submitted_at = time.monotonic(), time.time()
        self.printed_at, self.printed_counts = 0.0, None
        self.kernel = in_kernel()
        self.handle = self.plot = None
        self.drawn_at, self.read_mtimes = 0.0, [0.0] * len(configs)
        self.curves: dict[str, tuple[str, list, list]] = {}  # run -> (method, epochs or steps, accuracies)
        self.errors: list[tuple[int, BaseException]] = []

    def label(self, index: int) -> str:
        config = self.configs[index]
        return f"[{index + 1}/{len(self.configs)}] {config.label} s{config.seed}"

    def counts(self) -> dict:
        return {state: self.state.count(state) for state in ("done", "running", "queued", "failed")}

    def time_left(self) -> float | None:
        gained = sum(max(0.0, f - f0) for f, f0 in zip(self.fraction, self.start_fraction))
        left = sum(1.0 - f for f, s in zip(self.fraction, self.state) if s not in ("done", "failed"))
        elapsed = time.monotonic() - self.t0
        if left == 0:
            return 0.0
        return left * elapsed / gained if gained > 0.02 else None

    def header(self) -> str:
        counts = " · ".join(f"{n} {state}" for state, n in self.counts().items())
        left = self.time_left()
        eta = "time left: estimating" if left is None else f"about {format_duration(left)} left"
        return f"grid of {len(self.configs)} runs on {self.where}: {counts} · {eta}"

    def submitted(self) -> None:
        self.submitted_at = time.time()
        self.show(force=True)

    def started(self, config) -> bool:
        """A run writes its config.json when its training loop starts (fresh or resumed)."""
        try:
            return (config.run_dir() / "config.json").stat().st_mtime >= self.submitted_at - 1.0
        except OSError:
            return False

    def poll(self) -> None:
        for i, config in enumerate(self.configs):
            if self.state[i] in ("queued", "running"):
                self.fraction[i] = max(self.fraction[i], run_fraction(config))
                if self.state[i] == "queued" and (self.fraction[i] > self.start_fraction[i] or self.started(config)):
                    self.state[i] = "running"
        self.show()

    def finished(self, index: int, summary: dict) -> None:
        self.state[index], self.fraction[index] = "done", 1.0
        config = self.configs[index]
        length = run_length(summary, config)
        self.detail[index] = (
            f"{summary['status']}: {length} · test acc {percent(summary.get('final_test_acc', float('nan')))}"
            f" · {summary.get('wall_time_s', 0):.0f} s"
        )
        self.announce(index)

    def failed(self, index: int, error: BaseException) -> None:
        self.errors.append((index, error))
        self.state[index] = "failed"
        lines = str(error).strip().splitlines()
        self.detail[index] = f"failed: {lines[-1] if lines else type(error).__name__}"
        self.announce(index)

    def announce(self, index: int) -> None:
        if not self.kernel:
            print(f"{self.label(index)} · {self.detail[index]}", flush=True)
        self.show(force=True)

    def close(self) -> None:
        """The last status; then, if runs failed, the first failure raised (the grid went on)."""
        self.show(force=True)
        if self.errors:
            index, error = self.errors[0]
            lines = str(error).strip().splitlines()
            raise RuntimeError(
                f"{len(self.errors)} run(s) of the grid failed; first: {self.configs[index].label} seed "
                f"{self.configs[index].seed}: {lines[-1] if lines else type(error).__name__}"
            )

    def lines(self) -> list[str]:
        out = [self.header()]
        for i, state in enumerate(self.state):
            if state == "running":
                out.append(f"{self.label(i)} · running, {100 * self.fraction[i]:.0f}% done")
            else:
                out.append(f"{self.label(i)} · {self.detail[i] or state}")
        return out

    def read_curves(self) -> bool:
        """Each started run's evaluations so far, re-read where its summary changed; True if any did."""
        changed = False
        for i, config in enumerate(self.configs):
            try:
                mtime = (config.run_dir() / results.SUMMARY).stat().st_mtime
            except OSError:  # not started
                continue
            if mtime == self.read_mtimes[i]:
                continue
            self.read_mtimes[i], changed = mtime, True
            history = results.read_run(config.run_dir(), tables=(results.EPOCHS,)).tables[results.EPOCHS]
            _, xs, accs = history_curve(history)
            self.curves[f"{config.label} s{config.seed}"] = (config.method, xs, accs)
        return changed

    def show(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.kernel:
            if force or now - self.printed_at >= 2.0:
                self.printed_at = now
                from IPython.display import display

                text = {"text/plain": "\n".join(self.lines())}
                if self.handle is None:
                    self.handle = display(text, raw=True, display_id=True)
                else:
                    self.handle.update(text, raw=True)
            # the curves at most every 5 s (a drawing costs a good part of one), and at the end
            if (force or now - self.drawn_at >= 5.0) and self.read_curves() and self.curves:
                self.drawn_at = now
                split = "val" if self.configs[0].val_split else "test"
                image = curves_image(self.curves, self.configs[0].steps, split, f"grid on {self.where}")
                if self.plot is None:
                    self.plot = display(image, display_id=True)
                else:
                    self.plot.update(image)
            return
        counts = self.counts()
        if counts != self.printed_counts or now - self.printed_at >= 30.0:
            self.printed_at, self.printed_counts = now, counts
            print(self.header(), flush=True)


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def grid_report(total: int) -> TextReport:
    return LiveReport(total) if in_kernel() else TextReport(total)


# ---------------------------------------------------------------------- a folder of runs on a terminal (gvr-lab runs)


def listed_runs(root) -> dict[Path, tuple[str, int]]:
    """{run directory: (label, seed)} of every run under `root`: first those that the grids there
    list (grid.json, in grid order, started or not), then every other run directory."""
    root = Path(root)
    listed = {}
    for grid in sorted(root.rglob(results.GRID)):
        for entry in results.read_json(grid)["runs"]:
            listed[grid.parent / entry["run_dir"]] = (entry["label"], entry["seed"])
    for run_dir in results.run_dirs(root):
        if run_dir not in listed:
            config = results.read_json(run_dir / results.CONFIG)
            listed[run_dir] = (config.get("label") or run_dir.name, config.get("seed", 0))
    return listed


def run_state(run_dir: Path, now: float) -> tuple[str, str]:
    """(status, what the run's line says after its name): its status (queued: a grid's run without a
    directory yet; starting: no summary yet), how far it is (live from steps.jsonl while it runs),
    its last evaluation's training loss and accuracy and its validation (else test) accuracy, and
    its training time (while it runs: to its last logged step, and how long ago it last wrote)."""
    if not (run_dir / results.CONFIG).is_file():
        return "queued", "queued"
    files = results.read_run(run_dir, (results.EPOCHS,))
    summary, history = files.summary, files.tables[results.EPOCHS]
    if not summary:
        return "starting", "starting"
    status = run_status(files)
    done, total = summary.get("steps_completed", 0), summary.get("total_steps", 0)
    lines = run_dir / results.STEP_LINES
    if status == "running" and lines.is_file():
        last = results.last_line(lines)
        done = max(done, last["step"] + 1 if last else 0)
    parts = [f"diverged at step {summary['diverged_step']}" if status == "diverged" else status]
    if total:
        per_epoch = summary.get("steps_per_epoch") or total
        epochs = f"epoch {done // per_epoch}/{-(-total // per_epoch)}"
        parts.append(f"{f'step {done}/{total}' if files.config.get('steps') else epochs} ({100 * done / total:.0f}%)")
    if len(history):
        row = history.iloc[-1]
        split = "val" if "val_acc" in history else "test"
        parts.append(f"train loss {row['train_loss']:.3f} acc {percent(row['train_acc'])}")
        parts.append(f"{split} acc {percent(row[f'{split}_acc'])}")
    seconds = summary.get("wall_time_s", 0.0)
    if status == "running":
        stamps = [p.stat().st_mtime if p.is_file() else 0.0 for p in (run_dir / results.SUMMARY, lines)]
        # the summary's time stops at its last write (an evaluation); its steps logged since add theirs
        seconds += max(0.0, stamps[1] - stamps[0])
        time_text = f"{format_duration(seconds)}, last write {format_duration(max(0.0, now - max(stamps)))} ago"
    else:
        time_text = format_duration(seconds)
    parts.append(time_text)
    return status, " · ".join(parts)


def runs_report(root) -> list[str]:
    """What `gvr-lab runs DIR` prints: the runs under DIR counted by status, then a line per run
    (label, seed, run_state), each read as one consistent state while its run writes (read_run)."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder: name a folder of runs (a grid's, a study's, or runs/)")
    listed = listed_runs(root)
    if not listed:
        raise UsageError(f"no runs under {root}: no folder holding {results.CONFIG}, no {results.GRID}")
    now = time.time()
    states = {run_dir: run_state(run_dir, now) for run_dir in listed}
    counts = Counter(status.split(":")[0] for status, _ in states.values())
    header = f"{len(listed)} run{'s' if len(listed) > 1 else ''} under {root}: " + " · ".join(
        f"{n} {status}" for status, n in counts.items()
    )
    return [header, *(f"{label} s{seed} · {states[run_dir][1]}" for run_dir, (label, seed) in listed.items())]
