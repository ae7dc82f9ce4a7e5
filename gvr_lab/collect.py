"""Many run directories as one table: `load_runs`, with each run's status as its files and its
identity say (a config.json edited by hand no longer describes the run that wrote the results).

It stands above the training layer, whose Config defines a run's identity (training.identity_digest).
"""

from __future__ import annotations

import math

import pandas as pd

from .results import EPOCHS, STEPS, RunFiles, best_evaluations, flat_config, read_run, run_dirs
from .training import identity_digest


def run_status(files: RunFiles) -> str:
    """The summary's status; "mismatched" where config.json no longer describes the run that wrote
    the results (edited by hand: the run identity the summary records is not config.json's)."""
    written_by = files.summary.get("run_id")
    if written_by is not None and written_by != identity_digest(files.config):
        return "mismatched"
    return files.summary.get("status", "unknown")


def load_runs(paths_or_glob, steps: bool = False) -> pd.DataFrame:
    """Tidy table of many runs: one row per (run, epoch) with the config as columns.

    With steps=True, one row per logged step instead. Runs without metrics yet are skipped; a run
    being written is read as its last complete state (read_run). Besides the config, each row
    carries the run's `status` (run_status) and `steps_per_epoch` (summary.json),
    and (one row per evaluation only) `selected_test_acc`: the run's test accuracy at its
    best-validation evaluation (`best_evaluations`), NaN for a run without val_acc; the value a
    setting chosen on validation reports (stats.select).
    """
    frames = []
    for run_dir in run_dirs(paths_or_glob):
        files = read_run(run_dir, (STEPS if steps else EPOCHS,))
        summary, [df] = files.summary, files.tables.values()
        if not len(df):
            continue
        for key, value in flat_config(files.config).items():
            if key not in df.columns:
                df[key] = value
        df["run_dir"] = str(run_dir)
        df["status"] = run_status(files)
        df["steps_per_epoch"] = summary.get("steps_per_epoch", 0)
        if not steps:
            best = best_evaluations(df)
            df["selected_test_acc"] = float(best["test_acc"].iloc[0]) if len(best) else math.nan
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
