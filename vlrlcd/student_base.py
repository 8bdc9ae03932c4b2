"""The student's base weights: a tiny student (tiny-llava, tiny-text) is built by a run into
RUN/student_base-<name>/ (`build_student_base`, the named step before stage I); a real checkpoint is
loaded as named. Stages and `vlrlcd eval` read the built base through `built_student_config`."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from vlrlcd.adapters.config import StudentConfig
from vlrlcd.config import Config
from vlrlcd.errors import VlrlcdError

if TYPE_CHECKING:
    from vlrlcd.pipeline import Prepared

TINY_STUDENTS = ("tiny-llava", "tiny-text")
BASE_RECORD = "vlrlcd_base.json"  # RUN/student_base-*/: what a tiny base was built from


def built_student_config(cfg: Config) -> StudentConfig:
    """The student section with a tiny student's name replaced by the base a run built into RUN (as is for
    real checkpoints); an error when that base has not been built yet."""
    scfg = cfg.student
    if scfg.name_or_path not in TINY_STUDENTS:
        return scfg
    base = _tiny_base(cfg)
    if not (base / "config.json").exists():
        raise VlrlcdError(f"{base}: the {scfg.name_or_path} student is built by a run: `vlrlcd train CONFIG` first")
    return replace(scfg, name_or_path=str(base))


def _tiny_base(cfg: Config) -> Path:
    return Path(cfg.run_dir) / f"student_base-{cfg.student.name_or_path}"


def build_student_base(prep: "Prepared", rebuild_stale: bool = False) -> StudentConfig:
    """Build a tiny student's base (once) into the run directory: a tokenizer and random weights from the
    run's corpus, pretrained on generic examples; returns the student section pointing at it (real
    checkpoints: the section as is).

    The base records what it was built from (BASE_RECORD); with `rebuild_stale` (no stage on it is being
    continued) a base built from other settings or data is built again. A base without a record is kept."""
    scfg = prep.cfg.student
    if scfg.name_or_path not in TINY_STUDENTS:
        return scfg
    from vlrlcd.training.digest import digest_of

    base = _tiny_base(prep.cfg)
    inputs = _base_inputs(prep)
    if (base / "config.json").exists() and rebuild_stale and _base_digest(base) not in (None, digest_of(inputs)):
        stale = base.with_name(f"{base.name}.stale-{os.getpid()}")
        base.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
        if prep.progress:
            print(f"{base.name}: built from other settings or data; building it again", flush=True)
    if not (base / "config.json").exists():
        from vlrlcd.training.pretrain import pretraining_records

        t = scfg.tiny
        tmp = base.with_name(base.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        vision = scfg.name_or_path == "tiny-llava"
        generic = pretraining_records(vision, t.pretrain_examples, prep.cfg.seed, tmp / "pretrain_images",
                                      t.image_size, t.pretrain_sides) if t.pretrain_examples else []
        corpus = [r.prompt for r in prep.train + prep.eval + generic] + list(prep.anchors.values())
        corpus += [r.reference for r in prep.train + prep.eval + generic if r.reference]
        pretrained_tiny(tmp, vision, corpus, generic, t, prep.cfg.seed, prep.progress)
        (tmp / BASE_RECORD).write_text(json.dumps({"digest": digest_of(inputs), "inputs": inputs}, indent=1),
                                       encoding="utf-8")
        tmp.rename(base)
    return replace(scfg, name_or_path=str(base))


def pretrained_tiny(out: Path, vision: bool, corpus: list[str], generic: list, tiny, seed: int,
                    progress: bool = True) -> Path:
    """Build a tiny base at `out` (tokenizer from `corpus`, random weights), then pretrain it on the `generic`
    records: the vision tower's stage (tiny-llava, tower_pretrain_epochs), then every weight (pretrain_epochs)."""
    from vlrlcd.adapters.tiny import build_tiny_llava, build_tiny_text
    from vlrlcd.training.pretrain import pretrain_base, pretrain_tower

    path = (build_tiny_llava if vision else build_tiny_text)(out, corpus, tiny, seed=seed)
    if generic and vision and tiny.tower_pretrain_epochs:
        pretrain_tower(path, generic, tiny.tower_pretrain_epochs, tiny.pretrain_lr, seed, progress=progress)
    if generic and tiny.pretrain_epochs:
        pretrain_base(path, generic, tiny.pretrain_epochs, tiny.pretrain_lr, seed, progress=progress)
    return path


def _base_inputs(prep: "Prepared") -> dict:
    """What a tiny base is built from: its sizes, the seed, and the corpus (both splits and the anchors)."""
    from vlrlcd.training.digest import anchors_digest, flatten, omit_added_off, records_digest

    cfg, run = prep.cfg, prep.cfg.run_dir
    return {"seed": cfg.seed, "student.name_or_path": cfg.student.name_or_path, **omit_added_off(flatten(cfg.student.tiny, "student.tiny")),
            "data.train_records": records_digest(prep.train, run), "data.eval_records": records_digest(prep.eval, run),
            "anchors": anchors_digest(prep.anchors)}


def _base_digest(base: Path) -> str | None:
    try:
        return json.loads((base / BASE_RECORD).read_text(encoding="utf-8")).get("digest")
    except (OSError, ValueError, AttributeError):
        return None


def student_identity(cfg: Config) -> str:
    """Which base weights the student loads: a tiny base's build record (or its files), a local directory's
    config.json with its weight files' names and sizes, or a hub id as written."""
    from vlrlcd.training.digest import files_digest

    name = cfg.student.name_or_path
    folder = _tiny_base(cfg) if name in TINY_STUDENTS else Path(name)
    if name in TINY_STUDENTS and _base_digest(folder):
        return f"tiny-{_base_digest(folder)}"
    if folder.is_dir():
        return files_digest(folder, ("config.json",), sized=(".safetensors", ".bin", ".pt"))
    return "not built yet" if name in TINY_STUDENTS else name
