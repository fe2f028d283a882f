"""Authentication on the real server: bearer tokens on every RPC but health and reflection,
the token RPCs, revocation taking effect at once, expiry, the bootstrap admin token and the
explicitly insecure mode."""

from __future__ import annotations

import logging
import stat
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import select, update

from controller.api.server import ControllerApp
from controller.config import Config
from controller.ratelimit import RETRY_AFTER_METADATA_KEY
from controller.store import models as m
from controller.store import tokens as token_rows
from grpc_harness import Stubs, issue_token
from maia.v1 import admin_pb2, deployments_pb2

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


async def _status_of(stubs: Stubs) -> grpc.StatusCode:
    try:
        await stubs.deployments.ListDeployments(deployments_pb2.ListDeploymentsRequest())
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.fixture
async def connect(controller_app: ControllerApp) -> AsyncIterator:
    opened: list[Stubs] = []

    def _connect(token: str | None) -> Stubs:
        stubs = Stubs.connect(controller_app.address, token)
        opened.append(stubs)
        return stubs

    yield _connect
    for stubs in opened:
        await stubs.channel.close()


async def test_anonymous_calls_are_unauthenticated_but_health_answers(connect) -> None:
    anonymous = connect(None)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await anonymous.admin.ListTenants(admin_pb2.ListTenantsRequest())
    assert err.value.code() == UNAUTHENTICATED
    assert "authorization: Bearer" in err.value.details()
    reply = await health_pb2_grpc.HealthStub(anonymous.channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer not-a-maia-token",
                                    "Bearer maia_0123456789abcdef.short"])
async def test_malformed_credentials_are_unauthenticated(connect, header: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await connect(None).admin.ListTenants(admin_pb2.ListTenantsRequest(), metadata=(("authorization", header),))
    assert err.value.code() == UNAUTHENTICATED


async def test_unknown_token_and_wrong_secret_are_unauthenticated(connect, admin_token: str) -> None:
    token_id = admin_token.split(".")[0]
    assert await _status_of(connect("maia_0123456789abcdef." + "A" * 43)) == UNAUTHENTICATED
    wrong = connect(f"{token_id}.{'B' * 43}")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wrong.admin.ListTenants(admin_pb2.ListTenantsRequest())
    assert (err.value.code(), err.value.details()) == (UNAUTHENTICATED, "invalid token")


async def test_created_token_works_lists_without_secret_and_revoke_is_immediate(
        stubs: Stubs, connect, controller_app: ControllerApp) -> None:
    created = await stubs.admin.CreateToken(admin_pb2.CreateTokenRequest(role="admin", name="ops"))
    assert created.secret.startswith(f"maia_{created.token.id}.")
    ops = connect(created.secret)
    assert await _status_of(ops) == grpc.StatusCode.OK  # verified once: now in the cache

    listed = await stubs.admin.ListTokens(admin_pb2.ListTokensRequest())
    assert {t.name for t in listed.tokens} == {"bootstrap-admin", "ops"}
    assert created.secret.split(".")[1] not in str(listed)
    async with controller_app.db.unit_of_work() as uow:
        stored = (await uow.session.scalars(select(m.ApiToken.secret_sha256))).all()
    assert all(created.secret.split(".")[1] not in h for h in stored)

    revoked = await stubs.admin.RevokeToken(admin_pb2.RevokeTokenRequest(id=created.token.id))
    assert revoked.HasField("revoked_at")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ops.admin.ListTenants(admin_pb2.ListTenantsRequest())
    assert (err.value.code(), err.value.details()) == (UNAUTHENTICATED, f"token {created.token.id} was revoked")


async def test_expired_token_is_unauthenticated(stubs: Stubs, connect, controller_app: ControllerApp) -> None:
    created = await stubs.admin.CreateToken(admin_pb2.CreateTokenRequest(role="admin", ttl_seconds=3600))
    assert created.token.expires_at.ToDatetime(tzinfo=timezone.utc) > datetime.now(timezone.utc)
    short = connect(created.secret)
    assert await _status_of(short) == grpc.StatusCode.OK
    async with controller_app.db.unit_of_work() as uow:  # let an hour pass
        await uow.session.execute(update(m.ApiToken).where(m.ApiToken.id == created.token.id)
                                  .values(expires_at=datetime.now(timezone.utc) - timedelta(seconds=1)))
        await uow.commit()
    controller_app.authn.forget(created.token.id)  # the cache keeps the expiry it read; a restart would too
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await short.admin.ListTenants(admin_pb2.ListTenantsRequest())
    assert err.value.code() == UNAUTHENTICATED and "expired" in err.value.details()


async def test_a_token_the_database_cannot_be_read_for_is_unavailable_with_a_retry_time(
        stubs: Stubs, connect, monkeypatch: pytest.MonkeyPatch) -> None:
    """A token not verified lately is read from the database; with the database unreachable (a
    PostgreSQL stopped) that read failed in front of the error translation and the caller got
    UNKNOWN ("Unexpected ConnectionRefusedError"), which maiactl's watches and the agents took as
    final. It is UNAVAILABLE with a retry time and RetryInfo (nothing was done), and the same call
    is served once the database answers again."""
    created = await stubs.admin.CreateToken(admin_pb2.CreateTokenRequest(role="admin", name="later"))

    async def unreachable(*args: object, **kwargs: object) -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(token_rows, "get_token", unreachable)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await connect(created.secret).admin.ListTenants(admin_pb2.ListTenantsRequest())
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert "could not be read to verify the caller's token (ConnectionRefusedError)" in err.value.details()
    assert dict(err.value.trailing_metadata() or ())[RETRY_AFTER_METADATA_KEY] == "1000"
    [detail] = rpc_status.from_call(err.value).details  # call again as it is: nothing was done
    retry = error_details_pb2.RetryInfo()
    assert detail.Unpack(retry) and retry.retry_delay.ToMilliseconds() == 1000
    monkeypatch.undo()
    assert await _status_of(connect(created.secret)) == grpc.StatusCode.OK


class _PgError(Exception):
    """The driver's error as asyncpg raises it: its SQLSTATE on the exception."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


async def test_a_server_that_takes_no_connection_is_unavailable_and_logged_at_a_bounded_rate(
        stubs: Stubs, connect, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """PostgreSQL out of connection slots (53300) raised the driver's plain DBAPIError, which was not
    taken as a database failure: callers got UNKNOWN with SQLAlchemy's text ("sorry, too many
    clients already"), maiactl's watches ended and every agent's Register logged a traceback. And
    each call's failure was a WARNING line: thousands a minute from a fleet."""
    from sqlalchemy.exc import DBAPIError

    from controller import limits

    created = await stubs.admin.CreateToken(admin_pb2.CreateTokenRequest(role="admin", name="later"))

    async def full(*args: object, **kwargs: object) -> None:
        raise DBAPIError("SELECT ...", None, _PgError("53300", "sorry, too many clients already"))

    monkeypatch.setattr(token_rows, "get_token", full)
    caller = connect(created.secret)
    calls = 3 * int(limits.UNAUTHENTICATED_LINES_BURST)
    with caplog.at_level(logging.WARNING, logger="maia.api"):
        for _ in range(calls):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await caller.admin.ListTenants(admin_pb2.ListTenantsRequest())
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert "could not be read to verify the caller's token (DBAPIError)" in err.value.details()
    lines = [r.getMessage() for r in caplog.records if "failed verifying the caller" in r.getMessage()]
    assert limits.UNAUTHENTICATED_LINES_BURST <= len(lines) <= limits.UNAUTHENTICATED_LINES_BURST + 1, lines


async def test_the_pause_a_caller_is_told_grows_with_the_outage(
        stubs: Stubs, connect, controller_app: ControllerApp, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every agent of a fleet was told to come back in a second for the whole of a database
    outage: thousands of calls a second at a server starting up. The pause grows to a quarter of
    how long the database has kept failing, 10 s at most."""
    import time as time_module

    created = await stubs.admin.CreateToken(admin_pb2.CreateTokenRequest(role="admin", name="later"))

    async def unreachable(*args: object, **kwargs: object) -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(token_rows, "get_token", unreachable)
    caller = connect(created.secret)

    async def told_ms() -> int:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await caller.admin.ListTenants(admin_pb2.ListTenantsRequest())
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        return int(dict(err.value.trailing_metadata() or ())[RETRY_AFTER_METADATA_KEY])

    assert await told_ms() == 1000
    failures = controller_app.db.failures
    # In an outage nothing commits (here the controller's own background work would, ending the run).
    monkeypatch.setattr(failures, "committed", lambda: None)
    failures.began = failures.last = time_module.monotonic() - 20.0  # failing for 20 s
    assert 5000 <= await told_ms() <= 5100
    failures.began = time_module.monotonic() - 600.0
    assert await told_ms() == 10_000


@pytest.mark.parametrize(("request_", "code", "words"), [
    (admin_pb2.CreateTokenRequest(role="root"), grpc.StatusCode.INVALID_ARGUMENT, "role 'root'"),
    (admin_pb2.CreateTokenRequest(role="node"), grpc.StatusCode.INVALID_ARGUMENT, "issued by Register"),
    (admin_pb2.CreateTokenRequest(role="tenant"), grpc.StatusCode.INVALID_ARGUMENT, "needs a tenant"),
    (admin_pb2.CreateTokenRequest(role="tenant", tenant="ghost"), grpc.StatusCode.NOT_FOUND, "tenant ghost"),
    (admin_pb2.CreateTokenRequest(role="admin", tenant="lab"), grpc.StatusCode.INVALID_ARGUMENT, "only role tenant"),
    (admin_pb2.CreateTokenRequest(role="admin", ttl_seconds=-5), grpc.StatusCode.INVALID_ARGUMENT, "ttl"),
])
async def test_bad_token_requests_are_refused_and_nothing_is_written(
        stubs: Stubs, controller_app: ControllerApp, request_, code, words) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.admin.CreateToken(request_)
    assert err.value.code() == code and words in err.value.details()
    async with controller_app.db.unit_of_work() as uow:
        assert len((await uow.session.scalars(select(m.ApiToken))).all()) == 1  # the bootstrap admin only


async def test_only_admins_manage_tokens(stubs: Stubs, connect, controller_app: ControllerApp) -> None:
    await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab"))
    tenant = connect(await issue_token(controller_app.db, "tenant", tenant="lab"))
    bootstrap = connect(await issue_token(controller_app.db, "node-bootstrap"))
    for caller in (tenant, bootstrap):
        for call in (caller.admin.CreateToken(admin_pb2.CreateTokenRequest(role="admin")),
                     caller.admin.ListTokens(admin_pb2.ListTokensRequest()),
                     caller.admin.RevokeToken(admin_pb2.RevokeTokenRequest(id="x"))):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_bootstrap_file_is_0600_and_left_alone_when_an_admin_exists(db_url: str, tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "admin.token"
    config = Config(listen="127.0.0.1:0", db_url=db_url, bootstrap_admin_token_file=str(path))
    app = ControllerApp(config)
    await app.start()
    try:
        first = path.read_text().strip()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        stubs = Stubs.connect(app.address, first)
        assert await _status_of(stubs) == grpc.StatusCode.OK
        await stubs.channel.close()
    finally:
        await app.stop(grace_s=0.5)
    path.write_text("kept\n")
    again = ControllerApp(config)
    await again.start()
    await again.stop(grace_s=0.5)
    assert path.read_text() == "kept\n"


async def test_insecure_no_auth_lets_everyone_in_as_admin(db_url: str) -> None:
    app = ControllerApp(Config(listen="127.0.0.1:0", db_url=db_url, insecure_no_auth=True))
    await app.start()
    try:
        anonymous = Stubs.connect(app.address, None)
        await anonymous.admin.CreateTenant(admin_pb2.Tenant(id="lab"))
        assert await _status_of(anonymous) == grpc.StatusCode.OK
        await anonymous.channel.close()
    finally:
        await app.stop(grace_s=0.5)


async def test_a_storm_of_calls_with_one_token_reads_it_once(database, monkeypatch) -> None:
    """A join storm: thousands of agents present the same node-bootstrap token at once. Callers
    that arrive while its row is being read wait for that read instead of each taking a database
    connection (which drained the pool at 16,384 agents, lease renewals included)."""
    import asyncio

    from controller import authn
    from controller.store import tokens as token_store
    secret = await issue_token(database, "node-bootstrap", name="storm")
    reads = 0
    real = token_store.get_token

    async def counted(session, token_id):
        nonlocal reads
        reads += 1
        return await real(session, token_id)

    monkeypatch.setattr(token_store, "get_token", counted)
    checker = authn.Authenticator(database)
    who = await asyncio.gather(*(checker.authenticate([("authorization", f"Bearer {secret}")]) for _ in range(50)))
    assert reads == 1 and {w.name for w in who} == {"storm"} and all(w.role.value == "node-bootstrap" for w in who)
    checker.forget(secret.split(".")[0].removeprefix("maia_"))
    with pytest.raises(authn.Unauthenticated):  # a wrong secret still fails, read or not
        await checker.authenticate([("authorization", f"Bearer {secret}x")])


async def _revoke_in_store(database, token_id: str) -> None:
    async with database.unit_of_work() as uow:
        await uow.session.execute(update(m.ApiToken).where(m.ApiToken.id == token_id)
                                  .values(revoked_at=datetime.now(timezone.utc)))
        await uow.commit()


async def test_a_text_verified_before_is_not_digested_again_until_its_entry_changes(database, monkeypatch) -> None:
    """A call presenting the text a cached entry was verified with is let through on that entry
    (no parse, no digest); a revoke here (`forget`, what RevokeToken signals) refuses it at once,
    and a wrong secret for the same id is verified, and refused, as ever."""
    from controller import authn, tokens
    secret = await issue_token(database, "admin", name="ops")
    token_id = secret.split(".")[0].removeprefix("maia_")
    digests = 0
    real = tokens.secret_matches

    def counted(*args):
        nonlocal digests
        digests += 1
        return real(*args)

    monkeypatch.setattr(tokens, "secret_matches", counted)
    checker = authn.Authenticator(database)
    bearer = [("authorization", f"Bearer {secret}")]
    who = [await checker.authenticate(bearer) for _ in range(3)]
    assert digests == 1 and {w.name for w in who} == {"ops"} and len({w.request_id for w in who}) == 3
    with pytest.raises(authn.Unauthenticated, match="invalid token"):
        await checker.authenticate([("authorization", f"Bearer {secret[:-1]}{'A' if secret[-1] != 'A' else 'B'}")])
    assert digests == 2

    await _revoke_in_store(database, token_id)
    checker.forget(token_id)
    with pytest.raises(authn.Unauthenticated, match=f"token {token_id} was revoked"):
        await checker.authenticate(bearer)
    assert not checker._by_text  # the revoked token's text is not kept


async def test_a_text_verified_before_is_refused_once_its_token_expires_or_its_entry_goes_stale(
        database, monkeypatch) -> None:
    """Expiry is checked on every call, remembered text or not; past `cache_ttl_s` the row is read
    again (a revoke on another controller sharing the database is seen then)."""
    from controller import authn
    secret = await issue_token(database, "admin", name="ops", ttl_s=3600)
    token_id = secret.split(".")[0].removeprefix("maia_")
    now = [1000.0]
    checker = authn.Authenticator(database, cache_ttl_s=30.0, clock=lambda: now[0])
    bearer = [("authorization", f"Bearer {secret}")]
    await checker.authenticate(bearer)
    await checker.authenticate(bearer)  # remembered

    await _revoke_in_store(database, token_id)  # by another controller: this one is not told
    now[0] += 10.0
    assert (await checker.authenticate(bearer)).name == "ops"  # within the cache's time, as before
    now[0] += 25.0
    with pytest.raises(authn.Unauthenticated, match="was revoked"):
        await checker.authenticate(bearer)

    later = datetime.now(timezone.utc) + timedelta(hours=2)

    class TwoHoursOn(datetime):
        @classmethod
        def now(cls, tz=None):
            return later

    other = await issue_token(database, "admin", name="short", ttl_s=3600)
    bearer = [("authorization", f"Bearer {other}")]
    await checker.authenticate(bearer)
    await checker.authenticate(bearer)  # remembered
    monkeypatch.setattr(authn, "datetime", TwoHoursOn)
    with pytest.raises(authn.Unauthenticated, match="expired at"):
        await checker.authenticate(bearer)
    assert not checker._by_text and not checker._cache


async def test_a_controller_that_cannot_hear_the_others_trusts_its_cache_for_a_second_at_most(database) -> None:
    """While its notification connection is down (`hears_revocations` False) a revocation on
    another controller reaches this one only through the database: a cached verification is
    trusted for `UNHEARD_CACHE_TTL_S`, not `cache_ttl_s`, and the row is read again after it.
    Listening again (and resynced: `forget_all`), it trusts its cache for `cache_ttl_s` again."""
    from controller import authn
    secrets = {name: await issue_token(database, "admin", name=name) for name in ("before", "after")}
    ids = {name: text.split(".")[0].removeprefix("maia_") for name, text in secrets.items()}
    bearers = {name: [("authorization", f"Bearer {text}")] for name, text in secrets.items()}
    now, hears = [1000.0], [True]
    checker = authn.Authenticator(database, cache_ttl_s=30.0, clock=lambda: now[0],
                                  hears_revocations=lambda: hears[0])
    await checker.authenticate(bearers["before"])
    await checker.authenticate(bearers["before"])  # remembered

    hears[0] = False  # the notification connection went down
    await _revoke_in_store(database, ids["before"])  # by another controller: this one is not told
    now[0] += authn.UNHEARD_CACHE_TTL_S / 2
    assert (await checker.authenticate(bearers["before"])).name == "before"  # within the short bound
    now[0] += authn.UNHEARD_CACHE_TTL_S
    with pytest.raises(authn.Unauthenticated, match=f"token {ids['before']} was revoked"):
        await checker.authenticate(bearers["before"])

    hears[0] = True  # listening again, after the resync
    checker.forget_all()
    await checker.authenticate(bearers["after"])
    await _revoke_in_store(database, ids["after"])  # not told: the entry is trusted for `cache_ttl_s` again
    now[0] += 10.0
    assert (await checker.authenticate(bearers["after"])).name == "after"
    now[0] += 25.0
    with pytest.raises(authn.Unauthenticated, match="was revoked"):
        await checker.authenticate(bearers["after"])


class _NoScan(dict):
    """The authenticator's remembered texts, which must never be scanned whole."""

    def _scan(self, *_args):  # noqa: ANN202
        raise AssertionError("every remembered text was scanned")

    __iter__ = items = keys = values = _scan


async def test_a_forgotten_token_has_its_text_dropped_by_id_and_the_others_stay_remembered(
        database, monkeypatch) -> None:
    """A revoked token and an expired one, both verified and their texts remembered, are refused;
    forgetting each drops its own text, found by token id: never a scan of every text remembered
    (up to `CACHE_MAX_ENTRIES`, at every use of an expired token). Another token's text stays
    remembered and lets its calls through."""
    from controller import authn
    texts = {name: await issue_token(database, "admin", name=name, ttl_s=ttl_s)
             for name, ttl_s in (("revoked", 3600), ("expiring", 3600), ("other", 3 * 86400))}
    ids = {name: text.split(".")[0].removeprefix("maia_") for name, text in texts.items()}
    checker = authn.Authenticator(database)
    for text in texts.values():
        for _ in range(2):
            await checker.authenticate([("authorization", f"Bearer {text}")])
    assert set(checker._by_text) == set(texts.values())
    checker._by_text = _NoScan(checker._by_text)

    await _revoke_in_store(database, ids["revoked"])
    checker.forget(ids["revoked"])
    assert texts["revoked"] not in dict.keys(checker._by_text) and ids["revoked"] not in checker._text_of
    with pytest.raises(authn.Unauthenticated, match=f"token {ids['revoked']} was revoked"):
        await checker.authenticate([("authorization", f"Bearer {texts['revoked']}")])

    later = datetime.now(timezone.utc) + timedelta(hours=2)

    class TwoHoursOn(datetime):
        @classmethod
        def now(cls, tz=None):  # noqa: ANN206
            return later

    monkeypatch.setattr(authn, "datetime", TwoHoursOn)
    for _ in range(2):  # remembered, then verified afresh: refused both times
        with pytest.raises(authn.Unauthenticated, match=f"token {ids['expiring']} expired at"):
            await checker.authenticate([("authorization", f"Bearer {texts['expiring']}")])
    assert (await checker.authenticate([("authorization", f"Bearer {texts['other']}")])).name == "other"
    assert dict.keys(checker._by_text) == {texts["other"]} and checker._text_of == {ids["other"]: texts["other"]}


async def test_the_remembered_texts_stay_bounded(database, monkeypatch) -> None:
    """At most `CACHE_MAX_ENTRIES` texts are remembered (and as many token ids naming them); every
    token still authenticates, remembered or not."""
    from controller import authn
    monkeypatch.setattr(authn, "CACHE_MAX_ENTRIES", 3)
    texts = [await issue_token(database, "admin", name=f"ops-{i}") for i in range(7)]
    checker = authn.Authenticator(database)
    for _ in range(2):
        for i, text in enumerate(texts):
            assert (await checker.authenticate([("authorization", f"Bearer {text}")])).name == f"ops-{i}"
            assert len(checker._by_text) <= 3 and len(checker._cache) <= 3
            assert checker._text_of == {entry.principal.token_id: text for text, entry in checker._by_text.items()}


async def test_a_token_revoked_here_while_its_row_was_being_read_is_refused_at_its_next_use(
        database, monkeypatch) -> None:
    """A read of the token's row answered with the row as it was before a revoke here committed
    (the revoke's `forget` ran while the answer was on its way): the call that read it is let
    through (it began before the revoke), but the row it read is not kept, so the next call reads
    the row again and is refused. Kept, the revoked token would be let through until the cache's
    time ran out (30 s), though a revoke here takes effect at once."""
    from controller import authn
    from controller.store import tokens as store
    secret = await issue_token(database, "admin", name="ops")
    token_id = secret.split(".")[0].removeprefix("maia_")
    checker = authn.Authenticator(database)
    get_token = store.get_token

    async def revoked_as_it_answers(session, wanted: str):  # noqa: ANN001, ANN202
        row = await get_token(session, wanted)
        session.expunge(row)  # the row as read, before the revoke
        await _revoke_in_store(database, wanted)
        checker.forget(wanted)
        return row
    monkeypatch.setattr(store, "get_token", revoked_as_it_answers)
    bearer = [("authorization", f"Bearer {secret}")]
    assert (await checker.authenticate(bearer)).name == "ops"
    monkeypatch.setattr(store, "get_token", get_token)
    with pytest.raises(authn.Unauthenticated, match=f"token {token_id} was revoked"):
        await checker.authenticate(bearer)


async def test_forgetting_nodes_drops_their_credentials_cached_verifications_only(database) -> None:
    """Nodes deleted by another controller (their credentials revoked there): `forget_nodes`, given
    every node of the NODE_REMOVED message at once, makes their credentials' next use read the
    database (refused: revoked), not the cache for up to its TTL; another node's credential stays
    cached."""
    from controller import authn
    texts = {node: await issue_token(database, "admin", name=node) for node in ("n1", "n2", "n3")}
    ids = {node: text.split(".")[0].removeprefix("maia_") for node, text in texts.items()}
    async with database.unit_of_work() as uow:
        for node, token_id in ids.items():  # as a node's credential: its principal names the node
            await uow.session.execute(update(m.ApiToken).where(m.ApiToken.id == token_id).values(node_id=node))
        await uow.commit()
    checker = authn.Authenticator(database)
    for text in texts.values():
        await checker.authenticate([("authorization", f"Bearer {text}")])
    for gone in ("n1", "n2"):
        await _revoke_in_store(database, ids[gone])
        await checker.authenticate([("authorization", f"Bearer {texts[gone]}")])  # cached: the revoke not seen yet

    checker.forget_nodes(["n1", "n2"])
    for gone in ("n1", "n2"):
        with pytest.raises(authn.Unauthenticated, match=f"token {ids[gone]} was revoked"):
            await checker.authenticate([("authorization", f"Bearer {texts[gone]}")])
    assert set(checker._cache) == {ids["n3"]}


async def test_forgetting_all_reads_every_token_again_and_keeps_no_read_in_flight(database, monkeypatch) -> None:
    """A resync (revokes on other controllers may have been missed): `forget_all` drops every
    cached verification and remembered text, so a token revoked elsewhere is refused at its next
    use, another one read again and let through; and a read in flight as it ran, which may
    carry the row from before a revoke, is not cached (the next use reads again)."""
    from controller import authn
    from controller.store import tokens as store
    texts = {name: await issue_token(database, "admin", name=name) for name in ("kept", "gone")}
    ids = {name: text.split(".")[0].removeprefix("maia_") for name, text in texts.items()}
    checker = authn.Authenticator(database)
    for text in texts.values():
        await checker.authenticate([("authorization", f"Bearer {text}")])
    await _revoke_in_store(database, ids["gone"])
    assert (await checker.authenticate([("authorization", f"Bearer {texts['gone']}")])).name == "gone"  # cached

    checker.forget_all()
    assert not checker._cache and not checker._by_text and not checker._text_of
    with pytest.raises(authn.Unauthenticated, match=f"token {ids['gone']} was revoked"):
        await checker.authenticate([("authorization", f"Bearer {texts['gone']}")])
    assert (await checker.authenticate([("authorization", f"Bearer {texts['kept']}")])).name == "kept"

    get_token = store.get_token

    async def resynced_as_it_answers(session, wanted: str):  # noqa: ANN001, ANN202
        row = await get_token(session, wanted)
        checker.forget_all()
        return row
    checker.forget_all()
    monkeypatch.setattr(store, "get_token", resynced_as_it_answers)
    assert (await checker.authenticate([("authorization", f"Bearer {texts['kept']}")])).name == "kept"
    assert not checker._cache  # the row read across the resync is not kept
