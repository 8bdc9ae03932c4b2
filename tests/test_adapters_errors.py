"""Wrong inputs give one clear VlrlcdError naming what is wrong (the CLI prints it as one line)."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

from vlrlcd.adapters.config import LoraConfig, StudentConfig, TinyConfig
from vlrlcd.adapters.families import FAMILIES, detect_family
from vlrlcd.adapters.loader import load_student
from vlrlcd.adapters.tiny import BUILDERS, CHAT_TEMPLATE
from vlrlcd.errors import VlrlcdError

TINY = TinyConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                  vision_hidden_size=32, vision_layers=1)
PROMPT = "What color is the shape?"
TEXT_ONLY_TEMPLATE = CHAT_TEMPLATE.replace("{{ '<image>\n' }}", "")  # drops {'type': 'image'} parts


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("errors")


@pytest.fixture(scope="module")
def image(root):
    Image.new("RGB", (32, 32), "red").save(root / "red.png")
    return str(root / "red.png")


@pytest.fixture(scope="module")
def ckpts(root):
    return {n: BUILDERS[n](root / n, [PROMPT], TINY, seed=0) for n in ("llama", "llava", "qwen2_vl")}


def student(path, **kw):
    return load_student(StudentConfig(name_or_path=str(path), lora=LoraConfig(r=2, alpha=4), **kw))


def test_image_for_a_text_student(ckpts, image):
    s = student(ckpts["llama"])
    with pytest.raises(VlrlcdError, match=r"text-only model .*has an image"):
        s.prefix(PROMPT, image)
    with pytest.raises(VlrlcdError, match="empty prompt"):
        s.prefix("   ")


def test_prompt_missing_the_image_placeholder(ckpts, image, root):
    from transformers import AutoProcessor

    assert "<image>" not in TEXT_ONLY_TEMPLATE and "'image'" in TEXT_ONLY_TEMPLATE
    bad = root / "llava_no_placeholder"
    shutil.copytree(ckpts["llava"], bad)
    proc = AutoProcessor.from_pretrained(bad)
    proc.chat_template = TEXT_ONLY_TEMPLATE
    proc.save_pretrained(bad)
    s = student(bad)
    with pytest.raises(VlrlcdError, match=r"llava_no_placeholder: the prompt has no image placeholder"):
        s.prefix(PROMPT, image)
    s.prefix(PROMPT)  # a text-only prompt needs no placeholder

    bad_qwen = root / "qwen_no_placeholder"
    shutil.copytree(ckpts["qwen2_vl"], bad_qwen)
    proc = AutoProcessor.from_pretrained(bad_qwen)
    proc.chat_template = proc.chat_template.replace("<|vision_start|><|image_pad|><|vision_end|>", "")
    proc.save_pretrained(bad_qwen)
    with pytest.raises(VlrlcdError, match="no image placeholder"):
        student(bad_qwen).prefix(PROMPT, image)


@pytest.mark.parametrize("remove", [("processor_config.json",),
                                    ("processor_config.json", "tokenizer.json", "tokenizer_config.json")])
def test_checkpoint_without_processor_files(ckpts, root, remove):
    bad = root / f"llava_without_{len(remove)}"
    shutil.copytree(ckpts["llava"], bad)
    for f in remove:
        (bad / f).unlink()
    with pytest.raises(VlrlcdError, match=r"llava_without_\d+: .*processor.*save_pretrained"):
        student(bad)


def test_text_checkpoint_without_tokenizer(ckpts, root):
    bad = root / "llama_without_tokenizer"
    shutil.copytree(ckpts["llama"], bad)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (bad / f).unlink()
    with pytest.raises(VlrlcdError, match=r"llama_without_tokenizer: could not load the tokenizer"):
        student(bad)


def test_unsupported_model_type_lists_the_supported(root):
    from transformers import T5Config

    T5Config(d_model=16, num_layers=1, num_heads=1, d_ff=16, vocab_size=32).save_pretrained(root / "t5")
    with pytest.raises(VlrlcdError) as err:
        student(root / "t5")
    msg = str(err.value)
    assert "model_type 't5' is not a supported student family" in msg
    for name in ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "llama", "qwen2", "AutoModelForCausalLM"):
        assert name in msg
    with pytest.raises(VlrlcdError, match="student.family 'blip' is not supported; supported: llava"):
        detect_family(T5Config(), "blip")
    assert detect_family(T5Config(), "qwen2_vl") is FAMILIES["qwen2_vl"]


def test_not_a_checkpoint_directory(root):
    (root / "empty").mkdir()
    with pytest.raises(VlrlcdError, match=r"empty: no config.json in this directory"):
        student(root / "empty")
    with pytest.raises(VlrlcdError, match="no such directory"):
        student(root / "does" / "not" / "exist")


def test_hub_id_not_cached_while_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(VlrlcdError, match=r"'vlrlcd-tests/not-cached-anywhere' .*not in the Hugging Face cache.*"
                                          r"offline \(HF_HUB_OFFLINE=1\)"):
        student("vlrlcd-tests/not-cached-anywhere")


def test_adapter_directory_without_adapter_config(ckpts, root):
    (root / "not_an_adapter").mkdir()
    with pytest.raises(VlrlcdError, match=r"not_an_adapter: not a peft adapter directory"):
        load_student(StudentConfig(name_or_path=str(ckpts["llama"])), adapter=root / "not_an_adapter")


def test_bad_quantization_value():
    with pytest.raises(VlrlcdError, match="student.quantization must be none, 8bit or 4bit"):
        StudentConfig(quantization="3bit").validate()
