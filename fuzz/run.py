"""Run the fuzz targets under libFuzzer (atheris), each in its own bounded process.

    python -m fuzz.run --seconds 20                  # every target, 20 s each
    python -m fuzz.run --seconds 600 --jobs 2 --workdir fuzz/.work   # local: keep the corpus
    python -m fuzz.run --seconds 30 --target client_hello --json

Each target runs as ``python -m fuzz.run --child TARGET ...``: atheris instruments the
``edgeproxy`` modules as they are imported, then ``atheris.Setup`` hands libFuzzer the corpus
folder and the limits (``-max_total_time``, ``-rss_limit_mb``, a per-input ``-timeout``). One
process per target because libFuzzer owns its process (it exits when done, and on a finding)
and because instrumentation must happen before the first import of the code under test, so
this orchestrating module imports no ``edgeproxy`` code at the top.

The summary gives executions per target (libFuzzer's ``number_of_executed_units``), the
corpus size and the verdict. A finding leaves ``crash-*``/``timeout-*``/``oom-*`` files in
``<workdir>/artifacts/`` (replay one with ``python -m fuzz.run --replay TARGET FILE``) and
makes the exit status 1; turn each into a regression test in ``tests/hardening``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET_NAMES = ("client_hello", "proxy_protocol", "acme_messages")

# Longest input per target: big enough for a post-quantum ClientHello cut into many records
# and for JSON nested a thousand deep, small enough to keep executions fast.
MAX_LEN = {"client_hello": 8192, "proxy_protocol": 4096, "acme_messages": 4096}
PER_INPUT_TIMEOUT = 10  # seconds: a single input this slow is a finding (e.g. regex blow-up)
# Startup (imports, corpus load) and shutdown on top of -max_total_time before we give up.
GRACE = 60.0

_EXECUTED = re.compile(rb"stat::number_of_executed_units:\s*(\d+)")
_DONE = re.compile(rb"Done (\d+) runs in")
_PEAK_RSS = re.compile(rb"stat::peak_rss_mb:\s*(\d+)")


@dataclass
class TargetResult:
    target: str
    seconds: float
    executions: int
    peak_rss_mb: int
    corpus_files: int
    returncode: int
    artifacts: list[str]
    log: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.artifacts


def _child(target: str, libfuzzer_args: list[str]) -> None:
    """Inside the libFuzzer process: instrument, set up and fuzz one target (never returns)."""
    import atheris  # type: ignore[import-untyped]  # no stubs; only this function uses it

    with atheris.instrument_imports(include=["edgeproxy"]):
        from fuzz import targets
    atheris.Setup([sys.argv[0], *libfuzzer_args], targets.TARGETS[target])
    atheris.Fuzz()


def _replay(target: str, files: Sequence[Path]) -> int:
    """Run saved inputs through a target in-process; the traceback is the finding."""
    from fuzz import targets

    for path in files:
        print(f"replaying {path}", flush=True)
        targets.TARGETS[target](path.read_bytes())
    print("no finding")
    return 0


def _libfuzzer_args(
    target: str, corpus: Path, artifacts: Path, seconds: int, rss_limit_mb: int
) -> list[str]:
    from fuzz.corpus import dictionary_for

    args = [
        str(corpus),
        f"-max_total_time={seconds}",
        f"-rss_limit_mb={rss_limit_mb}",
        f"-timeout={PER_INPUT_TIMEOUT}",
        f"-max_len={MAX_LEN.get(target, 4096)}",
        f"-artifact_prefix={artifacts}/{target}-",
        "-print_final_stats=1",
    ]
    dictionary = dictionary_for(target)
    if dictionary is not None:
        args.append(f"-dict={dictionary}")
    return args


def _start(
    target: str, workdir: Path, seconds: int, rss_limit_mb: int
) -> tuple[subprocess.Popen[bytes], Path, float]:
    corpus = workdir / "corpus" / target
    artifacts = workdir / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "logs" / f"{target}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "fuzz.run",
        "--child",
        target,
        "--",
        *_libfuzzer_args(target, corpus, artifacts, seconds, rss_limit_mb),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONHASHSEED": "0"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, log_path, time.monotonic()


def _finish(
    target: str, proc: subprocess.Popen[bytes], log_path: Path, started: float, workdir: Path
) -> TargetResult:
    output = log_path.read_bytes()
    executed = _EXECUTED.search(output) or _DONE.search(output)
    rss = _PEAK_RSS.search(output)
    artifacts = sorted(str(p) for p in (workdir / "artifacts").glob(f"{target}-*") if p.is_file())
    return TargetResult(
        target=target,
        seconds=round(time.monotonic() - started, 1),
        executions=int(executed.group(1)) if executed else 0,
        peak_rss_mb=int(rss.group(1)) if rss else 0,
        corpus_files=sum(1 for p in (workdir / "corpus" / target).iterdir() if p.is_file()),
        returncode=proc.returncode,
        artifacts=artifacts,
        log=str(log_path),
    )


def run_targets(
    targets: Sequence[str],
    *,
    seconds: int,
    workdir: Path,
    rss_limit_mb: int = 2048,
    jobs: int = 1,
) -> list[TargetResult]:
    """Fuzz each target for ``seconds`` (at most ``jobs`` at once); always reaps children."""
    from fuzz.corpus import build_corpus

    build_corpus(workdir / "corpus")
    pending = list(targets)
    running: list[tuple[str, subprocess.Popen[bytes], Path, float]] = []
    results: list[TargetResult] = []
    try:
        while pending or running:
            while pending and len(running) < max(1, jobs):
                target = pending.pop(0)
                running.append((target, *_start(target, workdir, seconds, rss_limit_mb)))
            time.sleep(0.2)
            for entry in list(running):
                target, proc, log_path, started = entry
                if proc.poll() is None and time.monotonic() - started < seconds + GRACE:
                    continue
                if proc.poll() is None:  # libFuzzer ignored its own time limit: stop it
                    proc.kill()
                    proc.wait()
                running.remove(entry)
                results.append(_finish(target, proc, log_path, started, workdir))
    finally:
        for _, proc, _, _ in running:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    order = {name: i for i, name in enumerate(targets)}
    return sorted(results, key=lambda r: order[r.target])


def _print_table(results: Sequence[TargetResult]) -> None:
    print(f"{'target':16} {'executions':>11} {'exec/s':>8} {'corpus':>7} {'rss MB':>7}  result")
    for r in results:
        rate = r.executions / r.seconds if r.seconds else 0.0
        verdict = "ok" if r.ok else f"FINDING (exit {r.returncode}): {', '.join(r.artifacts)}"
        print(
            f"{r.target:16} {r.executions:>11} {rate:>8.0f} {r.corpus_files:>7} "
            f"{r.peak_rss_mb:>7}  {verdict}"
        )
        if not r.ok:
            print(f"  log: {r.log}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        target, rest = argv[1], argv[2:]
        _child(target, rest[1:] if rest[:1] == ["--"] else rest)
        return 0  # not reached: libFuzzer exits the process
    if argv[:1] == ["--replay"]:
        return _replay(argv[1], [Path(p) for p in argv[2:]])

    parser = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=60, help="fuzzing time per target")
    parser.add_argument(
        "--target", action="append", choices=TARGET_NAMES, help="only this target (repeatable)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep corpus, logs and artifacts here (default: a temporary folder)",
    )
    parser.add_argument("--rss-limit-mb", type=int, default=2048)
    parser.add_argument("--jobs", type=int, default=1, help="targets fuzzed at the same time")
    parser.add_argument("--json", action="store_true", help="also print one JSON summary line")
    args = parser.parse_args(argv)
    targets = args.target or list(TARGET_NAMES)

    with tempfile.TemporaryDirectory(prefix="edgeproxy-fuzz-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        results = run_targets(
            targets,
            seconds=args.seconds,
            workdir=workdir,
            rss_limit_mb=args.rss_limit_mb,
            jobs=args.jobs,
        )
        _print_table(results)
        if args.json:
            print(json.dumps({"results": [asdict(r) for r in results]}))
        if any(not r.ok for r in results) and args.workdir is None:
            # The temporary folder is about to go: keep the inputs, show the logs.
            keep = REPO_ROOT / "fuzz" / "findings"
            keep.mkdir(exist_ok=True)
            for r in results:
                if not r.ok:
                    for artifact in r.artifacts:
                        shutil.copy(artifact, keep)
                    print(f"--- {r.target} log tail (inputs kept in {keep}) ---")
                    print(Path(r.log).read_text(errors="replace")[-6000:])
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
