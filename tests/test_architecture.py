"""The architecture stays as ``docs/architecture.md`` draws it (issue 30).

The import graph is read from the source (every ``import`` / ``from ... import`` of every
module of ``sdsctl/`` and ``plugins/``, at any depth: in functions and under
``TYPE_CHECKING`` too; a package's ``__init__`` is a module of its own), not from what
happens to be imported at run time, so a cycle hidden in a function fails here as well.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: edges left out of the cycle check, each with the reason and when it goes
ALLOWED_EDGES: set[tuple[str, str]] = set()  # (importer, imported) pairs excused from the checks: none


def module_files() -> dict[str, Path]:
    """Import name -> file, for every module of sdsctl/ and plugins/ (installed as ``sdsctl_plugins``)."""
    files = sorted(ROOT.glob("sdsctl/**/*.py")) + sorted(ROOT.glob("plugins/**/*.py"))
    out = {}
    for path in files:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[0] == "plugins":
            parts[0] = "sdsctl_plugins"
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _project_name(name: str) -> str:
    return "sdsctl_plugins" + name[len("plugins"):] if name == "plugins" or name.startswith("plugins.") else name


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The project's modules that ``module`` imports anywhere in its file.

    ``import a.b`` counts ``a.b``; ``from P import n`` counts ``P`` and, where ``P.n`` is a
    module, ``P.n`` too. Relative imports are resolved against the module's package.
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [_project_name(alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = _project_name(node.module or "")
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # ``import a.b.c`` of a non-module: its closest module
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {module: imports(module, path, set(files)) for module, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _describe(component: list[str], graph: dict[str, set[str]]) -> str:
    members = set(component)
    return "; ".join(f"{m} -> {', '.join(sorted(graph[m] & members))}" for m in component)


def test_the_graph_sees_imports_in_functions_and_under_type_checking():
    graph = import_graph()
    assert "sdsctl.components" in graph["sdsctl.plugins"]  # imported inside registrations()
    assert "sdsctl.models.base" in graph["sdsctl.components"]  # imported under TYPE_CHECKING
    assert "sdsctl.models.base" in graph["sdsctl.models"] and "sdsctl.models.sources" in graph["sdsctl.models.base"]


def test_no_module_imports_a_module_that_imports_it_back():
    graph = import_graph()
    graph = {m: {t for t in targets if (m, t) not in ALLOWED_EDGES} for m, targets in graph.items()}
    found = cycles(graph)
    assert not found, "import cycles: " + " | ".join(_describe(c, graph) for c in found)


def test_the_cycle_check_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert "a -> b" in _describe(["a", "b", "c"], graph)


#: core modules that still import the shapes world, each with the reason and when it goes
# compare→shapes.evaluate (the default prompt pairs): moved with the sweep split
SHAPES_IMPORTERS_ALLOWED: set[str] = set()


def test_the_core_does_not_import_the_shapes_world():
    """The shapes world (``sdsctl/shapes``) sits on the core, not under it: the core reaches the
    judge through the plugin manager (a metric) and vocabulary checks through the model."""
    graph = import_graph()
    wrong = {m: sorted(t for t in targets if t == "sdsctl.shapes" or t.startswith("sdsctl.shapes."))
             for m, targets in graph.items()
             if m.startswith("sdsctl") and not m.startswith(("sdsctl.shapes", "sdsctl_plugins"))}
    wrong = {m: t for m, t in wrong.items() if t and m not in SHAPES_IMPORTERS_ALLOWED}
    assert not wrong, f"core modules importing the shapes world: {wrong}"


def entry_point_modules() -> set[str]:
    """The modules the ``sdsctl`` entry-point group names (the first-party plugins)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {value.split(":")[0] for value in project["entry-points"]["sdsctl"].values()}


def test_plugins_do_not_import_each_other():
    """A first-party plugin uses sdsctl's public API (and, at most, a helper module of
    ``plugins/`` that is no plugin itself), never another plugin's module."""
    graph = import_graph()
    plugins = entry_point_modules()
    assert plugins <= set(graph), sorted(plugins - set(graph))
    wrong = {m: sorted(graph[m] & (plugins - {m})) for m in sorted(plugins) if graph[m] & (plugins - {m})}
    assert not wrong, f"plugins importing other plugins: {wrong}"


def test_plugins_use_no_private_names_of_sdsctl():
    for module, path in module_files().items():
        if not module.startswith("sdsctl_plugins"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sdsctl"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{module} imports private names of {node.module}: {private}"
                assert not any(part.startswith("_") for part in (node.module or "").split(".")), module


HEAVY = ("torch", "diffusers", "transformers", "numpy", "PIL")


def test_help_imports_no_heavy_library():
    """``sdsctl --help`` loads every plugin (they may add commands) but none of the heavy
    libraries: plugins import torch, diffusers, transformers, numpy and PIL inside the
    functions that use them."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from sdsctl.cli import create_app\n"
        "for args in (['--help'], ['run', '--help'], ['compare', '--help']):\n"
        "    result = CliRunner().invoke(create_app(), args)\n"
        "    assert result.exit_code == 0 and 'Usage' in result.output, result.output\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SDSCTL_LOAD_PLUGINS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"imported by `sdsctl --help`: {out.stdout.strip()}"


def test_ci_lints_before_it_tests():
    """CI runs ruff (configured in pyproject.toml, installed by the test extra) before the tests."""
    import tomllib

    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    lint = next(i for i, line in enumerate(ci) if "ruff check ." in line and not line.lstrip().startswith("#"))
    test = next(i for i, line in enumerate(ci) if line.startswith("python3 -m venv .venv") and line.endswith("pytest"))
    assert lint < test
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert any(d.startswith("ruff") for d in project["project"]["optional-dependencies"]["test"])
    assert project["tool"]["ruff"]["line-length"] and project["tool"]["ruff"]["lint"]["select"]


def documented_layers() -> dict[str, int]:
    """Path -> layer, from the tables under ``## Modules`` of docs/architecture.md
    (each under a heading ``### <layer> · <name>``)."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    modules = text.split("\n## Modules\n", 1)[1].split("\n## ", 1)[0]
    found: dict[str, int] = {}
    for section in modules.split("\n### ")[1:]:
        heading, _, body = section.partition("\n")
        layer = int(heading.split("·")[0].strip())
        for path in re.findall(r"^\| `([^`]+)` \|", body, flags=re.M):
            assert path not in found, f"{path} is listed twice"
            found[path] = layer
    return found


def test_docs_list_every_module_in_its_layer():
    layers = documented_layers()
    files = {str(path.relative_to(ROOT)) for path in module_files().values()}
    missing = sorted(files - set(layers))
    assert not missing, f"modules missing from docs/architecture.md (## Modules): {missing}"
    stale = sorted(p for p in layers if not (ROOT / p).exists())
    assert not stale, f"docs/architecture.md lists modules that do not exist: {stale}"


def test_imports_point_down_the_layers():
    """A module imports only modules of its own layer or of a lower one (docs/architecture.md)."""
    layers = documented_layers()
    files = module_files()
    layer = {name: layers[str(path.relative_to(ROOT))] for name, path in files.items()}
    graph = import_graph()
    upward = [f"{m} ({layer[m]}) -> {t} ({layer[t]})" for m in sorted(graph) for t in sorted(graph[m])
              if layer[t] > layer[m] and (m, t) not in ALLOWED_EDGES]
    assert not upward, "imports pointing up the layers: " + "; ".join(upward)


def package_of(module: str) -> str:
    """The room a module lives in: ``api`` (the modules at the package's top and ``models``),
    ``engine``, ``experiments``, ``diagnostics``, ``shapes``, ``cli`` or ``plugins``."""
    parts = module.split(".")
    if parts[0] == "sdsctl_plugins":
        return "plugins"
    if len(parts) > 1 and parts[1] in ("engine", "experiments", "diagnostics", "shapes", "cli"):
        return parts[1]
    return "api"


#: the packages each package may import (docs/architecture.md, "Packages")
PACKAGE_RULE = {
    "api": {"api"},
    "engine": {"api", "engine"},
    "experiments": {"api", "engine", "experiments"},
    "diagnostics": {"api", "engine", "diagnostics"},
    "shapes": {"api", "engine", "shapes"},
}


def package_violations(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} -> {t}" for m in sorted(graph) for t in sorted(graph[m])
            if package_of(m) in PACKAGE_RULE and package_of(t) not in PACKAGE_RULE[package_of(m)]]


def test_packages_import_only_the_packages_below_them():
    wrong = package_violations(import_graph())
    assert not wrong, "imports across the package rule: " + "; ".join(wrong)


def test_the_package_rule_sees_a_wrong_import():
    graph = {"sdsctl.engine.loop": {"sdsctl.components", "sdsctl.experiments.compare"},
             "sdsctl.diagnostics.doctor": {"sdsctl.engine.runread", "sdsctl.shapes.judge"},
             "sdsctl.models.sdxl": {"sdsctl.errors"}, "sdsctl.cli": {"sdsctl.shapes.commands"}}
    assert package_violations(graph) == ["sdsctl.diagnostics.doctor -> sdsctl.shapes.judge",
                                         "sdsctl.engine.loop -> sdsctl.experiments.compare"]


def test_every_command_front_end_lives_beside_its_logic():
    """No command front-end is left in ``plugins/``: the entry points of commands point into sdsctl."""
    commands = {name: target for name, target in _entry_points().items() if "command" in name}
    assert commands and all(target.startswith("sdsctl.") for target in commands.values()), commands


def _entry_points() -> dict[str, str]:
    import tomllib

    return dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["sdsctl"])
