"""Tiny random students built from configs (no download): a byte-level BPE trained here, a chat
template, the family's real processor; saved with `save_pretrained` so they load through the same
loader a user's checkpoint goes through.

Families: text (Llama or Qwen2), LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlrlcd.adapters.config import TinyConfig

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\n' }}"
    "{% elif message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% else %}{{ '<|assistant|>\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}{{ '</s>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# The Qwen2-VL / Qwen2.5-VL chat format: ChatML, an image is <|vision_start|><|image_pad|><|vision_end|>
# (the processor expands <|image_pad|> to one token per merged patch).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<|user|>", "<|assistant|>", "<|system|>"]
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]

# Words every tiny tokenizer should know well, beyond the corpus it is trained on.
BASE_CORPUS = [
    "What color is the shape? red green blue yellow purple orange white black",
    "What shape is it? circle square triangle. How many shapes are there? one two three four 0 1 2 3 4 5 6 7 8 9",
    "Is the shape on the left or the right? top bottom left right. Describe the image. a red circle and a blue square",
    "Reference answer: The answer is yes no. It is. What is 3 + 4? 12 - 5 = 7 * 2",
]


def _bpe(corpus: list[str], vocab_size: int, special_tokens: list[str], split_digits: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # split_digits: every digit its own token, never merged with its neighbours or the space before it
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(corpus) + BASE_CORPUS * 4, trainer=trainer)
    return tok


def train_tokenizer(corpus: list[str], vocab_size: int = 512, split_digits: bool = False):
    """A byte-level BPE tokenizer trained on `corpus` in well under a second, with a chat template
    (`split_digits`: one token per digit)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(corpus, vocab_size, SPECIAL_TOKENS, split_digits),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def train_qwen_tokenizer(corpus: list[str], vocab_size: int = 512, split_digits: bool = False):
    """A byte-level BPE tokenizer with Qwen's special tokens and ChatML template (eos <|im_end|>;
    `split_digits`: one token per digit)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(corpus, vocab_size, QWEN_SPECIAL_TOKENS, split_digits),
        eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
    )
    fast.chat_template = QWEN_CHAT_TEMPLATE
    return fast


def _llama_config(tok, t: TinyConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok), hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_heads,
        max_position_embeddings=512, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )


def _save(model, processor_or_tokenizer, out_dir: str | Path) -> Path:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out_dir)
    model.save_pretrained(out)
    processor_or_tokenizer.save_pretrained(out)
    return out


def build_tiny_text(out_dir: str | Path, corpus: list[str], tiny: TinyConfig | None = None, seed: int = 0,
                    arch: str = "llama") -> Path:
    """Save a tiny random text student (`arch` llama or qwen2) and its tokenizer to `out_dir`.

    Its tokenizer splits numbers into single digits, as Llama 2's and Qwen2's do: with whole numbers as
    learned BPE merges ("12" one token, "13" two, " 7" and "7" different tokens) a tiny model can only
    memorise sums it has seen; with digits, written sums share their digit facts and held-out ones can be
    learned (the text demo, vlrlcd/configs/demo_text.yaml)."""
    t = tiny or TinyConfig()
    if arch == "llama":
        from transformers import LlamaForCausalLM

        tok = train_tokenizer(corpus, t.vocab_size, split_digits=True)
        torch.manual_seed(seed)
        return _save(LlamaForCausalLM(_llama_config(tok, t)), tok, out_dir)
    if arch == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        tok = train_qwen_tokenizer(corpus, t.vocab_size, split_digits=True)
        cfg = Qwen2Config(
            vocab_size=len(tok), hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_heads,
            max_position_embeddings=512, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            bos_token_id=None, tie_word_embeddings=False,
        )
        torch.manual_seed(seed)
        return _save(Qwen2ForCausalLM(cfg), tok, out_dir)
    raise ValueError(f"arch must be llama or qwen2, got {arch!r}")


def _clip_vision(t: TinyConfig):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=t.vision_hidden_size, intermediate_size=2 * t.vision_hidden_size,
        num_hidden_layers=t.vision_layers, num_attention_heads=4, image_size=t.image_size,
        patch_size=t.patch_size, projection_dim=t.vision_hidden_size,
    )


def _readable_projector(projector: torch.nn.Module) -> None:
    """Re-initialise the projector's linear layers with fan-in scaled weights (std 1/sqrt(fan_in)).

    The default init (std 0.02) shrinks the vision signal about thirty-fold on its way into the language
    model, and a random tiny model then never learns to look at the image."""
    for m in projector.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=m.in_features ** -0.5)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)


def build_tiny_llava(out_dir: str | Path, corpus: list[str], tiny: TinyConfig | None = None, seed: int = 0) -> Path:
    """Save a tiny random LLaVA student (CLIP vision tower + Llama) and its `LlavaProcessor` to `out_dir`."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    t = tiny or TinyConfig()
    tok = train_tokenizer(corpus, t.vocab_size)
    config = LlavaConfig(
        vision_config=_clip_vision(t), text_config=_llama_config(tok, t),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1,
        projector_hidden_act="gelu", tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    _readable_projector(model.model.multi_modal_projector)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": t.image_size}, crop_size={"height": t.image_size, "width": t.image_size},
        do_center_crop=True, do_resize=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=t.patch_size,
        num_additional_image_tokens=1, vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE, image_token="<image>",
    )
    return _save(model, processor, out_dir)


def build_tiny_llava_next(out_dir: str | Path, corpus: list[str], tiny: TinyConfig | None = None,
                          seed: int = 0) -> Path:
    """Save a tiny random LLaVA-NeXT student (any-resolution tiles of `image_size`, CLIP + Llama) and its
    `LlavaNextProcessor` to `out_dir`."""
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor,
                              LlavaNextProcessor)

    t = tiny or TinyConfig()
    s = t.image_size
    pinpoints = [[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
    tok = train_tokenizer(corpus, t.vocab_size)
    config = LlavaNextConfig(
        vision_config=_clip_vision(t), text_config=_llama_config(tok, t),
        image_token_id=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default", vision_feature_layer=-1,
        projector_hidden_act="gelu", tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": s}, crop_size={"height": s, "width": s}, image_grid_pinpoints=pinpoints,
        do_center_crop=True, do_resize=True,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=t.patch_size,
        num_additional_image_tokens=1, vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE, image_token="<image>",
    )
    return _save(model, processor, out_dir)


def build_tiny_qwen2_vl(out_dir: str | Path, corpus: list[str], tiny: TinyConfig | None = None, seed: int = 0,
                        variant: str = "qwen2_vl") -> Path:
    """Save a tiny random Qwen2-VL (`variant="qwen2_vl"`) or Qwen2.5-VL (`"qwen2_5_vl"`) student and its
    processor to `out_dir`.

    Patches are 14 px (Qwen's own; `tiny.patch_size` is for the CLIP towers), merged 2x2. Images are resized
    to about `tiny.image_size` px a side, at least 56 (28 * round(image_size / 28)): for the default 32, a
    4x4 patch grid = 2x2 merged tokens, so the 3-D (mrope) positions of the image differ from plain 1-D
    positions and any mistake in them shows."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    if variant not in ("qwen2_vl", "qwen2_5_vl"):
        raise ValueError(f"variant must be qwen2_vl or qwen2_5_vl, got {variant!r}")
    t = tiny or TinyConfig()
    tok = train_qwen_tokenizer(corpus, t.vocab_size)
    head_dim = t.hidden_size // t.num_heads
    if head_dim % 4:
        raise ValueError("hidden_size / num_heads must be divisible by 4 for the mrope sections")
    half = head_dim // 2
    section = [half - 2 * (half // 4 + half // 8), half // 4 + half // 8, half // 4 + half // 8]  # sums to head_dim/2
    ids = {name: tok.convert_tokens_to_ids(tok_) for name, tok_ in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = dict(
        vocab_size=len(tok), hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_heads,
        max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                      "mrope_section": section},
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
    )
    vh, heads = t.vision_hidden_size, 4
    if variant == "qwen2_vl":
        from transformers import Qwen2VLConfig as Config, Qwen2VLForConditionalGeneration as Model
        from transformers import Qwen2VLProcessor as Processor

        vision = dict(depth=t.vision_layers, embed_dim=vh, hidden_size=t.hidden_size, mlp_ratio=2,
                      num_heads=heads, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    else:
        from transformers import Qwen2_5_VLConfig as Config, Qwen2_5_VLForConditionalGeneration as Model
        from transformers import Qwen2_5_VLProcessor as Processor

        vision = dict(depth=t.vision_layers, hidden_size=vh, intermediate_size=2 * vh, num_heads=heads,
                      out_hidden_size=t.hidden_size, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                      window_size=56, fullatt_block_indexes=[t.vision_layers - 1])
    config = Config(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    torch.manual_seed(seed)
    model = Model(config)
    side = max(56, 28 * round(t.image_size / 28))
    pixels = side * side
    image_processor = Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels, patch_size=14,
                                            merge_size=2, temporal_patch_size=2)
    video_processor = Qwen2VLVideoProcessor(min_pixels=pixels, max_pixels=pixels, patch_size=14,
                                            merge_size=2, temporal_patch_size=2)
    processor = Processor(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                          chat_template=QWEN_CHAT_TEMPLATE)
    return _save(model, processor, out_dir)


BUILDERS = {
    "llama": lambda out, corpus, tiny=None, seed=0: build_tiny_text(out, corpus, tiny, seed, arch="llama"),
    "qwen2": lambda out, corpus, tiny=None, seed=0: build_tiny_text(out, corpus, tiny, seed, arch="qwen2"),
    "llava": build_tiny_llava,
    "llava_next": build_tiny_llava_next,
    "qwen2_vl": lambda out, corpus, tiny=None, seed=0: build_tiny_qwen2_vl(out, corpus, tiny, seed, "qwen2_vl"),
    "qwen2_5_vl": lambda out, corpus, tiny=None, seed=0: build_tiny_qwen2_vl(out, corpus, tiny, seed, "qwen2_5_vl"),
}
