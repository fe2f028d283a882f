"""Who may do what: the one place authorization decisions are made.

Use cases call these checks with the caller's `Principal` before they read or write anything.
Roles (see docs/security.md):
- admin: everything;
- tenant: its own deployments (submit, read, delete, watch), its own contract read-only, a
  cluster summary of its own share; another tenant's objects are NOT_FOUND, never revealed;
- node-bootstrap: Register of a node that does not exist yet, nothing else;
- node: Register and Connect as its own node, nothing else.
Acting outside the role is PERMISSION_DENIED.
"""

from __future__ import annotations

from controller.errors import NotFound, PermissionDenied
from controller.identity import Principal, Role


def _denied(who: Principal, action: str, needs: str) -> PermissionDenied:
    return PermissionDenied(f"{action} needs {needs}; the caller's token has role {who.role.value}")


def require_admin(who: Principal, action: str) -> None:
    if not who.is_admin:
        raise _denied(who, action, "an admin token")


def require_role(who: Principal, action: str, *roles: Role) -> None:
    """Admins pass, and the listed roles."""
    if not who.is_admin and who.role not in roles:
        needs = " or ".join(["admin", *(r.value for r in roles)])
        raise _denied(who, action, f"a token with role {needs}")


def visible_tenant(who: Principal, requested: str, action: str) -> str:
    """The tenant whose objects `who` may read or change ('' for all tenants, admins only).

    A tenant token is bound to its tenant: asking for another tenant is NOT_FOUND (a tenant
    never learns which other tenants exist); node and node-bootstrap tokens may not.
    """
    if who.is_admin:
        return requested
    if who.role is not Role.TENANT:
        raise _denied(who, action, "an admin or tenant token")
    if requested and requested != who.tenant:
        raise NotFound(f"tenant {requested} not found")
    return who.tenant


def may_see_tenant(who: Principal, tenant: str) -> bool:
    """Whether one object of `tenant` is visible to `who` (callers answer NOT_FOUND when not)."""
    return who.is_admin or (who.role is Role.TENANT and who.tenant == tenant)


def require_node_credential(who: Principal, action: str) -> None:
    """Admins pass, and node credentials (any node's: which node one speaks for is
    `require_node_speaker`'s, once the call names it)."""
    if who.is_admin or who.role is Role.NODE:
        return
    raise _denied(who, action, "a node's own credential (returned by Register)")


def require_node_speaker(who: Principal, node_id: str, action: str) -> None:
    """Only the node's own credential (or an admin) speaks for a node."""
    if who.is_admin or (who.role is Role.NODE and who.node == node_id):
        return
    if who.role is Role.NODE:
        raise PermissionDenied(f"{action}: this credential belongs to node {who.node}, not {node_id}")
    raise _denied(who, action, f"node {node_id}'s own credential (returned by Register)")
