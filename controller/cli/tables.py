"""Plain-text rendering for maiactl: aligned tables, key/value blocks and number formats.

Everything returns a string and prints nothing, so the output of every command can be tested
without a terminal. Tables are kubectl-like: upper-case headers, columns separated by at least
two spaces, numbers right-aligned.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

Cell = str | int | float | None

_GAP = "  "


def cell_text(value: Cell) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return fmt_number(value)
    return str(value)


def _is_numeric(value: Cell) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def render_table(headers: Sequence[str], rows: Iterable[Sequence[Cell]], empty: str = "(none)") -> str:
    """Align `rows` under `headers`; numeric columns are right-aligned. No rows: `empty`."""
    rows = [list(r) for r in rows]
    if not rows:
        return empty
    for r in rows:
        if len(r) != len(headers):
            raise ValueError(f"row has {len(r)} cells, table has {len(headers)} columns: {r!r}")
    texts = [[cell_text(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in texts:
        for i, t in enumerate(r):
            widths[i] = max(widths[i], text_width(t))
    numeric = [any(_is_numeric(r[i]) for r in rows) and all(_is_numeric(r[i]) or r[i] is None for r in rows)
               for i in range(len(headers))]
    lines = [_GAP.join(_pad(h.upper(), widths[i], numeric[i]) for i, h in enumerate(headers))]
    for r in texts:
        lines.append(_GAP.join(_pad(t, widths[i], numeric[i]) for i, t in enumerate(r)))
    return "\n".join(line.rstrip() for line in lines)


def _pad(text: str, width: int, right: bool) -> str:
    fill = " " * max(0, width - text_width(text))
    return fill + text if right else text + fill


def text_width(text: str) -> int:
    """The columns `text` takes on a terminal: a wide character (CJK, most emoji) two, a
    combining one none. `len` put every column after a label of them out of line."""
    if text.isascii():
        return len(text)
    from rich.cells import cell_len  # only for text that needs it (an import of ~10 ms)

    return cell_len(text)


def render_kv(pairs: Sequence[tuple[str, Cell]]) -> str:
    """`Key:   value` lines with the values aligned."""
    if not pairs:
        return ""
    width = max(text_width(k) for k, _ in pairs) + 1
    return "\n".join(f"{_pad(k + ':', width, False)}  {cell_text(v)}" for k, v in pairs)


def fmt_number(value: float, digits: int = 1) -> str:
    """2.0 -> '2', 2.5 -> '2.5', 0.25 -> '0.25' (at most `digits` decimals, at least 2 below 1)."""
    if value == int(value):
        return str(int(value))
    places = digits if abs(value) >= 1 else max(digits, 2)
    return f"{value:.{places}f}".rstrip("0").rstrip(".")


def fmt_used_of(used: float, total: float | None, unit: str = "") -> str:
    """'12.4/52.0 kW (24%)' or '12.4 kW' when there is no total."""
    if unit == "kW":
        u = f"{used / 1000:.1f}"
        if total is None:
            return f"{u} kW"
        t = f"{total / 1000:.1f}"
        pct = f" ({used / total:.0%})" if total else ""
        return f"{u}/{t} kW{pct}"
    if total is None:
        return fmt_number(used) + unit
    return f"{fmt_number(used)}/{fmt_number(total)}{unit}"


def fmt_indices(indices: Sequence[int], milli: int = 0) -> str:
    """Accelerator indices as '0,1,2' with the fraction when partial: '0 (500m)'."""
    text = ",".join(str(i) for i in indices) if indices else "-"
    if milli and milli < 1000:
        text += f" ({milli}m)"
    return text


def fmt_list(items: Iterable[str]) -> str:
    items = list(items)
    return ",".join(items) if items else "-"
