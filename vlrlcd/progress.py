"""Progress bars from one factory, so that stage-II methods trained side by side (`vlrlcd/stage_pool.py`) each
keep a terminal line of their own, labelled with the method."""

from __future__ import annotations

from tqdm import tqdm

_line: int | None = None   # this process's bar line (a stage-II worker); None: tqdm's own placement
_label = ""


def set_line(line: int, label: str) -> None:
    """Put this process's bars on terminal line `line`, their descriptions prefixed with `label`."""
    global _line, _label
    _line, _label = line, label


def bar(*args, desc: str = "", **kwargs) -> tqdm:
    """`tqdm(*args, desc=desc, **kwargs)`, on this process's line when one is set."""
    if _line is not None:
        kwargs.setdefault("position", _line)
        desc = f"{_label} {desc}".strip() if _label and _label != desc else desc
    return tqdm(*args, desc=desc, **kwargs)
