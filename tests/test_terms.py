"""Facts about methods live in their classes; terms.py, plots and bench read them from the registry."""

import pandas as pd
import pytest

from gvr_lab import terms
from gvr_lab.methods.vsam import VSAM


def test_vsam_share_after_warm_up_in_steps_and_epochs_mode():
    steps_mode = pd.DataFrame(
        {
            "method": "vsam",
            "arg_warmup_epochs": 1,
            "steps_per_epoch": 64,
            "epoch": [1, 2, 3],
            "step": [80, 160, 240],
            "train_sampled": [0.9, 0.1, 0.1],
        }
    )
    # steps 1-80 hold the 64 warm-up steps (all SAM) and 72 - 64 = 8 sampled ones; then 8 and 8
    assert VSAM.share_after_warmup(steps_mode) == pytest.approx(24 / 176)
    assert terms.describe(steps_mode) == "37% of steps (14% after warm-up)"
    epochs_mode = steps_mode.drop(columns="step").assign(epoch=[0, 1, 2], train_sampled=[1.0, 0.2, 0.1])
    assert terms.describe(epochs_mode) == "43% of steps (15% after warm-up)"
    inside = steps_mode.assign(step=[20, 40, 64], train_sampled=1.0)
    assert VSAM.share_after_warmup(inside) is None and terms.describe(inside) == "100% of steps"


# A method from a module outside the package, as a researcher's own project would define one.
OUTSIDE = '''"""Scaled SGD: the plain step on the gradient times `scale`, defined outside gvr_lab.

A test's method: every fact about it is in its class, and the lab's tools read them there.
"""

from gvr_lab.methods import register_method
from gvr_lab.methods.base import SpeedTarget
from gvr_lab.methods.sgd import SGD


@register_method
class ScaledSGD(SGD):
    name = "scaled_sgd"
    aliases = ()
    hparams = {"scale": 1.0}
    reference = "a method of a module outside the package"
    term, term_weight, color = "gradient scaling", "scale", "#123456"
    bench_rows = ({"scale": 2.0},)
    speed_targets = (SpeedTarget("scaled_sgd <= 1.5x sgd", {}, "sgd", 1.5),)

    def step(self, batch):
        self.zero_grad()
        logits = self.forward(batch.x)
        loss = self.loss(logits, batch.y)
        (self.hp.scale * loss).backward()
        self.optimizer.step()
        return self.metrics(logits, batch.y, loss)
'''


@pytest.fixture
def outside_method(tmp_path, monkeypatch, method_registry):
    (tmp_path / "my_methods.py").write_text(OUTSIDE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "my_methods", raising=False)
    module = __import__("my_methods")
    yield module.ScaledSGD
    __import__("sys").modules.pop("my_methods", None)


def test_a_method_from_outside_the_package_reaches_every_tool(outside_method, capsys):
    from gvr_lab import plots
    from gvr_lab.bench import all_bench_rows, run_bench, verdicts
    from gvr_lab.cli import main
    from gvr_lab.methods import markdown_table, method_notes

    assert main(["list"]) == 0
    assert "scaled_sgd: scale=1.0" in capsys.readouterr().out
    assert "| `scaled_sgd` | a method of a module outside the package | scale=1.0 | 1 |" in markdown_table()
    assert "## Scaled SGD: the plain step on the gradient times `scale`, defined outside gvr_lab" in method_notes()

    assert ("scaled_sgd", {"scale": 2.0}) in all_bench_rows()
    report = run_bench("tiny_cnn", (1, 28), 10, 16, [("scaled_sgd", {"scale": 2.0})], steps=1, warmup=1, rounds=1)
    assert [r["label"] for r in report["results"]][:2] == ["sgd", "scaled_sgd:scale=2.0"]
    assert [what for what, _, _ in verdicts(report)][0] == "scaled_sgd <= 1.5x sgd"

    rows = pd.DataFrame({"method": "scaled_sgd", "arg_scale": [2.0, 2.0], "label": "s", "run_dir": "r"})
    assert terms.term_share(rows) == 1.0 and terms.describe(rows) == "100% of steps"
    assert terms.never_active(rows.assign(arg_scale=0.0)) == ["r"]

    curve = pd.DataFrame({"method": "scaled_sgd", "label": "mine", "epoch": [0, 1], "test_acc": [0.5, 0.6]})
    ax = plots.curves(curve, "epoch", "test_acc")
    assert ax.get_lines()[0].get_color() == "#123456"


def test_a_hyperparameter_named_like_an_attribute_is_refused(method_registry):
    from gvr_lab.methods import register_method
    from gvr_lab.methods.sgd import SGD

    for clash in ("views", "step", "model", "hp", "start_epoch"):

        class Shadowing(SGD):
            name, aliases, hparams = f"shadow_{clash}", (), {clash: 2}

        with pytest.raises(ValueError, match=f"hyper-parameter '{clash}' has the name of an attribute"):
            register_method(Shadowing)
        assert f"shadow_{clash}" not in method_registry


def test_runs_that_differ_in_their_numbers_only_read_as_ranges():
    from gvr_lab.terms import combined_texts

    vsam = ["26% of steps (26% after warm-up)", "24% of steps (24% after warm-up)", "27% of steps (25% after warm-up)"]
    assert combined_texts(vsam) == "24-27% of steps (24-26% after warm-up)"
    assert combined_texts(["100% of steps"] * 3) == "100% of steps"
    assert combined_texts(["9% of steps", "10% of steps"]) == "9-10% of steps"  # compared as numbers
    assert combined_texts(["never", "33% of steps"]) == "never / 33% of steps"  # another wording: both kept
