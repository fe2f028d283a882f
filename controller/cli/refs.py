"""How by-name commands name a deployment: names are per tenant (two tenants may both have `chat`).

`NAME` with `-n/--tenant TENANT`, or `TENANT/NAME`; each may carry the kind before it, as
`-o name` prints it and kubectl reads it: `deployment/NAME`, `deployment/TENANT/NAME` (`deploy/`
too). So a word whose first part is a deployment kind word is that kind, not a tenant: a tenant
named `deployment` is written `deployment/deployment/NAME` or `-n deployment NAME`. A tenant's
token implies its own tenant, so tenants never need the flag; an admin needs it only when
several tenants use the name (the controller then answers FAILED_PRECONDITION naming them).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from controller.cli.client import CliError, Exit

TENANT_HELP = ("the deployments' tenant (names are per tenant; a tenant token implies its own; "
               "TENANT/NAME says it too)")
# The kind words a deployment's name may start with (`deployment/chat`), as `get` spells them.
DEPLOYMENT_KINDS = ("deployment", "deployments", "deploy")


def add_tenant_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--tenant", default="", metavar="TENANT", help=TENANT_HELP)


@dataclass(frozen=True)
class DeploymentRef:
    tenant: str  # empty: the caller's own (tenant token) or the only tenant with that name (admin)
    name: str

    def __str__(self) -> str:
        return f"{self.tenant}/{self.name}" if self.tenant else self.name


def split_kind(word: str, kinds: dict[str, str]) -> tuple[str, str] | None:
    """'deployment/openlab/chat' -> ('deployment', 'openlab/chat'), 'node/n1' -> ('node', 'n1'):
    the kind (its canonical word, `kinds` maps each spelling) and the rest of a KIND/NAME word,
    as `-o name` prints them; None when the word does not start with a kind of `kinds`."""
    kind, sep, rest = word.partition("/")
    if not sep or kind not in kinds:
        return None
    if not rest:
        raise CliError(f"{word!r}: expected {kind}/NAME", Exit.USAGE)
    return kinds[kind], rest


def deployment_ref(word: str, tenant: str | None) -> DeploymentRef:
    """`NAME` (in `tenant`, if given) or `TENANT/NAME`, either after `deployment/`; a TENANT/NAME
    contradicting `tenant` is refused."""
    split = split_kind(word, dict.fromkeys(DEPLOYMENT_KINDS, "deployment"))
    rest = split[1] if split else word
    parts = rest.split("/")
    if len(parts) == 1:
        return DeploymentRef(tenant or "", rest)
    if len(parts) > 2 or not all(parts):
        raise CliError(f"{word!r}: expected NAME or TENANT/NAME, either after deployment/", Exit.USAGE)
    prefix, name = parts
    if tenant and tenant != prefix:
        raise CliError(f"{word!r} names tenant {prefix}, but --tenant says {tenant}", Exit.USAGE)
    return DeploymentRef(prefix, name)


def deployment_name(tenant: str, name: str) -> str:
    """A deployment as `-o name` prints it, which every by-name command reads back:
    `deployment/TENANT/NAME` (`deployment/NAME` when the tenant is not known)."""
    return f"deployment/{DeploymentRef(tenant, name)}"
