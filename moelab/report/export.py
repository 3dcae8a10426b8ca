"""Where an exported figure or table goes: one file per format beside a common stem."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path


def output_paths(path_stem: str | Path, formats: Sequence[str], *, allowed: Iterable[str],
                 kind: str) -> list[tuple[str, Path]]:
    """[(format, stem.format), ...] with the folder created; every format is checked first.

    Checking before anything is written means an unknown format leaves no partial export.
    """
    allowed = sorted(allowed)
    chosen = [fmt.lower().lstrip(".") for fmt in formats]
    unknown = [fmt for fmt in chosen if fmt not in allowed]
    if unknown:
        choices = ", ".join(allowed[:-1]) + " or " + allowed[-1]
        raise ValueError(f"unknown {kind} format(s) {', '.join(map(repr, unknown))}; choose "
                         f"{choices}")
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    return [(fmt, stem.with_name(f"{stem.name}.{fmt}")) for fmt in chosen]
