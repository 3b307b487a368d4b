"""Caption match score of a clip: 100 x cosine(CLIP image features of the middle frame, CLIP text features).

The reference (Open-Sora v1.1, column ``match``) embeds the clip's middle frame and its caption with CLIP
ViT-L/14 and keeps ``100 * cos``; the ``matchmin`` filter drops clips whose caption does not describe them.
Captions longer than the model's context (77 tokens for ViT-L/14) are truncated by the tokenizer, as in the
reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from models.scorers.clip_backbone import DEFAULT_CLIP_MODEL, ClipBackbone, load_clip


def middle_frame(frames: Sequence[np.ndarray]) -> np.ndarray:
    """The frame the match scorer uses when it is handed a whole clip: index len // 2."""
    if len(frames) == 0:
        raise ValueError("a clip with no frames has no middle frame")
    return frames[len(frames) // 2]


class ClipMatchScorer:
    """clip_checkpoint: a local CLIP checkpoint (see ``clip_backbone.load_clip``) or a loaded ``ClipBackbone``."""

    def __init__(
        self,
        clip_checkpoint: str | Path | ClipBackbone | None,
        model_name: str = DEFAULT_CLIP_MODEL,
        device: str | None = None,
        batch_size: int = 64,
    ) -> None:
        if isinstance(clip_checkpoint, ClipBackbone):
            self.clip = clip_checkpoint
        else:
            self.clip = load_clip(clip_checkpoint, model_name, device=device)
        self.batch_size = batch_size

    def score(self, frames: Sequence[np.ndarray], captions: Sequence[str]) -> list[float]:
        """frames[i] is the middle frame (RGB uint8 [H, W, 3]) of clip i, captions[i] its caption."""
        if len(frames) != len(captions):
            raise ValueError(f"{len(frames)} frames but {len(captions)} captions")
        image = self.clip.encode_images(frames, batch_size=self.batch_size)  # [N, D], L2-normalised
        text = self.clip.encode_texts(captions, batch_size=self.batch_size)  # [N, D], L2-normalised
        return (100.0 * (image * text).sum(dim=-1)).tolist()  # row-wise cosine

    def score_clips(self, clips: Sequence[Sequence[np.ndarray]], captions: Sequence[str]) -> list[float]:
        """Same as ``score`` for callers holding every kept frame of each clip: uses each clip's middle frame."""
        return self.score([middle_frame(clip) for clip in clips], captions)
