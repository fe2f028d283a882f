"""How by-name commands name a deployment: names are per tenant (two tenants may both have `chat`).

`NAME` with `-n/--tenant TENANT`, or `TENANT/NAME`; each may carry the kind before it, as
`-o name` prints it and kubectl reads it: `deployment/NAME`, `deployment/TENANT/NAME` (`deploy/`
too). So a word whose first part is a deployment kind word is that kind, not a tenant: a tenant
named `deployment` is written `deployment/deployment/NAME` or `-n deployment NAME`. A tenant's
token implies its own tenant, so tenants never need the flag; an admin needs it only when
several tenants use the name (the controller then answers FAILED_PRECONDITION naming them).

Commands naming objects of one kind read `KIND NAME...` or, as `-o name` prints them,
`KIND/NAME...` (`kind_and_names`): `wait deployment/lab/chat`, `explain deployment/lab/chat`,
`drain node/n1` as `get` and `describe` do.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

from controller.cli.client import CliError, Exit

TENANT_HELP = ("the deployments' tenant (names are per tenant; a tenant token implies its own; "
               "TENANT/NAME says it too)")
# The kind words a deployment's name may start with (`deployment/chat`), as `get` spells them.
DEPLOYMENT_KINDS = ("deployment", "deployments", "deploy")
DEPLOYMENT_WORDS = dict.fromkeys(DEPLOYMENT_KINDS, "deployment")  # each spelling -> its kind
NODE_WORDS = {"node": "node", "nodes": "node", "no": "node"}


class KindAndNameFormatter(argparse.HelpFormatter):
    """Help that shows a positional read as one reference of one or two words (`nargs="+"`, a
    metavar such as `[deployment] NAME`, `kind_and_name`) as its metavar, where argparse's own
    rendering (`DEPLOYMENT [DEPLOYMENT ...]`) reads as several."""

    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        if action.nargs == argparse.ONE_OR_MORE and " " in str(action.metavar or ""):
            return str(action.metavar)
        return super()._format_args(action, default_metavar)


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


def kind_and_names(command: str, words: Sequence[str], kinds: dict[str, str],
                   default: str = "") -> tuple[str, list[str]]:
    """The kind and the NAMEs of `COMMAND KIND [NAME...]` (`kinds` maps each KIND spelling to its
    kind), where KIND may itself be the first NAME as `-o name` prints it (`deployment/lab/chat`,
    `node/n1`) and a NAME may say the kind again (`deployment deployment/lab/chat`); with a
    `default` kind the KIND word may be left out (`scale chat`). One kind per command. A
    deployment keeps its word whole (`deployment_ref` reads deployment/[TENANT/]NAME); the other
    kinds' NAMEs lose their `KIND/`."""
    first = words[0] if words else ""
    kind = kinds.get(first.partition("/")[0])
    if kind is None and not default:
        raise CliError(f"{command}: unknown kind {first!r} (one of {_kinds_text(kinds)}, or KIND/NAME)", Exit.USAGE)
    names = list(words) if kind is None or "/" in first else list(words[1:])
    kind = kind or default
    out: list[str] = []
    for word in names:
        split = split_kind(word, kinds)
        if split is not None and split[0] != kind:
            raise CliError(f"{command} {kind}: {word!r} names a {split[0]} (one kind per {command})", Exit.USAGE)
        out.append(split[1] if split is not None and kind != "deployment" else word)
    return kind, out


def kind_and_name(command: str, words: Sequence[str], kinds: dict[str, str], default: str = "") -> tuple[str, str]:
    """`kind_and_names` of a command naming exactly one object: `KIND NAME` or `KIND/NAME`."""
    kind, names = kind_and_names(command, words, kinds, default)
    if len(names) != 1:
        raise CliError(f"{command}: expected {'[KIND] ' if default else 'KIND '}NAME or KIND/NAME, one object "
                       f"(KIND one of {_kinds_text(kinds)}), got {' '.join(words) or 'none'}", Exit.USAGE)
    return kind, names[0]


def _kinds_text(kinds: dict[str, str]) -> str:
    return ", ".join(sorted(set(kinds.values())))


def deployment_ref(word: str, tenant: str | None) -> DeploymentRef:
    """`NAME` (in `tenant`, if given) or `TENANT/NAME`, either after `deployment/`; a TENANT/NAME
    contradicting `tenant` is refused."""
    split = split_kind(word, DEPLOYMENT_WORDS)
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


def placement_name(tenant: str, name: str, replica: int, shard: int) -> str:
    """A shard's placement as `-o name` prints it: `placement/TENANT/NAME/REPLICA/SHARD`, its
    deployment's name with the tenant as `deployment_name` writes it."""
    return f"placement/{DeploymentRef(tenant, name)}/{replica}/{shard}"
