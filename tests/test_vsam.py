"""vSAM (gvr_lab/methods/vsam.py) against references written from the paper's rules and its official code."""

import copy
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from gvr_lab import Batch, create_method
from gvr_lab.errors import UsageError
from gvr_lab.methods.vsam import next_quota, window_trends

from helpers import checkpoint_round_trip, mlp, quadratic_method

pytestmark = pytest.mark.usefixtures("float64")

BETA_SEQUENCE = [0.7, 0.49, 0.343, 0.2401, 0.16807, 0.117649, 0.0, 0.0, 0.0]
small_mlp = partial(mlp, 6, 8, 4)


def batch(seed, n=8):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g), torch.arange(n))


def build(seed=0, lr=0.1, momentum=0.9, weight_decay=1e-3, bn=False, **hp):
    model = small_mlp(seed=seed, bn=bn)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    return model, opt, create_method("vsam", model, opt, **hp)


def count_forwards(model):
    counter = {"n": 0}
    model.register_forward_hook(lambda *_: counter.__setitem__("n", counter["n"] + 1))
    return counter


def sam_reference_step(model, opt, b, rho):
    """SAM from the formula: ascend to w + rho g/||g||, gradient there, restore w, base step with it."""
    params = list(model.parameters())
    g = torch.autograd.grad(F.cross_entropy(model(b.x), b.y), params)
    norm = torch.sqrt(sum((gi**2).sum() for gi in g))
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, gi in zip(params, g):
            p.add_(rho * gi / (norm + 1e-12))
    g_sam = torch.autograd.grad(F.cross_entropy(model(b.x), b.y), params)
    with torch.no_grad():
        for p, s, gs in zip(params, saved, g_sam):
            p.copy_(s)
            p.grad = gs
    opt.step()
    return g, g_sam


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize(
    "setting",
    [dict(warmup_epochs=3), dict(warmup_epochs=0, window=1, blocks=1)],
    ids=["warm-up", "window=1 forces every step"],
)
def test_equals_sam_step_for_step(setting):
    model, opt, method = build(rho=0.05, **setting)
    ref_model = small_mlp(seed=0)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    forwards = count_forwards(model)
    for epoch in range(2):
        method.start_epoch(epoch)
        for i in range(4):
            b = batch(10 * epoch + i)
            out = method.step(b)
            sam_reference_step(ref_model, ref_opt, b, 0.05)
            assert out["sampled"] == 1.0
            for p, q in zip(model.parameters(), ref_model.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert forwards["n"] == 2 * 8


def tail_norm(tensors, n=2):
    """Norm over the last n tensors (for the MLP and n = 2: the last Linear's weight and bias)."""
    return torch.sqrt(sum((t**2).sum() for t in tensors[-n:]))


def test_rings_hold_tail_norms_and_sorted_chunk_dispersion():
    model, opt, method = build(window=4, blocks=2, last_n=2)
    ref_model = small_mlp(seed=0)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    method.start_epoch(0)
    p_tail = []
    for i in range(2):
        method.step(batch(i))
        g, g_sam = sam_reference_step(ref_model, ref_opt, batch(i), 0.05)
        p_tail.append(tail_norm([a - b for a, b in zip(g_sam, g)]))
        torch.testing.assert_close(method.rings[0, i].double(), p_tail[-1], rtol=1e-6, atol=0)
        torch.testing.assert_close(method.rings[1, i].double(), p_tail[-1] / tail_norm(g), rtol=1e-6, atol=0)
    # P = [p1, 0, 0, 0] then [p1, p2, 0, 0]: sorted chunks {0, 0} and {0, p1}, then {0, 0} and {min, max};
    # unbiased variance of two values a, b is (a - b)^2 / 2.
    lo, hi = sorted(p_tail)
    torch.testing.assert_close(method.rings[2, 0].double(), p_tail[0] ** 2 / 4, rtol=1e-6, atol=0)
    torch.testing.assert_close(method.rings[2, 1].double(), (hi - lo) ** 2 / 4, rtol=1e-6, atol=0)
    assert method.ptr == 2


def quadratic_setup(lr, **hp):
    """vSAM on a quadratic with A's eigenvalues known: (model, method, A, eigenvalues)."""
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g))
    eigenvalues = torch.tensor([0.5, 0.8, 1.3, 2.0, 3.0])
    a = q @ torch.diag(eigenvalues) @ q.T
    model, method = quadratic_method("vsam", a, torch.randn(5, generator=g), torch.randn(5, generator=g), lr=lr, **hp)
    return model, method, a, eigenvalues


def test_psf_on_a_quadratic_is_rho_a_unit_gradient():
    rho = 0.05
    model, method, a, eigenvalues = quadratic_setup(lr=0.1, rho=rho, warmup_epochs=1)
    method.start_epoch(0)
    w0 = model.w.detach().clone()
    out = method.step(batch(0))
    g = a @ (w0 - model.w_star)
    expected = rho * a @ g / g.norm()
    torch.testing.assert_close(method.psf[0], expected, rtol=1e-10, atol=1e-14)
    assert rho * eigenvalues.min() <= out["psf_norm"] <= rho * eigenvalues.max()
    torch.testing.assert_close(out["psf_norm"], expected.norm(), rtol=1e-10, atol=0)
    torch.testing.assert_close(out["grad_norm"], g.norm(), rtol=1e-10, atol=0)
    # The update used g_S = g + PSF at the restored w0.
    torch.testing.assert_close(model.w.detach(), w0 - 0.1 * (g + expected), rtol=1e-12, atol=1e-14)


def test_reuse_adds_decaying_psf_then_stops_and_first_window_has_no_sam_step():
    rho, lr, window = 0.05, 0.1, 12
    model, method, a, _ = quadratic_setup(lr=lr, rho=rho, warmup_epochs=1, window=window, blocks=3)
    method.start_epoch(0)
    method.step(batch(0))
    psf = method.psf[0].clone()
    method.start_epoch(1)
    weights = []
    for j in range(1, window):  # c = 1 .. K-1: the partial window right after warm-up
        w = model.w.detach().clone()
        out = method.step(batch(j))
        weight = 0.7**j if j <= 6 else 0.0
        weights.append(out["reuse_weight"])
        assert out["sampled"] == 0.0
        expected = w - lr * (a @ (w - model.w_star) + weight * psf)
        torch.testing.assert_close(model.w.detach(), expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(
            torch.as_tensor(out["psf_norm"]), torch.as_tensor(weight) * psf.norm(), rtol=1e-10, atol=0
        )
    assert weights[:9] == pytest.approx(BETA_SEQUENCE, rel=1e-12, abs=0)
    assert weights[9:] == [0.0, 0.0]
    # The window starting at c = K holds floor(b) = 1 SAM step; the decay restarts after it.
    outs = [method.step(batch(100 + i)) for i in range(window)]
    sampled = [o["sampled"] for o in outs]
    assert sum(sampled) == 1
    after = [o["reuse_weight"] for o in outs[sampled.index(1.0) + 1 :]]
    assert after == pytest.approx(BETA_SEQUENCE[: len(after)], rel=1e-12, abs=0)


@pytest.mark.parametrize("beta", [0.6, 0.7, 0.9])
def test_the_psf_serves_at_most_six_reuse_steps_whatever_beta(beta):
    """The rule counts reuses: with a running product compared to beta**6 in floating point, beta
    0.6 and 0.9 got a 7th reuse (six multiplications round below beta**6), 0.7 did not."""
    model, opt, method = build(beta=beta, warmup_epochs=1, window=100, blocks=1)
    method.start_epoch(0)
    method.step(batch(0))  # warm-up: a SAM step, a fresh PSF
    method.start_epoch(1)
    weights = [method.step(batch(j))["reuse_weight"] for j in range(1, 12)]  # no SAM step in this window
    assert weights == pytest.approx([beta**j for j in range(1, 7)] + [0.0] * 5, rel=1e-12, abs=0)


def test_never_sampling_after_warm_up_with_beta_zero_is_sgd():
    model, opt, method = build(beta=0.0, warmup_epochs=1, window=1000, blocks=1)
    method.start_epoch(0)
    for i in range(3):
        method.step(batch(i))
    sgd_model = copy.deepcopy(model)
    sgd_opt = torch.optim.SGD(sgd_model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    sgd_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # no shared momentum buffers
    sgd = create_method("sgd", sgd_model, sgd_opt)
    method.start_epoch(1)
    for i in range(10):
        out = method.step(batch(50 + i))
        sgd.step(batch(50 + i))
        assert out["sampled"] == 0.0
        for p, q in zip(model.parameters(), sgd_model.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)


def ring_of(chronological, ptr):
    """Lay a chronological sequence into a ring whose oldest entry is at position ptr."""
    return torch.roll(torch.as_tensor(chronological, dtype=torch.float32), ptr)


def test_window_trends_read_the_ring_oldest_first():
    window, ptr = 10, 7
    r = [1.1**k for k in range(window)]
    v = [0.5**k for k in range(window)]
    rings = torch.stack([ring_of(r, ptr), ring_of(v, ptr)])
    d_ratio, d_disp = window_trends(rings, ptr).tolist()
    assert d_ratio == pytest.approx(0.1, rel=1e-5)
    assert d_disp == pytest.approx(-0.5, rel=1e-5)


def test_next_quota_clips_trends_and_bounds_b():
    assert next_quota(10.0, 0.1, -0.5, 0.13, 0.13, 40) == pytest.approx(10 * (1 + 0.013 - 0.065))
    # trends clipped to [-1, 1]: +5 acts as +1, -7 as -1
    assert next_quota(10.0, 5.0, 0.0, 0.2, 0.3, 40) == pytest.approx(12.0)
    assert next_quota(10.0, 0.0, -7.0, 0.2, 0.3, 40) == pytest.approx(7.0)
    assert next_quota(10.0, math.inf, -math.inf, 0.2, 0.3, 40) == pytest.approx(9.0)
    assert next_quota(10.0, math.nan, math.nan, 0.2, 0.3, 40) == 10.0
    assert next_quota(39.0, 1.0, 1.0, 0.5, 0.5, 40) == 40.0
    assert next_quota(1.2, -1.0, -1.0, 0.4, 0.4, 40) == 1.0
    assert next_quota(1.0, 1.0, 1.0, 0.4, 0.4, 0) == 1.0  # the lower bound wins, as in the code


def test_quota_follows_synthetic_trends_within_bounds_and_each_window_meets_it():
    window, p_max, gain = 10, 0.6, 0.5
    model, opt, method = build(warmup_epochs=0, window=window, blocks=2, p_max=p_max, a_r=gain, a_v=gain)
    method.start_epoch(0)
    b_max = math.floor(p_max * window)
    rising, falling = 1.5, 0.8  # consecutive ratio r(k+1)/r(k): relative change +0.5, -0.2
    expected_b, steps = 1.0, []
    for w in range(16):
        factor = rising if w < 8 else falling
        for i in range(window):
            chrono = [factor**k for k in range(window)]
            method.rings[1] = ring_of(chrono, method.ptr)
            method.rings[2] = ring_of(chrono, method.ptr)
            steps.append(method.step(batch(w * window + i)))
        # the window's last step has c = K (w + 1): b was just updated from these rings
        expected_b = max(1.0, min(b_max, expected_b * (1 + 2 * gain * (factor - 1))))
        assert steps[-1]["b"] == pytest.approx(expected_b, rel=1e-5)
        assert 1 <= steps[-1]["quota"] == math.floor(steps[-1]["b"]) <= b_max
    bs = [s["b"] for s in steps]
    assert max(bs) == b_max and bs[-1] < b_max / 2  # reached the cap going up, came back down
    # Item 26: each complete window c = Kw .. Kw+K-1 (steps K w - 1 .. K w + K - 2) holds floor(b) SAM steps.
    for w in range(1, 16):
        chunk = steps[w * window - 1 : (w + 1) * window - 1]
        assert sum(s["sampled"] for s in chunk) == chunk[0]["quota"]


@pytest.mark.parametrize("b", [10.0, 1.0, 3.7], ids=["q=1", "q=1/K", "q=0.37"])
def test_every_complete_window_holds_floor_b_sam_steps(b):
    window = 10
    model, opt, method = build(warmup_epochs=0, window=window, blocks=2, p_max=1.0, a_r=0.0, a_v=0.0)
    forwards = count_forwards(model)
    method.start_epoch(0)
    method.b = b
    outs = []
    for i in range(6 * window - 1):
        before = forwards["n"]
        outs.append(method.step(batch(i)))
        assert forwards["n"] - before == 1 + outs[-1]["sampled"]  # two passes exactly on sampled steps
    for w in range(1, 6):
        chunk = outs[w * window - 1 : (w + 1) * window - 1]
        assert sum(o["sampled"] for o in chunk) == math.floor(b)
        assert all(o["quota"] == math.floor(b) for o in chunk)
    assert forwards["n"] == len(outs) + sum(o["sampled"] for o in outs)


class FixedDraw:
    """Stands in for the method's random.Random: every U is the same number."""

    def __init__(self, u):
        self.u = u

    def random(self):
        return self.u


@pytest.mark.parametrize(
    "u, positions",
    [(0.0, [7, 8, 9]), (0.999, [0, 1, 2])],
    ids=["U never fires: forced at the window end", "U always fires: first steps"],
)
def test_random_and_forced_sampling_positions(u, positions):
    window = 10
    model, opt, method = build(warmup_epochs=0, window=window, blocks=2, a_r=0.0, a_v=0.0)
    method.start_epoch(0)
    method.b, method.rng = 3.5, FixedDraw(u)
    outs = [method.step(batch(i)) for i in range(4 * window - 1)]
    for w in range(1, 4):  # c = K w + k is step K w - 1 + k
        chunk = outs[w * window - 1 : (w + 1) * window - 1]
        assert [k for k, o in enumerate(chunk) if o["sampled"]] == positions


def test_bn_running_statistics_advance_once_per_sam_step():
    model, opt, method = build(bn=True, rho=0.5)
    reference = copy.deepcopy(model)
    method.start_epoch(0)
    b = batch(0)
    method.step(b)
    with torch.no_grad():
        reference(b.x)  # one clean forward in train mode at w
    bn, ref_bn = model[1], reference[1]
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var, rtol=0, atol=0)
    assert int(bn.num_batches_tracked) == 1


def run_epochs(method, epochs, steps_per_epoch, start=0, resume_step=None):
    outs = []
    for epoch in range(epochs):
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            if step < start:
                continue
            if i == 0 or step == start:
                method.start_epoch(epoch)
            if step == resume_step:
                return outs
            outs.append(method.step(batch(step)))
    return outs


def test_resume_from_state_dict_mid_window_continues_identically():
    hp = dict(warmup_epochs=1, window=6, blocks=3, a_r=2.0, a_v=2.0, p_max=1.0, last_n=2)
    model, opt, method = build(seed=0, **hp)
    full = run_epochs(method, 6, 10)
    assert len({o["b"] for o in full}) > 2  # the quota moved, so the rings and the RNG matter

    model1, opt1, method1 = build(seed=0, **hp)
    resume_at = 37  # post-warm-up, inside a window
    run_epochs(method1, 6, 10, resume_step=resume_at)
    saved = checkpoint_round_trip(model1.state_dict(), opt1.state_dict(), method1.state_dict())
    model2, opt2, method2 = build(seed=5, **hp)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    method2.load_state_dict(saved[2])
    rest = run_epochs(method2, 6, 10, start=resume_at)
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for a, b in zip(full[resume_at:], rest):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(torch.as_tensor(a[k]), torch.as_tensor(b[k]), rtol=0, atol=0)


@pytest.mark.parametrize(
    "hp, fragment",
    [
        (dict(rho=-0.1), "rho must be >= 0"),
        (dict(window=0), "window must be >= 1"),
        (dict(window=50, blocks=7), "blocks must be >= 1 and divide window=50"),
        (dict(p_max=0.0), "p_max must be in (0, 1]"),
        (dict(p_max=1.5), "p_max must be in (0, 1]"),
        (dict(beta=1.0), "beta must be in [0, 1)"),
        (dict(last_n=0), "last_n must be >= 1"),
        (dict(warmup_epochs=-1), "warmup_epochs must be >= 0"),
    ],
)
def test_bad_hyperparameters_raise_one_line(hp, fragment):
    model = small_mlp()
    with pytest.raises(UsageError) as info:
        create_method("vsam", model, torch.optim.SGD(model.parameters(), lr=0.1), **hp)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_defaults():
    model, opt, method = build()
    assert (
        method.rho,
        method.window,
        method.blocks,
        method.p_max,
        method.a_r,
        method.a_v,
        method.beta,
        method.last_n,
        method.warmup_epochs,
    ) == (0.05, 50, 5, 0.8, 0.13, 0.13, 0.7, 10, 3)
    assert method.b_max == 40


def test_a_checkpoint_with_the_old_reuse_scale_resumes_identically():
    """Checkpoints written before reuses were counted hold reuse_scale = beta^j (0 before any SAM step)."""
    model, opt, method = build(warmup_epochs=1, window=100, blocks=1)
    method.start_epoch(0)
    method.step(batch(0))
    method.start_epoch(1)
    for j in range(1, 3):
        method.step(batch(j))
    state = copy.deepcopy(method.state_dict())
    legacy = {k: v for k, v in state.items() if k != "reuses"}
    legacy["reuse_scale"] = method.beta ** state["reuses"]
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    expected = [method.step(batch(j))["reuse_weight"] for j in range(3, 9)]
    model2, opt2, method2 = build(warmup_epochs=1, window=100, blocks=1)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    method2.load_state_dict(legacy)
    assert [method2.step(batch(j))["reuse_weight"] for j in range(3, 9)] == expected
    assert expected[:4] == pytest.approx([0.7**j for j in range(3, 7)]) and expected[4:] == [0.0, 0.0]
