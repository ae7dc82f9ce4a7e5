"""Figures and tables from results files (load_runs), never from the training loop.

What every figure shares, so none overstates its evidence:
* one palette keyed by method name (SGD is the same colour in every figure); labels of one method
  (two micro-batch sizes, two models) differ by line style and marker, not colour;
* accuracy in percent, on axes and in tables; integer ticks where the axis counts something;
* legends outside the data;
* one way to aggregate seeds: mean with a band (curves) or bars (points) of one std when a curve
  has more than one seed (geometric mean and std on a log axis, where mean - std can fall below
  zero), or with curves(band="ci") the 95% Student t interval of the mean, and the footer says
  how many seeds and what the band is;
* a footer with the dataset, model, epochs and steps, seeds and preset (`provenance`);
* sparse series (a metric logged only on some steps) drawn as points, never as lines across gaps;
  a curve identical to another one, which would hide under it, is named in the legend.
One way to save (PNG for reading, byte-stable PDF for papers, each written atomically), one way to
write tables (markdown and LaTeX from the same cell text, the LaTeX escaped so that pdflatex compiles
it: save_table), one way to write a mean with its confidence interval ('mean [low, high]' or
'mean ± half-width': interval_text).
"""

from __future__ import annotations

import io
import re
import textwrap
import unicodedata
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import LogNorm
from matplotlib.ticker import FuncFormatter, MaxNLocator

from .errors import UsageError, check_choice
from .methods import METHODS
from .results import write_atomic
from .stats import mean_ci as interval
from .stats import paired_differences

# What a curve's band shows over seeds: one std each side of the mean, the 95% Student t interval of
# the mean, or nothing.
BANDS = ("std", "ci", None)
CI_LEVEL = 0.95

# A method's colour is its class's (Method.color), fixed, not drawn from a cycle, so a method keeps its
# colour whichever others share the figure; one without draws from this palette by its name.
OTHER_COLORS = sns.color_palette("tab20", 20).as_hex()  # methods added later, by name
LINESTYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P"]

LABELS = {
    "epoch": "epoch",
    "step": "step",
    "test_acc": "test accuracy",
    "train_acc": "training accuracy",
    "val_acc": "validation accuracy",
    "best_test_acc": "best test accuracy",
    "train_loss": "training loss",
    "test_loss": "test loss",
    "grad_norm": "gradient norm",
    "micro_grad_norm": "mean micro-batch gradient norm",
    "penalty": "penalty",
    "grad_diff_norm": "||g_a - g_b|| (gradient difference)",
    "psf_norm": "PSF norm",
    "epoch_time_s": "time per epoch (s)",
    "images_per_s": "throughput (images/s)",
}


def method_color(method: str) -> str:
    registered = METHODS.get(method)
    if registered is not None and registered.color:
        return registered.color
    return OTHER_COLORS[sum(map(ord, method)) % len(OTHER_COLORS)]


def set_style() -> None:
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.1)
    plt.rcParams.update({"pdf.fonttype": 42, "ps.fonttype": 42, "figure.dpi": 100})


def is_accuracy(column: str) -> bool:
    return column.endswith("_acc")


def label(column: str) -> str:
    """The axis or column title of a metric; accuracies are shown in percent."""
    text = LABELS.get(column, column.replace("_", " "))
    return f"{text} (%)" if is_accuracy(column) else text


def styles(df: pd.DataFrame, hue: str = "label") -> dict[str, dict]:
    """Colour from the method, line style and marker from the label's rank among its method's labels,
    for each value of `hue` in order of appearance."""
    out, per_method = {}, {}
    for name, method in df.drop_duplicates(hue)[[hue, "method"]].itertuples(index=False):
        rank = per_method.get(method, 0)
        per_method[method] = rank + 1
        out[name] = {
            "color": method_color(method),
            "linestyle": LINESTYLES[rank % len(LINESTYLES)],
            "marker": MARKERS[rank % len(MARKERS)],
        }
    return out


def integer_ticks(axis, values) -> None:
    """Ticks on whole numbers only, for a discrete axis (epochs, bits): each value when there are few."""
    values = sorted(set(values))
    if len(values) <= 12:
        axis.set_ticks(values)
    else:
        axis.set_major_locator(MaxNLocator(integer=True))


def legend_outside(ax) -> None:
    """The legend right of the axes, out of the data."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=8)


def curves(
    df: pd.DataFrame,
    x: str,
    y: str,
    hue: str = "label",
    ax=None,
    logy: bool = False,
    title: str = "",
    points: bool = False,
    legend: bool = True,
    band: str | None = "std",
):
    """y against x, one curve per hue value: the mean over seeds with, where a curve has more than
    one seed, a band of one std (band="std"), of the 95% Student t interval of the mean ("ci", as
    stats.mean_ci) or none (None); with logy the geometric mean, the band taken on the logarithms.
    Epochs are counted from 1 (row 0 holds the metrics after one epoch). A figure with another
    band than std says so in its footer: `spread` of provenance (and of Study.save_figure).
    points=True draws every row as a point instead (sparse series, e.g. a metric of sampled steps).
    A curve whose means equal an earlier one's is named in the legend and dashed, since it would
    otherwise hide under it."""
    check_choice("band", band, BANDS)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.4))
    data = df.dropna(subset=[y])
    if x == "epoch":
        data = data.assign(epoch=data["epoch"] + 1)
        integer_ticks(ax.xaxis, data["epoch"])
    scale = 100.0 if is_accuracy(y) else 1.0
    drawn: dict[str, pd.Series] = {}
    for name, style in styles(data, hue).items():
        rows = data[data[hue] == name]
        if points:
            ax.plot(
                rows[x],
                rows[y] * scale,
                linestyle="none",
                marker=style["marker"],
                markersize=3,
                alpha=0.7,
                color=style["color"],
                label=name,
            )
            continue
        # geometric on a log axis: a band of mean ± std would cross zero, which a log axis cannot show
        values = np.log(rows[rows[y] > 0][y] * scale) if logy else rows[y] * scale
        grouped = values.groupby(rows[x])
        if band == "ci":
            spans = {at: interval(v.to_numpy(float), CI_LEVEL) for at, v in grouped}
            low, high = (pd.Series({at: span[i] for at, span in spans.items()}) for i in (1, 2))
        else:
            std = grouped.std()
            low, high = grouped.mean() - std, grouped.mean() + std
        mean, count = grouped.mean(), grouped.count()
        if logy:
            mean, low, high = np.exp(mean), np.exp(low), np.exp(high)
        twin = next(
            (other for other, m in drawn.items() if m.index.equals(mean.index) and np.array_equal(m, mean)), None
        )
        shown = dict(style, marker=style["marker"] if len(mean) < 30 else None, markersize=4)
        if twin is not None:
            shown.update(linestyle=(0, (4, 4)), label=f"{name} (identical to {twin}: drawn over it)")
        ax.plot(mean.index, mean.values, **{"label": name, **shown})
        if band and (count > 1).any():
            ax.fill_between(mean.index, low, high, color=style["color"], alpha=0.18, linewidth=0)
        drawn[name] = mean
    ax.set_xlabel(label(x))
    ax.set_ylabel(label(y))
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    if legend:
        legend_outside(ax)
    return ax


def half_width(values: pd.Series, band: str | None = "std") -> float | None:
    """The half-length of an error bar over `values` (seeds): one std ("std"), half the 95% Student t
    interval of the mean ("ci", as stats.mean_ci), or None (no bar) with one value or band None."""
    check_choice("band", band, BANDS)
    values = values.dropna().to_numpy(float)
    if band is None or len(values) < 2:
        return None
    if band == "std":
        return float(values.std(ddof=1))
    _, low, high = interval(values, CI_LEVEL)
    return (high - low) / 2


def points_with_bars(
    df: pd.DataFrame,
    x: str,
    y: str,
    hue: str = "label",
    ax=None,
    title: str = "",
    band: str | None = "std",
    xband: str | None = "",
):
    """One point per hue value at the mean of x and y over its rows (seeds), with bars where there is
    more than one seed: one std (band="std"), the 95% Student t interval of the mean ("ci") or none
    (None; see half_width), on y, and on x unless `xband` says otherwise (a throughput measured on
    shared cores is no sample of a method's speed: std, not an interval). A point on top of an
    earlier one is named in the legend."""
    xband = band if xband == "" else xband
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.8))
    xs, ys = (100.0 if is_accuracy(c) else 1.0 for c in (x, y))
    drawn: dict[str, tuple] = {}
    for name, style in styles(df, hue).items():
        rows = df[df[hue] == name]
        at = (xs * rows[x].mean(), ys * rows[y].mean())
        twin = next((other for other, point in drawn.items() if point == at), None)
        xerr, yerr = half_width(rows[x], xband), half_width(rows[y], band)
        ax.errorbar(
            *at,
            xerr=None if xerr is None else xs * xerr,
            yerr=None if yerr is None else ys * yerr,
            marker=style["marker"],
            color=style["color"],
            capsize=3,
            linestyle="none",
            label=name if twin is None else f"{name} (on top of {twin})",
        )
        drawn[name] = at
    ax.set_xlabel(label(x))
    ax.set_ylabel(label(y))
    if title:
        ax.set_title(title)
    legend_outside(ax)
    return ax


def level_with_ci(ax, rows: pd.DataFrame, y: str, label: str, color: str, linestyle: str = "--") -> None:
    """A horizontal reference line at the mean of `y` over `rows` (seeds), with its 95% Student t
    interval as a band where there is more than one seed: a baseline beside curves of other runs."""
    scale = 100.0 if is_accuracy(y) else 1.0
    mean, low, high = interval(rows[y].dropna().to_numpy(float) * scale, CI_LEVEL)
    ax.axhline(mean, ls=linestyle, lw=1, color=color, label=label)
    if not np.isnan(low):
        ax.axhspan(low, high, color=color, alpha=0.12, linewidth=0)


def ci_spread(frame: pd.DataFrame, hue: str = "label") -> str:
    """What a figure's bands or bars and a table's intervals are when they are the 95% Student t
    interval of the mean (curves(band="ci"), points_with_bars(band="ci"), mean_ci): seeds per curve
    from `frame`'s runs, for provenance's `spread`."""
    per_curve = sorted(set(final_rows(frame).groupby(hue).size()))
    if per_curve == [1]:
        return "1 seed per curve: no interval"
    return (
        f"{', '.join(map(str, per_curve))} seeds per curve: mean and its {100 * CI_LEVEL:.0f}% Student t CI "
        "as band, bars or [low, high] (geometric on log axes)"
    )


def provenance(runs: pd.DataFrame, preset: str, spread: str = "") -> str:
    """What a figure rests on, from its load_runs() table (one row per run and evaluation): dataset
    and training images, models, epochs and optimizer steps actually run (a steps-mode run's last
    row has its step), seeds and what the bands are (`spread` when the figure shows something else
    than the mean ± std of curves, such as confidence intervals)."""
    final = final_rows(runs)

    def listing(values) -> str:
        return ", ".join(map(str, dict.fromkeys(values)))

    def counted(values, noun: str) -> str:
        values = sorted(set(values))
        return f"{listing(values)} {noun}{'' if values == [1] else 's'}"

    subsets = sorted({int(n) for n in final["train_subset"]})
    images = listing(f"{n:,}" if n else "all" for n in subsets) + " training images"
    per_epoch = final["steps_per_epoch"].astype(int)
    done = (final["epoch"].astype(int) + 1) * per_epoch
    if "step" in final:  # a steps-mode run (Config.steps) can stop inside an epoch
        done = final["step"].fillna(done).astype(int)
    epochs = counted((d // n if d % n == 0 else float(f"{d / n:.3g}") for d, n in zip(done, per_epoch)), "epoch")
    steps = counted(done, "optimizer step")
    per_curve = sorted(set(final.groupby("label").size()))
    seeds = sorted({int(s) for s in final["seed"]})
    spread = spread or (
        "1 seed per curve: no band or error bar"
        if per_curve == [1]
        else f"{listing(per_curve)} seeds per curve: mean ± 1 std as band or bars (geometric on log axes)"
    )
    return (
        f"{listing(final['dataset'])}, {images} · {listing(final['model'])} · {epochs} = {steps} · "
        f"seed{'s' if len(seeds) > 1 else ''} {listing(seeds)}; {spread} · preset {preset}"
    )


def stamp(fig, text: str) -> None:
    """Write `text` under the figure, inside the saved image."""
    fig.text(
        0.0,
        0.0,
        "\n".join(textwrap.wrap(text, 120)),
        ha="left",
        va="top",
        fontsize=7,
        color="0.3",
        transform=fig.transFigure,
    )


def savefig(fig, stem) -> list[Path]:
    """Write stem.png and stem.pdf, each atomically; returns the paths. The figure stays open."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig.set_layout_engine("constrained")  # side-by-side axes keep their labels apart
    paths = []
    for ext, kw in ((".png", {"dpi": 200}), (".pdf", {"metadata": {"CreationDate": None}})):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext[1:], bbox_inches="tight", **kw)
        write_atomic(stem.with_suffix(ext), buf.getvalue())
        paths.append(stem.with_suffix(ext))
    return paths


def mean_std(df: pd.DataFrame, by: list[str], metrics: list[str], digits: int = 2) -> pd.DataFrame:
    """One row per group: 'mean ± std' of each metric over the rows (seeds) of the group, accuracies
    in percent, and the number of seeds."""

    def cell(s: pd.Series) -> str:
        s = s.dropna() * (100.0 if is_accuracy(s.name) else 1.0)
        std = f" ± {s.std():.{digits}f}" if len(s) > 1 else ""
        return f"{s.mean():.{digits}f}{std}"

    grouped = df.groupby(by, sort=False)
    table = grouped[metrics].agg(cell)
    table.columns = [label(c) for c in metrics]
    table["seeds"] = grouped.size()
    return table.reset_index()


def ordered(df: pd.DataFrame, column: str, order: list) -> pd.DataFrame:
    """The rows with `column` in the given order (values not in it last, as they came): tables and
    legends then follow a notebook's parameters, not the alphabetical order of run directories."""
    rank = {value: i for i, value in enumerate(order)}
    return df.sort_values(column, key=lambda values: values.map(rank).fillna(len(rank)), kind="stable")


def final_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Each run's last evaluation in a load_runs() table (by epoch, then step: a steps-mode run
    evaluates within one epoch)."""
    order = [c for c in ("epoch", "step") if c in df]
    return df.sort_values(order, kind="stable").groupby("run_dir", sort=False).tail(1)


def first_below(df: pd.DataFrame, column: str, level: float, by="run_dir", order: str = "step") -> pd.DataFrame:
    """Each `by` group's (a column or a list of them) first row in `order` whose `column` is below
    `level`: the checkpoint at which a run first reaches a training loss. A group that never falls
    below it has no row."""
    return df[df[column] < level].sort_values(order, kind="stable").groupby(by, sort=False).head(1)


def with_best(runs: pd.DataFrame) -> pd.DataFrame:
    """final_rows with each run's best test accuracy over its epochs as best_test_acc."""
    final = final_rows(runs)
    return final.assign(best_test_acc=runs.groupby("run_dir")["test_acc"].transform("max").loc[final.index])


# ---------------------------------------------------------------------- tables (markdown and LaTeX)

# The first line of every .tex that save_table writes: tells them from files written some other way.
TABLE_MARK = "% written by gvr_lab.plots.save_table"
# What the .tex needs around it (documented in its header): \input in the body of a document with this preamble.
LATEX_PREAMBLE = (
    r"\documentclass{article}",
    r"\usepackage[T1]{fontenc}",
    r"\usepackage[utf8]{inputenc}",
    r"\usepackage{booktabs}",
)
# Characters LaTeX reads as commands; < and > because T1 fonts turn << and >> into guillemets.
LATEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "%": r"\%",
    "_": r"\_",
    "&": r"\&",
    "#": r"\#",
    "$": r"\$",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
}
# The unicode our tables and captions use, and its neighbours, as LaTeX that needs nothing beyond LATEX_PREAMBLE.
LATEX_UNICODE = {
    "±": r"$\pm$",
    "−": r"$-$",
    "×": r"$\times$",
    "÷": r"$\div$",
    "·": r"$\cdot$",
    "≥": r"$\geq$",
    "≤": r"$\leq$",
    "≈": r"$\approx$",
    "≠": r"$\neq$",
    "∞": r"$\infty$",
    "→": r"$\rightarrow$",
    "←": r"$\leftarrow$",
    "‖": r"$\|$",
    "µ": r"$\mu$",
    "—": r"\textemdash{}",
    "–": r"\textendash{}",
    "…": r"\dots{}",
    "\u00a0": "~",
    "‘": r"\textquoteleft{}",
    "’": r"\textquoteright{}",
    "“": r"\textquotedblleft{}",
    "”": r"\textquotedblright{}",
    **{
        letter: rf"$\{name}$"
        for letter, name in zip(
            "αβγδεζηθικλμνξπρστυφχψωΓΔΘΛΞΠΣΥΦΨΩ",
            "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi pi rho sigma tau upsilon phi "
            "chi psi omega Gamma Delta Theta Lambda Xi Pi Sigma Upsilon Phi Psi Omega".split(),
        )
    },
}
NUMBER = re.compile(r"[+-]?\d+(\.\d+)?")


def latex_text(text: str, where: str) -> str:
    """`text` as LaTeX that pdflatex compiles in LATEX_PREAMBLE: the characters LaTeX reads as commands
    escaped, the unicode of LATEX_UNICODE mapped, Latin-1 letters (é, ö, ß; which T1 fonts have) kept,
    line breaks and tabs as spaces. Any other character is a UsageError naming it and `where` it is."""
    out = []
    for char in text:
        if char in LATEX_ESCAPES:
            out.append(LATEX_ESCAPES[char])
        elif " " <= char <= "~" or "\u00c0" <= char <= "\u00ff" and char not in "×÷":
            out.append(char)
        elif char in "\t\n\r":
            out.append(" ")
        elif char in LATEX_UNICODE:
            out.append(LATEX_UNICODE[char])
        else:
            raise UsageError(
                f"{where} holds {char!r} (U+{ord(char):04X} {unicodedata.name(char, 'unnamed')}), which save_table "
                f"cannot write as LaTeX; valid: ASCII, Latin-1 letters and {' '.join(sorted(LATEX_UNICODE))}"
            )
    return "".join(out)


def column_decimals(values, digits: int = 3) -> int:
    """Decimals of a column of floats: the fewest that write every value exactly (2 for values rounded
    to 2 decimals, 0 for whole numbers), but never more than give its smallest nonzero magnitude
    `digits` significant digits (as `significant` does)."""
    finite = [v for v in values if np.isfinite(v)]
    nonzero = [abs(v) for v in finite if v != 0]
    most = significant_decimals(min(nonzero), digits) if nonzero else 0
    return next((d for d in range(most) if all(float(f"{v:.{d}f}") == v for v in finite)), most)


def table_text(table: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """`table` with every cell as the text both of save_table's files show: floats at one number of
    decimals per column (column_decimals), ints as ints, strings as they are, a missing value (NaN,
    None) as an empty cell."""

    def is_float(cell) -> bool:
        return isinstance(cell, (float, np.floating))

    def text(cell, decimals: int) -> str:
        if is_float(cell):
            return "" if np.isnan(cell) else f"{cell:.{decimals}f}"
        if cell is None or cell is pd.NA or cell is pd.NaT:
            return ""
        return str(cell)

    columns = {}
    for position in range(table.shape[1]):
        cells = table.iloc[:, position].tolist()
        decimals = column_decimals([c for c in cells if is_float(c)], digits)
        columns[position] = [text(c, decimals) for c in cells]
    out = pd.DataFrame(columns, index=table.index)
    out.columns = table.columns
    return out


def save_table(table: pd.DataFrame, stem, caption: str = "", digits: int = 3) -> list[Path]:
    r"""Write stem.md and stem.tex from the same frame, both with the same cell text (table_text:
    a float column at one number of decimals, the fewest that show its values exactly but at most
    those giving its smallest nonzero value `digits` significant digits; ints as ints; a missing value as an
    empty cell). Columns whose every cell is a number are right-aligned, the others left-aligned.

    The markdown is the caption, a blank line and `to_markdown`'s table of that text, unescaped.
    The LaTeX is a booktabs `table` float, caption above the tabular, that pdflatex compiles when it
    is input in the body of a document with this preamble (LATEX_PREAMBLE; its header comment
    repeats it):
        \documentclass{article}
        \usepackage[T1]{fontenc}
        \usepackage[utf8]{inputenc}
        \usepackage{booktabs}
    Every cell, column name and the caption is escaped (% _ & # $ { } ~ ^ \ < >: latex_text), its
    unicode mapped to LaTeX (LATEX_UNICODE: ± − × · ≥ ≤ → ‖ … — – Greek letters, non-breaking space,
    ...) and its Latin-1 letters (é, ß), which the T1 fonts have, kept; a character with none of
    these is a one-line UsageError naming it and its cell, and neither file is written. The .tex's
    first line is TABLE_MARK, which tells the files written here from those written otherwise."""
    if table.shape[1] == 0:
        raise UsageError("save_table needs a table with at least one column")
    text = table_text(table, digits)
    columns = [text.iloc[:, k].tolist() for k in range(text.shape[1])]
    numeric = [any(cells) and all(NUMBER.fullmatch(v) for v in cells if v) for cells in columns]
    rows = [
        [latex_text(v, f"cell table.loc[{i!r}, {c!r}]") for c, v in zip(text.columns, values)]
        for i, values in zip(text.index, text.itertuples(index=False))
    ]
    header = [latex_text(str(c), f"column name {c!r}") for c in text.columns]

    def line(cells: list[str]) -> str:
        # after \\, \toprule or \midrule, LaTeX would read a leading [ or * as their optional argument
        first = "{}" + cells[0] if cells[0][:1] in ("[", "*") else cells[0]
        return " & ".join([first, *cells[1:]]) + r" \\"

    tex = [
        TABLE_MARK,
        r"% For pdflatex: \input it in the body of a document whose preamble has",
        *(f"%   {command}" for command in LATEX_PREAMBLE),
        r"\begin{table}",
        r"\centering",
        *([rf"\caption{{{latex_text(caption, 'the caption')}}}"] if caption else []),
        rf"\begin{{tabular}}{{{''.join('r' if n else 'l' for n in numeric)}}}",
        r"\toprule",
        line(header),
        r"\midrule",
        *map(line, rows),
        r"\bottomrule",
        r"\end{tabular}",
        r"\end{table}",
    ]
    markdown = text.to_markdown(
        index=False, disable_numparse=True, colalign=["right" if n else "left" for n in numeric]
    )
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".md"), stem.with_suffix(".tex")]
    write_atomic(paths[0], ((f"{caption}\n\n" if caption else "") + markdown + "\n").encode())
    write_atomic(paths[1], ("\n".join(tex) + "\n").encode())
    return paths


# ---------------------------------------------------------------------- claims

LABELS["training_s"] = "training time (s)"
VERDICT_COLORS = {"holds": "#1b9e77", "contradicted": "#d95f02", "not resolved": "#7570b3"}


def claim_rows(panels: dict[str, list], draw_row) -> tuple:
    """A figure of one panel per unit, one row per claim (top to bottom in order), each row drawn by
    draw_row(ax, y, claim, colour); the zero line, the claims' names with their n, the unit."""
    heights = [max(1, len(c)) for c in panels.values()]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(11, 0.5 * sum(heights) + 1.2 * len(panels)),
        gridspec_kw={"height_ratios": heights}, squeeze=False,
    )  # fmt: skip

    def name(c) -> str:  # a secondary claim says so: exploratory, never a confirmation
        tag = " [secondary]" if getattr(c, "family", "") == "secondary" else ""
        return textwrap.fill(f"{c.claim}{tag} (n={c.n})", 60)

    for ax, (unit, claims) in zip(axes[:, 0], panels.items()):
        for row, c in enumerate(claims):
            draw_row(ax, len(claims) - 1 - row, c, VERDICT_COLORS[c.verdict])
        ax.axvline(0, color="#3b3b3b", lw=0.8)
        ax.set_yticks(range(len(claims)))
        ax.set_yticklabels([name(c) for c in reversed(claims)], fontsize=8)
        ax.set_ylim(-0.7, len(claims) - 0.4)
        ax.set_xlabel(unit)
        ax.grid(axis="y", visible=False)
    return fig, axes


def forest(panels: dict[str, list]):
    """Paired differences (method - baseline, over seeds) with their 95% CIs, one row per claim and
    one panel per unit (accuracy points, a time ratio): a claim "greater" holds when its whole bar is
    right of 0; a parity claim when its bar lies inside the shaded margin; a non-inferiority claim
    when its bar lies right of the margin's dashed line (left, for "less"). Colour = verdict; a
    hollow dot = a claim whose premise does not hold, its verdict withheld whatever its bar shows.
    The claims are stats.Comparison or stats.AssessedClaim records."""

    def row(ax, y, c, color):
        if not np.isnan(c.ci_low):
            ax.plot([c.ci_low, c.ci_high], [y, y], color=color, lw=2.2, solid_capstyle="butt")
        ax.plot([c.diff_mean], [y], "o", color=color, ms=6, mfc="white" if c.verdict != c.ci_verdict else color)
        if c.direction == "parity":
            ax.fill_betweenx([y - 0.35, y + 0.35], -c.margin, c.margin, color=color, alpha=0.15, lw=0)
        elif getattr(c, "test", "") == "non_inferiority":
            at = -c.margin if c.direction == "greater" else c.margin
            ax.plot([at, at], [y - 0.35, y + 0.35], color=color, lw=1.2, linestyle="--")

    fig, axes = claim_rows(panels, row)
    handles = [
        plt.Line2D([], [], color=color, marker="o", lw=2.2, label=verdict) for verdict, color in VERDICT_COLORS.items()
    ]
    handles.append(
        plt.Line2D(
            [],
            [],
            color=VERDICT_COLORS["not resolved"],
            marker="o",
            mfc="white",
            lw=0,
            label="not resolved: its premise does not hold",
        )  # fmt: skip
    )
    axes[0, 0].legend(handles=handles, loc="lower left", bbox_to_anchor=(0, 1.02), ncol=2, frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def seed_strip(panels: dict[str, list]):
    """Each claim's paired differences seed by seed (one dot per seed), with their mean and its
    interval as in `forest`: where a verdict comes from, and which seeds carry it. `panels` as
    forest's, of stats.AssessedClaim records (their `values`)."""

    def row(ax, y, c, color):
        d = np.array([m - b for m, b in c.values.values()])
        jitter = np.linspace(-0.18, 0.18, len(d)) if len(d) > 1 else np.zeros(len(d))
        ax.plot(d, y + jitter, "o", color=color, ms=3.5, alpha=0.7)
        if not np.isnan(c.ci_low):
            ax.plot([c.ci_low, c.ci_high], [y - 0.3, y - 0.3], color=color, lw=2.2, solid_capstyle="butt")
        ax.plot([c.diff_mean], [y - 0.3], "|", color="#3b3b3b", ms=9, mew=2)

    fig, _ = claim_rows(panels, row)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------- curvature and loss landscapes (07_curvature)

LABELS.update(
    {
        "hessian_top": "top Hessian eigenvalue",
        "hessian_trace": "Hessian trace",
        **{f"lambda_{i}": f"λ{i}" for i in range(1, 10)},
        "trace": "trace",
        "adaptive_sharpness": "adaptive sharpness",
        "fn_curvature": "filter-normalized curvature",
        "train_eval_loss": "training loss (all training rows, eval mode)",
        "acc_gap": "train − test accuracy (points)",
        "loss_gap": "test − train loss",
    }
)


def significant_decimals(value: float, digits: int = 3) -> int:
    """The decimals that give `value` `digits` significant digits (digits - 1 for 0 and non-finite values)."""
    if value == 0 or not np.isfinite(value):
        return digits - 1
    return max(0, digits - 1 - int(np.floor(np.log10(abs(value)))))


def significant(value: float, digits: int = 3) -> str:
    """`value` with `digits` significant digits, in fixed notation (no exponent): 238, 54.9, 7.52, 0.0123."""
    return f"{value:.{significant_decimals(value, digits)}f}"


def plain_log_ticks(ax, axes: str = "y") -> None:
    """Tick labels of log axes as plain numbers (0.4, 30), not powers of ten (4 x 10^-1, 3 x 10^1):
    every tick (1 to 9 times a power of ten) on an axis spanning less than a factor 3, 1, 2, 3 and
    5 times a power of ten up to two decades, powers of ten alone beyond, where more would crowd."""
    for name in axes:
        axis = getattr(ax, f"{name}axis")

        def text(value, _, axis=axis) -> str:
            low, high = axis.get_view_interval()
            shown = (1,) if high > 100 * low else (1, 2, 3, 5) if high > 3 * low else range(1, 10)
            return f"{value:g}" if round(value / 10 ** np.floor(np.log10(value)), 6) in shown else ""

        axis.set_major_formatter(FuncFormatter(text))
        axis.set_minor_formatter(FuncFormatter(text))
        # labels sit past the (hidden) tick line, which is shorter for minor ticks: one length, one row of labels
        ax.tick_params(
            axis=name,
            which="minor",
            size=plt.rcParams[f"{name}tick.major.size"],
            pad=plt.rcParams[f"{name}tick.major.pad"],
        )


# How a table writes a mean with its confidence interval: "mean [low, high]" or "mean ± half-width".
CI_FORMS = ("bounds", "half_width")


def interval_text(mean: float, low: float, high: float, digits: int = 3, ci_form: str = "bounds") -> str:
    """'mean [low, high]' (ci_form "bounds") or 'mean ± half-width' (ci_form "half_width", for an
    interval symmetric about the mean, as Student t's is; an asymmetric one is a UsageError), the
    mean to `digits` significant digits and the rest to its decimals; the mean alone when there is
    no interval (NaN bounds)."""
    check_choice("ci_form", ci_form, CI_FORMS)
    text = significant(mean, digits)
    decimals = len(text.partition(".")[2])
    if np.isnan(low):
        return text
    if ci_form == "bounds":
        return f"{text} [{low:.{decimals}f}, {high:.{decimals}f}]"
    scale = max(abs(mean), abs(low), abs(high))
    if not np.isclose(mean - low, high - mean, rtol=1e-9, atol=1e-12 * scale):
        raise UsageError(
            f"the interval [{low:g}, {high:g}] is not symmetric about its mean {mean:g}: write it with ci_form 'bounds'"
        )
    return f"{text} ± {(high - low) / 2:.{decimals}f}"


def mean_ci(
    df: pd.DataFrame,
    by: list[str],
    metrics: list[str],
    digits: int = 3,
    level: float = 0.95,
    ci_form: str = "bounds",
) -> pd.DataFrame:
    """One row per group: 'mean [low, high]' (or 'mean ± half-width', ci_form "half_width": see
    interval_text) of each metric over the rows (seeds) of the group, the Student t interval of the
    mean (stats.mean_ci; the mean alone with one seed), accuracies in percent; and the number of seeds."""

    def cell(s: pd.Series) -> str:
        scale = 100.0 if is_accuracy(s.name) else 1.0
        return interval_text(*interval(s.dropna().to_numpy(float) * scale, level), digits, ci_form)

    grouped = df.groupby(by, sort=False)
    table = grouped[metrics].agg(cell)
    table.columns = [label(c) for c in metrics]
    table["seeds"] = grouped.size()
    return table.reset_index()


def paired_difference(
    df: pd.DataFrame,
    metric: str,
    baselines: dict,
    by: str = "label",
    digits: int = 3,
    level: float = 0.95,
    ci_form: str = "bounds",
) -> dict:
    """{group: 'd [low, high] vs baseline'} for each `by` group of `df`: the mean over seeds of metric
    minus the value of its baseline group (baselines: group -> baseline group) on the same seed, with
    the Student t interval of that mean ('d ± half-width vs baseline' with ci_form "half_width", see
    interval_text); '—' for a group without a baseline. A seed only one of the two groups has is left out."""

    def values(group):
        rows = df[df[by] == group]
        return dict(zip(rows["seed"], rows[metric]))

    def cell(group) -> str:
        if group not in baselines:
            return "—"
        _, method, baseline = paired_differences(values(group), values(baselines[group]))
        return f"{interval_text(*interval(method - baseline, level), digits, ci_form)} vs {baselines[group]}"

    return {group: cell(group) for group in df[by].drop_duplicates()}


def interpolation(lines: pd.DataFrame, ends: tuple[str, str], axes=None):
    """train_loss and train_acc against t on the line (1 - t) w_A + t w_B, one curve per label with
    the mean over seeds and a band (`curves`), t = 0 and 1 marked with the names in `ends`."""
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    curves(lines, "t", "train_loss", ax=axes[0], legend=False)
    curves(lines, "t", "train_acc", ax=axes[1])
    for ax in axes:
        for t, name in zip((0, 1), ends):
            ax.axvline(t, color="0.5", linewidth=0.8, linestyle=":")
            ax.text(t, 1.01, name, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8)
        ax.set_xlabel(f"t in (1 - t) w_{ends[0]} + t w_{ends[1]}")
    return axes


def loss_contours(slices: dict, levels: int = 16):
    """Side-by-side filled contours of 2-D loss slices ({panel title: slice_run's output}) on the
    same log-spaced levels from the lowest to the highest loss of all panels, so equal colours mean
    equal loss in every panel; the trained weights (0, 0) marked."""
    low = min(float(np.min(s["loss"])) for s in slices.values())
    high = max(float(np.max(s["loss"])) for s in slices.values())
    shared = np.geomspace(low, high, levels)
    fig, axes = plt.subplots(
        1, len(slices), figsize=(4.3 * len(slices) + 1.2, 4.2), sharex=True, sharey=True, squeeze=False
    )
    for ax, (title, s) in zip(axes[0], slices.items()):
        grid, loss = np.array(s["grid"]), np.array(s["loss"])
        # loss[i][j] is at a = grid[i] (direction 1, x) and b = grid[j] (direction 2, y)
        filled = ax.contourf(grid, grid, loss.T, levels=shared, norm=LogNorm(low, high), cmap="viridis")
        ax.contour(grid, grid, loss.T, levels=shared, colors="k", linewidths=0.3)
        ax.plot(0, 0, marker="+", color="white", markersize=10, markeredgewidth=1.5)
        ax.set_title(title)
        ax.set_aspect("equal")
        ax.set_xlabel("a (filter-normalized direction 1)")
    axes[0][0].set_ylabel("b (filter-normalized direction 2)")
    bar = fig.colorbar(filled, ax=list(axes[0]), label="training loss")
    bar.set_ticks(shared[::3])
    bar.set_ticklabels([significant(v, 2) for v in shared[::3]])
    return fig


def psf_bound(checks: pd.DataFrame, ax=None, title: str = ""):
    """vSAM's Lemma 1 per batch: the measured ||PSF|| against its bound rho * max |eigenvalue| of the
    batch's Hessian, log-log, one marker per seed; points on or under y = x hold, and the legend gives
    each seed's fraction holding."""
    if ax is None:
        _, ax = plt.subplots(figsize=(8.5, 4.4))
    color = method_color(checks["method"].iloc[0])
    for i, (seed, rows) in enumerate(checks.groupby("seed")):
        ax.plot(
            rows["bound"],
            rows["psf_norm"],
            linestyle="none",
            marker=MARKERS[i % len(MARKERS)],
            color=color,
            alpha=0.8,
            label=f"seed {seed}: {100 * rows['holds'].mean():.0f}% of {len(rows)} batches hold",
        )
    values = checks[["bound", "psf_norm"]].to_numpy()
    span = [values.min() / 1.25, values.max() * 1.25]
    ax.plot(span, span, color="0.4", linewidth=1, linestyle="--", label="||PSF|| = rho lambda_max (the bound)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(span)
    ax.set_ylim(span)
    ax.set_aspect("equal")
    plain_log_ticks(ax, "xy")
    ax.set_xlabel("rho * max |eigenvalue| of the batch Hessian")
    ax.set_ylabel("||PSF|| = ||g(w + rho g/||g||) - g(w)||")
    if title:
        ax.set_title(title)
    legend_outside(ax)
    return ax
