"""Loggers: where a run's metrics go as it trains, besides its tables, for watching it live.

A logger is one of the loop's hooks, called on rank 0 at the moments the loop logs: `start` when a
call of the loop begins (at step 0, or at the step of the checkpoint it resumes from), `step` with
each logged step's row (step, epoch, lr and what the method returned), `evaluation` with each
evaluation's history row and the steps done by then, `close` when the call ends, however it ends.
The loop calls every logger alike and knows none by name: `Config.loggers` names them (LOGGERS),
and StepLines, the run directory's live per-step file, always comes first.

* StepLines: <run dir>/steps.jsonl, a JSON line per logged step (the rows of steps.parquet),
  appended and flushed as each step is logged, so a running or killed run shows its last steps.
* "tensorboard" (the default): event files in <run dir>/tensorboard/, one TensorBoard run per run
  directory, so `tensorboard --logdir runs/` shows a grid: a logged step's values as step/<name>
  at its step, an evaluation's columns as eval/<name> at the steps done, the configuration as
  text and as hparams (whose metrics are the evaluation's, eval/test_acc ...).
* "csv": <run dir>/metrics.csv, the same scalars as lines step,name,value (read_metrics_csv).
* "wandb": Weights & Biases (an optional extra), offline into <run dir>/wandb unless WANDB_MODE
  says otherwise, one W&B run per run directory (resumed with it), grouped by its grid's folder.

A resumed call drops what a killed call logged from the checkpoint's step on, then logs the
checkpoint's evaluation again, so no step is drawn twice: TensorBoard purges from that step
(SummaryWriter's purge_step), the line files keep their lines of earlier steps, and W&B, which
cannot drop what it holds, refuses steps below its last (the resumed run recomputes the values it
holds: resume is exact).

A logger whose package is missing is one line (check_available) before a run starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import math
import os
from pathlib import Path

import pandas as pd

from . import results
from .errors import UsageError, check_choice, filesystem_error

# Columns of a row that place it rather than measure something: not drawn as scalars.
PLACES = ("step", "epoch")
# The metrics the TensorBoard hparams view shows beside each run's configuration.
HPARAM_METRICS = ("eval/test_acc", "eval/test_loss", "eval/val_acc", "eval/train_loss")
FLUSH_SECONDS = 10  # TensorBoard's event files reach the disk at least this often (its default: 120)


def scalars(prefix: str, row: dict) -> dict[str, float]:
    """A row's numbers as tags prefix/<column>, its place (step, epoch) left out."""
    return {
        f"{prefix}/{k}": float(v)
        for k, v in row.items()
        if k not in PLACES and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def flat_config(config: dict) -> dict:
    """The configuration as TensorBoard's hparams take it: numbers, strings and booleans."""
    return {k: v for k, v in results.flat_config(config).items() if k not in ("out_dir", "data_dir", "loggers")}


class Logger:
    """What the loop calls on rank 0 (the module's docstring); each a no-op here."""

    name = ""
    # The module a logger imports (None: none), checked before a run starts, and what to install for it.
    requires: str | None = None
    install = ""

    def start(self, run_dir: Path, config: dict, resumed_at: int) -> None:
        """A call of the loop begins after `resumed_at` steps (0: a new run); what an earlier call
        logged from that step on is dropped."""

    def step(self, row: dict) -> None:
        """A logged step: {"step", "epoch", "lr", the method's values}."""

    def evaluation(self, step: int, row: dict) -> None:
        """An evaluation's history row, after `step` steps."""

    def close(self) -> None:
        """The call ends: what is buffered is written."""


class StepLines(Logger):
    """steps.jsonl: the logged steps' rows, a line each, flushed as they come."""

    def start(self, run_dir: Path, config: dict, resumed_at: int) -> None:
        self.lines = results.LineLog(run_dir / results.STEP_LINES)
        self.lines.start(keep=lambda line: json.loads(line)["step"] < resumed_at)

    def step(self, row: dict) -> None:
        self.lines.append([json.dumps(row) + "\n"])

    def close(self) -> None:
        self.lines.close()


class TensorBoardLogger(Logger):
    name, requires, install = "tensorboard", "tensorboard", "pip install tensorboard"
    FOLDER = "tensorboard"

    def start(self, run_dir: Path, config: dict, resumed_at: int) -> None:
        # imported here: TensorBoard's import takes 0.6 s, which a run without it never pays
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.folder = run_dir / self.FOLDER
        with self.writing():
            # purge_step: TensorBoard hides the events an earlier call wrote from this step on
            self.writer = SummaryWriter(str(self.folder), purge_step=resumed_at, flush_secs=FLUSH_SECONDS)
            if resumed_at == 0:
                text = "\n".join("    " + line for line in json.dumps(config, indent=2, sort_keys=True).splitlines())
                self.writer.add_text("config", text, 0)
                for summary in hparams(flat_config(config), dict.fromkeys(HPARAM_METRICS, math.nan)):
                    self.writer.file_writer.add_summary(summary)

    @contextlib.contextmanager
    def writing(self):
        """A write the filesystem refuses (here or in the writer's thread) as one line naming the folder."""
        try:
            yield
        except OSError as e:
            raise filesystem_error(e, "write", self.folder) from None

    def draw(self, prefix: str, step: int, row: dict) -> None:
        with self.writing():
            for tag, value in scalars(prefix, row).items():
                self.writer.add_scalar(tag, value, step)

    def step(self, row: dict) -> None:
        self.draw("step", row["step"], row)

    def evaluation(self, step: int, row: dict) -> None:
        self.draw("eval", step, row)
        with self.writing():
            self.writer.flush()

    def close(self) -> None:
        with self.writing():
            self.writer.close()


class CsvLogger(Logger):
    """metrics.csv: every scalar TensorBoard draws, a line step,name,value each."""

    name = "csv"
    FILE, HEADER = "metrics.csv", "step,name,value\n"

    def start(self, run_dir: Path, config: dict, resumed_at: int) -> None:
        self.lines = results.LineLog(run_dir / self.FILE, header=self.HEADER)
        self.lines.start(keep=lambda line: int(line.split(b",", 1)[0]) < resumed_at)

    def write(self, prefix: str, step: int, row: dict) -> None:
        self.lines.append([f"{step},{tag},{value!r}\n" for tag, value in scalars(prefix, row).items()])

    def step(self, row: dict) -> None:
        self.write("step", row["step"], row)

    def evaluation(self, step: int, row: dict) -> None:
        self.write("eval", step, row)

    def close(self) -> None:
        self.lines.close()


def read_metrics_csv(run_dir) -> pd.DataFrame:
    """A run's metrics.csv (step, name, value), its complete lines, also while the run writes it."""
    path = Path(run_dir) / CsvLogger.FILE
    return results.read_snapshot(path, lambda data: pd.read_csv(io.BytesIO(b"\n".join(results.complete_lines(data)))))


class WandbLogger(Logger):
    name, requires, install = "wandb", "wandb", "pip install wandb (or pip install -e '.[wandb]')"

    def start(self, run_dir: Path, config: dict, resumed_at: int) -> None:
        import wandb

        # offline unless the user chose a mode (WANDB_MODE=online syncs as it trains)
        mode = {} if os.environ.get("WANDB_MODE") else {"mode": "offline"}
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "gvr_lab",
            dir=str(run_dir),
            id=hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16],  # the run directory's
            name=config.get("label") or Path(run_dir).name,
            group=Path(run_dir).resolve().parent.name,
            config=config,
            resume="allow",
            **mode,
        )

    def step(self, row: dict) -> None:
        self.run.log(scalars("step", row), step=row["step"])

    def evaluation(self, step: int, row: dict) -> None:
        self.run.log(scalars("eval", row), step=step)

    def close(self) -> None:
        self.run.finish()


LOGGERS = {cls.name: cls for cls in (TensorBoardLogger, CsvLogger, WandbLogger)}


def check_names(names: list) -> None:
    for name in names:
        check_choice("logger", name, LOGGERS)


def check_available(names) -> None:
    """A logger whose package is not installed is one line saying what to install, before a run starts."""
    for name in dict.fromkeys(names):
        cls = LOGGERS[name]
        if cls.requires and importlib.util.find_spec(cls.requires) is None:
            raise UsageError(
                f"logger {name!r} needs the {cls.requires} package, which is not installed: {cls.install}, or "
                f"leave {name!r} out of loggers"
            )


class Loggers:
    """Loggers called as one, in their order."""

    def __init__(self, each: list[Logger]):
        self.each = each

    def start(self, run_dir: Path, config: dict, resumed_at: int, last_evaluation: dict | None) -> None:
        """Every logger started; a resumed call logs its checkpoint's evaluation again (each logger
        dropped it with what followed). A logger that fails to start closes those started before it."""
        for i, logger in enumerate(self.each):
            try:
                logger.start(run_dir, config, resumed_at)
            except BaseException:
                for started in self.each[:i]:
                    started.close()
                raise
        if last_evaluation is not None:
            self.evaluation(resumed_at, last_evaluation)

    def step(self, row: dict) -> None:
        for logger in self.each:
            logger.step(row)

    def evaluation(self, step: int, row: dict) -> None:
        for logger in self.each:
            logger.evaluation(step, row)

    def close(self) -> None:
        for logger in self.each:
            logger.close()


def create_loggers(names) -> Loggers:
    """A run's loggers: StepLines, then those `names` (Config.loggers) in their order."""
    return Loggers([StepLines(), *(LOGGERS[name]() for name in names)])
