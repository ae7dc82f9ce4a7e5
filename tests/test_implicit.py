"""Novack et al.'s large-batch methods (gvr_lab/methods/implicit.py) against the formulas.

Every update is compared with a reference written here from the formula with plain autograd:
(1/k) sum_i grad[L_i + lam R_i], R_i = ||grad s_i||^2. Float64, small BN-free nets unless BN or
dropout is the point. The finite-difference tests use smooth nets (tanh): on ReLU/max-pool nets a
step of fd_eps = 1e-3 crosses activation kinks, so fd measures a smoothed curvature that differs
from the double-backward Hessian (see the module docstring); the kinked case is checked at a
step small enough to cross none.
"""

import copy
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gvr_lab import Batch, Config, create_method, create_model
from gvr_lab.errors import UsageError
from gvr_lab.landscape import flat
from gvr_lab.methods import method_class
from gvr_lab.methods.implicit import UnitJacLoss

from helpers import mlp

pytestmark = pytest.mark.usefixtures("float64")

PENALTIES = ["reg_loss", "fish_loss", "avg_jac_loss", "unit_jac_loss"]
C = 5
small_mlp = partial(mlp, 12, 16, 16, C)


def data(n=24, d=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, d, generator=g), torch.randint(0, C, (n,), generator=g))


def run(name, model, batch, lr=0.5, seed=7, diagnose=True, momentum=0.0, weight_decay=0.0, **hp):
    """One step of a method on a copy of `model`: (gradient the weights moved along, metrics, copy)."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    method = create_method(name, model, opt, **hp)
    method.diagnose = diagnose
    before = flat(p.detach() for p in model.parameters()).clone()
    torch.manual_seed(seed)
    out = method.step(batch)
    return (before - flat(p.detach() for p in model.parameters())) / lr, out, model


# ---------------------------------------------------------------------- references from the formula


def source_fn(name):
    """s_i(logits, y) with the draws in the same order as the method (after the forward)."""
    if name == "reg_loss":
        return lambda logits, y: F.cross_entropy(logits, y)
    if name == "fish_loss":
        return lambda logits, y: F.cross_entropy(
            logits, torch.multinomial(torch.softmax(logits.detach(), 1), 1).squeeze(1)
        )
    if name == "avg_jac_loss":
        return lambda logits, y: logits.sum(1).mean()

    def unit_jac(logits, y):
        z = torch.randn(logits.shape[1])
        return logits.mean(0) @ (z / z.norm())

    return unit_jac


def reference(model, batch, m, lam=0.0, source=None, seed=7):
    """(update gradient, mean R_i, mean ||grad L_i||, mean ||grad L_i||^2), each from the formula."""
    model = copy.deepcopy(model)
    params = list(model.parameters())
    torch.manual_seed(seed)
    k = batch.y.shape[0] // m
    total, pens, norms = 0, [], []
    for i in range(k):
        x, y = batch.x[i * m : (i + 1) * m], batch.y[i * m : (i + 1) * m]
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        norms.append(flat(torch.autograd.grad(loss, params, retain_graph=True)).norm())
        objective = loss
        if source is not None:
            g_src = torch.autograd.grad(source(logits, y), params, create_graph=True)
            penalty = sum((g * g).sum() for g in g_src)
            pens.append(penalty.detach())
            objective = loss + lam * penalty
        total = total + flat(torch.autograd.grad(objective, params)) / k
    norms = torch.stack(norms)
    return total, torch.stack(pens).mean() if pens else None, norms.mean(), norms.square().mean()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------- pseudo_gd


def test_pseudo_gd_is_one_step_on_the_whole_batch_without_bn():
    torch.manual_seed(0)
    model = create_model("tiny_cnn", num_classes=C, in_channels=1).double()
    g = torch.Generator().manual_seed(2)
    batch = Batch(torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, C, (32,), generator=g))
    update, out, _ = run("pseudo_gd", model, batch, micro_batch_size=8)
    params = list(model.parameters())
    full_loss = F.cross_entropy(model(batch.x), batch.y)
    full = flat(torch.autograd.grad(full_loss, params))
    torch.testing.assert_close(update, full, rtol=1e-9, atol=1e-12)
    _, _, norm, sq = reference(model, batch, 8)
    torch.testing.assert_close(out["loss"], full_loss.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(out["grad_norm"], full.norm(), rtol=1e-9, atol=0)
    torch.testing.assert_close(out["micro_grad_norm"], norm, rtol=1e-9, atol=0)
    torch.testing.assert_close(out["micro_grad_sq"], sq, rtol=1e-9, atol=0)
    assert out["micro_grad_norm"] > 1.05 * out["grad_norm"]  # micro-batch gradients are noisier


def test_pseudo_gd_with_one_micro_batch_is_sgd():
    model, batch = small_mlp(), data(n=8)
    kw = dict(momentum=0.9, weight_decay=1e-3)
    _, _, a = run("pseudo_gd", model, batch, micro_batch_size=8, **kw)
    _, _, b = run("sgd", model, batch, **kw)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-15)


def test_pseudo_gd_with_bn_is_ghost_bn():
    """Each micro-batch is normalized with its own statistics: the update is the mean of separate
    per-micro-batch steps, not the full-batch step, and running stats advance once per micro-batch."""
    model, batch, m = small_mlp(bn=True), data(n=24), 6
    update, _, moved = run("pseudo_gd", model, batch, micro_batch_size=m)
    ghost = copy.deepcopy(model)
    per_micro = [
        flat(
            torch.autograd.grad(
                F.cross_entropy(ghost(batch.x[i : i + m]), batch.y[i : i + m]), list(ghost.parameters())
            )
        )
        for i in range(0, 24, m)
    ]
    torch.testing.assert_close(update, torch.stack(per_micro).mean(0), rtol=1e-10, atol=1e-13)
    whole = copy.deepcopy(model)
    full = flat(torch.autograd.grad(F.cross_entropy(whole(batch.x), batch.y), list(whole.parameters())))
    assert rel(update, full) > 1e-2
    bn, ghost_bn = moved[1], ghost[1]
    torch.testing.assert_close(bn.running_mean, ghost_bn.running_mean, rtol=1e-12, atol=0)
    assert bn.num_batches_tracked.item() == 4


# ---------------------------------------------------------------------- penalties, exact


@pytest.mark.parametrize("name", PENALTIES)
def test_exact_penalty_update_matches_formula(name):
    model, batch, lam = small_mlp(), data(n=24), 0.3
    update, out, _ = run(name, model, batch, micro_batch_size=8, lam=lam, hvp="exact")
    expected, penalty, norm, sq = reference(model, batch, 8, lam, source_fn(name))
    torch.testing.assert_close(update, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out["penalty"], penalty, rtol=1e-10, atol=0)
    torch.testing.assert_close(out["grad_norm"], expected.norm(), rtol=1e-9, atol=0)
    torch.testing.assert_close(out["micro_grad_norm"], norm, rtol=1e-10, atol=0)
    torch.testing.assert_close(out["micro_grad_sq"], sq, rtol=1e-10, atol=0)
    plain, *_ = reference(model, batch, 8)
    assert rel(update, plain) > 1e-2  # the penalty moved the update


def test_reg_and_fish_loss_on_softmax_regression_closed_form():
    """Linear model z = W x: the CE Hessian is H G = (1/m) sum_x (diag p - p p^T) G x x^T for any
    label, so GN adds 2 lam H g and FT adds 2 lam H g_FT, g_FT from the sampled labels."""
    torch.manual_seed(3)
    model = nn.Linear(6, C, bias=False)
    batch, lam, m = data(n=10, d=6), 0.7, 10
    x, y = batch.x, batch.y
    p = torch.softmax(x @ model.weight.T, 1)

    def gradient(labels):
        return (p - F.one_hot(labels, C)).T @ x / m

    def hessian_times(G):
        s = x @ G.T  # (m, C): G x
        return ((p * s - p * (p * s).sum(1, keepdim=True)).T @ x) / m

    g = gradient(y)
    update, out, _ = run("reg_loss", model, batch, micro_batch_size=m, lam=lam)
    torch.testing.assert_close(update, flat([g + 2 * lam * hessian_times(g)]), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(out["penalty"], g.square().sum(), rtol=1e-12, atol=0)

    torch.manual_seed(7)
    sampled = torch.multinomial(p, 1).squeeze(1)
    assert not torch.equal(sampled, y)
    g_ft = gradient(sampled)
    update, out, _ = run("fish_loss", model, batch, micro_batch_size=m, lam=lam, seed=7)
    torch.testing.assert_close(update, flat([g + 2 * lam * hessian_times(g_ft)]), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(out["penalty"], g_ft.square().sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("hvp", ["exact", "fd"])
def test_reg_loss_with_lam_zero_is_pseudo_gd_exactly(hvp):
    model, batch = small_mlp(bn=True), data(n=24)
    _, _, a = run("reg_loss", model, batch, micro_batch_size=8, lam=0.0, hvp=hvp)
    _, _, b = run("pseudo_gd", model, batch, micro_batch_size=8)
    for s, t in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(s, t)


@pytest.mark.parametrize("name", ["pseudo_gd", "reg_loss"])
@pytest.mark.parametrize("hvp", ["exact", "fd"])
def test_micro_batches_are_averaged_not_summed(name, hvp):
    """Doubling k with duplicated micro-batches leaves the step unchanged (pitfall 13)."""
    model, batch = small_mlp(), data(n=16)
    doubled = Batch(torch.cat([batch.x, batch.x]), torch.cat([batch.y, batch.y]))
    hp = {} if name == "pseudo_gd" else {"lam": 0.3, "hvp": hvp}
    once, *_ = run(name, model, batch, micro_batch_size=8, **hp)
    twice, *_ = run(name, model, doubled, micro_batch_size=8, **hp)
    torch.testing.assert_close(twice, once, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------- penalties, finite differences


@pytest.mark.parametrize("name", PENALTIES)
def test_fd_agrees_with_exact(name):
    """Relative error of the penalty's share of the update (update - pseudo_gd update), measured
    <= 4e-4 at the default fd_eps = 1e-3 in float64 (truncation) and in float32, <= 4e-7 at 1e-6."""
    model, batch, lam = small_mlp(), data(n=24), 0.3
    plain, *_ = run("pseudo_gd", model, batch, micro_batch_size=8)
    exact, out_exact, _ = run(name, model, batch, micro_batch_size=8, lam=lam, hvp="exact")
    fd, out_fd, _ = run(name, model, batch, micro_batch_size=8, lam=lam, hvp="fd")
    assert rel(fd - plain, exact - plain) < 1e-3
    torch.testing.assert_close(out_fd["penalty"], out_exact["penalty"], rtol=1e-12, atol=0)
    torch.testing.assert_close(out_fd["micro_grad_norm"], out_exact["micro_grad_norm"], rtol=1e-12, atol=0)
    fine, *_ = run(name, model, batch, micro_batch_size=8, lam=lam, hvp="fd", fd_eps=1e-6)
    assert rel(fine - plain, exact - plain) < 1e-5

    torch.set_default_dtype(torch.float32)
    model32, batch32 = copy.deepcopy(model).float(), Batch(batch.x.float(), batch.y)
    plain32, *_ = run("pseudo_gd", model32, batch32, micro_batch_size=8)
    fd32, *_ = run(name, model32, batch32, micro_batch_size=8, lam=lam, hvp="fd")
    assert rel((fd32 - plain32).double(), exact - plain) < 1e-3


def test_fd_on_relu_net_agrees_with_exact_below_the_kink_scale():
    torch.manual_seed(0)
    model = create_model("tiny_cnn", num_classes=C, in_channels=1).double()
    g = torch.Generator().manual_seed(2)
    batch = Batch(torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, C, (16,), generator=g))
    plain, *_ = run("pseudo_gd", model, batch, micro_batch_size=8)
    exact, *_ = run("reg_loss", model, batch, micro_batch_size=8, lam=0.3)
    fd, *_ = run("reg_loss", model, batch, micro_batch_size=8, lam=0.3, hvp="fd", fd_eps=1e-7)
    assert rel(fd - plain, exact - plain) < 1e-4


@pytest.mark.parametrize("name", ["reg_loss", "unit_jac_loss"])
def test_fd_replays_dropout_and_freezes_bn(name):
    """Same dropout mask in the moved pass (torch's RNG replayed, and left where exact leaves it),
    BN normalizing with batch statistics there but its running statistics advancing only k times."""
    model, batch, lam = small_mlp(bn=True, dropout=0.3), data(n=24), 0.3
    exact, _, moved_exact = run(name, model, batch, micro_batch_size=8, lam=lam)
    rng_after_exact = torch.get_rng_state()
    fd, _, moved_fd = run(name, model, batch, micro_batch_size=8, lam=lam, hvp="fd", fd_eps=1e-5)
    assert torch.equal(torch.get_rng_state(), rng_after_exact)
    plain, _, moved_plain = run("pseudo_gd", model, batch, micro_batch_size=8)
    assert rel(fd - plain, exact - plain) < 1e-4
    for moved in (moved_exact, moved_fd):
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(moved[1].state_dict()[key], moved_plain[1].state_dict()[key], rtol=1e-12, atol=0)


# ---------------------------------------------------------------------- what the penalties estimate


def lr_zero(name, model, **hp):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    return create_method(name, model, opt, **hp)


def test_fish_penalty_is_fisher_trace_over_m_in_expectation():
    """E R_FT = (1/m) * mean_x tr F(x), tr F(x) = sum_c p_c ||grad log p_c(x)||^2 (pitfall 16)."""
    model, batch, m = mlp(12, 8, 8, C), data(n=32), 4
    params = list(model.parameters())
    traces = []
    for x in batch.x:
        log_p = torch.log_softmax(model(x[None]), 1)[0]
        traces.append(
            sum(
                log_p[c].exp().detach() * flat(torch.autograd.grad(log_p[c], params, retain_graph=True)).square().sum()
                for c in range(C)
            )
        )
    expected = torch.stack(traces).mean() / m
    method = lr_zero("fish_loss", model, micro_batch_size=m, lam=0.1)
    torch.manual_seed(11)
    samples = torch.stack([method.step(batch)["penalty"] for _ in range(60)])  # each a mean of 8 draws
    mean, se = samples.mean(), samples.std() / len(samples) ** 0.5
    assert abs(mean - expected) < 4 * se and se < 0.03 * expected
    # GN with the true labels estimates something else entirely.
    true_labels = lr_zero("reg_loss", model, micro_batch_size=m).step(batch)["penalty"]
    assert abs(true_labels - expected) > 10 * se


def test_unit_jac_penalty_is_jacobian_frobenius_over_c_in_expectation():
    """E_u R_UJ = ||Jbar||_F^2 / C, Jbar the micro-batch mean Jacobian of the logits w.r.t. the
    parameters (C x P, pitfall 17)."""
    model, batch, m = mlp(12, 8, 8, C), data(n=16), 8
    params = list(model.parameters())
    frob = []
    for i in range(0, 16, m):
        mean_logits = model(batch.x[i : i + m]).mean(0)
        frob.append(
            sum(flat(torch.autograd.grad(mean_logits[c], params, retain_graph=True)).square().sum() for c in range(C))
        )
    expected = torch.stack(frob).mean() / C
    method = lr_zero("unit_jac_loss", model, micro_batch_size=m, lam=0.1)
    torch.manual_seed(12)
    samples = torch.stack([method.step(batch)["penalty"] for _ in range(60)])
    mean, se = samples.mean(), samples.std() / len(samples) ** 0.5
    assert abs(mean - expected) < 4 * se and se < 0.03 * expected


def test_avg_jac_is_c_times_unit_jac_at_the_uniform_direction(monkeypatch):
    monkeypatch.setattr(UnitJacLoss, "draw", lambda self, logits: torch.full((C,), C**-0.5))
    model, batch, lam = small_mlp(), data(n=24), 0.2
    aj, out_aj, _ = run("avg_jac_loss", model, batch, micro_batch_size=8, lam=lam)
    uj, out_uj, _ = run("unit_jac_loss", model, batch, micro_batch_size=8, lam=lam * C)
    torch.testing.assert_close(out_aj["penalty"], C * out_uj["penalty"], rtol=1e-12, atol=0)
    torch.testing.assert_close(aj, uj, rtol=1e-10, atol=1e-13)


def test_fresh_draws_per_micro_batch_and_per_step():
    model, batch = small_mlp(), data(n=24)
    method = lr_zero("fish_loss", model, micro_batch_size=8, lam=0.1)
    draws = []
    real_draw = method.draw
    method.draw = lambda logits: draws.append(real_draw(logits)) or draws[-1]
    method.step(batch)
    method.step(batch)
    assert len(draws) == 6
    assert len({tuple(d.tolist()) for d in draws}) > 3  # 8 labels out of 5 classes: repeats are rare


# ---------------------------------------------------------------------- diagnostics, settings, errors


@pytest.mark.parametrize("name", ["fish_loss", "avg_jac_loss", "unit_jac_loss"])
def test_gradient_norms_only_when_diagnosing(name):
    """Norms are logged every log_every steps, so they are computed only on those (the loop sets
    `diagnose`); the update does not depend on it."""
    model, batch = small_mlp(), data(n=24)
    for hvp in ("exact", "fd"):
        with_diag, out, _ = run(name, model, batch, micro_batch_size=8, lam=0.3, hvp=hvp, diagnose=True)
        without, quiet, _ = run(name, model, batch, micro_batch_size=8, lam=0.3, hvp=hvp, diagnose=False)
        assert {"micro_grad_norm", "micro_grad_sq", "grad_norm"} <= set(out)
        assert set(quiet) == {"loss", "acc", "penalty"}
        torch.testing.assert_close(without, with_diag, rtol=0, atol=0)


def test_hyperparameters_defaults_and_compilable():
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for name in PENALTIES:
        cls = method_class(name)
        assert cls.hparams == {"lam": 0.01, "micro_batch_size": 128, "hvp": "exact", "fd_eps": 1e-3}
        assert not create_method(name, model, opt).compilable
        assert create_method(name, model, opt, hvp="fd").compilable
    assert method_class("pseudo_gd").hparams == {"micro_batch_size": 128}
    for alias, name in [
        ("PseudoGD", "pseudo_gd"),
        ("regloss", "reg_loss"),
        ("FISHLOSS", "fish_loss"),
        ("AvgJacLoss", "avg_jac_loss"),
        ("unitjacloss", "unit_jac_loss"),
    ]:
        assert method_class(alias).name == name


@pytest.mark.parametrize(
    "hp, needle",
    [
        ({"lam": -0.1}, "lam .* must be >= 0"),
        ({"micro_batch_size": 0}, "micro_batch_size .* must be >= 1"),
        ({"fd_eps": 0.0}, "fd_eps .* must be > 0"),
        ({"hvp": "double"}, "unknown hvp .*valid: exact, fd"),
        ({"lam": "big"}, "must be float"),
    ],
)
def test_bad_hyperparameters(hp, needle):
    model = small_mlp()
    with pytest.raises(UsageError, match=needle):
        create_method("reg_loss", model, torch.optim.SGD(model.parameters(), lr=0.1), **hp)


def test_unknown_hyperparameter_lists_valid_ones():
    model = small_mlp()
    with pytest.raises(ValueError, match="unknown hyperparameter 'lamda' .* valid: lam, micro_batch_size, hvp, fd_eps"):
        create_method("fish_loss", model, torch.optim.SGD(model.parameters(), lr=0.1), lamda=0.1)


def test_batch_size_must_be_a_multiple_of_the_micro_batch():
    with pytest.raises(UsageError, match="batch_size=100 is not a multiple of micro_batch_size=32"):
        Config(
            dataset="synthetic",
            model="tiny_cnn",
            method="RegLoss",
            batch_size=100,
            method_args={"micro_batch_size": 32},
        )
    model = small_mlp()
    method = create_method("pseudo_gd", model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=8)
    with pytest.raises(UsageError, match="batch_size=20 is not a multiple of micro_batch_size=8"):
        method.step(data(n=20))


@pytest.mark.slow
def test_training_run_logs_the_diagnostics(tiny_config):
    from gvr_lab import train
    from gvr_lab.distributed import World
    from gvr_lab.training import DeviceSettings, build, seed_epoch

    torch.set_default_dtype(torch.float32)
    config = tiny_config(
        method="reg_loss",
        method_args={"micro_batch_size": 16, "hvp": "fd", "lam": 0.01},
        momentum=0.0,
        weight_decay=0.0,
        schedule="constant",
        log_every=3,
    )
    run_ = train(config)
    assert run_.summary["status"] == "completed"
    for col in ("loss", "penalty", "grad_norm", "micro_grad_norm", "micro_grad_sq"):
        assert run_.steps[col].notna().all() and (run_.steps[col] >= 0).all(), col
    # The first logged row, by hand: the run's initial weights on its first batch, micro-batch by micro-batch.
    parts = build(config, DeviceSettings.of(config, torch.device("cpu")), World())
    loader, model = parts.train_loader, parts.model
    seed_epoch(config.seed, 0)
    first = next(loader.epoch(0))
    norms = torch.stack(
        [
            flat(torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))).norm()
            for x, y in zip(first.x.split(16), first.y.split(16))
        ]
    )
    row = run_.steps.iloc[0]
    assert row["step"] == 0
    assert row["micro_grad_norm"] == pytest.approx(float(norms.mean()), rel=1e-5)
    assert row["micro_grad_sq"] == pytest.approx(float(norms.square().mean()), rel=1e-5)
    assert row["penalty"] == pytest.approx(float(norms.square().mean()), rel=1e-5)  # GN's R_i = ||grad L_i||^2
