"""A spy on a file keeper's `_write_file` (maia-simnode's credential and shard-state files): how
many writes, of how many entries each, and on which threads (never the event loop's)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import pytest


@dataclass
class Writes:
    sizes: list[int] = field(default_factory=list)  # entries each write held
    threads: set[str] = field(default_factory=set)  # the threads that wrote

    def off_the_loop(self) -> bool:
        return threading.main_thread().name not in self.threads


def count_writes(keeper: Any, monkeypatch: pytest.MonkeyPatch) -> Writes:
    """Record each `keeper._write_file(entries)` call, and let it write."""
    writes, write_file = Writes(), keeper._write_file

    def counted(entries: dict[str, str]) -> None:
        writes.sizes.append(len(entries))
        writes.threads.add(threading.current_thread().name)
        write_file(entries)

    monkeypatch.setattr(keeper, "_write_file", counted)
    return writes
