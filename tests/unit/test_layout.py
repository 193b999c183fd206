"""The package layout as docs/DESIGN.md ("Architecture") describes it: layers that only
import downwards, no import circles (function-level imports included), a docstring at
the top of every module, and every sub-package installed."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from runs import ROOT

PACKAGE = ROOT / "daemon"
# Lowest first. A module may import from its own package or from a lower layer; the
# packages of one layer do not import each other.
CONTRACTS = {"errors", "rundir", "config", "testhooks", "__init__"}  # top-level modules: one home per contract
LAYERS = [
    {"contracts"},
    {"runtime"},      # the guards around the loop; no MLX at import
    {"modelio"},      # models in (convert, GGUF), adapters out (export, fuse)
    {"training"},     # data, model, step, checkpointing, the loop
    {"evaluation", "service"},
    {"demo"},
    {"cli"},
    {"__main__"},
]


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(("mathlora_daemon",) + parts).removesuffix(".__init__")
        out[name] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every mathlora_daemon module this one imports, at module level or in a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mathlora_daemon"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mathlora_daemon"))
    return {m for m in found if m in known and m != name}


def layer_of(name: str) -> tuple[int, str]:
    top = name.split(".")[1] if "." in name else "__init__"
    top = "contracts" if top in CONTRACTS else top
    for index, layer in enumerate(LAYERS):
        if top in layer:
            return index, top
    raise AssertionError(f"{name}: its package {top!r} is in no layer of LAYERS (add it, and to docs/DESIGN.md)")


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_belongs_to_a_layer_and_imports_only_downwards():
    wrong = []
    for name, deps in graph().items():
        here, pkg = layer_of(name)
        for dep in deps:
            there, dep_pkg = layer_of(dep)
            if dep_pkg != pkg and there >= here:
                wrong.append(f"{name} imports {dep} ({dep_pkg} is not below {pkg})")
    assert not wrong, "\n".join(sorted(wrong))


def test_there_are_no_import_circles():
    edges = graph()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in edges[node]:
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    # A package's __init__ re-exporting its modules would be fine; ours re-export nothing.
    assert not circles, circles


def test_every_module_says_what_it_holds():
    missing = [str(path.relative_to(ROOT)) for path in sorted(PACKAGE.rglob("*.py")) + sorted(
        (ROOT / "checkpoints").rglob("*.py")) if ast.get_docstring(ast.parse(path.read_text())) is None]
    assert not missing, f"modules without a docstring: {missing}"


def test_every_command_s_front_end_is_in_the_cli():
    """One CLI style (docs/DESIGN.md, "Architecture"): a command's front-end, what it prints
    and its exit code, lives in cli/; the layers below return data. A `*_main` function
    anywhere else is a front-end in the wrong place."""
    misplaced = []
    for path in sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "checkpoints").rglob("*.py")):
        if path.is_relative_to(PACKAGE / "cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.endswith("_main"):
                misplaced.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not misplaced, ("command front-ends outside daemon/cli/ (move the printing up into cli/, keep a "
                           "function that returns data below): " + ", ".join(misplaced))


def test_every_sub_package_is_installed():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(project["tool"]["setuptools"]["packages"])
    on_disk = {".".join(("mathlora_daemon",) + p.parent.relative_to(PACKAGE).parts)
               for p in PACKAGE.rglob("__init__.py")} | {"mathlora_checkpoints"}
    assert listed == on_disk
    assert project["tool"]["setuptools"]["package-dir"] == {"mathlora_daemon": "daemon",
                                                             "mathlora_checkpoints": "checkpoints"}


# Where a RunDir may be built (docs/DESIGN.md, "Run directory"): the CLI builds the one
# every layer below receives, from --run-dir (`run --debug`: its variant, by
# dataclasses.replace); anywhere else a function takes the RunDir it is given, with
# `run.root` for the bare path. `RunDir(Path())` (the names inside a run directory,
# relative) is fine anywhere. Keys: a module, or module:function for one function only.
RUNDIR_BUILDERS = {
    "rundir.py": "the class itself",
    "cli/arguments.py": "--run-dir, parsed once",
    "service/install.py:example_plist": "the documented example's made-up --run-dir",
}


def _rundir_calls(tree: ast.AST, functions: tuple[str, ...] = ()):
    """(line, enclosing function names) of every RunDir(...) call but RunDir(Path())."""
    for node in ast.iter_child_nodes(tree):
        inside = functions + (node.name,) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else functions
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            names_only = (len(node.args) == 1 and not node.keywords and isinstance(node.args[0], ast.Call)
                          and getattr(node.args[0].func, "id", None) == "Path" and not node.args[0].args)
            if name == "RunDir" and not names_only:
                yield node.lineno, inside
        yield from _rundir_calls(node, inside)


def test_only_the_cli_builds_a_run_directory():
    built = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(PACKAGE).as_posix()
        for line, functions in _rundir_calls(ast.parse(path.read_text())):
            if module not in RUNDIR_BUILDERS and not any(f"{module}:{f}" in RUNDIR_BUILDERS for f in functions):
                built.append(f"daemon/{module}:{line}")
    assert not built, ("RunDir(...) built from a path outside the CLI (take the RunDir the caller passes, "
                       "run.root for the bare path): " + ", ".join(built))
