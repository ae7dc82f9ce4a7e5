import json
import math
import pathlib

import pandas as pd
import pytest
import torch

import gvr_lab
from gvr_lab import Config, load_runs, train, training
from gvr_lab.errors import UsageError
from gvr_lab.results import load_checkpoint


@pytest.mark.slow
def test_short_fashion_mnist_run_learns(tmp_path):
    run = train(Config(dataset="fashion_mnist", model="tiny_cnn", epochs=1, batch_size=64, lr=0.05,
                       train_subset=6000, augment=False, device="cpu", progress=False, out_dir=str(tmp_path)))
    assert run.summary["status"] == "completed"
    assert run.summary["final_test_acc"] > 0.6  # chance is 0.1
    assert list(run.history.columns[:3]) == ["epoch", "lr", "epoch_time_s"]
    for f in ("config.json", "summary.json", "epochs.parquet", "steps.parquet", "checkpoint.pt"):
        assert (tmp_path / f).is_file()


@pytest.mark.slow
def test_history_and_summary_contract(tiny_config):
    run = train(tiny_config(val_split=0.1, log_every=3))
    for col in ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "val_loss", "val_acc", "lr",
                "epoch_time_s"):
        assert col in run.history.columns
    assert len(run.history) == 2 and run.history["test_acc"].between(0, 1).all()
    for key in ("final_test_acc", "best_test_acc", "wall_time_s", "status"):
        assert key in run.summary
    steps_per_epoch = run.summary["steps_per_epoch"]
    assert run.steps["step"].tolist() == [s for s in range(2 * steps_per_epoch) if s % steps_per_epoch % 3 == 0]
    assert {"loss", "acc", "lr"} <= set(run.steps.columns)


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted(tiny_config, tmp_path, monkeypatch):
    whole = train(tiny_config(epochs=3, out_dir=str(tmp_path / "whole"), cutout=0.5))

    calls = {"n": 0}
    real_evaluate = training.evaluate

    def crash_in_second_epoch(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kw)

    monkeypatch.setattr(training, "evaluate", crash_in_second_epoch)
    cfg = tiny_config(epochs=3, out_dir=str(tmp_path / "resumed"), cutout=0.5)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert json.loads((tmp_path / "resumed" / "summary.json").read_text())["epochs_completed"] == 1
    monkeypatch.setattr(training, "evaluate", real_evaluate)
    resumed = train(cfg)

    cols = ["train_loss", "train_acc", "test_loss", "test_acc", "lr"]
    pd.testing.assert_frame_equal(resumed.history[cols], whole.history[cols])
    a = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_finished_run_is_not_retrained(tiny_config, monkeypatch):
    first = train(tiny_config(epochs=1))
    monkeypatch.setattr(training, "build", lambda *a, **k: pytest.fail("a finished run was rebuilt"))
    again = train(tiny_config(epochs=1, progress=True))  # progress does not change the run's identity
    assert again.summary == first.summary


@pytest.mark.slow
def test_run_directory_of_another_config_is_refused(tiny_config):
    train(tiny_config(epochs=1))
    with pytest.raises(UsageError, match="holds a different run .*lr"):
        train(tiny_config(epochs=1, lr=0.2))


def test_schedules():
    def lrs(**kw):
        cfg = Config(lr=1.0, epochs=4, **kw)
        return [training.lr_at(cfg, e, i, 10) for e in range(4) for i in range(10)]

    assert lrs(schedule="constant") == [1.0] * 40
    cos = lrs(schedule="cosine")
    assert cos[0] == 1.0 and all(a > b for a, b in zip(cos, cos[1:])) and cos[-1] < 0.01
    assert cos[20] == pytest.approx(0.5)
    per_epoch = lrs(schedule="cosine_epoch")
    assert per_epoch[:10] == [1.0] * 10 and per_epoch[10] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lrs(schedule="multistep")[::10] == pytest.approx([1.0, 1.0, 0.1, 0.01])
    assert lrs(schedule="multistep", milestones=[1], lr_gamma=0.5)[::10] == [1.0, 0.5, 0.5, 0.5]


def test_method_aliases_resolve_case_insensitively():
    assert Config(method="Vanilla").method == "sgd"


@pytest.mark.slow
def test_load_runs_tidy_table(tiny_config, tmp_path):
    train(tiny_config(epochs=2, out_dir=str(tmp_path / "runs" / "a")))
    train(tiny_config(epochs=1, seed=1, out_dir=str(tmp_path / "runs" / "b")))
    df = load_runs(str(tmp_path / "runs" / "*"))
    assert len(df) == 3 and set(df["seed"]) == {0, 1}
    assert {"method", "model", "test_acc", "run_dir", "status"} <= set(df.columns)
    assert len(gvr_lab.load_runs(tmp_path / "runs")) == 3
    assert len(load_runs(str(tmp_path / "runs" / "*"), steps=True)) > 0


def test_pickled_checkpoint_is_refused(tmp_path):
    import collections

    # any importable class stands in for a malicious payload: weights_only must refuse it
    torch.save({"model": collections.Counter(a=1), "path": pathlib.Path("/")}, tmp_path / "evil.pt")
    with pytest.raises(UsageError, match="refusing to load checkpoint .*evil.pt"):
        load_checkpoint(tmp_path / "evil.pt")
