"""How by-name commands name a deployment: names are per tenant (two tenants may both have `chat`).

`NAME` with `-n/--tenant TENANT`, or `TENANT/NAME`. A tenant's token implies its own tenant, so
tenants never need the flag; an admin needs it only when several tenants use the name (the
controller then answers FAILED_PRECONDITION naming them).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from controller.cli.client import CliError, Exit

TENANT_HELP = ("the deployments' tenant (names are per tenant; a tenant token implies its own; "
               "TENANT/NAME says it too)")


def add_tenant_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--tenant", default="", metavar="TENANT", help=TENANT_HELP)


@dataclass(frozen=True)
class DeploymentRef:
    tenant: str  # empty: the caller's own (tenant token) or the only tenant with that name (admin)
    name: str

    def __str__(self) -> str:
        return f"{self.tenant}/{self.name}" if self.tenant else self.name


def deployment_ref(word: str, tenant: str | None) -> DeploymentRef:
    """`NAME` (in `tenant`, if given) or `TENANT/NAME`; a TENANT/NAME contradicting `tenant` is refused."""
    prefix, sep, name = word.rpartition("/")
    if not sep:
        return DeploymentRef(tenant or "", word)
    if not prefix or not name:
        raise CliError(f"{word!r}: expected NAME or TENANT/NAME", Exit.USAGE)
    if tenant and tenant != prefix:
        raise CliError(f"{word!r} names tenant {prefix}, but --tenant says {tenant}", Exit.USAGE)
    return DeploymentRef(prefix, name)
