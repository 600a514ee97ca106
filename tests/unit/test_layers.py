"""The package's layers: a module imports only its own layer or lower ones, and no modules import each other
in a circle, so a layer can be read, tested and replaced without the ones above it.

Function-level imports count like module-level ones. A function-level import of a project module is
legitimate only as a lazy import that keeps a heavy optional dependency off the import path (a fast
`s2l --help`, no torch where only a client is needed). A `# lazy:` comment on its line, or on a comment line
just above, names at least one such dependency, free text around it allowed:

    from megatron_s2l import platform  # lazy: torch (a fast --help)

A named module counts if the imported module loads it (at module level, itself or through project modules
it imports) and the importing module does not already.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import sys
from pathlib import Path

from tests.utils import REPO

PACKAGE = "megatron_s2l"
# Low to high. A module belongs to the layer of its first component under the package (rollout.x: rollout);
# "__init__" is the package root itself, empty and below everything.
LAYERS = [{"__init__", "config", "platform", "seeding"}, {"model", "reward", "data", "toy"},
          {"algo", "rollout"}, {"eval", "metrics"}, {"train", "preflight"}, {"cli", "pool_cli"}]
LAZY = re.compile(r"#\s*lazy:(.*)$")


@dataclasses.dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported project module (the package for a name its __init__ defines)
    file: str  # the source's file, relative to the root
    line: int
    scope: str  # "module", "function" (a lazy import) or "typing" (under `if TYPE_CHECKING:`)
    lazy_for: tuple[str, ...]  # the words of its `# lazy:` comment


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package under `root`, by dotted name."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _walk(node: ast.AST, scope: str = "module"):
    """(statement, scope) for every import statement under `node`, however nested."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, scope
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _walk(child, "function")
        elif scope == "module" and isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            yield from _walk(ast.Module(child.body, []), "typing")
            yield from _walk(ast.Module(child.orelse, []), scope)
        else:
            yield from _walk(child, scope)


def _names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Absolute names a statement imports; `from a import b, c`: [a, a.b, a.c] (b, c may be attributes)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: up from the module's package
        parts = module.split(".")
        base = ".".join(parts[: len(parts) - node.level + is_package] + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def _lazy_for(lines: list[str], node: ast.stmt) -> tuple[str, ...]:
    above = lines[node.lineno - 2] if node.lineno > 1 else ""
    for text in lines[node.lineno - 1: node.end_lineno] + ([above] if above.lstrip().startswith("#") else []):
        found = LAZY.search(text)
        if found:
            return tuple(re.findall(r"[A-Za-z_]\w*", found.group(1)))
    return ()


def project_imports(root: Path, package: str) -> list[Import]:
    """Every import of a project module by a project module: module- and function-level, TYPE_CHECKING
    blocks too (a type-only import still ties the two modules together)."""
    modules = module_names(root, package)
    imports = []
    for module, path in modules.items():
        text = path.read_text()
        for node, scope in _walk(ast.parse(text)):
            names = _names(node, module, path.name == "__init__.py")
            if isinstance(node, ast.ImportFrom):  # the submodules named, and the package for its attributes
                submodules = [name for name in names[1:] if name in modules]
                names = submodules + names[:1] * (len(submodules) < len(names) - 1)
            for name in names:
                while name and name not in modules:  # an attribute of a module, or not ours at all
                    name = name.rpartition(".")[0]
                if name:
                    imports.append(Import(module, name, path.relative_to(root).as_posix(), node.lineno,
                                          scope, _lazy_for(text.splitlines(), node)))
    return imports


def _component(module: str) -> str:
    return (module.split(".") + ["__init__"])[1]


def layer_of(module: str, layers: list[set[str]]) -> int | None:
    return next((level for level, names in enumerate(layers) if _component(module) in names), None)


def unlayered(root: Path, package: str, layers: list[set[str]]) -> list[str]:
    return sorted({f"{package}/{_component(module)}" for module in module_names(root, package)
                   if layer_of(module, layers) is None})


def upward_imports(imports: list[Import], layers: list[set[str]]) -> list[str]:
    """Imports of a higher layer (an unlayered module is test_every_module_is_in_a_layer's to report)."""
    found = []
    for i in imports:
        source, target = layer_of(i.source, layers), layer_of(i.target, layers)
        if None not in (source, target) and target > source:
            found.append(f"{i.file}:{i.line} {i.source} (layer {source}) imports {i.target} (layer {target})")
    return sorted(found)


def import_cycles(imports: list[Import]) -> list[str]:
    """Import cycles as paths `a -> b -> a`: the shortest through each module not on one reported already."""
    graph: dict[str, set[str]] = {}
    for i in imports:
        graph.setdefault(i.source, set()).add(i.target)
    cycles, reported = [], set()
    for start in sorted(graph):
        path = None if start in reported else _path_back(graph, start)
        if path:
            cycles.append(" -> ".join(path))
            reported |= set(path)
    return cycles


def _path_back(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """The shortest import path from `start` back to itself (breadth first), or None."""
    parents, frontier = {}, [start]
    while frontier:
        following = []
        for module in frontier:
            for target in sorted(graph.get(module, ())):
                if target == start:
                    path = [module]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return path[::-1] + [start]
                if target not in parents:
                    parents[target] = module
                    following.append(target)
        frontier = following
    return None


def unjustified_lazy_imports(root: Path, package: str, imports: list[Import]) -> list[str]:
    """Function-level project imports without a `# lazy:` comment, or whose comment names none of the
    non-stdlib modules the import defers (loaded by the imported module, not yet by the importing one)."""
    modules = module_names(root, package)
    external = {module: {name.split(".")[0] for node, scope in _walk(ast.parse(path.read_text()))
                         if scope == "module" for name in _names(node, module, path.name == "__init__.py")}
                - {package} for module, path in modules.items()}
    eager: dict[str, set[str]] = {}
    for i in imports:
        if i.scope == "module":
            eager.setdefault(i.source, set()).add(i.target)

    def loads(module: str) -> set[str]:
        """Top-level names of the non-project modules that importing `module` imports."""
        seen, stack = {module}, [module]
        while stack:
            for target in eager.get(stack.pop(), set()) - seen:
                seen.add(target)
                stack.append(target)
        return set().union(*(external[name] for name in seen))

    problems = []
    for i in (i for i in imports if i.scope == "function"):
        deferred = sorted(loads(i.target) - loads(i.source) - sys.stdlib_module_names)
        if not set(i.lazy_for) & set(deferred):
            problems.append(f"{i.file}:{i.line} imports {i.target} in a function, deferring "
                            f"{deferred or 'nothing'}, without a `# lazy:` comment naming that")
    return problems


# ---------------------------------------------------------------------------------------------- the package

def test_every_module_is_in_a_layer():
    missing = unlayered(REPO, PACKAGE, LAYERS)
    assert not missing, f"add {missing} to LAYERS in tests/unit/test_layers.py"


def test_no_module_imports_a_higher_layer_or_in_a_cycle():
    imports = project_imports(REPO, PACKAGE)
    problems = upward_imports(imports, LAYERS) + [f"import cycle: {path}" for path in import_cycles(imports)]
    assert not problems, "\n".join(problems)


def test_function_level_imports_say_what_they_defer():
    problems = unjustified_lazy_imports(REPO, PACKAGE, project_imports(REPO, PACKAGE))
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- the checks on a made-up package

def _fake_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checks_find_upward_imports_cycles_and_unlayered_modules(tmp_path):
    root = _fake_package(tmp_path, {
        "__init__.py": "",
        "low.py": "def f():\n    from .mid import thing  # lazy: numpy\n",  # upward, lazy or not
        "mid/__init__.py": "import numpy\nthing = 1\n",
        "mid/a.py": "from . import b\nif TYPE_CHECKING:\n    from pkg import high\n",  # relative; type-only
        "mid/b.py": "import pkg.mid.a\nif True:\n    from pkg.high import c\n",  # a cycle; upward
        "high.py": "from pkg import low\nfrom pkg.low import f\n",
        "extra.py": "import pkg\n",
    })
    imports = project_imports(root, "pkg")
    assert {(i.source, i.target) for i in imports} == {
        ("pkg.low", "pkg.mid"), ("pkg.mid.a", "pkg.mid.b"), ("pkg.mid.b", "pkg.mid.a"),
        ("pkg.mid.b", "pkg.high"), ("pkg.high", "pkg.low"), ("pkg.extra", "pkg"), ("pkg.mid.a", "pkg.high")}
    layers = [{"__init__", "low"}, {"mid"}, {"high"}]
    assert unlayered(root, "pkg", layers) == ["pkg/extra"]
    assert upward_imports(imports, layers) == [
        "pkg/low.py:2 pkg.low (layer 0) imports pkg.mid (layer 1)",
        "pkg/mid/a.py:3 pkg.mid.a (layer 1) imports pkg.high (layer 2)",
        "pkg/mid/b.py:3 pkg.mid.b (layer 1) imports pkg.high (layer 2)"]
    assert import_cycles(imports) == ["pkg.mid.a -> pkg.mid.b -> pkg.mid.a"]
    (root / "pkg" / "mid" / "__init__.py").write_text("from pkg.high import f\n")  # high, low, mid, high
    assert import_cycles(project_imports(root, "pkg")) == ["pkg.high -> pkg.low -> pkg.mid -> pkg.high",
                                                           "pkg.mid.a -> pkg.mid.b -> pkg.mid.a"]


def test_a_function_level_import_must_name_a_dependency_it_defers(tmp_path):
    root = _fake_package(tmp_path, {
        "__init__.py": "",
        "heavy.py": "import torch.nn\n",
        "via.py": "from pkg import heavy\n",
        "light.py": "import json\n",
        "user.py": ("def f():\n"
                    "    from pkg import via  # lazy: torch and megatron (a fast --help)\n"  # through via
                    "    # lazy: torch\n"
                    "    from pkg.heavy import (\n        x)\n"
                    "    from pkg import light  # lazy: torch\n"
                    "    import pkg.light\n"  # the comment above is another statement's
                    "    import pkg.heavy\n"),
        "eager.py": "import torch\n\n\ndef f():\n    from pkg import heavy  # lazy: torch\n",
        "typed.py": ("if TYPE_CHECKING:\n    import pkg.heavy\n\n\n"  # not loaded at run time
                     "def f():\n    import pkg.heavy  # lazy: torch\n"),
    })
    unnamed = "without a `# lazy:` comment naming that"
    assert unjustified_lazy_imports(root, "pkg", project_imports(root, "pkg")) == [
        f"pkg/eager.py:5 imports pkg.heavy in a function, deferring nothing, {unnamed}",  # eager.py has torch
        f"pkg/user.py:6 imports pkg.light in a function, deferring nothing, {unnamed}",  # json: stdlib
        f"pkg/user.py:7 imports pkg.light in a function, deferring nothing, {unnamed}",
        f"pkg/user.py:8 imports pkg.heavy in a function, deferring ['torch'], {unnamed}"]
