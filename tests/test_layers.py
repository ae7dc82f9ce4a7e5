"""The package's structure, drawn from its code: modules in layers, each importing only from its own
layer or those below, no import circle, and no import inside a function but of optional
dependencies and the CLI's lazy start."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "gvr_lab"

# Lowest first. A module may import from its own layer (without a circle) or a lower one.
LAYERS = [
    {"errors", "distributed", "pools"},
    {"data", "models", "quant", "results", "optim", "loggers"},
    {"methods"},  # methods/__init__, base.py and one module per family
    {"landscape"},
    {"training"},
    {"stats", "plots", "terms"},
    {"collect"},
    {"cluster", "grid", "measure", "progress"},
    {"bench", "grid_bench", "claims", "study", "runner", "lab"},
    {"plugins"},  # imports the modules other packages name, which use the whole package
    {"cli", "__init__", "__main__"},
]
# What may be imported inside a function: optional dependencies, and TensorBoard's writer (torch's
# module imports TensorBoard, 0.5 s), loaded only when used.
OPTIONAL = {"ray", "IPython", "papermill", "jupytext", "nbformat", "ipykernel", "traitlets", "playwright", "timm",
            "wandb", "tensorboard", "torch.utils.tensorboard"}  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0] if parts[0] == "methods" else parts[-1]


def imports(path: Path):
    """(imported gvr_lab module, inside a function?, line) of a file, relative imports resolved."""
    tree = ast.parse(path.read_text())
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}  # fmt: skip
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(package[: len(package) - node.level + 1])
            target = base + (node.module.split(".") if node.module else [])
            names = [".".join(target + [a.name]) for a in node.names]
            for name in names if not node.module else [".".join(target)]:
                yield name, id(node) in inner, node.lineno
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for name in names:
                yield name, id(node) in inner, node.lineno


def layer_of(dotted: str) -> int | None:
    parts = dotted.split(".")
    if parts[0] != "gvr_lab" or len(parts) == 1:
        return None
    name = "methods" if parts[1] == "methods" else parts[1]
    return next((i for i, layer in enumerate(LAYERS) if name in layer), None)


def graph() -> dict:
    edges = {}
    for path in PACKAGE.rglob("*.py"):
        edges[path] = [(name, inner, line) for name, inner, line in imports(path)]
    return edges


def test_every_module_has_a_layer():
    assert all(layer_of(f"gvr_lab.{module_name(p)}") is not None for p in PACKAGE.rglob("*.py")), sorted(
        module_name(p) for p in PACKAGE.rglob("*.py") if layer_of(f"gvr_lab.{module_name(p)}") is None
    )


def test_no_module_imports_from_a_higher_layer():
    upward = []
    for path, edges in graph().items():
        own = layer_of(f"gvr_lab.{module_name(path)}")
        for name, _, line in edges:
            target = layer_of(name)
            if target is not None and target > own:
                upward.append(f"{path.name}:{line} imports {name}")
    assert upward == []


def test_the_import_graph_has_no_circle():
    edges = {}
    for path, imported in graph().items():
        source = module_name(path)
        edges.setdefault(source, set()).update(
            name.split(".")[1] if name.split(".")[1] != "methods" else "methods"
            for name, _, _ in imported if name.startswith("gvr_lab.") and len(name.split(".")) > 1
        )  # fmt: skip
    for module in edges:
        edges[module].discard(module)
    seen, stack = set(), set()

    def visit(module, path=()):
        assert module not in stack, f"import circle: {' -> '.join((*path, module))}"
        if module in seen:
            return
        stack.add(module)
        for other in edges.get(module, ()):
            visit(other, (*path, module))
        stack.discard(module)
        seen.add(module)

    for module in edges:
        visit(module)


def test_imports_inside_functions_are_of_optional_dependencies_or_the_clis_lazy_start():
    found = [
        f"{path.name}:{line} imports {name}"
        for path, edges in graph().items()
        for name, inner, line in edges
        if inner and path.name != "cli.py" and not any(name == o or name.startswith(f"{o}.") for o in OPTIONAL)
    ]
    assert found == []
