"""The config file with contexts: precedence flag > env > context > default, the `config` verbs,
and that the resolved token reaches the controller as `authorization: Bearer` metadata."""
from __future__ import annotations

import json
import stat
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from controller.cli.config import ConfigError, ConfigFile, ContextEntry, resolve_connection
from controller.cli.main import main
from maia.v1 import admin_pb2, admin_pb2_grpc


def write_config(path: Path, text: str) -> ConfigFile:
    path.write_text(text)
    return ConfigFile.load(path)


def test_flag_beats_env_beats_context_beats_default(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", "current_context: prod\ncontexts:\n"
                          "  prod: {controller: 'prod:443', token: from-file, ca: ~/ca.pem}\n"
                          "  dev: {controller: 'dev:50051'}\n")
    assert resolve_connection({}, {}, config).address == "prod:443"
    assert resolve_connection({}, {}, config).ca == str(Path.home() / "ca.pem")
    assert resolve_connection({}, {"MAIA_CONTROLLER": "env:1"}, config).address == "env:1"
    assert resolve_connection({"controller": "flag:2"}, {"MAIA_CONTROLLER": "env:1"}, config).address == "flag:2"
    assert resolve_connection({"context": "dev"}, {}, config).token is None
    assert resolve_connection({}, {"MAIA_CONTEXT": "dev"}, config).address == "dev:50051"
    assert resolve_connection({}, {"MAIA_TOKEN": "env-token"}, config).token == "env-token"
    assert resolve_connection({}, {}, ConfigFile(tmp_path / "none.yaml")).address == "127.0.0.1:50051"


def test_token_file_is_read_and_a_missing_context_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("maia_abc.def\n")
    config = write_config(tmp_path / "c.yaml", f"contexts:\n  a: {{token_file: {tmp_path / 'tok'}}}\n")
    assert resolve_connection({"context": "a"}, {}, config).token == "maia_abc.def"
    with pytest.raises(ConfigError, match="context 'b' not found .* \\(contexts: a\\)"):
        resolve_connection({"context": "b"}, {}, config)


@pytest.mark.parametrize("text, message", [
    ("contexts: [a]\n", "contexts: expected a mapping"),
    ("contexts:\n  a: {controler: x}\n", "contexts.a.controler: unknown setting"),
    ("current: a\n", "current: unknown key"),
    ("contexts: {a: {controller: x}\n", "invalid YAML"),
])
def test_malformed_config_files_are_refused_precisely(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        write_config(tmp_path / "c.yaml", text)


def test_config_verbs_edit_the_file(tmp_path: Path, capsys, monkeypatch) -> None:
    path = tmp_path / "sub" / "config.yaml"
    monkeypatch.setenv("MAIA_CONFIG", str(path))
    assert main(["config", "set-context", "prod", "--controller", "prod:443", "--token", "s3cret"]) == 0
    assert main(["config", "set-context", "dev", "--controller", "dev:1"]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    capsys.readouterr()
    assert main(["config", "current-context"]) == 0
    assert capsys.readouterr().out == "prod\n"  # the first context becomes current
    assert main(["config", "use-context", "dev"]) == 0
    assert capsys.readouterr().out == 'Switched to context "dev".\n'
    assert main(["config", "get-contexts", "-o", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["current_context"] == "dev"
    assert doc["contexts"]["prod"] == {"controller": "prod:443", "token": "REDACTED"}
    assert ConfigFile.load(path).contexts["prod"] == ContextEntry(controller="prod:443", token="s3cret")
    assert main(["config", "use-context", "nope"]) == 2
    assert "context 'nope' not found" in capsys.readouterr().err
    assert main(["config", "delete-context", "dev"]) == 0
    assert ConfigFile.load(path).current_context is None


def test_a_token_given_to_a_context_replaces_the_other_kind(tmp_path: Path, monkeypatch) -> None:
    """`set-context p --token-file F` on a context with a `token` kept both, and the stale token
    won: the file was never read (UNAUTHENTICATED). The token given last is the context's."""
    path = tmp_path / "config.yaml"
    monkeypatch.setenv("MAIA_CONFIG", str(path))
    (tmp_path / "admin.token").write_text("from-the-file\n")
    assert main(["config", "set-context", "p", "--controller", "h:1", "--token", "stale"]) == 0
    assert main(["config", "set-context", "p", "--token-file", str(tmp_path / "admin.token")]) == 0
    assert ConfigFile.load(path).contexts["p"] == ContextEntry(controller="h:1",
                                                               token_file=str(tmp_path / "admin.token"))
    assert main(["config", "set-context", "p", "--token", "given"]) == 0
    assert ConfigFile.load(path).contexts["p"] == ContextEntry(controller="h:1", token="given")


@pytest.mark.parametrize("flags, message", [
    (["--controller", "prod"], "--controller 'prod': expected HOST:PORT"),
    (["--controller", "h:70000"], "port 70000 is out of range"),
    (["--token", "two words"], "--token: the token holds ' '"),
])
def test_set_context_refuses_what_every_later_command_would(tmp_path: Path, capsys, monkeypatch,
                                                            flags: list[str], message: str) -> None:
    """A context stored with an address or a token that every later command refuses: refused
    when set, and the file left as it was."""
    path = tmp_path / "config.yaml"
    monkeypatch.setenv("MAIA_CONFIG", str(path))
    assert main(["config", "set-context", "p", "--controller", "h:1"]) == 0
    before = path.read_text()
    capsys.readouterr()
    assert main(["config", "set-context", "p", *flags]) == 2
    assert message in capsys.readouterr().err
    assert path.read_text() == before


class _Recorder(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self) -> None:
        self.metadata: list[tuple[str, str]] = []

    def GetClusterSummary(self, request, context):  # noqa: N802
        self.metadata = list(context.invocation_metadata())
        return admin_pb2.ClusterSummary(nodes_ready=1)


def test_the_contexts_token_is_sent_as_bearer_metadata(tmp_path: Path, capsys, monkeypatch) -> None:
    recorder = _Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    admin_pb2_grpc.add_AdminServiceServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        path = tmp_path / "config.yaml"
        path.write_text(f"current_context: t\ncontexts:\n  t: {{controller: '127.0.0.1:{port}', token: tok-1}}\n")
        monkeypatch.setenv("MAIA_CONFIG", str(path))
        monkeypatch.delenv("MAIA_CONTROLLER", raising=False)
        monkeypatch.delenv("MAIA_TOKEN", raising=False)
        assert main(["summary", "-o", "json"]) == 0
        assert ("authorization", "Bearer tok-1") in recorder.metadata
        assert main(["summary", "--token", "tok-2"]) == 0
        assert ("authorization", "Bearer tok-2") in recorder.metadata
    finally:
        server.stop(grace=None)


def test_a_config_or_token_file_that_is_not_utf8_is_a_config_error(tmp_path: Path, capsys, monkeypatch) -> None:
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="bin.yaml: cannot read: not UTF-8 text \\(byte 0xff at offset 0\\)"):
        ConfigFile.load(tmp_path / "bin.yaml")
    with pytest.raises(ConfigError, match="token file .*bin.yaml: cannot read: not UTF-8 text"):
        resolve_connection({"token_file": str(tmp_path / "bin.yaml")}, {}, ConfigFile(tmp_path / "none.yaml"))
    monkeypatch.setenv("MAIA_CONFIG", str(tmp_path / "bin.yaml"))
    assert main(["get", "tenants"]) == 2
    assert capsys.readouterr().err == \
        f"error: {tmp_path / 'bin.yaml'}: cannot read: not UTF-8 text (byte 0xff at offset 0)\n"


def test_a_token_files_byte_order_mark_is_dropped(tmp_path: Path) -> None:
    """A Windows editor writes one first: it went out in the header, an INTERNAL error."""
    (tmp_path / "tok").write_bytes(b"\xef\xbb\xbfmaia_abc.def\r\n")
    assert resolve_connection({"token_file": str(tmp_path / "tok")}, {}, ConfigFile(tmp_path / "none.yaml")).token \
        == "maia_abc.def"


@pytest.mark.parametrize("flags, env, says", [
    # gRPC refused these in its C core (log lines on stderr) and ended INTERNAL, exit 1.
    ({"token": "tök"}, {}, "--token: the token holds 'ö' at character 2; a bearer token is visible ASCII"),
    ({"token": "bad\x01tok"}, {}, "--token: the token holds '\\x01' at character 4"),
    ({}, {"MAIA_TOKEN": "two words"}, "$MAIA_TOKEN: the token holds ' ' at character 4"),
    ({"token_file": "{dir}/bom-inside"}, {}, "token file {dir}/bom-inside: the token holds '\\ufeff' at character 5"),
    # An empty file sent no token at all: UNAUTHENTICATED, exit 1.
    ({"token_file": "{dir}/empty"}, {}, "token file {dir}/empty: is empty (expected a bearer token)"),
    ({}, {"MAIA_TOKEN_FILE": "{dir}/blank"}, "token file {dir}/blank: is empty"),
    # 99999 connected to 99999 mod 65536 (34463); no port, to 443.
    ({"controller": "127.0.0.1:99999"}, {}, "--controller '127.0.0.1:99999': port 99999 is out of range 1..65535"),
    ({"controller": "127.0.0.1:0"}, {}, "--controller '127.0.0.1:0': port 0 is out of range 1..65535"),
    ({}, {"MAIA_CONTROLLER": "a:1,b:70000"}, "$MAIA_CONTROLLER 'b:70000': port 70000 is out of range"),
    ({"controller": ":50051"}, {}, "--controller ':50051': expected HOST:PORT, e.g. 127.0.0.1:50051"),
    ({"controller": "ctl.example.net"}, {}, "--controller 'ctl.example.net': expected HOST:PORT"),
    ({"controller": "[::1]:x"}, {}, "--controller '[::1]:x': expected HOST:PORT"),
    ({"controller": "[::1"}, {}, "--controller '[::1': expected HOST:PORT, an IPv6 host in brackets"),
    ({"controller": "::1]:50051"}, {}, "--controller '::1]:50051': expected HOST:PORT, an IPv6 host in brackets"),
])
def test_a_token_or_address_grpc_cannot_use_is_a_config_error(tmp_path: Path, flags: dict, env: dict,
                                                              says: str) -> None:
    (tmp_path / "bom-inside").write_text("maia\ufeffabc\n")
    (tmp_path / "empty").write_text("")
    (tmp_path / "blank").write_text(" \n\n")
    flags = {k: v.format(dir=tmp_path) for k, v in flags.items()}
    env = {k: v.format(dir=tmp_path) for k, v in env.items()}
    with pytest.raises(ConfigError) as caught:
        resolve_connection(flags, env, ConfigFile(tmp_path / "none.yaml"))
    assert str(caught.value).startswith(says.format(dir=tmp_path)), str(caught.value)


def test_addresses_grpc_takes_pass(tmp_path: Path) -> None:
    for address in ("127.0.0.1:1", "[::1]:65535", "ctl-a:50051, ctl-b:50051", "dns:///ctl:443", "unix:/run/maia.sock"):
        assert resolve_connection({"controller": address}, {}, ConfigFile(tmp_path / "none.yaml")).address == address


def test_a_context_or_setting_given_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid YAML: duplicate key 'a' \\(first on line 2\\)"):
        write_config(tmp_path / "c.yaml", "contexts:\n  a: {controller: 'x:1'}\n  a: {controller: 'y:1'}\n")
