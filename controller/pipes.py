"""A command's reader that went away (`maiactl get nodes | head -1`): stop as quietly as a
command killed by SIGPIPE (Python ignores that signal), with its status, 128 + 13, and no
message: stderr is for errors of the command, and this is none. maiactl and `maia-simnode fault`."""

from __future__ import annotations

import os
import sys

BROKEN_PIPE_EXIT = 128 + 13


def quiet_stdout() -> None:
    """stdout pointed at /dev/null: its reader is gone, and Python's flush of what is still
    buffered at exit would fail again ("Exception ignored ... BrokenPipeError" on stderr)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a file (a test's capture): nothing to flush there
        pass
