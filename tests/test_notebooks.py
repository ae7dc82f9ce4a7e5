"""The notebook suite: every notebook at the smoke preset, what each declares, the runner's rules,
presets and explicit values inside a real kernel, and what the study helpers refuse."""

import json
import sys

import pandas as pd
import pytest

from gvr_lab import claims, train_grid
from gvr_lab.cli import main
from gvr_lab.errors import UsageError
from gvr_lab.runner import NotebookFailed, notebook_table, record_timing, run_notebook
from gvr_lab.study import (
    COMMITTED_PRESET,
    PATH_PARAMETERS,
    REPO,
    Study,
    notebook_paths,
    outputs_at,
    parameters_of,
    read_notebook,
    resolve,
)

from helpers import check_claims_recompute, proc_stat_line

TINY = dict(dataset="synthetic", model="tiny_cnn", epochs=1, train_subset=256, batch_size=64, device="cpu")


@pytest.mark.slow
def test_figures_smoke_writes_what_each_notebook_declares(tmp_path):
    figs = tmp_path / "figures"
    assert main(["figures", "--preset", "smoke", "--out", str(figs), "--runs-root", str(tmp_path / "runs")]) == 0
    index = (figs / "README.md").read_text()
    groups = ({".png", ".pdf"}, {".md", ".tex"}, {".csv", ".json"}, {".json"}, {".toml"})
    for path in notebook_paths():
        decl = read_notebook(path)
        written = {p.stem for p in (figs / decl.name).iterdir()}
        assert written == set(outputs_at(decl, "smoke")), (path.name, written)  # all declared, nothing else
        for stem in outputs_at(decl, "smoke"):
            suffixes = {p.suffix for p in (figs / decl.name).glob(f"{stem}.*")}
            assert suffixes == set().union(*(g for g in groups if g <= suffixes)), (stem, suffixes)
        assert f"## {decl.name}" in index and f"From `notebooks/{path.name}`, preset `smoke`." in index
    assert "gvr-lab figures --preset smoke" in index and "Training: 3 runs" in index  # the quickstart's three
    # the claims study's results recompute from seeds.csv alone, under the committed smoke protocol
    records = json.loads((figs / "claims" / "claims.json").read_text())
    seeds = pd.read_csv(figs / "claims" / "seeds.csv")
    assert list(seeds.columns) == ["claim_id", "arm", "role", "seed", "metric", "value"]
    protocol = claims.load_protocol(REPO / "notebooks" / "claims_protocol.toml", "smoke")
    assert all(set(claims.CLAIMS_JSON_FIELDS) <= set(record) for record in records)
    check_claims_recompute(records, seeds, protocol)


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.name)
def test_each_notebook_declares_its_presets_and_outputs(path):
    decl = read_notebook(path)
    assert list(decl.parameters)[0] == "preset" and decl.parameters["preset"][1] == COMMITTED_PRESET
    assert {"smoke", COMMITTED_PRESET} <= set(decl.presets) and set(PATH_PARAMETERS) <= set(decl.parameters)
    assert decl.outputs and decl.title.startswith(path.stem[:2])


def test_readme_notebook_table_is_the_generated_one():
    assert notebook_table() in (REPO / "README.md").read_text(), (
        "README's notebook table is not what `gvr-lab notebooks` prints: replace it with that output"
    )


def test_presets_decide_where_runs_and_figures_go():
    decl = read_notebook(REPO / "notebooks" / "00_quickstart.py")
    cpu, smoke = resolve(decl, {}), resolve(decl, {"preset": "smoke"})
    assert cpu.fig_root == REPO / "figures"  # only the committed preset, as it stands, writes figures/
    assert smoke.fig_root == REPO / "runs" / "smoke" / "figures" and smoke.params["dataset"] == "fashion_mnist"
    changed = resolve(decl, {"epochs": 5})
    assert changed.changed == {"epochs": 5} and changed.fig_root.parent.name.startswith("cpu-")
    assert changed.runs_root != cpu.runs_root and cpu.runs_root.parent == REPO / "runs" / "cpu" / "quickstart"
    same = resolve(decl, {"epochs": cpu.params["epochs"], "runs_root": "/elsewhere"})
    assert same.changed == {} and same.fig_root == cpu.fig_root and same.runs_root.as_posix() == "/elsewhere"
    with pytest.raises(UsageError, match="unknown preset 'huge' for .*00_quickstart.py; its presets: smoke, cpu"):
        resolve(decl, {"preset": "huge"})


def test_a_parameters_cell_must_begin_with_the_preset():
    with pytest.raises(UsageError, match="must begin with `preset: str"):
        parameters_of('epochs: int = 1  # passes\npreset: str = "cpu"  # smoke | cpu\n', "nb")
    with pytest.raises(UsageError, match="must read `name: type = literal"):
        parameters_of('preset: str = "cpu"  # smoke\nepochs = 1\n', "nb")


# ---------------------------------------------------------------------- a toy notebook through the runner

TOY = """# %% tags=["parameters"]
preset: str = "cpu"  # smoke | cpu
epochs: int = 1  # passes
seeds: list = [0]  # seeds
rate: float = 0.1  # a rate
runs_root: str = ""  # runs
fig_root: str = ""  # figures
{explicit}
# %%
import gvr_lab as gl
from gvr_lab import plots
study = gl.Study("toy", globals(), presets={{"smoke": {{"epochs": 2, "rate": 0.5}}, "cpu": {{}}}},
                 outputs={{"table": "a table"}})

# %%
{body}
"""


def write_notebook(tmp_path, body='print("ok")', explicit=""):
    nb = tmp_path / "00_toy.py"
    nb.write_text(TOY.format(body=body, explicit=f"\n# %%\n{explicit}\n" if explicit else ""))
    return nb


@pytest.mark.slow  # executes a notebook in a kernel process
def test_runner_executes_injects_and_skips_completed(tmp_path):
    nb = write_notebook(tmp_path, "assert seeds == [3, 4] and rate == 2.0 and epochs == 1, (seeds, rate, epochs)")
    params_file = tmp_path / "p.yaml"
    params_file.write_text("seeds: [3, 4]\nrate: 1\n")
    run_dir = run_notebook(nb, {"rate": 2}, params_file=str(params_file), runs_root=tmp_path / "runs")
    assert (run_dir / "DONE").is_file() and (run_dir / "executed.ipynb").is_file()
    assert json.loads((run_dir / "params.json").read_text())["seeds"] == [3, 4]
    stamp = (run_dir / "executed.ipynb").stat().st_mtime_ns
    assert run_notebook(nb, {"rate": 2}, params_file=str(params_file), runs_root=tmp_path / "runs") == run_dir
    assert (run_dir / "executed.ipynb").stat().st_mtime_ns == stamp  # skipped
    nb.write_text(nb.read_text() + "\n# %%\nprint('a changed plot')\n")
    run_notebook(nb, {"rate": 2}, params_file=str(params_file), runs_root=tmp_path / "runs")
    assert "a changed plot" in (run_dir / "executed.ipynb").read_text()  # a changed notebook executes again
    stamp = (run_dir / "executed.ipynb").stat().st_mtime_ns
    run_notebook(nb, {"rate": 2}, params_file=str(params_file), runs_root=tmp_path / "runs", force=True)
    assert (run_dir / "executed.ipynb").stat().st_mtime_ns != stamp  # --force executes again


@pytest.mark.slow  # executes a notebook in a kernel process
def test_preset_values_yield_to_values_set_explicitly_even_when_equal_to_the_default(tmp_path):
    # the smoke preset sets epochs 2 and rate 0.5; a cell below the parameters cell sets rate to its
    # default, -p sets epochs to its default: both explicit, both win
    nb = write_notebook(tmp_path, "assert (epochs, rate) == (1, 0.1), (epochs, rate)", explicit="rate = 0.1")
    run_notebook(nb, {"epochs": 1}, preset="smoke", runs_root=tmp_path / "runs")
    nb = write_notebook(tmp_path, "assert (epochs, rate) == (2, 0.5), (epochs, rate)")
    run_notebook(nb, {}, preset="smoke", runs_root=tmp_path / "runs")


@pytest.mark.slow  # executes a notebook in a kernel process
def test_a_bad_grid_exits_2_before_anything_trains_or_is_kept(tmp_path, capsys):
    body = (
        f"gl.train_grid({TINY!r}, [dict(method='sgd'), dict(method='sam'), dict(method='sgdd')], seeds, "
        "study.runs_root)"
    )
    nb = write_notebook(tmp_path, body)
    argv = ["run", str(nb), "-p", "runs_root", str(tmp_path / "train"), "--runs-root", str(tmp_path / "runs")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "grid variant 'sgdd', seed 0: unknown method 'sgdd'" in err
    assert not (tmp_path / "train").exists() and not any((tmp_path / "runs").iterdir())


@pytest.mark.slow  # executes a notebook in a kernel process
def test_failed_cell_is_reported_and_partial_notebook_kept(tmp_path, capsys):
    nb = write_notebook(tmp_path, 'raise ValueError("the data looks wrong")')
    with pytest.raises(NotebookFailed, match=r"00_toy.py: cell \d+ failed: ValueError: the data looks wrong"):
        run_notebook(nb, {}, runs_root=tmp_path / "runs")
    executed = next((tmp_path / "runs").glob("*/executed.ipynb"))
    assert "the data looks wrong" in executed.read_text()
    assert not (executed.parent / "DONE").exists()
    assert main(["run", str(nb), "--runs-root", str(tmp_path / "runs")]) == 1
    assert "cell" in capsys.readouterr().err


def test_cli_list_values_survive(tmp_path):
    nb = write_notebook(tmp_path, "assert seeds == [0, 1, 2], seeds")
    assert main(["run", str(nb), "-p", "seeds", "[0,1,2]", "--runs-root", str(tmp_path / "runs")]) == 0


@pytest.mark.slow  # executes a notebook in a kernel process
def test_run_uses_this_python_and_prints_the_table_and_paths(tmp_path, capfd, monkeypatch):
    # another checkout's kernel of the same name, first on the search path, must not be used
    stale = tmp_path / "stale" / "kernels" / "gvr_lab"
    stale.mkdir(parents=True)
    (stale / "kernel.json").write_text(
        json.dumps(
            {
                "argv": ["/nonexistent/python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "language": "python",
                "display_name": "stale",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "stale"))
    body = (
        f"import sys\nprint('kernel python:', sys.executable)\n"
        f"gl.train_grid({TINY!r}, [dict(method='sgd')], seeds, study.runs_root)\n"
        "runs = study.load_runs()\n"
        "study.save_table(plots.mean_std(runs, ['label'], ['test_acc']), 'table', 'Toy accuracy', runs)"
    )
    nb = write_notebook(tmp_path, body)
    argv = [
        "run",
        str(nb),
        "-p",
        "runs_root",
        str(tmp_path / "train"),
        "-p",
        "fig_root",
        str(tmp_path / "figs"),
        "--runs-root",
        str(tmp_path / "runs"),
    ]
    assert main(argv) == 0
    out, err = capfd.readouterr()
    assert "Toy accuracy. synthetic, 256 training images · tiny_cnn · 1 epoch = 4 optimizer steps" in out
    assert "| sgd     |" in out and str(tmp_path / "figs" / "toy" / "table.md") in out and "table.tex" in out
    assert "without encryption" not in err and "Traceback" not in err
    executed = next((tmp_path / "runs").glob("*/executed.ipynb")).read_text()
    assert f"kernel python: {sys.executable}" in executed
    assert main(argv) == 0  # nothing changed: skipped, and it says so
    assert "unchanged since its last execution (--force redraws), which wrote:" in capfd.readouterr().out
    (tmp_path / "figs" / "toy" / "table.md").unlink()  # a file it saved is gone: executed again, redrawn
    assert main(argv) == 0
    assert "\nwrote:\n" in capfd.readouterr().out and (tmp_path / "figs" / "toy" / "table.md").is_file()


# ---------------------------------------------------------------------- grids, outside a kernel


@pytest.mark.slow
def test_a_grid_is_checked_whole_before_its_first_run(tmp_path, capsys):
    with pytest.raises(UsageError, match="grid variant 'sgdd', seed 0: unknown method 'sgdd'"):
        train_grid(TINY, [dict(method="sgd"), dict(method="sgdd")], [0], tmp_path / "runs")
    with pytest.raises(UsageError, match="grid variant 'sam', seed 0: unknown hyperparameter 'rh'"):
        train_grid(TINY, [dict(method="sgd"), dict(method="sam", method_args={"rh": 0.1})], [0, 1], tmp_path / "runs")
    with pytest.raises(UsageError, match="grid variants 'a' and 'a' share the run directory"):
        train_grid(TINY, [dict(method="sgd", label="a"), dict(method="sam", label="a")], [0], tmp_path / "runs")
    assert not (tmp_path / "runs").exists()
    runs = train_grid(TINY, [dict(method="sgd")], [0], tmp_path / "runs")
    assert repr(runs) == f"<1 runs in {tmp_path / 'runs'}: 1 completed>"
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[1/1] sgd s0 · epoch 1/1 · train loss ") and "test acc" in lines[0]
    assert lines[1].startswith("[1/1] sgd s0 · 1 epoch · test acc ")
    # another run's directory in the way: refused before the first variant (here a new one) trains
    with pytest.raises(UsageError, match="grid variant 'sgd', seed 0: run directory .* holds a different run"):
        train_grid({**TINY, "epochs": 2}, [dict(method="sam"), dict(method="sgd")], [0], tmp_path / "runs")
    assert not (tmp_path / "runs" / "sam-s0").exists()
    train_grid(TINY, [dict(method="sgd")], [0], tmp_path / "runs")
    assert capsys.readouterr().out.strip().endswith("finished earlier: reused")


# ---------------------------------------------------------------------- the study helpers, outside a kernel


def make_study(tmp_path, monkeypatch, **given):
    """A Study over a namespace holding the input history a kernel would have: the parameters cell,
    then a cell setting the paths explicitly, then the study cell."""
    monkeypatch.chdir(tmp_path)  # Study moves to the project root; the test's working directory comes back
    parameters = 'preset: str = "cpu"  # smoke | cpu\nruns_root: str = ""  # runs\nfig_root: str = ""  # figures\n'
    paths = {"runs_root": str(tmp_path / "runs"), "fig_root": str(tmp_path / "figs")}
    explicit = "\n".join(f"{name} = {value!r}" for name, value in paths.items())
    namespace = {"In": ["", parameters, explicit, "study = Study(...)"], "preset": "cpu", **paths}
    return Study("toy", namespace, presets={"cpu": {}}, outputs={"accuracy": "a figure", "table": "a table"}, **given)


@pytest.mark.slow
def test_figures_refuse_runs_whose_term_never_acted(tmp_path, monkeypatch, capsys):
    import matplotlib.pyplot as plt

    from gvr_lab import plots

    study = make_study(tmp_path, monkeypatch)
    saf = {"kl_start_epoch": 0, "lag": 3}  # acts from epoch max(0, 3) + 1 = 4: never in 3 epochs (0, 1, 2)
    train_grid(
        {**TINY, "epochs": 3},
        [
            dict(method="sgd"),
            dict(method="saf", method_args=saf),
            dict(method="saf", method_args={"kl_start_epoch": 0, "lag": 1}, label="saf lag 1"),
        ],
        [0],
        study.runs_root,
    )
    runs = study.load_runs()
    ax = plots.curves(runs, "epoch", "test_acc")
    with pytest.raises(UsageError, match="would show runs whose method's defining term never acted: saf-s0"):
        study.save_figure(ax.figure, "accuracy", runs)
    shown = study.plotted(runs)
    assert "not plotted: saf-s0" in capsys.readouterr().out
    assert sorted(shown["label"].unique()) == ["saf lag 1", "sgd"]
    ax = plots.curves(shown, "epoch", "test_acc")
    study.save_figure(ax.figure, "accuracy", shown)
    assert (tmp_path / "figs" / "toy" / "accuracy.png").is_file() and not plt.get_fignums()
    table = study.term_column(runs, plots.mean_std(plots.final_rows(runs), ["label"], ["test_acc"]))
    assert dict(zip(table["label"], table["term on"])) == {"sgd": "—", "saf": "never", "saf lag 1": "33% of steps"}
    with pytest.raises(UsageError, match="does not declare output 'other'; declared: accuracy, table"):
        study.save_table(table, "other", "caption", runs)


@pytest.mark.slow
def test_an_ablation_keeps_its_term_off_and_is_plotted(tmp_path, monkeypatch):
    from gvr_lab import plots

    study = make_study(tmp_path, monkeypatch, ablations=["no penalty"])
    train_grid(
        TINY,
        [dict(method="gvr", method_args={"alpha": 0.0, "target": "fc", "penalty": "closed_form"}, label="no penalty")],
        [0],
        study.runs_root,
    )
    runs = study.load_runs()
    assert study.term_column(runs, pd.DataFrame({"label": ["no penalty"]}))["term on"].tolist() == ["off (ablation)"]
    study.save_figure(plots.curves(runs, "epoch", "test_acc").figure, "accuracy", runs)


# ---------------------------------------------------------------------- what figures show


def frame(methods_and_labels, seeds=(0,), epochs=3, values=None):
    rows = []
    for method, label in methods_and_labels:
        for seed in seeds:
            for epoch in range(epochs):
                acc = (values or {}).get(label, 0.5 + 0.1 * epoch + 0.01 * seed + 0.001 * len(label))
                rows.append(
                    dict(
                        method=method,
                        label=label,
                        seed=seed,
                        epoch=epoch,
                        test_acc=acc,
                        dataset="synthetic",
                        model="tiny_cnn",
                        train_subset=256,
                        steps_per_epoch=4,
                        run_dir=f"{label}-{seed}",
                    )
                )
    return pd.DataFrame(rows)


def test_curves_one_colour_per_method_percent_bands_and_hidden_twins():
    import matplotlib.pyplot as plt

    from gvr_lab import plots

    a = plots.curves(frame([("sgd", "SGD"), ("gvr", "GVR")], values={"SGD": 0.6, "GVR": 0.7}), "epoch", "test_acc")
    b = plots.curves(
        frame([("sam", "sam"), ("sgd", "SB"), ("sgd", "SB twin")], values={"SB": 0.7, "SB twin": 0.7}),
        "epoch",
        "test_acc",
    )
    colours = {line.get_label(): line.get_color() for ax in (a, b) for line in ax.get_lines()}
    assert colours["SGD"] == colours["SB"] == plots.method_color("sgd") != colours["GVR"]
    assert a.get_ylabel() == "test accuracy (%)" and max(a.get_lines()[0].get_ydata()) > 50
    assert [t.get_text() for t in b.get_legend().get_texts()][-1] == "SB twin (identical to SB: drawn over it)"
    assert list(a.get_xticks()) == [1, 2, 3] and not a.collections  # one seed: no band
    two_seeds = plots.curves(frame([("sgd", "SGD")], seeds=(0, 1)), "epoch", "test_acc")
    assert len(two_seeds.collections) == 1  # the band
    wide = frame([("gvr", "GVR")], seeds=(0, 1)).assign(penalty=lambda d: 0.1 * 100.0 ** d["seed"])  # 0.1 and 10
    band = plots.curves(wide, "epoch", "penalty", logy=True).collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() > 0 and (band.min() * band.max()) ** 0.5 == pytest.approx(1.0)  # geometric, around 1
    sparse = plots.curves(frame([("vsam", "vsam")]), "epoch", "test_acc", points=True)
    assert sparse.get_lines()[0].get_linestyle() == "None"
    legend_box = a.get_legend().get_window_extent(a.figure.canvas.get_renderer())
    assert legend_box.x0 > a.get_window_extent().x1  # outside the data
    plt.close("all")


def test_intervals_over_seeds_in_bars_reference_lines_and_footers():
    import matplotlib.pyplot as plt

    from gvr_lab import plots

    values = pd.Series([0.81, 0.82, 0.83])  # sd 0.01; t(0.975, 2) = 4.302653 -> half-width 0.0248414
    assert plots.half_width(values, "std") == pytest.approx(0.01)
    assert plots.half_width(values, "ci") == pytest.approx(4.302653 * 0.01 / 3**0.5)
    assert plots.half_width(values[:1], "ci") is None and plots.half_width(values, None) is None
    three = frame([("sgd", "SGD")], seeds=(0, 1, 2), values={"SGD": 0.5}).assign(
        test_acc=lambda d: 0.81 + 0.01 * d["seed"], images_per_s=lambda d: 100.0 + 10 * d["seed"]
    )
    ax = plots.points_with_bars(plots.final_rows(three), "images_per_s", "test_acc", band="ci", xband="std")
    xbar, ybar = (lines.get_segments()[0] for lines in ax.containers[0].lines[2])  # (low, high) ends, percent on y
    assert xbar[1][0] - xbar[0][0] == pytest.approx(2 * 10.0)  # one std each side
    assert ybar[1][1] - ybar[0][1] == pytest.approx(2 * 100 * 4.302653 * 0.01 / 3**0.5)
    fig, ax = plt.subplots()
    plots.level_with_ci(ax, plots.final_rows(three), "test_acc", "SB", plots.method_color("sgd"))
    assert ax.get_lines()[0].get_ydata()[0] == pytest.approx(82.0) and ax.get_lines()[0].get_label() == "SB"
    [span] = ax.patches  # the interval, as a band across the axes
    assert (span.get_y(), span.get_y() + span.get_height()) == pytest.approx((82.0 - 2.48414, 82.0 + 2.48414), abs=1e-4)
    assert plots.ci_spread(three) == (
        "3 seeds per curve: mean and its 95% Student t CI as band, bars or [low, high] (geometric on log axes)"
    )
    assert plots.ci_spread(frame([("sgd", "SGD")])) == "1 seed per curve: no interval"
    plt.close("all")


def test_provenance_names_what_a_figure_rests_on():
    from gvr_lab import plots

    one = plots.provenance(frame([("sgd", "SGD")]), "smoke")
    assert one == (
        "synthetic, 256 training images · tiny_cnn · 3 epochs = 12 optimizer steps · seed 0; "
        "1 seed per curve: no band or error bar · preset smoke"
    )
    two = plots.provenance(frame([("sgd", "SGD")], seeds=(0, 1)), "cpu with epochs=5")
    assert (
        "seeds 0, 1; 2 seeds per curve: mean ± 1 std as band or bars (geometric on log axes) · preset cpu "
        "with epochs=5" in two
    )
    # a steps-mode run stops inside an epoch: its last row's step, not whole epochs
    stepped = frame([("sgd", "SGD")]).assign(step=lambda d: [1, 2, 10][: len(d)])
    assert "· tiny_cnn · 2.5 epochs = 10 optimizer steps ·" in plots.provenance(stepped, "smoke")
    assert plots.provenance(frame([("sgd", "SGD")]), "cpu", spread="95% CI").endswith("seed 0; 95% CI · preset cpu")


def test_lab_setup_lives_in_the_environment(tmp_path, monkeypatch):
    from gvr_lab.lab import install, lab_command, settings_file

    install(prefix=str(tmp_path))
    spec = json.loads((tmp_path / "share/jupyter/kernels/gvr_lab/kernel.json").read_text())
    assert spec["argv"][0] == sys.executable and spec["display_name"] == "Python (gvr_lab)"
    viewers = json.loads(settings_file(str(tmp_path)).read_text())["@jupyterlab/docmanager-extension:plugin"]
    assert viewers == {"defaultViewers": {"python": "Jupytext Notebook"}}
    monkeypatch.setattr("os.geteuid", lambda: 0)
    command, env = lab_command(["--port", "9999"])
    assert command[:4] == [sys.executable, "-m", "jupyterlab", "--allow-root"]
    assert command[-3:] == ["--port", "9999", str(REPO / "notebooks")] and env["JUPYTER_PREFER_ENV_PATH"] == "1"
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert "--allow-root" not in lab_command([])[0]


def test_the_notebook_table_states_measured_cost_or_says_not_measured():
    from gvr_lab.runner import timing

    assert timing(None) == "not measured"
    assert (
        timing({"training_time_s": 1620.0, "training_runs": 17, "wall_time_s": 5.0})
        == "27 min of training, summed over its 17 runs"
    )  # an entry from before the studies' wall time was recorded: its wall time was a redraw's
    record = {"training_time_s": 1620.0, "training_runs": 17, "wall_time_s": 900.0, "runs_root": "runs/cpu/x/1"}
    assert timing(record) == "15 min (27 min of training, summed over its 17 runs)"
    assert timing({**record, "all_parts": False}) == (
        "over 15 min: its last part, earlier ones not recorded (27 min of training, summed over its 17 runs)"
    )


def test_a_studys_recorded_wall_time_is_that_of_the_executions_that_trained_it(tmp_path):
    def record(wall, trained, root="runs/cpu/x/abc"):
        return {
            "wall_time_s": wall,
            "training_runs": 4,
            "training_time_s": trained,
            "devices": ["cpu"],
            "runs_root": root,
        }

    def recorded():
        return json.loads((tmp_path / "timings.json").read_text())["x"]["wall_time_s"]

    (tmp_path / "timings.json").write_text(json.dumps({"other": record(7.0, 7.0, "runs/cpu/other/1")}))
    record_timing(tmp_path, "x", record(3000.0, 5000.0))
    assert recorded() == 3000.0
    record_timing(tmp_path, "x", record(40.0, 5000.0))  # a redraw: every run had finished
    assert recorded() == 3000.0
    record_timing(tmp_path, "x", record(1000.0, 6500.0))  # the study's second part
    assert recorded() == 4000.0
    record_timing(tmp_path, "x", record(500.0, 800.0, "runs/cpu/x/def"))  # another study: its own time
    assert recorded() == 500.0
    # an execution from before killed parts were kept: its study's time is a lower bound from then on
    record_timing(tmp_path, "x", {**record(200.0, 900.0, "runs/cpu/x/def"), "all_parts": False})
    record_timing(tmp_path, "x", record(100.0, 1000.0, "runs/cpu/x/def"))
    entry = json.loads((tmp_path / "timings.json").read_text())["x"]
    assert entry["wall_time_s"] == 800.0 and entry["all_parts"] is False
    assert json.loads((tmp_path / "timings.json").read_text())["other"]["wall_time_s"] == 7.0
    # a redraw that finds a part without a record marks the study's time a lower bound too
    record_timing(tmp_path, "x", record(3000.0, 5000.0, "runs/cpu/x/ghi"))
    record_timing(tmp_path, "x", {**record(40.0, 5000.0, "runs/cpu/x/ghi"), "all_parts": False})
    entry = json.loads((tmp_path / "timings.json").read_text())["x"]
    assert entry["wall_time_s"] == 3000.0 and entry["all_parts"] is False
    # executions that counted the runs they trained: a rerun that retrained every run (the earlier
    # records were gone) is the study's whole cost, whether its training came out longer or shorter
    root = "runs/cpu/x/jkl"
    record_timing(tmp_path, "x", {**record(3000.0, 5000.0, root), "runs_trained": 4})
    record_timing(tmp_path, "x", {**record(2500.0, 5200.0, root), "runs_trained": 4})
    assert recorded() == 2500.0
    record_timing(tmp_path, "x", {**record(2400.0, 4800.0, root), "runs_trained": 4})
    assert recorded() == 2400.0
    record_timing(tmp_path, "x", {**record(40.0, 4800.0, root), "runs_trained": 0})  # a redraw
    assert recorded() == 2400.0
    record_timing(tmp_path, "x", {**record(900.0, 4700.0, root), "runs_trained": 1})  # one run continued
    assert recorded() == 3300.0


def test_an_execution_counts_the_runs_whose_records_it_wrote(tmp_path):
    """execution_record's runs_trained: the summaries written since the execution's first part
    began (DONE's started_at), the pilot's nested arms included; an execution from before
    started_at was kept says nothing, and study_timing falls back on the training time."""
    import os

    from gvr_lab.runner import execution_record

    nb, runs = write_notebook(tmp_path), tmp_path / "study"
    run_dir = tmp_path / "runs" / "00_toy-cpu"
    run_dir.mkdir(parents=True)
    (run_dir / "params.json").write_text(json.dumps({"notebook": str(nb), "runs_root": str(runs)}))
    started = 1_800_000_000.0
    for name, mtime in (("a", started - 600), ("b", started + 5), ("arm/c", started + 90)):
        (runs / name).mkdir(parents=True)
        (runs / name / "summary.json").write_text(json.dumps({"wall_time_s": 10.0, "device": "cpu"}))
        os.utime(runs / name / "summary.json", (mtime, mtime))
    done = {"wall_time_s": 120.0, "interrupted_s": 0.0, "code": "c"}
    (run_dir / "DONE").write_text(json.dumps({**done, "started_at": started}))
    record = execution_record(run_dir)
    assert (record["training_runs"], record["runs_trained"], record["training_time_s"]) == (3, 2, 30.0)
    (run_dir / "DONE").write_text(json.dumps(done))
    assert "runs_trained" not in execution_record(run_dir)


def test_a_killed_part_without_an_elapsed_record_is_counted_as_unrecorded(tmp_path):
    """Folders of killed executions from before the elapsed record existed: their time is unknown,
    so the study's wall time can only be a lower bound (execution_record's all_parts)."""
    from gvr_lab.runner import unrecorded_parts

    run_dir = tmp_path / "06_x-pilot-abc"
    for name, beat in (("old1", False), ("old2", False), ("recorded", True)):
        (tmp_path / f".06_x-pilot-abc.{name}").mkdir()
        if beat:
            (tmp_path / f".06_x-pilot-abc.{name}" / "elapsed.json").write_text(json.dumps({"wall_time_s": 1.0}))
    (tmp_path / ".06_x-other-abc.old").mkdir()  # another run's folder
    assert unrecorded_parts(run_dir) == 2


def test_an_executions_time_so_far_is_kept_and_counted_once_by_the_next(tmp_path):
    """A study run in parts: an execution killed midway leaves its elapsed time in its unfinished
    folder, which the next execution of the same run counts (and removes once it finished: the slow
    test below). A folder still being written (a live execution) is left out."""
    import time

    from gvr_lab.runner import elapsed_recorded, interrupted_parts

    run_dir = tmp_path / "07_x-cpu-abc"
    live = tmp_path / ".07_x-cpu-abc.live"
    live.mkdir()
    with elapsed_recorded(live / "elapsed.json", time.perf_counter() - 5.0, every=0.05):
        first = beating = json.loads((live / "elapsed.json").read_text())
        deadline = time.time() + 10  # a loaded machine may delay the writer's beats
        while beating["at"] == first["at"] and time.time() < deadline:
            time.sleep(0.05)
            beating = json.loads((live / "elapsed.json").read_text())
        assert first["wall_time_s"] >= 5.0 and beating["at"] > first["at"]  # rewritten while it runs
        assert interrupted_parts(run_dir, every=60.0) == {}  # fresh: a live execution's
    for name, seconds in (("killed1", 1200.0), ("killed2", 300.5)):
        (tmp_path / f".07_x-cpu-abc.{name}").mkdir()
        (tmp_path / f".07_x-cpu-abc.{name}" / "elapsed.json").write_text(
            json.dumps({"wall_time_s": seconds, "at": time.time() - 600})
        )
    (tmp_path / ".07_x-cpu-other.killed").mkdir()  # another run's folder
    (tmp_path / ".07_x-cpu-other.killed" / "elapsed.json").write_text(json.dumps({"wall_time_s": 9.0, "at": 0}))
    final = json.loads((live / "elapsed.json").read_text())  # written as the execution ended
    time.sleep(0.15)  # the live folder's last beat is now stale too
    parts = interrupted_parts(run_dir, every=0.05)
    assert {p.name: record["wall_time_s"] for p, record in parts.items()} == {  # not the other run's
        ".07_x-cpu-abc.killed1": 1200.0,
        ".07_x-cpu-abc.killed2": 300.5,
        ".07_x-cpu-abc.live": final["wall_time_s"],
    }
    assert all(p.is_dir() for p in parts)  # reading removes nothing: an execution that fails keeps them


def test_an_executions_record_says_how_much_cpu_time_the_host_took(tmp_path, monkeypatch):
    """On a virtual machine the host gives the cores to other guests ("steal" in /proc/stat): the
    elapsed record holds the machine's CPU time since the execution started and the host's part of
    it, so a wall time measured under a busy host is read as such."""
    import os
    import time

    from gvr_lab import pools
    from gvr_lab.runner import elapsed_recorded, part_steal

    hz = os.sysconf("SC_CLK_TCK")
    stat = tmp_path / "stat"
    stat.write_text(proc_stat_line(user=10 * hz, idle=5 * hz, steal=1 * hz))
    monkeypatch.setattr(pools, "PROC_STAT", str(stat))
    assert pools.cpu_seconds() == (16.0, 1.0)  # guest time is not counted twice
    record = tmp_path / "elapsed.json"
    with elapsed_recorded(record, time.perf_counter() - 2.0, every=60.0):
        stat.write_text(proc_stat_line(user=70 * hz, idle=5 * hz, steal=41 * hz))  # 100 s more, 40 stolen
    elapsed = json.loads(record.read_text())  # written as the execution ended
    assert elapsed["cpu_s"] == 100.0 and elapsed["stolen_s"] == 40.0 and elapsed["wall_time_s"] >= 2.0
    assert part_steal(elapsed) == {"cpu_s": 100.0, "stolen_s": 40.0, "wall_s": elapsed["wall_time_s"]}
    monkeypatch.setattr(pools, "PROC_STAT", str(tmp_path / "missing"))  # not Linux: nothing to say
    with elapsed_recorded(record, time.perf_counter(), every=60.0):
        pass
    assert set(json.loads(record.read_text())) == {"wall_time_s", "at"} and pools.cpu_seconds() is None


def test_a_studys_steal_is_summed_over_its_parts_and_said_beside_its_time(tmp_path):
    from gvr_lab.runner import timing

    def record(wall, trained, steal=None):
        entry = {"wall_time_s": wall, "training_runs": 4, "training_time_s": trained, "devices": ["cpu"]}
        return {**entry, "runs_root": "runs/cpu/x/abc", **({"steal": steal} if steal else {})}

    def entry():
        return json.loads((tmp_path / "timings.json").read_text())["x"]

    record_timing(tmp_path, "x", record(1200.0, 2000.0))  # a part from before steal was recorded
    record_timing(tmp_path, "x", record(600.0, 3000.0, {"cpu_s": 1200.0, "stolen_s": 300.0, "wall_s": 600.0}))
    assert entry()["steal"] == {"cpu_s": 1200.0, "stolen_s": 300.0, "wall_s": 600.0}
    record_timing(tmp_path, "x", record(600.0, 4000.0, {"cpu_s": 1200.0, "stolen_s": 500.0, "wall_s": 600.0}))
    assert entry()["steal"] == {"cpu_s": 2400.0, "stolen_s": 800.0, "wall_s": 1200.0}
    record_timing(tmp_path, "x", record(30.0, 4000.0, {"cpu_s": 60.0, "stolen_s": 0.0, "wall_s": 30.0}))  # a redraw
    assert entry()["steal"] == {"cpu_s": 2400.0, "stolen_s": 800.0, "wall_s": 1200.0}
    assert entry()["wall_time_s"] == 2400.0
    assert timing(entry()) == (
        "40 min (67 min of training, summed over its 4 runs; the host took 33% of the machine's CPU time "
        "meanwhile, measured over 20 min of it)"
    )
    whole = {**entry(), "steal": {"cpu_s": 4800.0, "stolen_s": 480.0, "wall_s": 2400.0}}
    assert timing(whole) == (
        "40 min (67 min of training, summed over its 4 runs; the host took 10% of the machine's CPU time meanwhile)"
    )


def test_the_committed_exploratory_tables_show_three_seeds_or_more_with_their_intervals():
    """Notebooks 01-05 at their committed preset: every table's caption says how many seeds each row
    rests on, at least 3, with the 95% Student t interval, and that it is exploratory."""
    import re

    exploratory = [decl for decl in map(read_notebook, notebook_paths()) if decl.exploratory]
    assert len(exploratory) >= 5
    for decl in exploratory:
        tables = sorted((REPO / "figures" / decl.name).glob("*.md"))
        assert tables, decl.name
        for table in tables:
            caption = table.read_text().splitlines()[0]
            seeds = re.search(r"(\d+) seeds per curve: mean and its 95% Student t CI", caption)
            assert seeds and int(seeds.group(1)) >= 3, table
            assert "exploratory: tests no claim" in caption, table


def test_the_committed_exploratory_notebooks_together_took_at_most_two_hours_on_the_cpu():
    """01-05 at their committed preset are sized to run one after another within 2 hours on our
    2-core machine: their recorded wall times (every part of each study recorded) sum to that."""
    timings = json.loads((REPO / "figures" / "timings.json").read_text())
    exploratory = [decl.name for decl in map(read_notebook, notebook_paths()) if decl.exploratory]
    entries = [timings[name] for name in exploratory]
    assert len(entries) >= 5 and all(e.get("all_parts", True) and e["devices"] == ["cpu"] for e in entries)
    assert sum(e["wall_time_s"] for e in entries) <= 2 * 3600


def test_committed_timings_name_runs_roots_relative_to_the_repository(tmp_path):
    from gvr_lab.study import repo_relative

    assert repo_relative(REPO / "runs" / "cpu" / "x") == "runs/cpu/x"
    assert repo_relative(tmp_path) == str(tmp_path)
    roots = [
        entry.get("runs_root", "") for entry in json.loads((REPO / "figures" / "timings.json").read_text()).values()
    ]
    assert not [r for r in roots if r.startswith("/")]


def test_each_committed_study_resolves_to_the_runs_root_its_figures_came_from():
    """The committed figures' runs are found again: a notebook at its committed preset resolves to
    the runs root figures/timings.json records for it. A parameter added with its default moves the
    root (every parameter is part of its digest) and would retrain a finished or half-run study from
    scratch: put such a setting into a preset's own values instead."""
    timings = json.loads((REPO / "figures" / "timings.json").read_text())
    roots = {
        decl.name: resolve(decl, {"preset": COMMITTED_PRESET}).runs_root
        for decl in map(read_notebook, notebook_paths())
        if decl.name in timings
    }
    assert len(roots) >= 7
    assert {name: str(root.relative_to(REPO)) for name, root in roots.items()} == {
        name: timings[name]["runs_root"] for name in roots
    }


@pytest.mark.slow  # executes a notebook in a kernel process
def test_an_execution_continuing_a_killed_one_records_both_parts(tmp_path):
    import time

    nb = write_notebook(tmp_path)
    run_dir = run_notebook(nb, {}, runs_root=tmp_path / "runs")
    own = json.loads((run_dir / "DONE").read_text())
    assert own["interrupted_s"] == 0.0 and not list(run_dir.glob("elapsed.json"))
    killed = run_dir.parent / f".{run_dir.name}.killed"
    killed.mkdir()
    killed_at = time.time() - 3600
    (killed / "elapsed.json").write_text(json.dumps({"wall_time_s": 100.0, "at": killed_at}))
    write_notebook(tmp_path, 'raise ValueError("a failing cell")')  # the same run, failing
    with pytest.raises(NotebookFailed):
        run_notebook(nb, {}, runs_root=tmp_path / "runs", force=True)
    assert killed.is_dir()  # an execution that did not finish counts nothing and removes nothing
    write_notebook(tmp_path)
    run_notebook(nb, {}, runs_root=tmp_path / "runs", force=True)
    done = json.loads((run_dir / "DONE").read_text())
    assert done["interrupted_s"] == 100.0 and done["wall_time_s"] >= 100.0 and not killed.exists()
    assert done["started_at"] == pytest.approx(killed_at - 100.0, abs=0.1)  # the killed part's runs are its own
    # the killed part recorded no steal: the record covers this execution's own time only
    assert done["steal"]["wall_s"] == pytest.approx(done["wall_time_s"] - 100.0, abs=0.2)
    assert 0 <= done["steal"]["stolen_s"] <= done["steal"]["cpu_s"]


def test_the_figures_index_shows_each_studys_recorded_cost_and_adds_a_new_execution(tmp_path):
    from gvr_lab.runner import write_figures_index
    from gvr_lab.study import notebook_paths, read_notebook

    first, second = (read_notebook(p) for p in notebook_paths()[:2])
    earlier = {
        "wall_time_s": 600.0,
        "training_runs": 3,
        "training_time_s": 900.0,
        "devices": ["cpu"],
        "runs_root": "r/1",
    }
    (tmp_path / "timings.json").write_text(json.dumps({first.name: earlier}))
    new = {**earlier, "wall_time_s": 120.0, "training_time_s": 1000.0, "runs_root": "r/2"}
    index = write_figures_index(tmp_path, "cpu", [(first, None), (second, new)]).read_text()
    one, two = index.split(f"## {second.name}")
    assert "summing to 900 s" in one and "took 600 s of wall time" in one  # kept from timings.json
    assert "summing to 1000 s" in two and "took 120 s of wall time" in two
    assert json.loads((tmp_path / "timings.json").read_text()) == {first.name: earlier, second.name: new}


def test_the_figures_index_links_an_archived_study_by_its_readmes_title(tmp_path):
    from gvr_lab.runner import write_figures_index
    from gvr_lab.study import notebook_paths, read_notebook

    first = read_notebook(notebook_paths()[0])
    archive = tmp_path / first.name / "v1"
    archive.mkdir(parents=True)
    (archive / "README.md").write_text("# The study registered in commit abc (archived)\n\nWhy it was kept.\n")
    (tmp_path / first.name / "notes").mkdir()  # a folder without a README is not an archive
    (tmp_path / first.name / "v2").mkdir()
    (tmp_path / first.name / "v2" / "README.md").write_text("# #2: the second study\n")  # only the heading mark goes
    index = write_figures_index(tmp_path, "cpu", [(first, None)]).read_text()
    assert f"- [v1/]({first.name}/v1/README.md): The study registered in commit abc (archived)" in index
    assert f"- [v2/]({first.name}/v2/README.md): #2: the second study" in index
    assert "notes/" not in index
