"""LSQ (gvr_lab/quant.py) against the paper's formulas.

References are written from the formulas with plain autograd; float64 unless the point is fp32
(autocast, compile, the registered models).
"""

import copy
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gvr_lab.data import Batch
from gvr_lab.errors import UsageError
from gvr_lab.methods import create_method, list_methods, method_class
from gvr_lab.models import create_model, list_models
from gvr_lab.quant import (
    MIN_STEP,
    ActivationQuantizer,
    QuantConv2d,
    QuantLinear,
    WeightQuantizer,
    lsq_quantize,
    quant_range,
    quantize_layer,
    quantize_model,
    scale_grad,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class SignNet(nn.Module):
    """Image -> conv -> BN -> conv -> ReLU -> fc: inputs signed, signed (BN output), unsigned."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2, padding=1)
        self.fc = nn.Linear(5 * 4 * 4, 3)

    def forward_features(self, x):
        return torch.flatten(F.relu(self.conv2(self.bn(self.conv1(x)))), 1)

    def forward(self, x):
        return self.fc(self.forward_features(x))


def codes(v_hat: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The integer codes of v_hat, after checking that v_hat lies exactly on the grid s * Z."""
    k = (v_hat / s).detach().round()
    assert torch.equal(v_hat.detach(), s.detach() * k)
    return k


# ---------------------------------------------------------------------- usage


@pytest.mark.parametrize("bits", [1, 17, 0, 4.0, True, "4"])
def test_bits_must_be_int_in_2_to_16(bits):
    with pytest.raises(UsageError, match=r"^quant_bits must be an integer in \[2, 16\], got .*$"):
        quantize_model(create_model("tiny_cnn"), bits)


def step_sizes(model):
    """Every LSQ step-size Parameter of the model (weight and activation quantizers)."""
    return [m.step for m in model.modules() if isinstance(m, (WeightQuantizer, ActivationQuantizer))]


def test_quantize_once_and_first_last_bits_needs_keep():
    model = quantize_model(create_model("tiny_cnn"), 4)
    with pytest.raises(UsageError, match="already quantized"):
        quantize_model(model, 4)
    with pytest.raises(UsageError, match="first_last_bits"):
        quantize_model(create_model("tiny_cnn"), 4, keep_first_last=False, first_last_bits=8)


def test_ranges():
    assert quant_range(2, signed=True) == (2, 1)  # codes -2, -1, 0, 1
    assert quant_range(2, signed=False) == (0, 3)
    assert quant_range(8, signed=True) == (128, 127)
    assert quant_range(16, signed=False) == (0, 65535)


# ---------------------------------------------------------------------- forward: grid, levels, error


def test_two_bit_weight_has_at_most_four_levels(float64):
    linear = nn.Linear(64, 32)
    with torch.no_grad():
        linear.weight.normal_(generator=gen(0))
    layer = quantize_layer(linear, 2)
    w_hat = layer.weight_quant(layer.weight)
    s = layer.weight_quant.step
    levels = torch.unique(codes(w_hat, s))
    assert len(levels) <= 4
    assert set(levels.tolist()) <= {-2.0, -1.0, 0.0, 1.0}
    # Gaussian weights: s0 = 2 mean|w| = 1.6 sigma, so w/s < -1.5 (code -2) for ~0.8% of them.
    assert set(levels.tolist()) == {-2.0, -1.0, 0.0, 1.0}


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("signed", [True, False])
def test_grid_levels_and_rounding_error(float64, bits, signed):
    q_n, q_p = quant_range(bits, signed)
    v = torch.randn(20000, generator=gen(bits)) * 3
    s = torch.tensor(2 * v.abs().mean().item() / math.sqrt(q_p))
    v_hat = lsq_quantize(v, s, q_n, q_p, 1.0)
    k = codes(v_hat, s)
    assert k.min() >= -q_n and k.max() <= q_p
    assert len(torch.unique(k)) <= 2**bits
    in_range = (v / s > -q_n) & (v / s < q_p)
    # Within s/2 of the input wherever it is not clipped.
    assert (v_hat - v)[in_range].abs().max() <= s / 2 * (1 + 1e-12)
    # Negatives clip to 0 for unsigned quantizers.
    if not signed:
        assert torch.all(v_hat[v < 0] == 0)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_idempotent(float64, bits, signed):
    q_n, q_p = quant_range(bits, signed)
    v = torch.randn(5000, generator=gen(1))
    s = torch.tensor(0.3)
    once = lsq_quantize(v, s, q_n, q_p, 1.0)
    assert torch.equal(lsq_quantize(once, s, q_n, q_p, 1.0), once)

    quantizer = WeightQuantizer(v, bits)
    w_hat = quantizer(v)
    assert torch.equal(quantizer(w_hat), w_hat)


def test_no_grad_forward_is_identical(float64):
    """Evaluation takes a shortcut past the STE's detach arithmetic; the values must not change."""
    torch.manual_seed(0)
    model = quantize_model(create_model("tiny_cnn"), 3, keep_first_last=False)
    x = torch.randn(4, 3, 16, 16, generator=gen(18))
    with_grad = model(x)
    with torch.no_grad():
        assert torch.equal(model(x), with_grad)


def test_16_bits_is_close_to_float(float64):
    """Relative logit error at 16 bits <= 1e-2, and 8 -> 16 bits shrinks it about 16-fold.

    The init step is 2 mean|v| / sqrt(Q_P): at 16 bits mean|v|/90 (signed) or mean|v|/128
    (unsigned), so every weight and activation moves by at most s/2, 0.4-0.6% of its tensor's
    mean magnitude, nothing clips (the range is hundreds of times mean|v|) and the rounding errors
    are zero-mean: the logits move by the same order (measured 2e-3 to 3e-3 here), well under
    1e-2, while a wrong range, a clip or a sign error gives O(1). The error scales with s, i.e.
    with 1/sqrt(Q_P): sqrt(Q_P(16) / Q_P(8)) = 16 (measured 15-17); 8 is the bound.
    """
    torch.manual_seed(0)
    base = create_model("tiny_cnn")
    x = torch.randn(8, 3, 32, 32, generator=gen(0))
    y0 = base(x)
    for keep in (True, False):
        err = {}
        for bits in (8, 16):
            y = quantize_model(copy.deepcopy(base), bits, keep_first_last=keep)(x)
            err[bits] = ((y - y0).norm() / y0.norm()).item()
        assert err[16] <= 1e-2, (keep, err)
        assert err[8] / err[16] > 8, (keep, err)


# ---------------------------------------------------------------------- gradients


def test_ste_input_gradient(float64):
    q_n, q_p = quant_range(4, signed=True)  # -8 .. 7
    s = torch.tensor(0.5)
    ratio = torch.tensor([-9.5, -8.4, -7.3, 0.2, 3.6, 6.4, 7.8, 12.0])
    v = (ratio * s).requires_grad_()
    (grad,) = torch.autograd.grad(lsq_quantize(v, s, q_n, q_p, 1.0).sum(), v)
    assert grad.tolist() == [0, 0, 1, 1, 1, 1, 0, 0]


def per_element_step_grad(v, s, q_n, q_p, g=1.0):
    s = s.clone().requires_grad_()
    return torch.autograd.functional.jacobian(lambda s_: lsq_quantize(v, s_, q_n, q_p, g), s)


def test_step_gradient_piecewise_on_hand_picked_points(float64):
    s = torch.tensor(0.5)
    q_n, q_p = quant_range(4, signed=True)  # -8 .. 7
    ratio = torch.tensor([1.49, 1.51, -2.49, -2.51, -9.0, 7.7, 0.0])
    got = per_element_step_grad(ratio * s, s, q_n, q_p)
    torch.testing.assert_close(got, torch.tensor([-0.49, 0.49, 0.49, -0.49, -8.0, 7.0, 0.0]), rtol=0, atol=1e-12)

    q_n, q_p = quant_range(4, signed=False)  # 0 .. 15
    ratio = torch.tensor([-0.7, 2.3, 16.5])
    got = per_element_step_grad(ratio * s, s, q_n, q_p)
    torch.testing.assert_close(got, torch.tensor([0.0, -0.3, 15.0]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("g", [1.0, 0.0371])
def test_step_gradient_matches_finite_difference_and_formula(float64, g):
    """LSQ's d v_hat/d s is not the derivative of the forward (piecewise constant in the codes); it is
    the derivative of the surrogate s * (clip(v/s) + r) with the rounding residual r frozen. A central
    difference of that surrogate, and the piecewise formula, must both give the autograd gradient
    (times g, the gradient scale)."""
    q_n, q_p = quant_range(3, signed=True)
    v = torch.randn(3000, generator=gen(2)) * 2
    c = torch.randn(3000, generator=gen(3))
    s0 = torch.tensor(0.45, requires_grad=True)
    (got,) = torch.autograd.grad((c * lsq_quantize(v, s0, q_n, q_p, g)).sum(), s0)

    s0 = s0.detach()
    clipped = (v / s0).clamp(-q_n, q_p)
    residual = clipped.round() - clipped

    def surrogate(s):
        return (c * s * ((v / s).clamp(-q_n, q_p) + residual)).sum()

    h = 1e-6
    fd = (surrogate(s0 + h) - surrogate(s0 - h)) / (2 * h)
    torch.testing.assert_close(got, g * fd, rtol=1e-8, atol=0)

    ratio = v / s0
    piecewise = torch.where(ratio <= -q_n, -q_n, torch.where(ratio >= q_p, q_p, ratio.round() - ratio))
    torch.testing.assert_close(got, g * (c * piecewise).sum(), rtol=1e-10, atol=0)


def test_grad_scale_keeps_forward_and_scales_backward_exactly(float64):
    s = torch.tensor(0.123456789, requires_grad=True)
    g = 1 / math.sqrt(1000 * 7)
    scaled = scale_grad(s, g)
    assert torch.equal(scaled.detach(), s.detach())
    (grad,) = torch.autograd.grad(3.0 * scaled, s)
    assert grad.item() == g * 3.0


def test_layer_gradient_scales(float64):
    """Weight quantizer: g = 1/sqrt(N_w Q_P); activation quantizer: N = features per example
    (C*H*W), not numel with the batch (both readings exist; the batch of 3 tells them apart)."""
    layer = quantize_layer(nn.Conv2d(3, 4, 3, padding=1), 4)
    x = torch.randn(3, 3, 5, 5, generator=gen(4))
    layer(x)  # initializes the input quantizer; the input is signed
    q_p = 7
    assert layer.weight_quant.grad_scale == 1 / math.sqrt(4 * 3 * 3 * 3 * q_p)

    y = layer(x)
    gw, ga = torch.autograd.grad(y.square().sum(), [layer.weight_quant.step, layer.input_quant.step])
    # The same graph with both scales 1, via the module's own quantizer function.
    w_step = layer.weight_quant.step.detach().clone().requires_grad_()
    a_step = layer.input_quant.step.detach().clone().requires_grad_()
    out = layer._conv_forward(
        lsq_quantize(x, a_step, 8, q_p, 1.0), lsq_quantize(layer.weight, w_step, 8, q_p, 1.0), layer.bias
    )
    gw1, ga1 = torch.autograd.grad(out.square().sum(), [w_step, a_step])
    assert torch.equal(gw, gw1 * layer.weight_quant.grad_scale)
    torch.testing.assert_close(ga, ga1 / math.sqrt(3 * 5 * 5 * q_p), rtol=1e-14, atol=0)
    assert not torch.allclose(ga, ga1 / math.sqrt(3 * 3 * 5 * 5 * q_p))

    # The scales change the backward only: the forward is bit-identical to the one with scale 1.
    assert torch.equal(y, out)


def test_linear_layer_step_gradient_against_reference(float64):
    """Wiring of QuantLinear: d loss / d s_w = g * sum_ij (d loss / d w_hat_ij) * piecewise_ij."""
    layer = quantize_layer(nn.Linear(6, 5), 3)
    x = F.relu(torch.randn(4, 6, generator=gen(5)))
    layer(x)
    s_w, s_a = layer.weight_quant.step, layer.input_quant.step
    q_n, q_p = quant_range(3, signed=True)
    (got,) = torch.autograd.grad(layer(x).square().sum(), s_w)

    w_hat = (s_w * torch.round(torch.clamp(layer.weight / s_w, -q_n, q_p))).detach().requires_grad_()
    a_n, a_p = quant_range(3, signed=False)
    x_hat = s_a * torch.round(torch.clamp(x / s_a, -a_n, a_p))
    (dw_hat,) = torch.autograd.grad(F.linear(x_hat, w_hat, layer.bias).square().sum(), w_hat)
    ratio = layer.weight / s_w
    piecewise = torch.where(ratio <= -q_n, -q_n, torch.where(ratio >= q_p, q_p, ratio.round() - ratio))
    g = 1 / math.sqrt(layer.weight.numel() * q_p)
    torch.testing.assert_close(got, g * (dw_hat * piecewise).sum(), rtol=1e-12, atol=0)


# ---------------------------------------------------------------------- initialization and signs


def test_weight_init_on_known_tensor(float64):
    linear = nn.Linear(2, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[-3.0, 1.0], [2.0, -2.0]]))  # mean |w| = 2
    assert quantize_layer(linear, 4).weight_quant.step.item() == pytest.approx(4 / math.sqrt(7), rel=1e-15)
    assert quantize_layer(linear, 2).weight_quant.step.item() == pytest.approx(4.0, rel=1e-15)
    with torch.no_grad():
        linear.weight.zero_()
    zero = quantize_layer(linear, 4)
    assert zero.weight_quant.step.item() == MIN_STEP
    assert torch.equal(zero.weight_quant(zero.weight), torch.zeros(2, 2))


def test_activation_init_from_first_batch_and_sign_rule(float64):
    torch.manual_seed(0)
    model = quantize_model(SignNet(), 4, keep_first_last=False)
    inputs = {}
    for name in ("conv1", "conv2", "fc"):
        getattr(model, name).register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0]))
    x = torch.randn(6, 3, 8, 8, generator=gen(6))
    model(x)
    expected_signed = {"conv1": True, "conv2": True, "fc": False}  # image, BN output, after ReLU
    for name, signed in expected_signed.items():
        quantizer = getattr(model, name).input_quant
        q_p = 7 if signed else 15
        assert bool(quantizer.initialized) and bool(quantizer.signed) == signed, name
        assert (quantizer.q_n, quantizer.q_p) == quant_range(4, signed)
        torch.testing.assert_close(
            quantizer.step.detach(), 2 * inputs[name].abs().mean() / math.sqrt(q_p), rtol=1e-14, atol=0
        )

    steps = [p.detach().clone() for p in step_sizes(model)]
    model(10 * torch.randn(6, 3, 8, 8, generator=gen(7)))  # later batches do not re-initialize
    assert all(torch.equal(a, b) for a, b in zip(steps, step_sizes(model)))

    unsigned = model.fc.input_quant
    assert torch.equal(unsigned(-torch.rand(2, 80, generator=gen(8))), torch.zeros(2, 80))


# ---------------------------------------------------------------------- the wrapped model


def test_structure_and_parameters():
    torch.manual_seed(0)
    model = create_model("tiny_cnn")
    weights = {name: p for name, p in model.named_parameters()}
    quantize_model(model, 4)
    x = torch.randn(2, 3, 32, 32, generator=gen(9))

    assert type(model.fc) is nn.Linear and type(model.block1[0]) is nn.Conv2d
    assert isinstance(model.block2[0], QuantConv2d) and model.last_stage is model.block2
    assert model.block2[0].weight is weights["block2.0.weight"]  # same Parameter object, in place
    torch.testing.assert_close(model(x), model.fc(model.forward_features(x)), rtol=0, atol=0)
    new = {name for name, _ in model.named_parameters()} - set(weights)
    assert new == {"block2.0.weight_quant.step", "block2.0.input_quant.step"}
    assert {id(p) for p in step_sizes(model)} == {id(p) for n, p in model.named_parameters() if n in new}

    full = quantize_model(create_model("tiny_cnn"), 4, keep_first_last=False)
    assert isinstance(full.fc, QuantLinear) and isinstance(full.fc, nn.Linear)
    assert isinstance(full.block1[0], QuantConv2d)
    torch.testing.assert_close(full(x), full.fc(full.forward_features(x)), rtol=0, atol=0)
    assert len(step_sizes(full)) == 6

    paper = quantize_model(create_model("tiny_cnn"), 4, first_last_bits=8)
    assert [paper.block1[0].input_quant.bits, paper.block2[0].input_quant.bits, paper.fc.weight_quant.bits] == [8, 4, 8]

    shared = nn.Linear(4, 4)
    twice = quantize_model(nn.Sequential(nn.Linear(4, 4), shared, nn.ReLU(), shared, nn.Linear(4, 2)), 4)
    assert isinstance(twice[1], QuantLinear) and twice[1] is twice[3]


def test_state_dict_resume_is_identical(float64):
    """Train 4 steps, or 2 steps + checkpoint + a fresh model (other seed) loading it + 2 steps."""

    def fresh(seed):
        torch.manual_seed(seed)
        model = quantize_model(create_model("tiny_cnn"), 3, keep_first_last=False)
        return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def train(model, opt, steps):
        for i in steps:
            x = torch.randn(8, 3, 16, 16, generator=gen(100 + i)) * (1 + i)
            y = torch.randint(0, 10, (8,), generator=gen(200 + i))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    ref, ref_opt = fresh(0)
    train(ref, ref_opt, range(4))

    first, first_opt = fresh(0)
    train(first, first_opt, range(2))
    ckpt = copy.deepcopy({"model": first.state_dict(), "opt": first_opt.state_dict()})
    assert ckpt["model"]["block1.0.input_quant.initialized"].item() is True
    assert "block1.0.input_quant.signed" in ckpt["model"]

    resumed, resumed_opt = fresh(1)
    resumed.load_state_dict(ckpt["model"])
    resumed_opt.load_state_dict(ckpt["opt"])
    assert resumed.block1[0].input_quant.ready  # mirrored from the buffers: no re-init on the next batch
    train(resumed, resumed_opt, range(2, 4))
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


BIG = {"vgg16", "wrn28_10", "pyramidnet110"}


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model(name):
    torch.manual_seed(0)
    model = quantize_model(create_model(name, num_classes=5, in_channels=1), 4)
    steps = step_sizes(model)
    assert len(steps) >= 2 and type(model.fc) is nn.Linear
    if name in BIG:  # construct + one forward at batch 1 (eval: BN cannot train on one 1x1 map)
        model.eval()
        with torch.no_grad():
            assert torch.isfinite(model(torch.randn(1, 1, 28, 28, generator=gen(10)))).all()
        assert all(bool(m.initialized) for m in model.modules() if isinstance(m, ActivationQuantizer))
        return
    logits = model(torch.randn(2, 1, 28, 28, generator=gen(10)))
    F.cross_entropy(logits, torch.tensor([0, 3])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert all(p.grad.item() != 0 for p in steps)


# ---------------------------------------------------------------------- composition


def test_bf16_autocast_computes_quantizer_in_fp32():
    torch.manual_seed(0)
    model = quantize_model(create_model("tiny_cnn"), 4, keep_first_last=False)
    x = torch.randn(4, 3, 32, 32, generator=gen(11))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v_hat = ActivationQuantizer(4)(x.bfloat16())
        logits = model(x)
    assert v_hat.dtype == torch.float32 and logits.dtype == torch.bfloat16
    F.cross_entropy(logits.float(), torch.arange(4)).backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.dtype == torch.float32 for p in step_sizes(model))


def test_double_backward(float64):
    """Gradient-norm penalties (GVR exact) differentiate through the gradient of the quantized net."""
    torch.manual_seed(0)
    model = quantize_model(create_model("tiny_cnn"), 4, keep_first_last=False)
    params = list(model.parameters())
    loss = F.cross_entropy(model(torch.randn(4, 3, 16, 16, generator=gen(12))), torch.arange(4))
    grads = torch.autograd.grad(loss, params, create_graph=True)
    penalty = sum(g.square().sum() for g in grads)
    second = torch.autograd.grad(penalty, params, allow_unused=True)
    assert all(g is not None and torch.isfinite(g).all() for g in second[:2])
    assert all(g is None or torch.isfinite(g).all() for g in second)


@pytest.mark.slow  # torch.compile of a model: seconds of compilation
def test_torch_compile_matches_eager():
    """Dynamo + AOTAutograd (the part the detach form is for); inductor's C++ build is too slow for
    this CPU's test budget. The first call initializes (a graph break), the second recompiles."""
    torch.manual_seed(0)
    eager = quantize_model(SignNet(), 4, keep_first_last=False)
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled.forward = torch.compile(compiled.forward, backend="aot_eager")
    for i in range(2):
        x = torch.randn(4, 3, 8, 8, generator=gen(13 + i))
        for model in (eager, compiled):
            model.zero_grad()
            F.cross_entropy(model(x), torch.arange(4) % 3).backward()
        for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, msg=name)


def smoke_hparams(method: str, tmp_path) -> dict:
    """Defaults, except what a 16-example step needs (as tests/test_methods.py does)."""
    names = method_class(method).hparams
    hp = {k: v for k, v in (("micro_batch_size", 8), ("subset", 8)) if k in names}
    if "norms_path" in names:  # exter_graft reads the gradient norms an sgd run logged
        pd.DataFrame({"step": range(0, 100, 10), "grad_norm": [1.0 + i for i in range(10)]}).to_parquet(
            tmp_path / "steps.parquet"
        )
        hp["norms_path"] = str(tmp_path)
    return hp


@pytest.mark.parametrize("method", list_methods())
def test_every_method_steps_a_quantized_model(method, tmp_path):
    """A method sees a plain nn.Module whose parameters include the step sizes, and moves them."""
    torch.manual_seed(0)
    model = quantize_model(create_model("tiny_cnn"), 4, keep_first_last=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)  # the grafting methods assume momentum 0
    m = create_method(method, model, optimizer, **smoke_hparams(method, tmp_path))
    m.start_epoch(0)
    n = 16
    batch = Batch(
        torch.randn(n, 3, 16, 16, generator=gen(14)),
        torch.randint(0, 10, (n,), generator=gen(15)),
        index=torch.arange(n),
        x2=torch.randn(n, 3, 16, 16, generator=gen(16)),
    )
    before = [p.detach().clone() for p in step_sizes(model)]
    out = m.step(batch)
    assert torch.isfinite(out["loss"])
    assert all(not torch.equal(a, b) for a, b in zip(before, step_sizes(model)))


def test_ddp_ranks_agree_on_activation_init(monkeypatch):
    """Two ranks, simulated: the all-reduce adds the other rank's [mean|x|, any negative]. Every rank
    must end with s0 = 2 * (mean over ranks of mean|x|) / sqrt(Q_P), and signed if any rank saw a
    negative input (rank 0's data is non-negative, rank 1's is not)."""
    import torch.distributed as dist

    x0 = torch.rand(3, 10, generator=gen(17))
    x1 = 2 * torch.rand(3, 10, generator=gen(18)) - 0.1
    other = torch.stack([x1.abs().mean(), (x1 < 0).any().float()])
    calls = []

    def all_reduce(t):
        calls.append(t.clone())
        t += other

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    quantizer = ActivationQuantizer(4)
    quantizer(x0)
    quantizer(x0)
    assert len(calls) == 1  # once, at the init
    assert bool(quantizer.signed) and (quantizer.q_n, quantizer.q_p) == (8, 7)
    expected = 2 * (x0.abs().mean() + x1.abs().mean()) / 2 / math.sqrt(7)
    torch.testing.assert_close(quantizer.step.detach(), expected, rtol=1e-6, atol=0)


def test_the_papers_8_bit_first_and_last_layers_from_config():
    """Config(quant_first_last_bits=8): the LSQ paper's setting, reachable from a run."""
    from gvr_lab import Config
    from gvr_lab.training import DeviceSettings, build_model

    config = Config(model="tiny_cnn", quant_bits=3, quant_first_last_bits=8, device="cpu")
    model, _, _ = build_model(config, 10, 1, DeviceSettings.of(config, torch.device("cpu")))
    assert [model.block1[0].weight_quant.bits, model.block2[0].weight_quant.bits, model.fc.weight_quant.bits] == [
        8,
        3,
        8,
    ]
    for bad, needle in [
        (dict(quant_first_last_bits=8), "needs quant_bits"),
        (dict(quant_bits=4, quant_first_last_bits=8, quant_first_last=True), "excludes quant_first_last"),
        (dict(quant_bits=4, quant_first_last_bits=1), "quant_first_last_bits must be an integer"),
    ]:
        with pytest.raises(UsageError, match=needle):
            Config(**bad)
