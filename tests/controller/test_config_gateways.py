"""maia-controller's agent gateway flags: what goes together, and how they land in Config; and the
addresses a controller advertises."""

from __future__ import annotations

import socket

import pytest

from controller.api.server import reachable
from controller.config import parse_args


def test_gateway_flags_reach_the_config() -> None:
    config = parse_args(["--agent-gateways", "2", "--agent-listen", "0.0.0.0:7000",
                         "--agent-gateway-linger-ms", "3"], env={})
    assert (config.agent_gateways, config.agent_listen, config.agent_gateway_linger_ms) == (2, "0.0.0.0:7000", 3.0)
    assert config.advertise_agent_address == ""  # the gateways' bound address
    advertised = parse_args(["--agent-gateways", "1", "--agent-listen", "0.0.0.0:7000"],
                            env={"MAIA_ADVERTISE_AGENT_ADDRESS": "agents.example:7000"})
    assert advertised.advertise_agent_address == "agents.example:7000"
    assert parse_args([], env={}).agent_gateways == 0  # off by default: agents call --listen


@pytest.mark.parametrize("argv, message", [
    (["--agent-gateways", "1"], "--agent-gateways needs --agent-listen"),
    (["--agent-listen", "127.0.0.1:7000"], "--agent-listen is where --agent-gateways listen"),
    (["--agent-gateways", "1", "--agent-listen", "127.0.0.1:7000", "--tls-cert", "s.pem", "--tls-key", "k.pem",
      "--tls-client-ca", "ca.pem"], "--agent-gateways cannot carry mutual-TLS agent identities"),
    (["--agent-gateways", "-1", "--agent-listen", "127.0.0.1:7000"], "must be >= 0"),
    (["--advertise-agent-address", "agents.example:7000"], "--advertise-agent-address is where agents reach"),
])
def test_inconsistent_gateway_flags_are_usage_errors(argv: list[str], message: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_args(argv, env={})
    assert caught.value.code == 2 and message in capsys.readouterr().err


def test_the_environments_agent_address_without_gateways_is_ignored_with_a_warning(
        capsys: pytest.CaptureFixture[str]) -> None:
    """MAIA_ADVERTISE_AGENT_ADDRESS is set alike for a deployment's controllers; one run without
    gateways starts, advertising no gateway address (followers name its --advertise-address)."""
    config = parse_args([], env={"MAIA_ADVERTISE_AGENT_ADDRESS": "agents.example:7000"})
    assert config.agent_gateways == 0 and config.advertise_agent_address == ""
    assert "MAIA_ADVERTISE_AGENT_ADDRESS=agents.example:7000 ignored: no --agent-gateways" in capsys.readouterr().err
    flag_wins = parse_args(["--agent-gateways", "1", "--agent-listen", "0.0.0.0:7000", "--advertise-agent-address",
                            "lb.example:7000"], env={"MAIA_ADVERTISE_AGENT_ADDRESS": "agents.example:7000"})
    assert flag_wins.advertise_agent_address == "lb.example:7000"


def test_a_wildcard_listen_address_is_advertised_by_this_machines_name() -> None:
    """A leader listening on every interface advertised 0.0.0.0:PORT in its lease: followers sent
    agents and clients there, which is no address another machine can call."""
    for bound in ("0.0.0.0:50051", "[::]:50051"):
        assert reachable(bound, "--advertise-address") == f"{socket.getfqdn()}:50051"
    assert reachable("10.0.0.7:50051", "--advertise-address") == "10.0.0.7:50051"
