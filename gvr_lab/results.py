"""Run directories: atomic writes, checkpoints, metrics files and `load_runs`.

A run directory holds
  config.json     every setting of the run (method hyper-parameters resolved to their values)
  epochs.parquet  one row per epoch (train/test/val loss and accuracy, lr, epoch_time_s, ...)
  steps.parquet   per-step metrics sampled every `log_every` steps
  summary.json    final and best accuracy, wall time, status ("running", "stopped", "completed", "diverged")
  checkpoint.pt   model, optimizer and method state after the last finished epoch
Every file is written to a temporary name and renamed into place, so a crash never leaves a
half-written file where a complete one was expected.
"""

from __future__ import annotations

import fcntl
import glob
import io
import json
import math
import os
import tempfile
from pathlib import Path

import pandas as pd
import torch
import yaml

from .errors import UsageError

CONFIG, EPOCHS, STEPS, SUMMARY, CHECKPOINT = (
    "config.json",
    "epochs.parquet",
    "steps.parquet",
    "summary.json",
    "checkpoint.pt",
)


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename it over `path`: a reader sees the old file
    or the new one, never half of one. The file gets the mode a plain open() would give it (mkstemp's
    temporary file is private to its owner)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, obj) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def read_yaml_mapping(path, what: str) -> dict:
    """A YAML file holding a mapping (an empty file is an empty one), for `gvr-lab train --config`
    and `gvr-lab run -f`: an unreadable file, invalid YAML or another type is a one-line UsageError
    that names `what` the file should hold."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"cannot read {what} file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{what} file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UsageError(f"{what} file {path} must hold a mapping, not {type(loaded).__name__}")
    return loaded


def write_parquet(path: Path, rows: list[dict]) -> None:
    buf = io.BytesIO()
    pd.DataFrame(rows).to_parquet(buf, index=False)
    write_atomic(path, buf.getvalue())


def save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(path, buf.getvalue())


def load_checkpoint(path: Path, map_location=None) -> dict:
    """Load with weights_only=True: a checkpoint holding arbitrary pickled objects is refused."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"refusing to load checkpoint {path}: not a plain-tensor checkpoint ({first_line})") from None


class RunLock:
    """An exclusive lock on a run directory for the life of a training process. The kernel drops
    it when the process dies (even by SIGKILL), so a crashed run never leaves a stale lock."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.file = None

    def __enter__(self):
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise UsageError(
                f"run directory {self.path.parent} is in use by another training process; "
                "wait for it to finish or choose another out_dir"
            ) from None
        # Temporary files of a writer killed mid-write: the lock proves nobody is writing them.
        for stale in self.path.parent.glob(".*.tmp"):
            stale.unlink()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


# ---------------------------------------------------------------------- reading many runs


def run_dirs(paths_or_glob) -> list[Path]:
    """Run directories (those holding config.json) under the given paths or glob patterns."""
    patterns = [paths_or_glob] if isinstance(paths_or_glob, (str, os.PathLike)) else list(paths_or_glob)
    found: list[Path] = []
    for pattern in patterns:
        for hit in sorted(glob.glob(str(pattern), recursive=True)) or [str(pattern)]:
            hit = Path(hit)
            if (hit / CONFIG).is_file():
                found.append(hit)
            elif hit.is_dir():
                found.extend(sorted(p.parent for p in hit.rglob(CONFIG)))
    return list(dict.fromkeys(found))


def flat_config(config: dict) -> dict:
    """Config as flat columns: method_args become `arg_<name>`, lists become strings."""
    out = {}
    for key, value in config.items():
        if key in ("method_args", "model_args"):
            prefix = "arg_" if key == "method_args" else "model_"
            out.update({prefix + k: v if not isinstance(v, (list, dict)) else str(v) for k, v in value.items()})
        else:
            out[key] = value if not isinstance(value, (list, dict)) else str(value)
    return out


def best_evaluations(evaluations: pd.DataFrame, by: str = "val_acc") -> pd.DataFrame:
    """Each run's evaluation with the highest `by`, the earliest (by epoch, then step) among equal
    values: one row per run_dir of an evaluation table, runs without a value of `by` left out."""
    if by not in evaluations:
        return evaluations.iloc[0:0]
    rated = evaluations[evaluations[by].notna()].reset_index(drop=True)
    rated = rated.sort_values([c for c in ("epoch", "step") if c in rated], kind="stable")
    return rated.loc[rated.groupby("run_dir", sort=False)[by].idxmax()]


def load_runs(paths_or_glob, steps: bool = False) -> pd.DataFrame:
    """Tidy table of many runs: one row per (run, epoch) with the config as columns.

    With steps=True, one row per logged step instead. Runs without metrics yet are skipped.
    Besides the config, each row carries the run's `status` and `steps_per_epoch` (summary.json),
    and (one row per evaluation only) `selected_test_acc`: the run's test accuracy at its
    best-validation evaluation (`best_evaluations`), NaN for a run without val_acc; the value a
    setting chosen on validation reports (stats.select).
    """
    frames = []
    for run_dir in run_dirs(paths_or_glob):
        metrics = run_dir / (STEPS if steps else EPOCHS)
        if not metrics.is_file():
            continue
        df = pd.read_parquet(metrics)
        summary = read_json(run_dir / SUMMARY) if (run_dir / SUMMARY).is_file() else {}
        for key, value in flat_config(read_json(run_dir / CONFIG)).items():
            if key not in df.columns:
                df[key] = value
        df["run_dir"] = str(run_dir)
        df["status"] = summary.get("status", "unknown")
        df["steps_per_epoch"] = summary.get("steps_per_epoch", 0)
        if not steps:
            best = best_evaluations(df)
            df["selected_test_acc"] = float(best["test_acc"].iloc[0]) if len(best) else math.nan
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
