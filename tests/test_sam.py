"""SAM, ASAM, LookSAM and ESAM against references written from the formulas.

The references use plain autograd on torch.func.functional_call at explicitly built weight vectors,
never the methods' in-place perturb/restore machinery.
"""

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from gvr_lab import Batch, create_method, create_model
from gvr_lab.errors import UsageError
from gvr_lab.methods import method_class
from gvr_lab.methods.esam import selected_count

from helpers import checkpoint_round_trip, mlp, quadratic_method

pytestmark = pytest.mark.usefixtures("float64")

TOL = dict(rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------- models and batches

# Every net has its Dropout layer (model[-2]), of p = 0 unless a test asks for masks.
small_mlp = partial(mlp, 6, 8, 3, dropout=0.0)


def batch(seed, n=8):
    g = torch.Generator().manual_seed(100 + seed)
    return Batch(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def sgd(model, lr=0.1, momentum=0.9, wd=1e-3, groups=False):
    """groups=True: first layer and the rest in two param groups with different weight decay."""
    params = list(model.parameters())
    if groups:
        return torch.optim.SGD(
            [{"params": params[:2], "weight_decay": wd}, {"params": params[2:], "weight_decay": 3 * wd}],
            lr=lr,
            momentum=momentum,
        )
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd)


def build(name, model=None, groups=False, **hp):
    model = small_mlp() if model is None else model
    opt = sgd(model, groups=groups)
    return model, opt, create_method(name, model, opt, **hp)


def weight_decays(opt):
    return [g["weight_decay"] for g in opt.param_groups for _ in g["params"]]


def gradient_at(model, weights, x, y, loss_fn=F.cross_entropy):
    """(loss, grads) of loss_fn(model at `weights`), by plain autograd."""
    names = [n for n, _ in model.named_parameters()]
    leaves = [w.detach().clone().requires_grad_() for w in weights]
    loss = loss_fn(functional_call(model, dict(zip(names, leaves)), (x,)), y)
    return loss.detach(), list(torch.autograd.grad(loss, leaves))


def norm(ts):
    return torch.sqrt(sum((t * t).sum() for t in ts))


def reference_sam(model, x, y, rho, direction_extra=None, loss_fn=F.cross_entropy):
    """The SAM formula: eps = rho d/||d|| over all parameters, d = g (+ extra), g_S at w + eps."""
    w = [p.detach() for p in model.parameters()]
    loss, g = gradient_at(model, w, x, y, loss_fn)
    d = g if direction_extra is None else [a + b for a, b in zip(g, direction_extra)]
    eps = [rho * t / (norm(d) + 1e-12) for t in d]
    loss_s, g_s = gradient_at(model, [a + e for a, e in zip(w, eps)], x, y, loss_fn)
    return {"loss": loss, "g": g, "eps": eps, "g_s": g_s, "loss_s": loss_s}


def base_step(model, opt, grads):
    """The base optimizer's step with the given gradient (what every method must end with)."""
    for p, gr in zip(model.parameters(), grads):
        p.grad = gr.clone()
    opt.step()


def assert_same_state(model_a, opt_a, model_b, opt_b, **tol):
    tol = tol or TOL
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, **tol)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(opt_a.state[a]["momentum_buffer"], opt_b.state[b]["momentum_buffer"], **tol)


def spd(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, n, generator=g)
    return q @ q.T + n * torch.eye(n)


# ---------------------------------------------------------------------- SAM / ASAM


@pytest.mark.parametrize(
    "name, hp",
    [
        ("sam", {"rho": 0.0}),
        ("asam", {"rho": 0.0}),
        ("sam", {"rho": 0.0, "wd_in_perturbation": True, "m": 4}),
        ("looksam", {"rho": 0.0, "k": 2}),
        ("esam", {"rho": 0.0, "beta": 0.5, "gamma": 1.0}),
    ],
)
def test_rho_zero_is_the_base_optimizer(name, hp):
    model, opt, method = build(name, **hp)
    ref_model, ref_opt, ref = build("sgd")
    for s in range(3):
        method.step(batch(s))
        ref.step(batch(s))
    assert_same_state(model, opt, ref_model, ref_opt)


@pytest.mark.parametrize("name", ["sam", "asam"])
def test_rho_zero_with_batchnorm_keeps_sgd_weights_and_running_stats(name):
    model, opt, method = build(name, model=small_mlp(bn=True), rho=0.0)
    ref_model, ref_opt, ref = build("sgd", model=small_mlp(bn=True))
    for s in range(2):
        method.step(batch(s))
        ref.step(batch(s))
    assert_same_state(model, opt, ref_model, ref_opt)
    for a, b in zip(model.buffers(), ref_model.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_sam_step_matches_the_formula_with_the_norm_over_all_parameter_groups():
    model, opt, method = build("sam", groups=True, rho=0.3)
    ref_model = copy.deepcopy(model)
    ref_opt = sgd(ref_model, groups=True)
    for s in range(2):
        b = batch(s)
        r = reference_sam(ref_model, b.x, b.y, rho=0.3)
        out = method.step(b)
        base_step(ref_model, ref_opt, r["g_s"])
        assert_same_state(model, opt, ref_model, ref_opt)
        torch.testing.assert_close(norm(r["eps"]), torch.tensor(0.3), **TOL)
        torch.testing.assert_close(out["loss"], r["loss"], **TOL)
        torch.testing.assert_close(out["grad_norm"], norm(r["g"]), **TOL)
        torch.testing.assert_close(out["sam_grad_norm"], norm(r["g_s"]), **TOL)
        torch.testing.assert_close(out["sharpness"], r["loss_s"] - r["loss"], **TOL)
        assert set(out) >= {"loss", "acc", "grad_norm", "sam_grad_norm"}
        assert all(v.dim() == 0 for v in out.values())


def test_batchnorm_running_stats_come_from_the_clean_pass_only():
    model, opt, method = build("sam", model=small_mlp(bn=True), rho=0.5)
    clean = copy.deepcopy(model)
    b = batch(0)
    with torch.no_grad():
        clean(b.x)  # one train-mode forward at w: what the running statistics must show
    r = reference_sam(copy.deepcopy(model), b.x, b.y, rho=0.5)
    method.step(b)
    bn, clean_bn = model[1], clean[1]
    torch.testing.assert_close(bn.running_mean, clean_bn.running_mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(bn.running_var, clean_bn.running_var, rtol=1e-12, atol=0)
    assert bn.num_batches_tracked.item() == 1
    # pass 2 still normalizes with batch statistics: the update gradient is the formula's
    for p, g in zip(model.parameters(), r["g_s"]):
        torch.testing.assert_close(p.grad, g, **TOL)


@pytest.mark.parametrize(
    "name, hp", [("asam", {}), ("sam", {"m": 2}), ("looksam", {"k": 1}), ("esam", {"beta": 1.0, "gamma": 0.5})]
)
def test_every_variant_moves_running_stats_once_on_the_clean_batch(name, hp):
    model, opt, method = build(name, model=small_mlp(bn=True), rho=0.5, **hp)
    clean = copy.deepcopy(model)
    b = batch(0)
    with torch.no_grad():
        clean(b.x)
    method.step(b)
    for a, c in zip(model.buffers(), clean.buffers()):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=0)


def test_m_sharpness_with_m_equal_to_the_batch_is_plain_sam():
    model, opt, method = build("sam", model=small_mlp(bn=True), rho=0.2, m=8)
    ref_model, ref_opt, ref = build("sam", model=small_mlp(bn=True), rho=0.2)
    for s in range(2):
        method.step(batch(s))
        ref.step(batch(s))
    assert_same_state(model, opt, ref_model, ref_opt, rtol=0, atol=0)
    for a, b in zip(model.buffers(), ref_model.buffers()):
        assert torch.equal(a, b)


def test_m_sharpness_averages_the_groups_own_sam_gradients():
    model, opt, method = build("sam", rho=0.2, m=4)
    ref_model = copy.deepcopy(model)
    ref_opt = sgd(ref_model)
    b = batch(0)
    halves = [reference_sam(ref_model, b.x[i : i + 4], b.y[i : i + 4], rho=0.2) for i in (0, 4)]
    out = method.step(b)
    update = [(a + c) / 2 for a, c in zip(halves[0]["g_s"], halves[1]["g_s"])]
    for p, g in zip(model.parameters(), update):
        torch.testing.assert_close(p.grad, g, **TOL)
    base_step(ref_model, ref_opt, update)
    assert_same_state(model, opt, ref_model, ref_opt)
    torch.testing.assert_close(out["loss"], (halves[0]["loss"] + halves[1]["loss"]) / 2, **TOL)
    g_full = [(a + c) / 2 for a, c in zip(halves[0]["g"], halves[1]["g"])]
    torch.testing.assert_close(out["grad_norm"], norm(g_full), **TOL)
    # each half perturbed by its own gradient, not by the full-batch one
    full = reference_sam(copy.deepcopy(model), b.x, b.y, rho=0.2)
    assert not torch.allclose(norm([a - c for a, c in zip(full["g_s"], update)]), torch.tensor(0.0), atol=1e-6)


def test_m_must_divide_the_batch_size():
    with pytest.raises(UsageError, match="must divide the batch size 10"):
        method_class("sam").check_batch_size({"m": 4}, 10)
    method_class("sam").check_batch_size({"m": 5}, 10)
    with pytest.raises(UsageError, match="m for method 'sam'"):
        method_class("sam").resolve_hparams({"m": 2.5})
    _, _, method = build("sam", m=3)
    with pytest.raises(UsageError):
        method.step(batch(0))


@pytest.mark.parametrize("rho, scale", [(0.05, 1.0), (0.5, 1.0), (0.5, 1024.0)])
def test_quadratic_update_gradient_is_a_times_shifted_point(rho, scale):
    a, w_star, w0 = spd(5), torch.linspace(-1, 1, 5), torch.tensor([0.3, -2.0, 1.0, 0.5, 0.1])
    model, method = quadratic_method("sam", a, w_star, w0, lr=0.1, rho=rho)
    quad_loss = model.loss
    method.loss = lambda logits, y: scale * quad_loss(logits, y)  # a loss scale leaves eps unchanged
    b = batch(0)
    method.step(b)
    g = a @ (w0 - w_star)
    expected = scale * a @ (w0 - w_star + rho * g / g.norm())
    torch.testing.assert_close(model.w.grad, expected, **TOL)
    torch.testing.assert_close(model.w.detach(), w0 - 0.1 * expected, **TOL)  # restored before the step


@pytest.mark.parametrize(
    "name, hp",
    [
        ("sam", {}),
        ("asam", {}),
        ("sam", {"wd_in_perturbation": True}),
        ("looksam", {"k": 1}),
        ("esam", {"beta": 1.0, "gamma": 0.5}),
    ],
)
def test_zero_gradient_gives_no_perturbation_and_no_nan(name, hp):
    w_star = torch.linspace(-1, 1, 4)
    model, method = quadratic_method(name, spd(4), w_star, w_star, **hp)
    out = method.step(batch(0))
    assert all(torch.isfinite(v) for v in out.values())
    torch.testing.assert_close(model.w.detach(), w_star, rtol=0, atol=0)


def asam_scale(model, eta):
    """T_w of the official code: |w| + eta on tensors named '...weight...', 1 on the others."""
    return [p.detach().abs() + eta if "weight" in n else torch.ones_like(p) for n, p in model.named_parameters()]


def test_asam_perturbation_has_radius_rho_in_the_weight_scaled_metric():
    model, opt, method = build("asam", model=small_mlp(bn=True), rho=0.7, eta=0.02)
    g = [torch.randn_like(p) for p in model.parameters()]
    eps = method.perturbation([x.clone() for x in g], norm(g))  # perturbation may overwrite its input
    t = asam_scale(model, 0.02)
    torch.testing.assert_close(norm([e / ti for e, ti in zip(eps, t)]), torch.tensor(0.7), **TOL)
    tg_norm = norm([ti * gi for ti, gi in zip(t, g)])
    for e, ti, gi in zip(eps, t, g):
        torch.testing.assert_close(e, 0.7 * ti * ti * gi / tg_norm, **TOL)
    # the model has what the rule distinguishes: biases and BN's beta (T = 1), BN's gamma (scaled)
    names = [n for n, _ in model.named_parameters()]
    assert {"0.bias", "1.weight", "1.bias"} <= set(names) and isinstance(model[1], nn.BatchNorm1d)


def test_asam_step_matches_the_formula():
    model, opt, method = build("asam", rho=0.5)
    ref_model = copy.deepcopy(model)
    ref_opt = sgd(ref_model)
    b = batch(0)
    w = [p.detach() for p in ref_model.parameters()]
    _, g = gradient_at(ref_model, w, b.x, b.y)
    t = asam_scale(ref_model, 0.01)
    tg = [ti * gi for ti, gi in zip(t, g)]
    eps = [0.5 * ti * x / (norm(tg) + 1e-12) for ti, x in zip(t, tg)]
    _, g_s = gradient_at(ref_model, [a + e for a, e in zip(w, eps)], b.x, b.y)
    method.step(b)
    base_step(ref_model, ref_opt, g_s)
    assert_same_state(model, opt, ref_model, ref_opt)


def test_asam_with_unit_weights_and_no_eta_is_sam():
    model = small_mlp()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "weight" in n:
                p.copy_(torch.where(torch.rand_like(p) < 0.5, -1.0, 1.0))
    _, _, asam = build("asam", model=model, rho=0.3, eta=0.0)
    _, _, sam = build("sam", model=model, rho=0.3)
    g = [torch.randn_like(p) for p in model.parameters()]
    eps_asam = asam.perturbation([x.clone() for x in g], norm(g))
    eps_sam = sam.perturbation([x.clone() for x in g], norm(g))
    for a, s in zip(eps_asam, eps_sam):
        torch.testing.assert_close(a, s, **TOL)


@pytest.mark.parametrize("m", [None, 4])
def test_weight_decay_in_perturbation_is_the_l2_loss_of_the_jax_reference(m):
    """The JAX reference's L2 in the loss: update = grad[L + lambda/2 ||.||^2](w + eps'), eps' from g + lambda w
    (with m: the mean over the groups of that, each group with its own eps')."""
    model, opt, method = build("sam", groups=True, rho=0.3, wd_in_perturbation=True, m=m)
    off_model, off_opt, off = build("sam", groups=True, rho=0.3, m=m)
    ref_model = copy.deepcopy(model)
    ref_opt = sgd(ref_model, groups=True, wd=0.0)  # the reference carries the L2 term in its loss
    lams = weight_decays(opt)
    b = batch(0)
    w = [p.detach() for p in ref_model.parameters()]
    slices = [slice(0, 8)] if m is None else [slice(0, 4), slice(4, 8)]
    update = [torch.zeros_like(wi) for wi in w]
    for rows in slices:
        r = reference_sam(
            ref_model, b.x[rows], b.y[rows], rho=0.3, direction_extra=[lam * wi for lam, wi in zip(lams, w)]
        )
        for u, gs, lam, wi, e in zip(update, r["g_s"], lams, w, r["eps"]):
            u += (gs + lam * (wi + e)) / len(slices)
    method.step(b)
    off.step(b)
    base_step(ref_model, ref_opt, update)
    assert_same_state(model, opt, ref_model, ref_opt)
    # the flag changes the step (the perturbation direction and the lambda eps term)
    assert max((p - q).abs().max() for p, q in zip(model.parameters(), off_model.parameters())) > 1e-6


def test_dropout_masks_are_the_same_in_both_passes():
    model, opt, method = build("sam", model=small_mlp(dropout=0.5), rho=0.0)
    ref_model, ref_opt, ref = build("sgd", model=small_mlp(dropout=0.5))
    for s in range(2):
        torch.manual_seed(7 + s)
        method.step(batch(s))
        torch.manual_seed(7 + s)
        ref.step(batch(s))
    assert_same_state(model, opt, ref_model, ref_opt)


def test_bf16_autocast_step_is_close_to_fp32():
    torch.set_default_dtype(torch.float32)
    steps = []
    for amp in (None, torch.bfloat16):
        torch.manual_seed(0)
        model = create_model("tiny_cnn", num_classes=5, in_channels=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        before = [p.detach().clone() for p in model.parameters()]
        method = create_method("sam", model, opt, rho=0.1, amp_dtype=amp)
        g = torch.Generator().manual_seed(0)
        out = method.step(Batch(torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 5, (16,), generator=g)))
        assert all(torch.isfinite(v) for v in out.values())
        steps.append(torch.cat([(p.detach() - q).flatten() for p, q in zip(model.parameters(), before)]))
    assert F.cosine_similarity(steps[0], steps[1], dim=0) > 0.99


@pytest.mark.parametrize(
    "name, hp, every_step",
    [
        ("looksam", {"k": 1, "alpha": 0.7}, {"sampled": 1.0}),
        ("esam", {"beta": 1.0, "gamma": 1.0}, {"selected": 1.0, "perturbed": 1.0}),
    ],
    ids=["looksam k=1", "esam beta=1 gamma=1"],
)
def test_variant_at_its_sam_setting_is_sam(name, hp, every_step):
    """LookSAM computing the SAM gradient every step, ESAM keeping every tensor and every sample."""
    model, opt, method = build(name, rho=0.2, **hp)
    ref_model, ref_opt, ref = build("sam", rho=0.2)
    for s in range(3):
        out = method.step(batch(s))
        ref.step(batch(s))
        assert {key: out[key].item() for key in every_step} == every_step
    assert_same_state(model, opt, ref_model, ref_opt)


def test_hyperparameter_ranges():
    bad = [
        ("sam", {"rho": -0.1}),
        ("asam", {"eta": -1.0}),
        ("sam", {"m": 0}),
        ("looksam", {"k": 0}),
        ("looksam", {"alpha": -0.5}),
        ("looksam", {"rho": -1.0}),
        ("esam", {"beta": 0.0}),
        ("esam", {"beta": 1.5}),
        ("esam", {"gamma": 0.0}),
        ("esam", {"gamma": 1.01}),
        ("esam", {"rho": -1.0}),
    ]
    for name, hp in bad:
        with pytest.raises(UsageError, match=f"{next(iter(hp))} for method '{name}'"):
            method_class(name).resolve_hparams(hp)
    assert method_class("asam").hparams["adaptive"] is True


# ---------------------------------------------------------------------- LookSAM


def test_looksam_with_alpha0_is_periodic_sam():
    model, opt, method = build("looksam", rho=0.2, k=3, alpha=0.0)
    ref_model = small_mlp()
    ref_opt = sgd(ref_model)
    sam, plain = create_method("sam", ref_model, ref_opt, rho=0.2), create_method("sgd", ref_model, ref_opt)
    sampled = []
    for s in range(7):
        sampled.append(method.step(batch(s))["sampled"].item())
        (sam if s % 3 == 0 else plain).step(batch(s))
    assert sampled == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    assert_same_state(model, opt, ref_model, ref_opt)


def test_looksam_decomposition_and_reuse_step():
    model, opt, method = build("looksam", rho=0.3, k=2, alpha=0.7)
    ref_model = copy.deepcopy(model)
    ref_opt = sgd(ref_model)
    b0, b1 = batch(0), batch(1)
    r = reference_sam(ref_model, b0.x, b0.y, rho=0.3)
    out = method.step(b0)
    g, g_s = r["g"], r["g_s"]
    coef = sum((a * c).sum() for a, c in zip(g, g_s)) / norm(g) ** 2
    g_h = [coef * a for a in g]
    g_v = [c - h for c, h in zip(g_s, g_h)]
    assert abs(sum((a * v).sum() for a, v in zip(g, g_v))) < 1e-12 * norm(g) * norm(g_s)
    u = [v / norm(g_v) for v in g_v]
    for stored, expected in zip(method.direction, u):
        torch.testing.assert_close(stored, expected, **TOL)
    base_step(ref_model, ref_opt, g_s)
    assert_same_state(model, opt, ref_model, ref_opt)
    assert out["sampled"].item() == 1.0 and "sharpness" in out

    # reuse: one pass, g + alpha (||g|| / ||g_v||) g_v
    w = [p.detach() for p in ref_model.parameters()]
    _, g1 = gradient_at(ref_model, w, b1.x, b1.y)
    out = method.step(b1)
    update = [a + 0.7 * norm(g1) / norm(g_v) * v for a, v in zip(g1, g_v)]
    torch.testing.assert_close(norm([p.grad - a for p, a in zip(model.parameters(), g1)]), 0.7 * norm(g1), **TOL)
    base_step(ref_model, ref_opt, update)
    assert_same_state(model, opt, ref_model, ref_opt)
    assert out["sampled"].item() == 0.0 and "sharpness" not in out
    torch.testing.assert_close(out["grad_norm"], norm(g1), **TOL)
    torch.testing.assert_close(out["sam_grad_norm"], norm(update), **TOL)


def test_looksam_parallel_sam_gradient_reuses_nothing():
    """A = c I: g_S = g (1 + c rho / ||g||) is parallel to g, g_v = 0: the reuse steps are plain SGD."""
    w_star, w0 = torch.zeros(4), torch.tensor([1.0, -2.0, 0.5, 3.0])
    model, method = quadratic_method("looksam", 2.0 * torch.eye(4), w_star, w0, lr=0.1, rho=0.3, k=5, alpha=0.7)
    method.step(batch(0))
    assert all(torch.equal(u, torch.zeros_like(u)) for u in method.direction)
    w = model.w.detach().clone()
    out = method.step(batch(1))
    assert all(torch.isfinite(v) for v in out.values())
    torch.testing.assert_close(model.w.grad, 2.0 * w, **TOL)


def test_looksam_step_counter_and_direction_survive_a_checkpoint():
    model, opt, method = build("looksam", rho=0.2, k=3, alpha=0.5)
    for s in range(2):
        method.step(batch(s))
    saved = checkpoint_round_trip(model.state_dict(), opt.state_dict(), method.state_dict())
    assert "step" not in opt.state[next(model.parameters())]  # torch.optim.SGD keeps no step count

    model2, opt2, method2 = build("looksam", model=small_mlp(seed=5), rho=0.2, k=3, alpha=0.5)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    method2.load_state_dict(saved[2])
    for s in range(2, 6):
        a, b = method.step(batch(s)), method2.step(batch(s))
        assert a["sampled"].item() == b["sampled"].item() == float(s % 3 == 0)
    assert_same_state(model, opt, model2, opt2, rtol=0, atol=0)


# ---------------------------------------------------------------------- ESAM


def test_esam_selection_count():
    assert selected_count(0.25, 10) == 3  # ceil(2.5)
    assert selected_count(0.3, 10) == 3  # 0.3 * 10 = 3.0000000000000004 in floating point
    assert selected_count(0.5, 128) == 64
    assert selected_count(1e-6, 10) == 1
    assert selected_count(1.0, 7) == 7


def test_esam_sds_trains_on_the_samples_whose_loss_rises_most():
    model, opt, method = build("esam", rho=0.5, beta=1.0, gamma=0.25)
    ref_model = copy.deepcopy(model)
    b = batch(0, n=10)
    w = [p.detach() for p in ref_model.parameters()]
    r = reference_sam(ref_model, b.x, b.y, rho=0.5)
    per_sample = lambda m, ws: F.cross_entropy(  # noqa: E731
        functional_call(m, dict(zip([n for n, _ in m.named_parameters()], ws)), (b.x,)), b.y, reduction="none"
    )
    rise = per_sample(ref_model, [a + e for a, e in zip(w, r["eps"])]) - per_sample(ref_model, w)
    top = rise.argsort(descending=True)[:3]
    assert rise[top].min() > rise[rise.argsort(descending=True)[3]]  # no tie at the cut in this batch
    _, expected = gradient_at(ref_model, [a + e for a, e in zip(w, r["eps"])], b.x[top], b.y[top])
    out = method.step(b)
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, **TOL)
    torch.testing.assert_close(out["selected"], torch.tensor(0.3), **TOL)
    torch.testing.assert_close(out["sharpness"], rise.mean(), **TOL)
    torch.testing.assert_close(out["loss"], r["loss"], **TOL)


def test_esam_dropout_masks_of_its_three_passes():
    """The sharpness forward compares the same masks as pass 1 (a replay). Pass 2 on a selection
    cannot have its rows' pass-1 masks; replaying the RNG would give it those of rows 0..n-1, so
    it draws fresh ones (the official code draws fresh masks in every pass)."""
    model, opt, method = build("esam", model=small_mlp(dropout=0.5), rho=0.3, beta=1.0, gamma=0.5)
    masks = []
    model[-2].register_forward_hook(lambda m, args, out: masks.append(out != 0))
    torch.manual_seed(3)
    method.step(batch(0))
    pass1, sharpness, pass2 = masks
    assert pass1.shape[0] == 8 and pass2.shape[0] == 4
    assert torch.equal(sharpness, pass1)
    assert not torch.equal(pass2, pass1[:4])


def test_esam_swp_perturbs_the_kept_tensors_by_rho_over_beta():
    model, opt, method = build("esam", rho=0.4, beta=0.5, gamma=1.0)
    n = len(list(model.parameters()))
    seed = next(s for s in range(100) if 0 < int((torch.manual_seed(s), torch.rand(n) < 0.5)[1].sum()) < n)
    torch.manual_seed(seed)
    keep = (torch.rand(n) < 0.5).tolist()  # the documented draw: U_i < beta, first thing in the step
    ref_model = copy.deepcopy(model)
    b = batch(0)
    w = [p.detach() for p in ref_model.parameters()]
    _, g = gradient_at(ref_model, w, b.x, b.y)
    g_k = [gi for gi, k in zip(g, keep) if k]
    eps = [0.4 / 0.5 * gi / norm(g_k) if k else torch.zeros_like(gi) for gi, k in zip(g, keep)]
    _, expected = gradient_at(ref_model, [a + e for a, e in zip(w, eps)], b.x, b.y)
    torch.manual_seed(seed)
    out = method.step(b)
    for p, ge in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, ge, **TOL)
    torch.testing.assert_close(out["perturbed"], torch.tensor(sum(keep) / n), **TOL)
    torch.testing.assert_close(out["grad_norm"], norm(g_k), **TOL)


def test_esam_with_no_tensor_kept_takes_a_finite_step():
    model, opt, method = build("esam", rho=0.4, beta=0.01, gamma=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(0)
    out = method.step(batch(0))
    assert out["perturbed"].item() == 0.0
    assert all(torch.isfinite(v) for v in out.values())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


# ---------------------------------------------------------------------- data parallel (2 CPU ranks, gloo)


# (method, hyper-parameters on each of 2 ranks of 4 rows, those of the one-process run on all 8 rows)
DATA_PARALLEL = [
    ("sam", {"rho": 0.3}, {"rho": 0.3, "m": 4}),  # per-rank ascent: m-sharpness, m = 4
    ("sam", {"rho": 0.3, "sync_ascent": True}, {"rho": 0.3}),
    ("looksam", {"rho": 0.3, "k": 2, "alpha": 0.7, "sync_ascent": True}, {"rho": 0.3, "k": 2, "alpha": 0.7}),
    ("esam", {"rho": 0.3, "gamma": 1.0, "sync_ascent": True}, {"rho": 0.3, "gamma": 1.0}),
]


def data_parallel_worker(rank, init_file, out_file):
    """What the training loop wires up under torchrun, without the loop: the optimizer's GradSync
    pre-hook averages .grad once per step, and the method reaches the other rank through its World."""
    import torch.distributed as dist

    from gvr_lab.distributed import GradSync, World

    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    results = []
    for name, hp, _ in DATA_PARALLEL:
        model, opt, method = build(name, **hp)
        method.sync_grads, method.world = GradSync(opt, World(rank, 2)).now, World(rank, 2)
        for s in range(3):
            b = batch(s)
            method.step(Batch(b.x[4 * rank : 4 * rank + 4], b.y[4 * rank : 4 * rank + 4]))
        results.append([p.detach() for p in model.parameters()])
    gathered = [None, None]
    dist.all_gather_object(gathered, results)
    if rank == 0:
        torch.save(gathered, out_file)
    dist.destroy_process_group()


def test_data_parallel_ascent_per_rank_and_synced(tmp_path):
    """2 ranks of 4 rows, float64: the ranks stay identical, per-rank SAM is one process with m = 4,
    and the sync_ascent variants are one process with all 8 rows."""
    torch.multiprocessing.start_processes(
        data_parallel_worker, args=(str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=2, start_method="fork"
    )  # spawn would re-import torch: slow
    rank0, rank1 = torch.load(tmp_path / "out.pt", weights_only=True)
    for (name, _, one_hp), mine, other in zip(DATA_PARALLEL, rank0, rank1):
        assert all(torch.equal(p, q) for p, q in zip(mine, other)), name
        model, _, method = build(name, **one_hp)
        for s in range(3):
            method.step(batch(s))
        for p, q in zip(model.parameters(), mine):
            torch.testing.assert_close(p.detach(), q, **TOL)
