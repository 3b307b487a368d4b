"""Training test helpers: the tiny model overrides and the training command line."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


# A model small enough for tests; every other field comes from the demo-cpu preset.
TINY_OVERRIDES = [
    "model.overrides={input_sq_size: 64, hidden_size: 48, depth: 1, num_heads: 4, class_dropout_prob: 0.1}",
    "encoders.model_max_length=16",
    "val_max_samples=4",
    "log_every=1",
    "val_every=0",
]


def train_command(dataset: Path, outdir: Path, steps: int, ckpt_every: int, extra: list[str] = ()) -> list[str]:
    import sys

    cmd = [sys.executable, "-m", "training.train", "demo-cpu", "--dataset", str(dataset), "--outdir", str(outdir),
           "--steps", str(steps), "--ckpt-every", str(ckpt_every)]
    for item in [*TINY_OVERRIDES, *extra]:
        cmd += ["--set", item]
    return cmd
