"""maiactl builds its parser with the one command module of the subcommand it runs
(`controller.cli.commands.modules`, `controller.cli.main.command_of`): the command line parses
to the same arguments, and fails with the same message, as with every subcommand registered."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from controller.cli import commands
from controller.cli.main import _common_options, build_parser, command_of
from cli_harness import maiactl_env

ROOT = Path(__file__).resolve().parents[2]


def registered(module_name: str) -> tuple[str, ...]:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    [module] = [m for m in commands.modules() if m.__name__.rsplit(".", 1)[1] == module_name]
    module.register(sub, _common_options(suppress=True))
    return tuple(sub.choices)


@pytest.mark.parametrize("module_name", list(commands.COMMANDS))
def test_each_module_registers_the_subcommands_listed_for_it(module_name: str) -> None:
    assert registered(module_name) == commands.COMMANDS[module_name]


def test_the_full_parser_lists_every_subcommand_once_in_order() -> None:
    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert tuple(sub.choices) == tuple(c for names in commands.COMMANDS.values() for c in names)


@pytest.mark.parametrize("argv, command", [
    (["get", "deployments"], "get"),
    (["--controller", "h:1", "-o", "json", "--no-headers", "get", "nodes"], "get"),
    (["--controller=h:1", "--rpc-timeout", "3", "drain", "n1"], "drain"),
    (["-o", "yaml", "config", "view"], "config"),
    (["--contr", "h:1", "get", "nodes"], None),  # an abbreviation: argparse decides
    (["-h"], None),
    (["-oyaml", "get", "nodes"], None),
    ([], None),
])
def test_the_command_word_is_found_past_the_global_options(argv: list[str], command: str | None) -> None:
    assert command_of(argv) == command


def outcome(parser: argparse.ArgumentParser, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple:
    try:
        args = vars(parser.parse_args(argv))
        code = None
    except SystemExit as exc:
        args, code = None, exc.code
    captured = capsys.readouterr()
    return args, code, captured.out, captured.err


@pytest.mark.parametrize("argv", [
    ["get", "deployments", "-n", "a"],
    ["--controller", "h:1", "-o", "json", "get", "nodes", "--rack", "k1"],
    ["-o", "wide", "drain", "n1", "n2"],
    ["apply", "-f", "x.yaml", "--dry-run"],
    ["token", "create", "--help"],
    ["get", "nonsense"],
    ["describe"],
    ["--token", "t", "scale", "web", "--replicas", "x"],
    ["gett", "nodes"],
    ["--controller"],
    ["get", "--help"],
])
def test_a_command_line_parses_as_with_every_subcommand(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert outcome(build_parser(command_of(argv)), argv, capsys) == outcome(build_parser(), argv, capsys)


def test_maiactl_imports_only_the_module_of_its_command() -> None:
    # In a fresh interpreter: the command modules and yaml (no config file, no -o yaml) the
    # command line `config current-context` leaves out.
    probe = ("import sys\nfrom controller.cli.main import main\n"
             "main(['config', 'current-context'])\n"
             "print(' '.join(m for m in sys.modules if m.startswith('controller.cli.commands.') or m == 'yaml'))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                         env=maiactl_env(None), timeout=120, check=True)
    assert out.stdout.split() == ["controller.cli.commands.config"]
