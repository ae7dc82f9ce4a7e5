"""What a grid shows while its runs train in parallel (progress.GridStatus), from run directories."""

import json

from gvr_lab import Config
from gvr_lab.progress import GridStatus, run_length


def summary(config, **fields):
    config.run_dir().mkdir(parents=True, exist_ok=True)
    (config.run_dir() / "summary.json").write_text(json.dumps(fields))


def test_grid_status_reads_runs_and_estimates_the_time_left(tmp_path, monkeypatch, capsys):
    clock = {"now": 100.0}
    monkeypatch.setattr("gvr_lab.progress.time.monotonic", lambda: clock["now"])
    configs = [Config(label=f"r{i}", epochs=4, out_dir=str(tmp_path / f"r{i}")) for i in range(3)]
    summary(configs[0], status="completed", epochs_completed=4)  # finished before: costs and counts nothing
    summary(configs[1], status="stopped", epochs_completed=2)  # half done before: resumes
    status = GridStatus(configs, "a local Ray instance")
    status.submitted()
    assert "0 done · 0 running · 3 queued · 0 failed · time left: estimating" in capsys.readouterr().out

    clock["now"] = 160.0  # a minute later run 1 has done one more epoch
    summary(configs[1], status="running", epochs_completed=3)
    status.finished(0, {"status": "completed", "epochs_completed": 4, "final_test_acc": 0.8, "wall_time_s": 3})
    status.poll()
    # left: run 1's last quarter and all of run 2 = 1.25 runs, at 0.25 run per 60 s
    assert status.counts() == {"done": 1, "running": 1, "queued": 1, "failed": 0}
    assert status.time_left() == 300.0
    assert "about 5 min left" in status.header()
    lines = status.lines()
    assert lines[1] == "[1/3] r0 s0 · completed: 4 epochs · test acc 80.0% · 3 s"
    assert lines[2] == "[2/3] r1 s0 · running, 75% done" and lines[3] == "[3/3] r2 s0 · queued"

    status.failed(2, RuntimeError("Traceback ...\nValueError: bad checkpoint"))
    assert status.lines()[3] == "[3/3] r2 s0 · failed: ValueError: bad checkpoint"
    assert "[3/3] r2 s0 · failed: ValueError: bad checkpoint" in capsys.readouterr().out


def test_run_length_counts_steps_in_steps_mode():
    assert run_length({"epochs_completed": 1}, Config()) == "1 epoch"
    assert run_length({"steps_completed": 800, "epochs_completed": 4}, Config(steps=800)) == "800 steps"
