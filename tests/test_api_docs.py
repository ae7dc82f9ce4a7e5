"""docs/api.md runs as written (its blocks in order, in one session: the first trains the grid the
others read), and what the bands of plots.curves are."""

import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from gvr_lab import plots

PAGE = Path(__file__).parent.parent / "docs" / "api.md"


@pytest.mark.slow
def test_every_example_of_the_api_page_runs_as_written(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)
    assert len(blocks) == 4
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for number, code in enumerate(blocks, 1):
        exec(compile(code, f"docs/api.md, python block {number}", "exec"), namespace)
    figures = tmp_path / "runs" / "api" / "figures"
    assert sorted(p.name for p in figures.iterdir()) == ["accuracy.pdf", "accuracy.png", "summary.md", "summary.tex"]
    assert namespace["differences"]["SGD"] == "—" and namespace["differences"]["SAM"].endswith(" vs SGD")
    plt.close("all")


def three_seeds(values: dict[int, list[float]]) -> pd.DataFrame:
    """One label's accuracy at epochs 0 and 1, a run per seed."""
    return pd.DataFrame(
        [
            {"epoch": e, "test_acc": v, "label": "SGD", "method": "sgd", "seed": s, "run_dir": f"r{s}"}
            for s, per_epoch in values.items()
            for e, v in enumerate(per_epoch)
        ]
    )


def band_edges(ax) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) edge of the axes' one band, at the curve's x values."""
    [band] = ax.collections
    y = band.get_paths()[0].vertices[:, 1]
    n = len(ax.get_lines()[0].get_xdata())
    return y[1 : n + 1], y[n + 2 : 2 * n + 2][::-1]  # fill_between's path: start, lower edge, end, upper edge back


def test_curves_band_is_one_std_the_t_interval_of_the_mean_or_none():
    frame = three_seeds({0: [0.50, 0.60], 1: [0.60, 0.70], 2: [0.70, 0.95]})
    mean = np.array([60.0, 75.0])
    std = np.array([10.0, np.std([60, 70, 95], ddof=1)])
    low, high = band_edges(plots.curves(frame, "epoch", "test_acc"))  # std: the default
    assert low == pytest.approx(mean - std) and high == pytest.approx(mean + std)
    t = 4.302652729911275  # Student t, 2 degrees of freedom, 97.5% quantile
    low, high = band_edges(plots.curves(frame, "epoch", "test_acc", band="ci"))
    assert low == pytest.approx(mean - t * std / np.sqrt(3)) and high == pytest.approx(mean + t * std / np.sqrt(3))
    assert not plots.curves(frame, "epoch", "test_acc", band=None).collections
    # on a log axis the interval of the logarithms' mean, around the geometric mean
    logs = np.log([[50.0, 60.0, 70.0], [60.0, 70.0, 95.0]])
    low, high = band_edges(plots.curves(frame, "epoch", "test_acc", band="ci", logy=True))
    half = t * logs.std(axis=1, ddof=1) / np.sqrt(3)
    assert low == pytest.approx(np.exp(logs.mean(axis=1) - half)) and high == pytest.approx(np.exp(logs.mean(1) + half))
    plt.close("all")
