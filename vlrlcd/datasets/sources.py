"""Reading a data source into rows (dicts with a location), before any format-specific mapping.

Text is decoded as UTF-8 with `surrogateescape`, so a bad byte never stops reading: it survives as
a lone surrogate in the string and validation reports the record and field that hold it.
Hugging Face image columns are read raw (`{"bytes", "path"}`), never decoded here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlrlcd.errors import VlrlcdError
from vlrlcd.files import json_error, json_lines, text_lines

HF_DIR_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt", ".arrow", ".csv")


@dataclass
class Row:
    """One source row: `data` when it was read, else `error` (e.g. bad JSON) and no data."""

    where: str
    index: int
    data: dict | None = None
    error: str | None = None


@dataclass
class Table:
    """What a source held: rows, or for a JSON object file the whole document (`doc`)."""

    source: str
    kind: str                          # jsonl | json | parquet | hf_dir | hub | text
    rows: list[Row] = field(default_factory=list)
    doc: Any = None
    image_columns: tuple[str, ...] = ()   # columns declared as Hugging Face Image features
    note: str = ""


def decode(data: bytes) -> str:
    """UTF-8 (BOM allowed) with bad bytes kept as lone surrogates for validation to report."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return data.decode("utf-8", errors="surrogateescape")


def is_hub_id(path: str) -> bool:
    return bool(HUB_ID.match(path)) and not path.lower().endswith(DATA_SUFFIXES)


def read_jsonl_rows(path: Path) -> Table:
    rows = []
    for i, line in enumerate(json_lines(path, errors="surrogateescape")):
        where = f"{path}:{line.lineno}"
        if line.error is not None:
            rows.append(Row(where, i, error=f"not valid JSON ({line.error})"))
        elif not isinstance(line.value, dict):
            rows.append(Row(where, i, error=f"expected a JSON object, got {type(line.value).__name__}"))
        else:
            rows.append(Row(where, i, data=line.value))
    return Table(str(path), "jsonl", rows)


def read_json_doc(path: Path) -> Table:
    """A JSON file: a list of objects, a COCO-style object (kept whole), or {key: [objects]}."""
    text = decode(path.read_bytes())
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines in a .json file (as Hugging Face writes them)
            return read_jsonl_rows(path)
        raise VlrlcdError(f"{path}:{e.lineno}: not valid JSON ({json_error(e)})") from None
    if isinstance(doc, dict):
        if "annotations" in doc and "images" in doc:
            return Table(str(path), "json", doc=doc)
        lists = [k for k, v in doc.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise VlrlcdError(
                f"{path}: a JSON object with keys {sorted(doc)[:8]}; expected a list of records, "
                "a COCO file (images + annotations) or an object with one list of records"
            )
        key, items = lists[0], doc[lists[0]]
    elif isinstance(doc, list):
        key, items = "", doc
    else:
        raise VlrlcdError(f"{path}: expected a JSON list of records, got {type(doc).__name__}")
    rows = []
    for i, d in enumerate(items):
        where = f"{path}: {key}[{i}]"
        if isinstance(d, dict):
            rows.append(Row(where, i, data=d))
        else:
            rows.append(Row(where, i, error=f"expected a JSON object, got {type(d).__name__}"))
    return Table(str(path), "json", rows, doc=doc)


def read_text_rows(path: Path) -> Table:
    rows = [Row(f"{path}:{lineno}", i, data={"prompt": text, "line": lineno}) for i, (lineno, text) in enumerate(text_lines(path))]
    return Table(str(path), "text", rows)


def _image_columns(features: Any) -> tuple[str, ...]:
    import datasets

    def has_image(f: Any) -> bool:
        if isinstance(f, datasets.Image):
            return True
        inner = getattr(f, "feature", None)
        return inner is not None and has_image(inner)

    return tuple(k for k, f in (features or {}).items() if has_image(f))


def _rows_from_arrow_dataset(ds: Any, where: str) -> list[Row]:
    """Rows of a datasets.Dataset as plain python, image columns left as {bytes, path}."""
    rows, i = [], 0
    for batch in ds.with_format("arrow").iter(batch_size=1000):
        for d in batch.to_pylist():
            rows.append(Row(f"{where} row {i}", i, data=d))
            i += 1
    return rows


def _pick_split(obj: Any, split: str, source: str) -> tuple[Any, str]:
    import datasets

    if isinstance(obj, (datasets.DatasetDict, dict)):
        if split not in obj:
            raise VlrlcdError(
                f"{source}: no split '{split}'; it has {', '.join(obj)} "
                "(set data.train_split / data.eval_split)"
            )
        return obj[split], f"{source}[{split}]"
    return obj, source


def read_hf_dir(path: Path, split: str) -> Table:
    """A `save_to_disk` folder (Dataset or DatasetDict)."""
    import datasets

    try:
        obj = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several types for a damaged folder
        raise VlrlcdError(f"{path}: not a readable Hugging Face save_to_disk folder ({type(e).__name__}: {e})") from None
    ds, where = _pick_split(obj, split, str(path))
    return Table(str(path), "hf_dir", _rows_from_arrow_dataset(ds, where), image_columns=_image_columns(ds.features))


def read_parquet(path: Path) -> Table:
    """One parquet file, or every *.parquet file of a folder (sorted by name)."""
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    rows, image_cols = [], ()
    for f in files:
        try:
            table = pq.read_table(f)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for damaged files
            raise VlrlcdError(f"{f}: not a readable parquet file ({e})") from None
        meta = (table.schema.metadata or {}).get(b"huggingface")
        if meta:
            import datasets

            try:
                feats = datasets.Features.from_dict(json.loads(meta)["info"]["features"])
                image_cols = _image_columns(feats)
            except Exception:  # metadata from another writer: fall back to column names
                pass
        for i, d in enumerate(table.to_pylist()):
            rows.append(Row(f"{f} row {i}", len(rows), data=d))
    return Table(str(path), "parquet", rows, image_columns=image_cols)


def read_hub(name: str, split: str) -> Table:
    """A Hugging Face hub dataset id (needs the network or a filled cache)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, auth, missing split: all end the same way for the user
        raise VlrlcdError(
            f"'{name}' is not a local file or folder, and loading it as a Hugging Face hub dataset "
            f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    return Table(name, "hub", _rows_from_arrow_dataset(ds, f"{name}[{split}]"), image_columns=_image_columns(ds.features))


def source_kind(path: str) -> str:
    """How to read `path`: jsonl | json | parquet | hf_dir | text | hub; raises if it cannot be found."""
    p = Path(path)
    if p.is_dir():
        if any((p / m).exists() for m in HF_DIR_MARKERS):
            return "hf_dir"
        if any(p.glob("*.parquet")):
            return "parquet"
        raise VlrlcdError(
            f"{p}: a folder that is neither a Hugging Face save_to_disk folder (no "
            f"{' / '.join(HF_DIR_MARKERS)}) nor a folder of parquet files; point data paths at a file"
        )
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".parquet":
            return "parquet"
        if suffix == ".json":
            return "json"
        if suffix == ".txt":
            return "text"
        if suffix == ".jsonl":
            return "jsonl"
        try:
            with open(p, "rb") as f:
                head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        except OSError as e:
            raise VlrlcdError(f"{p}: cannot be read ({e.strerror or e})") from None
        return "json" if head.startswith((b"[", b"{")) else "text"   # json falls back to JSON lines
    if is_hub_id(path):
        return "hub"
    raise VlrlcdError(f"{p}: no such file or folder")


def read_source(path: str, kind: str, split: str) -> Table:
    """Read `path` as `kind` (see source_kind); an unreadable file is a VlrlcdError naming it."""
    try:
        return _read(path, kind, split)
    except OSError as e:
        raise VlrlcdError(f"{path}: cannot be read ({e.strerror or e})") from None


def _read(path: str, kind: str, split: str) -> Table:
    p = Path(path)
    if kind == "jsonl":
        return read_jsonl_rows(p)
    if kind == "json":
        return read_json_doc(p)
    if kind == "text":
        return read_text_rows(p)
    if kind == "parquet":
        return read_parquet(p)
    if kind == "hf_dir":
        return read_hf_dir(p, split)
    return read_hub(path, split)
