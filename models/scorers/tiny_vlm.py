"""Tiny random vision-language models for tests: the same classes as the real captioner checkpoints, built offline.

:func:`build_tiny_vlm` writes a LLaVA-1.6 (``LlavaNextForConditionalGeneration``) or Qwen2-VL model and its
processor into a folder with ``save_pretrained``, so :class:`models.scorers.captioner.VLMCaptioner` loads it exactly
as it loads a real checkpoint. The weights are random: nothing such a model says is a caption.

Importing this module is cheap; torch, tokenizers and transformers are imported when a model is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models.scorers.captioner import REFERENCE_PROMPT, REFERENCE_PROMPT_3_FRAMES


@dataclass(frozen=True)
class TinyVLMSpec:
    """Sizes of the tiny random models: small enough to load and generate in well under a second on a CPU."""

    hidden_size: int = 32
    intermediate_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    image_size: int = 32  # LLaVA vision tower input; Qwen2-VL: max_pixels = image_size ** 2
    patch_size: int = 8
    max_position_embeddings: int = 4096
    seed: int = 0


_LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %} [/INST]"
    "{% else %}{% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}"
)

_QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tiny_tokenizer(special_tokens: list[str], unk: str, **named: str):
    """A word-level tokenizer over the reference prompt's words plus single characters, built without any files."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in [unk, *special_tokens]:
        vocab.setdefault(token, len(vocab))
    pre = pre_tokenizers.Whitespace()
    for word, _ in pre.pre_tokenize_str(REFERENCE_PROMPT + " " + REFERENCE_PROMPT_3_FRAMES):
        vocab.setdefault(word, len(vocab))
    for ch in string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, glues punctuation
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=unk, **named)
    extra = [t for t in special_tokens if t not in named.values()]
    tokenizer.add_special_tokens({"additional_special_tokens": extra})
    return tokenizer


def _build_tiny_llava_next(spec: TinyVLMSpec):
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        MistralConfig,
    )

    tokenizer = _tiny_tokenizer(
        ["<s>", "</s>", "<pad>", "<image>", "[INST]", "[/INST]"],
        unk="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    s = spec.image_size
    pinpoints = [[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]]  # the anyres grid, scaled down from 336-based ones
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": s}, crop_size={"height": s, "width": s}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" feature strategy
        chat_template=_LLAVA_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        image_size=s,
        patch_size=spec.patch_size,
        projection_dim=spec.hidden_size,
    )
    text = MistralConfig(  # LLaVA-1.6-Mistral-7B is the reference's captioner; same text family here
        **_tiny_text_fields(spec, tokenizer),
        head_dim=spec.hidden_size // spec.num_heads,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    return LlavaNextForConditionalGeneration(config), processor


def _tiny_text_fields(spec: TinyVLMSpec, tokenizer) -> dict:
    """The language model's size, the same for every family: one key-value head, the spec's widths and depth."""
    return dict(vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=1,
                max_position_embeddings=spec.max_position_embeddings)


def _build_tiny_qwen2_vl(spec: TinyVLMSpec):
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = _tiny_tokenizer(specials, unk="<unk>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    pixels = dict(
        min_pixels=(spec.image_size // 2) ** 2,
        max_pixels=spec.image_size**2,
        patch_size=spec.patch_size,
        temporal_patch_size=2,
        merge_size=2,
    )
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer,
        chat_template=_QWEN2_VL_TEMPLATE,
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    head_dim = spec.hidden_size // spec.num_heads
    config = Qwen2VLConfig(
        vision_config=dict(
            depth=spec.num_layers,
            embed_dim=spec.hidden_size,
            hidden_size=spec.hidden_size,
            num_heads=spec.num_heads,
            mlp_ratio=2,
            patch_size=spec.patch_size,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        text_config=dict(
            **_tiny_text_fields(spec, tokenizer),
            # M-RoPE splits head_dim / 2 rotary pairs into (temporal, height, width) sections.
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [head_dim // 8, head_dim // 8, head_dim // 4]},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen2VLForConditionalGeneration(config), processor


TINY_VLM_FAMILIES = {"llava": _build_tiny_llava_next, "qwen2_vl": _build_tiny_qwen2_vl}


def build_tiny_vlm(dest_dir: str | Path, family: str = "llava", spec: TinyVLMSpec = TinyVLMSpec()) -> Path:
    """Write a tiny random VLM + processor into ``dest_dir`` with ``save_pretrained``; fully offline.

    ``family="llava"`` gives a ``LlavaNextForConditionalGeneration`` (LLaVA-1.6 layout: CLIP vision tower, anyres
    grid, Mistral text model, ``[INST]`` template); ``family="qwen2_vl"`` a ``Qwen2VLForConditionalGeneration``.
    The weights are random: its words prove the loading and generation path, not a caption.
    """
    if family not in TINY_VLM_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {sorted(TINY_VLM_FAMILIES)}")
    import torch

    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model, processor = TINY_VLM_FAMILIES[family](spec)
    model.eval()
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    return dest


__all__ = ["TINY_VLM_FAMILIES", "TinyVLMSpec", "build_tiny_vlm"]
