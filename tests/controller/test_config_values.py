"""maia-controller refuses values no setting means with a usage error (exit 2, one line), never
a traceback or a setting that breaks later: non-finite numbers, a heartbeat timeout whose
interval does not fit the wire, a log level or an advertised address from the environment that
argparse does not judge. (Found by an exploratory test of the controller's flags.)"""

from __future__ import annotations

import pytest

from controller.config import HEARTBEAT_TIMEOUT_MAX_S, parse_args


@pytest.mark.parametrize("argv, env, message", [
    (["--heartbeat-timeout", "nan"], {}, "--heartbeat-timeout: expected a finite number, got 'nan'"),
    (["--heartbeat-timeout", "inf"], {}, "--heartbeat-timeout: expected a finite number, got 'inf'"),
    (["--reconcile-interval", "nan"], {}, "--reconcile-interval: expected a finite number"),  # was a busy loop
    (["--db-wait=-inf"], {}, "--db-wait: expected a finite number"),
    (["--db-wait", "soon"], {}, "--db-wait: expected a number, got 'soon'"),
    (["--heartbeat-timeout", "10000000"], {}, "must be at most 86400 s"),  # every Register failed INTERNAL
    (["--max-rss-mib", "-5"], {}, "--max-rss-mib: must be >= 0"),  # silently meant no ceiling
    # Now plus that overflowed a datetime: every reconcile pass failed from the first failed shard on.
    (["--restart-backoff", "1e12"], {}, "--restart-backoff: must be at most 315360000 seconds (ten years)"),
    (["--node-eviction-grace", "1e300"], {}, "--node-eviction-grace: must be at most 315360000 seconds"),
    (["--db-wait", "-1"], {}, "--db-wait: must be >= 0"),
    ([], {"MAIA_LOG_LEVEL": "verbose"}, "MAIA_LOG_LEVEL) 'VERBOSE' is not one of DEBUG, INFO, WARNING, ERROR"),
    (["--advertise-address", "foo"], {}, "--advertise-address 'foo' is not HOST:PORT"),
    ([], {"MAIA_ADVERTISE_ADDRESS": "ctl.example:99999"}, "--advertise-address 'ctl.example:99999' is not HOST:PORT"),
    (["--advertise-address", "ctl:east:50051"], {},
     "--advertise-address 'ctl:east:50051' is not HOST:PORT (an IPv6 address goes in brackets: [ADDRESS]:PORT)"),
])
def test_values_no_setting_means_are_usage_errors(argv: list[str], env: dict[str, str], message: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_args(argv, env=env)
    err = capsys.readouterr().err
    assert caught.value.code == 2 and message in err and "Traceback" not in err


def test_ten_years_is_a_duration_and_0_where_it_was_one() -> None:
    config = parse_args(["--restart-backoff", "0", "--restart-backoff-max", "315360000", "--db-wait", "0"], env={})
    assert (config.restart_backoff_s, config.restart_backoff_max_s, config.db_wait_s) == (0.0, 315360000.0, 0.0)


def test_the_largest_heartbeat_timeout_tells_agents_an_interval_the_wire_carries() -> None:
    config = parse_args(["--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_MAX_S), "--node-down-grace", "200000",
                         "--node-eviction-grace", "300000"], env={})
    assert config.heartbeat_pacing.base_interval_ms < 2**31  # RegisterResponse.heartbeat_interval_ms is int32
    assert parse_args(["--advertise-address", "[::1]:50051", "--log-level", "debug"], env={}).log_level == "DEBUG"


def test_an_unbracketed_ipv6_advertise_address_is_bracketed() -> None:
    """"$(POD_IP):50051" in an IPv6 cluster: told to agents as it was, they dialled a host
    "fd00::7:50051" with no port."""
    config = parse_args([], env={"MAIA_ADVERTISE_ADDRESS": "fd00::7:50051"})
    assert config.advertise_address == "[fd00::7]:50051"
