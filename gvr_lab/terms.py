"""Did each run's defining term act? Measured from its logged metrics, so a figure never shows a
method whose term never switched on (SAF's term starts only after `lag` epochs of stored logits;
vSAM takes SAM steps on a sampled fraction of steps after its warm-up).

What a method's term is and how a run shows that it acted are facts of the method's class
(Method.term, term_weight, term_share, term_note in gvr_lab/methods); this module applies them to
the runs of a study.
"""

from __future__ import annotations

import re

import pandas as pd

from .methods import METHODS


def term_share(rows: pd.DataFrame) -> float | None:
    """The fraction of training steps on which the defining term of the run in `rows` (its
    load_runs() epoch rows) acted; None for a method without such a term."""
    method = METHODS.get(rows["method"].iloc[0])
    return None if method is None else method.term_share(rows)


def describe(rows: pd.DataFrame) -> str:
    """term_share in words, for tables: '—' for none, 'never' for 0, else the percentage, with
    what the method adds (vSAM: its share after the warm-up)."""
    share = term_share(rows)
    if share is None:
        return "—"
    if share == 0:
        return "never"
    note = METHODS[rows["method"].iloc[0]].term_note(rows)
    return f"{100 * share:.0f}% of steps" + (f" ({note})" if note else "")


def term_column(runs: pd.DataFrame, table: pd.DataFrame, by: str = "label", ablations: tuple = ()) -> pd.DataFrame:
    """`table` (one row per `by` value) with a column "term on": each group's share of steps with
    its method's defining term (seeds that differ in their numbers only as ranges, combined_texts).
    Labels in `ablations` switch the term off on purpose and say so."""

    def cell(value) -> str:
        if value in ablations:
            return "off (ablation)"
        return combined_texts([describe(rows) for _, rows in runs[runs[by] == value].groupby("run_dir", sort=False)])

    return table.assign(**{"term on": table[by].map(cell)})


NUMBER = re.compile(r"\d+(?:\.\d+)?")


def combined_texts(texts: list[str]) -> str:
    """One text for the runs of a group: theirs when they agree; when they differ in their numbers
    only, each number as the runs' range ('24-27% of steps'); else the distinct texts joined."""
    distinct = list(dict.fromkeys(texts))
    if len(distinct) == 1:
        return distinct[0]
    wordings = {NUMBER.sub("#", t) for t in distinct}
    if len(wordings) > 1:
        return " / ".join(distinct)
    columns = zip(*(NUMBER.findall(t) for t in distinct))
    ranges = iter(
        lo if lo == hi else f"{lo}-{hi}" for lo, hi in ((min(c, key=float), max(c, key=float)) for c in columns)
    )
    return NUMBER.sub(lambda _: next(ranges), distinct[0])


def never_active(runs: pd.DataFrame, ablations: tuple = ()) -> list[str]:
    """Run directories whose method's defining term never acted, ablations excepted."""
    return [
        run_dir
        for run_dir, rows in runs.groupby("run_dir", sort=False)
        if rows["label"].iloc[0] not in ablations and term_share(rows) == 0
    ]
