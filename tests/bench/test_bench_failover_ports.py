"""The port a controller the failover tests kill and start again listens on (bench/failover.py)."""
from __future__ import annotations

import socket

from bench import failover


def test_a_restarted_controllers_port_is_free_and_never_a_connections_source_port() -> None:
    """Below the kernel's ephemeral range: a controller started again on its address after a kill
    found its port "already in use" in CI, taken meanwhile as a connection's source port."""
    low = failover._ephemeral_low()
    for _ in range(20):
        port = failover.stable_port()
        assert 1024 <= port < low
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))  # free
