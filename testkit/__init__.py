"""What tests/, bench/ and fuzz/ share: starting the real parts and building their inputs.

Owns: starting and stopping the real parts (pebble with its challenge server and fault injector,
acme2certifier, PostgreSQL, BIND, Chromium, upstream servers, edgeproxy itself); free loopback
ports; certificate records and ClientHello builders; the process log. Must not know: pytest (fixtures are registered by the conftests, built
from these helpers) or any test, benchmark or fuzz target; tests/, bench/ and fuzz/ import this
package and edgeproxy, never each other. Not shipped: the wheel packages only ``edgeproxy*``.
"""
