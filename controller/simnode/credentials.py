"""Where simulated agents keep their node credentials between runs.

`Register` hands each new node its own credential once; an agent that loses it cannot take
its node back with the fleet's node-bootstrap token (that would let anyone holding the
bootstrap token impersonate a registered node). So the fleet keeps every node's credential in
one JSON file per cluster and rack prefix, mode 0600, under a state directory
(default `$XDG_STATE_HOME/maia-simnode`, else `~/.local/state/maia-simnode`), rewritten
atomically on every change; a restarted `maia-simnode` reconnects with what it finds there.

The cluster is known by its set of controller addresses (`cluster_key`): the controllers answer
no identity of their own (RegisterResponse has none, and the credential is needed before the
first answer), so the same controllers listed in another order, in another case, or a loopback
one named `localhost`, `127.0.0.1` or `[::1]`, are one key. A list that shares an address with
one kept starts from its file (a controller added for HA), and a file named by the text of
`--controller` (before `cluster_key`) is taken over under the new name.

The running fleet's nodes change it through `keep` and `drop`, which return once the file holds
the change: the file is written in a worker thread, and the changes made while one write runs
go together in the next (the whole file rewritten a change, on the event loop, took 8.5 ms at
10,000 nodes, twice each node's first join: ~85 s of a 10,000-node fleet's loop).
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import tempfile
from pathlib import Path


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "maia-simnode"


def unwritable(state_dir: Path) -> str | None:
    """Why the credentials could not be kept in `state_dir` (made if missing), or None. Checked as
    the fleet starts: a node found it out only at its first credential, and ended with
    FileNotFoundError (a container whose user has no home: every node, and the fleet exited 0)."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.TemporaryFile(dir=state_dir):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "default"


_LOOPBACK = ("127.0.0.1", "localhost", "::1", "ip6-localhost")  # the first is how a key writes them


def _spellings(address: str) -> tuple[str, ...]:
    """The ways of writing one controller's HOST:PORT, its key's first: the host in lower case,
    without brackets, a loopback host as 127.0.0.1."""
    host, sep, port = address.strip().lower().rpartition(":")
    if not sep:
        return (address.strip().lower(),)
    host = host.strip("[]")
    return tuple(f"{name}:{port}" for name in (_LOOPBACK if host in _LOOPBACK else (host,)))


def cluster_key(controller: str) -> str:
    """The fleet's cluster as the set of its controllers (`--controller`), whatever their order
    and spelling: "localhost:7000,B:7001" and "b:7001,127.0.0.1:7000" are one cluster."""
    return ",".join(sorted({_spellings(a)[0] for a in controller.split(",") if a.strip()}))


class CredentialFile:
    """node id -> credential, persisted in one 0600 file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._credentials: dict[str, str] = {}
        self._changed = 0   # changes made (`keep`, `drop`), and the count the file holds
        self._saved = 0
        self._writing: asyncio.Future[None] | None = None
        if path.exists():
            loaded = json.loads(path.read_text() or "{}")
            self._credentials = {str(k): str(v) for k, v in loaded.items()}

    @classmethod
    def for_fleet(cls, state_dir: Path, controller: str, rack_prefix: str) -> CredentialFile:
        """The fleet's file, named by its cluster (`cluster_key`) and rack prefix. A fleet given
        another list (a second controller added for HA, one taken away) starts from the file of a
        list sharing an address with it: under a new name its nodes found none, and the bootstrap
        token may not register them again (every node refused, the fleet down)."""
        suffix = f"-{_safe(rack_prefix)}.json"
        kept = cls(state_dir / f"credentials-{_safe(cluster_key(controller))}{suffix}")
        if kept._credentials or not state_dir.is_dir():
            return kept
        legacy = state_dir / f"credentials-{_safe(controller)}{suffix}"  # named by the text given
        if legacy != kept.path and cls(legacy)._credentials:
            os.replace(legacy, kept.path)
            return cls(kept.path)
        addresses = [a.strip() for a in controller.split(",") if a.strip()]
        # Each as given and as a key writes it (a loopback one as 127.0.0.1 and as localhost), in a
        # file name's `_safe` text; not an IPv6 literal, whose colons do not survive it (`[::1]:7000`
        # is `1_7000`, as much of `[2001:db8::1]:7000` as of it: another cluster's file).
        ours = {f"_{_safe(spelling)}_" for a in addresses for spelling in (a, *_spellings(a)[:2])
                if ":" not in spelling.rpartition(":")[0]}
        for other in sorted(state_dir.glob(f"credentials-*{suffix}")):
            listed = f"_{other.name[len('credentials-'):-len(suffix)]}_"
            if other != kept.path and any(address in listed for address in ours):
                kept._credentials = dict(cls(other)._credentials)
                if kept._credentials:
                    kept._write()
                    break
        return kept

    def get(self, node_id: str) -> str | None:
        return self._credentials.get(node_id)

    def put(self, node_id: str, credential: str) -> None:
        self._credentials[node_id] = credential
        self._write()

    def forget(self, node_id: str) -> None:
        if self._credentials.pop(node_id, None) is not None:
            self._write()

    async def keep(self, node_id: str, credential: str) -> None:
        """`put`, from the running fleet: returns once the file holds it (written off the loop)."""
        self._credentials[node_id] = credential
        await self._written()

    async def drop(self, node_id: str) -> None:
        """`forget`, from the running fleet: returns once the file no longer holds it."""
        if self._credentials.pop(node_id, None) is not None:
            await self._written()

    async def _written(self) -> None:
        """Wait until a write that began after this change has ended (its error raised here)."""
        self._changed += 1
        wanted = self._changed
        while self._saved < wanted:
            if self._writing is None:
                self._writing = asyncio.ensure_future(self._write_latest())
            await asyncio.shield(self._writing)

    async def _write_latest(self) -> None:
        try:
            changed, credentials = self._changed, dict(self._credentials)
            await asyncio.to_thread(self._write_file, credentials)
            self._saved = changed
        finally:
            self._writing = None

    def _write(self) -> None:
        self._write_file(self._credentials)

    def _write_file(self, credentials: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(credentials, sort_keys=True))
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
