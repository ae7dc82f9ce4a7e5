"""Figures and tables from results files (load_runs), never from the training loop.

One style (seaborn "paper", TrueType fonts in PDFs), one way to save (PNG for reading, PDF for
papers, byte-stable, written to a temporary file then renamed), one way to aggregate seeds
(mean +- std), one way to write tables (markdown and LaTeX from the same frame).
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
import pandas as pd
import seaborn as sns

from .results import write_atomic

LABELS = {
    "epoch": "epoch", "step": "step", "test_acc": "test accuracy", "train_acc": "training accuracy",
    "val_acc": "validation accuracy", "train_loss": "training loss", "test_loss": "test loss",
    "grad_norm": "gradient norm", "micro_grad_norm": "mean micro-batch gradient norm",
    "penalty": "penalty", "grad_diff_norm": "||g_a - g_b|| (gradient difference)",
    "psf_norm": "PSF norm", "epoch_time_s": "time per epoch (s)", "images_per_s": "throughput (images/s)",
}


def figure_dir(fig_root, notebook_stem: str) -> Path:
    """figures/<name>/ for notebooks/NN_<name>.py."""
    path = Path(fig_root) / notebook_stem.split("_", 1)[-1]
    path.mkdir(parents=True, exist_ok=True)
    return path


def set_style() -> None:
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.1)
    plt.rcParams.update({"pdf.fonttype": 42, "ps.fonttype": 42, "figure.dpi": 100})


def label(column: str) -> str:
    return LABELS.get(column, column.replace("_", " "))


def savefig(fig, stem) -> list[Path]:
    """Write stem.png and stem.pdf atomically; returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig.set_layout_engine("constrained")  # side-by-side axes keep their labels apart
    paths = []
    for ext, kw in ((".png", {"dpi": 200}), (".pdf", {"metadata": {"CreationDate": None}})):
        path = stem.with_suffix(ext)
        tmp = path.with_name(f".{path.name}.tmp")
        fig.savefig(tmp, format=ext[1:], bbox_inches="tight", **kw)
        os.replace(tmp, path)
        paths.append(path)
    plt.close(fig)
    return paths


def curves(df: pd.DataFrame, x: str, y: str, hue: str = "label", ax=None, logy: bool = False, title: str = ""):
    """Mean +- std over seeds of y against x, one line per hue value. Epochs are counted from 1
    (the metrics of epoch row 0 are those after one epoch of training)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.4))
    if x == "epoch":
        df = df.assign(epoch=df["epoch"] + 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    sns.lineplot(data=df, x=x, y=y, hue=hue, errorbar="sd", ax=ax, marker="o" if df[x].nunique() < 30 else None)
    if ax.get_legend() is not None and hue == "label":
        ax.get_legend().set_title(None)  # the labels name themselves
    ax.set_xlabel(label(x))
    ax.set_ylabel(label(y))
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    return ax


def mean_std(df: pd.DataFrame, by: list[str], metrics: list[str], scale: float = 1.0, digits: int = 2) -> pd.DataFrame:
    """One row per group: 'mean +- std (n)' of each metric over the rows (seeds) of the group."""
    def cell(s: pd.Series) -> str:
        s = s.dropna() * scale
        std = f" ± {s.std():.{digits}f}" if len(s) > 1 else ""
        return f"{s.mean():.{digits}f}{std}"

    grouped = df.groupby(by, sort=False)
    table = grouped[metrics].agg(cell)
    table["seeds"] = grouped.size()
    return table.reset_index()


def ordered(df: pd.DataFrame, column: str, order: list) -> pd.DataFrame:
    """The rows with `column` in the given order (values not in it last, as they came): tables and
    legends then follow a notebook's parameters, not the alphabetical order of run directories."""
    rank = {value: i for i, value in enumerate(order)}
    return df.sort_values(column, key=lambda values: values.map(rank).fillna(len(rank)), kind="stable")


def final_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The last epoch of each run in a load_runs() table."""
    return df.sort_values("epoch", kind="stable").groupby("run_dir", sort=False).tail(1)


def save_table(table: pd.DataFrame, stem, caption: str = "") -> list[Path]:
    """Write stem.md and stem.tex from the same frame."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    md = (f"{caption}\n\n" if caption else "") + table.to_markdown(index=False) + "\n"
    tex = table.style.hide(axis="index").to_latex(hrules=True, caption=caption or None)
    paths = [stem.with_suffix(".md"), stem.with_suffix(".tex")]
    write_atomic(paths[0], md.encode())
    write_atomic(paths[1], tex.encode())
    return paths


def write_figures_index(root, preset: str | None, records: dict[str, dict] | None = None) -> Path:
    """figures/README.md: every figure and table under root, with the command that made it and,
    from `records` (runner.execution_record per notebook stem), what it took to make."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    records = records or {}
    lines = ["# Figures and tables", "",
             f"Regenerate all: `gvr-lab figures --preset {preset}` (or one notebook: "
             f"`gvr-lab run notebooks/<notebook>.py --preset {preset}`).", ""]
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(f for f in folder.iterdir() if f.suffix in (".png", ".md"))
        if not files:
            continue
        notebook = next(iter(sorted(Path("notebooks").glob(f"[0-9][0-9]_{folder.name}.py"))), f"*_{folder.name}.py")
        lines += [f"## {folder.name}", "", f"From `{notebook}`, preset `{preset}`."]
        record = records.get(Path(notebook).stem)
        if record:
            lines.append(f"Training: {record['training_runs']} runs, {record['training_time_s']:.0f} s of wall time "
                         f"on {', '.join(record['devices'])}; the execution that drew these took "
                         f"{record['wall_time_s']:.0f} s.")
        lines.append("")
        lines += [f"- [{f.name}]({folder.name}/{f.name})" for f in files]
        lines.append("")
    path = root / "README.md"
    write_atomic(path, "\n".join(lines).encode())
    return path
