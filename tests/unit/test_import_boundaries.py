"""The contracts and the core never import a broker client or a database toolkit."""

from __future__ import annotations

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
