"""Data-parallel training across processes on accelerate (DDP semantics, gloo on CPU, NCCL on GPUs).

Every process holds the whole (peft) student and calls it directly, so the StudentAdapter keeps its
shared-prefix KV cache, K-batched passes and adapter switch. Each process takes the prompts
i ≡ rank (mod world) of the global batch; after the backward passes the LoRA gradients (small) are
summed across processes in one flat all-reduce. Each loss is divided by the global batch size (SFT:
the global token count), so the summed gradient is the gradient of the global-batch mean and the
optimizer step is identical on every process — the same step a single process takes on the whole
batch. Process 0 broadcasts its trainable weights at the start, so the replicas also start equal.

Launch with `torchrun --nproc_per_node N -m vlrlcd.cli train CONFIG` or
`accelerate launch --config_file configs/accelerate/ddp_*.yaml -m vlrlcd.cli train CONFIG`; with
configs/accelerate/fsdp_*.yaml the frozen base is also sharded (sharding.py) and the loops run in lockstep.
A single process (the default) never creates a process group and pays nothing for this module.
"""

from __future__ import annotations

import contextlib
import os
import sys
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
    fsdp: Any = None  # sharding.FSDPSettings when the launch config asks for FSDP (several processes)
    zero3: Any = None  # sharding.ZeroSettings when it asks for DeepSpeed ZeRO-3
    engines: list = field(default_factory=list)  # DeepSpeed engines (their hooks live as long as they do)

    @property
    def sharded(self) -> bool:
        """Whether the student's base is sharded (FSDP or ZeRO-3): every process must then run in lockstep."""
        return (self.fsdp is not None or self.zero3 is not None) and self.multi

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def multi(self) -> bool:
        return self.world > 1

    def shard(self, n: int) -> list[int]:
        """Indices of a global batch of n items this process takes: i ≡ rank (mod world)."""
        return list(range(self.rank, n, self.world))

    def all_done(self, done: bool) -> bool:
        """Whether `done` holds on every process (one tiny all-reduce; the lockstep decoding test)."""
        if not self.multi:
            return done
        flag = torch.tensor([0 if done else 1], dtype=torch.int32, device=self.device)
        torch.distributed.all_reduce(flag)
        return int(flag.item()) == 0

    def prepare_base(self, model) -> None:
        """Under ZeRO-3, partition the base model's frozen decoder weights (before peft adds the adapters)."""
        if self.sharded and self.zero3 is not None:
            from vlrlcd.training.sharding import shard_base_zero3

            self.engines.append(shard_base_zero3(model, self.device, self.world, self.zero3))

    def prepare_student(self, student) -> None:
        """Under FSDP / ZeRO-3, shard the student's frozen base over the processes (FSDP here; ZeRO-3 in
        prepare_base) and make it decode in lockstep."""
        if not self.sharded:
            return
        from vlrlcd.training import sharding

        if self.fsdp is not None:
            layers = sharding.shard_student(student, self.device, self.world, self.fsdp)
            how = f"fsdp: {layers} decoder layers sharded"
        else:
            sharding.finish_zero3_student(student, self.device)
            how = "deepspeed zero-3: the decoder stack partitioned"
        student.lockstep = self.all_done
        if self.is_main:
            held, total = local_numel(student.model)
            print(f"{how} over {self.world} processes; process 0 holds {held:,} of {total:,} weights",
                  file=sys.stderr, flush=True)

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


def local_numel(model: torch.nn.Module) -> tuple[int, int]:
    """(weights this process holds, weights of the whole model): they differ for sharded (DTensor) weights."""
    held = total = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):  # a ZeRO-3 partitioned weight
            held, total = held + p.ds_tensor.numel(), total + p.ds_numel
            continue
        local = p.to_local() if hasattr(p, "to_local") else p
        held += local.numel()
        total += p.numel()
    return held, total


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
    GPU: a plain Accelerator on CPU silently trains every process on its own). With an FSDP or DeepSpeed
    ZeRO-3 launch config the student's frozen base is sharded (sharding.py); otherwise every process holds
    the whole student (QLoRA when it is big) and only the small LoRA gradients travel.
    """
    from vlrlcd.training import sharding

    fsdp = sharding.settings_from_env() if sharding.fsdp_requested() else None
    zero = sharding.zero_settings_from_env() if sharding.deepspeed_requested() else None
    if zero is not None and zero.stage < 3:
        if launched_world_size() > 1 and int(os.environ.get("RANK", "0") or 0) == 0:
            print(f"note: DeepSpeed ZeRO stage {zero.stage} shards optimizer state and gradients, a few MB for a LoRA "
                  "student: running plain data-parallel (stage 3 shards the frozen base)", file=sys.stderr)
        zero = None
    if launched_world_size() <= 1:
        return single_process(mixed_precision)
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    # process 0 writes files after each stage while the others wait at a barrier: allow a long wait
    timeout = timedelta(seconds=float(os.environ.get("VLRLCD_DIST_TIMEOUT_S", 6 * 3600)))
    acc = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)])
    if acc.num_processes != launched_world_size():
        raise VlrlcdError(
            f"the launcher started {launched_world_size()} processes but accelerate sees {acc.num_processes}; "
            "on CPU launch with `torchrun --nproc_per_node N` or `accelerate launch --multi_gpu --num_processes N "
            "--num_machines 1 --mixed_precision no --dynamo_backend no` (ACCELERATE_USE_CPU=true)"
        )
    device = torch.device("cpu") if acc.device.type == "cpu" else acc.device
    return Dist(acc.process_index, acc.num_processes, device, effective_mixed_precision(mixed_precision), acc, fsdp,
                zero)
