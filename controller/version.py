"""The installed package's version, for `maiactl version` and `maia-controller --version`.

Its own module so that the client (`controller/cli`) reads it without importing the
controller's configuration and, through it, the store.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def version_text() -> str:
    """'0.1.0' from the installed package metadata."""
    try:
        return version("maia-scheduler")
    except PackageNotFoundError:  # pragma: no cover - running from a tree that was never installed
        return "unknown"
