"""GVR (gvr_lab/methods/gvr.py) against references written directly from its formula.

J = La + Lb + alpha * ||grad_T L^a_S - grad_T L^b_S||^2 (or (La + Lb) / 2 + ...), with S a random
subset shared by both views. Float64 on a small smooth (tanh) MLP so the exact, closed-form and
finite-difference penalties can be compared tightly; BatchNorm only where it is the point.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gvr_lab.data import Batch
from gvr_lab.errors import UsageError
from gvr_lab.methods import create_method, method_class
from gvr_lab.models import create_model

N, SUBSET, CLASSES, SEED = 24, 8, 5, 123


class MLP(nn.Module):
    """BN-free unless asked; the names (fc_embed, conv5_x) are decoys for a name-substring target."""

    def __init__(self, bn: bool = False, head_bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.fc_embed = nn.Sequential(nn.Flatten(), nn.Linear(48, 24), *([nn.BatchNorm1d(24)] if bn else []), nn.Tanh())
        self.conv5_x = nn.Sequential(nn.Linear(24, 24), nn.Tanh(), *([nn.Dropout(dropout)] if dropout else []))
        self.stage = nn.Sequential(nn.Linear(24, 16), nn.Tanh())
        self.fc = nn.Linear(16, CLASSES, bias=head_bias)

    @property
    def last_stage(self) -> nn.Module:
        return self.stage

    def forward_features(self, x):
        return self.stage(self.conv5_x(self.fc_embed(x)))

    def forward(self, x):
        return self.fc(self.forward_features(x))


def make_model(dtype=torch.float64, **kw) -> MLP:
    torch.manual_seed(0)
    return MLP(**kw).to(dtype)


def make_batch(dtype=torch.float64, same_views: bool = False) -> Batch:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 3, 4, 4, generator=g, dtype=dtype)
    x2 = x.clone() if same_views else x + 0.5 * torch.randn(x.shape, generator=g, dtype=dtype)
    return Batch(x, torch.randint(0, CLASSES, (N,), generator=g), x2=x2)


def run_step(model, batch, label_smoothing=0.0, **hp):
    """One GVR step with plain SGD at lr 1 on a copy of `model`: (applied gradient, metrics, method, copy)."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    method = create_method("gvr", model, optimizer, label_smoothing=label_smoothing, **hp)
    before = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(SEED)
    out = method.step(batch)
    update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    return update, out, method, model


def expected_rows(n=N, subset=SUBSET):
    torch.manual_seed(SEED)
    return torch.randperm(n)[: min(subset, n)]


def target_modules(model, target):
    return {"fc": [model.fc], "last_stage": [model.last_stage, model.fc], "all": [model]}[target]


def reference(model, batch, rows, alpha, target, reduction="sum", label_smoothing=0.0):
    """grad J by plain autograd, J = data + alpha * sum ||g_a - g_b||^2 over the target tensors."""
    model = copy.deepcopy(model)
    params = list(model.parameters())
    tparams = [p for m in target_modules(model, target) for p in m.parameters()]

    def ce(x, y):
        return F.cross_entropy(model(x), y, label_smoothing=label_smoothing)

    y_s = batch.y[rows]
    g_a = torch.autograd.grad(ce(batch.x[rows], y_s), tparams, create_graph=True)
    g_b = torch.autograd.grad(ce(batch.x2[rows], y_s), tparams, create_graph=True)
    penalty = sum(((a - b) ** 2).sum() for a, b in zip(g_a, g_b))
    loss_a, loss_b = ce(batch.x, batch.y), ce(batch.x2, batch.y)
    data = loss_a + loss_b if reduction == "sum" else (loss_a + loss_b) / 2
    grad = torch.autograd.grad(data + alpha * penalty, params)
    return torch.cat([g.flatten() for g in grad]), penalty.detach(), loss_a.detach(), loss_b.detach()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


PENALTY_TARGETS = [
    ("closed_form", "fc"),
    ("exact", "fc"),
    ("exact", "last_stage"),
    ("exact", "all"),
    ("fd", "fc"),
    ("fd", "last_stage"),
    ("fd", "all"),
]


# ---------------------------------------------------------------------------------------------- formula


@pytest.mark.parametrize("penalty, target", [pt for pt in PENALTY_TARGETS if pt[0] != "fd"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_update_and_metrics_match_the_formula(penalty, target, reduction):
    model, batch = make_model(), make_batch()
    update, out, _, _ = run_step(
        model, batch, alpha=0.3, target=target, penalty=penalty, subset=SUBSET, reduction=reduction
    )
    ref, penalty_ref, loss_a, loss_b = reference(model, batch, expected_rows(), 0.3, target, reduction)
    assert rel(update, ref) < 1e-10
    assert torch.allclose(out["penalty"], penalty_ref, rtol=1e-10, atol=0)
    assert penalty_ref > 1e-3  # the views differ, so the comparison above is not 0 == 0
    assert torch.allclose(out["grad_diff_norm"], penalty_ref.sqrt(), rtol=1e-10, atol=0)
    assert torch.allclose(out["loss"], loss_a, rtol=1e-12, atol=0)  # all N rows of view a
    assert torch.allclose(out["loss2"], loss_b, rtol=1e-12, atol=0)
    assert torch.allclose(out["grad_norm"], ref.norm(), rtol=1e-10, atol=0)
    assert all(v.dim() == 0 and not v.requires_grad for v in out.values())


def test_exact_matches_the_formula_with_batchnorm_and_label_smoothing():
    # BN normalizes each penalty pass with its subset's statistics, as the reference's own forwards do.
    model, batch = make_model(bn=True), make_batch()
    update, *_ = run_step(model, batch, label_smoothing=0.1, alpha=0.3, target="last_stage", subset=SUBSET)
    ref, *_ = reference(model, batch, expected_rows(), 0.3, "last_stage", label_smoothing=0.1)
    assert rel(update, ref) < 1e-10


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("head_bias", [True, False])
def test_closed_form_equals_exact_on_fc(label_smoothing, head_bias):
    model, batch = make_model(head_bias=head_bias), make_batch()
    parts = {}
    for penalty in ("closed_form", "exact"):
        with_penalty, out, *_ = run_step(model, batch, label_smoothing, alpha=1.0, target="fc", penalty=penalty)
        without, *_ = run_step(model, batch, label_smoothing, alpha=0.0, target="fc", penalty=penalty)
        parts[penalty] = with_penalty, with_penalty - without, out["penalty"]
    (closed, closed_part, closed_p), (exact, exact_part, exact_p) = parts["closed_form"], parts["exact"]
    assert abs(closed_p - exact_p) <= 1e-10 * exact_p
    assert rel(closed, exact) < 1e-10
    assert exact_part.norm() > 1e-3 * exact.norm()  # the penalty's share is visible at this tolerance
    assert rel(closed_part, exact_part) < 1e-10


@pytest.mark.parametrize("target", ["fc", "last_stage", "all"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-3), (torch.float32, 3e-3)])
def test_fd_close_to_exact(target, dtype, tol):
    # Relative error of the penalty's part of the update at fd_eps=1e-3, measured on this model:
    # float64 7e-5..5e-4 (truncation, linear in fd_eps), float32 5e-4..7e-4 (rounding, which grows
    # as fd_eps shrinks: ~1e-2 at 1e-4). Tolerances leave a 2-4x margin.
    model, batch = make_model(dtype), make_batch(dtype)
    parts, values = {}, {}
    for penalty in ("exact", "fd"):
        with_penalty, out, *_ = run_step(model, batch, alpha=1.0, target=target, penalty=penalty)
        without, *_ = run_step(model, batch, alpha=0.0, target=target, penalty=penalty)
        parts[penalty], values[penalty] = with_penalty - without, out["penalty"]
    assert rel(parts["fd"], parts["exact"]) < tol
    assert abs(values["fd"] - values["exact"]) <= (1e-12 if dtype == torch.float64 else 1e-5) * values["exact"]


@pytest.mark.parametrize("target", ["last_stage", "all"])
def test_fd_with_dropout_probes_with_the_masks_of_the_clean_pass(target):
    """The moved pass of fd must drop the same units as the pass it is differenced with; new masks
    made its penalty gradient 1e2..1e4 x exact's, growing like 1/fd_eps. With the masks replayed,
    fd is as close to exact as without dropout (test_fd_close_to_exact)."""
    model, batch = make_model(dropout=0.1), make_batch()
    parts = {}
    for penalty in ("exact", "fd"):
        with_penalty, *_ = run_step(model, batch, alpha=1.0, target=target, penalty=penalty)
        without, *_ = run_step(model, batch, alpha=0.0, target=target, penalty=penalty)
        parts[penalty] = with_penalty - without
    assert parts["exact"].norm() > 1e-3  # the penalty's share is there to be compared
    assert rel(parts["fd"], parts["exact"]) < 1e-3


def test_a_model_without_last_stage_trains_with_targets_that_do_not_need_it():
    class Plain(nn.Module):  # a user's model: a head called fc, nothing else of the convention
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.Tanh())
            self.fc = nn.Linear(16, CLASSES)

        def forward(self, x):
            return self.fc(self.body(x))

    for target, penalty in [("fc", "exact"), ("fc", "fd"), ("all", "exact"), ("all", "fd")]:
        model = Plain().double()
        update, out, *_ = run_step(model, make_batch(), alpha=0.3, target=target, penalty=penalty)
        assert out["penalty"] > 0 and torch.isfinite(update).all()
    # closed_form reads fc's input by a hook: without forward_features it is still exact's update
    model = Plain().double()
    closed, *_ = run_step(model, make_batch(), alpha=0.3, target="fc", penalty="closed_form")
    exact, *_ = run_step(model, make_batch(), alpha=0.3, target="fc", penalty="exact")
    assert rel(closed, exact) < 1e-10
    with pytest.raises(
        UsageError,
        match=r"^method 'gvr' with target 'last_stage' and penalty 'exact' needs "
        r"model.last_stage, which Plain lacks; use target 'all'",
    ):
        create_method("gvr", model, torch.optim.SGD(model.parameters(), lr=0.1), target="last_stage")


def test_a_model_without_a_head_or_whose_output_is_not_the_heads_is_refused_in_one_line():
    headless = nn.Sequential(nn.Flatten(), nn.Linear(48, CLASSES)).double()
    with pytest.raises(
        UsageError,
        match=r"^method 'gvr' with target 'fc' and penalty 'exact' needs the model's classifier head, which "
        r"Sequential lacks: give the model `fc` \(the nn.Linear that produces the logits\), `classifier`",
    ):
        create_method("gvr", headless, torch.optim.SGD(headless.parameters(), lr=0.1), target="fc")

    class Scaled(nn.Module):  # a head, but the logits are not its output
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(48, CLASSES)

        def forward(self, x):
            return 2 * self.fc(x.flatten(1))

    with pytest.raises(UsageError, match=r"the output of Scaled is not that head's, of one call per forward"):
        run_step(Scaled().double(), make_batch(), target="fc", penalty="closed_form")


# ---------------------------------------------------------------------------------------------- pitfalls


@pytest.mark.parametrize("penalty, target", PENALTY_TARGETS)
@pytest.mark.parametrize("bn", [False, True])
def test_identical_views_give_zero_penalty_and_zero_penalty_gradient(penalty, target, bn):
    model, batch = make_model(bn=bn), make_batch(same_views=True)
    update, out, *_ = run_step(model, batch, alpha=1.0, target=target, penalty=penalty)
    no_penalty, *_ = run_step(model, batch, alpha=0.0, target=target, penalty=penalty)
    assert out["penalty"] == 0 and out["grad_diff_norm"] == 0
    assert torch.equal(update, no_penalty)


@pytest.mark.parametrize("penalty, target", [("closed_form", "fc"), ("exact", "last_stage"), ("fd", "all")])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_alpha_zero_is_two_view_sgd(penalty, target, reduction):
    model, batch = make_model(), make_batch()
    update, *_ = run_step(model, batch, alpha=0.0, target=target, penalty=penalty, reduction=reduction)
    reference_model = copy.deepcopy(model)
    params = list(reference_model.parameters())
    grad_a = torch.autograd.grad(F.cross_entropy(reference_model(batch.x), batch.y), params)
    grad_b = torch.autograd.grad(F.cross_entropy(reference_model(batch.x2), batch.y), params)
    two_view = torch.cat([(a + b).flatten() for a, b in zip(grad_a, grad_b)])
    assert rel(update, two_view if reduction == "sum" else two_view / 2) < 1e-12


@pytest.mark.parametrize("penalty, target", [("closed_form", "fc"), ("exact", "last_stage"), ("fd", "last_stage")])
def test_penalty_gradient_reaches_the_update_and_the_body(penalty, target):
    # create_graph=False (the GVR repo's first upload) would leave the update at its alpha=0 value.
    model, batch = make_model(), make_batch()
    update, *_ = run_step(model, batch, alpha=0.01, target=target, penalty=penalty)
    no_penalty, *_ = run_step(model, batch, alpha=0.0, target=target, penalty=penalty)
    assert rel(update, no_penalty) > 1e-4
    # grad P = 2 (H_a - H_b) d reaches parameters outside the target set too.
    body = sum(p.numel() for p in model.fc_embed.parameters())
    assert rel(update[:body], no_penalty[:body]) > 1e-5


@pytest.mark.parametrize("penalty", ["closed_form", "exact", "fd"])
def test_subset_is_shared_by_both_views_and_data_losses_use_all_rows(penalty):
    model, batch = make_model(), make_batch()
    copy_model = copy.deepcopy(model)
    seen = []
    hook = copy_model.fc_embed.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    target = "fc" if penalty == "closed_form" else "last_stage"
    try:
        optimizer = torch.optim.SGD(copy_model.parameters(), lr=1.0)
        method = create_method("gvr", copy_model, optimizer, alpha=0.3, target=target, penalty=penalty, subset=SUBSET)
        torch.manual_seed(SEED)
        out = method.step(batch)
    finally:
        hook.remove()
    rows = expected_rows()
    subset_passes = {"closed_form": 0, "exact": 1, "fd": 2}[penalty]
    expected = [batch.x[rows], batch.x2[rows]] * subset_passes + [batch.x, batch.x2]
    assert len(seen) == len(expected) and all(torch.equal(s, e) for s, e in zip(seen, expected))

    # The penalty is that of the shared rows; rows drawn independently per view give another value.
    def penalty_of(rows_a, rows_b):
        mixed = copy.deepcopy(model)
        params = [p for m in target_modules(mixed, target) for p in m.parameters()]
        ga = torch.autograd.grad(F.cross_entropy(mixed(batch.x[rows_a]), batch.y[rows_a]), params)
        gb = torch.autograd.grad(F.cross_entropy(mixed(batch.x2[rows_b]), batch.y[rows_b]), params)
        return sum(((a - b) ** 2).sum() for a, b in zip(ga, gb))

    assert torch.allclose(out["penalty"], reference(model, batch, rows, 0.3, target)[1], rtol=1e-10, atol=0)
    assert torch.allclose(out["penalty"], penalty_of(rows, rows), rtol=1e-10, atol=0)
    other = torch.arange(N)[~torch.isin(torch.arange(N), rows)][:SUBSET]  # a subset of other rows for view b
    assert not torch.allclose(out["penalty"], penalty_of(rows, other), rtol=1e-3)


def test_subset_larger_than_batch_uses_the_whole_batch():
    model, batch = make_model(), make_batch()
    update, out, *_ = run_step(model, batch, alpha=0.3, target="all", subset=10 * N)
    ref, penalty, *_ = reference(model, batch, torch.arange(N), 0.3, "all")
    assert rel(update, ref) < 1e-10 and torch.allclose(out["penalty"], penalty, rtol=1e-10, atol=0)


@pytest.mark.parametrize("penalty, target", [("closed_form", "fc"), ("exact", "last_stage"), ("fd", "all")])
def test_bn_running_stats_advance_once_as_one_clean_forward_of_view_a(penalty, target):
    model, batch = make_model(bn=True), make_batch()
    clean = copy.deepcopy(model)
    with torch.no_grad():
        clean(batch.x)
    *_, stepped = run_step(model, batch, alpha=0.3, target=target, penalty=penalty)
    bn, bn_clean, bn_init = stepped.fc_embed[2], clean.fc_embed[2], model.fc_embed[2]
    assert not torch.equal(bn_clean.running_mean, bn_init.running_mean)
    assert torch.equal(stepped.fc_embed[2].num_batches_tracked, torch.tensor(1))
    assert torch.allclose(bn.running_mean, bn_clean.running_mean, rtol=1e-14, atol=1e-15)
    assert torch.allclose(bn.running_var, bn_clean.running_var, rtol=1e-14, atol=1e-15)


# ---------------------------------------------------------------------------------------------- setup


def resnet18_on_meta():
    with torch.device("meta"):
        return create_model("resnet18", num_classes=100)


@pytest.mark.parametrize("target, count", [("fc", 51_300), ("last_stage", 8_445_028), ("all", 11_220_132)])
def test_target_sets_of_resnet18_cifar100(target, count):
    model = resnet18_on_meta()
    method = create_method("gvr", model, torch.optim.SGD(model.parameters(), lr=0.1), target=target)
    assert sum(p.numel() for p in method.target_params) == count
    wanted = {id(p) for m in target_modules(model, target) for p in m.parameters()}
    assert {id(p) for p in method.target_params} == wanted


def test_target_is_chosen_by_module_not_by_name():
    # fc_embed and conv5_x contain the GVR repo's name patterns ("fc", "conv5_x") but are not targets.
    model = make_model()
    method = create_method("gvr", model, torch.optim.SGD(model.parameters(), lr=0.1), target="last_stage")
    assert {id(p) for p in method.target_params} == {id(p) for m in (model.stage, model.fc) for p in m.parameters()}


def test_hyperparameters_validation_and_compilability():
    cls = method_class("gvr")
    assert cls.views == 2 and cls.hparams == {
        "alpha": 0.01,
        "target": "last_stage",
        "subset": 32,
        "reduction": "sum",
        "penalty": "exact",
        "fd_eps": 1e-3,
    }
    model = make_model()
    for penalty, target, compilable in [("closed_form", "fc", True), ("exact", "fc", False), ("fd", "all", True)]:
        method = create_method(
            "gvr", model, torch.optim.SGD(model.parameters(), lr=0.1), penalty=penalty, target=target
        )
        assert method.compilable is compilable
    bad = [
        ({"alpha": -0.1}, "alpha"),
        ({"subset": 0}, "subset"),
        ({"fd_eps": 0.0}, "fd_eps"),
        ({"penalty": "closed_form"}, "needs target 'fc'"),
        ({"target": "head"}, "valid: fc, last_stage, all"),
        ({"reduction": "max"}, "valid: sum, mean"),
        ({"penalty": "hvp"}, "valid: closed_form, exact, fd"),
    ]
    for hp, message in bad:
        with pytest.raises(UsageError, match=message):
            cls.resolve_hparams(hp)
