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
refused). Within a power cap, that is at most the accelerators the watts it leaves hold, the
asks drawing the fewest watts an accelerator counted first (an upper bound: never fewer than
can be placed). Only free capacity can be taken: with none, the ask is taken and waits, as any
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
    placed yet, which take free capacity once placed, and per capped tenant what its caps leave
    it (the rest 0 and empty when no one is owed: not read). A batch that reads them once adds
    each ask it lets through (`took`)."""

    reservations: dict[str, tuple[float, float]]
    free: float
    waiting: dict[str, float] = field(default_factory=dict)
    room: dict[str, float] = field(default_factory=dict)  # max_accelerators: the accelerators it leaves
    power_room: dict[str, float] = field(default_factory=dict)  # max_power_w: the watts it leaves
    # The power-capped tenants' waiting asks, accelerators by the watts an accelerator of theirs draws.
    waiting_by_power_w: dict[str, dict[float, float]] = field(default_factory=dict)

    def waits(self, tenant: str) -> float:
        """What `tenant`'s waiting asks take once placed: no more than its caps leave it (asks
        its own caps hold back wait for its own work to end, not for free capacity; counted
        whole, they refused others' asks that fitted while the capacity stayed free)."""
        return min(self.waiting.get(tenant, 0.0), self.room.get(tenant, math.inf), self._within_power(tenant))

    def _within_power(self, tenant: str) -> float:
        """The most accelerators `tenant`'s waiting asks can take within the watts its power cap
        leaves (unbounded without one): those drawing the fewest watts an accelerator first, the
        last in part (a fractional knapsack: never fewer than its shards that fit, the side that
        refuses more, not fewer); those drawing none are not bounded by it."""
        left = self.power_room.get(tenant)
        if left is None:
            return math.inf
        fits = 0.0
        for power_w, asked in sorted(self.waiting_by_power_w.get(tenant, {}).items()):
            share = max(0.0, asked) if power_w <= 0 else min(max(0.0, asked), left / power_w)
            fits += share
            left -= share * power_w
        return fits

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

    def took(self, tenant: str, asked: float, power_w: float) -> None:
        """`tenant`'s ask of `asked` accelerators (less, when negative), each drawing `power_w`
        watts (its shard's), is among the waiting asks: by its watts within a power cap, where an
        ask drawing fewer than those before may hold more in the same watts."""
        self.waiting[tenant] = self.waiting.get(tenant, 0.0) + asked
        if tenant in self.power_room:
            by_power = self.waiting_by_power_w.setdefault(tenant, {})
            by_power[power_w] = by_power.get(power_w, 0.0) + asked


async def owed_capacity(uow: UnitOfWork) -> OwedCapacity:
    """The reservations and, when any tenant is owed, the free accelerators and the waiting
    non-preemptible asks and what the caps leave (with the power-capped tenants' waiting asks by
    their watts): four aggregates of the placements and deployments (a batch of submits reads
    them once for all its members)."""
    reservations = await repo.reserved_usage(uow.session)
    if not any(reserved > used for reserved, used in reservations.values()):
        return OwedCapacity(reservations, 0.0)
    free = await repo.free_on_ready_nodes(uow.session)
    waiting = await repo.waiting_unpreemptible(uow.session)
    rooms = await repo.cap_room(uow.session)
    power_room = {t: room.power_w for t, room in rooms.items() if room.power_w is not None}
    return OwedCapacity(reservations, free, waiting,
                        {t: room.accelerators for t, room in rooms.items() if room.accelerators is not None},
                        power_room, {t: rooms[t].waiting_by_power_w for t in power_room})


async def check_owed_capacity(uow: UnitOfWork, who: Principal, tenant: str, *, asked: float, power_w: float,
                              returned: float = 0.0, own_waiting: float = 0.0, own_power_w: float = 0.0,
                              asks: str, owed: OwedCapacity | None = None) -> None:
    """Refuse (FAILED_PRECONDITION, a RESERVATION reason) `tenant`'s non-preemptible ask of `asked`
    accelerators not placed yet, `returned` of them held now and `own_waiting` of them among the
    tenant's waiting asks (an update's), asked afresh, when it is more than the free capacity (and
    `returned`) less what the waiting asks take and other tenants are owed, and more than `tenant`
    is owed itself. `power_w`, `own_power_w`: the watts an accelerator of the ask, of what waited
    of it, draws (its shard's, now and before). `asks` says what is asked, for the message
    ("deployment x: ..."); `owed`: the figures as read already (else read now)."""
    if asked <= _EPS:
        return
    if owed is None:
        owed = await owed_capacity(uow)
    owed.took(tenant, -own_waiting, own_power_w)  # asked afresh: judged with `asked`, not among the waiting
    others = owed.owed_to_others(tenant)
    if not others:
        owed.took(tenant, asked, power_w)
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
        owed.took(tenant, asked, power_w)
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
