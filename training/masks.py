"""Training frame masks of Open-Sora v1.1 (``x_mask``): which frames of a clip are noised and which are conditions.

Open-Sora 1.1 trains one model for generation, image-to-video, video continuation and interpolation by drawing, per
sample, a mask type: most samples are plain generation (``mask_no``); the rest keep a few frames clean as conditions
(first, last, both, or a random run). A mask is bool ``[T]``: True = the frame is noised at timestep t, False = it is a
condition frame (it gets timestep 0, and the loss skips it).

"quarter" types condition on a random 1..T//4 frames, "image" types on exactly one frame; "head_tail" conditions that
many frames at both ends. All randomness comes from the ``torch.Generator`` passed in, so masks are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where masks are drawn, so the config can check ratios without it
    import torch

# Canonical order: the cumulative draw walks the types in this order, whatever the order of the ratios mapping.
MASK_TYPES: tuple[str, ...] = (
    "mask_no",
    "mask_quarter_random",
    "mask_quarter_head",
    "mask_quarter_tail",
    "mask_quarter_head_tail",
    "mask_image_random",
    "mask_image_head",
    "mask_image_tail",
    "mask_image_head_tail",
)

# Reference ratios, the same in all three v1.1 stages.
DEFAULT_MASK_RATIOS: dict[str, float] = {
    "mask_no": 0.75,
    "mask_quarter_random": 0.025,
    "mask_quarter_head": 0.025,
    "mask_quarter_tail": 0.025,
    "mask_quarter_head_tail": 0.05,
    "mask_image_random": 0.025,
    "mask_image_head": 0.025,
    "mask_image_tail": 0.025,
    "mask_image_head_tail": 0.05,
}


def validate_mask_ratios(ratios: Mapping[str, float]) -> dict[str, float]:
    """All nine types with their probability (missing ones are 0). Raises ``ValueError`` on unknown names, values
    outside [0, 1] or a sum other than 1."""
    unknown = [name for name in ratios if name not in MASK_TYPES]
    if unknown:
        raise ValueError(f"unknown mask types {unknown}; valid: {', '.join(MASK_TYPES)}")
    out = {name: float(ratios.get(name, 0.0)) for name in MASK_TYPES}
    for name, ratio in out.items():
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"mask ratio {name} must be in [0, 1], got {ratio}")
    total = sum(out.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise ValueError(f"mask ratios must sum to 1, got {total:.6g} ({out})")
    return out


class MaskGenerator:
    """Draws a mask type per sample with the given probabilities and builds its ``[T]`` frame mask."""

    def __init__(self, ratios: Mapping[str, float] | None = None):
        self.ratios = validate_mask_ratios(DEFAULT_MASK_RATIOS if ratios is None else ratios)

    def __repr__(self) -> str:
        nonzero = {name: ratio for name, ratio in self.ratios.items() if ratio > 0}
        return f"MaskGenerator({nonzero})"

    def sample_type(self, generator: torch.Generator | None = None) -> str:
        """One mask type, by walking the cumulative ratios with a uniform draw."""
        import torch

        u = torch.rand((), generator=generator).item()
        for name in MASK_TYPES:
            u -= self.ratios[name]
            if u < 0:
                return name
        # Rounding can leave u a hair above 0 after the last type: give it to the last type with a ratio.
        return next(name for name in reversed(MASK_TYPES) if self.ratios[name] > 0)

    def get_mask(self, num_frames: int, generator: torch.Generator | None = None) -> tuple[str, torch.Tensor]:
        """``(type, mask)`` for one sample of ``num_frames`` frames; mask is bool ``[num_frames]``, True = noised.

        The type is always drawn first, so the random stream does not depend on ``num_frames``. A clip of one frame
        (an image) is never conditioned. Returns the type actually applied: ``mask_no`` when a head_tail mask would
        leave no noised frame (T = 2).
        """
        import torch

        name = self.sample_type(generator)
        mask = torch.ones(num_frames, dtype=torch.bool)
        if num_frames <= 1 or name == "mask_no":
            return ("mask_no", mask)
        if name.startswith("mask_quarter"):
            max_frames = max(1, num_frames // 4)
            k = int(torch.randint(1, max_frames + 1, (), generator=generator))
        else:  # mask_image_*
            k = 1
        if name.endswith("_random"):
            start = int(torch.randint(0, num_frames - k + 1, (), generator=generator))
            mask[start : start + k] = False
        elif name.endswith("_head_tail"):
            if 2 * k >= num_frames:
                return ("mask_no", mask)
            mask[:k] = False
            mask[-k:] = False
        elif name.endswith("_head"):
            mask[:k] = False
        else:  # _tail
            mask[-k:] = False
        return (name, mask)

    def sample(
        self, batch_size: int, num_frames: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, list[str]]:
        """Masks ``[batch_size, num_frames]`` (bool, CPU) and the type of each row."""
        import torch

        names, masks = [], []
        for _ in range(batch_size):
            name, mask = self.get_mask(num_frames, generator)
            names.append(name)
            masks.append(mask)
        return torch.stack(masks), names

    def get_masks(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Masks for a latent batch ``x`` of shape ``[B, C, T, H, W]``: bool ``[B, T]`` on ``x.device``.

        ``generator`` must be a CPU generator (the draws are made on the CPU); None uses torch's global RNG.
        """
        if x.ndim != 5:
            raise ValueError(f"expected x of shape [B, C, T, H, W], got {tuple(x.shape)}")
        masks, _ = self.sample(x.shape[0], x.shape[2], generator)
        return masks.to(x.device)
