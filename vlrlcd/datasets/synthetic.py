"""Synthetic tasks with verifiable answers: shapes VQA, shapes captions, text arithmetic.

Every record i is drawn from its own generator seeded with the string "task|seed|split|i|attempt",
so output is byte-identical for the same arguments, a longer run extends a shorter one, and train
and held-out splits (different `split` names) come from different seed streams.

Scenes: up to four objects, one per cell of a 2x2 grid (jittered inside the cell), each a different
colour, on a black background; at 32x32 an object is about 11 pixels across (a bit more than one
8x8 patch). Position answers follow the grid column, so "left"/"right" is never ambiguous.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterable

from PIL import Image, ImageDraw

from vlrlcd.datasets.records import Record
from vlrlcd.errors import VlrlcdError

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (30, 190, 50),
    "blue": (40, 80, 240),
    "yellow": (245, 215, 20),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (0, 0, 0)
QTYPES = ("color", "shape", "count", "position")
OPS = ("+", "-", "*")
MAX_ATTEMPTS = 50   # redraws of one record before a clash with `exclude` is accepted
CAPTION_PROMPT = "Describe the image."


def _rng(task: str, seed: int, split: str, i: int, attempt: int) -> random.Random:
    return random.Random(f"{task}|{seed}|{split}|{i}|{attempt}")


def _record_id(task: str, seed: int, split: str, i: int) -> str:
    return f"{task}-s{seed}-{split}-{i:05d}"


def record_key(r: Record) -> str:
    """What makes two records the same example: the prompt plus the drawn scene (if any)."""
    return r.prompt + "\x00" + json.dumps(r.meta.get("objects"), sort_keys=True)


def _check_sizes(n: int, image_size: int | None = None, max_objects: int | None = None) -> None:
    if n < 0:
        raise VlrlcdError(f"number of records must be >= 0, got {n}")
    if image_size is not None and image_size < 16:
        raise VlrlcdError(f"data.image_size must be >= 16 so shapes stay visible, got {image_size}")
    if max_objects is not None and not 1 <= max_objects <= 4:
        raise VlrlcdError(f"data.max_objects must be between 1 and 4 (one per grid cell), got {max_objects}")


# ----------------------------------------------------------------------------------------- scenes


def sample_scene(rng: random.Random, image_size: int, max_objects: int) -> list[dict]:
    """1..max_objects objects in distinct grid cells with distinct colours, in reading order."""
    n = rng.randint(1, max_objects)
    cells = sorted(rng.sample(range(4), n))
    colors = rng.sample(list(COLORS), n)
    cell = image_size / 2
    size = max(5, int(round(0.65 * cell)) | 1)          # odd, so the shape has a centre pixel
    jitter = max(0, int((cell - size - 1) // 2))       # keeps every shape inside its cell
    objects = []
    for c, color in zip(cells, colors):
        row, col = divmod(c, 2)
        x = int(col * cell + cell / 2) + rng.randint(-jitter, jitter)
        y = int(row * cell + cell / 2) + rng.randint(-jitter, jitter)
        objects.append({"shape": rng.choice(SHAPES), "color": color, "x": x, "y": y, "size": size})
    return objects


def draw_scene(objects: list[dict], image_size: int) -> Image.Image:
    """Render objects (centre x, y; odd size) on the plain background, no anti-aliasing."""
    im = Image.new("RGB", (image_size, image_size), BACKGROUND)
    d = ImageDraw.Draw(im)
    for o in objects:
        x, y, r, fill = o["x"], o["y"], o["size"] // 2, COLORS[o["color"]]
        if o["shape"] == "circle":
            d.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif o["shape"] == "square":
            q = max(2, int(round(r * 0.85)))
            d.rectangle([x - q, y - q, x + q, y + q], fill=fill)
        else:
            d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    return im


def side(o: dict, image_size: int) -> str:
    return "left" if o["x"] < image_size / 2 else "right"


def _question(rng: random.Random, qtype: str, objects: list[dict], image_size: int) -> tuple[str, str, list[str]] | None:
    """(prompt, answer, distractors) for one question type, or None if the scene cannot ask it."""
    if qtype == "color":
        shapes = [o["shape"] for o in objects]
        unique = [o for o in objects if shapes.count(o["shape"]) == 1]
        if not unique:
            return None
        o = rng.choice(unique)
        noun = "shape" if len(objects) == 1 else o["shape"]
        return f"What color is the {noun}?", o["color"], [c for c in COLORS if c != o["color"]]
    if qtype == "shape":
        o = rng.choice(objects)
        return f"What shape is the {o['color']} object?", o["shape"], [s for s in SHAPES if s != o["shape"]]
    if qtype == "count":
        n = len(objects)
        return "How many shapes are there?", str(n), [str(k) for k in range(1, 5) if k != n]
    if qtype == "position":
        o = rng.choice(objects)
        ans = side(o, image_size)
        return f"Is the {o['color']} shape on the left or the right?", ans, ["right" if ans == "left" else "left"]
    raise VlrlcdError(f"unknown question type '{qtype}'; choose from {', '.join(QTYPES)}")


def _save_png(im: Image.Image, out_dir: Path, rid: str) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{rid}.png"
    im.save(path, format="PNG")
    return str(path)


def _draw_unique(make, task: str, seed: int, split: str, i: int, exclude: set[str] | None):
    """Call make(rng) until it gives a record (not None) whose key is not excluded (bounded retries)."""
    last = None
    for attempt in range(MAX_ATTEMPTS * 4):
        out = make(_rng(task, seed, split, i, attempt))
        if out is None:
            continue
        last = out
        if not exclude or record_key(out[0]) not in exclude or attempt >= MAX_ATTEMPTS:
            return out
    if last is None:
        raise VlrlcdError(f"{task}: could not draw record {i} (question types incompatible with max_objects?)")
    return last


# --------------------------------------------------------------------------------- generators


def shapes_vqa(
    n: int,
    seed: int,
    out_dir: Path,
    image_size: int = 32,
    *,
    qtypes: Iterable[str] = QTYPES,
    max_objects: int = 3,
    split: str = "train",
    exclude: set[str] | None = None,
) -> list[Record]:
    """n questions about colour / shape / count / position of drawn shapes; PNGs written to out_dir.

    Question types cycle through `qtypes` (record i gets qtypes[i % len]); `exclude` holds
    `record_key`s (e.g. of the training split) to redraw away from.
    """
    qtypes = tuple(qtypes)
    _check_sizes(n, image_size, max_objects)
    if not qtypes:
        raise VlrlcdError("data.qtypes is empty; choose some of " + ", ".join(QTYPES))
    for q in qtypes:
        if q not in QTYPES:
            raise VlrlcdError(f"unknown question type '{q}' in data.qtypes; choose from {', '.join(QTYPES)}")
    out_dir = Path(out_dir)
    records = []
    for i in range(n):
        qtype = qtypes[i % len(qtypes)]
        rid = _record_id("shapes_vqa", seed, split, i)

        def make(rng: random.Random):
            objects = sample_scene(rng, image_size, max_objects)
            q = _question(rng, qtype, objects, image_size)
            if q is None:
                return None
            prompt, answer, distractors = q
            meta = {"task": "shapes_vqa", "qtype": qtype, "distractors": distractors, "objects": objects}
            return Record(id=rid, prompt=prompt, reference=answer, meta=meta), objects

        rec, objects = _draw_unique(make, "shapes_vqa", seed, split, i, exclude)
        rec.image = _save_png(draw_scene(objects, image_size), out_dir, rid)
        records.append(rec)
    return records


def caption_of(objects: list[dict], image_size: int | None = None) -> str:
    """'a red circle', 'a red circle and a blue square', 'a, b and c' (objects in reading order); with
    `image_size`, each object's side as well: 'a red circle on the left and a blue square on the right'."""
    parts = [f"a {o['color']} {o['shape']}" + (f" on the {side(o, image_size)}" if image_size else "") for o in objects]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def shapes_caption(
    n: int,
    seed: int,
    out_dir: Path,
    image_size: int = 32,
    *,
    max_objects: int = 3,
    split: str = "train",
    exclude: set[str] | None = None,
    sides: bool = False,
) -> list[Record]:
    """n 'Describe the image.' prompts; reference names every object with its colour, reading order (and,
    with `sides`, whether it is on the left or the right: pretraining captions only, see training/pretrain.py).

    Distractors are the same caption with every colour replaced (cyclic shift of the palette).
    """
    at = image_size if sides else None
    _check_sizes(n, image_size, max_objects)
    out_dir = Path(out_dir)
    palette = list(COLORS)
    records = []
    for i in range(n):
        rid = _record_id("shapes_caption", seed, split, i)

        def make(rng: random.Random):
            objects = sample_scene(rng, image_size, max_objects)
            wrong = [
                caption_of([{**o, "color": palette[(palette.index(o["color"]) + k) % 4]} for o in objects], at)
                for k in (1, 2, 3)
            ]
            meta = {"task": "shapes_caption", "distractors": wrong, "objects": objects}
            return Record(id=rid, prompt=CAPTION_PROMPT, reference=caption_of(objects, at), meta=meta), objects

        rec, objects = _draw_unique(make, "shapes_caption", seed, split, i, exclude)
        rec.image = _save_png(draw_scene(objects, image_size), out_dir, rid)
        records.append(rec)
    return records


def arithmetic(
    n: int,
    seed: int,
    *,
    ops: Iterable[str] = ("+", "-"),
    max_operand: int = 20,
    split: str = "train",
    exclude: set[str] | None = None,
) -> list[Record]:
    """n prompts 'What is a op b?' with 0 <= a, b <= max_operand; '-' keeps the result >= 0."""
    ops = tuple(ops)
    _check_sizes(n)
    if not ops or any(o not in OPS for o in ops):
        raise VlrlcdError(f"data.ops must be a non-empty list of {', '.join(OPS)}, got {list(ops)}")
    if max_operand < 1:
        raise VlrlcdError(f"data.max_operand must be >= 1, got {max_operand}")
    records = []
    for i in range(n):
        rid = _record_id("arithmetic", seed, split, i)

        def make(rng: random.Random):
            op = rng.choice(ops)
            a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
            if op == "-" and b > a:
                a, b = b, a
            value = a + b if op == "+" else a - b if op == "-" else a * b
            near = [value + d for d in rng.sample([-2, -1, 1, 2, 10], 5) if value + d >= 0]
            meta = {"task": "arithmetic", "qtype": op, "distractors": [str(v) for v in near[:3]]}
            return Record(id=rid, prompt=f"What is {a} {op} {b}?", reference=str(value), meta=meta), None

        records.append(_draw_unique(make, "arithmetic", seed, split, i, exclude)[0])
    return records
