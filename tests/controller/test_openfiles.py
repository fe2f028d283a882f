"""Each process raises its soft limit on open files to its hard one at start: a controller holds
a connection per agent, a fleet a connection per node (4,096 nodes over the common 1,024)."""

from __future__ import annotations

import resource

import pytest

from controller import openfiles


@pytest.mark.parametrize("soft, hard, raised", [
    (1024, 65536, 65536),
    (1024, resource.RLIM_INFINITY, openfiles.UNLIMITED_TARGET),
    (65536, 65536, 65536),   # already there: left alone
    (70000, 65536, 70000),   # (never lowered)
], ids=["to the hard limit", "hard unlimited", "already", "never lowered"])
def test_the_soft_limit_is_raised_to_the_hard_one(monkeypatch: pytest.MonkeyPatch, soft: int, hard: int,
                                                   raised: int) -> None:
    set_to: list[tuple[int, int]] = []
    monkeypatch.setattr(openfiles.resource, "getrlimit", lambda which: (soft, hard))
    monkeypatch.setattr(openfiles.resource, "setrlimit", lambda which, limits: set_to.append(limits))
    assert openfiles.raise_open_files_limit() == raised
    assert set_to == ([] if raised == soft else [(raised, hard)])


def test_a_refusal_leaves_the_limit_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(which: int, limits: tuple[int, int]) -> None:
        raise ValueError("not allowed to raise maximum limit")

    monkeypatch.setattr(openfiles.resource, "getrlimit", lambda which: (1024, 4096))
    monkeypatch.setattr(openfiles.resource, "setrlimit", refuse)
    assert openfiles.raise_open_files_limit() == 1024


def test_this_process_can_raise_its_own() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        now = openfiles.raise_open_files_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == now >= soft
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
