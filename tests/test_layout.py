"""The codebase's shape: one job a module, short functions, the maths free of Ray, MLflow and Optuna."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 600
EDGE_LIBRARIES = {"ray", "mlflow", "optuna"}
PURE_FOLDERS = ("methods", "augment", "evaluation")  # the maths: testable without Ray, MLflow or Optuna


def sources() -> list[Path]:
    return sorted(p for folder in ("ssl_train", "tuning") for p in (ROOT / folder).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_function_over_60_lines_and_no_module_over_600():
    long_functions, long_modules = [], []
    for path in sources():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{path.relative_to(ROOT)} ({len(text.splitlines())})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length})")
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines: {long_modules}"
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"


def test_methods_import_only_the_contract_so_the_registry_has_no_circle():
    for name in ("byol", "swav"):
        own = {m for m in imported_modules(ROOT / "ssl_train" / "methods" / f"{name}.py") if m.startswith("ssl_train.")}
        assert "ssl_train.methods" not in own, f"methods/{name}.py imports the registry: {own}"
        assert "ssl_train.methods.base" in own


def test_the_maths_does_not_import_ray_mlflow_or_optuna():
    for folder in PURE_FOLDERS:
        for path in (ROOT / "ssl_train" / folder).rglob("*.py"):
            edges = {m.split(".")[0] for m in imported_modules(path)} & EDGE_LIBRARIES
            assert not edges, f"{path.relative_to(ROOT)} imports {edges}: keep them at the edges"


def test_every_folder_of_the_layout_exists_with_a_docstring():
    for folder in ("methods", "augment", "training", "evaluation", "data", "export"):
        init = ROOT / "ssl_train" / folder / "__init__.py"
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init.relative_to(ROOT)} needs a one-line job"


def test_a_trial_process_imports_neither_mlflow_nor_optuna_nor_scikit_learn():
    """Every trial process imports tuning.trial at start, twice per demo sweep (search, confirmation): MLflow,
    Optuna, scikit-learn and SciPy, which only the driver or an optional probe needs, cost it ~2 s."""
    import subprocess
    import sys

    heavy = ("mlflow", "optuna", "sklearn", "scipy")
    code = f"import sys, tuning.trial; print([m for m in {heavy!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
