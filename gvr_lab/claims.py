"""The claims study: a protocol registered before its runs, the arms it names trained, its claims tested.

notebooks/claims_protocol.toml holds what the study decides before it trains anything:

* `[claims]`: every claim, fixed once (id, statement, family, test, metric, the method and baseline
  values it compares, direction, margin, premise): the same claims at every preset;
* `[presets.<name>]`: per preset, what its runs train with (`bases`: Config fields shared by a group
  of arms; `arms`: each arm's own fields on top of its base), its seeds, alpha, and each claim's n
  with the pilot figures it was derived from (`n`), written by the pilot (`pilot_protocol`).

The claims notebook reads the protocol and nothing else to decide what is tested. A preset's
protocol is the claims plus that preset's table; its SHA-256 (of both, as canonical JSON) stamps the
runs root it trains into (PROTOCOL_FILE) and every result; verdicts on runs made under another
protocol are refused (`check_stamp`): a new protocol is a new study.

What a claim compares, per seed (`values_of`):

    "<arm>"                  the arm's metric
    "midpoint:<a>,<b>"       (a + b) / 2 of two arms' metric
    "ratio:<a>/<b>"          a / b of two arms' metric
    "<number>"               that constant on every seed

Metrics, each read at a run's last evaluation: `test_acc`, `train_acc` (the running mean over the
last interval's batches), `train_eval_acc` (the training rows evaluated as the test set;
Config.eval_train), in percent; `step_time`, seconds per optimizer step modelled from counted work:
the fraction p of two-pass steps the run took (`sampled`, 1 for methods that always take two) times
the time of a two-pass step, plus 1 - p times that of a one-pass step, both timed in isolation and
interleaved (`step_times`, gvr-lab bench's machinery), never from the wall time of runs that shared
cores.

The pilot (`pilot_*`): it sizes the study on seeds of its own, with a validation split, before the
protocol is written: for Novack et al.'s arms the cheapest setting where the small-batch arm fits its
training set on every pilot seed and is predicted to on the study's; for the other arms the epoch
budget past which doubling no longer raises the baseline's test accuracy (`plateau_budget`; the
largest tried, said to be no plateau, when none is); learning rate, rho
and alpha chosen on validation (stats.select), GVR with a rate of its own (its loss sums two views'
losses, about twice the step SGD's rate was chosen for); then, per claim, the SD of its paired
differences and the n that gives a 95% CI half-width of at most `half_width` points
(stats.n_for_half_width).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import stats
from .bench import run_bench
from .collect import load_runs
from .data import dataset_info
from .errors import UsageError
from .grid import default_workers, grid_configs, run_dir_name, train_configs, train_grid
from .plots import final_rows
from .pools import pool_size
from .results import CONFIG, read_json, write_json
from .study import HALF_BUDGET, digest
from .training import Config, holds_finished_run

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

PROTOCOL_FILE = "PROTOCOL.json"  # in a runs root: the protocol its runs were made under
# The registered protocol of this checkout (the claims notebook's and bench-grid's default).
DEFAULT_PROTOCOL = Path(__file__).resolve().parent.parent / "notebooks" / "claims_protocol.toml"
METRICS = ("test_acc", "train_acc", "train_eval_acc", "step_time")
PERCENT = ("test_acc", "train_acc", "train_eval_acc")
CLAIM_FIELDS = ("id", "statement", "family", "test", "metric", "method", "baseline", "direction", "margin")


@dataclass(frozen=True)
class Protocol:
    """One preset's protocol: its claims and its table, and their SHA-256."""

    path: Path
    preset: str
    claims: list  # the [claims] entries, in order
    table: dict  # [presets.<preset>]
    sha256: str
    file_sha256: str = ""  # of the file's bytes as read (sha256sum's), claims_records writes it

    @property
    def seeds(self) -> list[int]:
        return list(self.table["seeds"])

    @property
    def alpha(self) -> float:
        return float(self.table.get("alpha", 0.05))

    def arm(self, label: str) -> dict:
        """The Config fields of an arm: its base's, then its own (`base` and the *_from keys out)."""
        arms = self.table.get("arms", {})
        if label not in arms:
            raise UsageError(f"{self.path}: preset {self.preset!r} has no arm {label!r}; arms: {', '.join(arms)}")
        own = dict(arms[label])
        base = self.table.get("bases", {}).get(own.pop("base", ""), {})
        for key in ("lr_from", "norms_from"):
            own.pop(key, None)
        return {**base, **own, "label": label}

    def n(self, claim_id: str) -> int:
        """A claim's number of seeds: its registered n, or every seed of the preset."""
        return int(self.table.get("n", {}).get(claim_id, {}).get("n", len(self.seeds)))


def load_protocol(path, preset: str) -> Protocol:
    """The protocol of `preset` in the TOML file at `path`, checked: every claim complete and valid
    (stats.Claim), every arm a claim names present in the preset, its seeds a list."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        document = tomllib.loads(raw.decode())
    except OSError as e:
        raise UsageError(f"cannot read the protocol {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"the protocol {path} is not valid TOML: {e}") from None
    presets = document.get("presets", {})
    if preset not in presets:
        raise UsageError(f"{path} registers no protocol for preset {preset!r}; presets there: {', '.join(presets)}")
    claims = document.get("claims", [])
    for claim in claims:
        missing = [key for key in CLAIM_FIELDS if key not in claim]
        if missing:
            raise UsageError(f"{path}: claim {claim.get('id', '?')!r} lacks {', '.join(missing)}")
        if claim["metric"] not in METRICS:
            raise UsageError(f"{path}: claim {claim['id']!r}: unknown metric {claim['metric']!r}; valid: {METRICS}")
        stats.as_claim(definition(claim))  # the test, family, direction and margin, checked
    table = presets[preset]
    claims = [demoted(claim, table.get("n", {}).get(claim["id"], {}), path) for claim in claims]
    if not isinstance(table.get("seeds"), list) or not table["seeds"]:
        raise UsageError(f"{path}: preset {preset!r} needs `seeds`, a list of seeds")
    canonical = json.dumps({"claims": claims, "preset": table}, sort_keys=True, default=str)
    protocol = Protocol(
        path, preset, claims, table, hashlib.sha256(canonical.encode()).hexdigest(), hashlib.sha256(raw).hexdigest()
    )
    for claim in claims:
        for arm in arms_of(claim["method"]) + arms_of(claim["baseline"]):
            protocol.arm(arm)
    return protocol


def register_preset(protocol_path, block: str) -> Protocol:
    """Register a preset's block (the TOML `[presets.<name>]` tables the pilot writes, protocol_table)
    in the protocol file: in place of that preset's tables where the file has them, else at its end;
    the rest of the file (the comments before the next preset's tables too) is kept as it is. The new
    file is read back before it replaces the old one (a temporary file, renamed): the preset must load,
    with the block's table. Returns the registered protocol."""
    path = Path(protocol_path)
    try:
        presets = tomllib.loads(block).get("presets", {})
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"the block to register is not valid TOML: {e}") from None
    if len(presets) != 1:
        raise UsageError("the block to register must hold exactly one preset: [presets.<name>] and its tables")
    [(name, table)] = presets.items()
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise UsageError(f"cannot read the protocol {path}: {e.strerror}") from None

    def own(line: str) -> bool:  # a table header of this preset's
        return line.startswith((f"[presets.{name}]", f"[presets.{name}."))

    start = next((i for i, line in enumerate(lines) if own(line)), len(lines))
    end = start
    while end < len(lines) and (own(lines[end]) or not lines[end].startswith("[")):
        end += 1
    while end > start and (lines[end - 1].startswith("#") or not lines[end - 1].strip()):
        end -= 1  # what stands before the next tables belongs to them
    head, after = lines[:start], lines[end:]
    while head and not head[-1].strip():
        head.pop()
    text = "\n".join([*head, "", block.strip(), *([""] + after if after else [])]) + "\n"
    work = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        (work / path.name).write_text(text)
        registered = load_protocol(work / path.name, name)
        if registered.table != table:
            raise UsageError(f"{path}: preset {name!r} would not read back as the block to register")
        os.replace(work / path.name, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dataclasses.replace(registered, path=path)


def demoted(claim: dict, registered: dict, path) -> dict:
    """A claim as a preset registers it: declared secondary there when its n did not fit the
    preset's budget (a preset may demote a claim, never promote one)."""
    family = registered.get("family", claim["family"])
    if family == claim["family"]:
        return claim
    if family != "secondary":
        raise UsageError(f"{path}: a preset may declare claim {claim['id']!r} secondary, not {family!r}")
    return {**claim, "family": family}


def definition(claim: dict) -> dict:
    """A protocol claim as stats.Claim's fields."""
    fields = ("id", "statement", "family", "test", "direction", "margin", "premise")
    return {**{k: claim[k] for k in fields if k in claim}, "metric": claim["metric"]}


def arms_of(spec: str) -> list[str]:
    """The arms a value spec reads ("<arm>", "midpoint:<a>,<b>", "ratio:<a>/<b>", a number)."""
    kind, _, rest = str(spec).partition(":")
    if kind == "midpoint":
        return rest.split(",")
    if kind == "ratio":
        return rest.split("/")
    try:
        float(spec)
        return []
    except ValueError:
        return [spec]


# ---------------------------------------------------------------------- training the arms


def check_stamp(runs_root, protocol: Protocol) -> None:
    """Stamp a new runs root with the protocol, or refuse one stamped with another."""
    path = Path(runs_root) / PROTOCOL_FILE
    if path.is_file():
        stamped = read_json(path)["sha256"]
        if stamped != protocol.sha256:
            raise UsageError(
                f"{runs_root} holds runs made under protocol {stamped[:12]}, not this one ({protocol.sha256[:12]}): a "
                "changed protocol is a new study; give it another runs_root"
            )
        return
    Path(runs_root).mkdir(parents=True, exist_ok=True)
    write_json(path, {"sha256": protocol.sha256, "preset": protocol.preset, "protocol": str(protocol.path)})


def arm_configs(protocol: Protocol, runs_root, derived: dict | None = None, overrides: dict | None = None) -> list:
    """The Configs of every arm for every seed: those that read another arm's runs (`lr_from`,
    `norms_from`) only when `derived` ({arm: fields}) has them. `overrides` (Config fields) go on
    top of every arm (the device)."""
    configs = []
    for label, own in protocol.table.get("arms", {}).items():
        reads = own.get("lr_from") or own.get("norms_from")
        if reads and (derived is None or label not in derived):
            continue
        fields = {**protocol.arm(label), **(overrides or {}), **((derived or {}).get(label, {}))}
        if own.get("norms_from"):  # the same seed's run of the arm it reads
            for seed in protocol.seeds:
                norms = {
                    "method_args": {
                        **fields.get("method_args", {}),
                        "norms_path": f"{runs_root}/{run_dir_name(own['norms_from'], seed)}",
                    }
                }
                configs += grid_configs({}, [{**fields, **norms}], [seed], runs_root)
        else:
            configs += grid_configs({}, [fields], protocol.seeds, runs_root)
    return configs


def derived_fields(protocol: Protocol, runs: pd.DataFrame) -> dict:
    """{arm: fields} of the arms that read another arm's runs: `lr_from` = X gives lr = X's lr times
    the mean logged gradient norm of X's runs (X's average step length: NGD's fixed step);
    `norms_from` is resolved per seed by arm_configs."""
    out = {}
    for label, own in protocol.table.get("arms", {}).items():
        if own.get("lr_from"):
            source = runs[runs["label"] == own["lr_from"]]
            if source.empty or "grad_norm" not in source:
                raise UsageError(f"arm {label!r} reads the logged gradient norms of {own['lr_from']!r}, which has none")
            out[label] = {"lr": float(protocol.arm(own["lr_from"])["lr"] * source["grad_norm"].mean())}
        elif own.get("norms_from"):
            out[label] = {}
    return out


# ---------------------------------------------------------------------- values and claims


# How close to guessing a run's final test accuracy must be to count as collapsed
CHANCE_MARGIN = 0.02


def at_chance(final: pd.DataFrame) -> pd.Series:
    """Per run (final_rows), whether it ended within CHANCE_MARGIN of chance test accuracy (one over
    its dataset's classes): a run that collapsed to a constant prediction without diverging, which a
    claim counts at what it reached and a reader should see beside the arm's interval."""
    chance = final["dataset"].map(lambda name: 1 / dataset_info(name).num_classes)
    return final["test_acc"] <= chance + CHANCE_MARGIN


def two_pass_fraction(rows: pd.DataFrame) -> float:
    """The fraction of a run's steps that took two passes: `sampled` (vSAM, LookSAM) averaged over
    every step, weighted by the steps of each evaluation interval; 1 for a method that always takes
    two, 0 for one that never does."""
    method = rows["method"].iloc[0]
    if "train_sampled" in rows and rows["train_sampled"].notna().all():
        steps = interval_steps(rows)
        return float((rows["train_sampled"] * steps).sum() / steps.sum())
    return 1.0 if method in ("sam", "asam", "esam") else 0.0


def interval_steps(rows: pd.DataFrame) -> pd.Series:
    per_epoch = int(rows["steps_per_epoch"].iloc[0])
    if "step" in rows and rows["step"].notna().all():
        ends = rows["step"].astype(int)
    else:
        ends = (rows["epoch"].astype(int) + 1) * per_epoch
    return ends - ends.shift(fill_value=0)


def metric_by_seed(runs: pd.DataFrame, arm: str, metric: str, times: dict | None = None) -> dict:
    """{seed: value} of one arm's metric (module docstring)."""
    rows = runs[runs["label"] == arm]
    if rows.empty:
        raise UsageError(f"no runs of arm {arm!r}; arms: {', '.join(map(str, runs['label'].unique()))}")
    if metric == "step_time":
        if not times:
            raise UsageError("a step_time claim needs the arms' step times (step_times)")
        out = {}
        for (seed, _), r in rows.groupby(["seed", "run_dir"], sort=True):
            p = two_pass_fraction(r)
            out[int(seed)] = p * times["two_pass_s"] + (1 - p) * times["one_pass_s"][arm]
        return out
    last = final_rows(rows)
    return {int(s): 100.0 * float(v) for s, v in zip(last["seed"], last[metric])}


def values_of(spec, runs: pd.DataFrame, metric: str, times: dict | None = None) -> dict:
    kind, _, rest = str(spec).partition(":")
    if kind == "midpoint":
        a, b = (metric_by_seed(runs, arm, metric, times) for arm in rest.split(","))
        return stats.seedwise(lambda x, y: (x + y) / 2, a, b)
    if kind == "ratio":
        a, b = (metric_by_seed(runs, arm, metric, times) for arm in rest.split("/"))
        return stats.seedwise(lambda x, y: x / y, a, b)
    if not arms_of(spec):
        seeds = sorted(int(s) for s in runs["seed"].unique())
        return {s: float(spec) for s in seeds}
    return metric_by_seed(runs, spec, metric, times)


def claim_values(protocol: Protocol, runs: pd.DataFrame, times: dict | None = None) -> list:
    """(definition, (method values, baseline values)) of every claim, each on the first n seeds of
    the preset (its registered n)."""
    out = []
    for claim in protocol.claims:
        seeds = set(protocol.seeds[: protocol.n(claim["id"])])
        method, baseline = (values_of(claim[k], runs, claim["metric"], times) for k in ("method", "baseline"))
        out.append(
            (
                definition(claim),
                ({s: v for s, v in method.items() if s in seeds}, {s: v for s, v in baseline.items() if s in seeds}),
            )
        )
    return out


def assess(protocol: Protocol, runs: pd.DataFrame, times: dict | None = None) -> list:
    """Every claim tested (stats.assess_claims: Holm over the primary family, premises read),
    stamped with the protocol's SHA-256."""
    return stats.assess_claims(claim_values(protocol, runs, times), protocol.alpha, protocol.sha256)


CLAIMS_JSON_FIELDS = (
    "id",
    "statement",
    "family",
    "test",
    "direction",
    "margin",
    "metric",
    "n",
    "diff_mean",
    "ci_low",
    "ci_high",
    "p_value",
    "p_adjusted",
    "d_z",
    "wilcoxon_p",
    "verdict",
    "protocol_sha256",
)


def claims_records(assessed: list, protocol: Protocol) -> list[dict]:
    """claims.json: one record per claim, the fields above, plus the CI's level, the claim's own
    verdict before its premise and the premise, and the SHA-256 of the protocol file's bytes as the
    study read them: protocol_sha256 names the preset's block and claims, which other presets' edits
    leave alone; this one is what `sha256sum` of the registered file gives."""
    extra = ("ci_level", "own_verdict", "premise", "exploratory")
    return [
        {**{k: getattr(a, k) for k in (*CLAIMS_JSON_FIELDS, *extra)}, "protocol_file_sha256": protocol.file_sha256}
        for a in assessed
    ]


def seeds_table(protocol: Protocol, runs: pd.DataFrame, assessed: list, times: dict | None = None) -> pd.DataFrame:
    """seeds.csv, tidy, one row per value: claim_id, arm, role (method | baseline | context), seed,
    metric, value. The values every claim was tested on (a claim's n, mean difference, CI and p
    recompute from its method and baseline rows alone), then every arm's final test_acc and
    train_acc per seed as context, and for each run of the step-time claims' arms what its step time
    is made of: its two-pass fraction p and the isolated two-pass and one-pass step times (step_times),
    the step time being p * two_pass_s + (1 - p) * one_pass_s."""
    rows = []
    for claim, tested in zip(protocol.claims, assessed):
        for seed, (method, baseline) in sorted(tested.values.items()):
            for role, spec, value in (("method", claim["method"], method), ("baseline", claim["baseline"], baseline)):
                rows.append((claim["id"], str(spec), role, seed, claim["metric"], value))
    last = final_rows(runs)
    for r in last.itertuples():
        for metric in ("test_acc", "train_acc"):
            rows.append(("", r.label, "context", int(r.seed), metric, 100.0 * getattr(r, metric)))
    for claim in protocol.claims:
        if claim["metric"] == "step_time":
            for arm in arms_of(claim["method"]) + arms_of(claim["baseline"]):
                for (seed, _), r in runs[runs["label"] == arm].groupby(["seed", "run_dir"], sort=True):
                    parts = {
                        "two_pass_fraction": two_pass_fraction(r),
                        "two_pass_s": times["two_pass_s"],
                        "one_pass_s": times["one_pass_s"][arm],
                    }
                    rows += [(claim["id"], arm, "context", int(seed), m, v) for m, v in parts.items()]
    return pd.DataFrame(rows, columns=["claim_id", "arm", "role", "seed", "metric", "value"])


def recompute(seeds: pd.DataFrame, record: dict, alpha: float = 0.05) -> tuple[int, float, float, float, float]:
    """(n, mean difference, CI low, high, p) of a claims.json record from seeds.csv alone, the check
    a reader can make: its method and baseline rows paired by seed, and the record's own test
    (stats.claim_test) at the protocol's `alpha`, so a margin claim's interval is its 1 - 2 alpha one."""
    rows = seeds[seeds["claim_id"] == record["id"]]
    method, baseline = (
        {int(s): float(v) for s, v in zip(part["seed"], part["value"])}
        for part in (rows[rows["role"] == role] for role in ("method", "baseline"))
    )
    _, m, b = stats.paired_differences(method, baseline)
    d = m - b
    p, low, high, _ = stats.claim_test(record["test"], record["direction"], record["margin"], d, alpha)
    return len(d), float(d.mean()) if len(d) else math.nan, low, high, p


# ---------------------------------------------------------------------- counted work, timed


def step_times(protocol: Protocol, device: str = "cpu", rounds: int = 9, steps: int = 4) -> dict:
    """Seconds per step of the step-time claims' arms, timed in isolation and interleaved (rounds in
    a shuffled order, the median; bench.run_bench): the two-pass step (SAM's) and each arm's
    one-pass step. A one-pass step of an arm that samples two-pass steps (vSAM) is read off its
    timed rounds, each with its measured fraction p_r of two-pass steps: the median over the rounds
    with a one-pass step of t_1 = (t_r - p_r t_2) / (1 - p_r). Not from the median round and the
    mean p: the rounds that hold a two-pass step are the slowest, so the median round holds none
    while p counts them, and t_1 would read p (t_2 - t_1) / (1 - p) too low."""
    arms = sorted(
        {
            a
            for c in protocol.claims
            if c["metric"] == "step_time"
            for a in arms_of(c["method"]) + arms_of(c["baseline"])
        }
    )
    if not arms:
        return {}
    fields = {arm: protocol.arm(arm) for arm in arms}
    first = next(iter(fields.values()))
    config = Config.from_dict({k: v for k, v in first.items() if k != "label"})
    info_shape = (1, 28) if config.dataset == "fashion_mnist" else (3, 32)
    specs = [(f["method"], dict(f.get("method_args", {}))) for f in fields.values()]
    report = run_bench(
        config.model, info_shape, 10, config.batch_size, specs, device=device, rounds=rounds, steps=steps, warmup=2
    )
    rows = {r["label"].split(":")[0]: r for r in report["results"]}
    two_pass = rows["sam"]["ms_per_step"] / 1000
    one_pass = {}
    for arm, f in fields.items():
        row = rows[f["method"]]
        fixed = 1.0 if f["method"] == "sam" else 0.0  # the two-pass fraction of a method that logs none
        timed = zip(row["round_ms"], row["round_sampled"] or [fixed] * len(row["round_ms"]))
        per_round = [(ms / 1000 - p * two_pass) / (1 - p) for ms, p in timed if p < 1]
        one_pass[arm] = float(np.median(per_round)) if per_round else two_pass
    return {"two_pass_s": two_pass, "one_pass_s": one_pass, "bench": report}


# ---------------------------------------------------------------------- the pilot


# The plateau rule: a doubling of training that raises the mean final test accuracy by less than this
# many points no longer pays. The training loss is reported beside it, not judged: under a decaying
# schedule on a few thousand images it keeps falling by 20-45% per doubling as the network memorizes
# its training set (SGD on 1,024 Fashion-MNIST images, 80 -> 160 -> 320 epochs: 39% and 44% lower, test
# accuracy +2.2 and +0.0 points), so a threshold on its drop would call no feasible budget a plateau.
PLATEAU_ACC_GAIN = 0.5


def plateau_budget(finals: pd.DataFrame, acc_gain: float = PLATEAU_ACC_GAIN) -> tuple[int, bool]:
    """The smallest epoch budget after which doubling the budget no longer pays, and whether one
    did: from the baseline's runs at each budget (rows: `epochs`, `seed`, final `train_loss` and
    `test_acc`, fractions), (the smallest budget E whose next budget's mean test accuracy is less than
    `acc_gain` points above E's, True); (the largest budget, False) when none is."""
    means = finals.groupby("epochs")[["train_loss", "test_acc"]].mean().sort_index()
    budgets = list(means.index)
    for small, large in zip(budgets, budgets[1:]):
        if doubling(means.loc[small], means.loc[large], acc_gain)[2]:
            return int(small), True
    return int(budgets[-1]), False


def doubling(shorter, longer, acc_gain: float) -> tuple[float, float, bool]:
    """The plateau rule on one doubling, from the mean final `train_loss` and `test_acc` (fractions)
    at a budget and at twice it: (the loss's relative drop, reported; the accuracy's gain in points;
    whether the doubling no longer paid: a gain under `acc_gain`)."""
    drop = 1 - longer["train_loss"] / shorter["train_loss"]
    gain = 100 * (longer["test_acc"] - shorter["test_acc"])
    return drop, gain, bool(gain < acc_gain)


def half_budget_runs(base: dict, variants: list, seeds: list, runs_root) -> pd.DataFrame:
    """The baselines of a grid (`base` + each of `variants`) trained again at half their epochs
    (half their steps, for a steps-mode run), for each seed, in runs_root/half-budget
    (study.HALF_BUDGET): each run with its whole schedule, so its end is what training half as long
    gives. Under a decaying schedule, the loss a run had halfway says nothing of that."""

    def halved(variant: dict) -> dict:
        config = {**base, **variant}
        unit = "steps" if config.get("steps") else "epochs"
        return {**variant, unit: config[unit] // 2}

    root = Path(runs_root) / HALF_BUDGET
    train_grid(base, [halved(v) for v in variants], seeds, root)
    return load_runs(f"{root}/*")


def plateau_note(runs: pd.DataFrame, label: str, half: pd.DataFrame, acc_gain: float = PLATEAU_ACC_GAIN) -> str:
    """Whether the runs labelled `label` (a load_runs() table) had plateaued: doubling_note of them
    against the same runs at half the budget (`half`: half_budget_runs)."""
    return doubling_note(runs[runs["label"] == label], half[half["label"] == label], label, acc_gain)


def doubling_note(longer: pd.DataFrame, shorter: pd.DataFrame, label: str, acc_gain: float = PLATEAU_ACC_GAIN) -> str:
    """Whether `label`'s training had plateaued at the `shorter` runs' budget, in one sentence:
    their final test accuracy and training loss, averaged over seeds, against those of the `longer`
    runs (twice the budget, each with its own schedule), by plateau_budget's rule: plateaued when
    the doubling raised the accuracy by less than `acc_gain` points; the loss's drop is stated."""
    full, short = final_rows(longer), final_rows(shorter)
    seeds = full["seed"].nunique()
    what = f"training of {label} (mean of {seeds} seed{'s' if seeds > 1 else ''})"
    if short.empty:
        return f"{what}: no run at half the budget, no plateau check"
    unit = "steps" if bool((full["steps"] > 0).all()) else "epochs"
    budget, half_budget = int(full[unit].iloc[0]), int(short[unit].iloc[0])

    def count(n: int) -> str:
        return f"{n} {unit if n != 1 else unit[:-1]}"

    means = [rows[["train_loss", "test_acc"]].mean() for rows in (short, full)]
    drop, gain, plateaued = doubling(*means, acc_gain)
    found = (
        f"{count(budget)} ended {gain:+.1f} points of test accuracy and {-100 * drop:+.0f}% of training loss "
        f"from the runs of {count(half_budget)} (each with its own schedule)"
    )
    rule = f"the plateau rule: less than {acc_gain:g} points per doubling; the loss is stated, not judged"
    return f"{what}: {'plateaued' if plateaued else 'not plateaued'}, {found} ({rule})"


def fitting_setting(finals: pd.DataFrame, threshold: float = 0.99, lowest="min") -> dict | None:
    """The cheapest candidate setting (fewest training examples times steps) whose runs reach
    `threshold` training accuracy on their clean training rows (train_eval_acc): `lowest` of the
    setting's runs at least `threshold` ("min": every run; the pilot's study_seeds_lowest: every run
    and a new seed's prediction bound). Rows carry `train_subset`, `steps` and `train_eval_acc`;
    None when no setting does."""
    fitted = finals.groupby(["train_subset", "steps"])["train_eval_acc"].agg(lowest)
    fitted = fitted[fitted >= threshold]
    if fitted.empty:
        return None
    subset, steps = min(fitted.index, key=lambda key: (key[0] * key[1], key))
    return {"train_subset": int(subset), "steps": int(steps)}


def study_seeds_lowest(values) -> float:
    """What the pilot's seeds say the study's seeds will reach at the least: their lowest value, or
    the 95% lower prediction bound of one more seed (stats.lower_prediction_bound) where that is
    lower. The first registered study's SB setting had every pilot seed at 99.6% or more, and two of
    its nine study seeds below 99%."""
    return min(float(np.min(values)), stats.lower_prediction_bound(values))


def fit_note(runs: pd.DataFrame, label: str, threshold: float = 0.99) -> str:
    """Whether the runs labelled `label` fit their training set by fitting_setting's rule (every
    seed's clean training accuracy, train_eval_acc at its last evaluation, at least `threshold`), in
    one sentence with the lowest seed's accuracy; the runs need Config.eval_train."""
    finals = final_rows(runs[runs["label"] == label])
    if "train_eval_acc" not in finals or finals["train_eval_acc"].isna().any():
        return f"{label}: clean training accuracy not evaluated (eval_train), no fit check"
    lowest, seeds = 100 * finals["train_eval_acc"].min(), len(finals)
    fits = "fits" if fitting_setting(finals, threshold) is not None else "does not fit"
    on = f"each of {seeds} seeds" if seeds > 1 else "1 seed"
    rule = f"the rule: {100 * threshold:.0f}%"
    return f"{label} {fits} its training set: clean training accuracy at least {lowest:.1f}% on {on} ({rule})"


def sample_sizes(protocol_claims: list, runs: pd.DataFrame, half_width: float, times: dict | None = None) -> list:
    """Per claim, from the pilot's runs: the seeds paired, the mean and SD of the paired differences,
    the n it needs and the power of its own test at that n against the pilot's mean difference
    (null_distance). An accuracy claim (in points) needs the n whose 95% CI half-width is at most
    `half_width` points (stats.n_for_half_width); a claim in other units (the step-time ratio),
    where a width in points means nothing, the n whose test has 80% power at the pilot's distance
    from its null (stats.n_for_power; MAX_SEEDS where that distance is 0)."""
    out = []
    for claim in protocol_claims:
        method, baseline = (values_of(claim[k], runs, claim["metric"], times) for k in ("method", "baseline"))
        _, m, b = stats.paired_differences(method, baseline)
        d = m - b
        mean = float(d.mean()) if len(d) else math.nan
        sd = float(d.std(ddof=1)) if len(d) > 1 else math.nan
        distance, alternative = null_distance(claim, mean)
        if not sd > 0:
            n = 2
        elif claim["metric"] != "step_time":  # every other metric is an accuracy in points (metric_by_seed)
            n = stats.n_for_half_width(sd, half_width)
        else:
            n = stats.n_for_power(distance, sd, alternative=alternative) if distance else stats.MAX_SEEDS
        power = stats.paired_t_power(n, distance, sd, alternative=alternative) if sd > 0 else math.nan
        out.append({"id": claim["id"], "pilot_seeds": len(d), "effect": mean, "sd": sd, "n": n, "power": power})
    return out


def null_distance(claim: dict, mean: float) -> tuple[float, str]:
    """How far a mean paired difference lies from the claim's null, and its test's sidedness:
    superiority, two-sided against 0; non-inferiority, one-sided against the margin on the wrong
    side (mean + M for `greater`); equivalence (TOST), its nearer one-sided test, M - |mean|."""
    if claim["test"] == "non_inferiority":
        return (mean if claim["direction"] == "greater" else -mean) + claim["margin"], "one-sided"
    if claim["test"] == "equivalence":
        return claim["margin"] - abs(mean), "one-sided"
    return mean, "two-sided"


def protocol_table(name: str, table: dict) -> str:
    """A preset's table as the TOML block `[presets.<name>]` of the protocol file: its plain values,
    a section per base, one line per arm and per claim's n. What the pilot writes for a person to
    commit before the study's runs."""
    lines = [f"[presets.{name}]"]
    lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    for base, fields in table.get("bases", {}).items():
        lines += ["", f"[presets.{name}.bases.{toml_key(base)}]"]
        lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in fields.items()]
    for section in ("budget", "arms", "n"):
        if section in table:
            lines += ["", f"[presets.{name}.{section}]"]
            lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in table[section].items()]
    return "\n".join(lines) + "\n"


def toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not np.isfinite(value):
        return json.dumps(str(value))
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


# ---------------------------------------------------------------------- a preset's table from its settings


def preset_table(s: dict) -> dict:
    """The [presets.<name>] table of the claims study from a preset's few settings (the pilot's
    choices, or a GPU preset's paper settings): the seeds, the two bases (the GVR and SAM arms'
    training, Novack et al.'s equal-steps training), and every arm the claims name."""
    gvr_base = {
        "dataset": s["dataset"],
        "model": s["model"],
        "epochs": s["epochs"],
        "batch_size": s["batch_size"],
        "lr": s["lr"],
        "schedule": "cosine_epoch",
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "cutout": s["cutout"],
        "train_subset": s["train_subset"],
        "val_split": s["val_split"],
        "eval_every": s["eval_every"],
        "device": s["device"],
    }
    novack_base = {
        "dataset": s["dataset"],
        "model": s["novack_model"],
        "momentum": 0.0,
        "weight_decay": 0.0,
        "schedule": "constant",
        "lr": s["novack_lr"],
        "steps": s["steps"],
        "eval_every": s["steps"],
        "train_subset": s["novack_subset"],
        "augment": False,
        "eval_train": True,
        "log_every": s["log_every"],
        "device": s["device"],
    }
    gvr_args = {"target": s["gvr_target"], "penalty": "exact", "subset": s["gvr_subset"], "reduction": "sum"}
    # The two-view arms train at GVR's own rate where the pilot chose one: with reduction="sum", the
    # original's, their loss sums two views' losses, about twice the step SGD's rate was chosen for.
    two_view_lr = {"lr": s["gvr_lr"]} if "gvr_lr" in s else {}
    gvr = {"base": "gvr", "method": "gvr", **two_view_lr, "method_args": {**gvr_args, "alpha": s["alpha"]}}
    two_view = {"base": "gvr", "method": "gvr", **two_view_lr, "method_args": {**gvr_args, "alpha": 0.0}}
    noisy = {"label_noise": s["label_noise"]}
    gn = {"micro_batch_size": s["large_m"], "lam": s["lam"]["reg_loss"], "hvp": s["hvp"]}
    micro = {"micro_batch_size": s["sb_batch"]}
    lb = {"base": "novack", "batch_size": s["lb_batch"]}
    penalty = {f"LB+{short}": (method, s["lam"][method]) for short, method in PENALTIES.items()}
    arms = {
        "SGD": {"base": "gvr", "method": "sgd"},
        "SGD, 2x steps": {"base": "gvr", "method": "sgd", "epochs": 2 * s["epochs"]},
        "GVR": gvr,
        "two-view SGD": two_view,
        "SGD, noisy labels": {"base": "gvr", "method": "sgd", **noisy},
        "GVR, noisy labels": {**gvr, **noisy},
        "two-view SGD, noisy labels": {**two_view, **noisy},
        "SAM": {"base": "gvr", "method": "sam", "method_args": {"rho": s["rho"]}},
        "vSAM": {"base": "gvr", "method": "vsam", "method_args": {"rho": s["rho"], **s["vsam_args"]}},
        "SB": {"base": "novack", "method": "sgd", "batch_size": s["sb_batch"]},
        "LB": {**lb, "method": "pseudo_gd", "method_args": micro},
        **{
            name: {**lb, "method": method, "method_args": {**micro, "lam": lam, "hvp": s["hvp"]}}
            for name, (method, lam) in penalty.items()
        },
        "LB+GN large m": {**lb, "method": "reg_loss", "method_args": gn},
        "IterGraft": {**lb, "method": "iter_graft", "method_args": {**micro, "norm_source": "random_micro"}},
        "NGD": {**lb, "method": "ngd", "method_args": micro, "lr_from": "SB"},
        "ExterGraft": {**lb, "method": "exter_graft", "method_args": micro, "norms_from": "SB"},
    }
    return {
        "seeds": list(s["seeds"]),
        "alpha": s.get("significance", 0.05),
        "bases": {"gvr": gvr_base, "novack": novack_base},
        "arms": arms,
    }


PENALTIES = {"GN": "reg_loss", "FT": "fish_loss", "AJ": "avg_jac_loss", "UJ": "unit_jac_loss"}


# ---------------------------------------------------------------------- the pilot, end to end


def in_protocol(table: dict, preset: str = "pilot", claims: list | None = None) -> Protocol:
    """A preset table not (yet) in a protocol file, read as one: the pilot's."""
    return Protocol(Path("(pilot)"), preset, claims or [], table, "")


def run_pilot(
    settings: dict,
    seeds: list,
    candidates: dict,
    runs_root,
    claims_list: list,
    half_width: float = 1.0,
    budget_hours: float = 6.0,
    device_fields: dict | None = None,
    first_seed: int = 0,
) -> dict:
    """The pilot of the claims study, on `seeds` of its own (never the study's), each decision made
    on its own runs and stated in its tables:

    1. Novack et al.'s arms: SB at each (train_subset, steps) of candidates["novack"], evaluated on
       its clean training rows; the cheapest setting where SB reaches 99% on every pilot seed and
       the 95% lower prediction bound of a new seed is 99% too (fitting_setting, study_seeds_lowest).
    2. The budget: SGD (the other arms' baseline) at each epoch budget of candidates["budgets"]; the
       budget past which doubling stops paying (plateau_budget; the largest, said to be no plateau,
       when none is).
    3. Selection on validation (stats.select, on `settings`' validation split): SGD's learning rate
       among candidates["lr"], then at that rate SAM's rho among candidates["rho"]; vSAM takes SAM's
       rho. GVR's own rate among candidates["lr"] at `settings`' alpha, then at that rate its alpha
       among candidates["alpha"]; the two-view SGD arms take GVR's rate.
    4. Every arm at the chosen settings; per claim the SD of its paired differences and the n for a
       95% CI half-width of at most `half_width` (sample_sizes); the study's seeds: as many as the
       claims need and `budget_hours` allow (affordable_seeds), from the pilot arms' measured time per
       seed on this machine; a primary claim whose n does not fit is declared secondary. The study's seeds start
       at `first_seed`: a study registered after another starts past the seeds that one used, whose
       results have been seen. The arms train in a folder named by the chosen settings; runs of arms
       a changed choice left alone are carried over from the earlier folders (carry_over).

    Returns {"decisions": DataFrame, "sizes": DataFrame, "table": the preset table to register, "runs":
    the runs the decisions and sizes rest on (not those of earlier choices in the same runs root)}."""
    root, fields = Path(runs_root), dict(device_fields or {})
    base = preset_table({**settings, "seeds": seeds})
    pilot = in_protocol(base)
    decisions = []

    def grid(label: str, arm_fields: dict) -> list:
        return grid_configs({}, [{**arm_fields, **fields, "label": label}], seeds, root)

    searched = set()  # the labels of every candidate tried

    def finals(labels) -> pd.DataFrame:
        searched.update(labels)
        runs = load_runs_of(root, labels)
        return final_rows(runs)

    # 1. the smallest setting where SB fits its training set
    sb_labels = {f"SB {subset} images x {steps} steps": (subset, steps) for subset, steps in candidates["novack"]}
    configs = [
        c
        for label, (subset, steps) in sb_labels.items()
        for c in grid(label, {**pilot.arm("SB"), "train_subset": subset, "steps": steps, "eval_every": steps})
    ]
    train_configs(configs)
    sb = finals(sb_labels)
    fit = fitting_setting(sb, lowest=study_seeds_lowest)
    for label, (subset, steps) in sb_labels.items():
        acc = 100 * sb[sb["label"] == label]["train_eval_acc"]
        decisions.append(
            {
                "decision": "Novack setting",
                "candidate": label,
                "value": f"min train_eval_acc {acc.min():.1f}%, a new seed's 95% lower bound "
                f"{stats.lower_prediction_bound(acc):.1f}%",
                "chosen": fit == {"train_subset": subset, "steps": steps},
            }
        )
    if fit is None:
        raise UsageError(
            "no candidate Novack setting lets SB fit its training set (99% on every pilot seed and a "
            "new seed's 95% lower prediction bound): "
            "add smaller subsets or more steps"
        )
    settings = {**settings, "novack_subset": fit["train_subset"], "steps": fit["steps"]}

    # 2. the budget past which SGD's training stops paying
    def sgd_label(epochs, lr):
        return f"SGD {epochs} epochs lr {lr:g}"

    budget_labels = {sgd_label(e, settings["lr"]): e for e in candidates["budgets"]}
    train_configs([c for label, e in budget_labels.items() for c in grid(label, {**pilot.arm("SGD"), "epochs": e})])
    budgets = finals(budget_labels).assign(epochs=lambda f: f["label"].map(budget_labels))
    epochs, plateaued = plateau_budget(budgets)
    for e, rows in budgets.groupby("epochs"):
        value = f"train loss {rows['train_loss'].mean():.4f}, test acc {100 * rows['test_acc'].mean():.2f}%"
        if e == epochs and not plateaued:  # the study trains short of the plateau: the table says so
            value += "; no plateau among the budgets tried: the largest"
        decisions.append(
            {"decision": "epoch budget", "candidate": f"{e} epochs", "value": value, "chosen": e == epochs}
        )
    settings["epochs"] = epochs
    pilot = in_protocol(preset_table({**settings, "seeds": seeds}))

    # 3. learning rate, then rho and alpha, chosen on validation
    def choose(name: str, arm: str, key: str, values: list, shaped) -> float:
        labels = {shaped(v): v for v in values}
        train_configs([c for label, v in labels.items() for c in grid(label, with_value(pilot.arm(arm), key, v))])
        searched.update(labels)
        chosen = stats.select(load_runs_of(root, labels), per=None)
        pick = labels[chosen["label"].iloc[0]]
        for label, score in chosen["candidates"].iloc[0].items():
            decisions.append(
                {
                    "decision": name,
                    "candidate": label,
                    "value": f"validation acc {100 * score:.2f}%",
                    "chosen": labels[label] == pick,
                }
            )
        return pick

    settings["lr"] = choose("learning rate", "SGD", "lr", candidates["lr"], lambda v: sgd_label(epochs, v))
    pilot = in_protocol(preset_table({**settings, "seeds": seeds}))
    settings["rho"] = choose("SAM's rho", "SAM", "rho", candidates["rho"], lambda v: f"SAM rho {v:g}")

    def gvr_label(lr, alpha):  # one label per setting: the alpha search reuses the rate search's runs
        return f"GVR lr {lr:g} alpha {alpha:g}"

    alpha = settings["alpha"]
    settings["gvr_lr"] = choose("GVR's learning rate", "GVR", "lr", candidates["lr"], lambda v: gvr_label(v, alpha))
    pilot = in_protocol(preset_table({**settings, "seeds": seeds}))
    lr = settings["gvr_lr"]
    settings["alpha"] = choose("GVR's alpha", "GVR", "alpha", candidates["alpha"], lambda v: gvr_label(lr, v))

    # 4. every arm at the chosen settings, sized
    table = preset_table({**settings, "seeds": seeds})
    arms = in_protocol(table, claims=claims_list)
    arms_root = root / f"arms-{digest(table)}"
    earlier = sorted(p for p in root.glob("arms*") if p != arms_root)
    train_configs(carry_over(arm_configs(arms, arms_root, overrides=fields), earlier))
    derived = derived_fields(arms, load_runs_of(arms_root, steps=True))
    train_configs(carry_over(arm_configs(arms, arms_root, derived, overrides=fields), earlier))
    runs = load_runs_of(arms_root)
    times = step_times(arms, device=fields.get("device", "cpu"))
    sizes = pd.DataFrame(sample_sizes(claims_list, runs, half_width, times))
    per_seed = seconds_per_seed(arms_root)
    affordable = affordable_seeds(per_seed, budget_hours)
    sizes = study_sizes(sizes, {c["id"]: c["family"] for c in claims_list}, affordable)
    n_study = int(sizes["n"].iloc[0])
    study_seeds = list(range(first_seed, first_seed + n_study))
    if set(study_seeds) & set(seeds):
        raise UsageError(f"the study's seeds {study_seeds} would include pilot seeds {seeds}: start them elsewhere")
    study = preset_table({**settings, "seeds": study_seeds})
    study["n"] = {
        row.id: {
            "n": int(row.n),
            "family": row.family,
            "n_needed": int(row.n_needed),
            "pilot_seeds": int(row.pilot_seeds),
            "pilot_effect": round(float(row.effect), 4),
            "pilot_sd": round(float(row.sd), 4),
            "power_at_pilot_effect": round(float(row.power), 3),
        }
        for row in sizes.itertuples()
    }
    study["budget"] = {
        "hours": budget_hours,
        "reserve": BUDGET_RESERVE,
        "seconds_per_seed": round(per_seed, 1),
        "affordable_seeds": affordable,
    }
    rested_on = pd.concat([load_runs_of(root, searched), runs], ignore_index=True)
    return {"decisions": pd.DataFrame(decisions), "sizes": sizes, "table": study, "runs": rested_on}


def carry_over(configs: list, earlier: list) -> list:
    """`configs`, after copying into place each run that a folder of `earlier` already holds finished
    (holds_finished_run): a pilot whose choices changed trains only the arms they changed. Each copy
    is made beside its target and renamed into place, its config.json's out_dir pointed at it; the
    copies are named in one line."""
    copied = []
    for config in configs:
        target = Path(config.out_dir)
        for folder in [] if target.exists() else earlier:
            source = folder / target.name
            try:
                same = holds_finished_run(source, config)
            except UsageError:  # another run of that name: not this one's to carry over
                same = False
            if same:
                target.parent.mkdir(parents=True, exist_ok=True)
                work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
                shutil.copytree(source, work, dirs_exist_ok=True)
                write_json(work / CONFIG, {**read_json(work / CONFIG), "out_dir": str(target)})
                os.replace(work, target)
                copied.append(f"{folder.name}/{target.name}")
                break
    if copied:
        print(f"carried over {len(copied)} finished runs of unchanged arms: {', '.join(copied)}")
    return configs


# The share of the study's wall-time budget kept for what is not its runs' training: cores idle
# while the pool's last runs finish, NGD and ExterGraft waiting for SB, the step-time measurement,
# the kernel and the figures. The first registered study planned its seeds at 99.7% of its budget.
BUDGET_RESERVE = 0.1


def affordable_seeds(seconds_per_seed: float, budget_hours: float) -> int:
    """How many seeds of every arm fit `budget_hours` less its reserve, at least 2 (a paired test
    needs two)."""
    return max(2, int(budget_hours * 3600 * (1 - BUDGET_RESERVE) / seconds_per_seed))


def study_sizes(sizes: pd.DataFrame, families: dict, affordable: int) -> pd.DataFrame:
    """The study's seeds from the pilot's sizes (sample_sizes, its n renamed n_needed): a primary claim
    needing more seeds than the budget affords is declared secondary; every claim gets every seed of
    the study, as many as its claims need, within the budget. The secondary claims count too, so a
    study whose primaries need few seeds still spends its budget on the others, demoted ones included."""
    sizes = sizes.rename(columns={"n": "n_needed"})
    sizes["family"] = [
        "secondary" if families[i] == "primary" and n > affordable else families[i]
        for i, n in zip(sizes["id"], sizes["n_needed"])
    ]
    sizes["n"] = min(affordable, int(sizes["n_needed"].max()))
    return sizes


def with_value(fields: dict, key: str, value) -> dict:
    """An arm's fields with one hyper-parameter set: lr is a Config field, rho and alpha method_args."""
    if key == "lr":
        return {**fields, "lr": value}
    return {**fields, "method_args": {**fields.get("method_args", {}), key: value}}


def load_runs_of(root, labels=None, steps: bool = False) -> pd.DataFrame:
    runs = load_runs(f"{root}/*", steps=steps)
    return runs if labels is None else runs[runs["label"].isin(list(labels))]


def seconds_per_seed(root) -> float:
    """The summed training time of one seed's runs of every arm, averaged over the pilot seeds,
    divided by the runs this machine trains at once (the processes executor's pool, as --workers
    sizes it)."""
    summaries = [(read_json(p.parent / "config.json"), read_json(p)) for p in Path(root).glob("*/summary.json")]
    per_seed = pd.DataFrame([{"seed": c["seed"], "s": s["wall_time_s"]} for c, s in summaries]).groupby("seed")["s"]
    configs = [Config.from_dict({**c, "out_dir": "", "progress": False}) for c, _ in summaries[:1]]
    return float(per_seed.sum().mean()) / pool_size(0, default_workers(configs))


# ---------------------------------------------------------------------- tables and figures


def claims_table(assessed: list, paper: dict) -> pd.DataFrame:
    """claims.md: one row per claim, in the protocol's order: its family and test, the paper's
    number beside ours (the arms' means), the mean paired difference with its interval, the test's
    p and the p its verdict reads (Holm's for a primary claim), d_z, the Wilcoxon p, n, and the
    verdict (with the premise, where one failed)."""
    rows = []
    for a in assessed:
        digits = 3 if a.metric == "step_time" else 2
        rows.append(
            {
                "claim": a.statement,
                "family": a.family,
                "test": a.test + (f" (margin {a.margin:g})" if a.margin else ""),
                "paper": paper.get(a.id, ""),
                "ours": f"{a.method_mean:.{digits}f} vs {a.baseline_mean:.{digits}f}",
                "difference": difference_cell(vars(a)),
                "95% CI half-width": half_width_cell(vars(a)),
                "p": f"{a.p_value:.2g}",
                "p read": f"{a.p_adjusted:.2g}",
                "d_z": f"{a.d_z:.2f}",
                "Wilcoxon p": f"{a.wilcoxon_p:.2g}",
                "n": a.n,
                "verdict": verdict_cell(vars(a)),
            }
        )
    return pd.DataFrame(rows)


def difference_cell(record: dict) -> str:
    """A claim's mean paired difference with its interval and the interval's level."""
    digits = 3 if record["metric"] == "step_time" else 2
    low, high = record["ci_low"], record["ci_high"]
    ci = "no interval" if math.isnan(low) else f"[{low:.{digits}f}, {high:.{digits}f}]"
    return f"{record['diff_mean']:+.{digits}f} {ci} ({100 * record['ci_level']:.0f}%)"


def half_width_cell(record: dict) -> str:
    """The half-width of a claim's 95% CI in points, whatever the level of the interval its test
    reads (a margin test's is 90%): the precision an accuracy claim's n was sized for. A step-time
    ratio's was not sized in points."""
    if record["metric"] == "step_time":
        return "(a ratio)"
    half = stats.half_width_at(0.95, record["ci_low"], record["ci_high"], record["ci_level"], record["n"])
    return "no interval" if math.isnan(half) else f"{half:.2f}"


def verdict_cell(record: dict) -> str:
    """A claim's verdict, with its premise and its own verdict where the premise failed."""
    if record["verdict"] == record["own_verdict"]:
        return record["verdict"]
    return f"{record['verdict']} (premise {record['premise']}; alone: {record['own_verdict']})"


def committed_studies(figures) -> list[Path]:
    """Every claims study's claims.json under `figures`/claims: the current one and those archived
    in its subfolders."""
    return sorted((Path(figures) / "claims").glob("**/claims.json"))


def verdicts_table(records: list[dict]) -> str:
    """README's table of a study's verdicts, from its claims.json (claims_records): what `gvr-lab docs`
    writes there, so the verdicts README states are the study's own. Its header names the protocol
    (the first 12 digits of its SHA-256), one table per study. The p read is Holm's for a primary
    claim, the claim's own for a secondary one."""
    [sha] = {r["protocol_sha256"] for r in records}
    rows = [
        f"| claim (protocol {sha[:12]}) | family | paired difference [CI] (level) | 95% CI half-width | p read | n "
        "| verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        p_read = f"{r['p_adjusted']:.2g}"
        cells = [r["statement"], r["family"], difference_cell(r), half_width_cell(r), p_read, str(r["n"])]
        cells.append(verdict_cell(r))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


UNITS = {
    "test_acc": "test accuracy difference (points), method - baseline",
    "train_eval_acc": "training accuracy difference (points), method - baseline",
    "train_acc": "training accuracy difference (points), method - baseline",
    "step_time": "step time ratio - its bound",
}


def panels(assessed: list) -> dict:
    """The claims grouped by what their differences measure, for plots.forest and seed_strip."""
    out: dict[str, list] = {}
    for a in assessed:
        out.setdefault(UNITS[a.metric], []).append(a)
    return out
