"""Result tables as Markdown and CSV: what the study scripts and the metrics' summaries write."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Sequence


def _cell(value, digits: int) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        small_or_large = abs(value) >= 1e4 or (value != 0 and abs(value) < 1e-3)
        return f"{value:.{digits}g}" if small_or_large else f"{value:.{digits}f}"
    return str(value)


def markdown(rows: Sequence[dict], columns: Sequence[str] | None = None, digits: int = 4) -> str:
    """A GitHub-style Markdown table of ``rows`` (dicts), ``columns`` in order (default: the first row's keys)."""
    columns = list(columns or (rows[0].keys() if rows else []))
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(_cell(row.get(c), digits) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(rows: Sequence[dict], stem, columns: Sequence[str] | None = None, title: str = "",
                digits: int = 4) -> tuple[Path, Path]:
    """Write ``stem.md`` (with ``title`` as a heading) and ``stem.csv`` (full precision); returns both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    columns = list(columns or (rows[0].keys() if rows else []))
    md, csv_path = stem.with_suffix(".md"), stem.with_suffix(".csv")
    md.write_text((f"# {title}\n\n" if title else "") + markdown(rows, columns, digits))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return md, csv_path
