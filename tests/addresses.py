"""Addresses for tests of what clients and agents do when a controller is not there."""

from __future__ import annotations

import socket


def closed_port_address() -> str:
    """An address nobody listens on (a port the OS just handed out and we closed again)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"
