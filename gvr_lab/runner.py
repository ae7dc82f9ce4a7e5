"""Execute a study notebook headless through papermill, with what papermill lacks.

Added on top of papermill's Python API:
* the notebook's declarations (study.read_notebook) checked before anything runs: an unknown
  parameter or preset, a wrong type, is a UsageError (exit status 2) and nothing is written;
* the preset and the explicit values (`-f`, `-p`) injected; the notebook resolves them itself
  (study.Study), exactly as study.resolve does here for the run folder's name;
* list/dict values that survive the command line;
* the kernel of the Python the runner runs in, never a kernelspec of the same name installed by
  another checkout, over IPC (no unencrypted-TCP warning per run);
* a UsageError raised inside the notebook (a grid that does not validate, checked before its first
  run trains; a figure of a method whose term never acted) reported as bad input, the partial
  notebook not kept; any other failure a one-line report of the failed cell, the partial notebook kept;
* a completed execution skipped while neither the notebook nor the package changed since and every
  file it saved is still there (its figures are then the ones it drew); otherwise, or forced,
  executed again, which reuses every finished training run and so only redraws;
* what the notebook saved (its tables and the paths of every file), read back from its outputs.

Each execution goes to runs/notebooks/<notebook>-<variant>-<hash>/ with executed.ipynb,
params.json and, once it finished, DONE (JSON: the execution's wall time, with that of earlier
executions of the same run that were killed or interrupted before they finished, and the share of
the machine's CPU time the host took meanwhile, on a virtual machine). It is executed
in a temporary folder beside it, where elapsed.json keeps its time so far, and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .pools import cpu_seconds, stolen_share, stolen_since
from .results import read_json, read_yaml_mapping, write_atomic, write_json
from .study import REPO, Declaration, Resolved, digest, notebook_paths, read_notebook, repo_relative, resolve

TIMINGS = "timings.json"  # beside figures/README.md: each notebook's measured cost, for README's table

KERNEL = "gvr_lab"


class NotebookFailed(RuntimeError):
    """A cell raised; the message names the notebook, the cell and the error line."""


def check_papermill_can_inject(nb, decl: Declaration) -> None:
    """papermill's view of the parameters cell must see every parameter (it skips a line it cannot
    parse with only a warning, and then would not know the parameter's type)."""
    import papermill as pm

    seen = pm.inspect_notebook(nb)
    for name in decl.parameters:
        if name not in seen:
            raise UsageError(
                f"{decl.path}: papermill cannot parse the parameters-cell line of {name!r} "
                "(keep it 'name: type = literal  # help' without '=' in the comment)"
            )


@contextlib.contextmanager
def this_python_kernel():
    """For the length of the block: a kernelspec named gvr_lab for the Python running this, found
    before any other (JUPYTER_PATH is searched first), and the kernel manager's configuration: IPC
    transport, its sockets in a folder of their own (concurrent kernels must not share them)."""
    from ipykernel.kernelspec import write_kernel_spec
    from traitlets.config import Config

    with tempfile.TemporaryDirectory() as tmp:
        write_kernel_spec(Path(tmp, "kernels", KERNEL), overrides={"display_name": "Python (gvr_lab)"})
        before = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [tmp, before]))
        try:
            yield KERNEL, Config({"KernelManager": {"transport": "ipc", "ip": str(Path(tmp, "kernel"))}})
        finally:
            if before is None:
                del os.environ["JUPYTER_PATH"]
            else:
                os.environ["JUPYTER_PATH"] = before


def run_dir_for(stem: str, resolved: Resolved, runs_root: Path) -> Path:
    return runs_root / f"{stem}-{resolved.variant}-{digest(resolved.params)}"


def prepare(path, params: dict | None = None, preset: str | None = None, params_file: str | None = None):
    """The notebook, its declarations, the explicit values to inject and their resolution; raises
    UsageError on any bad input."""
    import jupytext

    decl = read_notebook(path)
    explicit = read_yaml_mapping(params_file, "parameter") if params_file else {}
    explicit.update(params or {})
    if preset is not None:
        if explicit.get("preset", preset) != preset:
            raise UsageError(f"--preset {preset} and parameter preset={explicit['preset']!r} disagree")
        explicit["preset"] = preset
    resolved = resolve(decl, explicit)
    nb = jupytext.read(decl.path)
    nb.metadata["kernelspec"] = {"name": KERNEL, "language": "python", "display_name": "Python (gvr_lab)"}
    check_papermill_can_inject(nb, decl)
    return nb, decl, {name: resolved.params[name] for name in explicit}, resolved


def run_notebook(
    path,
    params: dict | None = None,
    preset: str | None = None,
    params_file: str | None = None,
    force: bool = False,
    runs_root="runs/notebooks",
    timeout: float | None = None,
    log_output: bool = False,
) -> Path:
    """Execute `path` with validated parameters; returns its run folder. Raises UsageError (bad
    input, also from inside the notebook) or NotebookFailed."""
    import papermill as pm

    nb, decl, inject, resolved = prepare(path, params, preset, params_file)
    run_dir = run_dir_for(decl.path.stem, resolved, Path(runs_root))
    code = code_digest(decl.path)
    if (
        not force
        and (run_dir / "DONE").is_file()
        and read_json(run_dir / "DONE").get("code") == code
        and all(Path(p).is_file() for p in saved_outputs(run_dir).paths)
    ):
        return run_dir
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    parts = interrupted_parts(run_dir)
    earlier = round(sum(part["wall_time_s"] for part in parts.values()), 1)
    # when the first of this execution's parts began: the runs whose records were written since are its own
    started_at = min([time.time(), *(part["at"] - part["wall_time_s"] for part in parts.values() if "at" in part)])
    work = Path(tempfile.mkdtemp(dir=run_dir.parent, prefix=f".{run_dir.name}."))
    write_json(work / "params.json", {"notebook": str(decl.path), **resolved.params})
    if log_output:  # papermill only configures logging in its own CLI (papermill#496)
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    try:
        with this_python_kernel() as (kernel, config), elapsed_recorded(work / ELAPSED, started):
            pm.execute_notebook(
                nb,
                str(work / "executed.ipynb"),
                parameters=inject,
                kernel_name=kernel,
                cwd=str(REPO),
                execution_timeout=timeout,
                log_output=log_output,
                progress_bar=False,
                config=config,
            )
    except pm.PapermillExecutionError as e:
        line = f"{e.ename}: {e.evalue}".strip().splitlines()[0]
        if e.ename == "UsageError":  # the notebook refused its input (a grid, a figure of a term that never acted)
            shutil.rmtree(work)
            raise UsageError(f"{decl.path}: {e.evalue.strip().splitlines()[0]}") from None
        replace_dir(work, run_dir)
        raise NotebookFailed(
            f"{decl.path}: cell {e.exec_count} failed: {line} (partial notebook kept: {run_dir / 'executed.ipynb'})"
        ) from None
    except KeyboardInterrupt:  # a study stopped to be continued later: its time so far is kept
        raise
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    own = read_json(work / ELAPSED)  # written as the execution ended
    (work / ELAPSED).unlink()
    steal = summed_steal([part_steal(part) for part in [*parts.values(), own]])
    done = {
        "wall_time_s": round(own["wall_time_s"] + earlier, 1),
        "interrupted_s": earlier,
        "started_at": round(started_at, 1),
        "code": code,
    }
    write_json(work / "DONE", {**done, **({"steal": steal} if steal else {})})
    replace_dir(work, run_dir)
    for folder in parts:  # counted in DONE now; until then a failed or killed execution leaves them for the next
        shutil.rmtree(folder, ignore_errors=True)
    return run_dir


# An execution's wall time so far, rewritten while it runs: an execution killed or interrupted
# (a study run in parts) leaves it in its unfinished folder, and the next one counts it.
ELAPSED = "elapsed.json"
ELAPSED_EVERY_S = 30.0


@contextlib.contextmanager
def elapsed_recorded(path: Path, started: float, every: float = ELAPSED_EVERY_S):
    """Write {"wall_time_s": seconds since `started`, "at": when} to `path` every `every` seconds and
    at the end, with the machine's CPU time since then and the host's part of it where the machine
    reports them (pools.stolen_since)."""
    stop = threading.Event()
    cpu_at_start = cpu_seconds()

    def write():
        wall = round(time.perf_counter() - started, 1)
        write_json(path, {"wall_time_s": wall, "at": time.time(), **stolen_since(cpu_at_start)})

    def beat():
        while not stop.wait(every):
            write()

    write()
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        write()


def unfinished_folders(run_dir: Path) -> list[Path]:
    """The work folders executions of this notebook run left unfinished (killed, interrupted, or
    still running): run_notebook's temporary `.<name>.*` beside the run."""
    return list(run_dir.parent.glob(f".{run_dir.name}.*"))


def interrupted_parts(run_dir: Path, every: float = ELAPSED_EVERY_S) -> dict[Path, dict]:
    """The unfinished folders of earlier executions of this notebook run (killed or interrupted),
    each with its elapsed record (elapsed_recorded). A folder whose record is fresher than two
    beats belongs to an execution still running and is left out."""
    parts = {}
    for folder in unfinished_folders(run_dir):
        record = folder / ELAPSED
        if record.is_file():
            elapsed = read_json(record)
            if time.time() - elapsed.get("at", 0.0) >= 2 * every:
                parts[folder] = elapsed
    return parts


def part_steal(elapsed: dict) -> dict:
    """An execution part's steal record from its elapsed record: {} where it has none (recorded
    before steal was, or on a machine that does not report it)."""
    if "cpu_s" not in elapsed:
        return {}
    return {"cpu_s": elapsed["cpu_s"], "stolen_s": elapsed["stolen_s"], "wall_s": elapsed["wall_time_s"]}


def summed_steal(records: list[dict]) -> dict:
    """Steal records {"cpu_s", "stolen_s", "wall_s": the wall time they cover} summed; {} when none
    of them holds one."""
    measured = [r for r in records if r]
    if not measured:
        return {}
    return {key: round(sum(r[key] for r in measured), 1) for key in ("cpu_s", "stolen_s", "wall_s")}


def unrecorded_parts(run_dir: Path) -> int:
    """How many unfinished folders of earlier executions of this notebook run hold no elapsed record
    (killed before executions kept one): parts whose time no record can give."""
    return sum(not (folder / ELAPSED).is_file() for folder in unfinished_folders(run_dir))


def code_digest(notebook: Path) -> str:
    """What an execution's figures depend on besides its parameters: the notebook's text and the
    package's source (a fix to a plot or a statistic must reach the committed figures)."""
    sources = [notebook, *sorted(Path(__file__).parent.rglob("*.py"))]
    return digest({str(p.relative_to(p.parents[1])): p.read_text() for p in sources})


def replace_dir(new: Path, old: Path) -> None:
    """Put folder `new` where `old` is (a former execution with the same parameters is dropped)."""
    if old.exists():
        shutil.rmtree(old)
    os.replace(new, old)


@dataclass
class Saved:
    """What an executed notebook saved: every path, and the markdown file of each table."""

    paths: list[str]
    tables: list[str]


def saved_outputs(run_dir: Path) -> Saved:
    """Read back from the executed notebook the outputs Study tagged (study.Study.saved and save_table)."""
    import nbformat

    nb = nbformat.read(run_dir / "executed.ipynb", as_version=4)
    paths, tables = [], []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            tag = output.get("metadata", {}).get("gvr_lab", {})
            paths += tag.get("saved", [])
            tables += [tag["table"]] if "table" in tag else []
    return Saved(paths, tables)


def execution_record(run_dir: Path) -> dict:
    """What a finished notebook run did: the execution's wall time, and the training runs under its
    runs root (count, summed wall time and devices, which stay true when a later execution only
    redraws because every run had finished) with how many of them the execution trained itself
    (records written since its first part began; absent for executions from before that was kept)."""
    resolved, done = resolved_of(run_dir), read_json(run_dir / "DONE")
    paths = list(resolved.runs_root.rglob("summary.json"))  # the pilot nests its arms
    summaries = [read_json(p) for p in paths]
    trained_here = {}
    if "started_at" in done:
        trained_here["runs_trained"] = sum(p.stat().st_mtime >= done["started_at"] for p in paths)
    return {
        "wall_time_s": done["wall_time_s"],
        # executions before killed parts were kept (no interrupted_s) may have continued unrecorded ones,
        # and the folders of parts killed before then (never removed) hold no time
        "all_parts": "interrupted_s" in done and not unrecorded_parts(run_dir),
        "training_runs": len(summaries),
        "training_time_s": round(sum(s.get("wall_time_s", 0.0) for s in summaries), 1),
        "devices": sorted({s.get("device", "?") for s in summaries}),
        "runs_root": repo_relative(resolved.runs_root),
        **trained_here,
        **({"steal": done["steal"]} if "steal" in done else {}),
    }


def resolved_of(run_dir: Path) -> Resolved:
    """The parameters and folders of a notebook run, from its params.json."""
    params = read_json(run_dir / "params.json")
    return resolve(read_notebook(params["notebook"]), {k: v for k, v in params.items() if k != "notebook"})


def study_timing(previous: dict | None, record: dict) -> dict:
    """A notebook's entry in figures/timings.json after an execution (record: execution_record):
    its wall time is that of the executions that trained its runs. An execution that trained
    nothing (every run finished earlier: a redraw) keeps the earlier wall time; one that trained
    every run (the earlier ones were gone) is the study's whole cost; one that continued a study
    run in parts (same runs root, some runs finished earlier) adds its own to the earlier parts',
    and its steal record to theirs. Records from before executions counted the runs they trained
    (no runs_trained) are told apart by their total training time."""
    same_study = previous is not None and previous.get("runs_root") == record["runs_root"]
    trained = record.get("runs_trained")
    if not same_study or (trained and trained == record["training_runs"]):
        return record
    # a part of the study that left no record stays missing, whichever execution found it
    all_parts = previous.get("all_parts", True) and record.get("all_parts", True)
    redraw = trained == 0 if trained is not None else record["training_time_s"] <= previous["training_time_s"]
    parts = [previous] if redraw else [previous, record]
    wall = round(sum(part["wall_time_s"] for part in parts), 1)
    steal = summed_steal([part.get("steal", {}) for part in parts])
    timing = {**without(record, "steal"), "wall_time_s": wall, "all_parts": all_parts}
    return {**timing, "steal": steal} if steal else timing


def without(record: dict, key: str) -> dict:
    return {k: v for k, v in record.items() if k != key}


def record_timing(root, name: str, record: dict) -> None:
    """Update one notebook's entry of <root>/timings.json (study_timing), the others kept."""
    path = Path(root) / TIMINGS
    timings = read_json(path) if path.is_file() else {}
    timings[name] = study_timing(timings.get(name), record)
    write_atomic(path, (json.dumps(timings, indent=2, sort_keys=True) + "\n").encode())


def notebook_table() -> str:
    """README's notebook table, from the notebooks' own declarations."""
    timings_file = REPO / "figures" / TIMINGS
    timings = read_json(timings_file) if timings_file.is_file() else {}
    rows = [
        "| notebook | question | presets | time at the cpu preset (2-core CPU) / gpu preset (one GPU) "
        "| writes to `figures/<name>/` (at the cpu preset) |",
        "|---|---|---|---|---|",
    ]
    for path in notebook_paths():
        decl = read_notebook(path)
        question = decl.title.split("·", 1)[-1].strip()
        outputs = ", ".join(f"`{stem}` ({what})" for stem, what in decl.outputs.items())
        rows.append(
            f"| `{path.name}` | {question} | {', '.join(decl.presets)} | {timing(timings.get(decl.name))} "
            f"/ not measured | `{decl.name}/`: {outputs} |"
        )
    return "\n".join(rows) + "\n"


def timing(record: dict | None) -> str:
    """A notebook's measured cost at the cpu preset, from figures/timings.json (gvr-lab figures)."""
    if not record:
        return "not measured"
    training = f"{record['training_time_s'] / 60:.0f} min of training, summed over its {record['training_runs']} runs"
    training += steal_note(record)
    if "runs_root" not in record:  # recorded before the studies' own wall time was: that of a redraw
        return training
    if not record.get("all_parts", True):
        return f"over {record['wall_time_s'] / 60:.0f} min: its last part, earlier ones not recorded ({training})"
    return f"{record['wall_time_s'] / 60:.0f} min ({training})"


def steal_note(record: dict) -> str:
    """How much of the machine's CPU time the host took while the study's executions ran, and over
    how much of their wall time that was measured; "" where it was not."""
    steal = record.get("steal")
    if not steal:
        return ""
    note = f"; the host took {100 * stolen_share(steal):.0f}% of the machine's CPU time meanwhile"
    if steal["wall_s"] < record["wall_time_s"] - 1:
        note += f", measured over {steal['wall_s'] / 60:.0f} min of it"
    return note


def write_figures_index(root, preset: str, entries: list[tuple[Declaration, dict]]) -> Path:
    """<root>/README.md: each notebook's figures and tables with what they show, the command and
    preset that made them and what that took: entries pair each notebook with the record of an
    execution just made (execution_record, added to <root>/timings.json) or None (the one there)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Figures and tables",
        "",
        f"Regenerate all: `gvr-lab figures --preset {preset}` (or one notebook: "
        f"`gvr-lab run notebooks/<notebook>.py --preset {preset}`). Every figure's footer names its "
        "dataset, model, epochs and steps, seeds and preset; tables carry the same in their caption.",
        "",
    ]
    for decl, record in entries:
        if record:
            record_timing(root, decl.name, record)
    timings_path = root / TIMINGS
    timings = read_json(timings_path) if timings_path.is_file() else {}
    for decl, _ in entries:
        lines += [f"## {decl.name}", "", f"From `notebooks/{decl.path.name}`, preset `{preset}`."]
        record = timings.get(decl.name)
        if record:
            wall = f"took {record['wall_time_s']:.0f} s of wall time"
            if not record.get("all_parts", True):
                wall = (
                    f"took over {record['wall_time_s']:.0f} s of wall time (the last of them; the others not recorded)"
                )
            lines.append(
                f"Training: {record['training_runs']} runs on {', '.join(record['devices'])}, their wall "
                f"times summing to {record['training_time_s']:.0f} s (runs in parallel overlap); the "
                f"executions that trained them {wall}{steal_note(record)}."
            )
        lines.append("")
        for stem, what in decl.outputs.items():
            found = {p.suffix: p.name for p in (root / decl.name).glob(f"{stem}.*")}
            shown = [".png", ".md", ".csv", ".toml"] + ([] if ".csv" in found else [".json"])  # one of each format
            files = sorted(name for suffix, name in found.items() if suffix in shown)
            lines += [f"- [{name}]({decl.name}/{name}): {what}" for name in files]
        for archive in sorted((root / decl.name).glob("*/README.md")):  # an earlier study, kept with its own README
            title = archive.read_text().split("\n", 1)[0].removeprefix("# ")
            lines.append(f"- [{archive.parent.name}/]({decl.name}/{archive.parent.name}/README.md): {title}")
        lines.append("")
    path = root / "README.md"
    write_atomic(path, "\n".join(lines).encode())
    return path
