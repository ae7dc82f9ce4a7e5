"""The benchmark harness at smoke size (no timing assertions: speed lives in BENCHMARKS.md)."""

import json

import pytest

from gvr_lab.bench import DATA_LABEL, TWO_VIEW_SGD_LABEL, format_table, run_bench
from gvr_lab.cli import main

SMOKE = ["bench", "--model", "tiny_cnn", "--shape", "1x28", "--batch-size", "16", "--steps", "2", "--warmup", "1",
         "--rounds", "2", "--device", "cpu"]


def test_bench_reports_every_method_against_sgd_in_one_process(tmp_path, capsys):
    out = tmp_path / "bench.json"
    methods = ["sam", "looksam:k=2", "saf", "vsam:window=2,blocks=1,warmup_epochs=0", "gvr:penalty=closed_form,target=fc",
               "reg_loss:hvp=fd"]
    assert main([*SMOKE, "--methods", *methods, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["label"].split(":")[0]: r for r in report["results"]}
    # sgd added first; gvr's reference (sgd on its 2B images) after the methods; the loader alone
    # last, its ratio the data share of an sgd step
    assert list(rows) == ["sgd", "sam", "looksam", "saf", "vsam", "gvr", "reg_loss", TWO_VIEW_SGD_LABEL, DATA_LABEL]
    for r in report["results"]:
        assert r["ms_per_step"] > 0 and r["ms_min"] <= r["ms_per_step"]
        assert r["images_per_s"] == pytest.approx(1000 * 16 / r["ms_per_step"])
        assert r["ratio_to_sgd"] == pytest.approx(r["ms_per_step"] / rows["sgd"]["ms_per_step"])
    # two-pass fractions: looksam refreshes every k = 2 steps; vsam reports what it sampled
    assert rows["looksam"]["sampled_fraction"] == pytest.approx(0.5)
    assert 0 <= rows["vsam"]["sampled_fraction"] <= 1 and rows["sam"]["sampled_fraction"] is None
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
