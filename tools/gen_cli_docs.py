"""Generate docs/cli.md, the maiactl reference, from the argparse parser itself.

`python tools/gen_cli_docs.py` rewrites docs/cli.md; `--check` exits 1 when the file differs
from what the parser would generate (tests/cli/test_cli_docs.py runs the check, so a changed
flag without regenerated docs fails the suite).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "cli.md"

HEAD = """# maiactl reference

Generated from the parser by `python tools/gen_cli_docs.py` — do not edit by hand
(`tests/cli/test_cli_docs.py` fails when this page is stale).

## Connection and configuration

Every setting resolves in one order: a command-line flag, then its environment variable, then
the chosen context of the config file, then the default. The config file is `$MAIA_CONFIG`, else
`$XDG_CONFIG_HOME/maia/config.yaml`, else `~/.config/maia/config.yaml`:

```yaml
current_context: local
contexts:
  local:
    controller: 127.0.0.1:50051
  prod:
    controller: maia.example.net:443
    token_file: ~/.maia/token     # or token: maia_...
    ca: ~/.maia/ca.pem            # TLS; cert/key for mutual TLS
```

| setting | flag | environment |
|---|---|---|
| controller address | `--controller HOST:PORT` | `MAIA_CONTROLLER` |
| context | `--context NAME` | `MAIA_CONTEXT` |
| bearer token | `--token`, `--token-file` | `MAIA_TOKEN`, `MAIA_TOKEN_FILE` |
| TLS CA / client cert / key | `--ca`, `--cert`, `--key` | `MAIA_CA`, `MAIA_CERT`, `MAIA_KEY` |

## Exit codes (stable)

| code | meaning |
|---|---|
{exit_rows}

## Output formats

`-o table` (default) prints aligned tables (`--no-headers` drops the header line); `-o wide`
adds columns; `-o name` prints `kind/name` per line: `deployment/TENANT/NAME`, `node/ID`,
`tenant/ID`, which every command naming such an object reads back as one word (`get`, `describe`,
`delete`, `wait`, `explain`, `scale`, `rollout status|history|undo|restart`, `cordon`, `uncordon`, `drain`),
as it reads `KIND NAME`; `placement/TENANT/NAME/REPLICA/SHARD`, one shard of
`deployment/TENANT/NAME`, and `revision/TENANT/NAME/REVISION`, one of its kept revisions (no
command takes either by name); `event/ID`, `token/ID`, `audit/SEQ`; `config
get-contexts` prints the context names alone. `-o json` and `-o yaml` print exactly one
document on stdout (progress and errors go to stderr). For scripts:

- objects are in the **manifest vocabulary**: `kind`, the spec's fields at the top level in
  snake_case, lowercase enum words (`rack`, `dedicated_node`, `running`), numbers as numbers,
  and what the controller reports under `status` (ignored by `apply`). So
  `maiactl get deployment X -o yaml > x.yaml && maiactl apply -f x.yaml` prints `unchanged`;
- a list is `{{"kind": "List", "items": [...]}}` (also appliable);
- `apply`, `delete` print `{{"results": [{{"object": "deployment/x", "action": "created"}}, ...]}}`;
- answers that are no object (`summary`, `usage`, `audit verify`) are in the same vocabulary:
  every field (zeros too), lowercase enum words, numbers as numbers (64-bit ones too), times as
  RFC 3339 strings; `audit list` and `get events` print a List (of `AuditEvent`, of `Event`);
- `solve -o json` prints the plan document of the placement interchange format.

## Commands that block

`wait` (until the condition or `--timeout`), `get --watch` (until Ctrl-C). Everything else
returns after one round of calls (`--rpc-timeout` seconds at most per call; `wait` gives each of
its calls, its first reads too, at most what is left of its `--timeout`). A watch or a wait
outlives a controller that goes away for a while (a restart, a failover, a database outage, a
network that drops packets): a poll the controller does not serve (`UNAVAILABLE`;
`DEADLINE_EXCEEDED`, no answer within `--rpc-timeout`; `CANCELLED`, a controller stopping under
the call) is skipped, and the outage is said once on stderr, in the words of the error (`cannot
reach the controller` or `the controller answered ...`), with the time it began and what the
command does meanwhile:

```text
(watch: UNAVAILABLE: cannot reach the controller at ctl:50051 (...); since 14:02:11; polling again every 2s)
(wait: UNAVAILABLE: cannot reach the controller at ctl:50051 (...); since 14:02:11; polling every 1s until --timeout (14:04:05))
```

and once more when the controller answers again (`(watch: the controller at ctl:50051 answers
again, 12s after 14:02:11; ...)`). The command then goes on where it was (`get events --watch`
with the events not shown yet; `wait` until its condition or `--timeout`, exit codes
as without the outage). `wait deployment` follows a stream of the deployments' changes; when the
stream breaks (`(watch broke: UNAVAILABLE; polling, then watching again once the controller
answers)`) it polls, and once a poll is served (`...; watching again)`) it follows a new stream,
which begins with the deployments' current state: no change is missed between the two (a
deployment the new stream has not named yet is read meanwhile, so one deleted in between is
seen gone). A controller that does not offer the stream is polled until the end. Only the first
call ends the command when the controller cannot be reached (exit 5).

A controller that cannot be reached is `UNAVAILABLE`, exit 5, whether nothing listens there (the
connection is refused at once) or something accepts the connection and never answers (a hung
host, a port that is not gRPC, a firewall that drops the packets): a call whose `--rpc-timeout`
passed before any connection was made says so, rather than a bare `DEADLINE_EXCEEDED` (exit 1,
which stays for a call the controller received and did not answer in time):

```text
error: UNAVAILABLE: cannot reach the controller at ctl:50051 (no connection: nothing answered there within 15s)
hint: is maia-controller running there? Point maiactl elsewhere with --controller HOST:PORT, ...
```

maiactl's connection to the controller comes back by itself: after a failed attempt gRPC tries
again after 250 ms, growing to at most 2 s (gRPC's default grows to 2 minutes), so it connects
to a restarted controller within ~2.4 s of it listening again, however long it was away (a watch
shows it at its next poll); an attempt is given 20 s to connect. A connection that died without
a word (a host gone, a network or NAT that dropped it) is given up when an HTTP/2 ping goes
unanswered for 10 s: a keepalive ping after 20 s without a read (the agents' values,
`controller.limits`, which the controller permits), or one gRPC sent with a call; the next poll
connects again. Polls on the dead connection meanwhile end `DEADLINE_EXCEEDED` or `UNAVAILABLE`.
A command that ends within 20 s sends no keepalive ping.

## Retries

A call the controller answers "nothing of it was written, call again after this pause" (a
`google.rpc.RetryInfo` detail: a transaction the database aborted as a deadlock's victim or for a
serialization failure, `ABORTED`; a tenant over its rate, `RESOURCE_EXHAUSTED`; a controller busy
with a join storm, `UNAVAILABLE`) is made again after that pause (stretched by up to a quarter, at
random), at most {retry.max_attempts} attempts, within the call's `--rpc-timeout`, and never
when the pause asked is over {retry.max_wait_s:g} s (the error then says when to retry), nor when
after the pause less of the timeout would be left than {retry.min_attempt_s:g} s or the time the
last attempt took (a new attempt would end `DEADLINE_EXCEEDED`: the controller's answer is shown
instead). Nothing else is retried: an `ABORTED` for a stale resource version is a conflict (`scale`
reads the deployment again once; `apply` stops), and a controller whose database failed mid-call
says the write may have landed (`UNAVAILABLE`, exit 5: read before running the command again;
`apply` run again finds what landed `unchanged`). The submits and updates of `apply` also carry
request ids (one per run), so one made again never writes twice. An `UNAVAILABLE` the controller
answered itself (its database failed, it is busy or stopping, it follows and the leader serves the
call) is printed as its message with "the controller ... answered but cannot serve the call now";
"cannot reach the controller" is for a connection that failed (nothing listening, a network or TLS
failure, a gateway that lost its controller). Programs calling the API from asyncio get the same
retries on the channel of `controller.cli.client.open_aio_channel(connection)`, and a call whose
deadline passed with no connection made fails there `UNAVAILABLE` "no connection: nothing answered
there within Ns", not `DEADLINE_EXCEEDED`.

## How `apply` plans

Before writing anything `apply` (and `apply --dry-run`) makes a plan: each object is read, and
each write the controller would judge is asked of it as a dry run (`maiactl apply` below). Two
rules of the controller are about a batch, not one object, and the plan counts the batch for them:

- **a tenant's deployment cap** ({limits.DEPLOYMENTS_PER_TENANT_MAX:,} deployments a tenant): the new deployments of the files
  are counted on top of the tenant's stored ones (one listing a tenant), so a batch that would
  take it beyond the cap is refused at the plan, nothing written (exit 1), in one line for the
  tenant rather than one per deployment:

  ```text
  error: nothing applied:
  deployment/d-0513: tenant bulk would have 3000 deployments (0 stored, 3000 new in these manifests); at most 512 a tenant (and 2487 more beyond it: deployment/d-0514, deployment/d-0515, ...)
  ```

  A tenant's accelerator and power caps (`max_accelerators`, `max_power_w`) refuse no new
  deployment: what is beyond them waits, Pending with a `QUOTA_*` reason. An update of a
  deployment asking more than before is refused beyond them (docs/rollout.md), judged against
  what is placed, which the batch's other writes do not change until the controller places them:
  each update's own dry run is what its write meets.
- **the controller's rate of dry-run solves** (`maia-controller --dry-runs-per-minute`,
  {limits.DRY_RUNS_PER_MINUTE:g} a tenant by default, and one solved at once): a new deployment's dry run is a solve,
  so a large batch's plan is as long as its solves. New deployments of a tenant whose specs differ
  only in their names are solved once (a dry run's checks and its solve do not depend on the
  name; `--dry-run` says `solved as deployment/...`), so a file of 3,000 copies of one template
  costs one solve. A dry run refused "retry in ..." (the rate, the solver busy) is no conflict: the
  plan waits as told and asks again, and every {apply_plan.PROGRESS_EVERY_S:g} s says on stderr how far it is:

  ```text
  planning: 120/3000 objects checked in 4 min; the controller asked to wait (RESOURCE_EXHAUSTED: tenant bulk exceeded 30 dry runs a minute; retry in 2s); dry-run solves left: at most 2880, coming at about 30 a minute (the controller limits a tenant's): about 96 min left (--no-solve plans without them)
  ```

  `apply --no-solve` plans without these solves (the cap is counted all the same): what only a
  solve refuses (a deployment that could never fit: an accelerator model or a zone without such
  nodes, a replica larger than any rack, a spread whose domains cannot hold `min_replicas`) then
  fails its write, and the apply rolls back;
  `--dry-run --no-solve` shows no placements.

## How `apply` writes

`apply` writes in dependency order (topology, tenants, deployments), and sends the new
deployments of its files together, in `SubmitDeployments` calls of up to {limits.SUBMITS_PER_CALL_MAX:,}
(docs/rollout.md), not one call each; updates of existing ones go one `UpdateDeployment` each. Its
output is the same either way. Each deployment of such a call is decided on its own: one the
controller refuses fails the apply, and what this run wrote is undone (the deployments of that call
that were written included; when the call itself ends without an answer, its deadline passed
say, each of its deployments that was written), as when one call failed alone; one it answers "nothing written, send
again after this pause" is sent again (in one call with the others told so), by the rule of the
retries above, but for the tenant's submit rate (`--submits-per-minute`, {limits.SUBMITS_PER_MINUTE:g} a tenant by
default, bursting to as many): a batch beyond it is refused in part by every call, so what was
refused is sent again as long as each call writes some, after a pause long enough for several (up
to {apply_plan.PROGRESS_EVERY_S:g} s; a pause asked beyond {apply.RATE_PAUSE_MAX_S:g} s gives up and rolls back), and stderr says
`writing: 240/512 new deployments written; the controller asked to wait (...)` every {apply_plan.PROGRESS_EVERY_S:g} s:
512 new deployments of one tenant take ~3 minutes at the default rate (120 at once, then 2 a second). Interrupting the writes
(Ctrl-C) leaves what was written; `apply` run again finds it `unchanged`. Against a controller
without `SubmitDeployments` (`UNIMPLEMENTED`) it sends one `SubmitDeployment` each.

## Commands
"""


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    out: list[tuple[str, argparse.ArgumentParser]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for name, sub in action.choices.items():
                if id(sub) in seen:
                    continue
                seen.add(id(sub))
                out.append((name, sub))
                out.extend((f"{name} {n}", p) for n, p in _subcommands(sub))
    return out


def render() -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps help at the terminal width: fix it
    from controller.cli.client import EXIT_MEANING
    from controller.cli.main import build_parser
    from controller import limits
    from controller.cli.retry import RetryPolicy

    rows = "\n".join(f"| {int(code)} | `{code.name}`: {text} |" for code, text in EXIT_MEANING.items())
    parser = build_parser()
    from controller.cli.commands import apply, apply_plan

    parts = [HEAD.format(exit_rows=rows, retry=RetryPolicy(), limits=limits, apply=apply, apply_plan=apply_plan), "### maiactl\n", "```text", parser.format_help().rstrip(), "```\n"]
    for name, sub in _subcommands(parser):
        parts += [f"### maiactl {name}\n", "```text", sub.format_help().rstrip(), "```\n"]
    return "\n".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md is stale")
    text = render()
    if ap.parse_args().check:
        if not DOC.exists() or DOC.read_text() != text:
            print(f"{DOC} is stale: run python tools/gen_cli_docs.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
