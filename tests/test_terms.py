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
