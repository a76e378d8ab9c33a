"""No table is named outside its owner's data module and migrations.

Every Python file of services/, client/ and bench/ is read: importing another owner's
table objects, building a table by name (``sa.Table``, ``sa.table``, Alembic's ``op``
calls) or writing SQL that names a table (``FROM packages``) is allowed only in the
owner's module (services/common/data/<owner>.py) and its branch of migrations.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import sqlalchemy as sa

from services.common.data import analyzer, intake, mirror

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "services" / "common" / "data"
MODULES = {"intake": intake, "mirror": mirror, "analyzer": analyzer}
OWNERS = {table: owner for owner, module in MODULES.items() for table in module.metadata.tables}
"""Table name → the service that owns it."""
TABLE_OBJECTS = {
    owner: {name for name, value in vars(module).items() if isinstance(value, sa.Table)}
    for owner, module in MODULES.items()
}
"""Owner → the names its module binds its table objects to."""
REFERENCES = {("analyzer", "tasks")}
"""(owner, table) pairs whose migrations may refer to another owner's table: the
analyzer's task_fetches.task_id keeps its foreign key to the intake's tasks.id."""
SQL = re.compile(r"\b(?:FROM|JOIN|INTO|UPDATE|TABLE|EXISTS)\s+[\"`]?(\w+)")
FOREIGN_KEY = re.compile(r"^(\w+)\.\w+$")
NAMING_CALLS = {
    "Table",
    "table",
    "create_table",
    "drop_table",
    "rename_table",
    "add_column",
    "drop_column",
    "alter_column",
    "batch_alter_table",
    "create_index",
    "drop_index",
    "bulk_insert",
}
FOREIGN_KEYS = {"ForeignKey", "ForeignKeyConstraint", "create_foreign_key"}
_DATA_MODULE = re.compile(r"^services\.common\.data\.(\w+)$")


def owner_of(relative: Path) -> str | None:
    """The owner whose tables the file may name (``"legacy"``: the frozen old chain)."""
    parts = relative.parts
    if parts[:3] != ("services", "common", "data"):
        return None
    if len(parts) == 4 and relative.stem in MODULES:
        return relative.stem
    if len(parts) > 5 and parts[3] == "migrations":
        return parts[4]
    return None


def problems(relative: Path, source: str) -> list[str]:
    """Where ``source`` (the file at ``relative``) names a table it does not own."""
    owner = owner_of(relative)
    if owner == "legacy":
        return []
    tree = ast.parse(source, str(relative))
    named = [*_imported(tree), *_used(tree, _module_aliases(tree)), *_spelled(tree, owner)]
    return [
        f"{relative}:{getattr(node, 'lineno', '?')}: {how} the {OWNERS[table]}'s table {table}"
        for node, table, how in named
        if OWNERS[table] != owner
    ]


Named = tuple[ast.AST, str, str]
"""Where a table is named, which, and how."""


def _imported(tree: ast.Module) -> list[Named]:
    """Table objects imported from an owner's data module."""
    found: list[Named] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            match = _DATA_MODULE.match(node.module)
            if match and match[1] in MODULES:
                module = MODULES[match[1]]
                found += [
                    (node, getattr(module, name.name).name, "imports")
                    for name in node.names
                    if name.name in TABLE_OBJECTS[match[1]]
                ]
    return found


def _module_aliases(tree: ast.Module) -> dict[str, str]:
    """Local names of owners' data modules → the owner."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "services.common.data":
            aliases |= {n.asname or n.name: n.name for n in node.names if n.name in MODULES}
        elif isinstance(node, ast.Import):
            for name in node.names:
                match = _DATA_MODULE.match(name.name)
                if match and match[1] in MODULES and name.asname:
                    aliases[name.asname] = match[1]
    return aliases


def _used(tree: ast.Module, aliases: dict[str, str]) -> list[Named]:
    """Table objects reached through a data module (``intake.tasks``)."""
    return [
        (node, getattr(MODULES[aliases[node.value.id]], node.attr).name, "uses")
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in aliases
        and node.attr in TABLE_OBJECTS[aliases[node.value.id]]
    ]


def _spelled(tree: ast.Module, owner: str | None) -> list[Named]:
    """Table names written out: in SQL, to build a table, in a foreign key."""
    found: list[Named] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [(node, t, "SQL names") for t in SQL.findall(node.value) if t in OWNERS]
        if not isinstance(node, ast.Call):
            continue
        function = node.func
        called = function.attr if isinstance(function, ast.Attribute) else ""
        called = function.id if isinstance(function, ast.Name) else called
        strings = [
            c.value
            for arg in node.args
            for c in ast.walk(arg)
            if isinstance(c, ast.Constant) and isinstance(c.value, str)
        ]
        if called in NAMING_CALLS:
            found += [(node, t, f"{called}() names") for t in strings[:2] if t in OWNERS]
        if called in FOREIGN_KEYS:
            for text in strings:
                key = FOREIGN_KEY.match(text)
                if key and key[1] in OWNERS and (owner, key[1]) not in REFERENCES:
                    found.append((node, key[1], "a foreign key names"))
    return found


def python_files() -> list[Path]:
    """Every Python file of services/, client/ and bench/ (extensionless scripts too)."""
    files = []
    for top in ("services", "client", "bench"):
        for path in sorted((ROOT / top).rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            if path.suffix == ".py" or (
                not path.suffix and path.read_bytes()[:64].startswith(b"#!/usr/bin/env python")
            ):
                files.append(path)
    return files


def test_every_table_has_one_owner() -> None:
    tables = [t for module in MODULES.values() for t in module.metadata.tables]
    assert len(tables) == len(set(tables)) == 9


def test_no_table_is_named_outside_its_owner() -> None:
    files = python_files()
    assert ROOT / "services" / "mirror" / "http.py" in files
    assert ROOT / "bench" / "retrace" in files
    found = [p for path in files for p in problems(path.relative_to(ROOT), path.read_text())]
    assert found == []


@pytest.mark.parametrize(
    ("path", "source"),
    [
        # What mirror/http.py did before the mirror's data module counted for it.
        (
            "services/mirror/http.py",
            "import sqlalchemy as sa\n"
            "from services.common.data.mirror import MirrorData, koji_builds, packages\n"
            "query = sa.select(sa.func.count()).select_from(packages)\n",
        ),
        ("services/intake/catalog.py", 'QUERY = "SELECT DISTINCT os_release FROM packages"\n'),
        (
            "services/common/data/analyzer.py",
            "from services.common.data import intake\nquery = intake.tasks.select()\n",
        ),
        ("services/common/data/intake.py", 'fetches = sa.Table("task_fetches", metadata)\n'),
        (
            "services/common/data/migrations/mirror/versions/x.py",
            'op.add_column("tasks", sa.Column("x", sa.Text))\n',
        ),
        ("bench/retrace", 'conn.execute(sa.text("UPDATE tasks SET status = :s"))\n'),
    ],
)
def test_naming_another_owners_table_is_caught(path: str, source: str) -> None:
    assert problems(Path(path), source)


def test_the_owner_and_its_migrations_may_name_its_tables() -> None:
    assert not problems(
        Path("services/common/data/mirror.py"), 'packages = sa.Table("packages", metadata)\n'
    )
    assert not problems(
        Path("services/common/data/migrations/analyzer/versions/analyzer_0001_baseline.py"),
        'op.create_table("task_fetches", sa.ForeignKeyConstraint(["task_id"], ["tasks.id"]))\n',
    )
