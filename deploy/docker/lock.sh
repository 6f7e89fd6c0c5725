#!/usr/bin/env bash
# Regenerates requirements.lock: every runtime dependency of pyproject.toml, pinned, with the
# sha256 of every file PyPI has for that version (so one lock serves linux x86_64 and aarch64);
# and requirements-build.lock: pyproject's [build-system] requires (setuptools), the same way.
# The container image installs from both with pip --require-hashes (deploy/docker/Dockerfile).
#
#   deploy/docker/lock.sh              keep current pins where the floors still allow them
#   deploy/docker/lock.sh --upgrade    take the newest releases, then run the tests on them
#
# Needs uv (pip install uv) and PyPI. The resolution is for CPython 3.11, the image's Python;
# it is checked to come out the same for aarch64 as for x86_64.
set -euo pipefail
cd "$(dirname "$0")/../.."
UV=${UV:-uv}
command -v "$UV" >/dev/null || { echo "lock.sh needs uv on PATH (pip install uv) or UV=..." >&2; exit 1; }
compile() {  # INPUT PLATFORM OUTPUT [uv args...]
  local input=$1 platform=$2 out=$3; shift 3
  "$UV" pip compile "$input" --quiet --no-config --index-url https://pypi.org/simple \
    --generate-hashes --python-version 3.11 --python-platform "$platform" \
    --custom-compile-command "deploy/docker/lock.sh" "$@" -o "$out"
}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
build_requires() {
  python3 -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")'
}
for pair in pyproject.toml:requirements.lock -:requirements-build.lock; do
  input=${pair%%:*} lock=${pair##*:}
  # "-" is the build requirements on stdin (a temp file's name would land in the lock).
  compile "$input" x86_64-manylinux_2_28 "$lock" "$@" < <(build_requires)
  cp "$lock" "$work/other"
  compile "$input" aarch64-manylinux_2_28 "$work/other" < <(build_requires)
  if ! diff <(grep -E '^[a-z0-9]' "$lock") <(grep -E '^[a-z0-9]' "$work/other") >&2; then
    echo "lock.sh: $lock resolves differently on aarch64 (above); one lock cannot serve both" >&2
    exit 1
  fi
  echo "$lock: $(grep -cE '^[a-z0-9]' "$lock") packages, $(grep -c -- '--hash=' "$lock") hashes"
done
