"""What every maiactl command receives: the connection, the output format, streams.

The output layer is here so every command behaves the same for `-o`:
`table` and `wide` print the command's text (wide: with its extra columns), `json` and `yaml`
print one document (the manifest vocabulary for objects that have a manifest kind, so
`get ... -o yaml` can be applied again), `name` prints `kind/name` lines.
"""
from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from google.protobuf.message import Message

from controller.cli.client import CliError, Controller, Exit
from controller.cli.config import Connection

if TYPE_CHECKING:
    import yaml

OUTPUTS = ("table", "wide", "json", "yaml", "name", "csv")


def to_jsonable(value: Any) -> Any:
    """Protobuf messages (also inside lists/dicts) as documents in the manifest vocabulary
    (`documents.message_document`: snake_case, lowercase enum words, numbers as numbers)."""
    if isinstance(value, Message):
        from controller.cli.documents import message_document  # with the first message: not at start

        return message_document(value)
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


@functools.cache
def _yaml_dumper() -> type[yaml.SafeDumper]:
    """Block style; multi-line strings as literal blocks. Made (and yaml imported) on the first
    `-o yaml`, not with maiactl: yaml is ~15 % of its start."""
    import yaml

    class YamlDumper(yaml.SafeDumper):
        pass

    YamlDumper.add_representer(str, _str_representer)
    return YamlDumper


def yaml_text(value: Any) -> str:
    import yaml

    return yaml.dump(to_jsonable(value), Dumper=_yaml_dumper(), sort_keys=False, default_flow_style=False,
                     allow_unicode=True)


@dataclass
class Context:
    connection: Connection = field(default_factory=Connection)
    output: str = "table"
    no_headers: bool = False
    rpc_timeout: float = 15.0
    stdout: TextIO = field(default_factory=lambda: sys.stdout)
    stderr: TextIO = field(default_factory=lambda: sys.stderr)
    _controller: Controller | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return self.connection.address

    @property
    def json(self) -> bool:
        """A machine-readable document is wanted (json or yaml)."""
        return self.output in ("json", "yaml")

    @property
    def wide(self) -> bool:
        return self.output == "wide"

    @property
    def controller(self) -> Controller:
        if self._controller is None:
            self._controller = Controller(self.connection, timeout=self.rpc_timeout)
        return self._controller

    def out(self, text: str = "") -> None:
        print(text, file=self.stdout, flush=True)

    def note(self, text: str) -> None:
        """Progress and diagnostics: always stderr, so `-o json` stdout stays one document."""
        print(text, file=self.stderr, flush=True)

    def table(self, text: str) -> None:
        """A list table from `render_table`: without its header line under --no-headers."""
        if self.no_headers:
            lines = text.splitlines()
            text = "\n".join(lines[1:]) if len(lines) > 1 else ""
            if not text:
                return
        self.out(text)

    def emit_json(self, value: Any) -> None:
        """One document on stdout, as JSON or YAML (whichever -o asked for; JSON otherwise)."""
        if self.output == "yaml":
            self.stdout.write(yaml_text(value))
        else:
            json.dump(to_jsonable(value), self.stdout, indent=2, sort_keys=False)
            self.stdout.write("\n")
        self.stdout.flush()

    def emit(self, document: Callable[[], Any], text: Callable[[], str], *,
             names: Callable[[], Iterable[str]] | None = None, is_table: bool = False) -> None:
        """Print in the chosen format: `document()` for json/yaml, `names()` for name,
        `text()` for table and wide (the text reads `ctx.wide` for its extra columns)."""
        if self.json:
            self.emit_json(document())
        elif self.output == "name":
            if names is None:
                raise CliError("-o name is not supported by this command", Exit.USAGE)
            for name in names():
                self.out(name)
        elif is_table:
            self.table(text())
        else:
            self.out(text())

    def close(self) -> None:
        if self._controller is not None:
            self._controller.close()
