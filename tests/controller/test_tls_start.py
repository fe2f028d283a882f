"""The controller's TLS files at start: a certificate and key that do not load, or a key that is
not the certificate's, are a start-up error naming the flags (`TlsSettings.server_credentials`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller import devca
from controller.api.tls import TlsSettings
from controller.preflight import StartupError


def test_a_tls_key_that_is_not_the_certificates_is_refused_at_start_naming_the_flags(tmp_path: Path) -> None:
    """grpcio's own refusal came out as "cannot listen on ...: Failed to bind to address"."""
    server = devca.issue_server(tmp_path / "pki")
    other = devca.issue_node(tmp_path / "pki", "n1")
    settings = TlsSettings(cert=server.cert, key=other.key, client_ca=None)
    with pytest.raises(StartupError) as refused:
        settings.server_credentials()
    assert f"--tls-cert {server.cert} and --tls-key {other.key}: the key is not the certificate's" in str(refused.value)
    (tmp_path / "junk.pem").write_text("-----BEGIN NOTHING-----\n")
    with pytest.raises(StartupError, match="cannot load the certificates and the key"):
        TlsSettings(cert=tmp_path / "junk.pem", key=server.key, client_ca=None).server_credentials()
    assert TlsSettings(cert=server.cert, key=server.key, client_ca=None).server_credentials() is not None
