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


# ---------------------------------------------------------------------- pre-registered claims

SIGNIFICANT = [1.0, 1.2, 0.9, 1.1, 1.3]  # paired differences, two-sided t p ~ 1e-4
BORDERLINE = [0.4, 1.3, 0.1, 0.9, 0.6]  # p ~ 0.033: below 0.05 alone, not after Holm over three
NULL = [0.2, -0.5, 0.4, 0.1, -0.3]  # p ~ 0.91


def claim(claim_id="c", test="superiority", direction="greater", margin=0.0, family="primary", premise=""):
    return dict(
        id=claim_id,
        statement=f"claim {claim_id}",
        family=family,
        test=test,
        direction=direction,
        margin=margin,
        metric="test accuracy (%)",
        premise=premise,
    )


def differences(d, baseline=50.0):
    """{seed: (method, baseline)} with method - baseline = d."""
    return {s: (baseline + x, baseline) for s, x in enumerate(d)}


def assess_one(d, **definition):
    from gvr_lab.stats import assess_claims

    # a secondary claim alone: its verdict reads its own unadjusted p
    return assess_claims([(claim(family="secondary", **definition), differences(d))])[0]


def test_superiority_is_the_two_sided_paired_t_test():
    from scipy import stats as scipy_stats

    method = {0: 71.2, 1: 70.4, 2: 72.9, 3: 70.0, 4: 71.5}
    baseline = {0: 70.1, 1: 70.6, 2: 71.4, 3: 69.2, 4: 70.3}
    from gvr_lab.stats import assess_claims

    (c,) = assess_claims([(claim(family="secondary"), (method, baseline))], protocol_sha256="ab" * 32)
    m, b = np.array(list(method.values())), np.array(list(baseline.values()))
    assert c.p_value == pytest.approx(scipy_stats.ttest_rel(m, b).pvalue, rel=1e-10)
    assert c.p_value == pytest.approx(scipy_stats.ttest_1samp(m - b, 0).pvalue, rel=1e-10)
    assert c.n == 5 and c.diff_mean == pytest.approx(0.88) and c.ci_level == 0.95
    assert (c.diff_mean, c.ci_low, c.ci_high) == pytest.approx(mean_ci(m - b), rel=1e-12)  # today's 95% interval
    assert c.values[2] == (72.9, 71.4) and c.method_mean == pytest.approx(m.mean())
    assert c.verdict == ("holds" if c.p_value < 0.05 else "not resolved") and c.protocol_sha256 == "ab" * 32
    # the same differences claimed the other way round: significant, wrong sign
    assert assess_one(SIGNIFICANT, direction="less").verdict == "contradicted"
    assert assess_one(SIGNIFICANT).verdict == "holds" and assess_one(NULL).verdict == "not resolved"


@pytest.mark.parametrize("direction, null, alternative", [("greater", -0.5, "greater"), ("less", 0.5, "less")])
def test_non_inferiority_is_the_one_sided_t_test_against_the_margin(direction, null, alternative):
    from scipy import stats as scipy_stats

    d = np.array([-0.3, 0.1, -0.2, 0.25, -0.1, 0.05])
    c = assess_one(d if direction == "greater" else -d, test="non_inferiority", direction=direction, margin=0.5)
    expected = scipy_stats.ttest_1samp(d if direction == "greater" else -d, null, alternative=alternative).pvalue
    assert c.p_value == pytest.approx(expected, rel=1e-10) and c.p_value < 0.05 and c.verdict == "holds"
    # its interval is the 90% one: mean +- t(0.95, 5) sd / sqrt(6)
    half = scipy_stats.t.ppf(0.95, 5) * d.std(ddof=1) / math.sqrt(6)
    assert c.ci_level == pytest.approx(0.9) and c.ci_high - c.ci_low == pytest.approx(2 * half, rel=1e-12)


def test_non_inferiority_holds_exactly_when_the_90_percent_interval_clears_the_margin():
    from gvr_lab.stats import claim_test

    d = np.array([-0.3, 0.1, -0.2, 0.25, -0.1, 0.05])
    for margin in np.linspace(0.05, 0.6, 56):
        p, low, high, _ = claim_test("non_inferiority", "greater", margin, d)
        assert (p < 0.05) == (low > -margin), margin
        p, low, high, _ = claim_test("non_inferiority", "less", margin, d)
        assert (p < 0.05) == (high < margin), margin


def test_tost_p_is_the_larger_of_two_one_sided_tests_by_hand():
    from scipy import stats as scipy_stats

    d = np.array([0.3, -0.1, 0.4, 0.2, 0.0, 0.35])
    mean, se, margin = d.mean(), d.std(ddof=1) / math.sqrt(6), 0.5
    p_low = 1 - scipy_stats.t.cdf((mean + margin) / se, 5)  # H0: mean d <= -M
    p_high = scipy_stats.t.cdf((mean - margin) / se, 5)  # H0: mean d >= M
    assert p_high > p_low  # the mean sits nearer +M: the upper test decides
    c = assess_one(d, test="equivalence", direction="parity", margin=margin)
    assert c.p_value == pytest.approx(max(p_low, p_high), rel=1e-10)
    assert c.p_value == pytest.approx(scipy_stats.ttest_1samp(d, margin, alternative="less").pvalue, rel=1e-10)
    assert c.verdict == "holds" and c.ci_level == pytest.approx(0.9)
    assert -margin < c.ci_low and c.ci_high < margin  # TOST at 0.05 = the 90% interval inside the margin
    narrow = assess_one(d, test="equivalence", direction="parity", margin=0.25)
    assert narrow.verdict == "not resolved" and narrow.ci_low < 0.25 < narrow.ci_high
    assert assess_one(d + 2, test="equivalence", direction="parity", margin=0.5).verdict == "contradicted"


def test_holm_by_hand():
    from gvr_lab.stats import holm

    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], rel=1e-12)
    assert holm([0.4, 0.9]) == pytest.approx([0.8, 0.9])
    assert list(holm([0.6, 0.7, 0.01])) == [1.0, 1.0, 0.03]  # capped at 1, kept monotone
    assert list(holm([0.02])) == [0.02] and len(holm([])) == 0
    p = np.random.default_rng(0).uniform(0, 0.2, size=12)
    adjusted = holm(p)
    order = np.argsort(p)
    assert (np.diff(adjusted[order]) >= 0).all() and (adjusted >= p).all() and (adjusted <= 1).all()
    with pytest.raises(UsageError, match=r"holm takes a list of p-values in \[0, 1\]"):
        holm([0.1, math.nan])


def test_effect_size_and_wilcoxon_sensitivity_check():
    from scipy import stats as scipy_stats

    c = assess_one([1.0, 2.0, 3.0, 4.0])
    assert c.d_z == pytest.approx(2.5 / math.sqrt(5 / 3), rel=1e-12)
    assert c.wilcoxon_p == 2 / 16  # exact: all 4 signs positive (or all negative), 2 of 2^4 sign patterns
    d = [0.5, -1.2, 2.0, 1.1, 0.9, -0.3, 1.7]
    assert assess_one(d).wilcoxon_p == pytest.approx(scipy_stats.wilcoxon(d).pvalue, rel=1e-12)
    assert assess_one([0.0, 0.0, 0.0]).wilcoxon_p == 1.0  # no nonzero difference: no evidence either way


@pytest.mark.parametrize(
    "test, direction, margin, p, mean, low, high, expected",
    [
        ("superiority", "greater", 0, 0.049, 1.0, 0.1, 1.9, "holds"),
        ("superiority", "greater", 0, 0.05, 1.0, 0.0, 2.0, "not resolved"),  # p = alpha is not below it
        ("superiority", "greater", 0, 0.01, -1.0, -1.9, -0.1, "contradicted"),
        ("superiority", "less", 0, 0.01, -1.0, -1.9, -0.1, "holds"),
        ("superiority", "less", 0, 0.01, 1.0, 0.1, 1.9, "contradicted"),
        ("superiority", "greater", 0, math.nan, math.nan, math.nan, math.nan, "not resolved"),
        ("non_inferiority", "greater", 0.5, 0.049, 0.0, -0.4, 0.4, "holds"),
        ("non_inferiority", "greater", 0.5, 0.5, -0.7, -0.9, -0.5, "not resolved"),  # high = -M: not below it
        ("non_inferiority", "greater", 0.5, 0.9, -0.7, -0.9, -0.51, "contradicted"),
        ("non_inferiority", "less", 0.5, 0.9, 0.7, 0.5, 0.9, "not resolved"),  # low = M
        ("non_inferiority", "less", 0.5, 0.9, 0.7, 0.51, 0.9, "contradicted"),
        ("non_inferiority", "less", 0.5, 0.9, -0.7, -0.9, -0.51, "not resolved"),  # better is never "worse"
        ("equivalence", "parity", 0.5, 0.049, 0.0, -0.4, 0.4, "holds"),
        ("equivalence", "parity", 0.5, 0.05, 0.0, -0.5, 0.5, "not resolved"),
        ("equivalence", "parity", 0.5, 0.9, 0.7, 0.51, 0.9, "contradicted"),
        ("equivalence", "parity", 0.5, 0.9, -0.7, -0.9, -0.51, "contradicted"),
        ("equivalence", "parity", 0.5, 0.9, 0.5, 0.3, 0.7, "not resolved"),
    ],
)
def test_claim_verdict_rules_at_the_boundaries(test, direction, margin, p, mean, low, high, expected):
    from gvr_lab.stats import claim_verdict

    assert claim_verdict(test, direction, margin, p, mean, low, high) == expected


def test_primary_verdicts_read_holm_adjusted_p_and_secondary_ones_are_exploratory():
    from scipy import stats as scipy_stats

    from gvr_lab.stats import assess_claims

    p_borderline = scipy_stats.ttest_1samp(BORDERLINE, 0).pvalue
    assert 0.025 < p_borderline < 0.05  # significant alone, not once doubled
    family = [
        (claim("a"), differences(SIGNIFICANT)),
        (claim("b"), differences(BORDERLINE)),
        (claim("c"), differences(NULL)),
        (claim("d", family="secondary"), differences(BORDERLINE)),
        (claim("e"), differences([0.5])),  # one seed: no p, still one of the primary family (p = 1)
    ]
    a, b, c, d, e = assess_claims(family)
    p_values = [scipy_stats.ttest_1samp(x, 0).pvalue for x in (SIGNIFICANT, BORDERLINE, NULL)]
    # Holm over 4 primary claims, by hand: ranks 1, 2, 3 (and e last, as 1.0)
    assert a.p_adjusted == pytest.approx(4 * p_values[0], rel=1e-10)
    assert b.p_adjusted == pytest.approx(3 * p_values[1], rel=1e-10)
    assert c.p_adjusted == pytest.approx(min(1.0, 2 * p_values[2]), rel=1e-10)
    assert (a.verdict, b.verdict, c.verdict) == ("holds", "not resolved", "not resolved")
    assert b.p_value == pytest.approx(p_borderline, rel=1e-10)
    assert d.p_adjusted == d.p_value == b.p_value and d.verdict == "holds" and d.exploratory
    assert not a.exploratory and a.family == "primary"
    assert e.n == 1 and math.isnan(e.p_value) and math.isnan(e.p_adjusted) and e.verdict == "not resolved"
    assert math.isnan(e.ci_low) and math.isnan(e.d_z)
    fields = list(a.as_dict())
    claims_json = "id statement family test direction margin metric n diff_mean ci_low ci_high p_value p_adjusted"
    assert fields[:17] == claims_json.split() + ["d_z", "wilcoxon_p", "verdict", "protocol_sha256"]


def test_a_claim_resting_on_a_premise_gets_its_verdict_only_where_the_premise_holds():
    from gvr_lab.stats import assess_claims

    for premise_d, expected in ((SIGNIFICANT, "holds"), (NULL, "not resolved")):
        gap, recovered = assess_claims(
            [
                (claim("gap", family="secondary"), differences(premise_d)),
                (claim("recovered", family="secondary", premise="gap"), differences(SIGNIFICANT)),
            ]
        )
        assert recovered.own_verdict == "holds" and recovered.verdict == expected
        assert recovered.ci_verdict == "holds" and recovered.claim == "claim recovered"  # what plots.forest reads
    assert recovered.premise == "gap: not resolved" and gap.premise == ""
    # a premise whose own premise fails does not hold either, whatever its data
    chain = assess_claims(
        [
            (claim("x", family="secondary", premise="y"), differences(SIGNIFICANT)),
            (claim("y", family="secondary", premise="z"), differences(SIGNIFICANT)),
            (claim("z", family="secondary"), differences(NULL)),
        ]
    )
    assert [c.verdict for c in chain] == ["not resolved"] * 3 and chain[0].premise == "y: not resolved"
    with pytest.raises(UsageError, match="claim 'x' rests on 'w', which is not a claim here; ids: x"):
        assess_claims([(claim("x", premise="w"), differences(SIGNIFICANT))])
    with pytest.raises(UsageError, match="claims rest on each other in a circle: x -> y -> x"):
        assess_claims(
            [
                (claim("x", premise="y"), differences(SIGNIFICANT)),
                (claim("y", premise="x"), differences(SIGNIFICANT)),
            ]
        )


def test_claim_definitions_and_values_are_checked():
    from gvr_lab.stats import Claim, assess_claims

    with pytest.raises(UsageError, match="claim 'c': the direction of superiority is greater or less, not 'parity'"):
        Claim(**claim(direction="parity"))
    with pytest.raises(UsageError, match="the direction of equivalence is parity, not 'greater'"):
        Claim(**claim(test="equivalence"))
    with pytest.raises(UsageError, match="claim 'c': non_inferiority needs a margin > 0, got 0.0"):
        Claim(**claim(test="non_inferiority"))
    with pytest.raises(UsageError, match="a superiority claim tests mean d = 0 and takes no margin"):
        Claim(**claim(margin=0.5))
    with pytest.raises(UsageError, match="unknown claim family 'main'; valid: primary, secondary"):
        Claim(**claim(family="main"))
    with pytest.raises(UsageError, match="claim 'c': unknown field\\(s\\) seeds; fields: id, statement"):
        assess_claims([({**claim(), "seeds": 5}, differences(NULL))])
    with pytest.raises(UsageError, match="claim ids must be unique; repeated: c"):
        assess_claims([(claim(), differences(NULL)), (claim(), differences(NULL))])
    with pytest.raises(UsageError, match=r"values must be \{seed: \(method, baseline\)\} or two"):
        assess_claims([(claim(), [1.0, 2.0, 3.0])])
    assert Claim(**claim(test="equivalence", direction="parity", margin=1)).margin == 1.0  # int margin accepted


def first_n(condition) -> int:
    """The brute-force reference: n = 2, 3, ... until the condition holds."""
    n = 2
    while not condition(n):
        n += 1
    return n


@pytest.mark.parametrize("sd, half_width", [(1.0, 0.5), (0.8, 0.8), (2.0, 0.3), (0.5, 5.0)])
def test_seeds_for_a_ci_half_width_against_a_brute_force_search(sd, half_width):
    from scipy import stats as scipy_stats

    from gvr_lab.stats import n_for_half_width

    expected = first_n(lambda n: scipy_stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) <= half_width)
    assert n_for_half_width(sd, half_width) == expected


@pytest.mark.parametrize(
    "effect, sd, alpha, power", [(0.5, 1.0, 0.05, 0.8), (1.0, 2.5, 0.05, 0.9), (0.8, 1.0, 0.01, 0.8)]
)
@pytest.mark.parametrize("two_sided", [True, False])
def test_seeds_for_a_power_against_a_brute_force_search(effect, sd, alpha, power, two_sided):
    from scipy import stats as scipy_stats

    from gvr_lab.stats import n_for_power

    def achieved(n):
        delta, df = effect / sd * math.sqrt(n), n - 1
        c = scipy_stats.t.ppf(1 - alpha / (2 if two_sided else 1), df)
        return scipy_stats.nct.sf(c, df, delta) + (scipy_stats.nct.cdf(-c, df, delta) if two_sided else 0)

    expected = first_n(lambda n: achieved(n) >= power)
    assert n_for_power(effect, sd, alpha, power, "two-sided" if two_sided else "one-sided") == expected


def test_sample_size_textbook_values_and_bad_input():
    from gvr_lab.stats import n_for_half_width, n_for_power

    assert n_for_half_width(0.5, 5.0) == 2  # t(0.975, 1) = 12.7: 12.7 * 0.5 / sqrt(2) = 4.5 already
    assert n_for_half_width(1.0, 0.5) == 18  # 2.110 / sqrt(18) = 0.497; n = 17: 2.120 / sqrt(17) = 0.514
    # the paired t test's textbook sizes (d_z 0.5, alpha 0.05, power 0.8): 34 two-sided, 27 one-sided
    assert (n_for_power(0.5, 1.0), n_for_power(-0.5, 1.0, alternative="one-sided")) == (34, 27)
    with pytest.raises(UsageError, match="n_for_power needs effect != 0"):
        n_for_power(0.0, 1.0)
    with pytest.raises(UsageError, match="n_for_half_width needs sd > 0"):
        n_for_half_width(-1.0, 0.5)
    with pytest.raises(UsageError, match="unknown alternative 'greater'; valid: two-sided, one-sided"):
        n_for_power(0.5, 1.0, alternative="greater")


# ---------------------------------------------------------------------- selection on validation


def hand_built_runs():
    """Two methods, several settings each, seeds 0-3, two evaluations per run (load_runs' shape).
    Validation and test accuracy of a run at (epoch 1, epoch 2)."""
    import pandas as pd

    settings = {
        # label: (method, val at epochs 1 and 2, test at epochs 1 and 2), the same for every seed plus a seed offset
        "SAM rho=0.01": ("sam", (0.70, 0.74), (0.69, 0.72)),
        "SAM rho=0.05": ("sam", (0.78, 0.76), (0.75, 0.77)),  # best validation, at epoch 1
        "SAM rho=0.1": ("sam", (0.72, 0.73), (0.80, 0.82)),  # best test, worse validation: never picked
        "SGD lr=0.05": ("sgd", (0.60, 0.65), (0.61, 0.66)),
        "SGD lr=0.1": ("sgd", (0.66, 0.64), (0.62, 0.60)),  # best validation (epoch 1)
    }
    rows = []
    for label, (method, val, test) in settings.items():
        for seed in range(4):
            for epoch in (1, 2):
                rows.append(
                    {
                        "label": label,
                        "method": method,
                        "seed": seed,
                        "run_dir": f"runs/{label}-s{seed}",
                        "epoch": epoch,
                        "val_acc": val[epoch - 1] + 0.001 * seed,
                        "test_acc": test[epoch - 1] + 0.01 * seed,
                    }
                )
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # row order carries no meaning


def test_select_chooses_on_mean_validation_and_reports_test_on_the_other_seeds():
    from gvr_lab.stats import select

    chosen = select(hand_built_runs(), selection_seeds=[0, 1]).set_index("method")
    assert chosen.loc["sam", "label"] == "SAM rho=0.05" and chosen.loc["sgd", "label"] == "SGD lr=0.1"
    # SAM rho=0.05: selection seeds 0, 1 read at their best validation (epoch 1): 0.780, 0.781
    assert chosen.loc["sam", "selection_val_acc"] == pytest.approx(0.7805)
    assert chosen.loc["sam", "candidates"] == pytest.approx(
        {"SAM rho=0.01": 0.7405, "SAM rho=0.05": 0.7805, "SAM rho=0.1": 0.7305}
    )
    assert chosen.loc["sam", "selection_seeds"] == [0, 1]
    # reported: seeds 2 and 3 only, test accuracy at epoch 1 (best validation), not at epoch 2 (best test)
    assert chosen.loc["sam", "test_by_seed"] == pytest.approx({2: 0.77, 3: 0.78})
    assert chosen.loc["sam", "test_acc"] == pytest.approx(0.775) and chosen.loc["sam", "n"] == 2
    assert chosen.loc["sgd", "test_by_seed"] == pytest.approx({2: 0.64, 3: 0.65})

    every_seed = select(hand_built_runs()).set_index("method")
    assert every_seed.loc["sam", "label"] == "SAM rho=0.05" and every_seed.loc["sam", "n"] == 4
    assert every_seed.loc["sam", "test_acc"] == pytest.approx(0.765)  # 0.75 + 0.01 * mean seed 1.5

    among = select(hand_built_runs(), among=["SAM rho=0.01", "SAM rho=0.1"], selection_seeds=[0, 1])
    assert list(among["label"]) == ["SAM rho=0.01"]  # rho=0.1's better test accuracy does not count
    overall = select(hand_built_runs(), per=None, selection_seeds=[0])
    assert list(overall["label"]) == ["SAM rho=0.05"] and "method" not in overall


def test_select_by_a_setting_that_several_methods_share():
    from gvr_lab.stats import select

    runs = hand_built_runs()
    strength = {"SAM rho=0.01": "low", "SAM rho=0.05": "mid", "SAM rho=0.1": "high", "SGD lr=0.05": "low"}
    runs["strength"] = runs["label"].map(strength).fillna("mid")  # SGD lr=0.1 is sgd's "mid"
    chosen = select(runs, group="strength", selection_seeds=[0, 1]).set_index("method")
    assert chosen["strength"].tolist() == ["mid", "mid"]
    # each method reports its own runs of the chosen setting, never the other method's
    assert chosen.loc["sam", "test_by_seed"] == pytest.approx({2: 0.77, 3: 0.78})
    assert chosen.loc["sgd", "test_by_seed"] == pytest.approx({2: 0.64, 3: 0.65})


def test_select_breaks_ties_the_documented_way_and_names_what_is_missing():
    import pandas as pd

    from gvr_lab.stats import select

    runs = hand_built_runs()
    twin = runs[runs["label"] == "SGD lr=0.1"].assign(
        label="SGD lr=0.2", run_dir=lambda df: df["run_dir"].str.replace("lr=0.1", "lr=0.2")
    )
    tied = pd.concat([twin, runs])  # the twin comes first in the table
    assert select(tied).set_index("method").loc["sgd", "label"] == "SGD lr=0.1"  # sorted names: lr=0.1 first
    among = select(tied, among=["SGD lr=0.2", "SGD lr=0.1"])
    assert list(among["label"]) == ["SGD lr=0.2"]  # first in `among`

    with pytest.raises(UsageError, match="select: no runs with label 'SGD lr=9'; labels there: "):
        select(runs, among=["SGD lr=9"])
    with pytest.raises(UsageError, match="select needs column\\(s\\) val_acc in the runs table"):
        select(runs.drop(columns="val_acc"))
    no_val = runs.assign(val_acc=np.where(runs["method"] == "sgd", np.nan, runs["val_acc"]))
    with pytest.raises(UsageError, match="select: no run for \\{'method': 'sgd'\\} has val_acc on the selection"):
        select(no_val)


def test_load_runs_reads_each_run_at_its_best_validation_evaluation(tmp_path):
    from gvr_lab.collect import load_runs
    from gvr_lab.results import write_json, write_parquet
    from gvr_lab.stats import select

    def run(name, label, seed, evaluations):
        run_dir = tmp_path / name
        run_dir.mkdir()
        write_json(run_dir / "config.json", {"label": label, "method": "sgd", "seed": seed, "lr": 0.1})
        write_parquet(run_dir / "epochs.parquet", evaluations)
        write_json(run_dir / "summary.json", {"status": "completed"})

    run(
        "a",
        "with val",
        0,
        [
            {"epoch": 1, "val_acc": 0.60, "test_acc": 0.58},
            {"epoch": 2, "val_acc": 0.70, "test_acc": 0.66},  # best validation, first of two equal
            {"epoch": 3, "val_acc": 0.70, "test_acc": 0.69},
            {"epoch": 4, "val_acc": 0.65, "test_acc": 0.71},  # best test: not what selection reads
        ],
    )
    run("b", "no val", 0, [{"epoch": 1, "test_acc": 0.5}, {"epoch": 2, "test_acc": 0.6}])
    runs = load_runs(tmp_path)
    selected = runs.groupby("label")["selected_test_acc"].agg(["min", "max", "size"])
    assert selected.loc["with val"].tolist() == [0.66, 0.66, 4]  # the run's value on every one of its rows
    assert runs.loc[runs["label"] == "no val", "selected_test_acc"].isna().all()
    assert "selected_test_acc" not in load_runs(tmp_path, steps=True)
    chosen = select(runs)
    assert chosen.loc[0, "label"] == "with val" and chosen.loc[0, "test_by_seed"] == {0: 0.66}


def test_assessed_claims_draw_in_the_forest_plot_like_comparisons():
    import matplotlib.pyplot as plt

    from gvr_lab import plots
    from gvr_lab.stats import assess_claims

    tested = assess_claims(
        [
            (claim("gap"), differences(NULL)),
            (claim("recovered", premise="gap"), differences(SIGNIFICANT)),
            (claim("same", test="equivalence", direction="parity", margin=0.5), differences(NULL)),
        ]
    )
    fig = plots.forest({"points": tested})
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "claim same (n=5)",
        "claim recovered (n=5)",
        "claim gap (n=5)",
    ]
    hollow = [line for line in ax.lines if line.get_marker() == "o" and line.get_markerfacecolor() == "white"]
    assert len(hollow) == 1 and hollow[0].get_xdata()[0] == pytest.approx(np.mean(SIGNIFICANT))  # premise failed
    plt.close(fig)


# ---------------------------------------------------------------------- Kendall's tau over runs


def test_kendall_tau_is_the_pair_count_and_its_interval_resamples_groups_not_rows():
    from gvr_lab.stats import kendall_tau

    # run a: (1, 1) (2, 3) (3, 2); run b: (4, 6) (5, 4) (6, 5). Of the 15 pairs 12 agree and 3 disagree
    # (within a: 2 agree, 1 not; within b: 1 agrees, 2 not; all 9 pairs across agree): tau = 9/15.
    x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    y = [1.0, 3.0, 2.0, 6.0, 4.0, 5.0]
    runs = ["a", "a", "a", "b", "b", "b"]
    tau, low, high = kendall_tau(x, y, runs, resamples=2000)
    assert tau == pytest.approx(9 / 15, abs=1e-12)
    # Resampling two runs draws aa, ab, ba or bb. A run drawn twice is each of its rows twice, whose
    # tau-b is the run's own: a 1/3, b -1/3; ab is all rows, 9/15. With P(bb) = 1/4 > 2.5% the bounds
    # are exactly the smallest and largest of the three; resampling rows would give other values.
    assert (low, high) == pytest.approx((-1 / 3, 9 / 15), abs=1e-12)
    assert kendall_tau(x, y, runs, resamples=2000) == (tau, low, high)  # seeded


def test_kendall_tau_leaves_out_missing_rows_and_needs_two_groups_for_an_interval():
    from gvr_lab.stats import kendall_tau

    tau, low, high = kendall_tau([1.0, 2.0, np.nan, 3.0], [1.0, 2.0, 5.0, 3.0], ["a"] * 4)
    assert tau == pytest.approx(1.0) and math.isnan(low) and math.isnan(high)
    with pytest.raises(UsageError, match="x, y and groups of one length and resamples >= 1, got lengths 2, 3, 2"):
        kendall_tau([1.0, 2.0], [1.0, 2.0, 3.0], ["a", "b"])


def test_a_new_draw_falls_below_the_lower_prediction_bound_one_time_in_twenty():
    """The bound's meaning, checked by simulation: from 3 normal draws, a fourth is below their 95%
    lower prediction bound in 5% of 20,000 trials (binomial SD 0.15 points)."""
    from gvr_lab.stats import lower_prediction_bound

    rng = np.random.default_rng(0)
    draws = rng.normal(99.0, 0.5, size=(20_000, 4))
    below = [new < lower_prediction_bound(pilot) for *pilot, new in draws]
    assert np.mean(below) == pytest.approx(0.05, abs=0.006)
    assert math.isnan(lower_prediction_bound([99.5]))  # one value says nothing of the spread
