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
def test_short_fashion_mnist_run_learns(tiny_config, tmp_path):
    run = train(tiny_config(dataset="fashion_mnist", epochs=1, train_subset=6000, augment=False, out_dir=str(tmp_path)))
    assert run.summary["status"] == "completed"
    assert run.summary["final_test_acc"] > 0.6  # chance is 0.1
    assert list(run.history.columns[:3]) == ["epoch", "lr", "epoch_time_s"]
    for f in ("config.json", "summary.json", "epochs.parquet", "steps.parquet", "checkpoint.pt"):
        assert (tmp_path / f).is_file()


@pytest.mark.slow
def test_history_and_summary_contract(tiny_config):
    run = train(tiny_config(val_split=0.1, log_every=3))
    for col in (
        "epoch",
        "train_loss",
        "train_acc",
        "test_loss",
        "test_acc",
        "val_loss",
        "val_acc",
        "lr",
        "epoch_time_s",
    ):
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


# ---------------------------------------------------------------------- steps mode and what rides on evaluations


@pytest.mark.slow
def test_steps_mode_trains_exactly_n_steps_and_evaluates_on_its_grid(tiny_config):
    run = train(tiny_config(steps=13, eval_every=5, log_every=1, schedule="cosine"))  # 8 steps per epoch
    assert run.history["step"].tolist() == [5, 10, 13]
    assert run.history["epoch"].tolist() == [0, 1, 1]
    assert run.steps["step"].tolist() == list(range(13))  # every step logged, none after the 13th
    assert run.summary["steps_completed"] == run.summary["total_steps"] == 13
    assert run.summary["dropped_per_epoch"] == 0 and run.summary["status"] == "completed"
    # cosine over the 13 steps: the last step's lr is that of t = 12/13
    assert run.steps["lr"].iloc[-1] == pytest.approx(0.5 * 0.05 * (1 + math.cos(math.pi * 12 / 13)))


@pytest.mark.slow
def test_a_run_stopped_inside_an_epoch_resumes_as_if_uninterrupted(tiny_config, tmp_path):
    """Steps mode evaluates (and checkpoints) inside an epoch: the resumed run replays the epoch's
    batches up to there and gets torch's RNG back, so dropout draws the masks it would have."""
    fields = dict(steps=21, eval_every=5, model_args={"dropout": 0.3}, cutout=0.5, log_every=1)
    whole = train(tiny_config(out_dir=str(tmp_path / "whole"), **fields))
    part = train(tiny_config(out_dir=str(tmp_path / "part"), stop_after=2, **fields))  # stops at step 10
    assert part.summary["status"] == "stopped" and part.summary["steps_completed"] == 10
    resumed = train(tiny_config(out_dir=str(tmp_path / "part"), **fields))
    pd.testing.assert_frame_equal(
        resumed.history.drop(columns=["interval_time_s", "images_per_s", "eval_time_s"]),
        whole.history.drop(columns=["interval_time_s", "images_per_s", "eval_time_s"]),
    )
    for k, v in load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["model"].items():
        assert torch.equal(load_checkpoint(tmp_path / "part" / "checkpoint.pt")["model"][k], v), k


@pytest.mark.slow
def test_the_diagnostic_micro_batch_norm_is_logged_without_changing_training(tiny_config, tmp_path):
    fields = dict(
        epochs=1,
        log_every=4,
        model_args={"dropout": 0.3, "bn": True},
        method="pseudo_gd",
        method_args={"micro_batch_size": 32},
    )
    plain = train(tiny_config(out_dir=str(tmp_path / "plain"), **fields))
    diag = train(tiny_config(out_dir=str(tmp_path / "diag"), diag_micro_batch=16, **fields))
    for k, v in load_checkpoint(tmp_path / "plain" / "checkpoint.pt")["model"].items():
        assert torch.equal(load_checkpoint(tmp_path / "diag" / "checkpoint.pt")["model"][k], v), k
    assert "diag_micro_grad_norm" not in plain.steps and diag.steps["diag_micro_grad_norm"].notna().all()
    # the first logged step by hand: the initial weights on the first batch, micro-batches of 16
    config = tiny_config(out_dir=str(tmp_path / "x"), diag_micro_batch=16, **fields)
    parts = training.build(config, training.DeviceSettings.of(config, torch.device("cpu")), gvr_lab.distributed.World())
    loader, model = parts.train_loader, parts.model
    training.seed_epoch(config.seed, 0)
    first = next(loader.epoch(0))
    for module in model.modules():  # frozen statistics: batch norm normalizes by each micro-batch's
        if isinstance(module, torch.nn.BatchNorm2d):
            module.track_running_stats = False
    norms = [
        torch.linalg.vector_norm(
            torch.cat(
                [
                    g.flatten()
                    for g in torch.autograd.grad(
                        torch.nn.functional.cross_entropy(model(x), y), list(model.parameters())
                    )
                ]
            )
        )
        for x, y in zip(first.x.split(16), first.y.split(16))
    ]
    assert diag.steps["diag_micro_grad_norm"].iloc[0] == pytest.approx(float(torch.stack(norms).mean()), rel=1e-5)
    with pytest.raises(UsageError, match="diag_micro_batch=128 exceeds batch_size=64"):
        tiny_config(diag_micro_batch=128)


@pytest.mark.slow
def test_curvature_every_and_kept_checkpoints(tiny_config, tmp_path):
    run = train(tiny_config(epochs=3, curvature_every=2, keep_checkpoints=[2]))
    assert run.history["hessian_top"].isna().tolist() == [True, False, True]
    kept = load_checkpoint(run.run_dir / "checkpoint-2.pt")
    assert kept["epoch"] == 2 and not (run.run_dir / "checkpoint-1.pt").exists()
    model = gvr_lab.create_model("tiny_cnn")
    model.load_state_dict(kept["model"])
    batches = training.evaluation_batches(run.config, training.CURVATURE_ROWS, torch.device("cpu"))
    measured = gvr_lab.curvature(model, batches, k=1, trace_samples=training.CURVATURE_PROBES)
    assert run.history["hessian_top"].iloc[1] == pytest.approx(measured["top_eigenvalues"][0], rel=1e-5)
    assert run.history["hessian_trace"].iloc[1] == pytest.approx(measured["trace"], rel=1e-5)
    with pytest.raises(UsageError, match="keep_checkpoints must list evaluation numbers as integers >= 1"):
        tiny_config(keep_checkpoints=[0])


def test_a_run_made_before_a_config_field_existed_is_still_this_run(tmp_path):
    config = Config(out_dir=str(tmp_path / "run"), epochs=1)
    (tmp_path / "run").mkdir()
    older = {k: v for k, v in config.identity().items() if k not in ("curvature_every", "keep_checkpoints")}
    (tmp_path / "run" / "config.json").write_text(json.dumps(older))
    assert training.check_run_dir(tmp_path / "run", config) == older  # absent there = its default
    with pytest.raises(UsageError, match=r"holds a different run \(curvature_every: absent, from before the field"):
        training.check_run_dir(tmp_path / "run", Config(out_dir=str(tmp_path / "run"), epochs=1, curvature_every=2))


def test_a_run_made_before_threads_and_channels_last_existed_is_another_run(tmp_path):
    """It ran with other thread counts and memory layouts than their defaults: retrained, never reused."""
    config = Config(out_dir=str(tmp_path / "run"), epochs=1)
    (tmp_path / "run").mkdir()
    for absent in ("threads", "channels_last"):
        older = {k: v for k, v in config.identity().items() if k != absent}
        (tmp_path / "run" / "config.json").write_text(json.dumps(older))
        with pytest.raises(UsageError, match=rf"holds a different run \({absent}: absent, from before the field"):
            training.check_run_dir(tmp_path / "run", config)
    assert config.identity()["threads"] == 1 and config.identity()["channels_last"] == "auto"


@pytest.mark.slow
def test_eval_every_in_epochs_mode_evaluates_every_n_epochs_and_the_last(tiny_config):
    run = train(tiny_config(epochs=5, eval_every=2))
    assert run.history["epoch"].tolist() == [1, 3, 4]
    assert run.history["interval_time_s"].sum() == pytest.approx(
        (run.history["epoch_time_s"] * [2, 2, 1]).sum(), rel=1e-9
    )
    assert run.summary["evaluations"] == 3 and run.summary["epochs_completed"] == 5
    whole = train(tiny_config(epochs=5, out_dir=str(pathlib.Path(run.run_dir).parent / "every")))
    final = ["train_loss", "test_acc", "test_loss"]
    assert run.history[final].iloc[-1].tolist() == whole.history[final].iloc[-1].tolist()


@pytest.mark.slow
def test_eval_train_evaluates_the_training_rows_as_the_test_set(tiny_config):
    """train_eval_acc is the accuracy on exactly the training rows, evaluated like the test set."""
    from gvr_lab.data import DeviceLoader, dataset_info, load_dataset, split_indices

    run = train(tiny_config(epochs=1, eval_train=True, augment=False))
    config = run.config
    train_split, _ = load_dataset("synthetic")
    rows, _ = split_indices(len(train_split.labels), config.train_subset, config.val_split, config.seed)
    model = gvr_lab.create_model("tiny_cnn", num_classes=10, in_channels=3).to(memory_format=torch.channels_last)
    model.load_state_dict(load_checkpoint(run.run_dir / "checkpoint.pt")["model"])
    model.eval()
    info = dataset_info("synthetic")
    loader = DeviceLoader(
        train_split, info, batch_size=64, indices=rows, device="cpu", shuffle=False, drop_last=False, channels_last=True
    )
    with torch.no_grad():
        correct = sum(int((model(b.x).argmax(1) == b.y).sum()) for b in loader.epoch(0))
    assert run.history["train_eval_acc"].iloc[-1] == pytest.approx(correct / len(rows), abs=1e-12)
