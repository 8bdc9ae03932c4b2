"""FSDP for the frozen base: shard the language model's decoder layers across processes, keep LoRA replicated.

With a LoRA student the memory is the frozen base; the trainable weights are a few MB. So `accelerate
launch --config_file configs/accelerate/fsdp_*.yaml` shards exactly the base: each decoder layer of the
language model becomes one `torch.distributed.fsdp.fully_shard` unit whose frozen weights are split over
the processes and gathered for its forward (and backward) only. Everything else stays an ordinary,
replicated tensor: the LoRA / modules_to_save weights (so `Dist.sum_gradients`, the optimizer, clipping,
checkpoints and bit-exact resume are the DDP ones), the embeddings and head, and the vision tower and
projector (so the one vision pass per prompt needs no other process).

Every forward of a sharded layer is a collective, so all processes must run the same sequence of
forwards and backwards ("lockstep"): `StudentAdapter.lockstep` makes sampling decode until every
process is done and always runs the continuation pass; the loops give every process the same number of
prompts and micro-batches and always run the backward (a non-finite step is discarded afterwards on all).
Every objective keeps its passes independent of the data in lockstep: a group without a preference pair or
whose judge failed still runs its passes with weight 0, and rlsd ranks every group (tests/test_sharded.py checks
the sequence of passes is the same for every kind of group).

Settings come from the environment accelerate's launcher writes from the config file: FSDP_VERSION,
FSDP_RESHARD_AFTER_FORWARD (v2: true/false; v1 configs: the sharding strategy name) and FSDP_OFFLOAD_PARAMS.

DeepSpeed ZeRO-3 (`configs/accelerate/deepspeed_zero3_*.yaml`) plays the same role: `deepspeed.initialize`
with no optimizer on the language model's decoder stack, BEFORE peft adds the adapters, installs ZeRO-3's
gather/release hooks on the frozen base weights only; the LoRA layers peft creates afterwards are plain
replicated tensors, so again the optimizer, clipping and checkpoints are ours. ZeRO stages 1-2 shard the
optimizer state and gradients, a few MB for a LoRA student: they run as plain data parallelism.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from vlrlcd.adapters.families import VISION_MODULES
from vlrlcd.errors import VlrlcdError



@dataclass(frozen=True)
class FSDPSettings:
    """What the accelerate FSDP config asks for, in the terms of fully_shard."""

    reshard_after_forward: bool = True
    offload_params: bool = False


def fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def deepspeed_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")


@dataclass(frozen=True)
class ZeroSettings:
    """The DeepSpeed config (a dict) for ZeRO-3 partitioning of the frozen base, from the launch config."""

    config: dict
    stage: int


def zero_settings_from_env() -> ZeroSettings:
    """The user's DeepSpeed launch config (accelerate's DeepSpeedPlugin reads the env / JSON file it names)."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise VlrlcdError("this accelerate launch config asks for DeepSpeed, which is not installed: "
                          "pip install 'vlrlcd[deepspeed]' (or launch with an fsdp_*.yaml / ddp_*.yaml config)") from None
    from accelerate.utils import DeepSpeedPlugin

    try:
        plugin = DeepSpeedPlugin()
    except (ValueError, TypeError) as e:
        raise VlrlcdError(f"the accelerate DeepSpeed config is not usable: {e}") from None
    return ZeroSettings(dict(plugin.deepspeed_config), int(plugin.zero_stage or 0))


def _deepspeed_config(user: dict, world: int, hidden: int) -> dict:
    """The user's DeepSpeed config made concrete for a hooks-only engine (no optimizer): batch sizes fixed,
    our clipping and autocast instead of DeepSpeed's, "auto" bucket sizes as transformers resolves them."""
    import copy

    cfg = copy.deepcopy(user)
    cfg.update(train_micro_batch_size_per_gpu=1, train_batch_size=world, gradient_accumulation_steps=1,
               steps_per_print=10**9)
    cfg.pop("gradient_clipping", None)
    for key in ("fp16", "bf16"):  # weights stay in student.compute_dtype; train.mixed_precision autocasts
        cfg[key] = {"enabled": False}
    zero = cfg.setdefault("zero_optimization", {})
    zero["stage"] = 3
    autos = {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
             "stage3_param_persistence_threshold": 10 * hidden}
    for key, value in autos.items():
        if zero.get(key, "auto") == "auto":
            zero[key] = value
    # ZeRO-3's own linear autograd function sums the input gradient in another order than F.linear (1e-7
    # relative), which Adam amplifies on near-zero gradient entries; the plain one matches one process
    zero.setdefault("memory_efficient_linear", False)
    return cfg


def shard_base_zero3(model: torch.nn.Module, device: torch.device, world: int, settings: ZeroSettings):
    """Partition the frozen weights of `model`'s decoder stack (the module holding its `layers`) with ZeRO-3
    hooks; call before peft adds adapters. Returns the engine (keep it referenced)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import warnings

    import deepspeed

    # DeepSpeed gathers with an API torch deprecates: once per forward, it would flood the log
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated")
    _refuse_quantized(model, "DeepSpeed ZeRO-3")
    stack = decoder_stack(model)
    hidden = int(getattr(getattr(model, "config", None), "hidden_size", 0) or
                 getattr(getattr(getattr(model, "config", None), "text_config", None), "hidden_size", 0) or 1024)
    engine, *_ = deepspeed.initialize(model=stack, config=_deepspeed_config(settings.config, world, hidden))
    return engine


def finish_zero3_student(student, device: torch.device) -> None:
    """After peft added the adapters to a ZeRO-3 partitioned base: check they are plain, put them (and
    everything else ZeRO-3 does not hold) on `device`."""
    check_zero3_adapters(student.model)
    place_replicated(student.model, device)


def check_zero3_adapters(model: torch.nn.Module) -> None:
    """Trainable weights must be plain tensors: a modules_to_save copy of a partitioned module is not."""
    bad = [n for n, p in model.named_parameters() if p.requires_grad and hasattr(p, "ds_id")]
    if bad:
        raise VlrlcdError(f"student.lora.modules_to_save copies a module inside the ZeRO-3 partitioned language model "
                          f"({bad[0]}); drop it from modules_to_save or launch with configs/accelerate/fsdp_gpu.yaml")


def settings_from_env() -> FSDPSettings:
    """FSDPSettings from the variables `accelerate launch` sets for an FSDP config (v1 or v2)."""
    raw = (os.environ.get("FSDP_RESHARD_AFTER_FORWARD") or os.environ.get("FSDP_SHARDING_STRATEGY") or "true")
    value = raw.strip().upper()
    if value in ("NO_SHARD", "3"):
        raise VlrlcdError("the FSDP config asks for NO_SHARD, which is plain data parallelism: launch with "
                          "configs/accelerate/ddp_gpu.yaml instead")
    if value.startswith("HYBRID") or value in ("4", "5"):
        raise VlrlcdError(f"FSDP sharding strategy {raw} (hybrid sharding) is not supported: use FULL_SHARD "
                          "(fsdp_reshard_after_forward: true) or SHARD_GRAD_OP (false)")
    if value in ("TRUE", "1", "FULL_SHARD"):
        reshard = True
    elif value in ("FALSE", "0", "2", "SHARD_GRAD_OP"):
        reshard = False
    else:
        raise VlrlcdError(f"FSDP_RESHARD_AFTER_FORWARD={raw} is not understood: use true or false in the "
                          "accelerate config (fsdp_reshard_after_forward)")
    offload = os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() in ("1", "true")
    return FSDPSettings(reshard, offload)


def _decoder_lists(model: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]]:
    """(name, list) of every `layers` ModuleList outside the vision tower: the language model's decoder."""
    found = [(name, m) for name, m in model.named_modules()
             if name.split(".")[-1] == "layers" and isinstance(m, torch.nn.ModuleList)
             and not any(part in VISION_MODULES for part in name.split("."))]
    if not found:
        raise VlrlcdError(f"{type(model).__name__}: no decoder `layers` found to shard; launch with "
                          "configs/accelerate/ddp_gpu.yaml")
    return found


def decoder_stack(model: torch.nn.Module) -> torch.nn.Module:
    """The module that holds the language model's decoder `layers` (with its embeddings and norm)."""
    name = _decoder_lists(model)[0][0]
    return dict(model.named_modules())[name.rpartition(".")[0]]


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The language model's decoder layers (the elements of its `layers` lists)."""
    return [layer for _, layers in _decoder_lists(model) for layer in layers]


def _refuse_quantized(model: torch.nn.Module, route: str) -> None:
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False) or \
            any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules()):
        raise VlrlcdError(f"{route} does not shard a 4/8-bit (bitsandbytes) student here; a quantized student "
                          "fits one device, so launch it with configs/accelerate/ddp_gpu.yaml")


def place_replicated(model: torch.nn.Module, device: torch.device) -> None:
    """Move what stays whole on every process (every weight FSDP / ZeRO-3 does not hold, and the buffers) to
    `device`; the shards are placed by FSDP / ZeRO-3 themselves."""
    if device.type == "cpu":
        return
    for p in model.parameters():
        if not hasattr(p, "ds_id") and not hasattr(p, "to_local"):
            p.data = p.data.to(device)
    for b in model.buffers():
        b.data = b.data.to(device)


def _replicated(name: str, p: torch.nn.Parameter) -> bool:
    """Parameters that stay whole on every process inside a sharded layer: trainable ones and every adapter
    weight (the frozen reference adapter is switched in and out by peft)."""
    return p.requires_grad or "lora_" in name or "modules_to_save" in name


def shard_student(student, device: torch.device, world: int, settings: FSDPSettings) -> int:
    """Shard the frozen weights of `student.model`'s decoder layers over the process group (in place);
    move everything else to `device`. Returns how many layers were sharded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    model = student.model
    _refuse_quantized(model, "FSDP")
    layers = decoder_layers(model)
    mesh = init_device_mesh(device.type, (world,))
    offload = CPUOffloadPolicy() if settings.offload_params and device.type == "cuda" else OffloadPolicy()
    in_layers = set()
    for layer in layers:
        keep = {p for n, p in layer.named_parameters() if _replicated(n, p)}
        in_layers.update(id(p) for p in layer.parameters())
        fully_shard(layer, mesh=mesh, reshard_after_forward=settings.reshard_after_forward,
                    offload_policy=offload, ignored_params=keep)
    # the root owns nothing: it only ties the layers into one FSDP tree (backward finalisation, prefetch)
    rest = {p for p in model.parameters() if id(p) not in in_layers}
    rest |= {p for layer in layers for n, p in layer.named_parameters() if _replicated(n, p)}
    fully_shard(model, mesh=mesh, reshard_after_forward=settings.reshard_after_forward, ignored_params=rest)
    place_replicated(model, device)
    return len(layers)
