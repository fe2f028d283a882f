"""The fleet's credential file (`controller/simnode/credentials.py`) as the running nodes change
it: each change is in the file when `keep` or `drop` returns, and the changes made while a write
runs go together in the next, written off the event loop."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest

from controller.simnode.credentials import CredentialFile


async def test_changes_are_in_the_file_when_they_return_and_written_together(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kept = CredentialFile(tmp_path / "credentials.json")
    writes: list[int] = []
    threads: set[str] = set()
    write_file = kept._write_file

    def counted(credentials: dict[str, str]) -> None:
        writes.append(len(credentials))
        threads.add(threading.current_thread().name)
        write_file(credentials)

    monkeypatch.setattr(kept, "_write_file", counted)

    async def join(i: int) -> None:
        await kept.keep(f"n{i:03}", f"cred-{i}")
        assert json.loads(kept.path.read_text())[f"n{i:03}"] == f"cred-{i}"  # in the file on return

    await asyncio.gather(*(join(i) for i in range(200)))
    assert json.loads(kept.path.read_text()) == {f"n{i:03}": f"cred-{i}" for i in range(200)}
    assert len(writes) <= 3  # the first alone, the rest together (not a write a change)
    assert threading.main_thread().name not in threads
    assert kept.path.stat().st_mode & 0o777 == 0o600

    await asyncio.gather(kept.drop("n000"), kept.drop("n001"), kept.drop("missing"))
    again = CredentialFile(kept.path)  # as a restarted fleet reads it
    assert again.get("n000") is None and again.get("n001") is None and again.get("n002") == "cred-2"


async def test_a_failed_write_is_raised_to_those_waiting_and_the_next_change_writes_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kept = CredentialFile(tmp_path / "credentials.json")
    write_file = kept._write_file
    failing = [True]

    def flaky(credentials: dict[str, str]) -> None:
        if failing[0]:
            raise OSError(28, "No space left on device")
        write_file(credentials)

    monkeypatch.setattr(kept, "_write_file", flaky)
    with pytest.raises(OSError, match="No space left"):
        await kept.keep("n1", "a")
    failing[0] = False
    await kept.keep("n2", "b")
    assert json.loads(kept.path.read_text()) == {"n1": "a", "n2": "b"}
