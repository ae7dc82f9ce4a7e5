"""Run directories: atomic writes, checkpoints, metrics files and `load_runs`.

A run directory holds
  config.json     every setting of the run (method hyper-parameters resolved to their values)
  epochs.parquet  one row per epoch (train/test/val loss and accuracy, lr, epoch_time_s, ...)
  steps.parquet   per-step metrics sampled every `log_every` steps
  steps.jsonl     the same rows, a JSON line each, appended as the steps are logged: a running or killed
                  run shows its last steps (read_lines; a last line without its newline is not one yet)
  summary.json    final and best accuracy, wall time, status ("running", "stopped", "completed", "diverged",
                  "failed: <why>"), the run's identity and what code made it
  checkpoint.pt   model, optimizer and method state after the last evaluation, with the run's identity
Every file is written to a temporary name and renamed into place, so a crash never leaves a
half-written file where a complete one was expected; a write the filesystem refuses (read-only, full,
no permission) is a one-line FilesystemError.

Readers never see a mix of two writes: each file is read through one open of it (a writer renames a
new version into place meanwhile without effect on that read), and summary.json, which the loop
writes after the tables, says how many of their rows are complete (`read_run`).
"""

from __future__ import annotations

import fcntl
import glob
import io
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import yaml

from .errors import UsageError, filesystem_error

CONFIG, EPOCHS, STEPS, SUMMARY, CHECKPOINT = (
    "config.json",
    "epochs.parquet",
    "steps.parquet",
    "summary.json",
    "checkpoint.pt",
)
STEP_LINES = "steps.jsonl"
# What a grid's folder says about its runs before they start: a run of a grid that has no run
# directory yet is queued (progress.runs_report).
GRID = "grid.json"


def kept_checkpoint(evaluation: int) -> str:
    """The file name of the checkpoint Config.keep_checkpoints keeps after evaluation n (1-based)."""
    return f"checkpoint-{evaluation}.pt"


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename it over `path`: a reader sees the old file
    or the new one, never half of one. The file gets the mode a plain open() would give it (mkstemp's
    temporary file is private to its owner)."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise filesystem_error(e, "write", path) from None
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise filesystem_error(e, "write", path) from None
        raise


def rewrite_in_place(path: Path, data: bytes) -> None:
    """Overwrite an existing file in the blocks it already holds: where the disk is full and
    write_atomic cannot make its temporary file, a small file can still be rewritten so. Not
    atomic: a reader may meet it half-written (read_snapshot reads it again)."""
    try:
        with open(path, "r+b") as f:
            f.write(data)
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise filesystem_error(e, "write", path) from None


def make_dir(path: Path) -> None:
    """A folder and its parents, made if missing."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise filesystem_error(e, "create the folder", path) from None


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, obj) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_snapshot(path, parse):
    """parse(the bytes of `path`), read through one open of it. A parse that fails because the file
    was rewritten meanwhile (another inode, size or modification time than the one read: a writer
    that does not rename into place) is read again; a file that stays unreadable is a UsageError
    naming it."""

    def version(stat: os.stat_result) -> tuple:
        return stat.st_ino, stat.st_size, stat.st_mtime_ns

    for attempt in range(3):
        with open(path, "rb") as f:
            read = version(os.fstat(f.fileno()))
            data = f.read()
        try:
            return parse(data)
        except Exception as e:  # noqa: BLE001 - json and pyarrow raise many types for a damaged file
            if attempt < 2 and version(os.stat(path)) != read:
                continue
            raise damaged(path, e) from None


def damaged(path, error: Exception) -> UsageError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return UsageError(f"{path} is damaged ({first}): it was edited by hand or written incompletely")


def read_json(path: Path):
    return read_snapshot(path, json.loads)


def read_table(path) -> pd.DataFrame:
    """A parquet file. pyarrow given a path opens it more than once, so a writer renaming a new
    version into place meanwhile could hand it the footer of one version and the pages of another."""
    return read_snapshot(path, lambda data: pd.read_parquet(io.BytesIO(data)))


def complete_lines(data: bytes) -> list[bytes]:
    """The lines of a file a writer appends to: a last line without its newline (the writer
    mid-line, or killed there) is not one yet."""
    return data[: data.rfind(b"\n") + 1].splitlines()


def read_lines(path) -> list[dict]:
    """The rows of a JSON-lines file a run appends to (steps.jsonl), each complete line one row."""
    return read_snapshot(path, lambda data: [json.loads(line) for line in complete_lines(data)])


def last_line(path, tail: int = 1 << 16) -> dict | None:
    """The last complete row of a JSON-lines file (None for none), read from its last `tail` bytes
    (more where they hold no whole line): what a long run logged last, without reading all it logged."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(max(0, size - tail))
        lines = complete_lines(f.read())[1 if size > tail else 0 :]  # the first may be the end of a line
    if not lines and size > tail:
        return last_line(path, 16 * tail)
    try:
        return json.loads(lines[-1]) if lines else None
    except ValueError as e:
        raise damaged(path, e) from None


class LineLog:
    """A file that a run appends lines to as it logs (steps.jsonl, a logger's CSV): each append is
    flushed to the operating system, without an fsync (what the system holds outlives a killed
    process, and a reader sees it at once), so the file shows a running or killed run's last
    lines. `start` keeps the complete lines of the file that `keep` accepts (a resumed run's lines
    from before the step it resumes at), after `header`, and appends after them."""

    def __init__(self, path: Path, header: str = ""):
        self.path, self.header, self.file = Path(path), header, None

    def start(self, keep) -> None:
        old = read_snapshot(self.path, complete_lines) if self.path.is_file() else []
        kept = [line + b"\n" for line in old[1 if self.header else 0 :] if keep(line)]
        write_atomic(self.path, self.header.encode() + b"".join(kept))
        try:
            self.file = open(self.path, "ab")
        except OSError as e:
            raise filesystem_error(e, "write", self.path) from None

    def append(self, lines: list[str]) -> None:
        try:
            self.file.write("".join(lines).encode())
            self.file.flush()
        except OSError as e:
            raise filesystem_error(e, "write", self.path) from None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


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
    """Load with weights_only=True. Refused in one line naming the file: a checkpoint holding
    pickled objects besides tensors and plain Python, and a truncated or corrupt one."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        pickled = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if pickled:
            raise UsageError(
                f"refusing to load checkpoint {path}: it holds a pickled {pickled[1]}, and a checkpoint of "
                "this lab holds only tensors and plain Python"
            ) from None
        with open(path, "rb") as f:
            head = f.read(4)
        damage = (
            "is empty"
            if not head
            else "is truncated or damaged (an incomplete zip archive)"
            if head == b"PK\x03\x04"
            else "is corrupt (not a torch checkpoint)"
        )
        raise UsageError(
            f"checkpoint {path} {damage}: delete it to start the run again from its beginning, or put back a "
            "complete copy"
        ) from None


class RunLock:
    """An exclusive lock on a run directory for the life of a training process. The kernel drops
    it when the process dies (even by SIGKILL), so a crashed run never leaves a stale lock."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.fd = None

    def __enter__(self):
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise filesystem_error(e, "create the lock file", self.path) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise UsageError(
                f"run directory {self.path.parent} is in use by another training process; "
                "wait for it to finish or choose another out_dir"
            ) from None
        # Temporary files of a writer killed mid-write: the lock proves nobody is writing them.
        for stale in self.path.parent.glob(".*.tmp"):
            stale.unlink()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


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


@dataclass
class RunFiles:
    """What a run directory says at one moment (read_run)."""

    config: dict
    summary: dict  # {} before the run's first summary
    tables: dict  # file name (EPOCHS, STEPS) -> its rows that the summary counts; empty when missing


def read_run(run_dir, tables=(EPOCHS, STEPS)) -> RunFiles:
    """The run's files as one consistent state, however busy a writer is: summary.json first, then
    each table cut to the evaluations (`evaluations`; `epochs_completed` in a summary without it)
    and steps (`steps_completed`) that summary counts (in steps mode a run evaluates more often
    than it completes epochs). The loop writes the tables before the summary and only ever appends rows, so
    the rows a summary counts are already in place, and are those the summary describes."""
    run_dir = Path(run_dir)
    summary = read_json(run_dir / SUMMARY) if (run_dir / SUMMARY).is_file() else {}
    read = {}
    for name in tables:
        df = read_table(run_dir / name) if (run_dir / name).is_file() else pd.DataFrame()
        rows = summary.get("evaluations", summary.get("epochs_completed"))
        if name == EPOCHS and rows is not None:
            df = df.iloc[:rows]
        if name == STEPS and "steps_completed" in summary and "step" in df:
            df = df[df["step"] < summary["steps_completed"]]
        read[name] = df.reset_index(drop=True)
    return RunFiles(read_json(run_dir / CONFIG), summary, read)
