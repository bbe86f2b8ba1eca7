"""Dependencies point one way.

The contracts and the core never import a broker client or a database toolkit (checked by
importing them in a subprocess), and each of our layers imports only the layers below it
(checked by reading every module's AST: function-level, ``TYPE_CHECKING`` and ``importlib``
imports included): ``sagas_abstractions`` <- ``sagas_core`` <- adapters <- samples.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BANNED = ("aio_pika", "aiormq", "sqlalchemy", "alembic")

PROBE = """
import importlib, json, pkgutil, sys
packages = {packages!r}
for name in packages:
    package = importlib.import_module(name)
    if {walk!r}:
        for info in pkgutil.walk_packages(package.__path__, prefix=name + "."):
            importlib.import_module(info.name)
print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] in {banned!r})))
"""


def imported_banned_modules(packages: list[str], *, walk: bool) -> list[str]:
    code = PROBE.format(packages=packages, walk=walk, banned=BANNED)
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=environment,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    found: list[str] = json.loads(result.stdout.strip().splitlines()[-1])
    return found


@pytest.mark.parametrize(
    "packages",
    [["sagas_abstractions"], ["sagas_core"], ["sagas_core", "sagas_core.testing"]],
    ids=["abstractions", "core", "core-and-testing"],
)
def test_importing_the_package_loads_no_broker_or_database_library(packages: list[str]) -> None:
    assert imported_banned_modules(packages, walk=False) == []


def test_importing_every_core_and_contracts_module_loads_no_broker_or_database_library() -> None:
    assert imported_banned_modules(["sagas_abstractions", "sagas_core"], walk=True) == []


# ---------------------------------------------------------------- our own layers, by AST
#
# sagas_abstractions <- sagas_core <- adapters (sagas_rabbitmq, sagas_sqlalchemy) <- samples.
# The core finds adapters by entry point (sagas_core.plugins), never by importing them: not at
# module level, not inside a function, not under TYPE_CHECKING, not through importlib.

OURS = frozenset(
    {
        "sagas_abstractions",
        "sagas_core",
        "sagas_rabbitmq",
        "sagas_sqlalchemy",
        "migrations",
        "samples",
        "bench",
        "tests",
    }
)
ADAPTER = frozenset({"sagas_abstractions", "sagas_core"})
LAYERS: dict[str, frozenset[str]] = {
    "sagas_abstractions": frozenset(),
    "sagas_core": frozenset({"sagas_abstractions"}),
    "sagas_rabbitmq": ADAPTER,
    "sagas_sqlalchemy": ADAPTER,
    "migrations": ADAPTER | {"sagas_sqlalchemy"},  # shipped as sagas_sqlalchemy/migrations
    "samples": ADAPTER | {"sagas_rabbitmq", "sagas_sqlalchemy"},
}
"""What each layer may import of ours besides itself (bench and tests may import anything)."""

DYNAMIC_IMPORTS = frozenset({"import_module", "__import__", "resolve_name"})


def _call_name(node: ast.Call) -> str | None:
    if isinstance(node.func, ast.Name):
        return node.func.id
    if isinstance(node.func, ast.Attribute):
        return node.func.attr
    return None


def _package_of(module: str) -> list[str]:
    return module.split(".")[:-1]  # a.b for a/b/c.py and for a/b/__init__.py


def imported_modules(source: str, module: str) -> list[tuple[int, str, str]]:
    """(line, how, module name) for every import in ``source``, wherever it is written."""
    found: list[tuple[int, str, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, "import", alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = _package_of(module)[: len(_package_of(module)) - node.level + 1]
                name = ".".join([*base, *([node.module] if node.module else [])])
            else:
                name = node.module or ""
            found.append((node.lineno, "from-import", name))
        elif isinstance(node, ast.Call) and _call_name(node) in DYNAMIC_IMPORTS and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                found.append((node.lineno, f"{_call_name(node)}()", first.value.split(":")[0]))
    return found


def layer_violations(root: Path, layer: str) -> list[str]:
    """Imports of our packages that ``layer`` may not depend on, as ``path:line: ...``."""
    allowed = LAYERS[layer] | {layer}
    violations = []
    for path in sorted((root / layer).rglob("*.py")):
        relative = path.relative_to(root)
        module = ".".join(relative.with_suffix("").parts)
        for line, how, name in imported_modules(path.read_text(encoding="utf-8"), module):
            top = name.split(".")[0]
            if top in OURS and top not in allowed:
                violations.append(f"{relative}:{line}: {how} {name}")
    return violations


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_each_layer_imports_only_the_layers_below_it(layer: str) -> None:
    assert layer_violations(ROOT, layer) == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import sagas_rabbitmq", "import sagas_rabbitmq"),
        ("from sagas_sqlalchemy.migrate import upgrade", "from-import sagas_sqlalchemy.migrate"),
        ("def f():\n    from samples.x import y\n", "from-import samples.x"),
        ("import typing\nif typing.TYPE_CHECKING:\n    import samples\n", "import samples"),
        (
            "import importlib\ndef f():\n    return importlib.import_module('sagas_rabbitmq')\n",
            "import_module() sagas_rabbitmq",
        ),
        (
            "from importlib import import_module\nimport_module('samples.a')",
            "import_module() samples.a",
        ),
        ("m = __import__('sagas_sqlalchemy')", "__import__() sagas_sqlalchemy"),
        ("import pkgutil\npkgutil.resolve_name('samples.a:main')", "resolve_name() samples.a"),
    ],
    ids=[
        "import",
        "from-import",
        "function-level",
        "type-checking",
        "import_module",
        "bare-import_module",
        "__import__",
        "resolve_name",
    ],
)
def test_the_boundary_check_sees_every_way_of_importing(
    tmp_path: Path, source: str, expected: str
) -> None:
    (tmp_path / "sagas_core").mkdir()
    (tmp_path / "sagas_core" / "bad.py").write_text(source)
    [violation] = layer_violations(tmp_path, "sagas_core")
    assert violation.startswith(f"{Path('sagas_core', 'bad.py')}:")
    assert violation.endswith(expected)


def test_the_boundary_check_resolves_relative_imports_within_the_package(tmp_path: Path) -> None:
    (tmp_path / "sagas_abstractions" / "sub").mkdir(parents=True)
    (tmp_path / "sagas_abstractions" / "sub" / "m.py").write_text("from ..models import X\n")
    (tmp_path / "sagas_abstractions" / "sub" / "__init__.py").write_text("from .m import X\n")
    (tmp_path / "sagas_abstractions" / "ok.py").write_text("from . import enums\n")
    source = (tmp_path / "sagas_abstractions" / "sub" / "m.py").read_text()
    assert imported_modules(source, "sagas_abstractions.sub.m") == [
        (1, "from-import", "sagas_abstractions.models")
    ]
    assert imported_modules("from .m import X", "sagas_abstractions.sub.__init__") == [
        (1, "from-import", "sagas_abstractions.sub.m")
    ]
    assert layer_violations(tmp_path, "sagas_abstractions") == []


def test_production_code_does_not_import_the_testing_package() -> None:
    # The in-memory bus and store the host falls back on live in sagas_core.memory.
    found = []
    for path in sorted((ROOT / "sagas_core").rglob("*.py")):
        relative = path.relative_to(ROOT)
        if relative.parts[1] == "testing":
            continue
        module = ".".join(relative.with_suffix("").parts)
        for line, how, name in imported_modules(path.read_text(encoding="utf-8"), module):
            if name == "sagas_core.testing" or name.startswith("sagas_core.testing."):
                found.append(f"{relative}:{line}: {how} {name}")
    assert found == []
