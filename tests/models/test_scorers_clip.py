"""CLIP-based scorers (aesthetic, caption match) on a tiny random open_clip model; no real weights needed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from curation.samples import PALETTE, Shot, render_frame
from models.scorers import WeightsUnavailable
from models.scorers.aesthetic import AestheticMLP, AestheticScorer, load_aesthetic_mlp
from models.scorers.clip_backbone import DEFAULT_CLIP_MODEL, build_tiny_clip, load_clip
from models.scorers.clip_match import ClipMatchScorer

# The public sac+logos+ava1-l14-linearMSE.pth state dict: names and shapes.
PUBLIC_MLP_LAYOUT = {
    "layers.0.weight": (1024, 768),
    "layers.0.bias": (1024,),
    "layers.2.weight": (128, 1024),
    "layers.2.bias": (128,),
    "layers.4.weight": (64, 128),
    "layers.4.bias": (64,),
    "layers.6.weight": (16, 64),
    "layers.6.bias": (16,),
    "layers.7.weight": (1, 16),
    "layers.7.bias": (1,),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config name, checkpoint, folder) of a tiny random CLIP, and a 64-d aesthetic MLP saved beside it."""
    root = tmp_path_factory.mktemp("tiny_clip")
    name, checkpoint = build_tiny_clip(root)
    torch.manual_seed(1)
    mlp_path = root / "aesthetic_tiny.pth"
    torch.save(AestheticMLP(in_dim=64).state_dict(), mlp_path)
    return {"name": name, "checkpoint": checkpoint, "folder": root, "mlp": mlp_path}


def _independent_clip(tiny):
    """The tiny CLIP built by open_clip directly from its weights file (no project code in between)."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(tiny["name"], pretrained=str(tiny["checkpoint"]))
    return model.eval(), preprocess


@pytest.fixture(scope="module")
def backbone(tiny):
    return load_clip(tiny["checkpoint"], model_name=tiny["name"], device="cpu")


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    """Six distinct RGB frames of different sizes: moving shapes, a title card, a still card."""
    shots = [
        (Shot("moving", 40, PALETTE[0], speed=5.0), 0, 320, 192),
        (Shot("moving", 40, PALETTE[2], speed=5.0), 30, 320, 192),
        (Shot("text", 1, PALETTE[5], text="HELLO DAGSTER"), 0, 256, 144),
        (Shot("static", 1, PALETTE[1]), 0, 200, 300),
        (Shot("static", 1, PALETTE[3]), 0, 640, 360),
        (Shot("moving", 40, PALETTE[4], speed=3.0), 12, 176, 144),
    ]
    return [render_frame(shot, i, w, h) for shot, i, w, h in shots]


# -- backbone -------------------------------------------------------------------------------------------------


def test_default_architecture_is_openai_vit_l14_with_quickgelu():
    import open_clip

    config = open_clip.get_model_config(DEFAULT_CLIP_MODEL)
    assert config["embed_dim"] == 768 and config["vision_cfg"]["patch_size"] == 14
    assert config["quick_gelu"] is True  # OpenAI's weights were trained with QuickGELU


def test_backbone_loads_from_file_folder_and_json(tiny, backbone, frames):
    from_folder = load_clip(tiny["folder"], device="cpu")
    from_json = load_clip(tiny["checkpoint"], model_name=str(tiny["folder"] / f"{tiny['name']}.json"), device="cpu")
    feats = backbone.encode_images(frames)
    assert feats.shape == (len(frames), 64) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(len(frames)))
    torch.testing.assert_close(from_folder.encode_images(frames), feats)
    torch.testing.assert_close(from_json.encode_images(frames), feats)
    assert backbone.context_length == 32 and backbone.embed_dim == 64
    text = backbone.encode_texts(["a cat", "a very long caption " * 30])  # truncated to 32 tokens, not an error
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))


def test_backbone_is_batch_size_invariant(backbone, frames):
    full = backbone.encode_images(frames, batch_size=64)
    torch.testing.assert_close(backbone.encode_images(frames, batch_size=1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(backbone.encode_images(frames, batch_size=4), full, atol=1e-5, rtol=1e-5)


def test_backbone_refuses_missing_weights(tmp_path, tiny):
    with pytest.raises(WeightsUnavailable, match="not set"):
        load_clip(None)
    missing = tmp_path / "ViT-L-14.pt"
    with pytest.raises(WeightsUnavailable, match=str(missing)):
        load_clip(missing)
    with pytest.raises(WeightsUnavailable, match="not found"):
        load_clip("openai")  # a pretrained tag is not a local path: never handed to open_clip to download
    (tmp_path / "open_clip_config.json").write_text((tiny["folder"] / "open_clip_config.json").read_text())
    with pytest.raises(WeightsUnavailable, match="has no weights"):
        load_clip(tmp_path)


# -- aesthetic ------------------------------------------------------------------------------------------------


def test_aesthetic_mlp_has_the_public_key_layout(tmp_path):
    mlp = AestheticMLP()
    assert {k: tuple(v.shape) for k, v in mlp.state_dict().items()} == PUBLIC_MLP_LAYOUT

    # A state dict with exactly the public names and shapes loads strictly, bare or inside a Lightning checkpoint.
    generator = torch.Generator().manual_seed(0)
    public = {k: torch.randn(shape, generator=generator) for k, shape in PUBLIC_MLP_LAYOUT.items()}
    torch.save(public, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    torch.save({"state_dict": public}, tmp_path / "lightning.ckpt")
    for name in ("sac+logos+ava1-l14-linearMSE.pth", "lightning.ckpt"):
        loaded = load_aesthetic_mlp(tmp_path / name)
        assert loaded.in_dim == 768 and not loaded.training
        torch.testing.assert_close(loaded.state_dict()["layers.7.weight"], public["layers.7.weight"])

    # Linear end to end: the output is one affine map of the input (dropouts are off in eval).
    x = torch.randn(5, 768, generator=generator)
    w = public["layers.0.weight"].T @ public["layers.2.weight"].T @ public["layers.4.weight"].T
    w = w @ public["layers.6.weight"].T @ public["layers.7.weight"].T
    with torch.no_grad():
        out = loaded(x)
        affine = loaded(torch.zeros(1, 768)) + x @ w
    torch.testing.assert_close(out, affine, atol=1e-3, rtol=1e-4)

    torch.save({"fc.weight": torch.zeros(1, 768)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an aesthetic MLP"):
        load_aesthetic_mlp(tmp_path / "other.pth")


def test_aesthetic_scores_are_finite_deterministic_and_batch_invariant(tiny, backbone, frames):
    from PIL import Image

    clips = [frames[0:3], frames[3:4], frames[4:6]]
    scorer = AestheticScorer(backbone, tiny["mlp"], batch_size=64)
    scores = scorer.score_clips(clips)
    assert len(scores) == 3 and all(math.isfinite(s) for s in scores)
    assert scorer.score_clips(clips) == scores
    small_batches = AestheticScorer(
        tiny["checkpoint"], tiny["mlp"], device="cpu", batch_size=1, clip_model_name=tiny["name"]
    )
    np.testing.assert_allclose(small_batches.score_clips(clips), scores, rtol=1e-5, atol=1e-5)

    # By hand, sharing no code with the scorer: open_clip's own model and preprocessing, and the MLP applied as the
    # five affine layers of its state dict: the mean over each clip's frames of MLP(L2-normalised image features).
    model, preprocess = _independent_clip(tiny)
    weights = torch.load(tiny["mlp"], weights_only=True)
    for clip, score in zip(clips, scores):
        pixels = torch.stack([preprocess(Image.fromarray(f)) for f in clip])
        with torch.no_grad():
            h = model.encode_image(pixels)
            h = h / h.norm(dim=-1, keepdim=True)
            for layer in (0, 2, 4, 6, 7):
                h = h @ weights[f"layers.{layer}.weight"].T + weights[f"layers.{layer}.bias"]
        assert score == pytest.approx(h.mean().item(), rel=1e-5, abs=1e-5)

    with pytest.raises(ValueError, match="clip 1 has no frames"):
        scorer.score_clips([frames[:1], []])


def test_aesthetic_missing_weights_raise_with_the_path(tmp_path, tiny, backbone):
    missing_mlp = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    with pytest.raises(WeightsUnavailable, match="aesthetic MLP weights not found at .*linearMSE.pth"):
        AestheticScorer(tiny["checkpoint"], missing_mlp, clip_model_name=tiny["name"])
    missing_clip = tmp_path / "ViT-L-14.pt"
    with pytest.raises(WeightsUnavailable, match=str(missing_clip)):
        AestheticScorer(missing_clip, tiny["mlp"])
    with pytest.raises(WeightsUnavailable, match="not set"):
        AestheticScorer(backbone, None)


def test_aesthetic_mlp_width_must_match_clip(tmp_path, backbone):
    torch.save(AestheticMLP(in_dim=768).state_dict(), tmp_path / "mlp768.pth")
    with pytest.raises(ValueError, match="768-d features but the CLIP model gives 64-d"):
        AestheticScorer(backbone, tmp_path / "mlp768.pth")


# -- caption match --------------------------------------------------------------------------------------------


def test_match_is_100_times_cosine_by_hand(tiny, backbone, frames):
    import open_clip
    from PIL import Image

    captions = ["a red circle moving", "a green field", "the words HELLO DAGSTER", "stripes", "a grey disc", "x"]
    scorer = ClipMatchScorer(backbone)
    scores = scorer.score(frames, captions)
    assert len(scores) == len(frames) and all(math.isfinite(s) for s in scores)

    model, preprocess = _independent_clip(tiny)  # not the backbone under test
    tokenizer = open_clip.get_tokenizer(tiny["name"])
    for frame, caption, score in zip(frames, captions, scores):
        with torch.no_grad():
            image = model.encode_image(preprocess(Image.fromarray(frame))[None])
            text = model.encode_text(tokenizer([caption]))
        expected = 100 * torch.nn.functional.cosine_similarity(image, text).item()
        assert score == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_match_is_deterministic_batch_invariant_and_uses_the_middle_frame(tiny, backbone, frames):
    captions = ["a caption"] * len(frames)
    scorer = ClipMatchScorer(backbone, batch_size=64)
    scores = scorer.score(frames, captions)
    assert scorer.score(frames, captions) == scores
    one_by_one = ClipMatchScorer(tiny["folder"], device="cpu", batch_size=1)
    np.testing.assert_allclose(one_by_one.score(frames, captions), scores, rtol=1e-4, atol=1e-4)

    clips = [frames[0:3], frames[3:5]]  # middles: frames[1] and frames[4]
    assert scorer.score_clips(clips, ["a", "b"]) == scorer.score([frames[1], frames[4]], ["a", "b"])
    with pytest.raises(ValueError, match="2 frames but 1 captions"):
        scorer.score(frames[:2], ["a"])


def test_match_missing_weights_raise_with_the_path(tmp_path):
    missing = tmp_path / "clip" / "ViT-L-14.pt"
    with pytest.raises(WeightsUnavailable, match=str(missing)):
        ClipMatchScorer(missing)
