"""The package's shape: layers that point one way, one home per rule, a short call path."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import tokendb
from bench.calls import lone_charge_calls, lone_verify_calls

PACKAGE = Path(tokendb.__file__).resolve().parent

CALL_BUDGET = 50
"""Calls into tokendb of one lone ``charge()`` (``python -m bench.calls`` lists them):
72 across 37 functions before issue 10, 45 across 28 after. Raise it only for a reason."""
VERIFY_CALL_BUDGET = 30
"""Calls into tokendb of one ``verify_api_key()`` that looks its key up (the cache off):
37 across 23 functions before issue 13's fast path, 29 across 19 after."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(module: str, source: str | None = None) -> set[str]:
    """The tokendb modules ``module`` imports, at the top, inside a function or under
    ``TYPE_CHECKING``, absolute or relative (``source``: its text, else its file's)."""
    found: set[str] = set()
    tree = ast.parse(MODULES[module].read_text() if source is None else source)
    is_package = MODULES[module].name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in MODULES)
        elif isinstance(node, ast.ImportFrom):
            base = absolute(node, module, is_package=is_package)
            if base not in MODULES:
                continue
            submodules = {f"{base}.{alias.name}" for alias in node.names}
            named = submodules & MODULES.keys()
            found.update(named)
            if named != submodules:  # a name from the module itself, not a submodule
                found.add(base)
    found.discard(module)
    return found


def absolute(node: ast.ImportFrom, module: str, *, is_package: bool) -> str:
    """The module an ``import from`` names, a relative one (``from . import x``) resolved."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def test_the_import_reader_sees_every_form_of_import() -> None:
    source = """
import tokendb.ledger
from tokendb import chats
from tokendb.users import create_user
from . import api_keys
from .keys import hash_key
from .contrib import starlette

def later():
    from tokendb import demo

if TYPE_CHECKING:
    from tokendb import cli
"""
    assert imports_of("tokendb._sql", source) == {
        "tokendb.ledger",
        "tokendb.chats",
        "tokendb.users",
        "tokendb.api_keys",
        "tokendb.keys",
        "tokendb.contrib.starlette",
        "tokendb.demo",
        "tokendb.cli",
    }
    assert imports_of(
        "tokendb.contrib.fastapi", "from .. import ledger\nfrom . import schemas"
    ) == {
        "tokendb.ledger",
        "tokendb.contrib.schemas",
    }


def cycle_through(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        path.append(module)
        for imported in sorted(graph[module]):
            found = visit(imported)
            if found is not None:
                return found
        path.pop()
        return None

    return visit(start)


def test_no_import_cycle_inside_tokendb_counting_function_level_imports() -> None:
    graph = {module: imports_of(module) for module in MODULES}
    for module in MODULES:
        cycle = cycle_through(module, graph)
        assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_the_cycle_check_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert cycle_through("a", graph) == ["a", "b", "c", "a"]


def test_the_group_commit_queue_imports_nothing_from_the_ledger() -> None:
    assert imports_of("tokendb._group_commit") <= {"tokendb.errors"}


LEDGER_WRITE = re.compile(
    r'_record\(|insert\(\s*(models\.)?TokenTransaction\b|INSERT\s+INTO\s+"?token_transactions\b',
    flags=re.IGNORECASE,
)
"""A ledger row written: through _ledger_sql's helper, _sql.insert, or by hand (quoted or not)."""


def test_only_the_ledger_sql_module_writes_ledger_rows() -> None:
    writers = [module for module, path in MODULES.items() if LEDGER_WRITE.search(path.read_text())]
    assert writers == ["tokendb._ledger_sql"]


@pytest.mark.parametrize(
    "statement",
    [
        "_record(",
        "_sql.insert(TokenTransaction, {})",
        "_sql.insert(\n    models.TokenTransaction,",
        "INSERT INTO token_transactions (id)",
        'insert into "token_transactions" ("id")',
    ],
)
def test_the_ledger_write_check_sees_every_way_of_writing_a_row(statement: str) -> None:
    assert LEDGER_WRITE.search(statement)


async def test_a_lone_charge_makes_few_calls_into_tokendb(tokendb_clean: str, make_user) -> None:
    counts = await lone_charge_calls(await make_user())
    total = sum(counts.values())
    listing = "\n".join(f"{n:3d} {file}:{name}" for (file, name), n in sorted(counts.items()))
    assert 0 < total <= CALL_BUDGET, f"a lone charge makes {total} calls:\n{listing}"


async def test_a_verify_lookup_makes_few_calls_into_tokendb(
    tokendb_clean: str, make_api_key
) -> None:
    _, secret = await make_api_key()
    counts = await lone_verify_calls(secret)
    total = sum(counts.values())
    listing = "\n".join(f"{n:3d} {file}:{name}" for (file, name), n in sorted(counts.items()))
    assert 0 < total <= VERIFY_CALL_BUDGET, f"a verify lookup makes {total} calls:\n{listing}"


@pytest.mark.parametrize("module", ["tokendb._ledger_sql", "tokendb._db"])
def test_the_seam_and_the_ledger_sql_do_not_import_the_public_modules(module: str) -> None:
    public = {"tokendb", "tokendb.ledger", "tokendb.chats", "tokendb.users", "tokendb.api_keys"}
    assert not imports_of(module) & public


ARCHITECTURE = PACKAGE.parent / "docs" / "ARCHITECTURE.md"


def documented_layers() -> list[tuple[str, set[str]]]:
    """docs/ARCHITECTURE.md's layer table, top layer first: (layer, its tokendb modules)."""
    text = ARCHITECTURE.read_text()
    table = text[text.index("| layer | modules | job |") :].split("\n\n")[0]
    layers = []
    for row in table.splitlines()[2:]:
        layer, names = row.split("|")[1:3]
        modules: set[str] = set()
        for name in re.findall(r"`([\w/]+)`", names):
            if name.endswith("/"):  # a subpackage: all of it
                package = "tokendb." + name.strip("/")
                modules |= {m for m in MODULES if m == package or m.startswith(package + ".")}
            else:
                modules.add("tokendb" if name == "__init__" else f"tokendb.{name}")
        layers.append((layer.strip(), modules))
    return layers


def test_the_architecture_places_every_module_in_one_layer() -> None:
    placed = [module for _, modules in documented_layers() for module in modules]
    assert sorted(set(placed)) == sorted(placed), "a module in two layers"
    assert set(placed) == set(MODULES), (
        f"docs/ARCHITECTURE.md misses {sorted(set(MODULES) - set(placed))}, "
        f"names {sorted(set(placed) - set(MODULES))} that do not exist"
    )


def test_imports_point_down_the_documented_layers() -> None:
    """Principle 13: a module imports from its own layer or the layers below, also inside
    functions and TYPE_CHECKING blocks."""
    rank = {m: depth for depth, (_, modules) in enumerate(documented_layers()) for m in modules}
    names = [layer for layer, _ in documented_layers()]
    upward = [
        f"{module} ({names[rank[module]]}) imports {imported} ({names[rank[imported]]})"
        for module in sorted(MODULES)
        for imported in sorted(imports_of(module))
        if rank[imported] < rank[module]
    ]
    assert not upward, "\n".join(upward)
