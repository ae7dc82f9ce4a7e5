"""docs/ is executable: the worked example of docs/adding_a_method.md is run as written."""

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gvr_lab import Batch, create_method
from gvr_lab.methods import base

DOCS = Path(__file__).parent.parent / "docs"


def example_code() -> str:
    text = (DOCS / "adding_a_method.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    return blocks[0]


@pytest.fixture
def gsam(monkeypatch):
    """The example registered into a copy of the registry, so it leaves the real one alone."""
    monkeypatch.setattr(base, "METHODS", dict(base.METHODS))
    monkeypatch.setattr(base, "ALIASES", dict(base.ALIASES))
    namespace = {}
    exec(compile(example_code(), "docs/adding_a_method.md", "exec"), namespace)
    return namespace["GSAM"]


def test_the_example_is_under_60_lines_and_says_so():
    lines = example_code().rstrip("\n").count("\n") + 1
    assert lines < 60
    assert f"GSAM in {lines} lines" in (DOCS / "adding_a_method.md").read_text()


def setup(name, **hp):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    return model, create_method(name, model, opt, **hp)


def batch():
    g = torch.Generator().manual_seed(1)
    return Batch(torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))


def test_gsam_with_alpha_zero_is_sam(gsam):
    sam_model, sam = setup("sam", rho=0.3)
    gsam_model, method = setup("gsam", rho=0.3, alpha=0.0)
    assert type(method) is gsam
    for _ in range(3):
        sam.step(batch())
        method.step(batch())
    assert all(torch.equal(a, b) for a, b in zip(sam_model.parameters(), gsam_model.parameters()))


def test_gsam_update_is_g_s_minus_alpha_g_perp(gsam):
    rho, alpha = 0.3, 0.4
    model, method = setup("gsam", rho=rho, alpha=alpha)
    reference = copy.deepcopy(model)
    b = batch()
    params = list(reference.parameters())
    flat = lambda ts: torch.cat([t.flatten() for t in ts])  # noqa: E731
    g = flat(torch.autograd.grad(F.cross_entropy(reference(b.x), b.y), params))
    with torch.no_grad():
        for p, e in zip(params, (rho * g / g.norm()).split([p.numel() for p in params])):
            p.add_(e.view_as(p))
    g_s = flat(torch.autograd.grad(F.cross_entropy(reference(b.x), b.y), params))
    g_perp = g - (g @ g_s) / (g_s @ g_s) * g_s
    before = flat([p.detach().clone() for p in model.parameters()])
    method.step(b)
    torch.testing.assert_close(before - flat(model.parameters()).detach(), g_s - alpha * g_perp, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="alpha for method 'gsam' must be >= 0"):
        setup("gsam", alpha=-1.0)


def test_the_method_notes_are_current():
    from gvr_lab.methods import method_notes

    assert (DOCS / "methods.md").read_text() == method_notes(), "stale: run gvr-lab docs"
