"""JupyterLab for this checkout, with its kernel and settings in the project's environment, not the user's home.

`python -m gvr_lab.lab install` (run by `make setup`) puts into <environment>/share/jupyter:
* the kernel "gvr_lab" (kernels/gvr_lab), whose Python is this environment's: a second checkout,
  or the CI clone, installs its own into its own environment and never repoints this one;
* JupyterLab's default viewer for Python files, jupytext's notebook
  (lab/settings/overrides.d/gvr_lab.json), so a double-click opens a study as a notebook.

`python -m gvr_lab.lab [jupyter lab options]` (run by `make lab`) starts JupyterLab on notebooks/
with this environment's kernels and settings ahead of the user's (JUPYTER_PREFER_ENV_PATH), with
--allow-root when run as root, and with file checkpoints kept in .ipynb_checkpoints/ at the root of
the checkout rather than beside the notebooks. `lab_command` is that command line, which the
browser test starts too.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .results import write_atomic
from .runner import KERNEL
from .study import NOTEBOOKS, REPO

DISPLAY_NAME = "Python (gvr_lab)"
SETTINGS = {"@jupyterlab/docmanager-extension:plugin": {"defaultViewers": {"python": "Jupytext Notebook"}}}


def settings_file(prefix: str) -> Path:
    return Path(prefix, "share", "jupyter", "lab", "settings", "overrides.d", "gvr_lab.json")


def install(prefix: str = sys.prefix) -> None:
    from ipykernel.kernelspec import install as install_kernel

    install_kernel(kernel_name=KERNEL, display_name=DISPLAY_NAME, prefix=prefix)
    path = settings_file(prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(SETTINGS, indent=2) + "\n").encode())
    print(
        f"installed the Jupyter kernel {KERNEL!r} ({sys.executable}) and JupyterLab's default viewer for .py "
        f"files into {prefix}"
    )


def lab_command(extra: list[str]) -> tuple[list[str], dict]:
    """The command line and environment that start this checkout's JupyterLab."""
    root = ["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        *root,
        f"--FileCheckpoints.checkpoint_dir={REPO / '.ipynb_checkpoints'}",
        *extra,
        str(NOTEBOOKS),
    ]
    return command, {**os.environ, "JUPYTER_PREFER_ENV_PATH": "1"}


def main(argv: list[str]) -> None:
    if argv[:1] == ["install"]:
        install()
        return
    command, env = lab_command(argv)
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    main(sys.argv[1:])
