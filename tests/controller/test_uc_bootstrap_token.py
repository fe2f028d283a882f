"""The bootstrap admin token: whatever fails, its file and its row exist together or not at all.

A token committed while its file could not be written (the path a folder, a rename refused) is
one nobody holds: every later start found "an active admin token" and left the file alone, and
only --insecure-no-auth got back in."""

from __future__ import annotations

import re
import stat
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from controller import tokens as token_format
from controller.identity import CONTROLLER
from controller.store import tokens as token_rows
from controller.store.db import Database, UnitOfWork
from controller.usecases import tokens


async def _holds_the_admin_token(db: Database, path: Path) -> bool:
    """Whether `path` holds the secret of an active admin token of `db`."""
    presented = token_format.parse(path.read_text().strip())
    assert presented is not None
    async with db.unit_of_work() as uow:
        row = await token_rows.get_token(uow.session, presented.id)
        return (row is not None and row.role == "admin" and row.revoked_at is None
                and token_format.secret_matches(presented.secret, row.secret_sha256))


async def test_a_token_file_that_cannot_be_written_creates_no_token(database: Database, tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    folder = secrets / "a-folder"
    folder.mkdir(parents=True)
    with pytest.raises(tokens.TokenFileError, match=f"cannot write {folder}: Is a directory"):
        await tokens.bootstrap_admin_token(database, folder, CONTROLLER)
    assert not await tokens.has_active_admin(database)
    assert list(secrets.rglob("*")) == [folder]  # no temporary file left either

    path = secrets / "admin.token"  # the next start, with a file it can write: in again
    made = await tokens.bootstrap_admin_token(database, path, CONTROLLER)
    assert made is not None and not made.adopted and await _holds_the_admin_token(database, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_a_failed_commit_leaves_no_file(database: Database, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    async def refused(_uow: UnitOfWork) -> None:
        raise OperationalError("COMMIT", None, Exception("disk I/O error"))

    monkeypatch.setattr(UnitOfWork, "commit", refused)
    path = tmp_path / "secrets" / "admin.token"
    with pytest.raises(OperationalError):
        await tokens.bootstrap_admin_token(database, path, CONTROLLER)
    monkeypatch.undo()
    assert list(path.parent.iterdir()) == [] and not await tokens.has_active_admin(database)


async def test_a_commit_that_landed_but_raised_keeps_the_file(database: Database, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection lost as the commit went through: the token exists, so its file must stay."""
    committed = UnitOfWork.commit

    async def landed_then_lost(uow: UnitOfWork) -> None:
        await committed(uow)
        raise OperationalError("COMMIT", None, Exception("connection lost"))

    monkeypatch.setattr(UnitOfWork, "commit", landed_then_lost)
    path = tmp_path / "admin.token"
    made = await tokens.bootstrap_admin_token(database, path, CONTROLLER)
    monkeypatch.undo()
    assert made is not None and not made.adopted
    assert await _holds_the_admin_token(database, path)


async def test_a_controller_whose_file_another_adopted_before_its_commit_starts_all_the_same(
        database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two controllers started together on a new database with one token file: one wrote the file;
    the other read it, found no such token yet, adopted it and committed first. The first's commit
    failed on the same key and it refused to start, though the token in its file was there."""
    committed = UnitOfWork.commit
    others: list[tokens.BootstrapToken | None] = []

    async def the_other_adopts_first(uow: UnitOfWork) -> None:
        monkeypatch.setattr(UnitOfWork, "commit", committed)
        others.append(await tokens.bootstrap_admin_token(database, tmp_path / "admin.token", CONTROLLER))
        await committed(uow)

    monkeypatch.setattr(UnitOfWork, "commit", the_other_adopts_first)
    mine = await tokens.bootstrap_admin_token(database, tmp_path / "admin.token", CONTROLLER)
    [other] = others
    assert other is not None and other.adopted
    assert mine is not None and not mine.adopted and mine.view.id == other.view.id
    assert await _holds_the_admin_token(database, tmp_path / "admin.token")


async def test_a_token_the_operator_put_in_the_file_is_adopted(database: Database, tmp_path: Path) -> None:
    """On Kubernetes the written file lived in one pod's memory volume: the first rollout lost it,
    and with an admin token in the database no replica wrote another. An operator's token (from a
    Secret, mounted read-only) is adopted instead, and outlives every pod."""
    secret = token_format.mint()
    path = tmp_path / "admin.token"
    path.write_text(secret.text + "\n")
    path.chmod(0o400)  # as a Secret's volume mounts it
    made = await tokens.bootstrap_admin_token(database, path, CONTROLLER)
    assert made is not None and made.adopted and made.view.id == secret.id and made.view.role == "admin"
    assert await _holds_the_admin_token(database, path) and path.read_text() == secret.text + "\n"
    assert await tokens.bootstrap_admin_token(database, path, CONTROLLER) is None  # the next replica, the next start


@pytest.mark.parametrize("text, says", [
    ("CHANGE-ME", "holds no token maia_<16 hex>.<at least 43 url-safe characters>: put one there, or remove it"),
    ("maia_0123456789abcdef.short", "holds no token maia_<16 hex>"),  # a secret weaker than a minted one
])
async def test_a_file_holding_no_token_is_refused_and_left_alone(database: Database, tmp_path: Path, text: str,
                                                                 says: str) -> None:
    path = tmp_path / "admin.token"
    path.write_text(text)
    with pytest.raises(tokens.TokenFileError, match=re.escape(f"{path} {says}")):
        await tokens.bootstrap_admin_token(database, path, CONTROLLER)
    assert path.read_text() == text and not await tokens.has_active_admin(database)


async def test_a_revoked_token_in_the_file_is_refused(database: Database, tmp_path: Path) -> None:
    path = tmp_path / "admin.token"
    made = await tokens.bootstrap_admin_token(database, path, CONTROLLER)
    assert made is not None and not made.adopted
    async with database.unit_of_work() as uow:
        (await token_rows.get_token(uow.session, made.view.id)).revoked_at = datetime.now(timezone.utc)
        await uow.commit()
    with pytest.raises(tokens.TokenFileError,
                       match=f"holds token {made.view.id}, revoked and of role admin, not one to make"):
        await tokens.bootstrap_admin_token(database, path, CONTROLLER)
    assert not await tokens.has_active_admin(database)


async def test_a_controller_adopting_the_token_another_just_made_first_admin_leaves_it(
        database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two controllers started together on a new database with one token file (CI's failover
    test): one wrote the file and committed between the other's look for an admin token and its
    read of the file. The other refused to start ("holds token ..., an active admin token")."""
    path = tmp_path / "admin.token"
    first = await tokens.bootstrap_admin_token(database, path, CONTROLLER)
    assert first is not None and not first.adopted
    real = token_rows.active_tokens

    async def before_the_other_committed(session, now, **kw):  # type: ignore[no-untyped-def]
        monkeypatch.setattr(token_rows, "active_tokens", real)
        return []

    monkeypatch.setattr(token_rows, "active_tokens", before_the_other_committed)
    assert await tokens.bootstrap_admin_token(database, path, CONTROLLER) is None
    assert await _holds_the_admin_token(database, path)
