"""Caption clips with a vision-language model loaded from a local folder (LLaVA-1.6 / LLaVA / Qwen2-VL style).

The reference (Open-Sora v1.1, ``tools/caption/caption_llava.py``) captions each clip from its middle frame with
LLaVA-1.6, the frame resized so that its shorter side is 336 when it is larger, greedy decoding, at most 300 new
tokens, batches of 16, and newlines in the answer turned into spaces. We keep those settings as defaults and
drive any Hugging Face image-text-to-text model through ``AutoProcessor`` + ``AutoModelForImageTextToText``, so
the checkpoint's own chat template and image-token expansion are used instead of hand-built prompts.

Weights are never downloaded: the model folder must exist locally, or :class:`WeightsUnavailable` is raised.
``models.scorers.tiny_vlm.build_tiny_vlm`` writes a tiny random model of the same classes for tests.

Importing this module is cheap; torch and transformers are imported when a model is built or loaded.
"""

from __future__ import annotations

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
        self._prompt_text = self._render_prompt(num_frames)

    def _render_prompt(self, n_images: int) -> str:
        """The chat template applied to one user turn: ``n_images`` image slots, then the instruction."""
        content: list[dict] = [{"type": "image"} for _ in range(n_images)]
        content.append({"type": "text", "text": self.prompt})
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )

    def _prompt_for(self, n_images: int) -> str:
        # A clip with fewer kept frames than num_frames shows them all, so its prompt has fewer image slots.
        return self._prompt_text if n_images == self.num_frames else self._render_prompt(n_images)

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


__all__ = [
    "FRAME_POINTS",
    "REFERENCE_PROMPT",
    "REFERENCE_PROMPT_3_FRAMES",
    "VLMCaptioner",
    "WeightsUnavailable",
    "frame_points",
    "resize_like_reference",
    "select_frames",
]
