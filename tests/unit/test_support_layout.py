"""tests/, bench/ and fuzz/ stand on their own and share only testkit (CONTRIBUTING.md, issue 18).

Read from the source with ``ast``, so an import that breaks the layout fails here even if the
module it sits in is never run: a test module importing another test module or a conftest,
bench or fuzz importing the tests, the tests importing bench or fuzz, testkit importing any of
them. A benchmark is a program (``python -m bench.NAME``), never a pytest module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# First-party packages each area may import (third-party ones are not this test's business).
FIRST_PARTY = {"edgeproxy", "testkit", "tests", "bench", "fuzz", "conftest"}
ALLOWED = {
    "tests": {"edgeproxy", "testkit"},
    "bench": {"edgeproxy", "testkit", "bench"},
    "fuzz": {"edgeproxy", "testkit", "fuzz"},
    "testkit": {"edgeproxy", "testkit"},
}


def _imported(path: Path, root: Path) -> set[str]:
    """Absolute dotted names ``path`` imports (relative imports resolved against its package)."""
    package = path.relative_to(root).with_suffix("").parts[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            found.add(".".join([*base, node.module] if node.module else base))
    return found


def _offences(area: str, root: Path = ROOT) -> list[str]:
    offences = []
    for path in sorted((root / area).rglob("*.py")):
        for name in sorted(_imported(path, root)):
            top = name.split(".")[0]
            if top in FIRST_PARTY and (top not in ALLOWED[area] or name.endswith("conftest")):
                offences.append(f"{path.relative_to(root)} imports {name}")
    return offences


@pytest.mark.parametrize("area", sorted(ALLOWED))
def test_each_area_imports_only_edgeproxy_testkit_and_itself(area: str) -> None:
    assert _offences(area) == []


def test_the_rule_refuses_what_it_should(tmp_path: Path) -> None:
    # On a made-up tree, so a broken _imported cannot make the real check pass silently.
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "probe.py").write_text(
        "from tests.integration.conftest import make_pebble\n"
        "from .run import main\n"  # its own package: allowed
        "import fuzz.corpus\n"
        "from testkit.pebble import pebbles\n"
    )
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(
        "from tests.unit import test_y\nfrom bench.loadgen import WrkResult\nimport conftest\n"
    )
    assert _offences("bench", tmp_path) == [
        "bench/probe.py imports fuzz.corpus",
        "bench/probe.py imports tests.integration.conftest",
    ]
    assert _offences("tests", tmp_path) == [
        "tests/test_x.py imports bench.loadgen",
        "tests/test_x.py imports conftest",
        "tests/test_x.py imports tests.unit",
    ]


def test_benchmarks_are_programs_not_pytest_modules() -> None:
    pytest_style = [
        f"{path.relative_to(ROOT)}: {node.name}"
        for path in sorted((ROOT / "bench").glob("*.py"))
        if not path.name.startswith("test_")
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_")
    ]
    assert pytest_style == []
