"""
The package's imports form layers (docs/architecture.md): no module imports
one of a higher layer or of a sibling package on its own layer, and no
modules import each other in a circle.

Every module under ``claudectl/`` is read with :mod:`ast` -- imports inside
functions and under ``if TYPE_CHECKING:`` count too, and so does
``importlib.import_module("claudectl....")`` with a literal name -- and
mapped to a component of :data:`LAYERS` by its first name under
``claudectl``.  A module of a package the map does not name fails the test:
add the package to the map (and to docs/architecture.md) on purpose.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "claudectl"

#: From the bottom up: each layer maps its components to the first names
#: under ``claudectl`` they hold ("" is ``claudectl/__init__.py``).  A module
#: may import its own component and any component of a lower layer; never a
#: higher layer, never a sibling component of its own layer.
LAYERS: list[dict[str, frozenset[str]]] = [
    {
        "base": frozenset(
            {
                "",
                "atomic",
                "changes",
                "config",
                "filesig",
                "home",
                "lazylog",
                "lines",
                "logbudget",
                "process",
                "statestore",
                "text",
            }
        )
    },
    {"relay": frozenset({"relay"})},
    {
        "pairing": frozenset({"pairing"}),
        "discovery": frozenset({"discovery"}),
        "hive": frozenset({"hive"}),
        "delegation": frozenset({"delegation"}),
        "hub": frozenset({"hub"}),
    },
    {"control": frozenset({"control"}), "hooks": frozenset({"hooks"})},
    {"service": frozenset({"service"})},
    {"tui": frozenset({"tui"})},
    {"cli": frozenset({"cli"})},
    {"main": frozenset({"__main__"})},
]


@dataclass(frozen=True)
class Import:
    """``importer`` imports ``imported`` at ``line`` of ``path``."""

    importer: str
    imported: str
    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.importer} imports {self.imported}"


def module_files(package_dir: Path) -> dict[str, Path]:
    """Every module of the package by dotted name (``claudectl.relay.node``)."""
    out: dict[str, Path] = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package_dir.name, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(modules: dict[str, Path], name: str) -> str | None:
    """The longest module that ``name`` (a module or a name in one) lies in."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imports_of(modules: dict[str, Path], module: str) -> Iterator[tuple[str, int]]:
    """``(imported module, line)`` of ``module``'s package-internal imports, wherever they stand."""
    path = modules[module]
    is_package = path.name == "__init__.py"
    root = module.split(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # ``from pkg import sub`` imports the submodule; ``from mod import
            # name`` the module.
            for alias in node.names:
                sub = f"{origin}.{alias.name}"
                names.append(sub if sub in modules else origin)
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if (
                called in ("import_module", "__import__")
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                names = [node.args[0].value]
        for name in names:
            if name != root and not name.startswith(root + "."):
                continue
            target = _resolve(modules, name)
            if target is not None and target != module:
                yield target, node.lineno


def all_imports(package_dir: Path) -> tuple[dict[str, Path], list[Import]]:
    modules = module_files(package_dir)
    found: list[Import] = []
    for module, path in modules.items():
        relative = str(path.relative_to(package_dir.parent))
        for imported, line in sorted(set(imports_of(modules, module))):
            found.append(Import(module, imported, relative, line))
    return modules, found


def first_name(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def place(module: str) -> tuple[int, str] | None:
    """``(layer index, component)`` of a module; None when the map lacks it."""
    name = first_name(module)
    for level, components in enumerate(LAYERS):
        for component, names in components.items():
            if name in names:
                return level, component
    return None


def unmapped(modules: dict[str, Path]) -> list[str]:
    return [m for m in modules if place(m) is None]


def layer_violations(found: list[Import]) -> list[str]:
    """An import of a higher layer, or of a sibling component on the same layer."""
    out = []
    for imp in found:
        a, b = place(imp.importer), place(imp.imported)
        if a is None or b is None or a[1] == b[1]:
            continue
        if b[0] > a[0]:
            out.append(f"{imp} (upward: {a[1]} is below {b[1]})")
        elif b[0] == a[0]:
            out.append(f"{imp} (sideways: {a[1]} and {b[1]} are siblings on one layer)")
    return out


def cycles(found: list[Import]) -> list[list[Import]]:
    """The imports inside each set of modules that import each other in a circle."""
    graph: dict[str, set[str]] = {}
    for imp in found:
        graph.setdefault(imp.importer, set()).add(imp.imported)
        graph.setdefault(imp.imported, set())
    # Tarjan's strongly connected components, iteratively.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)
    return [
        [imp for imp in found if imp.importer in c and imp.imported in c]
        for c in sorted(components, key=sorted)
    ]


def problems(package_dir: Path) -> list[str]:
    """Everything wrong with the package's layering, one line each."""
    modules, found = all_imports(package_dir)
    out = [f"{m} ({modules[m]}) belongs to no layer of LAYERS" for m in unmapped(modules)]
    out += layer_violations(found)
    for circle in cycles(found):
        members = sorted({imp.importer for imp in circle})
        out.append(
            "circle of "
            + ", ".join(members)
            + ": "
            + "; ".join(str(imp) for imp in sorted(circle, key=str))
        )
    return out


class LayerTests(SynchronousTestCase):
    def test_no_upward_import_and_no_circle(self) -> None:
        found = problems(PACKAGE_DIR)
        self.assertEqual(found, [], "\n" + "\n".join(found))

    def test_every_package_is_on_the_map(self) -> None:
        modules = module_files(PACKAGE_DIR)
        self.assertIn("claudectl.relay.node", modules)
        self.assertEqual(unmapped(modules), [])


class CheckerTests(SynchronousTestCase):
    """The checker itself, on small made-up packages."""

    def package(self, files: dict[str, str]) -> Path:
        root = Path(self.mktemp()) / "claudectl"
        for name, text in files.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        for directory in [root, *(p for p in root.rglob("*") if p.is_dir())]:
            (directory / "__init__.py").touch()
        return root

    def test_upward_import_in_a_function_is_named(self) -> None:
        root = self.package(
            {
                "relay/node.py": "def f():\n    from claudectl.pairing.invites import X\n",
                "pairing/invites.py": "X = 1\n",
            }
        )
        [problem] = problems(root)
        self.assertIn("claudectl/relay/node.py:2: claudectl.relay.node imports", problem)
        self.assertIn("claudectl.pairing.invites (upward: relay is below pairing)", problem)

    def test_type_checking_import_counts(self) -> None:
        root = self.package(
            {
                "relay/mesh.py": (
                    "from typing import TYPE_CHECKING\n"
                    "if TYPE_CHECKING:\n"
                    "    from claudectl.relay.protocol import P\n"
                ),
                "relay/protocol.py": "from claudectl.relay import mesh\nP = 1\n",
            }
        )
        [problem] = problems(root)
        self.assertTrue(problem.startswith("circle of claudectl.relay.mesh, "), problem)
        self.assertIn(
            "relay/mesh.py:3: claudectl.relay.mesh imports claudectl.relay.protocol", problem
        )
        self.assertIn(
            "relay/protocol.py:1: claudectl.relay.protocol imports claudectl.relay.mesh", problem
        )

    def test_sibling_and_import_module(self) -> None:
        root = self.package(
            {
                "hive/gossip.py": (
                    "import importlib\nimportlib.import_module('claudectl.delegation.worker')\n"
                ),
                "delegation/worker.py": "",
            }
        )
        [problem] = problems(root)
        self.assertIn("claudectl.hive.gossip imports claudectl.delegation.worker", problem)
        self.assertIn("sideways", problem)

    def test_relative_imports_and_downward_is_fine(self) -> None:
        root = self.package(
            {
                "service/compose.py": "from ..relay import node\nfrom . import other\n",
                "service/other.py": "",
                "relay/node.py": "from .codec import x\n",
                "relay/codec.py": "x = 1\n",
            }
        )
        self.assertEqual(problems(root), [])

    def test_a_new_package_must_be_placed(self) -> None:
        root = self.package({"newpkg/server.py": "from claudectl.relay import node\n"})
        (root / "relay").mkdir()
        (root / "relay" / "node.py").write_text("")
        found = problems(root)
        self.assertEqual(len(found), 2, found)  # claudectl.newpkg and claudectl.newpkg.server
        self.assertIn("claudectl.newpkg.server", found[1])
        self.assertIn("belongs to no layer", found[1])
