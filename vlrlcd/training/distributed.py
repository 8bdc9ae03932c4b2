"""Data-parallel training across processes on accelerate (DDP semantics, gloo on CPU, NCCL on GPUs).

Every process holds the whole (peft) student and calls it directly, so the StudentAdapter keeps its
shared-prefix KV cache, K-batched passes and adapter switch. Each process takes the prompts
i ≡ rank (mod world) of the global batch; after the backward passes the LoRA gradients (small) are
summed across processes in one flat all-reduce. Each loss is divided by the global batch size (SFT:
the global token count), so the summed gradient is the gradient of the global-batch mean and the
optimizer step is identical on every process — the same step a single process takes on the whole
batch. Process 0 broadcasts its trainable weights at the start, so the replicas also start equal.

Launch with `torchrun --nproc_per_node N -m vlrlcd.cli train CONFIG` or
`accelerate launch --config_file configs/accelerate/ddp_*.yaml -m vlrlcd.cli train CONFIG`.
A single process (the default) never creates a process group and pays nothing for this module.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from vlrlcd.errors import VlrlcdError

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Dist:
    """Where this process stands: rank, world size, device, autocast setting."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mixed_precision: str = "no"
    accelerator: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def multi(self) -> bool:
        return self.world > 1

    def shard(self, n: int) -> list[int]:
        """Indices of a global batch of n items this process takes: i ≡ rank (mod world)."""
        return list(range(self.rank, n, self.world))

    def barrier(self) -> None:
        if self.multi:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Process 0 runs the block first (writes caches, builds files); the others then run it over them."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def autocast(self):
        """torch.autocast for train.mixed_precision (a no-op context for "no")."""
        if self.mixed_precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_AMP_DTYPES[self.mixed_precision])

    def grad_scaler(self):
        """A dynamic loss scaler for fp16, else None."""
        if self.mixed_precision != "fp16":
            return None
        return torch.amp.GradScaler(self.device.type)

    def sum_gradients(self, params: list[torch.nn.Parameter], extras: list[float]) -> list[float]:
        """All-reduce (sum) the gradients of `params` and a few scalars in one flat buffer; returns the
        summed scalars. Parameters without a gradient on some process count as zero there."""
        if not self.multi:
            return list(extras)
        ref = params[0]
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(torch.float32) for p in params]
        parts.append(torch.tensor(extras, dtype=torch.float32, device=ref.device))
        flat = torch.cat(parts)
        torch.distributed.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.numel()
            g = flat[offset: offset + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            offset += n
        return flat[offset:].tolist()

    def broadcast_parameters(self, params: list[torch.nn.Parameter]) -> None:
        """Make every process hold process 0's values of `params`."""
        if not self.multi:
            return
        with torch.no_grad():
            for p in params:
                torch.distributed.broadcast(p.data, src=0)

    def close(self) -> None:
        """Tear down the process group (several processes only)."""
        if self.multi and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def all_gather(self, obj: Any) -> list[Any]:
        """Every process's `obj` (picklable), in rank order, on every process."""
        if not self.multi:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


def single_process(mixed_precision: str = "no") -> Dist:
    mixed_precision = effective_mixed_precision(mixed_precision)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return Dist(0, 1, device, mixed_precision)


def effective_mixed_precision(configured: str) -> str:
    """train.mixed_precision, or when that is "no", what `accelerate launch --mixed_precision` asked for."""
    if configured != "no":
        return configured
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    return launcher if launcher in _AMP_DTYPES else "no"


def launched_world_size() -> int:
    """The number of processes the launcher (torchrun / accelerate launch) started; 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def setup_distributed(mixed_precision: str = "no") -> Dist:
    """This process's Dist: one process unless launched by torchrun / `accelerate launch` with several.

    Several processes: the process group comes from accelerate (`Accelerator(cpu=True)` when there is no
    GPU: a plain Accelerator on CPU silently trains every process on its own). FSDP and DeepSpeed launch
    configs are refused (see _SHARDED_MSG): every process holds the whole student (QLoRA when it is big)
    and only the small LoRA gradients travel.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") or \
            os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        raise VlrlcdError(_SHARDED_MSG)
    if launched_world_size() <= 1:
        return single_process(mixed_precision)
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    # process 0 evaluates alone after each stage while the others wait at a barrier: allow a long wait
    timeout = timedelta(seconds=float(os.environ.get("VLRLCD_DIST_TIMEOUT_S", 6 * 3600)))
    acc = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)])
    if acc.num_processes != launched_world_size():
        raise VlrlcdError(
            f"the launcher started {launched_world_size()} processes but accelerate sees {acc.num_processes}; "
            "on CPU launch with `torchrun --nproc_per_node N` or `accelerate launch --multi_gpu --num_processes N "
            "--num_machines 1 --mixed_precision no --dynamo_backend no` (ACCELERATE_USE_CPU=true)"
        )
    return Dist(acc.process_index, acc.num_processes, acc.device, effective_mixed_precision(mixed_precision), acc)


_SHARDED_MSG = (
    "this accelerate launch config asks for FSDP / DeepSpeed, which the vlrlcd loop does not run: each process "
    "samples its own prompts for a different number of decoding steps and backward passes, while sharded weights "
    "need every process in the same forward/backward in lockstep. Launch with configs/accelerate/ddp_gpu.yaml "
    "(or ddp_cpu.yaml); when the student does not fit one device, load it in 4 bits (student.quantization=4bit)"
)
