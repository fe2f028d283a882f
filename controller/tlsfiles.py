"""A server's TLS files, read again when they are replaced: a rotated certificate or CA needs no
restart (the controller's port and its agent gateways', `controller/api/tls.py`)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc

log = logging.getLogger("maia.tls")

RELOAD_CHECK_S = 1.0  # how often, at most, the files are looked at again (at a new connection's handshake)


class UnreadableFile(Exception):
    """One of the files cannot be read: the message names its flag and path."""


class MismatchedFiles(Exception):
    """The files were read but are no certificate chain and its key: the message names the flags."""


class CertificateFiles:
    """The server's TLS files, read again when they change, so a rotated certificate or CA needs
    no restart. gRPC calls `fetch` at each new connection's handshake, from its own threads
    (`grpc.dynamic_ssl_server_credentials`); at most once every `RELOAD_CHECK_S` it looks at the
    files' size, inode and modification time, and reads them once those changed. New connections
    get the new files; open ones keep what they were set up with. Files caught mid-replacement (a
    key that is not the certificate's yet) or unreadable are skipped with a warning, the last good
    ones served, until the files change again."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._clock = clock
        self._lock = threading.Lock()
        self._seen = self._stamp()
        self._checked = clock()

    def server_credentials(self) -> grpc.ServerCredentials:
        """For `add_secure_port`: the files as they are now (`UnreadableFile` if one cannot be
        read, `MismatchedFiles` if they do not load or the key is not the certificate's: grpcio's
        own refusal came out of `add_secure_port` as a failure to bind the address), then as
        `fetch` finds them; client certificates required with a client CA."""
        cert, key, client_ca = self.read()
        try:
            _check_pair(cert, key, client_ca)
        except ValueError as exc:
            raise MismatchedFiles(f"--tls-cert {self.cert} and --tls-key {self.key}"
                                  f"{f' (--tls-client-ca {self.client_ca})' if self.client_ca else ''}: {exc}") from None
        return grpc.dynamic_ssl_server_credentials(_configuration(cert, key, client_ca), self.fetch,
                                                   require_client_authentication=self.client_ca is not None)

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        """The certificate (chain), its key and the client CA bundle (None without mutual TLS)."""
        return (_read("--tls-cert", self.cert), _read("--tls-key", self.key),
                _read("--tls-client-ca", self.client_ca) if self.client_ca else None)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration when the files changed since last read, else None (no change)."""
        try:
            with self._lock:
                now = self._clock()
                if now - self._checked < RELOAD_CHECK_S:
                    return None
                self._checked = now
                stamp = self._stamp()
                if stamp == self._seen:
                    return None
                self._seen = stamp
                cert, key, client_ca = self.read()
                _check_pair(cert, key, client_ca)
        except (UnreadableFile, ValueError) as exc:
            log.warning("TLS files changed but were not taken (the last good ones are served until they change "
                        "again): %s", exc)
            return None
        except Exception:  # never into gRPC's handshake
            log.exception("TLS files: reading them again failed; the last good ones are served")
            return None
        log.warning("TLS files changed: new connections get the certificate in %s%s", self.cert,
                    f" and trust the CAs in {self.client_ca}" if self.client_ca else "")
        return _configuration(cert, key, client_ca)

    def _stamp(self) -> tuple[tuple[int, int, int] | None, ...]:
        paths = (self.cert, self.key, self.client_ca)
        return tuple(_stat(path) if path is not None else None for path in paths)


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _configuration(cert: bytes, key: bytes, client_ca: bytes | None) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)


def _check_pair(cert: bytes, key: bytes, client_ca: bytes | None = None) -> None:
    """ValueError unless every certificate of the chain `cert` and of the bundle `client_ca`
    loads (one caught half written is not served) and `key` is the first certificate's."""
    # Here, not at the top: `cryptography` costs ~0.1 s of every start, and only a reload needs it.
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    def whole(pem: bytes) -> list[x509.Certificate]:
        # A block cut short (no END line) is skipped by the parser, not refused: count them.
        certificates = x509.load_pem_x509_certificates(pem)
        if len(certificates) != pem.count(b"-----BEGIN CERTIFICATE-----"):
            raise ValueError("a certificate is cut short (its BEGIN line has no END)")
        return certificates

    public = serialization.PublicFormat.SubjectPublicKeyInfo
    try:
        certified = whole(cert)[0].public_key()
        if client_ca is not None:
            whole(client_ca)
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as exc:  # not PEM, cut short, or a key with a password
        raise ValueError(f"cannot load the certificates and the key: {exc}") from None
    encoding = serialization.Encoding.PEM
    if certified.public_bytes(encoding, public) != private.public_key().public_bytes(encoding, public):
        raise ValueError("the key is not the certificate's (one of the pair not replaced yet?)")


def _read(flag: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UnreadableFile(f"{flag} {path}: cannot read it: {exc.strerror or exc}") from exc
