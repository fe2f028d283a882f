"""maia-controller's TLS flags: what goes together, and how they land in Config."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.config import parse_args


def test_tls_flags_reach_the_config() -> None:
    config = parse_args(["--tls-cert", "s.pem", "--tls-key", "k.pem", "--tls-client-ca", "ca.pem"], env={})
    assert (config.tls_cert, config.tls_key, config.tls_client_ca) == (Path("s.pem"), Path("k.pem"), Path("ca.pem"))
    assert parse_args([], env={}).tls_cert is None


@pytest.mark.parametrize("argv, message", [
    (["--tls-cert", "s.pem"], "--tls-cert and --tls-key go together"),
    (["--tls-key", "k.pem"], "--tls-cert and --tls-key go together"),
    (["--tls-client-ca", "ca.pem"], "--tls-client-ca needs --tls-cert and --tls-key"),
])
def test_incomplete_tls_flags_are_usage_errors(argv: list[str], message: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_args(argv, env={})
    assert caught.value.code == 2 and message in capsys.readouterr().err
