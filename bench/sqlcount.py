"""Count the SQL statements a controller process runs, by kind (`bench join --count-sql`).

Work counted, not seconds: on a shared machine a join's wall time says more about the load than
about the code, while the statements per node joined (and the calls answered per node) do not
depend on it. `install(path)` hooks SQLAlchemy's `before_cursor_execute` for every engine of the
process and writes the counts to `path` (JSON) every `DUMP_EVERY_S` and at exit. The key of a
statement is its verb and first table (`SELECT nodes`, `INSERT audit_log`, ...); an executemany
counts once in `executions` and once per parameter set in `rows`.

The controller loads it through a `sitecustomize.py` that `sitecustomize_source` writes: nothing
in the controller knows about it.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

DUMP_EVERY_S = 2.0
# Where the counts go; the hook is installed only when it is set, and only in the process started
# with it (it is removed from the environment at once: the controller's decide process must not
# count its own nothing into the same file).
ENV_PATH = "BENCH_SQL_COUNT_PATH"

_TABLE = re.compile(r"\b(?:FROM|INTO|UPDATE|JOIN)\s+\"?(\w+)", re.IGNORECASE)


def statement_key(statement: str) -> str:
    """'SELECT nodes', 'INSERT audit_log', 'BEGIN', ...: the verb and the first table named."""
    words = statement.lstrip("( \n").split(None, 1)
    verb = words[0].upper() if words else "?"
    table = _TABLE.search(statement)
    return f"{verb} {table.group(1)}" if table else verb


class StatementCounts:
    def __init__(self) -> None:
        self.executions: Counter[str] = Counter()
        self.rows: Counter[str] = Counter()
        self._keys: dict[str, str] = {}  # statement text -> key (statements repeat: parse each once)

    def seen(self, statement: str, parameters: Any, executemany: bool) -> None:
        key = self._keys.get(statement)
        if key is None:
            key = self._keys[statement] = statement_key(statement)
        self.executions[key] += 1
        self.rows[key] += len(parameters) if executemany and parameters is not None else 1

    def as_json(self) -> dict[str, Any]:
        return {"at": time.time(), "executions": dict(self.executions), "rows": dict(self.rows),
                "total_executions": sum(self.executions.values())}


def install(path: str) -> StatementCounts:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    counts = StatementCounts()

    @event.listens_for(Engine, "before_cursor_execute")
    def _count(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        counts.seen(statement, parameters, executemany)

    def dump() -> None:
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps(counts.as_json()))
        os.replace(tmp, path)

    def dump_forever() -> None:
        while True:
            time.sleep(DUMP_EVERY_S)
            try:
                dump()
            except RuntimeError:  # the counts changed size while copied (the event loop's thread): next time
                pass

    threading.Thread(target=dump_forever, name="sql-count", daemon=True).start()
    atexit.register(dump)
    return counts


def sitecustomize_source() -> str:
    """A `sitecustomize.py` that installs the hook when `ENV_PATH` is set."""
    here = str(Path(__file__).resolve())  # by path: the controller may run from another checkout
    return (f"import os\nif os.environ.get({ENV_PATH!r}):\n"
            f"    import importlib.util\n"
            f"    spec = importlib.util.spec_from_file_location('maia_bench_sqlcount', {here!r})\n"
            f"    module = importlib.util.module_from_spec(spec)\n"
            f"    spec.loader.exec_module(module)\n"
            f"    module.install(os.environ.pop({ENV_PATH!r}))\n")


def read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def difference(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """The statements run between two reads, by kind (most first)."""
    def minus(kind: str) -> dict[str, int]:
        a, b = after.get(kind, {}), before.get(kind, {})
        d = {k: v - b.get(k, 0) for k, v in a.items() if v - b.get(k, 0)}
        return dict(sorted(d.items(), key=lambda kv: -kv[1]))
    executions = minus("executions")
    return {"executions": executions, "rows": minus("rows"), "total_executions": sum(executions.values())}
