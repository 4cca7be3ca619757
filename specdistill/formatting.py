"""Numbers and tables as every report prints them: one percent format, one markdown table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def percent(x: float | None, digits: int = 1, missing: str = "-") -> str:
    """``0.9449 -> '94.5%'``; ``None`` (a number that does not exist) -> ``missing``."""
    return missing if x is None else f"{100 * x:.{digits}f}%"


def md_table(header: Sequence[Any], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A markdown table; ``align`` gives one character per column, ``l`` or ``r`` (default: all left)."""
    align = align or "l" * len(header)
    if len(align) != len(header):
        raise ValueError(f"align has {len(align)} columns for a header of {len(header)}")
    rule = "|" + "".join("---:|" if a == "r" else "---|" for a in align)
    lines = ["| " + " | ".join(map(str, header)) + " |", rule]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)
