"""Every registered method, parametrized over the registry (timm's habit): the contract holds."""

import copy

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from gvr_lab import Batch, create_method, create_model, list_methods
from gvr_lab.methods import METHODS


@pytest.fixture(autouse=True)
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.fixture
def norms_log(tmp_path):
    """A gradient-norm log as an sgd run writes it, for exter_graft."""
    pd.DataFrame({"step": list(range(0, 100, 10)), "grad_norm": [1.0 + i for i in range(10)]}).to_parquet(
        tmp_path / "steps.parquet")
    return str(tmp_path)


def smoke_hparams(name, norms_log):
    hp = {}
    if "micro_batch_size" in METHODS[name].hparams:
        hp["micro_batch_size"] = 8
    if "norms_path" in METHODS[name].hparams:
        hp["norms_path"] = norms_log
    if "subset" in METHODS[name].hparams:
        hp["subset"] = 8
    return hp


def make(name, norms_log, seed=0):
    torch.manual_seed(seed)
    model = create_model("tiny_cnn", num_classes=5, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    return model, opt, create_method(name, model, opt, **smoke_hparams(name, norms_log))


def batch(seed, n=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    return Batch(x, torch.randint(0, 5, (n,), generator=g), torch.arange(seed * n, seed * n + n),
                 x + 0.1 * torch.randn(n, 1, 28, 28, generator=g))


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


@pytest.mark.parametrize("name", list_methods())
def test_state_dict_resume_continues_identically(name, norms_log):
    model, opt, method = make(name, norms_log)
    method.start_epoch(0)
    method.step(batch(1))
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), method.state_dict()))
    torch.manual_seed(123)
    method.step(batch(2))
    method.step(batch(3))

    model2, opt2, method2 = make(name, norms_log, seed=99)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    method2.load_state_dict(saved[2])
    method2.start_epoch(0)
    torch.manual_seed(123)
    method2.step(batch(2))
    method2.step(batch(3))
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", list_methods())
def test_unknown_hyperparameter_lists_valid_ones(name):
    model = create_model("tiny_cnn", num_classes=5, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    valid = ", ".join(METHODS[name].hparams) or "none"
    with pytest.raises(ValueError, match=f"unknown hyperparameter 'bogus' for method '{name}'; valid: {valid}$"):
        create_method(name, model, opt, bogus=1)


def test_original_names_are_aliases():
    originals = {"Vanilla": "sgd", "PseudoGD": "pseudo_gd", "RegLoss": "reg_loss", "FishLoss": "fish_loss",
                 "AvgJacLoss": "avg_jac_loss", "UnitJacLoss": "unit_jac_loss", "IterGraft": "iter_graft",
                 "ExterGraft": "exter_graft", "NGD": "ngd"}
    from gvr_lab.methods import method_class

    for original, canonical in originals.items():
        if canonical in METHODS:
            assert method_class(original).name == canonical
            assert method_class(original.upper()).name == canonical
