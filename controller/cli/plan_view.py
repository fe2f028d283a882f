"""Readable rendering of a placement plan in the interchange format (README "What a plan must say").

It works on the plan *document* (plan_to_dict output), not the solver's dataclasses, so it
depends only on the published contract.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from controller.cli.tables import fmt_indices, fmt_number, render_kv, render_table


def status_text(plan: Mapping[str, Any]) -> str:
    """The plan's status as a person should read it.

    The interchange status stays as the scheduler says in `-o json`; here it is never
    `optimal` while replicas are left unplaced (that is `partial`), and never a bare `feasible`
    when the objective reached the solver's proved bound.
    """
    status = str(plan.get("status", "?"))
    stats = plan.get("stats") or {}
    unplaced = plan.get("unplaced") or []
    left = sum(int(u.get("replicas", 0)) for u in unplaced)
    bound_met = ("best_bound" in stats and "objective" in stats
                 and float(stats["best_bound"]) <= float(stats["objective"]))
    if status == "infeasible":
        return f"infeasible: nothing new could be placed ({left} replica(s) left unplaced)"
    if status == "optimal":
        quality = "optimal (proved)"
    elif status == "feasible" and bound_met:
        quality = ("optimal for the placement model (objective = best bound; "
                   "preemption and moves are outside the proof)")
    elif status == "feasible":
        quality = "feasible (not proved optimal)"
    else:
        quality = status
    if left:
        return (f"partial: {left} replica(s) of {len(unplaced)} deployment(s) left unplaced; "
                f"what is placed is {quality}")
    return quality


KEPT = ("kept_violations", "kept_violations_total")  # stats the solve's check of kept placements writes


def kept_violations_text(stats: Mapping[str, Any]) -> list[str]:
    """The warning line for the existing placements the plan keeps that break a hard rule
    (`stats.kept_violations`), then a section listing them; nothing when it lists none."""
    listed = stats.get("kept_violations")
    if not isinstance(listed, list) or not listed:
        return []
    total = stats.get("kept_violations_total")
    total = total if isinstance(total, int) and total >= len(listed) else len(listed)
    rules = sorted({str(v.get("rule", "?")) for v in listed if isinstance(v, Mapping)})
    lines = [f"the plan keeps {total} breach(es) of hard rules by existing placements "
             f"({', '.join(rules)}{', ...' if total > len(listed) else ''}): the solver leaves them "
             "as given and its status does not count them (listed below)"]
    lines.append("Kept violations:" + (f" (first {len(listed)} of {total})" if total > len(listed) else ""))
    for v in listed:
        if isinstance(v, Mapping):
            lines.append(f"  {v.get('rule', '?')} [{v.get('scope', '?')}]: {v.get('message', '')}")
    return lines


def plan_text(plan: Mapping[str, Any], problem: Mapping[str, Any]) -> str:
    rack_of = {n.get("id"): n.get("rack") for n in problem.get("nodes", [])}
    deployments = problem.get("deployments", [])
    stats = plan.get("stats") or {}
    head: list[tuple[str, object]] = [("Status", status_text(plan))]
    if "solve_ms" in stats:
        head.append(("Solve time", f"{fmt_number(float(stats['solve_ms']))} ms"))
    for key in ("objective", "best_bound"):
        if key in stats:
            head.append((key.replace("_", " ").capitalize(), fmt_number(float(stats[key]))))
    extra = {k: v for k, v in stats.items() if k not in ("solve_ms", "objective", "best_bound", *KEPT)
             and isinstance(v, (int, float, str))}
    if extra:
        head.append(("Stats", ", ".join(f"{k}={v}" for k, v in sorted(extra.items()))))
    kept = kept_violations_text(stats)
    if kept:
        head.append(("Warning", kept[0]))
    sections = [render_kv(head)]  # type: ignore[arg-type]
    if kept[1:]:
        sections.append("\n".join(kept[1:]))

    by_deployment: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for p in plan.get("placements", []):
        by_deployment[p["deployment"]].append(p)
    unplaced = {u["deployment"]: u for u in plan.get("unplaced", [])}
    preempted = defaultdict(list)
    for p in plan.get("preempted", []):
        preempted[p["deployment"]].append(p["replica"])

    summary_rows = []
    for d in deployments:
        name = d.get("id", "?")
        placed = {p["replica"] for p in by_deployment.get(name, [])}
        summary_rows.append([name, d.get("tenant"), f"{len(placed)}/{d.get('replicas', '?')}",
                             unplaced[name]["replicas"] if name in unplaced else 0,
                             len(preempted.get(name, [])), d.get("priority", 0)])
    known = {d.get("id") for d in deployments}
    for name in sorted(set(by_deployment) - known):
        summary_rows.append([name, None, len({p["replica"] for p in by_deployment[name]}), 0, 0, None])
    sections.append("Deployments:\n" + render_table(
        ["deployment", "tenant", "placed", "unplaced", "preempted", "priority"], summary_rows,
        empty="(no deployments)"))

    for d_name in [d.get("id") for d in deployments] + sorted(set(by_deployment) - known):
        placements = by_deployment.get(d_name)
        if not placements:
            continue
        rows = [[p["replica"], p["shard"], p["node"], rack_of.get(p["node"]),
                 fmt_indices(p.get("accelerator_indices", []), p.get("accelerator_milli") or 0)]
                for p in sorted(placements, key=lambda p: (p["replica"], p["shard"]))]
        sections.append(f"Placements of {d_name}:\n" + render_table(
            ["replica", "shard", "node", "rack", "accelerators"], rows))

    if unplaced:
        lines = ["Unplaced:"]
        for name, u in unplaced.items():
            lines.append(f"  {name}: {u['replicas']} replica(s)")
            for r in u.get("reasons", []):
                scope = f" [{r['scope']}]" if r.get("scope") else ""
                lines.append(f"    {r['code']}: {r['message']}{scope}")
        sections.append("\n".join(lines))
    if plan.get("preempted"):
        sections.append("Preempted:\n" + render_table(
            ["deployment", "replica"], [[p["deployment"], p["replica"]] for p in plan["preempted"]]))
    if plan.get("moved"):
        sections.append("Moved:\n" + render_table(
            ["deployment", "replica", "shard", "from", "to"],
            [[m["deployment"], m["replica"], m["shard"], m["from"], m["to"]] for m in plan["moved"]]))
    return "\n\n".join(sections)
