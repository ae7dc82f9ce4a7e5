"""docs/ is executable: each worked example is followed as written, in a copy of the project (the
files written where the page says, its commands run), and the GSAM example is checked against SAM
and its formula; docs/own_loop.md and README's "Use it in your own project" run as written."""

import copy
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gvr_lab import Batch, create_method
from gvr_lab.landscape import flat

from helpers import REPO, gvr_lab_process, install_package, mlp, write_idx

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

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
    return run_commands("".join(blocks(page, "bash")), root, [root])


def run_commands(text: str, cwd: Path, pythonpath) -> list[str]:
    """Every line of `text`, a gvr-lab command, run in `cwd` with `pythonpath` first; their outputs."""
    outputs = []
    for line in text.splitlines():
        words = shlex.split(line)
        assert words[0] == "gvr-lab", f"a command the test cannot follow: {line}"
        outputs.append(gvr_lab_process(words[1:], cwd, pythonpath).stdout)
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


def test_own_loop_page_runs_as_written(tmp_path, monkeypatch, capsys):
    """Every block in order, in one namespace, as a reader pastes them (no training loop: fast)."""
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for number, code in enumerate(blocks("own_loop.md", "python"), 1):
        exec(compile(code, f"docs/own_loop.md, block {number}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "method 'vsam' keeps per-epoch state (SAM steps throughout its warm-up" in printed
    assert float(re.search(r"epoch 2: KL to the logits of epoch 1 = (\S+)", printed).group(1)) > 0
    assert "mixup loss" in printed and "distillation loss" in printed
    assert namespace["vsam"].epoch == 0 and namespace["saf"].epoch == 2
    assert float(namespace["out"]["loss"]) > 0 and namespace["esam"].loss_fn is namespace["soft_cross_entropy"]
    assert not list(tmp_path.iterdir())  # the page's blocks write nothing


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    return text[start : text.index("\n## ", start + 1)]


@pytest.mark.slow
def test_use_it_in_your_own_project_runs_as_written(tmp_path, monkeypatch, capsys):
    """README's section in an empty folder: its Python blocks in one namespace (the plugin's module
    saved where its first line says, and installed as its pyproject.toml block declares), then its
    commands, the plugin's on the path."""
    monkeypatch.chdir(tmp_path)
    section = readme_section("Use it in your own project")
    python = re.findall(r"```python\n(.*?)```", section, re.S)
    [plugin] = [code for code in python if code.startswith("# mylab/")]
    namespace = {}
    for number, code in enumerate(python, 1):
        if code is not plugin:
            exec(compile(code, f"README.md, own project block {number}", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert printed[1] == "object:torch.nn.modules.container.Sequential"
    assert namespace["mine"].summary["status"] == "completed" and namespace["out"]["sampled"] in (0.0, 1.0)

    [toml] = re.findall(r"```toml\n(.*?)```", section, re.S)
    entry_points = tomllib.loads(toml)["project"]["entry-points"]
    path = plugin.splitlines()[0].removeprefix("# ")
    install_package(tmp_path / "site", "mylab", {"mylab/__init__.py": "", path: plugin}, entry_points)
    commands = "".join(re.findall(r"```bash\n(.*?)```", section, re.S))
    run_commands(commands, tmp_path, [tmp_path / "site"])
    config = (tmp_path / "runs" / "sam-adamw" / "config.json").read_text()
    assert '"optimizer": "adamw"' in config and '"momentum": null' in config
    assert '"status": "completed"' in (tmp_path / "runs" / "mylab" / "summary.json").read_text()


def curvature_findings() -> str:
    """README's curvature findings: from "Findings at the cpu preset" to the next section."""
    readme = (REPO / "README.md").read_text()
    return readme.split("Findings at the cpu preset", 1)[1].split("\n## ", 1)[0]


def test_the_curvature_findings_quote_only_intervals_of_the_committed_tables():
    """README's curvature findings are copied from the study's tables: a number that drifted from
    them (a redrawn study, a typo) fails here."""
    findings = curvature_findings()
    tables = "".join(p.read_text() for p in (REPO / "figures" / "curvature").glob("*.md"))
    quoted = re.findall(r"-?[\d.]+ \[-?[\d.]+, -?[\d.]+\]", findings)
    assert len(quoted) >= 8
    missing = [q for q in quoted if q not in tables]
    assert not missing, f"not in figures/curvature/*.md: {missing}"


def test_the_curvature_findings_count_the_intervals_of_the_committed_summary():
    """The counts README gives ("19 of the 20 intervals exclude 0", ...) are those of summary.md."""
    findings = " ".join(curvature_findings().split())
    table = (REPO / "figures" / "curvature" / "summary.md").read_text()
    header, *rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    columns = [c.strip() for c in header.strip("|").split("|")]
    cells = [dict(zip(columns, (c.strip() for c in row.strip("|").split("|")))) for row in rows]

    def excluding_zero(column):
        bounds = [re.search(r"\[(-?[\d.]+), (-?[\d.]+)\]", cell[column]).groups() for cell in cells]
        return sum(float(low) > 0 or float(high) < 0 for low, high in bounds), len(bounds)

    (l1, n1), (tr, ntr) = excluding_zero("Δλ1"), excluding_zero("Δtrace")
    (ad, nad), (fn, nfn) = excluding_zero("Δadaptive sharpness"), excluding_zero("Δfilter-normalized curvature")
    assert f"{l1} of the {n1} intervals exclude 0" in findings and f"the trace's {tr} of {ntr}" in findings
    assert f"{nad + nfn - ad - fn} of their {nad + nfn} intervals include 0" in findings
