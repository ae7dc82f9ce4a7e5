"""LSQ: learned step size quantization, for quantization-aware training of any gvr_lab model.

Reference: Esser, McKinstry, Bablani, Appuswamy, Modha, "Learned Step Size Quantization", ICLR 2020
(arXiv 1902.08153).

`quantize_model(model, bits)` swaps every ``nn.Conv2d`` and ``nn.Linear`` of the model, in place and
under the same attribute name, for a version that fake-quantizes its weight and its input
activation; everything else (BN, biases, pooling) stays in floating point. The model keeps its
structure (``model.fc``, ``model.forward_features``, ``model.last_stage``) and its weight Parameter
objects, so it is called after `create_model` and before the optimizer is built, and then composes
with every method: a method only sees an nn.Module whose parameters include the step sizes.

Quantizer, one learned scalar step size s > 0 per tensor (one for a layer's weight, one for its
input):

    v_bar = round(clip(v / s, -Q_N, Q_P)),      v_hat = s * v_bar

    weights, signed:                 Q_N = 2^(b-1),  Q_P = 2^(b-1) - 1    (b = 2: codes -2, -1, 0, 1)
    activations, unsigned:           Q_N = 0,        Q_P = 2^b - 1        (b = 2: codes 0 .. 3)
    activations, signed:             as weights

Straight-through estimator (round passes the gradient unchanged):

    d v_hat / d v = 1 if -Q_N < v/s < Q_P, else 0
    d v_hat / d s = round(v/s) - v/s   if -Q_N < v/s < Q_P
                  = -Q_N               if v/s <= -Q_N
                  = +Q_P               if v/s >= Q_P

Gradient scale: the gradient reaching s is multiplied by g = 1 / sqrt(N * Q_P); the forward uses s
itself. N = number of weights of the layer for a weight quantizer, and the number of features of
one example (numel / batch size, e.g. C*H*W) for an activation quantizer. The paper's "number of
features" does not say whether the batch counts (zhutmost/lsq-net uses numel with the batch); we
take the per-example count, so the scale does not change with the batch size and the loss's batch
mean already does the averaging over examples.

Initialization: s0 = 2 * mean|v| / sqrt(Q_P); for weights from the weights at wrap time, for
activations from the layer's input in the first forward pass (the first training batch), under
no_grad, with `initialized` buffers so a checkpointed run does not initialize again on resume.

Which activations are unsigned (our rule; the paper quantizes post-ReLU activations only): an
activation quantizer decides at its initialization, from the same batch. It is unsigned iff that
input has no negative entry, which is exactly the inputs that follow a ReLU (also through
pooling, dropout or flatten) and non-negative raw pixels; the first layer on mean-subtracted
images and convs that read a BN output without ReLU (the first conv of each PyramidNet block)
come out signed. The decision is stored in the `signed` buffer.
A static rule ("the producer is a ReLU") would need tracing the model, and a wrong unsigned guess
would clip half the distribution to 0; a wrong signed guess only wastes one bit.

Layers kept at full precision: by default the first conv/linear in module registration order and
the last layer (``model.fc``, or the last conv/linear of a model without ``fc``), as most LSQ
reproductions on CIFAR do; `keep_first_last=False` quantizes them too, and `first_last_bits=8`
quantizes them at 8 bits as the paper does.

Deviations and choices, each deliberate:

* first and last layers full precision by default (the paper: 8 bits; available as above);
* activation gradient scale with per-example N (above);
* step sizes are ordinary parameters: the base optimizer's weight decay applies to them, and
  SAM-type methods perturb and update them with the weights (the paper leaves this open; this is
  the naive wrapper's behaviour and what the paper's plain-SGD recipe implies for the update);
* the activation init runs in whichever forward comes first, so for SAM-type methods it is the
  clean pass at the unperturbed weights of the first step; under DDP the statistics of the init
  batch are averaged over ranks (and the sign decision OR-ed) so every rank holds the same s (the
  first forward must then run on every rank, as training does). A copy of the model taken before
  that forward (an EMA teacher) holds the placeholder s = 1 until it is given the trained values;
* at v/s exactly on a clip bound, torch.clamp's subgradient counts the point as in range
  (d v_hat/d v = 1 and d v_hat/d s = round(v/s) - v/s = 0 instead of -Q_N / Q_P). Only values
  sitting exactly on a bound are affected; for the zeros of a ReLU (unsigned, Q_N = 0) both
  conventions give d v_hat/d s = 0, and the ReLU's own gradient at 0 is 0;
* nothing keeps s positive during training (the paper does not either); the init is floored at
  1e-8 so an all-zero tensor (a zero-initialized layer, a dead ReLU) does not divide by zero;
* the quantizer computes in at least fp32 (fp64 models stay fp64), also under bf16 autocast, and
  returns that dtype; the conv/matmul that follows is autocast as usual;
* only exact nn.Conv2d and nn.Linear are replaced (not their subclasses, not other conv types).

Round and gradient scale use the detach form, value + (t - t.detach()) * c, rather than a custom
autograd.Function, so they work under autocast, double backward (GVR-type penalties) and
torch.compile, and the forward values are exact (s, round(x)) rather than off by a rounding error.
Under no_grad (evaluation) the quantizer skips that bookkeeping; the values are the same. round
is torch.round (halves to even). Quantized activations make exact ties in max-pooling far more
common; eager and inductor-compiled code may route a tie's gradient differently (both are valid
subgradients), so compiled and eager gradients agree only up to that on max-pooling nets.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .errors import UsageError

MIN_BITS, MAX_BITS = 2, 16
# Floor of an initial step size: keeps v/s finite when the init tensor is all zeros.
MIN_STEP = 1e-8


def check_bits(bits: int, name: str = "quant_bits") -> None:
    """Raise a one-line UsageError unless `bits` is an int in [2, 16]."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise UsageError(f"{name} must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """(Q_N, Q_P): codes run from -Q_N to Q_P."""
    if signed:
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def scale_grad(s: torch.Tensor, g: float) -> torch.Tensor:
    """Forward value exactly s; backward multiplies the incoming gradient by g."""
    return s.detach() + g * (s - s.detach())


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Forward value exactly round(x); backward passes the gradient unchanged."""
    return x.detach().round() + (x - x.detach())


def lsq_quantize(v: torch.Tensor, s: torch.Tensor, q_n: int, q_p: int, g: float) -> torch.Tensor:
    """v_hat = s * round(clip(v / s, -Q_N, Q_P)) with LSQ's gradients, computed in at least fp32."""
    dtype = torch.promote_types(v.dtype, torch.float32)
    v, s = v.to(dtype), s.to(dtype)
    if not torch.is_grad_enabled():  # evaluation: the same values without the STE's extra passes
        return (v / s).clamp(-q_n, q_p).round() * s
    s = scale_grad(s, g)
    return round_ste((v / s).clamp(-q_n, q_p)) * s


def initial_step(v: torch.Tensor, q_p: int) -> torch.Tensor:
    """s0 = 2 mean|v| / sqrt(Q_P), in at least fp32."""
    v = v.detach().to(torch.promote_types(v.dtype, torch.float32))
    return (2 * v.abs().mean() / math.sqrt(q_p)).clamp_min(MIN_STEP)


class WeightQuantizer(nn.Module):
    """Signed LSQ quantizer of one weight tensor, its step size initialized from that tensor."""

    def __init__(self, weight: torch.Tensor, bits: int):
        super().__init__()
        self.bits = bits
        self.q_n, self.q_p = quant_range(bits, signed=True)
        self.grad_scale = 1.0 / math.sqrt(weight.numel() * self.q_p)
        self.step = nn.Parameter(initial_step(weight, self.q_p))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return lsq_quantize(w, self.step, self.q_n, self.q_p, self.grad_scale)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed"


class ActivationQuantizer(nn.Module):
    """LSQ quantizer of a layer's input; sign and step size are set from its first input.

    The buffers `initialized` and `signed` carry that decision through state_dict. Their Python
    mirrors (`ready`, `q_n`, `q_p`) spare a host sync per forward; they are refreshed after
    load_state_dict, and a quantizer that is not ready reads the buffers once more before
    initializing, in case they were copied in by other means.
    """

    def __init__(self, bits: int, device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.bits = bits
        self.step = nn.Parameter(torch.ones((), device=device, dtype=dtype))  # set at the first forward
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool, device=device))
        self.register_buffer("signed", torch.zeros((), dtype=torch.bool, device=device))
        self.ready, self.q_n, self.q_p = False, None, None
        self.register_load_state_dict_post_hook(_mirror_after_load)

    def _mirror_buffers(self) -> None:
        self.ready = bool(self.initialized)
        self.q_n, self.q_p = quant_range(self.bits, bool(self.signed)) if self.ready else (None, None)

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.promote_types(x.dtype, torch.float32))
        # [mean|x|, any negative] in one tensor so DDP ranks agree with a single all-reduce.
        stats = torch.stack([x.abs().mean(), (x < 0).any().to(x.dtype)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
            stats[0] /= dist.get_world_size()
        signed = bool(stats[1] > 0)
        self.signed.fill_(signed)
        self.q_n, self.q_p = quant_range(self.bits, signed)
        self.step.copy_((2 * stats[0] / math.sqrt(self.q_p)).clamp_min(MIN_STEP))
        self.initialized.fill_(True)
        self.ready = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ready:
            self._mirror_buffers()
            if not self.ready:
                self._initialize(x)
        features = x.numel() // x.shape[0] if x.dim() > 1 else x.numel()
        return lsq_quantize(x, self.step, self.q_n, self.q_p, 1.0 / math.sqrt(features * self.q_p))

    def extra_repr(self) -> str:
        if not self.ready:
            return f"bits={self.bits}, sign set at the first forward"
        return f"bits={self.bits}, {'signed' if self.q_n else 'unsigned'}"


def _mirror_after_load(module: ActivationQuantizer, incompatible_keys) -> None:
    # A module-level function, not a lambda, so a pickled model (torch.save(model)) still loads.
    module._mirror_buffers()


class QuantConv2d(nn.Conv2d):
    """nn.Conv2d on the LSQ-quantized input and weight."""

    weight_quant: WeightQuantizer
    input_quant: ActivationQuantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quant(x), self.weight_quant(self.weight), self.bias)


class QuantLinear(nn.Linear):
    """nn.Linear on the LSQ-quantized input and weight."""

    weight_quant: WeightQuantizer
    input_quant: ActivationQuantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quant(x), self.weight_quant(self.weight), self.bias)


QUANT_LAYERS = (QuantConv2d, QuantLinear)


def quantize_layer(layer: nn.Conv2d | nn.Linear, bits: int) -> QuantConv2d | QuantLinear:
    """The LSQ version of `layer`, sharing its weight and bias Parameters and its train/eval mode."""
    check_bits(bits)
    if type(layer) is nn.Conv2d:
        q = QuantConv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
            layer.bias is not None,
            layer.padding_mode,
            device="meta",
        )
    elif type(layer) is nn.Linear:
        q = QuantLinear(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
    else:
        raise TypeError(f"LSQ replaces nn.Conv2d and nn.Linear only, got {type(layer).__name__}")
    # The meta-device construction skipped init; the layer's own Parameters take the places.
    q.weight, q.bias = layer.weight, layer.bias
    step_dtype = torch.promote_types(layer.weight.dtype, torch.float32)
    q.weight_quant = WeightQuantizer(layer.weight, bits)
    q.input_quant = ActivationQuantizer(bits, device=layer.weight.device, dtype=step_dtype)
    return q.train(layer.training)


def quantize_model(
    model: nn.Module, bits: int, keep_first_last: bool = True, first_last_bits: int | None = None
) -> nn.Module:
    """Swap every nn.Conv2d / nn.Linear for its LSQ version in place; return the model.

    `bits` (2..16) applies to weights and input activations. With `keep_first_last`, the first
    conv/linear in registration order and the last layer (`model.fc`, else the last conv/linear)
    stay full precision, or get `first_last_bits` bits when that is given (the paper: 8).
    A layer registered under several names stays one shared module. Call it before building the
    optimizer: the step sizes are new Parameters. Returns a new module only when `model` is itself
    a single conv/linear layer.
    """
    check_bits(bits)
    if first_last_bits is not None:
        if not keep_first_last:
            raise UsageError("first_last_bits applies only with keep_first_last=True")
        check_bits(first_last_bits, "first_last_bits")
    if any(isinstance(m, QUANT_LAYERS) for m in model.modules()):
        raise UsageError("model is already quantized; quantize_model applies once")

    layers = [m for m in model.modules() if type(m) in (nn.Conv2d, nn.Linear)]
    bits_of = {id(m): bits for m in layers}
    if keep_first_last and layers:
        fc = getattr(model, "fc", None)
        last = fc if type(fc) in (nn.Conv2d, nn.Linear) else layers[-1]
        for end in (layers[0], last):
            if first_last_bits is None:
                del bits_of[id(end)]
            else:
                bits_of[id(end)] = first_last_bits
    if id(model) in bits_of:
        return quantize_layer(model, bits_of[id(model)])

    replaced: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        # _modules, not named_children(), which skips a second name of the same child.
        for name, child in list(parent._modules.items()):
            if id(child) in bits_of:
                if id(child) not in replaced:
                    replaced[id(child)] = quantize_layer(child, bits_of[id(child)])
                setattr(parent, name, replaced[id(child)])
    return model


def adopt_activation_init(copy: nn.Module, model: nn.Module) -> None:
    """Give the activation quantizers of `copy` (a deep copy of `model`, e.g. an EMA teacher taken
    before the first forward) the sign and step size `model`'s quantizers took at their
    initialization, where `copy`'s have none yet. Without it the copy keeps the placeholder s = 1
    and, once an EMA copies the `initialized` flag over, never initializes (a MESA teacher did:
    accuracy 0.69 against 0.76)."""
    ours = dict(copy.named_modules())
    for name, module in model.named_modules():
        mine = ours.get(name)
        if (
            isinstance(module, ActivationQuantizer)
            and isinstance(mine, ActivationQuantizer)
            and bool(module.initialized)
            and not bool(mine.initialized)
        ):
            mine.load_state_dict(module.state_dict())
