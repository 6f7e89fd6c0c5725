"""Coverage-guided fuzzing of edgeproxy's parsers of untrusted bytes (atheris + libFuzzer).

Owns the fuzz targets (``targets.py``: plain functions of ``bytes``, importable without
atheris so the regression tests can replay inputs), the seed corpus (``corpus.py``) and the
runner (``run.py``: one libFuzzer process per target, bounded in time and memory). It must
not know how the parsers work inside: a target only states what the parser promises
(the exceptions it may raise, the invariants of its results) and lets the fuzzer look for a
counter-example.

    python -m fuzz.run --seconds 60        # every target, 60 s each, prints executions
    python -m fuzz.corpus fuzz/corpus      # write the seed corpus somewhere to keep it
"""
