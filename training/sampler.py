"""The batch sampler of Open-Sora v1.1 buckets: per-rank, single-bucket batches for a DataLoader, resumable.

Which bucket a row lands in is decided by ``training.buckets`` (``Bucket.assign``); this module turns that
assignment into shuffled, padded batches and the order ranks take them in.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from training.buckets import Bucket, BucketId, bucket_seed, read_metadata


class SampleIndex(NamedTuple):
    """What the sampler hands the dataset per sample: the row and the ``(t, H, W)`` to load it at.

    A tuple, so it passes through ``DataLoader(batch_sampler=...)`` to ``dataset[SampleIndex]`` unchanged (the
    reference encodes the same four numbers as the string ``"{idx}-{t}-{h}-{w}"``).
    """

    index: int
    num_frames: int
    height: int
    width: int


@dataclass
class _EpochPlan:
    samples: dict[BucketId, list[int]]  # bucket -> shuffled, padded/trimmed row indices (a multiple of its batch size)
    access_order: list[BucketId]  # one entry per global micro-batch, a multiple of num_replicas long
    occurrence: list[int]  # access_order[j] is the occurrence[j]-th batch taken from its bucket


class VariableVideoBatchSampler:
    """Per-rank batches of single-bucket samples for a DataLoader (``batch_sampler=``).

    Each epoch: assign every row to a bucket (seeded by ``seed``, ``epoch`` and the row position, the reference's
    keep draws), shuffle each bucket with ``torch.Generator`` seeded ``seed + epoch``, cut it into batches of the
    bucket's batch size, and shuffle the resulting list of batches (the bucket access order). Step ``i`` gives rank
    ``r`` the ``(i * num_replicas + r)``-th batch, so at every step each rank has a whole batch of one bucket (ranks
    may differ in bucket) and ranks never share a sample within a pass except through padding.

    ``drop_last=False`` pads each bucket's last batch by repeating samples of that bucket, and pads the access order
    to a multiple of ``num_replicas`` by repeating batches; ``drop_last=True`` drops both remainders. (The reference
    pads with a single slice, which silently loses a bucket holding fewer than half a batch; ours never does.)

    Resume: ``state_dict(num_steps)`` records the epoch and the global batches consumed; ``load_state_dict`` puts the
    sampler back there, and the next pass regroups *that* epoch (the assignment is a pure function of seed, epoch and
    rows) and continues with the next unseen batch, so an interrupted run yields exactly what the uninterrupted one
    would have. The reference differs on the first resumed pass: its training script groups epoch 0 once (in
    ``get_num_batch``) before loading the saved epoch, and that first pass reuses the epoch-0 grouping with the saved
    position. We do not reproduce that quirk.
    """

    def __init__(
        self,
        rows: Any,
        bucket: Bucket,
        frame_interval: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 42,
        shuffle: bool = True,
        drop_last: bool = False,
    ):
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        if frame_interval < 1:
            raise ValueError(f"frame_interval must be >= 1, got {frame_interval}")
        self.num_frames, self.heights, self.widths = read_metadata(rows)
        self.bucket = bucket
        self.frame_interval = frame_interval
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.consumed_batches = 0  # global micro-batches (all ranks) already handed out in this epoch
        self._plan_cache: tuple[int, _EpochPlan] | None = None

    @property
    def num_rows(self) -> int:
        return len(self.num_frames)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next pass. A new epoch starts from its first batch; the current one keeps its
        position (so calling ``set_epoch`` with the epoch just restored by ``load_state_dict`` is harmless)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.consumed_batches = 0

    def group_by_bucket(self) -> dict[BucketId, list[int]]:
        """Row indices per bucket for the current epoch, in row order (buckets in order of first appearance)."""
        groups: dict[BucketId, list[int]] = {}
        for i, (t, h, w) in enumerate(zip(self.num_frames, self.heights, self.widths)):
            seed = bucket_seed(self.seed, self.epoch, i, self.bucket.num_bucket)
            bucket_id = self.bucket.assign(t, h, w, self.frame_interval, seed).bucket_id
            if bucket_id is not None:
                groups.setdefault(bucket_id, []).append(i)
        return groups

    def _plan(self) -> _EpochPlan:
        if self._plan_cache is not None and self._plan_cache[0] == self.epoch:
            return self._plan_cache[1]
        import torch

        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        samples: dict[BucketId, list[int]] = {}
        batches: list[BucketId] = []
        # 1. Shuffle each bucket, then trim or pad it to whole batches.
        for bucket_id, indices in self.group_by_bucket().items():
            batch_size = self.bucket.get_batch_size(bucket_id)
            assert batch_size is not None
            if self.shuffle:
                indices = [indices[k] for k in torch.randperm(len(indices), generator=generator).tolist()]
            if self.drop_last:
                indices = indices[: len(indices) // batch_size * batch_size]
            else:
                padded = math.ceil(len(indices) / batch_size) * batch_size
                indices = [indices[k % len(indices)] for k in range(padded)]
            if indices:
                samples[bucket_id] = indices
                batches += [bucket_id] * (len(indices) // batch_size)
        # 2. Random bucket access order: one entry per batch.
        if self.shuffle and batches:
            batches = [batches[k] for k in torch.randperm(len(batches), generator=generator).tolist()]
        # 3. Whole steps: every rank gets a batch at every step.
        if self.drop_last:
            batches = batches[: len(batches) // self.num_replicas * self.num_replicas]
        elif batches:
            padded = math.ceil(len(batches) / self.num_replicas) * self.num_replicas
            batches = [batches[k % len(batches)] for k in range(padded)]
        seen: dict[BucketId, int] = {}
        occurrence = []
        for bucket_id in batches:
            occurrence.append(seen.get(bucket_id, 0))
            seen[bucket_id] = occurrence[-1] + 1
        plan = _EpochPlan(samples, batches, occurrence)
        self._plan_cache = (self.epoch, plan)
        return plan

    def __len__(self) -> int:
        """Batches this rank gets in a whole pass of the current epoch (a resumed pass yields fewer)."""
        return len(self._plan().access_order) // self.num_replicas

    def __iter__(self) -> Iterator[list[SampleIndex]]:
        plan = self._plan()
        num_steps = len(plan.access_order) // self.num_replicas
        start = self.consumed_batches // self.num_replicas  # whole steps, also when num_replicas changed on resume
        self.consumed_batches = start * self.num_replicas
        for step in range(start, num_steps):
            j = step * self.num_replicas + self.rank
            bucket_id = plan.access_order[j]
            batch_size = self.bucket.get_batch_size(bucket_id)
            assert batch_size is not None
            rows = plan.samples[bucket_id]
            # A padded access order can ask a bucket for more batches than it has: wrap around.
            first = (plan.occurrence[j] * batch_size) % len(rows)
            t, h, w = self.bucket.get_thw(bucket_id)
            self.consumed_batches += self.num_replicas
            yield [SampleIndex(i, t, h, w) for i in rows[first : first + batch_size]]
        self.consumed_batches = 0  # the pass is over; the next one starts at the beginning (of set_epoch's epoch)

    def state_dict(self, num_steps: int | None = None) -> dict[str, int]:
        """Position to resume from.

        Pass ``num_steps`` (training steps done in the current epoch): a DataLoader with workers prefetches, so the
        sampler's own counter runs ahead of what training has consumed.
        """
        consumed = self.consumed_batches if num_steps is None else num_steps * self.num_replicas
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "consumed_batches": consumed,
            "num_replicas": self.num_replicas,
            "num_rows": self.num_rows,
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from ``state``. Refuses a state from another seed or table: the grouping would differ."""
        if state["seed"] != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this sampler has seed {self.seed}")
        if state["num_rows"] != self.num_rows:
            raise ValueError(f"sampler state was saved for a table of {state['num_rows']} rows, this one has "
                             f"{self.num_rows}: resuming would regroup different data")
        self.epoch = int(state["epoch"])
        self.consumed_batches = int(state["consumed_batches"])
