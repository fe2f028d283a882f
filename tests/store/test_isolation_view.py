"""The watchdog's view: rows folded in as read, and only what they change judged again."""

from __future__ import annotations

from controller.store.isolation import Contracts
from controller.store.isolation_view import Dirty, IsolationView

NODES = [(f"n{i}", "rack1" if i <= 2 else "rack2", 4, None, None, None) for i in range(1, 5)]
DEPLOYMENTS = [(1, "web", "lab", 1, 1000, 0.0, 0, 0, 1, {}), (2, "api", "rival", 1, 1000, 0.0, 0, 0, 1, {})]
PLACEMENTS = [(10 + i, 1 if i % 2 else 2, i, 0, f"n{i}", "[0]", None, 1) for i in range(1, 5)]


def _view(*, lab_excludes: list[str]) -> IsolationView:
    view = IsolationView()
    view.set_contracts(Contracts(rows=[("row1", "z1")], racks=[("rack1", "row1"), ("rack2", "row1")],
                                 tenants=[("lab", "shared", lab_excludes, []), ("rival", "shared", [], [])]))
    view.put_nodes(NODES)
    view.put_deployments(DEPLOYMENTS)
    view.put_placements(PLACEMENTS)
    view.check(view.take_dirty())
    return view


def test_rows_read_again_unchanged_mark_nothing_to_judge() -> None:
    view = _view(lab_excludes=[])
    view.put_nodes(NODES)
    view.put_deployments(DEPLOYMENTS)
    view.put_placements(PLACEMENTS)
    view.retain(nodes={n[0] for n in NODES}, deployments={1, 2}, placements={p[0] for p in PLACEMENTS})
    assert view.take_dirty() == Dirty(frozenset(), frozenset())


def test_without_rules_of_a_rack_scope_a_change_judges_its_node_alone() -> None:
    view = _view(lab_excludes=[])
    view.put_placements([(20, 2, 9, 0, "n1", "[0]", None, 1)])  # rival beside lab on n1[0]
    assert view.check(view.take_dirty()) == 2
    assert [v.key for v in view.violations] == [("ACCELERATOR", "node n1[0]", ("lab", "rival"))]


def test_with_a_tenant_excluding_another_a_change_judges_its_rack_whole() -> None:
    view = _view(lab_excludes=["rival"])
    assert [v.key for v in view.violations] == [("EXCLUSION", "rack rack1", ("lab", "rival")),
                                                ("EXCLUSION", "rack rack2", ("lab", "rival"))]
    view.drop_placement(12)  # rival leaves rack1 (n2): the rack's two nodes judged again
    assert view.check(view.take_dirty()) == 1
    assert [v.key for v in view.violations] == [("EXCLUSION", "rack rack2", ("lab", "rival"))]


def test_a_node_gone_leaves_its_placements_as_references_to_nothing() -> None:
    view = _view(lab_excludes=[])
    view.drop_node("n3")
    view.check(view.take_dirty())
    assert [v.key for v in view.violations] == [("REFERENCE", "node n3", ("lab",))]
    view.put_nodes([NODES[2]])
    view.check(view.take_dirty())
    assert view.violations == []


def test_a_rack_no_tenant_of_a_rack_rule_is_on_is_judged_by_node() -> None:
    view = _view(lab_excludes=["rival"])
    view.drop_placement(13)  # lab leaves rack2 (n3): its EXCLUSION judged whole, and cleared
    assert view.check(view.take_dirty()) == 1
    assert [v.key for v in view.violations] == [("EXCLUSION", "rack rack1", ("lab", "rival"))]
    view.put_placements([(30, 2, 9, 0, "n3", "[1]", None, 1)])  # rival on n3: rack2 holds rival alone
    assert view.check(view.take_dirty()) == 1  # n3 alone, not n3 and n4
    view.put_placements([(31, 1, 9, 0, "n3", "[2]", None, 1)])  # lab back on n3: rack2 whole again
    assert view.check(view.take_dirty()) == 3
    assert [v.key for v in view.violations] == [("EXCLUSION", "rack rack1", ("lab", "rival")),
                                                ("EXCLUSION", "rack rack2", ("lab", "rival"))]
