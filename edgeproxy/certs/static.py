"""Certificates from files (``[[certificates]] cert = ..., key = ...``), matched by their SANs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL

from ..errors import ConfigError
from ..names import name_matches, normalize_pattern
from ..tls.contexts import build_server_context


class StaticCertificates:
    def __init__(self, contexts: Sequence[tuple[tuple[str, ...], SSL.Context]] = ()) -> None:
        self._exact: dict[str, SSL.Context] = {}
        self._wild: list[tuple[str, SSL.Context]] = []
        for names, ctx in contexts:
            for n in names:
                if n.startswith("*."):
                    self._wild.append((n, ctx))
                else:
                    self._exact.setdefault(n, ctx)

    @classmethod
    def load(
        cls, pairs: Sequence[tuple[str, str]], *, session_tickets: bool = True
    ) -> StaticCertificates:
        loaded = []
        problems = []
        for i, (cert_path, key_path) in enumerate(pairs):
            try:
                chain = x509.load_pem_x509_certificates(Path(cert_path).read_bytes())
                key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
                ctx = build_server_context(chain, key, session_tickets=session_tickets)
            except (OSError, ValueError, SSL.Error) as exc:
                problems.append(f"certificates[{i}]: cannot load {cert_path} / {key_path}: {exc}")
                continue
            try:
                sans = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName)
                names = tuple(
                    normalize_pattern(n) for n in sans.value.get_values_for_type(x509.DNSName)
                )
            except x509.ExtensionNotFound:
                names = ()
            if not names:
                problems.append(f"certificates[{i}]: {cert_path} has no DNS subjectAltName")
                continue
            loaded.append((names, ctx))
        if problems:
            raise ConfigError(problems)
        return cls(loaded)

    def match(self, name: str) -> SSL.Context | None:
        ctx = self._exact.get(name)
        if ctx is not None:
            return ctx
        for pattern, wctx in self._wild:
            if name_matches(pattern, name):
                return wctx
        return None
