"""Caption clips with a vision-language model loaded from a local folder (LLaVA-1.6 / LLaVA / Qwen2-VL style).

The reference (Open-Sora v1.1, ``tools/caption/caption_llava.py``) captions each clip from its middle frame with
LLaVA-1.6, the frame resized so that its shorter side is 336 when it is larger, greedy decoding, at most 300 new
tokens, batches of 16, and newlines in the answer turned into spaces. We keep those settings as defaults and
drive any Hugging Face image-text-to-text model through ``AutoProcessor`` + ``AutoModelForImageTextToText``, so
the checkpoint's own chat template and image-token expansion are used instead of hand-built prompts.

Weights are never downloaded: the model folder must exist locally, or :class:`WeightsUnavailable` is raised.
``build_tiny_vlm`` writes a tiny random model of the same classes for tests (nothing it says is a caption).

Importing this module is cheap; torch and transformers are imported when a model is built or loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from models.scorers import WeightsUnavailable

if TYPE_CHECKING:
    import torch
    from PIL import Image

# The reference's default captioning prompt for LLaVA (one frame): ``PROMPTS["video-f1-detail-3ex"]`` in
# Open-Sora v1.1 ``tools/caption/utils.py``, selected by ``--prompt video-f1-detail-3ex`` in ``caption_llava.py``.
# Kept verbatim (examples and spelling included) because the captions it produced are what v1.1 trained on.
REFERENCE_PROMPT = (
    "A video is given by providing the middle frame. Describe this video and its style to generate a description. "
    "Pay attention to all objects in the video. The description should be useful for AI to re-generate the video. "
    "The description should be no more than six sentences. Here are some examples of good descriptions: "
    "1. A stylish woman walks down a Tokyo street filled with warm glowing neon and animated city signage. She wears "
    "a black leather jacket, a long red dress, and black boots, and carries a black purse. She wears sunglasses and "
    "red lipstick. She walks confidently and casually. The street is damp and reflective, creating a mirror effect "
    "of the colorful lights. Many pedestrians walk about. 2. Several giant wooly mammoths approach treading through a "
    "snowy meadow, their long wooly fur lightly blows in the wind as they walk, snow covered trees and dramatic snow "
    "capped mountains in the distance, mid afternoon light with wispy clouds and a sun high in the distance creates a "
    "warm glow, the low camera view is stunning capturing the large furry mammal with beautiful photography, depth of "
    "field. 3. Drone view of waves crashing against the rugged cliffs along Big Sur's garay point beach. The crashing "
    "blue waters create white-tipped waves, while the golden light of the setting sun illuminates the rocky shore. A "
    "small island with a lighthouse sits in the distance, and green shrubbery covers the cliff's edge. The steep drop "
    "from the road down to the beach is a dramatic feat, with the cliff\u2019s edges jutting out over the sea. This is "
    "a view that captures the raw beauty of the coast and the rugged landscape of the Pacific Coast Highway."
)

# The same prompt for three frames (``PROMPTS["video-f3-detail-3ex"]``; the reference's GPT-4V path uses 3 frames).
REFERENCE_PROMPT_3_FRAMES = REFERENCE_PROMPT.replace(
    "A video is given by providing the middle frame.",
    "A video is given by providing three frames in chronological order.",
).replace(
    "Pay attention to all objects in the video. ",
    "Pay attention to all objects in the video. Do not describe each frame individually. "
    "Do not reply with words like 'first frame'. ",
)

# Where in a clip the reference takes its frames, as fractions of the clip length (``NUM_FRAMES_POINTS``).
FRAME_POINTS: dict[int, tuple[float, ...]] = {1: (0.5,), 2: (0.25, 0.75), 3: (0.1, 0.5, 0.9)}


def frame_points(num_frames: int) -> tuple[float, ...]:
    """Fractions of the clip at which to take ``num_frames`` frames: the reference's points, else evenly spaced."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_frames in FRAME_POINTS:
        return FRAME_POINTS[num_frames]
    return tuple((k + 0.5) / num_frames for k in range(num_frames))


def select_frames(frames: Sequence[Any], num_frames: int) -> list[Any]:
    """Pick ``num_frames`` of the frames kept for a clip at the reference's points (all of them if fewer)."""
    if len(frames) == 0:
        raise ValueError("a clip needs at least one frame to be captioned")
    if len(frames) <= num_frames:
        return list(frames)
    return [frames[min(len(frames) - 1, int(p * len(frames)))] for p in frame_points(num_frames)]


def resize_like_reference(image: "Image.Image", size: int) -> "Image.Image":
    """The reference's pre-resize: when either side exceeds ``size``, scale (bicubic) so the shorter side is ``size``.

    This mirrors ``transforms.Resize(size)`` applied under ``if w > size or h > size`` in the reference, including its
    quirk that a tall thin frame (shorter side below ``size``) is scaled up.
    """
    from PIL import Image

    w, h = image.size
    if w <= size and h <= size:
        return image
    if w <= h:
        new_w, new_h = size, max(1, int(size * h / w))
    else:
        new_w, new_h = max(1, int(size * w / h)), size
    return image.resize((new_w, new_h), Image.Resampling.BICUBIC)


def _to_pil(frame: Any) -> "Image.Image":
    """RGB uint8 array [H, W, 3] (what the cutting pass keeps) or a PIL image -> RGB PIL image."""
    import numpy as np
    from PIL import Image

    if isinstance(frame, Image.Image):
        return frame.convert("RGB")
    array = np.asarray(frame)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 frame [H, W, 3], got dtype {array.dtype} shape {tuple(array.shape)}")
    return Image.fromarray(array, mode="RGB")


def _resolve_dtype(dtype: "str | torch.dtype | None", device: str) -> "torch.dtype":
    import torch

    if dtype is None:
        # The reference runs LLaVA in float16 on GPU; CPU half-precision matmuls are slow or missing, so float32 there.
        return torch.float16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        return resolved
    return dtype


class VLMCaptioner:
    """Greedy, batched captions from a local image-text-to-text checkpoint.

    Args:
        model_path: folder holding ``config.json``, the weights and the processor files (``save_pretrained`` layout).
        prompt: the user instruction; the reference's LLaVA prompt by default.
        max_new_tokens: generation budget per clip (reference: 300).
        num_frames: frames shown per clip (reference LLaVA: 1, the middle one).
        image_size: the reference's pre-resize size (336 for LLaVA-1.6), applied before the model's own processor.
        batch_size: clips per ``generate`` call (reference: 16).
        device: torch device string; CUDA when available if None.
        dtype: torch dtype or its name; float16 on CUDA, float32 on CPU if None.
    """

    def __init__(
        self,
        model_path: str | Path,
        prompt: str = REFERENCE_PROMPT,
        max_new_tokens: int = 300,
        num_frames: int = 1,
        image_size: int = 336,
        batch_size: int = 16,
        device: str | None = None,
        dtype: "str | torch.dtype | None" = None,
    ) -> None:
        model_path = Path(model_path)
        if not (model_path / "config.json").is_file():
            raise WeightsUnavailable(
                f"captioner model folder {model_path} is missing or has no config.json; put a save_pretrained "
                "checkpoint there (e.g. llava-hf/llava-v1.6-mistral-7b-hf) - nothing is downloaded"
            )
        if max_new_tokens < 1 or batch_size < 1 or image_size < 1:
            raise ValueError("max_new_tokens, batch_size and image_size must be >= 1")
        frame_points(num_frames)  # validates num_frames

        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.model_path = model_path
        self.name = model_path.name
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.num_frames = num_frames
        self.image_size = image_size
        self.batch_size = batch_size
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = _resolve_dtype(dtype, self.device)

        # 1. Processor: tokenizer + image processor + chat template, all from the folder.
        self.processor = AutoProcessor.from_pretrained(model_path, local_files_only=True)
        if getattr(self.processor, "chat_template", None) is None:
            raise ValueError(f"the processor in {model_path} has no chat template; save one with the processor")
        # Batched generation appends new tokens on the right, so prompts of different lengths are padded on the left.
        self.processor.tokenizer.padding_side = "left"

        # 2. Model in eval mode on the target device.
        self.model = AutoModelForImageTextToText.from_pretrained(model_path, local_files_only=True, dtype=self.dtype)
        self.model.to(self.device).eval()

        # 3. The prompt text is the same for every clip: render the chat template once.
        content: list[dict] = [{"type": "image"} for _ in range(num_frames)]
        content.append({"type": "text", "text": prompt})
        self._prompt_text = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )

    def _prompt_for(self, n_images: int) -> str:
        if n_images == self.num_frames:
            return self._prompt_text
        content: list[dict] = [{"type": "image"} for _ in range(n_images)]
        content.append({"type": "text", "text": self.prompt})
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )

    def caption(self, clips_frames: Sequence[Sequence[Any]]) -> list[str]:
        """One caption per clip. ``clips_frames[i]`` holds the frames kept for clip i (RGB uint8 [H, W, 3] or PIL).

        Frames beyond ``num_frames`` are subsampled at the reference's points. The returned strings are the decoded
        new tokens only (the prompt is not echoed), newlines turned into spaces, stripped. No other cleaning here:
        prefix and URL removal belong to the dataset's caption cleaning.
        """
        captions: list[str] = []
        for start in range(0, len(clips_frames), self.batch_size):
            captions.extend(self._caption_batch(clips_frames[start : start + self.batch_size]))
        return captions

    def _caption_batch(self, batch: Sequence[Sequence[Any]]) -> list[str]:
        import torch

        images = [
            [resize_like_reference(_to_pil(f), self.image_size) for f in select_frames(frames, self.num_frames)]
            for frames in batch
        ]
        texts = [self._prompt_for(len(clip_images)) for clip_images in images]
        inputs = self.processor(images=images, text=texts, padding=True, return_tensors="pt")
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        prompt_len = inputs["input_ids"].shape[1]
        with torch.inference_mode():
            output_ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new_tokens = output_ids[:, prompt_len:]  # (B, <= max_new_tokens): decoder-only models echo the prompt first
        decoded = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return [text.replace("\n", " ").strip() for text in decoded]


# ---------------------------------------------------------------------------------------------------------------
# Tiny random models for tests (same classes as the real checkpoints; built offline)
# ---------------------------------------------------------------------------------------------------------------


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
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=1,
        head_dim=spec.hidden_size // spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
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
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=1,
            max_position_embeddings=spec.max_position_embeddings,
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


__all__ = [
    "FRAME_POINTS",
    "REFERENCE_PROMPT",
    "REFERENCE_PROMPT_3_FRAMES",
    "TINY_VLM_FAMILIES",
    "TinyVLMSpec",
    "VLMCaptioner",
    "WeightsUnavailable",
    "build_tiny_vlm",
    "frame_points",
    "resize_like_reference",
    "select_frames",
]
