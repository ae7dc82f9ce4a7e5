"""Data parallelism through the real loop: every registered method on 2 gloo ranks (torchrun on
the CPU), with augmentation on (crop, flip, Cutout).

* Every rank holds the same model after training (gathered from the ranks and compared bit for bit).
* Where the README claims it, 2 ranks x B/2 compute what one process does with the batch B: same
  weights (to the rounding of a different summation order), same logged step metrics (losses are
  the global batch's, update norms those of the all-reduced gradient).
* State that the ranks must share (SAF's merged memory, MESA's teacher, the synced variants'
  directions) is the same on every rank; per-rank state (LookSAM's and vSAM's directions without
  sync_ascent) survives a stop and resume, each rank getting its own back.
* Each rank draws its own dropout masks, and a run stopped inside an epoch resumes every rank's
  random stream.

All runs of the 2-rank side go through one torchrun launch (tests/ddp_worker.py), the
one-process side through gvr_lab.train in this process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from gvr_lab import Config, list_methods, train
from gvr_lab.results import load_checkpoint

from helpers import TINY_RUN, UPDATE_NORM

# One worker runs this module: its fixture launches the 2-rank runs once for all the tests below.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("data_parallel")]

# BN-free (BN normalizes with per-rank statistics) and smooth: on ReLU / max-pool nets fd penalties
# cross kinks, so two summation orders can route a gradient differently, which is not rounding.
BASE = dict(TINY_RUN, model_args={"smooth": True}, epochs=3, cutout=0.5, log_every=2)
MICRO = {"micro_batch_size": 16}
SB_LOG = "<sb log>"  # exter_graft's norms_path: a one-process sgd run at batch 16, made by the fixture

# fp32 all-reduce sums in another order than one backward: weights agree to rounding.
ROUNDING = dict(rtol=1e-4, atol=1e-5)
# LookSAM's u = g_v / ||g_v|| rescales a small difference of nearly parallel gradients, which
# amplifies rounding (one process with 1 and with 2 threads differs by 4e-4).
LOOKSAM_ROUNDING = dict(rtol=0.0, atol=2e-3)

# (case, method, method_args on 2 ranks, method_args of the equivalent one-process run or None
# where no equivalence is claimed, and why)
CASES = [
    ("sgd", "sgd", {}, {}),
    ("pseudo_gd", "pseudo_gd", MICRO, MICRO),
    # micro-batch penalties are per micro-batch and averaged over all of them, on any rank
    ("reg_loss exact", "reg_loss", {**MICRO, "hvp": "exact"}, {**MICRO, "hvp": "exact"}),
    ("reg_loss fd", "reg_loss", {**MICRO, "hvp": "fd"}, {**MICRO, "hvp": "fd"}),
    ("avg_jac_loss", "avg_jac_loss", MICRO, MICRO),
    # FT's sampled labels and UJ's directions come from each rank's own random stream, so their
    # draws are not those of one process
    ("fish_loss", "fish_loss", MICRO, None),
    ("unit_jac_loss", "unit_jac_loss", MICRO, None),
    # grafting and NGD normalize the all-reduced g_B; iter_graft reads every rank's micro-batch norms
    ("iter_graft random_micro", "iter_graft", MICRO, MICRO),
    (
        "iter_graft mean_micro",
        "iter_graft",
        {**MICRO, "norm_source": "mean_micro"},
        {**MICRO, "norm_source": "mean_micro"},
    ),
    ("ngd", "ngd", MICRO, MICRO),
    ("exter_graft", "exter_graft", {**MICRO, "norms_path": SB_LOG}, {**MICRO, "norms_path": SB_LOG}),
    # GVR's penalty uses a subset of each rank's own rows
    ("gvr", "gvr", {"subset": 16}, None),
    # per-rank ascent is m-sharpness with m = the local batch; sync_ascent is the whole batch's SAM
    ("sam per rank", "sam", {}, {"m": 32}),
    ("sam sync_ascent", "sam", {"sync_ascent": True}, {}),
    ("asam per rank", "asam", {}, {"m": 32}),
    ("asam sync_ascent", "asam", {"sync_ascent": True}, {}),
    ("looksam per rank", "looksam", {"k": 3}, None),
    ("looksam sync_ascent", "looksam", {"k": 3, "sync_ascent": True}, {"k": 3}),
    ("esam per rank", "esam", {}, None),
    ("esam sync_ascent", "esam", {"gamma": 1.0, "sync_ascent": True}, {"gamma": 1.0}),
    ("vsam per rank", "vsam", {"window": 4, "blocks": 2, "warmup_epochs": 1}, None),
    (
        "vsam sync_ascent",
        "vsam",
        {"window": 4, "blocks": 2, "warmup_epochs": 1, "sync_ascent": True},
        {"window": 4, "blocks": 2, "warmup_epochs": 1},
    ),
    # SAF's memory is merged across ranks, so every sample finds its past on whichever rank it lands
    ("saf", "saf", {"kl_start_epoch": 0, "lag": 1}, {"kl_start_epoch": 0, "lag": 1}),
    ("mesa", "mesa", {"kl_start_epoch": 0}, {"kl_start_epoch": 0}),
]
EQUIVALENT = [c for c in CASES if c[3] is not None]
# Method state that every rank must hold alike (LookSAM's and vSAM's is per rank without sync_ascent).
SHARED_STATE = ["looksam sync_ascent", "vsam sync_ascent", "saf", "mesa", "mesa bn"]
# Per-rank state, stopped after 2 of 4 epochs and resumed on 2 ranks: (case, method, args, model_args)
RESUMED = [
    ("looksam per rank", "looksam", {"k": 3}, {}),
    ("vsam per rank", "vsam", {"window": 4, "blocks": 2, "warmup_epochs": 1}, {}),
    ("mesa bn", "mesa", {"kl_start_epoch": 0}, {"bn": True}),
]
# Dropout on 2 ranks in steps mode, stopped inside an epoch (at step 10, 8 steps per epoch) and resumed.
DROPOUT = dict(
    {k: v for k, v in BASE.items() if k != "epochs"},
    method="sgd",
    model_args={**BASE["model_args"], "dropout": 0.5},
    steps=20,
    eval_every=5,
)


def test_the_cases_cover_every_registered_method():
    assert {c[1] for c in CASES} == set(list_methods())


def resolve(args, sb_log):
    return {k: sb_log if v == SB_LOG else v for k, v in args.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{case: [rank 0's, rank 1's {"model", "method"} states]}, the 2-rank run directories, and the
    one-process runs of the equivalent cases."""
    root = tmp_path_factory.mktemp("dp")
    sb = train(Config(**{**BASE, "batch_size": 16, "epochs": 3}, method="sgd", out_dir=str(root / "sb")))
    cases = []
    for case, method, args, _ in CASES:
        cases.append(
            {
                "id": case,
                "runs": [
                    dict(
                        BASE,
                        method=method,
                        method_args=resolve(args, str(sb.run_dir)),
                        out_dir=str(root / "two" / case),
                    )
                ],
            }
        )
    for case, method, args, model_args in RESUMED:
        fields = dict(BASE, epochs=4, method=method, method_args=args, model_args={**BASE["model_args"], **model_args})
        cases.append({"id": f"{case} uninterrupted", "runs": [dict(fields, out_dir=str(root / "full" / case))]})
        cases.append(
            {
                "id": f"{case} resumed",
                "runs": [
                    dict(fields, out_dir=str(root / "resumed" / case), stop_after=2),
                    dict(fields, out_dir=str(root / "resumed" / case)),
                ],
            }
        )
    cases.append({"id": "dropout uninterrupted", "runs": [dict(DROPOUT, out_dir=str(root / "full" / "dropout"))]})
    resumed = dict(DROPOUT, out_dir=str(root / "resumed" / "dropout"))
    cases.append({"id": "dropout resumed", "runs": [dict(resumed, stop_after=2), resumed]})
    (root / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "GVR_LAB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    worker = Path(__file__).with_name("ddp_worker.py")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(worker),
            str(root / "cases.json"),
            str(root / "ranks.pt"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = torch.load(root / "ranks.pt", weights_only=False)
    one = {
        case: train(
            Config(**BASE, method=method, method_args=resolve(args, str(sb.run_dir)), out_dir=str(root / "one" / case))
        )
        for case, method, _, args in EQUIVALENT
    }
    return ranks, root, one


def assert_states_equal(a, b):
    flat_a, spec_a = torch.utils._pytree.tree_flatten(a)
    flat_b, spec_b = torch.utils._pytree.tree_flatten(b)
    assert spec_a == spec_b
    for x, y in zip(flat_a, flat_b):
        assert torch.equal(x, y) if torch.is_tensor(x) else x == y


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_every_rank_holds_the_same_model(runs, case):
    rank0, rank1 = runs[0][case]
    assert_states_equal(rank0["model"], rank1["model"])
    summary = json.loads((runs[1] / "two" / case / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2


@pytest.mark.parametrize("case", SHARED_STATE)
def test_shared_method_state_is_the_same_on_every_rank(runs, case):
    rank0, rank1 = runs[0][case if case in runs[0] else f"{case} uninterrupted"]
    assert_states_equal(rank0["method"], rank1["method"])


@pytest.mark.parametrize("case, method, two_args, one_args", EQUIVALENT, ids=[c[0] for c in EQUIVALENT])
def test_two_ranks_compute_what_one_process_does_with_the_whole_batch(runs, case, method, two_args, one_args):
    ranks, root, one = runs
    tol = LOOKSAM_ROUNDING if method == "looksam" else ROUNDING
    weights = load_checkpoint(root / "two" / case / "checkpoint.pt")["model"]
    for k, v in load_checkpoint(one[case].run_dir / "checkpoint.pt")["model"].items():
        torch.testing.assert_close(weights[k], v, **tol)
    # The logged step metrics are the global batch's: losses averaged over ranks, update norms of
    # the all-reduced gradient (rank 0's local grad_norm was 15% off for sgd).
    two_steps = pd.read_parquet(root / "two" / case / "steps.parquet")
    one_steps = one[case].steps
    assert two_steps["step"].tolist() == one_steps["step"].tolist()
    columns = ["loss", "acc"] + [c for c in [UPDATE_NORM.get(method, "grad_norm")] if c]
    for col in columns:
        torch.testing.assert_close(
            torch.tensor(two_steps[col].values),
            torch.tensor(one_steps[col].values),
            rtol=max(tol.values()),
            atol=max(tol.values()),
            msg=col,
        )
    if method == "saf":  # the term ran in the last epoch, with a past for every row on both ranks
        history = pd.read_parquet(root / "two" / case / "epochs.parquet")
        assert history["train_past_frac"].iloc[-1] == 1.0 and history["train_penalty"].iloc[-1] > 0
    if method == "vsam":  # both kinds of step happened after the warm-up
        history = pd.read_parquet(root / "two" / case / "epochs.parquet")
        assert 0 < history["train_sampled"].iloc[-1] < 1


@pytest.mark.parametrize("case", [c[0] for c in RESUMED])
def test_per_rank_method_state_resumes_on_its_own_rank(runs, case):
    """Stopped after 2 of 4 epochs and resumed on 2 ranks, a run ends as the uninterrupted one:
    each rank gets its own LookSAM direction, vSAM PSF and windows back (rank 0's for everyone
    moved the weights by 5e-2 to 8e-2 after 6 steps)."""
    ranks = runs[0]
    uninterrupted, resumed = ranks[f"{case} uninterrupted"], ranks[f"{case} resumed"]
    for rank in range(2):
        assert_states_equal(resumed[rank]["model"], uninterrupted[rank]["model"])
        assert_states_equal(resumed[rank]["method"], uninterrupted[rank]["method"])
    per_rank = {"looksam per rank": "direction", "vsam per rank": "psf"}.get(case)
    if per_rank:  # which the ranks indeed hold differently
        first, second = (uninterrupted[rank]["method"][per_rank] for rank in range(2))
        assert not all(torch.equal(a, b) for a, b in zip(first, second))


def test_each_rank_draws_its_own_dropout_masks_and_resumes_its_own_stream(runs):
    """Dropout masks come from each rank's own stream (before: the same mask for row j of every
    rank's slice); stopped inside an epoch and resumed, every rank goes on with its own stream, so
    the run ends bit-identical to the uninterrupted one, on both ranks alike."""
    uninterrupted, resumed = runs[0]["dropout uninterrupted"], runs[0]["dropout resumed"]
    first, second = (uninterrupted[rank]["mask"] for rank in range(2))
    assert first.shape == second.shape == (32, 512) and 0.3 < first.float().mean() < 0.7
    assert not torch.equal(first, second)
    assert_states_equal(uninterrupted[0]["model"], uninterrupted[1]["model"])
    for rank in range(2):
        assert_states_equal(resumed[rank]["model"], uninterrupted[rank]["model"])
    final = load_checkpoint(runs[1] / "resumed" / "dropout" / "checkpoint.pt")  # at step 20, inside an epoch
    assert final["step"] == 20 and len(final["rng_ranks"]) == 2
