"""The installed package's version, for `maiactl version` and `maia-controller --version`.

Its own module so that the client (`controller/cli`) reads it without importing the
controller's configuration and, through it, the store.
"""

from __future__ import annotations


def version_text() -> str:
    """'0.1.0' from the installed package metadata."""
    # Here, not at the top: importlib.metadata costs ~20-60 ms of the start of every maiactl and
    # maia-controller (they import this module to offer --version / `version`), few of which ask.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("maia-scheduler")
    except PackageNotFoundError:  # pragma: no cover - running from a tree that was never installed
        return "unknown"
