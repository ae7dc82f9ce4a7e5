"""The CUDA configuration, reproduced on the CPU, for every registered method and variant.

On CUDA a run trains with fused SGD, a channels_last model and batches, and bf16 autocast
(train.DeviceSettings); `Config(cuda_settings=True)` applies exactly that on the CPU. Every method
is run through the training loop's own builder on a conv model with BatchNorm (tiny_cnn, bn=True)
on real batches with augmentation, for three epochs of two steps (past the warm-up and start epoch
of every method, so every path of a step runs), and checked for

* finite losses at every step;
* the layout contract: every .grad the optimizer receives has the strides of its parameter
  (fused kernels walk memory in order: a transposed gradient updates the wrong elements);
* an update close to the reference one (fp32, foreach SGD, contiguous), one factor at a time:
  fused alone and channels_last alone change rounding only, bf16 changes the arithmetic.

The meta device stands in for a GPU's host-sync checker: a tensor on it has no value, so any
read of one on the host (.item(), bool(), a 0-dim tensor index) raises.
"""

import contextlib

import pandas as pd
import pytest
import torch

from gvr_lab import Batch, Config, create_method, create_model, list_methods
from gvr_lab.distributed import World
from gvr_lab.methods import METHODS
from gvr_lab.training import DeviceSettings, build, seed_epoch

CPU = torch.device("cpu")
SETTINGS = {
    "reference": DeviceSettings(CPU, None, channels_last=False, fused=False),
    "fused": DeviceSettings(CPU, None, channels_last=False, fused=True),
    "channels_last": DeviceSettings(CPU, None, channels_last=True, fused=False),
    "cuda": DeviceSettings(CPU, torch.bfloat16, channels_last=True, fused=True),
}
NORMS = "<norms log>"  # replaced by the fixture's path

# Hyper-parameters that put every path of a method inside 3 epochs x 2 steps of 32 examples.
TIER_HPARAMS = {
    "pseudo_gd": {"micro_batch_size": 8},
    "reg_loss": {"micro_batch_size": 8},
    "fish_loss": {"micro_batch_size": 8},
    "avg_jac_loss": {"micro_batch_size": 8},
    "unit_jac_loss": {"micro_batch_size": 8},
    "iter_graft": {"micro_batch_size": 8},
    "ngd": {"micro_batch_size": 8},
    "exter_graft": {"micro_batch_size": 8, "norms_path": NORMS},
    "gvr": {"subset": 8},
    "looksam": {"k": 2},
    "vsam": {"warmup_epochs": 0, "window": 3, "blocks": 1},
    "saf": {"kl_start_epoch": 0, "lag": 1},
    "mesa": {"kl_start_epoch": 0},
}


def variants():
    """Every registered method, and each of its hvp / penalty implementations."""
    out = []
    for name in list_methods():
        cls, base = METHODS[name], TIER_HPARAMS.get(name, {})
        if "hvp" in cls.choices:
            out += [(name, {**base, "hvp": hvp}) for hvp in cls.choices["hvp"]]
        elif "penalty" in cls.choices:
            out += [
                (name, {**base, "penalty": p, **({"target": "fc"} if p == "closed_form" else {})})
                for p in cls.choices["penalty"]
            ]
        else:
            out.append((name, base))
    return out


def is_default(name, hp):
    """Whether the variant uses the method's default implementation (hvp or penalty)."""
    defaults = METHODS[name].hparams
    return all(hp[key] == defaults[key] for key in ("hvp", "penalty") if key in hp)


VARIANTS = variants()
IDS = [name + "".join(f"-{v}" for k, v in hp.items() if k in ("hvp", "penalty")) for name, hp in VARIANTS]
# Every test of a variant runs on one worker, so its reference run is computed once (see `trained`);
# the variants spread over the workers.
# make test-fast runs each method as users get it by default; its other hvp / penalty implementations
# (seconds each, double backward in bf16) run in make test.
TIER = [
    pytest.param(
        name,
        hp,
        case,
        id=case,
        marks=[pytest.mark.xdist_group(f"cuda_config-{case}")] + ([] if is_default(name, hp) else [pytest.mark.slow]),
    )
    for (name, hp), case in zip(VARIANTS, IDS)
]


def test_the_tier_covers_every_registered_method():
    assert {name for name, _ in VARIANTS} == set(list_methods())
    fast = {p.values[0] for p in TIER if not any(m.name == "slow" for m in p.marks)}
    assert fast == set(list_methods())  # make test-fast too: each method's default implementation


@pytest.fixture(scope="module")
def norms_log(tmp_path_factory):
    path = tmp_path_factory.mktemp("sgd_log")
    pd.DataFrame({"step": range(0, 40), "grad_norm": [1.0 + 0.01 * s for s in range(40)]}).to_parquet(
        path / "steps.parquet"
    )
    return str(path)


def config_of(name, hp, norms_log):
    hp = {k: norms_log if v == NORMS else v for k, v in hp.items()}
    return Config(
        dataset="synthetic",
        model="tiny_cnn",
        model_args={"bn": True, "smooth": True},
        method=name,
        method_args=hp,
        batch_size=32,
        train_subset=64,
        epochs=3,
        lr=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        cutout=0.5,
        device="cpu",
        progress=False,
    )


def train_steps(config, settings):
    """The loop's own pieces, run for config.epochs: (initial, final) flat weights, losses, and
    the (parameter shape, grad strides, parameter strides) of every misaligned gradient."""
    parts = build(config, settings, World())
    train_loader, model, optimizer, method = parts.train_loader, parts.model, parts.optimizer, parts.method
    misaligned = []

    def check_layout(opt, args, kwargs):
        misaligned.extend(
            (tuple(p.shape), p.grad.stride(), p.stride())
            for p in model.parameters()
            if p.grad is not None and p.grad.stride() != p.stride()
        )

    optimizer.register_step_pre_hook(check_layout)
    flat = lambda: torch.cat([p.detach().flatten().double().cpu() for p in model.parameters()])  # noqa: E731
    initial, losses = flat(), []
    for epoch in range(config.epochs):
        seed_epoch(config.seed, epoch)
        method.start_epoch(epoch)
        for batch in train_loader.epoch(epoch):
            losses.append(float(method.step(batch)["loss"]))
        method.end_epoch(epoch)
    return initial, flat(), losses, misaligned


RUNS = {}


def trained(case, name, hp, norms_log, settings):
    """train_steps of a variant in the named settings, computed once per worker."""
    if (case, settings) not in RUNS:
        RUNS[case, settings] = train_steps(config_of(name, hp, norms_log), SETTINGS[settings])
    return RUNS[case, settings]


def test_cuda_settings_are_what_cuda_gets():
    assert DeviceSettings.of(Config(cuda_settings=True), CPU) == SETTINGS["cuda"]
    assert DeviceSettings.of(Config(cuda_settings=True, precision="fp32"), CPU).amp_dtype is None
    assert DeviceSettings.of(Config(channels_last="false"), CPU) == SETTINGS["reference"]


def test_channels_last_is_on_for_convolutional_models_unless_switched_off():
    """auto: on for a model with convolutions, on the CPU as on CUDA; independent of cuda_settings."""
    assert DeviceSettings.of(Config(), CPU) == SETTINGS["channels_last"]
    assert DeviceSettings.of(Config(channels_last=False), CPU) == SETTINGS["reference"]
    assert DeviceSettings.of(Config(cuda_settings=True, channels_last="false"), CPU).channels_last is False
    assert DeviceSettings.of(Config(dataset="synthetic", model="small_cnn", channels_last=True), CPU).channels_last
    with pytest.raises(ValueError, match="unknown channels_last 'yes'; valid: auto, true, false"):
        Config(channels_last="yes")


def relative_update_error(reference, other):
    (w0, w_ref, _, _), (w0_other, w, _, _) = reference, other
    assert torch.equal(w0, w0_other)  # the same initial weights
    return float((w - w_ref).norm() / (w_ref - w0).norm())


# Tolerances on ||w - w_ref|| / ||w_ref - w0|| after 6 steps. The model is smooth (softplus, average
# pooling): on ReLU / max-pool nets a rounding difference can flip a kink or a pooling tie and
# route a gradient elsewhere (both valid subgradients, 1e-3 apart after 6 steps), which would hide
# what is measured here. Measured on torch 2.14.1, largest over the variants of each row:
# fused SGD computes the same update in one kernel, only fp32 operations reordered (measured 5e-7,
# LookSAM; others <= 1e-8).
FUSED_TOL = 1e-5
# channels_last runs other convolution kernels: fp32 sums in another order. Measured: 4e-5 (fish
# exact); LookSAM 2.7e-4 (u normalizes a small difference of near-parallel gradients, which
# amplifies rounding); fd quotients divide the rounding by h = fd_eps / ||v||: 2e-3.
CHANNELS_LAST_TOL = {"default": 2e-4, "looksam": 2e-3, "fd": 1e-2}


@pytest.mark.parametrize("name, hp, case", TIER)
def test_fused_sgd_and_channels_last_change_rounding_only(name, hp, case, norms_log):
    """The layout factors one at a time, in fp32: any gradient handed to the fused optimizer in
    another memory order, or a channels_last pass that computes something else, shows here."""
    reference = trained(case, name, hp, norms_log, "reference")
    fused = train_steps(config_of(name, hp, norms_log), SETTINGS["fused"])
    channels_last = train_steps(config_of(name, hp, norms_log), SETTINGS["channels_last"])
    assert fused[3] == [] and channels_last[3] == []
    assert relative_update_error(reference, fused) <= FUSED_TOL
    kind = "fd" if "fd" in (hp.get("hvp"), hp.get("penalty")) else name
    assert relative_update_error(reference, channels_last) <= CHANNELS_LAST_TOL.get(kind, CHANNELS_LAST_TOL["default"])


# bf16 autocast rounds every convolution and matmul to 8 significant bits (4e-3 relative per op);
# fd probes compute in fp32 (base.Method.fp32). Measured, all CUDA settings at once: 1.3e-2 at
# most for the continuous methods (fd ones included). Wider, each for a reason measured at one
# step from the same weights:
BF16_TOL = {
    "default": 3e-2,
    # the double-backward Hessian-vector product in bf16 is 9% off fp32's; 6 steps: 6e-2
    "reg_loss-exact": 0.15,
    # FT's labels are sampled from bf16 softmax probabilities: another, equally valid draw: 0.14
    "fish_loss-exact": 0.3,
    # u = g_v / ||g_v|| (cosine 0.997 with fp32's), applied at every reuse step: 0.12
    "looksam": 0.3,
    # SDS selects by sharpness l_i(w + eps) - l_i(w) of bf16 losses: 30 of 32 rows agree with fp32's
    # selection; each swapped row changes the update by 1/16, compounded over 6 steps: 0.42
    "esam": 0.8,
}


@pytest.mark.parametrize("name, hp, case", TIER)
def test_cuda_settings_train_every_method_close_to_fp32(name, hp, case, norms_log):
    reference = trained(case, name, hp, norms_log, "reference")
    cuda_like = train_steps(config_of(name, hp, norms_log), SETTINGS["cuda"])
    assert all(torch.isfinite(torch.tensor(cuda_like[2])))
    assert cuda_like[3] == [], f"gradients laid out unlike their parameters: {cuda_like[3][:3]}"
    assert relative_update_error(reference, cuda_like) <= BF16_TOL.get(case, BF16_TOL["default"])


# ---------------------------------------------------------------------- no host sync inside a step


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@contextlib.contextmanager
def no_host_sync(device):
    """On CUDA, any synchronizing call inside raises (the meta device needs nothing: it has no values)."""
    if device != "cuda":
        yield
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


@pytest.mark.parametrize("device", ["meta", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("name, hp", VARIANTS, ids=IDS)
def test_a_step_never_reads_a_device_value_on_the_host(name, hp, device, norms_log):
    """Three epochs of three steps, each step checked; the per-epoch hooks may sync (SAF's
    start_epoch reads the largest index once per epoch, so on meta SAF runs epoch 0 only), and
    vSAM's window ends (one read per window) lie beyond these steps."""
    hp = {k: norms_log if v == NORMS else v for k, v in hp.items()}
    if name == "vsam":
        hp = {**hp, "window": 50}
    torch.manual_seed(0)
    model = create_model("tiny_cnn", num_classes=5, in_channels=1, bn=True).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, fused=device == "cuda")
    method = create_method(name, model, opt, amp_dtype=torch.bfloat16 if device == "cuda" else None, **hp)
    for epoch in range(1 if name == "saf" and device == "meta" else 3):
        method.start_epoch(epoch)
        for _ in range(3):
            x = torch.randn(16, 1, 28, 28, device=device)
            batch = Batch(x, torch.randint(0, 5, (16,), device=device), torch.arange(16, device=device), x.clone())
            with no_host_sync(device):
                method.step(batch)
        method.end_epoch(epoch)


@needs_cuda
@pytest.mark.parametrize("name, hp, case", TIER)
def test_on_a_gpu_every_method_trains_close_to_the_fp32_cpu_update(name, hp, case, norms_log):
    """What CUDA runs by default (fused SGD, channels_last, bf16, cuDNN with TF32) against the CPU
    fp32 reference: the fused CUDA kernel refuses gradients laid out unlike their parameters, and
    the bf16 tolerances above hold (cuDNN's kernels only add rounding)."""
    config = config_of(name, hp, norms_log)
    gpu = DeviceSettings.of(config, torch.device("cuda"))
    assert gpu == DeviceSettings(torch.device("cuda"), torch.bfloat16, channels_last=True, fused=True)
    run = train_steps(config, gpu)
    assert all(torch.isfinite(torch.tensor(run[2]))) and run[3] == []
    assert relative_update_error(trained(case, name, hp, norms_log, "reference"), run) <= BF16_TOL.get(
        case, BF16_TOL["default"]
    )


# ---------------------------------------------------------------------- finite differences under bf16


def penalty_update(name, hp, key, amp_dtype, batch):
    """The penalty's part of one step's gradient: grad(lam) - grad(lam = 0), at lr 1, no momentum."""
    grads = []
    for value in (hp[key], 0.0):
        torch.manual_seed(0)
        model = create_model("tiny_cnn", smooth=True)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        method = create_method(name, model, opt, amp_dtype=amp_dtype, **{**hp, key: value})
        opt.register_step_pre_hook(
            lambda *_, model=model: grads.append(torch.cat([p.grad.flatten() for p in model.parameters()])) and None
        )
        torch.manual_seed(1)
        method.step(batch)
    return grads[0] - grads[1]


FD_METHODS = [
    ("gvr", {"subset": 16, "alpha": 0.1}, "alpha", "penalty"),
    *[
        (name, {"micro_batch_size": 16, "lam": 0.1}, "lam", "hvp")
        for name in ("reg_loss", "fish_loss", "avg_jac_loss", "unit_jac_loss")
    ],
]


@pytest.mark.parametrize("name, hp, key, variant", FD_METHODS, ids=[m[0] for m in FD_METHODS])
def test_fd_under_bf16_autocast_agrees_with_exact_as_well_as_in_fp32(name, hp, key, variant):
    """Both ends of a finite difference in bf16 made the penalty's update rounding noise (gvr fd:
    106% off); fd computes them in fp32 whatever the autocast, so its error against the exact
    (fp32) penalty gradient is the same as in an fp32 run: fd's own truncation error."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 3, 32, 32, generator=g)
    x2 = x + 0.3 * torch.randn(x.shape, generator=g)
    batch = Batch(x, torch.randint(0, 10, (32,), generator=g), torch.arange(32), x2)
    exact = penalty_update(name, {**hp, variant: "exact"}, key, None, batch)
    fd_fp32 = penalty_update(name, {**hp, variant: "fd"}, key, None, batch)
    fd_bf16 = penalty_update(name, {**hp, variant: "fd"}, key, torch.bfloat16, batch)
    error_fp32 = float((fd_fp32 - exact).norm() / exact.norm())
    error_bf16 = float((fd_bf16 - exact).norm() / exact.norm())
    # measured fp32: gvr 2.8e-2 (last stage), reg_loss 4.3e-3, fish_loss 2.5e-3, avg/unit_jac 1.1e-4
    assert error_fp32 < 5e-2, error_fp32
    assert error_bf16 <= 1.5 * error_fp32 + 1e-6, (error_bf16, error_fp32)
