"""docs/ is executable: each worked example is followed as written, in a copy of the project (the
files written where the page says, its commands run), and the GSAM example is checked against SAM
and its formula."""

import copy
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gvr_lab import Batch, create_method
from gvr_lab.landscape import flat

from helpers import mlp, write_idx

REPO = Path(__file__).parent.parent
DOCS = REPO / "docs"


def blocks(page: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (DOCS / page).read_text(), re.S)


def example_code() -> str:
    [code] = blocks("adding_a_method.md", "python")
    return code


def project_copy(tmp_path: Path) -> Path:
    """The project as a user's checkout has it, where a page's steps may change files."""
    root = tmp_path / "project"
    for folder in ("gvr_lab", "docs", "notebooks"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__", "*.ipynb"))
    for name in ("README.md", "pyproject.toml"):
        shutil.copy(REPO / name, root / name)
    return root


def follow_commands(page: str, root: Path) -> list[str]:
    """Run every line of the page's bash blocks in `root`, with `root`'s package the one imported;
    their outputs."""
    gvr_lab = str(Path(sys.executable).parent / "gvr-lab")
    env = {**os.environ, "PYTHONPATH": str(root), "GVR_LAB_OFFLINE": "1"}
    outputs = []
    for line in "".join(blocks(page, "bash")).splitlines():
        words = shlex.split(line)
        assert words[0] == "gvr-lab", f"{page}: a command the test cannot follow: {line}"
        done = subprocess.run([gvr_lab, *words[1:]], cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{line}\n{done.stderr}"
        outputs.append(done.stdout)
    return outputs


def saved_as(page: str) -> str:
    """The path the page says its python block is saved as, or added to."""
    [path] = re.findall(r"(?:Save this as|at the end of) `([^`]+)`", (DOCS / page).read_text())
    return path


@pytest.fixture
def gsam(method_registry):
    """The example registered for the test (the registry is put back after it)."""
    namespace = {}
    exec(compile(example_code(), "docs/adding_a_method.md", "exec"), namespace)
    return namespace["GSAM"]


def test_the_example_is_under_60_lines_and_says_so():
    lines = example_code().rstrip("\n").count("\n") + 1
    assert lines < 60
    assert f"GSAM in {lines} lines" in (DOCS / "adding_a_method.md").read_text()


@pytest.mark.slow
def test_adding_a_method_as_the_page_says(tmp_path):
    root = project_copy(tmp_path)
    target = root / saved_as("adding_a_method.md")
    assert target.parent.is_dir() and not target.exists()
    target.write_text(example_code())
    _, listing, trained = follow_commands("adding_a_method.md", root)
    assert "gsam" in listing and "alpha=0.1" in listing
    assert "## GSAM: surrogate-gap guided sharpness-aware minimization" in (root / "docs" / "methods.md").read_text()
    assert "| `gsam` | Zhuang et al. ICLR 2022 (GSAM)" in (root / "README.md").read_text()
    assert "final test accuracy" in trained
    summary = (root / "runs" / "try-gsam" / "summary.json").read_text()
    assert '"status": "completed"' in summary


@pytest.mark.slow
def test_adding_a_dataset_as_the_page_says(tmp_path):
    import numpy as np

    root = project_copy(tmp_path)
    target = root / saved_as("adding_a_dataset.md")
    [code] = blocks("adding_a_dataset.md", "python")
    target.write_text(target.read_text() + "\n\n" + code)
    rng = np.random.default_rng(0)
    folder = root / "data" / "mnist"
    folder.mkdir(parents=True)
    for part, n in (("train", 600), ("t10k", 100)):
        write_idx(folder / f"{part}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{part}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))
    _, listing, trained = follow_commands("adding_a_dataset.md", root)
    assert "mnist" in listing.split("datasets:")[1]
    assert "| `mnist` | 10 | 1x28x28 | MNIST (LeCun et al. 1998)" in (root / "README.md").read_text()
    assert "final test accuracy" in trained
    assert '"status": "completed"' in (root / "runs" / "try-mnist" / "summary.json").read_text()


def setup(name, **hp):
    model = mlp(6, 8, 3).double()
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
