"""Did each run's defining term act? Measured from its logged metrics, so a figure never shows a
method whose term never switched on (SAF's term starts only after `lag` epochs of stored logits;
vSAM takes SAM steps on a sampled fraction of steps after its warm-up).

`term_share` is the fraction of a run's training steps on which the method's defining term entered
the update: for SAF and MESA the epochs whose mean penalty is > 0 (the term is on or off for a
whole epoch and logs a penalty of 0 while off), for vSAM its SAM (two-pass) steps (`sampled`, 1.0
on SAM steps, averaged over every step of an epoch by the loop), for methods whose term is on at
every step the sign of its weight (alpha, lam, rho). Methods without such a term (sgd, pseudo_gd,
grafting, ngd) have none.

Which metric tells is a property of each method and belongs beside it in gvr_lab/methods; it is
collected here until that package offers a hook for it.
"""

from __future__ import annotations

import pandas as pd

# method -> (what its term is, the config column whose value > 0 turns it on at every step)
WEIGHTED = {
    "gvr": ("gradient-variance penalty", "arg_alpha"),
    "reg_loss": ("gradient-norm penalty", "arg_lam"),
    "fish_loss": ("Fisher-trace penalty", "arg_lam"),
    "avg_jac_loss": ("average-Jacobian penalty", "arg_lam"),
    "unit_jac_loss": ("unit-Jacobian penalty", "arg_lam"),
    "sam": ("SAM ascent", "arg_rho"),
    "asam": ("ASAM ascent", "arg_rho"),
    "esam": ("ESAM ascent", "arg_rho"),
    "looksam": ("SAM direction (refreshed every k steps)", "arg_rho"),
}
PER_EPOCH = {"saf": "KL to logits of `lag` epochs ago", "mesa": "KL to the EMA teacher"}


def term_share(rows: pd.DataFrame) -> float | None:
    """The fraction of training steps on which the defining term of the run in `rows` (its
    load_runs() epoch rows) acted; None for a method without such a term."""
    method = rows["method"].iloc[0]
    if method in WEIGHTED:
        return float(rows[WEIGHTED[method][1]].iloc[0] > 0)
    if method in PER_EPOCH:
        return float((rows["train_penalty"].fillna(0) > 0).mean())
    if method == "vsam":
        return float(rows["train_sampled"].mean())
    return None


def describe(rows: pd.DataFrame) -> str:
    """term_share in words, for tables: '—' for none, 'never' for 0, else the percentage (vSAM's
    also after its warm-up, where its sampling acts)."""
    share = term_share(rows)
    if share is None:
        return "—"
    if share == 0:
        return "never"
    text = f"{100 * share:.0f}% of steps"
    if rows["method"].iloc[0] == "vsam":
        after = vsam_share_after_warmup(rows)
        if after is not None:
            text += f" ({100 * after:.0f}% after warm-up)"
    return text


def vsam_share_after_warmup(rows: pd.DataFrame) -> float | None:
    """vSAM's share of SAM steps after its warm-up (None if the run never left it). A history row
    holds the mean of `sampled` since the previous evaluation: over an epoch, or in steps mode
    (Config.steps) over the steps up to `step`, an interval that can straddle the warm-up's end;
    every warm-up step is a SAM step, so the warm-up's part of such an interval is known."""
    warmup = rows["arg_warmup_epochs"].iloc[0]
    if "step" not in rows.columns or rows["step"].isna().any():
        after = rows[rows["epoch"] >= warmup]
        return after["train_sampled"].mean() if len(after) else None
    ends = rows["step"].astype(int)
    warmup_steps = min(warmup * int(rows["steps_per_epoch"].iloc[0]), ends.iloc[-1])
    if warmup_steps == ends.iloc[-1]:
        return None
    sam_steps = (rows["train_sampled"] * (ends - ends.shift(fill_value=0))).sum() - warmup_steps
    return sam_steps / (ends.iloc[-1] - warmup_steps)


def term_column(runs: pd.DataFrame, table: pd.DataFrame, by: str = "label", ablations: tuple = ()) -> pd.DataFrame:
    """`table` (one row per `by` value) with a column "term on": each group's share of steps with
    its method's defining term (seeds joined when they differ). Labels in `ablations` switch the
    term off on purpose and say so."""

    def cell(value) -> str:
        if value in ablations:
            return "off (ablation)"
        texts = [describe(rows) for _, rows in runs[runs[by] == value].groupby("run_dir", sort=False)]
        return " / ".join(dict.fromkeys(texts))

    return table.assign(**{"term on": table[by].map(cell)})


def never_active(runs: pd.DataFrame, ablations: tuple = ()) -> list[str]:
    """Run directories whose method's defining term never acted, ablations excepted."""
    return [
        run_dir
        for run_dir, rows in runs.groupby("run_dir", sort=False)
        if rows["label"].iloc[0] not in ablations and term_share(rows) == 0
    ]
