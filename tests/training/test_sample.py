"""training.sample on a tiny random STDiT2, tiny T5 and tiny VAE written as real checkpoint folders.

Every inference mode is checked on what the model actually sees: a forward pre-hook records the latent ``x``,
``x_mask`` and caption ``y`` of every model call, so conditioning is asserted on latents, not on pixels of a
random model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint_io import save_stdit2_hf_dir
from models.stdit2 import build_stdit2
from models.tiny import build_tiny_t5, build_tiny_vae
from training.inference import Sampler
from training.sample import main
from training.sample_io import SampleRequest, load_reference_video, resolve_checkpoint, save_sample

H, W = 32, 48  # pixels; latent 4 x 6
STEPS = 4


def _write_checkpoint(run: Path, step: int, model, objective: str, t5: Path, vae: Path) -> Path:
    step_dir = run / f"step-{step:08d}"
    save_stdit2_hf_dir(model, model.config, step_dir / "ema")
    state = {
        "step": step,
        "objective": objective,
        "encoders": {"text_encoder": str(t5), "vae": str(vae)},
        "model_config": model.config.to_dict(),
        "config": {"objective": objective},
    }
    (step_dir / "state.json").write_text(json.dumps(state))
    return step_dir


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sample")
    t5 = build_tiny_t5(root / "t5", d_model=32)
    vae = build_tiny_vae(root / "vae")
    torch.manual_seed(0)
    model = build_stdit2("STDiT2-Tiny/2", caption_channels=32, model_max_length=12)
    with torch.no_grad():  # a fresh STDiT2 outputs zeros (zero-initialised final layer): make it do something
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    older = build_stdit2("STDiT2-Tiny/2", caption_channels=32, model_max_length=12)
    _write_checkpoint(root / "run", 1, older, "iddpm", t5, vae)
    step2 = _write_checkpoint(root / "run", 2, model, "iddpm", t5, vae)
    rflow = _write_checkpoint(root / "run-rflow", 5, model, "rflow", t5, vae)
    save_stdit2_hf_dir(model, model.config, root / "official")

    # References: a 40x60 image (resized and cropped to 32x48), a second image, a 6-frame video.
    rng = np.random.default_rng(0)
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(root / "b.png")
    frames = np.stack([np.full((H, W, 3), 30 * i, dtype=np.uint8) for i in range(6)])
    frames[:, 8:24, 8 * 1 : 8 * 3] = 200
    save_sample(frames, root, "ref", fps=8, gif=False)
    return {"root": root, "t5": t5, "vae": vae, "run": root / "run", "step2": step2, "rflow": rflow,
            "official": root / "official", "a": root / "a.png", "b": root / "b.png", "video": root / "ref.mp4"}


@pytest.fixture(scope="module")
def sampler(assets) -> Sampler:
    return Sampler.from_checkpoint(assets["run"], device="cpu")


@pytest.fixture(scope="module")
def rflow_sampler(assets, sampler) -> Sampler:
    return Sampler.from_checkpoint(assets["rflow"], text_encoder=sampler.text_encoder, vae=sampler.vae, device="cpu")


class Recorder:
    """Forward pre-hook that keeps a copy of every model call's inputs."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[dict[str, torch.Tensor]] = []
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        x, _t, y = args[:3]
        x_mask = kwargs.get("x_mask")
        self.calls.append({"x": x.clone(), "y": y.clone(), "x_mask": None if x_mask is None else x_mask.clone(),
                           "t": _t.clone(), "kwargs": {k: v for k, v in kwargs.items() if k in ("ar", "fps", "height")}})

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def request(**kw) -> SampleRequest:
    kw.setdefault("prompts", ["a cat sitting on a red sofa"])
    kw.setdefault("image_size", (H, W))
    kw.setdefault("num_sampling_steps", STEPS)
    kw.setdefault("num_frames", 5)
    return SampleRequest(**kw)


# -- checkpoints ------------------------------------------------------------------------------------------------------


def test_resolve_checkpoint_layouts(assets) -> None:
    latest = resolve_checkpoint(assets["run"])
    assert latest.step_dir == assets["step2"] and latest.weights_dir == assets["step2"] / "ema"
    assert latest.objective == "iddpm" and latest.encoder_paths["vae"] == str(assets["vae"])
    assert resolve_checkpoint(assets["step2"]).step_dir == assets["step2"]
    assert resolve_checkpoint(assets["step2"] / "ema").step_dir == assets["step2"]
    assert resolve_checkpoint(assets["rflow"]).objective == "rflow"
    official = resolve_checkpoint(assets["official"])
    assert official.state is None and official.objective == "iddpm"
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(assets["root"] / "t5" / "nope")
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        resolve_checkpoint(assets["root"])


def test_resolve_checkpoint_finds_the_newest_complete_checkpoint_of_the_newest_run(assets, tmp_path) -> None:
    """`--ckpt-path ckpt/stage1` names a training output folder of run-NNN folders; a half-written checkpoint
    (format 2 without its completion marker) is never sampled from."""
    import json
    import shutil

    out = tmp_path / "stage1"
    good = shutil.copytree(assets["step2"], out / "run-001" / "step-00000002")
    half = out / "run-002" / "step-00000009"
    shutil.copytree(assets["step2"], half)
    state = json.loads((half / "state.json").read_text())
    (half / "state.json").write_text(json.dumps({**state, "format": 2, "step": 9}))  # no COMPLETE.json
    assert resolve_checkpoint(out).step_dir == good
    assert resolve_checkpoint(out / "run-001").step_dir == good
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        resolve_checkpoint(out / "run-002")


def test_official_folder_needs_encoder_paths(assets, sampler) -> None:
    with pytest.raises(ValueError, match="--text-encoder"):
        Sampler.from_checkpoint(assets["official"], device="cpu")
    s = Sampler.from_checkpoint(assets["official"], text_encoder=assets["t5"], vae=assets["vae"], device="cpu")
    assert s.objective == "iddpm"
    torch.testing.assert_close(s.model.state_dict()["final_layer.linear.weight"],
                               sampler.model.state_dict()["final_layer.linear.weight"])


# -- modes ------------------------------------------------------------------------------------------------------------


def test_text_to_image(sampler, tmp_path) -> None:
    with Recorder(sampler.model) as rec:
        (image,) = sampler.generate(request(num_frames=1))
    assert image.shape == (1, H, W, 3) and image.dtype == np.uint8
    assert len(rec.calls) == STEPS
    call = rec.calls[0]
    assert call["x"].shape == (2, 4, 1, H // 8, W // 8)  # doubled batch for guidance
    assert call["x_mask"] is None
    torch.testing.assert_close(call["kwargs"]["ar"], torch.full((1,), H / W))  # ar = H/W at inference
    assert torch.equal(call["t"], torch.tensor([999, 999]))  # IDDPM, 4 steps: original timesteps from 999
    paths = save_sample(image, tmp_path, "img", fps=8)
    assert set(paths) == {"png", "gif"}
    from PIL import Image

    with Image.open(paths["png"]) as png:
        assert png.size == (W, H)
        np.testing.assert_array_equal(np.asarray(png), image[0])


def test_text_to_video_mp4_and_gif(sampler, tmp_path) -> None:
    import av
    from PIL import Image

    seen = []
    (video,) = sampler.generate(request(num_frames=5, fps=24, frame_interval=3), progress=lambda d, t: seen.append((d, t)))
    assert video.shape == (5, H, W, 3)
    assert seen == [(i, STEPS) for i in range(1, STEPS + 1)]
    paths = save_sample(video, tmp_path, "vid", fps=24 / 3)
    assert set(paths) == {"mp4", "gif"}
    with av.open(str(paths["mp4"])) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.average_rate == 8
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(decoded) == 5 and decoded[0].shape == (H, W, 3)
    # Lossy (4:2:0 chroma on near-noise content), but the same picture: far closer than its negative.
    err = np.abs(decoded[2].astype(int) - video[2]).mean()
    assert err < 0.3 * np.abs(255 - 2 * video[2].astype(int)).mean()
    with Image.open(paths["gif"]) as gif:
        assert gif.n_frames == 5 and gif.size == (W, H)


def test_same_seed_same_sample_any_batch_size(sampler) -> None:
    prompts = ["a cat sitting on a red sofa", "two dogs running along a sandy beach"]
    first = sampler.sample_latents(request(prompts=prompts, batch_size=2, seed=7))[0]
    again = sampler.sample_latents(request(prompts=prompts, batch_size=2, seed=7))[0]
    assert torch.equal(first, again)
    one_by_one = torch.cat(sampler.sample_latents(request(prompts=prompts, batch_size=1, seed=7)))
    torch.testing.assert_close(one_by_one, first, rtol=1e-4, atol=1e-3)
    other = sampler.sample_latents(request(prompts=prompts, batch_size=2, seed=8))[0]
    assert not torch.allclose(other, first)
    assert not torch.allclose(first[0], first[1])  # prompt i draws from seed + i


def test_image_to_video_pins_first_frame(sampler, assets) -> None:
    ref = sampler.encode_reference(assets["a"], (H, W))  # [C, 1, h, w]
    assert ref.shape == (4, 1, H // 8, W // 8)
    with Recorder(sampler.model) as rec:
        (latents,) = sampler.sample_latents(request(reference_paths=[str(assets["a"])], mask_strategy=["0"]))
    assert len(rec.calls) == STEPS
    for k, call in enumerate(rec.calls):
        assert call["x_mask"][:, 0].logical_not().all() and call["x_mask"][:, 1:].all()
        if k < STEPS - 1:  # pinned to the reference until the last step, where it is re-noised to level 0
            torch.testing.assert_close(call["x"][0, :, 0], ref[:, 0], rtol=0, atol=0)
    last = rec.calls[-1]["x"][0, :, 0]
    assert 0 < (last - ref[:, 0]).abs().max() < 0.05
    free = (latents[0, :, 1] - ref[:, 0]).abs().mean()
    assert (latents[0, :, 0] - ref[:, 0]).abs().mean() < 0.05 * free  # ends close to the reference

    # No strategy given: references condition frame 0 ("0"); the same sample.
    again = sampler.sample_latents(request(reference_paths=[str(assets["a"])]))[0]
    torch.testing.assert_close(again, latents)


def test_image_to_video_rflow_from_json_prompt(rflow_sampler, assets) -> None:
    ref = rflow_sampler.encode_reference(assets["a"], (H, W))
    prompt = 'a cat sitting on a red sofa{"reference_path": "%s", "mask_strategy": "0"}' % assets["a"]
    with Recorder(rflow_sampler.model) as rec:
        (latents,) = rflow_sampler.sample_latents(request(prompts=[prompt]))
    assert all(not c["x_mask"][:, 0].any() for c in rec.calls)
    torch.testing.assert_close(latents[0, :, 0], ref[:, 0], rtol=0, atol=0)  # rflow keeps hard conditions exactly
    assert rec.calls[0]["t"].dtype.is_floating_point and abs(rec.calls[0]["t"][0] - 1000) < 1e-3


def test_reference_video_is_resized_and_read_in_full(assets) -> None:
    video = load_reference_video(assets["video"], (16, 16))
    assert video.shape == (3, 6, 16, 16) and -1 <= video.min() and video.max() <= 1
    assert load_reference_video(assets["video"], (16, 16), max_frames=2).shape[1] == 2
    image = load_reference_video(assets["a"], (H, W))
    assert image.shape == (3, 1, H, W)


def test_video_editing_releases_frames_late(sampler, assets) -> None:
    """'0,0,0,0,5,0.5' at 4 steps: mask_t 2, so all frames are pinned at step 3, re-noised at step 2 (still a
    condition), and generated freely at steps 1 and 0."""
    ref = sampler.encode_reference(assets["video"], (H, W), max_frames=5)
    with Recorder(sampler.model) as rec:
        (latents,) = sampler.sample_latents(
            request(reference_paths=[str(assets["video"])], mask_strategy=["0,0,0,0,5,0.5"])
        )
    masks = [c["x_mask"][0].tolist() for c in rec.calls]
    assert masks == [[False] * 5, [False] * 5, [True] * 5, [True] * 5]
    torch.testing.assert_close(rec.calls[0]["x"][0], ref, rtol=0, atol=0)
    assert not torch.allclose(rec.calls[1]["x"][0], ref)  # re-noised from the reference
    assert not torch.allclose(latents[0], ref, atol=1e-2)


@pytest.mark.parametrize(
    ("strategy", "target", "source"),
    [("0,0,0,-2,2", slice(3, 5), slice(0, 2)),  # the spec's extension form: reference frames 0-1 at the end
     ("0,0,-2,0,2", slice(0, 2), slice(4, 6))],  # forward extension: the reference's last 2 frames first
)
def test_video_extension(sampler, assets, strategy, target, source) -> None:
    ref = sampler.encode_reference(assets["video"], (H, W))  # all 6 frames
    with Recorder(sampler.model) as rec:
        sampler.sample_latents(request(reference_paths=[str(assets["video"])], mask_strategy=[strategy]))
    cond = torch.zeros(5, dtype=torch.bool)
    cond[target] = True
    assert torch.equal(rec.calls[0]["x_mask"][0], ~cond)
    torch.testing.assert_close(rec.calls[0]["x"][0, :, target], ref[:, source], rtol=0, atol=0)


def test_connecting_images(sampler, assets) -> None:
    a = sampler.encode_reference(assets["a"], (H, W))
    b = sampler.encode_reference(assets["b"], (H, W))
    with Recorder(sampler.model) as rec:
        sampler.sample_latents(
            request(reference_paths=[f"{assets['a']};{assets['b']}"], mask_strategy=["0;0,1,0,-1,1"])
        )
    assert rec.calls[0]["x_mask"][0].tolist() == [False, True, True, True, False]
    for call in rec.calls[:-1]:
        torch.testing.assert_close(call["x"][0, :, 0], a[:, 0], rtol=0, atol=0)
        torch.testing.assert_close(call["x"][0, :, 4], b[:, 0], rtol=0, atol=0)


def test_loop_generation_with_per_loop_prompts(sampler) -> None:
    t, k, loops = 4, 2, 3
    req = request(prompts=["|0|a cat sitting on a red sofa|2|two dogs running along a sandy beach"],
                  num_frames=t, loop=loops, condition_frame_length=k)
    assert req.total_frames == loops * (t - k) + k == 8
    with Recorder(sampler.model) as rec:
        (latents,) = sampler.sample_latents(req)
    assert latents.shape == (1, 4, 8, H // 8, W // 8)
    assert len(rec.calls) == loops * STEPS
    loop1 = rec.calls[STEPS]
    assert loop1["x_mask"][0].tolist() == [False, False, True, True]
    # Loop 1 starts from loop 0's last K frames (which are output frames 2-3).
    torch.testing.assert_close(loop1["x"][0, :, :k], latents[0, :, t - k : t], rtol=0, atol=0)
    cat, dog = sampler.encode_text(["a cat sitting on a red sofa", "two dogs running along a sandy beach"])[0]
    for loop_i, text in enumerate([cat, cat, dog]):
        torch.testing.assert_close(rec.calls[loop_i * STEPS]["y"][0], text)
    req.num_sampling_steps = 1
    video = sampler.generate(req)[0]
    assert video.shape == (8, H, W, 3)


def test_loop_length_must_leave_new_frames() -> None:
    with pytest.raises(ValueError, match="condition_frame_length"):
        request(num_frames=4, loop=2, condition_frame_length=4)


# -- schedulers -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["iddpm", "dpm-solver", "rflow"])
def test_every_scheduler_runs(sampler, rflow_sampler, name) -> None:
    s = rflow_sampler if name == "rflow" else sampler
    seen = []
    (video,) = s.generate(request(scheduler=name, num_sampling_steps=3, num_frames=2), progress=lambda d, t: seen.append(d))
    assert video.shape == (2, H, W, 3) and seen == [1, 2, 3]
    assert video.std() > 0


def test_scheduler_must_match_objective(sampler, rflow_sampler, assets) -> None:
    with pytest.raises(ValueError, match="trained with the 'iddpm' objective"):
        sampler.generate(request(scheduler="rflow"))
    with pytest.raises(ValueError, match="'rflow' objective"):
        rflow_sampler.generate(request(scheduler="iddpm"))
    with pytest.raises(ValueError, match="'rflow' objective"):
        rflow_sampler.generate(request(scheduler="dpm-solver"))
    with pytest.raises(ValueError, match="dpm-solver cannot condition"):
        sampler.generate(request(scheduler="dpm-solver", reference_paths=[str(assets["a"])]))
    assert sampler.scheduler_name(None) == "iddpm" and rflow_sampler.scheduler_name(None) == "rflow"


# -- outputs and CLI --------------------------------------------------------------------------------------------------


def test_save_sample_crops_odd_sizes_for_h264(tmp_path) -> None:
    import av

    video = np.random.default_rng(0).integers(0, 256, (3, 33, 47, 3), dtype=np.uint8)
    paths = save_sample(video, tmp_path, "odd", fps=8, gif=False)
    assert set(paths) == {"mp4"}
    with av.open(str(paths["mp4"])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 3 and frames[0].shape == (32, 46, 3)


def test_cli(assets, tmp_path, capsys) -> None:
    import av

    out = tmp_path / "out"
    rc = main(["--ckpt-path", str(assets["run"]), "--prompt", "a cat sitting on a red sofa", "--prompt",
               "fireworks exploding in the dark night sky", "--save-dir", str(out), "--num-frames", "3",
               "--image-size", str(H), str(W), "--num-sampling-steps", "2", "--batch-size", "2", "--device", "cpu",
               "--no-progress"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["sample_0.gif", "sample_0.mp4", "sample_1.gif", "sample_1.mp4"]
    with av.open(str(out / "sample_1.mp4")) as container:
        assert container.streams.video[0].average_rate == 8
        assert sum(1 for _ in container.decode(video=0)) == 3
    rc = main(["--ckpt-path", str(assets["run"]), "--prompt", "x", "--scheduler", "rflow", "--device", "cpu"])
    assert rc == 2 and "objective" in capsys.readouterr().err
