"""The bearer token format: `maia_<id>.<secret>`, minted, parsed and checked.

The id (16 hex characters) names the stored row, so a token is found with one primary-key
lookup; the secret is 32 random bytes (`secrets.token_urlsafe`) and only its SHA-256 digest is
stored. A digest of a 256-bit random secret needs no slow password hash (nothing to guess), and
digests are compared in constant time (`hmac.compare_digest`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

PREFIX = "maia_"
SECRET_BYTES = 32
ID_HEX_CHARS = 16
MAX_TOKEN_CHARS = 128
_TOKEN_RE = re.compile(rf"^{PREFIX}([0-9a-f]{{{ID_HEX_CHARS}}})\.([A-Za-z0-9_-]{{32,80}})$")


@dataclass(frozen=True, slots=True)
class MintedToken:
    id: str
    secret: str
    secret_sha256: str

    @property
    def text(self) -> str:
        """What the holder presents (shown once): maia_<id>.<secret>."""
        return f"{PREFIX}{self.id}.{self.secret}"


@dataclass(frozen=True, slots=True)
class PresentedToken:
    id: str
    secret: str


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def mint() -> MintedToken:
    token_id = secrets.token_hex(ID_HEX_CHARS // 2)
    secret = secrets.token_urlsafe(SECRET_BYTES)
    return MintedToken(token_id, secret, digest(secret))


def parse(text: str) -> PresentedToken | None:
    """The id and secret of a well-formed token, or None."""
    if len(text) > MAX_TOKEN_CHARS:
        return None
    match = _TOKEN_RE.fullmatch(text)
    return PresentedToken(match.group(1), match.group(2)) if match else None


def proposed(text: str) -> MintedToken | None:
    """A token someone minted elsewhere (an agent's credential proposal), or None if malformed."""
    presented = parse(text)
    if presented is None or len(presented.secret) < MIN_PROPOSED_SECRET_CHARS:
        return None
    return MintedToken(presented.id, presented.secret, digest(presented.secret))


# A proposal must be as strong as what mint() makes: 32 random bytes are 43 url-safe characters.
MIN_PROPOSED_SECRET_CHARS = 43


def secret_matches(secret: str, stored_sha256: str) -> bool:
    return hmac.compare_digest(digest(secret), stored_sha256)


def bearer_credential(value: str) -> str | None:
    """The credential of an `Authorization` value, `Bearer <credential>` (the scheme in any case,
    RFC 9110), or None when it is not one: what the gRPC metadata and the console's HTTP header
    both carry."""
    scheme, _, credential = value.strip().partition(" ")
    credential = credential.strip()
    return credential if scheme.lower() == "bearer" and credential else None
