"""`--controller A,B,C`: one gRPC target over every controller (any of them serves the API)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_harness import controller_process, maiactl
from controller.cli.client import CliError, Exit, channel_target
from tests.addresses import closed_port_address


def test_one_address_is_used_as_given() -> None:
    assert channel_target("ctl.example:50051") == "ctl.example:50051"


def test_several_addresses_become_one_pick_first_target() -> None:
    assert channel_target("127.0.0.1:50051, 127.0.0.2:50052") == "ipv4:127.0.0.1:50051,127.0.0.2:50052"
    assert channel_target("[::1]:50051,[::1]:50052") == "ipv6:[::1]:50051,[::1]:50052"


def test_an_address_that_does_not_resolve_is_a_usage_error() -> None:
    with pytest.raises(CliError) as refused:
        channel_target("127.0.0.1:50051,no-such-host.invalid:50052")
    assert refused.value.exit_code == Exit.USAGE and "no-such-host.invalid:50052" in str(refused.value)


def test_maiactl_uses_whichever_listed_controller_answers(tmp_path: Path) -> None:
    gone = closed_port_address()  # a controller that died
    with controller_process(tmp_path) as controller:
        for listed in (f"{gone},{controller.address}", f"{controller.address},{gone}"):
            proc = maiactl(listed, "version", "-o", "json", token=controller.token)
            assert proc.returncode == 0, proc.stderr
            assert json.loads(proc.stdout)["server"]
        alone = maiactl(gone, "version", token=controller.token)
        assert alone.returncode == Exit.UNAVAILABLE
