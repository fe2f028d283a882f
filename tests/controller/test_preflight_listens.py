"""`check_listens_apart`: two of the controller's own addresses on one port are refused before
anything is opened (else the second bind failed after the database was created and migrated)."""

from __future__ import annotations

import pytest

from controller.preflight import StartupError, check_listens_apart


@pytest.mark.parametrize("metrics, http", [
    ("127.0.0.1:9100", "127.0.0.1:9100"),  # the same address
    ("0.0.0.0:9100", "127.0.0.1:9100"),  # a wildcard takes the port on every address
    ("127.0.0.1:9100", "[::]:9100"),
    ("localhost:9100", "127.0.0.1:9100"),  # one address, named two ways
])
def test_two_addresses_on_one_port_are_refused_naming_both_flags(metrics: str, http: str) -> None:
    with pytest.raises(StartupError) as refused:
        check_listens_apart({"--listen": "127.0.0.1:50051", "--metrics-listen": metrics, "--http-listen": http})
    assert str(refused.value) == (f"--http-listen {http} and --metrics-listen {metrics} ask for the same port 9100; "
                                  f"hint: give each its own port (--http-listen {http.rsplit(':', 1)[0]}:0 "
                                  f"picks a free one)")


@pytest.mark.parametrize("metrics, http", [
    ("127.0.0.1:9100", "127.0.0.1:9101"),  # other ports
    ("127.0.0.1:9100", "127.0.0.2:9100"),  # other addresses
    ("127.0.0.1:0", "127.0.0.1:0"),  # any free port, each its own
])
def test_addresses_apart_pass(metrics: str, http: str) -> None:
    check_listens_apart({"--listen": "127.0.0.1:50051", "--metrics-listen": metrics, "--http-listen": http})
