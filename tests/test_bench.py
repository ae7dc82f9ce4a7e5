"""The benchmark harness at smoke size (no timing assertions: speed lives in BENCHMARKS.md)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from gvr_lab import claims
from gvr_lab.bench import (
    DATA_LABEL,
    HVP_LABEL,
    block_markers,
    format_table,
    markdown_report,
    run_bench,
    verdicts,
    write_markdown_block,
)
from gvr_lab.cli import main
from gvr_lab.grid_bench import grid_markdown, unfinished_note
from gvr_lab.methods.base import TWO_VIEW_SGD

from helpers import BENCH_SMOKE, proc_stat_line


def test_bench_reports_every_method_against_sgd_in_one_process(tmp_path, capsys):
    out = tmp_path / "bench.json"
    methods = [
        "sam",
        "looksam:k=2",
        "saf",
        "vsam:window=2,blocks=1,warmup_epochs=0",
        "gvr:penalty=closed_form,target=fc",
        "reg_loss:hvp=fd",
    ]
    assert main([*BENCH_SMOKE, "--methods", *methods, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["label"].split(":")[0]: r for r in report["results"]}
    # sgd added first; gvr's reference (sgd on its 2B images) after the methods; the loader alone
    # last, its ratio the data share of an sgd step
    assert list(rows) == ["sgd", "sam", "looksam", "saf", "vsam", "gvr", "reg_loss", TWO_VIEW_SGD, DATA_LABEL]
    for r in report["results"]:
        assert r["ms_per_step"] > 0 and r["ms_min"] <= r["ms_per_step"]
        assert r["images_per_s"] == pytest.approx(1000 * 16 / r["ms_per_step"])
        assert r["ratio_to_sgd"] == pytest.approx(r["ms_per_step"] / rows["sgd"]["ms_per_step"])
    # two-pass fractions: looksam refreshes every k = 2 steps; vsam reports what it sampled
    assert rows["looksam"]["sampled_fraction"] == pytest.approx(0.5)
    assert 0 <= rows["vsam"]["sampled_fraction"] <= 1 and rows["sam"]["sampled_fraction"] is None
    # each of the 2 rounds' time and two-pass fraction (of its 2 steps), their mean the row's
    assert rows["looksam"]["round_sampled"] == [0.5, 0.5] and rows["sam"]["round_sampled"] is None
    assert np.mean(rows["vsam"]["round_sampled"]) == pytest.approx(rows["vsam"]["sampled_fraction"])
    assert np.median(rows["vsam"]["round_ms"]) == pytest.approx(rows["vsam"]["ms_per_step"])
    assert rows["reg_loss"]["label"] == "reg_loss:hvp=fd,micro_batch_size=16"  # micro-batch fitted to the batch
    assert report["setup"]["device"] == "cpu" and report["setup"]["batch_size"] == 16
    table = capsys.readouterr().out
    assert table.splitlines()[0].startswith("# tiny_cnn 1x28 batch 16 on cpu") and "| looksam:k=2 |" in table


def test_ratios_are_to_sgd_wherever_it_is_listed():
    report = run_bench("tiny_cnn", (1, 28), 10, 8, [("sam", {}), ("sgd", {})], steps=1, warmup=1, rounds=2)
    rows = {r["label"]: r for r in report["results"]}
    assert list(rows)[:2] == ["sam", "sgd"]
    assert rows["sgd"]["ratio_to_sgd"] == 1.0  # divided by the first row (sam), it was not
    assert rows["sam"]["ratio_to_sgd"] == rows["sam"]["ms_per_step"] / rows["sgd"]["ms_per_step"]


def test_bench_keeps_an_explicit_sgd_spec_and_formats_rows():
    report = run_bench("tiny_cnn", (3, 32), 10, 8, [("sgd", {}), ("sam", {})], steps=1, warmup=1, rounds=1)
    assert [r["label"] for r in report["results"]] == ["sgd", "sam", DATA_LABEL]
    assert format_table(report).count("\n") == 5  # title, header, rule, three rows


def test_bench_profile_counts_the_passes_of_each_method():
    report = run_bench("tiny_cnn", (1, 28), 10, 8, [("sam", {})], steps=2, warmup=1, rounds=1, profile=True)
    assert sorted(report["profiles"]) == ["sam", "sgd"]
    conv_backward = [line for line in report["profiles"]["sam"].splitlines() if "convolution_backward" in line]
    assert conv_backward and conv_backward[0].split()[-1] == "8"  # 2 steps x 2 passes x 2 conv layers
    assert "## profile: sam (2 steps)" in format_table(report)


# ---------------------------------------------------------------------- BENCHMARKS.md, written by the tool

REPO = Path(__file__).parent.parent


def synthetic_report(rows: dict, device="cpu") -> dict:
    """A bench report with these (label -> (median ms, min ms, sampled fraction)) rows."""
    setup = {
        "model": "small_cnn",
        "shape": "1x28",
        "batch_size": 128,
        "device": device,
        "device_name": "x",
        "threads": 2,
        "precision": "fp32",
        "compile": False,
        "steps": 4,
        "warmup": 2,
        "rounds": 9,
        "torch": "2",
        "python": "3",
    }
    sgd = rows["sgd"][0]
    results = [
        {
            "label": label,
            "ms_per_step": ms,
            "ms_min": least,
            "images_per_s": 1.0,
            "s_per_epoch": 1.0,
            "ratio_to_sgd": ms / sgd,
            "peak_mem_mb": float("nan"),
            "sampled_fraction": p,
        }
        for label, (ms, least, p) in rows.items()
    ]
    return {"setup": setup, "results": results, "profiles": {}}


def test_verdicts_compare_each_method_with_its_reference_and_bound():
    report = synthetic_report(
        {
            "sgd": (10.0, 9.0, None),
            "sam": (20.0, 18.0, None),  # 2.00 <= 2.05: met
            "vsam:window=5": (13.0, 9.5, 0.2),  # bound 1 + p + 0.05 = 1.25: 1.30 median, 1.06 min
            "looksam": (13.5, 12.5, 0.2),  # bound 1 + 1/5 = 1.2: 1.35 median, 1.39 min, beyond 1.1 x 1.2
            "pseudo_gd:micro_batch_size=32": (10.0, 10.0, None),
            "reg_loss:micro_batch_size=32": (40.0, 40.0, None),  # exact by default: 4.0 > 3.5, not met
            "reg_loss:micro_batch_size=32,hvp=fd": (22.0, 22.0, None),  # 2.2 <= 2.31: within 10%
            DATA_LABEL: (0.2, 0.1, None),
        }
    )
    got = {what: (measured, verdict) for what, measured, verdict in verdicts(report)}
    assert got["sam <= 2.05x sgd"] == ("2.00 / 2.00 (bound 2.05)", "met")
    assert got["vsam <= 1 + p + 0.05"][1] == "met by the minimum, not by the median"
    assert got["looksam ~ 1 + 1/k"] == ("1.35 / 1.39 (bound 1.20)", "not met")
    assert got["reg_loss exact <= 3.5x pseudo_gd"][1] == "not met"
    assert got["reg_loss fd <= 2.1x pseudo_gd"][1] == "met within 10% (a CPU)"
    assert got["data < 5% of an sgd step"][1] == "met"
    assert "fish_loss fd <= 2.1x pseudo_gd" not in got  # not measured: no verdict
    gpu = {w: v for w, _, v in verdicts({**report, "setup": {**report["setup"], "device": "cuda"}})}
    assert gpu["reg_loss fd <= 2.1x pseudo_gd"] == "not met"  # no CPU slack on a GPU


def test_the_block_of_a_json_replaces_its_old_block_and_keeps_the_rest(tmp_path):
    source = tmp_path / "b.json"
    source.write_text(json.dumps(synthetic_report({"sgd": (10.0, 9.0, None), "sam": (20.0, 18.0, None)})))
    md = tmp_path / "B.md"
    md.write_text("intro\n")
    write_markdown_block(str(md), str(source))
    first = md.read_text()
    assert first.startswith("intro\n\n<!-- written by gvr-lab bench from") and "| sam | 20.0 |" in first
    md.write_text(first.replace("| sam | 20.0 |", "| sam | 1.0 |") + "\noutro\n")  # a hand edit, and more text
    write_markdown_block(str(md), str(source))
    assert md.read_text() == first + "\noutro\n"


def test_benchmarks_md_holds_what_its_jsons_say():
    text = (REPO / "BENCHMARKS.md").read_text()
    blocks = re.findall(r"<!-- written by (gvr-lab bench(?:-grid)?) from (\S+); do not edit by hand -->", text)
    # written by the tools, not by hand: the per-step benchmark and the claims study's grid
    assert {
        ("gvr-lab bench", "benchmarks/cpu-small_cnn.json"),
        ("gvr-lab bench-grid", "benchmarks/cpu-grid-claims.json"),
    } <= set(blocks)
    assert {tool for tool, _ in blocks} <= {"gvr-lab bench", "gvr-lab bench-grid"}
    render = {"gvr-lab bench": markdown_report, "gvr-lab bench-grid": grid_markdown}
    for tool, source in blocks:
        begin, end = block_markers(source, tool)
        written = text.partition(begin)[2].partition(end)[0].strip("\n")
        report = json.loads((REPO / source).read_text())
        assert written == render[tool](report, source), f"{source}: rerun the command in its block"


def test_bench_times_one_hessian_vector_product_against_an_sgd_step(tmp_path):
    report = run_bench("tiny_cnn", (1, 28), 10, 8, [("sgd", {})], steps=1, warmup=1, rounds=1, hvp=True)
    labels = [r["label"] for r in report["results"]]
    assert labels == ["sgd", HVP_LABEL, DATA_LABEL]
    assert [what for what, _, _ in verdicts(report)] == [
        "data < 5% of an sgd step",
        "one Hessian-vector product ~ 2x an sgd step",
    ]
    source = tmp_path / "b.json"
    source.write_text(json.dumps(report))
    assert " --hvp --json " in markdown_report(report, str(source))  # the command in the block reruns it


@pytest.mark.slow
def test_bench_grid_trains_the_study_grid_both_ways_and_says_how_each_run_ended(tmp_path):
    out = tmp_path / "grid.json"
    md = tmp_path / "B.md"
    md.write_text("")
    assert main(["bench-grid", "--preset", "smoke", "--seeds", "1", "--json", str(out), "--into", str(md)]) == 0
    report = json.loads(out.read_text())
    setup = report["setup"]
    registered = claims.load_protocol(claims.DEFAULT_PROTOCOL, "smoke").table["arms"]
    arms = set(registered) - {"NGD", "ExterGraft"}  # they read SB's runs
    assert setup["arms"] == sorted(arms) and setup["runs"] == len(arms)
    for way in ("old", "defaults"):  # every run of the grid, once each way, in two blocks
        assert sorted(r["run"] for r in report["runs"][way]) == sorted(f"{a} s0" for a in arms)
        assert {r["status"] for r in report["runs"][way]} <= {"completed", "diverged"}
        assert len(report["blocks_s"][way]) == 2
        assert all(0.0 <= share <= 1.0 for share in report["blocks_stolen_share"][way])  # Linux reports it
        assert report["runs_per_hour"][way] == pytest.approx(3600 * len(arms) / sum(report["blocks_s"][way]))
    assert report["speedup"] == pytest.approx(report["runs_per_hour"]["defaults"] / report["runs_per_hour"]["old"])
    assert grid_markdown(report, str(out)) in md.read_text()


def test_the_grid_benchmark_says_how_much_cpu_time_the_host_took_in_each_block(tmp_path, monkeypatch):
    import os

    from gvr_lab import grid_bench, pools

    hz = os.sysconf("SC_CLK_TCK")
    stat = tmp_path / "stat"

    def ticks(busy, steal):
        stat.write_text(proc_stat_line(user=busy * hz, idle=0, steal=steal * hz))

    ticks(100, 10)
    monkeypatch.setattr(pools, "PROC_STAT", str(stat))
    monkeypatch.setattr(grid_bench, "train_configs", lambda configs, executor: ticks(250, 60))
    wall, share = grid_bench.timed_block([], "processes")
    assert share == pytest.approx(50 / 200) and wall >= 0  # 200 s of CPU time more, 50 of them stolen
    monkeypatch.setattr(pools, "PROC_STAT", str(tmp_path / "missing"))
    assert grid_bench.timed_block([], "processes")[1] is None
    note = grid_bench.steal_note({"blocks_stolen_share": {"old": [0.25, None], "defaults": [0.031, 0.0]}})
    assert note == (
        "The host's share of the machine's CPU time, block by block: "
        "the old way 25%, not reported; the defaults 3%, 0%."
    )
    assert "was not recorded" in grid_bench.steal_note({})  # a report from before it was


def test_the_grid_benchmark_names_each_way_s_runs_that_did_not_complete():
    ended = {
        "old": [{"run": "SGD s0", "status": "completed"}, {"run": "GVR s0", "status": "diverged", "diverged_step": 49}],
        "defaults": [{"run": "SGD s0", "status": "completed"}, {"run": "GVR s0", "status": "completed"}],
    }
    assert unfinished_note(ended).startswith(
        "Runs that did not complete (the old way: GVR s0 (diverged at step 49); the defaults: none)"
    )
