"""Paired comparisons over seeds and a computed verdict per claim.

Seeds are paired: seed s gives every arm of a study the same initial weights and data order
(Config.seed drives both), so a method is compared with its baseline seed by seed,

    d_s = method_s - baseline_s,   mean d,   95% CI = mean d +- t_{0.975, n-1} * sd(d) / sqrt(n)

(Student t over the n seeds with a paired value; `bootstrap=True` gives the percentile bootstrap of
the mean difference instead, 10,000 seeded resamples). Pairing removes the between-seed variance
the arms share, which is most of it when they start from the same weights.

Verdicts, from the CI, never typed:

    direction "greater"  holds if ci_low > 0, contradicted if ci_high < 0, else "not resolved"
    direction "less"     the mirror image
    direction "parity"   holds if the CI lies inside [-margin, margin] (equivalence),
                         contradicted if it lies wholly outside it, else "not resolved"

With fewer than 2 paired values there is no interval: the verdict is "not resolved".

A claim can rest on another: "LB+GN recovers most of the SB-LB gap" means nothing where SB does
not beat LB. Given `premise=` (the comparison it rests on), its verdict is the CI's own only when
the premise holds; otherwise it is "not resolved", with the CI's own verdict and the premise's kept
beside it (`ci_verdict`, `premise`), so the difference is still reported but never read as support.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy import stats as scipy_stats

from .errors import UsageError, check_choice

if TYPE_CHECKING:
    import pandas as pd

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
    import pandas as pd

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
