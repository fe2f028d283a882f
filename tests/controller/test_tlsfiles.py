"""`CertificateFiles.fetch`, which gRPC calls at each new connection's handshake: the files looked
at once a second at most, read again only once changed, a half-replaced pair not taken."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from controller import devca
from controller.tlsfiles import RELOAD_CHECK_S, CertificateFiles


def test_fetch_takes_replaced_files_once_they_agree(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    old, new, live = tmp_path / "old", tmp_path / "new", tmp_path / "live"
    for directory in (old, new, live):
        directory.mkdir()
    devca.issue_server(old)
    devca.issue_server(new)
    for name in ("server.pem", "server-key.pem"):
        (live / name).write_bytes((old / name).read_bytes())
    now = [0.0]
    files = CertificateFiles(live / "server.pem", live / "server-key.pem", clock=lambda: now[0])
    files.server_credentials()
    now[0] += RELOAD_CHECK_S
    assert files.fetch() is None  # nothing changed

    (live / "server.pem").write_bytes((new / "server.pem").read_bytes())
    assert files.fetch() is None  # within the second: not looked at
    now[0] += RELOAD_CHECK_S
    with caplog.at_level(logging.WARNING, logger="maia.tls"):
        assert files.fetch() is None  # the new certificate, the old key: not taken
    assert "the key is not the certificate's" in caplog.text

    (live / "server-key.pem").write_bytes((new / "server-key.pem").read_bytes())
    now[0] += RELOAD_CHECK_S
    assert files.fetch() is not None
    now[0] += RELOAD_CHECK_S
    assert files.fetch() is None  # taken once

    (live / "server-key.pem").unlink()
    now[0] += RELOAD_CHECK_S
    with caplog.at_level(logging.WARNING, logger="maia.tls"):
        assert files.fetch() is None
    assert f"--tls-key {live / 'server-key.pem'}: cannot read it" in caplog.text


def test_a_client_ca_bundle_caught_half_written_is_not_taken(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    devca.issue_server(tmp_path)
    ca = tmp_path / devca.CA_CERT
    now = [0.0]
    files = CertificateFiles(tmp_path / "server.pem", tmp_path / "server-key.pem", ca, clock=lambda: now[0])
    files.server_credentials()
    whole = ca.read_bytes()
    ca.write_bytes(whole + whole[: len(whole) // 2])  # a bundle of two CAs, the second cut short
    now[0] += RELOAD_CHECK_S
    with caplog.at_level(logging.WARNING, logger="maia.tls"):
        assert files.fetch() is None
    assert "cannot load the certificates and the key" in caplog.text
    ca.write_bytes(whole + whole)  # written whole
    now[0] += RELOAD_CHECK_S
    assert files.fetch() is not None
