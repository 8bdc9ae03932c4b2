"""`vlrlcd plan CONFIG`: where the accelerator's memory goes in one RL step, before anything is loaded.

The student's architecture comes from its config.json (a local directory, or the Hugging Face cache; never a
download), or, for a hub id that is not on disk, from `PUBLISHED` (the architectures of the README recipes'
students). Parameters are counted exactly on a meta-device model built from that config (no weights are
read). Activations follow this code's step (training/rl.py); what each pass keeps is described in
vlrlcd/planning/step.py. What a method rolls out and which passes it runs come from the method registry
(vlrlcd/methods/).

All figures are estimates: within ±20% of the measured peak of live tensor bytes on the tiny students
(tests/test_plan.py); `bench/gpu_check.py` compares them with `torch.cuda.max_memory_allocated` on a GPU.
The code lives in vlrlcd/planning/; this module is its public face.
"""

from __future__ import annotations

from vlrlcd.planning.arch import DEFAULT_IMAGE, Arch, Params, read_config, student_arch
from vlrlcd.planning.model import (CUDA_OVERHEAD, DEFAULT_PROMPT_TOKENS, SCORING_EXTRA_TOKENS, GiB, Item, Plan,
                                   Settings, Shapes)
from vlrlcd.planning.published import LM_LINEARS, PUBLISHED
from vlrlcd.planning.report import format_plan, largest, parse_size, plan_config, plan_json
from vlrlcd.planning.step import nograd_full, plan_step

__all__ = ["CUDA_OVERHEAD", "DEFAULT_IMAGE", "DEFAULT_PROMPT_TOKENS", "GiB", "LM_LINEARS", "PUBLISHED",
           "SCORING_EXTRA_TOKENS", "Arch", "Item", "Params", "Plan", "Settings", "Shapes", "format_plan", "largest",
           "nograd_full", "parse_size", "plan_config", "plan_json", "plan_step", "read_config", "student_arch"]
