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

from controller.errors import PermissionDenied
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
