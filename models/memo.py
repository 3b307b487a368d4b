"""An in-memory, size-bounded memo of frozen-encoder outputs, keyed by the input's content.

A small dataset trained for many epochs (the CPU demo: two dozen clips, a hundred epochs) encodes the same frames
and captions again and again with encoders that never change. :class:`EncoderMemo` keeps each frame's VAE
posterior and each caption's T5 embedding the first time it is computed and returns the stored tensors after
that, so that only the frozen encoders' repeated work is skipped: what the model sees does not change (the VAE
still draws its posterior noise from the same generator, in the same shapes and order).

Keys are BLAKE2 digests of the input's bytes, shape and dtype (a frame, or a caption's text), so a memo can never
hand back another input's output. Entries are evicted least recently used first once ``max_bytes`` is reached.
The memo lives in one process (each training rank has its own) and is off unless a caller creates one
(``TrainConfig.encoders.memo_mb``).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import torch


def content_key(x: torch.Tensor | str, *context: object) -> bytes:
    """A digest of a tensor's bytes, shape and dtype (or of a string), plus anything that changes its encoding."""
    digest = hashlib.blake2b(digest_size=20)
    if isinstance(x, str):
        digest.update(b"str:" + x.encode("utf-8"))
    else:
        x = x.detach().contiguous().cpu()
        digest.update(f"{tuple(x.shape)}|{x.dtype}|".encode())
        digest.update(x.view(torch.uint8).numpy().tobytes() if x.dtype == torch.bfloat16 else x.numpy().tobytes())
    for item in context:
        digest.update(b"|" + repr(item).encode())
    return digest.digest()


def _nbytes(value: tuple[torch.Tensor, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in value)


class EncoderMemo:
    """Least-recently-used map from content keys to tuples of tensors, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self._entries: OrderedDict[bytes, tuple[torch.Tensor, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> tuple[torch.Tensor, ...] | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: bytes, value: tuple[torch.Tensor, ...]) -> None:
        value = tuple(t.detach().clone() for t in value)  # never a view that pins a whole batch
        if _nbytes(value) > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= _nbytes(old)
        self._entries[key] = value
        self.bytes += _nbytes(value)
        while self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= _nbytes(evicted)

    def get_or_compute(self, key: bytes, compute: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        """The stored value of ``key``, or ``compute()`` stored under it."""
        value = self.get(key)
        if value is None:
            value = compute()
            self.put(key, value)
        return value
