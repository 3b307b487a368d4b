import shutil
from pathlib import Path

import pytest

from curation.samples import Shot, write_synthetic_video


@pytest.fixture(scope="session")
def tiny_videos(tmp_path_factory) -> list[Path]:
    """Five distinct small synthetic videos (distinct bytes: each has its own colours)."""
    folder = tmp_path_factory.mktemp("tiny_videos")
    paths = []
    for i in range(5):
        colour = (40 * i + 10, 200 - 30 * i, 90)
        path = folder / f"video_{i}.mp4"
        write_synthetic_video(path, [Shot("moving", 24 + 6 * i, colour), Shot("static", 24, (255 - colour[0], 30, 30))], width=96, height=64, fps=12)
        paths.append(path)
    return paths


def fill_batch(landing: Path, name: str, videos: list[Path]) -> Path:
    folder = landing / name
    folder.mkdir(parents=True, exist_ok=True)
    for v in videos:
        shutil.copy(v, folder / v.name)
    return folder
