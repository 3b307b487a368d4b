"""Reading and writing STDiT2 weights in the layouts they are found in.

Accepted sources (all local; nothing is ever downloaded):

- one file: ``.safetensors``, or a torch pickle ``.pt`` / ``.pth`` / ``.bin`` (read with ``weights_only=True``),
  possibly wrapping the state dict under ``model`` / ``state_dict`` / ``module`` / ``ema`` and with ``module.`` or
  ``_orig_mod.`` key prefixes;
- a sharded directory: an index json (``*.safetensors.index.json`` / ``pytorch_model.bin.index.json`` with a
  ``weight_map``), or just the shard files (``*.safetensors``, ``pytorch_model-0000x-of-0000y.bin``);
- a Hugging Face-format directory (``config.json`` + ``model.safetensors``, as hpcai-tech/OpenSora-STDiT-v2-stage*);
- a reference training checkpoint folder (``epochX-global_stepY/``), whose ``model/`` subfolder holds the shards.

Checkpoints trained with another text length (y_embedding [120, 4096] vs the configured 200) are adapted the
way the reference does: lengthen by repeating the last row, shorten by keeping the first rows.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.files import atomic_dir

if TYPE_CHECKING:
    import torch

    from models.stdit2 import STDiT2
    from models.stdit2_config import STDiT2Config

Y_EMBEDDING_KEY = "y_embedder.y_embedding"
# Deterministic constants that a converted checkpoint may legitimately leave out; the model keeps its own value.
OPTIONAL_KEYS = frozenset({"rope.freqs"})
_WRAPPER_KEYS = ("model", "state_dict", "module", "model_state_dict", "ema")
_KEY_PREFIXES = ("module.", "_orig_mod.", "model.")
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin")


class CheckpointMismatchError(ValueError):
    """The checkpoint's names or shapes do not fit the model; the message lists every offending key."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched

        def block(title: str, keys: list[str]) -> str:
            return f"\n  {title} ({len(keys)}):" + "".join(f"\n    {k}" for k in keys) if keys else ""

        super().__init__(
            f"checkpoint {source} does not fit this STDiT2"
            + block("missing keys", missing)
            + block("unexpected keys", unexpected)
            + block("shape mismatches", mismatched)
        )


@dataclass(frozen=True)
class LoadResult:
    """What :func:`load_stdit2_weights` read."""

    source: str
    files: tuple[str, ...]
    num_tensors: int
    y_embedding_resized: tuple[int, int] | None = None  # (length in the checkpoint, length in the model)


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


def _load_file(path: Path) -> dict[str, "torch.Tensor"]:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if path.suffix in _PICKLE_SUFFIXES:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as err:  # pickles with code are refused on purpose
            raise ValueError(f"cannot read {path} as a weights-only torch checkpoint: {err}") from err
        return _unwrap(obj, path)
    raise ValueError(f"unsupported checkpoint file {path} (expected .safetensors, .pt, .pth or .bin)")


def _unwrap(obj: Any, path: Path) -> dict[str, "torch.Tensor"]:
    import torch

    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                return _unwrap(obj[key], path)
    raise ValueError(f"{path} holds no state dict (a mapping of names to tensors, possibly under one of "
                     f"{_WRAPPER_KEYS})")


def _strip_prefixes(sd: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    changed = True
    while changed and sd:
        changed = False
        for prefix in _KEY_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def _files_in_dir(path: Path) -> list[Path]:
    """The weight files a directory stands for (see the module docstring for the layouts)."""
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    indexes = sorted(path.glob("*.index.json"))
    if indexes:
        files: list[Path] = []
        for index in indexes:
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no 'weight_map'")
            for name in sorted(set(weight_map.values())):
                if not (path / name).is_file():
                    raise FileNotFoundError(f"{index} names shard {name}, which is not in {path}")
                files.append(path / name)
        return files
    for single in ("pytorch_model.bin", "model.pt", "model.pth"):
        if (path / single).is_file():
            return [path / single]
    if (path / "model").is_dir():
        return _files_in_dir(path / "model")
    shards = sorted(path.glob("*.safetensors")) or sorted(p for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if shards:
        return shards
    raise FileNotFoundError(f"no STDiT2 weights found in {path}: expected model.safetensors, an *.index.json with "
                            f"shards, *.safetensors / *.bin shards or a model/ subfolder; found "
                            f"{sorted(p.name for p in path.iterdir())}")


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, "torch.Tensor"], list[Path]]:
    """All tensors of a checkpoint file or directory (CPU), with key prefixes removed, and the files read."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    files = _files_in_dir(path) if path.is_dir() else [path]
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        part = _strip_prefixes(_load_file(f))
        dup = sorted(set(part) & set(sd))
        if dup:
            raise ValueError(f"shard {f} repeats {len(dup)} keys already read, e.g. {dup[:3]}")
        sd.update(part)
    return sd, files


def adapt_y_embedding(y_embedding: "torch.Tensor", length: int) -> "torch.Tensor":
    """Change the null caption's token count: repeat the last row to lengthen, keep the first rows to shorten."""
    import torch

    n = y_embedding.shape[0]
    if length > n:
        return torch.cat([y_embedding, y_embedding[-1:].expand(length - n, -1)], dim=0)
    return y_embedding[:length].clone()


def load_stdit2_weights(model: "STDiT2", path: str | os.PathLike, *, strict: bool = True) -> LoadResult:
    """Load weights into ``model`` (any supported layout); raises :class:`CheckpointMismatchError` with every
    missing / unexpected / mis-shaped key. ``strict=False`` tolerates missing and unexpected keys, never shapes."""
    import torch

    sd, files = read_state_dict(path)
    expected = model.state_dict()
    resized = None
    if Y_EMBEDDING_KEY in sd and Y_EMBEDDING_KEY in expected:
        have, want = sd[Y_EMBEDDING_KEY], expected[Y_EMBEDDING_KEY]
        if have.ndim == 2 and have.shape[1] == want.shape[1] and have.shape[0] != want.shape[0]:
            sd[Y_EMBEDDING_KEY] = adapt_y_embedding(have, want.shape[0])
            resized = (have.shape[0], want.shape[0])

    missing = sorted(set(expected) - set(sd) - OPTIONAL_KEYS)
    unexpected = sorted(set(sd) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {list(sd[k].shape)} vs model {list(expected[k].shape)}"
        for k in set(sd) & set(expected)
        if sd[k].shape != expected[k].shape
    )
    if mismatched or (strict and (missing or unexpected)):
        raise CheckpointMismatchError(str(path), missing, unexpected if strict else [], mismatched)
    with torch.no_grad():
        model.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=False)
    return LoadResult(str(path), tuple(str(f) for f in files), len(sd), resized)


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face-format directories
# ---------------------------------------------------------------------------------------------------------------------


def _find_kwargs(cfg: Any) -> Mapping[str, Any] | None:
    """The (possibly nested) mapping that holds the STDiT2 constructor kwargs."""
    queue = [cfg]
    while queue:
        node = queue.pop(0)
        if isinstance(node, Mapping):
            if "hidden_size" in node and "depth" in node:
                return node
            queue.extend(node.values())
    return None


def config_from_hf_dir(path: str | os.PathLike) -> "STDiT2Config":
    """STDiT2Config from a Hugging Face-format directory's config.json (or the json file itself).

    Extra keys (``architectures``, ``model_type``, ``torch_dtype``, ...) are ignored; the kwargs may sit at the top
    level or nested under some key.
    """
    from models.stdit2_config import STDiT2Config

    path = Path(path)
    cfg_path = path / "config.json" if path.is_dir() else path
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no config.json at {cfg_path}")
    kwargs = _find_kwargs(json.loads(cfg_path.read_text()))
    if kwargs is None:
        raise ValueError(f"{cfg_path} has no STDiT2 kwargs (a mapping with 'hidden_size' and 'depth')")
    return STDiT2Config.from_dict(kwargs, ignore_unknown=True)


def save_stdit2_hf_dir(model: "STDiT2", config: "STDiT2Config", path: str | os.PathLike) -> Path:
    """Write ``config.json`` + ``model.safetensors``, atomically: into a temporary sibling folder, then renamed.

    A reader never sees a half-written directory; an existing directory at ``path`` is replaced.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(path, exists="replace") as tmp:
        cfg = {"architectures": ["STDiT2"], "model_type": "STDiT2", **config.to_dict()}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return path
