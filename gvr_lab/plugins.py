"""Methods, models and datasets from other installed packages, through entry points.

A package adds to the lab by naming, in its metadata, modules whose import registers what it
brings with the usual decorators (`register_method`, `register_model`, `register_dataset`), as
pytest plugins name modules:

    [project.entry-points."gvr_lab.methods"]
    mypkg = "mypkg.methods"

in the groups `gvr_lab.methods`, `gvr_lab.models` and `gvr_lab.datasets` (the group says what the
module brings; any of them may register anything). The package `gvr_lab` imports every such module
when it is imported, so the plugins are seen by `gvr-lab list`, every command, every notebook and
every process a grid starts. A plugin that fails to import, or registers a name already taken, is
reported in one line on stderr naming it, and the rest of the lab works without it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys

GROUPS = ("gvr_lab.methods", "gvr_lab.models", "gvr_lab.datasets")
LOADED: list[str] = []  # "name (group = module)" of every plugin imported
FAILED: list[str] = []  # the line said of every plugin that was not


def load_plugins() -> None:
    """Import the module of every entry point in GROUPS (the package's import does, once)."""
    installed = importlib.metadata.entry_points()
    for group in GROUPS:
        for entry in installed.select(group=group):
            what = f"{entry.name} ({group} = {entry.value})"
            try:
                importlib.import_module(entry.module)
            except Exception as e:  # noqa: BLE001 - any failure of another package's import is its own
                reason = (str(e).strip().splitlines() or [""])[0]
                line = f"gvr_lab: plugin {what} not loaded: {type(e).__name__}: {reason}; the rest of the lab works"
                FAILED.append(line)
                print(line, file=sys.stderr, flush=True)
            else:
                LOADED.append(what)
