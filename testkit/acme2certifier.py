"""A real ARI-capable ACME server for tests: acme2certifier on loopback, started per test.

Pebble 2.4 serves no ``renewalInfo``, so the ARI path (RFC 9773) is proven against
acme2certifier (PyPI ``acme2certifier``, a Python ACME server). This module owns starting and
stopping one instance; it knows nothing of edgeproxy.

Shape of an instance, all inside the caller's ``tmp_path``:

- a throwaway issuing CA made with trustme, used by acme2certifier's ``openssl_ca_handler``
  (signs in-process with cryptography, no network, no openssl binary);
- its ``wsgi`` database handler, i.e. a SQLite file;
- challenge validation disabled: the server marks every challenge valid without connecting
  anywhere. acme2certifier only honours that with ``ACME2CERTIFIER_I_KNOW_THE_RISK=1``;
- ``renewalInfo`` is on by default; its window is ``[issue + pct% of lifetime, expiry]`` and
  every answer carries ``Retry-After: <retry_after>`` verbatim, which is what the tests check
  a client against. ``renewal_force`` makes it serve a window that ends tomorrow and began a
  year ago (a "renew now" signal). Account contact checks are off, since edgeproxy may
  register without a contact.

The server runs under the stdlib ``wsgiref`` server (single-threaded, HTTP/1.0, plain HTTP)
on 127.0.0.1 with a kernel-chosen port that the child prints once it is bound, so there is no
port race and no readiness polling.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from testkit.procs import StopsOnExit, stop_process

__all__ = ["A2C", "A2CStartError", "issue_with_reference_client", "start_acme2certifier"]

# Runs in the child. Importing the WSGI module boots acme2certifier (reads the config named by
# ACME_SRV_CONFIGFILE, creates the SQLite schema), so it happens before we announce the port.
_RUNNER = """
import sys
from wsgiref.simple_server import make_server
from acme2certifier.share import acme2certifier_wsgi as a2c

server = make_server("127.0.0.1", 0, a2c.application, handler_class=a2c.get_handler_cls())
print("LISTENING", server.server_address[1], flush=True)
server.serve_forever()
"""

_CONFIG = """\
[DEFAULT]
debug: {debug}

[Nonce]
nonce_check_disable: False

[Account]
# edgeproxy registers without a contact by default; acme2certifier insists on one otherwise.
contact_check_disable: True

[CAhandler]
handler_module: acme2certifier.cahandlers.openssl_ca_handler
issuing_ca_key: {ca_dir}/ca-key.pem
issuing_ca_cert: {ca_dir}/ca-cert.pem
issuing_ca_crl: {ca_dir}/ca.crl
cert_save_path: {ca_dir}/issued
cert_validity_days: {cert_validity_days}

[DBhandler]
handler: wsgi
dbfile: {workdir}/acme_srv.db

[Challenge]
challenge_validation_disable: True

[Renewalinfo]
retry_after_timeout: {retry_after}
renewalthreshold_pctg: {renewal_threshold_pct}
renewal_force: {renewal_force}

[Order]
tnauthlist_support: False
"""


class A2CStartError(RuntimeError):
    """acme2certifier did not come up; the message carries the tail of its log."""


@dataclass
class A2C(StopsOnExit):
    """One running acme2certifier. Use as a context manager or call ``stop()``."""

    base_url: str
    ca: trustme.CA
    workdir: Path
    log_path: Path
    retry_after: int
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def directory_url(self) -> str:
        return f"{self.base_url}/directory"

    @property
    def renewal_info_url(self) -> str:
        return f"{self.base_url}/acme/renewal-info"

    @property
    def ca_cert_pem(self) -> bytes:
        return self.ca.cert_pem.bytes()

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def stop(self) -> None:
        """Terminate the server and reap it; safe to call more than once."""
        stop_process(self.process)
        if self.process.stdout is not None:
            self.process.stdout.close()


def _wait_for_port(proc: subprocess.Popen[bytes], log_path: Path, timeout: float) -> int:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buffered = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buffered:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise A2CStartError(
                    f"acme2certifier did not report its port within {timeout:g}s\n"
                    + _tail(log_path)
                )
            if not sel.select(remaining):
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:  # child exited before binding
                proc.wait(timeout=5)
                raise A2CStartError(
                    f"acme2certifier exited with {proc.returncode} before listening\n"
                    + _tail(log_path)
                )
            buffered += chunk
    line = buffered.split(b"\n", 1)[0].decode("ascii", "replace").split()
    if len(line) != 2 or line[0] != "LISTENING" or not line[1].isdigit():
        raise A2CStartError(f"unexpected first line from acme2certifier: {line!r}")
    return int(line[1])


def _tail(log_path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_acme2certifier(
    tmp_path: Path,
    *,
    retry_after: int = 30,
    renewal_threshold_pct: float = 85.0,
    renewal_force: bool = False,
    cert_validity_days: int = 30,
    debug: bool = False,
    startup_timeout: float = 30.0,
) -> A2C:
    """Start acme2certifier on 127.0.0.1 (port chosen by the kernel) and return its handle.

    The caller must ``stop()`` it (or use it as a context manager); if startup fails the
    child is already stopped when ``A2CStartError`` propagates.
    """
    workdir = tmp_path / "acme2certifier"
    ca_dir = workdir / "ca"
    (ca_dir / "issued").mkdir(parents=True)

    ca = trustme.CA(organization_name="edgeproxy test ARI CA")
    ca.private_key_pem.write_to_path(str(ca_dir / "ca-key.pem"))
    ca.cert_pem.write_to_path(str(ca_dir / "ca-cert.pem"))

    config_path = workdir / "acme_srv.cfg"
    config_path.write_text(
        _CONFIG.format(
            debug=debug,
            ca_dir=ca_dir,
            workdir=workdir,
            cert_validity_days=cert_validity_days,
            retry_after=retry_after,
            renewal_threshold_pct=renewal_threshold_pct,
            renewal_force=renewal_force,
        )
    )

    env = dict(os.environ)
    env.update(
        ACME_SRV_CONFIGFILE=str(config_path),
        ACME2CERTIFIER_BASE_DIR=str(workdir),
        # Required for challenge_validation_disable to take effect (see module docstring).
        ACME2CERTIFIER_I_KNOW_THE_RISK="1",
        PYTHONUNBUFFERED="1",
    )
    log_path = workdir / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", _RUNNER],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
        )
    try:
        port = _wait_for_port(proc, log_path, startup_timeout)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
        raise
    return A2C(
        base_url=f"http://127.0.0.1:{port}",
        ca=ca,
        workdir=workdir,
        log_path=log_path,
        retry_after=retry_after,
        process=proc,
    )


def issue_with_reference_client(
    a2c: A2C, names: list[str], timeout: float = 30.0
) -> x509.Certificate:
    """Obtain a leaf from ``a2c`` with certbot's ``acme`` library, not edgeproxy's client.

    ``acme`` comes with acme2certifier (it is one of its dependencies), so this needs nothing
    extra. It gives the ARI tests a certificate that owes nothing to the code under test,
    which keeps "our CertID is what the server accepts" an independent check. Blocking (uses
    ``requests``); call it outside trio or via ``trio.to_thread``.
    """
    # Imported here so importing this module does not require certbot's acme.
    import datetime

    from acme import client, crypto_util, messages
    from josepy.jwa import ES256
    from josepy.jwk import JWKEC

    account_key = JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    net = client.ClientNetwork(account_key, alg=ES256, user_agent="edgeproxy-tests")
    acme = client.ClientV2(client.ClientV2.get_directory(a2c.directory_url, net), net)
    acme.new_account(messages.NewRegistration.from_data(terms_of_service_agreed=True))

    leaf_key = ec.generate_private_key(ec.SECP256R1())
    key_pem = leaf_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    order = acme.new_order(crypto_util.make_csr(key_pem, names))
    for authz in order.authorizations:
        # Validation is disabled on the server, so any offered challenge will do; http-01 is
        # the one certbot's library can always build a response for.
        challenge = next(c for c in authz.body.challenges if c.chall.typ == "http-01")
        acme.answer_challenge(challenge, challenge.response(account_key))
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    order = acme.poll_and_finalize(order, deadline=deadline)
    return x509.load_pem_x509_certificate(order.fullchain_pem.encode())
