"""Peak resident memory of one LDL-GRPO step for a ~100M-parameter text student, fp32 + LoRA vs 4-bit + LoRA.

Each setting runs in its own process (`python -m bench.memory MODEL_DIR --quantization 4bit`), so one
cannot inherit the other's allocations. The process loads the student, frees what loading left behind,
resets the kernel's peak-RSS mark (/proc/self/clear_refs, "5"), runs warm-up + measured RL steps and reads
the peak back (VmHWM): the memory the RL step itself needs, weights included, loading spikes excluded.
The peak while loading is reported beside it, and the RSS of the imported
runtime (torch, transformers, peft: about 1 GB, mostly shared libraries) before the student is loaded, so
the part the student and its step add can be read off. The checkpoint is stored in bf16 so that both
settings convert it on load into their own memory: a checkpoint already in the compute dtype would be
memory-mapped and counted in RSS only as far as its pages happen to have been touched.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.models import Workload, prompts


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


# glibc raises its mmap threshold to the largest freed block (up to 32 MB), after which bitsandbytes' per-call
# fp32 dequantisation buffers on CPU (one full weight matrix per 4-bit linear, forward and backward) are
# carved from the heap and kept there; a fixed threshold hands every such buffer back to the kernel.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "1048576"}


def settings() -> dict[str, tuple[str, dict]]:
    """Memory settings measured: name -> (quantization, extra environment)."""
    return {"fp32": ("none", {}), "4bit": ("4bit", {}),
            "fp32_fixed_mmap": ("none", FIXED_MMAP_THRESHOLD), "4bit_fixed_mmap": ("4bit", FIXED_MMAP_THRESHOLD)}


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(model_dir: str, quantization: str, k: int, batch: int, max_new_tokens: int, steps: int) -> dict:
    """Run in this process: load, reset the peak, `steps` RL steps; peak RSS in MB."""
    import peft  # noqa: F401  (imported before the baseline: the runtime is not the model)
    import transformers  # noqa: F401

    from bench.step_time import OursStep, RowSpec

    _release()
    baseline = _status_kb("VmRSS")
    w = Workload("text", Path(model_dir), prompts("text", batch, Path(model_dir), 0))
    spec = RowSpec("text", k, batch=batch, max_new_tokens=max_new_tokens, warmup=0, reps=steps)
    t0 = time.perf_counter()
    step = OursStep(w, spec, quantization=quantization)
    load_s = time.perf_counter() - t0
    model = step.student.model
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in step.params)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    load_peak = _status_kb("VmHWM")   # VmHWM starts at exec; ru_maxrss would carry the parent's peak over
    _release()
    after_load = _status_kb("VmRSS")
    resettable = reset_peak()
    seconds = [step() for _ in range(steps)]
    step_peak = _status_kb("VmHWM") if resettable else None
    return {
        "quantization": quantization, "params": params, "trainable_params": trainable,
        "weight_mb": round(weight_bytes / 2**20, 1), "rss_runtime_mb": round(baseline / 1024, 1),
        "rss_after_load_mb": round(after_load / 1024, 1),
        "step_peak_rss_mb": round(step_peak / 1024, 1) if step_peak else None,
        "step_peak_above_runtime_mb": round((step_peak - baseline) / 1024, 1) if step_peak else None,
        "load_peak_rss_mb": round(load_peak / 1024, 1),
        "load_s": round(load_s, 2), "step_s": [round(s, 3) for s in seconds], "threads": torch.get_num_threads(),
    }


def run_isolated(model_dir: str | Path, quantization: str, k: int = 4, batch: int = 2, max_new_tokens: int = 16,
                 steps: int = 1, threads: int = 1, timeout: float = 600, env: dict | None = None) -> dict:
    """`measure` in a fresh Python process (extra environment `env`); returns its JSON line (raises with its
    stderr if it failed)."""
    cmd = [sys.executable, "-m", "bench.memory", str(model_dir), "--quantization", quantization, "--k", str(k),
           "--batch", str(batch), "--max-new-tokens", str(max_new_tokens), "--steps", str(steps),
           "--threads", str(threads)]
    full_env = {**os.environ, **(env or {}),
                "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                               os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory bench ({quantization}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("--quantization", choices=["none", "4bit", "8bit"], default="none")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(json.dumps(measure(a.model_dir, a.quantization, a.k, a.batch, a.max_new_tokens, a.steps)), flush=True)


if __name__ == "__main__":
    main()
