"""The package's layout, kept honest: floors, and imports that only go down.

`condery/` is organised in floors. A folder may import only folders on lower floors
(and itself); two folders on the same floor do not import each other; no two modules
import each other, directly or through others (no import cycle). Every `import` and
`from ... import` counts, wherever it is: at module level, inside a function, under
`if TYPE_CHECKING:`. There is no exception list: an import that breaks the rule is
moved, or the code it needs is.

The floors, lowest first (the table `FLOORS` below, as data; `test_the_docstring_shows_the_table`
keeps this text and the data equal):

    0  common: dependency-free helpers
    1  observability: logs, metrics, build reports
    1  oci: the OCI specs: digests and grammars, errors of the distribution spec, media types, platforms, manifests, references walker, layouts
    2  image: what a name means: names, tags, meta-packages, compose, no I/O
    2  layers: conda packages and tarballs: solve, fetch, layer building, base layer scans, compression
    3  config: schema, loading, output
    4  auth: who may pull what: identities, tokens, rules, the token endpoint and the guarding middleware
    4  storage: blobs and records behind one interface
    5  records: the store's schema: record kinds, keys, schemas, the record cache, gc
    6  bases: the upstream side: resolving, fetching, authenticating base images
    7  build: the pipeline from a request to stored manifests: service, state, layers of an image, assembly, look, admission, coordination, progress
    8  registry: the HTTP server only
    9  (top-level modules): the entry points: cli.py, __main__.py and the package's __init__.py

A module's folder is the first component of its path under `condery/`; the modules
directly in `condery/` (listed in `TOP_MODULES`) are the top floor. A folder under
`condery/` that holds Python files must be named by the table (a new folder is placed
on purpose), and every folder the table names must exist.

The checker takes the directory that holds `condery/` as its root, so the self-tests
run it on small synthetic trees to prove it can fail.
"""

from __future__ import annotations

import ast
import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "condery"
ROOT = Path(__file__).resolve().parent.parent

TOP = "(top-level modules)"
"""The unit of the top floor: the modules directly in condery/ (not a folder)."""

TOP_MODULES = ("__init__.py", "__main__.py", "cli.py")
"""The modules directly in condery/, all on the top floor."""

FLOORS: tuple[dict[str, str], ...] = (
    {"common": "dependency-free helpers"},
    {
        "observability": "logs, metrics, build reports",
        "oci": "the OCI specs: digests and grammars, errors of the distribution spec, media types, "
        "platforms, manifests, references walker, layouts",
    },
    {
        "image": "what a name means: names, tags, meta-packages, compose, no I/O",
        "layers": "conda packages and tarballs: solve, fetch, layer building, base layer scans, compression",
    },
    {"config": "schema, loading, output"},
    {
        "auth": "who may pull what: identities, tokens, rules, the token endpoint and the guarding middleware",
        "storage": "blobs and records behind one interface",
    },
    {"records": "the store's schema: record kinds, keys, schemas, the record cache, gc"},
    {"bases": "the upstream side: resolving, fetching, authenticating base images"},
    {
        "build": "the pipeline from a request to stored manifests: service, state, layers of an image, "
        "assembly, look, admission, coordination, progress"
    },
    {"registry": "the HTTP server only"},
    {TOP: "the entry points: cli.py, __main__.py and the package's __init__.py"},
)
"""The floors, lowest first: FLOORS[n] maps each folder on floor n to what it is for.

A folder imports only itself and folders of lower floors."""


def floor_of(floors: tuple[dict[str, str], ...]) -> dict[str, int]:
    return {unit: number for number, units in enumerate(floors) for unit in units}


def _table_lines(floors: tuple[dict[str, str], ...]) -> list[str]:
    return [f"{number}  {unit}: {what}" for number, units in enumerate(floors) for unit, what in units.items()]


# -- reading the tree -----------------------------------------------------------------
@dataclass(frozen=True)
class Import:
    """One imported condery module, as written at `path:line` in `importer`."""

    path: str  # relative to the root, for the message
    line: int
    importer: str  # dotted module name
    imported: str  # dotted module name (the module the statement names, existing or not)


def modules(root: Path) -> dict[str, Path]:
    """Every module of the package under `root`: dotted name -> file."""
    found: dict[str, Path] = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _unit_of(module: str, known: dict[str, Path], root: Path) -> str:
    """The folder of a dotted module name: TOP for the modules directly in condery/."""
    path = known.get(module)
    if module == PACKAGE or (path is not None and path.parent == root / PACKAGE):
        return TOP
    return module.split(".")[1]


def _resolve_relative(importer: str, is_package: bool, level: int, module: str | None) -> str | None:
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    if level - 1 > len(package) - 1:
        return None  # beyond the top-level package
    base = package[: len(package) - (level - 1)]
    return ".".join(base + (module.split(".") if module else []))


def imports(root: Path) -> tuple[list[Import], list[str]]:
    """Every import of a condery module in the tree, and the statements that cannot be
    resolved (a relative import reaching above the package)."""
    known = modules(root)
    found: list[Import] = []
    problems: list[str] = []
    for importer, path in known.items():
        rel = path.relative_to(root).as_posix()
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = _resolve_relative(importer, is_package, node.level, node.module)
                    if base is None:
                        problems.append(f"{rel}:{node.lineno}: relative import beyond the package")
                        continue
                else:
                    base = node.module or ""
                for alias in node.names:
                    # `from condery.x import y` imports the module condery.x.y when there is one.
                    sub = f"{base}.{alias.name}" if base else alias.name
                    targets.append(sub if alias.name != "*" and sub in known else base)
            for target in targets:
                if target == PACKAGE or target.startswith(PACKAGE + "."):
                    found.append(Import(rel, node.lineno, importer, target))
    found.sort(key=lambda i: (i.path, i.line, i.imported))
    return found, problems


# -- the checks -------------------------------------------------------------------------
def layering_violations(root: Path, floors: tuple[dict[str, str], ...] = FLOORS) -> list[str]:
    """Every import that goes up a floor, sideways to another folder of the same floor,
    to a folder the table does not name, or to a module that does not exist."""
    floor = floor_of(floors)
    known = modules(root)
    found, problems = imports(root)
    violations = list(problems)
    for imp in found:
        src, dst = _unit_of(imp.importer, known, root), _unit_of(imp.imported, known, root)
        where = f"{imp.path}:{imp.line}: {imp.importer} -> {imp.imported}"
        if imp.imported not in known:
            violations.append(f"{where}: no such module")
            continue
        if src == dst:
            continue
        if src not in floor or dst not in floor:
            unnamed = ", ".join(u for u in (src, dst) if u not in floor)
            violations.append(f"{where}: folder not in the floor table: {unnamed}")
            continue
        ours, theirs = floor[src], floor[dst]
        if theirs > ours:
            violations.append(f"{where} ({src}, floor {ours} -> {dst}, floor {theirs}: a higher floor)")
        elif theirs == ours:
            violations.append(f"{where} ({src}, floor {ours} -> {dst}, floor {theirs}: another folder of the same floor)")
    return violations


def import_graph(root: Path) -> dict[str, dict[str, str]]:
    """module -> {imported module: where the first such import is written}."""
    known = modules(root)
    graph: dict[str, dict[str, str]] = {module: {} for module in known}
    for imp in imports(root)[0]:
        if imp.imported in known and imp.imported != imp.importer:
            graph[imp.importer].setdefault(imp.imported, f"{imp.path}:{imp.line}")
    return graph


def _strongly_connected(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components in a stable order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
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
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return components


def _cycle_through(start: str, members: set[str], graph: dict[str, dict[str, str]]) -> list[str]:
    """A shortest path start -> ... -> start inside one strongly connected component."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # pragma: no cover - a component has one


def import_cycles(root: Path) -> list[str]:
    """Cycle paths covering every module that is on an import cycle, with where each
    step is written."""
    graph = import_graph(root)
    found = []
    for component in _strongly_connected(graph):
        if len(component) < 2:
            continue
        # Cycles until every module of the group is on one of them.
        covered: set[str] = set()
        for member in component:
            if member in covered:
                continue
            path = _cycle_through(member, set(component), graph)
            covered.update(path)
            steps = " -> ".join(path)
            where = ", ".join(f"{a} -> {b} at {graph[a][b]}" for a, b in itertools.pairwise(path))
            found.append(f"{steps}: {where}")
    return found


def table_mismatches(root: Path, floors: tuple[dict[str, str], ...] = FLOORS) -> list[str]:
    """Folders holding Python files that the table does not name, folders it names that
    are gone, and modules directly in condery/ other than TOP_MODULES (or missing)."""
    package = root / PACKAGE
    named = {unit for units in floors for unit in units if unit != TOP}
    present = {
        child.name for child in package.iterdir()
        if child.is_dir() and any(child.rglob("*.py"))
    }
    top = {child.name for child in package.glob("*.py")}
    problems = [f"{PACKAGE}/{name}/: a folder the floor table does not name" for name in sorted(present - named)]
    problems += [f"{PACKAGE}/{name}/: named by the floor table, but not there" for name in sorted(named - present)]
    problems += [f"{PACKAGE}/{name}: a top-level module not in TOP_MODULES" for name in sorted(top - set(TOP_MODULES))]
    problems += [f"{PACKAGE}/{name}: in TOP_MODULES, but not there" for name in sorted(set(TOP_MODULES) - top)]
    return problems


# -- the real tree ----------------------------------------------------------------------
def _fail(what: str, found: list[str]) -> None:
    if found:
        pytest.fail(f"{what} ({len(found)}):\n" + "\n".join(found), pytrace=False)


def test_every_folder_is_placed_on_a_floor() -> None:
    _fail("layout table mismatches", table_mismatches(ROOT))


def test_imports_go_only_down() -> None:
    _fail("imports against the floors", layering_violations(ROOT))


def test_no_import_cycle() -> None:
    _fail("import cycles", import_cycles(ROOT))


def test_the_docstring_shows_the_table() -> None:
    doc = " ".join((__doc__ or "").split())
    missing = [line for line in _table_lines(FLOORS) if " ".join(line.split()) not in doc]
    assert not missing, "the module docstring does not show these floors as the table has them:\n" + "\n".join(missing)


def test_the_checker_reads_the_real_tree() -> None:
    # A checker that read nothing would pass everything.
    found, problems = imports(ROOT)
    assert not problems
    assert len(modules(ROOT)) > 30
    assert any(i.importer == "condery.cli" and i.imported.startswith("condery.build") for i in found)


# -- the checker can fail -----------------------------------------------------------------
def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checker_reports_an_import_up_a_floor(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {
        "condery/__init__.py": "",
        "condery/cli.py": "import condery.build.x\n",
        "condery/oci/__init__.py": "",
        "condery/oci/a.py": "import os\n\n\ndef later():\n    import condery.build.x\n",
        "condery/oci/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..build import x\n",
        "condery/oci/c.py": "from condery.observability import logs\nfrom . import a\n",
        "condery/observability/__init__.py": "",
        "condery/observability/logs.py": "from condery.common.helpers import y\n",
        "condery/common/__init__.py": "",
        "condery/common/helpers.py": "y = 1\n",
        "condery/build/__init__.py": "",
        "condery/build/x.py": "from condery.oci import a\nfrom condery import cli\n",
    })
    assert layering_violations(root) == [
        "condery/build/x.py:2: condery.build.x -> condery.cli (build, floor 7 -> (top-level modules), floor 9: a higher floor)",
        "condery/oci/a.py:5: condery.oci.a -> condery.build.x (oci, floor 1 -> build, floor 7: a higher floor)",
        "condery/oci/b.py:3: condery.oci.b -> condery.build.x (oci, floor 1 -> build, floor 7: a higher floor)",
        (
            "condery/oci/c.py:1: condery.oci.c -> condery.observability.logs "
            "(oci, floor 1 -> observability, floor 1: another folder of the same floor)"
        ),
    ]


def test_the_checker_reports_a_cycle(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {
        "condery/__init__.py": "",
        "condery/common/__init__.py": "",
        "condery/common/a.py": "from condery.common import b\n",
        "condery/common/b.py": "def f():\n    from .c import g\n",
        "condery/common/c.py": "import condery.common.a\n",
        "condery/common/d.py": "import condery.common.a\n",  # into the cycle, not on it
    })
    assert layering_violations(root) == []
    assert import_cycles(root) == [
        (
            "condery.common.a -> condery.common.b -> condery.common.c -> condery.common.a: "
            "condery.common.a -> condery.common.b at condery/common/a.py:1, "
            "condery.common.b -> condery.common.c at condery/common/b.py:2, "
            "condery.common.c -> condery.common.a at condery/common/c.py:1"
        ),
    ]


def test_the_checker_reports_unplaced_and_missing_folders(tmp_path: Path) -> None:
    floors = ({"common": "helpers", "gone": "removed"}, {TOP: "entry points"})
    root = write_tree(tmp_path, {
        "condery/__init__.py": "",
        "condery/__main__.py": "",
        "condery/cli.py": "",
        "condery/common/__init__.py": "",
        "condery/extra/__init__.py": "",
        "condery/extra/m.py": "from condery.common import nothing_here\nimport condery.missing\n",
        "condery/data/readme.txt": "no Python here: not a folder of the layout",
        "condery/tool.py": "",
    })
    assert table_mismatches(root, floors) == [
        "condery/extra/: a folder the floor table does not name",
        "condery/gone/: named by the floor table, but not there",
        "condery/tool.py: a top-level module not in TOP_MODULES",
    ]
    assert layering_violations(root, floors) == [
        "condery/extra/m.py:1: condery.extra.m -> condery.common: folder not in the floor table: extra",
        "condery/extra/m.py:2: condery.extra.m -> condery.missing: no such module",
    ]
