"""Wall time of each phase of the real `rl_step` (no profiler overhead): sampling, the batched policy and
reference passes, backward and the optimizer step, the rest by difference; median over steps after a warm-up.

    python -m bench.phases [text|llava|qwen2_vl] [--k 4] [--batch 4] [--max-new-tokens 16] [--steps 5]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time

PHASES = (("vlrlcd.adapters.base", "StudentAdapter.sample_batch", "sample"),
          ("vlrlcd.training.steps", "batched_passes", "policy+reference passes"),
          ("torch", "Tensor.backward", "backward"),
          ("vlrlcd.training.common", "finish_step", "optimizer"))


def _wrap(acc: dict, module: str, attr: str, label: str) -> None:
    """Replace module.attr (a function or Class.method) by a timed version adding its seconds to acc[label]."""
    import importlib

    owner = importlib.import_module(module)
    *path, name = attr.split(".")
    for p in path:
        owner = getattr(owner, p)
    f = getattr(owner, name)

    @functools.wraps(f)
    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            acc[label] = acc.get(label, 0.0) + time.perf_counter() - t0

    setattr(owner, name, timed)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.phases", description=__doc__.splitlines()[0])
    p.add_argument("arch", nargs="?", default="text", choices=("text", "llava", "qwen2_vl"))
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args(argv)
    import torch

    from bench.models import build
    from bench.step_time import OursStep, RowSpec

    torch.set_num_threads(1)
    acc: dict[str, float] = {}
    for module, attr, label in PHASES:
        _wrap(acc, module, attr, label)
    w = build(a.arch, tempfile.mkdtemp(prefix="vlrlcd-phases-"), a.batch)
    step = OursStep(w, RowSpec(a.arch, a.k, batch=a.batch, max_new_tokens=a.max_new_tokens, warmup=1, reps=a.steps))
    rows = []
    for i in range(a.steps + 1):
        acc.clear()
        total = step()
        if i:  # the first step is a warm-up
            rows.append({"step": total, **acc, "rest": total - sum(acc.values())})
    med = {k: round(statistics.median(r.get(k, 0.0) for r in rows), 4) for k in rows[0]}
    print(f"{a.arch} K={a.k} B={a.batch} T={a.max_new_tokens}: " + ", ".join(f"{k} {v:.3f}s" for k, v in med.items()),
          file=sys.stdout, flush=True)
    return med


if __name__ == "__main__":
    main()
