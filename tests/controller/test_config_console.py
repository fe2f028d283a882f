"""maia-controller's console flags: the connection caps (`--console-max-connections`,
`--console-max-connections-per-peer`) reach the Config, and caps no console can serve by are
usage errors (exit 2, one line). Operators behind a proxy (every viewer one address) could not
raise the caps at all: they were constants."""

from __future__ import annotations

import pytest

from controller.config import parse_args
from controller.console import server as console_server


def test_the_caps_reach_the_config_and_default_to_the_consoles() -> None:
    config = parse_args(["--console-max-connections", "4096", "--console-max-connections-per-peer", "1024"], env={})
    assert (config.console_max_connections, config.console_max_connections_per_peer) == (4096, 1024)
    defaults = parse_args([], env={})
    assert (defaults.console_max_connections, defaults.console_max_connections_per_peer) == (
        console_server.MAX_CONNECTIONS, console_server.MAX_CONNECTIONS_PER_PEER)
    whole = parse_args(["--console-max-connections", "2", "--console-max-connections-per-peer", "2"], env={})
    assert (whole.console_max_connections, whole.console_max_connections_per_peer) == (2, 2)


@pytest.mark.parametrize("argv, message", [
    (["--console-max-connections", "0"], "argument --console-max-connections: must be >= 1, got 0"),
    (["--console-max-connections", "-5"], "argument --console-max-connections: must be >= 1, got -5"),
    (["--console-max-connections", "many"], "argument --console-max-connections: expected a whole number, got 'many'"),
    (["--console-max-connections-per-peer", "0"], "argument --console-max-connections-per-peer: must be >= 1, got 0"),
    (["--console-max-connections-per-peer", "2.5"],
     "argument --console-max-connections-per-peer: expected a whole number, got '2.5'"),
    # The default total (256) is below the share asked: said, not silently capped.
    (["--console-max-connections-per-peer", "300"],
     "--console-max-connections-per-peer (300) must not exceed --console-max-connections (256)"),
    (["--console-max-connections", "8", "--console-max-connections-per-peer", "9"],
     "--console-max-connections-per-peer (9) must not exceed --console-max-connections (8)"),
])
def test_caps_no_console_serves_by_are_usage_errors(argv: list[str], message: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_args(argv, env={})
    err = capsys.readouterr().err
    assert caught.value.code == 2 and "Traceback" not in err
    usage, error = err.rstrip("\n").rsplit("\n", 1)  # argparse's usage, then the one line
    assert usage.startswith("usage: maia-controller") and error == f"maia-controller: error: {message}"
