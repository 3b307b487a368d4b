"""One checkpoint's state: saving and loading the model, optimizer, EMA and RNG of a run in ``step-NNNNNNNN/``.

One checkpoint (format 2)::

    model/           model weights, sharded by the booster (ColossalAI checkpoint IO, safetensors)
    optimizer/       optimizer state: sharded by the booster under ZeRO; under DDP every rank holds the same state,
                     which rank 0 saves whole as ``optimizer.pt`` (tensors and plain containers only)
    ema/             fp32 EMA weights as a Hugging Face-style folder (config.json + model.safetensors)
    rng-rank{r}.json python / numpy / torch RNG states of every rank, as JSON
    state.json       step, epoch, sampler position, objective, dataset version, MLflow run id, config, world size
    COMPLETE.json    written last: the format, the step and the size of every file above

Writing: all ranks write into ``.tmp-step-N/`` and fsync what they wrote; after a barrier rank 0 renames it to
``step-N/``, fsyncs the run folder, then writes ``COMPLETE.json``, and prunes old checkpoints
(``training.checkpoint_folders`` decides which are complete, which to resume from and which to delete).

Reading never unpickles code: ``torch.load(weights_only=True)`` everywhere (the booster's loads included), RNG states
and the sampler position are JSON. Checkpoints from before format 2 (``rng-rank{r}.pt``, no marker, ``step-*``
directly in the output folder) still resume; their RNG files are read with only numpy's array types allowed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from common.files import fsync_path, fsync_tree, publish
from training.checkpoint_folders import FORMAT, MARKER, manifest, prune, step_dir, write_json_durably
from training.runs import ResumeError

# STDiT2Config fields that change how a model runs, not what its weights are: a resume may change them.
RUNTIME_ONLY_MODEL_KEYS = frozenset({"grad_checkpointing", "enable_flash_attn", "enable_layernorm_kernel", "input_size"})


class UnsafeCheckpointFile(ResumeError):
    """A checkpoint file holds pickled objects other than tensors and plain containers."""


# --------------------------------------------------------------------------------------------------------------
# RNG states as JSON, and loads that never run code
# --------------------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (and CUDA) RNG states as JSON-ready data."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state` output (JSON) or a pre-format-2 state (tuples, numpy arrays, a ByteTensor)."""
    python = state["python"]
    random.setstate((int(python[0]), tuple(int(x) for x in python[1]), None if python[2] is None else float(python[2])))
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["kind"], np.asarray(numpy_state["keys"], dtype=np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(tuple(numpy_state))
    torch.set_rng_state(_byte_tensor(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_byte_tensor(s) for s in state["cuda"]])


def _byte_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(torch.uint8)
    return torch.frombuffer(bytearray(base64.b64decode(value)), dtype=torch.uint8).clone()


def _numpy_array_globals() -> list:
    """What a pickled numpy array needs: only array reconstruction and dtypes, never a callable of the file's choice."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def safe_torch_load(path: Path, *, allow_numpy: bool = False) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, a clear error for anything else."""
    path = Path(path)
    context = torch.serialization.safe_globals(_numpy_array_globals()) if allow_numpy else contextlib.nullcontext()
    try:
        with context, weights_only_loads():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # what the weights-only unpickler raises for anything not allowed
        raise UnsafeCheckpointFile(
            f"refusing to load {path}: it holds pickled objects that are not tensors or plain containers, and "
            "loading it would run code of the file's choice. Checkpoints written by opensora-dag never contain "
            "such objects: do not resume from this folder unless you know where the file came from"
        ) from err


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Force ``torch.load(weights_only=True)`` for code we do not control (the booster's checkpoint IO)."""
    saved = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --------------------------------------------------------------------------------------------------------------
# Save and load
# --------------------------------------------------------------------------------------------------------------
def save_checkpoint(
    *,
    outdir: Path,
    step: int,
    booster,
    model,
    optimizer,
    ema: torch.nn.Module,
    ema_config: Any,
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
    # A fixed name, not common.files.temporary_sibling: every rank must find the same folder, and
    # training.runs.clean_stale removes a dead holder's leftovers by it.
    tmp = outdir / f".tmp-{final.name}"
    # 1. A fresh temporary folder
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    # 2. Every rank writes its part, then makes it durable
    booster.save_model(model, str(tmp / "model"), shard=True, use_safetensors=True)
    if sharded_optimizer:
        booster.save_optimizer(optimizer, str(tmp / "optimizer"), shard=True)
    elif rank == 0:
        (tmp / "optimizer").mkdir()
        torch.save(optimizer.state_dict(), tmp / "optimizer" / "optimizer.pt")
    (tmp / f"rng-rank{rank}.json").write_text(json.dumps(rng_state()))
    if rank == 0:
        save_stdit2_hf_dir(ema, ema_config, tmp / "ema")
        (tmp / "state.json").write_text(json.dumps({**state, "format": FORMAT}, indent=2, default=str))
    fsync_tree(tmp)
    barrier()
    # 3. Rank 0: rename into place, mark complete, prune
    if rank == 0:
        files = manifest(tmp)
        publish(tmp, final, exists="replace")
        fsync_path(outdir, directory=True)
        write_json_durably(final / MARKER, {"format": FORMAT, "step": step, "files": files})
        prune(outdir, keep_last)
    barrier()
    return final


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / "state.json").read_text())


def load_checkpoint(
    *, checkpoint: Path, booster, model, optimizer, ema: torch.nn.Module, rank: int, sharded_optimizer: bool
) -> dict[str, Any]:
    """Restore model, optimizer, EMA and this rank's RNG; returns ``state.json``. Nothing is unpickled but tensors
    and plain containers (:class:`UnsafeCheckpointFile` otherwise)."""
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    state = read_state(checkpoint)
    with weights_only_loads():
        booster.load_model(model, str(checkpoint / "model"))
        if sharded_optimizer:
            booster.load_optimizer(optimizer, str(checkpoint / "optimizer"))
    if not sharded_optimizer:
        optimizer.load_state_dict(safe_torch_load(checkpoint / "optimizer" / "optimizer.pt"))
    ema.load_state_dict(load_file(checkpoint / "ema" / "model.safetensors"), strict=True)
    rng_json, rng_legacy = checkpoint / f"rng-rank{rank}.json", checkpoint / f"rng-rank{rank}.pt"
    if rng_json.is_file():
        set_rng_state(json.loads(rng_json.read_text()))
    elif rng_legacy.is_file():
        set_rng_state(safe_torch_load(rng_legacy, allow_numpy=True))
    # a rank beyond the saved world size keeps its seeded RNG (every step draws from its own generator anyway)
    return state


# --------------------------------------------------------------------------------------------------------------
# What a resume may change
# --------------------------------------------------------------------------------------------------------------
def model_config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every STDiT2Config field that differs (runtime-only switches excepted)."""
    saved, current = json.loads(json.dumps(saved)), json.loads(json.dumps(current))
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in RUNTIME_ONLY_MODEL_KEYS:
            continue
        if saved.get(key) != current.get(key):
            out.append(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}")
    return out


def check_model_config(checkpoint: Path, saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    if saved is None:
        return
    diff = model_config_differences(saved, current)
    if diff:
        raise ResumeError(
            f"cannot resume from {checkpoint}: the model config differs from the one it was trained with "
            f"({'; '.join(diff)}). Resume with the same model settings (--set model.* / encoders.model_max_length), "
            "or start a new run without --resume"
        )


def resume_position(sampler_state: dict[str, Any], world_size: int) -> tuple[int, str | None]:
    """(training steps already taken in the saved epoch on ``world_size`` ranks, a message when the world changed).

    The sampler's position is global (batches of the epoch's access order consumed by all ranks together), so it
    re-shards onto any number of ranks: the next step starts at the first whole step not yet consumed.
    """
    consumed = int(sampler_state["consumed_batches"])
    saved = int(sampler_state.get("num_replicas", world_size))
    steps = consumed // world_size
    if saved == world_size:
        return steps, None
    message = (
        f"resuming a run trained on {saved} process(es) with {world_size}: the data position is re-sharded "
        f"({consumed} batches of epoch {sampler_state.get('epoch', 0)} consumed = step {steps} of that epoch on "
        f"{world_size} ranks); each step now takes {world_size} batches instead of {saved}, so the global batch "
        "changes while the learning rate does not"
    )
    repeated = consumed - steps * world_size
    if repeated:
        message += f"; the last {repeated} consumed batch(es) are trained on again"
    return steps, message
