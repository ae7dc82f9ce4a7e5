"""Watching runs: the loggers (TensorBoard, the live steps.jsonl, CSV, W&B), what a run prints
without a terminal, the time it spends writing, `gvr-lab runs` and `gvr-lab tensorboard`."""

import json
import os
import re
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from gvr_lab import Config, loggers, results, train, training
from gvr_lab.cli import main
from gvr_lab.errors import UsageError
from gvr_lab.grid import record_grid
from gvr_lab.progress import runs_report

# 8 steps per epoch, an evaluation every 6 steps: evaluations inside epochs, every other step logged
STEPS_RUN = dict(steps=24, eval_every=6, log_every=2, loggers=["tensorboard", "csv"])
TIMES = ("interval_time_s", "epoch_time_s", "eval_time_s", "images_per_s")


def events(run_dir) -> EventAccumulator:
    accumulator = EventAccumulator(str(Path(run_dir) / "tensorboard"))
    accumulator.Reload()
    return accumulator


def drawn(accumulator: EventAccumulator, tag: str) -> tuple[list, list]:
    scalars = accumulator.Scalars(tag)
    return [e.step for e in scalars], [e.value for e in scalars]


def crash_at_evaluation(monkeypatch, n: int) -> None:
    """The loop's n-th evaluation raises KeyboardInterrupt (a killed run), after the steps before it
    were logged."""
    real, calls = training.evaluate, {"n": 0}

    def evaluate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            monkeypatch.setattr(training, "evaluate", real)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "evaluate", evaluate)


@pytest.mark.slow
def test_tensorboard_lists_every_logged_step_evaluation_and_the_configuration(tiny_config):
    run = train(tiny_config(**STEPS_RUN, val_split=64, label="the label"))
    tb = events(run.run_dir)
    steps, losses = drawn(tb, "step/loss")
    assert steps == run.steps["step"].tolist() == list(range(0, 24, 2))
    assert losses == run.steps["loss"].astype(np.float32).tolist()  # event files hold float32
    for column in ("test_acc", "val_acc", "train_loss", "lr"):
        at, values = drawn(tb, f"eval/{column}")
        assert at == run.history["step"].tolist() == [6, 12, 18, 24]
        assert values == run.history[column].astype(np.float32).tolist()
    [text] = tb.Tensors("config/text_summary")
    written = json.loads(text.tensor_proto.string_val[0].decode())  # indented: markdown's code block
    assert written == json.loads((run.run_dir / "config.json").read_text())
    session = {}
    for path in (run.run_dir / "tensorboard").iterdir():
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "_hparams_/session_start_info":
                    data = HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    session = data.session_start_info.hparams
    assert session["method"].string_value == "sgd" and session["lr"].number_value == 0.05
    assert session["label"].string_value == "the label" and "out_dir" not in session
    # the CSV holds the same scalars
    csv = loggers.read_metrics_csv(run.run_dir)
    assert csv[csv["name"] == "step/loss"]["value"].tolist() == run.steps["loss"].tolist()
    assert csv[csv["name"] == "eval/test_acc"]["step"].tolist() == [6, 12, 18, 24]


@pytest.mark.slow
def test_a_resumed_run_draws_no_step_twice(tiny_config, tmp_path, monkeypatch):
    """Killed inside its third interval (checkpoint at step 12, steps 12 to 16 already logged), then
    resumed: TensorBoard, steps.jsonl and metrics.csv hold each step once, as the uninterrupted run's."""
    whole = train(tiny_config(**STEPS_RUN, out_dir=str(tmp_path / "whole")))
    crash_at_evaluation(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(**STEPS_RUN, out_dir=str(tmp_path / "part")))
    killed = results.read_lines(tmp_path / "part" / results.STEP_LINES)
    assert [row["step"] for row in killed] == list(range(0, 18, 2))  # beyond the checkpoint's step 12
    with open(tmp_path / "part" / results.STEP_LINES, "a") as f:
        f.write('{"step": 18, "lo')  # a line the kill cut short
    resumed = train(tiny_config(**STEPS_RUN, out_dir=str(tmp_path / "part")))
    assert resumed.summary["status"] == "completed"

    a, b = events(whole.run_dir), events(resumed.run_dir)
    assert sorted(a.Tags()["scalars"]) == sorted(b.Tags()["scalars"])
    for tag in a.Tags()["scalars"]:
        if not tag.endswith(TIMES):
            assert drawn(b, tag) == drawn(a, tag), tag
    assert drawn(b, "eval/images_per_s")[0] == [6, 12, 18, 24]

    lines = [results.read_lines(run.run_dir / results.STEP_LINES) for run in (whole, resumed)]
    assert lines[1] == lines[0] == whole.steps.to_dict("records")
    csv_a, csv_b = (loggers.read_metrics_csv(run.run_dir) for run in (whole, resumed))
    kept = [~csv["name"].str.endswith(TIMES) for csv in (csv_a, csv_b)]
    pd.testing.assert_frame_equal(csv_b[kept[1]].reset_index(drop=True), csv_a[kept[0]].reset_index(drop=True))


class Probe(loggers.Logger):
    """A logger that reads the run directory each time a step is logged."""

    name, seen = "probe", []

    def start(self, run_dir, config, resumed_at):
        self.run_dir = run_dir

    def step(self, row):
        lines = results.read_lines(self.run_dir / results.STEP_LINES)
        Probe.seen.append((row["step"], [line["step"] for line in lines], (self.run_dir / results.EPOCHS).exists()))
        Probe.seen.append(runs_report(self.run_dir)[1])


@pytest.mark.slow
def test_the_step_file_and_gvr_lab_runs_follow_the_run_as_it_trains(tiny_config, monkeypatch):
    """Before the run's first evaluation, each logged step is in steps.jsonl when the next logger
    hears of it, and `gvr-lab runs` shows the run running at that step."""
    monkeypatch.setitem(loggers.LOGGERS, "probe", Probe)
    Probe.seen = []
    train(tiny_config(steps=6, eval_every=6, log_every=1, loggers=["probe"], label="watched"))
    files, lines = Probe.seen[0::2], Probe.seen[1::2]
    assert files == [(s, list(range(s + 1)), False) for s in range(6)]
    for s, line in enumerate(lines, 1):
        assert re.match(rf"watched s0 · running · step {s}/6 \({100 * s / 6:.0f}%\) · \d+ s, last write ", line), line


@pytest.mark.slow
def test_gvr_lab_runs_counts_a_running_runs_steps_logged_since_its_last_evaluation(tiny_config):
    """A running run's summary stops at its last write (10 s here); its step lines, written 30 s
    later, add those 30 s to the time shown."""
    run_dir = Path(train(tiny_config(steps=4, eval_every=4, log_every=1, label="watched")).run_dir)
    summary = json.loads((run_dir / results.SUMMARY).read_text())
    (run_dir / results.SUMMARY).write_text(json.dumps({**summary, "status": "running", "wall_time_s": 10.0}))
    os.utime(run_dir / results.SUMMARY, (1000.0, 1000.0))
    os.utime(run_dir / results.STEP_LINES, (1030.0, 1030.0))
    line = runs_report(run_dir)[1]
    assert "· running ·" in line and line.split(" · ")[-1].startswith("40 s, last write "), line


@pytest.mark.slow
def test_without_a_terminal_a_plain_line_per_evaluation_and_nothing_with_progress_off(tiny_config, capsys):
    train(tiny_config(epochs=2, progress=True))
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 2 and "\r" not in out + err and err == ""
    assert lines[0].startswith("epoch 1/2 | lr 0.0500 | train loss ") and lines[1].startswith("epoch 2/2 | ")
    train(tiny_config(steps=10, eval_every=5, progress=True, out_dir=str(Path(tiny_config().out_dir) / "steps")))
    assert [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines()] == ["step 5/10", "step 10/10"]
    train(tiny_config(epochs=2, seed=1, out_dir=str(Path(tiny_config().out_dir) / "quiet")))  # progress off
    assert capsys.readouterr() == ("", "")


@pytest.mark.slow
def test_the_time_a_run_spends_writing_is_in_its_summary(tiny_config, tmp_path):
    part = train(tiny_config(epochs=2, stop_after=1, out_dir=str(tmp_path / "run")))
    first = part.summary["write_time_s"]
    assert 0 < first < part.summary["wall_time_s"]
    resumed = train(tiny_config(epochs=2, out_dir=str(tmp_path / "run")))
    assert first < resumed.summary["write_time_s"] < resumed.summary["wall_time_s"]  # earlier calls' included


# ---------------------------------------------------------------------- the pieces, without training


def test_a_line_file_read_while_written_leaves_out_a_line_cut_short(tmp_path):
    path = tmp_path / "steps.jsonl"
    text = '{"step": 0}\n{"step": 2}\n{"step": 4, "lo'
    path.write_text(text)
    assert results.read_lines(path) == [{"step": 0}, {"step": 2}]
    assert results.last_line(path) == {"step": 2}
    assert results.last_line(path, tail=len(text) - 5) == {"step": 2}  # the tail begins inside the first line
    assert results.last_line(path, tail=4) == {"step": 2}  # a tail without a whole line: more is read
    path.write_text('{"step": 0}\n{"step": 2, oops}\n')
    with pytest.raises(UsageError, match=r"steps.jsonl is damaged \(.*\): it was edited by hand"):
        results.read_lines(path)
    log = results.LineLog(path)
    path.write_text('{"step": 0}\n{"step": 2}\n{"step": 4}\n{"step": 6, "lo')
    log.start(keep=lambda line: json.loads(line)["step"] < 4)  # a run resumed at step 4
    log.append(['{"step": 4}\n'])
    assert path.read_text() == '{"step": 0}\n{"step": 2}\n{"step": 4}\n'  # flushed at once
    log.close()


def test_loggers_are_named_checked_and_not_part_of_a_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert Config().loggers == ["tensorboard"]
    assert Config(loggers=[]).run_id() == Config(loggers=["csv", "wandb"]).run_id() == Config().run_id()
    assert Config(loggers=["csv"]).run_dir() == Config().run_dir()
    real = loggers.importlib.util.find_spec
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(UsageError, match=r"logger 'wandb' needs the wandb package, which is not installed: pip "):
        loggers.check_available(["tensorboard", "wandb"])
    loggers.check_available(["tensorboard", "csv"])
    args = ["train", "--dataset", "synthetic", "--model", "tiny_cnn", "--loggers", "csv", "wandb", "--out-dir", "x"]
    assert main(args) == 2  # before anything trains or is written
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "logger 'wandb' needs the wandb package" in err and not Path("x").exists()


def test_wandb_logs_offline_into_the_run_directory_unless_a_mode_is_set(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or FakeRun())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "grid" / "sgd-s0"
    config = {"label": "sgd", "seed": 0}
    logger = loggers.WandbLogger()
    logger.start(run_dir, config, 0)
    logger.step({"step": 0, "epoch": 0, "lr": 0.1, "loss": 2.5})
    logger.evaluation(8, {"epoch": 0, "test_acc": 0.5, "lr": 0.1})
    logger.close()
    init = calls[0][1]
    assert init["mode"] == "offline" and init["dir"] == str(run_dir) and init["resume"] == "allow"
    assert init["name"] == "sgd" and init["group"] == "grid" and init["config"] == config
    assert calls[1:] == [
        ("log", 0, {"step/lr": 0.1, "step/loss": 2.5}),
        ("log", 8, {"eval/test_acc": 0.5, "eval/lr": 0.1}),
        ("finish",),
    ]
    monkeypatch.setenv("WANDB_MODE", "online")
    loggers.WandbLogger().start(run_dir, config, 0)
    assert "mode" not in calls[-1][1] and calls[-1][1]["id"] == init["id"]  # the same W&B run: resumed


def test_logged_steps_reach_the_host_exactly_in_step_order():
    feed = training.StepFeed(torch.device("cpu"))
    third = torch.tensor(1 / 3, dtype=torch.float32)
    feed.put(0, 0, 0.1, {"loss": third, "n": 3})
    feed.put(5, 1, 0.05, {"loss": torch.tensor(2.0, dtype=torch.bfloat16), "n": 4})
    rows = feed.ready()
    assert rows == [
        {"step": 0, "epoch": 0, "lr": 0.1, "loss": float(third), "n": 3.0},
        {"step": 5, "epoch": 1, "lr": 0.05, "loss": 2.0, "n": 4.0},
    ]
    assert feed.ready(wait=True) == []


def fake_run(run_dir: Path, *, label, seed, summary, history=(), steps=(), config=None) -> None:
    """A run directory as the loop leaves it: config.json, the tables, steps.jsonl and summary.json."""
    run_dir.mkdir(parents=True)
    results.write_json(run_dir / results.CONFIG, {"label": label, "seed": seed, "method": "sgd", **(config or {})})
    if history:
        results.write_parquet(run_dir / results.EPOCHS, list(history))
    (run_dir / results.STEP_LINES).write_text("".join(json.dumps(row) + "\n" for row in steps))
    results.write_json(run_dir / results.SUMMARY, summary)


def test_gvr_lab_runs_shows_each_run_of_a_grid_started_or_not(tmp_path, capsys):
    grid = tmp_path / "grid"
    configs = [Config(label=name, seed=seed, out_dir=str(grid / f"{name}-s{seed}")) for name in "ab" for seed in (0, 1)]
    record_grid(configs[:2])
    record_grid(configs[1:])  # a second grid in the folder: its runs after the first one's
    assert [e["run_dir"] for e in results.read_json(grid / results.GRID)["runs"]] == ["a-s0", "a-s1", "b-s0", "b-s1"]
    row = {"train_loss": 0.51234, "train_acc": 0.8, "test_acc": 0.75}
    common = {"steps_per_epoch": 10, "total_steps": 30}
    fake_run(
        grid / "a-s0",
        label="a",
        seed=0,
        summary={**common, "status": "completed", "steps_completed": 30, "evaluations": 3, "wall_time_s": 75.0},
        history=[{**row, "epoch": e} for e in range(3)],
    )
    fake_run(  # its summary counts one evaluation; steps.jsonl has reached step 14
        grid / "a-s1",
        label="a",
        seed=1,
        summary={**common, "status": "running", "steps_completed": 10, "evaluations": 1, "wall_time_s": 12.0},
        history=[{**row, "epoch": 0, "val_acc": 0.7}, {**row, "epoch": 1, "val_acc": 0.9}],  # the second: not counted
        steps=[{"step": s} for s in range(0, 15, 2)],
    )
    fake_run(
        grid / "b-s0",
        label="b",
        seed=0,
        summary={**common, "status": "diverged", "steps_completed": 7, "evaluations": 0, "diverged_step": 6},
    )
    assert main(["runs", str(grid)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"4 runs under {grid}: 1 completed · 1 running · 1 diverged · 1 queued"
    assert lines[1] == "a s0 · completed · epoch 3/3 (100%) · train loss 0.512 acc 80.0% · test acc 75.0% · 75 s"
    assert lines[2].startswith("a s1 · running · epoch 1/3 (50%) · train loss 0.512 acc 80.0% · val acc 70.0% · 12 s, ")
    assert lines[2].endswith(" ago")
    assert lines[3] == "b s0 · diverged at step 6 · epoch 0/3 (23%) · 0 s"
    assert lines[4] == "b s1 · queued"


def test_a_run_in_steps_mode_reads_every_evaluation_its_summary_counts(tmp_path):
    """Steps mode evaluates more often than it completes epochs: read_run cuts the history to the
    summary's evaluations, not its epochs."""
    fake_run(
        tmp_path / "run",
        label="x",
        seed=0,
        summary={"status": "running", "steps_completed": 10, "epochs_completed": 1, "evaluations": 2},
        history=[{"step": s, "test_acc": 0.5} for s in (5, 10, 13)],  # the third written, not yet counted
    )
    assert results.read_run(tmp_path / "run").tables[results.EPOCHS]["step"].tolist() == [5, 10]


def test_gvr_lab_tensorboard_starts_tensorboard_on_the_folder(tmp_path, monkeypatch, capsys):
    started = []
    monkeypatch.setattr("gvr_lab.cli.os.execv", lambda path, argv: started.append(argv))
    main(["tensorboard", str(tmp_path), "--port", "7007", "--host", "0.0.0.0"])
    assert started == [
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path), "--port", "7007", "--host", "0.0.0.0"]
    ]
    assert "http://0.0.0.0:7007" in capsys.readouterr().out
    monkeypatch.setattr("gvr_lab.cli.importlib.util.find_spec", lambda name: None)
    assert main(["tensorboard", str(tmp_path)]) == 2
    assert "needs the tensorboard package, not installed: pip install tensorboard" in capsys.readouterr().err
