"""Other tenants' reservations at admission: a non-preemptible ask must not take free capacity
another tenant is owed (below its `reserved_accelerators`), since only preemptible work yields
to a reservation (scheduler/preemption.py): once placed, it could never be taken back.

Checked on a submit (the whole ask: a batch of submits reads the figures once for all its
members, `usecases/submits.py`; only where another tenant reserves, and not for host-only
shards), an update that grows the ask (its growth: what waited before was asked before) and one
that makes a preemptible deployment non-preemptible (what it holds is asked afresh: owed tenants
could preempt it before, not after). Free capacity is what the ready nodes have free less what
the non-preemptible asks accepted before and not placed yet will take, within their tenants'
caps (each ask was judged as if nothing else waited: two asks of 4 took what one of 8 was
refused). Only free capacity can be taken: with none, the ask is taken and waits, as any
other. A tenant below its own reservation is owed too: up to what it is owed, it takes nothing
owed to others (reservations the cluster cannot hold all at once refused every owed tenant's
growth, each for the others').
A tenant token reads the total owed to "other tenants", never who is owed how much
(`redaction`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from controller.errors import FailedPrecondition, ReasonDetail
from controller.identity import Principal
from controller.store import repositories as repo
from controller.store.db import UnitOfWork
from controller.domain.values import DeploymentSpec
from controller.store.metering import shard_milli
from controller.usecases.redaction import redactor_of

_EPS = 1e-9


def demand(spec: DeploymentSpec) -> tuple[float, float]:
    """(accelerators, watts) all its replicas hold when placed (fractions as milli/1000)."""
    per_shard = shard_milli(spec.shard.accelerators, spec.shard.accelerator_milli) / 1000.0
    shards = spec.replicas * spec.shards_per_replica
    return shards * per_shard, shards * per_shard * spec.shard.power_w


@dataclass
class OwedCapacity:
    """What the check compares: per reserving tenant (accelerators reserved, held), the
    accelerators free on ready nodes, per tenant the non-preemptible asks accepted and not
    placed yet, which take free capacity once placed, and per capped tenant what its cap leaves
    it (the last three 0 and empty when no one is owed: not read). A batch that reads them once
    adds each ask it lets through (`took`)."""

    reservations: dict[str, tuple[float, float]]
    free: float
    waiting: dict[str, float] = field(default_factory=dict)
    room: dict[str, float] = field(default_factory=dict)  # capped tenants: what the cap leaves

    def waits(self, tenant: str) -> float:
        """What `tenant`'s waiting asks take once placed: no more than its cap leaves it (asks
        its own cap holds back wait for its own work to end, not for free capacity; counted
        whole, they refused others' asks that fitted while the capacity stayed free)."""
        return min(self.waiting.get(tenant, 0.0), self.room.get(tenant, math.inf))

    def owed(self, tenant: str) -> float:
        reserved, used = self.reservations.get(tenant, (0.0, 0.0))
        return max(0.0, reserved - used)

    def owed_to_others(self, tenant: str) -> dict[str, float]:
        return {t: reserved - used for t, (reserved, used) in self.reservations.items()
                if t != tenant and reserved > used}

    def taken_by_waiting(self) -> float:
        """The free capacity the waiting asks take once placed, beyond what their own tenants
        are owed (that part is counted as owed already)."""
        return sum(max(0.0, self.waits(t) - self.owed(t)) for t in self.waiting)

    def took(self, tenant: str, asked: float) -> None:
        self.waiting[tenant] = self.waiting.get(tenant, 0.0) + asked


async def owed_capacity(uow: UnitOfWork) -> OwedCapacity:
    """The reservations and, when any tenant is owed, the free accelerators and the waiting
    non-preemptible asks and what the caps leave: four aggregates of the placements and
    deployments (a batch of submits reads them once for all its members)."""
    reservations = await repo.reserved_usage(uow.session)
    if not any(reserved > used for reserved, used in reservations.values()):
        return OwedCapacity(reservations, 0.0)
    return OwedCapacity(reservations, await repo.free_on_ready_nodes(uow.session),
                        await repo.waiting_unpreemptible(uow.session), await repo.cap_room(uow.session))


async def check_owed_capacity(uow: UnitOfWork, who: Principal, tenant: str, *, asked: float,
                              returned: float = 0.0, own_waiting: float = 0.0, asks: str,
                              owed: OwedCapacity | None = None) -> None:
    """Refuse (FAILED_PRECONDITION, a RESERVATION reason) `tenant`'s non-preemptible ask of `asked`
    accelerators not placed yet, `returned` of them held now and `own_waiting` of them among the
    tenant's waiting asks (an update's), asked afresh, when it is more than the free capacity (and
    `returned`) less what the waiting asks take and other tenants are owed, and more than `tenant`
    is owed itself. `asks` says what is asked, for the message ("deployment x: ..."); `owed`: the
    figures as read already (else read now)."""
    if asked <= _EPS:
        return
    if owed is None:
        owed = await owed_capacity(uow)
    owed.took(tenant, -own_waiting)  # asked afresh: judged with `asked`, not among the waiting
    others = owed.owed_to_others(tenant)
    if not others:
        owed.took(tenant, asked)
        return
    # What is free once the asks accepted before this one are placed; of its own reservation, what
    # its waiting asks do not claim already. Its waiting asks within its own reservation take free
    # capacity too, and are not among what others are owed: taken from what it may take beyond
    # it (two asks of 4 of a tenant owed 4 took the 4 owed to another).
    mine, owed_here = owed.waits(tenant), owed.owed(tenant)
    taken = owed.taken_by_waiting() + min(mine, owed_here)
    own = max(0.0, owed_here - mine) + (returned if tenant in owed.reservations else 0.0)
    total = sum(others.values())
    if owed.free + returned <= _EPS or asked <= max(owed.free + returned - taken - total, own) + _EPS:
        owed.took(tenant, asked)
        return
    redactor = await redactor_of(uow, who)
    names = ", ".join(f"{t} {v:g}" for t, v in sorted(others.items()))
    owed_text, owed_to = (f"({names})", names) if who.is_admin else ("to them", "other tenants")
    waiting = f" ({taken:g} of it asked already by work accepted, not placed yet)" if taken > _EPS else ""
    raise FailedPrecondition(
        redactor.text(f"{asks}: {owed.free:g} free on ready nodes{waiting}, {total:g} still owed {owed_text}"),
        reasons=(ReasonDetail("RESERVATION", redactor.text(f"{total:g} accelerators owed to {owed_to}"), ""),))


def new_ask(spec: DeploymentSpec) -> tuple[float, str]:
    """What a new deployment asks of the check (its whole ask), and how its refusal says it."""
    accelerators, _ = demand(spec)
    return accelerators, (f"deployment {spec.name}: {accelerators:g} accelerators, not preemptible, would take "
                          f"capacity reserved for other tenants")
