"""The dependency floors, the hashed lock files and the Dockerfile that installs from them agree.

Issue 21, finding 12: pyproject had floors only, admitting releases with published advisories,
and no lock. Here: every floor excludes the known-vulnerable releases listed in ``ADVISORIES``;
``requirements.lock`` pins every runtime dependency of pyproject (extras included) at a version
the floor admits, each with sha256 hashes; ``requirements-build.lock`` does the same for the
build backend; the Dockerfile installs only from them with ``--require-hashes``, installs the
project with ``--no-deps`` and starts from a base image pinned by digest. Building the image
from them is ``deploy/ci/check-deploy.sh``'s job.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

#: (package, last vulnerable release, advisory): the floor must exclude that release.
ADVISORIES = [
    ("cryptography", "44.0.0", "CVE-2024-12797, OpenSSL in the wheels"),
    ("cryptography", "46.0.6", "CVE-2026-39892, buffer overflow with non-contiguous buffers"),
    ("cryptography", "49.0.0", "CVE-2026-69247, PKCS#7 Bleichenbacher oracle"),
    ("pyopenssl", "25.3.0", "CVE-2026-27448, servername callback exceptions swallowed"),
    ("pyopenssl", "26.0.0", "CVE-2026-40475, X509Name NUL truncation"),
    ("h11", "0.15.0", "CVE-2025-43859, chunked-encoding request smuggling"),
    ("h2", "4.2.0", "CVE-2025-57804, HTTP/2 request splitting"),
    ("hypercorn", "0.15.0", "SNYK-PYTHON-HYPERCORN-6371005, DoS"),
    ("pydantic", "2.3.0", "CVE-2024-3772, email ReDoS"),
    ("starlette", "0.49.0", "CVE-2025-62727, Range header ReDoS in FileResponse"),
    ("dnspython", "2.6.0", "CVE-2023-29483, TuDoor"),
    ("jinja2", "3.1.5", "CVE-2025-27516, sandbox breakout through the attr filter"),
    ("tqdm", "4.66.2", "CVE-2024-34062, eval of CLI arguments"),
]
BUILD_ADVISORIES = [("setuptools", "78.1.0", "CVE-2025-47273, path traversal")]

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
_HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})\b")


def runtime_requirements() -> list[Requirement]:
    return [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]


def build_requirements() -> list[Requirement]:
    return [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]


def parse_lock(path: Path) -> dict[str, tuple[Version, list[str]]]:
    """name -> (pinned version, sha256 hashes), for each ``name==version`` entry of a lock."""
    entries: dict[str, tuple[Version, list[str]]] = {}
    # An entry is its pin line plus the backslash-continued hash lines after it.
    text = re.sub(r"\\\n", " ", path.read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _PIN.match(line)
        assert m, f"{path.name}: not a name==version pin: {line[:80]!r}"
        name = canonicalize_name(m.group(1).split("[")[0])
        assert name not in entries, f"{path.name}: {name} pinned twice"
        entries[name] = (Version(m.group(2)), _HASH.findall(line))
    return entries


def floor_of(reqs: list[Requirement], name: str) -> Requirement:
    found = [r for r in reqs if canonicalize_name(r.name) == name]
    assert found, f"{name} has no direct requirement in pyproject.toml (so no floor)"
    return found[0]


@pytest.mark.parametrize(
    ("reqs", "name", "vulnerable", "advisory"),
    [(runtime_requirements, *a) for a in ADVISORIES]
    + [(build_requirements, *a) for a in BUILD_ADVISORIES],
    ids=[f"{a[0]}<={a[1]}" for a in ADVISORIES + BUILD_ADVISORIES],
)
def test_floors_exclude_releases_with_published_advisories(
    reqs: object, name: str, vulnerable: str, advisory: str
) -> None:
    assert callable(reqs)
    req = floor_of(reqs(), name)
    assert not req.specifier.contains(vulnerable, prereleases=True), (
        f"pyproject admits {name} {vulnerable} ({advisory}): raise the floor in {req}"
    )


@pytest.mark.parametrize(
    ("lock", "reqs"),
    [("requirements.lock", runtime_requirements), ("requirements-build.lock", build_requirements)],
)
def test_lock_pins_every_requirement_with_hashes(lock: str, reqs: object) -> None:
    assert callable(reqs)
    entries = parse_lock(REPO / lock)
    assert entries, f"{lock} is empty"
    for name, (version, hashes) in entries.items():
        # Two or more for anything with wheels; one is the minimum pip --require-hashes needs.
        assert hashes, f"{lock}: {name}=={version} has no sha256 hash"
    wanted: list[tuple[str, Requirement]] = []
    for req in reqs():
        wanted.append((canonicalize_name(req.name), req))
        # psycopg[binary,pool] needs psycopg-binary and psycopg-pool in the lock as well.
        wanted += [(canonicalize_name(f"{req.name}-{extra}"), req) for extra in req.extras]
    for name, req in wanted:
        assert name in entries, f"{lock} lacks {name} (required by pyproject: {req})"
        if name == canonicalize_name(req.name):
            version = entries[name][0]
            assert req.specifier.contains(version, prereleases=True), (
                f"{lock} pins {name}=={version}, outside pyproject's {req}"
            )


def test_lock_entries_parse_with_hashes_on_every_pin(tmp_path: Path) -> None:
    # The parser above must notice an entry without hashes, or the test before proves nothing.
    bad = tmp_path / "bad.lock"
    bad.write_text(
        "trio==0.35.0 \\\n    --hash=sha256:" + "a" * 64 + "\n    # via x\nh11==0.16.0\n"
    )
    entries = parse_lock(bad)
    assert entries["trio"][1] == ["a" * 64]
    assert entries["h11"][1] == []


def dockerfile_instructions() -> list[str]:
    """Logical Dockerfile lines: continuations joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_dockerfile_installs_only_hashed_locks_and_the_project_without_deps() -> None:
    pip_runs = [ln for ln in dockerfile_instructions() if ln.startswith("RUN") and "pip install" in ln]
    assert pip_runs, "no pip install in the Dockerfile"
    for run in pip_runs:
        for cmd in re.split(r"&&", run):
            if "pip install" not in cmd:
                continue
            if "-r requirements.lock" in cmd:
                assert "--require-hashes" in cmd, cmd
                assert "--only-binary=:all:" in cmd, cmd
                assert "-r requirements-build.lock" in cmd, cmd
            else:
                # Anything else installed is the project itself, with nothing resolved for it.
                assert "--no-deps" in cmd and "--no-build-isolation" in cmd, cmd
    assert any("-r requirements.lock" in r for r in pip_runs), "the lock is never installed"
    copies = " ".join(ln for ln in dockerfile_instructions() if ln.startswith("COPY"))
    assert "requirements.lock" in copies and "requirements-build.lock" in copies


def test_dockerfile_base_image_is_pinned_by_digest() -> None:
    lines = dockerfile_instructions()
    args = dict(
        ln.removeprefix("ARG ").split("=", 1) for ln in lines if ln.startswith("ARG ") and "=" in ln
    )
    froms = [ln.split()[1] for ln in lines if ln.startswith("FROM")]
    assert froms, "no FROM"
    digest = re.compile(r"^[\w./:-]+@sha256:[0-9a-f]{64}$")
    for ref in froms:
        m = re.fullmatch(r"\$\{?(\w+)\}?", ref)
        resolved = args.get(m.group(1), "") if m else ref
        assert digest.match(resolved), f"FROM {ref} ({resolved or 'no default'}) is not pinned by digest"
