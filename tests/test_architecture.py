"""The shape of ``src/layerzero``, read with ``ast``: one-way imports, no borrowed privates, small units.

Four rules, each checked exactly (no sampling, no heuristics):

* **no import cycles** among layerzero modules. Every ``import`` counts wherever it is written
  (module level, inside a function or a ``try``), and so does ``importlib.import_module`` with a
  constant name; only imports under ``if TYPE_CHECKING:`` are left out (they never run). An import
  is an edge to the module it names (``from a.b import c`` names ``a.b.c`` when that is a module,
  else ``a.b``), not to the packages above it. A violation is an edge that lies on a cycle (both
  ends in one strongly connected component), so breaking a cycle removes all of its edges;
* **no private name from another module**: ``from layerzero.m import _x`` outside ``layerzero.m``;
  a private *module* (``layerzero.pkg._m``) is private to its package and may be imported only
  from inside ``layerzero.pkg``;
* **no module over 600 lines** and **no function over 80 lines** (``def`` line to last line,
  methods and nested functions included).

``KNOWN_VIOLATIONS`` names the violations that exist today outside the packages this test was
written with (cli, doctor, timing, backends). It may only shrink: a violation that is not listed
fails the test, and so does an entry that no longer occurs (delete it once it is fixed).
"""

from __future__ import annotations

import ast
import re
import importlib
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from layerzero.backends import BUILTIN_BACKENDS
from layerzero.backends.base import Backend
from layerzero.registry import BackendRegistry, KernelRegistry

SRC = Path(__file__).resolve().parents[1] / "src" / "layerzero"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80

# Modules that must have no violation at all (and no entry in KNOWN_VIOLATIONS).
CLEAN_AREAS = ("layerzero.cli", "layerzero.doctor", "layerzero.timing", "layerzero.backends", "layerzero.runtime",
               "layerzero.ops", "layerzero.policy", "layerzero.config_file", "layerzero.bench")

# Violations outside CLEAN_AREAS on the day this test was written, each to be deleted when fixed.
# Formats: "cycle: A -> B" (the import of B in A lies on a cycle), "private: A imports B.name",
# "module-lines: A", "function-lines: A:Qual.name".
KNOWN_VIOLATIONS: frozenset[str] = frozenset()  # none left: every violation fixed


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    tree: ast.Module
    lines: int
    is_package: bool


def _modules(root: Path = SRC) -> dict[str, Module]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        text = path.read_text(encoding="utf-8")
        name = ".".join(parts)
        out[name] = Module(name, path, ast.parse(text, str(path)), len(text.splitlines()), is_package)
    for path in sorted(root.rglob("*.c")):  # a compiled module (layerzero._accel): it imports no layerzero module
        name = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        text = path.read_text(encoding="utf-8")
        out[name] = Module(name, path, ast.Module(body=[], type_ignores=[]), len(text.splitlines()), False)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Every node under ``node`` except the bodies of ``if TYPE_CHECKING:`` (their ``else`` runs)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.orelse:
                yield stmt
                yield from _runtime_nodes(stmt)
            continue
        yield child
        yield from _runtime_nodes(child)


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # the layerzero module the import runs
    names: tuple[str, ...]  # names taken from ``target`` (``from target import a, b``); () for ``import``
    lineno: int


def _resolve(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.name.split(".")
    base = base if module.is_package else base[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: Module, known: dict[str, Module]) -> Iterator[Import]:
    def owner(dotted: str) -> str | None:  # the longest prefix of ``dotted`` that is a layerzero module
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in known:
                return ".".join(parts[:i])
        return None

    for node in _runtime_nodes(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = owner(alias.name)
                if target is not None:
                    yield Import(module.name, target, (), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            base = owner(source)
            if base is None:
                continue
            plain = []
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in known:  # ``from pkg import submodule``
                    yield Import(module.name, sub, (), node.lineno)
                else:
                    plain.append(alias.name)
            if plain or not node.names:
                yield Import(module.name, base, tuple(plain), node.lineno)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and ast.unparse(node.func) in (
                    "importlib.import_module", "import_module"):
            target = owner(node.args[0].value)
            if target is not None:
                yield Import(module.name, target, (), node.lineno)


def _graph(modules: dict[str, Module]) -> dict[str, list[Import]]:
    return {name: [i for i in _imports(m, modules) if i.target != name] for name, m in modules.items()}


def _components(graph: dict[str, list[Import]]) -> dict[str, int]:
    """Tarjan's strongly connected components (iterative): module -> component number."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    comp: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for edge in edges:
                nxt = edge.target
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(graph[nxt])))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        comp[member] = index[node]
                        if member == node:
                            break
    return comp


def _private_scope(target: str, name: str, modules: dict[str, Module]) -> tuple[str, bool] | None:
    """Where a private part of ``target.name`` may be imported from: ``(scope, subtree)``, or None if public.

    A private module (``pkg._m``) may be imported anywhere under its package (``subtree`` True); a private
    name (``m._x``, also in a package's ``__init__``) only by its own module, which never imports itself.
    """
    parts = f"{target}.{name}".split(".") if name else target.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not (part.startswith("__") and part.endswith("__")):
            return ".".join(parts[:i]), ".".join(parts[: i + 1]) in modules
    return None


def cycle_violations(modules: dict[str, Module]) -> set[str]:
    graph = _graph(modules)
    comp = _components(graph)
    return {f"cycle: {i.importer} -> {i.target}" for edges in graph.values() for i in edges
            if comp[i.importer] == comp[i.target]}


def private_violations(modules: dict[str, Module]) -> set[str]:
    out = set()
    for edges in _graph(modules).values():
        for imp in edges:
            for name in imp.names or ("",):
                private = _private_scope(imp.target, name, modules)
                if private is None:
                    continue
                scope, subtree = private
                if not (subtree and (imp.importer == scope or imp.importer.startswith(scope + "."))):
                    out.add(f"private: {imp.importer} imports {imp.target}.{name}" if name
                            else f"private: {imp.importer} imports {imp.target}")
    return out


def size_violations(modules: dict[str, Module]) -> set[str]:
    out = {f"module-lines: {m.name}" for m in modules.values() if m.lines > MAX_MODULE_LINES}

    def walk(node: ast.AST, prefix: str, module: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qual = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef) and \
                        (child.end_lineno or child.lineno) - child.lineno + 1 > MAX_FUNCTION_LINES:
                    out.add(f"function-lines: {module}:{qual}")
                walk(child, qual + ".", module)
            else:
                walk(child, prefix, module)

    for m in modules.values():
        walk(m.tree, "", m.name)
    return out


def all_violations(root: Path = SRC) -> set[str]:
    modules = _modules(root)
    return cycle_violations(modules) | private_violations(modules) | size_violations(modules)


# -- the tree as it is -------------------------------------------------------------------------------

def test_no_violation_beyond_the_known_ones() -> None:
    new = all_violations() - KNOWN_VIOLATIONS
    assert not new, "new architecture violations (fix them; KNOWN_VIOLATIONS only shrinks):\n" + "\n".join(sorted(new))


def test_every_known_violation_still_occurs() -> None:
    fixed = KNOWN_VIOLATIONS - all_violations()
    assert not fixed, "fixed: delete these from KNOWN_VIOLATIONS:\n" + "\n".join(sorted(fixed))


def _in_clean_area(name: str) -> bool:
    return any(name == area or name.startswith(area + ".") for area in CLEAN_AREAS)


def test_clean_areas_have_no_known_violation() -> None:
    listed = {v for v in KNOWN_VIOLATIONS
              if any(_in_clean_area(word.split(":")[0]) for word in v.split() if word.startswith("layerzero"))}
    assert not listed


def test_the_scan_sees_the_whole_tree() -> None:
    modules = _modules()
    assert {"layerzero", "layerzero.runtime", "layerzero.cli", "layerzero.doctor", "layerzero.timing",
            "layerzero.backends.torch", "layerzero.backends.torch.fast"} <= set(modules)
    edges = {(i.importer, i.target) for es in _graph(modules).values() for i in es}
    assert ("layerzero.cli.inspect", "layerzero.doctor") in edges  # an import inside a function counts
    assert ("layerzero.backends.torch.fast", "layerzero.backends.torch.attention") in edges


# -- the checker, on small trees written out here ------------------------------------------------------

def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "layerzero"
    for rel, text in {"__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_cycle_through_a_function_level_import_is_found(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "a.py": "from layerzero.b import f\n",
        "b.py": "def f():\n    import layerzero.a\n",
        "c.py": "import layerzero.a\n",  # imports into the cycle, is not on it
    })
    assert all_violations(root) == {"cycle: layerzero.a -> layerzero.b", "cycle: layerzero.b -> layerzero.a"}


def test_type_checking_imports_do_not_count_but_their_else_does(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "a.py": "from layerzero.b import f\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from layerzero.a import X\n"
                "def f():\n    pass\n",
    })
    assert all_violations(root) == set()
    (root / "b.py").write_text("import typing\nif typing.TYPE_CHECKING:\n    pass\nelse:\n    import layerzero.a\n")
    assert all_violations(root) == {"cycle: layerzero.a -> layerzero.b", "cycle: layerzero.b -> layerzero.a"}


def test_import_module_with_a_constant_name_counts(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "a.py": "import layerzero.b\n",
        "b.py": "import importlib\ndef f():\n    return importlib.import_module('layerzero.a')\n",
    })
    assert all_violations(root) == {"cycle: layerzero.a -> layerzero.b", "cycle: layerzero.b -> layerzero.a"}


def test_submodules_and_relative_imports_resolve(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "pkg/__init__.py": "from layerzero.pkg import x\n",
        "pkg/x.py": "from . import y\n",
        "pkg/y.py": "from .x import thing\n",
    })
    assert all_violations(root) == {"cycle: layerzero.pkg.x -> layerzero.pkg.y",
                                    "cycle: layerzero.pkg.y -> layerzero.pkg.x"}


def test_private_names_and_private_modules(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "pkg/__init__.py": "_hooks = []\n__version__ = '1'\n",
        "pkg/_helpers.py": "def f():\n    pass\n",
        "pkg/inside.py": "from layerzero.pkg._helpers import f\nfrom layerzero.pkg import _helpers\n"
                         "from layerzero.pkg import __version__\n",
        "pkg/borrow.py": "from layerzero.pkg import _hooks\n",  # a private name of pkg/__init__, even from inside
        "outside.py": "from layerzero.pkg._helpers import f\nfrom layerzero.pkg.inside import f as _f\n",
    })
    assert all_violations(root) == {"private: layerzero.pkg.borrow imports layerzero.pkg._hooks",
                                    "private: layerzero.outside imports layerzero.pkg._helpers.f"}


def _function(name: str, lines: int, indent: str = "") -> str:
    """Source of a function exactly ``lines`` lines long, its ``def`` line included."""
    return f"{indent}def {name}():\n" + "".join(f"{indent}    x = {i}\n" for i in range(lines - 1))


def test_module_and_function_lengths(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "fine.py": _function("f", MAX_FUNCTION_LINES),
        "long.py": "class C:\n" + _function("m", MAX_FUNCTION_LINES + 1, "    "),
        "nested.py": "def outer():\n" + _function("inner", MAX_FUNCTION_LINES + 1, "    ") + "    return inner\n",
        "big.py": "x = 1\n" * (MAX_MODULE_LINES + 1),
    })
    assert all_violations(root) == {"function-lines: layerzero.long:C.m", "function-lines: layerzero.nested:outer",
                                    "function-lines: layerzero.nested:outer.inner", "module-lines: layerzero.big"}


# -- the backend contract ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BUILTIN_BACKENDS)
def test_builtin_backend_modules_meet_the_backend_protocol(name: str) -> None:
    module = importlib.import_module(f"layerzero.backends.{name}")
    assert isinstance(module, Backend)
    assert isinstance(module.BACKENDS, tuple) and all(isinstance(b, str) for b in module.BACKENDS)
    assert isinstance(module.KERNEL_IDS, tuple) and all(isinstance(k, str) for k in module.KERNEL_IDS)
    kernels, backends = KernelRegistry(), BackendRegistry()
    added = module.register(kernels, backends)
    assert [s.kernel_id for s in added] == list(module.KERNEL_IDS)
    assert backends.names() == sorted(module.BACKENDS)
    assert {s.backend for s in added} <= set(module.BACKENDS)
    assert module.register(kernels, backends) == []  # idempotent


def test_a_module_without_the_contract_is_not_a_backend() -> None:
    assert not isinstance(types.SimpleNamespace(register=lambda kernels, backends: []), Backend)


def test_public_surface_is_small_and_moved_names_warn() -> None:
    """``lz.__all__`` holds what a user calls; names that left it still resolve, once per access with a
    DeprecationWarning naming their home; ``layerzero.dispatch`` finds names through explicit tables only."""
    import warnings

    import layerzero as lz
    import layerzero.dispatch as lzd
    from layerzero import errors, registry

    assert len(lz.__all__) <= 45  # 58 before the public surface was cut
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in lz.__all__:
            getattr(lz, name)
        for name in lzd.__all__:
            getattr(lzd, name)
    for name, home in (("KernelNotFoundError", errors), ("KernelRegistry", registry)):
        with pytest.warns(DeprecationWarning, match=f"layerzero.{name} is deprecated; import it from {home.__name__}"):
            assert getattr(lz, name) is getattr(home, name)
    with pytest.warns(DeprecationWarning, match="layerzero.dispatch.load_config is deprecated"):
        assert callable(lzd.load_config)
    with pytest.raises(AttributeError):
        lzd.Path  # a name a dispatch module merely imports is not found by searching any more
    with pytest.raises(AttributeError):
        lz.no_such_name


def test_environment_variables_are_read_in_one_place() -> None:
    """``layerzero/environment.py`` reads every variable (its tables list them all); no other module does."""
    readers = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "environment.py" and path.parent == SRC:
            continue
        text = path.read_text()
        if re.search(r"os\.environ(\.get\(|\[)|getenv\(|environ\.get\(\s*[\"']LAYERZERO", text):
            readers.append(str(path.relative_to(SRC)))
    assert readers == []
    from layerzero.environment import ENV_VARS, OTHER_ENV_VARS
    from layerzero.runtime import config

    documented = config.__doc__ or ""
    assert [v for v in (*ENV_VARS, *OTHER_ENV_VARS) if f"``{v}``" not in documented] == []


def test_module_map_lists_every_module() -> None:
    """docs/architecture.md's module map names every module of the package (and no module that is gone)."""
    page = (SRC.parents[1] / "docs" / "architecture.md").read_text()
    listed = set(re.findall(r"^\| `(layerzero[\w.]*)` \|", page.split("## Module map", 1)[1], re.M))
    present = set()
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        present.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    assert sorted(present - listed) == [] and sorted(listed - present) == []
