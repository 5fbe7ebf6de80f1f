"""The test tree keeps one room per responsibility: shared helpers live in helper modules.

A test module (``test_*.py``) holds tests. What several of them need (a harness, a PKI,
a namespace builder) lives in a module that is not a test module, so collecting one
test file never runs another's tests or fixtures.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, dotted module name) of every import in ``tree``, relative dots kept."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            found.append((node.lineno, base))
            if node.module is None:  # from . import test_x
                found += [(node.lineno, f"{base}{alias.name}") for alias in node.names]
    return found


def _test_module_imports(source: str) -> list[str]:
    """Imports in ``source`` whose target is a test module (a ``test_*`` component)."""
    return [
        f"line {line}: {name}"
        for line, name in _imported_modules(ast.parse(source))
        if any(part.startswith("test_") for part in name.lstrip(".").split("."))
    ]


def test_no_test_module_imports_another() -> None:
    offenders = []
    for path in sorted(TESTS.rglob("test_*.py")):
        for hit in _test_module_imports(path.read_text()):
            offenders.append(f"{path.relative_to(TESTS)} {hit}")
    assert not offenders, (
        "test modules import other test modules; move the shared helper into a "
        "helper module (e.g. tests/e2e/harness.py):\n" + "\n".join(offenders)
    )


def test_no_module_imports_a_conftest() -> None:
    """A conftest holds fixtures; a type or helper tests name lives in a helper module."""
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        for line, name in _imported_modules(ast.parse(path.read_text())):
            if name.lstrip(".").split(".")[-1] == "conftest":
                offenders.append(f"{path.relative_to(TESTS)} line {line}: {name}")
    assert not offenders, "modules import a conftest:\n" + "\n".join(offenders)


def test_the_check_sees_every_spelling() -> None:
    assert _test_module_imports("from .test_basic import _run") == ["line 1: .test_basic"]
    assert _test_module_imports("from . import test_resume") == ["line 1: .test_resume"]
    assert _test_module_imports("import e2e.test_basic as b") == ["line 1: e2e.test_basic"]
    assert _test_module_imports("from e2e.test_p2p import x") == ["line 1: e2e.test_p2p"]
    assert _test_module_imports("def f():\n    from .test_x import y\n") == ["line 2: .test_x"]
    assert _test_module_imports("from .harness import Transfer\nimport pytest") == []
