"""The leader lease: one row (`leader_lease`, id=1) that several controllers compete for.

Every statement here reads the time from the database's clock (PostgreSQL `clock_timestamp()`,
SQLite `julianday('now')`), never from a controller's, so controllers with skewed clocks still
agree on when a lease ran out. `expires_at` is seconds since the epoch on that clock.

- `acquire` takes the lease when it is free (expired) or renews it when this holder still has
  it, in one UPDATE under the row's lock; every new acquisition adds one to `token`, the
  fencing token.
- `fence` runs inside a writer's own transaction, just before it commits: it locks the row
  (`FOR KEY SHARE` on PostgreSQL; SQLite has one writer at a time anyway) and refuses with
  `LeaseLost` unless the row still names this holder, this token and (when asked: `live`, on
  PostgreSQL; a SQLite controller holds its file alone) an expiry in the future.
  `commit_fenced` commits a writer's transaction so fenced; on PostgreSQL the same check rides in
  the COMMIT's own message (`fence_guard`), so it costs no round trip of its own.
  A new leader's acquisition must wait for that lock (it takes the row `FOR UPDATE` first), so a
  deposed leader's late plan either commits before the new leader exists or not at all. The
  holder's own renewal is a plain UPDATE of the expiry, whose lock (`FOR NO KEY UPDATE`) does
  not conflict with the fences': it never waits for the leader's in-flight transactions, so a
  leader whose event loop is slow to finish them still renews in time.
- `release` expires the lease at once on a clean shutdown, so a follower need not wait out
  the expiry.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy import Boolean, bindparam, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from controller.errors import Unavailable
from controller.store import pg_driver
from controller.store.pg_literals import quoted

_PG_NOW = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"
_SQLITE_NOW = "((julianday('now') - 2440587.5) * 86400.0)"
LEASE_LOST_RETRY_MS = 1000  # about when a follower has taken the lease (it tries every --lease-renew-interval)
COMMIT_UNKNOWN_RETRY_MS = 1000  # the pool opens a new connection at the next unit of work: soon, once the server is back


class LeaseLost(Unavailable):
    """This controller no longer holds the leader lease under its token: nothing was written. A
    caller whose write it refused is told UNAVAILABLE (the leader is elsewhere, or soon elected),
    not INTERNAL: a join storm's batches meet it when the lease moves."""

    def __init__(self, holder: str, token: int | None) -> None:
        self.holder = holder
        self.token = token
        super().__init__(f"controller {holder} no longer holds the leader lease (fencing token {token}); "
                         f"the transaction was refused and rolled back; retry (the leader serves it)",
                         retry_after_ms=LEASE_LOST_RETRY_MS)


class CommitOutcomeUnknown(Unavailable):
    """The connection to the database was lost while a fenced transaction was committing (its
    COMMIT on the way, or the answer on the way back): the server may have committed it or not,
    and no client can tell which. Its caller is told UNAVAILABLE saying the write may have landed:
    it must read before it writes the same again, never count it as failed (nor as written)."""

    def __init__(self, holder: str, cause: BaseException) -> None:
        self.holder = holder
        super().__init__(f"controller {holder} lost its database connection while committing "
                         f"({cause}); the write may have landed: "
                         f"read before retrying it", retry_after_ms=COMMIT_UNKNOWN_RETRY_MS, may_have_landed=True)


@dataclass(frozen=True, slots=True)
class LeaseRow:
    """The lease as stored, with the database's time when it was read."""

    holder: str
    token: int
    expires_at: float
    address: str  # where the holder serves gRPC
    agent_address: str  # where it serves agents through gateways ('' when it runs none, or wrote none)
    db_now: float

    @property
    def live(self) -> bool:
        return self.expires_at > self.db_now


def _now(session: AsyncSession) -> str:
    return _SQLITE_NOW if session.bind.dialect.name == "sqlite" else _PG_NOW


async def acquire(session: AsyncSession, holder: str, address: str, ttl_s: float, *,
                  token: int | None, force: bool = False, keep: bool = False, agent_address: str = "") -> int | None:
    """Take or renew the lease for `ttl_s` seconds; the token now held, or None (another's is live).
    The row then says where the holder serves: `address`, and its agent gateways' `agent_address`
    (with `agent_holder`, the holder that wrote it: `read` names it only while that holder holds).

    `token` is the one this holder last held (None: none): the same token comes back while it is
    still live; otherwise the lease is acquired afresh under token + 1. `force` takes it even
    from a live holder (only when something else guarantees exclusivity: the SQLite lock file);
    `keep`, there too, keeps this holder's token even once its lease ran out (a late renewal is
    no reason for a new term). The caller commits."""
    now = _now(session)
    if token is not None:  # a renewal of a live lease: no new leader, so no wait for the fences
        renewed = await session.execute(text(
            f"UPDATE leader_lease SET address = :address, agent_address = :agent_address, agent_holder = :holder, "
            f"expires_at = {now} + :ttl "
            f"WHERE id = 1 AND holder = :holder AND token = :token AND expires_at > {now} RETURNING token"),
            {"holder": holder, "address": address, "agent_address": agent_address, "ttl": float(ttl_s),
             "token": token})
        if (held := renewed.scalar_one_or_none()) is not None:
            return held
    takes = f"id = 1 AND ((holder = :holder AND token = :token) OR expires_at <= {now} OR :force)"
    values = {"holder": holder, "address": address, "agent_address": agent_address, "ttl": float(ttl_s),
              "token": token, "force": force, "keep": keep}
    booleans = (bindparam("force", type_=Boolean), bindparam("keep", type_=Boolean))
    if session.bind.dialect.name != "sqlite":  # a takeover waits for the fenced transactions in flight
        await session.execute(text(f"SELECT token FROM leader_lease WHERE {takes} FOR UPDATE").bindparams(
            booleans[0]), {k: values[k] for k in ("holder", "token", "force")})
    statement = text(
        f"UPDATE leader_lease SET "
        f"token = CASE WHEN holder = :holder AND token = :token AND (expires_at > {now} OR :keep) THEN token "
        f"ELSE token + 1 END, "
        f"holder = :holder, address = :address, agent_address = :agent_address, agent_holder = :holder, "
        f"expires_at = {now} + :ttl "
        f"WHERE {takes} RETURNING token"
    ).bindparams(*booleans)
    result = await session.execute(statement, values)
    return result.scalar_one_or_none()


async def fence(session: AsyncSession, holder: str, token: int | None, *, live: bool = True) -> None:
    """Refuse (`LeaseLost`) unless `holder` still holds a live lease under `token` (with `live`
    False, one not yet taken over: SQLite's lone controller); locks the row until the caller's
    transaction ends."""
    if token is None:
        raise LeaseLost(holder, token)
    lock = "" if session.bind.dialect.name == "sqlite" else " FOR KEY SHARE"
    unexpired = f" AND expires_at > {_now(session)}" if live else ""
    result = await session.execute(text(
        f"SELECT token FROM leader_lease WHERE id = 1 AND holder = :holder AND token = :token"
        f"{unexpired}{lock}"), {"holder": holder, "token": token})
    if result.scalar_one_or_none() is None:
        raise LeaseLost(holder, token)


# The SQLSTATE `commit_fenced`'s guard raises when it refuses (class "MA": none of PostgreSQL's;
# written in migration 0026's `maia_lease_fence`).
FENCE_REFUSED = "MA001"
# The function `fence_guard` calls (migration 0026).
FENCE_FUNCTION = "maia_lease_fence"


def fence_guard(holder: str, token: int, *, live: bool = True) -> str:
    """PostgreSQL: `fence` as one statement without parameters, for a COMMIT's own message: the
    function of migration 0026 locks the row (`FOR KEY SHARE`) or raises `FENCE_REFUSED`, which
    aborts the transaction. A function, not an anonymous `DO` block: PostgreSQL compiles a block
    at every execution and a function once a connection (docs/benchmarks.md, `fencefn`)."""
    return f"SELECT {FENCE_FUNCTION}({quoted(holder)}, {int(token)}, {'true' if live else 'false'})"


def _refused_by_guard(exc: DBAPIError) -> bool:
    return pg_driver.sqlstate(exc) == FENCE_REFUSED


async def commit_fenced(session: AsyncSession, holder: str, token: int | None,
                        commit: Callable[[], Awaitable[None]], *, live: bool = True) -> None:
    """Run `commit` (which commits `session`) only if `holder` still holds the lease under `token`
    (as `fence`); otherwise `LeaseLost`, and nothing is committed.

    On PostgreSQL (asyncpg, `pg_driver`) the check rides in the COMMIT's own message
    (`fence_guard`): no round trip of its own, and the row is locked only for the COMMIT. A unit of
    work that wrote nothing sends no COMMIT and is not checked: it has nothing a new leader could
    find half-done, and nothing acts as the leader on it (below). A connection lost with the COMMIT
    in flight raises `CommitOutcomeUnknown` (the server may have committed); a refusal stays
    `LeaseLost` whatever happens to the connection after it. Elsewhere (SQLite) `fence` runs just
    before `commit`."""
    if token is None:
        raise LeaseLost(holder, token)
    connection = await pg_driver.adapted_connection(session)
    if connection is None:
        await fence(session, holder, token, live=live)
        await commit()
        return
    # The guard rides in the COMMIT: a unit that wrote nothing began no transaction, sends no
    # COMMIT and is not checked (before pg9 a SELECT refused a deposed leader's). Safe because no
    # fenced unit acts as the leader on a commit that wrote nothing. What such a unit read is the
    # database's committed state (READ COMMITTED: what a follower or the new leader reads too),
    # not this controller's, so it acts on nothing stale: the fenced units whose commit may write
    # nothing are a hello batch refused whole (`usecases.agents.hellos`: it answers refusals read
    # from the node rows, as the new leader would) and a report flush with nothing new
    # (`flush_reports`: it hands back nothing to publish). Every fenced unit after which the
    # controller acts as the leader writes, so its COMMIT is checked: a plan commit, even one that
    # changes nothing (the generation row's lock is an UPDATE), after which the reconciler pushes
    # sets, publishes and keeps its cache; an accepted hello, even one that changes no health (it
    # stores the contact time), after which the hub opens the stream and pushes the set; Registers,
    # liveness changes, failures released, replicas retired, alarms. Units that read and never
    # commit (the sets read for pushes, snapshots, the watchdog's check) were never checked.
    # Pinned by tests/controller/test_fenced_reads.py: a change that makes one of those writes
    # conditional fails it (a deposed leader would then act unchecked).
    connection.commit_guard = fence_guard(holder, token, live=live)
    try:
        await commit()
    except DBAPIError as exc:
        if _refused_by_guard(exc):
            raise LeaseLost(holder, token) from exc
        if connection.commit_unknown:
            raise CommitOutcomeUnknown(holder, exc.orig or exc) from exc
        raise
    finally:
        connection.commit_guard = None


async def release(session: AsyncSession, holder: str, token: int) -> bool:
    """Expire this holder's lease now (a clean shutdown); False if it was no longer ours."""
    result = await session.execute(
        text("UPDATE leader_lease SET expires_at = 0 WHERE id = 1 AND holder = :holder AND token = :token"),
        {"holder": holder, "token": token})
    return result.rowcount == 1


async def read(session: AsyncSession) -> LeaseRow:
    row = (await session.execute(text(
        # `agent_address` is the holder's only when it wrote it (`agent_holder`): a controller older
        # than migration 0018 takes the lease leaving the last one's there.
        f"SELECT holder, token, expires_at, address, "
        f"CASE WHEN agent_holder = holder THEN agent_address ELSE '' END AS agent_address, "
        f"{_now(session)} AS db_now "
        f"FROM leader_lease WHERE id = 1"
    ))).one_or_none()
    if row is None:
        raise RuntimeError("leader_lease row id=1 is missing: is the schema migrated?")
    return LeaseRow(row.holder, row.token, row.expires_at, row.address, row.agent_address, row.db_now)
