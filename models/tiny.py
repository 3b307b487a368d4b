"""Tiny, random, offline stand-ins for the pretrained T5 and VAE.

Tests and the CPU demo need real checkpoint folders that the production loaders (``T5TextEncoder``,
``VideoAutoencoderKL``) open exactly as they open ``DeepFloyd/t5-v1_1-xxl`` and ``stabilityai/sd-vae-ft-ema``.
These builders write such folders in well under a second, with no network: random weights (seeded, so the
same call writes the same files) and a T5 sentencepiece tokenizer trained on a small built-in caption corpus.

The tiny VAE keeps the real one's geometry (4 encoder blocks = 8x spatial downsampling, 4 latent channels) so
that latent sizes in the demo are the production ones.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

__all__ = ["TINY_CAPTIONS", "build_tiny_t5", "build_tiny_vae", "train_tiny_sentencepiece"]

# Short video captions in the style of the curated data; the tokenizer of the tiny T5 is trained on them.
TINY_CAPTIONS: tuple[str, ...] = (
    "a cat sitting on a red sofa in the afternoon sun",
    "a drone shot of snowy mountains at sunset",
    "two dogs running along a sandy beach",
    "a timelapse of clouds moving over a city skyline",
    "a woman walking through a busy street market at night",
    "a close-up of raindrops falling on a green leaf",
    "waves crashing against rocks on a rocky coast",
    "a man riding a bicycle down a country road",
    "an aerial view of a river winding through a forest",
    "a bowl of fresh fruit on a wooden kitchen table",
    "fireworks exploding in the dark night sky",
    "a slow motion shot of a hummingbird drinking nectar",
    "cars driving on a highway during rush hour",
    "a child building a sandcastle near the ocean",
    "the camera pans across a field of yellow flowers",
    "a chef chopping vegetables in a restaurant kitchen",
    "a candle flickering in a dark room",
    "a train passing through a tunnel in the mountains",
    "snow falling softly on a quiet village street",
    "a group of people dancing at an outdoor concert",
    "a close-up of a coffee cup with steam rising",
    "a sailboat drifting on a calm blue lake",
    "an astronaut floating inside a space station",
    "a horse galloping across an open meadow",
    "a busy airport terminal with travellers and luggage",
    "autumn leaves blowing in the wind in a park",
    "a robot arm assembling parts in a factory",
    "a waterfall flowing into a clear pool in the jungle",
    "a street musician playing the guitar on a corner",
    "a time-lapse of the moon rising over the desert",
    "a young girl reading a book under a tree",
    "a fish swimming among colourful coral reefs",
    "an old man feeding pigeons in a city square",
    "a hot air balloon rising over green hills at dawn",
    "lightning striking during a thunderstorm at night",
    "a panda eating bamboo in a zoo enclosure",
    "a skateboarder performing a trick in a skate park",
    "a scenic view of a lighthouse on a cliff by the sea",
    "steam rising from a hot spring in winter",
    "a butterfly landing on a purple flower",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz , . ! ? ' \" - : ; ( )",
)


def train_tiny_sentencepiece(captions: Sequence[str] = TINY_CAPTIONS, vocab_size: int = 256, seed: int = 0) -> bytes:
    """Train a T5-layout sentencepiece Unigram model (``<pad>``=0, ``</s>``=1, ``<unk>``=2, no BOS) in memory.

    ``vocab_size`` is an upper bound: a small corpus yields fewer pieces (``hard_vocab_limit=False``). Every
    character of the corpus is covered, so the built-in corpus leaves no ASCII letter or digit as ``<unk>``.
    """
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(captions)),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        normalization_rule_name="nmt_nfkc",
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def build_tiny_t5(
    dest_dir: str | Path,
    d_model: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    d_ff: int | None = None,
    vocab_size: int = 256,
    tokenizer_format: Literal["fast", "spiece"] = "fast",
    captions: Sequence[str] = TINY_CAPTIONS,
    seed: int = 0,
) -> Path:
    """Write a random T5 v1.1 encoder (gated-GELU) and its tokenizer to ``dest_dir``; return the folder.

    ``tokenizer_format="fast"`` writes ``tokenizer.json`` (what ``save_pretrained`` produces);
    ``"spiece"`` writes only ``spiece.model`` + ``tokenizer_config.json``, the layout of DeepFloyd's folder.
    """
    import torch
    from transformers import T5Config, T5EncoderModel

    from models.text_encoder import t5_tokenizer_from_spiece

    if d_model % num_heads:
        raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
    if tokenizer_format not in ("fast", "spiece"):
        raise ValueError(f"tokenizer_format must be 'fast' or 'spiece', got {tokenizer_format!r}")
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)

    # 1. Tokenizer: sentencepiece model, then the same conversion the loader uses for DeepFloyd folders.
    spiece = dest / "spiece.model"
    spiece.write_bytes(train_tiny_sentencepiece(captions, vocab_size=vocab_size, seed=seed))
    tokenizer = t5_tokenizer_from_spiece(spiece, extra_ids=0)
    if tokenizer_format == "fast":
        tokenizer.save_pretrained(dest)
        spiece.unlink()
    else:
        config = {
            "tokenizer_class": "T5Tokenizer",
            "extra_ids": 0,
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
        }
        (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    # 2. Encoder with random weights; the embedding table is rounded up to a multiple of 8 as T5's is.
    config = T5Config(
        vocab_size=-(-len(tokenizer) // 8) * 8,
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=d_ff or 2 * d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        use_cache=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(config).eval()
    model.save_pretrained(dest)
    return dest


def small_autoencoder_kl(block_out_channels: Sequence[int], latent_channels: int, norm_num_groups: int,
                         sample_size: int, scaling_factor: float):
    """A diffusers ``AutoencoderKL`` with the SD-VAE layout at small widths: one resnet per block, 2x per block
    after the first (8x with 4 blocks). Its weights are whatever the caller's RNG state gives them."""
    from diffusers import AutoencoderKL

    n_blocks = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_blocks,
        up_block_types=("UpDecoderBlock2D",) * n_blocks,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
    )


def build_tiny_vae(
    dest_dir: str | Path,
    block_out_channels: Sequence[int] = (16, 16, 32, 32),
    latent_channels: int = 4,
    norm_num_groups: int = 8,
    seed: int = 0,
) -> Path:
    """Write a random diffusers ``AutoencoderKL`` (8x spatial with the default 4 blocks) to ``dest_dir``."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = small_autoencoder_kl(block_out_channels, latent_channels, norm_num_groups, sample_size=32,
                                     scaling_factor=0.18215).eval()
        # A trained VAE's posterior is nearly deterministic (tiny variance); a random one's log-variance is ~0, which
        # would bury every latent under sampling noise. Pin the log-variance half of quant_conv to a tiny variance.
        with torch.no_grad():
            model.quant_conv.weight[latent_channels:].zero_()
            model.quant_conv.bias[latent_channels:].fill_(-20.0)
        # Like 0.18215 for the SD VAE, the scaling factor gives the latents unit standard deviation: a random
        # encoder's latents are ~20x smaller than that, which would leave a diffusion model almost nothing to learn.
        images = torch.nn.functional.interpolate(torch.rand(8, 3, 8, 8) * 2 - 1, size=(64, 64), mode="nearest")
        with torch.no_grad():
            std = model.encode(images).latent_dist.mean.std().item()
        model.register_to_config(scaling_factor=round(1.0 / std, 5))
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    return dest
