"""A shard a node's agent never takes up: the stream remembers which shards a set named first and
the agent has said nothing of (`AgentSession.unacknowledged`), and hands them over as FAILED
reports once the ack timeout passed (`AgentSession.overdue`). Any report of a shard acknowledges
it, a heartbeat's unchanged repeats included (`ReportBuffer.accept`); a shard taken away before
its agent said anything is owed no more."""

from __future__ import annotations

from controller.agents.reports import ReportBuffer
from controller.agents.session import NOT_ACKNOWLEDGED, AgentSession
from controller.domain import values as d

SHARD = d.ShardSpec(accelerators=1, accelerator_milli=1000, hbm_gib=16.0, cpu_milli=1000, memory_mib=1024,
                    power_w=300.0)


def assignment(name: str, replica: int = 0, *, tenant: str = "lab", generation: int = 1) -> d.Assignment:
    return d.Assignment(deployment=name, tenant=tenant, replica=replica, shard=0, shards_per_replica=1,
                        accelerator_indices=(0,), accelerator_milli=0, spec=SHARD, generation=generation)


def given(*assignments: d.Assignment, generation: int = 1) -> d.AssignmentSet:
    return d.AssignmentSet(node_id="n1", generation=generation, assignments=assignments)


def report(name: str, phase: str, replica: int = 0, *, tenant: str = "lab", generation: int = 1) -> d.ShardReport:
    return d.ShardReport(deployment=name, replica=replica, shard=0, generation=generation, phase=phase, tenant=tenant)


def session() -> AgentSession:
    return AgentSession(node_id="n1", session_id="s1", interval_ms=1000, timeout_s=3.0)


def test_a_shard_nothing_was_said_of_is_overdue_after_the_timeout_as_a_failed_report_of_its_generation() -> None:
    s = session()
    s.sent(given(assignment("web", generation=4)), now=100.0)
    assert s.overdue(now=159.0, timeout_s=60.0) == []  # not yet
    late = s.overdue(now=160.5, timeout_s=60.0)
    assert late == [d.ShardReport("web", 0, 0, 4, "failed", NOT_ACKNOWLEDGED.format(timeout_s=60.0), tenant="lab")]
    assert "within 60s" in late[0].message
    assert s.overdue(now=500.0, timeout_s=60.0) == []  # handed over once


def test_any_report_of_a_shard_acknowledges_it_loading_included() -> None:
    s = session()
    s.sent(given(assignment("web"), assignment("api")), now=0.0)
    s.acknowledged("lab", report("web", "loading"))
    assert [r.deployment for r in s.overdue(now=61.0, timeout_s=60.0)] == ["api"]


def test_a_shard_taken_away_before_its_agent_said_anything_is_owed_no_more() -> None:
    s = session()
    s.sent(given(assignment("web"), assignment("api")), now=0.0)
    s.sent(given(assignment("api"), generation=2), now=1.0)  # web moved elsewhere
    assert [r.deployment for r in s.overdue(now=61.0, timeout_s=60.0)] == ["api"]


def test_only_a_set_that_names_a_shard_first_starts_its_clock() -> None:
    s = session()
    s.sent(given(assignment("web")), now=0.0)
    s.acknowledged("lab", report("web", "running"))
    s.sent(given(assignment("web"), assignment("api"), generation=2), now=50.0)  # web again, api new
    assert s.overdue(now=100.0, timeout_s=60.0) == []
    assert [r.deployment for r in s.overdue(now=111.0, timeout_s=60.0)] == ["api"]


def test_a_shard_owed_again_under_a_new_generation_is_timed_from_then_behind_the_older_ones() -> None:
    """The first shard owed is the oldest (`overdue` looks at it first): one owed again under a
    new generation goes behind those owed since before, and its clock starts again."""
    s = session()
    s.sent(given(assignment("web"), assignment("api")), now=0.0)
    s.sent(given(assignment("web", generation=2), assignment("api"), generation=2), now=30.0)  # web placed anew
    assert list(s.unacknowledged) == [("lab", "api", 0, 0), ("lab", "web", 0, 0)]
    assert [r.deployment for r in s.overdue(now=61.0, timeout_s=60.0)] == ["api"]
    assert s.overdue(now=90.0, timeout_s=60.0) == []
    assert [(r.deployment, r.generation) for r in s.overdue(now=91.0, timeout_s=60.0)] == [("web", 2)]


def test_the_tenant_counts_two_tenants_deployments_of_one_name_are_two_shards() -> None:
    s = session()
    s.sent(given(assignment("web", tenant="lab"), assignment("web", tenant="other")), now=0.0)
    s.acknowledged("lab", report("web", "running", tenant="lab"))
    assert [r.tenant for r in s.overdue(now=61.0, timeout_s=60.0)] == ["other"]


class _Quiet:
    def shard_start_stage(self, stage, seconds) -> None:
        pass

    def heartbeats_written(self, rows: int) -> None:
        pass


async def _nothing(views) -> None:
    pass


def test_a_heartbeat_that_repeats_a_shard_unchanged_acknowledges_it() -> None:
    """A heartbeat's shards already written as they are now are not written again; they are still
    the agent's word that it holds them."""
    s = session()
    buffer = ReportBuffer(None, {"n1": s}, observer=_Quiet(), on_deployments_changed=_nothing,  # type: ignore[arg-type]
                          heartbeat_timeout_s=10.0, longest_silence_timeout_s=lambda: 10.0, contact_write_every_s=None)
    s.sent(given(assignment("web")), now=0.0)
    running = report("web", "running")
    buffer.accept(s, running)
    s.sent(given(assignment("web"), assignment("api"), generation=2), now=1.0)
    s.unacknowledged[("lab", "web", 0, 0)] = (1.0, 1, 0)  # owed again (as after a reset of `given`)
    buffer.accept(s, d.HeartbeatReport(seq=1, power_draw_w=100.0, shards=(running,)))
    assert [r.deployment for r in s.overdue(now=100.0, timeout_s=60.0)] == ["api"]


def test_a_shard_named_again_under_a_new_generation_is_owed_a_word_under_it() -> None:
    """Placed again in the same slot after it failed there, a shard keeps its key: its clock did
    not start again, and a heartbeat still repeating the old generation's FAILED would have
    counted for the new one; an agent that never took the new one up left it ASSIGNED for ever."""
    s = session()
    s.sent(given(assignment("web", generation=3)), now=0.0)
    s.acknowledged("lab", report("web", "failed", generation=3))
    s.sent(given(assignment("web", generation=4), generation=2), now=100.0)
    s.acknowledged("lab", report("web", "failed", generation=3))  # the last placement's word
    late = s.overdue(now=161.0, timeout_s=60.0)
    assert [(r.deployment, r.generation) for r in late] == [("web", 4)]

    s.sent(given(assignment("web", generation=5), generation=3), now=200.0)
    s.acknowledged("lab", report("web", "loading", generation=5))
    s.sent(given(assignment("web", generation=5), generation=4), now=210.0)  # a repeat owes nothing
    assert s.overdue(now=400.0, timeout_s=60.0) == []
