"""Every registered method, parametrized over the registry (timm's habit): the contract holds."""

import copy

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from gvr_lab import Batch, create_method, create_model, list_methods
from gvr_lab.methods import METHODS

from helpers import UPDATE_NORM

pytestmark = pytest.mark.usefixtures("float64")


@pytest.fixture
def norms_log(tmp_path):
    """A gradient-norm log as an sgd run writes it, for exter_graft."""
    pd.DataFrame({"step": list(range(100)), "grad_norm": [1.0 + 0.1 * i for i in range(100)]}).to_parquet(
        tmp_path / "steps.parquet"
    )
    return str(tmp_path)


# What puts a method's state to work within the epochs the tests below run: vSAM past its warm-up
# with windows of 2 steps (reuse steps read the stored PSF), SAF's and MESA's terms from epoch 1 on.
ACTIVE = {
    "vsam": {"warmup_epochs": 0, "window": 2, "blocks": 1},
    "saf": {"kl_start_epoch": 0, "lag": 1},
    "mesa": {"kl_start_epoch": 0},
    "looksam": {"k": 3},
}


def smoke_hparams(name, norms_log):
    hp = dict(ACTIVE.get(name, {}))
    if "micro_batch_size" in METHODS[name].hparams:
        hp["micro_batch_size"] = 8
    if "norms_path" in METHODS[name].hparams:
        hp["norms_path"] = norms_log
    if "subset" in METHODS[name].hparams:
        hp["subset"] = 8
    return hp


def make(name, norms_log, seed=0, method_args=None, **opt_args):
    """(model, optimizer, method): `method_args` besides the hyper-parameters (loss_fn, ...)."""
    torch.manual_seed(seed)
    model = create_model("tiny_cnn", num_classes=5, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), **{"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, **opt_args})
    return model, opt, create_method(name, model, opt, **smoke_hparams(name, norms_log), **(method_args or {}))


def batch(seed, n=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    return Batch(
        x,
        torch.randint(0, 5, (n,), generator=g),
        torch.arange(seed * n, seed * n + n),
        x + 0.1 * torch.randn(n, 1, 28, 28, generator=g),
    )


@pytest.mark.parametrize("name", list_methods())
def test_one_step_contract(name, norms_log):
    model, opt, method = make(name, norms_log)
    method.start_epoch(0)
    b = batch(1)
    with torch.no_grad():
        expected_loss = F.cross_entropy(model(b.x), b.y)
    before = [p.detach().clone() for p in model.parameters()]
    out = method.step(b)
    assert method.views in (1, 2)
    assert set(out) >= {"loss", "acc"}
    for key, value in out.items():
        assert not torch.is_tensor(value) or value.dim() == 0, key
        assert torch.isfinite(torch.as_tensor(value)), key
    # "loss" is the data loss on batch.x at the weights the step started from
    torch.testing.assert_close(torch.as_tensor(out["loss"], dtype=torch.float64), expected_loss, rtol=1e-10, atol=0)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def run_epochs(method, first, last, steps=2):
    """Epochs first..last-1 of `steps` steps each; every epoch sees the same dataset rows (SAF
    finds the past of each) and a fixed RNG state (the loop reseeds per epoch)."""
    for epoch in range(first, last):
        torch.manual_seed(100 + epoch)
        method.start_epoch(epoch)
        for s in range(steps):
            method.step(batch(1 + s))
        method.end_epoch(epoch)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("name", list_methods())
def test_a_per_example_loss_fn_gives_the_default_update(name, label_smoothing, norms_log):
    """loss_fn=cross_entropy(reduction='none') (with the label smoothing inside it) against the
    default loss (the method's label_smoothing), 4 steps over 2 epochs, every state of a method in
    use. The method averages loss_fn's per-example losses itself, where the default takes
    cross_entropy's own mean: another code path for the same sum, so the weights are compared at
    rounding's tolerance (float64; measured on torch 2.14.1: bitwise equal for every method)."""
    calls = []

    def per_example(logits, y):
        calls.append(len(y))
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing, reduction="none")

    default, _, method = make(name, norms_log, method_args={"label_smoothing": label_smoothing})
    run_epochs(method, 0, 2)
    own, _, method = make(name, norms_log, method_args={"loss_fn": per_example})
    run_epochs(method, 0, 2)
    assert len(calls) >= 4  # at least once a step: the update is loss_fn's
    for a, b in zip(default.parameters(), own.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# Methods whose state_dict carries what the next steps need: a fresh method continues differently.
STATEFUL = {"looksam", "vsam", "saf", "mesa", "exter_graft"}


@pytest.mark.parametrize("name", list_methods())
def test_state_dict_resume_continues_identically(name, norms_log):
    model, opt, method = make(name, norms_log)
    run_epochs(method, 0, 2)  # past every warm-up and start epoch; the state is in use
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), method.state_dict()))
    run_epochs(method, 2, 4)

    def resumed(load_method_state):
        model2, opt2, method2 = make(name, norms_log, seed=99)
        state = copy.deepcopy(saved)  # load_state_dict may keep the tensors it is given, and step them
        model2.load_state_dict(state[0])
        opt2.load_state_dict(state[1])
        if load_method_state:
            method2.load_state_dict(state[2])
        run_epochs(method2, 2, 4)
        return model2

    for a, b in zip(model.parameters(), resumed(True).parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if name in STATEFUL:  # the state matters: without it the run goes elsewhere
        assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), resumed(False).parameters()))


@pytest.mark.parametrize("name", list_methods())
def test_the_logged_update_norm_is_that_of_the_gradient_the_optimizer_applies(name, norms_log):
    """Measured before optimizer.step(): foreach SGD with Nesterov and no weight decay adds the
    momentum into .grad in place, so a norm taken after the step logged 0.953 where the update
    gradient's was 0.502."""
    key = UPDATE_NORM.get(name, "grad_norm")
    if key is None:
        pytest.skip(f"{name} logs no norm of its update gradient")
    model, opt, method = make(name, norms_log, nesterov=True, foreach=True, weight_decay=0.0)
    applied = []
    opt.register_step_pre_hook(
        lambda *_: (
            applied.append(
                torch.linalg.vector_norm(
                    torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
                )
            )
            and None
        )
    )
    method.start_epoch(0)
    logged = [method.step(batch(s))[key] for s in (1, 2, 3)]  # from the 2nd step on, momentum is in play
    torch.testing.assert_close(torch.stack(logged), torch.stack(applied), rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", list_methods())
def test_unknown_hyperparameter_lists_valid_ones(name):
    model = create_model("tiny_cnn", num_classes=5, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    valid = ", ".join(METHODS[name].hparams) or "none"
    with pytest.raises(ValueError, match=f"unknown hyperparameter 'bogus' for method '{name}'; valid: {valid}$"):
        create_method(name, model, opt, bogus=1)


def test_original_names_are_aliases():
    originals = {
        "Vanilla": "sgd",
        "PseudoGD": "pseudo_gd",
        "RegLoss": "reg_loss",
        "FishLoss": "fish_loss",
        "AvgJacLoss": "avg_jac_loss",
        "UnitJacLoss": "unit_jac_loss",
        "IterGraft": "iter_graft",
        "ExterGraft": "exter_graft",
        "NGD": "ngd",
    }
    from gvr_lab.methods import method_class

    for original, canonical in originals.items():
        assert method_class(original).name == canonical
        assert method_class(original.upper()).name == canonical


def test_readme_method_table_is_the_registry():
    """README's table is `gvr-lab list --markdown`: references, defaults and passes cannot drift."""
    from pathlib import Path

    from gvr_lab.methods import markdown_table

    lines = (Path(__file__).parent.parent / "README.md").read_text().splitlines()
    start = lines.index(markdown_table().splitlines()[0])
    end = next(i for i in range(start, len(lines) + 1) if i == len(lines) or not lines[i].startswith("|"))
    assert "\n".join(lines[start:end]) == markdown_table(), "regenerate it: gvr-lab list --markdown"


def test_a_taken_name_is_refused(monkeypatch):
    from gvr_lab.methods import base

    monkeypatch.setattr(base, "METHODS", dict(base.METHODS))
    monkeypatch.setattr(base, "ALIASES", dict(base.ALIASES))

    class Again(METHODS["sgd"]):
        name = "SGD2"
        aliases = ("Vanilla",)

    with pytest.raises(ValueError, match="method name 'Vanilla' of Again is already registered \\(by SGD\\)"):
        base.register_method(Again)
    assert "sgd2" not in base.ALIASES  # nothing half-registered


@pytest.mark.parametrize("name", list_methods())
def test_hyperparameters_cannot_shadow_the_contract(name, norms_log):
    """Hyper-parameters live in method.hp and, since no name of the contract may be one (register_method
    refuses it), every one also reads as an attribute."""
    _, _, method = make(name, norms_log)
    assert callable(method.start_epoch) and callable(method.step)
    for key, value in method.hp.items():
        assert getattr(method, key) == method.hp[key] == value
