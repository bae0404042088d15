"""The layer rules of DESIGN.md section 2, checked on the real source tree.

import-linter checks the layers and keeps fsspec, zstandard and xxhash out of
`core`. It cannot forbid a subpackage of an external package, so the
`torch.distributed` rule for `core` and `store` is checked here on the ASTs.
Two more import-linter contracts hold for every package, including ones not
written yet: a private module (`_name`) is imported only from inside its own
package, and sibling modules never import each other in a circle.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "treeckpt"

# Layer -> modules it must not import (a name also forbids its submodules).
FORBIDDEN = {
    "core": ("torch.distributed", "fsspec", "zstandard", "xxhash"),
    "store": ("torch.distributed",),
}


def lint_imports(cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys; from importlinter.cli import lint_imports;"
        "sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "pyproject.toml")],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def imported_names(tree: ast.AST) -> list[tuple[int, str]]:
    """Every module a source imports or reaches as `torch.distributed`, with its line."""
    names: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append((node.lineno, node.module))
            names += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "torch"
        ):
            names.append((node.lineno, f"torch.{node.attr}"))
    return names


def violations(source: str, forbidden: tuple[str, ...]) -> list[tuple[int, str]]:
    return [
        (line, name)
        for line, name in imported_names(ast.parse(source))
        if any(name == bad or name.startswith(bad + ".") for bad in forbidden)
    ]


def test_import_contracts_hold() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_contracts_catch_violations(tmp_path: Path) -> None:
    """The contracts are not vacuous: a package that breaks them fails lint-imports."""
    files = {
        "__init__.py": "",
        "shell/__init__.py": "import treeckpt.store\n",
        "store/__init__.py": "import treeckpt.core\n",
        "core/__init__.py": "",
        "core/plan.py": "import fsspec\nfrom treeckpt.shell import run\n",
        # tools -> explore._display: a private module of another package.
        "tools/__init__.py": "",
        "tools/cli.py": "from treeckpt.explore._display import fmt_size\n",
        "explore/__init__.py": "",
        # _display -> _checkpoint -> _display: siblings in a circle.
        "explore/_display.py": "from treeckpt.explore import _checkpoint\n",
        "explore/_checkpoint.py": "from treeckpt.explore import _display\n",
    }
    for name, text in files.items():
        path = tmp_path / "treeckpt" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = lint_imports(tmp_path, env)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "treeckpt layers BROKEN" in out, out
    assert "core is pure BROKEN" in out, out
    assert "private modules are private to their package BROKEN" in out, out
    assert "treeckpt.tools.cli -> treeckpt.explore._display" in out, out
    assert "no import cycles between siblings BROKEN" in out, out


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_sources_avoid_forbidden_modules(layer: str) -> None:
    sources = sorted((PACKAGE / layer).rglob("*.py"))
    if not sources:
        pytest.skip(f"src/treeckpt/{layer} has no modules yet")
    found = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in sources
        for line, name in violations(path.read_text(encoding="utf-8"), FORBIDDEN[layer])
    ]
    assert not found, f"{layer} must not import {FORBIDDEN[layer]}:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "source",
    [
        "import torch.distributed",
        "import torch.distributed as dist",
        "from torch.distributed import barrier",
        "from torch.distributed.tensor import DTensor",
        "from torch import distributed",
        "import torch\ntorch.distributed.barrier()",
        "import fsspec",
        "from fsspec.implementations.local import LocalFileSystem",
    ],
)
def test_scanner_finds_forbidden_imports(source: str) -> None:
    assert violations(textwrap.dedent(source), FORBIDDEN["core"])


def test_scanner_allows_torch() -> None:
    assert not violations("import torch\nx = torch.float32\nimport numpy", FORBIDDEN["core"])
