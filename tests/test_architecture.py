"""The layout holds: the import contracts of pyproject.toml, a torch-free request side, and the
sizes every module and function keeps (docs/architecture.md)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "toolkit"

# Everything a front-end process or a notebook kernel imports of toolkit.
TORCH_FREE = [
    "toolkit",
    "toolkit.utils",
    "toolkit.launch_server",
    "toolkit.server_args",
    "toolkit.api.app",
    "toolkit.api.server",
    "toolkit.process.front_end",
    "toolkit.scheduling.batcher",
    "toolkit.scheduling.batch_server",
    "toolkit.scheduling.remote",
    "toolkit.service.inference",
    "toolkit.service.model_files",
    "toolkit.models.registry",
]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def test_import_contracts_hold() -> None:
    """Layers, the torch-free request side, the helpers' isolation and no cycles
    (`[tool.importlinter]` in pyproject.toml)."""
    lint = subprocess.run(
        [
            sys.executable,
            "-c",
            "from importlinter.cli import lint_imports_command; lint_imports_command()",
            "--no-cache",
            "--no-logo",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "0 broken" in lint.stdout


def test_the_request_side_imports_without_torch() -> None:
    script = (
        "import importlib, json, sys\n"
        f"for name in {TORCH_FREE!r}: importlib.import_module(name)\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'safetensors'})\n"
        "print(json.dumps(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def _sizes() -> list[tuple[str, str, int]]:
    rows = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        name = str(path.relative_to(REPO))
        rows.append((name, "module", len(source.splitlines())))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                rows.append((name, node.name, node.end_lineno - node.lineno + 1))  # type: ignore[operator]
    return rows


@pytest.mark.parametrize(("kind", "limit"), [("module", MAX_MODULE_LINES), ("function", MAX_FUNCTION_LINES)])
def test_modules_and_functions_stay_short(kind: str, limit: int) -> None:
    too_long = [
        (name, part, lines)
        for name, part, lines in _sizes()
        if (part == "module") == (kind == "module") and lines > limit
    ]
    assert too_long == [], f"over {limit} lines: {too_long}"
