"""Declared ranges for numeric config keys, checked in one place.

Each config dataclass lists its numeric fields in `RANGES`, interval notation with an optional note:

    RANGES: ClassVar[dict[str, str]] = {"batch_size": "[1, inf)", "grad_clip": "[0, inf) 0: no clipping"}

and its `validate()` calls `check_ranges(self, "train.")`. NaN lies in no range; an open `inf` end
excludes infinity. `null` passes (Optional keys say what it means in their note).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from vlrlcd.errors import VlrlcdError

_INTERVAL = re.compile(r"\s*([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])\s*(.*)")


@dataclass(frozen=True)
class Range:
    lo: float
    hi: float
    lo_closed: bool
    hi_closed: bool
    note: str = ""

    def __contains__(self, v: float) -> bool:
        above = v > self.lo or (self.lo_closed and v == self.lo)
        below = v < self.hi or (self.hi_closed and v == self.hi)
        return bool(above and below)

    def describe(self) -> str:
        """'>= 1', '> 0', 'in [0, 1)', 'a finite number'."""
        lo_inf, hi_inf = math.isinf(self.lo), math.isinf(self.hi)
        if lo_inf and hi_inf:
            return "a finite number"
        if hi_inf:
            return f"{'>=' if self.lo_closed else '>'} {_num(self.lo)}"
        if lo_inf:
            return f"{'<=' if self.hi_closed else '<'} {_num(self.hi)}"
        return f"in {'[' if self.lo_closed else '('}{_num(self.lo)}, {_num(self.hi)}{']' if self.hi_closed else ')'}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


@lru_cache(maxsize=None)
def parse_range(spec: str) -> Range:
    """'[0, 1) note' -> Range; a malformed spec is a programming error (ValueError)."""
    m = _INTERVAL.fullmatch(spec)
    if not m:
        raise ValueError(f"bad range spec {spec!r}; expected e.g. '[1, inf)' or '(0, 1] note'")
    lo, hi = float(m.group(2)), float(m.group(3))
    return Range(lo, hi, m.group(1) == "[", m.group(4) == "]", m.group(5).strip())


def ranges_of(cls: type) -> dict[str, Range]:
    return {k: parse_range(v) for k, v in getattr(cls, "RANGES", {}).items()}


def check_ranges(obj: Any, prefix: str) -> None:
    """Raise a one-line VlrlcdError naming the key, its value and the valid range for the first numeric
    field of `obj` outside its declared range."""
    for name, r in ranges_of(type(obj)).items():
        v = getattr(obj, name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v not in r:
            note = f" ({r.note})" if r.note else ""
            raise VlrlcdError(f"{prefix}{name} must be {r.describe()}{note}, got {v!r}")
