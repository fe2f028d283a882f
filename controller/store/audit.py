"""The audit log: an append-only, hash-chained table, and the check that it is intact.

Every entry has a sequence number and `hash = SHA-256(canonical content)`, where the content
includes the entry's `seq` and `prev_hash` (the hash of entry seq-1; 64 zeros for entry 1).
Editing an entry breaks its own hash; removing, inserting or reordering entries breaks the
sequence or the link to the previous hash. `audit_head` (one row) records the newest seq and
hash: appenders take its row lock first (PostgreSQL row lock; on SQLite the UPDATE takes the
database write lock), so concurrent appends form one chain, and `verify_chain` compares the
table's tail with it, so deleting the newest entries is detected too.

What the chain cannot do (docs/security.md): someone who can write the database can rewrite
the whole tail *and* the head consistently. Only a head recorded outside the database (the
`expected_head` of `verify_chain`, e.g. from an earlier `maiactl audit verify`) detects that.

Retention (`maia-controller --audit-ttl`, off by default) deletes the oldest entries a batch at a
time (`prune`): a prefix of the chain, each batch re-hashed first (it stops before an entry that
does not verify, and never deletes the newest), and `audit_base` records the last one deleted.
The chain then begins there: `verify_chain` checks that the first entry left links to it.

`append` runs in the caller's transaction (a plan commit writes its placement decisions with
the placements themselves); the caller commits. An API call's own entry rides along with the
call's first commit (`open_call` / `commit`, used by `UnitOfWork.commit`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from contextvars import ContextVar, Token
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

from sqlalchemy import Row, TextClause, bindparam, case, delete, event, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from controller import limits
from controller.store.inlist import POSTGRESQL, dialect_of, session_dialect
from controller.store.models import AuditBase, AuditEntry, AuditHead, as_utc, utcnow
from controller.store.marks import refused_by_null, rowcount_unread
from controller.store.retention import Pruned
from controller.store.riders import Rider

log = logging.getLogger("maia.audit")

GENESIS_HASH = "0" * 64
OUTCOME_OK = "OK"
_VERIFY_BATCH = 2000

# Column widths of audit_log (longer values are cut, never refused: an audit write must not fail).
_LIMITS = {"request_id": 64, "actor": 128, "role": 32, "tenant": 128, "action": 128, "object_kind": 32,
           "object_id": 255, "outcome": 32}
_DETAIL_TEXT_LIMIT = 1024
_COLUMNS = tuple(getattr(AuditEntry, name) for name in ("seq", "at", "prev_hash", "hash", "detail", *_LIMITS))


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """What to append: who did what to which object, and how it ended."""

    actor: str
    action: str                     # an RPC method (/maia.v1.X/Y) or a decision (placement.preempted)
    outcome: str = OUTCOME_OK       # OK, or the status code name of a failure
    role: str = ""
    tenant: str = ""                # the tenant whose object or work it is ("" for cluster objects)
    object_kind: str = ""
    object_id: str = ""
    request_id: str = ""
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ChainReport:
    """The result of `verify_chain`: intact, or the first bad entry and what is wrong with it."""

    intact: bool
    entries: int                    # entries read
    head_seq: int                   # what audit_head records
    head_hash: str
    first_bad_seq: int | None = None
    problem: str = ""
    first_seq: int = 1              # the first entry checked: those before it were deleted past --audit-ttl


def _clean(text: Any, limit: int) -> str:
    """Printable text within `limit` characters (NUL and control characters never reach the DB);
    a longer one cut, ending "…". A cut never splits what may be an id: a prefix of another
    tenant's id is no id the tenant redactor knows (a tenant read "northwind-" of one in a long
    watchdog alarm), so the cut goes before it."""
    text = str(text)
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else "\ufffd" for ch in text)
    if len(text) <= limit:
        return text
    kept = text[:limit - 1]
    cut = _ID_RUN.match(text, limit - 1)  # the cut falls inside a run of id characters
    if cut is not None:
        start = _ID_RUN_END.search(kept).start()  # type: ignore[union-attr]  (it matches "" at least)
        if cut.end() - start <= limits.ID_MAX:  # a longer run is neither an id nor a TENANT/NAME key
            kept = kept[:start]
    return kept + "…"


# Runs of what ids and deployment keys (TENANT/NAME) are made of (`usecases.validation.ID_RE`): one
# from a place, one ending a text. A key cut in its NAME left "otherlab/…", its tenant whole, which
# the redaction (a key with its name, or a tenant id not before a '/') did not know.
_ID_RUN = re.compile(r"[-A-Za-z0-9_./]+")
_ID_RUN_END = re.compile(r"[-A-Za-z0-9_./]*\Z")


# Types `_clean_json` keeps as they are, exactly these (checked first: the ABC checks below cost
# more than the rest of an entry's cleaning, and a plan commit's details are mostly numbers).
_KEPT_TYPES = frozenset({bool, int, float, type(None)})


def _clean_json(value: Any) -> Any:
    if type(value) in _KEPT_TYPES:
        return value
    if isinstance(value, str):
        return _clean(value, _DETAIL_TEXT_LIMIT)
    if type(value) is dict or isinstance(value, Mapping):
        return {_clean(k, 128): _clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_json(v) for v in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return _clean(value, _DETAIL_TEXT_LIMIT)


def _at_text(at: datetime) -> str:
    # SQLite hands back naive datetimes (stored in UTC); PostgreSQL aware ones: hash the same text.
    return as_utc(at).astimezone(timezone.utc).isoformat(timespec="microseconds")


# The canonical JSON of an entry, one encoder for all (`json.dumps` with these options builds one a call).
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def entry_hash(values: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of an entry's canonical content: every column but `hash`, as sorted JSON."""
    return _hash_at(values, _at_text(values["at"]))


def _hash_at(values: Mapping[str, Any], at_text: str) -> str:
    """`entry_hash` with the entry's time as `_at_text` gives it (the same for a whole append)."""
    content = {
        "seq": int(values["seq"]),
        "at": at_text,
        "prev_hash": values["prev_hash"],
        "detail": values["detail"],
        **{key: values[key] for key in _LIMITS},
    }
    return hashlib.sha256(_CANONICAL.encode(content).encode()).hexdigest()


def _row_values(record: AuditRecord) -> dict[str, Any]:
    values = {key: _clean(getattr(record, key), limit) for key, limit in _LIMITS.items()}
    values["detail"] = _clean_json(dict(record.detail))
    return values


# The head this process last wrote, per database (its URL, not its engine: a reconciler on a thread
# of its own has an engine of its own, and it and the controller's appended to one chain, each
# missing the other's head every time, a failed compare-and-set and two more statements per append):
# the next append links to it without reading the head first (`append`). Stale (another process
# appended: another controller, a leader before this one, `maiactl` on the file), the
# compare-and-set misses and the head is read (or, unread, the transaction fails). A transaction of
# this process that appended and then rolled back forgets the head it wrote (`_rolled_back`): it was
# never committed. SQLAlchemy's savepoints (`begin_nested`) fire the same events: one rolled back
# forgets the head (whether its append was before the savepoint or in it: at worst the next append
# reads the head), one released is not the transaction's commit (`_committed`). A savepoint rolled
# back in plain SQL (`pg_driver.Savepoint`) fires nothing: the plan commits that take one append
# only once it can no longer be rolled back to.
_last_heads: dict[str, tuple[int, str]] = {}
# In a session's `info`: (database, head) of the append it made in its open transaction.
_APPENDED = "maia_audit_appended"


@event.listens_for(Session, "after_commit")
def _committed(session: Session) -> None:
    if not session.in_nested_transaction():  # a savepoint released: the transaction may still roll back
        session.info.pop(_APPENDED, None)


@event.listens_for(Session, "after_rollback")
def _rolled_back(session: Session) -> None:
    appended = session.info.pop(_APPENDED, None)
    if appended is not None and _last_heads.get(appended[0]) == appended[1]:  # no later append linked to it
        _last_heads.pop(appended[0], None)

# `append`'s statements, built once (Core, on the tables: building and caching them per append,
# and the ORM's bulk insert, were a fifth of a submit batch's own time).
_HEAD = AuditHead.__table__
_MOVE_KNOWN_HEAD = (
    update(_HEAD)
    .where(_HEAD.c.id == 1, _HEAD.c.seq == bindparam("known_seq"), _HEAD.c.hash == bindparam("known_hash"))
    .values(seq=bindparam("new_seq"), hash=bindparam("new_hash"))
    .returning(_HEAD.c.seq)
)
_INSERT_ENTRIES = insert(AuditEntry.__table__)
# SQLite, `append(unread=True)`: `_MOVE_KNOWN_HEAD` with nothing read back, and the entries with
# their hash only where the head is now at the last one's (`new_hash`): NULL, which the column
# refuses, when the compare and set missed.
_MOVE_KNOWN_HEAD_UNREAD = rowcount_unread(
    update(_HEAD)
    .where(_HEAD.c.id == 1, _HEAD.c.seq == bindparam("known_seq"), _HEAD.c.hash == bindparam("known_hash"))
    .values(seq=bindparam("new_seq"), hash=bindparam("new_hash"))
)
_INSERT_ENTRIES_IF_MOVED = insert(AuditEntry.__table__).values(hash=case(
    (select(_HEAD.c.hash).where(_HEAD.c.id == 1).scalar_subquery() == bindparam("new_hash"), bindparam("row_hash"))))
# PostgreSQL: `_MOVE_KNOWN_HEAD` and, when it moved the head, the entries (`rows`: JSON), in one
# statement (each is a round trip on the event loop's turns); nothing is inserted when it did not.
_ENTRY_COLUMNS = ", ".join(("seq", "at", "prev_hash", "hash", "detail", *_LIMITS))


@lru_cache(maxsize=16)
def _move_known_head_and_insert(along: tuple[str, ...] = ()) -> TextClause:
    """That statement, with the data-modifying WITHs that ride in it (`along`: `Rider.cte`), which
    write whether or not it moved the head."""
    return text(
        f"WITH {''.join(cte + ', ' for cte in along)}moved AS (UPDATE audit_head SET seq = :new_seq, "
        "hash = :new_hash WHERE id = 1 AND seq = :known_seq AND hash = :known_hash RETURNING seq) "
        f"INSERT INTO audit_log ({_ENTRY_COLUMNS}) SELECT {', '.join('e.' + c for c in _ENTRY_COLUMNS.split(', '))} "
        "FROM moved, json_populate_recordset(NULL::audit_log, CAST(:rows AS JSON)) AS e RETURNING seq")


def _chained(records: Sequence[AuditRecord], first: int, prev_hash: str, at: datetime) -> list[dict[str, Any]]:
    rows = []
    at_text = _at_text(at)
    for offset, record in enumerate(records):
        values = {**_row_values(record), "seq": first + offset, "at": at, "prev_hash": prev_hash}
        values["hash"] = prev_hash = _hash_at(values, at_text)
        rows.append(values)
    return rows


async def append(session: AsyncSession, records: Sequence[AuditRecord], *, at: datetime | None = None,
                 unread: bool = False, along: Sequence[Rider] = ()) -> list[int]:
    """Append `records`, in order, to the chain in the caller's transaction; returns their seqs
    (`_append`)."""
    return [row["seq"] for row in await _append(session, records, at=at, unread=unread, along=along)]


async def append_calls(session: AsyncSession, calls: Sequence[CallEntry], *, unread: bool = False,
                       along: Sequence[Rider] = ()) -> None:
    """Append API calls' entries (`append`) in the caller's transaction, a writer that commits
    them for their calls (a group commit) or the call itself (`commit`). Each call remembers the
    entry as sent (`CallEntry.sent`); the writer sets `written` once its commit returns."""
    rows = await _append(session, [call.record for call in calls], unread=unread, along=along)
    for call, row in zip(calls, rows, strict=True):
        call.sent = (row["seq"], row["hash"])


_LANDED = select(AuditEntry.seq).where(AuditEntry.seq == bindparam("seq"), AuditEntry.hash == bindparam("hash"))


async def landed(session: AsyncSession, call: CallEntry) -> bool:
    """Whether the call's entry, sent with a commit that did not return (`CallEntry.sent`), is in
    the chain: the entry at its seq has its hash (its content, time and link: nothing else has
    it). No read for a call whose entry was never sent."""
    if call.sent is None:
        return False
    seq, hash_ = call.sent
    return (await session.execute(_LANDED, {"seq": seq, "hash": hash_})).first() is not None


async def _append(session: AsyncSession, records: Sequence[AuditRecord], *, at: datetime | None = None,
                  unread: bool = False, along: Sequence[Rider] = ()) -> list[dict[str, Any]]:
    """Append `records`, in order, to the chain in the caller's transaction; returns their rows
    as written (seq, hash, ...).

    The first statement moves the head (taking its lock) so concurrent appenders serialise here.
    Usually two statements (one on PostgreSQL): the head this process wrote last is moved on to the
    new entries only if it is still the head (compare and set; PostgreSQL re-evaluates the
    condition on the row another appender committed), then the entries are inserted (on
    PostgreSQL by the same statement, only if it moved the head). When someone else appended since
    (another process, an edit), three: move the head and read where it was, insert, record the
    new hash (on PostgreSQL, when it was another engine of this process, one: `_append_at_known_head`).
    The head written is remembered for the next append; forgotten if the transaction
    rolls back.

    `unread` (SQLite, inside `marks.deferred_writes`; for a writer whose transaction
    fails or commits whole, and that is retried when it fails): the compare and set reads
    nothing back, so both statements go with the transaction's next statement or its commit (no
    trip of their own to SQLite's thread while it holds the writer). A missed compare and set
    then fails the transaction instead of reading the head: the entries' INSERT writes their
    hash only where the head was moved to it, and NULL (refused: NOT NULL) elsewhere, so nothing
    is written (`head_missed`), and the rollback forgets the head it would have linked to: the
    caller's retry reads the database's head, or links to one this process wrote since. On
    PostgreSQL the compare and set always reads back: a miss there costs one statement in place
    (below), where a transaction failed whole costs its caller a message and a retry (a submit
    batch's writes all in its COMMIT's message missed 5 % of the time at 50/s, behind the
    reconciler's plan commits, then on a thread of its own: docs/benchmarks.md, `pgscript`).

    `along`: writes of other tables in the caller's transaction that nothing reads before its
    commit (`riders`: a submit batch's request ids and events), in order. On PostgreSQL, when this
    process knows the head, they ride in the head's statement (one round trip for all), else each
    goes first by a statement of its own.
    """
    engine = getattr(session.bind, "sync_engine", None)
    database = str(engine.url) if engine is not None else None
    known = _last_heads.get(database) if database is not None else None
    postgres = dialect_of(session) == POSTGRESQL
    along = [rider for rider in along if not rider.empty]
    if not (records and known is not None and postgres):  # no statement carries them: each its own
        for rider in along:
            await rider.write(session)
        along = []
    if not records:
        return []
    # In UTC: SQLite keeps a time's wall clock and drops its zone, and the hash is of the UTC time.
    at = utcnow() if at is None else as_utc(at).astimezone(timezone.utc)
    rows: list[dict[str, Any]] = []
    inserted = False
    if known is not None and postgres:
        rows = await _append_at_known_head(session, records, known, at, along, database)
        inserted = bool(rows)
    elif known is not None:
        rows = _chained(records, known[0] + 1, known[1], at)
        moving = _moving(known, rows)
        if unread:
            await session.execute(_MOVE_KNOWN_HEAD_UNREAD, moving)
            await session.execute(_INSERT_ENTRIES_IF_MOVED, [
                {**{key: value for key, value in row.items() if key != "hash"}, "row_hash": row["hash"],
                 "new_hash": moving["new_hash"]} for row in rows])
            inserted = True
        elif (await session.execute(_MOVE_KNOWN_HEAD, moving)).one_or_none() is None:
            rows = []  # not there: read below
    if not rows:
        moved = await session.execute(
            update(AuditHead)
            .where(AuditHead.id == 1)
            .values(seq=AuditHead.seq + len(records))
            .returning(AuditHead.seq, AuditHead.hash)
            .execution_options(synchronize_session=False)
        )
        head = moved.one_or_none()
        if head is None:
            raise RuntimeError("audit_head row id=1 is missing: is the schema migrated?")
        rows = _chained(records, head.seq - len(records) + 1, head.hash, at)
        await session.execute(_INSERT_ENTRIES, rows)
        await session.execute(
            rowcount_unread(update(AuditHead)).where(AuditHead.id == 1).values(hash=rows[-1]["hash"])
            .execution_options(synchronize_session=False)
        )
    elif not inserted:
        await session.execute(_INSERT_ENTRIES, rows)
    if database is not None:
        head = _last_heads[database] = (rows[-1]["seq"], rows[-1]["hash"])
        session.info[_APPENDED] = (database, head)
    return rows


_MISSED_HEAD = ((AuditEntry.__table__.name, AuditEntry.__table__.c.hash.name),)


def head_missed(exc: BaseException) -> bool:
    """`exc` is the refusal of an `unread` append whose compare and set missed (the NULL hash its
    entries' INSERT wrote: another appender moved the head since this process last did), and
    nothing else: its caller's transaction wrote nothing, and may be written again without
    `unread`, which reads the head."""
    return refused_by_null(exc, _MISSED_HEAD)


def _moving(known: tuple[int, str], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The compare and set's parameters: the head from `known` to the last of `rows`."""
    return {"known_seq": known[0], "known_hash": known[1], "new_seq": rows[-1]["seq"], "new_hash": rows[-1]["hash"]}


async def _append_at_known_head(session: AsyncSession, records: Sequence[AuditRecord], known: tuple[int, str],
                                at: datetime, along: Sequence[Rider], database: str | None) -> list[dict[str, Any]]:
    """PostgreSQL, `_append` with a head known: the entries chained to it, moved and inserted by
    one statement that carries `along` (written whether it moves the head or not); [] when the
    head was not there. When another writer of this process appended since `known` was read (a
    plan commit of the reconciler, whose lock this statement waited for: 3-4 % of a submit
    batch's appends at 50/s), its head is `_last_heads`' now, and one more such statement links
    to it, instead of the three statements that read the head (docs/benchmarks.md, `pgtrips`)."""
    dialect = session_dialect(session)
    for _ in range(2):
        rows = _chained(records, known[0] + 1, known[1], at)
        entries = json.dumps([{**row, "at": _at_text(row["at"])} for row in rows])
        names = [f"along{i}_" for i in range(len(along))]
        statement = _move_known_head_and_insert(tuple(r.cte(name, dialect) for r, name in zip(along, names)))
        params = {key: value for r, name in zip(along, names) for key, value in r.params(name, dialect).items()}
        if (await session.execute(statement, {**_moving(known, rows), "rows": entries, **params})).first() is not None:
            return rows
        along = ()
        newer = _last_heads.get(database) if database is not None else None
        if newer is None or newer == known:
            break
        known = newer
    return []


@dataclass
class CallEntry:
    """The audit entry of the API call being served, written by the call's first commit."""

    record: AuditRecord
    task: asyncio.Task[Any] | None
    written: bool = False
    # (seq, hash) of the entry as last appended (`append_calls`). Left set with `written` False
    # when that transaction's commit did not return: rolled back, or (PostgreSQL, its answer lost:
    # `CommitOutcomeUnknown`) committed. Whoever writes the entry next (the call's lone retry after
    # a batch, the audit interceptor) first asks whether it landed (`landed`): one entry per call.
    sent: tuple[int, str] | None = None
    # The batch that took the entry (`carried_by`) when the call's task went away before it ended:
    # done once the batch committed (`written`) or did not. Whoever then audits the gone call
    # waits for it: the entry is written with the batch, or not at all.
    carrier: asyncio.Future[Any] | None = None


def carried_by(call: CallEntry | None, batch: asyncio.Future[Any]) -> None:
    """`call`'s entry was taken into a batch that settles `batch` (a group commit's `left`)."""
    if call is not None:
        call.carrier = batch


_call: ContextVar[CallEntry | None] = ContextVar("maia_audit_call", default=None)


def open_call(record: AuditRecord) -> Token[CallEntry | None]:
    """From now on, the first unit of work this task commits carries `record` (see `commit`)."""
    return _call.set(CallEntry(record, asyncio.current_task()))


def current_call() -> CallEntry | None:
    """The entry of the API call this task serves, while it is not written yet: a writer that
    commits the call's change in another task (a group commit) appends `record` itself and
    then sets `written`."""
    entry = _call.get()
    if entry is None or entry.written or entry.task is not asyncio.current_task():
        return None
    return entry


def note(**detail: Any) -> None:
    """More of the detail of the API call's entry this task serves, from the use case that knows
    it (what an update changed, what a create made): written with the entry by the call's commit.
    Nothing outside an audited call; a call that fails is audited as its caller asked."""
    entry = current_call()
    if entry is not None:
        entry.record = replace(entry.record, detail={**entry.record.detail, **detail})


def close_call(token: Token[CallEntry | None]) -> CallEntry | None:
    entry = _call.get()
    try:
        _call.reset(token)
    except ValueError:  # reset from another context: nothing to undo there
        pass
    return entry


async def commit(session: AsyncSession) -> None:
    """Commit `session`; inside an audited API call, its entry is appended first, in the same
    transaction, so the change and its audit entry persist together or not at all. Tasks the
    call spawned (they inherit the context) do not write it: only the call's own task. An entry
    sent before by a commit that did not return and that landed is not appended again (`landed`:
    a lone retry after its batch's COMMIT answer was lost)."""
    entry = _call.get()
    if entry is None or entry.written or entry.task is not asyncio.current_task():
        await session.commit()
        return
    if not await landed(session, entry):  # sent before by a commit that did not return, and there
        await append_calls(session, [entry])
    await session.commit()
    entry.written = True


async def list_entries(session: AsyncSession, *, tenant: str | None = None, since: datetime | None = None,
                       after_seq: int = 0, limit: int = 100) -> list[Row[Any]]:
    """Entries (rows with every column) in seq order after `after_seq` (keyset paging), optionally
    of one tenant and since a time."""
    query = select(*_COLUMNS).where(AuditEntry.seq > after_seq)
    if tenant is not None:
        query = query.where(AuditEntry.tenant == tenant)
    if since is not None:
        query = query.where(AuditEntry.at >= since)
    return list(await session.execute(query.order_by(AuditEntry.seq).limit(limit)))




def _check_batch(rows: Sequence[Mapping[str, Any]], prev_seq: int, prev_hash: str) -> tuple[int, str] | None:
    """The first broken link among `rows` (ordered by seq) after entry `prev_seq`: (seq, problem)."""
    for row in rows:
        seq = row["seq"]
        if seq != prev_seq + 1:
            return prev_seq + 1, (f"entry {prev_seq + 1} is missing (the entry after {prev_seq} is {seq}): "
                                  "entries were removed or renumbered")
        if row["hash"] != entry_hash(row):
            return seq, f"entry {seq} does not match its hash: it was edited, or moved from another position"
        if row["prev_hash"] != prev_hash:
            return seq, (f"entry {seq} does not link to entry {prev_seq} (prev_hash differs): entry {prev_seq} "
                         f"was rewritten or entry {seq} was inserted")
        prev_seq, prev_hash = seq, row["hash"]
    return None


async def prune(session: AsyncSession, before: datetime, limit: int, *, since: datetime | None = None) -> Pruned:
    """Delete the oldest `limit` entries at most recorded before `before`, and record the last one
    deleted as the chain's base (`audit_base`), in the caller's transaction. Only a prefix of the
    chain goes: it stops at the first entry recorded at `before` or later, never takes the newest
    (the head record names it), and stops before the first that does not verify against the base
    (re-hashed in a worker thread: an edited or missing entry stays for `verify_chain` to name).
    `since` is the `Retention` loop's and unused: the base says where the last batch stopped."""
    base = (await session.execute(
        select(AuditBase.seq, AuditBase.hash).where(AuditBase.id == 1).with_for_update())).one_or_none()
    if base is None:
        raise RuntimeError("the audit chain's base record (audit_base id=1) is missing: nothing deleted")
    newest = select(func.max(AuditEntry.seq)).scalar_subquery()
    times = (await session.execute(
        select(AuditEntry.seq, AuditEntry.at).where(AuditEntry.seq > base.seq, AuditEntry.seq < newest)
        .order_by(AuditEntry.seq).limit(limit))).all()
    through = None  # the last entry of the prefix recorded before `before`
    for seq, at in times:
        if as_utc(at) >= before:
            break
        through = seq
    if through is None:  # what a caught-up leader pays a minute: a read of times, no entry's content
        return Pruned(0, None)
    due = [dict(row._mapping) for row in await session.execute(
        select(*_COLUMNS).where(AuditEntry.seq > base.seq, AuditEntry.seq <= through).order_by(AuditEntry.seq))]
    bad = await asyncio.to_thread(_check_batch, due, base.seq, base.hash)
    if bad is not None:
        log.error("audit retention stopped before entry %d, which does not verify: %s", bad[0], bad[1])
        due = [row for row in due if row["seq"] < bad[0]]
    if not due:
        return Pruned(0, None)
    last = due[-1]
    table = AuditEntry.__table__
    count = (await session.execute(
        delete(table).where(table.c.seq > base.seq, table.c.seq <= last["seq"]))).rowcount
    await session.execute(update(AuditBase).where(AuditBase.id == 1)
                          .values(seq=last["seq"], hash=last["hash"], at=last["at"]))
    return Pruned(int(count or 0), as_utc(last["at"]))


async def verify_chain(session: AsyncSession, *, expected_head: tuple[int, str] | None = None) -> ChainReport:
    """Re-hash every entry in seq order and check the links, the recorded head and `expected_head`.

    Reads in batches (keyset on seq); hashing runs in a worker thread so the loop stays free.
    """
    head = (await session.execute(select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1))).one_or_none()
    if head is None:
        return ChainReport(False, 0, 0, "", 1, ("the head record (audit_head id=1) was deleted: no entry from 1 on can be "
                                          "checked against it"))
    base = (await session.execute(
        select(AuditBase.seq, AuditBase.hash, AuditBase.at).where(AuditBase.id == 1))).one_or_none()
    if base is None:
        return ChainReport(False, 0, head.seq, head.hash, 1, (
            "the base record (audit_base id=1) was deleted: where the chain begins is unknown"))
    if base.seq > 0 and base.at is None:  # retention records the time of what it deleted
        return ChainReport(False, 0, head.seq, head.hash, base.seq + 1, (
            f"the base record (audit_base id=1) names entry {base.seq} but no time: it was not written by retention"),
            base.seq + 1)
    # Retention deletes all it moves the base past, in one transaction: an entry at or before the
    # base still stored (and listed) was left by a base moved by hand, and would go unchecked.
    first_left, left = (await session.execute(
        select(func.min(AuditEntry.seq), func.count()).where(AuditEntry.seq <= base.seq))).one()
    if left:
        return ChainReport(False, 0, head.seq, head.hash, first_left, (
            f"{left} entries at or before the base (entry {base.seq}, where the chain begins) are still stored, the "
            f"first {first_left}: retention deletes what it moves the base past, so the base was moved by hand and "
            "would leave them unchecked"), base.seq + 1)
    prev_seq, prev_hash, entries = base.seq, base.hash, 0

    def broken(seq: int, problem: str) -> ChainReport:
        return ChainReport(False, entries, head.seq, head.hash, seq, problem, base.seq + 1)

    while True:
        batch = [dict(row._mapping) for row in await session.execute(
            select(*_COLUMNS).where(AuditEntry.seq > prev_seq).order_by(AuditEntry.seq).limit(_VERIFY_BATCH))]
        if not batch:
            break
        bad = await asyncio.to_thread(_check_batch, batch, prev_seq, prev_hash)
        if bad is not None:
            entries += sum(1 for row in batch if row["seq"] < bad[0])
            return broken(*bad)
        entries += len(batch)
        prev_seq, prev_hash = batch[-1]["seq"], batch[-1]["hash"]

    if prev_seq < head.seq:
        return broken(prev_seq + 1, f"entries {prev_seq + 1}..{head.seq} are missing: the head records seq "
                                    f"{head.seq} but the log ends at {prev_seq} (the newest entries were removed)")
    if prev_seq > head.seq:
        return broken(head.seq + 1, f"entry {head.seq + 1} is beyond the recorded head (seq {head.seq}): "
                                    "entries were appended outside the controller")
    if prev_hash != head.hash:
        return broken(prev_seq, f"entry {prev_seq} does not match the hash the head records")
    if expected_head is not None:
        want_seq, want_hash = expected_head
        if want_seq > head.seq:
            return broken(head.seq + 1, f"the log ends at seq {head.seq} but the expected head is seq {want_seq}: "
                                        "the newest entries (and the head record) were removed")
        if want_seq > 0 and want_hash and want_seq < base.seq:
            # Deleted past --audit-ttl, or by whoever moved the base: nothing can tell which, so
            # the check the operator asked for fails rather than pass unchecked.
            return broken(want_seq, (
                f"the expected head, entry {want_seq}, was deleted (the chain begins after entry {base.seq}, past "
                "--audit-ttl or by hand): it cannot be checked; save a newer head more often than the audit TTL"))
        if want_seq > 0 and want_hash:
            found = (base.hash if want_seq == base.seq else
                     (await session.execute(select(AuditEntry.hash).where(AuditEntry.seq == want_seq))).scalar_one())
            if found != want_hash:
                return broken(want_seq, f"entry {want_seq} does not have the expected head hash: the log was "
                                        "rewritten from there on (head record included)")
    return ChainReport(True, entries, head.seq, head.hash, first_seq=base.seq + 1)
