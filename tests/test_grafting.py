"""Grafting and normalized GD (gvr_lab/methods/grafting.py): step length and direction.

With momentum 0 and weight decay 0 every step must move the weights along -g_B (cos = 1, g_B the
large-batch gradient from the formula) by lr * nu_t, nu_t the chosen small-batch norm (ngd: lr).
"""

import copy
import json
import warnings
from functools import partial

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from gvr_lab import Batch, create_method, train
from gvr_lab.errors import UsageError
from gvr_lab.landscape import flat
from gvr_lab.methods import method_class

from helpers import mlp

pytestmark = pytest.mark.usefixtures("float64")

C = 4
small_mlp = partial(mlp, 10, 12, C)


def data(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 10, generator=g), torch.randint(0, C, (n,), generator=g))


def micro_gradients(model, batch, m):
    params = list(model.parameters())
    return torch.stack(
        [
            flat(torch.autograd.grad(F.cross_entropy(model(batch.x[i : i + m]), batch.y[i : i + m]), params))
            for i in range(0, len(batch.y), m)
        ]
    )


def build(name, model, lr=0.3, **hp):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0, weight_decay=0.0)
    return create_method(name, model, opt, **hp)


def step(method, batch, seed=5):
    before = flat(p.detach() for p in method.model.parameters()).clone()
    torch.manual_seed(seed)
    out = method.step(batch)
    return flat(p.detach() for p in method.model.parameters()) - before, out


def assert_along_minus(delta, g_b, length):
    cos = -(delta @ g_b) / (delta.norm() * g_b.norm())
    assert cos > 1 - 1e-12
    torch.testing.assert_close(delta.norm(), torch.as_tensor(length), rtol=1e-10, atol=0)


# ---------------------------------------------------------------------- iter_graft and ngd


def test_iter_graft_random_micro_takes_one_micro_batch_norm():
    model, batch, lr = small_mlp(), data(), 0.3
    micro = micro_gradients(model, batch, 6)
    seen = set()
    for seed in range(6):
        method = build("iter_graft", copy.deepcopy(model), lr=lr, micro_batch_size=6)
        delta, out = step(method, batch, seed)
        torch.manual_seed(seed)
        j = int(torch.randint(4, ()))
        seen.add(j)
        assert_along_minus(delta, micro.mean(0), lr * micro[j].norm())
        torch.testing.assert_close(out["graft_norm"], micro[j].norm(), rtol=1e-12, atol=0)
        torch.testing.assert_close(out["grad_norm"], micro[j].norm(), rtol=1e-12, atol=0)
        torch.testing.assert_close(out["lb_grad_norm"], micro.mean(0).norm(), rtol=1e-12, atol=0)
        torch.testing.assert_close(out["micro_grad_norm"], micro.norm(dim=1).mean(), rtol=1e-12, atol=0)
    assert len(seen) > 1


def test_iter_graft_mean_micro_takes_the_mean_norm():
    model, batch, lr = small_mlp(), data(), 0.3
    micro = micro_gradients(model, batch, 6)
    delta, out = step(
        build("iter_graft", copy.deepcopy(model), lr=lr, micro_batch_size=6, norm_source="mean_micro"), batch
    )
    assert_along_minus(delta, micro.mean(0), lr * micro.norm(dim=1).mean())
    torch.testing.assert_close(out["micro_grad_sq"], micro.norm(dim=1).square().mean(), rtol=1e-12, atol=0)


def test_ngd_step_length_is_lr():
    model, batch, lr = small_mlp(), data(), 0.3
    g_b = micro_gradients(model, batch, 8).mean(0)
    delta, out = step(build("ngd", copy.deepcopy(model), lr=lr, micro_batch_size=8), batch)
    assert_along_minus(delta, g_b, lr)
    # eps sits in the denominator: eps = ||g_B|| halves the step.
    delta, _ = step(build("ngd", copy.deepcopy(model), lr=lr, micro_batch_size=8, eps=float(g_b.norm())), batch)
    assert_along_minus(delta, g_b, lr / 2)


def test_momentum_or_weight_decay_warns():
    model = small_mlp()
    with pytest.warns(UserWarning, match="assumes momentum 0 and weight_decay 0"):
        create_method("ngd", model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build("iter_graft", model)


# ---------------------------------------------------------------------- exter_graft


def write_log(path, steps, norms=None, **columns):
    path.mkdir(parents=True, exist_ok=True)
    norms = [1.0 + 0.5 * i for i in range(len(steps))] if norms is None else norms
    pd.DataFrame({"step": steps, "grad_norm": norms, **columns}).to_parquet(path / "steps.parquet")
    return dict(zip(steps, norms))


def exter_step_length(method, batch, t, lr):
    method.load_state_dict({"step": t})
    model = copy.deepcopy(method.model)
    g_b = micro_gradients(model, batch, 8).mean(0)
    delta, out = step(method, batch)
    assert method.state_dict() == {"step": t + 1}
    cos = -(delta @ g_b) / (delta.norm() * g_b.norm())
    assert cos > 1 - 1e-12
    torch.testing.assert_close(out["graft_norm"], delta.norm() / lr, rtol=1e-10, atol=0)
    return float(delta.norm() / lr)


def test_exter_graft_lookup_is_step_aligned(tmp_path):
    table = write_log(tmp_path / "run", list(range(0, 120, 20)))
    lr, batch = 0.2, data(n=16)
    method = build("exter_graft", small_mlp(), lr=lr, micro_batch_size=8, norms_path=str(tmp_path / "run"))
    for t in (0, 1, 19, 20, 39, 45, 100, 119):
        assert exter_step_length(method, batch, t, lr) == pytest.approx(table[20 * (t // 20)], rel=1e-10)
    method.load_state_dict({"step": 120})
    before = [p.detach().clone() for p in method.model.parameters()]
    with pytest.raises(UsageError, match=r"steps.parquet has no grad_norm for step 120\b"):
        method.step(batch)
    assert all(torch.equal(a, p) for a, p in zip(before, method.model.parameters()))


def test_exter_graft_follows_our_loops_epoch_restarts(tmp_path):
    """Our loop logs steps with step % steps_per_epoch % log_every == 0: with 7 steps per epoch and
    log_every 3 that is 0, 3, 6, 7, 10, 13, 14, ...; each step reads the latest row at or before it."""
    steps = [s for s in range(21) if s % 7 % 3 == 0]
    table = write_log(tmp_path / "run", steps)
    (tmp_path / "run" / "config.json").write_text(json.dumps({"log_every": 3}))
    lr, batch = 0.2, data(n=16)
    method = build(
        "exter_graft", small_mlp(), lr=lr, micro_batch_size=8, norms_path=str(tmp_path / "run" / "steps.parquet")
    )
    for t in range(23):
        latest = max(s for s in steps if s <= t)
        assert exter_step_length(method, batch, t, lr) == pytest.approx(table[latest], rel=1e-10)
    method.load_state_dict({"step": 23})
    with pytest.raises(UsageError, match="no grad_norm for step 23"):
        method.step(batch)


def test_exter_graft_refuses_a_gap_in_the_log(tmp_path):
    write_log(tmp_path / "run", [0, 20, 40, 100, 120])  # rows 60 and 80 are missing; stride 20
    method = build("exter_graft", small_mlp(), micro_batch_size=8, norms_path=str(tmp_path / "run"))
    method.load_state_dict({"step": 59})
    method.step(data(n=16))
    with pytest.raises(UsageError, match=r"run.steps.parquet has no grad_norm for step 60\b"):
        method.step(data(n=16))


@pytest.mark.parametrize(
    "problem, needle",
    [
        ("empty", "needs norms_path"),
        ("missing", "no .*steps.parquet"),
        ("column", "lacks the column 'grad_norm'"),
        ("garbage", "not a readable parquet file"),
    ],
)
def test_exter_graft_bad_logs(tmp_path, problem, needle):
    path = tmp_path / "run"
    if problem == "column":
        path.mkdir()
        pd.DataFrame({"step": [0, 10], "loss": [1.0, 2.0]}).to_parquet(path / "steps.parquet")
    elif problem == "garbage":
        path.mkdir()
        (path / "steps.parquet").write_bytes(b"not parquet")
    with pytest.raises(UsageError, match=needle):
        build("exter_graft", small_mlp(), micro_batch_size=8, norms_path="" if problem == "empty" else str(path))


def test_hyperparameters_and_errors():
    assert method_class("IterGraft").hparams == {"micro_batch_size": 128, "norm_source": "random_micro"}
    assert method_class("EXTERGRAFT").hparams == {"micro_batch_size": 128, "norms_path": ""}
    assert method_class("ngd").hparams == {"micro_batch_size": 128, "eps": 1e-12}
    model = small_mlp()
    with pytest.raises(UsageError, match="unknown norm_source .*valid: random_micro, mean_micro"):
        build("iter_graft", model, norm_source="external")
    with pytest.raises(UsageError, match="eps for method 'ngd' must be >= 0"):
        build("ngd", model, eps=-1.0)
    with pytest.raises(UsageError, match="batch_size=20 is not a multiple of micro_batch_size=8"):
        build("ngd", model, micro_batch_size=8).step(data(n=20))
    with pytest.raises(ValueError, match="unknown hyperparameter 'lam' .*valid: micro_batch_size, norm_source$"):
        build("iter_graft", model, lam=0.1)


@pytest.mark.slow
def test_exter_graft_reads_an_sgd_runs_log(tiny_config, tmp_path):
    """End to end: an sgd run's steps.parquet sets the step lengths of an exter_graft run."""
    torch.set_default_dtype(torch.float32)
    plain = dict(momentum=0.0, weight_decay=0.0, schedule="constant", log_every=3, epochs=1)
    # SB: batches of 16, 32 steps; LB: batches of 64 in micro-batches of 16, 8 steps per epoch.
    sgd = train(tiny_config(out_dir=str(tmp_path / "sgd"), batch_size=16, **plain))
    graft_args = {"micro_batch_size": 16, "norms_path": str(sgd.run_dir)}
    graft = train(tiny_config(out_dir=str(tmp_path / "graft"), method="ExterGraft", method_args=graft_args, **plain))
    assert graft.summary["status"] == "completed"
    assert graft.steps["step"].tolist() == [0, 3, 6]  # each also logged by the sgd run
    sb = sgd.steps.set_index("step")["grad_norm"]
    torch.testing.assert_close(
        torch.tensor(graft.steps["graft_norm"].values),
        torch.tensor(sb.loc[graft.steps["step"]].values),
        rtol=1e-6,
        atol=0,
    )
    with pytest.raises(UsageError, match=r"no grad_norm for step 33\b"):  # the log's last window: 30..32
        train(
            tiny_config(
                out_dir=str(tmp_path / "longer"), method="exter_graft", method_args=graft_args, **{**plain, "epochs": 5}
            )
        )
    with pytest.raises(UsageError, match=r"holds gradient norms of batches of 16, not of micro_batch_size=32"):
        train(
            tiny_config(
                out_dir=str(tmp_path / "other_m"),
                method="exter_graft",
                method_args={**graft_args, "micro_batch_size": 32},
                **plain,
            )
        )
    summary = json.loads((sgd.run_dir / "summary.json").read_text())
    (sgd.run_dir / "summary.json").write_text(json.dumps({**summary, "world_size": 2}))
    with pytest.raises(UsageError, match=r"comes from a run on 2 data-parallel ranks; graft from a single-process"):
        train(tiny_config(out_dir=str(tmp_path / "ranks"), method="exter_graft", method_args=graft_args, **plain))
