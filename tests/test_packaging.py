"""The package declares every third-party distribution that its code imports."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OWN = {"ssl_train", "tuning", "search_spaces", "bench"}


def imported_top_level_modules() -> set[str]:
    modules = set()
    for folder in ("ssl_train", "tuning", "search_spaces"):
        for file in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(file.read_text())):
                if isinstance(node, ast.Import):
                    modules |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules.add(node.module.split(".")[0])
    return modules - OWN - set(sys.stdlib_module_names) - {"__future__"}


def test_every_imported_distribution_is_declared():
    declared = {
        re.split(r"[\[<>=!~ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        for requirement in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for module in imported_top_level_modules():
        distributions = {name.lower().replace("_", "-") for name in providers.get(module, [module])}
        if not distributions & declared:
            missing[module] = sorted(distributions)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    assert {"numpy", "requests", "scipy"} <= declared


def test_ssl_train_imports_nothing_from_tuning():
    """The trainer is usable without the sweep layer; the command line (tuning/cli.py) may import both."""
    for file in (ROOT / "ssl_train").rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.split(".")[0] == "tuning"], f"{file.name} imports {names}"
