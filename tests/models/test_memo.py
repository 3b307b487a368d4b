"""The encoder memo: a memoized VAE or T5 gives the tensors a fresh encoding gives, and encodes each input once.

"The same" is up to float rounding: memoized encoders encode one input at a time, and a frame encoded in another
micro-batch can differ in the last bits (convolution kernels pick their blocking by batch size), about 4e-6 on the
tiny random VAE's latents. With a memo, though, the bits never depend on the batch, which a resumed run needs."""

from __future__ import annotations

import pytest
import torch

from models.memo import EncoderMemo, content_key
from models.text_encoder import T5TextEncoder
from models.tiny import build_tiny_t5, build_tiny_vae
from models.vae import VideoAutoencoderKL


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> VideoAutoencoderKL:
    return VideoAutoencoderKL(build_tiny_vae(tmp_path_factory.mktemp("vae")), micro_batch_size=3).eval()


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return build_tiny_t5(tmp_path_factory.mktemp("t5"))


class CountingEncoder(torch.nn.Module):
    """Wraps the diffusers module's ``encode`` to count the frames it is given."""

    def __init__(self, module):
        super().__init__()
        self.inner, self.frames = module, 0

    @property
    def dtype(self):
        return self.inner.dtype

    def encode(self, x):
        self.frames += x.shape[0]
        return self.inner.encode(x)


@torch.no_grad()
def test_memoized_vae_gives_the_same_latents_and_encodes_each_frame_once(vae):
    g = torch.Generator().manual_seed(0)
    clip = torch.rand(1, 3, 6, 32, 48, generator=g) * 2 - 1
    window_a, window_b = clip[:, :, :4], clip[:, :, 2:]  # two overlapping windows of one clip, as epochs draw them
    fresh = [vae.encode(w, generator=torch.Generator().manual_seed(7)) for w in (window_a, window_b)]

    counting = CountingEncoder(vae.module)
    original, vae.module = vae.module, counting
    vae.memo = EncoderMemo(2**20)
    try:
        memoized = [vae.encode(w, generator=torch.Generator().manual_seed(7)) for w in (window_a, window_b)]
        again = vae.encode(window_a, generator=torch.Generator().manual_seed(7))
        mode = vae.encode_mode(window_b)
    finally:
        vae.module, vae.memo = original, None
    for got, want in zip(memoized, fresh):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    torch.testing.assert_close(again, fresh[0], rtol=0, atol=2e-5)
    torch.testing.assert_close(mode, vae.encode_mode(window_b), rtol=0, atol=2e-5)
    assert counting.frames == 6  # frames 2-3 are shared by the windows: each of the clip's 6 frames encoded once

    # A resumed run starts with an empty memo and meets the frames in other batches: the same bits.
    vae.memo = EncoderMemo(2**20)
    try:
        resumed = vae.encode(window_b, generator=torch.Generator().manual_seed(7))
    finally:
        vae.memo = None
    assert torch.equal(resumed, memoized[1])


def test_memoized_t5_gives_the_same_embeddings_and_encodes_each_caption_once(t5_dir):
    encoder = T5TextEncoder(t5_dir, model_max_length=16)
    captions = ["a red circle moving right", "a still image of orange stripes", "a red circle moving right"]
    fresh = encoder.encode(captions)
    encoder.memo = EncoderMemo(2**20)
    first = encoder.encode(captions)
    second = encoder.encode(list(reversed(captions)))
    for got, order in ((first, [0, 1, 2]), (second, [2, 1, 0])):
        torch.testing.assert_close(got["y"], fresh["y"][order], rtol=0, atol=2e-5)
        assert torch.equal(got["mask"], fresh["mask"][order])
    assert len(encoder.memo) == 2  # two distinct captions
    encoder.memo = EncoderMemo(2**20)
    assert torch.equal(encoder.encode(captions[1:])["y"], first["y"][1:])  # batch-independent bits


def test_keys_name_the_content_and_the_memo_stays_within_its_budget():
    a = torch.zeros(2, 3)
    assert content_key(a) == content_key(torch.zeros(2, 3))
    assert content_key(a) != content_key(torch.zeros(3, 2)) != content_key(torch.zeros(2, 3, dtype=torch.float64))
    assert content_key("red") != content_key("red", 16) != content_key("red", 32)
    memo = EncoderMemo(max_bytes=3 * 24)  # three entries of six float32
    for i in range(5):
        memo.put(content_key(str(i)), (torch.full((2, 3), float(i)),))
    assert len(memo) == 3 and memo.bytes <= memo.max_bytes
    assert memo.get(content_key("0")) is None and memo.get(content_key("4"))[0][0, 0] == 4.0
    with pytest.raises(ValueError):
        EncoderMemo(0)
