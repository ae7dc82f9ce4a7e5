"""Curvature instruments against dense float64 references on small models."""

from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from gvr_lab import Batch
from gvr_lab.errors import UsageError
from gvr_lab.landscape import (
    ITERABLE_ROWS,
    Objective,
    adaptive_sharpness,
    as_batches,
    augmentation_variance,
    curvature,
    eigen_density,
    extreme_eigenvalues,
    filter_normalized_curvature,
    filter_normalized_direction,
    flat,
    gradient_noise,
    hutchinson_trace,
    interpolate,
    loss_slice,
    psf_bound_check,
    top_eigenvalues,
)
from gvr_lab.models import create_model

from helpers import mlp

pytestmark = pytest.mark.usefixtures("float64")
small_mlp = partial(mlp, 5, 8, 6, 3)


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
        named = dict(
            zip([n for n, p in objective.model.named_parameters()], [c.view_as(p) for c, p in zip(chunks, params)])
        )
        total = 0
        for x, y in objective.batches:
            logits = torch.func.functional_call(objective.model, named, (x,))
            total = total + torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        return total / objective.count

    objective.model.eval()
    return torch.autograd.functional.hessian(loss_of, w0)


CASES = [("mlp", small_mlp, (5,)), ("cnn", small_cnn, (1, 12, 12))]


@pytest.mark.parametrize("name, build, shape", CASES, ids=[c[0] for c in CASES])
def test_top_eigenvalues_equal_the_dense_hessians(name, build, shape):
    objective = Objective(build(), data(shape, batches=3 if name == "mlp" else 1))  # sums over batches too
    exact = np.linalg.eigvalsh(dense_hessian(objective).numpy())[::-1][:3]
    got = top_eigenvalues(objective, k=3, max_iter=400, tol=1e-12)
    np.testing.assert_allclose(got.values, exact, rtol=1e-8)
    assert got.all_converged and max(got.residuals) < 1e-8 * exact[0]


@pytest.mark.parametrize("name, build, shape", CASES, ids=[c[0] for c in CASES])
def test_hutchinson_trace_within_four_standard_errors_and_its_error_shrinks(name, build, shape):
    objective = Objective(build(), data(shape, batches=1))
    exact = float(torch.trace(dense_hessian(objective)))
    estimate, se = hutchinson_trace(objective, probes=200, seed=0)
    assert abs(estimate - exact) <= 4 * se
    _, se_few = hutchinson_trace(objective, probes=50, seed=1)
    assert se_few / se == pytest.approx(2.0, rel=0.35)  # 1/sqrt(probes): 4x the probes, half the error


def test_density_weights_sum_to_one_within_the_spectrum():
    objective = Objective(small_mlp(), data((5,)))
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
    model = small_mlp()
    batches = data((5,), n=24, batches=1)
    objective = Objective(model, batches)
    got = gradient_noise(objective, micro_batch_size=6)
    x, y = batches[0]
    grads = torch.stack(
        [
            flat(
                torch.autograd.grad(
                    nn.functional.cross_entropy(model(x[i : i + 6]), y[i : i + 6]), list(model.parameters())
                )
            )
            for i in range(0, 24, 6)
        ]
    )
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
    model = small_mlp()
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
        shifted = torch.func.functional_call(
            model,
            {
                n: p + rho * d.view_as(p) / g.norm()
                for (n, p), d in zip(model.named_parameters(), g.split([p.numel() for p in params]))
            },
            (x,),
        )
        g_s = flat(torch.autograd.grad(nn.functional.cross_entropy(shifted, y), params))
        assert row["psf_norm"] == pytest.approx(float((g_s - g).norm()), rel=1e-8) and row["converged"]
    assert got["fraction_holding"] == np.mean([r["holds"] for r in got["batches"]])


def test_the_public_entry_measures_a_copy_in_the_asked_precision():
    torch.set_default_dtype(torch.float32)
    model = small_mlp().float()
    before = [p.detach().clone() for p in model.parameters()]
    batches = [(x.float(), y) for x, y in data((5,), batches=1)]
    out = curvature(model, batches, k=2, trace_samples=10, dtype="fp64")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    reference = Objective(small_mlp(), data((5,), batches=1))
    exact = np.linalg.eigvalsh(dense_hessian(reference).numpy())[::-1][:2]
    np.testing.assert_allclose(out["top_eigenvalues"], exact, rtol=1e-6)
    assert out["hvps"] == out["eigenvalue_hvps"] + 10 and out["rows"] == 24 and out["dtype"] == "fp64"
    for bad, needle in [
        (dict(k=0), "k must be >= 1"),
        (dict(trace_samples=1), "trace_samples must be >= 2"),
        (dict(dtype="bf16"), "unknown dtype 'bf16'"),
        (dict(bn="frozen"), "unknown bn mode"),
    ]:
        with pytest.raises(UsageError, match=needle):
            curvature(model, batches, **bad)


# ---------------------------------------------------------------------- repeated eigenvalues, accepted rows


def linear_softmax_at_zero(inputs, classes, bias=True):
    """A linear softmax model at W = 0: every row's probabilities are uniform, so the Hessian is
    E[x x^T] (x with a 1 appended for the bias) times I/C - 1 1^T/C^2, whose nonzero eigenvalues
    come twice for 3 classes."""
    model = nn.Linear(inputs, classes, bias=bias)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def random_rows(n=30, inputs=4, classes=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, inputs, generator=g), torch.randint(0, classes, (n,), generator=g)


def triple_rows():
    """30 rows along the axes, e1, e2, e3 eight times each and e4 / 2 six times: E[x x^T] =
    diag(4/15, 4/15, 4/15, 1/20), and with 2 classes the Hessian's top three eigenvalues are 2/15
    three times, then 1/40 and four zeros; from one start Lanczos sees {2/15, 1/40, 0} and stops."""
    x = torch.cat([torch.eye(4)[:3].repeat(8, 1), 0.5 * torch.eye(4)[3:].repeat(6, 1)])
    return x, torch.arange(30) % 2


TRIPLE = [
    ("double", lambda: linear_softmax_at_zero(4, 3), random_rows),
    ("triple", lambda: linear_softmax_at_zero(4, 2, bias=False), triple_rows),
]


@pytest.mark.parametrize("name, build, rows", TRIPLE, ids=[c[0] for c in TRIPLE])
def test_repeated_top_eigenvalues_are_found_with_their_multiplicity(name, build, rows):
    model, (x, y) = build(), rows()
    exact = np.linalg.eigvalsh(dense_hessian(Objective(model, (x, y))).numpy())[::-1][:3]
    assert exact[0] - exact[1] < 1e-12 and (name == "double" or exact[0] - exact[2] < 1e-12)  # the cases hold
    out = curvature(model, (x, y), k=3, trace_samples=2, dtype="fp64")
    np.testing.assert_allclose(out["top_eigenvalues"], exact, rtol=0, atol=1e-6)
    assert out["converged"] == [True] * 3 and out["all_converged"] and max(out["residuals"]) < 1e-10
    assert out["lanczos_rounds"] >= 3  # one copy of a repeated eigenvalue per restart
    if name == "triple":
        assert exact == pytest.approx([2 / 15] * 3, rel=1e-12)
        # five values: 2/15 three times, 1/40 and a true 0, every pair converged
        five = top_eigenvalues(Objective(model, (x, y)), k=5)
        assert five.values == pytest.approx([2 / 15] * 3 + [1 / 40, 0.0], abs=1e-12) and five.all_converged


def test_a_round_that_runs_out_of_steps_says_so():
    objective = Objective(small_mlp(), data((5,)))
    spectrum = np.linalg.eigvalsh(dense_hessian(objective).numpy())
    norm = np.abs(spectrum).max()
    short = top_eigenvalues(objective, k=2, max_iter=3)
    assert not short.all_converged and not short.complete and max(short.residuals) > 1e-6 * norm
    # converged means residual <= sqrt(eps) times an estimate of ||H|| that is at most ||H||
    assert all(not c for c, r in zip(short.converged, short.residuals) if r > np.sqrt(2.3e-16) * norm)
    assert not extreme_eigenvalues(objective, max_iter=3)[2]
    low, high, settled = extreme_eigenvalues(objective)
    assert settled and (low, high) == pytest.approx((spectrum[0], spectrum[-1]), rel=1e-6)


def loader(x, y, batch_size):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def test_every_accepted_form_of_the_same_rows_gives_the_same_eigenvalues():
    model = linear_softmax_at_zero(4, 3)
    x, y = random_rows(45)
    first = (x[:30], y[:30])
    thirds = [(x[i : i + 10], y[i : i + 10]) for i in range(0, 30, 10)]
    forms = {
        "tuple": (first, None),
        "list of two tensors": (list(first), None),
        "Batch": (Batch(*first), None),
        "list of batches": (thirds, None),
        "list of Batches": ([Batch(*b) for b in thirds], None),
        "DataLoader": (loader(*first, batch_size=7), None),
        "DataLoader cut by rows": (loader(x, y, batch_size=7), 30),
        "generator cut by rows": (((x[i : i + 4], y[i : i + 4]) for i in range(0, 45, 4)), 30),
        "tuple cut by rows": ((x, y), 30),
    }
    reference = curvature(model, first, k=3, trace_samples=2, dtype="fp64")["top_eigenvalues"]
    for name, (form, rows) in forms.items():
        out = curvature(model, form, k=3, trace_samples=2, dtype="fp64", rows=rows)
        assert out["rows"] == 30, name
        np.testing.assert_allclose(out["top_eigenvalues"], reference, rtol=1e-10, err_msg=name)
    big = 2 * ITERABLE_ROWS
    endless = loader(torch.zeros(big, 4), torch.zeros(big, dtype=torch.long), 64)
    assert sum(len(b) for _, b in as_batches(endless)) == ITERABLE_ROWS  # an iterable's default bound
    assert sum(len(b) for _, b in as_batches([(torch.zeros(big, 4), torch.zeros(big))])) == big  # a list's: all


def test_anything_else_is_refused_in_one_line():
    model = linear_softmax_at_zero(4, 3)
    x, y = random_rows()
    accepted = "data must be an (x, y) batch of two tensors, a gvr_lab.Batch, a list of them, or an iterable of them"
    frozen = linear_softmax_at_zero(4, 3).requires_grad_(False)
    for who, bad, kwargs, needle in [
        (model, x, {}, f"{accepted} such as a DataLoader; got a tensor of shape (30, 4)"),
        (model, (x, y, y), {}, "; got a tuple of 3 items (Tensor)"),
        (model, {"x": x, "y": y}, {}, "; got a dict"),
        (model, 3, {}, "; got an int"),
        (model, [(x, y), x], {}, "; got a list of 2 items (Tensor, tuple) whose item 1 is a tensor of shape (30, 4)"),
        (model, [], {}, "; got a list of 0 items (empty) holding no rows"),
        (
            model,
            (x, y[:5]),
            {},
            "an (x, y) batch needs one label per input row, got x of shape (30, 4) and y of shape (5,)",
        ),
        (model, (x, y), dict(k=16), "k=16 asks for more eigenvalues than the Hessian has: it is over 15 parameters"),
        (model, (x, y), dict(rows=0), "rows must be a positive int or None, got 0"),
        (model, (x, y), dict(sharpness=True, rho=0.0), "adaptive sharpness needs rho > 0 and steps >= 0, got rho=0.0"),
        (frozen, (x, y), {}, "the model has no parameter with requires_grad=True: its loss has no Hessian to measure"),
    ]:
        with pytest.raises(UsageError) as caught:
            curvature(who, bad, **kwargs)
        message = str(caught.value)
        assert "\n" not in message and needle in message, message
        assert message.startswith(accepted) == needle.startswith(("; ", accepted)), message


def test_the_callers_model_is_left_exactly_as_it_was():
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 10 * 10, 3)
    )
    x, y = (t.float() if t.is_floating_point() else t for t in data((1, 12, 12), batches=1)[0])
    model(x)  # running statistics that are not the initial ones, num_batches_tracked 1
    model[0].bias.requires_grad_(False)
    model[1].weight.requires_grad_(False)
    model[5].weight.grad = torch.randn_like(model[5].weight)
    model[0].weight.grad = torch.randn_like(model[0].weight)
    model[3].eval()  # modes that differ between modules
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    for bn in ("train", "eval"):
        out = curvature(model, (x, y), k=2, trace_samples=2, density=True, bn=bn, dtype="fp64", sharpness=True)
        assert out["parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
        assert model.state_dict()["1.num_batches_tracked"] == 1
        assert [m.training for m in model.modules()] == modes
        assert [p.requires_grad for p in model.parameters()] == flags
        assert all(p.dtype == torch.float32 for p in model.parameters())
        for before, p in zip(grads, model.parameters()):
            assert (p.grad is None) if before is None else torch.equal(before, p.grad)
    # the instruments on an Objective move the weights and the modes only inside their passes
    objective = Objective(model, (x, y), "train")
    top_eigenvalues(objective, k=1)
    adaptive_sharpness(objective, rho=0.1, steps=2)
    loss_slice(objective, [filter_normalized_direction(model)], [0.5])
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


# ---------------------------------------------------------------------- scale-invariant sharpness


class Weights(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.weight = nn.Parameter(w.clone())


class Quadratic(Objective):
    """L(w) = 0.5 w^T A w + b^T w over the flattened weights of `model`, through Objective's own
    value, gradient and H v (its batch_losses yields that loss for one placeholder row)."""

    def __init__(self, model, A, b):
        super().__init__(model, (torch.zeros(1, 1), torch.zeros(1, dtype=torch.long)))
        self.A, self.b = A, b

    def batch_losses(self):
        w = flat(self.params)
        yield 0.5 * w @ (self.A @ w) + self.b @ w, torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)


def trust_region_maximum(c, M, rho):
    """max over ||u|| <= rho of c^T u + 0.5 u^T M u for symmetric M and c not orthogonal to M's top
    eigenvector: u = (mu I - M)^{-1} c with mu > lambda_max(M) and ||u|| = rho (the secular
    equation, solved by bisection: ||u(mu)|| falls from infinity to 0 on (lambda_max, infinity))."""
    lam, Q = np.linalg.eigh(M)
    ct = Q.T @ c
    low, high = lam[-1], lam[-1] + np.linalg.norm(c) / rho
    for _ in range(200):
        mu = (low + high) / 2
        low, high = (mu, high) if np.linalg.norm(ct / (mu - lam)) > rho else (low, mu)
    u = Q @ (ct / (mu - lam))
    assert np.linalg.norm(u) == pytest.approx(rho, rel=1e-10)
    return c @ u + 0.5 * u @ M @ u


def quadratic_case(seed, at_minimum):
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(12, 12, generator=g)
    A = R @ R.T / 12 + 0.1 * torch.eye(12)
    w = torch.randn(3, 4, generator=g)
    b = -A @ w.flatten() if at_minimum else torch.randn(12, generator=g)
    return Quadratic(Weights(w), A, b), A.numpy(), b.numpy(), w.flatten().numpy()


@pytest.mark.parametrize("seed", [0, 1])
def test_adaptive_sharpness_on_a_quadratic_is_the_trust_region_maximum(seed):
    objective, A, b, w = quadratic_case(seed, at_minimum=False)
    D = np.abs(w)
    c, M = D * (A @ w + b), D[:, None] * A * D[None, :]  # L(w + D u) - L(w) = c^T u + 0.5 u^T M u
    for rho in (0.05, 0.5):
        exact = trust_region_maximum(c, M, rho)
        few, many = (adaptive_sharpness(objective, rho, steps)["sharpness"] for steps in (2, 40))
        assert few <= exact * (1 + 1e-12) and many <= exact * (1 + 1e-12)  # feasible points: lower bounds
        assert many == pytest.approx(exact, rel=1e-9)
    before = [p.detach().clone() for p in objective.params]
    assert adaptive_sharpness(objective, 0.1, 3)["gradients"] == 5
    assert torch.equal(before[0], objective.params[0])


def test_adaptive_sharpness_at_a_quadratics_minimum_is_half_rho_squared_lambda_max():
    for seed in (0, 1):
        objective, A, _, w = quadratic_case(seed, at_minimum=True)
        D = np.abs(w)
        top = np.linalg.eigvalsh(D[:, None] * A * D[None, :])[-1]
        for rho in (0.05, 0.5):
            # a shifted power iteration on D A D here, slow where lambda_2 / lambda_1 is near 1 (0.81 for seed 1)
            got = adaptive_sharpness(objective, rho, steps=200)["sharpness"]
            assert got == pytest.approx(0.5 * rho**2 * top, rel=1e-9)
            assert adaptive_sharpness(objective, rho, steps=3)["sharpness"] <= 0.5 * rho**2 * top * (1 + 1e-9)


def test_filter_normalized_curvature_is_the_mean_of_d_a_d():
    objective, A, _, _ = quadratic_case(0, at_minimum=False)
    got = filter_normalized_curvature(objective, directions=4, seed=7)
    ds = [flat(filter_normalized_direction(objective.model, 7 + i)).numpy() for i in range(4)]
    expected = [d @ A @ d for d in ds]
    assert got["values"] == pytest.approx(expected, rel=1e-12)
    assert got["curvature"] == pytest.approx(np.mean(expected), rel=1e-12)
    assert got["se"] == pytest.approx(np.std(expected, ddof=1) / 2, rel=1e-10)
    network = Objective(small_mlp(), data((5,)))  # a network: d^T H d against the dense Hessian
    H = dense_hessian(network).numpy()
    d = flat(filter_normalized_direction(network.model, 3)).numpy()
    assert filter_normalized_curvature(network, 2, seed=3)["values"][0] == pytest.approx(d @ H @ d, rel=1e-10)


def test_both_sharpness_measures_ignore_a_relu_networks_layer_rescaling_which_moves_lambda_max():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    rescaled = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    rescaled.load_state_dict(net.state_dict())
    with torch.no_grad():  # relu(c z) = c relu(z): the same function
        rescaled[0].weight.mul_(4.0), rescaled[0].bias.mul_(4.0), rescaled[2].weight.div_(4.0)
    batches = data((5,), batches=1)
    one, two = (curvature(m, batches, k=1, trace_samples=2, dtype="fp64", sharpness=True) for m in (net, rescaled))
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-12)
    assert one["adaptive_sharpness"] == pytest.approx(two["adaptive_sharpness"], rel=1e-9)
    assert one["fn_curvature"] == pytest.approx(two["fn_curvature"], rel=1e-9)
    assert abs(one["top_eigenvalues"][0] / two["top_eigenvalues"][0] - 1) > 0.5  # lambda_max is not invariant


def test_curvature_reports_the_sharpness_measures_only_when_asked():
    model = small_mlp()
    batches = data((5,), batches=2)
    plain = curvature(model, batches, k=1, trace_samples=3, dtype="fp64")
    assert "adaptive_sharpness" not in plain and "fn_curvature" not in plain
    out = curvature(model, batches, k=1, trace_samples=3, dtype="fp64", sharpness=True, rho=0.2, directions=3)
    objective = Objective(small_mlp(), batches)
    assert out["adaptive_sharpness"] == pytest.approx(adaptive_sharpness(objective, 0.2, 20)["sharpness"], rel=1e-9)
    fn = filter_normalized_curvature(objective, 3)
    assert (out["fn_curvature"], out["fn_curvature_se"]) == pytest.approx((fn["curvature"], fn["se"]), rel=1e-9)
    assert out["adaptive_sharpness_rho"] == 0.2 and out["adaptive_sharpness_gradients"] == 22
    assert out["adaptive_sharpness"] > 0 and out["fn_curvature_directions"] == 3
    assert out["hvps"] == out["eigenvalue_hvps"] + 3 + 3  # probes and directions, one H v each


@pytest.mark.slow
def test_gvr_lab_curvature_measures_a_run_and_refuses_bad_input(tiny_config, tmp_path, capsys):
    import json

    from gvr_lab import train
    from gvr_lab.cli import main

    torch.set_default_dtype(torch.float32)
    sgd = train(tiny_config(out_dir=str(tmp_path / "sgd"), epochs=1, model_args={"bn": True}))
    sam = train(tiny_config(out_dir=str(tmp_path / "sam"), epochs=1, model_args={"bn": True}, method="sam"))
    assert (
        main(
            [
                "curvature",
                str(sgd.run_dir),
                "--k",
                "2",
                "--trace-samples",
                "4",
                "--rows",
                "64",
                "--slice",
                "1d",
                "--toward",
                str(sam.run_dir),
            ]
        )
        == 0
    )
    out = json.loads((sgd.run_dir / "curvature.json").read_text())
    assert len(out["top_eigenvalues"]) == 2 and out["top_eigenvalues"][0] >= out["top_eigenvalues"][1]
    assert out["rows"] == 64 and out["bn"] == "eval" and out["hvps"] == out["eigenvalue_hvps"] + 4
    assert out["slice"]["loss"][10] == pytest.approx(out["loss"], rel=1e-6)  # the grid's middle is a = 0
    assert out["toward"]["loss"][5] == pytest.approx(out["loss"], rel=1e-6)  # t = 0: this run's weights
    assert "top eigenvalues" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    for argv, needle in [
        ([str(tmp_path / "empty")], "is not a run directory"),
        ([str(sgd.run_dir), "--k", "0"], "k must be >= 1"),
        ([str(sgd.run_dir), "--checkpoint", str(tmp_path / "nope.pt")], "not found"),
    ]:
        assert main(["curvature", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err


# ---------------------------------------------------------------------- finished runs, measured for a study


def run_directory(tmp_path, name, scale=1.0, kept=None, **fields):
    """A run directory as training leaves it (config.json, checkpoint.pt), without training: the
    Config's initial weights times `scale`, so a helper that measured a fresh model would be caught;
    `kept` ({evaluation: scale}) adds the checkpoints keep_checkpoints keeps, scaled alike."""
    from dataclasses import asdict

    from gvr_lab import Config
    from gvr_lab.data import dataset_info
    from gvr_lab.results import CHECKPOINT, CONFIG, kept_checkpoint, save_checkpoint, write_json
    from gvr_lab.training import DeviceSettings, build_model

    config = Config(
        **{
            "dataset": "synthetic",
            "model": "tiny_cnn",
            "train_subset": 64,
            "batch_size": 16,
            "device": "cpu",
            "out_dir": str(tmp_path / name),
            **fields,
        }
    )
    info = dataset_info(config.dataset)
    model, _, _ = build_model(config, info.num_classes, info.channels, DeviceSettings.of(config, torch.device("cpu")))
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    def scaled(factor):
        return {k: v * factor if k in dict(model.named_parameters()) else v for k, v in initial.items()}

    run_dir = tmp_path / name
    run_dir.mkdir()
    write_json(run_dir / CONFIG, asdict(config))
    save_checkpoint(run_dir / CHECKPOINT, {"model": scaled(scale)})
    for evaluation, factor in (kept or {}).items():
        save_checkpoint(run_dir / kept_checkpoint(evaluation), {"model": scaled(factor)})
    return run_dir


def measured_objective(run_dir, rows):
    from gvr_lab.measure import load_run_model
    from gvr_lab.training import evaluation_batches

    config, model = load_run_model(run_dir)
    return Objective(model, evaluation_batches(config, rows, torch.device("cpu")))


def test_checkpoint_curvature_measures_a_kept_checkpoint_in_either_batch_norm_mode(tmp_path):
    from gvr_lab.measure import checkpoint_curvature, load_run_model, measured_batches
    from gvr_lab.results import kept_checkpoint

    torch.set_default_dtype(torch.float32)
    fields = dict(keep_checkpoints=[2], batch_size=8, model_args={"bn": True})
    run = run_directory(tmp_path, "bn", scale=1.3, kept={2: 0.8}, **fields)
    lanczos = dict(max_iter=12, tol=1e-3)
    settings = dict(rows=16, k=2, trace_samples=3, rho=0.05, sharpness_steps=2, directions=2, **lanczos)
    config, model = load_run_model(run, run / kept_checkpoint(2))
    losses = {}
    for bn, sizes in (("eval", [16]), ("train", [8, 8])):  # train mode: batches of the run's batch size
        out = checkpoint_curvature(run, 2, bn=bn, **settings)
        batches = measured_batches(config, 16, bn, torch.device("cpu"))
        assert [len(y) for _, y in batches] == sizes
        objective = Objective(model, batches, bn)
        eigen = top_eigenvalues(objective, k=2, **lanczos)
        assert [out["lambda_1"], out["lambda_2"]] == pytest.approx(eigen.values, rel=1e-5)
        assert out["converged"] == eigen.all_converged
        assert (out["trace"], out["trace_se"]) == pytest.approx(hutchinson_trace(objective, probes=3), rel=1e-5)
        sharpness = adaptive_sharpness(objective, rho=0.05, steps=2)["sharpness"]
        assert out["adaptive_sharpness"] == pytest.approx(sharpness, rel=1e-5) and sharpness > 0
        fn = filter_normalized_curvature(objective, directions=2)
        assert (out["fn_curvature"], out["fn_curvature_se"]) == pytest.approx((fn["curvature"], fn["se"]), rel=1e-5)
        assert (out["loss"], out["acc"]) == pytest.approx(objective.value(), rel=1e-6)
        assert out["evaluation"] == 2 and out["bn"] == bn and out["rows"] == 16 and out["hvps"] > 5
        losses[bn] = out["loss"]
    assert losses["train"] != pytest.approx(losses["eval"], rel=1e-3)  # batch statistics are not running ones
    final = checkpoint_curvature(run, None, **settings)  # checkpoint.pt: the final weights, scale 1.3
    assert final["evaluation"] is None and final["loss"] == pytest.approx(measured_objective(run, 16).value()[0])


def test_train_mode_batches_hold_the_rows_of_one_training_forward_pass():
    from gvr_lab import Config
    from gvr_lab.measure import forward_rows, measured_batches

    cpu = torch.device("cpu")
    base = dict(dataset="synthetic", model="tiny_cnn", train_subset=64, batch_size=16, device="cpu")
    cases = [
        ("sgd", {}, 16),
        ("pseudo_gd", {"micro_batch_size": 4}, 4),  # ghost batch norm of the micro-batch
        ("reg_loss", {"micro_batch_size": 8}, 8),
        ("sam", {"m": 8}, 8),  # m-sharpness groups
        ("sam", {}, 16),
        ("gvr", {}, 16),  # each view over the whole batch
    ]
    for method, args, rows in cases:
        config = Config(**base, method=method, method_args=args)
        assert forward_rows(config) == rows, method
    config = Config(**base, method="pseudo_gd", method_args={"micro_batch_size": 4})
    batches = measured_batches(config, 24, "train", cpu)
    assert [len(y) for _, y in batches] == [4] * 6
    same = [torch.cat(parts) for parts in zip(*measured_batches(config, 24, "eval", cpu))]
    assert all(torch.equal(a, b) for a, b in zip(same, [torch.cat(parts) for parts in zip(*batches)]))
    assert sum(len(y) for _, y in measured_batches(config, 100, "train", cpu)) == 64  # all the run's rows
    with pytest.raises(UsageError, match="24 measured rows are not a multiple of 16, .* choose rows = k \\* 16"):
        measured_batches(Config(**base), 24, "train", cpu)
    with pytest.raises(UsageError, match="unknown bn mode 'batch'"):
        measured_batches(config, 24, "batch", cpu)


def test_curvature_over_training_measures_each_kept_checkpoint_both_ways_and_keeps_the_records(tmp_path, monkeypatch):
    from gvr_lab import measure

    torch.set_default_dtype(torch.float32)
    # evaluation 3 was never reached (a run that diverged before it): its checkpoint is not there
    run = run_directory(tmp_path, "run", kept={1: 0.9, 2: 1.1}, keep_checkpoints=[1, 2, 3], model_args={"bn": True})
    settings = dict(rows=16, trace_samples=3, sharpness_steps=1, directions=2, max_iter=6, tol=1e-3)
    measured = []
    original = measure.checkpoint_curvature
    monkeypatch.setattr(measure, "checkpoint_curvature", lambda *a, **kw: measured.append(a) or original(*a, **kw))
    records = measure.curvature_over_training(run, **settings)
    assert [(r["evaluation"], r["bn"]) for r in records] == [(1, "eval"), (1, "train"), (2, "eval"), (2, "train")]
    again = original(run, 2, bn="train", **settings)
    assert {k: v for k, v in records[3].items() if k != "seconds"} == {k: v for k, v in again.items() if k != "seconds"}
    assert records[0]["lambda_1"] != pytest.approx(records[2]["lambda_1"], rel=1e-3)  # two checkpoints
    assert len(measured) == 4 and len(list(run.glob("measures-*.json"))) == 1
    assert measure.curvature_over_training(run, **settings) == records and len(measured) == 4  # read back
    other = measure.curvature_over_training(run, **{**settings, "trace_samples": 4})
    assert len(measured) == 8 and len(list(run.glob("measures-*.json"))) == 2 and len(other) == 4
    assert measure.measure_runs([run, run], workers=1, **settings) == records + records
    with pytest.raises(UsageError, match="is not a run directory"):
        measure.curvature_over_training(tmp_path, **settings)


@pytest.mark.slow
def test_measure_runs_in_worker_processes_measures_what_this_process_does(tmp_path):
    """The pool starts processes that import torch: slow."""
    import shutil

    from gvr_lab.measure import measure_runs

    torch.set_default_dtype(torch.float32)
    runs = [run_directory(tmp_path, f"run{i}", kept={1: 1.0 + 0.1 * i}, keep_checkpoints=[1]) for i in range(3)]
    copies = [shutil.copytree(r, tmp_path / f"copy{i}") for i, r in enumerate(runs)]
    settings = dict(rows=16, trace_samples=3, sharpness_steps=1, directions=2, max_iter=6, tol=1e-3)
    pooled = measure_runs(runs, workers=2, **settings)
    here = measure_runs(copies, workers=1, **settings)
    assert [r["run_dir"] for r in pooled] == [str(r) for r in runs for _ in range(2)]
    for a, b in zip(pooled, here):
        assert a["bn"] == b["bn"] and a["lambda_1"] == pytest.approx(b["lambda_1"], rel=1e-4)
        assert a["trace"] == pytest.approx(b["trace"], rel=1e-4) and a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_measure_runs_takes_its_pool_size_from_the_argument_else_gvr_lab_runs_workers(monkeypatch):
    """`gvr-lab run --workers N` sizes the curvature measurements' pool as it does the grids'."""
    from gvr_lab import measure
    from gvr_lab.pools import WORKERS_ENV

    sizes = []

    class Pool:  # the size it was asked for, then no pool at all
        def __init__(self, workers):
            sizes.append(workers)
            raise RuntimeError("no pool here")

    monkeypatch.setattr(measure, "SpawnedPool", Pool)

    def measured(run_dir, device, **settings):
        return [{"run": run_dir, "seconds": 0.0}]

    monkeypatch.setattr(measure, "curvature_over_training", measured)
    runs = ["a", "b", "c"]
    monkeypatch.setenv(WORKERS_ENV, "1")
    assert [r["run"] for r in measure.measure_runs(runs)] == runs and sizes == []  # in this process
    monkeypatch.setattr(measure.os, "cpu_count", lambda: 4)
    for env, workers, size in (("1", 2, 2), ("2", 0, 2), ("", 0, 3)):  # unset: a process per core, per run at most
        monkeypatch.setenv(WORKERS_ENV, env)
        with pytest.raises(RuntimeError, match="no pool here"):
            measure.measure_runs(runs, workers=workers)
        assert sizes.pop() == size
    monkeypatch.setenv(WORKERS_ENV, "two")
    with pytest.raises(UsageError, match="GVR_LAB_WORKERS must be a whole number of processes"):
        measure.measure_runs(runs)


def test_interpolate_runs_ends_at_each_runs_weights_and_refuses_two_models(tmp_path):
    from gvr_lab.measure import interpolate_runs, load_run_model

    torch.set_default_dtype(torch.float32)
    a = run_directory(tmp_path, "a", model_args={"bn": True})
    b = run_directory(tmp_path, "b", scale=0.7, seed=1, model_args={"bn": True})
    line = interpolate_runs(a, b, rows=32, ts=[0.0, 0.5, 1.0])
    on_a = measured_objective(a, 32)
    _, model_b = load_run_model(b)
    model_a = on_a.model
    halfway = {
        k: 0.5 * v + 0.5 * model_b.state_dict()[k] if v.is_floating_point() else v
        for k, v in model_a.state_dict().items()
    }
    expected = [on_a.value()[0], None, Objective(model_b, on_a.batches).value()[0]]
    model_a.load_state_dict(halfway)
    expected[1] = on_a.value()[0]
    assert line["loss"] == pytest.approx(expected, rel=1e-6) and line["t"] == [0.0, 0.5, 1.0]
    assert len(set(line["loss"])) == 3  # three different points, not one model three times
    other = run_directory(tmp_path, "plain")  # no batch norm: other parameters
    with pytest.raises(UsageError, match="cannot interpolate .* the line needs one model's weights"):
        interpolate_runs(a, other)


def test_slice_run_is_centred_on_the_weights_with_seeded_directions(tmp_path):
    from gvr_lab.measure import load_run_model, slice_run

    torch.set_default_dtype(torch.float32)
    run = run_directory(tmp_path, "run", scale=1.2)
    out = slice_run(run, rows=32, points=5, radius=0.5, direction_seeds=(3, 4))
    objective = measured_objective(run, 32)
    assert out["grid"] == pytest.approx([-0.5, -0.25, 0.0, 0.25, 0.5])
    assert out["loss"][2][2] == pytest.approx(objective.value()[0], rel=1e-6)
    _, model = load_run_model(run)
    along = loss_slice(objective, [filter_normalized_direction(model, 3)], out["grid"])
    assert [row[2] for row in out["loss"]] == pytest.approx(along["loss"], rel=1e-6)  # b = 0: direction 1 alone
    assert np.array(out["loss"]).shape == (5, 5) and out["direction_seeds"] == [3, 4]
    for bad in (dict(points=1), dict(radius=0.0), dict(direction_seeds=(0, 1, 2))):
        with pytest.raises(UsageError, match="a slice needs points >= 2, radius > 0 and one or two direction seeds"):
            slice_run(run, **bad)


def test_psf_check_run_uses_the_runs_rho_and_batch_size(tmp_path):
    from gvr_lab.measure import load_run_model, psf_check_run
    from gvr_lab.training import evaluation_batches

    torch.set_default_dtype(torch.float32)
    run = run_directory(tmp_path, "vsam", method="vsam", method_args={"rho": 0.07}, batch_size=8)
    out = psf_check_run(run, batches=2)
    config, model = load_run_model(run)
    x, y = (torch.cat(t) for t in zip(*evaluation_batches(config, 16, torch.device("cpu"))))
    params = list(model.parameters())
    model.eval()
    for i, row in enumerate(out["batches"]):  # the PSF of batch i, by its definition, at rho 0.07
        part = (x[8 * i : 8 * (i + 1)], y[8 * i : 8 * (i + 1)])
        g = flat(torch.autograd.grad(nn.functional.cross_entropy(model(part[0]), part[1]), params))
        moved = {
            n: p + 0.07 * d.view_as(p) / g.norm()
            for (n, p), d in zip(model.named_parameters(), g.split([p.numel() for p in params]))
        }
        logits = torch.func.functional_call(model, moved, (part[0],))
        g_s = flat(torch.autograd.grad(nn.functional.cross_entropy(logits, part[1]), params))
        assert row["psf_norm"] == pytest.approx(float((g_s - g).norm()), rel=1e-4)
        assert row["holds"] == (row["psf_norm"] <= row["bound"]) and row["bound"] > 0
    assert out["rho"] == 0.07 and out["batch_size"] == 8 and len(out["batches"]) == 2
    assert out["fraction_holding"] == np.mean([row["holds"] for row in out["batches"]])
    sgd = run_directory(tmp_path, "sgd")
    with pytest.raises(UsageError, match="method 'sgd' has no rho; pass rho"):
        psf_check_run(sgd)
    with pytest.raises(UsageError, match="9 batches of 8 need 72 training rows, the run has 64"):
        psf_check_run(run, batches=9)
    with pytest.raises(UsageError, match="batches must be >= 1"):
        psf_check_run(run, batches=0)


@pytest.mark.slow
def test_checkpoint_curvature_repeats_the_measurements_made_in_training(tiny_config, tmp_path):
    """With 512 rows, 20 probes and k = 1 a kept checkpoint's measurement is the training loop's
    (curvature_every) at that evaluation: the same rows, Lanczos start and probes."""
    from gvr_lab import train
    from gvr_lab.measure import checkpoint_curvature
    from gvr_lab.training import CURVATURE_PROBES, CURVATURE_ROWS

    torch.set_default_dtype(torch.float32)
    run = train(
        tiny_config(
            steps=6,
            eval_every=3,
            curvature_every=1,
            keep_checkpoints=[1],
            train_subset=64,
            batch_size=16,
            model_args={"bn": True},
        )
    )
    for evaluation, row in ((1, run.history.iloc[0]), (None, run.history.iloc[-1])):
        out = checkpoint_curvature(
            run.run_dir, evaluation, rows=CURVATURE_ROWS, trace_samples=CURVATURE_PROBES, sharpness=False
        )
        assert out["rows"] == 64  # the run's training rows, all of them
        assert out["lambda_1"] == pytest.approx(row["hessian_top"], rel=1e-6)
        assert out["trace"] == pytest.approx(row["hessian_trace"], rel=1e-6)


# ---------------------------------------------------------------------- the study's tables and figures


def test_significant_digits_and_mean_ci_cells():
    import pandas as pd

    from gvr_lab import plots

    assert [plots.significant(v) for v in (238.4, 54.91, 7.523, 0.012345, 0.0, -3.14159)] == [
        "238",
        "54.9",
        "7.52",
        "0.0123",
        "0.00",
        "-3.14",
    ]
    frame = pd.DataFrame(
        {
            "label": ["a"] * 3 + ["b"],
            "seed": [0, 1, 2, 0],
            "lambda_1": [1.0, 2.0, 3.0, 5.0],
            "test_acc": [0.5, 0.6, 0.7, 0.9],
        }
    )
    table = plots.mean_ci(frame, ["label"], ["lambda_1", "test_acc"])
    # t_{0.975, 2} = 4.303, sd 1: mean 2 +- 2.484; accuracies in percent: 60 +- 24.84
    assert table.to_dict("list") == {
        "label": ["a", "b"],
        "λ1": ["2.00 [-0.48, 4.48]", "5.00"],
        "test accuracy (%)": ["60.0 [35.2, 84.8]", "90.0"],
        "seeds": [3, 1],
    }


def test_paired_difference_pairs_by_seed():
    import pandas as pd

    from gvr_lab import plots

    frame = pd.DataFrame(
        {
            "label": ["m"] * 3 + ["base"] * 4,
            "seed": [0, 1, 2, 0, 1, 2, 3],
            "trace": [5.0, 7.0, 9.0, 4.0, 5.0, 6.0, 100.0],
        }
    )  # seed 3 has no pair: left out
    got = plots.paired_difference(frame, "trace", {"m": "base"})
    assert got == {"m": "2.00 [-0.48, 4.48] vs base", "base": "—"}


def test_first_below_is_each_runs_first_checkpoint_under_the_level():
    import pandas as pd

    from gvr_lab import plots

    frame = pd.DataFrame(
        {
            "run_dir": ["a"] * 3 + ["b"] * 3 + ["c"] * 2,
            "step": [30, 10, 20, 10, 20, 30, 10, 20],
            "train_eval_loss": [0.5, 1.2, 0.8, 0.85, 0.7, 0.6, 1.5, 0.9],
        }
    )
    picked = plots.first_below(frame, "train_eval_loss", 0.9)
    # a: the first below 0.9 in step order is step 20 (0.8), not its lowest (0.5 at 30); b: step 10;
    # c never falls below (0.9 is not below 0.9): no row
    assert picked.set_index("run_dir")["step"].to_dict() == {"a": 20, "b": 10}
    both = pd.concat(
        [frame.assign(bn="eval"), frame.assign(bn="train", train_eval_loss=frame["train_eval_loss"] + 0.1)]
    )
    per_mode = plots.first_below(both, "train_eval_loss", 0.9, by=["run_dir", "bn"]).set_index(["run_dir", "bn"])
    assert per_mode["step"].to_dict() == {("a", "eval"): 20, ("b", "eval"): 10, ("a", "train"): 30, ("b", "train"): 20}


def test_provenance_counts_the_steps_of_a_steps_mode_run():
    import pandas as pd

    from gvr_lab import plots

    rows = pd.DataFrame(
        {
            "label": "SGD",
            "seed": 0,
            "dataset": "fashion_mnist",
            "model": "tiny_cnn",
            "train_subset": 8192,
            "steps_per_epoch": 64,
            "run_dir": "r",
            "epoch": [1, 2, 3],
            "step": [80, 160, 240],
        }
    )
    assert "3.75 epochs = 240 optimizer steps" in plots.provenance(rows, "cpu")
    whole = rows.assign(step=[64, 128, 256], epoch=[0, 1, 3])
    assert "4 epochs = 256 optimizer steps" in plots.provenance(whole, "cpu")


def test_loss_contours_share_their_levels_across_panels():
    import matplotlib.pyplot as plt
    from matplotlib.contour import ContourSet

    from gvr_lab import plots

    grid = [-1.0, 0.0, 1.0]
    flat_bowl = {"grid": grid, "loss": [[1.2, 1.1, 1.2], [1.1, 1.0, 1.1], [1.2, 1.1, 1.2]]}
    sharp_bowl = {"grid": grid, "loss": [[9.0, 4.0, 9.0], [4.0, 0.5, 4.0], [9.0, 4.0, 9.0]]}
    fig = plots.loss_contours({"flat": flat_bowl, "sharp": sharp_bowl}, levels=8)
    sets = [[c for c in ax.collections if isinstance(c, ContourSet)] for ax in fig.axes[:2]]
    levels = [s.levels for panel in sets for s in panel]
    assert len(levels) == 4 and all(np.array_equal(levels[0], other) for other in levels[1:])
    assert levels[0][0] == pytest.approx(0.5) and levels[0][-1] == pytest.approx(9.0)  # both panels' range
    assert [ax.get_title() for ax in fig.axes[:2]] == ["flat", "sharp"]
    plt.close(fig)
