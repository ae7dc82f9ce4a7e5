"""Curvature instruments against dense float64 references on small models."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from gvr_lab.landscape import (Objective, augmentation_variance, curvature, eigen_density, filter_normalized_direction,
                               flat, gradient_noise, hutchinson_trace, interpolate, loss_slice, psf_bound_check,
                               top_eigenvalues)
from gvr_lab.errors import UsageError
from gvr_lab.models import create_model


@pytest.fixture(autouse=True)
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))


def tiny_cnn():
    torch.manual_seed(0)
    return create_model("tiny_cnn", num_classes=3, in_channels=1, smooth=True).double()


def small_cnn():
    """A conv net small enough for a dense Hessian (343 parameters), without BN."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))


def data(shape, n=24, classes=3, batches=3):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)
    return [(x[i::batches].contiguous(), y[i::batches].contiguous()) for i in range(batches)]


def dense_hessian(objective):
    """The Hessian of L by torch.autograd.functional.hessian over the flattened parameters."""
    params = objective.params
    w0 = flat([p.detach() for p in params])

    def loss_of(w):
        chunks = w.split([p.numel() for p in params])
        named = dict(zip([n for n, p in objective.model.named_parameters()], [c.view_as(p) for c, p in zip(chunks, params)]))
        total = 0
        for x, y in objective.batches:
            logits = torch.func.functional_call(objective.model, named, (x,))
            total = total + torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        return total / objective.count

    objective.model.eval()
    return torch.autograd.functional.hessian(loss_of, w0)


CASES = [("mlp", mlp, (5,)), ("cnn", small_cnn, (1, 12, 12))]


@pytest.mark.parametrize("name, build, shape", CASES, ids=[c[0] for c in CASES])
def test_top_eigenvalues_equal_the_dense_hessians(name, build, shape):
    objective = Objective(build(), data(shape, batches=3 if name == "mlp" else 1))  # sums over batches too
    exact = np.linalg.eigvalsh(dense_hessian(objective).numpy())[::-1][:3]
    got = top_eigenvalues(objective, k=3, max_iter=400, tol=1e-12)
    np.testing.assert_allclose(got, exact, rtol=1e-8)


@pytest.mark.parametrize("name, build, shape", CASES, ids=[c[0] for c in CASES])
def test_hutchinson_trace_within_four_standard_errors_and_its_error_shrinks(name, build, shape):
    objective = Objective(build(), data(shape, batches=1))
    exact = float(torch.trace(dense_hessian(objective)))
    estimate, se = hutchinson_trace(objective, probes=200, seed=0)
    assert abs(estimate - exact) <= 4 * se
    _, se_few = hutchinson_trace(objective, probes=50, seed=1)
    assert se_few / se == pytest.approx(2.0, rel=0.35)  # 1/sqrt(probes): 4x the probes, half the error


def test_density_weights_sum_to_one_within_the_spectrum():
    objective = Objective(mlp(), data((5,)))
    spectrum = np.linalg.eigvalsh(dense_hessian(objective).numpy())
    density = eigen_density(objective, probes=3, steps=20)
    for nodes, weights in zip(density["nodes"], density["weights"]):
        assert sum(weights) == pytest.approx(1.0, rel=1e-10)
        assert spectrum[0] - 1e-8 <= min(nodes) and max(nodes) <= spectrum[-1] + 1e-8


def test_filter_normalized_direction_has_each_filter_norm_of_the_weights():
    model = tiny_cnn()
    direction = filter_normalized_direction(model, seed=3)
    for p, d in zip(model.parameters(), direction):
        if p.dim() <= 1:
            assert not d.any()
        else:
            torch.testing.assert_close(d.flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1), rtol=1e-12, atol=0)
            assert not torch.allclose(d, p)  # a random direction, not the weights


def test_slices_at_zero_are_the_loss_at_the_weights_and_leave_the_weights_alone():
    model = tiny_cnn()
    objective = Objective(model, data((1, 12, 12)))
    loss, acc = objective.value()
    before = [p.detach().clone() for p in model.parameters()]
    d1, d2 = filter_normalized_direction(model, 1), filter_normalized_direction(model, 2)
    one = loss_slice(objective, [d1], [-0.5, 0.0, 0.5])
    two = loss_slice(objective, [d1, d2], [-0.5, 0.0, 0.5])
    assert one["loss"][1] == loss and one["acc"][1] == acc and two["loss"][1][1] == loss
    assert one["loss"][0] != loss and two["loss"][0][2] != loss
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    other = tiny_cnn()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    line = interpolate(objective, model.state_dict(), other.state_dict(), [0.0, 1.0])
    assert line["loss"][0] == loss and line["loss"][1] == Objective(other, objective.batches).value()[0]


def test_gradient_noise_is_the_covariance_trace_of_micro_batch_gradients():
    model = mlp()
    batches = data((5,), n=24, batches=1)
    objective = Objective(model, batches)
    got = gradient_noise(objective, micro_batch_size=6)
    x, y = batches[0]
    grads = torch.stack([flat(torch.autograd.grad(nn.functional.cross_entropy(model(x[i:i + 6]), y[i:i + 6]),
                                                   list(model.parameters()))) for i in range(0, 24, 6)])
    expected = float(((grads - grads.mean(0)) ** 2).sum() / 3)
    assert got["micro_batches"] == 4 and got["trace_cov"] == pytest.approx(expected, rel=1e-10)
    assert got["trace_cov_per_example"] == pytest.approx(6 * expected, rel=1e-10)
    with pytest.raises(UsageError, match="fewer than 2 micro-batches"):
        gradient_noise(objective, micro_batch_size=16)
    with pytest.raises(UsageError, match="k must be >= 1"):
        top_eigenvalues(objective, k=0)


def test_augmentation_variance_is_half_the_squared_view_gradient_difference():
    model = tiny_cnn()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 1, 12, 12, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    x2 = x + 0.3 * torch.randn(x.shape, generator=g)
    got = augmentation_variance(model, [(x, x2, y), (x, x, y)], target="fc")
    fc = list(model.fc.parameters())
    model.eval()
    ga = flat(torch.autograd.grad(nn.functional.cross_entropy(model(x), y), fc))
    gb = flat(torch.autograd.grad(nn.functional.cross_entropy(model(x2), y), fc))
    expected = 0.5 * float(((ga - gb) ** 2).sum())
    assert got["variance"] == pytest.approx(expected / 2, rel=1e-10)  # the identical pair adds 0
    assert got["pairs"] == 2 and got["subset"] == 8 and got["target"] == "fc"


def test_psf_bound_check_measures_the_psf_and_the_batch_spectrum():
    model = mlp()
    batches = data((5,), batches=2)
    rho = 0.05
    got = psf_bound_check(model, batches, rho)
    for (x, y), row in zip(batches, got["batches"]):
        objective = Objective(model, [(x, y)])
        spectrum = np.linalg.eigvalsh(dense_hessian(objective).numpy())
        assert row["bound"] == pytest.approx(rho * np.abs(spectrum).max(), rel=1e-6)
        params = list(model.parameters())
        model.eval()
        g = flat(torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params))
        shifted = torch.func.functional_call(model, {n: p + rho * d.view_as(p) / g.norm() for (n, p), d in
                                                     zip(model.named_parameters(), g.split([p.numel() for p in params]))},
                                             (x,))
        g_s = flat(torch.autograd.grad(nn.functional.cross_entropy(shifted, y), params))
        assert row["psf_norm"] == pytest.approx(float((g_s - g).norm()), rel=1e-8)
    assert got["fraction_holding"] == np.mean([r["holds"] for r in got["batches"]])


def test_the_public_entry_measures_a_copy_in_the_asked_precision():
    torch.set_default_dtype(torch.float32)
    model = mlp().float()
    before = [p.detach().clone() for p in model.parameters()]
    batches = [(x.float(), y) for x, y in data((5,), batches=1)]
    out = curvature(model, batches, k=2, trace_samples=10, dtype="fp64")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    reference = Objective(mlp(), data((5,), batches=1))
    exact = np.linalg.eigvalsh(dense_hessian(reference).numpy())[::-1][:2]
    np.testing.assert_allclose(out["top_eigenvalues"], exact, rtol=1e-6)
    assert out["hvps"] == out["eigenvalue_hvps"] + 10 and out["rows"] == 24 and out["dtype"] == "fp64"
    for bad, needle in [(dict(k=0), "k must be >= 1"), (dict(trace_samples=1), "trace_samples must be >= 2"),
                        (dict(dtype="bf16"), "unknown dtype 'bf16'"), (dict(bn="frozen"), "unknown bn mode")]:
        with pytest.raises(UsageError, match=needle):
            curvature(model, batches, **bad)


@pytest.mark.slow
def test_gvr_lab_curvature_measures_a_run_and_refuses_bad_input(tiny_config, tmp_path, capsys):
    import json

    from gvr_lab import train
    from gvr_lab.cli import main

    torch.set_default_dtype(torch.float32)
    sgd = train(tiny_config(out_dir=str(tmp_path / "sgd"), epochs=1, model_args={"bn": True}))
    sam = train(tiny_config(out_dir=str(tmp_path / "sam"), epochs=1, model_args={"bn": True}, method="sam"))
    assert main(["curvature", str(sgd.run_dir), "--k", "2", "--trace-samples", "4", "--rows", "64", "--slice", "1d",
                 "--toward", str(sam.run_dir)]) == 0
    out = json.loads((sgd.run_dir / "curvature.json").read_text())
    assert len(out["top_eigenvalues"]) == 2 and out["top_eigenvalues"][0] >= out["top_eigenvalues"][1]
    assert out["rows"] == 64 and out["bn"] == "eval" and out["hvps"] == out["eigenvalue_hvps"] + 4
    assert out["slice"]["loss"][10] == pytest.approx(out["loss"], rel=1e-6)  # the grid's middle is a = 0
    assert out["toward"]["loss"][5] == pytest.approx(out["loss"], rel=1e-6)  # t = 0: this run's weights
    assert "top eigenvalues" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    for argv, needle in [([str(tmp_path / "empty")], "is not a run directory"),
                         ([str(sgd.run_dir), "--k", "0"], "k must be >= 1"),
                         ([str(sgd.run_dir), "--checkpoint", str(tmp_path / "nope.pt")], "not found")]:
        assert main(["curvature", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
