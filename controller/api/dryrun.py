"""Dry runs of writes whose request is the object itself, asked in the call's metadata.

`maia-dry-run: all` (Kubernetes' `dryRun=All`) on CreateTenant, UpdateTenant, ApplyTopology,
UpdateDeployment, RollbackDeployment or RestartDeployment: the call is judged exactly as it would
be written (the caller's rights, every check against what is stored: references, limits, a
contract that running work would break, quotas, the resource version) and answered with the
object as it would be, or with the status
the write would end with; nothing is written, no event, no audit entry, nothing woken. A request
message of these calls has no room for a flag (CreateTenant's is the Tenant), hence the
metadata; SubmitDeployment has its own field (`dry_run`, which also solves where it would land).

A write that has no dry run refuses the key (INVALID_ARGUMENT) rather than writing: a caller
asking for a dry run must never get the write. Reads ignore it. An answered dry run says the key
back in its trailing metadata: a controller older than dry runs by metadata ignores the key and
writes, and its answer lacks it (maiactl then says what may have been written).
"""

from __future__ import annotations

from grpc import aio

from controller.api.interceptors import reads_only
from controller.errors import InvalidArgument

DRY_RUN_METADATA_KEY = "maia-dry-run"
DRY_RUN_ALL = "all"
CREATE_TENANT = "/maia.v1.AdminService/CreateTenant"
UPDATE_TENANT = "/maia.v1.AdminService/UpdateTenant"
APPLY_TOPOLOGY = "/maia.v1.AdminService/ApplyTopology"
UPDATE_DEPLOYMENT = "/maia.v1.DeploymentService/UpdateDeployment"
ROLLBACK_DEPLOYMENT = "/maia.v1.DeploymentService/RollbackDeployment"
RESTART_DEPLOYMENT = "/maia.v1.DeploymentService/RestartDeployment"
DRY_RUN_METHODS = frozenset({CREATE_TENANT, UPDATE_TENANT, APPLY_TOPOLOGY, UPDATE_DEPLOYMENT, ROLLBACK_DEPLOYMENT,
                             RESTART_DEPLOYMENT})
_OWN_FIELD = {"/maia.v1.DeploymentService/SubmitDeployment": "SubmitDeploymentRequest.dry_run"}


def asked(context: aio.ServicerContext, method: str) -> bool:
    """Whether the call asks for a dry run of `method` (a full gRPC method name). INVALID_ARGUMENT
    for a value other than `all`, or on a write that has no dry run of this kind."""
    values = [v for k, v in context.invocation_metadata() or () if k == DRY_RUN_METADATA_KEY]
    if not values:
        return False
    if values != [DRY_RUN_ALL]:
        raise InvalidArgument(f"metadata {DRY_RUN_METADATA_KEY}: {', '.join(map(repr, values))} is not "
                              f"{DRY_RUN_ALL!r} (given once)")
    if method in DRY_RUN_METHODS:
        # Said back in the answer's trailer, so a client can tell a dry run from a controller
        # that knew no dry runs and wrote.
        context.set_trailing_metadata(((DRY_RUN_METADATA_KEY, DRY_RUN_ALL),))
        return True
    if reads_only(method):
        return False
    name = method.rpartition("/")[2]
    own = _OWN_FIELD.get(method)
    raise InvalidArgument(f"{name} has no dry run by metadata {DRY_RUN_METADATA_KEY}"
                          + (f"; set {own}" if own else "")
                          + f" (those with one: {', '.join(sorted(m.rpartition('/')[2] for m in DRY_RUN_METHODS))})")
