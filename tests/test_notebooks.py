"""The notebook suite through the runner: every notebook at the smoke preset, and the runner's rules."""

import json

import pytest

from gvr_lab.cli import main
from gvr_lab.runner import NotebookFailed, notebook_paths, run_notebook

EXPECTED = {
    "quickstart": ["accuracy.png", "accuracy.pdf", "summary.md", "summary.tex"],
    "gvr_vs_sgd": ["accuracy.png", "penalty.png", "penalty.pdf", "summary.md", "summary.tex"],
    "implicit_regularization": ["main_table.md", "main_table.tex", "grafting_table.md", "microbatch_sweep.png",
                                "trajectories.png", "trajectories.pdf"],
    "sam_efficiency": ["accuracy_vs_throughput.png", "accuracy_vs_throughput.pdf", "summary.md", "summary.tex"],
    "gradient_dynamics": ["norms.png", "variation.png", "sampling.png", "summary.md"],
    "quantization": ["accuracy_vs_bits.png", "accuracy_vs_bits.pdf", "summary.md", "summary.tex"],
}


@pytest.mark.slow
def test_figures_smoke_regenerates_every_figure_and_table(tmp_path, capsys):
    figs = tmp_path / "figures"
    assert main(["figures", "--preset", "smoke", "--out", str(figs), "--runs-root", str(tmp_path / "runs")]) == 0
    assert sorted(p.stem.split("_", 1)[1] for p in notebook_paths()) == sorted(EXPECTED)
    for folder, names in EXPECTED.items():
        for name in names:
            path = figs / folder / name
            assert path.is_file() and path.stat().st_size > 0, path
    index = (figs / "README.md").read_text()
    assert "gvr-lab figures --preset smoke" in index and "quantization/accuracy_vs_bits.png" in index
    assert "Training: 3 runs" in index  # the quickstart's sgd, gvr and sam, with their measured time
    assert "| sgd" in (figs / "quickstart" / "summary.md").read_text()


def write_notebook(tmp_path, body='print("ok")'):
    nb = tmp_path / "nb.py"
    nb.write_text('# %% tags=["parameters"]\nepochs: int = 1  # passes\nseeds: list = [0]  # seeds\n'
                  f'rate: float = 0.1  # a rate\n\n# %%\nx = 1\n\n# %%\n{body}\n')
    return nb


def test_runner_executes_injects_and_skips_completed(tmp_path):
    nb = write_notebook(tmp_path, "assert seeds == [3, 4] and rate == 2.0 and epochs == 1")
    params_file = tmp_path / "p.yaml"
    params_file.write_text("seeds: [3, 4]\nrate: 1\n")
    run_dir = run_notebook(nb, {"rate": 2}, params_file=str(params_file), runs_root=tmp_path / "runs")
    assert (run_dir / "DONE").is_file() and (run_dir / "executed.ipynb").is_file()
    assert json.loads((run_dir / "params.json").read_text())["seeds"] == [3, 4]
    stamp = (run_dir / "executed.ipynb").stat().st_mtime_ns
    assert run_notebook(nb, {"rate": 2}, params_file=str(params_file), runs_root=tmp_path / "runs") == run_dir
    assert (run_dir / "executed.ipynb").stat().st_mtime_ns == stamp  # skipped
    run_notebook(nb, {"rate": 2}, params_file=str(params_file), runs_root=tmp_path / "runs", force=True)
    assert (run_dir / "executed.ipynb").stat().st_mtime_ns != stamp  # --force executes again


def test_failed_cell_is_reported_and_partial_notebook_kept(tmp_path, capsys):
    nb = write_notebook(tmp_path, 'raise ValueError("the data looks wrong")')
    with pytest.raises(NotebookFailed, match=r"nb.py: cell \d+ failed: ValueError: the data looks wrong"):
        run_notebook(nb, {}, runs_root=tmp_path / "runs")
    executed = next((tmp_path / "runs").glob("*/executed.ipynb"))
    assert "the data looks wrong" in executed.read_text()
    assert not (executed.parent / "DONE").exists()
    assert main(["run", str(nb), "--runs-root", str(tmp_path / "runs")]) == 1
    assert "cell" in capsys.readouterr().err


def test_cli_list_values_survive(tmp_path):
    nb = write_notebook(tmp_path, "assert seeds == [0, 1, 2], seeds")
    assert main(["run", str(nb), "-p", "seeds", "[0,1,2]", "--runs-root", str(tmp_path / "runs")]) == 0
