"""One anchor fill per store at a time: an exclusive `flock` on `<store>.lock`, held for the whole fill.

A second `vlrlcd anchors` (or `vlrlcd train`) on the same store says so and waits, then finds the
answers stored and pays for nothing. The kernel drops the lock when its holder exits, SIGKILL included.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from vlrlcd.errors import VlrlcdError


def lock_path(store_path: str | Path) -> Path:
    p = Path(store_path)
    return p.with_name(p.name + ".lock")


def _holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


@contextmanager
def fill_lock(store_path: str | Path, poll_s: float = 0.2) -> Iterator[None]:
    """Hold the fill lock of `store_path`, waiting (and saying so once, on stderr) while another holds it."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): one fill at a time is then the user's to keep
        yield
        return
    path = lock_path(store_path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise VlrlcdError(f"anchor store lock {path}: cannot open ({e.strerror or e}); check the directory") from None
    try:
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    print(f"another anchor fill is running on {store_path}{_holder(fd)}; waiting for it to finish "
                          "(Ctrl-C to stop)", file=sys.stderr, flush=True)
                    told = True
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
