"""maia-controller --help: every flag in a section of its concern, none left in argparse's "options"."""

from __future__ import annotations

import re

import pytest

from controller.config import parse_args

SECTIONS = {
    "options": ["-h", "--help", "--version"],
    "API, TLS and authentication": ["--listen", "--tls-cert", "--tls-key", "--tls-client-ca",
                                    "--bootstrap-admin-token-file", "--insecure-no-auth"],
    "database": ["--db", "--migrate", "--no-migrate", "--db-wait"],
    "reconcile and solver": ["--reconcile-interval", "--solve-time-limit-ms", "--preemption", "--no-preemption",
                             "--decide-process",
                             "--no-decide-process", "--max-surge", "--nominate-after", "--nomination-max", "--quarantine-after-failures",
                             "--watchdog-interval"],
    "node lifecycle and heartbeats": ["--heartbeat-timeout", "--max-heartbeats-per-second", "--node-down-grace",
                                      "--node-eviction-grace", "--restart-grace", "--eviction-rate",
                                      "--unhealthy-zone-threshold", "--unhealthy-zone-eviction-rate"],
    "restarts of failed replicas": ["--restart-backoff", "--restart-backoff-max", "--restart-limit",
                                    "--assignment-ack-timeout"],
    "leadership (several controllers on one PostgreSQL)": ["--advertise-address", "--lease-ttl",
                                                           "--lease-renew-interval"],
    "agents and agent gateways": ["--agent-reports-per-second", "--agent-reports-burst",
                                  "--agent-admission-concurrency", "--agent-admission-queue", "--agent-gateways",
                                  "--agent-listen", "--advertise-agent-address", "--agent-gateway-linger-ms"],
    "tenants' rates and dry runs": ["--submits-per-minute", "--changes-per-minute", "--dry-runs-per-minute", "--dry-run-time-limit-ms",
                                    "--dry-run-slots"],
    "observability and health": ["--log-level", "--metrics-listen", "--http-listen", "--console-max-connections",
                                 "--console-max-connections-per-peer", "--max-rss-mib",
                                 "--reconcile-stuck-s", "--event-ttl", "--audit-ttl"],
}


def help_sections(help_text: str) -> dict[str, list[str]]:
    """Each section of `--help` (a block of lines headed "TITLE:") with the flags it lists."""
    sections: dict[str, list[str]] = {}
    for block in help_text.split("\n\n"):
        title, *lines = block.splitlines()
        if title.startswith((" ", "usage:")) or not title.endswith(":"):
            continue  # the usage lines, the description
        invocations = [re.split(r" {2,}", line.strip())[0] for line in lines if line.startswith("  -")]
        sections[title.removesuffix(":")] = [flag for invocation in invocations
                                             for flag in re.findall(r"(?<![\w-])--?[a-z][\w-]*", invocation)]
    return sections


def test_help_lists_every_flag_in_the_section_of_its_concern(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", "120")
    with pytest.raises(SystemExit) as caught:
        parse_args(["--help"], env={})
    assert caught.value.code == 0
    help_text = capsys.readouterr().out
    # A flag declared on the parser rather than in a group lands in "options", beside argparse's
    # own -h/--help and --version: the comparison fails then, as it does for a flag in no table row.
    assert help_sections(help_text) == SECTIONS


def test_the_preemption_flag_says_it_is_on_by_default() -> None:
    """`--no-preemption` alone was listed "(default: True)", which read as preemption off by default."""
    assert parse_args([]).preemption and not parse_args(["--no-preemption"]).preemption
    assert parse_args(["--preemption"]).preemption
