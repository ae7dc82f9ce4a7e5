"""Execute a jupytext notebook headless through papermill, with what papermill lacks.

Added on top of papermill's Python API: parameters are validated against
the notebook's `parameters` cell (unknown name or wrong type is an error, not a warning), presets
(`notebooks/presets.yaml`), list/dict values that survive the command line, the `gvr_lab` kernel
with a fallback to the current interpreter's, a one-line report of a failed cell with the partial
notebook kept, and completed runs skipped unless forced.

Parameters are merged in this order: the notebook's defaults < preset < `-f params.yaml` < `-p`.
Each run goes to runs/notebooks/<notebook>-<preset>-<hash>/ with executed.ipynb, params.json and,
once it finished, DONE (JSON: the execution's wall time).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import yaml

from .errors import TYPE_NAMES, UsageError, check_choice, coerce
from .results import read_json, write_json

PRESETS = ("smoke", "cpu", "gpu", "paper")
REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
PRESET_FILE = NOTEBOOKS / "presets.yaml"


class NotebookFailed(RuntimeError):
    """A cell raised; the message names the notebook, the cell and the error line."""


def declared_parameters(nb, path) -> dict:
    """papermill's view of the parameters cell, checked against Python's own parse of it (papermill
    skips a line it cannot parse with only a warning, which would silently drop a parameter)."""
    import ast

    import papermill as pm

    declared = pm.inspect_notebook(nb)
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not cells:
        raise UsageError(f"{path} has no cell tagged 'parameters'")
    for node in ast.parse(cells[0].source).body:
        target = getattr(node, "target", None) or (node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id not in declared:
            raise UsageError(f"{path}: papermill cannot parse the parameters-cell line of {target.id!r} "
                             "(keep it 'name: type = literal  # help' without '=' in the comment)")
    return declared


def check_parameters(params: dict, declared: dict, path) -> dict:
    listing = ", ".join(f"{n}: {d['inferred_type_name']}" for n, d in declared.items())
    checked = {}
    for name, value in params.items():
        if name not in declared:
            raise UsageError(f"unknown parameter {name!r} for {path}; declared: {listing}")
        kind = TYPE_NAMES.get(declared[name]["inferred_type_name"])
        checked[name] = value if kind is None else coerce(value, kind, f"parameter {name!r} of {path}",
                                                          f"; declared: {listing}")
    return checked


def preset_parameters(stem: str, preset: str | None) -> dict:
    if preset is None:
        return {}
    check_choice("preset", preset, PRESETS)
    presets = yaml.safe_load(PRESET_FILE.read_text()) if PRESET_FILE.is_file() else {}
    return dict((presets.get(stem) or {}).get(preset) or {})


def read_params_file(path: str) -> dict:
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"cannot read parameter file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"parameter file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise UsageError(f"parameter file {path} must hold a mapping of parameter names to values")
    return loaded


def pick_kernel() -> str:
    from jupyter_client.kernelspec import KernelSpecManager

    return "gvr_lab" if "gvr_lab" in KernelSpecManager().find_kernel_specs() else "python3"


def run_dir_for(stem: str, preset: str | None, params: dict, runs_root: Path) -> Path:
    digest = hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return runs_root / f"{stem}-{preset or 'custom'}-{digest}"


def run_notebook(path, params: dict | None = None, preset: str | None = None, params_file: str | None = None,
                 force: bool = False, runs_root="runs/notebooks", timeout: float | None = None,
                 log_output: bool = False) -> Path:
    """Execute `path` with validated parameters; returns its run folder. Raises NotebookFailed."""
    import jupytext
    import papermill as pm

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"notebook {path} not found")
    nb = jupytext.read(path)
    kernel = pick_kernel()
    nb.metadata["kernelspec"] = {"name": kernel, "language": "python", "display_name": kernel}
    declared = declared_parameters(nb, path)
    merged = preset_parameters(path.stem, preset)
    merged.update(read_params_file(params_file) if params_file else {})
    merged.update(params or {})
    merged = check_parameters(merged, declared, path)
    run_dir = run_dir_for(path.stem, preset, merged, Path(runs_root))
    if (run_dir / "DONE").is_file() and not force:
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "DONE").unlink(missing_ok=True)
    write_json(run_dir / "params.json", {"notebook": str(path), "preset": preset, **merged})
    if log_output:  # papermill only configures logging in its own CLI (papermill#496)
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = run_dir / "executed.ipynb"
    started = time.perf_counter()
    try:
        pm.execute_notebook(nb, str(out), parameters=merged, kernel_name=kernel, cwd=str(REPO),
                            execution_timeout=timeout, log_output=log_output, progress_bar=False)
    except pm.PapermillExecutionError as e:
        line = f"{e.ename}: {e.evalue}".strip().splitlines()[0]
        raise NotebookFailed(f"{path}: cell {e.exec_count} failed: {line} (partial notebook kept: {out})") from None
    write_json(run_dir / "DONE", {"wall_time_s": round(time.perf_counter() - started, 1)})
    return run_dir


def execution_record(run_dir: Path) -> dict:
    """What a finished notebook run did: the execution's wall time, and the training runs under its
    runs_root (count, summed wall time and devices, which stay true when a later execution only
    redraws because every run had finished)."""
    params = read_json(run_dir / "params.json")
    record = {"wall_time_s": read_json(run_dir / "DONE")["wall_time_s"]}
    summaries = [read_json(p) for p in Path(REPO, params.get("runs_root", "")).glob("*/summary.json")] \
        if params.get("runs_root") else []
    record["training_runs"] = len(summaries)
    record["training_time_s"] = round(sum(s.get("wall_time_s", 0.0) for s in summaries), 1)
    record["devices"] = sorted({s.get("device", "?") for s in summaries})
    return record


def notebook_paths() -> list[Path]:
    return sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]_*.py"))
