"""The gateway links' private directory: a controller's start removes those of controllers gone,
never a live one's (`controller/gateway/linkdir.py`)."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.gateway.linkdir import OWNER_FILE, PREFIX, SOCKET_FILE, LinkDirectory, LinkPathTooLong, remove_stale


@pytest.fixture
def gone_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.fixture
def listening() -> Iterator[list[socket.socket]]:
    """Sockets bound by `link_directory(..., served=True)`, closed after the test."""
    sockets: list[socket.socket] = []
    yield sockets
    for sock in sockets:
        sock.close()


def link_directory(parent: Path, name: str, *, owner: int | None, served: bool | None,
                   listening: list[socket.socket]) -> Path:
    """A link directory as a controller leaves it: `owner` recorded (None: none), its socket
    listening (`served`), bound and closed (False: a dead controller's) or never bound (None)."""
    directory = parent / f"{PREFIX}{name}"
    directory.mkdir(mode=0o700)
    if owner is not None:
        (directory / OWNER_FILE).write_text(f"{owner}\n")
    if served is not None:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(directory / SOCKET_FILE))
        if served:
            sock.listen()
            listening.append(sock)
        else:
            sock.close()  # the file stays; connecting to it is refused
    return directory


def test_a_dead_controllers_directory_is_removed_and_a_live_ones_kept(
        socket_tmp: Path, gone_pid: int, listening: list[socket.socket]) -> None:
    def made(name: str, owner: int | None, served: bool | None) -> Path:
        return link_directory(socket_tmp, name, owner=owner, served=served, listening=listening)

    killed = made("killed", gone_pid, False)
    killed_before_binding = made("killed-early", gone_pid, None)
    older_controllers = made("no-owner", None, False)  # left before owners were recorded
    live = made("live", os.getpid(), True)
    live_not_bound_yet = made("live-early", os.getpid(), None)
    being_made = made("being-made", None, None)
    other_namespace = made("unseen-owner", gone_pid, True)  # its pid is not ours to see, its socket answers
    # A controller killed before this one, of the same pid (pid 1 of a restarted container).
    same_pid_killed = made("same-pid-killed", os.getpid(), False)

    assert sorted(remove_stale(socket_tmp)) == sorted([killed, killed_before_binding, older_controllers,
                                                       same_pid_killed])
    assert not killed.exists() and not killed_before_binding.exists() and not older_controllers.exists()
    assert not same_pid_killed.exists()
    for kept in (live, live_not_bound_yet, being_made, other_namespace):
        assert kept.is_dir()


def test_a_new_link_directory_records_its_owner_and_clears_what_the_dead_left(
        socket_tmp: Path, gone_pid: int, listening: list[socket.socket]) -> None:
    left = link_directory(socket_tmp, "left", owner=gone_pid, served=False, listening=listening)
    (socket_tmp / f"{PREFIX}a-file").write_text("not a directory: not ours to judge")

    made = LinkDirectory(socket_tmp)

    assert not left.exists() and (socket_tmp / f"{PREFIX}a-file").exists()
    assert made.path.parent == socket_tmp and made.path.name.startswith(PREFIX)
    assert (made.path / OWNER_FILE).read_text().strip() == str(os.getpid())
    assert made.path.stat().st_mode & 0o777 == 0o700 and made.socket == made.path / SOCKET_FILE
    made.remove()
    assert not made.path.exists()


def test_a_temporary_directory_too_long_for_the_links_socket_is_refused_with_a_hint(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    with pytest.raises(LinkPathTooLong, match="set TMPDIR to a shorter directory"):
        LinkDirectory(deep)
    assert list(deep.iterdir()) == []  # nothing made


@pytest.mark.timeout(30)  # without the probe's timeout the connect below blocks for good
def test_a_listener_that_takes_no_connection_does_not_hold_the_start(
        socket_tmp: Path, gone_pid: int, listening: list[socket.socket]) -> None:
    """A hung process's socket (listening, accepting nothing, its backlog full) left under a dead
    owner's pid: the probe gives up, counts it as served and keeps the directory."""
    hung = link_directory(socket_tmp, "hung", owner=gone_pid, served=True, listening=listening)
    listening[-1].listen(0)
    while True:  # fill the backlog: a blocking connect would now wait for an accept that never comes
        waiting = socket.socket(socket.AF_UNIX)
        listening.append(waiting)
        waiting.setblocking(False)
        try:
            waiting.connect(str(hung / SOCKET_FILE))
        except BlockingIOError:
            break

    assert remove_stale(socket_tmp) == []
    assert hung.is_dir()
