"""What every maiactl command receives: where the controller is, the output format, streams."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from google.protobuf import json_format
from google.protobuf.message import Message

from controller.cli.client import Controller


def to_jsonable(value: Any) -> Any:
    """Protobuf messages (also inside lists/dicts) as dicts with the proto's snake_case names."""
    if isinstance(value, Message):
        return json_format.MessageToDict(value, preserving_proto_field_name=True)
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


@dataclass
class Context:
    address: str
    output: str = "table"
    rpc_timeout: float = 15.0
    stdout: TextIO = field(default_factory=lambda: sys.stdout)
    stderr: TextIO = field(default_factory=lambda: sys.stderr)
    _controller: Controller | None = field(default=None, repr=False)

    @property
    def json(self) -> bool:
        return self.output == "json"

    @property
    def controller(self) -> Controller:
        if self._controller is None:
            self._controller = Controller(self.address, timeout=self.rpc_timeout)
        return self._controller

    def out(self, text: str = "") -> None:
        print(text, file=self.stdout, flush=True)

    def note(self, text: str) -> None:
        """Progress and diagnostics: always stderr, so `-o json` stdout stays one document."""
        print(text, file=self.stderr, flush=True)

    def emit_json(self, value: Any) -> None:
        json.dump(to_jsonable(value), self.stdout, indent=2, sort_keys=False)
        self.stdout.write("\n")
        self.stdout.flush()

    def close(self) -> None:
        if self._controller is not None:
            self._controller.close()
