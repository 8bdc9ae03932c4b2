"""The one record schema every data source turns into, and its JSONL form."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from vlrlcd.errors import VlrlcdError
from vlrlcd.files import atomic_open, json_lines


@dataclass
class Record:
    """One prompt: `image` is a path (relative to the JSONL file when read from one) or None."""

    id: str
    prompt: str
    image: str | None = None
    reference: str | None = None
    choices: list[str] | None = None
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        if not d["meta"]:
            d.pop("meta")
        return {k: v for k, v in d.items() if v is not None}


def _relative_image(image: str | None, folder: Path) -> str | None:
    """An image path under `folder` (the JSONL's folder) written relative to it; others as given."""
    if image is None:
        return None
    try:
        return Path(image).resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return image


def write_jsonl(records: Iterable[Record], path: str | Path) -> Path:
    """Write records as JSONL, atomically; image paths inside the file's folder are written relative to it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        for r in records:
            d = r.to_json()
            if "image" in d:
                d["image"] = _relative_image(d["image"], path.parent)
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    return path


def iter_json_lines(path: str | Path, what: str = "") -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line; a missing file, bad JSON or bytes that are not
    UTF-8 name file and line."""
    path = Path(path)
    if not path.exists():
        raise VlrlcdError(f"{what}{path}: no such file")
    for line in json_lines(path, errors="surrogateescape"):
        if line.error is not None:
            raise VlrlcdError(f"{path}:{line.lineno}: not valid JSON ({line.error})")
        try:
            line.text.encode("utf-8")
        except UnicodeEncodeError:  # bad bytes, kept as lone surrogates by the decoding
            raise VlrlcdError(f"{path}:{line.lineno}: not valid UTF-8; save the file as UTF-8") from None
        yield line.lineno, line.value


def read_jsonl(path: str | Path) -> list[Record]:
    """Read our JSONL; image paths are resolved against the file's folder."""
    path = Path(path)
    out: list[Record] = []
    for lineno, d in iter_json_lines(path):
        img = d.get("image") if isinstance(d, dict) else None
        if img is not None and not Path(img).is_absolute():
            d["image"] = str(path.parent / img)
        try:
            out.append(Record(**d))
        except TypeError as e:
            raise VlrlcdError(f"{path}:{lineno}: bad record ({e})") from None
    return out


@dataclass
class Problem:
    """Why one record cannot be used, and where it is (file:line, or file: index / row)."""

    where: str
    reason: str
    id: str | None = None
    field: str | None = None

    def message(self) -> str:
        rec = f"record '{self.id}'" if self.id is not None else "record"
        fld = f", field '{self.field}'" if self.field else ""
        return f"{self.where}: {rec}{fld}: {self.reason}"

    def to_json(self) -> dict:
        return {"where": self.where, "id": self.id, "field": self.field, "reason": self.reason}


@dataclass
class Entry:
    """A record read from a source with its location, or the problem that stopped it being read."""

    where: str
    record: Record | None = None
    problem: Problem | None = None
