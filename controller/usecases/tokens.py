"""Bearer tokens: create (the secret is returned once), list (never secrets), revoke, and the
bootstrap admin token an operator starts with.

Only admins manage tokens. A tenant token is bound to an existing tenant; node credentials
(role node) are issued by `Register` (controller.usecases.agents), not here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from controller import tokens as secrets_
from controller.errors import InvalidArgument, NotFound
from controller.identity import Principal, Role
from controller.store import audit
from controller.store import models as m
from controller.store import repositories as repo
from controller.store import tokens as store
from controller.store.db import Database, UnitOfWork
from controller.usecases import paging, policy
from controller.usecases.paging import Page, PageRequest
from controller.domain.values import IssuedToken, TokenRequest, TokenView
from controller.usecases.ports import Signals
from controller.usecases.validation import check_id, check_optional_id

# Roles an admin may mint directly (node credentials come from Register).
MINTABLE_ROLES = (Role.ADMIN, Role.TENANT, Role.NODE_BOOTSTRAP)
MAX_TTL_S = 10 * 365 * 24 * 3600
BOOTSTRAP_ADMIN_NAME = "bootstrap-admin"


def _now() -> datetime:
    return datetime.now(timezone.utc)


async def _tenant_there(uow: UnitOfWork, tenant: str) -> None:
    """NOT_FOUND unless the tenant exists, its row then kept from deletion until this transaction
    ends (PostgreSQL `FOR KEY SHARE`; the deletion locks it first, then revokes its tokens): a
    token made while its tenant was deleted was left unrevoked, and served the next customer
    given the id."""
    if not await repo.existing_ids(uow.session, m.Tenant, [tenant], key_share=True):
        raise NotFound(f"tenant {tenant} not found")


async def _validate(uow: UnitOfWork, request: TokenRequest) -> Role:
    try:
        role = Role.parse(request.role)
    except ValueError as exc:
        raise InvalidArgument(f"token: {exc}") from None
    if role not in MINTABLE_ROLES:
        raise InvalidArgument(
            f"token: role {role.value} cannot be created directly (node credentials are issued by Register); "
            f"use one of {', '.join(r.value for r in MINTABLE_ROLES)}"
        )
    if request.name:
        check_id("token", request.name)
    if role is Role.TENANT:
        if not request.tenant:
            raise InvalidArgument("token: role tenant needs a tenant")
        check_id("tenant", request.tenant)
        await _tenant_there(uow, request.tenant)
    elif request.tenant:
        raise InvalidArgument(f"token: only role tenant takes a tenant (role is {role.value})")
    if request.node:  # a node yet to register too: no check that it exists
        if role is not Role.NODE_BOOTSTRAP:
            raise InvalidArgument(f"token: only role node-bootstrap takes a node (role is {role.value})")
        check_id("node", request.node)
    if request.ttl_s is not None and not 0 < request.ttl_s <= MAX_TTL_S:
        raise InvalidArgument(f"token: ttl must be between 1 second and {MAX_TTL_S // 86400} days, "
                              f"got {request.ttl_s:g} s")
    return role


def add_token(uow: UnitOfWork, who: Principal, *, role: Role, name: str, tenant: str = "", node: str = "",
              ttl_s: float | None = None, minted: secrets_.MintedToken | None = None) -> IssuedToken:
    """Stage a new token row (the caller commits); returns it with its secret. `minted`: a
    token the holder minted itself (a node agent's credential proposal) instead of a fresh one."""
    minted = minted or secrets_.mint()
    now = _now()
    row = m.ApiToken(id=minted.id, name=name or f"{role.value}-{minted.id[:6]}", role=role.value,
                     tenant_id=tenant or None, node_id=node or None, secret_sha256=minted.secret_sha256,
                     created_by=who.actor, created_at=now,
                     expires_at=now + timedelta(seconds=ttl_s) if ttl_s is not None else None)
    uow.session.add(row)
    repo.record_event(uow.session, actor=who.name, kind="token.created", object_kind="token", object_id=row.id,
                      data={"role": role.value, "name": row.name, "tenant": tenant, "node": node,
                            "request_id": who.request_id})
    return IssuedToken(store.token_view(row), minted.text)


async def create_token(uow: UnitOfWork, who: Principal, request: TokenRequest) -> IssuedToken:
    policy.require_admin(who, "creating tokens")
    role = await _validate(uow, request)
    issued = add_token(uow, who, role=role, name=request.name, tenant=request.tenant, node=request.node,
                       ttl_s=request.ttl_s)
    if request.tenant:  # again once its row is written: on SQLite that holds the writer (a deletion since is seen)
        await uow.session.flush()
        await _tenant_there(uow, request.tenant)
    view = issued.view  # the entry names the token made (its id: what a later RevokeToken names)
    audit.note(created_token=view.id, created_role=view.role, created_tenant=view.tenant, created_node=view.node,
               expires_at=view.expires_at.isoformat() if view.expires_at else None)
    await uow.commit()
    return issued


async def list_tokens(uow: UnitOfWork, who: Principal, *, role: str = "", tenant: str = "",
                      page: PageRequest = PageRequest()) -> Page[TokenView]:
    """Tokens oldest first, a page at a time (`usecases.paging`), never their secrets."""
    policy.require_admin(who, "listing tokens")
    if role:  # a role no token has listed none, as if there were none of it
        try:
            Role.parse(role)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
    check_optional_id("tenant", tenant)
    bounds = paging.bounds(page, paging.scope_of("tokens", role=role, tenant=tenant), (str, str))
    if bounds.after is not None:
        try:  # a time PostgreSQL holds: one that leaves years 1-9999 once in UTC failed INTERNAL
            after = datetime.fromisoformat(str(bounds.after[0]))
            if after.tzinfo is not None:
                after.astimezone(timezone.utc)
        except (ValueError, OverflowError):
            raise InvalidArgument("page_token is not a token this list returned; start again without one") from None
    rows = await store.list_token_rows(uow.session, role=role, tenant=tenant, page=bounds)
    return paging.page_of(rows, bounds, key=store.token_page_key).map(store.token_view)


async def revoke_token(uow: UnitOfWork, who: Principal, token_id: str, signals: Signals) -> TokenView:
    """Revoke at once (idempotent); every controller refuses it from now on (`signals.tokens_revoked`)."""
    policy.require_admin(who, "revoking tokens")
    check_id("token", token_id)
    row = await store.get_token(uow.session, token_id)
    if row is None:
        raise NotFound(f"token {token_id} not found")
    if row.revoked_at is None:
        row.revoked_at = _now()
        repo.record_event(uow.session, actor=who.name, kind="token.revoked", object_kind="token",
                          object_id=row.id, data={"role": row.role, "request_id": who.request_id})
        await uow.commit()
    signals.tokens_revoked([row.id])  # the streams opened with it end too (agents, watches, console)
    return store.token_view(row)


async def revoke_node_credentials(uow: UnitOfWork, who: Principal, node_id: str, signals: Signals, *,
                                  node_deleted: bool = False) -> list[str]:
    """Revoke every active credential of a node, commit the caller's transaction with it (what
    it staged before goes in the same commit: `node_deleted`, the node's deletion), then tell
    every controller (`signals.tokens_revoked`: each forgets their cached verifications and ends
    the agent streams they opened, UNAUTHENTICATED); their ids. A deleted node is removed first
    (`signals.node_removed`): its stream ends as a deletion ends it, once, and the revocation
    finds it ended."""
    revoked = revoke_credentials(uow, who, node_id,
                                 await store.active_tokens(uow.session, _now(), role=Role.NODE.value, node=node_id))
    await uow.commit()
    if node_deleted:
        signals.node_removed(node_id)
    if revoked:
        signals.tokens_revoked(revoked)
    return revoked


async def revoke_tenant_tokens(uow: UnitOfWork, who: Principal, tenant_id: str) -> list[str]:
    """Revoke (staged: the caller commits, then says `signals.tokens_revoked`) every active token
    bound to a tenant being deleted; their ids. Left active, they would serve a tenant created
    later with the same id: its deployments, usage and audit."""
    return _revoke(uow, who, await store.active_tokens(uow.session, _now(), tenant=tenant_id), "tenant", tenant_id)


def revoke_credentials(uow: UnitOfWork, who: Principal, node_id: str, rows: Iterable[m.ApiToken]) -> list[str]:
    """Revoke these active credentials of a node (read by the caller; staged); their ids."""
    return _revoke(uow, who, rows, "node", node_id)


def _revoke(uow: UnitOfWork, who: Principal, rows: Iterable[m.ApiToken], object_kind: str, object_id: str) -> list[str]:
    """Revoke these tokens (staged), with one `token.revoked` event about the object they were
    bound to; their ids."""
    revoked = []
    for row in rows:
        row.revoked_at = _now()
        revoked.append(row.id)
    if revoked:
        repo.record_event(uow.session, actor=who.name, kind="token.revoked", object_kind=object_kind,
                          object_id=object_id, data={"tokens": revoked, "request_id": who.request_id})
    return revoked


async def revoked_among(uow: UnitOfWork, token_ids: Iterable[str]) -> set[str]:
    """Which of these tokens are revoked, in one read."""
    return await store.revoked_among(uow.session, token_ids)


async def has_active_admin(db: Database) -> bool:
    async with db.unit_of_work() as uow:
        return bool(await store.active_tokens(uow.session, _now(), role=Role.ADMIN.value))


async def has_any_token(db: Database) -> bool:
    async with db.unit_of_work() as uow:
        return bool(await store.list_token_rows(uow.session))


class TokenFileError(Exception):
    """The bootstrap admin token's file could not be read or written, or holds no token to adopt
    (nothing was committed)."""


@dataclass(frozen=True, slots=True)
class BootstrapToken:
    view: TokenView
    adopted: bool  # the token the file held (an operator's, e.g. a Kubernetes Secret); else one written there


async def bootstrap_admin_token(db: Database, path: Path, who: Principal) -> BootstrapToken | None:
    """On a database without an active admin token, make the first one: the token `path` holds
    (an operator minted it and put it there, e.g. from a secret store, so that it outlives the
    machine), or else a new one written to `path` (0600).

    Returns None when an admin token exists (`path` is left alone). A new token's file is put in
    place before the row is committed, so that no failure leaves a token nobody holds: a failed
    write commits nothing (`TokenFileError`); a failed commit removes the file unless the row is
    found committed all the same (a connection lost as it committed) or cannot be read. A file
    whose token does not exist (left by a crash between the two, or by that read) is adopted at
    the next start. A file holding something else, or a token that was revoked or has expired,
    is a `TokenFileError`: nothing is replaced that an operator put there.
    """
    async with db.unit_of_work() as uow:
        if await store.active_tokens(uow.session, _now(), role=Role.ADMIN.value):
            return None
        given = _given_token(path)
        if given is not None:
            known = await store.get_token(uow.session, given.id)
            if known is not None:
                active = store.is_active(known, _now())
                if active and known.role == Role.ADMIN.value:
                    # Another controller sharing the file made it the first admin since the read above
                    # (two started together on a new database: it wrote the file, then committed).
                    return None
                state = "revoked" if known.revoked_at is not None else "active" if active else "expired"
                raise TokenFileError(f"{path} holds token {given.id}, {state} and of role {known.role}, not one to "
                                     f"make the first admin: put a new one there, or remove the file to have one "
                                     f"written")
            issued = add_token(uow, who, role=Role.ADMIN, name=BOOTSTRAP_ADMIN_NAME, minted=given)
            try:
                await uow.commit()
            except BaseException:
                # Two controllers adopting one file (a secret mounted in both): the other's landed.
                if not await _committed_anyway(db, given.id):
                    raise
                return None
            return BootstrapToken(issued.view, adopted=True)
        issued = add_token(uow, who, role=Role.ADMIN, name=BOOTSTRAP_ADMIN_NAME)
        _write_secret(path, issued.secret)
        try:
            await uow.commit()
        except BaseException:
            if not await _committed_anyway(db, issued.view.id):
                path.unlink(missing_ok=True)
                raise
            # The row is there: this commit landed as its connection was lost, or another controller
            # sharing the file (two started together on a new database) adopted it between the write
            # and this commit, and its commit came first (this one's failed on the same key).
    return BootstrapToken(issued.view, adopted=False)


def _given_token(path: Path) -> secrets_.MintedToken | None:
    """The token an operator put in `path`, or None where there is none to adopt (no file, an
    empty one, a folder: `_write_secret` says what is wrong with the latter)."""
    try:
        if not path.is_file():
            return None
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    if not text:
        return None
    given = secrets_.proposed(text)
    if given is None:
        raise TokenFileError(f"{path} holds no token {secrets_.PREFIX}<16 hex>.<at least "
                             f"{secrets_.MIN_PROPOSED_SECRET_CHARS} url-safe characters>: put one there, or remove "
                             f"it to have one written")
    return given


def _write_secret(path: Path, secret: str) -> None:
    """`secret` into the file `path` (0600), whole or not at all: written beside it, then renamed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise TokenFileError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise TokenFileError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise


async def _committed_anyway(db: Database, token_id: str) -> bool:
    """Whether the token whose commit failed is in the database all the same; True when that
    cannot be read either (a file whose token does not exist is adopted at the next start; a
    token nobody holds locks everyone out)."""
    try:
        async with db.unit_of_work() as uow:
            return await store.get_token(uow.session, token_id) is not None
    except Exception:  # noqa: BLE001 (the database is failing: keep the file)
        return True
