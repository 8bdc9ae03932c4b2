"""Files: the one atomic write (temp file in the same folder, fsync, rename), the one JSON-lines reader, a file's
sha256."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

BOM = b"\xef\xbb\xbf"


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", fsync: bool = True, newline: str | None = None) -> Iterator[IO]:
    """A file to write that replaces `path` only when the block ends without error: readers (and a crash) see
    the old file or the whole new one, never part of it. The temp file sits beside `path` (a rename within one
    folder is atomic) and is removed on error. With `fsync` the data, then the folder's new entry, reach the disk
    before the block returns (for what a resume trusts; views that are rebuilt anyway can skip it)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": newline})) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


def atomic_write(path: str | Path, data: str | bytes, fsync: bool = True) -> Path:
    """Write `data` (text as UTF-8) to `path` atomically (`atomic_open`); returns `path`."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w", fsync) as f:
        f.write(data)
    return Path(path)


def write_json(path: str | Path, obj: Any, indent: int = 1, fsync: bool = True) -> Path:
    """`obj` as indented JSON, written atomically."""
    return atomic_write(path, json.dumps(obj, indent=indent), fsync)


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in the folder `path` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class JsonLine:
    """One non-blank line: its number, its text, and the parsed value, or why it is not JSON."""

    lineno: int
    text: str
    value: Any = None
    error: str | None = None


def json_error(e: json.JSONDecodeError) -> str:
    """'Expecting value at column 5', 'Unterminated string starting at column 3' (json's own message ends
    in 'at' for some errors: the column is appended once)."""
    msg = e.msg[: -len(" at")] if e.msg.endswith(" at") else e.msg
    return f"{msg} at column {e.colno}"


def text_lines(path: str | Path, errors: str = "surrogateescape") -> Iterator[tuple[int, str]]:
    """(line number, text) for each non-blank line of a UTF-8 file (a BOM allowed, CRLF or LF), streamed.
    `errors` is the decoding of bad bytes ('surrogateescape' keeps them for validation to report)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            text = raw.decode("utf-8", errors=errors).rstrip("\r\n")
            if text.strip():
                yield lineno, text


def json_lines(path: str | Path, errors: str = "replace") -> Iterator[JsonLine]:
    """Each non-blank line of a JSON-lines file, parsed; a line that is not JSON (e.g. cut by a kill) carries
    its `error` instead of raising, so each caller decides: stop with file:line, skip, or count."""
    for lineno, text in text_lines(path, errors):
        try:
            yield JsonLine(lineno, text, json.loads(text))
        except json.JSONDecodeError as e:
            yield JsonLine(lineno, text, error=json_error(e))
