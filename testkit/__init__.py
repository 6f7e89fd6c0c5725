"""What tests/, bench/ and fuzz/ share: starting the real parts and building their inputs.

Owns: starting and stopping the real parts (pebble with its challenge server and fault injector,
acme2certifier, PostgreSQL, BIND, HAProxy in the cluster topology, Prometheus, Chromium,
upstream servers, edgeproxy itself in-process or as a subprocess); stopping any child process
(``procs``); free loopback ports; certificate records; built and captured ClientHellos; the
clients that check what a proxy serves; the hardening attackers; ``TLSStream``, the tests'
general TLS endpoint (``tlsstream``). Must not know: any test,
benchmark or fuzz target. tests/, bench/ and fuzz/ import this package and edgeproxy, never
each other or a conftest; the conftests turn these helpers into fixtures (the one exception:
``testkit.postgres``'s fixtures, which a test module imports to get a server of its own).
Not shipped: the wheel packages only ``edgeproxy*``.
"""
