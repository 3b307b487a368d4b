"""An open_clip model loaded from local weights only, shared by the aesthetic and caption-match scorers.

Production uses CLIP ViT-L/14 with OpenAI's weights (what the LAION aesthetic MLP was trained on, and what the
reference uses for matching). Those weights use QuickGELU, so the default architecture name is
``ViT-L-14-quickgelu``: loading them into plain ``ViT-L-14`` runs without error and silently gives different
features.

Two local layouts load:

- a checkpoint file (``.pt`` / ``.pth`` / ``.bin`` / ``.safetensors``, an open_clip or OpenAI state dict) plus an
  architecture: a built-in open_clip config name, a name registered with ``open_clip.add_model_config``, or the path
  of a config ``.json`` (registered here, so it works in a fresh process);
- a Hugging Face-style open_clip folder: ``open_clip_config.json`` (with ``model_cfg`` and ``preprocess_cfg``)
  beside ``open_clip_pytorch_model.bin`` / ``open_clip_model.safetensors`` / ... (``local-dir:`` in open_clip).

Nothing is downloaded: an unset or missing path raises :class:`WeightsUnavailable` before open_clip is called, and
pretrained *tags* (``"openai"``, ``"laion2b_s32b_b82k"``) are refused because open_clip would fetch them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.scorers import WeightsUnavailable

if TYPE_CHECKING:
    import torch

DEFAULT_CLIP_MODEL = "ViT-L-14-quickgelu"
HF_CONFIG_NAME = "open_clip_config.json"
# Weight file names open_clip looks for in a local folder, most preferred first.
HF_WEIGHT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
)

TINY_CLIP_NAME = "opensora-tiny-clip"
# Test-sized CLIP: ViT with 64 wide, 2 layers, 16 px patches on 64 px images; text 64 wide, 2 layers, 32 tokens.
# vocab_size stays 49408 so that open_clip's packaged BPE tokenizer (SimpleTokenizer) works offline.
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_model_name(model_name: str) -> str:
    """A config name, or the path of an open_clip config JSON (registered so open_clip can build it)."""
    import open_clip

    if model_name.endswith(".json"):
        path = Path(model_name)
        if not path.is_file():
            raise WeightsUnavailable(f"CLIP model config not found at {path}")
        open_clip.add_model_config(path)
        return path.stem
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {model_name!r} (a config name or a .json config path)")
    return model_name


def _find_hf_weights(folder: Path) -> Path | None:
    for name in HF_WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    return None


class ClipBackbone:
    """A loaded open_clip model with its own eval transform and tokenizer; features come out L2-normalised."""

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, device: str, source: str) -> None:
        self.model = model.eval()
        self.preprocess = preprocess  # PIL image -> [3, S, S] tensor (resize shortest side, centre crop, normalise)
        self.tokenizer = tokenizer
        self.device = device
        self.source = source  # where the weights came from, for logs and metadata
        self.embed_dim = int(model.visual.output_dim)
        self.dtype = next(model.visual.parameters()).dtype  # fp16 / bf16 weights want pixels of the same dtype
        self.context_length = int(getattr(tokenizer, "context_length", 77))

    def _to_pixels(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        import torch
        from PIL import Image

        images = []
        for frame in frames:
            frame = np.asarray(frame)
            if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
                raise ValueError(f"expected RGB uint8 frames [H, W, 3], got {frame.dtype} {frame.shape}")
            images.append(self.preprocess(Image.fromarray(frame)))
        return torch.stack(images)  # [B, 3, S, S]

    def encode_images(self, frames: Sequence[np.ndarray], batch_size: int = 64) -> torch.Tensor:
        """RGB uint8 frames [H, W, 3] -> L2-normalised image features [N, D] (float32, on CPU)."""
        import torch

        feats = []
        with torch.inference_mode():
            for start in range(0, len(frames), batch_size):
                pixels = self._to_pixels(frames[start : start + batch_size]).to(self.device, self.dtype)
                f = self.model.encode_image(pixels).float()  # [B, D]
                feats.append(torch.nn.functional.normalize(f, dim=-1).cpu())
        if not feats:
            return torch.empty(0, self.embed_dim)
        return torch.cat(feats)  # [N, D]

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Captions -> L2-normalised text features [N, D] (float32, on CPU); long captions are truncated."""
        import torch

        feats = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenizer(list(texts[start : start + batch_size])).to(self.device)  # [B, L]
                f = self.model.encode_text(tokens).float()  # [B, D]
                feats.append(torch.nn.functional.normalize(f, dim=-1).cpu())
        if not feats:
            return torch.empty(0, self.embed_dim)
        return torch.cat(feats)


def check_clip_checkpoint(checkpoint: str | Path | None) -> Path:
    """The checkpoint as a Path, or WeightsUnavailable saying why it cannot be used (cheap: no model is built)."""
    if checkpoint is None or str(checkpoint).strip() == "":
        raise WeightsUnavailable("CLIP checkpoint path is not set")
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise WeightsUnavailable(f"CLIP weights not found at {path}")
    if path.is_dir():
        if not (path / HF_CONFIG_NAME).is_file():
            raise WeightsUnavailable(f"CLIP folder {path} has no {HF_CONFIG_NAME}")
        if _find_hf_weights(path) is None:
            raise WeightsUnavailable(f"CLIP folder {path} has no weights (looked for {', '.join(HF_WEIGHT_NAMES)})")
    return path


def load_clip(
    checkpoint: str | Path | None,
    model_name: str = DEFAULT_CLIP_MODEL,
    device: str | None = None,
    precision: str = "fp32",
) -> ClipBackbone:
    """Load CLIP from a local checkpoint file or an open_clip folder; ``model_name`` is ignored for a folder.

    precision: ``"fp32"`` (default, the numbers tests compare), or ``"fp16"`` / ``"bf16"`` on a GPU for throughput.
    """
    path = check_clip_checkpoint(checkpoint)

    import open_clip

    device = device or default_device()
    if path.is_dir():
        # 1. A Hugging Face-style folder: config and weights side by side; open_clip reads both via local-dir:.
        name = f"local-dir:{path}"
        model, _, preprocess = open_clip.create_model_and_transforms(name, device=device, precision=precision)
        tokenizer = open_clip.get_tokenizer(name)
    else:
        # 2. A weights file plus an architecture name or config path.
        name = _resolve_model_name(model_name)
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=str(path), device=device, precision=precision
        )
        tokenizer = open_clip.get_tokenizer(name)
    return ClipBackbone(model, preprocess, tokenizer, device=device, source=str(path))


def build_tiny_clip(dest_dir: str | Path, seed: int = 0) -> tuple[str, Path]:
    """Write a tiny random CLIP for tests and demos; returns (config name, checkpoint path).

    ``dest_dir`` then holds ``opensora-tiny-clip.json`` (the architecture; the name is registered with open_clip
    in this process, and the JSON path works as ``model_name`` in any process) and, as a Hugging Face-style folder,
    ``open_clip_config.json`` + ``open_clip_pytorch_model.bin``, so ``load_clip(dest_dir)`` loads it too.
    Its scores mean nothing; it exists so the scoring code runs end to end without real weights.
    """
    import open_clip
    import torch

    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    config_path = dest / f"{TINY_CLIP_NAME}.json"
    config_path.write_text(json.dumps(TINY_CLIP_CONFIG, indent=2))
    open_clip.add_model_config(config_path)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**TINY_CLIP_CONFIG)  # built directly: random on purpose, no "no weights" warning
    checkpoint = dest / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), checkpoint)

    preprocess_cfg = {
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    hf_config = {"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": preprocess_cfg}
    (dest / HF_CONFIG_NAME).write_text(json.dumps(hf_config, indent=2))
    return TINY_CLIP_NAME, checkpoint
