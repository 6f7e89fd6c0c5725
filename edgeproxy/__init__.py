"""edgeproxy: a TLS-terminating TCP edge proxy that obtains its own certificates."""

__version__ = "0.1.0"
