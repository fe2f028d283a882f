"""The private directory of a controller's gateway links, and the removal of those left behind.

The controller's end of its gateways' links is a unix socket (`relay.sock`) in a directory of its
own under the temporary directory (`maia-gateways-*`, mode 0700: only the controller's user can
reach the socket). A clean stop removes it; a controller killed with SIGKILL (or by the OOM
killer) cannot, and its directory stayed, a dead socket in it, one more for every such death.

So the directory names its owner: the controller's pid in `owner`, written before the socket is
bound. A controller starting gateways first removes the directories its user left whose owner is
gone and whose socket nobody serves (`remove_stale`). A live controller's directory is never
removed: its owner's pid is alive, and its socket answers (the socket check also keeps a
directory whose owner's pid this process cannot see, another pid namespace sharing /tmp, once
that owner has bound its socket: in the moment before, such a directory looks killed early). A
directory made before owners were recorded is removed once its socket exists and refuses
connections; one with neither owner nor socket (being made this instant) is left alone. One whose
owner is this very pid is judged by its socket alone: in a container the controller is pid 1 on
every restart, and its killed predecessor's directory was kept as a live one's, for good.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

log = logging.getLogger("maia.gateway")

PREFIX = "maia-gateways-"
OWNER_FILE = "owner"
SOCKET_FILE = "relay.sock"
# A unix socket's path (sockaddr_un.sun_path on Linux: 108 bytes with its terminating NUL).
SOCKET_PATH_MAX = 107
# How long the probe of a left socket may wait to connect: a listener that accepts nothing (a hung
# or stopped process, its backlog full) held a blocking connect forever, and the controller's
# start with it. With a timeout the connect is non-blocking underneath: a full backlog answers
# at once (EAGAIN), a slow peer within this long. Either counts as served: the directory is kept.
PROBE_TIMEOUT_S = 1.0


class LinkPathTooLong(ValueError):
    """The links' socket would not fit in a unix socket address under this temporary directory."""


class LinkDirectory:
    """A new private directory for the links' socket, owned by this process (`path / SOCKET_FILE`)."""

    def __init__(self, parent: Path | None = None) -> None:
        parent = check_link_parent(parent)
        remove_stale(parent)
        self.path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))  # mode 0700
        (self.path / OWNER_FILE).write_text(f"{os.getpid()}\n")
        self.socket = self.path / SOCKET_FILE

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def check_link_parent(parent: Path | None = None) -> Path:
    """The directory link directories are made in ($TMPDIR by default); raises LinkPathTooLong if
    the links' socket in one would not fit in a unix socket address."""
    parent = Path(tempfile.gettempdir()) if parent is None else parent
    longest = parent / f"{PREFIX}{'x' * 8}" / SOCKET_FILE  # mkdtemp's names: PREFIX and 8 characters
    if (size := len(os.fsencode(longest))) > SOCKET_PATH_MAX:
        raise LinkPathTooLong(
            f"the agent gateways' link socket under {parent} would be {size} bytes, more than a unix "
            f"socket's {SOCKET_PATH_MAX}; hint: set TMPDIR to a shorter directory (e.g. /tmp)")
    return parent


def remove_stale(parent: Path) -> list[Path]:
    """Remove the link directories this user left in `parent` whose controller is gone; returns them."""
    removed = []
    for directory in sorted(parent.glob(f"{PREFIX}*")):
        try:
            if directory.is_symlink() or not directory.is_dir() or directory.stat().st_uid != os.getuid():
                continue
            if not _stale(directory):
                continue
        except OSError:  # gone meanwhile, or not ours to read
            continue
        shutil.rmtree(directory, ignore_errors=True)
        log.info("removed %s: the controller that made it is gone", directory)
        removed.append(directory)
    return removed


def _stale(directory: Path) -> bool:
    owner = _owner(directory)
    # This process's pid: another controller of this process (tests run several), or one before it
    # with the same pid (pid 1 of a container restarted after the OOM killer): judged by its socket.
    mine = owner == os.getpid()
    if owner is not None and not mine and _alive(owner):
        return False
    link = directory / SOCKET_FILE
    if (owner is None or mine) and not link.exists():
        return False  # no owner recorded, or this pid's, and no socket yet: being made now
    return not _served(link)


def _owner(directory: Path) -> int | None:
    try:
        return int((directory / OWNER_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _served(path: Path) -> bool:
    """Whether something accepts connections on the unix socket at `path` (unsure: yes; a listener
    that does not take the connection within `PROBE_TIMEOUT_S` is unsure)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(PROBE_TIMEOUT_S)
        try:
            probe.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        except OSError:  # BlockingIOError or TimeoutError among them: a listener that takes no connection
            return True
    return True
