"""Tiny random students built from configs (no download): a byte-level BPE trained here, a chat
template, a real `LlavaProcessor`; saved with `save_pretrained` so they load through the same loader
a user's checkpoint goes through."""

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

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<|user|>", "<|assistant|>", "<|system|>"]

# Words every tiny tokenizer should know well, beyond the corpus it is trained on.
BASE_CORPUS = [
    "What color is the shape? red green blue yellow purple orange white black",
    "What shape is it? circle square triangle. How many shapes are there? one two three four 0 1 2 3 4 5 6 7 8 9",
    "Is the shape on the left or the right? top bottom left right. Describe the image. a red circle and a blue square",
    "Reference answer: The answer is yes no. It is. What is 3 + 4? 12 - 5 = 7 * 2",
]


def train_tokenizer(corpus: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `corpus` in well under a second, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus) + BASE_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _llama_config(tok, t: TinyConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok), hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_heads,
        max_position_embeddings=512, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )


def build_tiny_text(out_dir: str | Path, corpus: list[str], tiny: TinyConfig | None = None, seed: int = 0) -> Path:
    """Save a tiny random Llama text student and its tokenizer to `out_dir`."""
    from transformers import LlamaForCausalLM

    t = tiny or TinyConfig()
    tok = train_tokenizer(corpus, t.vocab_size)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config(tok, t))
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_tiny_llava(out_dir: str | Path, corpus: list[str], tiny: TinyConfig | None = None, seed: int = 0) -> Path:
    """Save a tiny random LLaVA student (CLIP vision tower + Llama) and its `LlavaProcessor` to `out_dir`."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    t = tiny or TinyConfig()
    tok = train_tokenizer(corpus, t.vocab_size)
    vision = CLIPVisionConfig(
        hidden_size=t.vision_hidden_size, intermediate_size=2 * t.vision_hidden_size,
        num_hidden_layers=t.vision_layers, num_attention_heads=4, image_size=t.image_size,
        patch_size=t.patch_size, projection_dim=t.vision_hidden_size,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=_llama_config(tok, t),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1,
        projector_hidden_act="gelu", tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": t.image_size}, crop_size={"height": t.image_size, "width": t.image_size},
        do_center_crop=True, do_resize=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=t.patch_size,
        num_additional_image_tokens=1, vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE, image_token="<image>",
    )
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
