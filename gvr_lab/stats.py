"""Paired comparisons over seeds, pre-registered claims tested with p-values, and selection on validation.

Seeds are paired: seed s gives every arm of a study the same initial weights and data order
(Config.seed drives both), so a method is compared with its baseline seed by seed. Over the n seeds
both arms have,

    d_s = method_s - baseline_s,   mean d,   sd = sd(d) (n - 1 in the denominator),   se = sd / sqrt(n)

Pairing removes the between-seed variance the arms share, which is most of it when they start from
the same weights. Below, T is the Student t distribution function with n - 1 degrees of freedom and
q its quantile function.

Comparisons (`compare`, `Comparison`): the mean difference with its 95% CI,
mean d +- q(0.975) se (`bootstrap=True` gives the percentile bootstrap of the mean difference
instead, 10,000 seeded resamples), and a verdict from the CI alone, never typed:

    direction "greater"  holds if ci_low > 0, contradicted if ci_high < 0, else "not resolved"
    direction "less"     the mirror image
    direction "parity"   holds if the CI lies inside [-margin, margin] (equivalence),
                         contradicted if it lies wholly outside it, else "not resolved"

Pre-registered claims (`Claim`, `assess_claims`, `AssessedClaim`): each claim is one test on the d_s at
level alpha (0.05 unless given), with its p-value; p' below is the p its verdict reads (see families).

    superiority, direction "greater" or "less" (the sign the claim asserts), margin 0:
        H0: mean d = 0, two-sided.  t = mean d / se,  p = 2 (1 - T(|t|))       (scipy's ttest_rel)
        CI at 1 - alpha (95%): mean d +- q(1 - alpha/2) se, today's interval
        holds if p' < alpha and mean d has the claimed sign; contradicted if p' < alpha and it has the
        other sign; else not resolved
    non_inferiority, direction "greater" (higher is better), margin M > 0:
        H0: mean d <= -M (the method worse by M or more).  p = 1 - T((mean d + M) / se)
        direction "less" (lower is better, a time): H0: mean d >= M,  p = T((mean d - M) / se)
        CI at 1 - 2 alpha (90%): mean d +- q(1 - alpha) se
        holds if p' < alpha (p' unadjusted: the same as ci_low > -M, ci_high < M for "less"; a primary
        claim's p' is Holm's, so its interval may clear -M while it reads not resolved);
        contradicted if ci_high < -M (ci_low > M for "less"); else not resolved
    equivalence (TOST), direction "parity", margin M > 0: two one-sided tests,
        p_low = 1 - T((mean d + M) / se) (H0: mean d <= -M),  p_high = T((mean d - M) / se)
        (H0: mean d >= M),  p = max(p_low, p_high)
        CI at 1 - 2 alpha (90%), as for non-inferiority
        holds if p' < alpha (p' unadjusted: the same as the CI inside [-M, M]); contradicted if the CI
        lies wholly outside [-M, M] (ci_high < -M or ci_low > M); else not resolved

Why 1 - 2 alpha with a margin: a one-sided test at alpha rejects exactly when the matching bound of
the two-sided 1 - 2 alpha interval clears the margin, so "holds" (the method no worse than the margin)
and "contradicted" (worse than the margin) are both one-sided tests at alpha, mirror images. Each
record carries its interval's level (`ci_level`).

Families. The primary claims are one family: their p-values are adjusted by Holm's step-down method
(`holm`), and each primary verdict reads its adjusted p (p' = p_adjusted), which holds the chance of
rejecting any true null hypothesis of the family to alpha (the family-wise error rate). A contradiction of a
margin claim reads its unadjusted 1 - 2 alpha interval. Secondary claims are exploratory
(`exploratory` True): their verdicts read their own unadjusted p (p_adjusted = p_value) and support
nothing on their own. A primary claim without a p-value (fewer than 2 seeds) still counts in Holm's
family, as p = 1: the family is fixed when the claims are registered, not by which runs came.

Premises. A claim can rest on another: "LB+GN recovers most of the SB-LB gap" means nothing where SB
does not beat LB. Given a premise (`premise=` of `compare`, the comparison; `Claim.premise`, the id of
another claim of the same list), the verdict is the claim's own only where the premise holds; otherwise
it is "not resolved", with the claim's own verdict and "premise: its verdict" kept beside it
(`ci_verdict` of a Comparison, `own_verdict` of an AssessedClaim; `premise`), so the difference is still
reported but never read as support. A claim resting on a premise stays in Holm's family.

Beside each tested claim, as sensitivity checks that no verdict reads: Cohen's paired effect size
d_z = mean d / sd, and the two-sided Wilcoxon signed-rank p of the d_s (scipy.stats.wilcoxon, zero
differences dropped: the exact null distribution up to 50 seeds without ties, exhaustive permutations
up to 13 seeds with ties, the normal approximation beyond; 1 when every difference is 0).

Degenerate data: with fewer than 2 paired values there is no sd, interval or t test: p, the CI and
d_z are NaN and the verdict is "not resolved". With sd = 0 the t statistic is +-inf (p 0 or 1, the
limit) unless mean d equals the tested value (p NaN, not resolved).

Sample sizes for a pilot's sd of the paired differences (`n_for_half_width`, `n_for_power`): the
smallest n with q_{n-1}((1 + level) / 2) sd / sqrt(n) <= h (the CI's half-width), and the smallest n
whose paired t test has the wanted power against a true mean difference `effect` (the noncentral t,
noncentrality effect / sd * sqrt(n)); both search n upwards, since q depends on n.

Rank correlation over grouped rows (`kendall_tau`), the generalization-measure protocol (Jiang et
al. 2019): Kendall's tau-b between a measure and a generalization gap over every run and checkpoint
of a study, with a percentile bootstrap interval that resamples runs, not rows: a run's checkpoints
share its initialization and data order, so they are not independent draws, and resampling them one
by one would make the interval too narrow.

Selection on validation (`select`), the one rule of the lab for picking a hyper-parameter setting:
each run is read at its best-validation evaluation (load_runs' `selected_test_acc`), each method's
setting is the one with the best mean validation accuracy over the selection seeds, and its test
accuracy is reported on the other seeds; see `select`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from .errors import UsageError, check_choice, coerce
from .results import best_evaluations

DIRECTIONS = ("greater", "less", "parity")
VERDICTS = ("holds", "contradicted", "not resolved")
BOOTSTRAP_RESAMPLES = 10_000


@dataclass(frozen=True)
class Comparison:
    claim: str
    direction: str
    margin: float  # the equivalence margin of a parity claim (0 otherwise), in the metric's units
    baseline_mean: float
    method_mean: float
    diff_mean: float  # method minus baseline, paired by seed
    ci_low: float
    ci_high: float
    n: int  # paired seeds
    verdict: str
    values: dict = field(default_factory=dict)  # {seed: (method, baseline)}, the paired values themselves
    ci_verdict: str = ""  # what the CI alone says (differs from verdict only when a premise fails)
    premise: str = ""  # "claim: verdict" of the comparison this claim rests on, if any

    def as_dict(self) -> dict:
        return asdict(self)


def paired_differences(method: dict, baseline: dict) -> tuple[list, np.ndarray, np.ndarray]:
    """The seeds both arms have, and each arm's values on them, in seed order. A seed only one
    arm has cannot be paired and is left out (the table's n says how many were paired)."""
    seeds = sorted(set(method) & set(baseline))
    return seeds, np.array([method[s] for s in seeds], float), np.array([baseline[s] for s in seeds], float)


def mean_ci(
    values: np.ndarray, level: float = 0.95, bootstrap: bool = False, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the two-sided Student t interval (or percentile bootstrap) of the mean."""
    n = len(values)
    mean = float(values.mean()) if n else math.nan
    if n < 2:
        return mean, math.nan, math.nan
    if bootstrap:
        rng = np.random.default_rng(seed)
        means = values[rng.integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))].mean(axis=1)
        low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
        return mean, float(low), float(high)
    half = scipy_stats.t.ppf((1 + level) / 2, n - 1) * values.std(ddof=1) / math.sqrt(n)
    return mean, mean - half, mean + half


def verdict(direction: str, low: float, high: float, margin: float = 0.0) -> str:
    check_choice("direction", direction, DIRECTIONS)
    if math.isnan(low) or math.isnan(high):
        return "not resolved"
    if direction == "parity":
        if -margin <= low and high <= margin:
            return "holds"
        return "contradicted" if high < -margin or low > margin else "not resolved"
    if direction == "less":
        low, high = -high, -low
    if low > 0:
        return "holds"
    return "contradicted" if high < 0 else "not resolved"


def compare(
    claim: str,
    method: dict,
    baseline: dict,
    direction: str = "greater",
    margin: float = 0.0,
    bootstrap: bool = False,
    premise: Comparison | None = None,
) -> Comparison:
    """A claim about `method` against `baseline`, each {seed: value}, paired by seed; resting on
    `premise` if given (its verdict counts only where the premise holds)."""
    if direction == "parity" and margin <= 0:
        raise UsageError(f"claim {claim!r}: a parity claim needs a margin > 0 (how close counts as comparable)")
    seeds, m, b = paired_differences(method, baseline)
    diff, low, high = mean_ci(m - b, bootstrap=bootstrap)
    own = verdict(direction, low, high, margin)
    return Comparison(
        claim,
        direction,
        margin if direction == "parity" else 0.0,
        float(b.mean()) if len(b) else math.nan,
        float(m.mean()) if len(m) else math.nan,
        diff,
        low,
        high,
        len(m),
        own if premise is None or premise.verdict == "holds" else "not resolved",
        {s: (float(x), float(y)) for s, x, y in zip(seeds, m, b)},
        own,
        "" if premise is None else f"{premise.claim}: {premise.verdict}",
    )


# ---------------------------------------------------------------------- claims, from a study's runs


def by_seed(runs, label: str, value: str = "test_acc", scale: float = 100.0) -> dict:
    """{seed: value} of one arm (rows of load_runs with that label), accuracies in percent by
    default. An arm without runs is a UsageError naming the labels there are: a typo in a claim
    would otherwise read as an empty comparison."""
    rows = runs[runs["label"] == label]
    if rows.empty:
        raise UsageError(f"no runs labelled {label!r}; labels: {', '.join(map(str, runs['label'].unique()))}")
    return {int(s): scale * float(v) for s, v in zip(rows["seed"], rows[value])}


def seedwise(function, *arms: dict) -> dict:
    """{seed: function(a_s, b_s, ...)} over the seeds every arm has: a derived per-seed quantity
    (the SB-LB midpoint, a time ratio) stays paired."""
    seeds = sorted(set.intersection(*(set(arm) for arm in arms)))
    return {s: function(*(arm[s] for arm in arms)) for s in seeds}


def claims_table(rows: list[tuple[Comparison, str, int]]) -> pd.DataFrame:
    """One row per claim: (comparison, the paper's number beside it, decimals of ours), with our
    means, the paired difference and its 95% CI, n and the verdict; a claim whose premise does not
    hold names it and what its CI alone would say."""
    out = []
    for c, paper, digits in rows:
        fmt = f"{{:.{digits}f}}"
        ci = "no interval" if math.isnan(c.ci_low) else f"[{fmt.format(c.ci_low)}, {fmt.format(c.ci_high)}]"
        out.append(
            {
                "claim": c.claim,
                "paper": paper,
                "ours: method vs baseline": f"{fmt.format(c.method_mean)} vs {fmt.format(c.baseline_mean)}",
                "difference [95% CI]": f"{c.diff_mean:+.{digits}f} {ci}",
                "margin": fmt.format(c.margin) if c.direction == "parity" else "",
                "n": c.n,
                "verdict": c.verdict
                if c.verdict == c.ci_verdict
                else f"{c.verdict}: rests on '{c.premise}' (CI alone: {c.ci_verdict})",
            }
        )
    return pd.DataFrame(out)


# ---------------------------------------------------------------------- pre-registered claims: tests, Holm, records

TESTS = ("superiority", "non_inferiority", "equivalence")
FAMILIES = ("primary", "secondary")
TEST_DIRECTIONS = {
    "superiority": ("greater", "less"),
    "non_inferiority": ("greater", "less"),
    "equivalence": ("parity",),
}


@dataclass(frozen=True)
class Claim:
    """One registered claim: what is asserted and how it is tested (module docstring)."""

    id: str
    statement: str
    family: str  # primary (Holm-adjusted, confirmatory) or secondary (unadjusted, exploratory)
    test: str  # superiority, non_inferiority or equivalence
    direction: str  # greater or less (the sign asserted, or which side is better); parity for equivalence
    margin: float = 0.0  # M of a non-inferiority or equivalence claim, in the metric's units; 0 for superiority
    metric: str = ""  # what the values are, with their unit ("test accuracy (%)")
    premise: str = ""  # id of the claim of the same family list this one rests on, if any

    def __post_init__(self):
        check_choice("claim family", self.family, FAMILIES)
        check_choice("claim test", self.test, TESTS)
        valid = TEST_DIRECTIONS[self.test]
        if self.direction not in valid:
            raise UsageError(
                f"claim {self.id!r}: the direction of {self.test} is {' or '.join(valid)}, not {self.direction!r}"
            )
        object.__setattr__(self, "margin", coerce(self.margin, float, f"claim {self.id!r}: margin"))
        if self.test == "superiority" and self.margin != 0:
            raise UsageError(
                f"claim {self.id!r}: a superiority claim tests mean d = 0 and takes no margin (got {self.margin}); "
                "a claim with a margin is non_inferiority or equivalence"
            )
        if self.test != "superiority" and not self.margin > 0:
            raise UsageError(f"claim {self.id!r}: {self.test} needs a margin > 0, got {self.margin}")


@dataclass(frozen=True)
class AssessedClaim:
    """One tested claim: the fields of a study's claims.json first, then the paired values and the
    claim's own verdict before its premise."""

    id: str
    statement: str
    family: str
    test: str
    direction: str
    margin: float
    metric: str
    n: int  # paired seeds
    diff_mean: float  # mean of method - baseline over the paired seeds
    ci_low: float  # the interval that goes with the test, at ci_level
    ci_high: float
    p_value: float  # the test's own p
    p_adjusted: float  # Holm-adjusted over the primary family; p_value itself for a secondary claim
    d_z: float  # mean d / sd d
    wilcoxon_p: float  # two-sided Wilcoxon signed-rank p of the d_s
    verdict: str
    protocol_sha256: str  # SHA-256 of the protocol the claims were registered in
    ci_level: float = 0.95  # 1 - alpha for superiority, 1 - 2 alpha for a margin test
    exploratory: bool = False  # a secondary claim: read as exploratory, never as confirmation
    own_verdict: str = ""  # the test's verdict, before the premise (differs from verdict only where it fails)
    premise: str = ""  # "id: verdict" of the claim this one rests on, if any
    method_mean: float = math.nan
    baseline_mean: float = math.nan
    values: dict = field(default_factory=dict)  # {seed: (method, baseline)}

    # The names plots.forest reads off a Comparison, so an AssessedClaim draws the same way.
    @property
    def claim(self) -> str:
        return self.statement

    @property
    def ci_verdict(self) -> str:
        return self.own_verdict

    def as_dict(self) -> dict:
        return asdict(self)


def t_test_p(d: np.ndarray, null: float, alternative: str) -> float:
    """p of the one-sample t test of mean d against `null`; alternative: "two-sided", "greater"
    (H1: mean > null) or "less". NaN under 2 values; for sd 0 see the module docstring."""
    n = len(d)
    if n < 2:
        return math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (np.float64(d.mean()) - null) / (np.float64(d.std(ddof=1)) / math.sqrt(n))
    if alternative == "two-sided":
        return float(2 * scipy_stats.t.sf(abs(t), n - 1))
    return float(scipy_stats.t.sf(t, n - 1) if alternative == "greater" else scipy_stats.t.cdf(t, n - 1))


def claim_test(test: str, direction: str, margin: float, d: np.ndarray, alpha: float = 0.05) -> tuple:
    """(p, ci_low, ci_high, ci_level) of one claim's test on the paired differences d."""
    if test == "superiority":
        p, level = t_test_p(d, 0.0, "two-sided"), 1 - alpha
    elif test == "non_inferiority":
        p = t_test_p(d, -margin, "greater") if direction == "greater" else t_test_p(d, margin, "less")
        level = 1 - 2 * alpha
    else:
        p = float(np.max([t_test_p(d, -margin, "greater"), t_test_p(d, margin, "less")]))  # NaN if either is
        level = 1 - 2 * alpha
    _, low, high = mean_ci(d, level)
    return p, low, high, level


def claim_verdict(
    test: str, direction: str, margin: float, p: float, diff_mean: float, low: float, high: float, alpha: float = 0.05
) -> str:
    """The verdict of one test from the p it reads (Holm-adjusted for a primary claim) and its
    interval (the rules of the module docstring)."""
    if test == "superiority":
        if p < alpha:
            return "holds" if (diff_mean > 0) == (direction == "greater") else "contradicted"
        return "not resolved"
    if p < alpha:
        return "holds"
    if test == "non_inferiority":
        worse = high < -margin if direction == "greater" else low > margin
    else:
        worse = high < -margin or low > margin
    return "contradicted" if worse else "not resolved"


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjustment, in the input's order: with the p sorted ascending,
    p_(1) <= ... <= p_(m), adjusted p_(i) = max over j <= i of min(1, (m - j + 1) p_(j)). The
    adjusted values keep the p's order (monotone) and never exceed 1."""
    p = np.asarray(pvalues, float)
    if p.ndim != 1 or np.isnan(p).any() or ((p < 0) | (p > 1)).any():
        raise UsageError(f"holm takes a list of p-values in [0, 1], got {pvalues!r}")
    order = np.argsort(p, kind="stable")
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate((len(p) - np.arange(len(p))) * p[order]))
    return adjusted


def wilcoxon_p(d: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p of the paired differences (module docstring)."""
    if len(d) == 0:
        return math.nan
    if not d.any():
        return 1.0
    return float(scipy_stats.wilcoxon(d).pvalue)


def effect_size_dz(d: np.ndarray) -> float:
    """Cohen's d_z = mean d / sd d (NaN under 2 values, +-inf for sd 0 and a nonzero mean)."""
    if len(d) < 2:
        return math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(d.mean()) / np.float64(d.std(ddof=1)))


def paired_values(values, claim_id: str) -> tuple[list, np.ndarray, np.ndarray]:
    """(seeds, method, baseline) from {seed: (method, baseline)} or a pair of {seed: value} dicts."""
    if isinstance(values, (tuple, list)) and len(values) == 2 and all(isinstance(v, dict) for v in values):
        return paired_differences(*values)
    if isinstance(values, dict) and all(isinstance(v, (tuple, list)) and len(v) == 2 for v in values.values()):
        seeds = sorted(values)
        return (
            seeds,
            np.array([values[s][0] for s in seeds], float),
            np.array([values[s][1] for s in seeds], float),
        )
    raise UsageError(
        f"claim {claim_id!r}: values must be {{seed: (method, baseline)}} or two {{seed: value}} dicts "
        f"(method, baseline), got {type(values).__name__}"
    )


def as_claim(definition) -> Claim:
    """A Claim, or one built from a mapping of its fields (a protocol file's entry)."""
    if isinstance(definition, Claim):
        return definition
    names = [f.name for f in fields(Claim)]
    if not isinstance(definition, dict):
        raise UsageError(f"a claim is a Claim or a mapping of {', '.join(names)}; got {type(definition).__name__}")
    unknown = sorted(set(definition) - set(names))
    missing = [name for name in ("id", "statement", "family", "test", "direction") if name not in definition]
    if unknown or missing:
        wrong = f"unknown field(s) {', '.join(unknown)}" if unknown else f"missing {', '.join(missing)}"
        raise UsageError(f"claim {definition.get('id', '?')!r}: {wrong}; fields: {', '.join(names)}")
    return Claim(**definition)


def assess_claims(claims: list, alpha: float = 0.05, protocol_sha256: str = "") -> list[AssessedClaim]:
    """Test a whole list of registered claims at once, in their order: `claims` holds
    (definition, values) pairs, the definition a Claim or a mapping of its fields, the values
    {seed: (method, baseline)} or two {seed: value} dicts (method, baseline) paired by seed.
    Holm's adjustment runs over the primary claims; premises name other claims of the list by id."""
    if not 0 < alpha < 0.5:
        raise UsageError(f"alpha must be in (0, 0.5), got {alpha}")
    if any(not isinstance(item, (tuple, list)) or len(item) != 2 for item in claims):
        raise UsageError("assess_claims takes a list of (claim definition, values) pairs")
    definitions = [as_claim(definition) for definition, _ in claims]
    ids = [c.id for c in definitions]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise UsageError(f"claim ids must be unique; repeated: {', '.join(repeated)}")
    for c in definitions:
        if c.premise and c.premise not in ids:
            raise UsageError(f"claim {c.id!r} rests on {c.premise!r}, which is not a claim here; ids: {', '.join(ids)}")

    tested = {c.id: measured(c, values, alpha, protocol_sha256) for c, (_, values) in zip(definitions, claims)}
    primary = [t for t in tested.values() if t.family == "primary"]
    for t, adjusted in zip(primary, holm([1.0 if math.isnan(t.p_value) else t.p_value for t in primary])):
        if not math.isnan(t.p_value):
            tested[t.id] = replace(t, p_adjusted=float(adjusted))
    for t in list(tested.values()):
        own = claim_verdict(t.test, t.direction, t.margin, t.p_adjusted, t.diff_mean, t.ci_low, t.ci_high, alpha)
        tested[t.id] = replace(t, own_verdict=own, verdict=own)

    premises = {c.id: c.premise for c in definitions}
    resolved: dict[str, AssessedClaim] = {}

    def resolve(claim_id: str, chain: tuple = ()) -> AssessedClaim:
        """The claim with its premise read: its own verdict stands only where the premise holds."""
        if claim_id not in resolved:
            if claim_id in chain:
                raise UsageError(f"claims rest on each other in a circle: {' -> '.join((*chain, claim_id))}")
            t = tested[claim_id]
            if premises[claim_id]:
                premise = resolve(premises[claim_id], (*chain, claim_id))
                held = premise.verdict == "holds"
                t = replace(
                    t, premise=f"{premise.id}: {premise.verdict}", verdict=t.verdict if held else "not resolved"
                )
            resolved[claim_id] = t
        return resolved[claim_id]

    return [resolve(c.id) for c in definitions]


def measured(claim: Claim, values, alpha: float, protocol_sha256: str) -> AssessedClaim:
    """One claim's test on its paired values, before Holm and premises (p_adjusted = p_value)."""
    seeds, m, b = paired_values(values, claim.id)
    d = m - b
    p, low, high, level = claim_test(claim.test, claim.direction, claim.margin, d, alpha)
    definition = {k: getattr(claim, k) for k in ("id", "statement", "family", "test", "direction", "margin", "metric")}
    return AssessedClaim(
        **definition,
        n=len(d),
        diff_mean=float(d.mean()) if len(d) else math.nan,
        ci_low=float(low),
        ci_high=float(high),
        p_value=p,
        p_adjusted=p,
        d_z=effect_size_dz(d),
        wilcoxon_p=wilcoxon_p(d),
        verdict="",
        protocol_sha256=protocol_sha256,
        ci_level=level,
        exploratory=claim.family == "secondary",
        method_mean=float(m.mean()) if len(m) else math.nan,
        baseline_mean=float(b.mean()) if len(b) else math.nan,
        values={s: (float(x), float(y)) for s, x, y in zip(seeds, m, b)},
    )


# ---------------------------------------------------------------------- sample sizes for pilots

MAX_SEEDS = 10**6


def smallest_n(condition, what: str, start: int = 2) -> int:
    """The smallest n >= start for which `condition(n)` is true, for a condition that stays true
    once true (doubling, then bisection)."""
    low, high = start - 1, start  # condition(low) is false, or low is below start
    while not condition(high):
        low, high = high, 2 * high
        if high > MAX_SEEDS:
            raise UsageError(f"{what}: no n up to {MAX_SEEDS} reaches it")
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if condition(middle) else (middle, high)
    return high


def n_for_half_width(sd: float, half_width: float, level: float = 0.95) -> int:
    """Seeds for a paired CI of half-width at most h: the smallest n >= 2 with
    q_{n-1}((1 + level) / 2) * sd / sqrt(n) <= h, sd being a pilot's sd of the paired differences."""
    if not (sd > 0 and half_width > 0 and 0 < level < 1):
        raise UsageError(
            f"n_for_half_width needs sd > 0, half_width > 0 and 0 < level < 1; got {sd}, {half_width}, {level}"
        )
    return smallest_n(
        lambda n: scipy_stats.t.ppf((1 + level) / 2, n - 1) * sd / math.sqrt(n) <= half_width,
        f"a {level:g} CI half-width of {half_width} at sd {sd}",
    )


def half_width_at(level: float, low: float, high: float, ci_level: float, n: int) -> float:
    """The half-width a Student t interval [low, high] at `ci_level` over n paired values would
    have at `level` (the same mean and SD); NaN without an interval."""
    if n < 2 or math.isnan(low):
        return math.nan
    return (high - low) / 2 * scipy_stats.t.ppf((1 + level) / 2, n - 1) / scipy_stats.t.ppf((1 + ci_level) / 2, n - 1)


def lower_prediction_bound(values, level: float = 0.95) -> float:
    """The one-sided lower prediction bound, at `level`, of one more draw from what produced `values`
    (Student t, n - 1 degrees of freedom): mean - q_{n-1}(level) * sd * sqrt(1 + 1/n). Where a few
    pilot seeds must speak for a study's other seeds, their lowest value is not enough; NaN for
    fewer than two values."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n < 2:
        return math.nan
    return float(x.mean() - scipy_stats.t.ppf(level, n - 1) * x.std(ddof=1) * math.sqrt(1 + 1 / n))


def paired_t_power(n: int, effect: float, sd: float, alpha: float = 0.05, alternative: str = "two-sided") -> float:
    """Power of the paired t test at n seeds when the true mean difference is `effect` (sd: of the
    differences): with noncentrality delta = effect / sd * sqrt(n) and critical value c,
    two-sided: P(T' > c) + P(T' < -c), c = q(1 - alpha/2); one-sided (H1 in effect's direction):
    P(T' > c), c = q(1 - alpha); T' noncentral t with n - 1 degrees of freedom and noncentrality delta."""
    check_choice("alternative", alternative, ("two-sided", "one-sided"))
    df, delta = n - 1, abs(effect) / sd * math.sqrt(n)
    if alternative == "one-sided":
        return float(scipy_stats.nct.sf(scipy_stats.t.ppf(1 - alpha, df), df, delta))
    c = scipy_stats.t.ppf(1 - alpha / 2, df)
    return float(scipy_stats.nct.sf(c, df, delta) + scipy_stats.nct.cdf(-c, df, delta))


def n_for_power(
    effect: float, sd: float, alpha: float = 0.05, power: float = 0.8, alternative: str = "two-sided"
) -> int:
    """Seeds for a paired t test to detect a true mean difference `effect` (in the metric's units;
    sd: a pilot's sd of the paired differences) with the given power: the smallest n >= 2 with
    paired_t_power(n) >= power. A one-sided test (a non-inferiority claim at margin M, whose effect
    is the expected difference plus M) takes alternative="one-sided"."""
    if not (effect != 0 and sd > 0 and 0 < alpha < 1 and 0 < power < 1):
        raise UsageError(
            f"n_for_power needs effect != 0, sd > 0, 0 < alpha, power < 1; got {effect}, {sd}, {alpha}, {power}"
        )
    return smallest_n(
        lambda n: paired_t_power(n, effect, sd, alpha, alternative) >= power,
        f"power {power} against effect {effect} at sd {sd}",
    )


# ---------------------------------------------------------------------- selection on validation


def select(
    runs: pd.DataFrame,
    by: str = "val_acc",
    group: str = "label",
    among: list | None = None,
    selection_seeds: list | None = None,
    per: str | list | None = "method",
) -> pd.DataFrame:
    """One setting per method, chosen on validation, and the test accuracy it reports.

    `runs` is a load_runs() table (one row per run and evaluation). A setting is a value of `group`
    (the label); `among` limits the candidates to those settings (None: every one); one setting is
    chosen per value of `per` (a column or list of columns, "method" by default; None: one overall).

    1. Each run is read at its best-validation evaluation: the evaluation with the highest `by`,
       the earliest among equal values (results.best_evaluations), giving the run's score (its `by`
       there) and its test accuracy there (for by="val_acc", load_runs' `selected_test_acc`).
       A run without `by` is no candidate. Higher `by` is better.
    2. Each setting's score is the MEAN of its runs' scores over the selection seeds
       (`selection_seeds`; None: every seed), never seed by seed and never on test accuracy. Within
       each `per` group the setting with the highest score is chosen; equal scores (sums taken with
       math.fsum, so the order of rows cannot make or break a tie) go to the setting first in
       `among`, or without `among` to the first in sorted order of the settings' names.
    3. The chosen setting reports its runs' test accuracy at their best-validation evaluations on
       the seeds not used for selection, or on every seed when `selection_seeds` is None (then the
       setting was chosen on the same seeds' validation accuracy: test accuracy still played no part,
       but the seeds' own luck did).

    One row per `per` group (in order of first appearance in `runs`): the `per` values, the chosen
    setting (`group`), `selection_<by>` (its mean score), `selection_seeds` (those it had),
    `candidates` ({setting: mean score}), `test_acc` (the mean over the reporting seeds, NaN if
    none), `test_by_seed` ({seed: test accuracy}, for paired claims) and `n` (reporting seeds).
    Accuracies stay fractions, as in load_runs.
    """
    per_columns = [] if per is None else [per] if isinstance(per, str) else list(per)
    missing = [c for c in (by, group, *per_columns, "seed", "run_dir", "test_acc") if c not in runs]
    if missing:
        raise UsageError(f"select needs column(s) {', '.join(missing)} in the runs table (a load_runs() table)")
    settings = list(dict.fromkeys(runs[group]))
    if among is not None:
        unknown = [a for a in among if a not in settings]
        if unknown:
            raise UsageError(
                f"select: no runs with {group} {', '.join(map(repr, unknown))}; "
                f"{group}s there: {', '.join(map(str, settings))}"
            )
        runs = runs[runs[group].isin(among)]
    rank = {s: i for i, s in enumerate(among if among is not None else sorted(settings, key=str))}
    best = best_evaluations(runs, by)

    rows = []
    for key, candidates in runs.groupby(per_columns or (lambda _: 0), sort=False):  # one group when per is None
        where = dict(zip(per_columns, key if isinstance(key, tuple) else (key,)))
        here = best[best["run_dir"].isin(set(candidates["run_dir"]))]
        scored = here if selection_seeds is None else here[here["seed"].isin(selection_seeds)]
        if scored.empty:
            raise UsageError(
                f"select: no run{f' for {where}' if where else ''} has {by} on the selection seeds "
                f"({'all' if selection_seeds is None else selection_seeds}); train with val_split > 0"
            )
        scores = {s: math.fsum(v) / len(v) for s, v in scored.groupby(group, sort=False)[by]}
        chosen = min(scores, key=lambda s: (-scores[s], rank[s]))
        reporting = here[here[group] == chosen]
        if selection_seeds is not None:
            reporting = reporting[~reporting["seed"].isin(selection_seeds)]
        test_by_seed = {int(s): float(a) for s, a in sorted(zip(reporting["seed"], reporting["test_acc"]))}
        rows.append(
            {
                **where,
                group: chosen,
                f"selection_{by}": scores[chosen],
                "selection_seeds": sorted(int(s) for s in scored.loc[scored[group] == chosen, "seed"]),
                "candidates": scores,
                "test_acc": float(np.mean(list(test_by_seed.values()))) if test_by_seed else math.nan,
                "test_by_seed": test_by_seed,
                "n": len(test_by_seed),
            }
        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------- rank correlation over runs


def kendall_tau(
    x, y, groups, resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(tau, low, high): Kendall's tau-b of x and y over their rows (scipy.stats.kendalltau; a row
    where either is NaN left out) and its percentile bootstrap interval over `groups` (one label per
    row, such as the run): each of `resamples` seeded resamples draws as many groups as there are,
    with replacement, and takes every row of each group drawn, as often as it was drawn. With
    fewer than 2 groups there is no interval (NaN bounds)."""
    x, y, groups = np.asarray(x, float), np.asarray(y, float), np.asarray(groups)
    if not len(x) == len(y) == len(groups) or resamples < 1:
        raise UsageError(
            f"kendall_tau needs x, y and groups of one length and resamples >= 1, got lengths {len(x)}, {len(y)}, "
            f"{len(groups)} and resamples={resamples}"
        )
    kept = ~(np.isnan(x) | np.isnan(y))
    x, y, groups = x[kept], y[kept], groups[kept]
    tau = float(scipy_stats.kendalltau(x, y).statistic) if len(x) > 1 else math.nan
    names, codes = np.unique(groups, return_inverse=True)
    if len(names) < 2:
        return tau, math.nan, math.nan
    members = [np.flatnonzero(codes == g) for g in range(len(names))]
    draws = np.random.default_rng(seed).integers(0, len(names), size=(resamples, len(names)))
    resampled = (np.concatenate([members[g] for g in drawn]) for drawn in draws)
    taus = np.array([scipy_stats.kendalltau(x[rows], y[rows]).statistic for rows in resampled])
    low, high = np.nanquantile(taus, [(1 - level) / 2, (1 + level) / 2])
    return tau, float(low), float(high)
