"""py-spy recording the bench's own process (where an in-process controller serves) over a
measured window, for the benches that run the controller in process (`bench submit`, `bench
unary`): collapsed stacks of every thread, raw format."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

ATTACH_S = 0.5  # py-spy attached before the window starts


@asynccontextmanager
async def recording(binary: str | None, output: Path, *, rate_hz: int, log: Path | None = None) -> AsyncIterator[None]:
    """Record this process into `output` while the block runs (nothing when `binary` is None);
    py-spy's own messages go to `log` (dropped when None)."""
    if binary is None:
        yield
        return
    with open(log if log is not None else os.devnull, "w") as messages:
        profiler = subprocess.Popen([binary, "record", "--pid", str(os.getpid()), "--format", "raw", "--threads",
                                     "--rate", str(rate_hz), "--output", str(output)],
                                    stdout=subprocess.DEVNULL, stderr=messages)
        try:
            await asyncio.sleep(ATTACH_S)
            yield
        finally:
            profiler.send_signal(signal.SIGINT)  # py-spy writes what it recorded on SIGINT
            await asyncio.to_thread(profiler.wait, 60)
