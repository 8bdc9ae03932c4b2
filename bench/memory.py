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

`LiveTensorPeak` measures what an accelerator would have to hold instead of what the process holds: the peak
of live tensor bytes during a block (the figure `vlrlcd plan` predicts and `torch.cuda.max_memory_allocated`
reports on a GPU), on any device, CPU included.
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
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bench.models import Workload, prompts


class LiveTensorPeak(TorchDispatchMode):
    """The peak of live tensor bytes during the `with` block, counted by storage (a view costs nothing).

    A TorchDispatchMode sees every tensor an aten op returns, forward and backward (the autograd engine runs
    below it); each new untyped storage is added with its size and a weakref callback on that storage takes
    it off again when it is freed (the method of torch.distributed._tools.mem_tracker). Storages that exist
    before the block are counted by passing the tensors that own them (`resident`: the model's parameters and
    buffers, the optimizer's state). Not seen: a kernel's internal scratch buffers, tensors made from Python or
    NumPy data without an aten op (the image processor's pixel arrays, a few index lists; small here).
    `peak_live` keeps (bytes, op, shape, dtype) of every storage live at the peak, largest first."""

    def __init__(self, resident=(), keep_snapshot: bool = False):
        super().__init__()
        self._refs: dict[int, tuple] = {}
        self.current = 0
        self.resident = 0
        self.peak = 0
        self.keep_snapshot = keep_snapshot
        self.peak_live: list[tuple[int, str, tuple, str]] = []
        self._snap_at = 0
        self._op = "resident"
        for t in resident:
            if isinstance(t, torch.Tensor):
                self._add(t)
        self.resident = self.peak = self.current

    def _add(self, t: torch.Tensor) -> None:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse / meta / tensor subclasses without one
            return
        key = id(st)
        if key in self._refs or st.device.type == "meta":
            return
        nbytes = st.nbytes()

        def freed(_ref, key=key, nbytes=nbytes):
            if self._refs.pop(key, None) is not None:
                self.current -= nbytes

        self._refs[key] = (weakref.ref(st, freed), nbytes, self._op, tuple(t.shape), str(t.dtype))
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current
            if self.keep_snapshot and self.peak > self._snap_at * 1.01:
                self._snap_at = self.peak
                self.peak_live = sorted(((v[1], v[2], v[3], v[4]) for v in self._refs.values()), reverse=True)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._op = str(func.overloadpacket.__name__)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out


def resident_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer | None = None) -> list[torch.Tensor]:
    """The tensors that hold a model's (and an optimizer's) memory before a step: parameters, gradients,
    buffers, and the optimizer's state; bitsandbytes' 4-bit quantisation constants as well."""
    out: list[torch.Tensor] = []
    for p in model.parameters():
        out.append(p)
        if p.grad is not None:
            out.append(p.grad)
        state = getattr(p, "quant_state", None)
        if state is not None:
            out += [v for v in vars(state).values() if isinstance(v, torch.Tensor)]
            inner = getattr(state, "state2", None)
            if inner is not None:
                out += [v for v in vars(inner).values() if isinstance(v, torch.Tensor)]
        cb = getattr(p, "SCB", None)
        if isinstance(cb, torch.Tensor):
            out.append(cb)
    out += list(model.buffers())
    if opt is not None:
        out += [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return out


def rl_steps_peak(student, records, anchors, cfg, max_new_tokens: int, out_dir, rcfg=None) -> tuple[int, list[dict]]:
    """Peak live tensor bytes (weights included) while `train_rl` runs `cfg.rl_steps` real steps (use 2: from
    the second on, AdamW's state exists, as in every later step), and its rows."""
    from vlrlcd.ranking.config import RankingConfig
    from vlrlcd.training.rl import train_rl

    gc.collect()
    with LiveTensorPeak(resident_tensors(student.model)) as tracker:
        rows = train_rl(student, records, anchors, cfg, rcfg or RankingConfig(), max_new_tokens=max_new_tokens,
                        out_dir=out_dir, progress=False)
    return tracker.peak, rows


def plan_for_run(student, scfg, records, anchors, cfg, max_new_tokens: int, device: str):
    """`vlrlcd.plan`'s plan for exactly this run: the student's saved config, the records' longest prompt
    (text and image tokens, as the loop pads them) and anchor, the run's K, batch, passes and dtypes."""
    from vlrlcd.plan import Settings, Shapes, plan_step, student_arch

    prefixes = [student.prefix(r.prompt, r.image) for r in records]
    img_id = getattr(student.model.config, "image_token_id", None)
    image_tokens = int((prefixes[0].input_ids == img_id).sum()) if img_id is not None and records[0].image else 0
    arch = student_arch(scfg, image_tokens=image_tokens or None)
    prompt = max(int(p.input_ids.shape[1]) for p in prefixes) - image_tokens
    anchor = max(len(student.encode_response(a)) for a in anchors.values())
    settings = Settings(batch=cfg.batch_size, k=cfg.k, objective=cfg.objective, beta=cfg.beta,
                        group_chunk=cfg.group_chunk, gradient_checkpointing=cfg.gradient_checkpointing,
                        quantization=scfg.quantization, compute_dtype=scfg.compute_dtype,
                        mixed_precision=cfg.mixed_precision, lora_dropout=scfg.lora.dropout,
                        reference_adapter=student.has_reference_adapter, device=device)
    return plan_step(arch, settings, Shapes(prompt_tokens=prompt, response_tokens=max_new_tokens, anchor_tokens=anchor,
                                            images=bool(image_tokens)))


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
    trainable = sum(p.numel() for p in step.run.params)
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
