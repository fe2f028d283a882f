"""The head-of-line nomination policy (controller/scheduling/nominations.py) on a stand-in for
the warm cluster: what counts as waiting, who is nominated first, one a zone, when a nomination
ends, and what the full solve's problem carries."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from controller.reconcile import pass_state
from controller.reconcile.pass_state import PassState
from controller.scheduling.nominations import Nominated, Nominations, shape_of
from controller.store.nominations import StoredNomination
from scheduler import Plan
from scheduler.model import Nomination, Placement, Reason, Unplaced


WALL = datetime(2026, 12, 6, 21, 0, tzinfo=timezone.utc)
GANG = {"id": "t/gang", "shards_per_replica": 8, "shard": {"accelerators": 1}}  # `cache`'s defaults


class Session:
    def __init__(self, nodes: dict[str, tuple[str, ...] | list[tuple[str, ...]]],
                 zones: dict[str, str] | None = None) -> None:
        # Deployment -> the nodes nominees answers, or a list of choices in the order the session
        # prefers them (the first in zones no other holds, with `zones_apart`); absent: unknown.
        self.nodes = nodes
        self.zones = zones or {}  # node -> its zone (absent: "z1")
        self.handed: list[tuple[Nomination, ...]] = []
        self.calls: list[str] = []

    def nominees(self, name: str, zones_apart: bool = False) -> tuple[str, ...]:
        holding = self.handed[-1] if self.handed else ()
        self.calls.append(f"nominees {name}{' apart' * zones_apart} holding {[n.deployment for n in holding]}")
        choices = self.nodes.get(name, ())  # unknown to the session: none, as `Session.nominees`
        taken = {self.zones.get(n, "z1") for nom in holding if nom.deployment != name for n in nom.nodes}
        for nodes in [choices] if isinstance(choices, tuple) else choices:
            if not (zones_apart and any(self.zones.get(n, "z1") in taken for n in nodes)):
                return nodes
        return ()

    def nominate(self, nominations) -> None:
        self.handed.append(tuple(nominations))


def cache(docs: list[dict], session: Session):
    docs = [{"shards_per_replica": 8, "shard": {"accelerators": 1}, **d} for d in docs]  # gangs, unless said
    problem = {"deployments": docs}
    index = SimpleNamespace(deployments_of=lambda problem, keys: [d for d in problem["deployments"]
                                                                 if d["id"] in keys])
    snapshot = SimpleNamespace(problem=problem, index=index, deployment_ids={d["id"]: i for i, d in enumerate(docs)})
    return SimpleNamespace(snapshot=snapshot, session=session, nominations=())


def unplaced(name: str, *codes: str) -> Unplaced:
    return Unplaced(name, 1, tuple(Reason(code, f"{code} words") for code in codes))


def plan(*unplaced_: Unplaced, placed: tuple[str, ...] = ()) -> Plan:
    return Plan(status="feasible", placements=tuple(Placement(n, 0, 0, "n1", (0,)) for n in placed),
                unplaced=unplaced_)


async def test_only_work_waiting_for_room_waits_and_the_highest_priority_then_the_longest_wait_goes_first():
    noms = Nominations(after_s=30, max_s=600)
    noms.saw(plan(unplaced("t/old", "CAPACITY"), unplaced("t/capped", "CAPACITY", "QUOTA_ACCELERATORS"),
                  unplaced("t/cordoned", "NODE_STATE")), 0.0, whole=False)
    assert noms.waiting_since("t/old") == 0.0
    assert noms.waiting_since("t/capped") is None and noms.waiting_since("t/cordoned") is None
    noms.saw(plan(unplaced("t/urgent", "POWER_RACK")), 10.0, whole=False)
    session = Session({"t/old": ("n1",), "t/urgent": ("n2", "n3")})
    c = cache([{"id": "t/old", "priority": 0}, {"id": "t/urgent", "priority": 5}], session)
    assert not await noms.bring(c, 29.0) and not noms.held and session.handed == []
    await noms.bring(c, 39.0)  # old waited 39 s, urgent 29 s: only old is due
    assert noms.nominations == (Nomination("t/old", 0, ("n1",)),)
    assert session.handed == [noms.nominations] and c.nominations == noms.nominations
    # Both due at once (one zone): the higher priority first.
    both = Nominations(after_s=30, max_s=600)
    both.saw(plan(unplaced("t/old", "CAPACITY"), unplaced("t/urgent", "POWER_RACK")), 0.0, whole=False)
    await both.bring(cache([{"id": "t/old", "priority": 0}, {"id": "t/urgent", "priority": 5}], Session(session.nodes)),
                     30.0)
    assert both.nominations == (Nomination("t/urgent", 5, ("n2", "n3")),)


async def test_one_nomination_a_zone_and_one_whose_zone_is_held_keeps_its_place_until_it_ends():
    noms = Nominations(after_s=30, max_s=600)
    noms.saw(plan(unplaced("t/a", "CAPACITY"), unplaced("t/b", "CAPACITY"), unplaced("t/c", "CAPACITY")),
             0.0, whole=False)
    session = Session({"t/a": ("a1", "a2"), "t/b": ("a3",), "t/c": ("c1",)}, zones={"c1": "z2"})
    c = cache([{"id": "t/a"}, {"id": "t/b"}, {"id": "t/c"}], session)
    await noms.bring(c, 30.0)
    # t/a first (its name, at an equal wait), then t/b's zone is held, and t/c's is not.
    assert noms.nominations == (Nomination("t/a", 0, ("a1", "a2")), Nomination("t/c", 0, ("c1",)))
    assert noms.nominated_nodes == 3 and c.nominations == noms.nominations
    assert noms.waiting_since("t/b") == 0.0  # waits its turn, not sent to the back of the line
    assert noms.into({"nodes": [{"id": n} for n in ("a1", "a2", "c1")]})["nominations"] == [
        {"deployment": "t/a", "priority": 0, "nodes": ["a1", "a2"]},
        {"deployment": "t/c", "priority": 0, "nodes": ["c1"]}]
    calls = len(session.calls)
    await noms.bring(c, 31.0)
    assert len(session.calls) == calls  # nothing ended: t/b is not tried again
    noms.saw(plan(unplaced("t/b", "CAPACITY"), unplaced("t/c", "CAPACITY"), placed=("t/a",)), 32.0, whole=False)
    assert await noms.bring(c, 33.0)  # t/a placed: its zone is free, and t/b has it
    assert noms.nominations == (Nomination("t/c", 0, ("c1",)), Nomination("t/b", 0, ("a3",)))
    assert [e.kind for e in noms.take_events()] == ["deployment.nominated"] * 2 + [
        "deployment.nomination_ended", "deployment.nominated"]


async def test_one_nothing_would_help_goes_to_the_back_while_another_zone_is_held():
    noms = Nominations(after_s=30, max_s=600)
    noms.saw(plan(unplaced("t/a", "CAPACITY"), unplaced("t/huge", "CAPACITY")), 0.0, whole=False)
    session = Session({"t/a": ("a1",), "t/huge": ()})
    await noms.bring(cache([{"id": "t/a"}, {"id": "t/huge"}], session), 30.0)
    assert noms.nominations == (Nomination("t/a", 0, ("a1",)),)
    assert noms.waiting_since("t/huge") == 30.0  # to the back of the line, not kept waiting for a zone


async def test_a_blocked_higher_priority_is_asked_again_before_a_lower_one_behind_it_is_nominated():
    noms = Nominations(after_s=30, max_s=600)
    noms.saw(plan(unplaced("t/x", "CAPACITY"), unplaced("t/high", "CAPACITY")), 0.0, whole=False)
    session = Session({"t/x": ("a1",), "t/high": ("a2",), "t/low": ("c2",)}, zones={"c1": "z3", "c2": "z3"})
    c = cache([{"id": "t/x", "priority": 9}, {"id": "t/high", "priority": 5}, {"id": "t/low", "priority": 0}], session)
    await noms.bring(c, 30.0)
    assert noms.nominations == (Nomination("t/x", 9, ("a1",)),)  # t/high: only z1 would do, and t/x holds it
    calls = len(session.calls)
    await noms.bring(c, 35.0)
    assert len(session.calls) == calls  # nothing new due: nothing asked
    session.nodes["t/high"] = [("a2",), ("c1",)]  # a node of z3 repaired: it would do for t/high now
    noms.saw(plan(unplaced("t/low", "CAPACITY")), 10.0, whole=False)
    await noms.bring(c, 40.0)  # t/low due: t/high, ahead of it in the line, is asked first and has z3
    assert noms.nominations == (Nomination("t/x", 9, ("a1",)), Nomination("t/high", 5, ("c1",)))
    assert noms.waiting_since("t/low") == 10.0  # z3 held now: it keeps its place


async def test_a_nomination_ends_when_its_deployment_is_placed_and_lets_the_nodes_go():
    noms = Nominations(after_s=30, max_s=600)
    noms.saw(plan(unplaced("t/gang", "CAPACITY", "NODE_STATE")), 0.0, whole=True)
    session = Session({"t/gang": ("n1", "n2")})
    c = cache([{"id": "t/gang"}], session)
    assert not await noms.bring(c, 30.0)
    assert noms.nominated_nodes == 2
    noms.saw(plan(placed=("t/gang",)), 31.0, whole=False)
    assert not noms.held and noms.waiting_since("t/gang") is None
    assert await noms.bring(c, 32.0)  # nodes let go: what waits elsewhere is decided again
    assert session.handed[-1] == () and c.nominations == ()


async def test_a_full_plan_that_no_longer_lists_a_deployment_ends_its_wait_and_a_deleted_one_its_nomination():
    noms = Nominations(after_s=30, max_s=600)
    noms.saw(plan(unplaced("t/a", "CAPACITY"), unplaced("t/b", "LOCALITY")), 0.0, whole=False)
    noms.saw(plan(unplaced("t/b", "LOCALITY")), 5.0, whole=False)  # a fast plan says nothing of t/a
    assert noms.waiting_since("t/a") == 0.0
    noms.saw(plan(unplaced("t/b", "LOCALITY")), 6.0, whole=True)  # a full one lists every unplaced
    assert noms.waiting_since("t/a") is None and noms.waiting_since("t/b") == 0.0
    session = Session({"t/b": ("n1",)})
    c = cache([{"id": "t/b"}], session)
    await noms.bring(c, 30.0)
    assert "t/b" in noms.held
    c.snapshot.deployment_ids = {}  # t/b deleted: gone from the cache
    assert await noms.bring(c, 31.0)
    assert not noms.held and noms.waiting_since("t/b") is None


async def test_a_nomination_that_does_not_fit_in_max_s_goes_to_the_back_of_the_line():
    noms = Nominations(after_s=30, max_s=600)
    noms.saw(plan(unplaced("t/first", "CAPACITY")), 0.0, whole=False)
    noms.saw(plan(unplaced("t/second", "CAPACITY")), 1.0, whole=False)
    session = Session({"t/first": ("n1",), "t/second": ("n2",)})
    c = cache([{"id": "t/first"}, {"id": "t/second"}], session)
    await noms.bring(c, 40.0)
    assert noms.nominations[0].deployment == "t/first"
    await noms.bring(c, 639.0)
    assert noms.nominations[0].deployment == "t/first"  # 599 s
    await noms.bring(c, 640.0)  # 600 s: ended, and the next in line is nominated in the same pass
    assert noms.nominations[0].deployment == "t/second"
    assert noms.waiting_since("t/first") == 640.0
    # The session let the ended one's nodes go before it chose the next one's (they may be those).
    assert session.calls == ["nominees t/first apart holding []", "nominees t/second apart holding ['t/first']",
                             "nominees t/second holding ['t/first']", "nominees t/second apart holding []"]


async def test_a_deployment_nodes_would_not_help_goes_to_the_back_and_none_is_nominated_when_off():
    noms = Nominations(after_s=30, max_s=600)
    noms.saw(plan(unplaced("t/huge", "CAPACITY"), unplaced("t/unknown", "CAPACITY")), 0.0, whole=False)
    session = Session({"t/huge": ()})  # no domain could ever hold it; t/unknown not in the session
    await noms.bring(cache([{"id": "t/huge"}, {"id": "t/unknown"}], session), 30.0)
    assert not noms.held
    assert noms.waiting_since("t/huge") == 30.0 and noms.waiting_since("t/unknown") == 30.0
    off = Nominations(after_s=0, max_s=600)
    off.saw(plan(unplaced("t/x", "CAPACITY")), 0.0, whole=False)
    await off.bring(cache([{"id": "t/x"}], Session({"t/x": ("n1",)})), 1e6)
    assert not off.held


def test_the_full_solve_carries_the_nominations_in_force_on_the_nodes_it_has_in_place_of_those_stored():
    noms = Nominations()
    problem: dict = {"nodes": [{"id": "n1"}, {"id": "n2"}], "deployments": []}
    assert noms.into(problem) is problem
    noms.held = {"t/gang": Nominated(Nomination("t/gang", 3, ("n1", "gone")), 0.0, 1, 7)}
    assert noms.into(problem)["nominations"] == [{"deployment": "t/gang", "priority": 3, "nodes": ["n1"]}]
    noms.held = {"t/gang": Nominated(Nomination("t/gang", 3, ("gone",)), 0.0, 1, 7)}
    assert "nominations" not in noms.into(problem)
    # The problem as read carries the stored set, which may be older than what is in force.
    read = dict(problem, nominations=[{"deployment": "t/old", "priority": 1, "nodes": ["n2"]}])
    assert "nominations" not in noms.into(read)
    noms.held = {"t/gang": Nominated(Nomination("t/gang", 3, ("n1",)), 0.0, 1, 7)}
    assert noms.into(read)["nominations"] == [{"deployment": "t/gang", "priority": 3, "nodes": ["n1"]}]


async def test_progress_ends_a_nomination_and_the_rest_is_nominated_again_at_once():
    noms = Nominations(after_s=30, max_s=600)
    noms.saw(plan(Unplaced("t/gangs", 2, (Reason("CAPACITY", "full"),))), 0.0, whole=False)
    c = cache([{"id": "t/gangs"}], Session({"t/gangs": ("n1",)}))
    await noms.bring(c, 30.0)
    assert noms.held["t/gangs"].missing == 2
    noms.saw(plan(Unplaced("t/gangs", 1, (Reason("CAPACITY", "full"),)), placed=("t/gangs",)), 31.0, whole=False)
    assert not noms.held and noms.waiting_since("t/gangs") == 0.0  # still first in line
    assert await noms.bring(c, 32.0)  # let go (decide again), and nominated again for the replica left
    assert noms.held["t/gangs"].missing == 1


async def test_a_placement_the_commit_turned_away_is_not_progress():
    noms = Nominations(after_s=30, max_s=600)
    noms.saw(plan(unplaced("t/gang", "CAPACITY")), 0.0, whole=False)
    await noms.bring(cache([{"id": "t/gang"}], Session({"t/gang": ("n1",)})), 30.0)
    noms.saw(plan(placed=("t/gang",)), 31.0, whole=False, requeued={"t/gang"})
    assert "t/gang" in noms.held and noms.waiting_since("t/gang") == 0.0


async def test_a_new_leadership_forgets_what_it_held_and_the_events_a_refused_commit_took_without_an_event():
    """What it held is stored (`take_stored`): the new leadership's first full pass takes it up
    (`adopt`), so nothing ended and no event says so. The events a commit refused under the
    lost lead put back are not the new term's to record: what they tell was never stored."""
    noms = Nominations(after_s=30, max_s=600)
    assert noms.adopting  # a controller's first leadership takes up what is stored too
    noms.adopt([], 0.0, WALL)
    noms.saw(plan(unplaced("t/gang", "CAPACITY")), 0.0, whole=False)
    await noms.bring(cache([{"id": "t/gang"}], Session({"t/gang": ("n1",)})), 30.0)
    events = noms.take_events()
    assert [(e.kind, e.object_id) for e in events] == [("deployment.nominated", "t/gang")]
    noms.put_back(events)
    noms.reset()
    assert not noms.held and noms.waiting_since("t/gang") is None and noms.adopting
    assert noms.take_stored(31.0, WALL) is None  # nothing to store: the set stored stays for the next leader
    assert noms.take_events() == []


async def test_the_set_in_force_is_stored_when_it_changes_with_its_times_on_the_wall_clock():
    noms = Nominations(after_s=30, max_s=600)
    noms.adopt([], 0.0, WALL)
    assert noms.take_stored(0.0, WALL) == []  # a new leadership stores its set once (none: stale rows go)
    assert noms.take_stored(0.0, WALL) is None
    noms.saw(plan(unplaced("t/gang", "CAPACITY")), 100.0, whole=False)
    await noms.bring(cache([{"id": "t/gang"}], Session({"t/gang": ("n1", "n2")})), 140.0)
    [stored] = noms.take_stored(150.0, WALL)
    assert stored == StoredNomination("t/gang", 0, 0, ("n1", "n2"), WALL - timedelta(seconds=10),
                                      WALL - timedelta(seconds=50), 1, shape_of(GANG))
    assert noms.take_stored(151.0, WALL) is None  # unchanged since
    noms.store_again()  # the commit that stored it failed
    assert noms.take_stored(152.0, WALL) is not None
    noms.saw(plan(placed=("t/gang",)), 160.0, whole=False)  # placed: the nomination ends
    assert noms.take_stored(160.0, WALL) == []


async def test_an_update_of_the_deployment_ends_its_nomination_and_it_keeps_its_place_but_a_scale_does_not():
    noms = Nominations(after_s=30, max_s=600)
    noms.saw(plan(unplaced("t/gang", "CAPACITY"), unplaced("t/next", "CAPACITY")), 0.0, whole=False)
    session = Session({"t/gang": [("n1",), ("n2",)], "t/next": ("n3",)})
    await noms.bring(cache([{"id": "t/gang"}, {"id": "t/next"}], session), 30.0)
    assert [n.deployment for n in noms.nominations] == ["t/gang"]  # one zone: t/next waits its turn
    noms.take_events()
    await noms.bring(cache([{"id": "t/gang", "replicas": 3}, {"id": "t/next"}], session), 31.0)
    assert [n.deployment for n in noms.nominations] == ["t/gang"]  # scaled: what a replica needs is the same
    await noms.bring(cache([{"id": "t/gang", "priority": 7}, {"id": "t/next"}], session), 32.0)
    [ended, made] = noms.take_events()
    assert ended.kind == "deployment.nomination_ended" and "was updated" in ended.message
    assert made.object_id == "t/gang" and noms.nominations == (Nomination("t/gang", 7, ("n1",)),)  # still first
    await noms.bring(cache([{"id": "t/gang", "priority": 7, "shard": {"accelerators": 2}}, {"id": "t/next"}],
                           session), 33.0)
    assert [e.kind for e in noms.take_events()] == ["deployment.nomination_ended", "deployment.nominated"]


async def test_a_stored_nomination_for_what_its_deployment_no_longer_asks_ends_when_taken_up():
    noms = Nominations(after_s=30, max_s=600)
    noms.adopt([StoredNomination("t/gang", 0, 0, ("n1",), WALL, WALL, 1, shape_of(dict(GANG, priority=3)))],
               1000.0, WALL)
    noms.expire(1000.0, cache([GANG], Session({})).snapshot)
    assert not noms.held and "was updated" in noms.take_events()[0].message


async def test_with_nominations_off_a_new_leadership_takes_up_none_and_clears_the_stored_set():
    noms = Nominations(after_s=0, max_s=600)
    noms.adopt([StoredNomination("t/gang", 4, 2, ("n1",), WALL, WALL, 1)], 1000.0, WALL)
    assert not noms.held and noms.take_stored(1000.0, WALL) == []


async def test_a_new_leadership_takes_up_the_stored_nominations_at_their_times():
    noms = Nominations(after_s=30, max_s=600)
    stored = StoredNomination("t/gang", 0, 2, ("n1", "n2"), WALL - timedelta(seconds=500),
                              WALL - timedelta(seconds=560), 1)
    noms.adopt([stored], 1000.0, WALL)
    assert not noms.adopting
    assert noms.nominations == (Nomination("t/gang", 2, ("n1", "n2")),)
    assert noms.held["t/gang"].since == 500.0 and noms.waiting_since("t/gang") == 440.0
    assert noms.take_stored(1000.0, WALL) == [stored]  # stored again by the first commit
    c = cache([{"id": "t/gang"}, {"id": "t/other"}], Session({"t/gang": ("n3",), "t/other": ("n1",)}))
    await noms.bring(c, 1000.0)
    assert c.session.handed == [noms.nominations]  # the session is handed it
    assert not noms.due(1099.0) and noms.due(1100.0)  # max_s runs on from when it was made
    noms.saw(plan(unplaced("t/gang", "CAPACITY")), 1100.0, whole=True)
    noms.expire(1100.0, cache([{"id": "t/gang"}], Session({})).snapshot)
    assert not noms.held and [e.kind for e in noms.take_events()] == ["deployment.nomination_ended"]


async def test_a_nomination_of_a_deployment_deleted_and_made_anew_under_its_name_ends():
    noms = Nominations(after_s=30, max_s=600)
    noms.adopt([StoredNomination("t/gang", 0, 0, ("n1",), WALL, WALL, 1)], 1000.0, WALL)
    noms.expire(1000.0, cache([{"id": "t/other"}, {"id": "t/gang"}], Session({})).snapshot)  # t/gang's key is 1 now
    assert not noms.held and "deployment gone" in noms.take_events()[0].message


async def test_work_of_one_accelerator_a_replica_is_never_nominated():
    # What waits is decided again first on every departure: it takes the first accelerator freed.
    noms = Nominations(after_s=30, max_s=600)
    noms.saw(plan(unplaced("t/one", "CAPACITY"), unplaced("t/half", "CAPACITY"), unplaced("t/two", "CAPACITY")),
             0.0, whole=False)
    session = Session({"t/one": ("n1",), "t/half": ("n2",), "t/two": ("n3",)})
    c = cache([{"id": "t/one", "shards_per_replica": 1}, {"id": "t/half", "shards_per_replica": 1,
               "shard": {"accelerators": 1, "accelerator_milli": 500}},
               {"id": "t/two", "shards_per_replica": 1, "shard": {"accelerators": 2}}], session)
    await noms.bring(c, 30.0)
    assert noms.nominations == (Nomination("t/two", 0, ("n3",)),)
    assert noms.waiting_since("t/one") is None and noms.waiting_since("t/half") is None


async def test_a_pass_is_due_in_a_quiet_cluster_to_end_a_nomination_and_to_decide_on_the_nodes_let_go():
    noms = Nominations(after_s=30, max_s=600)
    noms.saw(plan(unplaced("t/gang", "CAPACITY")), 0.0, whole=False)
    assert not noms.due(1000.0)  # one to make: the pass a change brings makes it
    c = cache([{"id": "t/gang"}], Session({"t/gang": ("n1",)}))
    await noms.bring(c, 30.0)
    assert not noms.due(629.0) and noms.due(630.0)  # held max_s
    noms.saw(plan(placed=("t/gang",)), 40.0, whole=False)
    assert noms.due(41.0)  # let go: what waits is decided again
    assert await noms.bring(c, 41.0) and not noms.due(42.0)


async def test_a_commit_that_fails_leaves_the_set_and_its_events_for_the_next():
    noms = Nominations(after_s=30, max_s=600)
    noms.adopt([], 0.0, WALL)
    noms.saw(plan(unplaced("t/gang", "CAPACITY")), 0.0, whole=False)
    await noms.bring(cache([{"id": "t/gang"}], Session({"t/gang": ("n1",)})), 30.0)
    written: list[object] = []

    class Uow:
        session = SimpleNamespace()

        async def commit(self) -> None:
            raise RuntimeError("the database went away")

    state = SimpleNamespace(nominations=noms, clock=lambda: 31.0, wall_clock=lambda: WALL)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pass_state, "write_nominations", lambda session, stored: _written(written, stored))
        patch.setattr(pass_state.repo, "record_events", lambda session, events: _written(written, events))
        with pytest.raises(RuntimeError):
            await PassState.commit(state, Uow(), ())  # type: ignore[arg-type]
    assert len(written) == 2  # both went into the transaction that failed
    assert noms.unstored and [e.kind for e in noms.take_events()] == ["deployment.nominated"]
    assert [s.solver_id for s in noms.take_stored(32.0, WALL)] == ["t/gang"]


async def _written(into: list[object], what: object) -> None:
    into.append(what)


def test_work_held_back_only_by_its_nodes_shard_caps_waits_for_room() -> None:
    # A shard leaving frees a place under a node's max_shards: a departure can end NODE_SHARDS.
    noms = Nominations(after_s=30, max_s=600)
    noms.saw(plan(unplaced("t/fractions", "NODE_SHARDS")), 0.0, whole=False)
    assert noms.waiting_since("t/fractions") == 0.0
