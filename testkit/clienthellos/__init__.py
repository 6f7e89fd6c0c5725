"""Real ClientHellos captured from curl, openssl, Python ``ssl`` and Chromium (``*.bin``, one
TLS record stream each), for the parser's unit tests, the proxy's bad-input tests, the attack
benchmark and the fuzz corpus. ``python -m testkit.clienthellos.capture`` makes them again."""

from pathlib import Path

CAPTURED = Path(__file__).resolve().parent
