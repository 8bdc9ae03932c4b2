"""The plan's inputs (a step's token counts, the recipe's knobs) and its result (line items, peak per phase)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from vlrlcd.planning.arch import Arch

GiB = 2**30
# CUDA context, cuBLAS workspaces and the caching allocator's rounding: not in max_memory_allocated, but in
# what the card must hold. A rule of thumb, not a measurement.
CUDA_OVERHEAD = int(1.0 * GiB)
DEFAULT_PROMPT_TOKENS = 48      # a question and the chat template, without image tokens
SCORING_EXTRA_TOKENS = 4        # ranking/scorers.py SCORING_TEMPLATE's "\nReference answer: " around the anchor


@dataclass
class Shapes:
    """Token counts of one step's prompts (the plan assumes every prompt and candidate at these lengths)."""

    prompt_tokens: int = DEFAULT_PROMPT_TOKENS  # text tokens of a prompt, chat template included
    response_tokens: int = 16                   # candidates' length (student.max_new_tokens: the worst case)
    anchor_tokens: int | None = None            # the anchor's length (default: response_tokens)
    scoring_extra: int = SCORING_EXTRA_TOKENS    # the scoring template's words
    images: bool = True                          # one image per prompt (VLM students)


@dataclass
class Settings:
    """The recipe's knobs that size a step."""

    batch: int = 8
    k: int = 8
    objective: str = "ldl_grpo"
    beta: float = 0.05
    group_chunk: int = 0
    gradient_checkpointing: bool = False
    quantization: str = "none"
    compute_dtype: str = "bfloat16"
    mixed_precision: str = "no"
    lora_dropout: float = 0.0
    reference_adapter: bool = True   # the SFT adapter kept beside the policy (always after stage I)
    score: bool = True               # the objective ranks its candidates with the student (self_likelihood)
    layout: str = "shared"           # shared (this code) | peers (vision tower and prompt per completion)
    device: str = "cuda"             # cuda | cpu (only LoRA dropout's mask differs)

    @classmethod
    def from_config(cls, cfg) -> "Settings":
        """K and scoring as the method's rollout plan says (a method that samples nothing, sft2, keeps
        `train.k`: its own passes over the anchor are bounded by K rows)."""
        from vlrlcd.planning.methods import rollout_shape

        t, s = cfg.train, cfg.student
        k, score = rollout_shape(cfg)
        return cls(batch=t.batch_size, k=k or t.k, objective=t.objective, beta=t.beta, group_chunk=t.group_chunk,
                   gradient_checkpointing=t.gradient_checkpointing, quantization=s.quantization,
                   compute_dtype=s.compute_dtype, mixed_precision=t.mixed_precision, lora_dropout=s.lora.dropout,
                   score=score)


@dataclass
class Item:
    """One line of the plan: bytes, and the phase of the step it belongs to."""

    name: str
    bytes: int
    phase: str
    note: str = ""


@dataclass
class Plan:
    arch: Arch
    settings: Settings
    shapes: Shapes
    items: list[Item]
    phases: dict[str, int]     # phase -> peak tensor bytes while it runs (resident included)
    peak_phase: str
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        """Peak tensor bytes of the step (what torch.cuda.max_memory_allocated reports)."""
        return self.phases[self.peak_phase]

    @property
    def total(self) -> int:
        """What the GPU must hold: the peak plus CUDA context and allocator slack."""
        return self.peak + CUDA_OVERHEAD

    def to_json(self) -> dict:
        return {"student": self.arch.name, "family": self.arch.family, "source": self.arch.source,
                "settings": asdict(self.settings), "shapes": asdict(self.shapes),
                "items": [asdict(i) for i in self.items], "phases": self.phases, "peak_phase": self.peak_phase,
                "peak_bytes": self.peak, "total_bytes": self.total, "notes": self.notes}
