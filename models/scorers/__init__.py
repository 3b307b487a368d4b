"""Clip scorers of the curation pipeline: aesthetic, optical-flow motion, OCR and caption matching.

Each scorer takes frames that are already decoded (RGB uint8 numpy arrays [H, W, 3]); the cutting pass keeps
exactly the frames each one needs, so no scorer opens a video. Importing this package is cheap: torch, open_clip,
cv2 and rapidocr are imported by the submodules that need them.

Scorers whose weights must come from disk raise :class:`WeightsUnavailable` when the weights are not there, rather
than scoring with random weights: a clip column filled from an untrained network would look like data.
"""

from __future__ import annotations


class WeightsUnavailable(Exception):
    """Weights a scorer needs are not on local disk (the message says which and where). Nothing is downloaded."""


__all__ = ["WeightsUnavailable"]
