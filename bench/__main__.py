"""Command line: `python -m bench fgd|synthetic|session|headofline|rebalance|watchdog|auth|e2e|submit|unary|failover|join|nodedeath|reconcile|departures|commit ...`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from bench import auth, commit, e2e, failover, headofline, join, nodedeath, session, submit, traces, unary, watchdog


def _fgd(args: argparse.Namespace) -> int:
    from bench import fgd
    nodes = traces.load_nodes(traces.trace_path(traces.GPU_NODE_LIST))
    seeds = fgd.parse_seeds(args.seeds)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    batch = 1 if args.mode == "online" else args.batch_size
    summary: list[dict[str, Any]] = []
    for workload in fgd.expand_workloads(args.workload):
        pods = traces.load_pods(traces.trace_path(traces.workload_file(workload)))
        bounds = _bounds(workload, nodes, pods, seeds, args) if args.bound else {}
        results: dict[str, list[fgd.RunResult]] = {}
        for policy in policies:
            label = policy if policy != "maia" else (
                f"maia {args.mode}" + (f" k={batch}" if batch > 1 else "")
                + (f" ({args.driver})" if args.driver != "single" else ""))
            runs = []
            for seed in seeds:
                r = fgd.run_seed(workload, seed, policy, nodes=nodes, pods=pods,
                                 batch_size=batch, driver=args.driver,
                                 time_limit_ms=args.time_limit_ms, probes=args.probe_calls)
                runs.append(r)
                lat = r.latencies_ms
                print(f"  {workload} {label} seed {seed}: unallocated {r.unallocated_pct:.3f}% "
                      f"({r.arrivals} arrivals, {r.seconds:.1f} s, {r.arrivals_per_s:.0f}/s"
                      + (f", call p50 {fgd.percentile(lat, 50):.2f} ms p99 "
                         f"{fgd.percentile(lat, 99):.2f} ms" if len(lat) > 1 else "") + ")",
                      file=sys.stderr, flush=True)
                if args.check:
                    _check(r)
                shown = args.configs and fgd.format_configurations(
                    fgd.gpu_configurations(r.deployments, r.placements), args.configs)
                if shown:
                    print(shown, file=sys.stderr, flush=True)
                summary.append({"workload": workload, "policy": label, "seed": seed,
                                "unallocated_pct": round(r.unallocated_pct, 3),
                                "arrivals": r.arrivals, "seconds": round(r.seconds, 3),
                                "calls": r.decisions,
                                "call_p50_ms": round(fgd.percentile(lat, 50), 3),
                                "call_p99_ms": round(fgd.percentile(lat, 99), 3),
                                **({"bound_pct": round(bounds[seed].unallocated_pct, 3),
                                    "bound_proven": bounds[seed].proven}
                                   if seed in bounds else {})})
            results[label] = runs
        try:
            paper = traces.paper_unallocated(workload)
        except traces.TraceMissing as e:
            paper = {}
            print(f"note: no paper results to compare with ({e})", file=sys.stderr)
        print(fgd.format_table(workload, results, paper, bounds))
        print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


def _bounds(workload: str, nodes: list[traces.TraceNode], pods: list[traces.TracePod],
            seeds: list[int], args: argparse.Namespace) -> dict[int, Any]:
    """Per seed, the packing bound of `bench.bound` on that seed's arrivals."""
    from bench import bound, fgd
    cap = fgd.capacity_milli(nodes)
    out = {}
    for seed in seeds:
        b = bound.packing_bound(nodes, fgd.seed_arrivals(pods, cap, seed),
                                time_limit_s=args.bound_time_limit_s)
        out[seed] = b
        print(f"  {workload} bound seed {seed}: unallocated >= {b.unallocated_pct:.3f}% "
              f"({'proven optimal' if b.proven else 'NOT proven: dual bound'}, "
              f"{b.seconds:.1f} s)", file=sys.stderr, flush=True)
    return out


def _check(r: Any) -> None:
    """Grade one run's final state with the independent checker of the test suite."""
    from bench import fgd
    from bench.checking import check_state
    nodes = traces.load_nodes(traces.trace_path(traces.GPU_NODE_LIST))
    violations = check_state({**fgd.cluster_doc(nodes), "deployments": r.deployments}, r.placements)
    print(f"    checker: {len(violations)} violations" + "".join(
        f"\n      {v}" for v in violations[:5]), file=sys.stderr)


def _synthetic(args: argparse.Namespace) -> int:
    from bench import synthetic
    return synthetic.main(args)


def _rebalance(args: argparse.Namespace) -> int:
    from bench import rebalance
    return rebalance.main(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fgd", help="FGD paper protocol on the Alibaba openb trace")
    f.add_argument("--workload", nargs="+", default=["default"],
                   help="workload names (openb_pod_list_<name>.csv); 'gpushare*' expands")
    f.add_argument("--seeds", default="42-51", help="e.g. 42-51 or 42,43")
    f.add_argument("--mode", choices=["online", "batch"], default="online")
    f.add_argument("--batch-size", type=int, default=16, help="arrivals per decision (batch)")
    f.add_argument("--policies", default="maia,bestfit,bestfit-frac,random",
                   help="comma list of: maia (the solver), bestfit, bestfit-frac, random "
                        "(bench greedy)")
    f.add_argument("--driver", choices=["single", "per-call", "session"], default="single",
                   help="one online solve() over all arrivals, one solve() per decision, or "
                        "one warm session place() per arrival")
    f.add_argument("--time-limit-ms", type=int, default=None)
    f.add_argument("--probe-calls", type=int, default=0,
                   help="after the run, time this many further arrivals one solve() each")
    f.add_argument("--json", help="also write per-seed results to this file")
    f.add_argument("--configs", type=int, default=0, metavar="N",
                   help="after each seed, the N GPU configurations (pod milli sharing a GPU) "
                        "leaving the most free milli")
    f.add_argument("--no-bound", dest="bound", action="store_false",
                   help="skip the packing bound (what no policy can beat; bench/bound.py)")
    f.add_argument("--bound-time-limit-s", type=float, default=120.0,
                   help="HiGHS time limit per seed for the bound")
    f.add_argument("--check", action="store_true",
                   help="grade every final state with tests/scheduler/checker.py")
    f.set_defaults(func=_fgd)

    s = sub.add_parser("synthetic", help="Maia-shaped clusters: latency, placed demand, memory")
    s.add_argument("--nodes", type=int, nargs="+", default=[1024, 4096, 16384])
    s.add_argument("--seed", type=int, default=7)
    s.add_argument("--fill", type=float, default=0.7,
                   help="share of accelerators requested before latency is measured")
    s.add_argument("--measure", type=int, default=100, help="arrivals timed one by one")
    s.add_argument("--batches", type=int, default=10, help="batches of --batch-size timed")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--gang-fill", type=float, default=0.5,
                   help="share of accelerators held when the roomy gang probes run")
    s.add_argument("--time-limit-ms", type=int, default=1000)
    s.add_argument("--check", action="store_true",
                   help="grade the final placements with tests/scheduler/checker.py")
    s.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    s.add_argument("--json", help="also write results to this file")
    s.set_defaults(func=_synthetic)

    session.add_parser(sub)
    headofline.add_parser(sub)
    commit.add_parser(sub)

    r = sub.add_parser("rebalance", help="1,024-node rebalance problem: solver vs greedy "
                                         "with moves, and repeatability")
    from bench import rebalance
    rebalance.add_arguments(r)
    r.set_defaults(func=_rebalance)

    w = sub.add_parser("watchdog", help="one isolation-watchdog check on a loaded synthetic cluster")
    watchdog.add_arguments(w)
    w.set_defaults(func=watchdog.main)

    a = sub.add_parser("auth", help="authentication overhead per call: tokens vs --insecure-no-auth")
    auth.add_arguments(a)
    a.set_defaults(func=auth.main)

    e = sub.add_parser("e2e", help="real controller + simnode fleets + concurrent clients: "
                                   "submit latency, time to Running, deployments/s, CPU, RSS")
    e2e.add_arguments(e)
    e.set_defaults(func=e2e.main)

    sb = sub.add_parser("submit", help="the submit RPC alone over a preloaded cluster (4,096 nodes, 10,000 "
                                       "placements): p50/p99, submits/s, where the time goes (--py-spy)")
    submit.add_arguments(sb)
    sb.set_defaults(func=submit.main)
    ub = sub.add_parser("unary", help="the controller's CPU per submit and per delete RPC (clients in a process "
                                      "of their own), SQL statements per call")
    unary.add_arguments(ub)
    ub.set_defaults(func=unary.main)

    fo = sub.add_parser("failover", help="leader controller SIGKILLed -> next placement committed (PostgreSQL)")
    failover.add_arguments(fo)
    fo.set_defaults(func=failover.main)

    jn = sub.add_parser("join", help="real controller + simnode fleets that all start at once: time until every "
                                     "node is ready, Register p50/p99 and refusals, controller CPU and peak RSS")
    join.add_arguments(jn)
    jn.set_defaults(func=join.main)
    nd = sub.add_parser("nodedeath", help="real controller + simnode fleets: a share of the nodes killed at once "
                                          "-> suspect, down, evicted, placed again; needless moves")
    nodedeath.add_arguments(nd)
    nd.set_defaults(func=nodedeath.main)

    rc = sub.add_parser("reconcile", help="per-pass cost of the reconcile loop on a preloaded database: "
                                          "the warm fast path vs the full path")
    from bench import reconcile
    reconcile.add_arguments(rc)
    rc.set_defaults(func=reconcile.main)

    dp = sub.add_parser("departures", help="the trace replayed with arrivals and departures: "
                                           "allocation over time, waiting, moves, re-pack")
    from bench import departures
    departures.add_arguments(dp)
    dp.set_defaults(func=departures.main)

    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except traces.TraceMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
