"""The gvr-lab command line: thin wrappers over the package.

Bad input (a UsageError anywhere, an unknown flag, an unreadable config file) prints one line on
stderr and exits with status 2; nothing is written before the input has been checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import select
import signal
import sys
import time
from pathlib import Path

import yaml

from .data import list_datasets
from .data import markdown_table as dataset_table
from .errors import UsageError, check_choice
from .methods import METHODS, list_methods, markdown_table, method_class, method_notes
from .models import list_models
from .plugins import LOADED as PLUGINS
from .results import read_yaml_mapping
from .training import Config, resolve_device, train


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage dump) and exit status 2."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def parse_value(text: str):
    """A command-line value as YAML: numbers, booleans, lists and null come out typed."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return None if value == "None" else value


def parse_method_spec(spec: str) -> tuple[str, dict]:
    """'gvr:penalty=closed_form,target=fc' -> ('gvr', {'penalty': 'closed_form', 'target': 'fc'})."""
    name, _, args = spec.partition(":")
    hp = {}
    for item in filter(None, args.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"method spec {spec!r}: expected name:key=value,key=value")
        hp[key] = parse_value(value)
    return method_class(name).name, hp


def parse_key_values(items: list[str], flag: str = "--method-arg") -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} expects key=value, got {item!r}")
        out[key.strip()] = parse_value(value)
    return out


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field, named with dashes; defaults stay None so a YAML file can fill in."""
    for f in dataclasses.fields(Config):
        if f.name in ("method_args", "model_args", "optimizer_args"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif f.type == "list":
            parser.add_argument(flag, nargs="*", type=f.metadata.get("items", int), default=None)
        else:
            caster = {"int": int, "float": float, "str": str}[f.type]
            parser.add_argument(flag, type=caster, default=None, metavar=f.type.upper())
    parser.add_argument(
        "--method-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method hyper-parameter, repeatable (see gvr-lab list)",
    )
    parser.add_argument(
        "--model-arg", action="append", default=[], metavar="KEY=VALUE", help="a keyword for create_model, repeatable"
    )
    parser.add_argument(
        "--optimizer-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a keyword of the optimizer's own (betas=[0.9,0.99], eps=1e-6), repeatable",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    values = read_yaml_mapping(args.config, "config") if args.config else {}
    for f in dataclasses.fields(Config):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    values["method_args"] = {**values.get("method_args", {}), **parse_key_values(args.method_arg)}
    values["model_args"] = {**values.get("model_args", {}), **parse_key_values(args.model_arg, "--model-arg")}
    values["optimizer_args"] = {
        **values.get("optimizer_args", {}),
        **parse_key_values(args.optimizer_arg, "--optimizer-arg"),
    }
    return Config.from_dict(values)


def cmd_list(args) -> int:
    if args.markdown:
        print(markdown_table())
        return 0
    print("methods (hyperparameters with defaults; reference):")
    for name in list_methods():
        cls = METHODS[name]
        hp = ", ".join(f"{k}={v!r}" for k, v in cls.hparams.items()) or "none"
        alias = f" (alias: {', '.join(cls.aliases)})" if cls.aliases else ""
        print(f"  {name}{alias}: {hp}\n      {cls.reference}")
    print("models:   " + ", ".join(list_models()) + "; or module:callable, or timm/<name>")
    print("datasets: " + ", ".join(list_datasets()))
    if PLUGINS:
        print("plugins:  " + ", ".join(PLUGINS))
    return 0


def cmd_docs(args) -> int:
    """docs/methods.md from the registry and the method docstrings, and README's generated tables
    (methods, notebooks) refreshed in place: what to run after adding a method or a notebook."""
    from .claims import committed_studies, verdicts_table
    from .results import read_json, write_atomic
    from .runner import notebook_table
    from .study import REPO

    notes = Path(args.out)
    write_atomic(notes, method_notes().encode())
    print(f"wrote {notes}")
    readme = Path(args.readme)
    if not readme.is_file():
        raise UsageError(f"{readme} not found: run gvr-lab docs in the project's root, or pass --readme")
    text = readme.read_text()
    verdicts = [verdicts_table(read_json(path)) for path in committed_studies(REPO / "figures")]
    for table in (markdown_table(), dataset_table(), notebook_table(), *verdicts):
        text = replace_table(text, table, readme)
    write_atomic(readme, text.encode())
    print(f"refreshed the method, dataset, notebook and {len(verdicts)} claims studies' verdict tables of {readme}")
    return 0


def replace_table(text: str, table: str, where) -> str:
    """`text` with the markdown table that begins with `table`'s header line replaced by `table`."""
    lines, header = text.split("\n"), table.splitlines()[0]
    if header not in lines:
        raise UsageError(f"{where} has no table beginning {header[:60]!r}...: put one where it belongs")
    start = lines.index(header)
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[:start] + table.rstrip("\n").split("\n") + lines[end:])


def cmd_curvature(args) -> int:
    from .errors import FilesystemError
    from .measure import measure_run
    from .results import write_json

    slice_dims = {"none": 0, "1d": 1, "2d": 2}[args.slice]
    out = measure_run(
        args.run_dir,
        args.checkpoint,
        args.k,
        args.trace_samples,
        args.rows,
        slice_dims,
        args.toward,
        args.bn,
        args.dtype,
        args.density,
        resolve_device(args.device),
    )
    # the result first: a file that cannot be written must not lose it
    print(
        f"top eigenvalues {', '.join(f'{v:.4g}' for v in out['top_eigenvalues'])}; trace {out['trace']:.4g} "
        f"+- {out['trace_se']:.2g} (standard error, {out['trace_samples']} probes); {out['hvps']} Hessian-vector "
        f"products in {out['seconds']:.1f} s on {out['rows']} training rows ({out['bn']} mode, {out['dtype']})"
    )
    path = Path(args.out or Path(args.run_dir) / "curvature.json")
    try:
        write_json(path, out)
    except FilesystemError as e:
        print(json.dumps(out, sort_keys=True))  # the whole result, where it can go
        raise FilesystemError(f"{e} (--out); the result is printed above", e.errno, e.reason) from None
    print(f"wrote {path}")
    return 0


def cmd_train(args) -> int:
    run = train(config_from_args(args))
    if run is None:  # a data-parallel rank other than 0: rank 0 reports
        return 0
    s = run.summary
    print(f"run directory: {run.run_dir}")
    if s["status"] == "diverged":
        print(
            f"gvr-lab: diverged at step {s['diverged_step']}: loss {s['diverged_value']}; history kept in "
            f"{run.run_dir}",
            file=sys.stderr,
        )
        return 1
    if s["status"] == "stopped":
        print(
            f"stopped after step {s['steps_completed']} of {s['total_steps']} (--stop-after): test accuracy "
            f"{s['final_test_acc']:.4f}; the same command again continues"
        )
        return 0
    print(
        f"final test accuracy {s['final_test_acc']:.4f} (best {s['best_test_acc']:.4f}), "
        f"wall time {s['wall_time_s']:.1f} s"
    )
    return 0


def cmd_bench(args) -> int:
    from .bench import all_bench_rows, format_table, run_bench, write_markdown_block, write_report

    if args.into and not args.json:
        raise UsageError("--into needs --json: the table in the markdown file is written from that JSON")

    channels, _, size = args.shape.partition("x")
    if not (channels.isdigit() and size.isdigit()) or int(channels) not in (1, 3) or int(size) not in (28, 32):
        raise UsageError(f"--shape must be CxS with C in 1, 3 and S in 28, 32, got {args.shape!r}")
    for name in ("batch_size", "steps", "rounds"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    device = resolve_device(args.device)
    methods = all_bench_rows() if args.methods == ["all"] else [parse_method_spec(spec) for spec in args.methods]
    timing = ("precision", "compile", "steps", "warmup", "rounds", "profile", "cuda_settings", "hvp")
    report = run_bench(
        args.model,
        (int(channels), int(size)),
        args.num_classes,
        args.batch_size,
        methods,
        device=str(device),
        **{name: getattr(args, name) for name in timing},
    )
    print(format_table(report))
    if args.json:
        write_report(report, args.json)
        print(f"wrote {args.json}")
    if args.into:
        write_markdown_block(args.into, args.json)
        print(f"wrote its table and verdicts into {args.into}")
    return 0


def cmd_register(args) -> int:
    from .claims import DEFAULT_PROTOCOL, register_preset
    from .study import repo_relative

    try:
        block = Path(args.block).read_text()
    except OSError as e:
        raise UsageError(f"cannot read the block {args.block}: {e.strerror}") from None
    protocol = register_preset(args.protocol or DEFAULT_PROTOCOL, block)
    sha = protocol.sha256[:12]
    print(
        f"registered preset {protocol.preset} in {repo_relative(protocol.path)}: protocol {sha}. Commit it before "
        f"any run of its study; a study registered anew trains into a runs root of its own "
        f"(runs/{protocol.preset}/claims/{sha})"
    )
    return 0


def cmd_bench_grid(args) -> int:
    from .bench import write_markdown_block, write_report
    from .grid_bench import grid_markdown, run_grid_bench, study_grid

    if args.into and not args.json:
        raise UsageError("--into needs --json: the table in the markdown file is written from that JSON")
    if args.seeds < 1:
        raise UsageError("--seeds must be positive")
    from .claims import DEFAULT_PROTOCOL

    args.protocol = args.protocol or str(DEFAULT_PROTOCOL)
    study_grid(args.protocol, args.preset, args.seeds, "checked")  # bad input is one line before anything trains
    report = run_grid_bench(args.protocol, args.preset, args.seeds)
    print(grid_markdown(report, args.json or "(not saved)"))
    if args.json:
        write_report(report, args.json)
        print(f"wrote {args.json}")
    if args.into:
        write_markdown_block(args.into, args.json, render=grid_markdown, tool="gvr-lab bench-grid")
        print(f"wrote its table into {args.into}")
    return 0


def parse_params(pairs: list[list[str]]) -> dict:
    return {name: parse_value(value) for name, value in pairs}


def executor_environment(args):
    """The grid executor a notebook's kernel uses, as environment variables (grid.ENVIRONMENT);
    checked here so a bad choice or a missing Ray is one line before the notebook starts."""
    from . import cluster, grid

    options = None
    if args.executor == "ray":
        options = cluster.RayOptions(address=args.ray_address, run_cpus=args.run_cpus, run_gpus=args.run_gpus)
    elif args.ray_address or args.run_cpus or args.run_gpus:
        raise UsageError("--ray-address, --run-cpus and --run-gpus need --executor ray")
    if args.workers and args.executor not in (None, "processes"):
        raise UsageError("--workers is the processes executor's pool size: it needs --executor processes")
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    executor, options = grid.resolve_executor(args.executor, options)
    if executor == "ray":
        # a bad address is one line now, not a failed cell later; the local instance this starts
        # lives as long as this command, and the kernel's grids join it at its address
        ray = cluster.connect(options)
        address = options.address or ray.get_runtime_context().gcs_address
        options = dataclasses.replace(options, address=address)
    return grid.executor_environment(executor, options, args.workers)


def cmd_run(args) -> int:
    from .runner import (
        NotebookFailed,
        execution_record,
        record_timing,
        resolved_of,
        run_notebook,
        saved_outputs,
        write_figures_index,
    )
    from .study import COMMITTED_PRESET, REPO, notebook_paths, read_notebook

    os.environ.update(executor_environment(args))
    started = time.time()
    try:
        run_dir = run_notebook(
            args.notebook,
            parse_params(args.p),
            preset=args.preset,
            params_file=args.f,
            force=args.force,
            runs_root=args.runs_root,
            log_output=args.log_output,
        )
    except NotebookFailed as e:
        print(f"gvr-lab: {e}", file=sys.stderr)
        return 1
    saved = saved_outputs(run_dir)
    for table in saved.tables:
        print(Path(table).read_text())
    executed = (run_dir / "DONE").stat().st_mtime >= started  # else skipped: nothing changed since it ran
    resolved, figures = resolved_of(run_dir), Path(REPO, "figures")
    if executed and resolved.fig_root.resolve() == figures.resolve():  # the committed figures: their cost
        name, record = read_notebook(args.notebook).name, execution_record(run_dir)
        if resolved.variant == COMMITTED_PRESET:  # the index of figures/ lists that preset's notebooks
            decls = [d for d in map(read_notebook, notebook_paths()) if COMMITTED_PRESET in d.presets]
            write_figures_index(figures, COMMITTED_PRESET, [(d, record if d.name == name else None) for d in decls])
        else:  # a preset whose outputs sit beside the committed ones (the claims pilot): its own entry
            record_timing(figures, f"{name}-{resolved.variant}", record)
    print(
        ("wrote:" if executed else "unchanged since its last execution (--force redraws), which wrote:")
        + ("".join(f"\n  {shown(path)}" for path in saved.paths) or " nothing")
    )
    print(f"executed notebook: {shown(run_dir / 'executed.ipynb')}")
    return 0


def shown(path) -> str:
    """A path relative to the working directory when it lies under it."""
    path = Path(path).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def cmd_figures(args) -> int:
    from .runner import NotebookFailed, execution_record, run_notebook, write_figures_index
    from .study import PRESETS, REPO, default_fig_root, notebook_paths, read_notebook

    check_choice("preset", args.preset, PRESETS)
    os.environ.update(executor_environment(args))
    failed, entries = 0, []
    for path in notebook_paths():
        decl = read_notebook(path)
        if args.preset not in decl.presets:
            print(f"{path.name}: no {args.preset} preset, skipped")
            continue
        params = {"fig_root": str(Path(args.out).resolve())} if args.out else {}
        if args.runs_root:
            params["runs_root"] = str(Path(args.runs_root, args.preset, decl.name).resolve())
        try:
            # forced: a finished training run is not retrained, so this only redraws its figures
            run_dir = run_notebook(
                path, params, preset=args.preset, force=True, runs_root=Path(args.runs_root or "runs", "notebooks")
            )
            record = execution_record(run_dir)
            entries.append((decl, record))
            print(
                f"{path.name}: {shown(run_dir)} ({record['wall_time_s']:.0f} s; {record['training_runs']} training "
                f"runs, {record['training_time_s']:.0f} s)"
            )
        except NotebookFailed as e:
            print(f"gvr-lab: {e}", file=sys.stderr)
            failed += 1
    index = write_figures_index(args.out or Path(REPO, default_fig_root(args.preset)), args.preset, entries)
    print(f"wrote {shown(index)}")
    return 1 if failed else 0


def cmd_notebooks(args) -> int:
    from .runner import notebook_table

    print(notebook_table(), end="")
    return 0


def cmd_runs(args) -> int:
    from .progress import runs_report

    print("\n".join(runs_report(args.dir)))
    return 0


def cmd_tensorboard(args) -> None:
    """TensorBoard on a folder of runs, in place of this process."""
    if importlib.util.find_spec("tensorboard") is None:
        raise UsageError("gvr-lab tensorboard needs the tensorboard package, not installed: pip install tensorboard")
    if not Path(args.runs).is_dir():
        raise UsageError(f"{args.runs} is not a folder: TensorBoard reads a folder of runs (runs/, a study's)")
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", args.runs, "--port", str(args.port)]
    command += ["--host", args.host]
    print(f"TensorBoard on {args.runs}: http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    os.execv(sys.executable, command)


def add_executor_flags(parser) -> None:
    parser.add_argument(
        "--executor",
        choices=["processes", "sequential", "ray"],
        default=None,
        help="how the notebook's grids run: in a pool of worker processes on this machine (the default without "
        "CUDA), one run after another in the kernel (the default with CUDA), or as Ray tasks",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="processes executor: runs at once, and curvature measurements at once (0: cores / threads per run)",
    )
    parser.add_argument(
        "--ray-address", help="a Ray cluster (auto or HOST:PORT); default: a local instance on this machine's cores"
    )
    parser.add_argument(
        "--run-cpus", type=float, default=0.0, help="CPUs each run asks Ray for (0: its torch threads, Config.threads)"
    )
    parser.add_argument("--run-gpus", type=float, default=0.0, help="GPUs per run under Ray (0.25: four per GPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gvr-lab", description="Gradient-based regularizers: train, compare, reproduce.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    ls = sub.add_parser("list", help="methods with hyperparameters and references, models, datasets")
    ls.add_argument("--markdown", action="store_true", help="print README's method table, made from the registry")
    ls.set_defaults(func=cmd_list)
    cv = sub.add_parser("curvature", help="Hessian eigenvalues, trace and loss slices of a run's checkpoint")
    cv.add_argument("run_dir")
    cv.add_argument("--checkpoint", help="a checkpoint file instead of RUN_DIR/checkpoint.pt")
    cv.add_argument("--k", type=int, default=3, help="top eigenvalues")
    cv.add_argument("--trace-samples", type=int, default=100, help="Hutchinson probes")
    cv.add_argument("--rows", type=int, default=1000, help="training rows measured (seeded, the same every time)")
    cv.add_argument("--slice", choices=["none", "1d", "2d"], default="none", help="filter-normalized loss slice")
    cv.add_argument("--toward", metavar="RUN_DIR", help="also the loss along the line to that run's final weights")
    cv.add_argument("--bn", choices=["eval", "train"], default="eval", help="batch norm's mode while measuring")
    cv.add_argument("--dtype", choices=["fp32", "fp64"], default="fp32")
    cv.add_argument("--density", action="store_true", help="also the eigenvalue density (stochastic Lanczos)")
    cv.add_argument("--device", default="auto")
    cv.add_argument("--out", help="instead of RUN_DIR/curvature.json")
    cv.set_defaults(func=cmd_curvature)
    dc = sub.add_parser(
        "docs", help="write docs/methods.md from the registry and method docstrings; refresh README's tables"
    )
    dc.add_argument("--out", default="docs/methods.md")
    dc.add_argument("--readme", default="README.md", help="whose method and notebook tables to refresh")
    dc.set_defaults(func=cmd_docs)
    p = sub.add_parser("train", help="one training run into its run directory (rerun to resume)")
    p.add_argument("--config", metavar="FILE.yaml", help="Config fields as YAML; flags override them")
    add_config_flags(p)
    p.set_defaults(func=cmd_train)
    r = sub.add_parser("run", help="execute a notebook headless through papermill")
    r.add_argument("notebook")
    r.add_argument(
        "-p",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="a parameter (YAML value: numbers, true/false, [lists]), repeatable",
    )
    r.add_argument("-f", metavar="PARAMS.yaml", help="parameters from a YAML file")
    r.add_argument(
        "--preset",
        help="one of the notebook's presets (smoke, cpu, gpu, paper; its study cell lists "
        "them); default: the one its parameters cell names",
    )
    r.add_argument("--force", action="store_true", help="execute again even if this run completed")
    r.add_argument("--runs-root", default="runs/notebooks")
    r.add_argument("--log-output", action="store_true", help="stream the notebook's output")
    add_executor_flags(r)
    r.set_defaults(func=cmd_run)
    fg = sub.add_parser("figures", help="run every notebook as needed and regenerate every figure and table")
    fg.add_argument("--preset", default="cpu", help="smoke, cpu (default), gpu or paper")
    fg.add_argument("--out", help="figure root instead of the preset's (figures/ for cpu, runs/<preset>/figures else)")
    fg.add_argument("--runs-root", help="root of training runs and executed notebooks instead of runs/")
    add_executor_flags(fg)
    fg.set_defaults(func=cmd_figures)
    rs = sub.add_parser("runs", help="a line per run under a folder: status, progress, last metrics, time")
    rs.add_argument("dir", help="a folder of runs: a grid's, a study's (runs/<preset>/<study>/...), or runs/")
    rs.set_defaults(func=cmd_runs)
    tb = sub.add_parser("tensorboard", help="TensorBoard on a folder of runs (each run directory one TensorBoard run)")
    tb.add_argument("runs", nargs="?", default="runs", help="the folder (default: runs)")
    tb.add_argument("--port", type=int, default=6006)
    tb.add_argument("--host", default="localhost", help="the address it listens on (0.0.0.0: every interface)")
    tb.set_defaults(func=cmd_tensorboard)
    nbs = sub.add_parser("notebooks", help="the study notebooks: question, presets, outputs (README's table)")
    nbs.set_defaults(func=cmd_notebooks)
    b = sub.add_parser("bench", help="time per step, img/s and memory per method, ratios to sgd")
    b.add_argument(
        "--model", default="tiny_cnn", help="a registered model (gvr-lab list), module:callable or timm/<name>"
    )
    b.add_argument("--shape", default="1x28", help="input channels x size: 1x28 (Fashion-MNIST) or 3x32 (CIFAR)")
    b.add_argument("--num-classes", type=int, default=10)
    b.add_argument("--batch-size", type=int, default=128)
    b.add_argument(
        "--methods",
        nargs="+",
        default=["sgd"],
        metavar="NAME[:K=V,...]",
        help="methods with optional hyperparameters, e.g. gvr:penalty=closed_form,target=fc; 'all': every "
        "registered method's benchmark rows (Method.bench_rows)",
    )
    b.add_argument("--device", default="auto")
    b.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="auto: bf16 autocast on CUDA (as training), fp32 on the CPU",
    )
    b.add_argument(
        "--cuda-settings",
        action="store_true",
        help="the CUDA configuration on any device: fused SGD, bf16 under auto",
    )
    b.add_argument("--compile", action="store_true", help="torch.compile the model where the method allows it")
    b.add_argument("--steps", type=int, default=5, help="steps per timed round")
    b.add_argument("--warmup", type=int, default=3, help="untimed steps per method first")
    b.add_argument("--rounds", type=int, default=5, help="timed rounds per method (median reported)")
    b.add_argument("--profile", action="store_true", help="also print torch.profiler's top ops of each method")
    b.add_argument("--hvp", action="store_true", help="also time one Hessian-vector product (curvature's unit)")
    b.add_argument("--json", help="also write the report as JSON here")
    b.add_argument(
        "--into",
        metavar="FILE.md",
        help="and write its table and verdicts into this markdown file "
        "(in place of the block of the same JSON, else appended): BENCHMARKS.md",
    )
    b.set_defaults(func=cmd_bench)
    bg = sub.add_parser(
        "bench-grid", help="runs per hour of the claims study's grid: one 2-thread run at a time against the defaults"
    )
    bg.add_argument("--protocol", help="the claims study's protocol (default: notebooks/claims_protocol.toml)")
    bg.add_argument("--preset", default="cpu", help="whose arms make the grid")
    bg.add_argument("--seeds", type=int, default=1, help="the grid's first seeds of the preset")
    bg.add_argument("--json", help="write the measurements here")
    bg.add_argument("--into", metavar="FILE.md", help="and their table into this markdown file (BENCHMARKS.md)")
    bg.set_defaults(func=cmd_bench_grid)
    rg = sub.add_parser(
        "register", help="register a preset's protocol block (the pilot's pilot_protocol.toml) in the claims protocol"
    )
    rg.add_argument("block", help="a TOML file with one [presets.<name>] block")
    rg.add_argument("--protocol", help="the claims study's protocol (default: notebooks/claims_protocol.toml)")
    rg.set_defaults(func=cmd_register)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        status = args.func(args)
        sys.stdout.flush()  # here, where a reader gone away is caught, not at exit
        return status
    except UsageError as e:
        print(f"gvr-lab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gvr-lab: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not reader_gone(sys.stdout):  # a worker's or a socket's pipe: a real failure
            raise
        # `gvr-lab runs DIR | head`: stop quietly, as other commands do; what is still buffered goes
        # nowhere, so flushing it at exit cannot raise again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE


def reader_gone(stream) -> bool:
    """Whether `stream` is a pipe whose reading end is closed (poll reports an error on its end)."""
    try:
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLERR)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll on this platform, or not a real file
        return False


if __name__ == "__main__":
    sys.exit(main())
