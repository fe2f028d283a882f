"""Queries the controller's use cases need, and the mapping of rows to domain values.

Use cases never build SQL: they call these functions with the session of their unit of work
(`from controller.store import repositories as repo`, then `repo.get_node(...)`). Everything
returned to callers outside the store is a `controller.domain.values` value, so the ORM stays
behind this package (rows are returned only to the use cases that change them).

One module a kind of row; this package re-exports their public names:
- `common`: paging, counting, which ids exist, an upsert;
- `generation`: the cluster and capacity generations;
- `events`: the event log;
- `topology`: zones, rows, racks;
- `tenants`: tenants, what a submit batch reads of them, client request ids;
- `usage`: what placements use, by node and tenant, and power by rack;
- `nodes`: node reads, health, cordons, heartbeats, views;
- `deployments`: deployments by name with their placements, submits, deletion marks, views;
- `revisions`: the template revisions kept for rollout history and rollbacks;
- `placements`: shard states, releases, quarantine, the agents' assignment sets.
The generation movers of `store/changes.py` are re-exported for the use cases.
"""

from controller.store.changes import (bump_cluster_generation, bump_cluster_generation_unread, moves_generation_alone,
                                      will_change_deployment_shape, will_change_nodes_hardware, will_move_generation)
from controller.store.repositories.common import (
    count_rows, existing_ids, upsert)
from controller.store.repositories.generation import (
    read_capacity_generation, read_cluster_generation)
from controller.store.repositories.events import (
    NewEvent, event_rows, events_of_kinds, list_events, newest_event_id, record_event, record_events)
from controller.store.repositories.topology import (
    delete_topology_item, get_rack, held_by, list_racks, list_rows, list_zones, lock_topology_item,
    tenants_naming_zone, topology_item_taken, topology_parent_gone, write_topology_item)
from controller.store.repositories.tenants import (
    Customer, ForgetRequestIds, PlacedBeside, SubmitBatchReads, TenantSubmitFacts, count_tenant_deployments,
    customer_of, delete_tenant_row, get_tenant, known_tenant_ids, list_tenant_rows, lock_tenant,
    placed_beside, submit_batch_reads, tenant_created_at, tenant_deployments, tenant_spec)
from controller.store.repositories.usage import (
    ClusterUsage, PLACEMENT_MILLI, cap_room, cluster_usage, free_on_ready_nodes, node_usage, placed_milli, placement_milli,
    placement_power_w, power_usage, rack_power, reserved_usage, tenant_usage, waiting_unpreemptible,
    WAITS_FOR_NO_CAPACITY)
from controller.store.repositories.nodes import (
    clear_eviction, count_nodes_by_rack, count_placements_on_nodes, get_node, list_node_rows, node_capacities,
    node_health_by_zone,
    failed_accelerators, move_node_flags, node_info, node_liveness_rows, node_rows_by_id, node_state_counts, node_view,
    reread_node_flags, set_node_cordoned,
    set_failed_accelerators, set_node_health, stored_faults,
    write_heartbeats)
from controller.store.repositories.deployments import (
    DeploymentColumns, DeploymentSummary, NamedDeployment, PlacedNode, PlacementColumns, SubmitFacts, SummaryRows,
    adopt_revision, changed_since_read, clear_failures, count_deployments_by_phase, count_schedulable_deployments,
    deleting_view, deployment_id_taken, tenant_gone, deployment_page_keys, deployment_spec, deployment_summary_rows,
    deployment_view, deployments_named, deployments_with_ids, get_deployment, implied_phase, insert_deployments,
    list_deployment_rows, lock_revision_placements, new_deployment_columns, new_deployment_row, new_deployment_view,
    deleting_events, set_deleting, spec_columns, submit_facts, take_resource_version, tenants_with_deployment,
    write_deployment_spec, reload_placements, deployment_exists, DEPLOYMENT_COLUMN_ATTRIBUTES, UNVERSIONED_COLUMNS)
from controller.store.repositories.revisions import StoredRevision, keep_revisions, made_at, stored_revisions
from controller.store.repositories.placements import (
    ASSIGNED_SPECS_KEPT, ASSIGNMENT_READ_CHUNK, ShardState, assignment_sets, bump_node_assignment_generations,
    release_placements_off,
    placements_of_deployments, quarantine_deployment, placed_host_use, release_placements_beyond, release_quarantined,
    remove_placements_on_node, shard_states, shard_states_on_nodes, view_as_written, write_deployment_phases,
    write_reported_shards)
