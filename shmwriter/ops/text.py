"""Plain-text formatting shared by the operator's reports: tables, sizes, rates."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["megabytes", "rate", "shape_text", "table"]


def table(rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> list[str]:
    """Rows as aligned columns; ``right`` are the indices of right-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.rjust(w) if i in right else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return lines


def shape_text(shape: Sequence[int] | None) -> str:
    """``(80, 250)``, or ``-`` for no shape."""
    return "-" if shape is None else "(" + ", ".join(map(str, shape)) + ")"


def megabytes(nbytes: int) -> str:
    """``12.3 MB`` (or ``kB`` below a megabyte)."""
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1_000_000 else f"{nbytes / 1e3:.1f} kB"


def rate(value: float | None, unit: float, fmt: str = ".0f") -> str:
    """``value / unit`` formatted, or ``-`` when unknown."""
    return "-" if value is None else format(value / unit, fmt)
