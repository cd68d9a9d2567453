"""Speedup targets as users write them: `2x`, `2`, `2.0`, `1.5X`, or a family `1.5x,2x,3x` (the one parser the
API, the CLI and recipes share). No torch: the CLI imports it for option parsing."""

from __future__ import annotations

from collections.abc import Sequence

from zipkd.errors import ZipkdError


def parse_speedup(value: str | float) -> float:
    """One target: a number of at least 1, optionally with an `x` suffix."""
    if isinstance(value, bool):
        raise ZipkdError(f"{value!r} is not a speedup; write e.g. 2x, 2 or 1.5")
    if isinstance(value, (int, float)):
        s = float(value)
    else:
        try:
            s = float(str(value).strip().lower().removesuffix("x"))
        except ValueError:
            raise ZipkdError(f"{value!r} is not a speedup; write e.g. 2x, 2 or 1.5") from None
    if s != s or s == float("inf"):
        raise ZipkdError(f"speedup {value!r} is not a finite number; write e.g. 2x, 2 or 1.5")
    if not s >= 1.0:
        raise ZipkdError(f"speedup {value!r} must be at least 1x (a slowdown is not a target)")
    return s


def parse_speedups(value: str | float | Sequence[str | float]) -> tuple[float, ...]:
    """Sorted distinct targets from one value, a comma-separated string or a sequence of values."""
    if isinstance(value, str):
        items: list = [v for v in value.split(",") if v.strip()]
    elif isinstance(value, (int, float)):
        items = [value]
    else:
        items = list(value)
    if not items:
        raise ZipkdError("give at least one target speedup, e.g. 2x or 1.5x,2x,3x")
    return tuple(sorted({parse_speedup(v) for v in items}))
