"""A development certificate authority: a CA, a server certificate and client certificates.

For trying TLS and mutual TLS locally and in tests (`maiactl dev-ca`); production certificates
come from the operator's own PKI. Keys are ECDSA P-256, certificates X.509 v3 signed with
SHA-256. A node agent's certificate carries the node id as its common name (and as a DNS SAN):
with `--tls-client-ca` the controller lets a certificate speak only for the node it names.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY = "ca.pem", "ca-key.pem"
SERVER_CERT, SERVER_KEY = "server.pem", "server-key.pem"
DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "::1")
CA_NAME = "Maia development CA"
CN_MAX = 64  # RFC 5280's ub-common-name
TOOL_PREFIX = "tool:"  # a tool's (client's) common name starts so; a node's is its id


@dataclass(frozen=True, slots=True)
class Issued:
    cert: Path
    key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(path, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _builder(subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int) -> x509.CertificateBuilder:
    now = datetime.now(timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=days)))


def load_or_create_ca(directory: Path, *, days: int = 365) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA in `directory` (ca.pem, ca-key.pem), created first if it is not there."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if cert_path.exists() != key_path.exists():  # a new CA would overwrite the half that is there
        there, missing = (cert_path, key_path) if cert_path.exists() else (key_path, cert_path)
        raise ValueError(f"{there} is there but {missing} is not: put it back, or move {there} away "
                         "to make a new CA (whatever the old one signed is then no longer trusted)")
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path} is not an EC private key made by this tool")
        return cert, key
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    cert = (_builder(CA_NAME, name, key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert, key


def check_name(name: str, stem: str) -> None:
    """A certificate's common name (a node id, a client or server name) and the stem of its files
    in the CA's directory, which it is part of (ValueError): not empty, at most `CN_MAX`
    characters, and no '/' or NUL, which would write the key elsewhere (`x/../../y`)."""
    if not name:
        raise ValueError("must not be empty")
    if len(name) > CN_MAX:
        raise ValueError(f"is {len(name)} characters long; a certificate's common name holds at most {CN_MAX}")
    if Path(stem).name != stem or "\0" in stem:
        raise ValueError(f"cannot name a file in the CA's directory ({stem!r} has a '/' or a NUL)")


def issue(directory: Path, stem: str, common_name: str, names: tuple[str, ...], *, server: bool,
          days: int = 90) -> Issued:
    """A certificate for `common_name` (SANs `names`) signed by the CA in `directory`, written as
    `<stem>.pem` and `<stem>-key.pem` (mode 0600)."""
    check_name(common_name, stem)
    ca_cert, ca_key = load_or_create_ca(directory)
    key = _key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (_builder(common_name, ca_cert.subject, key.public_key(), days)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    issued = Issued(directory / f"{stem}.pem", directory / f"{stem}-key.pem")
    _write_key(issued.key, key)
    _write_cert(issued.cert, cert)
    return issued


def issue_server(directory: Path, names: tuple[str, ...] = DEFAULT_SERVER_NAMES) -> Issued:
    """The controller's certificate, valid for `names` (host names and IP addresses)."""
    return issue(directory, "server", names[0] if names else "maia-controller", names, server=True)


def node_stem(node_id: str) -> str:
    return f"node-{node_id}"


def issue_node(directory: Path, node_id: str) -> Issued:
    """A node agent's client certificate: common name (and DNS SAN) = the node id."""
    return issue(directory, node_stem(node_id), node_id, (node_id,), server=False)


def client_stem(name: str) -> str:
    return f"client-{name}"


def issue_client(directory: Path, name: str) -> Issued:
    """A client certificate for maiactl or another tool, common name `tool:NAME`: no node id has a
    ':', so it can name no node (a node called `admin` cannot be spoken for by `client-admin`)."""
    return issue(directory, client_stem(name), TOOL_PREFIX + name, (), server=False)
