"""Make docs/demo_preview_strip.png from a demo evaluation: one row per sample, evenly spaced frames, its prompt and
prompt-adherence score (trained / step 0) above the row.

    python docs/make_preview_strip.py $OPENSORA_HOME/media/evaluations/<...>/world_v1-<hash> docs/demo_preview_strip.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def read_frames(path: Path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def preview_strip(evaluation_dir: Path, out: Path, frames_per_row: int = 4, scale: int = 2) -> Path:
    import cv2

    report = json.loads((evaluation_dir / "report.json").read_text())
    rows = []
    for sample in report["samples"]:
        frames = read_frames(Path(sample["files"]["mp4"]))
        picks = np.linspace(0, len(frames) - 1, frames_per_row).round().astype(int)
        row = np.concatenate([np.pad(frames[i], ((0, 0), (0, 4), (0, 0)), constant_values=255) for i in picks], axis=1)
        row = cv2.resize(row, (row.shape[1] * scale, row.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
        trained, step0 = sample["metrics"].get("prompt_adherence"), sample["metrics"].get("prompt_adherence_step0")
        label = sample["prompt"].replace("a red circle and a yellow square ", "red circle + yellow square ")
        scores = "" if trained is None else f"  [adherence {trained:.2f}; step 0 {step0:.2f}]"
        header = np.full((22, row.shape[1], 3), 255, np.uint8)
        cv2.putText(header, (label[:70] + scores), (4, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        rows.append(np.concatenate([header, row], axis=0))
    width = max(r.shape[1] for r in rows)
    strip = np.concatenate([np.pad(r, ((0, 6), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), cv2.cvtColor(strip, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    return out


if __name__ == "__main__":
    print(preview_strip(Path(sys.argv[1]), Path(sys.argv[2])))
