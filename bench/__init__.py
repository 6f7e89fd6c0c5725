"""Benchmarks of edgeproxy: measurements, not tests (nothing here asserts).

``python -m bench.run`` compares edgeproxy with HAProxy, nginx stream, hitch and Caddy on
loopback (see bench/README.md); ``python -m bench.acme_issuance`` times the ACME client alone.
"""
