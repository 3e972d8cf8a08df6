"""Plain-text formatting shared by the operator's reports: tables, sizes, ranges."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["megabytes", "ranges", "rate", "shape_text", "table"]


def table(rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> list[str]:
    """Rows as aligned columns; ``right`` are the indices of right-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.rjust(w) if i in right else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return lines


def ranges(values: Sequence[int], limit: int = 12) -> str:
    """``1, 4-7, 9`` for 1, 4, 5, 6, 7, 9; at most ``limit`` ranges."""
    spans: list[list[int]] = []
    for value in values:
        if spans and value == spans[-1][1] + 1:
            spans[-1][1] = value
        else:
            spans.append([value, value])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans[:limit])
    return text + (f", ... ({len(spans) - limit} more ranges)" if len(spans) > limit else "")


def shape_text(shape: Sequence[int] | None) -> str:
    """``(80, 250)``, or ``-`` for no shape."""
    return "-" if shape is None else "(" + ", ".join(map(str, shape)) + ")"


def megabytes(nbytes: int) -> str:
    """``12.3 MB`` (or ``kB`` below a megabyte)."""
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1_000_000 else f"{nbytes / 1e3:.1f} kB"


def rate(value: float | None, unit: float, fmt: str = ".0f") -> str:
    """``value / unit`` formatted, or ``-`` when unknown."""
    return "-" if value is None else format(value / unit, fmt)
