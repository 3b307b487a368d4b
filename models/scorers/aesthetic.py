"""Aesthetic score of a clip: the LAION improved-aesthetic predictor on CLIP ViT-L/14 image features.

The reference (Open-Sora v1.1, column ``aes``) embeds the frames at 10%, 50% and 90% of a clip with CLIP ViT-L/14,
L2-normalises the features, maps each through the MLP 768 -> 1024 -> 128 -> 64 -> 16 -> 1 of LAION's
improved-aesthetic-predictor (``sac+logos+ava1-l14-linearMSE.pth``) and averages over the frames. Scores sit
around 4-7: 5.5 is fair, 6.5 high; the pipeline keeps clips at 5 or above.

The MLP has no activations (it is linear end to end; the dropouts only mattered in training). Its layer layout is
kept exactly so that the public state dict loads by key: ``layers.{0,2,4,6,7}.{weight,bias}``.
This module imports torch (open_clip stays lazy); import it where scoring happens, not at Dagster load time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.scorers import WeightsUnavailable
from models.scorers.clip_backbone import DEFAULT_CLIP_MODEL, ClipBackbone, check_clip_checkpoint, load_clip

AESTHETIC_FRAME_POINTS = (0.1, 0.5, 0.9)  # fractions of the clip whose frames are scored
AESTHETIC_IN_DIM = 768  # CLIP ViT-L/14 embedding width


class AestheticMLP(nn.Module):
    """768 -> 1024 -> 128 -> 64 -> 16 -> 1, with the reference's dropouts in place so the keys line up."""

    def __init__(self, in_dim: int = AESTHETIC_IN_DIM) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.layers = nn.Sequential(
            nn.Linear(in_dim, 1024),  # layers.0
            nn.Dropout(0.2),
            nn.Linear(1024, 128),  # layers.2
            nn.Dropout(0.2),
            nn.Linear(128, 64),  # layers.4
            nn.Dropout(0.1),
            nn.Linear(64, 16),  # layers.6
            nn.Linear(16, 1),  # layers.7
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # [N, in_dim] -> [N, 1]


def check_mlp_checkpoint(path: str | Path | None) -> Path:
    """The MLP weights file as a Path, or WeightsUnavailable saying why it cannot be used."""
    if path is None or str(path).strip() == "":
        raise WeightsUnavailable("aesthetic MLP weights path is not set")
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsUnavailable(f"aesthetic MLP weights not found at {path}")
    return path


def load_aesthetic_mlp(path: str | Path | None, device: str = "cpu") -> AestheticMLP:
    """Load the MLP from a local state dict; the input width is read from ``layers.0.weight``."""
    path = check_mlp_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:  # a Lightning checkpoint around the same module
        state = state["state_dict"]
    if "layers.0.weight" not in state:
        raise ValueError(f"{path} is not an aesthetic MLP state dict (keys: {sorted(state)[:6]}...)")
    mlp = AestheticMLP(in_dim=int(state["layers.0.weight"].shape[1]))
    mlp.load_state_dict(state, strict=True)
    return mlp.to(device).eval()


class AestheticScorer:
    """CLIP image features -> aesthetic MLP -> mean over a clip's frames.

    clip_checkpoint: a local CLIP checkpoint (see ``clip_backbone.load_clip``) or an already loaded ``ClipBackbone``
    (to share one model with the match scorer). The MLP's input width must equal the CLIP embedding width.
    """

    def __init__(
        self,
        clip_checkpoint: str | Path | ClipBackbone | None,
        mlp_checkpoint: str | Path | None,
        device: str | None = None,
        batch_size: int = 64,
        clip_model_name: str = DEFAULT_CLIP_MODEL,
    ) -> None:
        # Check both paths before loading either, so a missing MLP fails fast without building ViT-L/14.
        if not isinstance(clip_checkpoint, ClipBackbone):
            check_clip_checkpoint(clip_checkpoint)
        check_mlp_checkpoint(mlp_checkpoint)

        if isinstance(clip_checkpoint, ClipBackbone):
            self.clip = clip_checkpoint
        else:
            self.clip = load_clip(clip_checkpoint, clip_model_name, device=device)
        self.mlp = load_aesthetic_mlp(mlp_checkpoint, device=self.clip.device)
        if self.mlp.in_dim != self.clip.embed_dim:
            raise ValueError(
                f"aesthetic MLP takes {self.mlp.in_dim}-d features but the CLIP model gives {self.clip.embed_dim}-d"
            )
        self.batch_size = batch_size

    def score_frames(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        """Per-frame aesthetic scores [N] for RGB uint8 frames [H, W, 3]."""

        feats = self.clip.encode_images(frames, batch_size=self.batch_size)  # [N, D], L2-normalised
        with torch.inference_mode():
            scores = self.mlp(feats.to(self.clip.device)).squeeze(-1)  # [N]
        return scores.float().cpu().numpy()

    def score_clips(self, clips: Sequence[Sequence[np.ndarray]]) -> list[float]:
        """One score per clip: the mean over its frames. All frames are embedded together in batches."""
        for i, clip in enumerate(clips):
            if len(clip) == 0:
                raise ValueError(f"clip {i} has no frames to score")
        flat = [frame for clip in clips for frame in clip]
        per_frame = self.score_frames(flat)
        out, start = [], 0
        for clip in clips:
            out.append(float(per_frame[start : start + len(clip)].mean()))
            start += len(clip)
        return out
