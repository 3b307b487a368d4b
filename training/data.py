"""Training data: rows of a dataset version (Parquet or Open-Sora CSV) decoded into bucketed video batches.

The sampler (``training.sampler.VariableVideoBatchSampler``) decides each sample's ``(t, H, W)``; the dataset
decodes ``t`` frames spaced ``frame_interval`` apart from a random window (seeded by seed, epoch and row, so a
resumed run sees the same frames), resizes to fill ``H x W`` and centre-crops. Images (``num_frames == 1``) load
as one-frame videos with the image fps of the reference (120).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch


IMAGE_FPS = 120
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
REQUIRED_COLUMNS = ("path", "text", "num_frames", "height", "width")


def load_rows(path: str | Path) -> pl.DataFrame:
    """A dataset table (Parquet file, a folder holding ``data.parquet``, or an Open-Sora CSV), validated."""
    path = Path(path)
    if path.is_dir():
        path = path / "data.parquet"
    if path.suffix == ".csv":
        frame = pl.read_csv(path)
    elif path.suffix == ".parquet":
        frame = pl.read_parquet(path)
    else:
        raise ValueError(f"dataset must be a .parquet, a .csv or a dataset version folder, got {path}")
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(
            f"dataset {path} lacks columns {missing}; a training table needs {list(REQUIRED_COLUMNS)} "
            f"(optional: fps, aspect_ratio, id); it has {frame.columns}"
        )
    if "id" not in frame.columns:
        frame = frame.with_columns(pl.col("path").alias("id"))
    if "fps" not in frame.columns:
        frame = frame.with_columns(pl.lit(None, dtype=pl.Float64).alias("fps"))
    return frame


def validation_score(clip_id: str) -> float:
    """A uniform number in [0, 1) fixed by the clip id: the same clip is held out in every run and version."""
    digest = hashlib.sha256(str(clip_id).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_rows(frame: pl.DataFrame, val_fraction: float) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(train, held-out): a clip is held out when its score is below ``val_fraction``.

    On a table so small that the threshold holds nothing out, the clip with the lowest score is held out, so a
    run always has something to validate on (unless the table has a single row).
    """
    if val_fraction <= 0 or len(frame) < 2:
        return frame, frame.head(0)
    scores = pl.Series([validation_score(i) for i in frame["id"].to_list()], dtype=pl.Float64)
    held = scores < val_fraction
    if not held.any():
        held = scores == scores.min()
    return frame.filter(~held), frame.filter(held)


def frame_indices(total: int, t: int, frame_interval: int, rng: np.random.Generator) -> np.ndarray:
    """``t`` indices spread over a random window of ``t * frame_interval`` frames (the reference's temporal crop)."""
    window = min(total, t * frame_interval)
    start = int(rng.integers(0, total - window + 1))
    return np.linspace(start, start + window - 1, t).astype(int)


def resize_fill_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[T, 3, h, w] uint8 -> [T, 3, height, width] float: scale to cover, then centre-crop."""
    import torch.nn.functional as F

    _, _, h, w = frames.shape
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    x = F.interpolate(frames.float(), size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return x[:, :, top : top + height, left : left + width]


class VideoTextDataset(torch.utils.data.Dataset):
    """Indexed by ``SampleIndex(row, t, H, W)``; returns video in [-1, 1] as [3, t, H, W] plus its conditioning."""

    def __init__(self, rows: pl.DataFrame, frame_interval: int, seed: int = 42):
        self.rows = rows.to_dicts()
        self.frame_interval = frame_interval
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def load_frames(self, row: dict[str, Any], t: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        from common.storage import local_media_path

        indices = frame_indices(int(row["num_frames"]), t, self.frame_interval, rng)
        if row.get("virtual"):  # a frame range of its frozen source, decoded by seeking (curation.virtual_clips)
            from curation.virtual_clips import read_clip_frames

            return np.stack(read_clip_frames(row, indices.tolist())), float(row.get("fps") or 30.0)
        path = local_media_path(row["path"])  # an s3:// clip: its cached local copy
        if path.suffix.lower() in IMAGE_EXTENSIONS or int(row["num_frames"]) == 1:
            from PIL import Image

            with Image.open(path) as image:
                frame = np.asarray(image.convert("RGB"))
            return np.repeat(frame[None], t, axis=0), float(IMAGE_FPS)
        from curation.video_io import read_frames

        frames = np.stack(read_frames(path, indices.tolist()))
        return frames, float(row.get("fps") or 30.0)

    def __getitem__(self, index: tuple[int, int, int, int]) -> dict[str, Any]:
        """``index``: the sampler's ``SampleIndex(row, t, H, W)`` (``training.sampler``), or any such 4-tuple."""
        row_index, num_frames, height, width = index
        row = self.rows[row_index]
        rng = np.random.default_rng([self.seed, self.epoch, row_index])
        frames, fps = self.load_frames(row, num_frames, rng)  # [t, h, w, 3] uint8
        video = resize_fill_crop(torch.from_numpy(frames).permute(0, 3, 1, 2), height, width)
        video = (video / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()  # [3, t, H, W]
        return {
            "video": video,
            "text": row["text"],
            "id": str(row["id"]),
            "num_frames": num_frames,
            "height": height,
            "width": width,
            # The reference's training data passes ar = W / H (inference passes H / W): kept for weight compatibility.
            "ar": width / height,
            "fps": fps,
        }


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {"video": torch.stack([s["video"] for s in samples])}
    batch["text"] = [s["text"] for s in samples]
    batch["id"] = [s["id"] for s in samples]
    for key in ("num_frames", "height", "width", "ar", "fps"):
        batch[key] = torch.tensor([float(s[key]) for s in samples], dtype=torch.float32)
    return batch
