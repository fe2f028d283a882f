"""Flags maiactl cannot use are refused when the command line is parsed (exit 2, argparse's
message naming the flag), not met later as a traceback, a tight loop, a silent default or a
misleading answer: durations must be more than 0 (a watch's interval at least 0.1 s), counts at
least 1, connection settings not empty, numbers within the API field they go into. And a
reader that closes stdout early ends maiactl quietly, as SIGPIPE ends other commands."""
from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import pytest

from cli_harness import BIN, maiactl_env
from controller.cli.bounds import count, int_range, seconds
from controller.cli.main import main
from maia.v1 import admin_pb2, common_pb2, deployments_pb2


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The last line argparse printed, once it exited 2."""
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    assert exited.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("argv, says", [
    # --interval -1 ended in ValueError from sleep; 0 polled in a tight loop
    (["get", "deployments", "-w", "--interval", "-1"], "argument --interval: must be at least 0.1 seconds, got '-1'"),
    (["get", "deployments", "-w", "--interval", "0"], "argument --interval: must be at least 0.1 seconds, got '0'"),
    (["get", "events", "--watch", "--interval", "nan"], "argument --interval: must be at least 0.1 seconds, got 'nan'"),
    (["get", "events", "-w", "--interval", "1e308"], "argument --interval: must be at most 315576000 seconds, "
                                                     "got '1e308'"),  # time.sleep's OverflowError
    # gRPC's deadline overflowed: every call failed at once as "cannot reach the controller"
    (["--rpc-timeout", "9000000000", "get", "nodes"], "argument --rpc-timeout: must be at most 315576000 "
                                                      "seconds, got '9000000000'"),
    # a timeout of 0 or less said DEADLINE_EXCEEDED (or UNAVAILABLE "within -1s") of a controller that is fine
    (["wait", "deployment", "x", "--timeout", "0"], "argument --timeout: must be more than 0 seconds, got '0'"),
    (["wait", "deployment", "x", "--timeout", "-1"], "argument --timeout: must be more than 0 seconds, got '-1'"),
    (["rollout", "status", "x", "--timeout", "-3"], "argument --timeout: must be more than 0 seconds, got '-3'"),
    (["drain", "n1", "--wait", "--timeout", "0"], "argument --timeout: must be more than 0 seconds, got '0'"),
    (["--rpc-timeout", "-1", "get", "nodes"], "argument --rpc-timeout: must be more than 0 seconds, got '-1'"),
    (["get", "nodes", "--rpc-timeout", "0"], "argument --rpc-timeout: must be more than 0 seconds, got '0'"),
    # infinity (inf, 1e400) was told "must be more than 0"
    (["get", "nodes", "--rpc-timeout", "inf"], "argument --rpc-timeout: must be at most 315576000 seconds, got 'inf'"),
    (["get", "nodes", "--rpc-timeout", "1e400"],
     "argument --rpc-timeout: must be at most 315576000 seconds, got '1e400'"),
    # --limit 0 printed the whole audit log; get events refuses it the same way
    (["audit", "list", "--limit", "0"], "argument --limit: must be at least 1, got 0"),
    (["audit", "list", "--limit", "-1"], "argument --limit: must be at least 1, got -1"),
    (["get", "events", "--limit", "0"], "argument --limit: must be at least 1, got 0"),
    (["get", "events", "--limit", "99999999999"], "argument --limit: must be at most 2147483647, got 99999999999"),
    (["wait", "nodes", "--connected", "-5"], "argument --connected: must be at least 1, got -5"),
    # an empty --controller fell back to the context's
    (["--controller", "", "get", "nodes"], "argument --controller: must not be empty"),
    (["get", "nodes", "--context", " "], "argument --context: must not be empty"),
    (["token", "create", "--role", "admin", "--ttl", "0s"],
     "argument --ttl: must be more than 0 (leave --ttl out for a token that never expires), got '0s'"),
    (["token", "create", "--role", "admin", "--ttl", "99999999999999999999"],
     "argument --ttl: must be at most 9223372036854775807 seconds, got '99999999999999999999'"),
    # timedelta's OverflowError
    (["audit", "list", "--since", "99999999999d"], "argument --since: '99999999999d' reaches back before any date"),
    (["usage", "--since", "999999d"], "argument --since: '999999d' reaches back before any date"),
])
def test_a_flag_maiactl_cannot_use_is_refused_when_parsed(capsys, argv: list[str], says: str) -> None:
    assert refused(capsys, "--controller", "127.0.0.1:9", *argv).endswith(f"error: {says}")


def test_a_replica_count_the_api_cannot_hold_is_refused_before_any_call(capsys) -> None:
    """It ended in protobuf's ValueError ("Value out of range")."""
    assert main(["--controller", "127.0.0.1:9", "scale", "web", "--replicas", "99999999999"]) == 2
    assert capsys.readouterr().err == "error: --replicas must be at most 2147483647, got 99999999999\n"


def test_the_range_of_each_integer_field_is_its_proto_type() -> None:
    field = deployments_pb2.DeploymentSpec.DESCRIPTOR.fields_by_name
    assert int_range(field["replicas"]) == (-2**31, 2**31 - 1)  # int32
    assert int_range(common_pb2.ShardSpec.DESCRIPTOR.fields_by_name["cpu_milli"]) == (-2**63, 2**63 - 1)  # int64
    assert int_range(admin_pb2.Tenant.DESCRIPTOR.fields_by_name["max_power_w"]) is None  # a double
    assert int_range(field["name"]) is None


def test_durations_and_counts() -> None:
    assert seconds()("0.5") == 0.5 and seconds(0.1)("0.1") == 0.1 and count()("1") == 1
    for parse, text in ((seconds(), "1e999"), (seconds(), "-0"), (seconds(), "soon"), (count(), "1.5"),
                        (count(3), "4")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_a_reader_that_stops_early_ends_maiactl_quietly() -> None:
    """`maiactl ... | head -1`: exit 141 as a command killed by SIGPIPE, nothing on stderr (it was
    Python's "Exception ignored ... BrokenPipeError" when it flushed stdout at its exit, and 120)."""
    proc = subprocess.Popen([str(BIN / "maiactl"), "version", "--client"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=maiactl_env(None))
    proc.stdout.close()  # type: ignore[union-attr]  # before maiactl has written anything
    err = proc.stderr.read()  # type: ignore[union-attr]
    assert (proc.wait(timeout=60), err) == (141, b"")


@pytest.mark.parametrize("argv, says", [
    # -o name printed the table: a usage record has no name
    (["usage", "-o", "name"], "error: -o name is not supported by usage: its records are no objects with names "
                              "(use -o table, json, yaml or csv)"),
    # a since in the future printed an empty report "from 2030-... to <now>", exit 0
    (["usage", "--since", "2030-01-01T00:00:00Z"], "error: since (2030-01-01T00:00:00+00:00) must be before until ("),
    (["usage", "--since", "2030-01-01", "--until", "2029-01-01"],
     "error: since (2030-01-01T00:00:00+00:00) must be before until (2029-01-01T00:00:00+00:00)"),
    # solve -o name printed the plan's table (snapshot -o name refused it)
    (["solve", "-o", "name", "no-such-file.json"], "error: -o name is not supported by solve: a plan names no objects"),
])
def test_usage_refuses_what_it_cannot_answer_before_any_call(capsys, argv: list[str], says: str) -> None:
    """Exit 2 with nothing sent (nothing listens at 127.0.0.1:9: a call would exit 5)."""
    assert main(["--controller", "127.0.0.1:9", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(says), captured.err


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dev CA with a client certificate (client-me.pem, client-me-key.pem) and the server's."""
    folder = tmp_path_factory.mktemp("pki")
    assert main(["dev-ca", "--dir", str(folder), "--client", "me"]) == 0
    return folder


@pytest.mark.parametrize("flags, says", [
    # A CA that is no PEM: C-core log lines, then "UNAVAILABLE: cannot reach the controller
    # ... (Failed to create security handshaker.)", exit 5.
    (["--ca", "{hostname}"], "CA file {hostname}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)"),
    (["--ca", "{pki}/ca.pem", "--cert", "{pki}/client-me-key.pem", "--key", "{pki}/client-me-key.pem"],
     "certificate file {pki}/client-me-key.pem: holds no PEM certificate"),
    (["--ca", "{pki}/ca.pem", "--cert", "{pki}/client-me.pem", "--key", "{pki}/client-me.pem"],
     "key file {pki}/client-me.pem: holds no PEM private key"),
    (["--ca", "{pki}/ca.pem", "--cert", "{pki}/client-me.pem", "--key", "{pki}/server-key.pem"],
     "key file {pki}/server-key.pem: not the private key of certificate file {pki}/client-me.pem"),
    (["--ca", "{pki}/ca.pem", "--cert", "{pki}/client-me.pem"],
     "mutual TLS needs both a client certificate (--cert) and its key (--key)"),
    # A token gRPC cannot send: its C core's log lines, then "INTERNAL: Invalid metadata", exit 1.
    (["--token", "tök"], "--token: the token holds 'ö' at character 2"),
    (["--token-file", "{hostname}", "--token", "bad\x01tok"], "--token: the token holds '\\x01' at character 4"),
    (["--controller", "127.0.0.1:99999"], "--controller '127.0.0.1:99999': port 99999 is out of range 1..65535"),
])
def test_tls_files_tokens_and_addresses_grpc_cannot_use_are_one_line_and_exit_2(pki: Path, tmp_path: Path,
                                                                               flags: list[str], says: str) -> None:
    hostname = tmp_path / "hostname"
    hostname.write_text("not-a-certificate\n")
    argv = [f.format(pki=pki, hostname=hostname) for f in flags]
    result = subprocess.run([str(BIN / "maiactl"), "--controller", "127.0.0.1:9", "--rpc-timeout", "3", *argv,
                             "get", "nodes"], capture_output=True, text=True, timeout=60, env=maiactl_env(None))
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    lines = result.stderr.splitlines()  # one: no log lines of gRPC's C core
    assert len(lines) == 1 and lines[0].startswith(f"error: {says.format(pki=pki, hostname=hostname)}"), result.stderr


def test_good_tls_files_pass_the_checks(pki: Path) -> None:
    from controller.cli.client import _target_of
    from controller.cli.config import Connection

    connection = Connection(ca=str(pki / "ca.pem"), cert=str(pki / "client-me.pem"), key=str(pki / "client-me-key.pem"))
    assert _target_of(connection).credentials is not None


@pytest.mark.parametrize("argv", [["rollout", "status"], ["scale", "--replicas", "2"]])
def test_commands_of_one_deployment_show_one_in_their_usage(capsys: pytest.CaptureFixture[str],
                                                            argv: list[str]) -> None:
    """`rollout status` and `scale` take one deployment (`[deployment] NAME`); their usage read
    `DEPLOYMENT [DEPLOYMENT ...]`, argparse's rendering of the one or two words they read."""
    assert refused(capsys, *argv).endswith("the following arguments are required: [deployment] NAME")
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert usage.split()[-2:] == ["[deployment]", "NAME"] and "..." not in usage


@pytest.mark.parametrize("argv, names", [
    (["get", "deployment", "-o", "yaml", "svc"], ("names", ["svc"])),
    (["get", "deploy", "-n", "lab", "dup", "other"], ("names", ["dup", "other"])),
    (["describe", "deployment", "-n", "lab", "svc"], ("name", "svc")),
    (["explain", "deployment", "-n", "lab", "svc"], ("name", "svc")),
    (["wait", "deployment", "-n", "lab", "svc"], ("names", ["svc"])),
    (["rollout", "status", "deployment", "-n", "lab", "svc"], ("deployment", ["deployment", "svc"])),
    (["get", "nodes", "-o", "wide", "n1"], ("names", ["n1"])),
    (["drain", "node", "--wait", "n1"], ("nodes", ["node", "n1"])),
    (["delete", "deployment", "-n", "lab", "svc"], ("words", ["deployment", "svc"])),
])
def test_names_given_after_an_option_are_the_commands_names(argv: list[str], names: tuple[str, object]) -> None:
    """kubectl's habit, `get deployment -n lab svc`: argparse matched the names' positional, empty,
    before the option, and every KIND NAME command ended "unrecognized arguments: svc" (exit 2)."""
    from controller.cli.main import parse

    dest, value = names
    assert getattr(parse(argv), dest) == value


def test_an_unknown_flag_after_the_names_is_still_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert refused(capsys, "get", "deployment", "svc", "--bogus") == "maiactl: error: unrecognized arguments: --bogus"
    assert refused(capsys, "describe", "deployment", "svc", "more") == "maiactl: error: unrecognized arguments: more"
    # `--name` is an option of token create: a stray word is not its value
    assert refused(capsys, "token", "create", "--role", "admin", "stray") == \
        "maiactl: error: unrecognized arguments: stray"
