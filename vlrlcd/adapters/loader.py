"""Load a student checkpoint (local directory or hub id) with optional bitsandbytes quantization and
peft LoRA, behind the StudentAdapter interface."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable

import torch

from vlrlcd.adapters.base import POLICY_ADAPTER, REFERENCE_ADAPTER, StudentAdapter
from vlrlcd.adapters.config import StudentConfig
from vlrlcd.adapters.families import Family, detect_family
from vlrlcd.errors import VlrlcdError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # peft reads transformers' deprecated alias on every PeftModel: one FutureWarning per load, not ours to fix
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:  # pragma: no cover
        pass
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or \
        os.environ.get("TRANSFORMERS_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _load_config(name_or_path: str):
    from transformers import AutoConfig

    path = Path(name_or_path)
    if path.exists() and not path.is_dir():
        raise VlrlcdError(f"student.name_or_path {name_or_path} is a file; point to the checkpoint directory")
    if path.is_dir() and not (path / "config.json").exists():
        raise VlrlcdError(f"{name_or_path}: no config.json in this directory; is it a saved checkpoint "
                          "(model.save_pretrained(DIR))?")
    looks_local = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path
    if looks_local and not path.exists():
        raise VlrlcdError(f"student.name_or_path {name_or_path}: no such directory (and not a hub id of the "
                          "form owner/name)")
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        if path.is_dir():
            raise VlrlcdError(f"{name_or_path}: config.json could not be read ({str(e).splitlines()[0][:200]})") from None
        if _offline():
            raise VlrlcdError(
                f"student.name_or_path '{name_or_path}' is not a local directory and is not in the Hugging Face "
                "cache, and the hub is offline (HF_HUB_OFFLINE=1); download it first where there is network "
                "(huggingface-cli download ID) or point to a local copy"
            ) from None
        raise VlrlcdError(
            f"student.name_or_path '{name_or_path}' is not a local directory and could not be fetched from the "
            f"hub ({type(e).__name__}: {str(e).splitlines()[0][:200]}); check the id and the network, or "
            "point to a local copy"
        ) from None


def quantization_config(cfg: StudentConfig, family: Family):
    """bitsandbytes settings for `student.quantization` (nf4 + double quantisation for 4bit)."""
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    skip = skip_modules(family)
    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=_DTYPES[cfg.compute_dtype], llm_int8_skip_modules=skip,
    )


def skip_modules(family: Family) -> list[str]:
    """Modules kept in full precision: lm_head, and for VLMs the vision tower and projector.

    transformers 5 matches these from the start of the module name or as a suffix (so `.*vision_tower`
    for a nested tower); transformers 4 matched substrings (the plain names). Both forms are listed."""
    names = ["lm_head"] + ([family.vision_module, family.projector] if family.vision else [])
    return [p for n in names if n for p in (n, f".*{n}")]


def lora_config(cfg: StudentConfig, family: Family):
    from peft import LoraConfig

    extra = list(cfg.lora.modules_to_save or [])
    if cfg.lora.train_projector and family.projector:
        extra.append(family.projector)
    return LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules or family.default_targets(),
        modules_to_save=extra or None, task_type="CAUSAL_LM", bias="none",
    )


def _load_processor(path: str, family: Family):
    """(processor or None, tokenizer): the checkpoint's own processor for a VLM, its tokenizer for text."""
    import transformers

    if not family.vision:
        try:
            return None, transformers.AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise VlrlcdError(
                f"{path}: could not load the tokenizer ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                "save it beside the model with tokenizer.save_pretrained(DIR)"
            ) from None
    try:
        processor = transformers.AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise VlrlcdError(
            f"{path}: could not load the processor ({type(e).__name__}: {str(e).splitlines()[0][:160]}); a "
            f"{family.name} checkpoint directory needs its processor files (processor_config.json or "
            "preprocessor_config.json, and the tokenizer files): save them with processor.save_pretrained(DIR)"
        ) from None
    if isinstance(processor, transformers.PreTrainedTokenizerBase) or getattr(processor, "image_processor", None) is None:
        raise VlrlcdError(
            f"{path}: found a tokenizer but no image processor (processor_config.json / preprocessor_config.json); "
            f"a {family.name} checkpoint needs its full processor: save it with processor.save_pretrained(DIR)"
        )
    return processor, processor.tokenizer


def _keep_cpu_4bit_trainable(model) -> None:
    """bitsandbytes repacks a 4-bit weight for its CPU inference kernel the first time it runs in eval mode
    without grad (on AVX512-BF16 CPUs), and from then on uses that kernel for every call, which has no
    autograd: gradients through the quantized layers would silently vanish after the first generation.
    Keep the regular (differentiable) 4-bit path."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def load_base(cfg: StudentConfig, on_cpu: bool = False):
    """(model, processor, tokenizer, family) for `cfg.name_or_path`, without any adapter; on the GPU when
    there is one, unless `on_cpu` (FSDP moves each process's shard there itself)."""
    import transformers

    _quiet_transformers()
    path = cfg.name_or_path
    hf_config = _load_config(path)
    family = detect_family(hf_config, cfg.family)
    processor, tokenizer = _load_processor(path, family)  # before the weights: a missing file fails fast
    dtype = _DTYPES[cfg.compute_dtype]
    quant = quantization_config(cfg, family)
    kwargs: dict = {"dtype": dtype}
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu"  # one GPU per DDP rank
    model = getattr(transformers, family.auto_class).from_pretrained(path, **kwargs)
    if quant is None and torch.cuda.is_available() and not on_cpu:
        model = model.to("cuda")
    if quant is not None and not torch.cuda.is_available():
        _keep_cpu_4bit_trainable(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, processor, tokenizer, family


def load_student(cfg: StudentConfig, adapter: str | Path | None = None,
                 reference: str | Path | None = None, trainable: bool = True, on_cpu: bool = False,
                 prepare_base: Callable | None = None) -> StudentAdapter:
    """The student with a LoRA policy adapter: fresh, or loaded from `adapter` (a plain peft directory);
    `reference` (the SFT adapter) is kept frozen beside it on the same base weights."""
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    model, processor, tokenizer, family = load_base(cfg, on_cpu)
    if cfg.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for p in model.parameters():
        p.requires_grad_(False)
    if prepare_base is not None:  # e.g. ZeRO-3 partitioning, which must come before the adapters exist
        prepare_base(model)
    if adapter is not None:
        adapter = Path(adapter)
        if not (adapter / "adapter_config.json").exists():
            raise VlrlcdError(f"{adapter}: not a peft adapter directory (no adapter_config.json)")
        peft_model = PeftModel.from_pretrained(model, str(adapter), adapter_name=POLICY_ADAPTER, is_trainable=trainable)
    else:
        peft_model = get_peft_model(model, lora_config(cfg, family), adapter_name=POLICY_ADAPTER)
    if reference is not None:
        peft_model.load_adapter(str(reference), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        peft_model.set_adapter(POLICY_ADAPTER)
    if not trainable:
        for p in peft_model.parameters():
            p.requires_grad_(False)
    student = StudentAdapter(peft_model, processor, tokenizer, family, str(cfg.name_or_path))
    if reference is not None:
        student._freeze_reference()
    return student
