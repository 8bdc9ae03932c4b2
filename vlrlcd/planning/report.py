"""What fits a card (the largest K / batch), the plan of a loaded config, and the plan as a table or JSON."""

from __future__ import annotations

import json
import re
from dataclasses import replace

from vlrlcd.errors import VlrlcdError
from vlrlcd.planning.arch import DEFAULT_IMAGE, Arch, student_arch
from vlrlcd.planning.model import CUDA_OVERHEAD, GiB, Plan, Settings, Shapes
from vlrlcd.planning.step import plan_step


# ------------------------------------------------------------------ what fits
def largest(arch: Arch, s: Settings, shapes: Shapes, budget: int, key: str, limit: int = 512) -> int:
    """The largest `key` (k or batch) whose step fits `budget` bytes (with CUDA overhead); 0 if none."""
    best = 0
    for v in range(1, limit + 1):
        if plan_step(arch, replace(s, **{key: v}), shapes).total > budget:
            break
        best = v
    return best


def parse_size(text: str) -> int:
    """'24GB', '24GiB', '80G', '512MB' -> bytes (GB read as GiB, as GPU cards are sold)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([GMT]i?B?|)\s*", text, flags=re.I)
    if not m:
        raise VlrlcdError(f"--gpu-memory '{text}': give a size such as 24GB, 80GB or 12.5GiB")
    unit = (m.group(2) or "G").upper()[0]
    return int(float(m.group(1)) * {"M": 2**20, "G": 2**30, "T": 2**40}[unit])


def plan_config(cfg, shapes: Shapes | None = None, image_size=DEFAULT_IMAGE, image_tokens: int | None = None):
    """(Plan of this code's step, Plan of the peers' layout) for a loaded root config."""
    arch = student_arch(cfg.student, image_size, image_tokens)
    shapes = shapes or Shapes(response_tokens=cfg.student.max_new_tokens)
    s = Settings.from_config(cfg)
    return plan_step(arch, s, shapes), plan_step(arch, replace(s, layout="peers"), shapes)


# ------------------------------------------------------------------ the printed plan
def _fits(n: int, limit: int = 512) -> str:
    return "none" if n == 0 else f"{n}+" if n >= limit else str(n)


def _gb(b: float) -> str:
    return f"{b / GiB:.2f}"


def format_plan(plan: Plan, peers: Plan, budget: int) -> str:
    """The plan as a table: line items, the peak phase against `budget`, what fits, the peers' layout."""
    a, s = plan.arch, plan.settings
    lines = [f"student {a.name} ({a.family}); architecture from {a.source}",
             f"{s.quantization if s.quantization != 'none' else s.compute_dtype} base, LoRA {a.params.lora / 1e6:.1f}M "
             f"params; batch {s.batch}, K {s.k}, {plan.shapes.response_tokens} new tokens, prompt "
             f"{plan.shapes.prompt_tokens} text + {a.image_tokens if plan.shapes.images else 0} image tokens; "
             f"group_chunk {s.group_chunk or 'all'}; gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}",
             "", "| where | GiB | phase | note |", "|---|---|---|---|"]
    lines += [f"| {i.name} | {_gb(i.bytes)} | {i.phase} | {i.note} |" for i in plan.items]
    lines += ["", "| phase | peak tensor GiB |", "|---|---|"]
    lines += [f"| {k}{' (peak)' if k == plan.peak_phase else ''} | {_gb(v)} |" for k, v in plan.phases.items()]
    fits = "fits" if plan.total <= budget else "does NOT fit"
    lines += ["", f"peak {_gb(plan.peak)} GiB of tensors ({plan.peak_phase}) + ~{_gb(CUDA_OVERHEAD)} GiB CUDA context "
              f"and allocator slack = {_gb(plan.total)} GiB against {_gb(budget)} GiB: {fits}"]
    k_max = largest(a, s, plan.shapes, budget, "k")
    b_max = largest(a, s, plan.shapes, budget, "batch")
    lines.append(f"largest K at batch {s.batch}: {_fits(k_max)}; largest batch at K {s.k}: {_fits(b_max)}")
    if s.group_chunk != 1 and plan.total > budget:
        one = replace(s, group_chunk=1)
        lines.append(f"with train.group_chunk=1: {_gb(plan_step(a, one, plan.shapes).total)} GiB; largest K "
                     f"{_fits(largest(a, one, plan.shapes, budget, 'k'))}")
    lines.append(f"the same step in the peers' layout (vision tower and prompt once per completion): "
                 f"{_gb(peers.total)} GiB ({peers.peak_phase}), {peers.total / max(plan.total, 1):.1f}x; largest K "
                 f"{_fits(largest(a, replace(s, layout='peers'), plan.shapes, budget, 'k'))}")
    lines += [f"note: {n}" for n in plan.notes]
    lines.append("estimates (see README, Memory plan); prompt lengths assumed, every candidate at the token limit")
    return "\n".join(lines)


def plan_json(plan: Plan, peers: Plan, budget: int) -> str:
    a, s = plan.arch, plan.settings
    return json.dumps({**plan.to_json(), "gpu_memory_bytes": budget, "fits": plan.total <= budget,
                       "largest_k": largest(a, s, plan.shapes, budget, "k"),
                       "largest_batch": largest(a, s, plan.shapes, budget, "batch"),
                       "peers": {"peak_bytes": peers.peak, "total_bytes": peers.total, "peak_phase": peers.peak_phase,
                                 "phases": peers.phases}}, indent=2)
