"""A study notebook's contract with the package: its parameters and presets, where it writes, what it writes.

A notebook in notebooks/ declares everything about itself in two cells:
* the parameters cell (tagged "parameters"), whose first line is
  `preset: str = "cpu"  # smoke | cpu | gpu | paper`, then one `name: type = literal  # help` line
  per parameter (the defaults);
* the study cell, `study = gl.Study("<name>", globals(), presets={...}, outputs={...})`, whose
  arguments other than globals() are literals, so the runner, the tests, README's notebook table
  and figures/README.md read them without running the notebook (`read_notebook`).
Adding a study is adding one notebook file.

Parameter values, lowest first: the parameters cell's defaults, the preset's values, parameters set
explicitly. Explicit means assigned in a cell run after the parameters cell (a cell added below it
in JupyterLab, or papermill's injected cell for `gvr-lab run -p/-f/--preset`); the kernel's input
history tells which, so a value set explicitly wins even when it equals the default.

Paths are relative to the project root whatever the kernel's working directory (JupyterLab starts
it in notebooks/). Training runs go to runs/<preset>/<name>/<digest of every parameter value>, so
a changed default or preset never meets the runs of another configuration, and rerunning the same
one reuses its finished runs. Figures and tables go to figures/<name> for the preset the committed
figures come from (COMMITTED_PRESET) as it stands, or a preset committed beside it (the claims
study's pilot, ALSO_COMMITTED, with stems of its own), and to runs/<variant>/figures/<name>
otherwise, <variant> being the preset with a digest of the explicit values that differ from it
appended.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from . import plots, terms
from .collect import load_runs
from .errors import TYPE_NAMES, UsageError, check_choice, coerce
from .progress import show, show_text
from .results import write_atomic

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
PRESETS = ("smoke", "pilot", "cpu", "gpu", "paper")  # the vocabulary; each notebook declares those it has
COMMITTED_PRESET = "cpu"  # figures/ holds this preset's figures and tables
# Presets whose outputs are committed beside the cpu preset's, under their own file stems: a pilot
# sizes the cpu preset's study, and its tables are what the study's protocol cites.
ALSO_COMMITTED = ("pilot",)
PATH_PARAMETERS = ("runs_root", "fig_root")

# The folder of a study's runs root where its plateau check trains the baseline again at half the
# budget (claims.half_budget_runs): evidence about the budget, not an arm, so load_runs leaves it out.
HALF_BUDGET = "half-budget"
# What an exploratory study's figures and tables say under them.
EXPLORATORY = (
    "exploratory: tests no claim; the papers' claims are tested under a registered protocol in notebooks/06_claims.py"
)
# Part of every runs root's digest: raised when a run's identity gains a field its old runs lacked
# (training.FIELDS_NEW_IN_BEHAVIOUR), so a study's new runs go to a folder of their own instead of
# meeting runs that are now other runs.
RUNS_FORMAT = {"runs_format": 2}


@dataclass(frozen=True)
class Declaration:
    """What a notebook declares about itself."""

    name: str  # figures/<name>/; the notebook file is notebooks/NN_<name>.py
    parameters: dict  # parameter -> (type name, default), in the parameters cell's order
    presets: dict  # preset -> {parameter: value}
    outputs: dict  # file stem under figures/<name>/ -> what it shows; "<preset>_..." only at that preset
    ablations: tuple = ()  # labels whose defining term is off on purpose (terms.py)
    exploratory: bool = False  # its figures and tables say they test no claim (06_claims does)
    title: str = ""
    path: Path | None = None


def outputs_at(decl: Declaration, preset: str) -> dict:
    """The outputs a notebook writes at `preset`: a stem that begins with a preset's name and an
    underscore (the claims study's pilot_sizes) is that preset's alone."""
    own = [p for p in PRESETS if p != preset]
    return {stem: what for stem, what in decl.outputs.items() if not any(stem.startswith(f"{p}_") for p in own)}


@dataclass(frozen=True)
class Resolved:
    """A notebook's parameters for one execution, and where it writes."""

    params: dict  # every parameter's value
    changed: dict  # explicit values that differ from the preset's
    variant: str  # the preset, or preset-<digest of changed>: names the figure folder
    runs_root: Path
    fig_root: Path

    @property
    def preset(self) -> str:
        return self.params["preset"]

    @property
    def note(self) -> str:
        """The preset, with what was changed from it: figure footers and the study's first line."""
        changed = ", ".join(f"{k}={v!r}" for k, v in self.changed.items())
        return self.preset + (f" with {changed}" if changed else "")


# ---------------------------------------------------------------------- reading a notebook's declarations


def parameters_of(source: str, where: str) -> dict:
    """The parameters cell's declarations, name -> (type name, default)."""
    try:
        body = ast.parse(source).body
    except SyntaxError as e:
        raise UsageError(f"{where}: the parameters cell does not parse: {e.msg} (line {e.lineno})") from None
    declared = {}
    for node in body:
        if not (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(node.annotation, ast.Name)
            and node.annotation.id in TYPE_NAMES
            and node.value
        ):
            raise UsageError(
                f"{where}: every line of the parameters cell must read `name: type = literal  # help` "
                f"with type one of {', '.join(TYPE_NAMES)} (line {node.lineno})"
            )
        try:
            default = ast.literal_eval(node.value)
        except ValueError:
            raise UsageError(f"{where}: the default of {node.target.id!r} must be a literal") from None
        declared[node.target.id] = (node.annotation.id, default)
    if next(iter(declared), None) != "preset" or declared["preset"][0] != "str":
        raise UsageError(f'{where}: the parameters cell must begin with `preset: str = "cpu"  # {" | ".join(PRESETS)}`')
    return declared


def study_call(tree: ast.Module | None) -> ast.Call | None:
    """The `... = Study(...)` call at the top level of a cell, if any."""
    for node in tree.body if tree else []:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            func = node.value.func
            if (func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)) == "Study":
                return node.value
    return None


def read_notebook(path) -> Declaration:
    """A notebook's declarations, read from its file without running it."""
    import jupytext

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"notebook {path} not found")
    nb = jupytext.read(path)
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not tagged:
        raise UsageError(f"{path} has no cell tagged 'parameters'")
    parameters = parameters_of(tagged[0].source, str(path))
    call = next(
        filter(
            None,
            (study_call(parse_or_none(c.source)) for c in nb.cells if c.cell_type == "code" and "Study" in c.source),
        ),
        None,
    )
    if call is None or not call.args or not isinstance(call.args[0], ast.Constant):
        raise UsageError(f'{path} has no `study = gl.Study("<name>", globals(), presets=..., outputs=...)` cell')
    try:
        given = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except ValueError:
        raise UsageError(f"{path}: the arguments of Study(...) other than globals() must be literals") from None
    unknown = sorted(set(given) - {"presets", "outputs", "ablations", "exploratory"})
    if unknown or not {"presets", "outputs"} <= set(given):
        raise UsageError(
            f"{path}: Study(...) takes presets=, outputs= and optionally ablations= and exploratory=, got "
            f"{', '.join(sorted(given)) or 'none'}"
        )
    title = next(
        (
            line.lstrip("# ").strip()
            for c in nb.cells
            if c.cell_type == "markdown"
            for line in c.source.splitlines()
            if line.startswith("# ")
        ),
        "",
    )
    decl = declaration(call.args[0].value, parameters, title=title, path=path, **given)
    expected = path.stem.split("_", 1)[-1]
    if decl.name != expected:
        raise UsageError(f"{path}: Study name {decl.name!r} must match the file name ({expected!r})")
    return decl


def declaration(
    name: str,
    parameters: dict,
    presets: dict,
    outputs: dict,
    ablations=(),
    title: str = "",
    path: Path | None = None,
    exploratory: bool = False,
) -> Declaration:
    """A Declaration, checked: known preset names, preset values for declared parameters of their type."""
    where = str(path or name)
    for preset, values in presets.items():
        check_choice(f"preset name in {where}", preset, PRESETS)
        for key, value in values.items():
            if key not in parameters:
                raise UsageError(f"{where}: preset {preset!r} sets {key!r}, which is not a parameter")
            coerce(value, TYPE_NAMES[parameters[key][0]], f"{where}: preset {preset!r} value of {key!r}")
    return Declaration(name, parameters, presets, outputs, tuple(ablations), exploratory, title, path)


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))


# ---------------------------------------------------------------------- parameter values and paths


def resolve(decl: Declaration, explicit: dict) -> Resolved:
    """defaults < presets[preset] < explicit, each value checked against its declared type."""
    where = str(decl.path or decl.name)
    listing = ", ".join(f"{n}: {t}" for n, (t, _) in decl.parameters.items())
    for name in explicit:
        if name not in decl.parameters:
            raise UsageError(f"unknown parameter {name!r} for {where}; declared: {listing}")

    def typed(name, value):
        return coerce(
            value, TYPE_NAMES[decl.parameters[name][0]], f"parameter {name!r} of {where}", f"; declared: {listing}"
        )

    preset = typed("preset", explicit.get("preset", decl.parameters["preset"][1]))
    if preset not in decl.presets:
        raise UsageError(f"unknown preset {preset!r} for {where}; its presets: {', '.join(decl.presets)}")
    base = {name: typed(name, default) for name, (_, default) in decl.parameters.items()}
    base.update({name: typed(name, value) for name, value in decl.presets[preset].items()})
    params = {**base, **{name: typed(name, value) for name, value in explicit.items()}, "preset": preset}
    values = {k: v for k, v in params.items() if k not in PATH_PARAMETERS}
    changed = {k: v for k, v in values.items() if k != "preset" and v != base[k]}
    variant = preset + (f"-{digest(changed)}" if changed else "")
    runs_root = REPO / (params.get("runs_root") or f"runs/{preset}/{decl.name}/{digest({**values, **RUNS_FORMAT})}")
    fig_root = REPO / (params.get("fig_root") or default_fig_root(variant))
    return Resolved(params, changed, variant, runs_root, fig_root)


def repo_relative(path) -> str:
    """A path as committed files and captions keep it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)


def digest(values: dict) -> str:
    return hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:8]


def default_fig_root(variant: str) -> str:
    return "figures" if variant in (COMMITTED_PRESET, *ALSO_COMMITTED) else f"runs/{variant}/figures"


# ---------------------------------------------------------------------- inside the kernel


def parse_or_none(source: str) -> ast.Module | None:
    try:
        return ast.parse(source)
    except SyntaxError:
        return None


def is_parameters_cell(source: str) -> bool:
    tree = parse_or_none(source)
    first = tree.body[0] if tree and tree.body else None
    return isinstance(first, ast.AnnAssign) and isinstance(first.target, ast.Name) and first.target.id == "preset"


def assigned_names(source: str) -> set[str]:
    """Names a cell assigns at its top level."""
    tree = parse_or_none(source)
    names = set()
    for node in tree.body if tree else []:
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, (ast.AnnAssign, ast.AugAssign))
            else []
        )
        for target in targets:
            names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def parameters_history(namespace: dict) -> tuple[str, set[str]]:
    """The source of the parameters cell as last run, and the names assigned by the cells run after
    it (the cell running now excluded), from IPython's input history."""
    history = namespace.get("In")
    if not isinstance(history, list):
        raise UsageError(
            "Study(...) reads the notebook's parameters from the kernel's input history: run the "
            "notebook in a Jupyter kernel (JupyterLab, or gvr-lab run)"
        )
    earlier = history[:-1]  # the last entry is the cell running now
    start = next((i for i in range(len(earlier) - 1, -1, -1) if is_parameters_cell(earlier[i])), None)
    if start is None:
        raise UsageError("run the parameters cell (the one beginning `preset: str = ...`) before this one")
    return earlier[start], set().union(*(assigned_names(cell) for cell in earlier[start + 1 :]))


class Study:
    """Resolves the notebook's parameters into its namespace (the values every later cell uses),
    sets where it writes, and saves its declared outputs: figures stamped with their provenance and
    shown inline, tables shown inline, each save listed with its paths (`gvr-lab run` reports them).

    Figures refuse runs whose method's defining term never acted (terms.py); `plotted` drops them.
    """

    def __init__(self, name: str, namespace: dict, *, presets: dict, outputs: dict, ablations=(), exploratory=False):
        source, assigned = parameters_history(namespace)
        parameters = parameters_of(source, "the parameters cell")
        self.declaration = declaration(name, parameters, presets, outputs, ablations, exploratory=exploratory)
        explicit = {n: namespace[n] for n in assigned if n in self.declaration.parameters}
        self.resolved = resolve(self.declaration, explicit)
        namespace.update(self.resolved.params)
        # JupyterLab starts the kernel in notebooks/; the package's own relative paths (./data in
        # the dataset search) must mean what they mean under gvr-lab run, which runs in the root.
        os.chdir(REPO)
        plots.set_style()
        self.fig_dir = self.resolved.fig_root / name
        print(
            f"{name} · preset {self.resolved.note} · runs: {repo_relative(self.runs_root)} · "
            f"figures: {repo_relative(self.fig_dir)}"
        )

    @property
    def runs_root(self) -> Path:
        return self.resolved.runs_root

    def load_runs(self, steps: bool = False) -> pd.DataFrame:
        """Every run of this study (load_runs of runs_root/*), the plateau check's aside."""
        return load_runs([p for p in sorted(self.runs_root.glob("*")) if p.name != HALF_BUDGET], steps=steps)

    def plotted(self, frame: pd.DataFrame) -> pd.DataFrame:
        """`frame` (epoch or step rows) without the runs whose defining term never acted, each named."""
        dropped = terms.never_active(self.load_runs(), self.declaration.ablations)
        for run_dir in sorted(set(dropped) & set(frame["run_dir"])):
            print(
                f"not plotted: {Path(run_dir).name}, its method's defining term never acted "
                "(see the table's 'term on' column)"
            )
        return frame[~frame["run_dir"].isin(dropped)]

    def term_column(self, runs: pd.DataFrame, table: pd.DataFrame, by: str = "label") -> pd.DataFrame:
        return terms.term_column(runs, table, by, self.declaration.ablations)

    def check_output(self, stem: str) -> None:
        if stem not in self.declaration.outputs:
            raise UsageError(
                f"study {self.declaration.name!r} does not declare output {stem!r}; declared: "
                f"{', '.join(self.declaration.outputs)}"
            )

    def provenance(self, frame: pd.DataFrame, spread: str = "") -> str:
        epochs = self.load_runs()
        text = plots.provenance(epochs[epochs["run_dir"].isin(frame["run_dir"])], self.resolved.note, spread)
        return text + (f" · {EXPLORATORY}" if self.declaration.exploratory else "")

    def save_figure(self, fig, stem: str, frame: pd.DataFrame, spread: str = "") -> None:
        """Stamp `fig` with the provenance of the runs in `frame` (`spread`: what its bars are, when
        not the mean ± std of curves), save it as stem.png and .pdf, show it."""
        self.check_output(stem)
        never = set(terms.never_active(self.load_runs(), self.declaration.ablations)) & set(frame["run_dir"])
        if never:
            plt.close(fig)
            raise UsageError(
                f"figure {stem!r} would show runs whose method's defining term never acted: "
                f"{', '.join(sorted(Path(r).name for r in never))}; pass the rows through "
                "study.plotted(), or choose parameters that switch the term on"
            )
        plots.stamp(fig, self.provenance(frame, spread))
        paths = plots.savefig(fig, self.fig_dir / stem)
        show(fig)
        plt.close(fig)
        self.saved(paths)

    def save_table(self, table: pd.DataFrame, stem: str, caption: str, frame: pd.DataFrame, spread: str = "") -> None:
        """Save `table` as stem.md and .tex, its caption followed by the provenance of `frame`'s runs; show it."""
        self.check_output(stem)
        paths = plots.save_table(table, self.fig_dir / stem, caption=f"{caption}. {self.provenance(frame, spread)}")
        show(table, metadata={"gvr_lab": {"table": str(paths[0])}})
        self.saved(paths)

    def save_data(self, records: list[dict], stem: str, formats: tuple = ("csv", "json")) -> None:
        """Machine-readable results beside the tables: stem.csv and (or) stem.json, from the same records."""
        self.check_output(stem)
        self.fig_dir.mkdir(parents=True, exist_ok=True)
        texts = {
            "csv": lambda: pd.DataFrame(records).to_csv(index=False),
            "json": lambda: json.dumps(records, indent=2, default=float) + "\n",
        }
        paths = [self.fig_dir / f"{stem}.{fmt}" for fmt in formats]
        for path, fmt in zip(paths, formats):
            write_atomic(path, texts[fmt]().encode())
        self.saved(paths)

    def save_text(self, text: str, stem: str, suffix: str) -> None:
        """A text output as stem.suffix (a protocol block the pilot writes, say)."""
        self.check_output(stem)
        self.fig_dir.mkdir(parents=True, exist_ok=True)
        path = self.fig_dir / f"{stem}{suffix}"
        write_atomic(path, text.encode())
        self.saved([path])

    def saved(self, paths: list[Path]) -> None:
        shown = ", ".join(repo_relative(p) for p in paths)
        show_text(f"saved: {shown}", metadata={"gvr_lab": {"saved": list(map(str, paths))}})
