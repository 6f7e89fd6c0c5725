"""The package's own rules about who may import and read what (ARCHITECTURE.md, issue 18).

Read from the source with ``ast``: a rule broken by a new import fails here, whatever runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import edgeproxy

PACKAGE = Path(edgeproxy.__file__).parent

# Modules the data path and the admin server are built from: they get plain values
# (``HostPort``, routes, tokens) from the assembler and must not reach for the config.
NO_CONFIG = ("proxy/", "hostnames/", "admin/server.py")

# Where reading the process environment is allowed: the assembler's secret reader, and
# process plumbing that is not configuration (worker bookkeeping, metrics and progress knobs).
ENVIRONMENT_READERS = {
    "secret_env.py",
    "cli.py",
    "workers.py",
    "metrics.py",
    "progress.py",
    "admin/app.py",  # PROMETHEUS_MULTIPROC_DIR, set by the supervisor
}


def _modules() -> list[tuple[str, ast.Module]]:
    return [
        (path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text(), str(path)))
        for path in sorted(PACKAGE.rglob("*.py"))
    ]


def _imports(tree: ast.Module, module: str) -> set[str]:
    """Absolute names of what ``module`` (a path below the package) imports."""
    package = ["edgeproxy", *module.removesuffix(".py").split("/")[:-1]]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join([*base, node.module] if node.module else base)
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return found


def test_the_proxy_hostnames_and_admin_server_do_not_import_the_config() -> None:
    offenders = [
        module
        for module, tree in _modules()
        if module.startswith(NO_CONFIG) and "edgeproxy.config" in _imports(tree, module)
    ]
    assert offenders == []


def test_the_rule_sees_relative_and_absolute_imports() -> None:
    relative = ast.parse("from ..config import Config\n")
    absolute = ast.parse("import edgeproxy.config\n")
    assert "edgeproxy.config" in _imports(relative, "proxy/server.py")
    assert "edgeproxy.config" in _imports(absolute, "proxy/server.py")
    assert "edgeproxy.config" not in _imports(
        ast.parse("from .routes import Route\n"), "proxy/x.py"
    )


def _reads_environment(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in {"environ", "getenv", "environb"}:
            return True
        if (
            isinstance(node, ast.ImportFrom)
            and node.module == "os"
            and any(a.name in {"environ", "getenv"} for a in node.names)
        ):
            return True
    return False


def test_only_the_assembler_reads_secrets_from_the_environment() -> None:
    readers = {module for module, tree in _modules() if _reads_environment(tree)}
    assert readers <= ENVIRONMENT_READERS, sorted(readers - ENVIRONMENT_READERS)
    assert "secret_env.py" in readers


def test_no_module_is_over_800_lines() -> None:
    sizes = {
        path.relative_to(PACKAGE).as_posix(): len(path.read_text().splitlines())
        for path in PACKAGE.rglob("*.py")
    }
    assert {module: n for module, n in sizes.items() if n > 800} == {}
