"""SAF and MESA (gvr_lab/methods/saf.py) against references written from the papers' formulas and the official code."""

import copy
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gvr_lab import Batch, create_method
from gvr_lab.errors import UsageError
from gvr_lab.quant import ActivationQuantizer, quantize_model

from helpers import checkpoint_round_trip, mlp

pytestmark = pytest.mark.usefixtures("float64")

N, C = 16, 4  # dataset size and classes of the toy data set
small_mlp = partial(mlp, 6, 8, C)


DATA = torch.randn(N, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
LABELS = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(2))


def batch(index):
    """The rows of a fixed data set at these dataset indices (no augmentation)."""
    index = torch.as_tensor(index)
    return Batch(DATA[index], LABELS[index], index)


def build(name="saf", seed=0, lr=0.1, momentum=0.9, bn=False, **hp):
    model = small_mlp(seed=seed, bn=bn)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=1e-3)
    return model, opt, create_method(name, model, opt, **hp)


def kl_reference(current, past, tau):
    """tau^2 mean_i sum_c p_c (log p_c - log q_c), p = softmax(past / tau), q = softmax(current / tau)."""
    p = torch.softmax(past / tau, dim=1)
    return tau**2 * (p * (torch.log(p) - torch.log_softmax(current / tau, dim=1))).sum(1).mean()


def grads_at(model, loss_fn):
    params = list(model.parameters())
    return torch.autograd.grad(loss_fn(model), params)


def epochs_of_batches(method, epochs, batches, first=0):
    outs = []
    for epoch in range(first, epochs):
        method.start_epoch(epoch)
        outs.extend(method.step(batch(b)) for b in batches)
    return outs


BATCHES = [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15]]


def steps_with_references(method, epochs):
    """(epoch, batch, a copy of the model as it is before the step) for each step of `epochs` epochs over
    BATCHES; the caller takes the step."""
    for epoch in range(epochs):
        method.start_epoch(epoch)
        for index in BATCHES:
            yield epoch, batch(index), copy.deepcopy(method.model)


def test_saf_with_lam_zero_is_sgd():
    model, opt, saf = build(lam=0.0, kl_start_epoch=0, lag=1)
    sgd_model, sgd_opt, sgd = build("sgd")
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    for epoch in range(4):
        saf.start_epoch(epoch)
        for b in BATCHES:
            out = saf.step(batch(b))
            sgd.step(batch(b))
            for p, q in zip(model.parameters(), sgd_model.parameters()):
                torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert out["penalty"] > 0  # the term was computed, with weight 0
    assert len(forwards) == 4 * len(BATCHES)  # one pass per step


def test_saf_term_is_inactive_up_to_start_epoch():
    model, opt, saf = build(lam=1.0, kl_start_epoch=2, lag=1)
    sgd_model, sgd_opt, sgd = build("sgd")
    for epoch in range(4):
        saf.start_epoch(epoch)
        for b in BATCHES:
            out = saf.step(batch(b))
            sgd.step(batch(b))
        same = all(torch.equal(p, q) for p, q in zip(model.parameters(), sgd_model.parameters()))
        assert same == (epoch <= 2)
        assert (out["penalty"] == 0.0) == (epoch <= 2)


def test_saf_kl_matches_the_formula_and_its_gradient():
    lam, tau = 0.7, 3.0
    model, opt, saf = build(lam=lam, tau=tau, kl_start_epoch=0, lag=1)
    saf.start_epoch(0)
    saf.step(batch(BATCHES[0]))  # epoch 0: indices are discovered, nothing is stored
    saf.start_epoch(1)
    b = batch([5, 2, 7, 0])
    with torch.no_grad():
        past = model(b.x)
    saf.step(b)
    saf.start_epoch(2)
    b = batch([0, 7, 2, 5])  # the same samples, other rows
    reference = copy.deepcopy(model)
    with torch.no_grad():
        current = model(b.x)
    out = saf.step(b)
    past = past[[3, 2, 1, 0]]  # the past logits of samples 0, 7, 2, 5
    expected = kl_reference(current, past, tau)
    torch.testing.assert_close(out["penalty"], expected, rtol=1e-12, atol=0)
    assert out["past_frac"] == 1.0
    expected_grads = grads_at(reference, lambda m: F.cross_entropy(m(b.x), b.y) + lam * kl_reference(m(b.x), past, tau))
    for p, g in zip(model.parameters(), expected_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-15)


def test_saf_term_and_its_gradient_vanish_when_the_logits_equal_the_stored_ones():
    model, opt, saf = build(lam=1.0, kl_start_epoch=0, lag=1, lr=0.0)  # lr 0: the weights never move
    epochs_of_batches(saf, 2, BATCHES)
    saf.start_epoch(2)
    b = batch(BATCHES[1])
    out = saf.step(b)
    assert abs(float(out["penalty"])) < 1e-15
    for p, g in zip(model.parameters(), grads_at(copy.deepcopy(model), lambda m: F.cross_entropy(m(b.x), b.y))):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-15)


def test_saf_memory_is_indexed_by_dataset_index_not_by_row():
    model, opt, saf = build(lam=1.0, kl_start_epoch=0, lag=1)
    epochs_of_batches(saf, 1, BATCHES)
    saf.start_epoch(1)
    b = batch([11, 3, 14, 6])
    with torch.no_grad():
        logits = model(b.x)
    saf.step(b)
    torch.testing.assert_close(saf.memory[b.index, 1 % 2], logits, rtol=0, atol=0)
    saf.start_epoch(2)
    shuffled = copy.deepcopy((model, opt, saf))
    out = saf.step(b)
    out_shuffled = shuffled[2].step(batch([6, 14, 11, 3]))
    torch.testing.assert_close(out["penalty"], out_shuffled["penalty"], rtol=1e-12, atol=0)
    for p, q in zip(model.parameters(), shuffled[0].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)


def test_saf_ring_buffer_reads_the_logits_of_exactly_lag_epochs_ago():
    lag, tau = 2, 2.0
    model, opt, saf = build(lam=0.5, tau=tau, kl_start_epoch=0, lag=lag)
    epochs_of_batches(saf, 1, BATCHES)
    index = [4, 9, 1]
    written = {}
    for epoch in range(1, 6):
        saf.start_epoch(epoch)
        b = batch(index)
        with torch.no_grad():
            written[epoch] = model(b.x)
        out = saf.step(b)
        torch.testing.assert_close(saf.memory[b.index, epoch % (lag + 1)], written[epoch], rtol=0, atol=0)
        if epoch > lag:
            torch.testing.assert_close(
                out["penalty"], kl_reference(written[epoch], written[epoch - lag], tau), rtol=1e-12, atol=0
            )
        else:
            assert out["penalty"] == 0.0  # no epoch-(e - lag) logits exist yet


def test_saf_memory_grows_to_new_indices_and_rows_without_a_past_count_zero():
    lag, tau = 1, 4.0
    model, opt, saf = build(lam=1.0, tau=tau, kl_start_epoch=0, lag=lag)
    epochs_of_batches(saf, 1, [[0, 1, 2, 3]])
    saf.start_epoch(1)
    assert saf.memory is None  # grown lazily, at the first step of the epoch
    b = batch([3, 12, 0, 2])  # 12 is beyond every index seen in epoch 0
    with torch.no_grad():
        past = model(b.x)
    saf.step(b)
    assert saf.memory.shape == (4 + 1, lag + 1, C)  # rows 0..3 and the scratch row
    saf.start_epoch(2)
    with torch.no_grad():
        current = model(b.x)
    out = saf.step(b)
    assert saf.memory.shape == (13 + 1, lag + 1, C)  # grown to index 12 and kept rows 0..3
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0])
    p = torch.softmax(past / tau, 1)
    per_row = (p * (torch.log(p) - torch.log_softmax(current / tau, 1))).sum(1)
    torch.testing.assert_close(out["penalty"], tau**2 * (keep * per_row).mean(), rtol=1e-12, atol=0)
    assert out["past_frac"] == 0.75
    # SAF memory size N (lag + 1) C values (+ the scratch row)
    assert saf.memory.numel() == (13 + 1) * (lag + 1) * C


@pytest.mark.parametrize(
    "name, hp", [("saf", dict(kl_start_epoch=0, lag=2)), ("mesa", dict(kl_start_epoch=1, ema_decay=0.9))]
)
def test_resume_from_state_dict_continues_identically(name, hp):
    model, opt, method = build(name, lam=0.8, **hp)
    full = epochs_of_batches(method, 6, BATCHES)
    model1, opt1, method1 = build(name, lam=0.8, **hp)
    epochs_of_batches(method1, 3, BATCHES)
    saved = checkpoint_round_trip(model1.state_dict(), opt1.state_dict(), method1.state_dict())
    model2, opt2, method2 = build(name, seed=4, lam=0.8, **hp)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    method2.load_state_dict(saved[2])
    rest = epochs_of_batches(method2, 6, BATCHES, first=3)
    assert any(float(o["penalty"]) > 0 for o in rest)
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for a, b in zip(full[6:], rest):
        torch.testing.assert_close(torch.as_tensor(a["penalty"]), torch.as_tensor(b["penalty"]), rtol=0, atol=0)


def test_mesa_with_decay_zero_tracks_the_weights_and_its_kl_vanishes():
    model, opt, mesa = build("mesa", lam=1.0, kl_start_epoch=0, ema_decay=0.0)
    for _, b, reference in steps_with_references(mesa, 3):
        out = mesa.step(b)
        for p, v in zip(model.parameters(), mesa.teacher.parameters()):
            torch.testing.assert_close(v, p, rtol=0, atol=0)
        assert abs(float(out["penalty"])) < 1e-15
        expected = grads_at(reference, lambda m, b=b: F.cross_entropy(m(b.x), b.y))
        for p, g in zip(model.parameters(), expected):
            torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-15)


def test_mesa_teacher_is_an_ema_and_its_kl_matches_the_formula():
    decay, lam, tau = 0.6, 0.5, 3.0
    model, opt, mesa = build("mesa", lam=lam, tau=tau, kl_start_epoch=0, ema_decay=decay)
    teacher = [p.detach().clone() for p in model.parameters()]
    forwards = {"student": 0, "teacher": 0}
    # The hooks count calls on these very modules, not on the deep copies made below.
    for key, module in (("student", model), ("teacher", mesa.teacher)):
        module.register_forward_hook(
            lambda m, *_, key=key, module=module: forwards.__setitem__(key, forwards[key] + (m is module))
        )
    for epoch, b, reference in steps_with_references(mesa, 3):
        target_model = copy.deepcopy(model)
        with torch.no_grad():
            for p, v in zip(target_model.parameters(), teacher):
                p.copy_(v)
            target = target_model(b.x)
        out = mesa.step(b)
        if epoch > 0:
            expected = kl_reference(reference(b.x).detach(), target, tau)
            torch.testing.assert_close(out["penalty"], expected, rtol=1e-12, atol=0)
            grads = grads_at(
                reference,
                lambda m, b=b, target=target: F.cross_entropy(m(b.x), b.y) + lam * kl_reference(m(b.x), target, tau),
            )
            for p, g in zip(model.parameters(), grads):
                torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-15)
        else:
            assert out["penalty"] == 0.0
        teacher = [decay * v + (1 - decay) * p.detach() for v, p in zip(teacher, model.parameters())]
        for v, t in zip(mesa.teacher.parameters(), teacher):
            torch.testing.assert_close(v, t, rtol=1e-12, atol=1e-15)
    # one pass per step, plus one no-grad teacher forward while the term applies
    assert forwards == {"student": 6, "teacher": 4}


def test_mesa_teacher_uses_running_bn_statistics():
    tau = 2.0
    model, opt, mesa = build("mesa", bn=True, lam=1.0, tau=tau, kl_start_epoch=0, ema_decay=0.0)
    mesa.start_epoch(0)
    mesa.step(batch(BATCHES[0]))
    torch.testing.assert_close(mesa.teacher[1].running_mean, model[1].running_mean, rtol=0, atol=0)
    mesa.start_epoch(1)
    b = batch(BATCHES[1])
    with torch.no_grad():
        target = copy.deepcopy(model).eval()(b.x)
        current = model(b.x)  # train mode: batch statistics
    model[1].load_state_dict(mesa.teacher[1].state_dict())  # undo the extra forward's BN update
    out = mesa.step(b)
    torch.testing.assert_close(out["penalty"], kl_reference(current, target, tau), rtol=1e-12, atol=0)
    assert float(out["penalty"]) > 1e-6  # not 0 with equal weights: the documented eval-mode difference


def test_mesa_teacher_starts_from_the_lsq_step_sizes_the_student_initialized():
    """LSQ sets activation step sizes in the first forward, after the teacher was copied: the
    teacher must take them (it kept s = 1, and once the EMA copied the `initialized` flag it
    never set its own), so with the term active it is the student's average, not another net."""
    model = mlp(6, 16, 16, C, activation=nn.ReLU)
    quantize_model(model, 3)  # the middle layer: weights and its (unsigned) input quantized
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mesa = create_method("mesa", model, opt, lam=1.0, kl_start_epoch=0, ema_decay=0.99)
    quantizers = lambda net: [m for m in net.modules() if isinstance(m, ActivationQuantizer)]  # noqa: E731
    mesa.start_epoch(0)
    mesa.step(batch(BATCHES[0]))
    assert quantizers(model) and len(quantizers(model)) == len(quantizers(mesa.teacher))
    for student, teacher in zip(quantizers(model), quantizers(mesa.teacher)):
        assert bool(teacher.initialized) and bool(teacher.signed) == bool(student.signed)
        # from the same start, the EMA moved the teacher 1% of the way along the student's first update
        torch.testing.assert_close(teacher.step, student.step, rtol=1e-2, atol=0)
    mesa.start_epoch(1)
    out = mesa.step(batch(BATCHES[1]))
    assert 0 < float(out["penalty"]) < 1e-3  # measured 3.3e-4; with the teacher left at s = 1: 1.5e-3


@pytest.mark.parametrize(
    "name, hp, fragment",
    [
        ("saf", dict(lam=-1.0), "lam for method 'saf' must be >= 0"),
        ("saf", dict(tau=0.0), "tau for method 'saf' must be > 0"),
        ("saf", dict(lag=0), "lag for method 'saf' must be >= 1"),
        ("mesa", dict(ema_decay=1.5), "ema_decay for method 'mesa' must be in [0, 1]"),
        ("mesa", dict(tau=-2.0), "tau for method 'mesa' must be > 0"),
    ],
)
def test_bad_hyperparameters_raise_one_line(name, hp, fragment):
    model = small_mlp()
    with pytest.raises(UsageError) as info:
        create_method(name, model, torch.optim.SGD(model.parameters(), lr=0.1), **hp)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_saf_needs_dataset_indices():
    model, opt, saf = build()
    saf.start_epoch(0)
    with pytest.raises(UsageError, match=r"^method 'saf' needs Batch.index, the dataset index of each row"):
        saf.step(Batch(DATA[:4], LABELS[:4]))


def test_defaults():
    model = small_mlp()
    saf = create_method("saf", model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert (saf.lam, saf.tau, saf.kl_start, saf.lag) == (0.3, 5.0, 5, 3)
    mesa = create_method("mesa", model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert (mesa.lam, mesa.tau, mesa.kl_start, mesa.ema_decay) == (0.8, 5.0, 5, 0.9998)
    assert not mesa.teacher.training and not any(p.requires_grad for p in mesa.teacher.parameters())
