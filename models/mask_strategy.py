"""Mask strategies: how Open-Sora 1.1 conditions generation on reference frames.

A mask strategy is a string of `;`-separated entries, each a 6-tuple
``loop_id, ref_id, ref_start, target_start, length, edit_ratio``:

- ``loop_id``: the loop (``--loop``) the entry applies to; entries of other loops are ignored.
- ``ref_id``: which reference (of this prompt's reference list) to copy from.
- ``ref_start``: first reference frame to copy (negative counts from the reference's end).
- ``target_start``: first frame of the latent to overwrite (negative counts from the latent's end).
- ``length``: how many frames to copy.
- ``edit_ratio``: how free the copied frames are: 0 keeps them (a hard condition), 0.3 releases them for
  editing in the last 30% of the sampling steps, 1 generates them freely.

Missing trailing fields are filled from ``"0,0,0,0,1,0"``, so ``"0"`` (image to video) puts reference 0's
first frame at frame 0 as a hard condition. The values stay strings until applied, as in the reference.

The per-frame edit ratio becomes a step index ``mask_t = int(ratio * num_steps)`` (the product taken in
float32, as the reference does; it matters: 0.7 * 100 is 70 in float32 but 69 in float64). At sampling step
index ``i`` (counting down), a frame is treated as noised when ``mask_t > i``, re-noised to the level of step
``i`` when ``mask_t == i``, and reset to the reference after the step when ``mask_t < i``
(:func:`edit_ratio_schedule` spells this out; the samplers call :func:`edit_ratio_to_step_index`).

This module also holds the prompt helpers of the long-video script that go with mask strategies:
JSON suffixes on prompts (:func:`extract_json_from_prompts`) and per-loop prompts (:func:`split_prompt_per_loop`).
Only :func:`apply_mask_strategy` and :func:`edit_ratio_to_step_index` need torch; it is imported inside them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DEFAULT_ENTRY: tuple[str, ...] = ("0", "0", "0", "0", "1", "0")
"""Defaults for the six fields, used to fill entries that give fewer."""

_NUM_FIELDS = len(DEFAULT_ENTRY)


@dataclass(frozen=True)
class MaskEntry:
    """One parsed and typed mask-strategy entry."""

    loop_id: int
    ref_id: int
    ref_start: int
    target_start: int
    length: int
    edit_ratio: float

    @classmethod
    def from_strings(cls, fields: Sequence[str]) -> MaskEntry:
        if len(fields) != _NUM_FIELDS:
            raise ValueError(f"a mask-strategy entry has {_NUM_FIELDS} fields, got {list(fields)}")
        try:
            return cls(
                loop_id=int(fields[0]),
                ref_id=int(fields[1]),
                ref_start=int(fields[2]),
                target_start=int(fields[3]),
                length=int(fields[4]),
                edit_ratio=float(fields[5]),
            )
        except ValueError as err:
            raise ValueError(f"bad mask-strategy entry {list(fields)}: {err}") from err


def parse_mask_strategy(mask_strategy: str | None) -> list[list[str]] | None:
    """Split a strategy string into 6-string entries, filling missing trailing fields with the defaults.

    >>> parse_mask_strategy("0;0,1,0,-1,1")
    [['0', '0', '0', '0', '1', '0'], ['0', '1', '0', '-1', '1', '0']]
    """
    if mask_strategy is None:
        return None
    entries = []
    for raw in mask_strategy.split(";"):
        fields = [f.strip() for f in raw.split(",")]
        if len(fields) > _NUM_FIELDS:
            raise ValueError(f"mask-strategy entry {raw!r} has more than {_NUM_FIELDS} fields")
        if any(f == "" for f in fields):
            raise ValueError(f"mask-strategy entry {raw!r} has an empty field (in {mask_strategy!r})")
        entries.append(fields + list(DEFAULT_ENTRY[len(fields) :]))
    return entries


def parse_mask_entries(mask_strategy: str | None) -> list[MaskEntry]:
    """Like :func:`parse_mask_strategy` but typed; ``None`` gives no entries."""
    parsed = parse_mask_strategy(mask_strategy)
    return [] if parsed is None else [MaskEntry.from_strings(f) for f in parsed]


def apply_mask_strategy(
    z: torch.Tensor,
    refs: Sequence[Sequence[torch.Tensor]],
    mask_strategies: Sequence[str | None],
    loop_i: int,
) -> torch.Tensor:
    """Write reference frames into the initial latent ``z`` (in place) and return the per-frame edit ratios.

    Args:
        z: initial latent [B, C, T, H, W]; overwritten in place where references are inserted.
        refs: per batch row, its list of reference latents, each [C, T_ref, H, W].
        mask_strategies: per batch row, a strategy string or None (nothing inserted).
        loop_i: the current loop; entries with another loop_id are ignored.

    Returns:
        masks [B, T] float32: 1.0 where nothing was inserted, the entry's edit ratio where it was.
    """
    import torch

    if len(mask_strategies) != z.shape[0]:
        raise ValueError(f"{len(mask_strategies)} mask strategies for a batch of {z.shape[0]}")
    num_frames = z.shape[2]
    masks = torch.ones(z.shape[0], num_frames, dtype=torch.float32, device=z.device)
    for b, strategy in enumerate(mask_strategies):
        for entry in parse_mask_entries(strategy):
            if entry.loop_id != loop_i:
                continue
            if b >= len(refs) or not 0 <= entry.ref_id < len(refs[b]):
                n_refs = len(refs[b]) if b < len(refs) else 0
                raise ValueError(f"row {b}: strategy {strategy!r} uses reference {entry.ref_id}, but it has {n_refs}")
            ref = refs[b][entry.ref_id]  # [C, T_ref, H, W]
            ref_start = entry.ref_start + ref.shape[1] if entry.ref_start < 0 else entry.ref_start
            target_start = entry.target_start + num_frames if entry.target_start < 0 else entry.target_start
            src = ref[:, ref_start : ref_start + entry.length]
            dst = z[b, :, target_start : target_start + entry.length]
            if src.shape[1] != dst.shape[1] or src.shape[1] != entry.length or ref_start < 0 or target_start < 0:
                raise ValueError(
                    f"row {b}: entry {entry} does not fit: reference has {ref.shape[1]} frames, latent has {num_frames}"
                )
            dst.copy_(src)
            masks[b, target_start : target_start + entry.length] = entry.edit_ratio
    return masks


def append_loop_condition(
    mask_strategy: str | None, loop_i: int, last_ref: int, condition_frame_length: int
) -> str:
    """The entry the long-video script appends for loop ``loop_i > 0``: the last K frames of the previous
    clip (reference ``last_ref``) condition the first K frames of this one."""
    k = condition_frame_length
    extra = f"{loop_i},{last_ref},-{k},0,{k}"
    return extra if not mask_strategy else f"{mask_strategy};{extra}"


def edit_ratio_to_step_index(masks: torch.Tensor, num_sampling_steps: int) -> torch.Tensor:
    """``mask_t = int(ratio * num_sampling_steps)``, the product in float32 (the reference's rounding)."""
    import torch

    return (masks.to(torch.float32) * num_sampling_steps).to(torch.int64)


def edit_ratio_schedule(edit_ratio: float, num_sampling_steps: int) -> dict[str, Any]:
    """How a frame with this edit ratio is treated at each sampling step index (counting down to 0)."""
    import numpy as np

    mask_t = int(np.float32(edit_ratio) * np.float32(num_sampling_steps))
    indices = list(reversed(range(num_sampling_steps)))
    return {
        "edit_ratio": edit_ratio,
        "mask_t": mask_t,
        "t_indices_treated_as_noised": [i for i in indices if mask_t > i],
        "t_index_renoised": [i for i in indices if mask_t == i],
        "t_indices_reset_to_reference_after_step": sorted(i for i in indices if mask_t < i),
    }


def extract_json_from_prompts(prompts: Sequence[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """Split each prompt into its text and an optional trailing JSON object (``reference_path``,
    ``mask_strategy``). The split is just before the first ``{`` or ``[``; only one is allowed."""
    texts, infos = [], []
    for prompt in prompts:
        parts = re.split(r"(?=[{\[])", prompt)
        if len(parts) > 2:
            raise ValueError(f"prompt has more than one JSON part (a second '{{' or '['): {prompt!r}")
        texts.append(parts[0])
        infos.append(json.loads(parts[1]) if len(parts) == 2 else {})
    return texts, infos


def split_prompt_per_loop(
    prompts: Sequence[str], num_loop: int, clean: Callable[[str], str] | None = None
) -> list[list[str]]:
    """Per prompt, the text of each loop. ``"|0|a|2|b"`` gives a for loops 0-1 and b from loop 2 on;
    a plain prompt is used for every loop. ``clean`` (e.g. T5 caption cleaning) is applied to each text."""
    clean = clean or (lambda s: s)
    out = []
    for prompt in prompts:
        if not prompt.startswith("|0|"):
            out.append([clean(prompt)] * num_loop)
            continue
        parts = prompt.split("|")[1:]  # [start0, text0, start1, text1, ...]
        if len(parts) % 2:
            raise ValueError(f"per-loop prompt must alternate |loop|text: {prompt!r}")
        texts: list[str] = []
        for i in range(0, len(parts), 2):
            start = int(parts[i])
            end = int(parts[i + 2]) if i + 2 < len(parts) else num_loop
            if start != len(texts) or end < start:
                raise ValueError(f"per-loop prompt loops must increase from 0: {prompt!r}")
            texts.extend([clean(parts[i + 1])] * (end - start))
        if len(texts) != num_loop:
            raise ValueError(f"per-loop prompt covers {len(texts)} loops, expected {num_loop}: {prompt!r}")
        out.append(texts)
    return out
