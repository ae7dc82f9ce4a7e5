"""The statistics every notebook uses, against hand computations."""

import math

import numpy as np
import pytest

from gvr_lab.errors import UsageError
from gvr_lab.stats import compare, mean_ci, verdict


def test_student_t_interval_by_hand():
    # d = 1, 2, 3, 4: mean 2.5, sd = sqrt(5/3) = 1.2909944, t(0.975, 3) = 3.1824463
    mean, low, high = mean_ci(np.array([1.0, 2.0, 3.0, 4.0]))
    half = 3.1824463052842638 * math.sqrt(5 / 3) / 2
    assert mean == 2.5
    assert low == pytest.approx(2.5 - half, rel=1e-12) and high == pytest.approx(2.5 + half, rel=1e-12)
    assert (round(low, 4), round(high, 4)) == (0.4457, 4.5543)


def test_pairing_by_seed():
    """Differences are taken seed by seed, over the seeds both arms have."""
    method = {0: 10.0, 1: 20.0, 2: 30.0}
    baseline = {0: 9.0, 1: 19.0, 2: 29.5, 3: 5.0}  # seed 3 has no partner
    c = compare("m beats b", method, baseline)
    assert c.n == 3 and c.diff_mean == pytest.approx(2.5 / 3)
    assert c.baseline_mean == pytest.approx(57.5 / 3)  # the paired seeds' mean, not seed 3's too
    # differences 1, 1, 0.5: sd 0.2886751, t(0.975, 2) = 4.3026527
    half = 4.302652729911275 * 0.28867513459481287 / math.sqrt(3)
    assert (c.ci_low, c.ci_high) == pytest.approx((2.5 / 3 - half, 2.5 / 3 + half), rel=1e-9)
    assert c.verdict == "holds"  # 0.83 +- 0.72 > 0
    # unpaired, the between-seed spread (10 .. 30) would swamp the 0.8-point difference
    assert c.ci_high - c.ci_low < 2


@pytest.mark.parametrize(
    "direction, low, high, margin, expected",
    [
        ("greater", 0.1, 2.0, 0, "holds"),
        ("greater", -2.0, -0.1, 0, "contradicted"),
        ("greater", -0.1, 2.0, 0, "not resolved"),
        ("less", -2.0, -0.1, 0, "holds"),
        ("less", 0.1, 2.0, 0, "contradicted"),
        ("less", -1.0, 1.0, 0, "not resolved"),
        ("parity", -0.4, 0.3, 0.5, "holds"),
        ("parity", 0.6, 1.0, 0.5, "contradicted"),
        ("parity", -1.2, -0.7, 0.5, "contradicted"),
        ("parity", -0.4, 0.9, 0.5, "not resolved"),
        ("greater", math.nan, math.nan, 0, "not resolved"),
    ],
)
def test_verdict_rules(direction, low, high, margin, expected):
    assert verdict(direction, low, high, margin) == expected


def test_one_seed_has_no_interval_and_resolves_nothing():
    c = compare("x", {0: 2.0}, {0: 1.0})
    assert c.n == 1 and c.diff_mean == 1.0 and math.isnan(c.ci_low) and c.verdict == "not resolved"


def test_bootstrap_interval_is_seeded_and_close_to_t_for_many_seeds():
    rng = np.random.default_rng(3)
    d = rng.normal(1.0, 1.0, size=40)
    t = mean_ci(d)
    b1, b2 = mean_ci(d, bootstrap=True), mean_ci(d, bootstrap=True)
    assert b1 == b2  # seeded
    assert b1[1] == pytest.approx(t[1], abs=0.1) and b1[2] == pytest.approx(t[2], abs=0.1)


def test_parity_needs_a_margin():
    with pytest.raises(UsageError, match="parity claim needs a margin > 0"):
        compare("x", {0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0}, direction="parity")
    c = compare("x", {0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.1, 1: 1.9, 2: 3.05}, direction="parity", margin=0.5)
    assert c.margin == 0.5 and c.verdict == "holds"


def test_claims_from_runs_pair_seeds_and_name_missing_arms():
    import pandas as pd

    from gvr_lab.stats import by_seed, claims_table, seedwise

    runs = pd.DataFrame(
        {
            "label": ["SB", "SB", "LB", "LB", "GN", "GN"],
            "seed": [0, 1, 0, 1, 1, 0],
            "test_acc": [0.90, 0.92, 0.80, 0.84, 0.88, 0.87],
        }
    )
    sb, lb, gn = (by_seed(runs, label) for label in ("SB", "LB", "GN"))
    assert gn == {0: pytest.approx(87.0), 1: pytest.approx(88.0)}  # by seed, not by row order
    midpoint = seedwise(lambda a, b: (a + b) / 2, sb, lb)
    assert midpoint == {0: pytest.approx(85.0), 1: pytest.approx(88.0)}
    c = compare("GN beats the midpoint", gn, midpoint)
    assert c.diff_mean == pytest.approx(1.0) and c.n == 2  # differences 2 and 0
    table = claims_table([(c, "91.75", 1)])
    assert table.loc[0, "ours: method vs baseline"] == "87.5 vs 86.5"
    assert table.loc[0, "difference [95% CI]"].startswith("+1.0 [") and table.loc[0, "verdict"] == "not resolved"
    with pytest.raises(UsageError, match="no runs labelled 'FT'; labels: SB, LB, GN"):
        by_seed(runs, "FT")
    assert seedwise(lambda a, b: a - b, {0: 1.0, 2: 5.0}, {0: 0.5, 1: 3.0}) == {0: 0.5}


def test_a_claim_resting_on_a_premise_that_does_not_hold_is_not_resolved_whatever_its_ci():
    from gvr_lab.stats import claims_table

    gap = {0: 2.0, 1: 2.5, 2: 3.0}  # method - baseline of the premise, clearly positive
    no_gap = {0: 2.0, 1: -2.5, 2: 0.5}
    zero = {0: 0.0, 1: 0.0, 2: 0.0}
    recovered = {0: 1.0, 1: 1.2, 2: 1.1}  # its own CI excludes 0: holds on its own
    for premise_diff, expected in ((gap, "holds"), (no_gap, "not resolved")):
        premise = compare("SB beats LB", premise_diff, zero)
        c = compare("GN recovers the gap", recovered, zero, premise=premise)
        assert c.ci_verdict == "holds" and c.verdict == expected
    assert c.premise == "SB beats LB: not resolved"
    verdict = claims_table([(c, "", 1)]).loc[0, "verdict"]
    assert verdict == "not resolved: rests on 'SB beats LB: not resolved' (CI alone: holds)"
    assert compare("x", recovered, zero).ci_verdict == "holds"  # no premise: the CI's own verdict
