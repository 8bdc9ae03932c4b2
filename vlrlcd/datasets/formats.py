"""Turning source rows into the common Record, one mapper per data format, and format detection.

Formats (`data.format`):
  jsonl          our schema: {"id", "prompt", "image"?, "reference"?, "choices"?, "meta"?}; image paths
                 relative to the file's folder (then data.image_root); an unknown key is kept in meta
                 unless it looks like a misspelt field ("refernce"), which is an error.
  hf             any table (save_to_disk folder, parquet, JSON / JSON lines, hub id) whose columns are
                 found by name (prompt/question/instruction..., answer/response/caption..., image...)
                 or set with data.columns; embedded image bytes are written once to an extract folder.
  aokvqa         A-OKVQA: question, choices, correct_choice_idx, rationales, image_id (+ split) resolved
                 under data.image_root as <split>2017/<id:012d>.jpg or <id:012d>.jpg (or an image column).
                 data.aokvqa_task=mc: the prompt lists the choices, reference = the correct choice,
                 `choices` set. rationale: the prompt asks for the reasoning, reference = the first
                 rationale followed by "So the answer is <choice>."; meta keeps every rationale and the
                 answer (the final answer stays checkable).
  coco_captions  COCO captions JSON (images + annotations): one record per image, prompt
                 data.caption_prompt, reference = its first caption, meta["references"] = all captions.
  llava          LLaVA-Instruct / ShareGPT: the first human turn (minus "<image>") is the prompt, the
                 first assistant turn after it the reference.
  text           one prompt per non-blank line, no reference (the teacher supplies anchors).
"""

from __future__ import annotations

import difflib
import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from vlrlcd.datasets.config import DataConfig
from vlrlcd.datasets.records import Entry, Problem, Record
from vlrlcd.datasets.sources import Row, Table
from vlrlcd.errors import VlrlcdError
from vlrlcd.files import atomic_write

FIELDS = ("id", "prompt", "image", "reference", "choices", "meta")
ALIASES: dict[str, tuple[str, ...]] = {
    "id": ("id", "question_id", "qid", "uid", "idx", "sample_id", "example_id"),
    "prompt": ("prompt", "question", "instruction", "query", "problem", "input", "text"),
    "reference": ("reference", "answer", "answers", "response", "output", "solution", "target", "caption", "label"),
    "image": ("image", "img", "image_path", "image_file", "file_name", "filename", "picture"),
    "choices": ("choices", "options"),
}
HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant", "chatgpt", "bard", "model")
IMAGE_TOKEN = "<image>"


@dataclass
class Context:
    """Where a source's relative paths resolve and where embedded images are written."""

    source: str
    base: Path                # the data file's folder
    image_root: Path | None
    extract_dir: Path         # embedded image bytes land here, named by content hash
    stem: str                 # prefix for ids a source does not provide
    cfg: DataConfig

    def roots(self, root_first: bool) -> list[Path]:
        roots = [self.base] if self.image_root is None else (
            [self.image_root, self.base] if root_first else [self.base, self.image_root]
        )
        return roots

    def outside(self, image: str) -> str | None:
        """Why `image` may not be read: it resolves (symlinks followed) outside the data file's folder,
        data.image_root and the folder embedded images are extracted to; None when inside, or when
        data.allow_outside_images is set."""
        if self.cfg.allow_outside_images:
            return None
        try:
            real = Path(image).expanduser().resolve()
        except (OSError, ValueError, RuntimeError) as e:   # a NUL byte, a symlink loop
            return f"{image!r:.80} is not a usable path ({e})"
        allowed = [self.base, self.extract_dir] + ([self.image_root] if self.image_root is not None else [])
        if any(real.is_relative_to(folder.resolve()) for folder in allowed):
            return None
        where = f"the data folder {self.base}" + (f" and data.image_root {self.image_root}" if self.image_root else "")
        to = f" (it resolves to {real})" if str(real) != image else ""
        return (f"{image} is outside {where}{to}; move the image there, set data.image_root to a folder "
                "that holds it, or set data.allow_outside_images=true")


class RowError(Exception):
    """One row cannot become a record: names the field and the reason."""

    def __init__(self, field: str | None, reason: str, rid: Any = None):
        super().__init__(reason)
        self.field, self.reason, self.id = field, reason, rid


# ------------------------------------------------------------------------------------- helpers


def _id(value: Any, fallback: str) -> Any:
    if value is None:
        return fallback
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _resolve(rel: str, roots: list[Path]) -> str:
    p = Path(rel).expanduser()
    if p.is_absolute():
        return str(p)
    for root in roots:
        if (root / p).exists():
            return str((root / p).absolute())
    return str((roots[0] / p).absolute())


def _sniff_ext(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return ".png"
    if data.startswith(b"\xff\xd8"):
        return ".jpg"
    if data.startswith(b"GIF8"):
        return ".gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return ".img"


def _extract(data: bytes, name: str | None, ctx: Context) -> str:
    """Write embedded image bytes once, named by their hash; return the path."""
    suffix = Path(name).suffix.lower() if name and Path(name).suffix else _sniff_ext(data)
    path = ctx.extract_dir / f"{hashlib.sha1(data).hexdigest()[:20]}{suffix}"
    if not path.exists():
        try:
            ctx.extract_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data, fsync=False)   # many files, each written once under its hash
        except OSError as e:
            raise VlrlcdError(f"cannot write embedded images to {ctx.extract_dir}: {e.strerror or e}; check run_dir") from None
    return str(path)


def image_value(value: Any, ctx: Context, rid: Any, root_first: bool) -> str | None:
    """A path, an HF {bytes, path} struct, a PIL image or a one-element list of those -> a file path."""
    if value is None:
        return None
    if isinstance(value, list):
        if not value:
            return None
        if len(value) > 1:
            raise RowError("image", f"{len(value)} images; one image per record is supported", rid)
        value = value[0]
    if isinstance(value, str):
        if not value.strip():
            raise RowError("image", "empty image path", rid)
        return _resolve(value, ctx.roots(root_first))
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        data, name = value.get("bytes"), value.get("path")
        if isinstance(data, (bytes, bytearray)) and data:
            return _extract(bytes(data), name if isinstance(name, str) else None, ctx)
        if isinstance(name, str) and name.strip():
            return _resolve(name, ctx.roots(root_first))
        raise RowError("image", "the image entry has neither bytes nor a path", rid)
    if hasattr(value, "save") and hasattr(value, "mode"):  # a decoded PIL image
        import io

        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return _extract(buf.getvalue(), "x.png", ctx)
    raise RowError("image", f"expected an image path (string), got {type(value).__name__} {value!r:.60}", rid)


def _choices_text(choices: list) -> str:
    return ", ".join(str(c) for c in choices)


# ------------------------------------------------------------------------------------- mappers


def map_jsonl(row: Row, ctx: Context) -> Record:
    d = dict(row.data or {})
    rid = _id(d.get("id"), None)
    meta = d.pop("meta", None)
    if meta is None:
        meta = {}
    elif not isinstance(meta, dict):
        raise RowError("meta", f"expected an object, got {type(meta).__name__}", rid)
    else:
        meta = dict(meta)
    for k in list(d):
        if k in FIELDS:
            continue
        close = difflib.get_close_matches(k, FIELDS, n=1, cutoff=0.75)
        if close:
            raise RowError(k, f"unknown field '{k}'; did you mean '{close[0]}'?", rid)
        meta[k] = d.pop(k)
    if rid is None:
        raise RowError("id", "missing (every record needs a unique \"id\")")
    if "prompt" not in d:
        raise RowError("prompt", "missing", rid)
    return Record(
        id=rid, prompt=d["prompt"], image=image_value(d.get("image"), ctx, rid, root_first=False),
        reference=d.get("reference"), choices=d.get("choices"), meta=meta,
    )


def _column_map(table: Table, cfg: DataConfig) -> dict[str, str]:
    """Our field -> source column, from data.columns or the first alias present."""
    keys: dict[str, None] = {}
    for r in table.rows:
        if r.data:
            keys.update(dict.fromkeys(r.data))
    cols: dict[str, str] = {}
    for f, aliases in ALIASES.items():
        if f in cfg.columns:
            if cfg.columns[f] not in keys:
                raise VlrlcdError(
                    f"{table.source}: data.columns.{f} is '{cfg.columns[f]}' but the columns are "
                    f"{', '.join(keys) or '(none)'}"
                )
            cols[f] = cfg.columns[f]
        elif f == "image" and table.image_columns:
            cols[f] = table.image_columns[0]
        else:
            hit = next((a for a in aliases if a in keys and a not in cols.values()), None)
            if hit:
                cols[f] = hit
    if "prompt" not in cols:
        raise VlrlcdError(
            f"{table.source}: no prompt column among {', '.join(keys) or '(none)'}; "
            "name it with data.columns.prompt=<column>"
        )
    return cols


def _reference(value: Any, choices: Any, meta: dict) -> Any:
    """Common answer shapes -> one string: a choice index, a number, a list of answers (most common)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and isinstance(choices, list) and 0 <= value < len(choices):
        meta["answer_index"] = value
        return choices[value]
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list) and value:
        answers = [a.get("answer", a.get("text")) if isinstance(a, dict) else a for a in value]
        if all(isinstance(a, str) for a in answers):
            meta["references"] = answers
            counts = Counter(answers)
            return max(answers, key=lambda a: (counts[a], -answers.index(a)))
    return value


def make_hf_mapper(table: Table, ctx: Context) -> Callable[[Row, Context], Record]:
    cols = _column_map(table, ctx.cfg)
    used = set(cols.values())

    def mapper(row: Row, ctx: Context) -> Record:
        d = row.data or {}
        rid = _id(d.get(cols["id"]) if "id" in cols else None, f"{ctx.stem}-{row.index}")
        choices = d.get(cols["choices"]) if "choices" in cols else None
        meta = {k: v for k, v in d.items() if k not in used and (v is None or isinstance(v, (str, int, float, bool)))}
        ref = _reference(d.get(cols["reference"]), choices, meta) if "reference" in cols else None
        img = image_value(d.get(cols["image"]), ctx, rid, root_first=True) if "image" in cols else None
        return Record(id=rid, prompt=d.get(cols["prompt"]), image=img, reference=ref, choices=choices, meta=meta)

    return mapper


def _aokvqa_image(d: dict, ctx: Context, rid: Any) -> str:
    if d.get("image") is not None:
        return image_value(d["image"], ctx, rid, root_first=True)
    image_id = d.get("image_id")
    if image_id is None:
        raise RowError("image_id", "missing (A-OKVQA records name their COCO image by image_id)", rid)
    if isinstance(image_id, bool) or not isinstance(image_id, int):
        raise RowError("image_id", f"expected an integer COCO image id, got {image_id!r:.40}", rid)
    root = ctx.image_root or ctx.base
    name = f"{image_id:012d}.jpg"
    split = d.get("split")
    candidates = ([root / f"{split}2017" / name] if isinstance(split, str) else []) + [
        root / name, root / "train2017" / name, root / "val2017" / name, root / "test2017" / name,
    ]
    hit = next((c for c in candidates if c.exists()), candidates[0])
    return str(hit.absolute())


def map_aokvqa(row: Row, ctx: Context) -> Record:
    d = row.data or {}
    rid = _id(d.get("question_id"), f"{ctx.stem}-{row.index}")
    question, choices = d.get("question"), d.get("choices")
    if not isinstance(question, str):
        raise RowError("question", f"expected a string, got {type(question).__name__}", rid)
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise RowError("choices", f"expected a non-empty list of strings, got {choices!r:.60}", rid)
    idx = d.get("correct_choice_idx")
    answer = None
    if idx is not None:
        if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < len(choices):
            raise RowError("correct_choice_idx", f"expected an index into the {len(choices)} choices, got {idx!r}", rid)
        answer = choices[idx]
    rationales = d.get("rationales") or []
    if not isinstance(rationales, list) or not all(isinstance(r, str) for r in rationales):
        raise RowError("rationales", "expected a list of strings", rid)
    meta = {
        "task": f"aokvqa_{ctx.cfg.aokvqa_task}", "answer": answer, "rationales": rationales,
        "direct_answers": d.get("direct_answers"), "image_id": d.get("image_id"),
    }
    image = _aokvqa_image(d, ctx, rid)
    if ctx.cfg.aokvqa_task == "mc":
        if idx is not None:
            meta["answer_index"] = idx
        prompt = f"{question}\nChoices: {_choices_text(choices)}\nAnswer with one of the choices."
        return Record(id=rid, prompt=prompt, image=image, reference=answer, choices=list(choices), meta=meta)
    prompt = f"{question}\nChoices: {_choices_text(choices)}\nExplain your reasoning briefly, then give the answer."
    meta["choices"] = list(choices)
    ref = None
    if rationales and answer is not None:
        ref = f"{rationales[0].strip()} So the answer is {answer}."
    return Record(id=rid, prompt=prompt, image=image, reference=ref, meta=meta)


def _turns(d: dict, rid: Any) -> list[tuple[str, Any]]:
    if "conversations" in d:
        conv, role_key, text_key = d["conversations"], "from", "value"
    else:
        conv, role_key, text_key = d.get("messages"), "role", "content"
    if not isinstance(conv, list):
        raise RowError("conversations", f"expected a list of turns, got {type(conv).__name__}", rid)
    turns = []
    for t in conv:
        if not isinstance(t, dict):
            raise RowError("conversations", f"a turn is {type(t).__name__}, expected an object", rid)
        role, text = t.get(role_key, t.get("role", t.get("from"))), t.get(text_key, t.get("content", t.get("value")))
        if isinstance(text, list):  # OpenAI-style content parts
            text = "".join(
                p.get("text", "") if p.get("type") == "text" else IMAGE_TOKEN if p.get("type") == "image" else ""
                for p in text if isinstance(p, dict)
            )
        turns.append((str(role).lower(), text))
    return turns


def map_llava(row: Row, ctx: Context) -> Record:
    d = row.data or {}
    rid = _id(d.get("id"), f"{ctx.stem}-{row.index}")
    turns = _turns(d, rid)
    first = next((i for i, (role, _) in enumerate(turns) if role in HUMAN_ROLES), None)
    if first is None:
        raise RowError("conversations", "no human / user turn", rid)
    prompt = turns[first][1]
    if not isinstance(prompt, str):
        raise RowError("conversations", f"turn {first} text is {type(prompt).__name__}, expected a string", rid)
    reference = next((t for role, t in turns[first + 1:] if role in ASSISTANT_ROLES), None)
    if reference is not None and not isinstance(reference, str):
        raise RowError("conversations", "the assistant turn text is not a string", rid)
    image = image_value(d.get("image"), ctx, rid, root_first=True)
    if IMAGE_TOKEN in prompt and image is None:
        raise RowError("image", f"the prompt has {IMAGE_TOKEN} but the record names no image", rid)
    prompt = prompt.replace(IMAGE_TOKEN, "").strip()
    meta = {"task": "llava", "turns": len(turns)}
    return Record(id=rid, prompt=prompt, image=image, reference=reference, meta=meta)


def map_text(row: Row, ctx: Context) -> Record:
    d = row.data or {}
    prompt = d.get("prompt")
    return Record(id=f"{ctx.stem}-{d.get('line', row.index + 1)}", prompt=prompt.strip() if isinstance(prompt, str) else prompt)


def coco_entries(table: Table, ctx: Context) -> list[Entry]:
    """One record per image; captions grouped from the annotations."""
    doc = table.doc
    images, anns = doc.get("images"), doc.get("annotations")
    src = table.source
    if not isinstance(images, list) or not isinstance(anns, list):
        raise VlrlcdError(f"{src}: COCO captions need lists 'images' and 'annotations'")
    out: list[Entry] = []
    captions: dict[Any, list[str]] = {}
    ids = {im.get("id") for im in images if isinstance(im, dict) and isinstance(im.get("id"), (int, str))}
    for j, a in enumerate(anns):
        where = f"{src}: annotations[{j}]"
        if not isinstance(a, dict):
            out.append(Entry(where, problem=Problem(where, f"expected an object, got {type(a).__name__}")))
            continue
        aid = None if a.get("id") is None else str(a.get("id"))
        if not isinstance(a.get("image_id"), (int, str)) or a["image_id"] not in ids:
            out.append(Entry(where, problem=Problem(where, f"image_id {a.get('image_id')!r} is not in 'images'", aid, "image_id")))
        elif not isinstance(a.get("caption"), str):
            out.append(Entry(where, problem=Problem(where, f"expected a string, got {a.get('caption')!r:.40}", aid, "caption")))
        else:
            captions.setdefault(a["image_id"], []).append(a["caption"].strip())
    root = ctx.image_root or ctx.base
    for i, im in enumerate(images):
        where = f"{src}: images[{i}]"
        if not isinstance(im, dict) or not isinstance(im.get("id"), (int, str)) or not isinstance(im.get("file_name"), str):
            out.append(Entry(where, problem=Problem(where, "an image entry needs 'id' and a string 'file_name'", None, "file_name")))
            continue
        rid = f"coco-{im['id']}"
        name = im["file_name"]
        url_folder = Path(str(im.get("coco_url", ""))).parent.name
        candidates = [root / name] + ([root / url_folder / name] if url_folder else []) + [ctx.base / name]
        path = next((c for c in candidates if c.exists()), candidates[0])
        caps = captions.get(im["id"], [])
        meta = {"task": "coco_captions", "image_id": im["id"], "references": caps}
        rec = Record(id=rid, prompt=ctx.cfg.caption_prompt, image=str(path.absolute()),
                     reference=caps[0] if caps else None, meta=meta)
        out.append(Entry(where, record=rec))
    return out


MAPPERS: dict[str, Callable[[Row, Context], Record]] = {
    "jsonl": map_jsonl, "aokvqa": map_aokvqa, "llava": map_llava, "text": map_text,
}


# ------------------------------------------------------------------------------------- detection


def detect_format(table: Table, columns: dict[str, str] | None = None) -> tuple[str, str]:
    """(format, why) from what the source holds (data.columns set means hf); raises naming the keys seen."""
    if columns:
        return "hf", "data.columns is set"
    if table.kind == "text":
        return "text", "a plain text file: one prompt per line"
    if isinstance(table.doc, dict) and "images" in table.doc and "annotations" in table.doc:
        return "coco_captions", "a JSON object with 'images' and 'annotations'"
    if not table.rows:
        raise VlrlcdError(f"{table.source}: holds no records; a data file needs at least one")
    first = next((r.data for r in table.rows if r.data), None)
    if first is None:
        raise VlrlcdError(f"{table.source}: no readable records to detect the format from; set data.format")
    keys = set(first)
    if "conversations" in keys or "messages" in keys:
        return "llava", "records with 'conversations' / 'messages'"
    if "correct_choice_idx" in keys or {"choices", "rationales"} <= keys:
        return "aokvqa", "records with 'choices' and 'correct_choice_idx' / 'rationales'"
    if table.kind in ("jsonl", "json") and {"id", "prompt"} <= keys:
        return "jsonl", "records with 'id' and 'prompt'"
    if any(a in keys for a in ALIASES["prompt"]) or table.kind in ("hf_dir", "parquet", "hub"):
        return "hf", f"a table with columns {', '.join(sorted(keys))}"
    raise VlrlcdError(
        f"{table.source}: cannot tell the format from the keys {', '.join(sorted(keys))}; "
        "set data.format to one of jsonl, hf, aokvqa, coco_captions, llava, text, "
        "or name the prompt column with data.columns.prompt=<column>"
    )


def _contained(e: Entry, ctx: Context) -> Entry:
    """The entry, or a problem when its record's image lies outside the folders it may be read from."""
    r = e.record
    reason = ctx.outside(r.image) if r is not None and isinstance(r.image, str) else None
    if reason is None:
        return e
    return Entry(e.where, problem=Problem(e.where, reason, r.id if isinstance(r.id, str) else None, "image"))


def to_entries(table: Table, fmt: str, ctx: Context) -> list[Entry]:
    """Map every row; a row that cannot be mapped, or whose image is outside the allowed folders
    (`Context.outside`), becomes an Entry with a Problem naming it."""
    if fmt == "coco_captions":
        if not isinstance(table.doc, dict):
            raise VlrlcdError(f"{table.source}: data.format=coco_captions needs a JSON object with images and annotations")
        return [_contained(e, ctx) for e in coco_entries(table, ctx)]
    if not table.rows:   # an empty source: no records (load and `data check` say what that means)
        return []
    mapper = make_hf_mapper(table, ctx) if fmt == "hf" else MAPPERS[fmt]
    out = []
    for row in table.rows:
        if row.error is not None:
            out.append(Entry(row.where, problem=Problem(row.where, row.error)))
            continue
        try:
            out.append(_contained(Entry(row.where, record=mapper(row, ctx)), ctx))
        except RowError as e:
            rid = e.id if isinstance(e.id, (str, int)) else None
            out.append(Entry(row.where, problem=Problem(row.where, e.reason, None if rid is None else str(rid), e.field)))
    return out
