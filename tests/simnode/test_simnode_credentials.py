"""The fleet's credential file (`controller/simnode/credentials.py`) as the running nodes change
it: each change is in the file when `keep` or `drop` returns, and the changes made while a write
runs go together in the next, written off the event loop."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from controller.simnode.credentials import CredentialFile
from tests.file_writes import count_writes


async def test_changes_are_in_the_file_when_they_return_and_written_together(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kept = CredentialFile(tmp_path / "credentials.json")
    writes = count_writes(kept, monkeypatch)

    async def join(i: int) -> None:
        await kept.keep(f"n{i:03}", f"cred-{i}")
        assert json.loads(kept.path.read_text())[f"n{i:03}"] == f"cred-{i}"  # in the file on return

    await asyncio.gather(*(join(i) for i in range(200)))
    assert json.loads(kept.path.read_text()) == {f"n{i:03}": f"cred-{i}" for i in range(200)}
    assert len(writes.sizes) <= 3  # the first alone, the rest together (not a write a change)
    assert writes.off_the_loop()
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


def test_the_same_controllers_written_otherwise_or_listed_in_another_order_keep_one_file(tmp_path: Path) -> None:
    """The file was named by `--controller`'s text: the same cluster given as `localhost:7000`
    after `127.0.0.1:7000`, or its HA list in another order, found no file (or a stale copy of
    another spelling's), and its nodes lost their credentials."""
    first = CredentialFile.for_fleet(tmp_path, "127.0.0.1:7000,ctl-b.example:7001", "rack-")
    first.put("rack-00-n00", "cred-1")
    for spelling in ("ctl-B.example:7001, localhost:7000", "[::1]:7000,ctl-b.example:7001,ctl-b.example:7001"):
        again = CredentialFile.for_fleet(tmp_path, spelling, "rack-")
        assert (again.path, again.get("rack-00-n00")) == (first.path, "cred-1"), spelling
    again.put("rack-00-n00", "cred-2")  # issued anew while the fleet ran under another spelling
    back = CredentialFile.for_fleet(tmp_path, "127.0.0.1:7000,ctl-b.example:7001", "rack-")
    assert back.get("rack-00-n00") == "cred-2"
    assert [p.name for p in tmp_path.glob("credentials-*")] == [first.path.name]
    other = CredentialFile.for_fleet(tmp_path, "127.0.0.2:7000,ctl-b.example:7002", "rack-")  # another cluster
    assert other.path != first.path and other.get("rack-00-n00") is None


def test_a_loopback_fleet_never_takes_the_file_of_an_ipv6_cluster(tmp_path: Path) -> None:
    """`[2001:db8::1]:7000` in a file name's text ends as `..._1_7000`, which the `::1` spelling of a
    loopback controller matched: its nodes presented another cluster's credentials."""
    CredentialFile.for_fleet(tmp_path, "[2001:db8::1]:7000", "rack-").put("rack-00-n00", "other-cluster")
    for spelling in ("localhost:7000", "[::1]:7000"):
        assert CredentialFile.for_fleet(tmp_path, spelling, "rack-").get("rack-00-n00") is None, spelling


def test_a_file_named_by_the_controller_text_is_taken_over_under_the_cluster_key(tmp_path: Path) -> None:
    """Files a fleet kept before `cluster_key` are named by the text given: taken over, not left."""
    old = tmp_path / "credentials-ctl-b.example_7001_Ctl-A.example_7000-rack-.json"
    CredentialFile(old).put("rack-00-n00", "cred-1")
    kept = CredentialFile.for_fleet(tmp_path, "ctl-b.example:7001,Ctl-A.example:7000", "rack-")
    assert kept.get("rack-00-n00") == "cred-1" and kept.path.exists() and not old.exists()
    assert kept.path.name == "credentials-ctl-a.example_7000_ctl-b.example_7001-rack-.json"
    assert kept.path.stat().st_mode & 0o777 == 0o600
