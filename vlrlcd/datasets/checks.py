"""Per-record validation (issue 9): field types, non-empty UTF-8 prompt, unique ids, usable image."""

from __future__ import annotations

from vlrlcd.datasets.config import DataConfig
from vlrlcd.datasets.images import ImageProblem, load_image
from vlrlcd.datasets.records import Entry, Problem, Record


def utf8_problem(s: str) -> str | None:
    """Why `s` is not valid UTF-8 text (a lone surrogate, e.g. a bad byte kept by surrogateescape)."""
    try:
        s.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        code = ord(s[e.start])
        if 0xDC80 <= code <= 0xDCFF:
            return f"not valid UTF-8 (byte 0x{code - 0xDC00:02x} at character {e.start})"
        return f"not valid UTF-8 (lone surrogate U+{code:04X} at character {e.start})"


def _type_name(v: object) -> str:
    return "null" if v is None else type(v).__name__


def field_problem(r: Record) -> tuple[str, str] | None:
    """(field, reason) for the first field with a wrong type or bad text, else None."""
    if not isinstance(r.id, str) or not r.id.strip():
        return "id", f"expected a non-empty string, got {_type_name(r.id)} {r.id!r:.40}"
    if utf8_problem(r.id):
        return "id", utf8_problem(r.id)
    if not isinstance(r.prompt, str):
        return "prompt", f"expected a string, got {_type_name(r.prompt)} {r.prompt!r:.40}"
    if utf8_problem(r.prompt):
        return "prompt", utf8_problem(r.prompt)
    if not r.prompt.strip():
        return "prompt", "empty"
    if r.reference is not None:
        if not isinstance(r.reference, str):
            return "reference", f"expected a string or null, got {_type_name(r.reference)} {r.reference!r:.40}"
        if utf8_problem(r.reference):
            return "reference", utf8_problem(r.reference)
    if r.choices is not None:
        if not isinstance(r.choices, list) or not r.choices or not all(isinstance(c, str) for c in r.choices):
            return "choices", f"expected a non-empty list of strings or null, got {r.choices!r:.60}"
        bad = next((utf8_problem(c) for c in r.choices if utf8_problem(c)), None)
        if bad:
            return "choices", bad
        if r.reference is not None and r.reference not in r.choices:
            return "reference", f"'{r.reference:.40}' is not one of the choices"
    if not isinstance(r.meta, dict):
        return "meta", f"expected an object, got {_type_name(r.meta)}"
    if r.image is not None and not isinstance(r.image, str):
        return "image", f"expected a path string or null, got {_type_name(r.image)}"
    return None


def image_problem(path: str, cfg: DataConfig, cache: dict[str, str | None]) -> str | None:
    """Why the image at `path` is unusable (decoded once per path), else None."""
    if path not in cache:
        try:
            load_image(path, max_pixels=cfg.max_image_pixels, min_side=cfg.min_image_side)
            cache[path] = None
        except ImageProblem as e:
            cache[path] = f"{e.path}: {e.reason}"
    return cache[path]


def validate_entries(
    entries: list[Entry],
    cfg: DataConfig,
    seen_ids: dict[str, str] | None = None,
    stop_at_first: bool = False,
    image_cache: dict[str, str | None] | None = None,
) -> tuple[list[Record], list[Problem]]:
    """Split entries into valid records and problems; `seen_ids` (id -> where) spans splits."""
    seen = {} if seen_ids is None else seen_ids
    cache = {} if image_cache is None else image_cache
    good: list[Record] = []
    problems: list[Problem] = []
    for e in entries:
        p = e.problem
        if p is None and e.record is not None:
            r = e.record
            rid = r.id if isinstance(r.id, str) else None
            bad = field_problem(r)
            if bad is None and r.id in seen:
                bad = ("id", f"duplicate id (first used at {seen[r.id]})")
            if rid is not None and rid not in seen:
                seen[rid] = e.where
            if bad is None and r.image is not None:
                reason = image_problem(r.image, cfg, cache)
                bad = ("image", f"image {reason}") if reason else None
            if bad is None:
                good.append(r)
                continue
            p = Problem(e.where, bad[1], rid, bad[0])
        if p is None:
            p = Problem(e.where, "no record")
        problems.append(p)
        if stop_at_first:
            break
    return good, problems
