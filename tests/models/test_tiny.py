"""Tiny checkpoint builders: deterministic folders that the production loaders open."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.tiny import TINY_CAPTIONS, build_tiny_t5, build_tiny_vae


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_tiny_t5_is_deterministic_and_seeded(tmp_path: Path) -> None:
    a = _files(build_tiny_t5(tmp_path / "a"))
    b = _files(build_tiny_t5(tmp_path / "b"))
    assert set(a) == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert a == b
    c = _files(build_tiny_t5(tmp_path / "c", seed=1))
    assert c["model.safetensors"] != a["model.safetensors"]


def test_tiny_t5_config_and_vocabulary(tmp_path: Path) -> None:
    from models.text_encoder import T5TextEncoder

    folder = build_tiny_t5(tmp_path / "t5", d_model=64, num_heads=4, tokenizer_format="spiece")
    assert {p.name for p in folder.iterdir()} == {
        "config.json",
        "model.safetensors",
        "spiece.model",
        "tokenizer_config.json",
    }
    config = json.loads((folder / "config.json").read_text())
    assert config["d_model"] == 64 and config["feed_forward_proj"] == "gated-gelu"
    encoder = T5TextEncoder(folder, model_max_length=32)
    assert encoder.output_dim == 64
    assert config["vocab_size"] >= len(encoder.tokenizer) and config["vocab_size"] % 8 == 0
    # The built-in corpus is fully covered: no caption (raw or cleaned) produces <unk>.
    unk = encoder.tokenizer.unk_token_id
    for caption in TINY_CAPTIONS:
        assert unk not in encoder.tokenizer(caption).input_ids, caption
    ids, _ = encoder.tokenize(list(TINY_CAPTIONS))
    assert not (ids == unk).any()


def test_tiny_t5_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="divisible"):
        build_tiny_t5(tmp_path / "x", d_model=30, num_heads=4)
    with pytest.raises(ValueError, match="tokenizer_format"):
        build_tiny_t5(tmp_path / "y", tokenizer_format="bpe")  # type: ignore[arg-type]


def test_tiny_vae_is_deterministic_and_8x(tmp_path: Path) -> None:
    from models.vae import VideoAutoencoderKL

    a = build_tiny_vae(tmp_path / "a")
    assert _files(a) == _files(build_tiny_vae(tmp_path / "b"))
    assert _files(a) != _files(build_tiny_vae(tmp_path / "c", seed=1))
    vae = VideoAutoencoderKL(a)
    assert vae.patch_size == (1, 8, 8)
    assert vae.out_channels == 4
    config = json.loads((a / "config.json").read_text())
    assert config["block_out_channels"] == [16, 16, 32, 32]
    # The factor is calibrated like SD's 0.18215: latents of the random encoder come out with unit std.
    assert vae.scaling_factor == config["scaling_factor"] and 1.0 < config["scaling_factor"] < 100.0
