"""What a training grid shows while it runs, and how the package shows things in a notebook.

A grid reports which run of how many it is on, the run's label and seed, and one line per epoch
that names the run. In a Jupyter kernel the report is one text display updated in place (a line per
run: the finished ones' results, the running one's latest epoch) above a learning-curve plot
redrawn after every epoch; elsewhere each line is printed.
"""

from __future__ import annotations

import io
import sys
import time


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


def epoch_line(row: dict, epochs: int) -> str:
    return (f"epoch {row['epoch'] + 1}/{epochs} · train loss {row['train_loss']:.3f} · "
            f"test acc {percent(row['test_acc'])} · {row['epoch_time_s']:.1f} s")


def run_line(run, trained: bool) -> str:
    s = run.summary
    if s["status"] == "diverged":
        return f"diverged at step {s['diverged_step']} (loss {s['diverged_value']}); the grid goes on"
    done = (f"{s['epochs_completed']} epochs · test acc {percent(s['final_test_acc'])} · "
            f"{s['wall_time_s']:.0f} s")
    status = "" if s["status"] == "completed" else f" ({s['status']})"
    return done + status + ("" if trained else " · finished earlier: reused")


class TextReport:
    """Printed lines: one per epoch and one per finished run, each beginning `[i/n] label sSEED`."""

    def __init__(self, total: int):
        self.total = total
        self.prefix, self.epochs, self.trained = "", 0, False

    def start(self, index: int, config) -> None:
        self.prefix = f"[{index + 1}/{self.total}] {config.label} s{config.seed}"
        self.epochs, self.trained = config.epochs, False

    def epoch(self, row: dict) -> None:
        self.trained = True
        print(f"{self.prefix} · {epoch_line(row, self.epochs)}", flush=True)

    def finish(self, run) -> None:
        print(f"{self.prefix} · {run_line(run, self.trained)}", flush=True)


class LiveReport(TextReport):
    """In a kernel: the lines in one display updated in place, and test accuracy per epoch of every
    run so far, redrawn after each epoch (colours by method, as every figure), at most once a second
    (a drawing costs a good part of one) and always after the grid's last run."""

    def __init__(self, total: int):
        from IPython.display import display

        super().__init__(total)
        self.lines: list[str] = []
        self.curves: dict[str, tuple[str, list, list]] = {}  # run -> (method, epochs, accuracies)
        self.text = display({"text/plain": f"training {total} runs"}, raw=True, display_id=True)
        self.plot = None
        self.drawn_at = 0.0
        self.display = display

    def start(self, index: int, config) -> None:
        super().start(index, config)
        self.last = index == self.total - 1
        self.key = f"{config.label} s{config.seed}"
        self.curves[self.key] = (config.method, [], [])
        self.lines.append(f"{self.prefix} · starting")
        self.refresh()

    def epoch(self, row: dict) -> None:
        self.trained = True
        self.lines[-1] = f"{self.prefix} · {epoch_line(row, self.epochs)}"
        _, epochs, accs = self.curves[self.key]
        epochs.append(row["epoch"] + 1)
        accs.append(100 * row["test_acc"])
        self.refresh(draw=time.monotonic() - self.drawn_at >= 1.0)

    def finish(self, run) -> None:
        if not self.trained:  # reused: its whole history at once
            _, epochs, accs = self.curves[self.key]
            epochs.extend(run.history["epoch"] + 1)
            accs.extend(100 * run.history["test_acc"])
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
        from IPython.display import Image
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        from .plots import LINESTYLES, legend_outside, method_color

        fig = Figure(figsize=(6.5, 3))
        ax = fig.add_subplot()
        per_method: dict[str, int] = {}
        for key, (method, epochs, accs) in self.curves.items():
            rank = per_method[method] = per_method.get(method, -1) + 1
            ax.plot(epochs, accs, marker="o", markersize=3, color=method_color(method),
                    linestyle=LINESTYLES[rank % len(LINESTYLES)], label=key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"training: {self.prefix}", fontsize=9, loc="left")
        legend_outside(ax)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
        return Image(data=buf.getvalue())


def grid_report(total: int) -> TextReport:
    return LiveReport(total) if in_kernel() else TextReport(total)
