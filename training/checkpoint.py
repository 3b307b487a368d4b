"""Checkpoints: every stateful part of a run in ``step-NNNNNNNN/``, written atomically, the last K kept.

Layout of one checkpoint::

    model/           model weights, sharded by the booster (ColossalAI checkpoint IO)
    optimizer/       optimizer state: sharded by the booster under ZeRO (each rank holds a shard); under DDP every
                     rank holds the same state, which rank 0 saves whole (ColossalAI's CPU accelerator cannot load
                     sharded optimizer checkpoints: it tries to synchronize a device that does not exist)
    ema/             fp32 EMA weights as a Hugging Face-style folder (config.json + model.safetensors): what
                     sampling and evaluation load, through the same loader as the official weights
    rng-rank{r}.pt   python / numpy / torch RNG states of every rank
    state.json       step, epoch, sampler position, objective, dataset version, MLflow run id, config

All ranks write into ``.tmp-step-N/``; after a barrier rank 0 renames it to ``step-N/``, so a run killed at any
moment leaves either a complete checkpoint or none (a stale ``.tmp-*`` is removed on the next save).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

PREFIX = "step-"


def step_dir(outdir: Path, step: int) -> Path:
    return Path(outdir) / f"{PREFIX}{step:08d}"


def list_checkpoints(outdir: Path) -> list[Path]:
    outdir = Path(outdir)
    if not outdir.is_dir():
        return []
    return sorted(p for p in outdir.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file())


def latest_checkpoint(outdir: Path) -> Path | None:
    found = list_checkpoints(outdir)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(
    *,
    outdir: Path,
    step: int,
    booster,
    model,
    optimizer,
    ema: torch.nn.Module,
    ema_config: dict[str, Any],
    state: dict[str, Any],
    rank: int,
    barrier,
    keep_last: int,
    sharded_optimizer: bool,
) -> Path:
    """Save on every rank (the booster gathers shards); returns the final checkpoint folder."""
    from models.checkpoint_io import save_stdit2_hf_dir

    outdir = Path(outdir)
    final = step_dir(outdir, step)
    tmp = outdir / f".tmp-{final.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    booster.save_model(model, str(tmp / "model"), shard=True, use_safetensors=True)
    if sharded_optimizer:
        booster.save_optimizer(optimizer, str(tmp / "optimizer"), shard=True)
    elif rank == 0:
        (tmp / "optimizer").mkdir()
        torch.save(optimizer.state_dict(), tmp / "optimizer" / "optimizer.pt")
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    if rank == 0:
        save_stdit2_hf_dir(ema, ema_config, tmp / "ema")
        (tmp / "state.json").write_text(json.dumps(state, indent=2, default=str))
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(outdir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / "state.json").read_text())


def load_checkpoint(
    *, checkpoint: Path, booster, model, optimizer, ema: torch.nn.Module, rank: int, sharded_optimizer: bool
) -> dict[str, Any]:
    """Restore model, optimizer, EMA and this rank's RNG; returns ``state.json``."""
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    booster.load_model(model, str(checkpoint / "model"))
    if sharded_optimizer:
        booster.load_optimizer(optimizer, str(checkpoint / "optimizer"))
    else:
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer" / "optimizer.pt", weights_only=False))
    ema.load_state_dict(load_file(checkpoint / "ema" / "model.safetensors"), strict=True)
    rng_file = checkpoint / f"rng-rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return read_state(checkpoint)
